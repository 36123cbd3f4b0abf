"""Replica health on a real cluster: a replica that grows its memory on purpose fires the
leak alert (the slope of RSS), and a request that blocks fires the hang alert with a stack
that names the blocking function."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from ray import serve

from ray_monitor import monitor
from tests.conftest import wait_until

pytestmark = pytest.mark.ray

GROWTH_MB, PERIOD_S = 2, 0.25  # about 8 MB/s while the traffic runs


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor(hang_threshold_s=1.0)
class Unwell:
    def __init__(self):
        self.hoard = []

    def grow(self, mb: int) -> int:
        self.hoard.append(b"\x01" * (mb << 20))  # written, so resident
        return len(self.hoard)

    def stuck_in_blocking_sleep(self, seconds: float) -> str:
        time.sleep(seconds)
        return "woke up"

    def __call__(self) -> str:
        return "ok"


def rules_for(app: str) -> str:
    return f"""
groups:
  - name: health
    interval: 1s
    rules:
      - alert: MemoryLeak
        expr: deriv(rss_bytes{{application="{app}"}}[15s]) by (application, deployment, replica) > 2000000
        labels: {{severity: ticket}}
      - alert: HungRequests
        expr: max(hung_requests{{application="{app}"}}[5s]) by (application, deployment, replica) > 0
        labels: {{severity: ticket}}
"""


def firing(mon, name: str, app: str):
    return next((a for a in mon.alerts() if a["name"] == name and a["state"] == "firing"
                 and a["labels"].get("application") == app), None)


@pytest.fixture
def unwell(mon, serve_apps):
    app = f"h{uuid.uuid4().hex[:8]}"
    serve_apps.append(app)
    handle = serve.run(Unwell.bind(), name=app, route_prefix=f"/{app}")
    mon.reload(rules_for(app))
    yield app, handle
    mon.reload({"groups": []})


def test_a_replica_that_grows_its_memory_fires_the_leak_alert(mon, unwell):
    app, handle = unwell
    time.sleep(3)
    assert firing(mon, "MemoryLeak", app) is None  # an idle replica does not look like a leak
    stop = threading.Event()

    def leak():
        while not stop.is_set():
            handle.grow.remote(GROWTH_MB).result(timeout_s=30)
            stop.wait(PERIOD_S)
    t = threading.Thread(target=leak, daemon=True)
    t.start()
    try:
        alert = wait_until(lambda: firing(mon, "MemoryLeak", app), timeout=90,
                           what="MemoryLeak firing")
    finally:
        stop.set()
        t.join(30)
    assert alert["labels"]["deployment"] == "Unwell" and alert["labels"]["replica"]
    assert alert["value"] > 2e6
    print(f"leak alert: RSS grows {alert['value'] / 2**20:.1f} MiB/s "
          f"(the replica adds about {GROWTH_MB / PERIOD_S:.0f} MB/s)")


def test_a_blocked_request_fires_the_hang_alert_with_its_stack(mon, unwell):
    app, handle = unwell
    assert handle.remote().result(timeout_s=30) == "ok"
    stuck = handle.stuck_in_blocking_sleep.remote(15.0)
    alert = wait_until(lambda: (a := firing(mon, "HungRequests", app)) and a.get("hung") and a,
                       timeout=60, what="HungRequests firing with the hung request")
    (hung,) = alert["hung"]
    assert hung["method"] == "stuck_in_blocking_sleep"
    assert hung["request_id"] == stuck.request_id
    assert hung["running_s"] > 1.0 and hung["replica"] == alert["labels"]["replica"]
    assert "in stuck_in_blocking_sleep" in hung["stack"]
    assert "time.sleep(seconds)" in hung["stack"]
    assert len(hung["stack"].encode()) <= 33 * 1024
    assert [h["request_id"] for h in mon.hung() if h["application"] == app] == [stuck.request_id]
    print("hung request stack (the blocked thread):\n" + hung["stack"].split("\n\n")[0])
    assert stuck.result(timeout_s=60) == "woke up"
    wait_until(lambda: not [h for h in mon.hung() if h["application"] == app], timeout=30,
               what="the hang to clear")
