"""/metrics at 1,000 replicas: how long a scrape holds the aggregator's event loop.

    nice .venv/bin/python benchmarks/bench_metrics_render.py [--replicas 1000] [--runs 7] \
        [--json OUT]

A real AggregatorCore takes one delivery from each of ``--replicas`` simulated replicas
(real Recorders: 50 deployments over 10 applications, two methods, ok and error
outcomes, health), then serves /metrics through the real aiohttp app
(``make_app``) on loopback. While each scrape runs, a task on the same loop sleeps 1 ms
at a time and records the longest gap between its wake-ups: the time ingest, rule rounds
and the other routes would have waited. Two ways, interleaved in each run:

- ``on-loop``: the handler as it was, collect and render on the event loop;
- ``off-loop``: collect on the loop (one consistent snapshot of the state), the text
  rendered by a worker thread (``run_in_executor``), which only shares the GIL.

Printed per way: the scrape's wall time, the longest loop stall, and the collect and
render times measured alone (median, min..max of ``--runs``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from ray_monitor.aggregator.core import AggregatorCore  # noqa: E402
from ray_monitor.aggregator.exposition import render  # noqa: E402
from ray_monitor.aggregator.http_api import make_app, monitor_registry  # noqa: E402
from ray_monitor.common.snapshot import ReplicaHealth, ReplicaIdentity  # noqa: E402
from ray_monitor.replica.recorder import Recorder  # noqa: E402


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Agg:
    """What make_app reads of the actor, around a real core."""

    def __init__(self, core: AggregatorCore) -> None:
        self.core, self.host, self.token = core, "127.0.0.1", None


def fill(core: AggregatorCore, replicas: int, clock: Clock) -> None:
    for i in range(replicas):
        dep = i % 50
        ident = ReplicaIdentity(f"app{dep % 10}", f"Dep{dep}", f"Dep{dep}#r{i}",
                                f"node{i % 40}", 10_000 + i, "v1")
        rec = Recorder(identity=ident, clock=clock)
        rec.health = lambda: ReplicaHealth(cpu_percent=10.0, rss_bytes=2 ** 28,
                                           loop_lag_s=0.001, longest_request_s=0.0)
        for method in ("__call__", "predict"):
            cells = rec.method(method)
            for k in range(20):
                cells.end(cells.begin(0.0), "error" if k == 0 else "ok", k == 0,
                          0.005 * (1 + k % 7))
        core.ingest([rec.snapshot()])


async def scrape(client: TestClient, path: str) -> tuple[float, float, int]:
    """(wall s, longest loop stall s, bytes) of one GET ``path``."""
    stall = 0.0
    done = False

    async def ticker() -> None:
        nonlocal stall
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall = max(stall, now - last)
            last = now
    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    resp = await client.get(path)
    body = await resp.read()
    wall = time.perf_counter() - t0
    done = True
    await tick
    assert resp.status == 200, resp.status
    return wall, stall, len(body)


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:7.1f} ms ({min(xs) * 1000:.1f}..{max(xs) * 1000:.1f})"


async def main_async(args) -> None:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"command: {shlex.join([sys.executable, *sys.argv])}\npython "
          f"{platform.python_version()} | {platform.processor() or platform.machine()} | "
          f"load average {load}")
    clock = Clock(1000.0)
    core = AggregatorCore({}, clock=clock)
    fill(core, args.replicas, clock)
    clock.t += 1.0
    app = make_app(Agg(core))
    reg = monitor_registry(core)

    async def on_loop(request):  # the handler before this change
        body, ctype = render(reg, request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": ctype})
    app.router.add_get("/metrics-on-loop", on_loop)
    res: dict[str, dict[str, list]] = {w: {"wall": [], "stall": []} for w in ("on-loop", "off-loop")}
    alone = {"collect": [], "render": []}
    size = 0
    async with TestClient(TestServer(app)) as client:
        await scrape(client, "/metrics")  # warm
        for _ in range(args.runs):
            for way, path in (("on-loop", "/metrics-on-loop"), ("off-loop", "/metrics")):
                wall, stall, size = await scrape(client, path)
                res[way]["wall"].append(wall)
                res[way]["stall"].append(stall)
            t0 = time.perf_counter()
            fams = list(reg.collect())
            t1 = time.perf_counter()
            render(type("F", (), {"collect": lambda _self: iter(fams)})())
            alone["collect"].append(t1 - t0)
            alone["render"].append(time.perf_counter() - t1)
    series = sum(len(f.samples) for f in fams)
    print(f"{args.replicas} replicas, {series} samples, /metrics {size / 2 ** 20:.2f} MiB; "
          f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"collect alone {summary(alone['collect'])}, render alone {summary(alone['render'])}")
    for way, r in res.items():
        print(f"{way:9s} scrape {summary(r['wall'])}, longest loop stall {summary(r['stall'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"replicas": args.replicas, "samples": series, "bytes": size,
                       "alone": alone, "ways": res}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", help="also write the figures here")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
