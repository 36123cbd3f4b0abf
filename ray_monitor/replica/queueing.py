"""Queue time: how long a request waited between its caller and the replica running it.

Runs on both ends of a ``DeploymentHandle`` call. Ray Serve 2.60 gives the replica no
arrival or enqueue time (``RequestMetadata`` and the request context carry none), so the
caller sends its own: where :mod:`~ray_monitor.replica.propagation` fills Serve's
``RequestMetadata.tracing_context`` (``RunningReplica.try_send_request``, in an upstream
replica or in Serve's proxy), :func:`stamp` adds :data:`SENT_AT`, the wall-clock time at
which the caller handed the request to its router (Serve's ``PendingRequest.created_at``,
so the router's own wait for a replica with room counts as queue). The replica reads it
back with :func:`queue_of` when its wrapper starts the request: queue time is
``time.time() - sent``, clamped at 0, and what follows (the request's duration, its time
to first item) is time inside the replica.

The two times come from two processes' wall clocks: on one node they are the same clock;
across nodes the figure includes their skew (NTP keeps it to milliseconds, seldom
better), and a callee clock behind the caller's reads as 0, never as a negative wait.
Nothing is carried where the propagation is off (the caller's tracing off), and the
replica then pays one attribute read per request.
"""

from __future__ import annotations

import time
from typing import Any, Optional

__all__ = ["SENT", "SENT_AT", "sent_time", "span_attributes", "queue_of", "stamp"]

#: The key of the caller's send time in Serve's ``tracing_context`` (typed
#: ``Dict[str, str]``, but a dict Serve pickles as it is; W3C propagators read only
#: ``traceparent``/``tracestate``): seconds since the epoch as a float, as Serve's
#: ``created_at`` is, so the caller makes no text of it (a cold ``str(int(t * 1e6))``
#: cost about 14 us a hop, RESULTS.md §22). A new key, not a new value under
#: :data:`SENT`: a replica of the version before reads ``int(value)`` of :data:`SENT`,
#: which a float passes as a wrong number; under this key it finds no send time.
SENT_AT = "ray-monitor-sent"
#: The send time as the version before sent it (whole microseconds since the epoch, as
#: text): still read, from callers not yet upgraded (a rolling upgrade has both).
SENT = "ray-monitor-sent-us"
_time = time.time


def stamp(carrier: dict, pr: Any) -> None:
    """Adds the caller's send time to ``carrier`` (once: a request the router retries on
    another replica keeps its first)."""
    if SENT_AT not in carrier and SENT not in carrier:
        sent = getattr(pr, "created_at", None)
        carrier[SENT_AT] = sent if isinstance(sent, float) else _time()


def sent_time(carried: Any) -> Optional[float]:
    """The caller's send time in ``carried`` (Serve's ``_ray_trace_ctx``), either form;
    None when there is none or it is unreadable (not a finite number)."""
    sent = carried.get(SENT_AT)
    if type(sent) is float:
        return sent if sent - sent == 0.0 else None  # nan and inf are not a time
    if SENT in carried:
        try:
            return int(carried[SENT]) * 1e-6
        except (TypeError, ValueError, OverflowError):
            return None
    return None


def queue_of(request: Any) -> Optional[float]:
    """Seconds from the caller's send to now, for Ray Serve's request context
    ``request``; None when the caller sent no time (or an unreadable one)."""
    if request is None:
        return None
    carried = getattr(request, "_ray_trace_ctx", None)
    if not carried or not isinstance(carried, dict):
        return None
    sent = sent_time(carried)
    if sent is None:
        return None
    q = _time() - sent
    return q if q > 0.0 else 0.0


def span_attributes(cells: Any, token: int, fig: Any, base: Optional[dict] = None
                    ) -> Optional[dict]:
    """The attributes a request's span ends with: ``base``, its stream and token figures
    (``fig``, a ``streaming.Figures``) and its queue time when known."""
    q = cells.queued(token)
    if fig is None and q is None:
        return base
    out = dict(base) if base else {}
    if fig is not None:
        out.update(fig.span_attributes())
    if q is not None:
        out["ray_monitor.queue_seconds"] = q
        first = fig.stream.first if fig is not None and fig.stream is not None else None
        if first is not None:
            out["ray_monitor.stream.time_to_first_chunk_with_queue"] = q + first
    return out
