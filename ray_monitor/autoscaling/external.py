"""Serve's external scaler: the aggregator asks it for a hint's replicas.

Runs in the aggregator, on a thread of its own (never on the evaluation loop). For
deployments deployed with ``external_scaler_enabled=True``, :func:`apply_external` POSTs
``{"target_num_replicas": N}`` to the dashboard's
``/api/v1/applications/{app}/deployments/{dep}/scale`` (alpha in Ray 2.60).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Mapping, Optional, Union

__all__ = ["ExternalScaleError", "apply_external"]

class ExternalScaleError(RuntimeError):
    """The dashboard refused a scale request; ``status`` and ``body`` say why."""

    def __init__(self, status: int, body: str, url: str):
        super().__init__(f"POST {url} answered {status}: {body[:300]}")
        self.status, self.body, self.url = status, body, url


def _urllib_send(url: str, body: bytes, headers: Mapping[str, str],
                 timeout_s: float) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


#: ``send(url, body, headers, timeout_s) -> (status, body text)``: the one I/O seam.
Sender = Callable[[str, bytes, Mapping[str, str], float], tuple[int, str]]


def apply_external(hint: Union[Mapping, Any], *, dashboard_url: str = "http://127.0.0.1:8265",
                   send: Sender = _urllib_send,
                   headers: Optional[Mapping[str, str]] = None,
                   timeout_s: float = 5.0) -> Optional[int]:
    """Ask Serve's external scaler for the hint's ``desired`` replicas.

    ``hint`` is a :class:`~ray_monitor.autoscaling.hints.Hint` or its ``to_dict()``. Returns the HTTP
    status, or None when the hint asks for nothing (``desired`` None). Raises
    :class:`ExternalScaleError` on an answer other than 2xx (412: the deployment was not
    deployed with ``external_scaler_enabled=True``, or is being deleted), and the
    network error when the dashboard cannot be reached. ``headers`` can carry
    ``Authorization: Bearer ...`` where Ray's token authentication is on.
    """
    d = hint if isinstance(hint, Mapping) else hint.to_dict()
    desired = d.get("desired")
    if desired is None:
        return None
    if isinstance(desired, bool) or not isinstance(desired, int) or desired < 0:
        raise ValueError(f"hint desired {desired!r} must be a whole number of replicas, 0 or more")
    quote = lambda s: urllib.parse.quote(str(s), safe="")  # noqa: E731
    url = (f"{dashboard_url.rstrip('/')}/api/v1/applications/{quote(d['application'])}"
           f"/deployments/{quote(d['deployment'])}/scale")
    body = json.dumps({"target_num_replicas": desired}).encode()
    status, text = send(url, body, {"Content-Type": "application/json", **(headers or {})}, timeout_s)
    if not 200 <= status < 300:
        raise ExternalScaleError(status, text, url)
    return status
