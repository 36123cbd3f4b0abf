"""A three-node Ray cluster of its own, for node fan-in (issue 15); what it saw goes to JSON.

Run by tests/integration/test_node_fanin.py in a subprocess, beside the session's cluster
(a monitor with a short ``series_ttl_s`` and GPU monitoring off, which the session's
monitor cannot be)::

    .venv/bin/python -m tests.fanin_cluster /tmp/out.json

A head and two worker nodes (``node_b``, ``node_c`` custom resources); deployment ``B``
(2 replicas) on node b, ``C`` (1 replica) on node c, ``num_cpus=0``. Phases, each
writing what the monitor reported next to what the clients sent:

1. ``steady``: requests to both; once both nodes have a merger and their replicas
   deliver over its Unix socket (the first deliveries, before, went by Ray call: the
   fallback when there is no socket), more requests; then the ledger's totals, each
   merger's counters and the aggregator's direct/node/socket counters.
2. ``merger_killed``: node b's merger killed (Ray restarts it) while a client keeps
   sending to B; then totals again (exact: a replica keeps a delivery until the
   aggregator took it, and the aggregator drops the copies a restart sends again); the
   replicas reconnect to the restarted merger's socket.
3. ``node_removed``: node c removed; its merger is forgotten and C's replica series
   age out after ``series_ttl_s``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TTL_S = 6.0
APP = "fanin"


def wait_until(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def retried(start: Callable[[], Any], attempts: int = 4) -> Any:
    """Ray gives a raylet 30 s to register, hard-coded; on a loaded two-core machine that
    is sometimes too little: tried again, said out loud."""
    for attempt in range(attempts):
        try:
            return start()
        except Exception as e:
            if attempt == attempts - 1:
                raise
            print(f"a Ray node did not start ({e}); trying again", file=sys.stderr)


def serve_on_free_port() -> int:
    """Ray Serve with its proxy on a free loopback port (returned)."""
    import socket

    from ray import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def main(out_path: str) -> None:
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    os.environ["RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S"] = "1"
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    import ray_monitor
    from ray_monitor.common.names import AGGREGATOR_NAME, NAMESPACE

    head = {"num_cpus": 2, "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 1000,
                               "health_check_failure_threshold": 5}}
    cluster = retried(lambda: Cluster(initialize_head=True, head_node_args=head))
    nodes = {name: retried(lambda: cluster.add_node(num_cpus=1, resources={name: 1}))
             for name in ("node_b", "node_c")}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="ray_monitor_fanin")
    result: dict[str, Any] = {"phases": {}}
    try:
        ids = {name: n.node_id for name, n in nodes.items()}
        result["node_ids"] = ids
        mon = ray_monitor.start(port=0, eval_interval_s=1.0, gpu=False, series_ttl_s=TTL_S)
        agg = ray.get_actor(AGGREGATOR_NAME, namespace=NAMESPACE)
        serve_on_free_port()

        @ray_monitor.monitor
        class Echo:
            def __call__(self, x: int) -> int:
                return x

        handles = {}
        for dep, node, replicas in (("B", "node_b", 2), ("C", "node_c", 1)):
            d = serve.deployment(Echo, name=dep, num_replicas=replicas, ray_actor_options={
                "num_cpus": 0, "resources": {node: 0.01}})
            handles[dep] = serve.run(d.bind(), name=f"{APP}-{dep}", route_prefix=f"/{dep}")
        sent = {"B": 0, "C": 0}
        lock = threading.Lock()

        def send(dep: str, n: int) -> None:
            for i in range(n):
                assert handles[dep].remote(i).result(timeout_s=60) == i
                with lock:
                    sent[dep] += 1

        def totals() -> dict:
            delivery = ray.get(agg.stats.remote(), timeout=60)["delivery"]
            return {dep: sum(delivery.get(f"{APP}-{dep}/{dep}", {}).get("totals", {}).values())
                    for dep in sent}

        def settled() -> bool:
            """The newest snapshots' totals say every request, and every snapshot before
            them arrived (one sent again after a failed call may come after a newer)."""
            delivery = ray.get(agg.stats.remote(), timeout=60)["delivery"]
            return totals() == sent and all(
                delivery[f"{APP}-{dep}/{dep}"]["unaccounted"] == 0 for dep in sent)

        def snapshot(phase: str) -> None:
            stats = ray.get(agg.stats.remote(), timeout=60)
            mergers = ray.get(agg.node_mergers.remote(), timeout=60)
            import urllib.request

            with urllib.request.urlopen(mon.metrics_url, timeout=60) as r:
                metrics = r.read().decode()
            result["phases"][phase] = {
                "self_errors": [line for line in metrics.splitlines()
                                if line.startswith("ray_monitor_self_errors_total")],
                "socket_metric": [line for line in metrics.splitlines() if line.startswith(
                    "ray_monitor_self_ingest_calls_socket_total")],
                "sent": dict(sent), "totals": totals(), "fanin": stats["fanin"],
                "delivery": stats["delivery"], "merger_nodes": sorted(mergers),
                "merger_stats": {n: ray.get(h.stats.remote(), timeout=60)
                                 for n, h in mergers.items()},
                "merger_running_on": {n: ray.get(h.running_node_id.remote(), timeout=60)
                                      for n, h in mergers.items()},
                "series": sorted(json.loads(k)["replica"] for k in mon.query(
                    "count", "requests", 600.0, by=("deployment", "replica"))),
                "replicas": {dep: sorted(r for r in mon.query(
                    "count", "requests", 600.0, by=("deployment", "replica"))
                    if json.loads(r)["deployment"] == dep) for dep in sent}}

        # 1. steady: first deliveries go direct (no merger yet), then through the mergers
        send("B", 20)
        send("C", 20)
        wait_until(lambda: {ids["node_b"], ids["node_c"]} <= set(
            ray.get(agg.node_mergers.remote(), timeout=60)), 60, "a merger on nodes b and c")
        wait_until(lambda: all(s["calls"] > 0 for n, s in (
            (n, ray.get(h.stats.remote(), timeout=60))
            for n, h in ray.get(agg.node_mergers.remote(), timeout=60).items())
            if n in (ids["node_b"], ids["node_c"])), 60, "replicas delivering to their merger")
        wait_until(lambda: all(s.get("socket_calls", 0) > 0 for n, s in (
            (n, ray.get(h.stats.remote(), timeout=60))
            for n, h in ray.get(agg.node_mergers.remote(), timeout=60).items())
            if n in (ids["node_b"], ids["node_c"])), 60, "replicas delivering over the socket")
        send("B", 30)
        send("C", 30)
        wait_until(settled, 60, "steady totals")
        snapshot("steady")

        # 2. node b's merger killed (and restarted by Ray) while B keeps taking requests
        mergers = ray.get(agg.node_mergers.remote(), timeout=60)
        before = ray.get(mergers[ids["node_b"]].stats.remote(), timeout=60)
        client = threading.Thread(target=send, args=("B", 120))
        client.start()
        time.sleep(1.5)
        ray.kill(mergers[ids["node_b"]], no_restart=False)
        client.join()
        send("B", 20)
        wait_until(settled, 90, "totals after the merger restarted")
        # the restarted merger counts from 0 again, and its replicas deliver through it
        wait_until(lambda: ray.get(mergers[ids["node_b"]].stats.remote(), timeout=60)
                   .get("socket_calls", 0) > 0, 60,
                   "deliveries through the restarted merger, over its socket")
        snapshot("merger_killed")
        result["phases"]["merger_killed"]["calls_before_kill"] = before["calls"]

        # 3. node c removed: its merger forgotten, C's replica series age out
        c_replicas = result["phases"]["merger_killed"]["replicas"]["C"]
        cluster.remove_node(nodes["node_c"])
        removed = time.monotonic()
        wait_until(lambda: ids["node_c"] not in ray.get(agg.node_mergers.remote(), timeout=60),
                   60, "node c's merger forgotten")
        wait_until(lambda: not set(c_replicas) & set(mon.query(
            "count", "requests", 600.0, by=("deployment", "replica"))), 120,
            "node c's series aged out")
        result["aged_out_after_s"] = time.monotonic() - removed
        snapshot("node_removed")
        result["c_replicas"] = c_replicas
    finally:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1, default=str)
        try:
            serve.shutdown()
        except Exception:
            pass
        try:
            ray_monitor.stop()
        except Exception:
            pass
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
