"""Export to a Prometheus rule file over the names the aggregator exposes on /metrics."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ray_monitor.common import catalog
from ray_monitor.alerting.export import (EXPORT_NOTE, bucket_rates_promql, classic_bounds,
                                         condition_promql, export_prometheus,
                                         export_prometheus_yaml)
from ray_monitor.common.errors import ConfigError
from ray_monitor.common.histogram import DEFAULT_CLASSIC_BOUNDS
from ray_monitor.alerting.loader import load_rules

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists()
                                        else None)
BY = "sum by (application, deployment)"


def export_expr(expr: str) -> dict:
    rs = load_rules({"groups": [{"name": "g", "rules": [{"alert": "A", "expr": expr}]}]})
    return export_prometheus(rs)["groups"][0]["rules"][0]


@pytest.mark.parametrize("expr, promql", [
    ("p99(latency_seconds[1m]) by (application, deployment) > 0.5",
     "histogram_quantile(0.99, sum by (application, deployment, le) "
     "(rate(ray_monitor_request_duration_seconds_bucket[1m]))) > 0.5"),
    ("quantile(0.75, latency_seconds[5m]) > 2",
     "histogram_quantile(0.75, sum by (le) (rate(ray_monitor_request_duration_seconds_bucket[5m]))) > 2"),
    ("error_ratio(requests[5m]) by (application, deployment) > 0.05",
     f"{BY} (rate(ray_monitor_request_errors_total[5m])) / "
     f"{BY} (rate(ray_monitor_requests_total[5m])) > 0.05"),
    ('rate(requests{deployment="Classifier", method=~"pre.*"}[1m]) by (application, deployment) < 1',
     f'{BY} (rate(ray_monitor_requests_total{{deployment="Classifier", method=~"pre.*"}}[1m])) < 1'),
    ("count(gpu_xid_errors[10m]) by (node, gpu) > 0",
     "sum by (gpu, node) (increase(ray_monitor_gpu_xid_errors_total[10m])) > 0"),
    ("avg(latency_seconds[5m]) by (application, deployment) > 0.2",
     f"{BY} (rate(ray_monitor_request_duration_seconds_sum[5m])) / "
     f"{BY} (rate(ray_monitor_request_duration_seconds_count[5m])) > 0.2"),
    ("avg(gpu_utilization[10m]) by (node, gpu) > 0.95",
     "avg by (gpu, node) (avg_over_time(ray_monitor_gpu_utilization_ratio[10m])) > 0.95"),
    ("max(gpu_temperature_celsius[5m]) by (node, gpu) >= 85",
     "max by (gpu, node) (max_over_time(ray_monitor_gpu_temperature_celsius[5m])) >= 85"),
    ("last(inflight[30s]) by (application, deployment) > 100",
     f"{BY} (last_over_time(ray_monitor_inflight_requests[30s])) > 100"),
    ("ratio_above(0.5, latency_seconds[5m]) by (deployment) > 0.01",
     "1 - (sum by (deployment) (rate(ray_monitor_request_duration_seconds_bucket{le=\"0.5\"}[5m])) / "
     "sum by (deployment) (rate(ray_monitor_request_duration_seconds_count[5m]))) > 0.01"),
    ("p90(latency_seconds[1m]) by (deployment) > 1 and rate(requests[1m]) by (deployment) > 5",
     "(histogram_quantile(0.9, sum by (deployment, le) "
     "(rate(ray_monitor_request_duration_seconds_bucket[1m]))) > 1) and "
     "(sum by (deployment) (rate(ray_monitor_requests_total[1m])) > 5)"),
])
def test_exported_expressions(expr, promql):
    rule = export_expr(expr)
    assert rule["expr"] == promql
    assert EXPORT_NOTE not in rule.get("annotations", {})


@pytest.mark.parametrize("expr, rates", [
    ('p99(latency_seconds{application="a", method="__call__"}[10s]) by (application) > 0.2',
     'sum by (application, le) (rate(ray_monitor_request_duration_seconds_bucket'
     '{application="a", method="__call__"}[10s]))'),
    ("quantile(0.75, latency_seconds[5m]) > 2",
     "sum by (le) (rate(ray_monitor_request_duration_seconds_bucket[5m]))"),
    ("max(latency_seconds[1m]) by (deployment) > 1",
     "sum by (deployment, le) (rate(ray_monitor_request_duration_seconds_bucket[1m]))"),
    ("avg(latency_seconds[5m]) > 0.2", None),
    ("max(gpu_temperature_celsius[5m]) by (node, gpu) >= 85", None),
    ('absent_over_time(requests{application="shop"}[1m])', None),
])
def test_bucket_rates_are_what_the_quantile_ranks_in(expr, rates):
    cond = load_rules({"groups": [{"name": "g", "rules": [{"alert": "A", "expr": expr}]}]}
                      ).groups[0].rules[0].conditions[0]
    assert bucket_rates_promql(cond) == rates
    if rates is not None:  # the very text histogram_quantile reads in the export
        assert condition_promql(cond).endswith(f", {rates})")


def test_thresholds_become_classic_bounds_so_the_export_is_exact():
    rs = load_rules({"groups": [{"name": "g", "rules": [
        {"alert": "A", "expr": "ratio_above(0.3, latency_seconds[5m]) > 0.01"},
        {"alert": "B", "expr": "p99(latency_seconds[15s]) by (deployment) > 0.4"},
        {"alert": "C", "expr": "max(first_item_seconds[1m]) > 2"},
        {"alert": "D", "expr": "p50(latency_seconds[1m]) > 0.5 and avg(latency_seconds[1m]) > 7"},
        {"slo": "fast", "objective": 99, "sli": {"latency_threshold": 0.15}}]}]})
    bounds = classic_bounds(rs)
    assert set(bounds["latency_seconds"]) == set(DEFAULT_CLASSIC_BOUNDS) | {0.3, 0.4, 0.15}
    assert set(bounds["first_item_seconds"]) == set(DEFAULT_CLASSIC_BOUNDS) | {2.0}
    a, b = export_prometheus(rs)["groups"][0]["rules"][:2]
    assert 'le="0.3"' in a["expr"] and EXPORT_NOTE not in a.get("annotations", {})
    assert EXPORT_NOTE not in b.get("annotations", {})
    text = export_prometheus_yaml(rs)
    assert ("ray_monitor_request_duration_seconds_bucket 0.15, 0.3, 0.4" in text
            and "ray_monitor_request_first_item_seconds_bucket 2.0" in text), text[:800]
    assert classic_bounds(None)["latency_seconds"] == DEFAULT_CLASSIC_BOUNDS


@pytest.mark.parametrize("expr, promql", [
    ('absent_over_time(requests{application="shop", deployment="Cart"}[1m])',
     'absent_over_time(ray_monitor_inflight_requests{application="shop", deployment="Cart"}[1m])'),
    ('absent_over_time(gpu_utilization{node="n1"}[30s]) == 1',
     'absent_over_time(ray_monitor_gpu_utilization_ratio{node="n1"}[30s]) == 1'),
    ('absent_over_time(inflight{application="shop", method="predict"}[1m]) by (deployment)',
     'group by (deployment) (ray_monitor_serve_running_replicas{application="shop"} > 0) unless '
     'group by (deployment) (count_over_time(ray_monitor_inflight_requests{application="shop", '
     'method="predict"}[1m]))'),
    ("error_ratio(requests[1m]) != 0",
     "(sum (rate(ray_monitor_request_errors_total[1m])) / sum (rate(ray_monitor_requests_total[1m])))"
     " != 0 unless (sum (rate(ray_monitor_request_errors_total[1m])) / "
     "sum (rate(ray_monitor_requests_total[1m]))) != (sum (rate(ray_monitor_request_errors_total[1m])) / "
     "sum (rate(ray_monitor_requests_total[1m])))"),
    ("rate(requests[1m]) != 0", "sum (rate(ray_monitor_requests_total[1m])) != 0"),
])
def test_absence_and_nan_guards(expr, promql):
    assert export_expr(expr)["expr"] == promql


def test_approximations_are_named_in_an_annotation():
    rule = export_expr('absent_over_time(requests{deployment="Cart"}[1m])')
    assert "ray_monitor_inflight_requests" in rule["annotations"][EXPORT_NOTE]
    rule = export_expr("absent_over_time(inflight[1m]) by (application, deployment)")
    assert "ray_monitor_serve_running_replicas" in rule["annotations"][EXPORT_NOTE]
    assert "ray_serve_deployment_replica_healthy" in rule["annotations"][EXPORT_NOTE]
    rule = export_expr("deriv(rss_bytes[10m]) by (replica) > 1000")
    assert rule["expr"] == "avg by (replica) (deriv(ray_monitor_replica_rss_bytes[10m])) > 1000"
    assert "raw samples" in rule["annotations"][EXPORT_NOTE]
    assert "count of a gauge" in export_expr("count(inflight[1m]) > 5")["annotations"][EXPORT_NOTE]
    rule = export_expr("zscore(rss_bytes[1h]) by (replica) > 3")
    assert rule["expr"] == (
        "((avg by (replica) (ray_monitor_replica_rss_bytes)) - avg_over_time((avg by (replica) "
        "(ray_monitor_replica_rss_bytes))[1h:])) / stddev_over_time((avg by (replica) "
        "(ray_monitor_replica_rss_bytes))[1h:]) > 3")
    assert "zscore" in rule["annotations"][EXPORT_NOTE]


def test_for_keep_firing_for_labels_annotations_and_interval_are_carried():
    rs = load_rules("""
groups:
  - name: serving
    interval: 30s
    rules:
      - alert: HighLatency
        expr: p99(latency_seconds[1m]) by (application, deployment) > 0.5
        for: 90s
        keep_firing_for: 1h
        labels: {severity: page}
        annotations: {summary: "p99 {{ $value | humanizeDuration }} on {{ $labels.deployment }}"}
        scale: {step: 1}
""")
    [group] = export_prometheus(rs)["groups"]
    assert group["name"] == "serving" and group["interval"] == "30s"
    [rule] = group["rules"]
    assert rule["for"] == "1m30s" and rule["keep_firing_for"] == "1h"
    assert rule["labels"] == {"severity": "page"}
    assert rule["annotations"] == {"summary": "p99 {{ $value | humanizeDuration }} on "
                                              "{{ $labels.deployment }}"}
    assert "scale" not in rule


def test_slo_period_scales_its_windows():
    rs = load_rules({"groups": [{"name": "slo", "rules": [
        {"slo": "availability", "objective": 99, "sli": "error_ratio", "period": "12h"}]}]})
    fast, slow = export_prometheus(rs)["groups"][0]["rules"]
    assert "[1m]" in fast["expr"] and "[5s]" in fast["expr"] and fast["expr"].count("> 0.144") == 2
    assert "[6m]" in slow["expr"] and "[30s]" in slow["expr"]
    assert fast["labels"]["burn_rate_window"] == "1m"
    with pytest.raises(ConfigError, match="period"):
        load_rules({"groups": [{"name": "slo", "rules": [
            {"slo": "a", "objective": 99, "sli": "error_ratio", "period": "1h"}]}]})


def test_slo_exports_as_its_burn_rate_alerts():
    rs = load_rules({"groups": [{"name": "slo", "rules": [
        {"slo": "availability", "objective": 99.9, "sli": "error_ratio", "by": ["deployment"]}]}]})
    fast, slow = export_prometheus(rs)["groups"][0]["rules"]
    assert fast["alert"] == "AvailabilitySLOBurnRateFast"
    assert "[1h]" in fast["expr"] and "[5m]" in fast["expr"] and fast["expr"].count("> 0.0144") == 2
    assert "[6h]" in slow["expr"] and "[30m]" in slow["expr"] and slow["expr"].count("> 0.006") == 2
    assert fast["labels"] == {"severity": "page", "slo": "availability", "burn_rate_window": "1h"}


def every_function_rules() -> dict:
    """One rule per function and metric kind, with and without by (...) and matchers."""
    example = {"counter": "requests", "histogram": "latency_seconds", "gauge": "inflight"}
    rules = []
    for fn, kinds in sorted(catalog.FUNCTIONS.items()):
        for kind in sorted(kinds):
            metric = example[kind]
            arg = {"quantile": "0.9, ", "ratio_above": "0.25, "}.get(fn, "")
            rules.append({"alert": f"{fn}_{kind}_by",
                          "expr": f"{fn}({arg}{metric}[5m]) by (application, deployment) > 1"})
            rules.append({"alert": f"{fn}_{kind}_all",
                          "expr": f'{fn}({arg}{metric}{{deployment=~"a|b"}}[5m]) <= 1'})
    return {"groups": [{"name": "every_function", "rules": rules}]}


def test_every_function_and_kind_exports():
    exported = export_prometheus(load_rules(every_function_rules()))["groups"][0]["rules"]
    assert len(exported) == 2 * sum(len(k) for k in catalog.FUNCTIONS.values())
    for rule in exported:
        assert "ray_monitor_" in rule["expr"]


def promtool_check(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "exported.yaml"
    path.write_text(text)
    return subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt install prometheus)")
@pytest.mark.parametrize("which", ["default", "every_function"])
def test_promtool_accepts_the_export(tmp_path, which):
    source = (ROOT / "deployments" / "rules" / "default.yaml" if which == "default"
              else every_function_rules())
    text = export_prometheus_yaml(load_rules(source))
    assert yaml.safe_load(text)["groups"]
    done = promtool_check(tmp_path, text)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
