"""Past one aggregator (issue 15): the CPU of each aggregator shard when 10,000 simulated
replicas on 100 simulated nodes deliver through node mergers to one aggregator or to N
shards (applications hashed to shards, each merger's forward split by shard).

    nice .venv/bin/python benchmarks/bench_shards.py [--shards 2] [--nodes 100]
        [--replicas 100] [--apps 20] [--period-s 25] [--mergers 4] [--senders 4]
        [--rounds 2] [--measure-s 20] [--json OUT]

The method of ``bench_fanin.py`` (which see): ``--senders`` actors play the replicas,
each snapshot (2 methods x 2 outcomes, ~30 latency buckets) one real Ray call to a real
``NodeMergerActor``, every replica flushing every ``--period-s`` seconds so that each
second is one second's worth of a ``nodes / period``-node cluster at the 1 s flush. The
replicas of every node belong to ``--apps`` applications (replica r: ``app{r % apps}``),
so every node holds applications of every shard, as on a real cluster.

The real aggregator shards (``get_or_create(shard=i)``, GPU and fan-in management off)
run throughout; two sets of ``--mergers`` real mergers take turns:

- ``one``: mergers that read a shard count of 1 (all forwards to shard 0: one aggregator);
- ``sharded``: mergers that read ``--shards`` (one call per node per shard per flush);
- ``idle``: nothing sent: each shard's own loop, subtracted from the other two.

CPU is ``utime + stime`` of every shard process over ``--measure-s`` seconds after a
warm-up of one period. Variants alternate over ``--rounds``; medians and min..max. The
figure that matters is the busiest shard's: one Python process is one core.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import ray

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_aggregator import snapshot_maker  # noqa: E402
from benchmarks.bench_fanin import actor_pid, cpu_s, start_ray  # noqa: E402
from ray_monitor.common.names import NAMESPACE  # noqa: E402


@ray.remote(num_cpus=0)
class Sender:
    """Plays the replicas of some simulated nodes: every snapshot one real actor call."""

    def __init__(self, nodes: list[int], n_nodes: int, replicas: int, apps: int,
                 period_s: int) -> None:
        self.nodes = nodes
        self.replicas = replicas
        self.apps = apps
        self.period = period_s
        self.make, _ = snapshot_maker(n_nodes, replicas)  # deployment d stands for node d
        self.seq = 0

    def snap(self, i: int, seq: int, t: float):
        s = self.make(i, seq, t)
        app = f"app{(i % self.replicas) % self.apps}"
        return dataclasses.replace(s, identity=dataclasses.replace(s.identity, application=app))

    def warm(self, merger: str) -> None:
        """One delivery of every application, so the merger reads the shard count now."""
        h = ray.get_actor(merger, namespace=NAMESPACE)
        ray.get([h.ingest.remote([self.snap(r, 0, float(int(time.time())))], None)
                 for r in range(self.apps)], timeout=120)

    def run(self, mode: str, until: float, mergers: list[str]) -> int:
        handles = [ray.get_actor(m, namespace=NAMESPACE) for m in mergers]
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
                target = handles[(k // self.period) % len(handles)].ingest
                for r in range(self.replicas):
                    pending.append(target.remote([self.snap(k * self.replicas + r,
                                                            self.seq, t)], None))
                    sent += 1
            if len(pending) > 4000:  # keep the sender's own memory bounded
                _, pending = ray.wait(pending, num_returns=len(pending) - 2000)
        if mode == "idle":
            time.sleep(max(0.0, until - time.time()))
        ray.wait(pending, num_returns=len(pending), timeout=60)
        return sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--replicas", type=int, default=100, help="per node")
    ap.add_argument("--apps", type=int, default=20)
    ap.add_argument("--period-s", type=int, default=25)
    ap.add_argument("--mergers", type=int, default=4)
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--measure-s", type=float, default=20.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    start_ray(namespace="bench_shards")
    from ray_monitor.aggregator.actor import get_or_create
    from ray_monitor.common.shards import save_count, shard_of
    from ray_monitor.node.actor import NodeMergerActor

    n = args.shards
    cfg = {"port": 0, "gpu": False, "node_fanin": False, "shards": n}
    shards = [get_or_create(cfg, shard=i) for i in range(n)]
    ray.get([s.ready.remote() for s in shards], timeout=120)
    pids = [actor_pid(s) for s in shards]
    owners = [shard_of(f"app{a}", n) for a in range(args.apps)]
    print(f"{n} shards; applications per shard: {[owners.count(i) for i in range(n)]}")
    senders = [Sender.remote(list(range(i, args.nodes, args.senders)), args.nodes,
                             args.replicas, args.apps, args.period_s)
               for i in range(args.senders)]
    sets, mergers = {}, []  # the handles kept: a merger lives as long as its handle
    for variant, count in (("one", 1), ("sharded", n)):
        save_count(count)  # each merger reads it at its first forward and keeps it
        names = [f"bench_{variant}_{m}" for m in range(args.mergers)]
        for m, name in enumerate(names):
            mergers.append(NodeMergerActor.options(name=name, namespace=NAMESPACE,
                                                   max_concurrency=8192)
                           .remote(node_id=f"{variant}{m}"))
            ray.get(mergers[-1].stats.remote(), timeout=120)
        ray.get([senders[0].warm.remote(name) for name in names], timeout=300)
        sets[variant] = names
    save_count(n)
    rate = args.nodes * args.replicas / args.period_s
    print(f"{args.nodes} nodes x {args.replicas} replicas, each flushing every "
          f"{args.period_s} s: {rate:.0f} snapshots/s; {args.mergers} real mergers per set")

    def fanin() -> list[dict]:
        return [ray.get(s.stats.remote(True), timeout=600)["fanin"] for s in shards]

    rows: dict[str, list[dict]] = {"one": [], "sharded": [], "idle": []}
    for rnd in range(args.rounds):
        for mode in (("one", "sharded", "idle") if rnd % 2 == 0 else ("idle", "sharded", "one")):
            start = time.time()
            until = start + args.period_s + args.measure_s + 1
            runs = [s.run.remote(mode, until, sets.get(mode, sets["one"])) for s in senders]
            time.sleep(max(0.0, start + args.period_s + 1 - time.time()))  # warm-up
            f0 = fanin()
            c0, w0 = [cpu_s(p) for p in pids], time.monotonic()
            time.sleep(args.measure_s)
            c1, w1 = [cpu_s(p) for p in pids], time.monotonic()
            f1 = fanin()
            sent = sum(ray.get(runs, timeout=600))
            wall = w1 - w0
            row = {"cpu_per_s": [(b - a) / wall for a, b in zip(c0, c1)],
                   "calls_per_s": [(b["node_calls"] - a["node_calls"]) / wall
                                   for a, b in zip(f0, f1)],
                   "snapshots_per_s": [(b["node_snapshots"] - a["node_snapshots"]) / wall
                                       for a, b in zip(f0, f1)],
                   "sent": sent, "load": os.getloadavg()[0]}
            rows[mode].append(row)
            print(f"round {rnd} {mode:7s}: shards "
                  f"{[round(x * 1000, 1) for x in row['cpu_per_s']]} ms/s for "
                  f"{[round(x, 1) for x in row['calls_per_s']]} calls/s, "
                  f"{[round(x) for x in row['snapshots_per_s']]} snapshots/s; "
                  f"load {row['load']:.1f}", flush=True)

    def med(xs):
        return statistics.median(xs), min(xs), max(xs)

    idle = [statistics.median(r["cpu_per_s"][i] for r in rows["idle"]) for i in range(n)]
    print("\nshard CPU per second less its idle loop (median, min..max over rounds); idle "
          f"{[round(x * 1000, 1) for x in idle]} ms/s")
    out = {}
    for mode in ("one", "sharded"):
        per = [med([r["cpu_per_s"][i] - idle[i] for r in rows[mode]]) for i in range(n)]
        busiest = med([max(c - idle[i] for i, c in enumerate(r["cpu_per_s"]))
                       for r in rows[mode]])
        total = med([sum(c - idle[i] for i, c in enumerate(r["cpu_per_s"]))
                     for r in rows[mode]])
        calls = [statistics.median(r["calls_per_s"][i] for r in rows[mode]) for i in range(n)]
        snaps = [statistics.median(r["snapshots_per_s"][i] for r in rows[mode])
                 for i in range(n)]
        out[mode] = {"busiest": busiest, "total": total}
        print(f"  {mode:7s}: busiest shard {busiest[0] * 1000:.1f} ms/s "
              f"({busiest[1] * 1000:.1f}..{busiest[2] * 1000:.1f}); all shards "
              f"{total[0] * 1000:.1f} ms/s; per shard "
              + ", ".join(f"#{i} {p[0] * 1000:.1f} ms/s ({calls[i]:.1f} calls/s, "
                          f"{snaps[i]:.0f} snaps/s)" for i, p in enumerate(per)))
    scale = args.period_s  # one second of the whole cluster at the 1 s flush
    for mode in ("one", "sharded"):
        print(f"  projected, {args.nodes * args.replicas} replicas at the 1 s flush "
              f"({mode}): busiest shard {out[mode]['busiest'][0] * scale:.2f} cores")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    ray.shutdown()


if __name__ == "__main__":
    main()
