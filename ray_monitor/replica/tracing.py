"""One span per request, head-sampled, with every error and slow request kept.

Runs in every replica (and in Serve's proxy and controller when Serve's tracing loads
:func:`serve_span_processors`).

The head sampler's "no" has to be nearly free, so an unsampled request gets no SDK
span at all: only two random ids and a context variable for log correlation. When it
ends slow or failed, the span is made after the fact with its real start time and the
ids it already had (an id generator that hands out the chosen ids), so log lines
written during the request still lead to it.

Spans go through our own TracerProvider (never the global one, which Ray Serve sets
when its tracing is on) to the OTLP exporter configured by the standard
``OTEL_EXPORTER_OTLP_*`` variables. With Ray Serve's tracing on (see
:func:`serve_tracing_config`), our span is the child of Serve's replica span, and
Serve carries the context across ``DeploymentHandle`` calls, so a composed request is
one trace.

The aggregator keeps the traces of slow and failed requests too, with or without an
OTLP endpoint: a :class:`RecordingProcessor` turns each ended span into a compact
record in a bounded :class:`SpanRecords` buffer, which the recorder drains into every
snapshot. Kept spans (failed, slow) go first; head-sampled ok spans (ours, and Ray
Serve's own when its tracing is on) go as context, so a kept trace shows every span
of it that was recorded. Without an endpoint and without Serve's tracing, head
sampling has nothing to feed, so no SDK span is made for a request that is not kept.
"""

from __future__ import annotations

import contextvars
import logging
import random
import threading
import time
from typing import Any, Optional, Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.status import Status, StatusCode

from ray_monitor.common import env

__all__ = ["CURRENT", "SpanRecords", "Tracer", "aggregator_traces_enabled", "claim_serve_spans",
           "current_trace_id", "install_log_correlation", "otlp_traces_configured",
           "release_serve_spans", "serve_span_processors", "serve_tracing_config", "span_record"]

logger = logging.getLogger(__name__)

_TRACE_ID_LIMIT = (1 << 64) - 1
_PROPAGATOR = TraceContextTextMapPropagator()

#: Span records a replica sends per flush; failed and slow spans take the room first.
MAX_SPANS_PER_FLUSH = 100
#: Of those, at most this many head-sampled ok spans (context for kept traces).
MAX_CONTEXT_SPANS_PER_FLUSH = 50
#: Strings in a record (name, status message, attribute values) are cut to this length.
MAX_TEXT = 256
#: The attributes a record keeps: ours, HTTP's, and Ray Serve's own span attributes.
RECORD_ATTRIBUTES = ("ray.serve.method", "ray_monitor.kept", "http.request.method", "http.route",
                     "http.response.status_code", "request_id", "call_method", "deployment",
                     "app", "route")

#: (trace_id, span_id) of the request running in this context, for log records.
CURRENT: contextvars.ContextVar[Optional[tuple[int, int]]] = contextvars.ContextVar(
    "ray_monitor_current_span", default=None)


def otlp_traces_configured() -> bool:
    """Whether the standard variables name somewhere to send traces."""
    if env.OTEL_SDK_DISABLED.get() or env.OTEL_TRACES_EXPORTER.get() == "none":
        return False
    return env.OTLP_TRACES_ENDPOINT.is_set() or env.OTLP_ENDPOINT.is_set()


def aggregator_traces_enabled(environ: Optional[dict] = None) -> bool:
    """Whether replicas send the traces of slow and failed requests to the aggregator
    (``RAY_MONITOR_TRACES``, default on; ``0`` turns it off)."""
    return env.TRACES.get(environ)


def serve_tracing_enabled() -> bool:
    try:
        from ray.serve._private.tracing_utils import is_tracing_enabled
    except ImportError:  # pragma: no cover - Ray without Serve
        return False
    return is_tracing_enabled()


def otlp_span_exporter() -> SpanExporter:
    """The OTLP span exporter the standard variables ask for (gRPC or HTTP/protobuf)."""
    protocol = env.OTLP_TRACES_PROTOCOL.get() or env.OTLP_PROTOCOL.get()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        if protocol not in ("http/protobuf", "http/json"):
            logger.warning("ray-monitor: OTEL_EXPORTER_OTLP_PROTOCOL=%r is not supported; "
                           "using http/protobuf", protocol)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


class CountingExporter(SpanExporter):
    """Passes spans on and counts failed exports as a self-metric instead of raising."""

    def __init__(self, inner: SpanExporter, on_failure) -> None:
        self.inner = inner
        self.on_failure = on_failure

    def export(self, spans):
        try:
            result = self.inner.export(spans)
        except Exception as e:
            self.on_failure("trace_export_failed", e)
            return SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self.on_failure("trace_export_failed", None)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


# -- span records for the aggregator --------------------------------------------

def _cut(v: Any) -> Any:
    if isinstance(v, str):
        return v if len(v) <= MAX_TEXT else v[:MAX_TEXT - 3] + "..."
    if isinstance(v, (bool, int, float)):
        return v
    return _cut(str(v))


def span_record(span: ReadableSpan, slow_threshold_s: Optional[float],
                source: str = "ray_monitor") -> dict:
    """An ended span as a compact, picklable dict, every string cut to ``MAX_TEXT``.
    ``kept`` is ``error`` (status ERROR), ``slow`` (at least ``slow_threshold_s``; never
    for ``None``) or empty for a span that is only context; ``slow`` says it also for a
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
            exception = {"type": _cut(ea.get("exception.type", "")),
                         "message": _cut(ea.get("exception.message", ""))}
            break
    return {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
            "parent_span_id": f"{parent.span_id:016x}" if parent is not None and parent.is_valid
            else "", "name": _cut(span.name), "kind": span.kind.name,
            "start": (span.start_time or 0) / 1e9, "duration_s": duration,
            "status": "error" if failed else "ok",
            "status_message": _cut(span.status.description or ""),
            "kept": "error" if failed else "slow" if slow else "", "slow": slow,
            "source": source,
            "attributes": {k: _cut(attrs[k]) for k in RECORD_ATTRIBUTES if k in attrs},
            "exception": exception}


class SpanRecords:
    """The span records of one replica until its next flush, bounded: kept spans
    (failed, slow) fill it first, head-sampled ok spans take at most ``max_context``
    places. What does not fit is dropped and counted; :meth:`drain` hands both over."""

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
                 source: str = "ray_monitor") -> None:
        self.records = records
        self.slow_threshold_s = slow_threshold_s
        self.source = source

    def on_end(self, span: ReadableSpan) -> None:
        try:
            self.records.add(span_record(span, self.slow_threshold_s, self.source))
        except Exception:
            self.records.count("trace_record_failed")


class _ChosenIds(IdGenerator):
    """Hands out the ids a request already has, so a span made after the fact keeps them."""

    def __init__(self) -> None:
        self._next = threading.local()

    def set(self, trace_id: int, span_id: int) -> None:
        self._next.ids = (trace_id, span_id)

    def generate_trace_id(self) -> int:
        ids = getattr(self._next, "ids", None)
        return ids[0] if ids else random.getrandbits(128)

    def generate_span_id(self) -> int:
        ids = getattr(self._next, "ids", None)
        if ids:
            self._next.ids = None
            return ids[1]
        return random.getrandbits(64)


def head_sampled(trace_id: int, ratio: float) -> bool:
    """TraceIdRatioBased's rule, so every process decides the same for one trace."""
    return (trace_id & _TRACE_ID_LIMIT) < round(ratio * (_TRACE_ID_LIMIT + 1))


class RequestSpan:
    """The trace side of one request, from :meth:`Tracer.begin` to :meth:`Tracer.end`."""

    __slots__ = ("trace_id", "span_id", "parent", "span", "start_ns", "name", "attributes",
                 "kind")

    def __init__(self, trace_id: int, span_id: int, parent: Optional[otel_context.Context],
                 span, start_ns: int, name: str, attributes: dict, kind: SpanKind) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent = parent
        self.span = span  # the SDK span when head-sampled, else None
        self.start_ns = start_ns
        self.name = name
        self.attributes = attributes
        self.kind = kind

    @property
    def ids(self) -> tuple[int, int]:
        return self.trace_id, self.span_id

    def otel_context(self) -> otel_context.Context:
        """A context holding this request's span, to attach around user code."""
        if self.span is not None:
            return trace.set_span_in_context(self.span, self.parent)
        sc = SpanContext(self.trace_id, self.span_id, is_remote=False,
                         trace_flags=TraceFlags(TraceFlags.DEFAULT))
        return trace.set_span_in_context(NonRecordingSpan(sc), self.parent)


class Tracer:
    """Per-process tracing for the middleware. ``enabled`` False makes it a no-op."""

    def __init__(self, *, sample_ratio: float, slow_threshold_s: float,
                 resource: Optional[dict] = None, exporter: Optional[SpanExporter] = None,
                 processors: Sequence[SpanProcessor] = (), on_failure=None,
                 enabled: Optional[bool] = None, records: Optional[SpanRecords] = None) -> None:
        """``exporter``: where spans go (default: OTLP when the standard variables name an
        endpoint); ``records``: the aggregator's copy of kept spans (see
        :class:`SpanRecords`). ``enabled`` None: on when either has somewhere to go."""
        self.sample_ratio = sample_ratio
        self.slow_threshold_s = slow_threshold_s
        # Serve's span is our parent only when its tracing is on (set up before the
        # deployment is built); without it, looking up the context would be wasted work.
        self._serve_parents = serve_tracing_enabled()
        self._on_failure = on_failure or (lambda cause, exc: None)
        if enabled is None:
            enabled = bool(exporter or processors or records is not None) \
                or otlp_traces_configured()
        self.enabled = enabled
        self.records = records
        self.provider: Optional[TracerProvider] = None
        self._ids = _ChosenIds()
        self._tracer = None
        self._sample_bound = 0
        self.head_sampling = False
        self._records_only = False
        if not enabled:
            return
        # The decision is ours (begin/end): the provider records every span it is given,
        # so a kept span under an unsampled parent is still made.
        self.provider = TracerProvider(resource=Resource.create(resource or {}),
                                       id_generator=self._ids, sampler=ALWAYS_ON)
        if exporter is None and not processors and otlp_traces_configured():
            exporter = otlp_span_exporter()
        if exporter is not None:
            self.provider.add_span_processor(
                BatchSpanProcessor(CountingExporter(exporter, self._on_failure)))
        for p in processors:
            self.provider.add_span_processor(p)
        if records is not None:
            self.provider.add_span_processor(
                RecordingProcessor(records, slow_threshold_s=slow_threshold_s))
        # Head-sampled ok spans feed a backend, a processor, or (with Serve's tracing) the
        # context of kept traces; with none of these a request becomes a span only if kept.
        self.head_sampling = exporter is not None or bool(processors) or self._serve_parents
        # Spans that go only to the aggregator's records: no span is made when they cannot
        # take it, and no stack trace is formatted that the record would not keep.
        self._records_only = records is not None and exporter is None and not processors
        if self.head_sampling:
            self._sample_bound = round(sample_ratio * (_TRACE_ID_LIMIT + 1))
        self._tracer = self.provider.get_tracer("ray_monitor")

    # -- the request path -----------------------------------------------------

    def parent_context(self, headers: Any = None) -> Optional[otel_context.Context]:
        """The incoming context: Ray Serve's current span when its tracing is on, else
        a W3C ``traceparent`` from HTTP headers (a mapping with ``.get``)."""
        if self._serve_parents:
            cur = trace.get_current_span()
            if cur.get_span_context().is_valid:
                return otel_context.get_current()
        if headers is not None and headers.get("traceparent"):
            return _PROPAGATOR.extract(headers)
        return None

    def begin(self, name: str, attributes: dict, parent: Optional[otel_context.Context],
              kind: SpanKind = SpanKind.SERVER) -> RequestSpan:
        start_ns = time.time_ns()
        parent_sc = trace.get_current_span(parent).get_span_context() if parent else None
        if parent_sc is not None and parent_sc.is_valid:
            trace_id = parent_sc.trace_id
            sampled = self.head_sampling and parent_sc.trace_flags.sampled
        else:
            trace_id = random.getrandbits(128)
            sampled = (trace_id & _TRACE_ID_LIMIT) < self._sample_bound  # see head_sampled
        span_id = random.getrandbits(64)
        span = None
        if sampled:
            self._ids.set(trace_id, span_id)
            span = self._tracer.start_span(name, context=parent, kind=kind,
                                           attributes=attributes, start_time=start_ns)
        return RequestSpan(trace_id, span_id, parent, span, start_ns, name, attributes, kind)

    def end(self, rs: RequestSpan, latency_s: float, error: Optional[BaseException],
            attributes: Optional[dict] = None, error_status: Optional[str] = None) -> bool:
        """Ends the span; makes it now if the request was unsampled but slow or failed.
        Returns whether a span was made (for exemplars): it reaches the backend and,
        when kept, the aggregator."""
        span = rs.span
        failed = error is not None or error_status is not None
        if span is None:
            if not failed and latency_s < self.slow_threshold_s:
                return False
            if self._records_only and self.records.full():
                self.records.count("trace_spans_dropped:buffer_full")
                return False
            self._ids.set(rs.trace_id, rs.span_id)
            span = self._tracer.start_span(rs.name, context=rs.parent, kind=rs.kind,
                                           attributes=rs.attributes, start_time=rs.start_ns)
            span.set_attribute("ray_monitor.kept",
                               "error" if failed else "slow")
        if attributes:
            span.set_attributes(attributes)
        if error is not None:
            if self._records_only:
                span.add_event("exception", {"exception.type": type(error).__name__,
                                             "exception.message": str(error)})
            else:
                span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        elif error_status is not None:
            span.set_status(Status(StatusCode.ERROR, error_status))
        span.end(rs.start_ns + int(latency_s * 1e9))
        return True

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.force_flush()
            self.provider.shutdown()


# -- log correlation ------------------------------------------------------------

_factory_installed = False


def install_log_correlation() -> None:
    """Every log record made during a request carries ``trace_id`` and ``span_id``
    (hex; empty outside requests). A record factory, not a filter, so records of
    every logger get them, Ray Serve's included; Ray's JSON log format prints them."""
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        ids = CURRENT.get()
        if ids is None:
            ids = _ids_from_otel()
        if ids is not None:
            record.trace_id = f"{ids[0]:032x}"
            record.span_id = f"{ids[1]:016x}"
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


def _ids_from_otel() -> Optional[tuple[int, int]]:
    sc = trace.get_current_span().get_span_context()
    return (sc.trace_id, sc.span_id) if sc.is_valid else None


def current_trace_id() -> Optional[str]:
    """The hex trace id of the request running here, or None outside one."""
    ids = CURRENT.get() or _ids_from_otel()
    return f"{ids[0]:032x}" if ids else None


# -- Ray Serve's own tracing ----------------------------------------------------

_SERVE_RECORDS: Optional[SpanRecords] = None


def claim_serve_spans(records: Optional[SpanRecords]) -> None:
    """Serve's spans ended in this process go to ``records`` (a monitored replica's),
    or nowhere with None (a process with no monitored deployment: the proxy)."""
    global _SERVE_RECORDS
    _SERVE_RECORDS = records


def release_serve_spans(records: SpanRecords) -> None:
    if _SERVE_RECORDS is records:
        claim_serve_spans(None)


class _ServeSpans(SpanProcessor):
    """Ray Serve's spans as context records of the monitored replica in this process."""

    def on_end(self, span: ReadableSpan) -> None:
        records = _SERVE_RECORDS
        if records is None:
            return
        try:
            records.add(span_record(span, None, "ray_serve"))
        except Exception:
            records.count("trace_record_failed")


def serve_span_processors() -> list[SpanProcessor]:
    """Ray Serve's exporter hook (``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH`` or
    ``TracingConfig.exporter_import_path``): Serve's own spans (proxy, routing,
    replica) go to the same OTLP endpoint as ours, and those of monitored replicas to
    the aggregator as context of kept traces (unless ``RAY_MONITOR_TRACES=0``)."""
    processors: list[SpanProcessor] = []
    if otlp_traces_configured():
        processors.append(BatchSpanProcessor(otlp_span_exporter()))
    if aggregator_traces_enabled():
        processors.append(_ServeSpans())
    return processors


def serve_tracing_config(sampling_ratio: float = 1.0):
    """The one setting for end-to-end traces across composed deployments::

        serve.start(tracing_config=ray_monitor.serve_tracing_config())

    Serve then carries the trace context over ``DeploymentHandle`` calls and its
    sampler becomes the head sampler (our spans follow their parent's decision)."""
    from ray.serve.schema import TracingConfig

    return TracingConfig(enabled=True,
                         exporter_import_path="ray_monitor.tracing:serve_span_processors",
                         sampling_ratio=sampling_ratio)
