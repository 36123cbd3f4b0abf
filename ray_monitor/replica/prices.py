"""The rule file's token prices as a replica knows them, for the cost on a request's span.

Runs in every replica. The aggregator publishes the token prices in Ray's GCS key-value
store (:data:`~ray_monitor.common.names.PRICES_KEY`, at start and at every reload); a
replica reads them on a thread of its own, started by the first request whose usage is
known, then every :data:`REFRESH_S` seconds, so nothing on the request path or the flush
thread waits on the GCS. A request's span then says ``ray_monitor.request.cost``: its
tokens at its model's price (``*`` for other models), as the aggregator prices them. Until
the first read, after a reload until the next one, and where no price applies, the span
has no cost; the metrics (``cost``, ``request_cost``) are the aggregator's and exact.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable, Optional

from ray_monitor.common.names import KV_NAMESPACE, PRICES_KEY

__all__ = ["ANY_MODEL", "PriceBoard", "REFRESH_S", "parse", "read_gcs"]

REFRESH_S = 10.0
ANY_MODEL = "*"


def read_gcs() -> Optional[bytes]:
    """The published prices; None outside a Ray cluster (a test, a plain process)."""
    import ray
    from ray.experimental import internal_kv

    if not ray.is_initialized():
        return None
    return internal_kv._internal_kv_get(PRICES_KEY, namespace=KV_NAMESPACE)


def parse(raw: Optional[bytes]) -> dict[str, tuple[float, float]]:
    """``{model: (prompt_per_1k, completion_per_1k)}`` of the published JSON; entries of
    another shape are left out (a newer aggregator may say more)."""
    if not raw:
        return {}
    out = {}
    for model, v in json.loads(raw).items():
        if isinstance(v, list) and len(v) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            out[str(model)] = (float(v[0]), float(v[1]))
    return out


class PriceBoard:
    """The prices last read; :meth:`cost` is what the request path calls."""

    def __init__(self, *, read: Callable[[], Optional[bytes]] = read_gcs,
                 on_failure: Optional[Callable[..., Any]] = None, every_s: float = REFRESH_S,
                 start_thread: bool = True) -> None:
        self._read = read
        self._on_failure = on_failure
        self._every_s = every_s
        self._start_thread = start_thread
        self._prices: dict[str, tuple[float, float]] = {}
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    def cost(self, model: str, input_tokens: float, output_tokens: float) -> Optional[float]:
        """The tokens' cost at ``model``'s price, None when no price is known (yet)."""
        if self._thread is None and self._start_thread:
            self._start()
        prices = self._prices
        p = prices.get(model) or prices.get(ANY_MODEL)
        if p is None:
            return None
        return (input_tokens * p[0] + output_tokens * p[1]) / 1000.0

    def refresh(self) -> None:
        """One read of the published prices; a failure keeps the last ones and is counted."""
        try:
            self._prices = parse(self._read())
        except Exception as e:
            if self._on_failure is not None:
                self._on_failure(f"prices_read_failed:{type(e).__name__}", e)

    def _start(self) -> None:
        # Two requests may both get here: the second thread is harmless and never made
        # again, since _thread is set before either can look at it twice.
        self._thread = threading.Thread(target=self._loop, name="ray-monitor-prices",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self.refresh()
            if self._stop.wait(self._every_s):
                return

    def close(self) -> None:
        self._stop.set()
