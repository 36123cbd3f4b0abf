"""Restarts on a real cluster: a killed aggregator serves and evaluates at once with nothing
running; a kill right after a firing notification gives no second page; a second
``start()`` with a new address or token rebinds (and keeps it across a restart), and one
with an option that cannot change is refused naming it."""

from __future__ import annotations

import re
import time

import pytest
import ray
import requests

import ray_monitor
from ray_monitor.common.errors import ConfigError
from tests.conftest import wait_until
from tests.helpers import kill_aggregator

pytestmark = pytest.mark.ray

#: A rule that fires from the fake GPUs' readings alone: no deployment needed.
GPU_RULES = """
groups:
  - name: restarts
    interval: 1s
    rules:
      - alert: GpuWarm
        expr: max(gpu_temperature_celsius[10s]) > 0
        labels: {severity: page}
"""


def _evaluations(url: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=2).text
    m = re.search(r"^ray_monitor_self_evaluations_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else -1.0


def _kill_and_time_the_comeback(mon) -> tuple[float, float]:
    """Kills the aggregator; returns (seconds to HTTP, seconds to 3 new evaluations),
    watched over HTTP only: no actor call, which would wake a lazily started actor."""
    t0 = time.monotonic()
    http_s = kill_aggregator(mon)
    wait_until(lambda: _evaluations(mon.url) >= 3, timeout=60, interval=0.1,
               what="three evaluations")
    return http_s, time.monotonic() - t0


def test_a_restarted_aggregator_serves_and_evaluates_at_once_with_nothing_running(mon):
    from ray import serve

    # Nothing sends: no application is deployed (the fixtures delete theirs).
    running = serve.status().applications if ray.is_initialized() else {}
    assert not running, f"applications still running: {list(running)}"
    mon.reload(GPU_RULES)
    try:
        http_s, eval_s = _kill_and_time_the_comeback(mon)
        print(f"after the kill: HTTP in {http_s:.1f} s, 3 evaluations in {eval_s:.1f} s")
        # The evidence: "within a few seconds" (it was never, before).
        assert eval_s < 20, (http_s, eval_s)
        # And the rule runs on the GPUs' data, which the new GPU actors send again.
        wait_until(lambda: any(a["name"] == "GpuWarm" and a["state"] == "firing"
                               for a in mon.alerts()), timeout=60, what="GpuWarm firing")
    finally:
        mon.reload("groups: []")


def test_a_kill_right_after_the_firing_post_gives_no_second_page(mon, capture_server):
    """The worst moment: the POST has reached the receiver and the kill comes before the
    aggregator hears the answer. Then a whole resend cycle (Prometheus re-sends a firing
    alert every minute): still one firing notification for the episode."""
    ray_monitor.start(rules=GPU_RULES, notifications={
        "webhooks": [{"url": capture_server.url + "/hook"}],
        "route": {"group_by": ["alertname"], "group_wait": "0s", "group_interval": "1s",
                  "repeat_interval": "1h"}})
    try:
        first = capture_server.get(timeout=60)  # returns before the receiver answers 200
        ray.kill(mon.actor, no_restart=False)
        killed = time.monotonic()
        assert first.body["status"] == "firing"
        assert [a["labels"]["alertname"] for a in first.body["alerts"]] == ["GpuWarm"]
        wait_until(lambda: requests.get(f"{mon.url}/-/healthy", timeout=1).ok, timeout=60,
                   what="the aggregator back")
        # Its first evaluations, and a resend one minute after the last one sent.
        wait_until(lambda: time.monotonic() - killed > 68, timeout=90, interval=1)
        later = capture_server.drain()
        assert [p.body["status"] for p in later if p.path == "/hook"] == [], \
            [p.body for p in later]
        firing = [a for a in mon.alerts() if a["name"] == "GpuWarm"]
        assert firing and firing[0]["state"] == "firing"  # still firing, not re-paged
    finally:
        ray_monitor.start(notifications={})
        mon.reload("groups: []")


def test_a_second_start_rebinds_to_a_new_address_and_token_and_keeps_them(mon):
    url = mon.url
    port = int(url.rsplit(":", 1)[1])
    try:
        with pytest.raises(ConfigError) as err:
            ray_monitor.start(eval_interval_s=2.5, series_ttl_s=600)
        assert {p.field for p in err.value.problems} == {"eval_interval_s", "series_ttl_s"}
        assert "stop()" in str(err.value)

        new = ray_monitor.start(host="0.0.0.0", token="s3cret")
        assert new.url.endswith(f":{port}") and not new.url.startswith("http://127.0.0.1")
        refused = requests.post(f"{new.url}/api/v1/rules/reload", data="groups: []",
                                headers={"Content-Type": "application/yaml"}, timeout=10)
        assert refused.status_code == 401, refused.text
        ok = requests.post(f"{new.url}/api/v1/rules/reload", data="groups: []", timeout=10,
                           headers={"Content-Type": "application/yaml",
                                    "Authorization": "Bearer s3cret"})
        assert ok.status_code == 200, ok.text

        ray.kill(mon.actor, no_restart=False)  # the new bind and token outlive a restart
        assert ray.get(mon.actor.ready.remote(), timeout=120) == new.url
        settings = ray.get(mon.actor.settings.remote(), timeout=30)
        assert settings["host"] == "0.0.0.0" and settings["token_set"]
    finally:
        back = ray_monitor.start(host="127.0.0.1", token=None)
    assert back.url == url
    assert not ray.get(mon.actor.settings.remote(), timeout=30)["token_set"]
