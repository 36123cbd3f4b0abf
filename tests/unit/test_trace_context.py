"""One trace id and one sampling decision per request, without Ray: the W3C context, who
is the parent, the caller-side hook, and whole-request tail keeping through the
aggregator's kept log. The same over a real cluster is tests/integration/test_traces_sampling.py.
"""

from __future__ import annotations

import logging
import time

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from ray_monitor.aggregator.trace_store import KeptLog
from ray_monitor.common.snapshot import ReplicaIdentity
from tests.helpers import running_request
from ray_monitor.replica import propagation, queueing
from ray_monitor.replica.delivery import ActorSink
from ray_monitor.replica.propagation import (DECLINED, PLACEHOLDER, Parent, carrier,
                                             parse_traceparent, resolve)
from ray_monitor.replica.queueing import SENT, SENT_AT
from ray_monitor.replica.recorder import Recorder
from ray_monitor.replica.span_records import SpanRecords
from ray_monitor.replica.tail import MIN_HOLD_S, TailBuffer
from ray_monitor.replica.tracing import Tracer

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
SID = "00f067aa0ba902b7"


class Ctx:
    """Ray Serve's request context as a replica sees it (the fields read here)."""

    def __init__(self, traceparent=None, tracestate=None, request_id="req-1", route=""):
        self.request_id = request_id
        self.route = route
        self._ray_trace_ctx = None
        if traceparent:
            self._ray_trace_ctx = carrier_dict(traceparent, tracestate)


def carrier_dict(tp, ts=None):
    return {"traceparent": tp, **({"tracestate": ts} if ts else {})}


# -- the W3C context -----------------------------------------------------------------

def test_traceparent_is_read_as_the_spec_says_and_written_back():
    p = parse_traceparent(f"00-{TID}-{SID}-01", "congo=t61rcWkgMzE")
    assert (f"{p.trace_id:032x}", f"{p.span_id:016x}", p.sampled, p.tracestate) == (
        TID, SID, True, "congo=t61rcWkgMzE")
    assert carrier(p.trace_id, p.span_id, p.sampled, p.tracestate) == {
        "traceparent": f"00-{TID}-{SID}-01", "tracestate": "congo=t61rcWkgMzE"}
    # SDK 1.45 sets the W3C "random" bit: flags 03 are sampled, 02 are not.
    assert parse_traceparent(f"00-{TID}-{SID}-03").sampled
    assert not parse_traceparent(f"00-{TID}-{SID}-02").sampled
    # A later version may add fields; version 00 may not.
    assert parse_traceparent(f"01-{TID}-{SID}-01-extra").trace_id == int(TID, 16)
    for bad in (None, 7, "", f"00-{TID}-{SID}-01-extra", f"ff-{TID}-{SID}-01",
                f"00-{TID.upper()}-{SID}-01", f"00-{'0' * 32}-{SID}-01",
                f"00-{TID}-{'0' * 16}-01", f"00-{TID[:-1]}-{SID}-01", f"00-{TID}-{SID}-0x"):
        assert parse_traceparent(bad) is None, bad


def test_a_placeholder_parent_is_a_root_that_carries_the_decision():
    p = parse_traceparent(f"00-{TID}-{SID}-00", f"congo=1,{PLACEHOLDER}")
    assert (p.trace_id, p.span_id, p.sampled, p.tracestate) == (int(TID, 16), 0, False,
                                                               "congo=1")


def test_who_is_the_parent():
    serve = Parent(1, 11, True, False)
    caller, header = Parent(1, 22, False), Parent(1, 33, False)
    other = Parent(2, 44, True)
    # Serve's sampled replica span continues what came in: it is the parent.
    assert resolve(serve, caller, header, True) is serve
    assert resolve(serve, None, None, True) is serve
    # What the caller sent wins over the header (it came through the proxy from it).
    assert resolve(None, caller, header, False) is caller
    assert resolve(None, None, header, False) is header
    # A Serve span in another trace lost the caller's context: the caller's trace wins.
    assert resolve(serve, other, None, True) is other
    # Nothing came in: Serve's replica span was the head sampler and said no; without
    # Serve's tracing, the request is a root, sampled here.
    assert resolve(None, None, None, True) is DECLINED
    assert resolve(None, None, None, False) is None


# -- the caller's side ----------------------------------------------------------------

class _Span:
    """A request span as the hook reads it."""

    def __init__(self, trace_id, span_id, sampled, tracestate=None):
        self.trace_id, self.span_id, self.sampled = trace_id, span_id, sampled
        self.tracestate = tracestate


def _with_current(span):
    return otel_context.attach(trace.set_span_in_context(span))


def test_the_outgoing_context_is_the_nearest_span_that_can_be_exported(monkeypatch):
    monkeypatch.setattr(propagation, "_in_proxy", False)
    assert propagation.outgoing() is None  # nothing here, not the proxy
    token = propagation.CURRENT.set(running_request(_Span(5, 6, False, "a=b")))
    try:
        assert propagation.outgoing() == {
            "traceparent": f"00-{5:032x}-{6:016x}-00", "tracestate": "a=b"}
        # An unsampled span current under ours (FastAPI's, a user's) is never exported:
        # a kept callee hangs under our span instead.
        unsampled = NonRecordingSpan(SpanContext(5, 7, False, TraceFlags(0)))
        t = _with_current(unsampled)
        try:
            assert propagation.outgoing()["traceparent"] == f"00-{5:032x}-{6:016x}-00"
        finally:
            otel_context.detach(t)
        # A sampled one is exported: the callee hangs under it.
        provider = TracerProvider()
        with provider.get_tracer("t").start_as_current_span("user span") as span:
            sc = span.get_span_context()
            assert propagation.outgoing()["traceparent"] == \
                f"00-{sc.trace_id:032x}-{sc.span_id:016x}-01"
    finally:
        propagation.CURRENT.reset(token)


def test_a_replica_without_monitor_passes_on_what_came_in(monkeypatch):
    from ray.serve.context import _RequestContext, _serve_request_context

    monkeypatch.setattr(propagation, "_in_proxy", False)
    came = carrier_dict(f"00-{TID}-{SID}-00")
    token = _serve_request_context.set(_RequestContext(request_id="r", _ray_trace_ctx=came))
    try:
        assert propagation.outgoing() == came
    finally:
        _serve_request_context.reset(token)


def test_the_proxy_carries_its_samplers_no_as_a_placeholder(monkeypatch):
    monkeypatch.setattr(propagation, "_in_proxy", True)
    out = propagation.outgoing()
    assert out["tracestate"] == PLACEHOLDER and out["traceparent"].endswith("-00")
    p = parse_traceparent(out["traceparent"], out["tracestate"])
    assert p.span_id == 0 and not p.sampled
    # The caller's own traceparent (the proxy attaches it) goes on as it is.
    t = _with_current(NonRecordingSpan(SpanContext(int(TID, 16), int(SID, 16), True,
                                                   TraceFlags(0))))
    try:
        assert propagation.outgoing() == {"traceparent": f"00-{TID}-{SID}-00"}
    finally:
        otel_context.detach(t)


class _Pending:
    def __init__(self, ctx=None):
        from ray.serve._private.common import RequestMetadata

        self.metadata = RequestMetadata(request_id="r", internal_request_id="i",
                                        tracing_context=ctx)


def test_the_hook_fills_what_serve_left_empty_and_never_raises(monkeypatch):
    from ray.serve._private.request_router.replica_wrapper import RunningReplica

    sent = []
    monkeypatch.setattr(RunningReplica, "try_send_request",
                        lambda self, pr, with_rejection: sent.append(pr.metadata.tracing_context))
    monkeypatch.setattr(propagation, "_installed", None)
    monkeypatch.setattr(propagation, "_in_proxy", False)
    assert propagation.install() is True and propagation.install() is True
    token = propagation.CURRENT.set(running_request(_Span(5, 6, True)))
    try:
        RunningReplica.try_send_request(None, _Pending(), False)
        serve_set = {"traceparent": f"00-{TID}-{SID}-01"}
        RunningReplica.try_send_request(None, _Pending(dict(serve_set)), False)  # Serve's
    finally:
        propagation.CURRENT.reset(token)
    # each also carries the caller's send time (queueing), Serve's own dict too
    stamps = [ctx.pop(SENT_AT) for ctx in sent]
    assert sent == [{"traceparent": f"00-{5:032x}-{6:016x}-01"}, serve_set]
    assert all(abs(t - time.time()) < 3600 for t in stamps)  # a wall-clock time
    failures = []
    monkeypatch.setattr(propagation, "on_failure", lambda cause, e: failures.append(cause))
    monkeypatch.setattr(propagation, "outgoing", lambda: 1 / 0)
    RunningReplica.try_send_request(None, _Pending(), False)  # the call still goes
    assert len(sent) == 3 and failures == ["trace_propagation_failed"]


def test_a_ray_without_the_fields_is_said_once_and_left_alone(monkeypatch, caplog):
    monkeypatch.setattr(propagation, "_installed", None)
    monkeypatch.setattr(propagation, "_missing", lambda: ["RunningReplica.try_send_request"])
    with caplog.at_level(logging.WARNING):
        assert propagation.install() is False and propagation.install() is False
    assert caplog.text.count("RunningReplica.try_send_request") == 1


# -- the callee's side: one decision ---------------------------------------------------

@pytest.fixture
def memory_tracer():
    exporter = InMemorySpanExporter()
    tracer = Tracer(sample_ratio=0.0, slow_threshold_s=1.0, processors=[
        SimpleSpanProcessor(exporter)], records=SpanRecords(), hold=16)
    yield tracer, exporter
    tracer.shutdown()


def test_every_hop_follows_the_decision_that_came_in(memory_tracer):
    tracer, exporter = memory_tracer
    sampled = tracer.begin("M.__call__", {}, Ctx(f"00-{TID}-{SID}-01"))
    assert sampled.sampled and sampled.span is not None  # our ratio is 0: the caller decided
    tracer.end(sampled, 0.01, None)
    unsampled = tracer.begin("M.__call__", {}, Ctx(f"00-{TID}-{SID}-00"))
    assert not unsampled.sampled and unsampled.span is None
    assert not tracer.end(unsampled, 0.01, None)
    [span] = exporter.get_finished_spans()
    assert (f"{span.context.trace_id:032x}", f"{span.parent.span_id:016x}") == (TID, SID)
    assert span.attributes["ray.serve.request_id"] == "req-1"


def test_with_serve_tracing_on_its_no_is_honoured(memory_tracer, monkeypatch):
    tracer, _ = memory_tracer
    monkeypatch.setattr(tracer, "serve_tracing", True)
    monkeypatch.setattr(tracer, "_sample_bound", 1 << 64)  # our ratio 1: not asked
    rs = tracer.begin("M.__call__", {}, Ctx())
    assert not rs.sampled and rs.parent_id == 0
    root = tracer.begin("M.__call__", {}, None)  # not a Serve request: ours decides
    assert root.sampled


def test_a_request_kept_elsewhere_is_exported_here_with_its_ids(memory_tracer):
    tracer, exporter = memory_tracer
    up = tracer.begin("Ingress.__call__", {"ray.serve.method": "__call__"},
                      Ctx(f"00-{TID}-{SID}-00", "congo=1"))
    root = tracer.begin("Other.__call__", {}, Ctx(f"00-{'1' * 32}-{SID}-00", PLACEHOLDER))
    fast = tracer.begin("Other.__call__", {}, None)
    for rs in (up, root, fast):
        assert not tracer.end(rs, 0.002, None, {"http.route": "/x"})
    assert exporter.get_finished_spans() == () and len(tracer.tail) == 3
    assert tracer.export_kept([TID, "1" * 32, "not hex"]) == 2
    assert tracer.export_kept([TID]) == 0  # each held span goes once
    spans = {s.name: s for s in exporter.get_finished_spans()}
    span = spans["Ingress.__call__"]
    assert (f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}",
            f"{span.parent.span_id:016x}") == (TID, f"{up.span_id:016x}", SID)
    assert span.attributes["ray_monitor.kept"] == "trace"
    assert span.attributes["http.route"] == "/x" and span.start_time == up.start_ns
    assert span.end_time == up.end_ns and str(span.context.trace_state) != ""
    assert spans["Other.__call__"].parent is None  # under a placeholder: the root
    records, _ = tracer.records.drain()
    assert sorted(r["kept"] for r in records) == ["trace", "trace"]


def test_kept_requests_are_reported_and_the_ring_says_when_it_is_too_small():
    tail = TailBuffer(2, max_kept=2)
    for t in (7, 7, 8, 9):
        tail.kept(t)
    assert tail.drain() == ([f"{7:032x}", f"{8:032x}"],
                            {"trace_kept_ids_dropped:buffer_full": 1})

    class Held:
        def __init__(self, end_ns):
            self.end_ns, self.trace_id, self.done = end_ns, 1, False
    now = time.time_ns()
    tail.hold(Held(now - int(MIN_HOLD_S * 2e9)))
    assert not tail.short(now)
    tail.hold(Held(now - int(MIN_HOLD_S * 2e9)))
    assert not tail.short(now)  # full, but what leaves is old enough
    tail.hold(Held(now))
    tail.hold(Held(now))
    assert tail.short(now) and tail.drain(now)[1] == {"trace_buffer_short": 1}


def test_snapshots_carry_the_trace_ids_kept_here(memory_tracer):
    tracer, _ = memory_tracer
    rs = tracer.begin("M.run", {}, None)
    tracer.end(rs, 0.001, ValueError("bad"))
    rec = Recorder(identity=ReplicaIdentity("a", "d", "r", "n", 1), kept=tracer.tail,
                   clock=lambda: 0.0)
    assert rec.snapshot().kept_traces == [f"{rs.trace_id:032x}"]
    assert rec.snapshot().kept_traces == []


# -- where the decision and the spans meet: the aggregator ---------------------------

def test_the_kept_log_names_each_id_to_each_replica_once():
    from tests.helpers import Clock

    clock = Clock()
    log = KeptLog(max_ids=8, max_reply=3, first_s=30, clock=clock)
    first = log.reply(None)
    assert first["kept"] == [] and first["seq"] == 0
    cursor = (first["epoch"], first["seq"])
    log.add(["0" * 32])
    clock.advance(31)
    log.add(["1" * 32])
    # A replica without an answer yet gets what was kept while it served its first
    # requests (the last 30 s), not the whole log.
    assert log.reply(None)["kept"] == ["1" * 32]
    cursor = (log.epoch, log.seq)
    log.add(["a" * 32, "b" * 32, "short"])
    r = log.reply(cursor)
    assert r["kept"] == ["a" * 32, "b" * 32] and r["seq"] == 4
    assert log.reply((r["epoch"], r["seq"]))["kept"] == []
    log.add([c * 32 for c in "cdefg"])
    r2 = log.reply((r["epoch"], r["seq"]))
    assert r2["kept"] == [c * 32 for c in "efg"] and log.missed == 2  # fell behind
    # A restarted aggregator has another epoch: it names all it has.
    assert log.reply(("old", 999))["kept"] == [c * 32 for c in "efg"]
    for i in range(20):
        log.add([f"{i:032x}"])
    assert len(log._ids) <= 8 * 1.25 and log.reply((log.epoch, log.seq - 1))["kept"] == [
        f"{19:032x}"]


def test_the_sink_hands_kept_ids_on_and_keeps_the_cursor(caplog):
    sink = ActorSink()
    got = []
    sink.on_kept = got.append
    sink._take_reply(None)  # an aggregator from before: nothing
    sink._take_reply({"epoch": "e", "seq": 3, "kept": ["a" * 32]})
    assert sink.kept_cursor == ("e", 3) and got == [["a" * 32]]
    sink.on_kept = lambda ids: 1 / 0
    with caplog.at_level(logging.WARNING):
        sink._take_reply({"epoch": "e", "seq": 4, "kept": ["b" * 32]})
        sink._take_reply({"epoch": "e", "seq": 5, "kept": ["c" * 32]})
    assert sink.kept_cursor == ("e", 5) and caplog.text.count("kept traces failed") == 1


def test_serves_proxy_decides_once_for_its_request_span(monkeypatch):
    from ray.serve._private import tracing_utils

    from ray_monitor.replica.propagation import one_decision_in_proxy, request_root_sampler

    provider = TracerProvider(sampler=request_root_sampler(1.0))
    tracer = provider.get_tracer("serve")
    request = tracer.start_span("proxy_http_request")
    assert request.is_recording()
    # The routing span of a request the proxy declined has no parent: not a second root.
    assert not tracer.start_span("route_to_replica Ingress __call__").is_recording()
    child = tracer.start_span("route_to_replica Ingress __call__",
                              context=trace.set_span_in_context(request))
    assert child.is_recording()
    declined = TracerProvider(sampler=request_root_sampler(0.0)).get_tracer("s")
    assert not declined.start_span("proxy_http_request").is_recording()

    monkeypatch.setattr(tracing_utils, "ParentBasedTraceIdRatio",
                        tracing_utils.ParentBasedTraceIdRatio)
    monkeypatch.setattr(propagation, "_in_proxy", False)
    assert not one_decision_in_proxy()  # a replica keeps Serve's sampler
    monkeypatch.setattr(propagation, "_in_proxy", True)
    assert one_decision_in_proxy()
    assert tracing_utils.ParentBasedTraceIdRatio is request_root_sampler


def test_serve_tracing_config_keeps_serves_ratio_unless_told():
    from ray.serve._private.constants import RAY_SERVE_TRACING_SAMPLING_RATIO

    from ray_monitor import serve_tracing_config

    assert serve_tracing_config().sampling_ratio == RAY_SERVE_TRACING_SAMPLING_RATIO
    assert serve_tracing_config(0.5).sampling_ratio == 0.5
    assert serve_tracing_config().exporter_import_path == \
        "ray_monitor.tracing:serve_span_processors"


def test_an_aggregator_from_before_kept_traces_still_gets_the_snapshots():
    got = []

    class Old:
        class ingest:
            @staticmethod
            def options(**kwargs):
                assert kwargs == {"enable_task_events": False}
                return Old.ingest

            @staticmethod
            def remote(batch):  # no cursor argument
                got.append(batch)
                return "ref"
    sink = ActorSink()
    assert sink._ingest(Old, ["s1"]) == "ref" and sink._ingest(Old, ["s2"]) == "ref"
    assert got == [["s1"], ["s2"]] and sink._old_aggregator


def test_the_hook_carries_the_routers_enqueue_time_once_and_the_callee_reads_a_queue():
    """The caller's send time is Serve's PendingRequest.created_at (its router's wait counts
    as queue); a retry keeps the first; the callee's queue is now - sent, never negative,
    and a missing or bad value is no queue, never an error."""
    pr = _Pending()
    pr.created_at = 1_700_000_000.25
    token = propagation.CURRENT.set(running_request(_Span(5, 6, False)))
    try:
        propagation._fill(pr.metadata, pr)
        pr.created_at = 1_700_000_099.0  # a retry: the first time stays
        propagation._fill(pr.metadata, pr)
    finally:
        propagation.CURRENT.reset(token)
    ctx = pr.metadata.tracing_context
    assert ctx[SENT_AT] == 1_700_000_000.25 and ctx["traceparent"].endswith("-00")

    class Request:
        def __init__(self, carried):
            self._ray_trace_ctx = carried

    now = time.time()
    q = queueing.queue_of(Request({SENT: str(int((now - 2.5) * 1e6))}))
    assert 2.5 <= q < 2.5 + 60
    assert queueing.queue_of(Request({SENT: str(int((now + 30.0) * 1e6))})) == 0.0  # behind
    for carried in (None, {}, {"traceparent": "x"}, {SENT: "soon"}, {SENT: None},
                    {SENT: "nan"}, {SENT: "1.5e9"}):
        assert queueing.queue_of(Request(carried)) is None
    assert queueing.queue_of(None) is None and queueing.queue_of(object()) is None
