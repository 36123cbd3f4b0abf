"""End-to-end cost of ``@monitor`` as replica CPU time per request, read from the replica
processes themselves, monitored against plain, with a plain-against-plain control.

    .venv/bin/python benchmarks/bench_replica_cpu.py [--requests 2000] [--runs 3]
        [--chunks 10] [--concurrency 8] [--paths http,handle] [--idle-threads S]
        [--variant NAME=KIND[:VAR=VALUE,...]]...
        [--app MODULE:FUNCTION] [--serve-tracing RATIO] [--no-aggregator] [--json OUT]

Throughput on a shared machine swings more than the difference being measured (two runs
of bench_serve_e2e.py gave per-round ratios from 0.77 to 1.23); CPU time spent inside
the replica processes does not depend on how long they waited for a core. So each
variant is deployed as its own application (one replica per deployment), driven in
turn, and charged the CPU time its replica processes used while it was driven (the sum of
their threads' run time, ``/proc/PID/task/TID/schedstat``, in nanoseconds; ``utime +
stime`` of ``/proc/PID/stat`` counts 10 ms ticks, too coarse for a chunk, and is printed
beside it as a cross-check), divided by its requests: microseconds of replica CPU per
request, summed over the application's deployments, and ``+us``, the median of the
per-run differences to ``plain``. A replica also burns CPU when idle (Ray's
and Serve's own threads, ray-monitor's flush every second), in proportion to time, not
requests; so before each round the same processes are watched idle for ``--idle-s``,
and that rate times the round's duration is taken off ("net"; "raw" keeps it, and the
idle rate is reported too). ``--idle-threads S`` first watches every idle replica for
S seconds, three times, and prints its CPU per second by thread (``--requests 0``: only
that). Within a run the variants take turns in ``--chunks``
chunks of the requests (a load swing on a shared machine falls on all of them alike);
runs rotate the order. The table gives the median over ``--runs`` with min..max, and
each variant's ratio to ``plain``.
``plain-control`` is a second plain application: its ratio to ``plain`` is what this
machine's noise alone makes of "no difference".

Variants (``--variant`` adds or replaces; defaults below): ``KIND`` is ``plain`` or
``monitor``; ``VAR=VALUE`` pairs go to the application's replicas as environment
variables (``runtime_env``), so one cluster holds every variant:

- ``plain``, ``plain-control``: no ``@monitor``;
- ``tracing-off``: ``@monitor`` with ``RAY_MONITOR_TRACES=0`` and no OTLP endpoint:
  metrics only;
- ``default``: ``@monitor`` at its defaults, no OTLP endpoint: tracing on, every request
  unsampled (held for tail keeping, its context carried over the handle call);
- ``sampled-1%``, ``sampled-100%``: ``@monitor`` with an OTLP endpoint (a local sink that
  answers 200 and keeps nothing) and ``RAY_MONITOR_SAMPLE_RATIO`` 0.01 / 1.0.

``--serve-tracing RATIO`` starts the cluster with Ray Serve's tracing on
(``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH=ray_monitor.tracing:serve_span_processors`` at
that ratio), which then decides the sampling of every variant's requests. Paths:
``http`` (``http.client`` keep-alive connections through Serve's proxy) and ``handle``
(``DeploymentHandle`` calls from this process). A variant's ``PYTHONPATH=DIR`` runs its
replicas on another ray-monitor tree, for before and after a change in one run (start the
script from a directory without a ``ray_monitor`` package: Ray puts the driver's working
directory first on the workers' path). ``--app MODULE:FUNCTION`` benchmarks another
application: ``FUNCTION(monitored: bool, env: dict, name: str)`` returns a bound Serve
application whose ingress takes a Starlette request (HTTP) or a string
(handle), and answers ``"pid"`` with ``{deployment: pid}`` of its replicas. Needs only
the project's own dependencies (no ``httpx``).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import importlib
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")
DEFAULT_VARIANTS = ["plain=plain", "plain-control=plain", "tracing-off=monitor:RAY_MONITOR_TRACES=0",
                    "default=monitor",
                    "sampled-1%=monitor:RAY_MONITOR_SAMPLE_RATIO=0.01,OTLP=1",
                    "sampled-100%=monitor:RAY_MONITOR_SAMPLE_RATIO=1.0,OTLP=1"]


# -- the default application: an HTTP ingress calling a model --------------------------

def default_app(monitored: bool, env: dict, name: str):
    """Ingress -> Model, no-op work: what is measured is the serving and the monitoring."""
    from ray import serve

    from ray_monitor import monitor

    class Model:
        async def __call__(self, what: str) -> Any:
            return os.getpid() if what == "pid" else what

        async def bare(self, what: str) -> Any:  # left unmonitored (--same-process)
            return what

    class Ingress:
        def __init__(self, model) -> None:
            self.model = model

        async def __call__(self, request) -> Any:
            what = request if isinstance(request, str) else \
                request.query_params.get("what", "ok")
            got = await self.model.remote(what)
            if what == "pid":
                return {"Ingress": os.getpid(), "Model": got}
            return {"got": got}

        async def bare(self, what: str) -> Any:
            return {"got": await self.model.bare.remote(what)}
    if monitored:
        Model, Ingress = (monitor(exclude=("bare",))(c) for c in (Model, Ingress))
    opts = {"num_cpus": 0, "runtime_env": {"env_vars": env}}
    model = serve.deployment(Model, name="Model", ray_actor_options=opts,
                             max_ongoing_requests=1000)
    ingress = serve.deployment(Ingress, name="Ingress", ray_actor_options=opts,
                               max_ongoing_requests=1000)
    return ingress.bind(model.bind())


# -- an OTLP endpoint that takes everything and keeps nothing --------------------------

class _Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def otlp_sink() -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


# -- measuring ----------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """CPU time of a process, in seconds: the sum over its threads of the scheduler's run
    time (``/proc/PID/task/TID/schedstat``, nanoseconds), where the kernel has it; else
    utime + stime (fields 14 and 15 of ``/proc/PID/stat``), which count in clock ticks
    (10 ms: at 2 ms a request, a chunk of 200 requests would read +-2.5%)."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:  # the thread ended meanwhile
                continue
        return total / 1e9
    except (FileNotFoundError, ValueError, IndexError):
        return tick_seconds(pid)


def tick_seconds(pid: int) -> float:
    """utime + stime of a process (``/proc/PID/stat``), which also counts its threads
    that ended: a cross-check of :func:`cpu_seconds` over a whole run."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive_http(port: int, route: str, n: int, concurrency: int) -> int:
    local = threading.local()

    def one(_: int) -> int:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", f"{route}?what=ok")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    with ThreadPoolExecutor(concurrency) as pool:
        return sum(1 for status in pool.map(one, range(n)) if status == 200)


def drive_handle(handle, n: int, concurrency: int) -> int:
    async def go() -> int:
        sem = asyncio.Semaphore(concurrency)

        async def one() -> bool:
            async with sem:
                return (await handle.remote("ok")) == {"got": "ok"}
        return sum(await asyncio.gather(*(one() for _ in range(n))))
    return asyncio.run(go())


def thread_times(pid: int) -> dict[tuple[str, str], int]:
    """(thread id, name) -> nanoseconds of CPU, for each thread of a process."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[(tid, name)] = int(f.read().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            continue
    return out


def idle_by_thread(apps: dict, seconds: float) -> dict:
    """Each idle replica's CPU in ``seconds``, ms/s, in total and by thread name (Python
    threads are all named after the process; Ray's are ``worker.io``, ``client.poll0``...)."""
    before = {n: {d: thread_times(p) for d, p in a[2].items()} for n, a in apps.items()}
    time.sleep(seconds)
    out = {}
    for n, a in apps.items():
        for d, p in a[2].items():
            by: dict[str, float] = {}
            for (tid, name), ns in thread_times(p).items():
                by[name] = by.get(name, 0.0) + (ns - before[n][d].get((tid, name), 0)) / seconds / 1e6
            out[f"{n}/{d}"] = {"total": sum(by.values()), "threads": dict(
                sorted(by.items(), key=lambda kv: -kv[1])[:6])}
    return out


def fanin_paths() -> dict:
    """How the replicas' deliveries arrived: direct by Ray call, through node mergers
    (and of those, over the node's Unix socket), from the aggregator's counters."""
    import ray

    from ray_monitor.common.names import AGGREGATOR_NAME, NAMESPACE

    f = ray.get(ray.get_actor(AGGREGATOR_NAME, namespace=NAMESPACE).stats.remote())["fanin"]
    nodes = f.get("nodes", {}).values()
    return {"direct_calls": f["direct_calls"], "node_forwards": f["node_calls"],
            "merger_deliveries": sum(n.get("calls", 0) for n in nodes),
            "over_socket": sum(n.get("socket_calls", 0) for n in nodes)}


def idle_rates(pids: dict, seconds: float) -> dict:
    """CPU seconds per second each process burns with no request (0 when not watched)."""
    if seconds <= 0:
        return {d: 0.0 for d in pids}
    t0, c0 = time.monotonic(), {d: cpu_seconds(p) for d, p in pids.items()}
    time.sleep(seconds)
    dt = time.monotonic() - t0
    return {d: (cpu_seconds(p) - c0[d]) / dt for d, p in pids.items()}


def parse_variant(spec: str) -> tuple[str, bool, dict]:
    name, _, rest = spec.partition("=")
    kind, _, env_text = rest.partition(":")
    if not name or kind not in ("plain", "monitor"):
        raise SystemExit(f"--variant {spec!r}: expected NAME=plain|monitor[:VAR=VALUE,...]")
    env = dict(pair.split("=", 1) for pair in env_text.split(",") if pair)
    return name, kind == "monitor", env


def summarize(samples: dict, variants: list[str]) -> list[dict]:
    rows = []
    for path, by_variant in samples.items():
        base = by_variant.get("plain")
        for v in variants:
            runs = by_variant[v]
            totals = [r["us_per_request"] for r in runs]
            row = {"path": path, "variant": v, "us_per_request": statistics.median(totals),
                   "min": min(totals), "max": max(totals),
                   "raw_us_per_request": statistics.median(r["raw_us_per_request"]
                                                           for r in runs),
                   "raw_ticks_us_per_request": statistics.median(
                       r.get("raw_ticks_us_per_request", 0.0) for r in runs),
                   "idle_ms_per_s": statistics.median(r["idle_ms_per_s"] for r in runs),
                   "requests_per_s": statistics.median(r["requests_per_s"] for r in runs),
                   "by_deployment": {d: statistics.median(r["by_deployment"][d] for r in runs)
                                     for d in runs[0]["by_deployment"]}}
            if base is not None:
                ratios = [a["us_per_request"] / b["us_per_request"]
                          for a, b in zip(runs, base) if b["us_per_request"] > 0]
                diffs = [a["us_per_request"] - b["us_per_request"] for a, b in zip(runs, base)]
                row["extra_us"] = statistics.median(diffs)
                row["extra_us_min"], row["extra_us_max"] = min(diffs), max(diffs)
                row["vs_plain"] = statistics.median(ratios)
                row["vs_plain_min"], row["vs_plain_max"] = min(ratios), max(ratios)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="per variant, path and run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--idle-s", type=float, default=2.0,
                    help="idle watch of each variant before each run (0: none)")
    ap.add_argument("--idle-threads", type=float, default=0.0, metavar="S",
                    help="first watch every idle replica S seconds, three times, by thread")
    ap.add_argument("--chunks", type=int, default=10,
                    help="each run's requests go in this many chunks, variants in turn")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--paths", default="http,handle")
    ap.add_argument("--variant", action="append", default=None,
                    help="NAME=plain|monitor[:VAR=VALUE,...]; OTLP=1 points the variant at "
                    "the local OTLP sink (repeatable; default: " + " ".join(DEFAULT_VARIANTS) + ")")
    ap.add_argument("--same-process", metavar="VAR=VALUE,...", default=None,
                    help="add a monitored application (with these environment variables; "
                    "'' for none) driven as two variants in the same processes: "
                    "same-monitored (its monitored __call__) and same-bare (an unmonitored "
                    "method doing the same); handle path only")
    ap.add_argument("--app", default=None, help="MODULE:FUNCTION building the application")
    ap.add_argument("--serve-tracing", type=float, default=None, metavar="RATIO")
    ap.add_argument("--no-aggregator", action="store_true")
    ap.add_argument("--num-cpus", type=int, default=4)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    if args.same_process is not None:
        variants.append(parse_variant(f"same-monitored=monitor:{args.same_process}"))
    names = [v[0] for v in variants] + (["same-bare"] if args.same_process is not None else [])
    paths = [p for p in args.paths.split(",") if p]
    if args.same_process is not None and paths != ["handle"]:
        ap.error("--same-process drives DeploymentHandle calls only: add --paths handle")
    if "plain" not in names:
        ap.error("one variant must be named plain: the ratios are to it")
    build: Callable = default_app
    if args.app:
        module, _, fn = args.app.partition(":")
        build = getattr(importlib.import_module(module), fn)

    sink, sink_url = otlp_sink()
    for k in [k for k in os.environ if k.startswith(("OTEL_", "RAY_SERVE_TRACING"))]:
        del os.environ[k]
    os.environ["PYTHONPATH"] = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
    if args.serve_tracing is not None:
        os.environ["RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH"] = \
            "ray_monitor.tracing:serve_span_processors"
        os.environ["RAY_SERVE_TRACING_SAMPLING_RATIO"] = str(args.serve_tracing)
        # Serve's own spans go to the same sink, from every process.
        os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": sink_url,
                           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    env_info = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                "python": sys.version.split()[0], "cpu": platform.processor() or "",
                "cores": os.cpu_count(), "loadavg_start": os.getloadavg()}
    print(f"command: {env_info['command']}")
    print(f"python {env_info['python']}, {env_info['cores']} cores, load average at start: "
          f"{env_info['loadavg_start']}")

    import ray
    from ray import serve

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
             log_to_driver=False, namespace="bench_replica_cpu")
    samples: dict[str, dict[str, list]] = {p: {n: [] for n in names} for p in paths}
    try:
        if not args.no_aggregator:
            import ray_monitor

            ray_monitor.start(port=0)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        apps = {}
        for name, monitored, env in variants:
            env = dict(env)
            if env.pop("OTLP", None) == "1":
                env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": sink_url,
                            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                            "OTEL_BSP_SCHEDULE_DELAY": "1000"})
            app = f"bench_{''.join(c if c.isalnum() else '_' for c in name)}"
            handle = serve.run(build(monitored, env, app), name=app, route_prefix=f"/{app}")
            pids = handle.remote("pid").result()
            apps[name] = (app, handle, pids)
            print(f"{name}: {app}, replicas {pids}")
        if args.same_process is not None:  # the same replicas, through their bare method
            app, handle, pids = apps["same-monitored"]
            apps["same-bare"] = (app, handle.options(method_name="bare"), pids)
        for name, (app, handle, _) in apps.items():  # warm-up, not counted
            if "http" in paths:
                drive_http(port, f"/{app}", args.warmup, args.concurrency)
            if "handle" in paths:
                drive_handle(handle, args.warmup, args.concurrency)
        idle_threads = []
        if args.idle_threads > 0:
            time.sleep(5.0)  # the warm-up's last flush and answers settle
        for w in range(3 if args.idle_threads > 0 else 0):
            idle_threads.append(idle_by_thread(apps, args.idle_threads))
            print(f"idle window {w + 1}, {args.idle_threads:.0f} s, load average "
                  f"{os.getloadavg()}, ms/s:")
            for key, v in idle_threads[-1].items():
                print(f"  {key:<28}{v['total']:7.2f}  " + ", ".join(
                    f"{t} {x:.2f}" for t, x in v["threads"].items()))
        if args.idle_threads > 0 and not args.no_aggregator:
            print("delivery paths:", fanin_paths())
        for run in range(args.runs if args.requests > 0 else 0):
            for path in paths:
                k = run % len(names)
                order = names[k:] + names[:k]
                idle = {n: idle_rates(apps[n][2], args.idle_s) for n in order}
                acc = {n: {"requests": 0, "seconds": 0.0, "raw": {d: 0.0 for d in apps[n][2]},
                           "ticks": 0.0} for n in order}
                # Small chunks, every variant in turn: a load swing on the machine falls
                # on all of them alike.
                for c in range(args.chunks):
                    n_chunk = args.requests // args.chunks + (c < args.requests % args.chunks)
                    for name in order:
                        app, handle, pids = apps[name]
                        t0, before = time.monotonic(), {d: cpu_seconds(p) for d, p in
                                                        pids.items()}
                        ticks = sum(tick_seconds(p) for p in pids.values())
                        ok = drive_http(port, f"/{app}", n_chunk, args.concurrency) \
                            if path == "http" else drive_handle(handle, n_chunk,
                                                                 args.concurrency)
                        a = acc[name]
                        a["seconds"] += time.monotonic() - t0
                        a["requests"] += ok
                        for d, p in pids.items():
                            a["raw"][d] += cpu_seconds(p) - before[d]
                        a["ticks"] += sum(tick_seconds(p) for p in pids.values()) - ticks
                for name in order:
                    a, rate = acc[name], idle[name]
                    ok, wall = max(a["requests"], 1), a["seconds"]
                    by_dep = {d: (a["raw"][d] - rate[d] * wall) / ok * 1e6 for d in a["raw"]}
                    samples[path][name].append({
                        "requests": a["requests"], "seconds": wall,
                        "requests_per_s": a["requests"] / wall, "by_deployment": by_dep,
                        "us_per_request": sum(by_dep.values()),
                        "raw_us_per_request": sum(a["raw"].values()) / ok * 1e6,
                        "raw_ticks_us_per_request": a["ticks"] / ok * 1e6,
                        "idle_ms_per_s": sum(rate.values()) * 1e3})
            print(f"run {run + 1}/{args.runs} done; load average {os.getloadavg()}")
    finally:
        try:
            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        sink.shutdown()
    rows = summarize(samples, names) if args.requests > 0 else []
    print(f"\n{'path':<8}{'variant':<16}{'net us/req':>11}{'  min..max':<16}"
          f"{'+us':>6}{'  min..max':<14}"
          f"{'vs plain':>9}{'  min..max':<16}{'raw us/req':>11}{'(ticks)':>8}{'idle ms/s':>10}"
          f"{'req/s':>7}"
          "  by deployment (net, median)")
    for r in rows:
        ratio = f"{r['vs_plain']:.3f}" if "vs_plain" in r else ""
        rr = f"  {r['vs_plain_min']:.3f}..{r['vs_plain_max']:.3f}" if "vs_plain" in r else ""
        deps = ", ".join(f"{d} {v:.0f}" for d, v in r["by_deployment"].items())
        extra = (f"{r['extra_us']:>+6.0f}{'  %+.0f..%+.0f' % (r['extra_us_min'], r['extra_us_max']):<14}"
                 if "extra_us" in r else " " * 20)
        print(f"{r['path']:<8}{r['variant']:<16}{r['us_per_request']:>11.0f}"
              f"{'  %.0f..%.0f' % (r['min'], r['max']):<16}{extra}{ratio:>9}{rr:<16}"
              f"{r['raw_us_per_request']:>11.0f}{r['raw_ticks_us_per_request']:>8.0f}"
              f"{r['idle_ms_per_s']:>10.1f}"
              f"{r['requests_per_s']:>7.0f}  {deps}")
    env_info["loadavg_end"] = os.getloadavg()
    print(f"\nload average at end: {env_info['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env_info, "args": vars(args), "rows": rows,
                       "samples": samples, "idle_threads": idle_threads}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
