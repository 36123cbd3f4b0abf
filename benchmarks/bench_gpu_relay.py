"""Fan-in under shards (issue 15, RESULTS §24): what shard 0's GPU relay and the node
mergers' report-only forwards cost the aggregator shards.

    nice .venv/bin/python benchmarks/bench_gpu_relay.py [--shards 4] [--nodes 100]
        [--gpus 8] [--apps 20] [--apps-per-node 2] [--rounds 2] [--measure-s 15]
        [--json OUT]

Real aggregator shards (``get_or_create(shard=i)``, GPU management on with the fake NVML
of the tests, node fan-in management off) run throughout. Each simulated node has
``--gpus`` GPUs and one replica per GPU, of ``--apps-per-node`` of the ``--apps``
applications (node k's: ``app{(k * apps_per_node + j) % apps}``); each replica
delivers one snapshot to its own shard first, so every shard knows its replicas and
shard 0's relay (refreshed every 3 s) knows the others'. A ``Sender`` actor then plays,
by mode:

- ``gpu``: every node's GPU-stats actor: one ``ingest_gpu`` call to shard 0 per node per
  second (the default ``gpu_interval_s``), each sample ``--gpus`` devices and one process
  per replica. Shard 0 joins it to every shard's replicas, ingests it and passes it on
  (``GpuRelay``: since RESULTS §24 only to the shards with a process on the node's GPUs,
  gathered into one call per shard a second; before, one call per sample to every other
  shard), and each of those joins its own replicas and ingests its share;
- ``empty``: every node's merger when none of its replicas is shard 0's: a forward of no
  snapshots to shard 0 every ``REPORT_EVERY_S`` (5 s), carrying its counters;
- ``idle``: nothing sent: each shard's own loop (and the one real GPU actor's samples of
  the local node), subtracted from the others.

CPU is ``utime + stime`` of every shard process over ``--measure-s`` seconds after a 5 s
warm-up; modes alternate over ``--rounds``; medians and min..max.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import ray

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_fanin import actor_pid, cpu_s, start_ray  # noqa: E402
from ray_monitor.common.names import NAMESPACE  # noqa: E402


def identity(k: int, g: int, gpus: int, apps: int, per_node: int):
    from ray_monitor.common.snapshot import ReplicaIdentity

    r, a = k * gpus + g, (k * per_node + g % per_node) % apps
    return ReplicaIdentity(f"app{a}", f"Dep{a}", f"Dep{a}#r{r}", f"node{k}", 100_000 + r, "v1")


@ray.remote(num_cpus=0)
class Sender:
    """Plays the GPU-stats actors and node mergers of ``--nodes`` simulated nodes."""

    def __init__(self, nodes: int, gpus: int, apps: int, per_node: int, shards: int) -> None:
        from ray_monitor.common.names import AGGREGATOR_NAME
        from ray_monitor.common.shards import shard_name

        self.nodes, self.gpus, self.apps, self.per_node = nodes, gpus, apps, per_node
        self.shards = [ray.get_actor(AGGREGATOR_NAME if i == 0 else shard_name(i),
                                     namespace=NAMESPACE) for i in range(shards)]

    def register(self) -> int:
        """One replica snapshot of every replica to its own shard."""
        from ray_monitor.common.shards import shard_of
        from ray_monitor.common.snapshot import ReplicaSnapshot

        now = time.time()
        calls = [self.shards[shard_of(ident.application, len(self.shards))].ingest.remote(
                 [ReplicaSnapshot(ident, 1, now - 1, now, [])], None)
                 for k in range(self.nodes) for g in range(self.gpus)
                 for ident in [identity(k, g, self.gpus, self.apps, self.per_node)]]
        ray.get(calls, timeout=300)
        return len(calls)

    def sample(self, k: int, t: float):
        from ray_monitor.common.snapshot import GpuDevice, GpuProcess, GpuSnapshot

        devices = [GpuDevice(g, f"GPU-{k}-{g}", "NVIDIA H100 80GB HBM3", {
            "utilization_ratio": 0.5, "memory_used_bytes": 4e10, "memory_total_bytes": 8e10,
            "temperature_celsius": 60.0, "power_watts": 400.0, "throttled": 0.0})
            for g in range(self.gpus)]
        processes = [GpuProcess(g, f"GPU-{k}-{g}", identity(
            k, g, self.gpus, self.apps, self.per_node).pid, 2 ** 34, 0.4) for g in range(self.gpus)]
        return GpuSnapshot(f"node{k}", t, devices, processes)

    def run(self, mode: str, until: float) -> int:
        pending: list = []
        sent = 0
        shard0 = self.shards[0]
        while mode != "idle":
            now = time.time()
            t = float(int(now) + 1)
            if t >= until:
                break
            time.sleep(max(0.0, t - now))
            for k in range(self.nodes):
                if mode == "gpu":
                    pending.append(shard0.ingest_gpu.remote(self.sample(k, t)))
                elif int(t) % 5 == k % 5:  # every node once per REPORT_EVERY_S
                    report = {"node_id": f"node{k}", "calls": 1000, "snapshots": 1000,
                              "forwards": 100, "forward_failures": 0, "dropped": 0,
                              "held": 0, "socket_calls": 1000, "socket_errors": 0}
                    pending.append(shard0.ingest_node.remote([], None, report))
                else:
                    continue
                sent += 1
            if len(pending) > 2000:
                _, pending = ray.wait(pending, num_returns=len(pending) - 1000)
        if mode == "idle":
            time.sleep(max(0.0, until - time.time()))
        ray.wait(pending, num_returns=len(pending), timeout=60)
        return sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--apps", type=int, default=20)
    ap.add_argument("--apps-per-node", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--measure-s", type=float, default=15.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    start_ray(namespace="bench_gpu_relay")
    from ray_monitor.aggregator.actor import get_or_create
    from ray_monitor.common.shards import save_count

    n = args.shards
    save_count(n)
    cfg = {"port": 0, "gpu": True, "nvml_factory": "tests.fake_nvml:make_fake",
           "node_fanin": False, "shards": n, "series_ttl_s": 3600}
    shards = [get_or_create(cfg, shard=i) for i in range(n)]
    ray.get([s.ready.remote() for s in shards], timeout=120)
    pids = [actor_pid(s) for s in shards]
    sender = Sender.remote(args.nodes, args.gpus, args.apps, args.apps_per_node, n)
    print(f"{n} shards; {args.nodes} nodes x {args.gpus} GPUs, one replica each: "
          f"{ray.get(sender.register.remote(), timeout=600)} replicas registered")
    time.sleep(4)  # shard 0's relay asks the others for their replicas every 3 s
    rows: dict[str, list[dict]] = {"gpu": [], "empty": [], "idle": []}
    for rnd in range(args.rounds):
        for mode in (("gpu", "empty", "idle") if rnd % 2 == 0 else ("idle", "empty", "gpu")):
            start = time.time()
            run = sender.run.remote(mode, start + 5 + args.measure_s + 1)
            time.sleep(5)
            c0, w0 = [cpu_s(p) for p in pids], time.monotonic()
            time.sleep(args.measure_s)
            c1, w1 = [cpu_s(p) for p in pids], time.monotonic()
            sent = ray.get(run, timeout=600)
            row = {"cpu_per_s": [(b - a) / (w1 - w0) for a, b in zip(c0, c1)], "sent": sent,
                   "load": os.getloadavg()[0]}
            rows[mode].append(row)
            print(f"round {rnd} {mode:5s}: shards {[round(x * 1000, 1) for x in row['cpu_per_s']]}"
                  f" ms/s, {sent} calls sent; load {row['load']:.1f}", flush=True)
    idle = [statistics.median(r["cpu_per_s"][i] for r in rows["idle"]) for i in range(n)]
    print(f"\nshard CPU per second less its idle loop (median, min..max over rounds); idle "
          f"{[round(x * 1000, 1) for x in idle]} ms/s")
    for mode, rate in (("gpu", args.nodes), ("empty", args.nodes / 5)):
        per = [[r["cpu_per_s"][i] - idle[i] for r in rows[mode]] for i in range(n)]
        print(f"  {mode:5s} ({rate:g} calls/s to shard 0): " + ", ".join(
            f"#{i} {statistics.median(p) * 1000:.1f} ({min(p) * 1000:.1f}..{max(p) * 1000:.1f})"
            for i, p in enumerate(per)) + " ms/s; per call to shard 0: " + ", ".join(
            f"#{i} {statistics.median(p) / rate * 1e6:.0f} us" for i, p in enumerate(per)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    ray.shutdown()


if __name__ == "__main__":
    main()
