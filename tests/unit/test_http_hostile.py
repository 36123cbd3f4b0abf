"""Hostile and malformed HTTP requests, without Ray: each gets 400, 403, 413 or 415 naming
the field, never 500 and never a huge answer; writes a web page could forge are refused;
a 100,000-item feedback batch never holds the event loop long and gets a compact answer.

``CASES`` is shared with tests/integration/test_hostile_http.py, which sends the same
requests to the real aggregator while it evaluates rules."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
from aiohttp.test_utils import TestClient, TestServer

from ray_monitor.aggregator.core import AggregatorCore
from ray_monitor.aggregator.http_api import make_app

YAML = {"Content-Type": "application/yaml"}
JSON = {"Content-Type": "application/json"}


def alias_bomb(levels: int) -> str:
    """The issue's file: each anchor a list of nine aliases of the one before."""
    names = [chr(ord("a") + i) for i in range(levels + 1)]
    lines = [f'{names[0]}: &{names[0]} ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip(names, names[1:]):
        lines.append(f"{name}: &{name} [" + ",".join(f"*{prev}" for _ in range(9)) + "]")
    return "\n".join(lines) + f"\ngroups: *{names[-1]}\n"


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    status: int
    field: str
    headers: dict
    body: Optional[Callable[[], bytes]] = None


def _text(s: str) -> Callable[[], bytes]:
    return lambda: s.encode()


CASES = [
    # -- writes a web page could make a browser send (issue: rules wiped from evil.example)
    Case("cross-site reload", "POST", "/api/v1/rules/reload", 403, "Origin",
         {"Content-Type": "text/plain", "Origin": "http://evil.example"}, _text("groups: []")),
    Case("reload as text/plain", "POST", "/api/v1/rules/reload", 415, "Content-Type",
         {"Content-Type": "text/plain"}, _text("groups: []")),
    Case("reload as a form", "POST", "/api/v1/rules/reload", 415, "Content-Type",
         {"Content-Type": "application/x-www-form-urlencoded"}, _text("groups: []")),
    Case("reload without a type", "POST", "/api/v1/rules/reload", 415, "Content-Type",
         {}, _text("groups: []")),
    Case("feedback as text/plain", "POST", "/api/v1/feedback", 415, "Content-Type",
         {"Content-Type": "text/plain"}, _text('[{"request_id": "r", "label": "x"}]')),
    Case("cross-site feedback", "POST", "/api/v1/feedback", 403, "Origin",
         {**JSON, "Origin": "http://evil.example"}, _text('[]')),
    Case("DNS rebinding", "POST", "/api/v1/rules/reload", 403, "Host",
         {**YAML, "Host": "evil.example:8266"}, _text("groups: []")),
    # -- rule files
    Case("alias bomb (503 bytes, 9 levels)", "POST", "/api/v1/rules/reload", 400, "",
         YAML, lambda: alias_bomb(9).encode()),
    Case("alias bomb (7 levels)", "POST", "/api/v1/rules/reload", 400, "",
         YAML, lambda: alias_bomb(7).encode()),
    Case("rule file over 1 MiB", "POST", "/api/v1/rules/reload", 413, "body",
         YAML, lambda: b"# " + b"x" * (1024 * 1024) + b"\ngroups: []\n"),
    Case("YAML nested 100,000 deep", "POST", "/api/v1/rules/reload", 400, "",
         YAML, lambda: b"groups: " + b"[" * 100_000),
    # -- JSON bodies
    Case("feedback nested 100,000 deep", "POST", "/api/v1/feedback", 400, "body",
         JSON, lambda: b"[" * 100_000),
    Case("drift reference nested 100,000 deep", "POST", "/api/v1/drift/reference", 400, "body",
         JSON, lambda: b"[" * 100_000),
    Case("feedback with NaN", "POST", "/api/v1/feedback", 400, "body",
         JSON, _text('[{"request_id": "r", "value": NaN}]')),
    Case("feedback over 16 MiB", "POST", "/api/v1/feedback", 413, "body",
         JSON, lambda: b"[" + b"0," * (8 * 1024 * 1024 + 1) + b"0]"),
    Case("feedback not a list", "POST", "/api/v1/feedback", 400, "body", JSON, _text('"x"')),
    Case("drift reference of 300,000 values", "POST", "/api/v1/drift/reference", 400,
         "references.feature_x", JSON,
         lambda: json.dumps({"deployment": "D", "references": {
             "feature_x": list(range(300_000))}}).encode()),
    Case("drift reference without references", "POST", "/api/v1/drift/reference", 400,
         "references", JSON, _text('{"deployment": "D"}')),
    # -- query parameters
    *[Case(f"quantile param={p}", "GET",
           f"/api/v1/timeseries?function=quantile&metric=latency_seconds&param={p}", 400,
           "param", {}) for p in ("nan", "5", "-inf", "inf", "-0.5", "x")],
    *[Case(f"ratio_above param={p}", "GET",
           f"/api/v1/timeseries?function=ratio_above&metric=latency_seconds&param={p}", 400,
           "param", {}) for p in ("nan", "0", "-1")],
    Case("window=nan", "GET", "/api/v1/timeseries?window=nan", 400, "window", {}),
    Case("step=inf", "GET", "/api/v1/timeseries?step=inf", 400, "step", {}),
    Case("step too small", "GET", "/api/v1/timeseries?window=1h&step=0.0001", 400, "step", {}),
    Case("unknown metric", "GET", "/api/v1/timeseries?metric=nope", 400, "metric", {}),
    Case("by an unknown label", "GET", "/api/v1/timeseries?by=nope", 400, "by", {}),
    Case("traces limit=nan", "GET", "/api/v1/traces?limit=nan", 400, "limit", {}),
    Case("traces kind", "GET", "/api/v1/traces?kind=everything", 400, "kind", {}),
    Case("quality window=-1", "GET", "/api/v1/quality?window=-1", 400, "window", {}),
    Case("compare one version", "GET", "/api/v1/compare?deployment=D&versions=v1", 400,
         "versions", {}),
]


class Agg:
    """The actor's surface the HTTP app uses, around a real AggregatorCore."""

    def __init__(self, host: str = "127.0.0.1", token=None):
        self.host, self.token = host, token
        self.core = AggregatorCore({}, rules_text="groups: []")

    async def hints(self):
        return []

    async def reload(self, text, filename=None):
        return self.core.reload(text, filename)


def _send(client, case: Case):
    data = case.body() if case.body else None
    return client.request(case.method, case.path, data=data,
                          headers={"Content-Type": "", **case.headers} if case.body else
                          case.headers, skip_auto_headers=("Content-Type",))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_bad_request_is_refused_naming_the_field(case):
    agg = Agg()

    async def go():
        async with TestClient(TestServer(make_app(agg))) as client:
            headers = {k: v for k, v in case.headers.items()}
            resp = await client.request(case.method, case.path,
                                        data=case.body() if case.body else None,
                                        headers=headers, skip_auto_headers=("Content-Type",))
            return resp.status, await resp.read()

    status, raw = asyncio.run(go())
    body = json.loads(raw)
    assert status == case.status, body
    assert body["status"] == "error"
    if case.field:
        assert body.get("field") == case.field, body
    assert len(raw) < 16 * 1024, len(raw)  # a short answer, whatever came in
    assert agg.core.rules() == []  # nothing was changed


def test_a_refused_alias_bomb_costs_nothing():
    """The issue: 9.9 s and 1.9 GB to refuse 503 bytes, with a 595 MiB message."""
    import tracemalloc

    agg = Agg()
    tracemalloc.start()
    try:
        t0 = time.process_time()
        with pytest.raises(Exception) as err:
            agg.core.reload(alias_bomb(9))
        cpu = time.process_time() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "aliases expand to more than" in str(err.value) and len(str(err.value)) < 300
    assert peak < 5 * 1024 * 1024, peak
    print(f"alias bomb refused in {cpu * 1000:.1f} ms of CPU, {peak / 1024:.0f} KiB at peak")


def test_writes_from_curl_and_same_origin_pages_still_work():
    agg = Agg()

    async def go():
        async with TestClient(TestServer(make_app(agg))) as client:
            host = f"127.0.0.1:{client.port}"
            a = await client.post("/api/v1/rules/reload", data="groups: []", headers=YAML)
            b = await client.post("/api/v1/rules/reload", data='{"groups": []}', headers=JSON)
            c = await client.post("/api/v1/feedback", json=[{"request_id": "r", "label": "x"}],
                                  headers={"Origin": f"http://{host}"})
            d = await client.post("/api/v1/feedback", json={"request_id": "r2", "label": "x"},
                                  headers={"Content-Type": "application/json; charset=utf-8",
                                           "Host": f"localhost:{client.port}"})
            return [r.status for r in (a, b, c, d)]
    assert asyncio.run(go()) == [200, 200, 200, 200]


def test_a_large_feedback_batch_never_holds_the_loop_and_gets_a_compact_answer():
    """100,000 items (4.7 MB): the issue saw the loop blocked about 1 s and an answer 4.6
    times the request. Criterion: no stretch of more than ~50 ms of the loop's own CPU
    time without yielding, measured between the ticks of a task on the same loop (CPU
    time, so a busy machine's scheduling does not count). Python's own garbage collector
    runs wherever allocation happens to trigger it, so its pauses are measured apart
    (they depend on the whole heap, not on this request)."""
    import gc

    agg = Agg()
    payload = json.dumps([{"request_id": f"req-{i:06d}", "label": "spam"}
                          for i in range(100_000)]).encode()
    gc_cpu = [0.0, 0.0]  # total, longest

    def on_gc(phase, info):
        if phase == "start":
            on_gc.t = time.thread_time()
        elif hasattr(on_gc, "t"):
            took = time.thread_time() - on_gc.t
            gc_cpu[0] += took
            gc_cpu[1] = max(gc_cpu[1], took)

    async def go():
        longest = 0.0
        stop = asyncio.Event()

        async def ticker():
            nonlocal longest
            last, last_gc = time.thread_time(), gc_cpu[0]
            while not stop.is_set():
                await asyncio.sleep(0.001)
                now, now_gc = time.thread_time(), gc_cpu[0]
                longest = max(longest, (now - last) - (now_gc - last_gc))
                last, last_gc = now, now_gc

        async with TestClient(TestServer(make_app(agg))) as client:
            task = asyncio.get_running_loop().create_task(ticker())
            await asyncio.sleep(0.01)
            resp = await client.post("/api/v1/feedback", data=payload, headers=JSON)
            raw = await resp.read()
            stop.set()
            await task
            return resp.status, raw, longest

    gc.callbacks.append(on_gc)
    try:
        status, raw, longest = asyncio.run(go())
    finally:
        gc.callbacks.remove(on_gc)
    body = json.loads(raw)["data"]
    assert status == 200
    assert body["counts"] == {"held": 100_000}  # no predictions yet: held for their grace time
    assert len(body["problems"]) == 100 and body["problems_omitted"] == 99_900
    print(f"request {len(payload)} bytes, answer {len(raw)} bytes; longest loop slice "
          f"{longest * 1000:.1f} ms of CPU (criterion ~50 ms); garbage collection "
          f"{gc_cpu[0] * 1000:.0f} ms in all, longest pause {gc_cpu[1] * 1000:.0f} ms")
    assert len(raw) < len(payload) / 100
    assert longest < 0.05, longest
