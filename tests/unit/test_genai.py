"""Streams, token usage, tenants and cost without Ray (issue 14): the replica's extraction
and timing, the aggregator's top-K tenants and prices, rules over the new metrics."""

from __future__ import annotations

import asyncio
import json

import pytest

from ray_monitor import monitor
from ray_monitor.aggregator.tenants import OTHER, SpaceSaving, TenantBook
from ray_monitor.aggregator.windows import WindowStore
from ray_monitor.alerting.expr import check_expr
from ray_monitor.alerting.loader import load_rule_file
from ray_monitor.common.catalog import Query
from ray_monitor.common.errors import ConfigError
from ray_monitor.common.snapshot import (GenAIDelta, ReplicaIdentity, ReplicaSnapshot,
                                         SeriesDelta, UsageDelta)
from ray_monitor.replica.genai import Usage, check_tokens_result, usage_of
from ray_monitor.replica.streaming import Stream, figures
from ray_monitor.replica.usage import UsageTable
from tests.helpers import Clock, hist


def chunk(content=None, usage=None, model="toy"):
    d = {"id": "c1", "object": "chat.completion.chunk", "model": model,
         "choices": [] if content is None else [{"index": 0, "delta": {"content": content}}]}
    if usage is not None:
        d["usage"] = usage
    return d


def sse(d) -> str:
    return f"data: {json.dumps(d)}\n\n"


USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


# ------------------------------------------------------------------ extraction

def test_usage_from_every_openai_shape():
    want = Usage(7, 5, "toy")
    assert usage_of({"object": "chat.completion", "model": "toy", "usage": USAGE}) == want
    assert usage_of(sse(chunk(usage=USAGE)) + "data: [DONE]\n\n") == want
    assert usage_of((sse(chunk("a")) + sse(chunk(usage=USAGE))).encode()) == want
    assert usage_of([sse(chunk("a")), sse(chunk(usage=USAGE))]) == want  # Serve LLM batch
    assert usage_of(json.dumps({"model": "toy", "usage": USAGE})) == want  # a JSON body
    responses = {"type": "response.completed", "response": {
        "model": "toy", "usage": {"input_tokens": 7, "output_tokens": 5, "total_tokens": 12}}}
    assert usage_of(sse(responses)) == want

    class Pydantic:
        model = "toy"
        usage = type("U", (), {"prompt_tokens": 7, "completion_tokens": 5})()
    assert usage_of(Pydantic()) == want


@pytest.mark.parametrize("thing", [None, 3, "data: [DONE]\n\n", sse(chunk("usage")), {"usage": 3},
                                   {"usage": {"prompt_tokens": -1}}, {"usage": {"prompt_tokens": True}},
                                   b"x" * 10, "data: {not json usage\n\n", object()])
def test_no_usage_is_none_never_an_error(thing):
    assert usage_of(thing) is None


def test_measure_shortcut_answers_as_figures_for_every_result_shape():
    """measure() skips extraction for results that cannot carry usage (a few us a request
    inside a replica): for each shape, with and without OpenAI extraction, it must answer
    what figures() answers."""
    from types import SimpleNamespace

    from ray_monitor.replica.streaming import measure

    usage_dict = {"object": "chat.completion", "model": "toy", "usage": USAGE}
    shapes = [None, 3, 2.5, True, "ok", "", sse(chunk(usage=USAGE)), json.dumps(usage_dict),
              {"got": "ok"}, usage_dict, {"usage": None}, {"type": "response.completed",
              "response": {"model": "toy", "usage": {"input_tokens": 7, "output_tokens": 5}}},
              {"response": "x"}, [sse(chunk(usage=USAGE))], b"x", object()]
    for auto in (True, False):  # the default (OpenAI shapes read), and tokens=False
        opts = SimpleNamespace(tokens=None, tokens_auto=auto)
        runtime = SimpleNamespace(options=opts, state=None, self_error=lambda *a: None)
        for result in shapes:
            want = figures(None, result, 1.0, opts.tokens, opts.tokens_auto)
            got = measure(runtime, None, result, 1.0)
            assert (got is None) == (want is None), (auto, result)
            if want is not None:
                assert got.usage == want.usage, (auto, result)


def test_a_raising_object_is_no_usage():
    class Hostile:
        def __getattr__(self, name):
            raise RuntimeError(name)
    assert usage_of(Hostile()) is None


def test_tokens_extractor_results_are_checked():
    assert check_tokens_result((3, 4)) == Usage(3, 4)
    assert check_tokens_result({"prompt": 3, "completion": 4, "model": "m"}) == Usage(3, 4, "m")
    assert check_tokens_result(None) is None
    for bad in ((3, -1), ("3", 4), {"input": 1.5}, "3,4", {"input": 1, "model": 3}):
        with pytest.raises(ValueError):
            check_tokens_result(bad)


def test_figures_use_tokens_for_time_per_token_when_known():
    st = Stream(0.0)
    for t, item in ((0.5, sse(chunk("a"))), (1.0, sse(chunk("b c"))), (2.5, sse(chunk(usage={
            "prompt_tokens": 2, "completion_tokens": 4}))), (2.5, "data: [DONE]\n\n")):
        st.item(item, t)
    f = figures(st, None, 3.0, None, True)
    assert st.first == 0.5 and st.items == 4 and st.gaps.count == 3
    assert f.usage == Usage(2, 4, "toy")
    assert f.time_per_token() == pytest.approx((2.5 - 0.5) / 3)  # 4 tokens, not 4 items
    d = GenAIDelta()
    f.add_to(d)
    assert (d.items.sum, d.input_tokens.sum, d.output_tokens.sum) == (4, 2, 4)
    assert d.items_per_s.sum == pytest.approx(4 / 3.0)
    attrs = f.span_attributes()
    assert attrs["gen_ai.usage.output_tokens"] == 4 and attrs["gen_ai.request.stream"]
    assert attrs["gen_ai.response.time_to_first_chunk"] == 0.5
    plain = figures(st, None, 3.0, None, False)  # extraction off: items stand for tokens
    assert plain.usage is None and plain.time_per_token() == pytest.approx(2.0 / 3)
    assert figures(None, {"x": 1}, 1.0, None, True) is None  # nothing to add


# ------------------------------------------------------------------ the middleware

def _model(**options):
    options.setdefault("flush_interval_s", 3600.0)

    @monitor(**options)
    class Chat:
        def gen(self, n):
            for i in range(n):
                yield f"t{i}"

        async def agen(self, n):
            for i in range(n):
                yield sse(chunk(f"t{i}"))
            yield sse(chunk(usage={"prompt_tokens": 3, "completion_tokens": n}))
            yield "data: [DONE]\n\n"

        async def returns_agen(self, n):  # Serve LLM's LLMServer.chat shape
            return self.agen(n)

        def complete(self, prompt, user=""):
            return {"object": "chat.completion", "model": "toy",
                    "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 2}}

        async def http(self, n):
            from starlette.responses import StreamingResponse
            return StreamingResponse(self.agen(n), media_type="text/event-stream")
    return Chat


def _series(cls):
    snap = cls.__ray_monitor__.state.recorder.snapshot()
    return {(s.method, s.outcome): s for s in snap.series}, snap


async def _drain(agen):
    return [x async for x in agen]


def test_streams_of_every_kind_are_timed_with_their_usage():
    C = _model()
    c = C()
    assert list(c.gen(3)) == ["t0", "t1", "t2"]
    assert len(asyncio.run(_drain(c.agen(4)))) == 6
    # an async def returning an async generator: the stream is timed, not the return
    assert len(asyncio.run(_drain(asyncio.run(c.returns_agen(2))))) == 4
    resp = asyncio.run(c.http(3))
    assert len(asyncio.run(_drain(resp.body_iterator))) == 5
    got, snap = _series(C)
    g = got[("gen", "ok")]
    assert g.first_item.count == 1 and g.genai.items.sum == 3 and g.genai.gaps.count == 2
    assert g.genai.output_tokens is None  # plain items: no usage claimed
    a = got[("agen", "ok")].genai
    assert a.items.sum == 6 and (a.input_tokens.sum, a.output_tokens.sum) == (3, 4)
    assert a.time_per_token.count == 1
    r = got[("returns_agen", "ok")]
    assert r.first_item.count == 1 and r.genai.output_tokens.sum == 2
    assert r.first_item.sum <= r.latency.sum
    h = got[("http", "200")]
    assert h.genai.output_tokens.sum == 3 and h.first_item.count == 1
    assert sorted((u.model, u.tenant, u.requests, u.output_tokens) for u in snap.usage) == [
        ("toy", "", 3, 9)]
    C.__ray_monitor__.close()


def test_returned_usage_and_tenants_are_recorded():
    C = _model(tenant=lambda prompt, user="": user)
    c = C()
    for user in ("alice", "alice", "bob"):
        c.complete("one two three", user=user)
    got, snap = _series(C)
    s = got[("complete", "ok")]
    assert (s.genai.input_tokens.sum, s.genai.output_tokens.sum) == (9, 6)
    assert s.genai.items is None and s.first_item is None  # not a stream
    assert sorted((u.tenant, u.requests, u.input_tokens) for u in snap.usage) == [
        ("alice", 2, 6), ("bob", 1, 3)]
    C.__ray_monitor__.close()


def test_a_failing_extractor_never_reaches_the_request():
    def boom(result):
        raise RuntimeError("bad extractor")
    C = _model(tokens=boom, tenant=lambda *a, **k: 1 / 0)
    c = C()
    assert list(c.gen(2)) == ["t0", "t1"]
    assert c.complete("a b")["model"] == "toy"
    got, snap = _series(C)
    assert got[("gen", "ok")].genai.items.sum == 2  # timed all the same
    causes = C.__ray_monitor__.state.recorder.self_errors.snapshot()
    assert causes.get("tokens_extractor:RuntimeError") == 2
    assert causes.get("tenant_extractor:ZeroDivisionError") == 2
    C.__ray_monitor__.close()


@pytest.mark.parametrize("options, field", [({"tokens": 3}, "tokens"), ({"tenant": "x"}, "tenant"),
                                            ({"tenant_header": "x tenant"}, "tenant_header"),
                                            ({"tenant_header": 5}, "tenant_header")])
def test_bad_options_are_refused_by_name(options, field):
    with pytest.raises(ConfigError, match=f"{field}="):
        monitor(**options)


def test_usage_table_is_bounded_and_exact():
    t = UsageTable(max_entries=3)
    for i in range(10):
        t.record("m", f"t{i}", i == 9, 0.1, 1, 2)
    rows = {u.tenant: u for u in t.drain()}
    assert set(rows) == {"t0", "t1", "t2", "other"}
    assert sum(u.requests for u in rows.values()) == 10 and rows["other"].requests == 7
    assert sum(u.output_tokens for u in rows.values()) == 20 and rows["other"].errors == 1
    assert t.drain() == []


# ------------------------------------------------------------------ aggregator side

def test_space_saving_keeps_heavy_items_and_exact_total():
    s = SpaceSaving(4)
    stream = ["a"] * 50 + ["b"] * 30 + [f"x{i}" for i in range(40)] + ["a"] * 10
    for item in stream:
        s.add(item)
    assert sum(s.counts.values()) == len(stream)
    assert s.lower("a") <= 60 <= s.upper("a") and "a" in s.counts


def test_top_k_tenants_then_other_with_exact_totals():
    book = TenantBook(top_k=2)
    seen = [book.label("app", "d", t, 1.0) for t in ("a", "b", "c", "a", "d", "b")]
    assert seen == ["a", "b", OTHER, "a", OTHER, "b"]
    assert book.label("app", "d", "", 1.0) == ""  # no tenant named: not a tenant
    for _ in range(20):  # c becomes clearly heavier than both: it takes the weakest's place
        last = book.label("app", "d", "c", 1.0)
    assert last == "c" and {t for t, _ in book.top("app", "d")} >= {"c"}


def _ident():
    return ReplicaIdentity("app", "d", "r1", "n1", 1, "v1")


def test_store_counts_tokens_tenants_and_cost(tmp_path):
    clock = Clock(10_000.0)
    store = WindowStore(clock=clock)
    rf = load_rule_file({"groups": [], "prices": {"toy": {"prompt_per_1k": 0.5,
                                                          "completion_per_1k": 2.0}}})
    store.tenants.prices = rf.prices
    store.tenants.top_k = 1
    g = GenAIDelta(time_per_token=hist(0.02, 0.04), items=hist(10, 20),
                   input_tokens=hist(100, 300), output_tokens=hist(10, 20))
    usage = [UsageDelta("toy", "a", 1, 0, 100, 10, hist(1.0)),
             UsageDelta("toy", "b", 1, 1, 300, 20, hist(2.0))]
    clock.t = 10_001.0
    store.ingest(ReplicaSnapshot(_ident(), 1, 10_000.0, 10_001.0,
                                 [SeriesDelta("chat", "ok", False, hist(1.0, 2.0), hist(0.1, 0.2),
                                              genai=g)], {"chat": 0}, usage=usage))
    clock.t = 10_003.5

    def ev(fn, metric, by=("tenant",)):
        return store.evaluate(Query(fn, metric, 60.0, by=by), clock.t)
    assert ev("sum", "output_tokens", None) == {(): 30.0}
    assert ev("sum", "input_tokens", None) == {(): 400.0}
    assert ev("count", "time_per_output_token_seconds", None) == {(): 2.0}
    assert ev("sum", "tenant_requests") == {(("tenant", "a"),): 1.0, (("tenant", OTHER),): 1.0}
    assert ev("sum", "tenant_errors") == {(("tenant", OTHER),): 1.0}  # a had none
    cost = ev("sum", "cost", None)[()]
    assert cost == pytest.approx((400 * 0.5 + 30 * 2.0) / 1000)
    names = {s.metric for s in store.cumulative()}
    assert {"cost", "tenant_requests", "stream_items", "output_tokens"} <= names


def test_rules_take_genai_names():
    conds, problems = check_expr("p95(time_to_first_token_seconds[5m]) > 0.5")
    assert not problems and conds[0].query.metric == "first_item_seconds"
    for text in ("p99(time_per_output_token_seconds[1m]) > 0.1", "rate(output_tokens[1m]) < 5",
                 "sum(cost[1h]) by (application, deployment, tenant) > 10",
                 "sum(tenant_requests{tenant=\"other\"}[5m]) > 100"):
        assert not check_expr(text)[1], text


def test_prices_section_is_checked_field_by_field():
    with pytest.raises(ConfigError) as e:
        load_rule_file({"groups": [], "prices": {"toy": {"prompt_per_1k": -1, "per_gpu": 1},
                                                 "m2": 3}})
    fields = {p.field for p in e.value.problems}
    assert fields == {"prices.toy.prompt_per_1k", "prices.toy.per_gpu", "prices.m2"}
    rf = load_rule_file({"groups": [], "prices": {"*": {"completion_per_1k": 1}}})
    assert rf.prices["*"].cost(1000, 1000) == 1.0


def test_otlp_has_the_genai_semantic_convention_metrics():
    from ray_monitor.replica.otlp_genai import PROVIDER, GenAIMetrics
    from ray_monitor.replica.otlp_metrics import _exp_point

    g = GenAIMetrics()
    g.add(ReplicaSnapshot(_ident(), 1, 0.0, 1.0, [
        SeriesDelta("POST /v1/chat/completions", "200", False, hist(1.0), hist(0.1),
                    genai=GenAIDelta(time_per_token=hist(0.02), input_tokens=hist(7),
                                     output_tokens=hist(5))),
        SeriesDelta("plain", "ok", False, hist(1.0))], {},
        usage=[UsageDelta("toy", "", 1, 0, 7, 5, hist(1.0))]))
    ms = {m.name: m for m in g.metrics(0, 1, lambda method, outcome: {"method": method},
                                       _exp_point)}
    assert set(ms) == {"gen_ai.server.time_to_first_token", "gen_ai.server.time_per_output_token",
                       "gen_ai.client.token.usage"}
    ttft = ms["gen_ai.server.time_to_first_token"].data.data_points
    assert len(ttft) == 1 and ttft[0].count == 1 and ms["gen_ai.client.token.usage"].unit == "{token}"
    attrs = ttft[0].attributes
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.provider.name"] == PROVIDER
    assert attrs["gen_ai.request.model"] == "toy"
    usage = {p.attributes["gen_ai.token.type"]: p.sum
             for p in ms["gen_ai.client.token.usage"].data.data_points}
    assert usage == {"input": 7, "output": 5}


def test_queue_time_from_the_callers_send_time_is_recorded_with_its_ttft_split(monkeypatch):
    """A request whose caller carried its send time (queueing.SENT in Serve's context) gets
    queue_seconds, and a stream also first_item_with_queue = queue + its first item; the
    span says both. A request without it records no queue."""
    import time

    from ray.serve.context import _RequestContext, _serve_request_context

    from ray_monitor.replica.queueing import SENT

    for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    C = _model(sample_ratio=1.0, slow_threshold_s=0.001)
    c = C()
    waited = 1.5

    def in_request(call):
        ctx = _RequestContext(request_id="r", _ray_trace_ctx={
            SENT: str(int((time.time() - waited) * 1e6))})
        token = _serve_request_context.set(ctx)
        try:
            return call()
        finally:
            _serve_request_context.reset(token)

    def slow_gen():
        for x in c.gen(2):
            time.sleep(0.002)  # slow enough to be kept, so its span reaches the snapshot
            yield x
    assert in_request(lambda: list(slow_gen())) == ["t0", "t1"]
    in_request(lambda: c.complete("a b"))
    assert list(c.gen(1)) == ["t0"]  # no context: no queue
    got, snap = _series(C)
    g = got[("gen", "ok")]
    assert g.latency.count == 2 and g.genai.queue.count == 1
    q = g.genai.queue.sum
    assert waited <= q < waited + 30  # the wait the caller's time says, and no more
    assert g.genai.first_with_queue.count == 1
    done = got[("complete", "ok")].genai
    assert done.queue.count == 1 and done.first_with_queue is None  # not a stream
    # the span (its aggregator record keeps the queue time too)
    span = next(r for r in snap.traces if r["name"].endswith(".gen"))
    assert span["attributes"]["ray_monitor.queue_seconds"] == pytest.approx(q)
    split = g.genai.first_with_queue.sum  # queue + time to first item, in the replica
    assert q <= split <= q + g.latency.sum
    assert C.__ray_monitor__.state.recorder.queued == {}  # nothing left behind
    C.__ray_monitor__.close()
