"""One span per request, with one trace id and one sampling decision across deployments.

Runs in every replica (and in Serve's proxy and controller when Serve's tracing loads
:func:`serve_span_processors`).

Where a request's span hangs is :func:`ray_monitor.replica.propagation.resolve`: under
Ray Serve's replica span when its tracing sampled the request, else under the context
the caller sent over the handle call (sampled or not; see :mod:`propagation`), else under
the HTTP ``traceparent``, else it is a root. The sampling decision is made once, by the
first process that sees the request (Serve's proxy or replica span when Serve's tracing
is on, else the first ``@monitor`` deployment, from the trace id, as
``TraceIdRatioBased`` does), and every later hop follows the parent's flag.

The head sampler's "no" has to be nearly free, so an unsampled request gets no SDK span
at all: only two random ids and a context variable. When it ends slow or failed, the
span is made after the fact with its real start time and the ids it already had (an id
generator that hands out the chosen ids), so log lines written during the request still
lead to it. When it ends fast and ok, it waits in a bounded ring (:mod:`tail`), and is
made later if another span of its request was kept anywhere in the cluster.

Spans go through our own TracerProvider (never the global one, which Ray Serve sets
when its tracing is on) to the OTLP exporter configured by the standard
``OTEL_EXPORTER_OTLP_*`` variables, and as compact records to the aggregator
(:mod:`span_records`).
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from typing import Any, Iterable, Optional, Sequence

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind
from opentelemetry.trace.status import Status, StatusCode

from ray_monitor.common import env
from ray_monitor.replica import otlp_refusal, propagation, span_ids
from ray_monitor.replica.propagation import (BIT128, CURRENT, Parent, current_get,
                                             otel_current, parse_traceparent, resolve)
from ray_monitor.replica.span_errors import MAX_MESSAGE, clean, exception_attributes
from ray_monitor.replica.span_records import (MAX_CONTEXT_SPANS_PER_FLUSH, MAX_SPANS_PER_FLUSH,
                                              MAX_TEXT, RECORD_ATTRIBUTES, RecordingProcessor,
                                              SpanRecords, span_record)
from ray_monitor.replica.request_span import FromCaller, RequestSpan
from ray_monitor.replica.tail import HeldRecord, TailBuffer

__all__ = ["CURRENT", "FIRST_CHUNK", "FIRST_ITEM_EVENT", "MAX_CONTEXT_SPANS_PER_FLUSH",
           "MAX_SPANS_PER_FLUSH", "MAX_TEXT", "RECORD_ATTRIBUTES", "RequestSpan", "SpanRecords", "Tracer",
           "aggregator_traces_enabled", "claim_serve_spans", "current_trace_id",
           "head_sampled", "install_log_correlation", "otlp_traces_configured",
           "release_serve_spans", "serve_span_processors", "serve_tracing_config",
           "span_record"]

logger = logging.getLogger(__name__)

_TRACE_ID_LIMIT = (1 << 64) - 1
#: A stream's time to first item (GenAI semantic conventions' attribute) and the span event
#: at that moment (GenAI's conventions name no such event, so the monitor's namespace).
FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
FIRST_ITEM_EVENT = "ray_monitor.stream.first_item"
#: The sampled bit of a ``traceparent``'s flags, by their last (lower-case hex) digit: a
#: dict subscript runs the dict code the hop runs anyway, where ``in "13579bdf"`` ran a
#: string search of its own cold (RESULTS.md §27).
_SAMPLED_BY_DIGIT = {d: int(d, 16) & 1 == 1 for d in "0123456789abcdef"}
#: A caller's ``traceparent`` in the common form, exactly as ``parse_traceparent`` accepts
#: it with version ``00`` and no suffix, zero ids refused. ``Tracer.begin`` decides the
#: same without a regex (its length, the version, three dashes, the digits by
#: ``str.strip`` and the zero ids by comparison), where the regex engine's code and data
#: were about 107 cache lines a hop cold (RESULTS.md §29); the tests hold the two equal.
COMMON_VALID = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_HEX = "0123456789abcdef"
_ZERO32, _ZERO16 = "0" * 32, "0" * 16
#: Module-level aliases: one global read, not a module's dict besides (§27).
_bits = random.getrandbits
_time_ns = time.time_ns
_take_id = span_ids.take


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
    """The OTLP span exporter the standard variables ask for (gRPC or HTTP/protobuf),
    which stops once the backend refuses traces (see :mod:`otlp_refusal`)."""
    protocol = env.OTLP_TRACES_PROTOCOL.get() or env.OTLP_PROTOCOL.get()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        if protocol not in ("http/protobuf", "http/json"):
            logger.warning("ray-monitor: OTEL_EXPORTER_OTLP_PROTOCOL=%r is not supported; "
                           "using http/protobuf", protocol)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return otlp_refusal.RefusalGuard(OTLPSpanExporter(), "traces", SpanExportResult.SUCCESS)


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


class Tracer:
    """Per-process tracing for the middleware. ``enabled`` False makes it a no-op."""

    def __init__(self, *, sample_ratio: float, slow_threshold_s: float,
                 resource: Optional[dict] = None, exporter: Optional[SpanExporter] = None,
                 processors: Sequence[SpanProcessor] = (), on_failure=None,
                 enabled: Optional[bool] = None, records: Optional[SpanRecords] = None,
                 hold: Optional[int] = None) -> None:
        """``exporter``: where spans go (default: OTLP when the standard variables name an
        endpoint); ``records``: the aggregator's copy of kept spans (see
        :class:`SpanRecords`); ``hold``: spans held for whole-request tail keeping
        (default ``RAY_MONITOR_TRACE_HOLD_SPANS``). ``enabled`` None: on when either
        has somewhere to go."""
        self.sample_ratio = sample_ratio
        self.slow_threshold_s = slow_threshold_s
        # With Serve's tracing on (set up before the deployment is built), its replica
        # span is our parent when sampled, and its sampler the head sampler.
        self.serve_tracing = serve_tracing_enabled()
        self._on_failure = on_failure or (lambda cause, exc: None)
        if enabled is None:
            enabled = bool(exporter or processors or records is not None) \
                or otlp_traces_configured()
        self.enabled = enabled
        self.records = records
        self.provider: Optional[TracerProvider] = None
        self.tail: Optional[TailBuffer] = None
        self._ids = _ChosenIds()
        self._tracer = None
        # Decided from the trace id, wherever the request starts; carried to the next hop.
        self._sample_bound = round(sample_ratio * (_TRACE_ID_LIMIT + 1))
        self.head_sampling = False
        self._records_only = False
        # Whether an unsampled request's context is made current too: only when a global
        # SDK provider exists (Serve's, FastAPI's spans, the user's), which would see it.
        self.attach_unsampled = not isinstance(trace.get_tracer_provider(),
                                               trace.ProxyTracerProvider)
        if not enabled:
            return
        self.tail = tail = TailBuffer(hold or env.TRACE_HOLD_SPANS.get())
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
            self.provider.add_span_processor(RecordingProcessor(
                records, slow_threshold_s=slow_threshold_s, hold=tail.hold_record))
        # Head-sampled ok spans feed a backend, a processor, or (with Serve's tracing) the
        # context of kept traces; with none of these a request becomes a span only if kept.
        self.head_sampling = exporter is not None or bool(processors) or self.serve_tracing
        # Spans that go only to the aggregator's records: no span is made when they cannot
        # take it, and no stack trace is formatted that the record would not keep.
        self._records_only = records is not None and exporter is None and not processors
        self._tracer = self.provider.get_tracer("ray_monitor")

    # -- the request path -----------------------------------------------------

    def parent(self, request: Any = None, http: Any = None) -> Optional[Parent]:
        """Where a request's span hangs (see :func:`propagation.resolve`): ``request`` is
        Ray Serve's request context, ``http`` the request's ``HttpRequest``."""
        serve_span = None
        if self.serve_tracing:
            sc = trace.get_current_span().get_span_context()
            if sc.is_valid and sc.trace_flags.sampled:
                serve_span = Parent(sc.trace_id, sc.span_id, True, False,
                                    sc.trace_state.to_header() if sc.trace_state else None)
        caller = None
        if request is not None:
            came = getattr(request, "_ray_trace_ctx", None)
            if came and isinstance(came, dict):
                caller = parse_traceparent(came.get("traceparent"), came.get("tracestate"))
        header = None
        if http is not None and http.traceparent:
            header = parse_traceparent(http.traceparent, http.tracestate)
        return resolve(serve_span, caller, header,
                       self.serve_tracing and request is not None)

    def begin(self, name: str, attributes: dict, request: Any = None, http: Any = None,
              kind: SpanKind = SpanKind.SERVER) -> RequestSpan:
        start_ns = _time_ns()
        parent = text = None
        if request is None and http is None and not self.serve_tracing:
            pass  # outside Serve, or a plain call: nothing can have come in
        elif http is None and not self.serve_tracing:
            # A handle call, Serve's tracing off: what the caller sent decides, as
            # resolve() would, without its calls (each about 1 us inside a replica); the
            # common form (a bare ``00`` traceparent, as every hop sends) checked here,
            # exactly (one regex: the version, the digits, no zero ids), and kept as text:
            # no int on the path. Attributes read directly, not by getattr(): no lookup in
            # the interpreter's type cache, which is cold in a busy replica (§27).
            try:
                came = request._ray_trace_ctx  # a Parent has none (slots)
            except AttributeError:
                came = None
            if came and isinstance(came, dict):
                tp, state = came.get("traceparent"), came.get("tracestate")
                if type(tp) is str and not state and len(tp) == 55 and tp[:3] == "00-" and \
                        tp[35] == "-" and tp[52] == "-" and not tp[53:].strip(_HEX) and \
                        not (tid := tp[3:35]).strip(_HEX) and tid != _ZERO32 and \
                        not (pid := tp[36:52]).strip(_HEX) and pid != _ZERO16:
                    # COMMON_VALID, without the regex engine
                    text = tp  # valid: its ids stay text until read (FromCaller)
                elif isinstance(request, Parent):
                    parent = request
                else:  # anything else as W3C says, through the general parse
                    parent = parse_traceparent(tp, state)
            elif isinstance(request, Parent):
                parent = request
        else:
            parent = request if isinstance(request, Parent) else self.parent(request, http)
        if text is not None:  # a remote parent, no tracestate; ids made where read
            rs = FromCaller()  # no __init__: the class call (type_call, as _Request's)
            rs.tp = text
            rs._tid = rs._pid = None  # made where first read
            rs.sampled = _SAMPLED_BY_DIGIT[text[54]]  # the flags' sampled bit (a hex digit)
            rs.remote = True
            rs.tracestate = None
        else:
            rs = RequestSpan()
            if parent is None:
                rs.trace_id = trace_id = _bits(128)
                rs.sampled = (trace_id & _TRACE_ID_LIMIT) < self._sample_bound  # head_sampled
                rs.parent_id = 0  # a root
                rs.remote = False
                rs.tracestate = None
            else:
                rs.trace_id = parent.trace_id or _bits(128)  # DECLINED: a new trace
                rs.sampled = parent.sampled
                rs.parent_id = parent.span_id
                rs.remote = parent.remote
                rs.tracestate = parent.tracestate
        try:  # drawn ahead by the flush thread, as text (span_ids; RESULTS.md §32)
            rs.sid = _take_id()
        except IndexError:  # the pool ran dry: drawn here
            rs.sid = span_ids.draw()
        rs.span = None
        rs.start_ns = start_ns
        rs.end_ns = 0
        rs.name = name
        rs.attributes = attributes
        rs.kind = kind
        rid = ""
        if request is not None:
            try:
                rid = request.request_id
            except AttributeError:
                pass
        rs.request_id = rid if isinstance(rid, str) else ""
        rs.http = http
        rs.status = rs.extra = rs._context = None
        rs.done = False
        if rs.sampled and self.head_sampling:
            rs.span = self._start(rs)
        return rs

    def end(self, rs: RequestSpan, latency_s: float, error: Optional[BaseException],
            attributes: Optional[dict] = None, error_status: Optional[str] = None,
            status: Optional[int] = None) -> bool:
        """Ends the span; makes it now if the request was unsampled but slow or failed,
        and holds it for tail keeping if it was neither. ``status``: the HTTP response's.
        Returns whether a span was made (for exemplars)."""
        span = rs.span
        failed = error is not None or error_status is not None
        kept = "error" if failed else "slow" if latency_s >= self.slow_threshold_s else ""
        rs.end_ns = rs.start_ns + int(latency_s * 1e9)
        rs.status = status
        rs._context = None  # not needed once the request ended (and not held with it)
        if kept:
            self.tail.kept(rs.trace_id)  # the rest of the request, wherever it ran
        if span is None:
            if not kept:
                rs.extra = attributes
                self.tail.hold(rs)
                return False
            if self._records_only and self.records.full():
                self.records.count("trace_spans_dropped:buffer_full")
                return False
            span = self._start(rs)
            span.set_attribute("ray_monitor.kept", kept)
        self._finish(span, rs, error, attributes, error_status)
        return True

    # -- making spans ----------------------------------------------------------

    def _start(self, rs: RequestSpan):
        attrs = rs.attributes
        if rs.request_id or rs.http is not None:
            attrs = dict(attrs)
            if rs.request_id:
                attrs["ray.serve.request_id"] = rs.request_id
            if rs.http is not None:
                attrs.update(rs.http.attributes())
        self._ids.set(rs.trace_id, rs.span_id)
        return self._tracer.start_span(rs.name, context=rs.parent_context(), kind=rs.kind,
                                       attributes=attrs, start_time=rs.start_ns)

    def _finish(self, span, rs: RequestSpan, error: Optional[BaseException],
                attributes: Optional[dict], error_status: Optional[str]) -> None:
        if attributes:
            span.set_attributes(attributes)
            first = attributes.get(FIRST_CHUNK)
            if first is not None:  # the first item as an event at the moment it came
                span.add_event(FIRST_ITEM_EVENT, {FIRST_CHUNK: first},
                               timestamp=rs.start_ns + int(first * 1e9))
        http_error = rs.status is not None and rs.status >= 500
        if rs.status is not None:
            span.set_attribute("http.response.status_code", rs.status)
        if error is not None:
            attrs = exception_attributes(error, stack=not self._records_only)
            span.add_event("exception", attrs)
            span.set_attribute("error.type", attrs["exception.type"])
            span.set_status(Status(StatusCode.ERROR, clean(
                f"{attrs['exception.type']}: {attrs['exception.message']}", MAX_MESSAGE)))
        elif http_error:
            span.set_attribute("error.type", str(rs.status))
            span.set_status(Status(StatusCode.ERROR))
        elif error_status is not None:
            span.set_attribute("error.type", error_status)
            span.set_status(Status(StatusCode.ERROR, error_status))
        span.end(rs.end_ns)

    def export_kept(self, trace_ids: Iterable[str]) -> int:
        """Makes the held spans of ``trace_ids`` (hex; kept somewhere in the cluster);
        returns how many. Runs on the flush thread."""
        if self.tail is None:
            return 0
        wanted = set()
        for t in trace_ids:
            try:
                wanted.add(int(t, 16))
            except (TypeError, ValueError):
                continue
        made = 0
        for rs in self.tail.take(wanted):
            if isinstance(rs, HeldRecord):  # exported to OTLP already: the aggregator's copy
                if self.records is not None:
                    self.records.add({**rs.record, "kept": "trace"})
                continue
            if self._records_only and self.records.full():
                self.records.count("trace_spans_dropped:buffer_full")
                continue
            span = self._start(rs)
            span.set_attribute("ray_monitor.kept", "trace")
            self._finish(span, rs, None, rs.extra, None)
            made += 1
        return made

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
        rs = current_get()  # the request running here (see CURRENT), then its span
        if rs is not None and (rs := rs.ctx_span) is not None:
            tp = rs.tp  # the caller's text: its trace id without a 128-bit format
            record.trace_id = tp[3:35] if tp is not None else hex(rs.trace_id | BIT128)[3:]
            record.span_id = rs.sid  # drawn as text (span_ids)
        else:
            # Serve's access log line of every request comes here, outside the request:
            # OpenTelemetry is asked only when its context holds something (Serve's tracing).
            ctx = otel_current()
            if ctx:
                sc = trace.get_current_span(ctx).get_span_context()
                if sc.is_valid:
                    record.trace_id = f"{sc.trace_id:032x}"
                    record.span_id = f"{sc.span_id:016x}"
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True




def _ids_from_otel() -> Optional[tuple[int, int]]:
    sc = trace.get_current_span().get_span_context()
    return (sc.trace_id, sc.span_id) if sc.is_valid else None


def current_trace_id() -> Optional[str]:
    """The hex trace id of the request running here, or None outside one."""
    cur = current_get()
    rs = None if cur is None else cur.ctx_span
    ids = rs.ids if rs is not None else _ids_from_otel()
    return f"{ids[0]:032x}" if ids else None


# -- Ray Serve's own tracing ----------------------------------------------------

_SERVE_RECORDS: Optional[SpanRecords] = None
_SERVE_HOLD: Optional[TailBuffer] = None


def claim_serve_spans(records: Optional[SpanRecords], tail: Optional[TailBuffer] = None) -> None:
    """Serve's spans ended in this process go to ``records`` (a monitored replica's),
    held in ``tail`` until their request is kept (None: at once), or nowhere with None
    (a process with no monitored deployment: the proxy)."""
    global _SERVE_RECORDS, _SERVE_HOLD
    _SERVE_RECORDS, _SERVE_HOLD = records, tail


def release_serve_spans(records: SpanRecords) -> None:
    if _SERVE_RECORDS is records:
        claim_serve_spans(None)


class _ServeSpans(SpanProcessor):
    """Ray Serve's spans as records of the monitored replica in this process, sent with
    the rest of a kept request (see :mod:`tail`)."""

    def on_end(self, span: ReadableSpan) -> None:
        records, hold = _SERVE_RECORDS, _SERVE_HOLD
        if records is None:
            return
        try:
            record = span_record(span, None, "ray_serve")
            if hold is not None:
                hold.hold_record(record)
            else:
                records.add(record)
        except Exception:
            records.count("trace_record_failed")


def serve_span_processors() -> list[SpanProcessor]:
    """Ray Serve's exporter hook (``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH`` or
    ``TracingConfig.exporter_import_path``): Serve's own spans (proxy, routing,
    replica) go to the same OTLP endpoint as ours, and those of monitored replicas to
    the aggregator as context of kept traces (unless ``RAY_MONITOR_TRACES=0``).

    Serve calls it in every process it traces, so it is also where ray-monitor's
    context propagation is installed in Serve's proxy (see :mod:`propagation`): the
    proxy's sampling decision then reaches the first deployment even when it is "no",
    and is the proxy's only one (see :func:`propagation.one_decision_in_proxy`)."""
    propagation.install()
    propagation.one_decision_in_proxy()
    processors: list[SpanProcessor] = []
    if otlp_traces_configured():
        processors.append(BatchSpanProcessor(otlp_span_exporter()))
    if aggregator_traces_enabled():
        processors.append(_ServeSpans())
    return processors


def serve_tracing_config(sampling_ratio: Optional[float] = None):
    """Ray Serve's tracing through ray-monitor, as a config::

        serve.start(tracing_config=ray_monitor.serve_tracing_config())

    Serve's spans then join ray-monitor's, and its sampler is the head sampler at
    ``sampling_ratio`` (None: Serve's own default, ``RAY_SERVE_TRACING_SAMPLING_RATIO``
    or 0.01). Ray 2.60 does not pass this config to its HTTP proxy: for the proxy's
    spans, set ``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH`` in the cluster's environment
    instead (see the README's Traces section)."""
    from ray.serve.schema import TracingConfig

    if sampling_ratio is None:
        from ray.serve._private.constants import RAY_SERVE_TRACING_SAMPLING_RATIO

        sampling_ratio = RAY_SERVE_TRACING_SAMPLING_RATIO
    return TracingConfig(enabled=True,
                         exporter_import_path="ray_monitor.tracing:serve_span_processors",
                         sampling_ratio=sampling_ratio)
