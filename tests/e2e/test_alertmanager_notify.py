"""ray-monitor notifications against a real Alertmanager (and Prometheus) on loopback."""

from __future__ import annotations

import queue
import time
from datetime import datetime
from pathlib import Path

import pytest

from ray_monitor.alerting.message import AlertMessage
from ray_monitor.alerting.notifier import Notifier
from tests.servers import amtool, promtool, start_alertmanager, start_prometheus

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def wait_for(fn, timeout: float = 30.0, what: str = "condition", logs=()):
    """Poll fn until it returns something truthy; bounded, so a hang becomes a failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {s.name} log ---\n{s.log_tail()}" for s in logs)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{tails}")
        time.sleep(0.2)


def firing(now: float, deployment: str = "classifier") -> AlertMessage:
    return AlertMessage(
        labels={"alertname": "HighLatencyP99", "application": "app", "deployment": deployment,
                "severity": "page"},
        annotations={"summary": f"p99 0.8s on {deployment}"},
        starts_at=now, ends_at=now + 300, status="firing",
        generator_url="http://127.0.0.1:8080/rules")


def resolved(alert: AlertMessage, now: float) -> AlertMessage:
    return AlertMessage(labels=alert.labels, annotations=alert.annotations,
                        starts_at=alert.starts_at, ends_at=now, status="resolved",
                        generator_url=alert.generator_url)


def test_amtool_accepts_the_example_config():
    result = amtool("check-config", str(REPO / "deployments" / "alertmanager.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_firing_then_resolved_through_alertmanager_api(tmp_path):
    with start_alertmanager(tmp_path) as am:
        notifier = Notifier({"alertmanager": [{"url": am.url, "timeout": "5s"}]}, env={})
        alert = firing(time.time())
        notifier.submit([alert])
        assert notifier.flush(timeout=30)
        assert notifier.stats()["sent"] == 1, (notifier.stats(), am.log_tail())

        [active] = am.api_alerts()
        assert active["labels"] == alert.labels
        assert active["annotations"] == alert.annotations
        assert active["fingerprint"] == alert.fingerprint  # our fingerprint is Alertmanager's
        assert active["status"]["state"] == "active"
        assert active["generatorURL"] == alert.generator_url

        notifier.submit([resolved(alert, time.time())])
        assert notifier.flush(timeout=30)
        assert notifier.stats()["sent"] == 2
        wait_for(lambda: am.api_alerts() == [], timeout=15,
                 what="the resolved alert to leave Alertmanager's active list", logs=[am])


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _normalised(payload: dict) -> dict:
    """Times as datetimes: Go and Python print fractional seconds differently."""
    out = dict(payload)
    out["alerts"] = [{**a, "startsAt": _when(a["startsAt"]), "endsAt": _when(a["endsAt"])}
                     for a in payload["alerts"]]
    return out


def test_our_webhook_payload_matches_alertmanagers(tmp_path, capture_server):
    hook = capture_server.url
    config = f"""\
route:
  receiver: webhook
  group_by: [alertname, deployment]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: webhook
    webhook_configs:
      - url: {hook}/alertmanager
        send_resolved: true
"""
    with start_alertmanager(tmp_path, config_text=config) as am:
        # The same alerts go to Alertmanager (which forwards them to /alertmanager) and,
        # through our own dispatcher with the same route, straight to /ours.
        notifier = Notifier({
            "alertmanager": [{"url": am.url}],
            "webhooks": [{"url": hook + "/ours", "name": "webhook"}],
            "route": {"group_by": ["alertname", "deployment"], "group_wait": "0s",
                      "group_interval": "1s", "repeat_interval": "1h"},
            "external_url": am.url,
        }, env={})
        alert = firing(time.time())
        got: dict[str, list[dict]] = {"/alertmanager": [], "/ours": []}

        def arrived(status: str) -> bool:
            notifier.flush(timeout=10)  # our group timers run on flush
            try:
                while True:
                    c = capture_server.get(timeout=0.2)
                    got[c.path].append(c.body)
            except queue.Empty:
                pass
            return all(b and b[-1]["status"] == status for b in got.values())

        notifier.submit([alert])
        wait_for(lambda: arrived("firing"), what="firing webhooks", logs=[am])
        notifier.submit([resolved(alert, time.time())])
        wait_for(lambda: arrived("resolved"), what="resolved webhooks", logs=[am])

    for theirs, ours in zip(got["/alertmanager"], got["/ours"]):
        assert set(theirs) == set(ours)  # the version-4 keys, exactly
        assert [set(a) for a in theirs["alerts"]] == [set(a) for a in ours["alerts"]]
        # More than the keys: the same group key, labels, fingerprints and times.
        assert _normalised(theirs) == _normalised(ours)
    assert [b["status"] for b in got["/ours"]] == ["firing", "resolved"]
    assert got["/alertmanager"][0]["alerts"][0]["endsAt"] == "0001-01-01T00:00:00Z"


def test_prometheus_helper_scrapes_and_sends_alerts(tmp_path):
    rules = tmp_path / "rules.yml"
    rules.write_text("""\
groups:
  - name: smoke
    rules:
      - alert: AlwaysFiring
        expr: vector(1)
        labels: {severity: info}
""")
    check = promtool("check", "rules", str(rules))
    assert check.returncode == 0, check.stdout + check.stderr
    with start_alertmanager(tmp_path) as am:
        target = am.url.removeprefix("http://")
        with start_prometheus(tmp_path, scrape_targets=[target], rule_files=[rules],
                              alertmanager_url=am.url) as prom:
            wait_for(lambda: [t for t in prom.targets() if t["health"] == "up"],
                     what="the Alertmanager target to be up", logs=[prom])
            [up] = wait_for(lambda: prom.query('up{job="ray-monitor"}'), what="up")
            assert up["value"][1] == "1"
            [sent] = wait_for(am.api_alerts, what="Prometheus' alert", logs=[prom, am])
            assert sent["labels"]["alertname"] == "AlwaysFiring"
