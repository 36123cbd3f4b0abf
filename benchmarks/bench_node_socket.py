"""Same-node delivery (issue 15): a replica's delivery to its node's merger by Ray actor
call against over the merger's Unix socket: the replica's CPU per delivery and the
merger's CPU per second for ``--replicas`` replicas flushing every second.

    nice .venv/bin/python benchmarks/bench_node_socket.py [--replicas 100] [--rounds 4]
        [--measure-s 10] [--json OUT]

Starts a local Ray cluster, the real aggregator (``node_fanin=False``, GPU off: it starts
nothing of its own) and one real ``NodeMergerActor`` for this node under its real name
(so it listens on the node's real socket). This process plays ``--replicas`` replicas,
each with its own real sink, sending one realistic snapshot (bench_aggregator's: 2
methods x 2 outcomes, ~30 buckets, in-flight, health) on every whole second, as a
replica's flush thread does:

- ``ray-call``: ``ActorSink`` (``merger.ingest.remote``, answers checked with
  ``ray.wait(timeout=0)`` at the next flush): the path before;
- ``socket``: ``LocalSink`` over the merger's socket (one connection per replica),
  answers read at the next flush: the path after;
- ``idle``: nothing sent (the processes' own idle CPU, taken off the other two).

Variants take turns over ``--rounds`` (order rotated), each for ``--measure-s`` after a
2 s settle. Per variant, median and min..max over rounds of: the merger process's CPU
(ms/s, less idle), the sending thread's CPU per delivery (``time.thread_time()`` around
``sink.send``: what the flush thread pays) and this whole process's CPU per delivery
(schedstat of every thread, less idle and less building the snapshots: Ray's calls also
cost its io threads), and deliveries that did not go the variant's way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

import ray

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_aggregator import snapshot_maker  # noqa: E402
from benchmarks.bench_fanin import actor_pid  # noqa: E402
from ray_monitor.common import node_socket as wire  # noqa: E402
from ray_monitor.common.names import AGGREGATOR_NAME, NAMESPACE, node_merger_name  # noqa: E402


def cpu_s(pid: int) -> float:
    """A process's CPU seconds: the scheduler's run time of each of its threads (ns)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ValueError):
            continue
    return total / 1e9


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}..{max(xs):.1f})" if xs else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, kind, default in (("--replicas", int, 100), ("--rounds", int, 4),
                                ("--measure-s", float, 10.0), ("--json", str, None)):
        ap.add_argument(flag, type=kind, default=default)
    args = ap.parse_args()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"command: {shlex.join([sys.executable, *sys.argv])}\npython "
          f"{platform.python_version()} | load average {load} | "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             namespace="bench_node_socket", log_to_driver=False)
    import ray_monitor
    from ray_monitor.node.actor import NodeMergerActor
    from ray_monitor.replica.delivery import ActorSink
    from ray_monitor.replica.local_sink import LocalSink

    try:
        ray_monitor.start(port=0, gpu=False, node_fanin=False)
        node = ray.get_runtime_context().get_node_id()
        merger = NodeMergerActor.options(name=node_merger_name(node), namespace=NAMESPACE,
                                         max_concurrency=8192).remote(
            node_id=node, sink=AGGREGATOR_NAME, namespace=NAMESPACE)
        ray.get(merger.stats.remote())
        mpid, me = actor_pid(merger), os.getpid()
        path = wire.socket_path(wire.session_dir(), node)
        for _ in range(100):
            if path and os.path.exists(path):
                break
            time.sleep(0.1)
        print("merger pid", mpid, "socket", path, "exists", bool(path and os.path.exists(path)))
        make, _ = snapshot_maker(1, args.replicas)
        sinks = {"ray-call": [ActorSink(node_id=node) for _ in range(args.replicas)],
                 "socket": [LocalSink(ActorSink(node_id=node), path)
                            for _ in range(args.replicas)]}
        kept: dict[str, list[list]] = {v: [[] for _ in range(args.replicas)] for v in sinks}
        seq = [0]

        def drive(variant: str, seconds: float) -> dict:
            """Sends for ``seconds`` of whole-second flushes; CPU over that span."""
            out = {"deliveries": 0, "send_s": 0.0, "make_s": 0.0, "other_way": 0}
            now = time.time()
            t = float(int(now) + 1)
            time.sleep(t - now)
            c_m, c_p, w0 = cpu_s(mpid), cpu_s(me), time.monotonic()
            until = t + seconds
            while t < until:
                if variant != "idle":
                    seq[0] += 1
                    m0 = time.thread_time()
                    snaps = [make(i, seq[0], t) for i in range(args.replicas)]
                    out["make_s"] += time.thread_time() - m0
                    for i, sink in enumerate(sinks[variant]):
                        before = getattr(sink, "socket_deliveries", None)
                        s0 = time.thread_time()
                        kept[variant][i] = sink.send(kept[variant][i] + [snaps[i]])
                        out["send_s"] += time.thread_time() - s0
                        out["deliveries"] += 1
                        if before is not None and sink.socket_deliveries == before:
                            out["other_way"] += 1
                t += 1.0
                time.sleep(max(0.0, t - time.time()))
            dt = time.monotonic() - w0
            out.update(dt=dt, merger_s=cpu_s(mpid) - c_m, process_s=cpu_s(me) - c_p)
            return out

        for v in ("ray-call", "socket"):  # connect, look up, warm every path
            drive(v, 4.0)
        variants = ["idle", "ray-call", "socket"]
        rows: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):
            k = r % len(variants)
            for v in variants[k:] + variants[:k]:
                drive(v, 2.0)  # settle: answers of the other variant, this one's first
                rows[v].append(drive(v, args.measure_s))
                print(f"round {r + 1} {v}: {rows[v][-1]} | load {os.getloadavg()[0]:.1f}",
                      flush=True)
        idle_m = statistics.median(x["merger_s"] / x["dt"] for x in rows["idle"])
        idle_p = statistics.median(x["process_s"] / x["dt"] for x in rows["idle"])
        summary = {}
        print(f"\nidle: merger {idle_m * 1e3:.1f} ms/s, this process {idle_p * 1e3:.1f} ms/s")
        print("| variant | merger ms/s for %d replicas (less idle) | send, us per delivery "
              "(flush thread) | process, us per delivery (all threads, less idle and "
              "snapshot building) | deliveries the other way |" % args.replicas)
        print("| --- | --- | --- | --- | --- |")
        for v in ("ray-call", "socket"):
            m = [(x["merger_s"] / x["dt"] - idle_m) * 1e3 for x in rows[v]]
            s = [x["send_s"] / x["deliveries"] * 1e6 for x in rows[v]]
            p = [(x["process_s"] - idle_p * x["dt"] - x["make_s"]) / x["deliveries"] * 1e6
                 for x in rows[v]]
            other = sum(x["other_way"] for x in rows[v])
            summary[v] = {"merger_ms_s": m, "send_us": s, "process_us": p, "other_way": other}
            print(f"| {v} | {spread(m)} | {spread(s)} | {spread(p)} | {other} |")
        print("load average at the end", " ".join(f"{x:.2f}" for x in os.getloadavg()))
        print("merger stats", ray.get(merger.stats.remote()))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "summary": summary, "idle_merger_s": idle_m,
                           "idle_process_s": idle_p}, f, indent=1)
    finally:
        try:
            ray_monitor.stop()
        except Exception:
            pass
        ray.shutdown()


if __name__ == "__main__":
    main()
