"""@monitor without Ray: method kinds, options, outcomes, tail keeping, logs, failures.

Traces are checked over the wire with the test OTLP receiver, as a backend sees them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging

import pytest

from ray_monitor import monitor
from ray_monitor.replica.recorder import MAX_OUTCOMES_PER_METHOD, Recorder
from ray_monitor.common.snapshot import ReplicaIdentity

SLOW = 0.05


@pytest.fixture
def no_otlp(monkeypatch):
    for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
              "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)


def make(**options):
    options.setdefault("flush_interval_s", 3600.0)  # the test takes snapshots itself

    @monitor(**options)
    class Model:
        def __init__(self):
            self.calls = 0

        def sync(self, x):
            if x < 0:
                raise ValueError("negative")
            return x * 2

        async def coro(self, x):
            await asyncio.sleep(0)
            if x < 0:
                raise KeyError(x)
            return x + 1

        def gen(self, n):
            for i in range(n):
                yield i

        async def agen(self, n):
            for i in range(n):
                yield i

        def returns_stream(self, n):
            return iter_items(n)

        def check_health(self):
            return "untouched"

        def reconfigure(self, cfg):
            self.cfg = cfg

        def _private(self):
            return 1

        @staticmethod
        def helper():
            return 2

        def slow(self, s):
            import time
            time.sleep(s)
            return s

        def log(self):
            logging.getLogger("user").warning("inside the request")
            return "logged"
    return Model


def iter_items(n):
    yield from range(n)


def series(cls) -> dict:
    snap = cls.__ray_monitor__.state.recorder.snapshot()
    return {(s.method, s.outcome): s for s in snap.series}


def test_kinds_are_preserved_for_serve(no_otlp):
    M = make()
    assert inspect.iscoroutinefunction(M.coro)
    assert inspect.isasyncgenfunction(M.agen)
    assert inspect.isgeneratorfunction(M.gen)
    assert not inspect.iscoroutinefunction(M.sync) and not inspect.isgeneratorfunction(M.sync)
    assert M.__name__ == "Model" and M.sync.__name__ == "sync"
    # Hooks Serve calls itself, private methods and static methods are untouched.
    base = M.__mro__[1]
    assert M.check_health is base.check_health and M.reconfigure is base.reconfigure
    assert M._private is base._private and M.helper() == 2
    M.__ray_monitor__.close()


def test_every_kind_counts_and_times(no_otlp):
    M = make(model_version="v2")
    m = M()
    assert m.sync(2) == 4
    with pytest.raises(ValueError, match="negative"):
        m.sync(-1)
    assert asyncio.run(m.coro(1)) == 2
    assert list(m.gen(3)) == [0, 1, 2]

    async def drain():
        return [x async for x in m.agen(4)]
    assert asyncio.run(drain()) == [0, 1, 2, 3]
    assert list(m.returns_stream(2)) == [0, 1]
    got = series(M)
    assert {k: s.count for k, s in got.items()} == {
        ("sync", "ok"): 1, ("sync", "ValueError"): 1, ("coro", "ok"): 1, ("gen", "ok"): 1,
        ("agen", "ok"): 1, ("returns_stream", "ok"): 1}
    assert got[("sync", "ValueError")].error and not got[("sync", "ok")].error
    for stream in ("gen", "agen", "returns_stream"):
        s = got[(stream, "ok")]
        assert s.first_item is not None and s.first_item.count == 1
        assert s.first_item.sum <= s.latency.sum
    snap = M.__ray_monitor__.state.recorder.snapshot()
    assert snap.identity.deployment == "unknown" and snap.identity.model_version == "v2"
    assert snap.series == []  # deltas were taken
    M.__ray_monitor__.close()


def test_user_exception_passes_through_unchanged(no_otlp):
    M = make()
    m = M()
    err = KeyError("the very same")

    def boom(x):
        raise err
    m.__class__.__mro__[1].sync  # the wrapped method calls the original by reference
    with pytest.raises(KeyError) as info:
        asyncio.run(m.coro(-5))
    assert info.value.args == (-5,)
    assert ("coro", "KeyError") in series(M)
    M.__ray_monitor__.close()


def test_stream_closed_early_counts_as_cancelled_not_error(no_otlp):
    M = make()
    m = M()
    g = m.gen(10)
    assert next(g) == 0
    g.close()
    got = series(M)
    assert got[("gen", "cancelled")].count == 1 and not got[("gen", "cancelled")].error
    M.__ray_monitor__.close()


def test_outcome_labels_are_capped(no_otlp):
    @monitor(flush_interval_s=3600)
    class Many:
        def raise_(self, i):
            raise type(f"Error{i}", (Exception,), {})()
    m = Many()
    for i in range(MAX_OUTCOMES_PER_METHOD + 10):
        with pytest.raises(Exception):
            m.raise_(i)
    got = series(Many)
    assert len(got) == MAX_OUTCOMES_PER_METHOD + 1
    assert got[("raise_", "other")].count == 10
    Many.__ray_monitor__.close()


@pytest.mark.parametrize("kwargs, exc, field", [
    ({"sample_ratio": 1.5}, ValueError, "sample_ratio"),
    ({"sample_ratio": "all"}, TypeError, "sample_ratio"),
    ({"sample_ratio": True}, TypeError, "sample_ratio"),
    ({"slow_threshold_s": 0}, ValueError, "slow_threshold_s"),
    ({"slow_threshold_s": float("inf")}, ValueError, "slow_threshold_s"),
    ({"flush_interval_s": -1}, ValueError, "flush_interval_s"),
    ({"model_version": 3}, TypeError, "model_version"),
    ({"exclude": "sync"}, TypeError, "exclude"),
    ({"tracing_enabled": "yes"}, TypeError, "tracing_enabled"),
    ({"hang_threshold_s": -2}, ValueError, "hang_threshold_s"),
])
def test_bad_options_are_refused_at_decoration_naming_the_option(kwargs, exc, field):
    with pytest.raises(exc, match=field):
        monitor(**kwargs)


def test_misuse_is_refused():
    with pytest.raises(TypeError, match="keyword-only"):
        monitor("v3")
    with pytest.raises(TypeError):
        monitor(model_verison="v3")  # a typo is a TypeError, as for any function
    with pytest.raises(ValueError, match="exclude.*'nope'"):
        @monitor(exclude=["nope"])
        class A:
            def a(self):
                pass
    M = make()
    with pytest.raises(ValueError, match="already monitored"):
        monitor(M)
    M.__ray_monitor__.close()


def test_exclude_leaves_a_method_alone(no_otlp):
    M = make(exclude=["sync"])
    m = M()
    m.sync(1)
    m.coro  # noqa: B018
    assert series(M) == {}
    assert M.sync is M.__mro__[1].sync
    M.__ray_monitor__.close()


def test_function_target(no_otlp):
    @monitor(flush_interval_s=3600)
    async def handler(x):
        return x
    assert inspect.iscoroutinefunction(handler)
    assert asyncio.run(handler(3)) == 3
    snap = handler.__ray_monitor__.state.recorder.snapshot()
    assert [(s.method, s.count) for s in snap.series] == [("__call__", 1)]
    handler.__ray_monitor__.close()


def test_tail_keeping_sends_errors_and_slow_requests_only(otlp_env):
    M = make(sample_ratio=0.0, slow_threshold_s=SLOW)
    m = M()
    for i in range(50):
        m.sync(i)
    with pytest.raises(ValueError):
        m.sync(-1)
    m.slow(SLOW * 2)
    M.__ray_monitor__.state.recorder.drain()  # the requests ended: recorded off the path
    M.__ray_monitor__.state.tracer.provider.force_flush()
    spans = otlp_env.wait_for(lambda rx: rx.spans() if len(rx.spans()) >= 2 else None)
    assert sorted((s.name, s.attributes.get("ray_monitor.kept")) for s in spans) == [
        ("Model.slow", "slow"), ("Model.sync", "error")]
    err = next(s for s in spans if s.name == "Model.sync")
    assert err.status_code == "ERROR" and "negative" in err.status_message
    assert err.end_ns > err.start_ns and err.kind == "SERVER"
    slow = next(s for s in spans if s.name == "Model.slow")
    assert (slow.end_ns - slow.start_ns) / 1e9 >= SLOW * 2 * 0.9
    assert slow.resource["service.name"] == "unknown"
    # The kept requests' trace ids are the exemplars of their latency buckets.
    exemplars = {e.trace_id for s in series(M).values() for e in s.exemplars.values()}
    assert exemplars == {err.trace_id, slow.trace_id}
    M.__ray_monitor__.close()


def test_head_sampled_requests_are_all_traced(otlp_env):
    M = make(sample_ratio=1.0)
    m = M()
    for i in range(5):
        m.sync(i)
    assert asyncio.run(m.coro(1)) == 2
    M.__ray_monitor__.state.recorder.drain()  # the requests ended: recorded off the path
    M.__ray_monitor__.state.tracer.provider.force_flush()
    spans = otlp_env.wait_for(lambda rx: rx.spans() if len(rx.spans()) >= 6 else None)
    assert sorted(s.name for s in spans) == ["Model.coro"] + ["Model.sync"] * 5
    assert all(s.attributes["ray.serve.method"] in ("sync", "coro") for s in spans)
    assert len({s.trace_id for s in spans}) == 6
    M.__ray_monitor__.close()


def test_traceparent_header_makes_the_span_a_child(otlp_env):
    from starlette.requests import Request

    @monitor(sample_ratio=0.0, flush_interval_s=3600)
    class Http:
        def __call__(self, request):
            return "ok"
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [
        (b"traceparent", f"00-{trace_id}-{parent}-01".encode())], "query_string": b""}
    assert Http()(Request(scope)) == "ok"
    Http.__ray_monitor__.state.recorder.drain()  # the requests ended: recorded off the path
    Http.__ray_monitor__.state.tracer.provider.force_flush()
    span = otlp_env.wait_for(lambda rx: rx.spans())[0]
    assert span.trace_id == trace_id and span.parent_span_id == parent
    Http.__ray_monitor__.close()


def test_log_records_carry_the_request_trace(otlp_env, caplog):
    M = make(sample_ratio=1.0)
    m = M()
    with caplog.at_level(logging.WARNING, logger="user"):
        assert m.log() == "logged"
    M.__ray_monitor__.state.recorder.drain()  # the requests ended: recorded off the path
    M.__ray_monitor__.state.tracer.provider.force_flush()
    span = otlp_env.wait_for(lambda rx: [s for s in rx.spans() if s.name == "Model.log"])[0]
    rec = next(r for r in caplog.records if r.getMessage() == "inside the request")
    assert (rec.trace_id, rec.span_id) == (span.trace_id, span.span_id)
    M.__ray_monitor__.close()


def test_unsampled_request_logs_lead_to_its_span_when_kept(otlp_env, caplog):
    @monitor(sample_ratio=0.0, flush_interval_s=3600)
    class Fails:
        def run(self):
            logging.getLogger("user").error("about to fail")
            raise RuntimeError("failed")
    with caplog.at_level(logging.ERROR, logger="user"), pytest.raises(RuntimeError):
        Fails().run()
    Fails.__ray_monitor__.state.recorder.drain()  # the requests ended: recorded off the path
    Fails.__ray_monitor__.state.tracer.provider.force_flush()
    span = otlp_env.wait_for(lambda rx: rx.spans())[0]
    rec = next(r for r in caplog.records if r.getMessage() == "about to fail")
    assert (rec.trace_id, rec.span_id) == (span.trace_id, span.span_id)
    Fails.__ray_monitor__.close()


def test_exporter_down_never_reaches_the_request(monkeypatch, caplog):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # nothing there
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    M = make(sample_ratio=1.0)
    m = M()
    assert [m.sync(i) for i in range(3)] == [0, 2, 4]
    state = M.__ray_monitor__.state
    state.recorder.drain()  # the requests ended: recorded off the path
    state.tracer.provider.force_flush()
    counts = state.recorder.self_errors.snapshot()
    assert counts.get("trace_export_failed", 0) >= 1
    M.__ray_monitor__.close()


def test_a_broken_tracer_never_reaches_the_request(no_otlp, caplog):
    M = make()
    m = M()
    m.sync(1)  # starts the runtime

    def broken(*a, **k):
        raise RuntimeError("tracer bug")
    state = M.__ray_monitor__.state
    state.tracer.enabled = True
    state.tracer.begin = broken
    with caplog.at_level(logging.WARNING):
        assert [m.sync(i) for i in range(10)] == [i * 2 for i in range(10)]
    assert state.recorder.self_errors.snapshot()["middleware_failed"] == 10
    assert sum("middleware_failed" in r.getMessage() for r in caplog.records) == 1  # once
    M.__ray_monitor__.close()


class _Sink:
    def __init__(self):
        self.up = False
        self.got = []
        self.raise_ = False

    def send(self, snaps):
        if self.raise_:
            raise ConnectionError("aggregator gone")
        if not self.up:
            return snaps
        self.got.extend(snaps)
        return []


def test_buffer_while_the_aggregator_is_away_is_bounded_and_delivered_in_order():
    sink = _Sink()
    ident = ReplicaIdentity("app", "dep", "r1", "node", 1)
    rec = Recorder(identity=ident, sink=sink, buffer_size=5, clock=lambda: 0.0)
    cells = rec.method("m")
    for i in range(8):
        cells.end(cells.begin(0.0), "ok", False, 0.01)
        rec.flush(now=float(i))
    assert rec.buffered == 5
    sink.raise_ = True
    rec.flush(now=8.0)
    assert rec.self_errors.snapshot()["sink_failed:ConnectionError"] == 1
    sink.raise_, sink.up = False, True
    rec.flush(now=9.0)
    assert [s.seq for s in sink.got] == [6, 7, 8, 9, 10]  # oldest were dropped
    assert sink.got[-1].dropped == 5 and rec.buffered == 0
    assert sum(sum(x.count for x in s.series) for s in sink.got) == 3  # what survived


def test_bad_environment_value_is_logged_and_the_default_used(monkeypatch, caplog):
    from ray_monitor.replica.options import from_env

    monkeypatch.setenv("RAY_MONITOR_SAMPLE_RATIO", "lots")
    with caplog.at_level(logging.WARNING):
        assert from_env("sample_ratio") == 0.1
    assert "RAY_MONITOR_SAMPLE_RATIO" in caplog.text
    monkeypatch.setenv("RAY_MONITOR_SAMPLE_RATIO", "0.5")
    assert from_env("sample_ratio") == 0.5


def test_a_method_the_deployment_calls_on_itself_is_not_a_request(no_otlp):
    @monitor(flush_interval_s=3600)
    class Pipeline:
        def __call__(self, x):
            return self.postprocess(self.preprocess(x))

        def preprocess(self, x):
            return x + 1

        def postprocess(self, x):
            return list(self.stream(x))

        def stream(self, n):
            yield from range(n)
    p = Pipeline()
    assert p(2) == [0, 1, 2]
    assert p.preprocess(1) == 2  # called from outside: a request of its own
    got = {k: s.count for k, s in series(Pipeline).items()}
    assert got == {("__call__", "ok"): 1, ("preprocess", "ok"): 1}
    Pipeline.__ray_monitor__.close()


# -- the aggregator's copy of kept traces ----------------------------------------------

def test_without_an_endpoint_failed_and_slow_requests_reach_the_snapshot(no_otlp):
    M = make(sample_ratio=1.0, slow_threshold_s=SLOW)
    m = M()
    for i in range(20):
        m.sync(i)
    with pytest.raises(ValueError):
        m.sync(-1)
    m.slow(SLOW * 2)
    state = M.__ray_monitor__.state
    # Nothing would take a head-sampled ok span: only kept requests become spans.
    assert state.tracer.enabled and not state.tracer.head_sampling
    snap = state.recorder.snapshot()
    traces = snap.traces
    assert sorted((r["name"], r["kept"]) for r in traces) == [
        ("Model.slow", "slow"), ("Model.sync", "error")]
    err = next(r for r in traces if r["kept"] == "error")
    assert err["exception"] == {"type": "ValueError", "message": "negative"}
    assert err["status"] == "error" and err["attributes"]["ray.serve.method"] == "sync"
    slow = next(r for r in traces if r["kept"] == "slow")
    assert slow["duration_s"] >= SLOW * 2 * 0.9 and slow["slow"] and slow["status"] == "ok"
    # The exemplars of the kept requests' buckets lead to their records.
    exemplars = {e.trace_id for s in snap.series for e in s.exemplars.values()}
    assert exemplars == {err["trace_id"], slow["trace_id"]}
    assert state.recorder.snapshot().traces == []  # drained
    M.__ray_monitor__.close()


def test_with_an_endpoint_kept_spans_go_to_the_backend_and_the_aggregator(otlp_env):
    M = make(sample_ratio=0.0)
    m = M()
    with pytest.raises(ValueError):
        m.sync(-1)
    state = M.__ray_monitor__.state
    state.recorder.drain()  # the requests ended: recorded off the path
    state.tracer.provider.force_flush()
    [span] = otlp_env.wait_for(lambda rx: rx.spans())
    [rec] = state.recorder.snapshot().traces
    assert (rec["trace_id"], rec["span_id"]) == (span.trace_id, span.span_id)
    M.__ray_monitor__.close()


def test_a_kept_request_under_an_unsampled_caller_is_still_traced(otlp_env):
    from starlette.requests import Request

    @monitor(sample_ratio=1.0, flush_interval_s=3600)
    class Http:
        def __call__(self, request):
            raise RuntimeError("boom")
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [
        (b"traceparent", f"00-{trace_id}-{parent}-00".encode())], "query_string": b""}
    with pytest.raises(RuntimeError):
        Http()(Request(scope))
    state = Http.__ray_monitor__.state
    state.recorder.drain()  # the requests ended: recorded off the path
    state.tracer.provider.force_flush()
    span = otlp_env.wait_for(lambda rx: rx.spans())[0]
    assert span.trace_id == trace_id and span.parent_span_id == parent
    [rec] = state.recorder.snapshot().traces
    assert rec["parent_span_id"] == parent and rec["kept"] == "error"
    Http.__ray_monitor__.close()


def test_metrics_only_sends_no_traces(no_otlp, monkeypatch):
    M = make(tracing_enabled=False)
    m = M()
    with pytest.raises(ValueError):
        m.sync(-1)
    state = M.__ray_monitor__.state
    assert not state.tracer.enabled and state.recorder.snapshot().traces == []
    M.__ray_monitor__.close()
    monkeypatch.setenv("RAY_MONITOR_TRACES", "0")
    M = make()
    m = M()
    with pytest.raises(ValueError):
        m.sync(-1)
    state = M.__ray_monitor__.state
    assert not state.tracer.enabled and state.recorder.snapshot().traces == []
    M.__ray_monitor__.close()


def _ended_spans(tracer, n, *, fail=False):
    for _ in range(n):
        rs = tracer.begin("Model.run", {"ray.serve.method": "run"}, None)
        tracer.end(rs, 0.001, ValueError("bad") if fail else None)


def test_span_records_are_bounded_per_flush_kept_spans_first_and_drops_counted():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ray_monitor.replica.tracing import SpanRecords, Tracer

    records = SpanRecords(max_spans=5, max_context=2)
    tracer = Tracer(sample_ratio=1.0, slow_threshold_s=1.0, exporter=InMemorySpanExporter(),
                    records=records)
    assert tracer.head_sampling
    _ended_spans(tracer, 4)  # head-sampled, ok: held until their request is kept
    _ended_spans(tracer, 6, fail=True)
    rec = Recorder(identity=ReplicaIdentity("app", "dep", "r1", "node", 1), spans=records,
                   clock=lambda: 0.0)
    snap = rec.snapshot()
    assert [r["kept"] for r in snap.traces] == ["error"] * 5
    assert snap.self_errors == {"trace_spans_dropped:buffer_full": 1}
    assert len(tracer.tail) == 4
    # One of the held requests was kept elsewhere: its record goes now, as "trace".
    held = next(iter(tracer.tail._ring)).record
    tracer.export_kept([held["trace_id"]])
    assert [(r["span_id"], r["kept"]) for r in rec.snapshot().traces] == [
        (held["span_id"], "trace")]
    # Context records (a process without a ring to hold them) are bounded on their own.
    for _ in range(4):
        records.add({**held, "kept": ""})
    taken, drops = records.drain()
    assert len(taken) == 2 and drops == {"trace_context_dropped:buffer_full": 2}
    tracer.shutdown()


def test_snapshots_buffered_while_the_aggregator_is_away_keep_few_traces():
    from ray_monitor.replica.recorder import MAX_TRACE_SNAPSHOTS_BUFFERED

    class OneRecordPerFlush:
        def drain(self):
            return [{"trace_id": "t", "span_id": "s", "kept": "error"}], {}
    sink = _Sink()  # down: keeps everything
    rec = Recorder(identity=ReplicaIdentity("app", "dep", "r1", "node", 1), sink=sink,
                   spans=OneRecordPerFlush(), clock=lambda: 0.0)
    for i in range(MAX_TRACE_SNAPSHOTS_BUFFERED + 5):
        rec.flush(now=float(i))
    assert rec.buffered == MAX_TRACE_SNAPSHOTS_BUFFERED + 5
    assert sum(len(s.traces) for s in rec._buffer) == MAX_TRACE_SNAPSHOTS_BUFFERED
    assert rec.self_errors.snapshot()["trace_spans_dropped:aggregator_away"] == 5


def test_serve_spans_of_a_monitored_replica_go_with_the_rest_of_a_kept_request(monkeypatch):
    from opentelemetry.sdk.trace import TracerProvider

    from ray_monitor.replica import tracing
    from ray_monitor.replica.tail import TailBuffer

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    provider = TracerProvider()
    for p in tracing.serve_span_processors():  # what Ray Serve calls in each process
        provider.add_span_processor(p)
    serve_tracer = provider.get_tracer("serve")
    serve_tracer.start_span("proxy_http_request").end()  # no monitored replica here: nothing
    records, tail = tracing.SpanRecords(), TailBuffer(8)
    tracing.claim_serve_spans(records, tail)
    try:
        serve_tracer.start_span("replica_handle_request Model __call__",
                                attributes={"request_id": "r-1", "app": "shop"}).end()
    finally:
        tracing.release_serve_spans(records)
    serve_tracer.start_span("after release").end()
    assert records.drain() == ([], {}) and len(tail) == 1  # held until the request is kept
    [held] = tail.take([next(iter(tail._ring)).trace_id])
    rec = held.record
    assert (rec["name"], rec["source"], rec["kept"]) == (
        "replica_handle_request Model __call__", "ray_serve", "")
    assert rec["attributes"] == {"request_id": "r-1", "app": "shop"}
    monkeypatch.setenv("RAY_MONITOR_TRACES", "0")
    assert tracing.serve_span_processors() == []


def test_traces_switch_reads_the_environment(caplog):
    from ray_monitor.replica.tracing import aggregator_traces_enabled

    assert aggregator_traces_enabled({}) and aggregator_traces_enabled({"RAY_MONITOR_TRACES": "1"})
    assert not aggregator_traces_enabled({"RAY_MONITOR_TRACES": "off"})
    with caplog.at_level(logging.WARNING):
        assert aggregator_traces_enabled({"RAY_MONITOR_TRACES": "maybe"})
    assert "RAY_MONITOR_TRACES" in caplog.text


def test_with_only_the_aggregator_to_take_them_no_span_is_made_once_the_buffer_is_full(no_otlp):
    from ray_monitor.replica.tracing import SpanRecords, Tracer

    records = SpanRecords(max_spans=2)
    tracer = Tracer(sample_ratio=1.0, slow_threshold_s=1.0, records=records)
    assert tracer.enabled and not tracer.head_sampling
    made = []
    for _ in range(5):
        rs = tracer.begin("Model.run", {}, None)
        made.append(tracer.end(rs, 0.001, ValueError("bad")))
    assert made == [True, True, False, False, False]
    kept, drops = records.drain()
    assert [r["exception"] for r in kept] == [{"type": "ValueError", "message": "bad"}] * 2
    assert drops == {"trace_spans_dropped:buffer_full": 3}
    tracer.shutdown()
