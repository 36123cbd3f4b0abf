"""End to end through Ray Serve: a no-op deployment with ``@monitor`` against the same
deployment without it, side by side in one Serve instance, in one run.

    .venv/bin/python benchmarks/bench_serve_e2e.py [--requests 2000] [--rounds 6]
        [--concurrency 16] [--warmup 300] [--modes handle,http] [--tracing]
        [--sample-ratio 0.1] [--no-aggregator] [--num-cpus 4] [--json OUT]

Starts a local Ray cluster (``address="local"``, no dashboard) and Serve on a free
loopback port, deploys two applications, ``bench_plain`` (route ``/plain``) and
``bench_monitored`` (``/monitored``), each one replica of the same async no-op class
(``num_cpus=0``, generous ``max_ongoing_requests``), and by default the ray-monitor
aggregator, so the monitored replica flushes its snapshots as it would in production.

For each mode, after a warm-up that is not counted, rounds alternate the order
(plain, monitored; monitored, plain; ...), each side sending ``--requests`` requests
with ``--concurrency`` in flight:

- ``handle``: ``await handle.remote()`` from an asyncio driver in this process;
- ``http``: ``GET`` over keep-alive connections with ``httpx.AsyncClient`` against
  Serve's HTTP proxy.

Reported per mode and side: throughput (all requests over all round time), client-side
p50 and p99 latency, and the ratio monitored/plain of throughput (PASS at >= 97%).
The monitored side runs with ``tracing_enabled=False``; ``--tracing`` starts a local
OTLP receiver (``tests/otlp_receiver.py``), points ``OTEL_EXPORTER_OTLP_*`` at it
before Ray starts, and turns tracing on at ``--sample-ratio``.

Everything runs on this machine: client, proxy, replicas and Ray's own processes share
its cores, so the figures are comparative, not absolute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import time
from typing import Any, Awaitable, Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_RATIO = 0.97
APPS = {"plain": "bench_plain", "monitored": "bench_monitored"}


class Noop:
    async def __call__(self, *args: Any) -> str:
        return "ok"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -- drivers --------------------------------------------------------------------

async def drive(call: Callable[[], Awaitable[None]], n: int, concurrency: int
                ) -> tuple[float, list[float]]:
    """Sends ``n`` requests with ``concurrency`` in flight; (elapsed s, latencies s)."""
    latencies: list[float] = []
    left = [n]
    perf = time.perf_counter

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            t0 = perf()
            await call()
            latencies.append(perf() - t0)

    t0 = perf()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    return perf() - t0, latencies


def handle_caller(app: str) -> Callable[[], Awaitable[None]]:
    from ray import serve

    handle = serve.get_app_handle(app)

    async def call() -> None:
        await handle.remote()
    return call


def http_caller(client, url: str) -> Callable[[], Awaitable[None]]:
    async def call() -> None:
        r = await client.get(url)
        if r.status_code != 200:
            raise RuntimeError(f"GET {url}: HTTP {r.status_code}: {r.text[:200]}")
    return call


async def run_mode(mode: str, callers: dict[str, Callable], args) -> dict[str, dict]:
    for side, call in callers.items():
        await asyncio.wait_for(drive(call, args.warmup, args.concurrency), args.round_timeout)
    out = {side: {"elapsed_s": [], "throughput": [], "latencies": []} for side in callers}
    for r in range(args.rounds):
        order = list(callers) if r % 2 == 0 else list(reversed(callers))
        for side in order:
            elapsed, lat = await asyncio.wait_for(
                drive(callers[side], args.requests, args.concurrency), args.round_timeout)
            out[side]["elapsed_s"].append(elapsed)
            out[side]["throughput"].append(len(lat) / elapsed)
            out[side]["latencies"].extend(lat)
        print(f"  {mode} round {r + 1}/{args.rounds}: " + ", ".join(
            f"{s} {out[s]['throughput'][-1]:.0f} req/s" for s in callers), flush=True)
    return out


async def run_all(args, http_url: str) -> dict[str, dict]:
    results = {}
    for mode in args.modes:
        if mode == "handle":
            callers = {side: handle_caller(app) for side, app in APPS.items()}
            results[mode] = await run_mode(mode, callers, args)
        else:
            import httpx

            limits = httpx.Limits(max_connections=args.concurrency,
                                  max_keepalive_connections=args.concurrency)
            async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:
                callers = {side: http_caller(client, f"{http_url}/{side}") for side in APPS}
                results[mode] = await run_mode(mode, callers, args)
    return results


# -- report ---------------------------------------------------------------------

def summarize(results: dict[str, dict]) -> list[dict]:
    rows = []
    for mode, sides in results.items():
        thr = {}
        for side, d in sides.items():
            lat = np.asarray(d["latencies"])
            thr[side] = len(lat) / sum(d["elapsed_s"])
            rows.append({"mode": mode, "side": side, "requests": len(lat),
                         "throughput_rps": thr[side],
                         "round_rps": [round(x, 1) for x in d["throughput"]],
                         "p50_ms": float(np.percentile(lat, 50) * 1e3),
                         "p99_ms": float(np.percentile(lat, 99) * 1e3)})
        per_round = [m / p for m, p in zip(sides["monitored"]["throughput"],
                                           sides["plain"]["throughput"])]
        ratio = thr["monitored"] / thr["plain"]
        rows[-1].update(ratio=ratio, median_round_ratio=statistics.median(per_round),
                        verdict="PASS" if ratio >= TARGET_RATIO else "MISS")
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'mode':<8}{'side':<11}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'ratio':>8}{'median/round':>14}  verdict")
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if "ratio" in r else ""
        rr = f"{r['median_round_ratio']:.3f}" if "ratio" in r else ""
        print(f"{r['mode']:<8}{r['side']:<11}{r['requests']:>9}{r['throughput_rps']:>9.0f}"
              f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{ratio:>8}{rr:>14}  "
              f"{r.get('verdict', '')}")
    print(f"\nratio: monitored/plain throughput over all rounds; target >= {TARGET_RATIO:.0%} "
          "(median/round: the median of per-round ratios, a check on drift).")


# -- setup and teardown ---------------------------------------------------------

def deploy(args, http_port: int) -> str:
    from ray import serve

    from ray_monitor import monitor

    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    common = dict(num_replicas=1, max_ongoing_requests=max(1000, args.concurrency * 4),
                  ray_actor_options={"num_cpus": 0})
    plain = serve.deployment(name="Noop", **common)(Noop)
    monitored = serve.deployment(name="Noop", **common)(
        monitor(tracing_enabled=args.tracing,
                sample_ratio=args.sample_ratio if args.tracing else None)(Noop))
    serve.run(plain.bind(), name=APPS["plain"], route_prefix="/plain")
    serve.run(monitored.bind(), name=APPS["monitored"], route_prefix="/monitored")
    return f"http://127.0.0.1:{http_port}"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per side per round")
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds per mode")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    ap.add_argument("--warmup", type=int, default=300, help="uncounted requests per side")
    ap.add_argument("--modes", default="handle,http", help="comma list of handle, http")
    ap.add_argument("--tracing", action="store_true",
                    help="tracing on, exporting to a local OTLP receiver")
    ap.add_argument("--sample-ratio", type=float, default=0.1,
                    help="head sampling with --tracing (default 0.1)")
    ap.add_argument("--no-aggregator", action="store_true",
                    help="do not start the ray-monitor aggregator")
    ap.add_argument("--num-cpus", type=int, default=4, help="CPUs Ray may schedule")
    ap.add_argument("--round-timeout", type=float, default=300.0,
                    help="seconds before a round is declared stuck")
    ap.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    args = ap.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in ("handle", "http")]
    if bad or not args.modes:
        ap.error(f"--modes: unknown {bad}; use handle, http or handle,http")
    for name in ("requests", "rounds", "concurrency", "num_cpus"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        ap.error("--warmup must be 0 or more")
    if not 0.0 <= args.sample_ratio <= 1.0:
        ap.error("--sample-ratio must be between 0 and 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    env = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "python": sys.version.split()[0], "cpu": cpu_model(), "cores": os.cpu_count(),
           "loadavg_start": os.getloadavg()}
    print(f"command: {env['command']}")
    print(f"python {env['python']}, cpu: {env['cpu']} ({env['cores']} cores), "
          f"load average at start: {env['loadavg_start']}")
    print("note: client, proxy, replicas and Ray share this machine, which is shared and "
          "noisy; compare the two sides within one run, not across runs.")

    # The monitored replica would export OTLP metrics and traces to any endpoint set
    # here; without --tracing nothing may be configured.
    for k in [k for k in os.environ if k.startswith("OTEL_EXPORTER_OTLP")]:
        del os.environ[k]
    receiver = None
    mon_started = False
    import ray

    try:
        if args.tracing:
            sys.path.insert(0, REPO)
            from tests.otlp_receiver import OtlpReceiver

            receiver = OtlpReceiver().start()
            # Set before Ray starts: the raylet, and so every replica, inherits them.
            os.environ.update(receiver.env("http/protobuf"))
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
                 namespace="ray_monitor_bench", log_to_driver=False)
        if not args.no_aggregator:
            import ray_monitor

            ray_monitor.start(port=0, gpu=False)
            mon_started = True
        http_url = deploy(args, free_port())
        print(f"deployed {APPS['plain']} and {APPS['monitored']} at {http_url}; "
              f"tracing {'on, ratio ' + str(args.sample_ratio) if args.tracing else 'off'}; "
              f"aggregator {'on' if mon_started else 'off'}; {args.rounds} rounds x "
              f"{args.requests} requests per side, {args.concurrency} in flight, "
              f"{args.warmup} warm-up", flush=True)
        t0 = time.monotonic()
        results = asyncio.run(run_all(args, http_url))
        elapsed = time.monotonic() - t0
    finally:
        _teardown(mon_started)
        if receiver is not None:
            spans = len(receiver.spans())
            receiver.stop()
            print(f"OTLP receiver got {spans} spans")
    rows = summarize(results)
    print_table(rows)
    env["loadavg_end"] = os.getloadavg()
    print(f"measured in {elapsed:.1f} s; load average at end: {env['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": {k: v for k, v in vars(args).items()},
                       "rows": rows}, f, indent=2)
    return 0


def _teardown(mon_started: bool) -> None:
    import ray

    if not ray.is_initialized():
        return
    try:
        from ray import serve

        serve.shutdown()
    except Exception as e:  # keep tearing down; say what failed
        print(f"serve.shutdown failed: {e!r}", file=sys.stderr)
    if mon_started:
        try:
            import ray_monitor

            ray_monitor.stop()
        except Exception as e:
            print(f"ray_monitor.stop failed: {e!r}", file=sys.stderr)
    ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
