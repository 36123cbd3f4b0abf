"""The trace side of one request, as :meth:`tracing.Tracer.begin` makes it.

Runs in every replica of a monitored deployment, on the request path (made, read by the
handle-call hook and the log-record factory) and on the flush thread (the span made, or
held for tail keeping). Decides which of a request's ids exist as ints when: a request
begun under a caller's common ``traceparent`` (:class:`FromCaller`) keeps the caller's
text and makes its ints only where they are read (the drain, a kept span), so a hop pays
no ``int(hex, 16)`` on the path (a C routine that costs 10-15 us when it runs cold in a
busy replica: RESULTS.md §22, §25).
"""

from __future__ import annotations

from typing import Optional

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from ray_monitor.replica import span_ids

__all__ = ["FromCaller", "RequestSpan"]

_EMPTY = otel_context.Context()
_FLAGS = (TraceFlags(TraceFlags.DEFAULT), TraceFlags(TraceFlags.SAMPLED))


def _trace_state(header: Optional[str]) -> Optional[TraceState]:
    return TraceState.from_header([header]) if header else None


class RequestSpan:
    """The trace side of one request, from :meth:`tracing.Tracer.begin` to :meth:`tracing.Tracer.end`,
    and while it is held (see :mod:`tail`). Made by ``Tracer.begin`` alone, which
    sets every field (no ``__init__``: one Python frame less per request).

    ``parent_id``: the parent span's id (0: a root); ``sampled``: the request's decision,
    carried to the next hop; ``span``: the SDK span, once made; ``attributes``: shared
    per method, never written to; ``http``: ``http_semantics.HttpRequest`` of an HTTP
    ingress request, ``status`` its HTTP status."""

    __slots__ = ("trace_id", "sid", "parent_id", "remote", "sampled", "tracestate", "span",
                 "start_ns", "end_ns", "name", "attributes", "kind", "request_id", "http",
                 "status", "extra", "done", "_context")
    #: The caller's ``traceparent`` text (:class:`FromCaller`'s slot); None: ints only.
    tp: Optional[str] = None

    # ``sid``: the span's own id as 16 hex digits, as the path needs it (the handle call's
    # traceparent, log records), taken ready-made from :mod:`span_ids`; the int is made
    # where it is read (the flush thread: the SDK span, a kept span's context).
    @property
    def span_id(self) -> int:
        return int(self.sid, 16)

    @span_id.setter
    def span_id(self, value: int) -> None:
        self.sid = span_ids.text(value)

    @property
    def ids(self) -> tuple[int, int]:
        return self.trace_id, self.span_id

    def otel_context(self) -> otel_context.Context:
        """The current context with this request's span in it, to attach around user code;
        made once (a stream attaches it around every item)."""
        ctx = self._context
        if ctx is None:
            if self.span is not None:
                ctx = trace.set_span_in_context(self.span)
            else:
                sc = SpanContext(self.trace_id, self.span_id, False, _FLAGS[self.sampled],
                                 _trace_state(self.tracestate))
                ctx = trace.set_span_in_context(NonRecordingSpan(sc))
            self._context = ctx
        return ctx

    def parent_context(self) -> otel_context.Context:
        """The parent's context alone (empty for a root), to make the SDK span under it."""
        if not self.parent_id:
            return _EMPTY
        sc = SpanContext(self.trace_id, self.parent_id, self.remote, _FLAGS[self.sampled],
                         _trace_state(self.tracestate))
        return trace.set_span_in_context(NonRecordingSpan(sc), _EMPTY)


class FromCaller(RequestSpan):
    """A :class:`RequestSpan` begun under a caller's valid common ``traceparent``
    (``00``, no ``tracestate``), kept as ``tp``: its trace and parent ids are that text's
    until read as ints (then parsed once). Its own span id is drawn at begin, a plain slot
    as in :class:`RequestSpan` (drawn at its first read it needed a property and a lock,
    which touched more memory cold than the draw: RESULTS.md §27). Begin sets ``_tid`` and
    ``_pid`` to None (not made yet): a test of None, not an AttributeError caught (an
    exception made on the path costs more than the parse)."""

    __slots__ = ("tp", "_tid", "_pid")

    @property
    def trace_id(self) -> int:
        value = self._tid
        if value is None:
            value = self._tid = int(self.tp[3:35], 16)
        return value

    @trace_id.setter
    def trace_id(self, value: int) -> None:
        self._tid = value

    @property
    def parent_id(self) -> int:
        value = self._pid
        if value is None:
            value = self._pid = int(self.tp[36:52], 16)
        return value

    @parent_id.setter
    def parent_id(self, value: int) -> None:
        self._pid = value
