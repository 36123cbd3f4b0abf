"""What users deploy next to the monitor: the Grafana dashboard, the Prometheus config and
rule file in deployments/, and the JSON the status page draws from. No Ray."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ray_monitor.common.catalog import METRICS
from ray_monitor.client.dashboard import build_dashboard, dashboard_json, exported_name, queried_metrics
from ray_monitor.aggregator.exposition import MonitorCollector, render
from ray_monitor.alerting.export import export_prometheus_yaml
from ray_monitor.alerting.loader import load_rules
from ray_monitor.common.snapshot import (GenAIDelta, GpuDevice, GpuSnapshot, ReplicaHealth,
                                         ReplicaIdentity, ReplicaSnapshot, SeriesDelta,
                                         UsageDelta)
from ray_monitor.aggregator.http_api import query_seconds as parse_seconds
from ray_monitor.aggregator.views import gpu_nodes, timeseries, traces_view
from ray_monitor.common.errors import BadRequest
from ray_monitor.aggregator.windows import WindowStore
from tests.servers import PROMTOOL, require_binary
from tests.helpers import Clock, hist

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = ROOT / "deployments"
T0 = 1_700_000_040.0  # a multiple of 60: every ring's bucket edges are whole seconds


def replica_snap(t: float, seq: int, *, deployment: str = "Classifier", latency: float = 0.1,
                 errors: int = 0) -> ReplicaSnapshot:
    genai = GenAIDelta(time_per_token=hist(0.02), gaps=hist(0.02), items=hist(5),
                       items_per_s=hist(50), input_tokens=hist(7), output_tokens=hist(5),
                       queue=hist(0.003))
    series = [SeriesDelta("__call__", "ok", False, hist(latency, latency), first_item=hist(0.01),
                          genai=genai)]
    if errors:
        series.append(SeriesDelta("__call__", "RuntimeError", True, hist(*[latency] * errors)))
    return ReplicaSnapshot(ReplicaIdentity("app", deployment, f"{deployment}#1", "node1", 100, "v1"),
                           seq, t - 1.0, t, series, {"__call__": 1},
                           ReplicaHealth(cpu_percent=12.0, rss_bytes=2 ** 28, loop_lag_s=0.001),
                           usage=[UsageDelta("toy", "acme", 1, 0, 7, 5, hist(latency))])


def gpu_snap(t: float) -> GpuSnapshot:
    values = {"utilization_ratio": 0.5, "memory_used_bytes": 2.0 ** 33,
              "memory_total_bytes": 2.0 ** 36, "temperature_celsius": 61.0, "power_watts": 250.0,
              "throttled": 0.0}
    return GpuSnapshot("node1", t, [GpuDevice(0, "GPU-0", "NVIDIA H100 80GB HBM3", values,
                                              xid_errors={79: 1})])


def exposition_names() -> set[str]:
    """Sample and family names of a real /metrics built from one snapshot of everything."""
    clock = Clock(T0)
    store = WindowStore(clock=clock)
    store.ingest(replica_snap(T0, 0, errors=1))
    store.ingest_gpu(gpu_snap(T0))
    collector = MonitorCollector(series=store.cumulative,
                                 alerts=lambda: [({"alertname": "X", "severity": "page"}, "firing")],
                                 self_metrics=lambda: {})
    body, _ = render(collector)
    names = set()
    for family in text_string_to_metric_families(body.decode()):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


# ------------------------------------------------------------------------- dashboard

def test_dashboard_is_grafana_json_with_the_panels_and_variables_a_user_looks_for():
    d = json.loads(dashboard_json())
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("application", "deployment"):
        assert variables[name]["includeAll"] and variables[name]["multi"]
        assert "label_values(ray_monitor_requests_total" in variables[name]["query"]["query"]
    titles = {p["title"] for p in d["panels"]}
    assert {"Request rate", "Error ratio", "Latency p50 / p99", "In flight", "Replica CPU",
            "Replica memory (RSS)", "GPU utilization", "GPU memory", "GPU temperature",
            "GPU power", "Alerts firing"} <= titles
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}"
        assert p["targets"] and all(t["expr"] for t in p["targets"])
    latency = next(p for p in d["panels"] if p["title"] == "Latency p50 / p99")
    exprs = [t["expr"] for t in latency["targets"]]
    assert exprs[0].startswith("histogram_quantile(0.5, ") and exprs[1].startswith("histogram_quantile(0.99, ")
    assert all("ray_monitor_request_duration_seconds_bucket" in e and "le" in e for e in exprs)
    for p in d["panels"]:  # request and replica panels follow the template variables
        if p["title"] in ("Request rate", "Error ratio", "Replica CPU"):
            assert all('deployment=~"$deployment"' in t["expr"] for t in p["targets"])


def test_every_metric_the_dashboard_queries_is_one_the_code_exports():
    queried = queried_metrics(build_dashboard())
    # From the catalog, with the exposition's suffixes...
    from_catalog = {"ray_monitor_alerts"}
    for m in METRICS.values():
        from_catalog |= ({m.prometheus + "_total"} if m.kind == "counter" else
                         {m.prometheus + s for s in ("_bucket", "_sum", "_count")}
                         if m.kind == "histogram" else {m.prometheus})
    assert queried <= from_catalog, queried - from_catalog
    # ... and from a real exposition of one snapshot of every kind.
    exported = exposition_names()
    assert queried <= exported, queried - exported
    assert {"ray_monitor_requests_total", "ray_monitor_request_duration_seconds_bucket",
            "ray_monitor_gpu_utilization_ratio", "ray_monitor_alerts"} <= queried


def test_exported_name_adds_the_exposition_suffixes_and_refuses_wrong_ones():
    assert exported_name("requests") == "ray_monitor_requests_total"
    assert exported_name("latency_seconds", "bucket") == "ray_monitor_request_duration_seconds_bucket"
    assert exported_name("inflight") == "ray_monitor_inflight_requests"
    with pytest.raises(ValueError, match="histogram"):
        exported_name("latency_seconds")
    with pytest.raises(ValueError, match="counter"):
        exported_name("requests", "bucket")


def test_dashboard_queries_are_valid_promql(tmp_path):
    promtool = require_binary(PROMTOOL)
    d = build_dashboard()
    rules = []
    for i, p in enumerate(d["panels"]):
        for t in p.get("targets", ()):
            # Grafana fills these in before Prometheus sees the query.
            expr = (t["expr"].replace("$__rate_interval", "1m").replace("$application", ".*")
                    .replace("$deployment", ".*"))
            rules.append({"record": f"dashboard:panel{i}:{t['refId'].lower()}", "expr": expr})
    f = tmp_path / "dashboard-queries.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_build_dashboard_refuses_a_bad_uid():
    with pytest.raises(ValueError, match="uid"):
        build_dashboard(uid="has space")


# ---------------------------------------------------------------------- deployments/

def test_deployments_dashboard_is_the_generated_one():
    assert (DEPLOYMENTS / "grafana-dashboard.json").read_text() == dashboard_json(), (
        "regenerate it: ray-monitor dashboard export -o deployments/grafana-dashboard.json")


def test_deployments_prometheus_rules_are_the_export_of_the_default_rules():
    rules = load_rules(DEPLOYMENTS / "rules" / "default.yaml",
                       filename="deployments/rules/default.yaml")
    assert (DEPLOYMENTS / "prometheus-rules.yml").read_text() == export_prometheus_yaml(rules), (
        "regenerate it: ray-monitor rules export deployments/rules/default.yaml "
        "-o deployments/prometheus-rules.yml")


def test_prometheus_config_passes_promtool_and_loads_the_exported_rules():
    promtool = require_binary(PROMTOOL)
    config = DEPLOYMENTS / "prometheus.yml"
    res = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "prometheus-rules.yml" in res.stdout + res.stderr
    parsed = yaml.safe_load(config.read_text())
    [job] = parsed["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert re.fullmatch(r"[\w.-]+:8266", job["static_configs"][0]["targets"][0])


# -------------------------------------------------------------- the status page's JSON

def test_timeseries_covers_the_hour_per_minute_with_gaps_as_none():
    clock = Clock(T0)
    store = WindowStore(clock=clock)
    # An hour of traffic: slow (0.5 s) in minutes 20 to 29, errors in minutes 40 to 44,
    # and nothing at all in minutes 50 to 52.
    for i in range(3600):
        minute = i // 60
        if 50 <= minute <= 52:
            continue
        clock.t = T0 + i
        store.ingest(replica_snap(clock.t, i, latency=0.5 if 20 <= minute <= 29 else 0.01,
                                  errors=1 if 40 <= minute <= 44 else 0))
    now = clock.t + 0.5
    p99 = timeseries(store, "p99", "latency_seconds", now=now)
    # One point at the end of each whole minute in the window, and one (rolling) at now.
    assert p99["step_s"] == 60 and len(p99["times"]) == 60
    assert p99["times"][0] == T0 + 60 and p99["times"][-1] == now
    [series] = p99["series"]
    assert series["labels"] == {"application": "app", "deployment": "Classifier"}
    values = series["values"]  # values[k]: minute k of the data
    assert values[20:30] == pytest.approx([0.5] * 10, rel=0.01)
    assert values[10] == pytest.approx(0.01, rel=0.01) and values[59] == pytest.approx(0.01, rel=0.01)
    assert values[50:53] == [None, None, None]
    errors = timeseries(store, "error_ratio", "requests", now=now)["series"][0]["values"]
    assert errors[40:45] == pytest.approx([1 / 3] * 5)
    assert errors[35] == 0.0 and errors[51] is None


def test_timeseries_names_the_bad_parameter():
    store = WindowStore(clock=Clock(T0))
    with pytest.raises(BadRequest, match="metric='latency'"):
        timeseries(store, "p99", "latency", now=T0)
    with pytest.raises(BadRequest, match="function='p99' does not apply to the counter"):
        timeseries(store, "p99", "requests", now=T0)
    with pytest.raises(BadRequest, match="by='gpu'"):
        timeseries(store, "rate", "requests", now=T0, by=("gpu",))
    with pytest.raises(BadRequest, match="at most 720"):
        timeseries(store, "rate", "requests", now=T0, window_s=3600, step_s=1)
    assert parse_seconds("1h", "window", 60) == 3600 and parse_seconds(None, "step", 60) == 60
    assert parse_seconds("90", "step", 60) == 90
    with pytest.raises(BadRequest, match="window='soon'"):
        parse_seconds("soon", "window", 60)


def test_gpu_nodes_show_readings_and_why_a_node_has_none():
    nodes = gpu_nodes({"node1": gpu_snap(T0),
                       "node2": GpuSnapshot("node2", T0, no_gpus_reason="NVML Shared Library Not Found")})
    assert [n["node_id"] for n in nodes] == ["node1", "node2"]
    [dev] = nodes[0]["devices"]
    assert dev["values"]["temperature_celsius"] == 61.0 and dev["xid_errors"] == 1
    assert nodes[1]["devices"] == [] and nodes[1]["no_gpus_reason"] == "NVML Shared Library Not Found"
    json.dumps(nodes)


def test_traces_view_lists_kept_traces_and_says_why_there_are_none():
    from ray_monitor.aggregator.trace_store import TraceStore
    from tests.unit.test_trace_store import INGRESS, composed_failure

    store = TraceStore(clock=lambda: T0)
    view = traces_view(store, "slow")
    assert view["data"] == [] and "slow_threshold_s" in view["note"]
    for i in (1, 2, 3):
        ingress, model = composed_failure(i, start=T0 + i)
        store.add(ingress + model, INGRESS)
    view = traces_view(store, "errors", "2")
    assert [t["trace_id"][-1] for t in view["data"]] == ["3", "2"] and "note" not in view
    # What the page draws: every item has these, and its spans.
    item = view["data"][0]
    assert {"trace_id", "application", "deployment", "duration_s", "error", "kinds", "root",
            "span_count", "start", "spans"} <= set(item)
    assert len(traces_view(store, None)["data"]) == 3 == len(traces_view(store, "all")["data"])
    with pytest.raises(BadRequest, match="kind='fast'"):
        traces_view(store, "fast")
    with pytest.raises(BadRequest, match="limit='lots'"):
        traces_view(store, "errors", "lots")
    json.dumps(view)


def test_the_aggregator_app_serves_the_page_its_assets_and_its_json():
    import asyncio
    from types import SimpleNamespace

    from aiohttp.test_utils import TestClient, TestServer

    from ray_monitor.aggregator.core import AggregatorCore
    from ray_monitor.aggregator.http_api import make_app

    clock = Clock(T0)
    core = AggregatorCore({}, clock=clock)
    for i in range(120):
        clock.t = T0 + i
        core.ingest([replica_snap(clock.t, i)])
    core.ingest_gpu(gpu_snap(clock.t))

    async def hints():
        return []

    async def scenario() -> None:
        agg = SimpleNamespace(core=core, host="127.0.0.1", token=None, hints=hints)
        async with TestClient(TestServer(make_app(agg))) as client:
            for path in ("/", "/status"):
                page = await client.get(path)
                assert page.status == 200 and "<title>ray-monitor</title>" in await page.text()
            for asset in ("minichart.js", "status.js", "status.css"):
                assert (await client.get(f"/static/{asset}")).status == 200
            res = await client.get("/api/v1/timeseries?function=p99&metric=latency_seconds"
                                   "&window=5m&step=1m")
            body = await res.json()
            assert res.status == 200 and body["status"] == "success"
            [series] = body["data"]["series"]
            assert series["labels"]["deployment"] == "Classifier" and series["values"][-1] > 0
            bad = await client.get("/api/v1/timeseries?function=p99&metric=requests")
            assert bad.status == 400 and "does not apply" in (await bad.json())["error"]
            gpus = (await (await client.get("/api/v1/gpus")).json())["data"]
            assert gpus[0]["devices"][0]["model"] == "NVIDIA H100 80GB HBM3"
            traces = await (await client.get("/api/v1/traces?kind=errors")).json()
            assert traces["data"] == [] and traces["note"]

    try:
        asyncio.run(scenario())
    finally:
        core.notifier.close(2.0)


def test_the_aggregator_keeps_the_traces_replicas_send_and_serves_them():
    import asyncio
    from types import SimpleNamespace

    from aiohttp.test_utils import TestClient, TestServer

    from ray_monitor.aggregator.core import AggregatorCore
    from ray_monitor.aggregator.http_api import make_app
    from tests.unit.test_trace_store import composed_failure

    clock = Clock(T0)
    clock.t = T0
    core = AggregatorCore({}, clock=clock)
    ingress, model = composed_failure(5, start=T0)
    a, b = replica_snap(T0, 1, deployment="Ingress"), replica_snap(T0, 1, deployment="Model")
    a.traces, b.traces = ingress, model
    core.ingest([b, a])
    assert core.self_metrics()["gauges"]["traces_kept"][1] == 1.0

    async def scenario() -> None:
        agg = SimpleNamespace(core=core, host="127.0.0.1", token=None)
        async with TestClient(TestServer(make_app(agg))) as client:
            res = await client.get("/api/v1/traces?kind=errors&limit=5")
            [t] = (await res.json())["data"]
            assert (t["deployment"], t["error"], t["error_deployment"]) == (
                "Ingress", "KeyError: 'x'", "Model")
            assert [(s["deployment"], s["depth"]) for s in t["spans"]] == [
                ("Ingress", 0), ("Model", 1), ("Model", 2)]
            bad = await client.get("/api/v1/traces?kind=fast")
            assert bad.status == 400 and "kind='fast'" in (await bad.json())["error"]

    try:
        asyncio.run(scenario())
    finally:
        core.notifier.close(2.0)
