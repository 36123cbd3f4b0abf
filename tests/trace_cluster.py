"""A small Ray cluster of its own, with Ray Serve's tracing set one way, driven through
the trace scenarios (tests/trace_scenarios.py); what it saw goes to a JSON file.

Run by tests/integration/test_traces_clusters.py in a subprocess, because Serve's
tracing is set per process from the environment when the process starts (its HTTP proxy
starts once per cluster), so "Serve's tracing off" and "Serve's proxy at ratio 1.0"
need clusters of their own, beside the session's (Serve's tracing on at 0.01)::

    .venv/bin/python -m tests.trace_cluster off /tmp/out.json

Configurations: ``off`` (no Serve tracing anywhere: ray-monitor's ingress decides, at
``RAY_MONITOR_SAMPLE_RATIO`` 0, 0.01 and 1.0, one app each), ``on-1.0`` and ``on-0``
(Serve's tracing on, its proxy deciding at that ratio).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE_VARS = ("RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH", "RAY_SERVE_TRACING_SAMPLING_RATIO")
KEPT = {"fail": 4, "caught": 4, "slow": 2, "slow_after": 2}

#: config -> [(scenario, app kind, ingress ratio, header, fast requests)]
PLANS: dict[str, list[tuple[str, str, Any, str, int]]] = {
    "off": [("ratio 0", "plain", 0.0, "none", 200),
            ("ratio 0.01", "plain", 0.01, "none", 1200),
            ("ratio 1.0", "plain", 1.0, "none", 100),
            ("sampled caller", "plain", 0.0, "sampled", 30),
            ("unsampled caller", "plain", 1.0, "unsampled", 100),
            ("fastapi sampled caller", "fastapi", None, "sampled", 10),
            ("fastapi unsampled caller", "fastapi", None, "unsampled", 50)],
    "on-1.0": [("ratio 1.0", "plain", None, "none", 100),
               ("unsampled caller", "plain", None, "unsampled", 100),
               ("fastapi", "fastapi", None, "none", 20)],
    "on-0": [("ratio 0", "plain", None, "none", 200),
             ("sampled caller", "plain", None, "sampled", 30),
             ("fastapi sampled caller", "fastapi", None, "sampled", 10)],
}
NAMES = {"plain": ("Ingress.__call__", "Model.__call__"),
         "fastapi": ("GET /items/{item}", "Mid.__call__", "Leaf.__call__", "Leaf.stream")}


def _environment(config: str, rx) -> None:
    for k in SERVE_VARS + ("RAY_ADDRESS",):
        os.environ.pop(k, None)
    os.environ.update({**rx.env("grpc"), "OTEL_BSP_SCHEDULE_DELAY": "100",
                       "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1",
                       "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])})
    if config.startswith("on-"):
        os.environ["RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH"] = \
            "ray_monitor.tracing:serve_span_processors"
        os.environ["RAY_SERVE_TRACING_SAMPLING_RATIO"] = config[3:]


def _wait_settled(rx, sent, names, every_fast: bool = False, timeout: float = 120.0):
    """Waits until the receiver has every kept request whole (and, under a sampled
    caller, every fast one): spans leave each replica in batches every few seconds."""
    from tests.trace_scenarios import KEPT_KINDS, analyse, span_dict

    kept = sum(1 for q in sent if q.kind in KEPT_KINDS)
    fast = sum(1 for q in sent if q.kind not in KEPT_KINDS)
    deadline = time.monotonic() + timeout
    while True:
        rep = analyse(sent, [span_dict(s) for s in rx.spans()], names)
        done = not rep.problems and rep.kept_complete == kept and (
            not every_fast or rep.fast_exported + rep.fast_kept >= fast)
        if done or time.monotonic() > deadline:
            return rep
        time.sleep(1.0)


def _kept_whole(mon, tids, sent, names, timeout: float = 30.0) -> list[dict]:
    """The aggregator's kept traces of this scenario, once each has every span of ours
    (its copy arrives with the replicas' next snapshots)."""
    from tests.trace_scenarios import KEPT_KINDS

    want = sum(1 for q in sent if q.kind in KEPT_KINDS)
    deadline = time.monotonic() + timeout
    while True:
        kept = [t for t in mon.traces(limit=500) if t["trace_id"] in tids]
        whole = [t for t in kept if set(names) <= {s["name"] for s in t["spans"]}]
        if len(whole) >= want or time.monotonic() > deadline:
            return kept
        time.sleep(1.0)


def run(config: str, out_path: str) -> int:
    from tests.otlp_receiver import OtlpReceiver

    with OtlpReceiver() as rx:
        _environment(config, rx)
        sys.path.insert(0, ROOT)
        import ray
        from ray import serve

        import ray_monitor
        from tests import trace_scenarios as ts
        from tests.conftest import free_port

        t0 = time.monotonic()
        for attempt in range(3):
            # Ray gives a new node 30 s to register (hard-coded); the first cluster started
            # after the session's tests sometimes misses it on two cores: tried again, said.
            try:
                ray.init(address="local", num_cpus=8, include_dashboard=False,
                         log_to_driver=False, namespace="trace_cluster")
                break
            except Exception as e:
                if attempt == 2:
                    raise
                print(f"the Ray node did not start ({e}); trying again", file=sys.stderr)
                ray.shutdown()
        results = []
        try:
            mon = ray_monitor.start(port=0)
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            base = f"http://127.0.0.1:{port}"
            for name, kind, ratio, header, fast in PLANS[config]:
                app = f"c{uuid.uuid4().hex[:8]}"
                if kind == "plain":
                    ts.deploy_plain(app, ratio=ratio)
                    sent = ts.drive(f"{base}/{app}", ts.plan({"ok": fast, **KEPT}, header))
                else:
                    ts.deploy_fastapi(app)
                    sent = ts.drive(f"{base}/{app}", ts.plan({"ok": fast, "fail": 2}, header),
                                    url_of=ts.fastapi_url)
                rep = _wait_settled(rx, sent, NAMES[kind], every_fast=header == "sampled")
                tids = {s.trace_id for s in rx.spans()
                        if s.attributes.get("ray.serve.request_id") in
                        {q.request_id for q in sent}}
                kept = _kept_whole(mon, tids, sent, NAMES[kind])
                results.append({
                    "scenario": name, "kind": kind, "ratio": ratio, "header": header,
                    "names": NAMES[kind], "report": rep.as_dict(),
                    "sent": [vars(q) for q in sent],
                    "spans": [ts.span_dict(s) for s in rx.spans() if s.trace_id in tids],
                    "aggregator": [{"trace_id": t["trace_id"], "kinds": t["kinds"],
                                    "names": [s["name"] for s in t["spans"]]} for t in kept]})
                serve.delete(app)
        finally:
            try:
                serve.shutdown()
            except Exception:
                pass
            ray.shutdown()
        with open(out_path, "w") as f:
            json.dump({"config": config, "seconds": round(time.monotonic() - t0, 1),
                       "results": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2]))
