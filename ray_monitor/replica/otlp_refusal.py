"""A backend that refuses a signal: stop sending it there, and say once what to set.

Runs in every process that exports over OTLP through ray-monitor: replicas, and Ray
Serve's processes whose tracing loads ``ray_monitor.tracing:serve_span_processors``.

Many backends take traces and not metrics (Arize Phoenix answers 405 on ``/v1/metrics``,
Jaeger 404; over gRPC, UNIMPLEMENTED). The SDK's exporters log each refused batch as an
error and keep trying. Each of our OTLP exporters is wrapped in a
:class:`RefusalGuard`; a log filter on the SDK exporters' loggers recognises a refusal
(HTTP 404, 405 or 501; gRPC UNIMPLEMENTED) as the exporter reports it, in the thread
that exported, and takes that record out. The guard then stops sending that signal from
this process: one line says which variable points the signal elsewhere
(``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``..._METRICS_ENDPOINT``) or turns it off, and
the refusal is counted once in ``ray_monitor_self_errors_total{cause=
"otlp_traces_refused"}`` (``otlp_metrics_refused``). Other failures (the backend down,
overloaded) are not refusals: they are retried and counted as before.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, Callable, Optional

__all__ = ["ExportRefused", "REFUSING_HTTP_STATUS", "RefusalGuard", "refused", "reset",
           "watch_refusals"]

logger = logging.getLogger(__name__)

#: HTTP statuses that mean "this endpoint does not take this signal".
REFUSING_HTTP_STATUS = frozenset((404, 405, 501))
#: The SDK exporters' loggers (HTTP traces and metrics, and the gRPC exporters' base).
EXPORTER_LOGGERS = ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
                    "opentelemetry.exporter.otlp.proto.grpc.exporter")
_SIGNAL_OF = {"spans": "traces", "traces": "traces", "metrics": "metrics", "logs": "logs"}
_VARIABLE = {"traces": ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER"),
             "metrics": ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_METRICS_EXPORTER")}
# "Failed to export spans batch code: 405, reason: ..." (HTTP) and "Failed to export
# metrics to host:4317, error code: StatusCode.UNIMPLEMENTED, ..." (gRPC), SDK 1.30-1.45.
_FAILED = re.compile(r"Failed to export (\w+) (?:batch code: (\d+)|to \S+ error code: "
                     r"StatusCode\.(\w+))")

_local = threading.local()
_lock = threading.Lock()
_refused: dict[str, str] = {}  # signal -> how it was refused
#: Set by a replica: its self-error counter, so the refusal is counted (and logged by it).
on_refused: Optional[Callable[[str, Optional[BaseException]], None]] = None


class ExportRefused(Exception):
    """What the log line says; ``repr`` is the message, for the self-error log line."""

    def __repr__(self) -> str:
        return str(self)


class _RefusalWatch(logging.Filter):
    def __init__(self) -> None:
        super().__init__("ray_monitor.refusal")

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            m = _FAILED.search(record.getMessage())
        except Exception:
            return True
        if m is None:
            return True
        kind, http_status, grpc_code = m.groups()
        if http_status is not None and int(http_status) in REFUSING_HTTP_STATUS:
            how = f"HTTP {http_status}"
        elif grpc_code == "UNIMPLEMENTED":
            how = "gRPC UNIMPLEMENTED"
        else:
            return True
        _local.seen = (_SIGNAL_OF.get(kind, kind), how)
        return False  # the guard says it once, with what to do


_watching = False


def watch_refusals() -> None:
    """Puts the filter first on the exporters' loggers, once per process."""
    global _watching
    with _lock:
        if _watching:
            return
        for name in EXPORTER_LOGGERS:
            log = logging.getLogger(name)
            if not any(isinstance(f, _RefusalWatch) for f in log.filters):
                # First: a filter that drops repeats must not hide a refusal from it.
                log.filters.insert(0, _RefusalWatch())
        _watching = True


def refused(signal: str) -> Optional[str]:
    """How the backend refused ``signal`` in this process, or None."""
    return _refused.get(signal)


def reset() -> None:
    """Forget refusals (tests)."""
    with _lock:
        _refused.clear()


def _report(signal: str, how: str, endpoint: str) -> None:
    with _lock:
        if signal in _refused:
            return
        _refused[signal] = how
    var, off = _VARIABLE.get(signal, ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED"))
    err = ExportRefused(
        f"the OTLP endpoint {endpoint or ''} refused {signal} ({how}); this process sends "
        f"no more {signal} there. Point {signal} at a backend that takes them with {var}, "
        f"or turn them off with {off}=none")
    callback = on_refused
    if callback is not None:
        try:
            callback(f"otlp_{signal}_refused", err)
            return
        except Exception:  # pragma: no cover - fall back to saying it here
            pass
    logger.warning("ray-monitor: %s", err)


class RefusalGuard:
    """An OTLP exporter of one ``signal`` that stops once the backend refused it; while
    stopped, ``export`` drops the data and answers ``ok`` (counted once, as refused)."""

    def __init__(self, inner: Any, signal: str, ok: Any) -> None:
        self.inner = inner
        self.signal = signal
        self.ok = ok
        watch_refusals()

    def export(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        if self.signal in _refused:
            return self.ok
        _local.seen = None
        result = self.inner.export(data, *args, **kwargs)
        seen = getattr(_local, "seen", None)
        if seen is not None and seen[0] == self.signal:
            _local.seen = None
            _report(self.signal, seen[1], str(getattr(self.inner, "_endpoint", "") or ""))
            return self.ok
        return result

    def shutdown(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.shutdown(*args, **kwargs)

    def force_flush(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.force_flush(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
