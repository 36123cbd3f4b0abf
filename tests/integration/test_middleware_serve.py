"""@monitor on a real Ray Serve: every deployment shape, through handles and HTTP.

Counts are read back from the aggregator (what a user's rules and /metrics see), and
traces from the OTLP receiver over the wire.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import requests
from fastapi import FastAPI, HTTPException
from ray import serve

from ray_monitor import monitor
from tests.conftest import wait_until

pytestmark = pytest.mark.ray


def _app() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def counts(mon, app: str) -> dict:
    """(deployment, method, outcome) -> requests counted by the aggregator."""
    import json

    res = mon.query("count", "requests", 600.0,
                    by=("application", "deployment", "method", "outcome"))
    out = {}
    for key, v in res.items():
        labels = json.loads(key)
        if labels["application"] == app and v:  # not the zero series a known method has
            out[(labels["deployment"], labels["method"], labels["outcome"])] = int(v)
    return out


def wait_counts(mon, app: str, expected: dict, timeout: float = 60.0) -> dict:
    seen: list = [None]

    def check():
        seen[0] = counts(mon, app)
        return seen[0] == expected and seen[0]
    try:
        return wait_until(check, timeout=timeout, what=f"counts {expected}")
    except AssertionError:
        raise AssertionError(f"expected counts {expected}, the aggregator has {seen[0]}") from None


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor(model_version="v1")
class AllKinds:
    def sync(self, x):
        if x < 0:
            raise ValueError("negative")
        return x * 2

    async def coro(self, x):
        await asyncio.sleep(0)
        return x + 1

    def gen(self, n):
        for i in range(n):
            yield i

    async def agen(self, n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def batched(self, xs: list):
        return [x * 10 for x in xs]

    def check_health(self):
        return None


def test_every_method_kind_through_handles_counts_exactly(mon, serve_apps):
    app = _app()
    serve_apps.append(app)
    h = serve.run(AllKinds.bind(), name=app, route_prefix=f"/{app}")
    assert [h.sync.remote(i).result() for i in range(5)] == [0, 2, 4, 6, 8]
    with pytest.raises(Exception, match="negative"):
        h.sync.remote(-1).result()
    assert h.coro.remote(1).result() == 2
    assert list(h.options(stream=True).gen.remote(3)) == [0, 1, 2]
    assert list(h.options(stream=True).agen.remote(4)) == [0, 1, 2, 3]

    async def many():
        return await asyncio.gather(*[h.batched.remote(i) for i in range(6)])
    assert asyncio.run(many()) == [0, 10, 20, 30, 40, 50]

    expected = {("AllKinds", "sync", "ok"): 5, ("AllKinds", "sync", "ValueError"): 1,
                ("AllKinds", "coro", "ok"): 1, ("AllKinds", "gen", "ok"): 1,
                ("AllKinds", "agen", "ok"): 1, ("AllKinds", "batched", "ok"): 6}
    wait_counts(mon, app, expected)
    # Streams record the time to the first item too.
    import json
    first = mon.query("count", "first_item_seconds", 600.0, by=("application", "method"))
    got = {json.loads(k)["method"]: v for k, v in first.items()
           if json.loads(k)["application"] == app}
    assert got == {"gen": 1, "agen": 1}
    dep = next(d for d in mon.deployments() if d["application"] == app)
    assert dep["replicas"] == 1 and dep["model_versions"] == ["v1"]


@monitor
@serve.deployment(ray_actor_options={"num_cpus": 0})
def echo_fn(request):
    return {"path": request.url.path}


def test_function_deployment_over_http_and_decorator_above_deployment(mon, serve_apps,
                                                                    serve_http):
    app = _app()
    serve_apps.append(app)
    serve.run(echo_fn.bind(), name=app, route_prefix=f"/{app}")
    for _ in range(7):
        r = requests.get(f"{serve_http}/{app}/x", timeout=30)
        assert r.status_code == 200 and r.json() == {"path": f"/{app}/x"}
    wait_counts(mon, app, {("echo_fn", "__call__", "ok"): 7})


class Plain:
    def __call__(self, x):
        return x


def test_monitor_applied_to_an_existing_deployment(mon, serve_apps):
    app = _app()
    serve_apps.append(app)
    dep = monitor(serve.deployment(Plain, name="Existing", ray_actor_options={"num_cpus": 0}),
                  model_version="v9")
    h = serve.run(dep.bind(), name=app, route_prefix=f"/{app}")
    assert [h.remote(i).result() for i in range(3)] == [0, 1, 2]
    wait_counts(mon, app, {("Existing", "__call__", "ok"): 3})


fastapi_app = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor
@serve.ingress(fastapi_app)
class Api:
    @fastapi_app.get("/items/{item_id}")
    def item(self, item_id: int):
        if item_id == 13:
            raise HTTPException(status_code=503, detail="unlucky")
        if item_id == 0:
            raise RuntimeError("boom")
        return {"id": item_id}

    @fastapi_app.post("/items")
    async def create(self, body: dict):
        return body


def test_fastapi_ingress_records_per_route_with_status(mon, serve_apps, serve_http):
    app = _app()
    serve_apps.append(app)
    serve.run(Api.bind(), name=app, route_prefix=f"/{app}")
    base = f"{serve_http}/{app}"
    for i in (1, 2, 3):
        assert requests.get(f"{base}/items/{i}", timeout=30).json() == {"id": i}
    assert requests.get(f"{base}/items/13", timeout=30).status_code == 503
    assert requests.get(f"{base}/items/0", timeout=30).status_code == 500
    assert requests.get(f"{base}/nowhere", timeout=30).status_code == 404
    assert requests.post(f"{base}/items", json={"a": 1}, timeout=30).json() == {"a": 1}
    wait_counts(mon, app, {
        ("Api", "GET /items/{item_id}", "200"): 3, ("Api", "GET /items/{item_id}", "503"): 1,
        ("Api", "GET /items/{item_id}", "500"): 1, ("Api", "GET unmatched", "404"): 1,
        ("Api", "POST /items", "200"): 1})
    import json
    errs = mon.query("count", "errors", 600.0, by=("application", "outcome"))
    got = {json.loads(k)["outcome"]: v for k, v in errs.items()
           if json.loads(k)["application"] == app and v}
    assert got == {"503": 1, "500": 1}


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor
class Leaf:
    async def __call__(self, x: int) -> int:
        if x < 0:
            raise KeyError("leaf failed")
        return x * 3


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor
class Root:
    def __init__(self, leaf):
        self.leaf = leaf

    async def __call__(self, request):
        x = int(request.query_params.get("x", "1"))
        return {"y": await self.leaf.remote(x)}


def test_composition_is_one_trace_with_parent_links(mon, otlp, serve_apps, serve_http):
    app = _app()
    serve_apps.append(app)
    serve.run(Root.bind(Leaf.bind()), name=app, route_prefix=f"/{app}")
    trace_id = uuid.uuid4().hex
    parent_span = uuid.uuid4().hex[:16]
    r = requests.get(f"{serve_http}/{app}?x=2", timeout=30,
                     headers={"traceparent": f"00-{trace_id}-{parent_span}-01"})
    assert r.json() == {"y": 6}
    def ancestors(spans, span):
        by_id = {s.span_id: s for s in spans}
        out = []
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id]
            out.append(span)
        return out, span.parent_span_id

    def linked(rx):
        spans = rx.traces().get(trace_id, [])
        mine = {s.name: s for s in spans if s.name in ("Root.__call__", "Leaf.__call__")}
        if len(mine) < 2:
            return None
        up, top = ancestors(spans, mine["Leaf.__call__"])
        # Leaf's span descends from Root's span (through Serve's routing and replica
        # spans), and the whole chain from the caller's traceparent.
        if mine["Root.__call__"] in up and top == parent_span:
            return mine
        return None
    mine = otlp.wait_for(linked, what="Root and Leaf spans linked to the caller's span")
    root = mine["Root.__call__"]
    assert root.attributes["ray.serve.deployment"] == "Root"
    assert root.resource["service.name"] == app
    assert root.resource["ray.serve.replica.id"]


def test_error_arrives_as_an_error_span(mon, otlp, serve_apps, serve_http):
    app = _app()
    serve_apps.append(app)
    serve.run(Root.bind(Leaf.bind()), name=app, route_prefix=f"/{app}")
    trace_id = uuid.uuid4().hex
    r = requests.get(f"{serve_http}/{app}?x=-1", timeout=30,
                     headers={"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"})
    assert r.status_code == 500
    leaf = otlp.wait_for(lambda rx: [s for s in rx.traces().get(trace_id, [])
                                     if s.name == "Leaf.__call__"], what="the Leaf error span")[0]
    assert leaf.status_code == "ERROR" and "KeyError" in leaf.status_message
    assert any(name == "exception" and attrs.get("exception.type") == "KeyError"
               for name, attrs in leaf.events)
    wait_counts(mon, app, {("Leaf", "__call__", "KeyError"): 1,
                               ("Root", "__call__", "KeyError"): 1})


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor
class Streamer:
    """Ray Serve's HTTP streaming: a StreamingResponse over a generator."""

    def __call__(self, request):
        from starlette.responses import StreamingResponse

        n = int(request.query_params.get("n", "3"))
        return StreamingResponse(self.lines(n), media_type="text/plain")

    def lines(self, n):
        for i in range(n):
            yield f"{i}\n"


def test_http_streaming_generator_records_first_item_and_total(mon, serve_apps, serve_http):
    app = _app()
    serve_apps.append(app)
    serve.run(Streamer.bind(), name=app, route_prefix=f"/{app}")
    for _ in range(4):
        r = requests.get(f"{serve_http}/{app}?n=5", timeout=30, stream=True)
        assert list(r.iter_lines(decode_unicode=True)) == ["0", "1", "2", "3", "4"]
    wait_counts(mon, app, {("Streamer", "__call__", "200"): 4})
    import json
    first = mon.query("count", "first_item_seconds", 600.0, by=("application",))
    assert {json.loads(k)["application"]: v for k, v in first.items()}.get(app) == 4


def test_replica_metrics_arrive_over_otlp(mon, otlp, serve_apps):
    app = _app()
    serve_apps.append(app)
    h = serve.run(AllKinds.bind(), name=app, route_prefix=f"/{app}")
    for i in range(9):
        h.sync.remote(i).result()

    def points(rx):
        out = []
        for m in rx.metrics():
            if m.name != "ray_monitor.request.duration":
                continue
            for p in m.data_points:
                a = p["attributes"]
                if a.get("application") == app and a.get("method") == "sync":
                    out.append((m, p))
        return out[-1:] if out and out[-1][1]["count"] == 9 else None
    [(metric, point)] = otlp.wait_for(points, timeout=60,
                                      what="the replica's OTLP latency histogram with 9 requests")
    assert metric.kind == "exponential_histogram" and metric.unit == "s"
    assert point["scale"] == 6 and sum(point["positive_bucket_counts"]) + point["zero_count"] == 9
    assert point["attributes"]["model_version"] == "v1"
    assert metric.resource["service.name"] == app
