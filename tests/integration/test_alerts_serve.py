"""Alert rules on a real cluster: a fault injected into a monitored deployment fires the
matching alert, and the alert resolves once the fault stops."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from ray import serve

from ray_monitor import monitor
from tests.conftest import wait_until

pytestmark = pytest.mark.ray

EVAL_S = 1.0
FOR_S = 2.0


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
@monitor
class Faulty:
    def __init__(self):
        self.mode, self.delay = "ok", 0.0

    def set_fault(self, mode: str, delay: float = 0.0) -> str:
        self.mode, self.delay = mode, delay
        return mode

    async def __call__(self, x: int) -> int:
        import asyncio

        if self.delay:
            await asyncio.sleep(self.delay)
        if self.mode == "errors":
            raise RuntimeError("injected fault")
        return x


class Traffic:
    """A steady trickle of requests from a thread, until stopped."""

    def __init__(self, handle, period_s: float = 0.05) -> None:
        self.handle, self.period_s = handle, period_s
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            resp = self.handle.remote(self.sent)
            try:
                resp.result(timeout_s=30)
            except Exception:
                pass
            self.sent += 1
            self._stop.wait(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)


def rules_for(app: str) -> str:
    return f"""
groups:
  - name: faults
    interval: 1s
    rules:
      - alert: HighErrorRatio
        expr: error_ratio(requests{{application="{app}"}}[5s]) by (application, deployment) > 0.5
        for: {FOR_S:g}s
        labels: {{severity: page}}
        annotations:
          summary: "error ratio {{{{ $value }}}} on {{{{ $labels.deployment }}}}"
      - alert: SlowP99
        expr: p99(latency_seconds{{application="{app}"}}[5s]) by (application, deployment) > 0.2
        for: {FOR_S:g}s
        labels: {{severity: ticket}}
"""


def alert(mon, name: str, app: str):
    for a in mon.alerts():
        if a["name"] == name and a["labels"].get("application") == app:
            return a
    return None


@pytest.mark.parametrize("fault, name", [("errors", "HighErrorRatio"), ("slow", "SlowP99")])
def test_injected_fault_fires_the_alert_and_it_resolves(mon, serve_apps, fault, name):
    app = f"f{uuid.uuid4().hex[:8]}"
    serve_apps.append(app)
    h = serve.run(Faulty.bind(), name=app, route_prefix=f"/{app}")
    mon.reload(rules_for(app))
    with Traffic(h):
        time.sleep(3)
        assert alert(mon, name, app) is None  # healthy traffic fires nothing
        h.set_fault.remote(*(("errors",) if fault == "errors" else ("ok", 0.3))).result()
        fault_at = time.time()
        firing = wait_until(lambda: (a := alert(mon, name, app)) and a["state"] == "firing" and a,
                            timeout=60, what=f"{name} firing")
        # Prometheus' semantics: pending for `for`, checked at evaluation times.
        held = firing["fired_at"] - firing["active_at"]
        assert FOR_S <= held <= FOR_S + 2 * EVAL_S + 0.5, firing
        assert firing["labels"]["deployment"] == "Faulty"
        if name == "HighErrorRatio":
            assert firing["annotations"]["summary"].startswith("error ratio ")
            assert firing["annotations"]["summary"].endswith(" on Faulty")
            assert firing["value"] > 0.5
        print(f"{name}: fault at {fault_at:.1f}, active {firing['active_at'] - fault_at:.1f}s "
              f"later, firing {firing['fired_at'] - fault_at:.1f}s later")
        h.set_fault.remote("ok", 0.0).result()
        resolved = wait_until(lambda: (a := alert(mon, name, app)) and a["state"] == "resolved"
                              and a, timeout=60, what=f"{name} resolved")
        assert resolved["resolved_at"] > firing["fired_at"]
