"""Scale-out from alerts and targets through Ray Serve's own autoscaling policy.

A monitored deployment with ray-monitor's policy installed gets slower on purpose; the
monitor's hint raises its replica count, and after the fault it comes back to its
minimum only once the (shortened) stabilization window has passed. Killing the
aggregator leaves Serve scaling on its default decision, with no exception in the
controller's log.
"""

from __future__ import annotations

import glob
import os
import time
import uuid

import pytest
import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

from ray_monitor import monitor
from tests.conftest import wait_until
from tests.integration.test_alerts_serve import Traffic

pytestmark = pytest.mark.ray

STABILIZATION_S = 12
POLICY = AutoscalingPolicy(policy_function="ray_monitor.autoscaling:MonitorPolicy",
                           policy_kwargs={"stale_after_s": 3, "refresh_interval_s": 0.5})


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=50,
                  autoscaling_config=AutoscalingConfig(
                      min_replicas=1, max_replicas=3, initial_replicas=1, upscale_delay_s=0.5,
                      downscale_delay_s=1, look_back_period_s=2, metrics_interval_s=0.5,
                      target_ongoing_requests=1000, policy=POLICY))
@monitor
class Scalable:
    """Sleeps for the delay written in ``delay_file`` (read on each call).

    The fault reaches every replica through the file, whenever it started: a call to set a
    delay goes where Serve's router sends it, and the router keeps away from the slow
    replica, so "set it on every replica" by handle calls can miss the very one that is
    slow (it then keeps the deployment's p95 up, and the test's scale-down never comes).
    """

    def __init__(self, delay_file: str):
        self.delay_file = delay_file

    async def __call__(self, x: int) -> int:
        import asyncio

        with open(self.delay_file) as f:
            delay = float(f.read() or 0)
        await asyncio.sleep(delay)
        return x


def running(app: str) -> int:
    dep = serve.status().applications[app].deployments["Scalable"]
    return dep.replica_states.get("RUNNING", 0)


def set_delay_everywhere(delay_file, delay: float) -> None:
    tmp = f"{delay_file}.tmp"
    with open(tmp, "w") as f:
        f.write(str(delay))
    os.replace(tmp, delay_file)  # a replica reads the old delay or the new, never half


def scaling_rules(app: str, *, rule: bool, target: bool) -> str:
    text = """
groups:
  - name: scaling
    interval: 1s
    rules:
"""
    if rule:
        text += f"""      - alert: ScalableSlow
        expr: p95(latency_seconds{{application="{app}", method="__call__"}}[5s]) by (application, deployment) > 0.2
        for: 2s
        scale: {{deployment: "{{{{ $labels.deployment }}}}", step: 1, cooldown: 5s}}
"""
    else:
        text += """      - alert: Never
        expr: count(requests{application="none"}[1m]) > 1
"""
    text += f"""
autoscaling:
  deployments:
    - application: {app}
      deployment: Scalable
      min_replicas: 1
      max_replicas: 3
      cooldown: 5s
      scale_down_stabilization: {STABILIZATION_S}s
"""
    if target:
        text += """      targets:
        - metric: p95(latency_seconds{method="__call__"}[5s])
          value: 0.2
"""
    return text


def _alert(mon, name, app):
    return next((a for a in mon.alerts() if a["name"] == name
                 and a["labels"].get("application") == app), None)


@pytest.mark.parametrize("source", ["rule", "target"])
def test_latency_scales_out_and_back_after_stabilization(mon, serve_apps, source, tmp_path):
    app = f"s{uuid.uuid4().hex[:8]}"
    serve_apps.append(app)
    delay_file = str(tmp_path / "delay")
    set_delay_everywhere(delay_file, 0.0)
    h = serve.run(Scalable.bind(delay_file), name=app, route_prefix=f"/{app}")
    mon.reload(scaling_rules(app, rule=source == "rule", target=source == "target"))
    try:
        assert running(app) == 1
        with Traffic(h, period_s=0.02):
            time.sleep(3)
            set_delay_everywhere(delay_file, 0.4)
            if source == "rule":
                firing = wait_until(lambda: (a := _alert(mon, "ScalableSlow", app))
                                    and a["state"] == "firing" and a, timeout=60,
                                    what="the scale rule's alert firing")
                trigger = firing["fired_at"]
            else:
                trigger = time.time()
            hint = wait_until(lambda: next((x for x in mon.hints() if x["application"] == app
                                            and (x["desired"] or 0) > 1), None), timeout=60,
                              what="a hint above one replica")
            scaled = wait_until(lambda: running(app) >= 2, timeout=60, what="a second replica")
            t_running = time.time()
            assert scaled
            print(f"{source}: hint desired={hint['desired']} {hint['updated_at'] - trigger:.1f}s "
                  f"after the trigger; 2+ replicas running {t_running - trigger:.1f}s after")
            assert t_running - trigger <= 15 + 5  # within 15 s of firing (+ a replica's start)
            assert hint["reason"] in ("rule", "target", "max_replicas")
            set_delay_everywhere(delay_file, 0.0)
            calm = time.time()
            wait_until(lambda: running(app) == 1, timeout=STABILIZATION_S + 60,
                       what="back to the minimum")
            back = time.time() - calm
            print(f"{source}: back to 1 replica {back:.1f}s after the fault stopped")
            assert back >= STABILIZATION_S - 2  # not before the stabilization window
    finally:
        mon.reload("groups: []")


def _controller_log() -> str:
    text = ""
    # This cluster's session: /tmp/ray/session_latest is whichever cluster on the machine
    # started last (another test session, on a shared machine).
    session = ray._private.worker._global_node.get_session_dir_path()
    for path in glob.glob(f"{session}/logs/serve/controller_*.log"):
        with open(path, errors="replace") as f:
            text += f.read()
    return text


def test_aggregator_killed_serve_keeps_its_default_decision(mon, serve_apps, tmp_path):
    app = f"s{uuid.uuid4().hex[:8]}"
    serve_apps.append(app)
    delay_file = str(tmp_path / "delay")
    set_delay_everywhere(delay_file, 0.0)
    h = serve.run(Scalable.bind(delay_file), name=app, route_prefix=f"/{app}")
    mon.reload(scaling_rules(app, rule=True, target=False))
    log_start = len(_controller_log())
    try:
        with Traffic(h, period_s=0.05) as traffic:
            # Following the aggregator's hints first (the policy logs the change): only
            # then can falling back be seen (it logs a change of mode, not every decision).
            wait_until(lambda: "following ray-monitor's hints" in _controller_log()[log_start:],
                       timeout=60, what="the policy following the aggregator's hints")
            # While it is away the policy falls back to Serve's own decision and says so. A
            # killed aggregator is back and hinting within about 1-2 s, under the policy's
            # stale_after_s (3 s), so keep it away: killed again and again, faster than it
            # can start (a crash loop).
            def away_and_fallen_back():
                ray.kill(mon.actor, no_restart=False)
                time.sleep(0.3)
                return "falling back to Serve's default decision" in \
                    _controller_log()[log_start:]  # this time: it also says so at deploy
            wait_until(away_and_fallen_back, timeout=90, interval=0,
                       what="the policy's fallback line in the controller's log")
            sent = traffic.sent
            wait_until(lambda: traffic.sent > sent + 20, timeout=30, what="traffic still served")
            assert running(app) >= 1
            ray.get(mon.actor.ready.remote(), timeout=120)
        new = _controller_log()[log_start:]
        assert "falling back to Serve's default decision" in new
        assert "Traceback" not in new and "Exception" not in new, new[-3000:]
    finally:
        mon.reload("groups: []")
