"""Exports that must never hold up the flush: one thread, a bounded queue, failures by cause.

Runs in every replica. The flush thread delivers snapshots to the aggregator every
second; an OTLP exporter whose endpoint is down retries for seconds per export (about
7 s over HTTP and gRPC). So the flush thread only hands the export to an
:class:`ExportWorker` and goes on: the worker's thread calls the exporter, and while it
is busy at most ``max_queue`` exports wait; a newer one displaces the oldest, which is
safe because OTLP metrics are cumulative (the newest export carries every count). Each
failure is counted by cause (``otlp_metrics_export:failed``, ``...:queue_full``,
``...:<exception type>``) in ``ray_monitor_self_errors_total``.

The OpenTelemetry exporters and batch processors log every failed attempt and every
dropped span themselves; :func:`quiet_otel_export_logs` lets each of those messages
through once per cause (numbers aside), as the design asks of every failure.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
from typing import Any, Callable, Optional

__all__ = ["ExportWorker", "OTEL_EXPORT_LOGGERS", "quiet_otel_export_logs"]

logger = logging.getLogger(__name__)

#: The loggers of the OTLP exporters and of the SDK's batch processors.
OTEL_EXPORT_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.sdk.trace.export",
)
#: Distinct messages remembered per logger; past this, repeats of unseen ones are let through
#: only until the set is full again (bounded memory whatever the exporter says).
_MAX_CAUSES = 200
_NUMBERS = re.compile(r"\d+(\.\d+)?")


class _OncePerCause(logging.Filter):
    """Lets a record through the first time its message (numbers blanked) is seen."""

    def __init__(self) -> None:
        super().__init__("ray_monitor.once")
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            key = _NUMBERS.sub("#", record.getMessage())[:300]
        except Exception:  # a record that cannot format is let through, as logging would
            return True
        with self._lock:
            if key in self._seen:
                return False
            if len(self._seen) >= _MAX_CAUSES:
                self._seen.clear()
            self._seen.add(key)
        record.msg = f"{record.msg} (ray-monitor: later repeats of this message are not logged)"
        return True


_quiet_lock = threading.Lock()


def quiet_otel_export_logs() -> None:
    """Each OTel exporter and batch-processor message is logged once per cause (idempotent)."""
    with _quiet_lock:
        for name in OTEL_EXPORT_LOGGERS:
            log = logging.getLogger(name)
            if not any(isinstance(f, _OncePerCause) for f in log.filters):
                log.addFilter(_OncePerCause())


class ExportWorker:
    """Runs ``export(item)`` on a thread of its own; :meth:`submit` never blocks.

    ``export`` returns something whose ``name`` is ``"FAILURE"`` (the SDK's
    ``MetricExportResult``/``SpanExportResult``), or raises, when it failed: counted as
    ``<what>:failed`` or ``<what>:<exception type>`` through ``on_failure(cause, exc)``.
    """

    def __init__(self, export: Callable[[Any], Any], *, what: str,
                 on_failure: Optional[Callable[[str, Optional[BaseException]], None]] = None,
                 max_queue: int = 2) -> None:
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an int >= 1, got {max_queue!r}")
        self.export = export
        self.what = what
        self.on_failure = on_failure or (lambda cause, exc: None)
        self._queue: collections.deque = collections.deque()
        self._max = max_queue
        self._cv = threading.Condition()
        self._closed = False
        self._busy = False
        self.exported = 0
        self._thread = threading.Thread(target=self._run, name=f"ray-monitor-{what}",
                                        daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> None:
        """Queues ``item`` for export; the oldest waiting one goes when the queue is full."""
        dropped = False
        with self._cv:
            if self._closed:
                return
            if len(self._queue) >= self._max:
                self._queue.popleft()
                dropped = True
            self._queue.append(item)
            self._cv.notify()
        if dropped:
            self._fail("queue_full", None)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                item = self._queue.popleft()
                self._busy = True
            try:
                result = self.export(item)
            except Exception as e:  # the thread outlives any exporter bug
                self._fail(type(e).__name__, e)
            else:
                if getattr(result, "name", None) == "FAILURE":
                    self._fail("failed", None)
                else:
                    self.exported += 1
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _fail(self, cause: str, exc: Optional[BaseException]) -> None:
        try:
            self.on_failure(f"{self.what}:{cause}", exc)
        except Exception:  # pragma: no cover - counting must never take the thread down
            logger.debug("ray-monitor: counting an export failure failed", exc_info=True)

    def idle(self, timeout: float) -> bool:
        """Waits up to ``timeout`` for the queue to empty and the export in flight to end."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float = 2.0) -> bool:
        """Exports what is queued within ``timeout`` and stops; True if the thread ended.
        An export stuck on a dead endpoint is left to its daemon thread."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()
