"""Fan-in by node (issue 15): the aggregator's CPU per second when 10,000 simulated replicas
on 100 simulated nodes deliver directly (one call per replica per flush) or through node
mergers (one call per node per flush), and the CPU of one node merger of 100 replicas.

    nice .venv/bin/python benchmarks/bench_fanin.py [--nodes 100] [--replicas 100]
        [--period-s 20] [--mergers 5] [--senders 4] [--rounds 3] [--measure-s 20]
        [--json OUT]

Starts a local Ray cluster with the real aggregator actor (``get_or_create``, GPU
monitoring and node fan-in off so it starts nothing of its own) and ``--senders`` sender
actors that play the replicas: each replica's snapshot (2 methods x 2 outcomes, ~30
latency buckets, in-flight, health: bench_aggregator's "realistic") goes out through a
real Ray actor call, as a replica's flush thread sends it:

- ``direct``: ``aggregator.ingest.remote([snapshot])``, one call per replica (before);
- ``node``: ``merger.ingest.remote([snapshot])`` to a real ``NodeMergerActor`` (the real
  merger code, gathering, one ``aggregator.ingest_node`` forward per burst) (after);
- ``idle``: nothing sent: the aggregator's own loop, subtracted from the other two.

This machine cannot make 10,000 calls a second, so every replica flushes every
``--period-s`` seconds instead of every second: node k's replicas all send in the
second where ``t % period == k % period`` (replicas flush on whole seconds), so each
second ``nodes / period`` nodes burst with all their replicas, exactly one second's
worth of a ``nodes / period``-node cluster at the 1 s flush. In ``node``, ``--mergers``
real merger actors each take the bursts of ``nodes / mergers`` simulated nodes, at most
one burst per second: each merger's CPU per second is that of a real node merger of
``--replicas`` replicas at the 1 s flush.

CPU is ``utime + stime`` from ``/proc/<pid>/stat`` of the aggregator and merger
processes over ``--measure-s`` seconds after a warm-up of one period (the store holds
every replica's series by then). Variants alternate over ``--rounds``; medians and
min..max per variant. From what the aggregator took in each window (calls and
snapshots, its own counters) the script solves its cost per call (``c``) and per
snapshot (``s``) from the two variants, less idle, and projects both
to the 1 s flush: before ``replicas x nodes x (c + s)``, after ``nodes x c +
replicas x nodes x s``.
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
from ray_monitor.common.names import AGGREGATOR_NAME, NAMESPACE  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def actor_pid(handle) -> int:
    from ray._private.state import actors

    aid = handle._actor_id.hex()
    for _ in range(120):
        info = actors().get(aid) or {}
        if info.get("Pid") and info.get("State") == "ALIVE":
            return int(info["Pid"])
        time.sleep(0.5)
    raise RuntimeError(f"no pid for actor {aid}")


@ray.remote(num_cpus=0)
class Sender:
    """Plays the replicas of some simulated nodes: every snapshot one real actor call."""

    def __init__(self, nodes: list[int], n_nodes: int, replicas: int, period_s: int) -> None:
        self.nodes = nodes
        self.replicas = replicas
        self.period = period_s
        self.make, _ = snapshot_maker(n_nodes, replicas)  # deployment d stands for node d
        self.seq = 0

    def run(self, mode: str, until: float, mergers: list[str]) -> int:
        agg = ray.get_actor(AGGREGATOR_NAME, namespace=NAMESPACE)
        merger_handles = [ray.get_actor(m, namespace=NAMESPACE) for m in mergers]
        pending: list = []
        sent = 0
        while mode != "idle":
            now = time.time()
            t = float(int(now) + 1)  # the next whole second: replicas flush then
            if t >= until:
                break
            time.sleep(max(0.0, t - now))
            self.seq += 1
            for k in self.nodes:
                if int(t) % self.period != k % self.period:
                    continue
                target = agg.ingest if mode == "direct" else \
                    merger_handles[(k // self.period) % len(merger_handles)].ingest
                for r in range(self.replicas):
                    snap = self.make(k * self.replicas + r, self.seq, t)
                    pending.append(target.remote([snap], None))
                    sent += 1
            if len(pending) > 4000:  # keep the sender's own memory bounded
                _, pending = ray.wait(pending, num_returns=len(pending) - 2000)
        if mode == "idle":
            time.sleep(max(0.0, until - time.time()))
        ray.wait(pending, num_returns=len(pending), timeout=60)
        return sent


def start_ray(namespace: str) -> None:
    """Prints the command, Python and load, and starts a local Ray cluster (for every
    benchmark that drives real actors)."""
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("python", platform.python_version(), "| load average",
          " ".join(f"{x:.2f}" for x in os.getloadavg()), "|", time.strftime(
              "%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    for attempt in range(4):  # Ray gives its raylet 30 s, hard-coded: a busy machine
        try:
            ray.init(address="local", num_cpus=4, include_dashboard=False,
                     namespace=namespace,
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path[:1])}})
            return
        except Exception as e:
            if attempt == 3:
                raise
            print(f"Ray did not start ({e}); trying again", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--replicas", type=int, default=100, help="per node")
    ap.add_argument("--period-s", type=int, default=20)
    ap.add_argument("--mergers", type=int, default=5)
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--measure-s", type=float, default=20.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    start_ray(namespace="bench_fanin")
    from ray_monitor.aggregator.actor import get_or_create
    from ray_monitor.node.actor import NodeMergerActor

    agg = get_or_create({"port": 0, "gpu": False, "node_fanin": False})
    ray.get(agg.ready.remote(), timeout=120)
    agg_pid = actor_pid(agg)
    names = [f"bench_merger_{m}" for m in range(args.mergers)]
    mergers = [NodeMergerActor.options(name=n, namespace=NAMESPACE, max_concurrency=8192)
               .remote(node_id=f"sim{m}") for m, n in enumerate(names)]
    merger_pids = [actor_pid(h) for h in mergers]
    senders = [Sender.remote(list(range(i, args.nodes, args.senders)), args.nodes,
                             args.replicas, args.period_s) for i in range(args.senders)]
    rate = args.nodes * args.replicas / args.period_s
    print(f"{args.nodes} nodes x {args.replicas} replicas, each flushing every "
          f"{args.period_s} s: {rate:.0f} snapshots/s; {args.mergers} real mergers")

    rows: dict[str, list[dict]] = {"direct": [], "node": [], "idle": []}
    for rnd in range(args.rounds):
        for mode in (("direct", "node", "idle") if rnd % 2 == 0 else ("idle", "node", "direct")):
            start = time.time()
            until = start + args.period_s + args.measure_s + 1
            runs = [s.run.remote(mode, until, names) for s in senders]
            time.sleep(max(0.0, start + args.period_s + 1 - time.time()))  # warm-up
            f0 = ray.get(agg.stats.remote(), timeout=600)["fanin"]
            a0, m0, w0 = cpu_s(agg_pid), [cpu_s(p) for p in merger_pids], time.monotonic()
            time.sleep(args.measure_s)
            a1, m1, w1 = cpu_s(agg_pid), [cpu_s(p) for p in merger_pids], time.monotonic()
            f1 = ray.get(agg.stats.remote(), timeout=600)["fanin"]
            sent = sum(ray.get(runs, timeout=600))
            wall = w1 - w0
            # what the aggregator took in the window (it may lag what was offered)
            calls = sum(f1[k] - f0[k] for k in ("direct_calls", "node_calls")) / wall
            snaps = sum(f1[k] - f0[k] for k in ("direct_snapshots", "node_snapshots")) / wall
            row = {"agg_cpu_per_s": (a1 - a0) / wall,
                   "merger_cpu_per_s": [(b - a) / wall for a, b in zip(m0, m1)],
                   "calls_per_s": calls, "snapshots_per_s": snaps, "sent": sent,
                   "load": os.getloadavg()[0]}
            rows[mode].append(row)
            print(f"round {rnd} {mode:6s}: aggregator {row['agg_cpu_per_s'] * 1000:7.1f} ms/s "
                  f"for {calls:.1f} calls/s, {snaps:.0f} snapshots/s; mergers "
                  f"{[round(x * 1000, 1) for x in row['merger_cpu_per_s']]} ms/s; "
                  f"load {row['load']:.1f}", flush=True)

    def med(xs):
        return statistics.median(xs), min(xs), max(xs)

    idle = med([r["agg_cpu_per_s"] for r in rows["idle"]])
    # what the deliveries cost: less the aggregator's own loop with nothing arriving
    d = med([r["agg_cpu_per_s"] - idle[0] for r in rows["direct"]])
    n = med([r["agg_cpu_per_s"] - idle[0] for r in rows["node"]])
    m = med([x for r in rows["node"] for x in r["merger_cpu_per_s"]])
    # CPU = calls x c + snapshots x s, from the medians of what each variant took
    cd = statistics.median(r["calls_per_s"] for r in rows["direct"])
    sd = statistics.median(r["snapshots_per_s"] for r in rows["direct"])
    cn = statistics.median(r["calls_per_s"] for r in rows["node"])
    sn = statistics.median(r["snapshots_per_s"] for r in rows["node"])
    c = (d[0] * sn - n[0] * sd) / (cd * sn - cn * sd)
    s = (n[0] - cn * c) / sn
    calls_direct, calls_node = cd, cn
    total = args.nodes * args.replicas
    print("\naggregator CPU per second (median, min..max), less its idle "
          f"{idle[0] * 1000:.1f} ms/s ({idle[1] * 1000:.1f}..{idle[2] * 1000:.1f}):")
    print(f"  direct: {d[0] * 1000:.1f} ms/s ({d[1] * 1000:.1f}..{d[2] * 1000:.1f}) for "
          f"{calls_direct:.0f} calls/s")
    print(f"  node:   {n[0] * 1000:.1f} ms/s ({n[1] * 1000:.1f}..{n[2] * 1000:.1f}) for "
          f"{calls_node:.0f} calls/s")
    print(f"  per call c = {c * 1e6:.0f} us, per snapshot s = {s * 1e6:.0f} us")
    print(f"  projected, {total} replicas at the 1 s flush: before "
          f"{total * (c + s):.2f} cores, after {args.nodes * c + total * s:.2f} cores")
    print(f"  one core holds: before {1 / (c + s):.0f} replicas, after "
          f"{1 / (s + c / args.replicas):.0f} replicas ({args.replicas} per node)")
    print(f"node merger of {args.replicas} replicas at the 1 s flush: {m[0] * 1000:.1f} ms/s "
          f"({m[1] * 1000:.1f}..{m[2] * 1000:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "per_call_s": c, "per_snapshot_s": s},
                      f, indent=1)
    ray.shutdown()


if __name__ == "__main__":
    main()
