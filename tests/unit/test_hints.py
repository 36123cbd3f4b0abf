"""Autoscaling hints: target tracking as HPA, scale actions with cooldowns, stabilization,
bounds, missing data, persistence and configuration, all with an injected clock."""

from __future__ import annotations

import json
import logging

import pytest

from ray_monitor.alerting.engine import ActiveAlert, RuleEngine
from ray_monitor.alerting.loader import load_hint_config, load_rules
from ray_monitor.autoscaling.config import HintConfig, parse_hint_config
from ray_monitor.autoscaling.hints import HintEngine, validate_against
from ray_monitor.common.errors import ConfigError

APP, DEP = "app1", "Classifier"
KEY = (APP, DEP)
GROUP = (("application", APP), ("deployment", DEP))
P95 = "p95(latency_seconds[30s])"


def config(**entry) -> HintConfig:
    return parse_hint_config({"deployments": [{"application": APP, "deployment": DEP, **entry}]})


class Store:
    """The window store's ``evaluate``, answering per (function, metric) with values a test sets."""

    def __init__(self):
        self.values: dict[tuple[str, str], dict] = {}
        self.fail = False

    def set(self, function: str, metric: str, value) -> None:
        self.values[(function, metric)] = {} if value is None else {GROUP: value}

    def evaluate(self, query, now):
        if self.fail:
            raise RuntimeError("window store is away")
        assert query.by == ("application", "deployment")
        return dict(self.values.get((query.function, query.metric), {}))


def alert(name="HighLatency", *, step=None, factor=None, cooldown_s=None, state="firing",
          deployment=DEP, application=APP, value=0.7) -> ActiveAlert:
    labels = {"alertname": name, "deployment": deployment}
    if application:
        labels["application"] = application
    return ActiveAlert(group="serving", rule=name, key=(), state=state, labels=labels,
                       annotations={}, value=value, active_at=0.0,
                       scale={"deployment": deployment, "step": step, "factor": factor,
                              "cooldown_s": cooldown_s})


def run(engine, store, now, current, firing=()):
    (hint,) = engine.update(now, current_replicas={KEY: current}, firing=list(firing),
                            query=store.evaluate)
    return hint


@pytest.fixture
def store():
    return Store()


# ------------------------------------------------------------------- target tracking


def test_target_inside_the_tolerance_keeps_the_count_and_outside_scales_by_the_ratio(store):
    engine = HintEngine(config=config(targets=[{"metric": P95, "value": 0.2}]))
    store.set("p95", "latency_seconds", 0.21)  # 5% above: inside the 10% tolerance
    hint = run(engine, store, 0.0, 4)
    assert (hint.desired, hint.reason, hint.direction) == (4, "target", "none")
    store.set("p95", "latency_seconds", 0.25)  # 25% above: ceil(4 * 1.25)
    hint = run(engine, store, 1.0, 4)
    assert (hint.desired, hint.reason, hint.direction) == (5, "target", "up")
    assert hint.reasons == [{"source": "target", "metric": P95, "value": 0.25, "target": 0.2,
                             "desired": 5}]


def test_a_per_replica_target_divides_the_deployments_total_by_the_running_replicas(store):
    rate = "rate(output_tokens[30s])"
    engine = HintEngine(config=config(targets=[{"metric": rate, "value": 100, "per_replica": True}]))
    (target,) = engine.config.deployments[0].targets
    assert target.per_replica and target.query.function == "rate"
    store.set("rate", "output_tokens", 450.0)  # 450 tokens/s over 2 replicas: 225 each
    hint = run(engine, store, 0.0, 2)
    assert (hint.desired, hint.reason) == (5, "target")  # ceil(450 / 100), Serve's rule
    assert hint.reasons == [{"source": "target", "metric": rate, "value": 225.0, "target": 100.0,
                             "desired": 5, "per_replica": True}]
    store.set("rate", "output_tokens", 520.0)  # 104 per replica at 5: inside the tolerance
    assert run(engine, store, 1.0, 5).desired == 5
    hint = run(engine, store, 2.0, 0)  # no replica runs: no ratio, no division by zero
    assert hint.reasons[0]["value"] is None and hint.reasons[0]["desired"] is None


def test_tolerance_is_configurable(store):
    engine = HintEngine(config=config(tolerance=0.3, targets=[{"metric": P95, "value": 0.2}]))
    store.set("p95", "latency_seconds", 0.25)
    assert run(engine, store, 0.0, 4).desired == 4


def test_gpu_shorthand_tracks_the_average_utilization(store):
    engine = HintEngine(config=config(targets=[{"gpu_utilization": 0.8}]))
    (target,) = engine.config.deployments[0].targets
    assert (target.metric, target.query.function, target.query.window_s) == \
        ("avg(gpu_utilization[1m])", "avg", 60.0)
    store.set("avg", "gpu_utilization", 1.0)
    assert run(engine, store, 0.0, 4).desired == 5  # ceil(4 * 1.0 / 0.8)


def test_scale_down_waits_for_the_window_and_goes_to_the_highest_recent_recommendation(store):
    engine = HintEngine(config=config(targets=[{"metric": P95, "value": 0.2}],
                                      scale_down_stabilization="300s", min_replicas=1))
    store.set("p95", "latency_seconds", 0.4)
    assert run(engine, store, 0.0, 4).desired == 8  # scale-up is immediate
    store.set("p95", "latency_seconds", 0.1)  # wants ceil(8 * 0.5) = 4
    hint = run(engine, store, 10.0, 8)
    assert (hint.desired, hint.reason) == (8, "stabilization")
    store.set("p95", "latency_seconds", 0.15)  # wants 6
    assert run(engine, store, 100.0, 8).desired == 8
    store.set("p95", "latency_seconds", 0.1)  # wants 4 again
    assert run(engine, store, 200.0, 8).desired == 8
    assert run(engine, store, 299.0, 8).desired == 8
    # The 8 of t=0 has left the window; 6 (t=100) is the highest left, not the latest 4.
    hint = run(engine, store, 301.0, 8)
    assert (hint.desired, hint.direction) == (6, "down")
    assert run(engine, store, 401.0, 8).desired == 4


def test_missing_data_never_scales(store):
    engine = HintEngine(config=config(targets=[{"metric": P95, "value": 0.2}]))
    hint = run(engine, store, 0.0, 3)  # no latency in the window
    assert (hint.desired, hint.reason, hint.direction) == (None, "no_data", "none")
    assert hint.reasons == [{"source": "target", "metric": P95, "value": None, "target": 0.2,
                             "desired": None}]
    assert engine.decisions == {(APP, DEP, "none", "no_data"): 1}


def test_a_failing_query_is_missing_data_and_is_logged_once(store, caplog):
    engine = HintEngine(config=config(targets=[{"metric": P95, "value": 0.2}]))
    store.fail = True
    with caplog.at_level(logging.WARNING, logger="ray_monitor.autoscaling.hints"):
        assert run(engine, store, 0.0, 3).desired is None
        assert run(engine, store, 1.0, 3).desired is None
    assert sum("failed, treated as no data" in r.getMessage() for r in caplog.records) == 1


def test_a_target_without_data_blocks_a_scale_down_by_another(store):
    engine = HintEngine(config=config(scale_down_stabilization="0s", targets=[
        {"metric": P95, "value": 0.2}, {"gpu_utilization": 0.8}]))
    store.set("p95", "latency_seconds", 0.05)  # wants 1 of 4; the GPU has no data
    assert run(engine, store, 0.0, 4).desired == 4
    store.set("avg", "gpu_utilization", 0.2)  # both have data and both want 1
    assert run(engine, store, 1.0, 4).desired == 1


def test_no_ratio_from_zero_replicas(store):
    engine = HintEngine(config=config(min_replicas=0, targets=[{"metric": P95, "value": 0.2}]))
    store.set("p95", "latency_seconds", 0.5)
    assert run(engine, store, 0.0, 0).desired is None


# --------------------------------------------------------------------- scale actions


def test_a_firing_scale_action_steps_once_per_cooldown(store):
    engine = HintEngine(config=config(cooldown="30s"))
    fire = [alert(step=1)]
    hint = run(engine, store, 0.0, 2, fire)
    assert (hint.desired, hint.reason, hint.direction) == (3, "rule", "up")
    assert hint.reasons == [{"source": "rule", "name": "HighLatency", "value": 0.7,
                             "desired": 3, "step": 1}]
    assert run(engine, store, 10.0, 3, fire).desired == 3  # held inside the cooldown
    assert run(engine, store, 29.9, 3, fire).desired == 3
    assert run(engine, store, 30.0, 3, fire).desired == 4  # the next step, from what runs
    assert run(engine, store, 45.0, 4, fire).desired == 4
    assert run(engine, store, 60.0, 4, fire).desired == 5


def test_steps_add_to_what_runs_so_a_full_cluster_does_not_escalate(store):
    engine = HintEngine(config=config(cooldown="30s"))
    fire = [alert(step=1)]
    assert run(engine, store, 0.0, 2, fire).desired == 3
    assert run(engine, store, 30.0, 2, fire).desired == 3  # the third replica never came
    assert run(engine, store, 60.0, 2, fire).desired == 3


def test_the_action_cooldown_overrides_the_deployment_cooldown(store):
    engine = HintEngine(config=config(cooldown="30s"))
    fire = [alert(step=2, cooldown_s=5.0)]
    assert run(engine, store, 0.0, 2, fire).desired == 4
    assert run(engine, store, 5.0, 4, fire).desired == 6


def test_factor_multiplies_and_rounds_up_and_step_adds(store):
    engine = HintEngine(config=config())
    assert run(engine, store, 0.0, 3, [alert(factor=1.5)]).desired == 5  # ceil(4.5)
    other = HintEngine(config=config(min_replicas=0))
    assert run(other, store, 0.0, 0, [alert(factor=2.0)]).desired == 1  # from zero: one
    third = HintEngine(config=config(min_replicas=0))
    assert run(third, store, 0.0, 0, [alert(step=2)]).desired == 2


def test_only_firing_alerts_scale(store):
    engine = HintEngine(config=config())
    hint = run(engine, store, 0.0, 2, [alert(step=1, state="pending"),
                                       alert("Resolved", step=1, state="resolved")])
    assert hint.desired is None


def test_after_the_alert_stops_the_count_is_held_for_the_stabilization_window(store):
    engine = HintEngine(config=config(scale_down_stabilization="60s"))
    assert run(engine, store, 0.0, 2, [alert(step=2)]).desired == 4
    hint = run(engine, store, 20.0, 4)  # resolved
    assert (hint.desired, hint.reason) == (4, "stabilization")
    assert run(engine, store, 59.0, 4).desired == 4
    assert run(engine, store, 61.0, 4).desired is None  # asks for nothing: Serve decides


def test_a_scale_action_on_a_deployment_without_an_entry_uses_the_defaults(store):
    engine = HintEngine(config=HintConfig())
    (hint,) = engine.update(0.0, current_replicas={("other", "Ranker"): 1},
                            firing=[alert(step=1, deployment="Ranker", application=None)],
                            query=store.evaluate)
    assert (hint.application, hint.deployment, hint.desired, hint.apply) == \
        ("other", "Ranker", 2, "policy")


def test_an_alert_names_its_application_through_its_labels(store):
    engine = HintEngine(config=HintConfig())
    current = {("a", DEP): 1, ("b", DEP): 1}
    hints = engine.update(0.0, current_replicas=current, firing=[alert(step=1, application="b")],
                          query=store.evaluate)
    assert {(h.application, h.desired) for h in hints} == {("a", None), ("b", 2)}


# ----------------------------------------------------------------- sources and bounds


def test_the_larger_source_wins(store):
    engine = HintEngine(config=config(targets=[{"metric": P95, "value": 0.2}]))
    store.set("p95", "latency_seconds", 0.6)  # target: ceil(2 * 3) = 6, rule: 3
    hint = run(engine, store, 0.0, 2, [alert(step=1)])
    assert (hint.desired, hint.reason) == (6, "target")
    assert {r["source"] for r in hint.reasons} == {"rule", "target"}
    engine = HintEngine(config=config(targets=[{"metric": P95, "value": 0.2}]))
    store.set("p95", "latency_seconds", 0.21)  # target: keep 2, rule: 2 + 3
    hint = run(engine, store, 0.0, 2, [alert(step=3)])
    assert (hint.desired, hint.reason) == (5, "rule")


def test_bounds_apply_last_and_say_so(store):
    engine = HintEngine(config=config(min_replicas=2, max_replicas=5, scale_down_stabilization="0s",
                                      targets=[{"metric": P95, "value": 0.2}]))
    store.set("p95", "latency_seconds", 0.05)  # wants 1
    hint = run(engine, store, 0.0, 3)
    assert (hint.desired, hint.reason) == (2, "min_replicas")
    store.set("p95", "latency_seconds", 0.8)  # wants 12
    hint = run(engine, store, 1.0, 3)
    assert (hint.desired, hint.reason) == (5, "max_replicas")


def test_an_entry_without_application_matches_every_application(store):
    cfg = parse_hint_config({"deployments": [
        {"deployment": DEP, "max_replicas": 3},
        {"application": "special", "deployment": DEP, "max_replicas": 9}]})
    engine = HintEngine(config=cfg)
    current = {("a", DEP): 2, ("special", DEP): 2}
    hints = engine.update(0.0, current_replicas=current,
                          firing=[alert(step=8, application=None)], query=store.evaluate)
    assert {(h.application, h.desired) for h in hints} == {("a", 3), ("special", 9)}


# ------------------------------------------------------------- decisions and logging


def test_decisions_are_counted_and_a_change_is_logged_once(store, caplog):
    engine = HintEngine(config=config(cooldown="30s"))
    with caplog.at_level(logging.INFO, logger="ray_monitor.autoscaling.hints"):
        run(engine, store, 0.0, 2, [alert(step=1)])
        run(engine, store, 1.0, 3, [alert(step=1)])
        run(engine, store, 2.0, 3, [alert(step=1)])
    assert engine.decisions == {(APP, DEP, "up", "rule"): 1, (APP, DEP, "none", "rule"): 2}
    lines = [r.getMessage() for r in caplog.records if r.name == "ray_monitor.autoscaling.hints"]
    assert len(lines) == 1
    assert "app1/Classifier: desired none -> 3" in lines[0] and "HighLatency" in lines[0]


def test_hint_dicts_are_json(store):
    engine = HintEngine(config=config(apply="external", max_replicas=4,
                                      targets=[{"metric": P95, "value": 0.2}]))
    store.set("p95", "latency_seconds", 0.3)
    run(engine, store, 5.0, 2, [alert(step=1)])
    (d,) = [h.to_dict() for h in engine.hints()]
    assert json.loads(json.dumps(d)) == d
    assert {k: d[k] for k in ("application", "deployment", "current", "desired", "direction",
                              "reason", "updated_at", "apply")} == {
        "application": APP, "deployment": DEP, "current": 2, "desired": 3, "direction": "up",
        "reason": "rule", "updated_at": 5.0, "apply": "external"}


def test_rule_engine_alerts_drive_hints_end_to_end_without_ray(store):
    rules = load_rules("""
groups:
  - name: serving
    rules:
      - alert: SlowClassifier
        expr: p95(latency_seconds[30s]) by (application, deployment) > 0.5
        scale: {deployment: "{{ $labels.deployment }}", step: 1, cooldown: 10s}
""")
    alerts = RuleEngine(rules=rules, clock=lambda: 0.0)
    hints = HintEngine(config=HintConfig())
    store.set("p95", "latency_seconds", 0.9)
    result = alerts.evaluate(store, 0.0)
    (h,) = hints.update(0.0, current_replicas={KEY: 1}, firing=result.alerts, query=store.evaluate)
    assert (h.desired, h.reasons[0]["name"]) == (2, "SlowClassifier")
    result = alerts.evaluate(store, 10.0)
    (h,) = hints.update(10.0, current_replicas={KEY: 2}, firing=result.alerts, query=store.evaluate)
    assert h.desired == 3


# -------------------------------------------------------------------- persistence


def test_a_restored_engine_neither_scales_down_early_nor_steps_inside_the_cooldown(store):
    engine = HintEngine(config=config(cooldown="30s", scale_down_stabilization="300s"))
    assert run(engine, store, 0.0, 2, [alert(step=2)]).desired == 4
    saved = json.loads(json.dumps(engine.state_dict()))
    again = HintEngine(config=config(cooldown="30s", scale_down_stabilization="300s"))
    again.restore(saved)
    assert run(again, store, 10.0, 4, [alert(step=2)]).desired == 4  # no step before t=30
    assert run(again, store, 100.0, 4).desired == 4  # alert gone: still held
    assert run(again, store, 309.0, 4).desired == 4  # it asked for 4 until t=10
    assert run(again, store, 311.0, 4).desired is None
    with pytest.raises(ValueError, match="state_dict"):
        again.restore({"version": 99})


def test_state_stays_small_while_the_recommendation_holds(store):
    engine = HintEngine(config=config(targets=[{"metric": P95, "value": 0.2}]))
    store.set("p95", "latency_seconds", 0.2)
    for t in range(200):
        run(engine, store, float(t), 4)
    (dep,) = engine.state_dict()["deployments"]
    assert dep["history"] == [[199.0, 4]]


# --------------------------------------------------------------------- configuration


FULL = """
groups: []
autoscaling:
  deployments:
    - application: app1
      deployment: Classifier
      min_replicas: 1
      max_replicas: 8
      cooldown: 30s
      scale_down_stabilization: 5m
      tolerance: 0.1
      targets:
        - metric: p95(latency_seconds{method="__call__"}[30s])
          value: 0.2
        - gpu_utilization: 0.8
      apply: policy
    - deployment: Ranker
"""


def test_the_documented_section_loads():
    cfg = load_hint_config(FULL)
    c, r = cfg.deployments
    assert (c.application, c.deployment, c.min_replicas, c.max_replicas, c.cooldown_s,
            c.scale_down_stabilization_s, c.tolerance, c.apply) == \
        ("app1", "Classifier", 1, 8, 30.0, 300.0, 0.1, "policy")
    p95 = c.targets[0].query
    assert (p95.function, p95.metric, p95.window_s, p95.by, p95.matchers[0].value) == \
        ("p95", "latency_seconds", 30.0, ("application", "deployment"), "__call__")
    assert (r.application, r.max_replicas, r.targets) == (None, None, ())
    assert cfg.find("any", "Ranker") is r and cfg.find("app1", "Classifier") is c
    assert cfg.find("app2", "Classifier") is None
    assert load_hint_config("groups: []\n").deployments == ()


BAD = [
    ({"deployment": DEP, "max_replica": 3}, "max_replica", "did you mean 'max_replicas'"),
    ({"deployment": DEP, "min_replicas": 5, "max_replicas": 2}, "min_replicas", "above max_replicas 2"),
    ({"deployment": DEP, "targets": [{"metric": P95, "value": 0}]}, "targets[0].value", "above 0"),
    ({"deployment": DEP, "targets": [{"metric": P95, "value": -0.2}]}, "targets[0].value", "above 0"),
    ({"deployment": DEP, "targets": [{"gpu_utilization": -1}]}, "gpu_utilization", "above 0"),
    ({"deployment": DEP, "targets": [{"metric": "p95(latency[30s])", "value": 1}]},
     "targets[0].metric", "unknown metric 'latency'"),
    ({"deployment": DEP, "targets": [{"metric": "p96(latency_seconds[30s])", "value": 1}]},
     "targets[0].metric", "unknown function 'p96'"),
    ({"deployment": DEP, "targets": [{"metric": "p95(latency_seconds[30s]) > 0.2", "value": 1}]},
     "targets[0].metric", "without a comparison"),
    ({"deployment": DEP, "targets": [{"metric": "p95(latency_seconds[30s]) by (replica)", "value": 1}]},
     "targets[0].metric", "leave by (...) out"),
    ({"deployment": DEP, "targets": [{"gpu_utilisation": 0.8}]}, "gpu_utilisation", "not a gauge"),
    ({"deployment": DEP, "cooldown": "30 seconds"}, "cooldown", "not a duration"),
    ({"deployment": DEP, "scale_down_stabilization": 5}, "scale_down_stabilization", "not a duration"),
    ({"deployment": DEP, "tolerance": 1.5}, "tolerance", "below 1"),
    ({"deployment": DEP, "apply": "kubernetes"}, "apply", "policy"),
    ({"deployment": DEP, "apply": "external"}, "max_replicas", "apply: external"),
    ({"max_replicas": 3}, "deployment", "missing"),
    ({"deployment": DEP, "target": {"metric": P95, "value": 0.2}}, "target", "targets:"),
    ({"deployment": DEP, "targets": {"metric": P95, "value": 0.2}}, "targets", "must be a list"),
    ({"deployment": DEP, "targets": [{"metric": P95, "value": 0.2, "per_replica": True}]},
     "targets[0].per_replica", "p95 is not a total"),
    ({"deployment": DEP, "targets": [{"metric": "rate(output_tokens[30s])", "value": 9,
                                      "per_replica": "yes"}]},
     "targets[0].per_replica", "true or false"),
    ({"deployment": DEP, "targets": [{"metric": P95, "value": 0.2, "per_replca": True}]},
     "targets[0].per_replca", "per_replica"),
]


@pytest.mark.parametrize("entry,field,text", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_configuration_is_refused_naming_the_field(entry, field, text):
    with pytest.raises(ConfigError) as err:
        parse_hint_config({"deployments": [entry]}, file="rules.yaml")
    assert err.value.field.startswith("autoscaling.deployments[0].")
    assert err.value.field.endswith(field)
    assert text in str(err.value) and "rules.yaml" in str(err.value)


def test_every_problem_is_listed_and_duplicates_are_refused():
    with pytest.raises(ConfigError) as err:
        parse_hint_config({"deployments": [{"deployment": DEP}, {"deployment": DEP},
                                           {"deployment": "X", "min_replicas": -1}],
                           "deployment": []})
    assert len(err.value.problems) == 3
    assert "listed twice" in str(err.value) and "'autoscaling.deployment'" in str(err.value)


def test_validate_against_names_what_is_not_running():
    cfg = parse_hint_config({"deployments": [{"application": APP, "deployment": "Clasifier"},
                                             {"deployment": "Ranker"}]})
    rules = load_rules("""
groups:
  - name: g
    rules:
      - alert: A
        expr: p95(latency_seconds[1m]) by (deployment) > 1
        scale: {deployment: Rankr, step: 1}
      - alert: B
        expr: p95(latency_seconds[1m]) by (deployment) > 1
        scale: {deployment: "{{ $labels.deployment }}", step: 1}
""")
    problems = validate_against(cfg, [(APP, DEP), ("shop", "Ranker")], ruleset=rules)
    assert len(problems) == 2
    assert "autoscaling.deployments[0]" in problems[0] and "did you mean 'Classifier'" in problems[0]
    assert "rule 'A'" in problems[1] and "'Rankr'" in problems[1]
    assert validate_against(cfg, [(APP, "Clasifier"), ("x", "Ranker")]) == []
    # The name runs, in another application: say where, not "did you mean" the same name.
    [other] = validate_against(cfg, [("old", "Clasifier"), ("x", "Ranker")])
    assert "runs in application(s) old" in other and "did you mean" not in other
    assert "autoscaling.deployments[0].application" in other


def test_a_target_over_model_quality_is_refused_with_the_field_named():
    import pytest as _pytest

    from ray_monitor.autoscaling.config import parse_hint_config
    from ray_monitor.common.errors import ConfigError

    with _pytest.raises(ConfigError) as info:
        parse_hint_config({"deployments": [{"deployment": "Classifier", "targets": [
            {"metric": "accuracy(predictions[1h])", "value": 0.9}]}]})
    assert "targets[0]" in str(info.value) and "scale action" in str(info.value)
