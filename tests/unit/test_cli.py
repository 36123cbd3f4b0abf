"""The ``ray-monitor`` command line, driven through ``main()`` with a fake monitor (no Ray)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ray_monitor import MonitorNotRunning
from ray_monitor.client.cli import main
from ray_monitor.client.tables import (format_age, format_ms, format_percent, format_rate,
                                       format_value, render_table)
from ray_monitor.common.snapshot import GpuDevice, GpuProcess, GpuSnapshot, ReplicaIdentity

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RULES = ROOT / "deployments" / "rules" / "default.yaml"
PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists()
                                        else None)
NOW = 1_700_000_000.0


class FakeMonitor:
    """Our own ``Monitor`` API, answering with data shaped as the aggregator returns it."""

    url = "http://127.0.0.1:8266"
    metrics_url = url + "/metrics"

    def __init__(self, alerts=None):
        self.reloaded = []
        self._alerts = ALERTS if alerts is None else alerts

    def deployments(self):
        return [
            {"application": "default", "deployment": "Classifier", "replicas": 2,
             "model_versions": ["v3", "v4"], "requests_1m": 744.0, "rate_per_s": 12.4,
             "error_ratio": 0.005, "p50_s": 0.0123, "p99_s": 0.085, "inflight": 3.0},
            {"application": "default", "deployment": "Preprocessor", "replicas": 1,
             "model_versions": [], "requests_1m": 0.0, "rate_per_s": 0.0, "error_ratio": None,
             "p50_s": None, "p99_s": None, "inflight": None},
        ]

    def alerts(self):
        return [dict(a) for a in self._alerts]

    def hints(self):
        return []

    def reload(self, rules):
        self.reloaded.append(rules)
        return {"status": "ok", "rules": 9}


ALERTS = [
    {"name": "HighLatencyP99", "state": "firing",
     "labels": {"alertname": "HighLatencyP99", "application": "default",
                "deployment": "Classifier", "severity": "page"},
     "annotations": {"summary": "p99 latency of default/Classifier is 1.2s"},
     "value": 1.2345678, "active_at": NOW - 500, "fired_at": NOW - 192, "resolved_at": None},
    {"name": "HighErrorRatio", "state": "pending",
     "labels": {"alertname": "HighErrorRatio", "application": "default",
                "deployment": "Preprocessor", "severity": "page"},
     "annotations": {"summary": "6.2% of requests to default/Preprocessor fail"},
     "value": 0.0625, "active_at": NOW - 42, "fired_at": None, "resolved_at": None},
    {"name": "GPUXidErrors", "state": "resolved",
     "labels": {"alertname": "GPUXidErrors", "node": "n1", "gpu": "0", "severity": "page"},
     "annotations": {}, "value": 1.0, "active_at": NOW - 7200, "fired_at": NOW - 7200,
     "resolved_at": NOW - 3600},
]


class FakeGpuMonitor(FakeMonitor):
    """A monitor that has gained ``gpus()``: the status command shows them."""

    def gpus(self):
        ident = ReplicaIdentity("default", "Classifier", "Classifier#abc", "node-one-0123456789", 4242)
        return {"node-one-0123456789": GpuSnapshot(
            node_id="node-one-0123456789", time=NOW,
            devices=[GpuDevice(0, "GPU-0", "NVIDIA H100", {
                "utilization_ratio": 0.87, "memory_used_bytes": 40 * 2**30,
                "memory_total_bytes": 80 * 2**30, "power_watts": 512.4,
                "temperature_celsius": 64.0})],
            processes=[GpuProcess(0, "GPU-0", 4242, 2**30, 0.5, replica=ident)]),
            "node-two": GpuSnapshot(node_id="node-two", time=NOW, no_gpus_reason="NVML not found")}


def run(argv, **kw):
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, out=out, err=err, clock=lambda: NOW, **kw)
    return code, out.getvalue(), err.getvalue()


def not_running():
    raise MonitorNotRunning("no ray-monitor is running in this cluster; start one with "
                            "ray_monitor.start() or `ray-monitor start`")


# ---------------------------------------------------------------------- formatting

@pytest.mark.parametrize("seconds, text", [
    (None, "-"), (-3, "0s"), (0.4, "0s"), (42, "42s"), (192, "3m12s"), (3600, "1h0m"),
    (7530, "2h5m"), (97200, "1d3h")])
def test_format_age(seconds, text):
    assert format_age(seconds) == text


def test_format_numbers():
    assert [format_rate(v) for v in (None, 0, 0.004, 0.25, 12.44, 1530.2)] == [
        "-", "0", "<0.01", "0.25", "12.4", "1530"]
    assert [format_percent(v) for v in (None, 0, 0.00001, 0.005, 0.125, 1)] == [
        "-", "0%", "<0.01%", "0.50%", "12.5%", "100.0%"]
    assert [format_ms(v) for v in (None, 0.00045, 0.0123, 0.85, 2.5)] == [
        "-", "0.45", "12.3", "850", "2500"]
    assert [format_value(v) for v in (None, 3.0, 1.2345678, 0.0625)] == ["-", "3", "1.235", "0.0625"]


def test_render_table_aligns_columns():
    text = render_table(["NAME", "N"], [["a", 1], ["longer", 22]])
    assert text.splitlines() == ["NAME    N", "a       1", "longer  22"]


# -------------------------------------------------------------------------- rules

def test_rules_check_ok():
    code, out, _ = run(["rules", "check", str(DEFAULT_RULES)])
    assert code == 0
    assert out == f"{DEFAULT_RULES}: OK (9 rules in 2 groups)\n"


BAD_RULES = """\
groups:
  - name: serving
    rules:
      - alert: SlowThings
        expr: p99(latency_seconds[1m]) by (application) > 0.5
        for: soon
      - alert: Broken
        expr: nosuchfunc(requests[1m]) > 1
"""


def test_rules_check_names_file_rule_and_field_of_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_RULES)
    code, out, _ = run(["rules", "check", str(DEFAULT_RULES), str(bad)])
    assert code == 1
    assert f"{DEFAULT_RULES}: OK" in out  # the good file is still reported
    assert f"2 problems in {bad}" in out
    assert "rule 'SlowThings'" in out and "field 'for'" in out and '"soon"' in out
    assert "rule 'Broken'" in out and "field 'expr'" in out and "nosuchfunc" in out


def test_rules_check_json(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_RULES)
    code, out, _ = run(["rules", "check", "--json", str(DEFAULT_RULES), str(bad)])
    assert code == 1
    good, failed = json.loads(out)
    assert good == {"file": str(DEFAULT_RULES), "ok": True, "rules": 9, "groups": 2}
    assert failed["ok"] is False and failed["file"] == str(bad)
    assert {(p["rule"], p["field"]) for p in failed["problems"]} == {("SlowThings", "for"),
                                                                     ("Broken", "expr")}


def test_rules_check_missing_file(tmp_path):
    code, out, _ = run(["rules", "check", str(tmp_path / "nope.yaml")])
    assert code == 1 and "nope.yaml" in out and "cannot read" in out


BAD_AUTOSCALING = """\
groups: []
autoscaling:
  deployments:
    - {deployment: Classifier, min_replicas: 5, max_replicas: 2, cooldown: soon}
    - deployment: Ranker
      targets:
        - {metric: 'p95(latency[30s])', value: 0.2}
        - {metric: 'p96(latency_seconds[30s])', value: -1}
"""


def test_rules_check_refuses_a_bad_autoscaling_section_one_problem_a_line(tmp_path):
    bad = tmp_path / "scaling.yaml"
    bad.write_text(BAD_AUTOSCALING)
    code, out, _ = run(["rules", "check", str(bad)])
    assert code == 1
    head, *lines = out.splitlines()
    assert head == f"5 problems in {bad}:"
    where = [line.split(": ")[1:3] for line in lines]
    assert where == [
        ["deployment 'Classifier'", "field 'autoscaling.deployments[0].min_replicas'"],
        ["deployment 'Classifier'", "field 'autoscaling.deployments[0].cooldown'"],
        ["deployment 'Ranker'", "field 'autoscaling.deployments[1].targets[0].metric'"],
        ["deployment 'Ranker'", "field 'autoscaling.deployments[1].targets[1].value'"],
        ["deployment 'Ranker'", "field 'autoscaling.deployments[1].targets[1].metric'"]]
    assert all(line.startswith(f"  - {bad}: deployment ") for line in lines)
    assert "above max_replicas 2" in lines[0] and "unknown metric 'latency'" in lines[2]
    assert "above 0" in lines[3] and "unknown function 'p96'" in lines[4]


def test_rules_check_json_names_the_deployment_of_each_problem(tmp_path):
    bad = tmp_path / "scaling.yaml"
    bad.write_text(BAD_AUTOSCALING)
    code, out, _ = run(["rules", "check", "--json", str(bad)])
    [result] = json.loads(out)
    assert code == 1 and result["ok"] is False
    assert [(p["deployment"], p["field"]) for p in result["problems"]] == [
        ("Classifier", "autoscaling.deployments[0].min_replicas"),
        ("Classifier", "autoscaling.deployments[0].cooldown"),
        ("Ranker", "autoscaling.deployments[1].targets[0].metric"),
        ("Ranker", "autoscaling.deployments[1].targets[1].value"),
        ("Ranker", "autoscaling.deployments[1].targets[1].metric")]
    assert all(p["file"] == str(bad) and p["message"] for p in result["problems"])


def test_rules_export_and_start_refuse_a_bad_autoscaling_section(tmp_path):
    bad = tmp_path / "scaling.yaml"
    bad.write_text(BAD_AUTOSCALING)
    code, out, err = run(["rules", "export", str(bad)])
    assert code == 1 and out == "" and "autoscaling.deployments[0].min_replicas" in err
    started = []
    code, _, err = run(["start", "--rules", str(bad)], start=lambda **kw: started.append(kw))
    assert code == 1 and "deployment 'Ranker'" in err and started == []


def test_rules_check_accepts_a_file_with_every_section(tmp_path):
    good = tmp_path / "all.yaml"
    good.write_text(BAD_RULES.split("      - alert: SlowThings")[0]
                    + "      - {slo: availability, objective: 99.9, sli: error_ratio}\n"
                    "autoscaling:\n  deployments: [{deployment: Classifier, max_replicas: 4}]\n"
                    "notifications:\n  webhooks: [{url: 'http://hooks.test/x'}]\n")
    code, out, _ = run(["rules", "check", str(good)])
    assert (code, out) == (0, f"{good}: OK (2 rules in 1 groups)\n")


def test_a_word_is_refused_by_the_cli_as_by_load_rule_file(tmp_path, monkeypatch):
    from ray_monitor.alerting.loader import load_rule_file
    from ray_monitor.common.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_rule_file("myrules")
    assert "no rule file 'myrules'" in str(info.value)
    assert run(["rules", "check", "myrules"])[:2] == (1, f"{info.value}\n")
    assert run(["rules", "export", "myrules"]) == (1, "", f"{info.value}\n")


def test_rules_export_prints_a_prometheus_rule_file(tmp_path):
    code, out, _ = run(["rules", "export", str(DEFAULT_RULES)])
    assert code == 0
    groups = yaml.safe_load(out)["groups"]
    assert [g["name"] for g in groups] == ["serving", "gpu"]
    assert "ray_monitor_" in groups[0]["rules"][0]["expr"]
    if PROMTOOL:
        path = tmp_path / "exported.yaml"
        path.write_text(out)
        done = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_rules_export_to_a_file(tmp_path):
    dest = tmp_path / "prom.yaml"
    code, out, _ = run(["rules", "export", str(DEFAULT_RULES), "-o", str(dest)])
    assert code == 0 and out == f"wrote {dest}\n"
    assert yaml.safe_load(dest.read_text())["groups"]


def test_rules_export_refuses_a_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_RULES)
    code, out, err = run(["rules", "export", str(bad)])
    assert code == 1 and out == "" and "SlowThings" in err


def test_dashboard_export_prints_grafana_json_and_writes_a_file(tmp_path):
    code, out, _ = run(["dashboard", "export"])
    assert code == 0
    dashboard = json.loads(out)
    assert dashboard["uid"] == "ray-monitor"
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "application",
                                                                    "deployment"]
    dest = tmp_path / "dash.json"
    code, out, _ = run(["dashboard", "export", "-o", str(dest), "--title", "Serving", "--uid", "serving"])
    assert code == 0 and out == f"wrote {dest}\n"
    written = json.loads(dest.read_text())
    assert (written["title"], written["uid"]) == ("Serving", "serving")


def test_dashboard_export_refuses_a_bad_uid():
    code, out, err = run(["dashboard", "export", "--uid", "not a uid"])
    assert code == 2 and out == "" and "--uid" in err


def test_rules_reload_sends_a_checked_file(tmp_path):
    monitor = FakeMonitor()
    code, out, _ = run(["rules", "reload", str(DEFAULT_RULES)], connect=lambda: monitor)
    assert code == 0 and out == f"{DEFAULT_RULES}: reloaded (9 rules)\n"
    assert monitor.reloaded == [DEFAULT_RULES]


def test_rules_reload_refuses_a_bad_file_locally(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_RULES)
    monitor = FakeMonitor()
    code, _, err = run(["rules", "reload", str(bad)], connect=lambda: monitor)
    assert code == 1 and "Broken" in err
    assert monitor.reloaded == []


# ------------------------------------------------------------------ status and alerts

def test_status_table():
    code, out, _ = run(["status"], connect=FakeMonitor)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "ray-monitor at http://127.0.0.1:8266"
    header = lines.index("DEPLOYMENTS (2, last 1m)") + 1
    assert lines[header].split() == ["APPLICATION", "DEPLOYMENT", "REPLICAS", "VERSIONS", "RATE/S",
                                     "ERRORS", "P50(ms)", "P99(ms)", "IN-FLIGHT"]
    assert lines[header + 1].split() == ["default", "Classifier", "2", "v3,v4", "12.4", "0.50%",
                                         "12.3", "85.0", "3"]
    assert lines[header + 2].split() == ["default", "Preprocessor", "1", "-", "0", "-", "-", "-", "-"]
    firing = lines.index("FIRING ALERTS (1; 1 pending, see `ray-monitor alerts`)") + 1
    assert lines[firing].split() == ["ALERT", "LABELS", "SINCE", "VALUE"]
    assert lines[firing + 1].split() == [
        "HighLatencyP99", "application=default,deployment=Classifier,severity=page",
        "3m12s", "ago", "1.235"]
    assert "HighErrorRatio" not in out  # pending: only in `alerts`
    assert "GPUS" not in out and "HINTS" not in out  # no gpus() on this monitor, no hints


def test_status_with_gpus_and_hints():
    class Monitor(FakeGpuMonitor):
        def hints(self):
            # The shape of hints.Hint.to_dict(), as /api/v1/hints returns it.
            return [{"application": "default", "deployment": "Classifier", "current": 2,
                     "desired": 3, "direction": "up", "reason": "rule", "apply": "policy",
                     "updated_at": 0.0, "reasons": [{"source": "rule", "name": "HighLatencyP99",
                                                     "value": 1.2, "desired": 3, "step": 1}]}]

    code, out, _ = run(["status"], connect=Monitor)
    assert code == 0
    lines = out.splitlines()
    hint = lines.index("AUTOSCALING HINTS (1)") + 2
    assert lines[hint].split() == ["default", "Classifier", "2", "3", "policy", "rule",
                                   "HighLatencyP99", "(+1)"]
    gpu = lines.index("GPUS") + 1
    assert lines[gpu].split() == ["NODE", "GPU", "MODEL", "UTIL", "MEMORY", "POWER", "TEMP", "REPLICAS"]
    assert lines[gpu + 1].split() == ["node-one-012", "0", "NVIDIA", "H100", "87.0%", "40.0/80.0GiB",
                                      "512W", "64C", "Classifier#abc"]
    assert "no GPUs: NVML not found" in lines[gpu + 2]


def test_status_empty_monitor():
    class Empty(FakeMonitor):
        def deployments(self):
            return []

    code, out, _ = run(["status"], connect=lambda: Empty(alerts=[]))
    assert code == 0
    assert "No deployment has reported yet" in out and "No alert is firing." in out


def test_status_json_has_stable_keys():
    code, out, _ = run(["status", "--json"], connect=FakeGpuMonitor)
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"url", "deployments", "alerts", "pending_alerts", "hints", "gpus"}
    assert data["deployments"] == FakeMonitor().deployments()
    assert [a["name"] for a in data["alerts"]] == ["HighLatencyP99"] and data["pending_alerts"] == 1
    assert data["gpus"][0]["devices"][0]["values"]["utilization_ratio"] == 0.87
    code, out, _ = run(["status", "--json"], connect=FakeMonitor)
    assert json.loads(out)["gpus"] is None


def test_alerts_table_all_states_firing_first():
    code, out, _ = run(["alerts"], connect=FakeMonitor)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ALERT", "STATE", "LABELS", "SINCE", "VALUE", "SUMMARY"]
    assert [l.split()[:2] for l in lines[1:]] == [["HighLatencyP99", "firing"],
                                                 ["HighErrorRatio", "pending"],
                                                 ["GPUXidErrors", "resolved"]]
    assert "3m12s ago" in lines[1] and lines[1].endswith("p99 latency of default/Classifier is 1.2s")
    assert "42s ago" in lines[2] and "0.0625" in lines[2]
    assert "1h0m ago" in lines[3] and "gpu=0,node=n1,severity=page" in lines[3]


def test_alerts_filtered_by_state_and_json():
    code, out, _ = run(["alerts", "--state", "pending"], connect=FakeMonitor)
    assert code == 0 and len(out.splitlines()) == 2 and "HighErrorRatio" in out
    code, out, _ = run(["alerts", "--state", "firing", "--json"], connect=FakeMonitor)
    (alert,) = json.loads(out)
    assert alert == ALERTS[0]
    code, out, _ = run(["alerts", "--state", "firing"], connect=lambda: FakeMonitor(alerts=[]))
    assert code == 0 and out == "No firing alerts.\n"


def test_alerts_watch_refreshes_for_max_rounds():
    from ray_monitor.client import cli

    slept = []
    out = io.StringIO()
    args = cli.build_parser().parse_args(["alerts", "--watch", "--interval", "0.5"])
    assert cli.cmd_alerts(args, connect=FakeMonitor, out=out, clock=lambda: NOW,
                          sleep=slept.append, max_rounds=3) == 0
    assert slept == [0.5, 0.5]  # between rounds, not after the last
    assert out.getvalue().count("(Ctrl-C to stop)") == 3
    assert out.getvalue().count("HighLatencyP99") == 3


def test_alerts_watch_json_is_one_document_per_round_and_stops_on_ctrl_c():
    from ray_monitor.client import cli

    def sleep(_):
        if len(out.getvalue().splitlines()) >= 2:
            raise KeyboardInterrupt

    out = io.StringIO()
    args = cli.build_parser().parse_args(["alerts", "-w", "--json", "--interval", "1"])
    assert cli.cmd_alerts(args, connect=FakeMonitor, out=out, clock=lambda: NOW, sleep=sleep) == 0
    rounds = [json.loads(line) for line in out.getvalue().splitlines() if line]
    assert len(rounds) == 2 and all(len(r) == 3 for r in rounds)


# --------------------------------------------------------------- no monitor, usage

@pytest.mark.parametrize("argv", [["status"], ["alerts"], ["alerts", "--watch"],
                                  ["rules", "reload", str(DEFAULT_RULES)], ["traces", "--errors"]])
def test_no_monitor_is_one_line_and_exit_3(argv):
    code, out, err = run(argv, connect=not_running)
    assert code == 3 and out == ""
    assert err == ("ray-monitor: no ray-monitor is running in this cluster; start one with "
                   "ray_monitor.start() or `ray-monitor start`\n")


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["alerts", "--interval", "0"],
                                  ["alerts", "--state", "sleeping"], ["rules", "check"],
                                  ["start", "--port", "99999"], ["traces", "--slow", "--errors"],
                                  ["traces", "--limit", "0"]])
def test_usage_errors_exit_2(argv):
    code, out, err = run(argv, connect=FakeMonitor)
    assert code == 2 and "usage: ray-monitor" in err


def test_start_and_stop_print_what_happened(tmp_path):
    calls = []

    def start(**kw):
        calls.append(kw)
        return FakeMonitor()

    code, out, _ = run(["start", "--rules", str(DEFAULT_RULES), "--port", "9000"], start=start)
    assert code == 0
    assert calls == [{"rules": DEFAULT_RULES, "port": 9000}]
    assert out.splitlines() == ["ray-monitor is running at http://127.0.0.1:8266",
                                "  metrics: http://127.0.0.1:8266/metrics",
                                f"  rules:   {DEFAULT_RULES} (9 rules)"]
    code, out, _ = run(["start", "--json"], start=start)
    assert json.loads(out)["metrics_url"] == "http://127.0.0.1:8266/metrics"

    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_RULES)
    code, _, err = run(["start", "--rules", str(bad)], start=start)
    assert code == 1 and "SlowThings" in err and len(calls) == 2  # refused before starting

    assert run(["stop"], stop=lambda: True)[:2] == (0, "ray-monitor stopped\n")
    assert run(["stop"], stop=lambda: False)[:2] == (0, "no ray-monitor was running\n")


def test_console_script_entry_point():
    script = Path(sys.executable).parent / "ray-monitor"
    if not script.exists():
        pytest.skip(f"no console script at {script}; pip install -e . first")
    done = subprocess.run([str(script), "rules", "check", "deployments/rules/default.yaml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "deployments/rules/default.yaml: OK (9 rules in 2 groups)\n"


# ------------------------------------------------------------------------- traces

class FakeTraceMonitor(FakeMonitor):
    """Answers ``traces()`` from a real trace store, so the shapes are the aggregator's."""

    def __init__(self):
        from ray_monitor.aggregator.trace_store import TraceStore
        from tests.unit.test_trace_store import INGRESS, MODEL, composed_failure, record

        super().__init__()
        self.store = TraceStore(clock=lambda: NOW)
        ingress, model = composed_failure(0xabc, start=NOW - 75)
        self.store.add(ingress, INGRESS)
        self.store.add(model, MODEL)
        self.store.add([record(0xdef, 1, name="Model.__call__", start=NOW - 5, duration=1.25,
                               slow=True)], MODEL)
        self.asked = []

    def traces(self, kind=None, limit=50):
        self.asked.append((kind, limit))
        return self.store.traces(kind, limit)


def test_traces_table_shows_when_where_what_and_why():
    fake = FakeTraceMonitor()
    code, out, err = run(["traces", "--errors", "--limit", "5"], connect=lambda: fake)
    assert code == 0 and err == "" and fake.asked == [("errors", 5)]
    lines = out.splitlines()
    assert lines[0] == "FAILED TRACES (1, newest first; --json for their spans)"
    assert lines[1].split() == ["WHEN", "TRACE", "KIND", "APPLICATION/DEPLOYMENT", "ROOT",
                                "DURATION(ms)", "SPANS", "ERROR"]
    assert lines[2].split()[:7] == ["1m15s", "ago", f"{0xabc:032x}", "errors", "shop/Ingress",
                                    "Ingress.__call__", "50.0"]
    assert lines[2].split()[7:] == ["3", "KeyError:", "'x'"]


def test_traces_slow_and_both_kinds_newest_first():
    fake = FakeTraceMonitor()
    code, out, _ = run(["traces", "--slow"], connect=lambda: fake)
    assert code == 0 and fake.asked == [("slow", 20)]
    assert f"{0xdef:032x}" in out and f"{0xabc:032x}" not in out and "1250" in out
    code, out, _ = run(["traces"], connect=lambda: fake)
    rows = out.splitlines()[2:]
    assert out.startswith("SLOW OR FAILED TRACES (2") and [r.split()[2][-3:] for r in rows] == [
        "def", "abc"]


def test_traces_json_has_the_spans_and_parent_links():
    fake = FakeTraceMonitor()
    code, out, _ = run(["traces", "--errors", "--json"], connect=lambda: fake)
    [t] = json.loads(out)
    spans = t["spans"]
    assert code == 0 and [s["deployment"] for s in spans] == ["Ingress", "Model", "Model"]
    assert spans[1]["parent_span_id"] == spans[0]["span_id"]
    assert spans[2]["parent_span_id"] == spans[1]["span_id"]


def test_traces_none_kept_says_so():
    fake = FakeTraceMonitor()
    fake.store = type(fake.store)(clock=lambda: NOW)
    code, out, _ = run(["traces", "--slow"], connect=lambda: fake)
    assert code == 0 and out.startswith("No slow requests kept yet.")


def test_status_shows_streams_only_for_deployments_that_stream():
    class Monitor(FakeMonitor):
        def deployments(self):
            rows = FakeMonitor.deployments(self)
            rows[0]["stream"] = {"ttft_p50_s": 0.0612, "ttft_p95_s": 0.41, "tpot_p50_s": 0.0103,
                                 "tpot_p95_s": 0.0125, "tokens_per_s": 96.4, "items_per_s": 90.0,
                                 "queue_p50_s": 0.0021, "queue_p95_s": 0.25,
                                 "top_tenants": [{"tenant": "acme", "requests": 120.0,
                                                  "output_tokens": 41000.0},
                                                 {"tenant": "zeta", "requests": 7.0,
                                                  "output_tokens": None}]}
            rows.append({**rows[1], "deployment": "Echo", "stream": {
                "ttft_p50_s": 0.005, "ttft_p95_s": 0.009, "tpot_p50_s": None, "tpot_p95_s": None,
                "tokens_per_s": None, "items_per_s": 2.5, "top_tenants": []}})
            return rows

    code, out, _ = run(["status"], connect=Monitor)
    assert code == 0
    lines = out.splitlines()
    header = lines.index("DEPLOYMENTS (3, last 1m)") + 1
    assert lines[header].split()[-1] == "IN-FLIGHT"  # the deployments table is unchanged
    streams = lines.index("STREAMS (2, last 1m)") + 1
    assert lines[streams].split() == ["APPLICATION", "DEPLOYMENT", "TTFT-P50(ms)", "TTFT-P95(ms)",
                                      "TPOT-P50(ms)", "TPOT-P95(ms)", "QUEUE-P50(ms)",
                                      "QUEUE-P95(ms)", "TOKENS/S", "TOP", "TENANTS"]
    assert lines[streams + 1].split() == ["default", "Classifier", "61.2", "410", "10.3", "12.5",
                                          "2.10", "250", "96.4", "acme:120(41.0k),zeta:7"]
    assert lines[streams + 2].split() == ["default", "Echo", "5.00", "9.00", "-", "-", "-", "-",
                                          "2.50", "items", "-"]
    assert "Preprocessor" not in "\n".join(lines[streams:streams + 4])
    code, out, _ = run(["status"], connect=FakeMonitor)
    assert "STREAMS" not in out  # nothing streams: the page looks as before
