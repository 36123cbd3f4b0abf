"""A Ray cluster of its own with a monitor sharded across two aggregators (issue 15);
what it saw goes to JSON.

Run by tests/integration/test_shards.py in a subprocess, beside the session's cluster
(whose monitor has one aggregator and must keep it)::

    .venv/bin/python -m tests.shards_cluster /tmp/out.json

One node; applications ``alpha`` and ``beta`` (crc32 even and odd: shard 0 and shard 1),
one replica each, ``num_cpus=0``; a rule that fires per application. Phases, each
writing what the monitor reported next to what the clients sent:

0. ``refused``: start(shards=2) with a rule that sums across applications is refused
   before any actor starts.
1. ``steady``: requests to both; the totals (shard 0's merged stats and each shard's
   own), ``/metrics`` from shard 0, the one alert view.
2. ``cross_trace``: application ``shop`` (shard 0) calls ``gamma`` (shard 1), whose
   model fails; shop catches it and answers 200, so only gamma's replica keeps the
   trace: shop's span reaches the monitor only because the kept id travelled from
   shard 1 through shard 0 to shop's replica. The one trace view must show both spans.
3. ``shard_killed``: shard 1 killed (Ray restarts it) while a client keeps sending to
   beta; then totals, ``/metrics`` and alerts again.
4. ``gpu``: the fake NVML reports a process of alpha's replica (shard 0) and one of
   beta's (shard 1); each application's GPU-seconds and GPU cost, as the one view shows.
5. ``early_feedback``: ground truth for a request id sent before the request, whose
   application ``delta`` is on shard 1; then the request over HTTP with that id.

After ``stop()``: the token prices the monitor published in the GCS, gone or not.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.request
from typing import Any

from tests.fanin_cluster import serve_on_free_port, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = {"alpha": "A", "beta": "B"}
RULES = """
groups:
  - name: busy
    rules:
      - alert: Busy
        expr: count(requests[10m]) by (application, deployment) > 5
prices:
  "*": {prompt_per_1k: 0.5, completion_per_1k: 2.0, per_gpu_second: 0.01}
"""
CROSS = RULES.replace("by (application, deployment)", "by (deployment)")


def main(out_path: str) -> None:
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    os.environ["RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S"] = "1"
    import ray
    from ray import serve

    import ray_monitor
    from ray_monitor.common.errors import ConfigError
    from ray_monitor.common.names import NAMESPACE
    from ray_monitor.common.shards import shard_name, shard_of

    # address="local": a cluster of its own, never another session's running on this machine
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             namespace="ray_monitor_shards")
    result: dict[str, Any] = {"phases": {}, "owner": {a: shard_of(a, 2) for a in APPS}}
    try:
        try:
            ray_monitor.start(CROSS, port=0, gpu=False, shards=2)
            result["phases"]["refused"] = {"refused": False}
        except ConfigError as e:
            result["phases"]["refused"] = {"refused": True, "message": str(e),
                                           "actors": _names(ray, NAMESPACE)}
        mon = ray_monitor.start(RULES, port=0, eval_interval_s=1.0, shards=2,
                                nvml_factory="tests.fake_nvml:make_fake")
        shards = [ray.get_actor(shard_name(i), namespace=NAMESPACE) for i in range(2)]
        result["second_start_url"] = ray_monitor.start().url == mon.url
        serve_port = serve_on_free_port()

        @ray_monitor.monitor
        class Echo:
            def __call__(self, x: int) -> int:
                return x

        @ray_monitor.monitor(slow_threshold_s=60.0)
        class Back:
            def __call__(self, x: str) -> str:
                raise KeyError(x)

        @ray_monitor.monitor(slow_threshold_s=60.0)
        class Front:
            def __init__(self) -> None:
                self.back = serve.get_deployment_handle("Back", app_name="gamma")

            async def __call__(self, x: str) -> str:
                try:
                    return await self.back.remote(x)
                except Exception:
                    return "caught"

        handles = {}
        for app, dep in APPS.items():
            d = serve.deployment(Echo, name=dep, num_replicas=1,
                                 ray_actor_options={"num_cpus": 0})
            handles[app] = serve.run(d.bind(), name=app, route_prefix=f"/{app}")
        sent = {app: 0 for app in APPS}
        lock = threading.Lock()

        def send(app: str, n: int) -> None:
            for i in range(n):
                assert handles[app].remote(i).result(timeout_s=60) == i
                with lock:
                    sent[app] += 1

        def delivery(stats: dict) -> dict:
            return {app: stats["delivery"].get(f"{app}/{dep}") for app, dep in APPS.items()}

        def totals() -> dict:
            d = delivery(mon.stats())
            return {app: sum((v or {}).get("totals", {}).values()) for app, v in d.items()}

        def settled() -> bool:
            d = delivery(mon.stats())
            return totals() == sent and all(v and v["unaccounted"] == 0 for v in d.values())

        def firing() -> dict:
            return {a["labels"].get("application"): a["state"] for a in mon.alerts()
                    if a["name"] == "Busy"}

        def http(path: str) -> Any:
            with urllib.request.urlopen(mon.url + path, timeout=60) as r:
                return json.loads(r.read())["data"]

        def snapshot(phase: str) -> None:
            with urllib.request.urlopen(mon.metrics_url, timeout=60) as r:
                metrics = r.read().decode()
            own = [ray.get(s.stats.remote(True), timeout=60) for s in shards]
            result["phases"][phase] = {
                "sent": dict(sent), "totals": totals(), "delivery": delivery(mon.stats()),
                "own": [sorted(k for k in o["delivery"]) for o in own],
                "own_unaccounted": [{k: v["unaccounted"] for k, v in o["delivery"].items()}
                                    for o in own],
                "requests_lines": [line for line in metrics.splitlines()
                                   if line.startswith("ray_monitor_requests_total{")],
                "help_requests": metrics.count("# HELP ray_monitor_requests_total "),
                "shard_up": [line for line in metrics.splitlines()
                             if line.startswith("ray_monitor_self_shard_up")],
                "alerts": firing(),
                "query": mon.query("count", "requests", 600.0, by=("application",)),
                "deployments": sorted(d["application"] for d in mon.deployments()),
                "http_alerts": sorted(a["labels"].get("application") for a in
                                      http("/api/v1/alerts") if a["name"] == "Busy"),
                "http_deployments": sorted(d["application"] for d in
                                           http("/api/v1/deployments"))}

        # 1. steady
        send("alpha", 30)
        send("beta", 30)
        wait_until(settled, 90, "steady totals")
        wait_until(lambda: firing() == {"alpha": "firing", "beta": "firing"}, 60,
                   "Busy firing for both applications")
        snapshot("steady")

        # 2. a trace across shards, kept by shard 1's application only
        opts = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}
        serve.run(serve.deployment(Back, name="Back", **opts).bind(), name="gamma",
                  route_prefix="/gamma")
        front = serve.run(serve.deployment(Front, name="Front", **opts).bind(), name="shop",
                          route_prefix="/shop")
        result["owner"].update(shop=shard_of("shop", 2), gamma=shard_of("gamma", 2))
        assert front.remote("x").result(timeout_s=60) == "caught"

        def crossing() -> list:
            return [t for t in mon.traces("errors", 50)
                    if {s.get("application") for s in t["spans"]} >= {"shop", "gamma"}]

        try:
            whole = wait_until(crossing, 90, "a trace with the spans of both shards")
        except TimeoutError:  # said in the JSON; the other phases still run
            result["phases"]["cross_trace"] = {"missing": True, "traces": [
                [{"trace_id": t["trace_id"], "kinds": t["kinds"],
                  "apps": [sp.get("application") for sp in t["spans"]]}
                 for t in ray.get(s.traces.remote(None, 50, True), timeout=60)]
                for s in shards], "stats": [ray.get(s.stats.remote(True), timeout=60)["traces"]
                                            for s in shards],
                "shard0_log": ray.get(shards[0].kept_trade.remote([], None), timeout=60)}
            whole = None
        result["phases"]["cross_trace"] = result["phases"].get("cross_trace") or {
            "trace": {k: whole[0][k] for k in ("trace_id", "kinds", "span_count")},
            "spans": [{k: s.get(k) for k in ("application", "deployment", "status",
                                              "parent_span_id", "span_id", "depth")}
                      for s in whole[0]["spans"]],
            "http": [{"trace_id": t["trace_id"], "span_count": t["span_count"]}
                     for t in http("/api/v1/traces?kind=errors&limit=50")
                     if t["trace_id"] == whole[0]["trace_id"]],
            "shard_parts": [[{"application": sp.get("application")} for t in ray.get(
                s.trace_parts.remote([whole[0]["trace_id"]], True), timeout=60)
                for sp in t["spans"]] for s in shards]}

        # 3. shard 1 (beta's) killed, restarted by Ray, while beta keeps taking requests
        client = threading.Thread(target=send, args=("beta", 60))
        client.start()
        time.sleep(1.0)
        ray.kill(shards[1], no_restart=False)
        client.join()
        send("beta", 10)
        send("alpha", 10)
        wait_until(settled, 120, "totals after shard 1 restarted")
        wait_until(lambda: firing() == {"alpha": "firing", "beta": "firing"}, 60,
                   "Busy firing for both applications after the restart")
        snapshot("shard_killed")

        # 4. GPU time of a replica on each shard, counted and priced
        from tests.fake_nvml import GiB, ExtraProcess, set_cluster_processes

        me = {i.application: i for s in shards
              for i in ray.get(s.replica_identities.remote(True), timeout=60)}
        set_cluster_processes([ExtraProcess(gpu=g, pid=me[app].pid, used_memory=GiB,
                                            node_id=me[app].node_id)
                               for g, app in enumerate(APPS)])

        def gpu_time() -> dict:
            secs = mon.query("sum", "replica_gpu_seconds", 600.0, by=("application",))
            cost = mon.query("sum", "cost", 600.0, by=("application", "part"))
            return {"seconds": secs, "cost": cost}
        try:
            # a series shows at its first sample; its window sums it a round later
            wait_until(lambda: (g := gpu_time()) and len(g["cost"]) == len(g["seconds"]) == 2
                       and all(v > 0 for v in [*g["cost"].values(), *g["seconds"].values()]),
                       30, "GPU time and cost of both")
        except TimeoutError:  # said in the JSON
            pass
        finally:
            set_cluster_processes([])
        result["phases"]["gpu"] = gpu_time()

        # 5. feedback before its prediction, for an application on shard 1
        def guess(result: str) -> dict:
            return {"label": result}

        @ray_monitor.monitor(prediction=guess)
        class Guess:
            async def __call__(self, request) -> str:
                return "yes"

        serve.run(serve.deployment(Guess, name="Guess", **opts).bind(), name="delta",
                  route_prefix="/delta")
        early = {"owner": shard_of("delta", 2),
                 "first": ray_monitor.record_feedback([{"request_id": "early-1",
                                                        "label": "yes"}])}
        req = urllib.request.Request(f"http://127.0.0.1:{serve_port}/delta",
                                     headers={"X-Request-ID": "early-1"})
        with urllib.request.urlopen(req, timeout=60) as r:
            early["answer"] = r.read().decode()

        def labelled() -> Any:
            return next((m["quality"].get("labeled") for m in mon.quality()
                         if m["application"] == "delta"), None)
        try:
            wait_until(labelled, 30, "the early feedback joined")
        except TimeoutError:
            pass
        early["labeled"] = labelled()
        early["stats"] = [ray.get(s.stats.remote(True), timeout=60)["quality"] for s in shards]
        result["phases"]["early_feedback"] = early
    finally:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1, default=str)
        try:
            serve.shutdown()
        except Exception:
            pass
        try:
            from ray.experimental import internal_kv

            from ray_monitor.common.names import KV_NAMESPACE, PRICES_KEY

            result["prices_before_stop"] = internal_kv._internal_kv_get(
                PRICES_KEY, namespace=KV_NAMESPACE)
            result["stopped"] = ray_monitor.stop()
            result["left_after_stop"] = _names(ray, NAMESPACE)
            result["prices_after_stop"] = internal_kv._internal_kv_get(
                PRICES_KEY, namespace=KV_NAMESPACE)
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1, default=str)
        except Exception:
            pass
        ray.shutdown()


def _names(ray, namespace: str) -> list[str]:
    from ray.util import list_named_actors

    return sorted(a["name"] for a in list_named_actors(all_namespaces=True)
                  if a.get("namespace") == namespace and a["name"].startswith(
                      "ray_monitor_aggregator"))


if __name__ == "__main__":
    main(sys.argv[1])
