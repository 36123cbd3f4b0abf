"""GPU-stats actors on a real Ray cluster (issue 4), with the fake NVML of tests/fake_nvml.py.

One actor per alive node, pinned there; a node that joins gets one, a node that leaves loses
its own and it is not re-created elsewhere; snapshots reach the aggregator labelled with
their node; GPU processes are joined to the Serve replica that owns the pid; rules over GPU
metrics fire; ``/metrics`` carries the GPU families and passes ``promtool check metrics``.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid

import pytest
import ray
import requests
from ray import serve

from ray_monitor import monitor
from ray_monitor.common.names import gpu_actor_name as actor_name
from tests.conftest import wait_until
from tests.fake_nvml import GiB, ExtraProcess, set_cluster_processes
from tests.servers import promtool

pytestmark = pytest.mark.ray

MODEL = "NVIDIA H100 80GB HBM3"  # what make_fake() reports for both of its GPUs


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def live_gpu_actors() -> list[dict]:
    """GpuStatsActors the GCS holds as not dead (the state API needs the dashboard, off here)."""
    from ray._private.state import actors

    return [a for a in actors().values()
            if a["ActorClassName"] == "GpuStatsActor" and a["State"] != "DEAD"]


def series(mon, function: str, metric: str, window_s: float, by: tuple[str, ...]) -> dict:
    """``mon.query`` with its JSON keys turned back into label tuples (in ``by`` order)."""
    out = {}
    for key, value in mon.query(function, metric, window_s, by=by).items():
        labels = json.loads(key)
        out[tuple(labels[name] for name in by)] = value
    return out


def actors_on(mon, nodes: set[str]):
    actors = mon.gpu_actors()
    return set(actors) == nodes and actors


def check_pinned(actors: dict) -> None:
    running = {node: ray.get(h.running_node_id.remote(), timeout=60) for node, h in actors.items()}
    assert running == {node: node for node in actors}


def test_one_gpu_actor_per_node_as_nodes_join_and_leave(ray_cluster, mon):
    head_nodes = alive_nodes()
    actors = wait_until(lambda: actors_on(mon, head_nodes), timeout=30, what="an actor per node")
    check_pinned(actors)
    head_actor_ids = {a["ActorID"] for a in live_gpu_actors()}

    node = ray_cluster.add_node(num_cpus=1)
    try:
        ray_cluster.wait_for_nodes()
        joined = time.monotonic()
        both = alive_nodes()
        (new,) = both - head_nodes
        actors = wait_until(lambda: actors_on(mon, both), timeout=30, what="an actor for the new node")
        started = time.monotonic()
        check_pinned(actors)

        def every_node_reported():
            snaps = mon.gpus()
            return both <= set(snaps) and all(len(snaps[n].devices) == 2 for n in both) and snaps
        snaps = wait_until(every_node_reported, timeout=60, what="a GPU snapshot from every node")
        print(f"new node: actor started {started - joined:.1f}s after it joined, "
              f"first snapshot at the aggregator {time.monotonic() - joined:.1f}s after")
        for node_id in both:
            assert snaps[node_id].node_id == node_id
            assert snaps[node_id].no_gpus_reason is None
            assert [(d.index, d.model) for d in snaps[node_id].devices] == [(0, MODEL), (1, MODEL)]
        want = {(n, g) for n in both for g in ("0", "1")}
        wait_until(lambda: want <= set(series(mon, "avg", "gpu_utilization", 60, ("node", "gpu"))),
                   timeout=30, what=f"gpu_utilization series for {sorted(want)}")
        text = requests.get(mon.metrics_url, timeout=10).text
        for node_id in both:
            assert re.search(rf'^ray_monitor_gpu_utilization_ratio{{[^}}]*node="{node_id}"', text, re.M), node_id
    finally:
        ray_cluster.remove_node(node)
    removed = time.monotonic()

    actors = wait_until(lambda: actors_on(mon, head_nodes), timeout=60, what="the dead node's actor forgotten")
    print(f"removed node: its actor forgotten {time.monotonic() - removed:.1f}s after")
    check_pinned(actors)
    # The dead node's actor is dead, not restarted anywhere; the head's own actor is untouched.
    live = wait_until(lambda: (a := live_gpu_actors()) and all(x["Name"] != actor_name(new) for x in a) and a,
                      timeout=60, what="the dead node's GpuStatsActor dead")
    assert {a["Address"]["NodeID"] for a in live} == head_nodes
    assert {a["Name"] for a in live} == {actor_name(n) for n in head_nodes}
    assert {a["ActorID"] for a in live} == head_actor_ids


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor
class GpuUser:
    def whoami(self) -> dict:
        ctx = serve.get_replica_context()
        return {"pid": os.getpid(), "replica": ctx.replica_id.unique_id,
                "node": ray.get_runtime_context().get_node_id()}

    async def __call__(self, x: int) -> int:
        return x


def rules_for(app: str) -> str:
    return f"""
groups:
  - name: gpu
    interval: 1s
    rules:
      - alert: GpuHot
        expr: max(gpu_temperature_celsius[10s]) by (node, gpu) > 39
      - alert: GpuNeverThisHot
        expr: min(gpu_temperature_celsius[10s]) by (node, gpu) > 69
      - alert: DeploymentGpuBusy
        expr: avg(gpu_utilization{{application="{app}"}}[10s]) by (application, deployment) > 0
      - alert: ReplicaGpuMemory
        expr: max(replica_gpu_memory_bytes{{application="{app}"}}[10s]) by (application, deployment, replica) > {2 * GiB}
"""


def _gpu_user(mon, serve_apps) -> tuple[str, dict]:
    """A GpuUser application and its replica's whoami, once the aggregator knows the
    replica (it joins GPU pids only to replicas it has heard from)."""
    app = f"g{uuid.uuid4().hex[:8]}"
    serve_apps.append(app)
    h = serve.run(GpuUser.bind(), name=app, route_prefix=f"/{app}")
    me = h.whoami.remote().result(timeout_s=60)
    wait_until(lambda: any(d["application"] == app and d["replicas"] == 1 for d in mon.deployments()),
               timeout=60, what="the replica known to the aggregator")
    return app, me


def test_gpu_processes_are_joined_to_replicas_and_rules_fire(mon, serve_apps):
    app, me = _gpu_user(mon, serve_apps)
    stranger = os.getpid()  # a real process on this node that is no replica: the test driver
    set_cluster_processes([ExtraProcess(gpu=0, pid=me["pid"], used_memory=3 * GiB, sm_util=55, node_id=me["node"]),
                           ExtraProcess(gpu=1, pid=stranger, used_memory=1 * GiB, node_id=me["node"])])
    try:
        by = ("node", "gpu", "application", "deployment", "replica", "pid")
        ours = (me["node"], "0", app, "GpuUser", me["replica"], str(me["pid"]))
        theirs = (me["node"], "1", "", "", "", str(stranger))
        memory = wait_until(lambda: (s := series(mon, "last", "replica_gpu_memory_bytes", 10, by))
                            and ours in s and theirs in s and s,
                            timeout=30, what="per-replica GPU memory series")
        assert memory[ours] == 3 * GiB and memory[theirs] == 1 * GiB
        util = wait_until(lambda: (s := series(mon, "last", "replica_gpu_utilization", 10, by)) and ours in s and s,
                          timeout=30, what="per-replica SM utilization")
        assert util[ours] == pytest.approx(0.55)
        assert theirs not in util  # no SM sample for that process: no series, not a zero
        procs = {p.pid: p for p in mon.gpus()[me["node"]].processes}
        assert procs[me["pid"]].replica.replica == me["replica"]
        assert procs[stranger].replica is None

        mon.reload(rules_for(app))
        try:
            def firing(name: str, count: int, **labels: str):
                got = [a for a in mon.alerts() if a["name"] == name and a["state"] == "firing"
                       and labels.items() <= a["labels"].items()]
                return len(got) >= count and got
            # Only this node's: a node removed by an earlier test still has samples in the window.
            hot = wait_until(lambda: firing("GpuHot", 2, node=me["node"]), timeout=30, what="GpuHot firing")
            assert sorted(a["labels"]["gpu"] for a in hot) == ["0", "1"]
            assert all(40 <= a["value"] <= 69 for a in hot), hot
            (busy,) = wait_until(lambda: firing("DeploymentGpuBusy", 1), timeout=30, what="DeploymentGpuBusy firing")
            assert (busy["labels"]["application"], busy["labels"]["deployment"]) == (app, "GpuUser")
            (held,) = wait_until(lambda: firing("ReplicaGpuMemory", 1), timeout=30, what="ReplicaGpuMemory firing")
            assert held["labels"]["replica"] == me["replica"] and held["value"] == 3 * GiB
            # Evaluated in the same rounds as the three above, over the same series.
            assert not [a for a in mon.alerts() if a["name"] == "GpuNeverThisHot"]
        finally:
            mon.reload("groups: []")
    finally:
        set_cluster_processes([])


def test_gpu_seconds_of_a_replica_are_priced_from_the_rule_files_prices(mon, serve_apps):
    """Issue 14: cost{part="gpu"} is the price per GPU-second times the GPU-seconds the
    fake NVML's process list attributed to the replica, exactly."""
    app, me = _gpu_user(mon, serve_apps)
    price = 0.002
    mon.reload({"groups": [], "prices": {"GpuUser": {"per_gpu_second": price}}})  # no model named
    by = ("application", "deployment", "replica")
    ours = (app, "GpuUser", me["replica"])

    def seconds():
        return series(mon, "sum", "replica_gpu_seconds", 600, by).get(ours, 0.0)
    try:
        set_cluster_processes([ExtraProcess(gpu=0, pid=me["pid"], used_memory=GiB, node_id=me["node"]),
                               ExtraProcess(gpu=1, pid=me["pid"], used_memory=GiB, node_id=me["node"])])
        wait_until(lambda: seconds() >= 4, timeout=60, what="GPU-seconds attributed to the replica")
    finally:
        set_cluster_processes([])

    def settled():  # no process left: the attributed seconds stop growing
        now = seconds()
        time.sleep(2.5)
        return seconds() == now and now
    total = wait_until(settled, timeout=60, what="GPU-seconds settled")
    cost = {k: v for k, v in series(mon, "sum", "cost", 600,
                                    ("application", "deployment", "tenant", "part")).items()
            if k[0] == app}  # the session's other applications may be priced too
    assert cost == {(app, "GpuUser", "", "gpu"): pytest.approx(price * total, rel=1e-9)}
    print(f"GPU-seconds {total:.3f} on two GPUs, cost {cost}")
    metrics = requests.get(mon.metrics_url, timeout=10).text
    assert "ray_monitor_gpu_replica_seconds_total{" in metrics and 'part="gpu"' in metrics
    mon.reload("groups: []")


def test_metrics_endpoint_has_gpu_families_and_passes_promtool(mon):
    node = ray.get_runtime_context().get_node_id()

    def gpu_lines():
        text = requests.get(mon.metrics_url, timeout=10).text
        lines = re.findall(r"^ray_monitor_gpu_utilization_ratio\{([^}]*)\} \S+$", text, re.M)
        labels = [dict(re.findall(r'(\w+)="([^"]*)"', line)) for line in lines]
        return any(d.get("node") == node for d in labels) and (text, labels)
    text, labels = wait_until(gpu_lines, timeout=30, what="GPU utilization on /metrics")
    ours = {(d["gpu"], d["uuid"], d["model"]) for d in labels if d["node"] == node}
    assert ours >= {("0", "GPU-00000000-0000-0000-0000-000000000000", MODEL),
                    ("1", "GPU-00000000-0000-0000-0000-000000000001", MODEL)}
    check = promtool("check", "metrics", input=text)
    assert check.returncode == 0, check.stdout + check.stderr
