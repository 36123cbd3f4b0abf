"""The main demo: a monitored two-deployment Ray Serve app on a local cluster.

Starts Ray and Serve on this machine, starts ray-monitor with the demo rules, serves a
small classifier behind a preprocessing deployment, and drives HTTP traffic through
three phases: healthy, a fault (errors and latency injected), healthy again. Prints
what fired and resolved, the deployments as the monitor saw them, and where the
traces and metrics are. Run it with ``./demo.sh`` (which sets everything up).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import ray
from ray import serve

import ray_monitor
from ray_monitor import monitor
from ray_monitor.cli import alerts_table, deployments_table

REPO = Path(__file__).resolve().parents[1]
APP = "demo"


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor(model_version="v1")
class Classifier:
    """A logistic-regression iris classifier (weights fitted offline, 4 features)."""

    W = np.array([[0.42, 0.97, -2.4, -1.0], [0.53, -0.32, -0.2, -0.94],
                  [-0.95, -0.65, 2.6, 1.94]])
    B = np.array([9.8, 2.2, -12.0])
    CLASSES = ("setosa", "versicolor", "virginica")

    def __init__(self):
        self.fault = {"error_ratio": 0.0, "delay_s": 0.0}

    def set_fault(self, error_ratio: float, delay_s: float) -> dict:
        self.fault = {"error_ratio": error_ratio, "delay_s": delay_s}
        return self.fault

    async def __call__(self, features: list[float]) -> dict:
        import asyncio
        import random

        if self.fault["delay_s"]:
            await asyncio.sleep(self.fault["delay_s"] * random.random() * 2)
        if random.random() < self.fault["error_ratio"]:
            raise RuntimeError("injected fault: model server unavailable")
        z = self.W @ np.asarray(features, dtype=float) + self.B
        p = np.exp(z - z.max())
        p /= p.sum()
        return {"label": self.CLASSES[int(p.argmax())], "score": float(p.max())}


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor
class Preprocess:
    """HTTP ingress: parses JSON, scales the features, calls the classifier."""

    def __init__(self, classifier):
        self.classifier = classifier

    async def __call__(self, request) -> dict:
        body = await request.json()
        features = [float(x) for x in body["features"]]
        return await self.classifier.remote(features)


def drive(url: str, stop: threading.Event, stats: dict, rate_per_s: float = 8.0) -> None:
    rng = np.random.default_rng(0)
    period = 1.0 / rate_per_s
    while not stop.is_set():
        features = (rng.normal([5.8, 3.0, 4.3, 1.3], [0.8, 0.4, 1.7, 0.7])).round(2).tolist()
        req = urllib.request.Request(url, data=json.dumps({"features": features}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                stats["ok"] += resp.status == 200
        except urllib.error.HTTPError:
            stats["failed"] += 1
        except OSError:
            stats["failed"] += 1
        stop.wait(period)


def phase(name: str, seconds: float, mon, timeline: list, start: float) -> None:
    print(f"\n== {name} ({seconds:.0f}s)")
    end = time.time() + seconds
    seen = {}
    while time.time() < end:
        for a in mon.alerts():
            key = (a["name"], a["labels"].get("deployment"))
            if seen.get(key) != a["state"]:
                seen[key] = a["state"]
                timeline.append((time.time() - start, a["name"], a["labels"].get("deployment"),
                                 a["state"]))
                print(f"   t+{time.time() - start:5.1f}s  {a['name']} on "
                      f"{a['labels'].get('deployment')}: {a['state']}")
        time.sleep(1.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--healthy-s", type=float, default=15)
    ap.add_argument("--fault-s", type=float, default=25)
    ap.add_argument("--recover-s", type=float, default=30)
    ap.add_argument("--port", type=int, default=8000, help="Serve's HTTP port")
    ap.add_argument("--monitor-port", type=int, default=8266)
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH",
                          "ray_monitor.tracing:serve_span_processors")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        mon = ray_monitor.start(rules=REPO / "deployments/rules/demo.yaml",
                                port=args.monitor_port)
        handle = serve.run(Preprocess.bind(Classifier.bind()), name=APP, route_prefix="/classify")
        classifier = serve.get_deployment_handle("Classifier", app_name=APP)
        url = f"http://127.0.0.1:{args.port}/classify"
        print(f"Serving {url}; ray-monitor at {mon.url}")
        stop, stats = threading.Event(), {"ok": 0, "failed": 0}
        traffic = threading.Thread(target=drive, args=(url, stop, stats), daemon=True)
        start, timeline = time.time(), []
        traffic.start()
        phase("healthy traffic", args.healthy_s, mon, timeline, start)
        classifier.set_fault.remote(0.3, 0.2).result()
        phase("fault injected: 30% errors and up to 400 ms latency in Classifier",
              args.fault_s, mon, timeline, start)
        classifier.set_fault.remote(0.0, 0.0).result()
        phase("healthy again", args.recover_s, mon, timeline, start)
        stop.set()
        traffic.join(15)
        del handle

        print("\n== Summary")
        print(f"requests sent: {stats['ok'] + stats['failed']} "
              f"({stats['ok']} ok, {stats['failed']} failed)")
        fired = sorted({(n, d) for _, n, d, s in timeline if s == "firing"})
        resolved = sorted({(n, d) for _, n, d, s in timeline if s == "resolved"})
        for n, d in fired:
            t_fire = min(t for t, n2, d2, s in timeline if (n2, d2, s) == (n, d, "firing"))
            t_res = [t for t, n2, d2, s in timeline if (n2, d2, s) == (n, d, "resolved")]
            print(f"alert {n} on {d}: fired at t+{t_fire:.0f}s"
                  + (f", resolved at t+{min(t_res):.0f}s" if t_res else ", still firing"))
        print(f"alerts fired: {len(fired)}, resolved: {len(resolved)}")
        print("\nDeployments over the last minute:")
        print(deployments_table([d for d in mon.deployments() if d["application"] == APP]))
        print("\nAlerts:")
        print(alerts_table(mon.alerts(), time.time()))
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        print("\nWhere to look:")
        print(f"  Prometheus metrics:  {mon.metrics_url}")
        print(f"  alerts (JSON):       {mon.url}/api/v1/alerts")
        print(f"  deployments (JSON):  {mon.url}/api/v1/deployments")
        print(f"  traces:              {'OTLP to ' + endpoint if endpoint else 'set OTEL_EXPORTER_OTLP_ENDPOINT to send them to Jaeger, Tempo or Phoenix'}")
        print(f"  Serve's logs (with trace ids): {ray.get_runtime_context().gcs_address and '/tmp/ray/session_latest/logs/serve/'}")
        return 0 if fired else 1
    finally:
        ray_monitor.stop()
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
