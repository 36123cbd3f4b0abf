"""The Serve autoscaling policy and the external scaler call, without a Ray cluster.

Contexts are built with Serve's own ``AutoscalingContext`` constructor, the way the
controller's ``get_autoscaling_context`` builds them; the aggregator is a fetcher seam.
"""

from __future__ import annotations

import json
import logging
import threading

import cloudpickle
import pytest
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID
from ray.serve._private.constants import (SERVE_AUTOSCALING_DECISION_COUNTERS_KEY as COUNTERS,
                                          SERVE_AUTOSCALING_DECISION_TIMESTAMP_KEY as STAMP)
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

from ray_monitor.autoscaling import policy as autoscaling
from ray_monitor.autoscaling.external import ExternalScaleError, apply_external
from ray_monitor.autoscaling.policy import (STATE_KEY, MonitorPolicy,
                                     monitor_policy)
from tests.helpers import Clock

APP, DEP = "app1", "Classifier"
LOGGER = "ray.serve.ray_monitor"


def context(*, current=2, target=2, requests=4.0, policy_state=None, config=None, now=1000.0,
            max_replicas=10):
    """Two replicas and 4 requests at a target of 2 per replica: Serve's default is 2.0."""
    config = config or AutoscalingConfig(min_replicas=1, max_replicas=max_replicas,
                                         target_ongoing_requests=2)
    return AutoscalingContext(
        deployment_id=DeploymentID(name=DEP, app_name=APP), deployment_name=DEP, app_name=APP,
        current_num_replicas=current, target_num_replicas=target, running_replicas=[],
        total_num_requests=lambda: requests, total_queued_requests=lambda: 0.0,
        aggregated_metrics=lambda: {}, raw_metrics=lambda: {},
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=max_replicas,
        policy_state=dict(policy_state or {}), last_scale_up_time=None,
        last_scale_down_time=None, current_time=now, config=config)


class Aggregator:
    """What ``Aggregator.hints()`` answers, or an error while it is away."""

    def __init__(self):
        self.hints: list[dict] = []
        self.away = False

    def set(self, desired, updated_at=1000.0, reason="rule"):
        self.hints = [{"application": APP, "deployment": DEP, "current": 2, "desired": desired,
                       "direction": "up", "reason": reason, "reasons": [],
                       "updated_at": updated_at, "apply": "policy"}]

    def __call__(self):
        if self.away:
            raise ConnectionError("aggregator actor is dead")
        return self.hints


@pytest.fixture
def setup():
    clock, agg = Clock(), Aggregator()
    policy = MonitorPolicy(fetcher=agg, clock=clock, background=False, stale_after_s=10)
    return policy, agg, clock


def test_the_larger_of_serves_decision_and_the_hint(setup):
    policy, agg, _ = setup
    agg.set(5)
    policy.refresh()
    replicas, state = policy(context())
    assert replicas == 5
    assert state[STATE_KEY] == {"mode": "hint", "reason": None, "default": 2.0, "hint_desired": 5,
                                "hint_reason": "rule", "decision": 5}
    agg.set(1)  # below Serve's own decision: Serve's decision stands, as it computed it
    policy.refresh()
    assert policy(context())[0] == 2.0
    agg.set(None)  # the hint asks for nothing
    policy.refresh()
    replicas, state = policy(context())
    assert (replicas, state[STATE_KEY]["mode"]) == (2.0, "hint")


def test_the_hint_is_bounded_by_serves_capacity_adjusted_bounds(setup):
    policy, agg, _ = setup
    agg.set(50)
    policy.refresh()
    assert policy(context(max_replicas=6))[0] == 6


def test_no_hint_for_the_deployment_falls_back_to_serves_decision(setup, caplog):
    policy, agg, _ = setup
    policy.refresh()  # the aggregator answers, with nothing for this deployment
    with caplog.at_level(logging.INFO, logger=LOGGER):
        replicas, state = policy(context())
    assert (replicas, state[STATE_KEY]["mode"]) == (2.0, "default")
    assert "has no hint for app1/Classifier" in caplog.text


def test_a_stale_hint_is_not_followed(setup):
    policy, agg, clock = setup
    agg.set(6, updated_at=980.0)  # the aggregator's loop stopped 20 s ago
    policy.refresh()
    replicas, state = policy(context())
    assert replicas == 2.0
    assert "20s old" in state[STATE_KEY]["reason"]


def test_an_unreachable_aggregator_falls_back_once_and_says_when_hints_return(setup, caplog):
    policy, agg, clock = setup
    agg.set(6)
    policy.refresh()
    state = {}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        replicas, state = policy(context(policy_state=state))
        assert replicas == 6
        agg.away = True
        clock.t += 5
        policy.refresh()  # fails: the last answer is still fresh enough
        replicas, state = policy(context(policy_state=state))
        assert replicas == 6
        clock.t += 10
        agg.set(6, updated_at=clock.t)
        for _ in range(3):
            policy.refresh()
            replicas, state = policy(context(policy_state=state))
            assert replicas == 2.0
        assert "aggregator actor is dead" in state[STATE_KEY]["reason"]
        agg.away = False
        policy.refresh()
        replicas, state = policy(context(policy_state=state))
        assert replicas == 6
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 3, lines
    assert "following ray-monitor's hints" in lines[0]
    assert "falling back to Serve's default decision" in lines[1]
    assert "no answer from the aggregator for 15s" in lines[1]
    assert lines[2].endswith("following ray-monitor's hints again")


def test_an_aggregator_that_never_answered_gives_serves_decision(setup):
    policy, agg, _ = setup
    agg.away = True
    policy.refresh()
    replicas, state = policy(context())
    assert (replicas, state[STATE_KEY]["mode"]) == (2.0, "default")


def test_policy_state_keeps_serves_keys_and_the_users(setup):
    policy, agg, _ = setup
    agg.set(4)
    policy.refresh()
    before = {COUNTERS: 3, STAMP: 990.0, "mine": [1, 2]}
    replicas, state = policy(context(policy_state=before))
    assert {k: state[k] for k in before} == before
    assert json.loads(json.dumps(state)) == state  # Serve keeps it; JSON keeps it portable


def test_the_controller_never_waits_for_the_aggregator():
    release, started = threading.Event(), threading.Event()
    threads = []

    def slow_fetch():
        threads.append(threading.current_thread())
        started.set()
        release.wait()  # an aggregator that does not answer
        return []

    policy = MonitorPolicy(fetcher=slow_fetch, refresh_interval_s=0.01)
    try:
        replicas, state = policy(context())  # returns while the fetch hangs
        assert (replicas, state[STATE_KEY]["mode"]) == (2.0, "waiting")
        assert started.wait(30)
        assert threads[0] is not threading.current_thread() and threads[0].daemon
        assert policy(context())[0] == 2.0
    finally:
        policy.close()
        release.set()


def test_nothing_raises_into_the_controller(setup, caplog):
    policy, agg, _ = setup
    agg.hints = [{"application": APP, "deployment": DEP, "desired": "many", "updated_at": 1000.0}]
    policy.refresh()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert policy(context())[0] == 2.0  # a malformed hint: Serve's decision
        assert policy(context())[0] == 2.0
        broken = context(target=3)
        broken.config = None  # Serve's own policy cannot run on this
        replicas, state = policy(broken)
    assert replicas == 3  # the current target: no change
    assert sum("logged once" in r.getMessage() for r in caplog.records) == 2


def test_bad_policy_kwargs_are_refused():
    with pytest.raises(ValueError, match="stale_after_s"):
        MonitorPolicy(stale_after_s=0)
    with pytest.raises(ValueError, match="refresh_interval_s"):
        MonitorPolicy(refresh_interval_s="1s")


def test_serve_installs_the_class_with_policy_kwargs_and_calls_it_through_its_wrapper(monkeypatch):
    config = AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=2,
                               upscale_delay_s=0, policy=AutoscalingPolicy(
                                   policy_function="ray_monitor.autoscaling:MonitorPolicy",
                                   policy_kwargs={"stale_after_s": 5, "background": False}))
    policy = _apply_autoscaling_config(_resolve_policy_callable(config.policy))
    ctx = context(config=config, policy_state={})
    replicas, state = policy(ctx)  # nothing fetched yet: Serve's decision
    assert replicas == 2 and state[STATE_KEY]["mode"] == "waiting"
    assert COUNTERS in state  # Serve's delay bookkeeping sits beside ours


def test_serve_applies_its_delays_around_the_hint(setup):
    policy, agg, clock = setup
    agg.set(5)
    policy.refresh()
    fast = AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=2,
                             upscale_delay_s=0)
    assert _apply_autoscaling_config(policy)(context(config=fast))[0] == 5
    # With Serve's default upscale_delay_s (30 s) the hint waits like any scale-up.
    slow = AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=2)
    replicas, state = _apply_autoscaling_config(policy)(context(config=slow))
    assert replicas == 2 and state[COUNTERS] == 1


def test_the_function_form_pickles_into_a_fresh_policy():
    spec = AutoscalingPolicy(policy_function="ray_monitor.autoscaling:monitor_policy")
    fn = cloudpickle.loads(spec.get_serialized_policy_def())  # what the controller gets
    assert fn.__name__ == "monitor_policy" and fn is not monitor_policy
    landed = fn.__globals__["_DEFAULT_POLICY"]
    assert type(landed).__name__ == "MonitorPolicy"
    assert landed is not autoscaling._DEFAULT_POLICY
    assert landed._thread is None and landed.stale_after_s == 10.0


# ------------------------------------------------------------------ external scaler


def test_apply_external_posts_the_target_to_serves_scale_endpoint():
    sent = []

    def send(url, body, headers, timeout_s):
        sent.append((url, json.loads(body), headers))
        return 200, '{"message": "Scaling request received."}'

    hint = {"application": "my app", "deployment": DEP, "desired": 4}
    assert apply_external(hint, dashboard_url="http://head:8265/", send=send,
                          headers={"Authorization": "Bearer t"}) == 200
    url, body, headers = sent[0]
    assert url == "http://head:8265/api/v1/applications/my%20app/deployments/Classifier/scale"
    assert body == {"target_num_replicas": 4}
    assert headers == {"Content-Type": "application/json", "Authorization": "Bearer t"}
    assert apply_external({**hint, "desired": None}, send=send) is None
    assert len(sent) == 1


def test_apply_external_raises_with_serves_answer():
    def send(url, body, headers, timeout_s):
        return 412, '{"error": "External scaler is disabled"}'

    with pytest.raises(ExternalScaleError) as err:
        apply_external({"application": APP, "deployment": DEP, "desired": 2}, send=send)
    assert err.value.status == 412 and "disabled" in str(err.value)
