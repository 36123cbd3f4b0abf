"""Issue 14, part 3, without Ray: the price of each request, GPU-seconds attributed to
replicas and their price, the prices section's GPU field, a stream's first-item span event,
and queue time over OTLP."""

from __future__ import annotations

import pytest

from ray_monitor.aggregator.gpu_cost import attributed_seconds
from ray_monitor.aggregator.tenants import request_costs
from ray_monitor.aggregator.windows import WindowStore
from ray_monitor.alerting.loader import load_rule_file
from ray_monitor.alerting.prices import Price, gpu_price_for, price_for
from ray_monitor.common.catalog import Query
from ray_monitor.common.errors import ConfigError
from ray_monitor.common.snapshot import (GpuDevice, GpuProcess, GpuSnapshot, ReplicaIdentity,
                                         ReplicaSnapshot, UsageDelta)
from ray_monitor.replica.usage import UsageTable
from tests.helpers import Clock, hist

A = ReplicaIdentity("app", "Chat", "r1", "n1", 101)
B = ReplicaIdentity("app", "Chat", "r2", "n1", 102)
E = ReplicaIdentity("app", "Embedder", "r3", "n1", 103)
PRICES = {"groups": [], "prices": {
    "toy": {"prompt_per_1k": 0.5, "completion_per_1k": 2.0, "per_gpu_second": 0.003},
    "Embedder": {"per_gpu_second": 0.001}}}


def test_the_usage_table_counts_each_requests_tokens_up_to_its_bound_on_pairs():
    t = UsageTable(max_pairs=2)
    for i, o in ((10, 5), (10, 5), (20, 7), (30, 9), (40, 1)):
        t.record("toy", "a", False, 0.1, i, o)
    t.record("", "a", False, 0.1, 0, 0, counted=False)  # no usage known: not priced
    e, none = t.drain()
    assert e.pairs == {(10, 5): 2, (20, 7): 1} and e.rest == 2 and e.requests == 5
    assert (none.model, none.requests, none.pairs, none.rest) == ("", 1, {}, 0)
    t.record("toy", "a", False, 0.1, 30, 9)  # the bound is per snapshot
    assert t.drain()[0].pairs == {(30, 9): 1}


def test_request_costs_are_each_requests_price_and_the_rest_at_their_mean():
    price = Price(0.5, 2.0)
    u = UsageDelta("toy", "a", requests=5, input_tokens=10 + 10 + 20 + 30 + 40,
                   output_tokens=5 + 5 + 7 + 9 + 1, pairs={(10, 5): 2, (20, 7): 1}, rest=2)
    h = request_costs(u, price)
    assert h.count == 5
    assert h.sum == pytest.approx(price.cost(u.input_tokens, u.output_tokens), rel=1e-12)
    assert h.min == pytest.approx(price.cost(10, 5))
    assert h.max == pytest.approx(price.cost(70, 10) / 2)  # the two past the bound


def test_gpu_seconds_are_shared_by_the_replicas_on_a_gpu():
    snap = GpuSnapshot("n1", 10.0, [GpuDevice(0, "G0", "H100"), GpuDevice(1, "G1", "H100"),
                                    GpuDevice(2, "G2", "H100", lost=True)], [
        GpuProcess(0, "G0", 101, 1, 0.5, replica=A),
        GpuProcess(0, "G0", 201, 1, 0.5, ancestors=(101,), replica=A),  # A's child: once
        GpuProcess(0, "G0", 102, 1, 0.5, replica=B),
        GpuProcess(1, "G1", 101, 1, 0.5, replica=A),
        GpuProcess(1, "G1", 999, 1, 0.5),  # no replica's process: nobody pays
        GpuProcess(2, "G2", 103, 1, 0.5, replica=E)])  # fell off the bus
    assert attributed_seconds(snap, 2.0) == {("0", "G0", A): 1.0, ("0", "G0", B): 1.0,
                                             ("1", "G1", A): 2.0}


def test_prices_take_the_first_entry_that_prices_each_part():
    rf = load_rule_file({"groups": [], "prices": {
        "toy": {"per_gpu_second": 0.003}, "Chat": {"per_gpu_second": 0.002},
        "*": {"prompt_per_1k": 1.0, "per_gpu_second": 0.001}}})
    assert price_for(rf.prices, "toy") is rf.prices["*"]  # toy names no token price
    assert gpu_price_for(rf.prices, "toy", "Chat") == 0.003
    assert gpu_price_for(rf.prices, "", "Chat") == 0.002  # model unknown: the deployment's
    assert gpu_price_for(rf.prices, "other", "Ranker") == 0.001
    assert gpu_price_for({}, "toy", "Chat") is None
    with pytest.raises(ConfigError) as e:
        load_rule_file({"groups": [], "prices": {"toy": {"per_gpu_second": -1}}})
    assert e.value.field == "prices.toy.per_gpu_second" and "GPU-second" in str(e.value)


def test_the_store_prices_gpu_seconds_and_each_request():
    clock = Clock(10_000.0)
    store = WindowStore(clock=clock)
    store.tenants.prices = load_rule_file(PRICES).prices
    usage = [UsageDelta("toy", "a", 3, 0, 10 + 20 + 20, 5 + 7 + 7, hist(0.1, 0.2, 0.3),
                        pairs={(10, 5): 1, (20, 7): 2})]
    clock.t = 10_001.0
    store.ingest(ReplicaSnapshot(A, 1, 10_000.0, 10_001.0, [], {}, usage=usage))
    procs = [GpuProcess(0, "G0", 101, 1, 0.5, replica=A), GpuProcess(0, "G0", 102, 1, 0.5,
                                                                      replica=B),
             GpuProcess(1, "G1", 103, 1, 0.5, replica=E)]
    devices = [GpuDevice(0, "G0", "H100"), GpuDevice(1, "G1", "H100")]
    for t in (10_001.0, 10_003.0, 10_004.0):  # intervals: 1 s (a node's first), 2 s, 1 s
        clock.t = t
        store.ingest_gpu(GpuSnapshot("n1", t, devices, procs))
    clock.t = 10_006.0

    def ev(fn, metric, by):
        return store.evaluate(Query(fn, metric, 60.0, by=by), clock.t)
    secs = ev("sum", "replica_gpu_seconds", ("deployment", "replica"))
    assert secs == {(("deployment", "Chat"), ("replica", "r1")): 2.0,
                    (("deployment", "Chat"), ("replica", "r2")): 2.0,
                    (("deployment", "Embedder"), ("replica", "r3")): 4.0}
    cost = ev("sum", "cost", ("deployment", "model", "tenant", "part"))
    tokens = (50 * 0.5 + 19 * 2.0) / 1000
    assert cost == pytest.approx({
        (("deployment", "Chat"), ("model", "toy"), ("part", "tokens"), ("tenant", "a")): tokens,
        # Chat served toy: toy's GPU price; Embedder named no model: its deployment's
        (("deployment", "Chat"), ("model", "toy"), ("part", "gpu"), ("tenant", "")): 4.0 * 0.003,
        (("deployment", "Embedder"), ("model", ""), ("part", "gpu"), ("tenant", "")): 4.0 * 0.001,
    }, rel=1e-12)
    per_request = Query("sum", "request_cost", 60.0, by=("tenant",))
    assert store.evaluate(per_request, clock.t) == pytest.approx({(("tenant", "a"),): tokens})
    assert ev("count", "request_cost", ("tenant",)) == {(("tenant", "a"),): 3.0}
    assert ev("max", "request_cost", ()) == pytest.approx({(): (20 * 0.5 + 7 * 2.0) / 1000},
                                                          rel=0.01)


def test_a_streams_span_has_an_event_at_its_first_item():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ray_monitor.replica.tracing import FIRST_CHUNK, FIRST_ITEM_EVENT, Tracer

    exporter = InMemorySpanExporter()
    tracer = Tracer(sample_ratio=1.0, slow_threshold_s=0.1, exporter=exporter)
    try:
        rs = tracer.begin("Chat.chat", {"ray.serve.method": "chat"}, None)
        assert tracer.end(rs, 0.5, None, {FIRST_CHUNK: 0.25, "gen_ai.request.stream": True})
        plain = tracer.begin("Chat.plain", {"ray.serve.method": "plain"}, None)
        assert tracer.end(plain, 0.5, None, {"ray_monitor.queue_seconds": 0.1})
        tracer.provider.force_flush()
        spans = {s.name: s for s in exporter.get_finished_spans()}
        (ev,) = spans["Chat.chat"].events
        assert ev.name == FIRST_ITEM_EVENT and dict(ev.attributes) == {FIRST_CHUNK: 0.25}
        assert ev.timestamp - spans["Chat.chat"].start_time == 250_000_000
        assert spans["Chat.plain"].events == ()
    finally:
        tracer.shutdown()


def test_queue_time_goes_over_otlp_with_the_methods_labels():
    from ray_monitor.common.snapshot import GenAIDelta, SeriesDelta
    from ray_monitor.replica.otlp_genai import GenAIMetrics
    from ray_monitor.replica.otlp_metrics import _exp_point

    g = GenAIMetrics()
    g.add(ReplicaSnapshot(A, 1, 0.0, 1.0, [
        SeriesDelta("chat", "ok", False, hist(1.0), hist(0.1),
                    genai=GenAIDelta(queue=hist(0.3), first_with_queue=hist(0.4))),
        SeriesDelta("plain", "ok", False, hist(1.0, 2.0), genai=GenAIDelta(queue=hist(0.2, 0.5)))],
        {}))
    ms = {m.name: m for m in g.metrics(0, 1, lambda method, outcome: {"method": method},
                                       _exp_point)}
    queue = {p.attributes["method"]: (p.count, p.sum, dict(p.attributes))
             for p in ms["ray_monitor.request.queue.duration"].data.data_points}
    assert queue == {"chat": (1, 0.3, {"method": "chat"}), "plain": (2, 0.7, {"method": "plain"})}
    (fq,) = ms["ray_monitor.request.first_item_with_queue.duration"].data.data_points
    assert (fq.attributes["method"], fq.count, fq.sum) == ("chat", 1, 0.4)
    assert ms["ray_monitor.request.queue.duration"].unit == "s"
    (ttft,) = ms["gen_ai.server.time_to_first_token"].data.data_points  # plain is not GenAI
    assert ttft.attributes["method"] == "chat"


def test_a_tokens_extractor_of_three_arguments_also_gets_the_requests_arguments(monkeypatch):
    from ray_monitor import monitor

    for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    seen = []

    def with_call(item, args, kwargs):  # prompt tokens from the request, output from the stream
        seen.append((item, args, kwargs))
        return len(args[0].split()), int(item[1:]) + 1

    @monitor(tokens=with_call, flush_interval_s=3600.0)
    class Chat:
        def gen(self, prompt, n=3):
            for i in range(n):
                yield f"t{i}"

    c = Chat()
    assert list(c.gen("tell me a story", n=4)) == ["t0", "t1", "t2", "t3"]
    assert seen == [("t3", ("tell me a story",), {"n": 4})]
    Chat.__ray_monitor__.state.recorder.drain()  # the request ended: recorded off the path
    (u,) = Chat.__ray_monitor__.state.recorder.usage.drain()
    assert (u.input_tokens, u.output_tokens, u.pairs) == (4, 4, {(4, 4): 1})
    Chat.__ray_monitor__.close()
    # back-compatible: one argument (or more with defaults) gets the result alone, as before
    for fn, takes in ((lambda result: (1, 2), False), (lambda result, *rest: (1, 2), False),
                      (lambda r, a=None, k=None: (1, 2), False), (len, False),
                      (lambda r, a, k: (1, 2), True)):
        M = monitor(tokens=fn)(type("M", (), {"run": lambda self: 1}))
        assert M.__ray_monitor__.options.tokens_input is takes, fn


def test_a_replica_prices_its_requests_span_from_the_published_prices():
    from types import SimpleNamespace

    from ray_monitor.alerting.prices import token_prices_json
    from ray_monitor.replica.prices import PriceBoard, parse
    from ray_monitor.replica.streaming import measure

    published = token_prices_json(load_rule_file(PRICES).prices)  # as the aggregator writes it
    assert parse(published) == {"toy": (0.5, 2.0)}  # Embedder prices GPU time only
    reads, failures = [published], []

    def read():
        if not reads:
            raise ConnectionError("GCS away")
        return reads.pop()
    board = PriceBoard(read=read, on_failure=lambda cause, e: failures.append(cause),
                       start_thread=False)
    assert board.cost("toy", 100, 10) is None  # nothing read yet: no cost, no guess
    board.refresh()
    assert board.cost("toy", 100, 10) == pytest.approx((100 * 0.5 + 10 * 2.0) / 1000)
    assert board.cost("other", 100, 10) is None  # no price and no "*"
    board.refresh()  # the GCS away: the last prices stay, the failure is counted
    assert failures == ["prices_read_failed:ConnectionError"] and board.cost("toy", 1, 1)
    assert parse(b'{"a": [1, 2], "b": "x", "c": [true, 1], "*": [0, 1]}') == {
        "a": (1.0, 2.0), "*": (0.0, 1.0)}
    runtime = SimpleNamespace(options=SimpleNamespace(tokens=None, tokens_auto=True),
                              state=SimpleNamespace(prices=board))
    fig = measure(runtime, None, {"model": "toy", "usage": {"prompt_tokens": 7,
                                                            "completion_tokens": 3}}, 0.1)
    assert fig.span_attributes()["ray_monitor.request.cost"] == pytest.approx(
        (7 * 0.5 + 3 * 2.0) / 1000)
    fig = measure(runtime, None, {"model": "unpriced", "usage": {"prompt_tokens": 7,
                                                                 "completion_tokens": 3}}, 0.1)
    assert "ray_monitor.request.cost" not in fig.span_attributes()


def test_a_failing_price_lookup_is_counted_as_itself_and_the_usage_still_counts():
    from types import SimpleNamespace

    from ray_monitor.replica.streaming import measure

    def cost(model, i, o):
        raise KeyError(model)
    errors = []
    runtime = SimpleNamespace(options=SimpleNamespace(tokens=None, tokens_auto=True),
                              state=SimpleNamespace(prices=SimpleNamespace(cost=cost)),
                              self_error=lambda cause, e=None: errors.append(cause))
    fig = measure(runtime, None, {"model": "toy", "usage": {"prompt_tokens": 7,
                                                            "completion_tokens": 3}}, 0.1)
    assert errors == ["span_cost:KeyError"]  # not the extractor's fault
    assert (fig.usage.input_tokens, fig.usage.output_tokens) == (7, 3)
    assert "ray_monitor.request.cost" not in fig.span_attributes()
