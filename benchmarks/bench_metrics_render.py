"""/metrics at 1,000 replicas: how long a scrape holds the aggregator's event loop.

    nice .venv/bin/python benchmarks/bench_metrics_render.py [--replicas 1000] [--runs 7] \
        [--ways on-loop,17,now] [--json OUT]

A real AggregatorCore takes one delivery from each of ``--replicas`` simulated replicas
(real Recorders: 50 deployments over 10 applications, two methods, ok and error
outcomes, health), then serves /metrics through the real aiohttp app
(``make_app``) on loopback. While each scrape runs, a task on the same loop sleeps 1 ms
at a time and records the longest gap between its wake-ups: the time ingest, rule rounds
and the other routes would have waited. Ways, interleaved in each run:

- ``on-loop``: the handler before RESULTS §17, collect and render on the event loop;
- ``17``: the handler of §17: every source read on the loop (the store's series listed
  as objects, ``WindowStore.cumulative()``, and ``store.stats()`` for the series count),
  families and text made on worker threads;
- ``now``: the handler as it is (§24): on the loop the store's arrays are only copied
  (``WindowStore.cumulative_reader``), the series built on the worker thread, and the
  garbage collector paused while the threads work (``http_api.gc_paused``).

As the aggregator actor does once started, the process's objects are frozen out of
garbage collections (``gc.freeze()``) after the store is filled.

The scraper is ``curl`` (on PATH), in its own process as Prometheus is. Printed per way:
the scrape's wall time, the aggregator process's CPU during it (loop and worker
threads), the time spent on the loop reading the state
(``frozen()`` of every collector, timed directly), the longest loop stall, and the
collect and render times measured alone (median, min..max of ``--runs``).
"""

from __future__ import annotations

import argparse
import gc
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
from prometheus_client import ProcessCollector  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from ray_monitor.aggregator.core import AggregatorCore  # noqa: E402
from ray_monitor.aggregator.exposition import render  # noqa: E402
from ray_monitor.aggregator import http_api  # noqa: E402
from ray_monitor.aggregator.http_api import (_Families, collect_off_loop, make_app,  # noqa: E402
                                             monitor_collectors, monitor_registry)
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


async def scrape(client: TestClient, path: str) -> tuple[float, float, float, int]:
    """(wall s, CPU s, longest loop stall s, bytes) of one GET ``path``."""
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
    t0, c0 = time.perf_counter(), time.process_time()
    # the scraper in its own process, as Prometheus is: its reading is not this loop's
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
        str(client.make_url(path)), stdout=asyncio.subprocess.PIPE)
    out, _ = await curl.communicate()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    done = True
    await tick
    status, size = out.split()
    assert status == b"200", out
    return wall, cpu, stall, int(size)


class Held:
    """Time spent in the collectors' ``frozen()`` (what a scrape does on the loop)."""

    def __init__(self) -> None:
        self.s = 0.0

    def wrap(self, collectors: list) -> list:
        for c in collectors:
            if hasattr(c, "frozen") and not hasattr(c, "timed"):
                c.frozen, c.timed = self.timed(c.frozen), True
        return collectors

    def timed(self, fn):
        def call():
            t0 = time.perf_counter()
            try:
                return fn()
            finally:
                self.s += time.perf_counter() - t0
        return call


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:7.1f} ms ({min(xs) * 1000:.1f}..{max(xs) * 1000:.1f})"


async def main_async(args) -> None:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"command: {shlex.join([sys.executable, *sys.argv])}\npython "
          f"{platform.python_version()} | {platform.processor() or platform.machine()} | "
          f"load average {load}")
    clock = Clock(1000.0)
    # the cap raised past 4 series per replica, so that no series is folded at 3,000
    core = AggregatorCore({"max_series_per_metric": max(5000, 5 * args.replicas)},
                          clock=clock)
    fill(core, args.replicas, clock)
    clock.t += 1.0
    # as the aggregator actor does once started (actor.py): what exists now is out of
    # every later full garbage collection
    gc.collect()
    gc.freeze()
    held = Held()
    app = make_app(Agg(core))
    reg = monitor_registry(core)

    async def collect_timed(collectors):  # what /metrics reads on the loop, timed
        return await collect_off_loop(held.wrap(collectors))
    http_api.collect_off_loop = collect_timed
    ways = args.ways.split(",")

    async def on_loop(request):  # the handler before §17
        t0 = time.perf_counter()
        body, ctype = render(reg, request.headers.get("Accept", ""))
        held.s += time.perf_counter() - t0
        return web.Response(body=body, headers={"Content-Type": ctype})

    # §17's sources: the series listed on the loop, the series count from store.stats()
    old = monitor_collectors(core)
    old[0]._series_reader = None
    own = old[0]._self
    old[0]._self = lambda: (core.store.stats(), own())[1]
    old += [ProcessCollector(registry=None)]

    async def s17(request):  # §17's handler with those sources, and no GC pause
        snap = [c.frozen() if hasattr(c, "frozen") else c for c in held.wrap(old)]
        families = await asyncio.to_thread(lambda: [f for c in snap for f in c.collect()])
        body, ctype = await asyncio.get_running_loop().run_in_executor(
            None, render, _Families(families), request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": ctype})
    app.router.add_get("/metrics-on-loop", on_loop)
    app.router.add_get("/metrics-17", s17)
    paths = {"on-loop": "/metrics-on-loop", "17": "/metrics-17", "now": "/metrics"}
    res = {w: {"wall": [], "cpu": [], "held": [], "stall": []} for w in ways}
    alone = {"collect": [], "render": []}
    size = 0
    async with TestClient(TestServer(app)) as client:
        await scrape(client, "/metrics")  # warm
        for _ in range(args.runs):
            for way in ways:
                held.s = 0.0
                wall, cpu, stall, size = await scrape(client, paths[way])
                for k, v in (("wall", wall), ("cpu", cpu), ("held", held.s), ("stall", stall)):
                    res[way][k].append(v)
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
        print(f"{way:8s} scrape {summary(r['wall'])}, CPU {summary(r['cpu'])}, on the loop "
              f"{summary(r['held'])}, longest loop stall {summary(r['stall'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"replicas": args.replicas, "samples": series, "bytes": size,
                       "alone": alone, "ways": res}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--ways", default="17,now", help="of on-loop, 17, now (see above)")
    ap.add_argument("--json", help="also write the figures here")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
