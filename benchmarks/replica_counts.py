"""What a monitored request does inside a real Serve replica that an unmonitored one does
not, counted instead of timed: Python calls per request by function and by thread,
syscalls, garbage collections, and CPU per request by thread, in the replica processes.

    .venv/bin/python benchmarks/replica_counts.py [--requests 300] [--top 40]
        [--cpu-windows N] [--cpu-requests 1000] [--strace] [--env VAR=VALUE,...]
        [--json OUT]

CPU time on a shared machine moves by more than the tens of microseconds looked for
(``bench_replica_cpu.py`` reads +-150 us per run even in the same processes); counts do
not depend on the load. One application (Ingress -> Model, no-op work, as
``bench_replica_cpu.py`` deploys it) is monitored with ``--env`` as its replicas'
environment; its replicas answer both through their monitored ``__call__`` and through an
unmonitored method doing the same (``bare``). Then, each side in turn:

- counts: ``--requests`` one at a time, bracketed by a ``diag`` call that, in each
  replica, puts a counting profile function (``sys.setprofile``: Python calls and C calls)
  on the three threads that run Python per request (Ray's actor loop, where Serve takes
  the request; Serve's user-code loop, where the method runs; Serve's router loop, where
  a handle call is sent). All three are uvloop's, so loop turns are not counted; a
  callback or an extra await shows as a call. Threads Ray runs in C++ are not seen (the
  CPU windows below are).
- ``--strace``: the same with ``strace -c -f`` on each replica: syscalls per request.
- ``--cpu-windows N``: N alternating windows per side of ``--cpu-requests`` at
  concurrency 8 without the profile function: CPU per request by thread
  (``/proc/self/task/*/schedstat``, Python's thread names), and garbage collections by
  generation (``gc.callbacks``), the medians and each window's monitored minus bare.

The Model's ``diag("hot:N")`` times both methods N times in a tight loop on Serve's
user-code thread (``time.thread_time``): the same code warm, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _thread_ns() -> dict:
    """CPU nanoseconds of each thread of this process, by ``tid name`` (Python's name for
    Python's threads, else the kernel's)."""
    import threading

    py = {str(t.native_id): t.name for t in threading.enumerate()}  # Python's names
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = py.get(tid) or f.read().strip()
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[f"{tid} {name}"] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def _diag(cmd: str) -> Any:
    """Runs in a replica: starts (``start:counts``, ``start:cpu``) or stops the counters
    (see the module's docstring)."""
    import gc
    import threading

    g = globals()
    if cmd.startswith("start"):
        counts: dict = {}
        collections: dict = {}
        t_gc = [0.0]

        def on_gc(phase, info):  # collections by generation, and their time
            if phase == "start":
                t_gc[0] = time.perf_counter()
            else:
                gen = f"gen{info['generation']}"
                n, t = collections.get(gen, (0, 0.0))
                collections[gen] = (n + 1, t + time.perf_counter() - t_gc[0])

        def prof(frame, event, arg):
            if event == "call":
                co = frame.f_code
                key = f"{co.co_filename.rsplit('site-packages/', 1)[-1]}:{co.co_firstlineno} {co.co_name}"
            elif event == "c_call":
                key = f"C {getattr(arg, '__module__', None) or ''}.{getattr(arg, '__qualname__', repr(arg))}"
            else:
                return
            per = counts.setdefault(threading.current_thread().name, {})
            per[key] = per.get(key, 0) + 1

        loops = []
        if cmd == "start:counts":
            from types import SimpleNamespace

            import ray
            from ray.serve._private.router import SingletonThreadRouter

            # Ray's actor loop (where Serve's replica takes each request) and Serve's
            # router loop (handle calls made here); Serve's user-code loop is this one.
            # (All three are uvloop's: their turns are not seen, their Python calls are.)
            default_cg = ray._private.worker.global_worker.core_worker.get_event_loop(
                SimpleNamespace(function_name="__init__"), None)[0]
            here = asyncio.get_running_loop()
            loops = [lp for lp in {id(lp): lp for lp in (
                default_cg, SingletonThreadRouter._asyncio_loop) if lp is not None}.values()
                if lp is not here]
            for loop in loops:
                loop.call_soon_threadsafe(sys.setprofile, prof)
            sys.setprofile(prof)  # this thread (Serve's user-code loop) at once
        gc.callbacks.append(on_gc)
        g["_DIAG"] = (counts, loops, on_gc, collections, _thread_ns(), gc.get_count())
        return {"loops": len(loops) + bool(loops), "pid": os.getpid()}
    counts, loops, on_gc, collections, threads0, gc0 = g.pop("_DIAG")
    threads1 = _thread_ns()
    gc.callbacks.remove(on_gc)
    if loops:
        sys.setprofile(None)
        for loop in loops:
            loop.call_soon_threadsafe(sys.setprofile, None)
        time.sleep(0.2)  # the loops pass their next turn and drop the profile function
    merged: dict = {}
    for per in counts.values():
        for k, v in per.items():
            merged[k] = merged.get(k, 0) + v
    by_name: dict = {}
    for key, ns in threads1.items():
        name = key.split(" ", 1)[1]
        by_name[name] = by_name.get(name, 0) + ns - threads0.get(key, 0)
    return {"counts": merged, "calls_by_thread": {k: sum(v.values()) for k, v in counts.items()},
            "cpu_ns_by_thread": by_name, "gc": collections}


def build_app(env: dict):
    from ray import serve

    from ray_monitor import monitor

    class Model:
        async def __call__(self, what: str) -> Any:
            return os.getpid() if what == "pid" else what

        async def bare(self, what: str) -> Any:
            return what

        async def diag(self, cmd: str) -> Any:
            if cmd.startswith("hot:"):  # both methods in a tight loop, on this thread
                out = {}
                for name in ("bare", "__call__", "bare", "__call__"):
                    fn, n = getattr(self, name), int(cmd[4:])
                    t0 = time.thread_time()
                    for _ in range(n):
                        await fn("ok")
                    out[name] = (time.thread_time() - t0) / n * 1e6
                return out
            return _diag(cmd)

    class Ingress:
        def __init__(self, model) -> None:
            self.model = model

        async def __call__(self, request) -> Any:
            return {"got": await self.model.remote(request)}

        async def bare(self, what: str) -> Any:
            return {"got": await self.model.bare.remote(what)}

        async def diag(self, cmd: str) -> Any:
            # the Model's counters start first and stop last: both bracket the window
            if cmd == "start":
                model = await self.model.diag.remote(cmd)
                return {"Model": model, "Ingress": _diag(cmd)}
            mine = _diag(cmd)
            return {"Ingress": mine, "Model": await self.model.diag.remote(cmd)}
    Model, Ingress = (monitor(exclude=("bare", "diag"))(c) for c in (Model, Ingress))
    opts = {"num_cpus": 0, "runtime_env": {"env_vars": env}}
    model = serve.deployment(Model, name="Model", ray_actor_options=opts)
    ingress = serve.deployment(Ingress, name="Ingress", ray_actor_options=opts)
    return ingress.bind(model.bind())


def window(handle, diag, n: int, mode: str, concurrency: int) -> dict:
    diag.remote(f"start:{mode}").result()
    asyncio.run(_drive(handle, n, concurrency))
    return diag.remote("stop").result()


def traced_window(handle, pids: dict, n: int) -> dict:
    """``strace -c -f`` on each replica while ``n`` requests go one at a time: syscalls
    per request by name, per deployment."""
    import signal
    import subprocess
    import tempfile

    procs = {}
    for dep, pid in pids.items():
        fd, out = tempfile.mkstemp(prefix=f"strace-{dep}-")
        os.close(fd)
        procs[dep] = (subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", out],
                                       stderr=subprocess.DEVNULL), out)
    time.sleep(2.0)  # attached to every thread
    asyncio.run(_drive(handle, n, 1))
    res = {}
    for dep, (proc, out) in procs.items():
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        calls = {}
        with open(out) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                    calls[parts[-1]] = int(parts[3])
        os.unlink(out)
        res[dep] = calls
    return res


async def _drive(h, n: int, concurrency: int = 1) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            await h.remote("ok")
    await asyncio.gather(*(one() for _ in range(n)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--cpu-windows", type=int, default=0,
                    help="then this many alternating windows per side without the profile "
                    "function: CPU per request by thread, and garbage collections")
    ap.add_argument("--cpu-requests", type=int, default=1000)
    ap.add_argument("--strace", action="store_true",
                    help="also count syscalls per request (strace -c on each replica)")
    ap.add_argument("--env", default="", help="VAR=VALUE,... for the replicas")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    env = dict(p.split("=", 1) for p in args.env.split(",") if p)
    for k in [k for k in os.environ if k.startswith(("OTEL_", "RAY_SERVE_TRACING"))]:
        del os.environ[k]
    os.environ["PYTHONPATH"] = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
    load0 = os.getloadavg()
    print(f"command: {' '.join(sys.argv)}; load average {load0}")

    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             namespace="replica_counts")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        handle = serve.run(build_app(env), name="counts", route_prefix="/counts")
        bare, diag = handle.options(method_name="bare"), handle.options(method_name="diag")
        for h in (handle, bare):  # warm-up: first-call caches on both paths
            asyncio.run(_drive(h, 200, 8))
        counted = {name: window(h, diag, args.requests, "counts", 1)
                   for name, h in (("monitored", handle), ("bare", bare))}
        syscalls = {}
        if args.strace:  # syscalls per request, each replica's every thread
            pids = diag.remote("start:cpu").result()
            diag.remote("stop").result()
            for name, h in (("monitored", handle), ("bare", bare)):
                syscalls[name] = traced_window(h, {d: pids[d]["pid"] for d in pids},
                                               args.requests)
        timed: dict = {"monitored": [], "bare": []}
        for w in range(args.cpu_windows):  # alternating, the order turned each time
            for name, h in ((("monitored", handle), ("bare", bare))[::1 if w % 2 else -1]):
                timed[name].append(window(h, diag, args.cpu_requests, "cpu", 8))
    finally:
        try:
            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
    report = {"command": " ".join(sys.argv), "load_start": load0}
    for dep in ("Ingress", "Model"):
        m, b, n = counted["monitored"][dep], counted["bare"][dep], args.requests
        calls = {k: {t: c / n for t, c in counted[k][dep]["calls_by_thread"].items()}
                 for k in counted}
        keys = set(m["counts"]) | set(b["counts"])
        diff = [((m["counts"].get(k, 0) - b["counts"].get(k, 0)) / n, k) for k in keys]
        diff = sorted((d for d in diff if abs(d[0]) >= 0.5), key=lambda d: -abs(d[0]))
        cpu = {}  # us per request by thread name: median over windows, and per window
        for k, ws in timed.items():
            names = sorted({t for w in ws for t in w[dep]["cpu_ns_by_thread"]})
            cpu[k] = {t: [w[dep]["cpu_ns_by_thread"].get(t, 0) / args.cpu_requests / 1e3
                          for w in ws] for t in names}
        gcs = {k: [w[dep]["gc"] for w in ws] for k, ws in timed.items()}
        if syscalls:
            sm, sb = syscalls["monitored"][dep], syscalls["bare"][dep]
            report.setdefault("syscalls_per_request", {})[dep] = {
                k: (sm.get(k, 0) / n, sb.get(k, 0) / n) for k in sorted(set(sm) | set(sb))}
            print(f"\n== {dep}: syscalls per request (monitored, bare; strace -c, "
                  f"{n} requests one at a time): total {sum(sm.values()) / n:.2f}, "
                  f"{sum(sb.values()) / n:.2f}")
            for k in sorted(set(sm) | set(sb), key=lambda k: -abs(sm.get(k, 0) - sb.get(k, 0))):
                print(f"  {k:<24}{sm.get(k, 0) / n:8.2f}{sb.get(k, 0) / n:8.2f}")
        report[dep] = {"calls_per_request_by_thread": calls, "differences": diff[:args.top],
                       "cpu_us_per_request_by_thread": cpu, "gc_per_window": gcs,
                       "gc_counted": {k: counted[k][dep]["gc"] for k in counted}}
        print(f"\n== {dep}: Python calls per request, by thread: {calls}")
        print("   most different (monitored minus bare, per request):")
        for d, k in diff[:args.top]:
            print(f"  {d:+8.2f}  {k}")
        if timed["monitored"]:
            print(f"   CPU us/request by thread ({args.cpu_windows} windows of "
                  f"{args.cpu_requests}, concurrency 8): monitored-bare median [per window]")
            for t in sorted(set(cpu["monitored"]) | set(cpu["bare"])):
                mm, bb = cpu["monitored"].get(t, [0.0] * args.cpu_windows), \
                    cpu["bare"].get(t, [0.0] * args.cpu_windows)
                d = [x - y for x, y in zip(mm, bb)]
                print(f"  {t:<40}{statistics.median(mm):9.1f}{statistics.median(bb):9.1f}"
                      f"{statistics.median(d):+9.1f}  [{', '.join(f'{x:+.0f}' for x in d)}]")
            print(f"   GC per window: monitored {gcs['monitored']}; bare {gcs['bare']}")
    print(f"\nload average at end {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report | {"load_end": os.getloadavg()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
