"""End to end against Arize Phoenix, following only the README: traces of ~300 requests
through an HTTP ingress and a model, read back from Phoenix's API.

    # Phoenix in a virtual environment of its own (about 850 MB; not a dependency):
    python3 -m venv /tmp/phoenix-venv && /tmp/phoenix-venv/bin/pip install arize-phoenix
    .venv/bin/python benchmarks/phoenix_e2e.py --phoenix /tmp/phoenix-venv/bin/phoenix \\
        [--requests 300] [--endpoint traces|generic] [--serve-tracing|--no-serve-tracing] \\
        [--json OUT]

Starts ``phoenix serve`` on loopback (a temporary working directory, free ports), then a
local Ray cluster with the README's settings: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` at
Phoenix's ``/v1/traces`` (``--endpoint generic``: ``OTEL_EXPORTER_OTLP_ENDPOINT`` at
Phoenix, as a user who has not read the backend section would, so the replicas also
try metrics there, which Phoenix refuses with 405), and by default Ray Serve's own
tracing at its default ratio (``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH``,
``RAY_SERVE_TRACING_SAMPLING_RATIO`` unset: 1%); ray-monitor's aggregator; and Serve on
loopback. A plain HTTP client (urllib, no ``traceparent``) sends, in random order:
fast requests, requests that fail in the model (500), requests whose model failure the
ingress catches (200), and slow ones (the model sleeps 1.3 s; thresholds 1 s).

Then it reads every span back from Phoenix (``GET /v1/projects/default/spans``) and says,
per kind of request: how many were exported, how many as one connected trace with both
deployments' spans, how many split or fragmentary; the exported fraction of fast
requests against the ratio; and the replicas' log lines that an SDK exporter wrote
("Failed to export") against ray-monitor's one line about a refused signal. Every
process it started is stopped at the end, failures included.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW_S, SLEEP_S = 1.0, 1.3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_app():
    from ray import serve

    from ray_monitor import monitor

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @monitor(slow_threshold_s=SLOW_S)
    class Model:
        async def __call__(self, what: str) -> str:
            if what in ("fail", "caught"):
                raise KeyError("no such item")
            if what == "slow":
                await asyncio.sleep(SLEEP_S)
            return what

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @monitor(slow_threshold_s=SLOW_S)
    class Ingress:
        def __init__(self, model) -> None:
            self.model = model

        async def __call__(self, request) -> dict:
            what = request.query_params.get("what", "ok")
            try:
                return {"got": await self.model.remote(what)}
            except KeyError:
                if what == "caught":
                    return {"caught": True}
                raise
    return Ingress.bind(Model.bind())


# -- Phoenix ------------------------------------------------------------------------------

def start_phoenix(binary: str, workdir: str) -> tuple[subprocess.Popen, str, int]:
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "PHOENIX_WORKING_DIR": workdir, "PHOENIX_PORT": str(port),
           "PHOENIX_GRPC_PORT": str(grpc_port), "PHOENIX_HOST": "127.0.0.1",
           "PHOENIX_TELEMETRY_ENABLED": "false"}
    for k in [k for k in env if k.startswith("OTEL_")]:
        del env[k]
    log = open(os.path.join(workdir, "phoenix.log"), "w")
    proc = subprocess.Popen([binary, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"phoenix serve exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                return proc, url, grpc_port
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    raise RuntimeError(f"phoenix serve did not answer within 180 s; see {log.name}")


def stop(proc: Optional[subprocess.Popen]) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _flat(d: Any, prefix: str = "") -> dict:
    """Phoenix nests dotted attribute names ({"ray": {"serve": ...}}): flattened back."""
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def phoenix_spans(url: str, project: str = "default") -> list[dict]:
    spans, cursor = [], None
    while True:
        q = f"{url}/v1/projects/{project}/spans?limit=1000" + (f"&cursor={cursor}" if cursor
                                                               else "")
        try:
            with urllib.request.urlopen(q, timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return []  # no span yet, so no project
            raise
        for s in body.get("data", []):
            spans.append({"trace_id": s["context"]["trace_id"],
                          "span_id": s["context"]["span_id"],
                          "parent": s.get("parent_id") or "", "name": s["name"],
                          "status": s.get("status_code", ""),
                          "attributes": _flat(s.get("attributes") or {})})
        cursor = body.get("next_cursor")
        if not cursor:
            return spans


# -- traffic and what Phoenix holds ---------------------------------------------------------

def drive(base: str, plan: list[tuple[str, str]], concurrency: int = 8) -> list[dict]:
    def one(item: tuple[str, str]) -> dict:
        kind, rid = item
        req = urllib.request.Request(f"{base}?what={kind}", headers={"x-request-id": rid})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
        return {"kind": kind, "request_id": rid, "status": status}
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, plan))


def analyse(sent: list[dict], spans: list[dict]) -> dict:
    by_trace: dict[str, list[dict]] = {}
    for s in spans:
        by_trace.setdefault(s["trace_id"], []).append(s)
    traces_of: dict[str, set] = {}
    for s in spans:
        rid = s["attributes"].get("ray.serve.request_id") or s["attributes"].get("request_id")
        if rid:
            traces_of.setdefault(rid, set()).add(s["trace_id"])
    out: dict[str, dict] = {}
    for q in sent:
        row = out.setdefault(q["kind"], {"sent": 0, "exported": 0, "connected": 0,
                                         "split": 0, "fragment": 0})
        row["sent"] += 1
        tids = traces_of.get(q["request_id"], set())
        if not tids:
            continue
        row["exported"] += 1
        if len(tids) > 1:
            row["split"] += 1
            continue
        trace = by_trace[next(iter(tids))]
        ids = {s["span_id"] for s in trace}
        tops = [s for s in trace if not s["parent"] or s["parent"] not in ids]
        names = {s["name"] for s in trace}
        if len(tops) == 1 and {"Ingress.__call__", "Model.__call__"} <= names:
            row["connected"] += 1
        else:
            row["fragment"] += 1
    return out


def log_lines(session_dir: str) -> dict:
    failed = refused = 0
    for path in glob.glob(os.path.join(session_dir, "logs", "worker-*")):
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    failed += "Failed to export" in line
                    refused += "refused metrics" in line or "refused traces" in line
        except OSError:
            continue
    return {"sdk_failed_to_export_lines": failed, "ray_monitor_refused_lines": refused}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phoenix", default=shutil.which("phoenix") or "/tmp/phoenix-venv/bin/phoenix")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--fail", type=int, default=20, help="failing in the model (500)")
    ap.add_argument("--caught", type=int, default=20, help="model fails, ingress answers 200")
    ap.add_argument("--slow", type=int, default=30)
    ap.add_argument("--endpoint", choices=("traces", "generic"), default="traces")
    ap.add_argument("--serve-tracing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--settle-s", type=float, default=15.0,
                    help="wait after the traffic for the last spans (tail keeping: ~2 s)")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    if not os.path.exists(args.phoenix):
        ap.error(f"no phoenix at {args.phoenix}: see the docstring")
    workdir = tempfile.mkdtemp(prefix="phoenix-e2e-")
    phoenix = None
    ray_started = False
    try:
        phoenix, url, _ = start_phoenix(args.phoenix, workdir)
        print(f"phoenix {url} (working dir {workdir})")
        for k in [k for k in os.environ if k.startswith(("OTEL_", "RAY_SERVE_TRACING"))]:
            del os.environ[k]
        # The README's settings.
        if args.endpoint == "traces":
            os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = f"{url}/v1/traces"
            os.environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
        else:
            os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = url
            os.environ["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
            os.environ["OTEL_METRIC_EXPORT_INTERVAL"] = "5000"  # refused sooner
        if args.serve_tracing:
            os.environ["RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH"] = \
                "ray_monitor.tracing:serve_span_processors"
        os.environ["PYTHONPATH"] = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
        settings = {k: v for k, v in os.environ.items()
                    if k.startswith(("OTEL_", "RAY_SERVE_TRACING"))}
        print(f"settings: {settings}")

        import ray
        from ray import serve

        import ray_monitor

        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 namespace="phoenix_e2e")
        ray_started = True
        session_dir = ray._private.worker.global_worker.node.get_session_dir_path()
        mon = ray_monitor.start(port=0)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(), name="shop", route_prefix="/shop")
        fast = args.requests - args.fail - args.caught - args.slow
        plan = [(k, f"p-{uuid.uuid4().hex}") for k, n in (
            ("ok", fast), ("fail", args.fail), ("caught", args.caught), ("slow", args.slow))
            for _ in range(n)]
        random.shuffle(plan)
        t0 = time.monotonic()
        sent = drive(f"http://127.0.0.1:{port}/shop", plan)
        print(f"sent {len(sent)} requests in {time.monotonic() - t0:.1f} s; statuses "
              f"{sorted({(q['kind'], q['status']) for q in sent})}")
        time.sleep(args.settle_s)
        spans = phoenix_spans(url)
        ours = {q["request_id"] for q in sent}
        result = analyse(sent, spans)
        from ray.serve._private.constants import RAY_SERVE_TRACING_SAMPLING_RATIO
        ratio = RAY_SERVE_TRACING_SAMPLING_RATIO if args.serve_tracing else 0.1
        ok = result.get("ok", {"sent": 0, "exported": 0})
        sd = math.sqrt(ok["sent"] * ratio * (1 - ratio))
        aggregator = [t for t in mon.traces(limit=500)
                      if any(s["attributes"].get("ray.serve.request_id") in ours
                             for s in t["spans"])]
        report = {
            "phoenix": url, "settings": settings, "requests": len(sent),
            "by_kind": result, "head_ratio": ratio,
            "fast_exported_fraction": ok["exported"] / max(ok["sent"], 1),
            "fast_expected": [round(ok["sent"] * ratio - 4.5 * sd, 1),
                              round(ok["sent"] * ratio + 4.5 * sd, 1)],
            "spans_in_phoenix": len(spans),
            "aggregator_kept_traces": len(aggregator),
            "aggregator_whole": sum(1 for t in aggregator if {"Ingress.__call__",
                                    "Model.__call__"} <= {s["name"] for s in t["spans"]}),
            "logs": log_lines(session_dir)}
        print(json.dumps(report, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    finally:
        if ray_started:
            try:
                from ray import serve

                serve.shutdown()
            except Exception:
                pass
            import ray

            ray.shutdown()
        stop(phoenix)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
