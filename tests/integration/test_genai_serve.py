"""Generative serving on a real Ray Serve (issue 14): streams over a handle and over HTTP
(Server-Sent Events, OpenAI's chat-completion chunks), token usage, tenants, cost, a rule
on time to first token, and scale-out on a TTFT target.

What the monitor measured is compared with what the client measured for the same
requests, as relations that hold on any machine: the replica's time to first token is
never longer than the client's (it starts later and sees the token first), so every
quantile of it is at most the client's, within the histogram's 0.54%; each token is
preceded by a sleep, so time per output token is at least that sleep. Token counts and
cost are exact.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import pytest
import requests
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from ray_monitor import monitor
from ray_monitor.common.histogram import RELATIVE_ERROR
from ray_monitor.replica.prices import parse as parse_prices, read_gcs
from tests.conftest import wait_until
from tests.helpers import genai_queried

pytestmark = pytest.mark.ray

WORDS = "the quick brown fox jumps over the lazy dog".split()
TOKEN_SLEEP_S = 0.01
PRICES = {"toy": (0.5, 2.0)}  # per 1k prompt, completion tokens


def _tenant(body, *args, **kwargs):
    if isinstance(body, dict):
        return body.get("user", "")
    return body.headers.get("x-tenant", "")  # a Starlette request


class _Toy:
    """An OpenAI-shaped toy chat model: one word per chunk, usage in the last chunk."""

    def __init__(self):
        self.first_delay = 0.0

    def set_delay(self, delay: float) -> float:
        self.first_delay = delay
        return delay

    def span_cost(self, model: str, prompt: int, completion: int):
        """What this replica would put on a request's span as its cost."""
        return type(self).__ray_monitor__.state.prices.cost(model, prompt, completion)

    async def _chunks(self, body: dict):
        prompt = sum(len(m["content"].split()) for m in body["messages"])
        n = int(body.get("max_tokens", 8))
        await asyncio.sleep(self.first_delay)
        for i in range(n):
            await asyncio.sleep(TOKEN_SLEEP_S)
            word = WORDS[i % len(WORDS)]
            yield {"object": "chat.completion.chunk", "model": "toy",
                   "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word}}]}
        if body.get("stream_options", {}).get("include_usage"):
            yield {"object": "chat.completion.chunk", "model": "toy", "choices": [],
                   "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                             "total_tokens": prompt + n}}

    async def chat(self, body: dict):
        async for c in self._chunks(body):
            yield c

    async def complete(self, body: dict) -> dict:
        prompt = sum(len(m["content"].split()) for m in body["messages"])
        n = int(body.get("max_tokens", 8))
        return {"object": "chat.completion", "model": "toy",
                "choices": [{"index": 0, "message": {"content": " ".join(WORDS[:n])}}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                          "total_tokens": prompt + n}}

    async def __call__(self, request: Request):
        body = await request.json()
        if not body.get("stream"):
            return JSONResponse(await self.complete(body))

        async def sse():
            async for c in self._chunks(body):
                yield f"data: {json.dumps(c)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream")


ToyChat = serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)(
    monitor(tenant=_tenant, exclude=["set_delay", "span_cost"])(type("ToyChat", (_Toy,), {})))

POLICY = AutoscalingPolicy(policy_function="ray_monitor.autoscaling:MonitorPolicy",
                           policy_kwargs={"stale_after_s": 3, "refresh_interval_s": 0.5})
ScalableChat = serve.deployment(
    ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100,
    autoscaling_config=AutoscalingConfig(
        min_replicas=1, max_replicas=2, initial_replicas=1, upscale_delay_s=0.5,
        downscale_delay_s=60, look_back_period_s=2, metrics_interval_s=0.5,
        target_ongoing_requests=1000, policy=POLICY))(
    monitor(tenant=_tenant, exclude=["set_delay", "span_cost"])(
        type("ScalableChat", (_Toy,), {})))


def _body(user: str, n: int = 12, stream: bool = True) -> dict:
    return {"model": "toy", "user": user, "max_tokens": n, "stream": stream,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"tell {user} a story please"}]}


def _app() -> str:
    return f"g{uuid.uuid4().hex[:8]}"


def _q(mon, fn, metric, app, by=("application",), param=None) -> dict:
    out = {}
    for key, v in mon.query(fn, metric, 600.0, by=by, param=param).items():
        labels = json.loads(key)
        if labels.pop("application", app) == app:
            out[tuple(sorted(labels.items()))] = v
    return out


def _client_stream_handle(h, body) -> tuple[float, float, dict]:
    """(ttft, tpot, usage) of one stream as the caller sees it."""
    t0 = time.perf_counter()
    times, usage = [], None
    for c in h.options(stream=True).chat.remote(body):
        if c["choices"]:
            times.append(time.perf_counter())
        usage = c.get("usage") or usage
    return times[0] - t0, (times[-1] - times[0]) / (len(times) - 1), usage


def _client_stream_http(url, body, tenant) -> tuple[float, float, dict]:
    t0 = time.perf_counter()
    times, usage, buf = [], None, ""
    with requests.post(url, json=body, headers={"x-tenant": tenant}, stream=True,
                       timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for piece in r.iter_content(chunk_size=None, decode_unicode=True):
            now = time.perf_counter()
            buf += piece
            while "\n\n" in buf:
                event, buf = buf.split("\n\n", 1)
                data = event.removeprefix("data: ")
                if data == "[DONE]":
                    continue
                c = json.loads(data)
                if c["choices"]:
                    times.append(now)
                usage = c.get("usage") or usage
    return times[0] - t0, (times[-1] - times[0]) / (len(times) - 1), usage


def _quantile(xs, q):
    xs = sorted(xs)
    return xs[max(0, -(-int(q * len(xs) * 1000) // 1000) - 1)]


def test_streams_over_handle_and_sse_agree_with_the_client(mon, serve_apps, serve_http):
    app = _app()
    serve_apps.append(app)
    h = serve.run(ToyChat.bind(), name=app, route_prefix=f"/{app}")
    mon.reload({"groups": [], "prices": {m: {"prompt_per_1k": p, "completion_per_1k": c}
                                         for m, (p, c) in PRICES.items()}})
    h.set_delay.remote(0.05).result()
    client = {"chat": [], "__call__": []}
    usages = []
    for i in range(6):
        for method in ("chat", "__call__"):
            user = ("alice", "bob")[i % 2]
            body = _body(user, n=8 + i)
            got = _client_stream_handle(h, body) if method == "chat" else \
                _client_stream_http(f"{serve_http}/{app}", body, user)
            client[method].append(got)
            usages.append((user, got[2]))
            assert got[2]["completion_tokens"] == 8 + i
    tokens_out = sum(u["completion_tokens"] for _, u in usages)
    tokens_in = sum(u["prompt_tokens"] for _, u in usages)
    wait_until(lambda: _q(mon, "sum", "output_tokens", app).get(()) == tokens_out, timeout=60,
               what=f"{tokens_out} output tokens counted")
    assert _q(mon, "sum", "input_tokens", app) == {(): tokens_in}
    by_method = ("application", "method")
    counts = _q(mon, "count", "time_to_first_token_seconds", app, by_method)
    assert counts == {(("method", "chat"),): 6, (("method", "__call__"),): 6}, counts
    for method, got in client.items():
        key = (("method", method),)
        for q in (0.5, 0.9):
            mon_ttft = _q(mon, "quantile", "first_item_seconds", app, by_method, q)[key]
            cli_ttft = _quantile([g[0] for g in got], q)
            print(f"{method} p{q * 100:g}: TTFT monitor {mon_ttft * 1000:.1f} ms, client "
                  f"{cli_ttft * 1000:.1f} ms")
            assert 0.05 * (1 - RELATIVE_ERROR) <= mon_ttft <= cli_ttft * (1 + RELATIVE_ERROR)
        mon_tpot = _q(mon, "p50", "time_per_output_token_seconds", app, by_method)[key]
        cli_tpot = _quantile([g[1] for g in got], 0.5)
        print(f"{method}: TPOT monitor {mon_tpot * 1000:.2f} ms, client {cli_tpot * 1000:.2f} ms")
        assert mon_tpot >= TOKEN_SLEEP_S * (1 - RELATIVE_ERROR)
        # the same tokens timed at both ends: apart by the network's jitter on the first and
        # last token only, spread over the tokens between them (at least 7)
        assert abs(mon_tpot - cli_tpot) <= cli_tpot * RELATIVE_ERROR + 0.5 / 7
        assert _q(mon, "sum", "stream_items", app, by_method)[key] > 0
    tenants = _q(mon, "sum", "tenant_output_tokens", app, ("application", "tenant"))
    assert tenants == {(("tenant", u),): float(sum(x["completion_tokens"] for t, x in usages
                                                   if t == u)) for u in ("alice", "bob")}
    p, c = PRICES["toy"]
    cost = _q(mon, "sum", "cost", app)[()]
    assert cost == pytest.approx((tokens_in * p + tokens_out * c) / 1000, rel=1e-9)
    # each request's own cost, from the usage it carried
    each = [(u["prompt_tokens"] * p + u["completion_tokens"] * c) / 1000 for _, u in usages]
    assert _q(mon, "count", "request_cost", app) == {(): float(len(each))}
    assert _q(mon, "sum", "request_cost", app)[()] == pytest.approx(sum(each), rel=1e-9)
    for q in (0.5, 0.9):
        assert _q(mon, "quantile", "request_cost", app, param=q)[()] == pytest.approx(
            _quantile(each, q), rel=RELATIVE_ERROR)
    # the prices reached the replica too (through the GCS), for its spans' cost attribute
    assert parse_prices(read_gcs()) == {"toy": PRICES["toy"]}
    assert wait_until(lambda: h.span_cost.remote("toy", 1000, 1000).result(), timeout=30,
                      what="the replica's prices") == pytest.approx(p + c)
    metrics = requests.get(mon.metrics_url, timeout=10).text
    for name in ("ray_monitor_time_per_output_token_seconds_bucket",
                 "ray_monitor_output_tokens_total", "ray_monitor_cost_total",
                 "ray_monitor_tenant_requests_total", "ray_monitor_stream_inter_item_seconds",
                 "ray_monitor_request_cost_bucket",
                 *genai_queried()):  # and every series the dashboard's generative row queries
        assert name in metrics, name
    mon.reload("groups: []")


def test_tenants_beyond_k_are_other_with_exact_totals(mon, serve_apps):
    app = _app()
    serve_apps.append(app)
    h = serve.run(ToyChat.bind(), name=app, route_prefix=f"/{app}")
    top_k = 10  # the session's monitor runs with the default top_tenants
    users = [f"t{i:02d}" for i in range(top_k + 3)]
    sent: dict[str, int] = {}
    for user in users:  # the first K take the labels; equal weights never swap them
        for _ in range(2):
            r = h.complete.remote(_body(user, n=3, stream=False)).result()
            sent[user] = sent.get(user, 0) + r["usage"]["completion_tokens"]
    total = 2 * len(users)
    wait_until(lambda: sum(_q(mon, "sum", "tenant_requests", app,
                              ("application", "tenant")).values()) == total,
               timeout=60, what=f"{total} tenant requests")
    reqs = _q(mon, "sum", "tenant_requests", app, ("application", "tenant"))
    want = {(("tenant", u),): 2.0 for u in users[:top_k]}
    want[(("tenant", "other"),)] = 2.0 * (len(users) - top_k)
    assert reqs == want
    out = _q(mon, "sum", "tenant_output_tokens", app, ("application", "tenant"))
    assert out[(("tenant", "other"),)] == sum(sent[u] for u in users[top_k:])
    assert sum(out.values()) == sum(sent.values())
    assert _q(mon, "sum", "requests", app) == {(): float(total)}


class _StreamTraffic:
    """Streams from a thread until stopped."""

    def __init__(self, h) -> None:
        self.h, self.sent = h, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for _ in self.h.options(stream=True).chat.remote(_body("load", n=4)):
                    pass
            except Exception:
                pass
            self.sent += 1
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)


def _alert(mon, name, app):
    return next((a for a in mon.alerts() if a["name"] == name
                 and a["labels"].get("application") == app), None)


def test_ttft_rule_fires_and_ttft_target_scales_out(mon, serve_apps):
    app = _app()
    serve_apps.append(app)
    h = serve.run(ScalableChat.bind(), name=app, route_prefix=f"/{app}")
    mon.reload(f"""
groups:
  - name: genai
    interval: 1s
    rules:
      - alert: SlowFirstToken
        expr: p95(time_to_first_token_seconds{{application="{app}"}}[5s]) by (application, deployment) > 0.8
        for: 2s
autoscaling:
  deployments:
    - application: {app}
      deployment: ScalableChat
      min_replicas: 1
      max_replicas: 2
      cooldown: 5s
      targets:
        - metric: p95(time_to_first_token_seconds[5s])
          value: 0.8
""")
    try:
        with _StreamTraffic(h) as traffic:
            wait_until(lambda: traffic.sent >= 20, timeout=60, what="fast traffic")
            # fast: not firing (a loaded machine may add a few hundred ms, hence 0.8 s)
            assert (_alert(mon, "SlowFirstToken", app) or {}).get("state") != "firing"
            for _ in range(4):
                h.set_delay.remote(1.2).result()
            firing = wait_until(lambda: (a := _alert(mon, "SlowFirstToken", app))
                                and a["state"] == "firing" and a, timeout=60,
                                what="the TTFT alert firing")
            assert float(firing["value"]) > 0.8
            hint = wait_until(lambda: next((x for x in mon.hints() if x["application"] == app
                                            and (x["desired"] or 0) > 1), None), timeout=60,
                              what="a hint above one replica")
            assert hint["reason"] in ("target", "max_replicas")
            wait_until(lambda: serve.status().applications[app].deployments["ScalableChat"]
                       .replica_states.get("RUNNING", 0) >= 2, timeout=90,
                       what="a second replica")
    finally:
        mon.reload("groups: []")


def test_a_tokens_per_second_per_replica_target_scales_out(mon, serve_apps):
    app = _app()
    serve_apps.append(app)
    h = serve.run(ScalableChat.bind(), name=app, route_prefix=f"/{app}")
    mon.reload(f"""
groups: []
autoscaling:
  deployments:
    - application: {app}
      deployment: ScalableChat
      max_replicas: 2
      targets:
        - metric: rate(output_tokens[5s])
          value: 4
          per_replica: true
""")
    try:
        def target_reason():
            hint = next((x for x in mon.hints() if x["application"] == app), None)
            return hint, next((r for r in (hint or {}).get("reasons", ())
                               if r["source"] == "target" and r["value"] is not None), None)

        with _StreamTraffic(h) as traffic:
            # 4 tokens a stream, a stream every ~0.1 s: well above 4 tokens/s on one replica
            hint, reason = wait_until(lambda: (got := target_reason())[1]
                                      and got[1]["value"] > 4 and got, timeout=60,
                                      what="a per-replica token rate above the target")
            assert reason["per_replica"] is True and hint["current"] == 1
            # one replica: the per-replica value is the deployment's rate, and its total
            # recommends ceil(rate / 4) replicas (Serve's per-replica rule)
            assert reason["desired"] >= 2 and hint["desired"] == 2  # max_replicas
            assert traffic.sent > 0
            wait_until(lambda: serve.status().applications[app].deployments["ScalableChat"]
                       .replica_states.get("RUNNING", 0) >= 2, timeout=90,
                       what="a second replica")
    finally:
        mon.reload("groups: []")
