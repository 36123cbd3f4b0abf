"""The request path's shortcuts (issue 15: each Python call costs about 1 us inside a
replica) answer exactly as the general code they stand in for, without Ray: the span a
request begins with (``Tracer.begin``'s inline parse of the caller's ``traceparent``
against ``parse_traceparent``/``resolve``), the handle-call hook's common case against
``_fill``, OpenTelemetry's context read straight from its ContextVar, the queue time read
in ``middleware._start`` against ``queueing.queue_of``, and the ``measure`` call skipped
for results that carry no usage."""

from __future__ import annotations

import time

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ray_monitor import monitor
from tests.helpers import running_request
from ray_monitor.replica import deferred, middleware, propagation, queueing, streaming
from ray_monitor.replica.propagation import PLACEHOLDER
from ray_monitor.replica.queueing import SENT, SENT_AT
from ray_monitor.replica.span_records import SpanRecords
from ray_monitor.replica.tracing import RequestSpan, Tracer

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
SID = "00f067aa0ba902b7"
#: RequestSpan's fields that two begins of one request share (not its own id and start).
SHARED = [f for f in RequestSpan.__slots__ if f not in ("sid", "start_ns", "span",
                                                        "_context")]


class Ctx:
    """Ray Serve's request context as a replica sees it (the fields read here)."""

    def __init__(self, came=None, request_id="req-1"):
        self.request_id = request_id
        self.route = ""
        self._ray_trace_ctx = came


@pytest.fixture
def tracer():
    exporter = InMemorySpanExporter()
    t = Tracer(sample_ratio=0.0, slow_threshold_s=1.0, processors=[
        SimpleSpanProcessor(exporter)], records=SpanRecords(), hold=16)
    yield t, exporter
    t.shutdown()


CAME = [
    {"traceparent": f"00-{TID}-{SID}-00"},  # unsampled caller: the common case
    {"traceparent": f"00-{TID}-{SID}-01"},  # sampled caller
    {"traceparent": f"00-{TID}-{SID}-03"},  # the W3C random bit with sampled
    {"traceparent": f"00-{TID}-{SID}-02"},  # the random bit alone
    {"traceparent": f"00-{TID}-{SID}-00", "tracestate": "congo=t61rcWkgMzE"},
    {"traceparent": f"00-{TID}-{SID}-00", "tracestate": PLACEHOLDER},  # proxy's "no"
    {"traceparent": f"00-{TID}-{SID}-01", "tracestate": "   "},
    {"traceparent": f"01-{TID}-{SID}-01"},  # a later version
    {"traceparent": f"01-{TID}-{SID}-01-future"},
    {"traceparent": f"00-{TID}-{SID}-01-extra"},  # invalid: 00 with more
    {"traceparent": f"ff-{TID}-{SID}-01"},  # invalid version
    {"traceparent": f"00-{'0' * 32}-{SID}-01"},  # zero trace id: invalid
    {"traceparent": f"00-{TID}-{'0' * 16}-01"},  # zero span id: invalid
    {"traceparent": f" 00-{TID}-{SID}-01 "},  # padded
    {"traceparent": f"00-{TID.upper()}-{SID}-01"},  # upper case: invalid
    {"traceparent": 12},
    {"traceparent": None},
    {SENT: "1700000000000000"},  # a send time only
    {},
    None,
    "not a dict",
]


@pytest.mark.parametrize("came", CAME, ids=[repr(c)[:40] for c in CAME])
def test_a_handle_calls_span_begins_as_the_general_resolution_makes_it(tracer, came):
    t, exporter = tracer
    request = Ctx(came)
    fast = t.begin("M.__call__", {"a": 1}, request)
    parent = t.parent(request, None)  # parse_traceparent + resolve
    if parent is None:
        assert fast.parent_id == 0 and not fast.remote and fast.tracestate is None
        return  # a root: its own random trace id and our ratio's decision
    # the general path, as with Serve's tracing on and no Serve span current: what the
    # caller sent, through Tracer.parent()
    t.serve_tracing = True
    try:
        general = t.begin("M.__call__", {"a": 1}, request)
    finally:
        t.serve_tracing = False
    assert {f: getattr(fast, f) for f in SHARED} == {f: getattr(general, f) for f in SHARED}
    assert (fast.span is None) == (general.span is None) == (not fast.sampled)
    assert isinstance(fast.span_id, int) and fast.span_id != general.span_id
    # and the spans made from each are the same but for their own ids
    for rs in (fast, general):
        t.end(rs, 2.0, None)  # slow: made
    a, b = exporter.get_finished_spans()[-2:]
    assert (a.context.trace_id, a.parent.span_id if a.parent else None, a.attributes,
            a.kind, a.name, a.context.trace_state) == \
        (b.context.trace_id, b.parent.span_id if b.parent else None, b.attributes, b.kind,
         b.name, b.context.trace_state)


def test_a_span_begun_fast_keeps_every_field_the_eager_one_had(tracer):
    t, _ = tracer
    rs = t.begin("M.run", {"k": "v"}, None)
    assert set(RequestSpan.__slots__) == {f for f in RequestSpan.__slots__
                                          if hasattr(rs, f)}  # every field set
    assert (rs.parent_id, rs.remote, rs.tracestate, rs.end_ns, rs.status, rs.extra,
            rs.done, rs.request_id, rs.http, rs.name, rs.attributes) == \
        (0, False, None, 0, None, None, False, "", None, "M.run", {"k": "v"})
    assert abs(rs.start_ns - time.time_ns()) < 60e9 and rs.ids == (rs.trace_id, rs.span_id)


class _Span:
    def __init__(self, trace_id, span_id, sampled, tracestate=None):
        self.trace_id, self.span_id, self.sampled = trace_id, span_id, sampled
        self.tracestate = tracestate


class _Pending:
    def __init__(self, created_at=1_700_000_000.25):
        from ray.serve._private.common import RequestMetadata

        self.metadata = RequestMetadata(request_id="r", internal_request_id="i")
        self.created_at = created_at


@pytest.mark.parametrize("span", [_Span(5, 6, False), _Span(5, 6, True),
                                  _Span(int(TID, 16), int(SID, 16), False, "a=b")])
@pytest.mark.parametrize("created_at", [1_700_000_000.25, None])
def test_the_hooks_common_case_carries_what_fill_carries(span, created_at):
    hooked = propagation._wrap(lambda self, pr, *a: pr.metadata.tracing_context)
    token = propagation.CURRENT.set(running_request(span))
    try:
        before = time.time()
        fast = hooked(None, _Pending(created_at), False)
        pr = _Pending(created_at)
        propagation._fill(pr.metadata, pr)
        general = pr.metadata.tracing_context
    finally:
        propagation.CURRENT.reset(token)
    assert list(fast) == list(general)  # same keys, same order
    if created_at is None:  # the time it was sent: now
        assert before - 1 <= fast.pop(SENT_AT) <= time.time() + 1
        general.pop(SENT_AT)
    assert fast == general


def test_the_hook_leaves_a_context_serve_filled_and_asks_outgoing_with_otel_current():
    hooked = propagation._wrap(lambda self, pr, *a: pr.metadata.tracing_context)
    token = propagation.CURRENT.set(running_request(_Span(5, 6, False)))
    provider = TracerProvider()
    try:
        pr = _Pending()
        pr.metadata.tracing_context = {"traceparent": f"00-{TID}-{SID}-01"}  # Serve's own
        assert hooked(None, pr, False) == {"traceparent": f"00-{TID}-{SID}-01",
                                           SENT_AT: 1_700_000_000.25}
        with provider.get_tracer("t").start_as_current_span("user span") as user:
            sc = user.get_span_context()  # a sampled span current: it is the parent
            got = hooked(None, _Pending(), False)
        assert got["traceparent"] == f"00-{sc.trace_id:032x}-{sc.span_id:016x}-01"
    finally:
        propagation.CURRENT.reset(token)


def test_otel_current_is_opentelemetrys_current_context():
    assert propagation.otel_current() is otel_context.get_current()
    span = trace.NonRecordingSpan(trace.SpanContext(5, 6, False))
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        assert propagation.otel_current() is otel_context.get_current()
        assert trace.get_current_span(propagation.otel_current()) is span
    finally:
        otel_context.detach(token)
    assert not propagation.otel_current()


@pytest.mark.parametrize("key", [SENT, SENT_AT])
@pytest.mark.parametrize("sent", ["1700000000250000", str(int((time.time() - 2.5) * 1e6)),
                                  str(int((time.time() + 30) * 1e6)), "bad", None, 12.5,
                                  time.time() - 2.5, time.time() + 30, 1_700_000_000.25,
                                  float("nan"), float("inf"), float("-inf"), 17, "1.5"])
def test_the_queue_time_read_at_start_is_queue_of(monkeypatch, sent, key):
    for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    now = time.time()
    monkeypatch.setattr(middleware, "_time", lambda: now)
    monkeypatch.setattr(queueing, "_time", lambda: now)
    came = {"traceparent": f"00-{TID}-{SID}-00"}
    if sent is not None:
        came[key] = sent
    ctx = Ctx(came)
    monkeypatch.setattr(middleware, "_REQUEST_CONTEXT", type("V", (), {"get": lambda s: ctx})())

    @monitor(flush_interval_s=3600.0, tracing_enabled=False)
    class Model:
        def run(self):
            return None
    m = Model()
    rec = Model.__ray_monitor__.state.recorder
    req = middleware._start(Model.__ray_monitor__.hooks[0], None)
    assert rec.methods["run"].queued(req.token) == queueing.queue_of(ctx)
    assert rec.running()[0][2] == "req-1"
    deferred.end(req, "ok", None, False)
    assert rec.running() == [] and m.run() is None
    Model.__ray_monitor__.close()


USAGE = {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
RESULTS = [None, 0, 1.5, True, "text", "", {"a": 1}, [1], b"x",
           '{"model": "m", "usage": ' + str(USAGE).replace("'", '"') + "}",
           {"model": "m", "usage": USAGE}, {"usage": None}, {"response": "x"},
           {"type": "response.completed",
            "response": {"model": "m", "usage": {"input_tokens": 7, "output_tokens": 5}}}]


@pytest.mark.parametrize("result", RESULTS, ids=[repr(r)[:30] for r in RESULTS])
@pytest.mark.parametrize("tokens", [None, False, lambda r: (1, 2)])
def test_measure_is_skipped_only_where_it_would_answer_none(monkeypatch, result, tokens):
    """deferred.end's inline test against a call of measure() for every result."""
    for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    options = {} if tokens is None else {"tokens": tokens}

    @monitor(flush_interval_s=3600.0, tracing_enabled=False, **options)
    class Model:
        def run(self, r):
            return r
    m = Model()
    called = []
    real = streaming.measure
    monkeypatch.setattr(streaming, "measure",
                        lambda *a, **k: called.append(1) or real(*a, **k))
    assert m.run(result) == result
    rt = Model.__ray_monitor__
    if not called:
        assert real(rt, None, result, 0.1, None) is None
    if callable(tokens) or (tokens is None and isinstance(result, (str, dict)) and (
            "usage" in result or "response" in result and isinstance(result, dict))):
        assert called or result is None  # a result that may carry usage is measured
    Model.__ray_monitor__.close()


class _Carried:
    def __init__(self, carried):
        self._ray_trace_ctx = carried


def test_the_send_time_travels_as_a_float_and_both_forms_are_read(monkeypatch):
    """This version sends a float under SENT_AT (no text made per hop); a replica reads
    it and the text under SENT that the version before sends (a rolling upgrade has
    both), and never reads the float where the version before would (SENT)."""
    now = 1_700_000_010.0
    monkeypatch.setattr(queueing, "_time", lambda: now)
    pr = _Pending(1_700_000_000.25)
    ctx = {"traceparent": f"00-{TID}-{SID}-00"}
    queueing.stamp(ctx, pr)
    assert ctx[SENT_AT] == 1_700_000_000.25 and SENT not in ctx
    queueing.stamp(ctx, _Pending(1_700_000_005.0))  # a retry keeps the first
    assert ctx[SENT_AT] == 1_700_000_000.25
    old = {"traceparent": f"00-{TID}-{SID}-00", SENT: "1700000000250000"}
    queueing.stamp(old, pr)  # passed on from an older caller: its time stays, one form
    assert SENT_AT not in old
    new_q = queueing.queue_of(_Carried(ctx))
    old_q = queueing.queue_of(_Carried(old))
    assert new_q == old_q == pytest.approx(9.75)
    queueing.stamp(later := {}, _Pending(None))  # no created_at: the time it is sent
    assert later[SENT_AT] == now
    for bad in (float("nan"), float("inf"), "1700000000.25", None):
        assert queueing.queue_of(_Carried({SENT_AT: bad})) is None
    assert queueing.queue_of(_Carried({SENT_AT: now + 30})) == 0.0  # a clock behind


#: More callers for the exact check that keeps a traceparent as text (§25).
CAME_TEXT = [
    {"traceparent": f"00-{TID}-{SID}-ff"},  # every flag bit
    {"traceparent": f"00-{TID}-{SID}-0a"},  # an even last digit: unsampled
    {"traceparent": f"00-{TID}-{SID}-0G"},  # not hex
    {"traceparent": f"00-{TID}-{SID}-01\n"},  # a trailing newline (the general regex's $)
    {"traceparent": f"00-{TID}-{SID}-1"},  # short
    {"traceparent": f"00-{TID}0-{SID}-01"},  # long
    {"traceparent": f"00_{TID}-{SID}-01"},  # not a dash
    {"traceparent": f"00-{'0' * 31}1-{SID}-00"},  # a trace id that is nearly zero
    {"traceparent": f"00-{TID}-{'0' * 15}1-00"},  # a span id that is nearly zero
    {"traceparent": f"00-{'0' * 32}-{'0' * 16}-00"},  # both zero
    {"traceparent": f"00-{TID}-{SID}-01", "tracestate": ""},  # an empty tracestate
    {"traceparent": f"00-{TID}-{SID}-01", "tracestate": None},
    {"traceparent": ""},
]


@pytest.mark.parametrize("came", CAME_TEXT, ids=[repr(c)[:40] for c in CAME_TEXT])
def test_a_caller_kept_as_text_begins_as_the_general_resolution_makes_it(tracer, came):
    test_a_handle_calls_span_begins_as_the_general_resolution_makes_it(tracer, came)


def test_a_span_from_a_callers_text_makes_its_ints_where_read_and_its_id_once():
    from ray_monitor.replica.request_span import FromCaller

    t = Tracer(sample_ratio=0.0, slow_threshold_s=1.0, enabled=False)
    rs = t.begin("M.run", {}, Ctx({"traceparent": f"00-{TID}-{SID}-00"}))
    assert type(rs) is FromCaller and rs.tp == f"00-{TID}-{SID}-00"
    assert (rs._tid, rs._pid) == (None, None)  # no int parsed on the path yet
    assert isinstance(rs.span_id, int) and 0 <= rs.span_id < 1 << 64  # drawn at begin
    assert (rs.trace_id, rs.parent_id) == (int(TID, 16), int(SID, 16))
    first = rs.span_id
    assert isinstance(first, int) and rs.span_id == first and rs.ids == (int(TID, 16), first)
    rs.trace_id = 7  # the setters write the slots
    assert rs.trace_id == 7
    plain = t.begin("M.run", {}, None)  # a root: ints from the start, no text
    assert type(plain) is RequestSpan and plain.tp is None
    assert isinstance(plain.span_id, int) and isinstance(plain.trace_id, int)



def test_threads_reading_a_text_spans_id_first_at_once_see_one_id():
    """User code that logs from two ``to_thread`` calls at once (they copy the request's
    context) reads the span id from two threads: both see the one the span has (drawn at
    begin, before any thread can read it)."""
    import threading

    t = Tracer(sample_ratio=0.0, slow_threshold_s=1.0, enabled=False)
    rs = t.begin("M.run", {}, Ctx({"traceparent": f"00-{TID}-{SID}-00"}))
    start = threading.Barrier(8)
    seen = []

    def read():
        start.wait()
        seen.append(rs.span_id)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert seen == [rs.span_id] * 8


@pytest.mark.parametrize("flags", ["00", "01"])
def test_the_hook_and_the_log_factory_write_a_text_spans_ids_as_the_general_code(flags):
    """Same bytes on the wire and in the log whether the trace id comes from the
    caller's text or from the int."""
    import logging

    from ray_monitor.replica import tracing

    t = Tracer(sample_ratio=0.0, slow_threshold_s=1.0, enabled=False)
    rs = t.begin("M.run", {}, Ctx({"traceparent": f"00-{TID}-{SID}-{flags}"}))
    hooked = propagation._wrap(lambda self, pr, *a: pr.metadata.tracing_context)
    token = propagation.CURRENT.set(running_request(rs))
    try:
        fast = hooked(None, _Pending(), False)
        pr = _Pending()
        propagation._fill(pr.metadata, pr)
        assert fast == pr.metadata.tracing_context == {
            "traceparent": f"00-{TID}-{rs.span_id:016x}-{flags}", SENT_AT: 1_700_000_000.25}
        tracing.install_log_correlation()
        record = logging.getLogRecordFactory()("x", logging.INFO, __file__, 0, "m", None, None)
        assert (record.trace_id, record.span_id) == (f"{rs.trace_id:032x}",
                                                     f"{rs.span_id:016x}")
    finally:
        propagation.CURRENT.reset(token)


@pytest.mark.parametrize("options, plain", [({}, True), ({"tenant": lambda a, k: "t"}, False),
                                            ({"tenant_header": "x-tenant"}, False),
                                            ({"tokens": lambda r, a, k: (1, 2)}, False),
                                            ({"tokens": lambda r: (1, 2)}, True)])
def test_a_hook_binds_at_start_whether_its_requests_read_tenant_or_call(
        monkeypatch, options, plain):
    for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)

    @monitor(flush_interval_s=3600.0, tracing_enabled=False, **options)
    class Model:
        def run(self, x):
            return None
    m = Model()
    hook = Model.__ray_monitor__.hooks[0]
    assert m.run(1) is None
    assert hook.plain is plain  # bound when the runtime started
    assert hook.state is Model.__ray_monitor__.state and hook.cells is not None
    req = middleware._start(hook, None, False, (m, 1), {})
    assert req.cells is hook.cells
    takes_the_call = Model.__ray_monitor__.options.tokens_input
    assert req.tenant is None if plain else req.tenant is not None or takes_the_call
    assert (req.call is None) is (not takes_the_call)
    assert plain is not ("tenant" in options or "tenant_header" in options or takes_the_call)
    deferred.end(req, "ok", None, False)
    Model.__ray_monitor__.close()
    assert hook.plain is None and hook.state is None
    assert m.run(1) is None  # a request after close starts the runtime again, as before
    assert hook.state is Model.__ray_monitor__.state is not None
    Model.__ray_monitor__.close()


@pytest.mark.parametrize("value", [0, 1, 0xF, 0x10, 1 << 63, (1 << 64) - 1, 0x0123456789ABCDEF])
def test_an_id_as_hex_with_the_bit_above_it_is_the_zero_padded_format(value):
    """The hook and the log factory write ids as ``hex(id | 2**bits)[3:]`` (no format spec
    parsed on the path): the same text as ``f"{id:016x}"`` / ``f"{id:032x}"``."""
    assert hex(value | propagation.BIT64)[3:] == f"{value:016x}"
    wide = value << 64 | value
    assert hex(wide | propagation.BIT128)[3:] == f"{wide:032x}"
    assert hex(value | propagation.BIT128)[3:] == f"{value:032x}"


TP_CASES = [f"00-{TID}-{SID}-00", f"00-{TID}-{SID}-01", f"00-{TID}-{SID}-ff",
            f"01-{TID}-{SID}-00", f"00-{'0' * 32}-{SID}-00", f"00-{TID}-{'0' * 16}-00",
            f"00-{'0' * 31}1-{SID}-00", f"00-{TID}-{'0' * 15}1-00", f"00-{TID.upper()}-{SID}-00",
            f"00-{TID}-{SID}-00\n", f"00-{TID}-{SID}-00-x", f" 00-{TID}-{SID}-00",
            f"00_{TID}-{SID}-00", f"00-{TID}-{SID}-0", f"00-{TID}0-{SID}-00", "", "00-"]


@pytest.mark.parametrize("tp", TP_CASES)
def test_begins_one_regex_is_the_checks_it_replaced(tp):
    """``Tracer.begin``'s one match decides as the version check, the common regex and
    the two zero-id checks did together."""
    from ray_monitor.replica import tracing

    before = tp.startswith("00-") and propagation.TRACEPARENT_COMMON.fullmatch(tp) is not None \
        and not tp.startswith("0" * 32, 3) and not tp.startswith("0" * 16, 36)
    assert (tracing.COMMON_VALID.fullmatch(tp) is not None) == before


@pytest.mark.parametrize("tp", TP_CASES + [
    f"00-{TID[:-1]}g-{SID}-00", f"00-{TID}-{SID[:-1]}G-00", f"00-{TID}-{SID}-0g",
    f"00-{TID}-{SID}-0F", f"00-{TID[:-2]}--{SID}-00", f"00-{TID[:-1]}-{SID}0-00",
    f"00-{TID}-{SID}--0", f"00-{TID}-{SID}-0 ", f"00-{TID[:-1]} -{SID}-00",
    f"00-{TID[:-1]}\u0660-{SID}-00", f"00-{TID[:-1]}\uff10-{SID}-00",
    f"00-{TID[:-1]}_-{SID}-00", f"00-+{TID[1:]}-{SID}-00", f"00-0x{TID[2:]}-{SID}-00",
    f"0-{TID}0-{SID}-00", f"000{TID}-{SID}-00", f"00-{TID}{SID}-00-0",
    f"00-{TID}-{SID}-00".replace("-", "\u2010"), "0" * 55, "-" * 55])
def test_begins_check_without_the_regex_is_the_regex(tp):
    """``Tracer.begin`` takes the caller's text as it is (a ``FromCaller`` span) exactly
    where ``COMMON_VALID`` matches: here over the cases above, non-hex and upper-case
    digits in each field, dashes moved, added or missing, whitespace, non-ASCII digits
    and dashes, signs, ``0x``."""
    from ray_monitor.replica import tracing
    from ray_monitor.replica.request_span import FromCaller

    t = Tracer(sample_ratio=0.0, slow_threshold_s=1.0, enabled=False)
    for state in (None, "", "a=b"):
        came = {"traceparent": tp} if state is None else {"traceparent": tp, "tracestate": state}
        rs = t.begin("M.run", {}, Ctx(came))
        taken = type(rs) is FromCaller
        assert taken == (tracing.COMMON_VALID.fullmatch(tp) is not None and not state), (tp, state)
        if taken:
            assert rs.tp is tp and rs.trace_id == int(tp[3:35], 16)


def test_one_context_variable_keeps_what_the_two_said(monkeypatch):
    """``CURRENT`` holds the request running (what ``ACTIVE`` and ``CURRENT`` held apart):
    a deployment's call of its own method is part of its request, another monitored
    deployment called in process is a request of its own, and where that one has no span
    (tracing off) log records and handle calls carry the enclosing request's ids, as they
    did when only the traced request set ``CURRENT``; each context is left as found."""
    import logging

    from ray_monitor.replica import tracing

    for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    seen = {}

    def ids():
        record = logging.getLogRecordFactory()("x", logging.INFO, __file__, 0, "m", None, None)
        return getattr(record, "trace_id", None), getattr(record, "span_id", None)

    @monitor(flush_interval_s=3600.0, tracing_enabled=False)
    class Inner:
        def run(self):
            seen["inner"] = ids()
            return self.again()

        def again(self):  # its own method: the same request
            seen["again"] = ids()
            return 1

    @monitor(flush_interval_s=3600.0, tracing_enabled=True, sample_ratio=0.0)
    class Outer:
        def __init__(self):
            self.inner = Inner()

        def run(self):
            rs = propagation.CURRENT.get().ctx_span
            seen["outer"] = (f"{rs.trace_id:032x}", f"{rs.span_id:016x}")
            return self.inner.run()

    tracing.install_log_correlation()
    o = Outer()
    assert propagation.CURRENT.get() is None
    assert o.run() == 1 and propagation.CURRENT.get() is None
    assert seen["inner"] == seen["again"] == seen["outer"]
    assert ids() == (None, None)  # outside a request: nothing
    for cls, method in ((Outer, "run"), (Inner, "run")):
        rec = cls.__ray_monitor__.state.recorder
        rec.drain()
        assert {m: sum(c.latency.count for c in mc.cells.values())
                for m, mc in rec.methods.items() if mc.cells} == {method: 1}
        cls.__ray_monitor__.close()
