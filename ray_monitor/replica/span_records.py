"""The aggregator's copy of a replica's spans: compact records, bounded per flush.

Runs in every replica (a span processor on the tracer's provider, and on Ray Serve's when
its tracing is on); the recorder drains the records into every snapshot.

A :class:`RecordingProcessor` turns each ended span into a small picklable dict. Kept
spans (failed, slow) go at once; a head-sampled span that ended ok and fast is held
(:mod:`~ray_monitor.replica.tail`) and goes only if its request is kept somewhere, as
``kept="trace"``. :class:`SpanRecords` bounds what goes per flush.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.trace.status import StatusCode

__all__ = ["MAX_CONTEXT_SPANS_PER_FLUSH", "MAX_SPANS_PER_FLUSH", "MAX_TEXT", "RECORD_ATTRIBUTES",
           "RecordingProcessor", "SpanRecords", "cut", "span_record"]

#: Span records a replica sends per flush; failed and slow spans take the room first.
MAX_SPANS_PER_FLUSH = 100
#: Of those, at most this many head-sampled ok spans (context for kept traces).
MAX_CONTEXT_SPANS_PER_FLUSH = 50
#: Strings in a record (name, status message, attribute values) are cut to this length.
MAX_TEXT = 256
#: The attributes a record keeps: ours, HTTP's, and Ray Serve's own span attributes.
RECORD_ATTRIBUTES = ("ray.serve.method", "ray_monitor.kept", "ray.serve.request_id",
                     "http.request.method", "url.path", "http.route",
                     "http.response.status_code", "error.type", "request_id", "call_method",
                     "deployment", "app", "route", "ray_monitor.queue_seconds",
                     "ray_monitor.request.cost")
#: ``ray_monitor.kept`` values that make a record a kept one (see :func:`span_record`).
_KEPT_REASONS = ("error", "slow", "trace")


def cut(v: Any, limit: int = MAX_TEXT) -> Any:
    """``v`` with strings cut to ``limit`` characters; other types as strings."""
    if isinstance(v, str):
        return v if len(v) <= limit else v[:limit - 3] + "..."
    if isinstance(v, (bool, int, float)):
        return v
    return cut(str(v), limit)


def span_record(span: ReadableSpan, slow_threshold_s: Optional[float],
                source: str = "ray_monitor") -> dict:
    """An ended span as a compact, picklable dict, every string cut to ``MAX_TEXT``.
    ``kept`` is ``error`` (status ERROR), ``slow`` (at least ``slow_threshold_s``; never
    for ``None``), ``trace`` (ok and fast, exported because its request was kept
    elsewhere) or empty for a span that is only context; ``slow`` says it also for a
    failed span."""
    ctx, parent = span.context, span.parent
    duration = max(0, (span.end_time or 0) - (span.start_time or 0)) / 1e9
    failed = span.status.status_code is StatusCode.ERROR
    slow = slow_threshold_s is not None and duration >= slow_threshold_s
    attrs = span.attributes or {}
    exception = None
    for ev in span.events:
        if ev.name == "exception":
            ea = ev.attributes or {}
            exception = {"type": cut(ea.get("exception.type", "")),
                         "message": cut(ea.get("exception.message", ""))}
            break
    marked = attrs.get("ray_monitor.kept")
    kept = "error" if failed else "slow" if slow else \
        marked if marked in _KEPT_REASONS else ""
    return {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
            "parent_span_id": f"{parent.span_id:016x}" if parent is not None and parent.is_valid
            else "", "name": cut(span.name), "kind": span.kind.name,
            "start": (span.start_time or 0) / 1e9, "duration_s": duration,
            "status": "error" if failed else "ok",
            "status_message": cut(span.status.description or ""),
            "kept": kept, "slow": slow, "source": source,
            "attributes": {k: cut(attrs[k]) for k in RECORD_ATTRIBUTES if k in attrs},
            "exception": exception}


class SpanRecords:
    """The span records of one replica until its next flush, bounded: kept spans
    fill it first, head-sampled ok spans take at most ``max_context`` places. What does
    not fit is dropped and counted; :meth:`drain` hands both over."""

    def __init__(self, *, max_spans: int = MAX_SPANS_PER_FLUSH,
                 max_context: int = MAX_CONTEXT_SPANS_PER_FLUSH) -> None:
        for name, v in (("max_spans", max_spans), ("max_context", max_context)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"SpanRecords({name}={v!r}): expected a count >= 0")
        self.max_spans = max_spans
        self.max_context = min(max_context, max_spans)
        self._lock = threading.Lock()
        self._records: list[dict] = []
        self._context = 0
        self._drops: dict[str, int] = {}

    def add(self, record: dict) -> None:
        with self._lock:
            kept = bool(record["kept"])
            if len(self._records) >= self.max_spans or (
                    not kept and self._context >= self.max_context):
                cause = "trace_spans_dropped:buffer_full" if kept else \
                    "trace_context_dropped:buffer_full"
                self._drops[cause] = self._drops.get(cause, 0) + 1
                return
            self._context += not kept
            self._records.append(record)

    def full(self) -> bool:
        return len(self._records) >= self.max_spans

    def count(self, cause: str) -> None:
        """Counts a record lost before it was made (see :meth:`drain`)."""
        with self._lock:
            self._drops[cause] = self._drops.get(cause, 0) + 1

    def drain(self) -> tuple[list[dict], dict[str, int]]:
        """The records since the last drain, and what was dropped (cause -> count)."""
        with self._lock:
            out, drops = self._records, self._drops
            self._records, self._drops, self._context = [], {}, 0
        return out, drops

    def __len__(self) -> int:
        return len(self._records)


class RecordingProcessor(SpanProcessor):
    """Every span that ends becomes a record in ``records``. It runs inline when a span
    ends, so it only builds a small dict and never raises."""

    def __init__(self, records: SpanRecords, *, slow_threshold_s: Optional[float] = None,
                 source: str = "ray_monitor",
                 hold: Optional[Callable[[dict], None]] = None) -> None:
        """``hold``: where a record that is not kept waits (None: it goes as context)."""
        self.records = records
        self.slow_threshold_s = slow_threshold_s
        self.source = source
        self.hold = hold

    def on_end(self, span: ReadableSpan) -> None:
        try:
            record = span_record(span, self.slow_threshold_s, self.source)
            if record["kept"] or self.hold is None:
                self.records.add(record)
            else:
                self.hold(record)
        except Exception:
            self.records.count("trace_record_failed")
