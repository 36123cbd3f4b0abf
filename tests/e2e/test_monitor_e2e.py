"""The monitor with real servers on loopback: promtool and Prometheus read /metrics,
Alertmanager receives our alerts firing and then resolved, and a killed aggregator
comes back with its alerts and without a second firing notification."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import ray
import requests
from ray import serve

import ray_monitor
from ray_monitor.alerting.export import export_prometheus_yaml
from ray_monitor.alerting.loader import load_rules
from tests.conftest import wait_until
from tests.integration.test_alerts_serve import Faulty, Traffic
from tests.servers import promtool, start_alertmanager, start_prometheus

pytestmark = [pytest.mark.e2e, pytest.mark.ray]
REPO = Path(__file__).resolve().parents[2]


def _deploy(serve_apps, prefix="e"):
    app = f"{prefix}{uuid.uuid4().hex[:8]}"
    serve_apps.append(app)
    return app, serve.run(Faulty.bind(), name=app, route_prefix=f"/{app}")


def test_metrics_pass_promtool_and_a_real_prometheus_scrapes_them(mon, serve_apps, tmp_path):
    app, h = _deploy(serve_apps)
    for i in range(25):
        h.remote(i).result()
    h.set_fault.remote("errors").result()
    for i in range(5):
        with pytest.raises(Exception):
            h.remote(i).result()
    h.set_fault.remote("ok").result()

    def has_counts():
        text = requests.get(mon.metrics_url, timeout=10).text
        return f'application="{app}"' in text and text
    text = wait_until(has_counts, what="our series on /metrics")
    check = promtool("check", "metrics", input=text)
    assert check.returncode == 0, check.stdout + check.stderr
    # OpenMetrics with trace-id exemplars on the latency buckets: our five failed
    # requests were kept (tail keeping), so their spans are exemplars of this app's
    # buckets. They may ride the snapshot after the one that brought the first counts.
    def exemplars():
        om = requests.get(mon.metrics_url, headers={"Accept": "application/openmetrics-text"},
                          timeout=10)
        ours = [line for line in om.text.splitlines()
                if f'application="{app}"' in line and " # {span_id=" in line]
        return (om, ours) if ours else None
    om, ours = wait_until(exemplars, timeout=30, what="exemplars on our latency buckets")
    assert om.headers["Content-Type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")
    assert all(line.split("{", 1)[0].endswith("_bucket") for line in ours), ours[:3]

    rules_file = tmp_path / "exported.yml"
    rules_file.write_text(export_prometheus_yaml(load_rules(REPO / "deployments/rules/default.yaml")))
    assert promtool("check", "rules", str(rules_file)).returncode == 0
    target = mon.url.removeprefix("http://")
    with start_prometheus(tmp_path, scrape_targets=[target], rule_files=[rules_file]) as prom:
        def scraped():
            res = prom.query(f'sum by (outcome) (ray_monitor_requests_total{{application="{app}",method="__call__"}})')
            return {r["metric"]["outcome"]: float(r["value"][1]) for r in res} or None
        got = wait_until(scraped, timeout=60, what="Prometheus to scrape the aggregator")
        assert got == {"ok": 25.0, "RuntimeError": 5.0}
        assert wait_until(lambda: [t for t in prom.targets() if t["health"] == "up"])
        groups = prom.get_json("/api/v1/rules")["data"]["groups"]
        assert {g["name"] for g in groups} == {g.name for g in
                                              load_rules(REPO / "deployments/rules/default.yaml").groups}


def _rules(app: str, extra: str = "") -> str:
    return f"""
groups:
  - name: e2e
    interval: 1s
    rules:
      - alert: E2EErrors
        expr: error_ratio(requests{{application="{app}"}}[4s]) by (application, deployment) > 0.5
        for: 1s
        labels: {{severity: page}}
        annotations: {{summary: "errors on {{{{ $labels.deployment }}}}"}}
{extra}"""


def test_alertmanager_receives_firing_then_resolved(mon, serve_apps, tmp_path):
    app, h = _deploy(serve_apps)
    with start_alertmanager(tmp_path) as am:
        ray_monitor.start(rules=_rules(app), notifications={"alertmanager": [{"url": am.url}]})
        try:
            with Traffic(h):
                h.set_fault.remote("errors").result()

                def ours():
                    return [a for a in am.api_alerts()
                            if a["labels"].get("alertname") == "E2EErrors"
                            and a["labels"].get("application") == app]
                [active] = wait_until(ours, timeout=60, what="the alert in Alertmanager")
                assert active["status"]["state"] == "active"
                assert active["labels"]["severity"] == "page"
                assert active["annotations"]["summary"] == "errors on Faulty"
                h.set_fault.remote("ok").result()
                wait_until(lambda: not ours(), timeout=60,
                           what="the resolved alert to leave Alertmanager's active list")
                # Alertmanager keeps it, resolved, with an end time in the past.
                gone = am.get_json("/api/v2/alerts?active=false&silenced=false&inhibited=false"
                                   "&unprocessed=false")
                assert all(a["labels"].get("application") != app for a in gone)
        finally:
            ray_monitor.start(notifications={})


class _Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_killed_aggregator_resumes_its_alerts_without_a_second_firing(mon, serve_apps):
    app, h = _deploy(serve_apps, "k")
    _Hook.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{server.server_address[1]}/hook"
    pending_rule = f"""      - alert: E2ESlowBurn
        expr: count(requests{{application="{app}"}}[10m]) by (application) > 0
        for: 1h
"""
    try:
        ray_monitor.start(rules=_rules(app, pending_rule), notifications={
            "webhooks": [{"url": hook}], "route": {"group_wait": "0s", "group_interval": "1s",
                                                    "repeat_interval": "1h"}})
        with Traffic(h) as traffic:
            h.set_fault.remote("errors").result()

            def states():
                return {a["name"]: a for a in mon.alerts() if a["labels"].get("application") == app}
            before = wait_until(lambda: (s := states()).get("E2EErrors", {}).get("state")
                                == "firing" and s.get("E2ESlowBurn", {}).get("state") == "pending"
                                and s, timeout=60, what="one alert firing and one pending")
            wait_until(lambda: [p for p in _Hook.received if p["status"] == "firing"],
                       timeout=30, what="the firing webhook")
            firing_sent = sum(p["status"] == "firing" for p in _Hook.received)
            time.sleep(2)  # let the state reach the GCS

            sent_at_kill = traffic.sent
            ray.kill(mon.actor, no_restart=False)
            time.sleep(1)
            url = ray.get(mon.actor.ready.remote(), timeout=120)  # the restarted actor
            assert url == mon.url  # same port: scrape configs keep working
            after = wait_until(lambda: (s := states()).get("E2EErrors") and s, timeout=60)
            assert after["E2EErrors"]["state"] == "firing"
            assert after["E2EErrors"]["active_at"] == before["E2EErrors"]["active_at"]
            assert after["E2EErrors"]["fired_at"] == before["E2EErrors"]["fired_at"]
            assert after["E2ESlowBurn"]["state"] == "pending"
            assert after["E2ESlowBurn"]["active_at"] == before["E2ESlowBurn"]["active_at"]
            time.sleep(5)  # several evaluations after the restart
            assert sum(p["status"] == "firing" for p in _Hook.received) == firing_sent
            h.set_fault.remote("ok").result()
        # Request counts live in memory and start again after a restart (as a counter
        # reset); what the replica sent while the aggregator was away was buffered and
        # arrives: every request since the kill is counted, and none was dropped.
        def counted():
            res = mon.query("count", "requests", 600.0, by=("application", "method"))
            return sum(v for k, v in res.items()
                       if json.loads(k) == {"application": app, "method": "__call__"})
        wait_until(lambda: counted() >= traffic.sent - sent_at_kill, timeout=60,
                   what=f"the {traffic.sent - sent_at_kill} requests since the kill counted")
        assert mon.stats()["store"]["replica_dropped"] == 0
    finally:
        server.shutdown()
        ray_monitor.start(rules=None, notifications={})
