"""The alert state machine, SLO expansion and templates, driven by a scripted source."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ray_monitor.common import catalog
from ray_monitor.alerting.engine import RuleEngine
from ray_monitor.alerting.loader import load_rules
from ray_monitor.alerting.templates import Template
from ray_monitor.common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
K1 = (("application", "shop"), ("deployment", "Classifier"))
K2 = (("application", "shop"), ("deployment", "Ranker"))


class ScriptedSource:
    """Our window store's interface, answering with values a test sets per query."""

    def __init__(self):
        self.values: dict[tuple, dict] = {}
        self.calls: list[tuple[catalog.Query, float]] = []
        self.fail = False

    def set(self, function: str, metric: str, window_s: float, values: dict) -> None:
        self.values[(function, metric, window_s)] = dict(values)

    def evaluate(self, query: catalog.Query, now: float) -> dict:
        self.calls.append((query, now))
        if self.fail:
            raise RuntimeError("window store is away")
        return dict(self.values.get((query.function, query.metric, query.window_s), {}))


def ruleset(rule_yaml: str, interval: str = "") -> str:
    body = "\n".join("      " + line for line in rule_yaml.strip("\n").splitlines())
    return f"groups:\n  - name: serving\n{interval}    rules:\n{body}\n"


LATENCY = """
- alert: HighLatency
  expr: p99(latency_seconds[1m]) by (application, deployment) > 0.5
  for: 30s
  labels: {severity: page}
  annotations:
    summary: "p99 {{ $value }}s on {{ $labels.deployment }}"
"""


def engine_for(rule_yaml: str = LATENCY, **kw) -> RuleEngine:
    return RuleEngine(rules=load_rules(ruleset(rule_yaml)), clock=lambda: 0.0, **kw)


def p99(src: ScriptedSource, values: dict) -> None:
    src.set("p99", "latency_seconds", 60.0, values)


def states(result) -> dict:
    return {(a.rule, a.key): a.state for a in result.alerts}


# ------------------------------------------------------------------ state machine

def test_match_goes_pending_then_fires_once_held_for_its_for():
    eng, src = engine_for(), ScriptedSource()
    p99(src, {K1: 0.8})
    r = eng.evaluate(src, now=100.0)
    [a] = r.alerts
    assert (a.state, a.active_at, a.fired_at) == ("pending", 100.0, None)
    assert r.to_send == []
    assert eng.evaluate(src, now=129.0).alerts[0].state == "pending"
    r = eng.evaluate(src, now=130.0)
    [a] = r.alerts
    assert (a.state, a.fired_at) == ("firing", 130.0)
    [msg] = r.to_send
    assert msg.status == "firing"
    assert msg.labels == {"application": "shop", "deployment": "Classifier",
                          "severity": "page", "alertname": "HighLatency"}
    assert msg.annotations == {"summary": "p99 0.8s on Classifier"}
    assert msg.starts_at == 130.0  # Prometheus sends FiredAt as startsAt
    assert msg.ends_at == 130.0 + 4 * 60.0  # 4 x max(group interval 1s, resend delay 60s)
    assert msg.value == 0.8


def test_for_zero_fires_at_once():
    eng, src = engine_for(LATENCY.replace("for: 30s", "for: 0s")), ScriptedSource()
    p99(src, {K1: 0.8})
    r = eng.evaluate(src, now=5.0)
    assert r.alerts[0].state == "firing" and r.alerts[0].active_at == r.alerts[0].fired_at == 5.0
    assert [m.status for m in r.to_send] == ["firing"]


def test_pending_that_stops_matching_is_deleted_and_never_sent():
    eng, src = engine_for(), ScriptedSource()
    p99(src, {K1: 0.8})
    eng.evaluate(src, now=0.0)
    p99(src, {K1: 0.2})  # below the threshold
    r = eng.evaluate(src, now=10.0)
    assert r.alerts == [] and r.to_send == []
    p99(src, {K1: 0.8})
    assert eng.evaluate(src, now=20.0).alerts[0].active_at == 20.0  # its for timer starts over


def test_firing_resolves_then_resends_until_retention_then_is_forgotten():
    eng, src = engine_for(LATENCY.replace("for: 30s", "for: 0s")), ScriptedSource()
    p99(src, {K1: 0.8})
    eng.evaluate(src, now=0.0)
    p99(src, {})  # no data is no match
    r = eng.evaluate(src, now=10.0)
    [a] = r.alerts
    assert (a.state, a.resolved_at) == ("resolved", 10.0)
    [msg] = r.to_send
    assert (msg.status, msg.ends_at, msg.starts_at) == ("resolved", 10.0, 0.0)
    assert eng.evaluate(src, now=11.0).to_send == []  # resolved is sent once ...
    assert eng.evaluate(src, now=70.0).to_send == []  # ... then every resend delay
    again = eng.evaluate(src, now=70.5).to_send
    assert [(m.status, m.ends_at) for m in again] == [("resolved", 10.0)]
    assert eng.alert_series() == []  # resolved alerts are not in ALERTS
    assert eng.evaluate(src, now=910.0).alerts != []  # kept for resolved_retention_s (900s)
    assert eng.evaluate(src, now=910.5).alerts == []


def test_resend_delay_follows_prometheus_needs_sending():
    eng, src = engine_for(LATENCY.replace("for: 30s", "for: 0s")), ScriptedSource()
    p99(src, {K1: 0.8})
    assert len(eng.evaluate(src, now=0.0).to_send) == 1
    assert eng.evaluate(src, now=1.0).to_send == []
    assert eng.evaluate(src, now=60.0).to_send == []  # last_sent + delay must be before now
    [msg] = eng.evaluate(src, now=61.0).to_send
    assert (msg.starts_at, msg.ends_at) == (0.0, 61.0 + 240.0)


def test_resolved_alert_that_matches_again_starts_a_new_pending():
    eng, src = engine_for(), ScriptedSource()
    p99(src, {K1: 0.8})
    eng.evaluate(src, now=0.0)
    eng.evaluate(src, now=30.0)  # firing
    p99(src, {})
    eng.evaluate(src, now=40.0)  # resolved
    p99(src, {K1: 0.9})
    r = eng.evaluate(src, now=50.0)
    [a] = r.alerts
    assert (a.state, a.active_at, a.fired_at, a.resolved_at) == ("pending", 50.0, None, None)
    assert r.to_send == []


def test_keep_firing_for_holds_a_firing_alert_after_it_stops_matching():
    eng = engine_for(LATENCY.replace("for: 30s", "for: 0s\n  keep_firing_for: 1m"))
    src = ScriptedSource()
    p99(src, {K1: 0.8})
    eng.evaluate(src, now=0.0)
    p99(src, {})
    for t in (10.0, 40.0, 68.0):  # keep_firing_for counts from the first evaluation without a match
        r = eng.evaluate(src, now=t)
        assert r.alerts[0].state == "firing" and r.alerts[0].keep_firing_since == 10.0
    p99(src, {K1: 0.7})  # matching again resets the count
    assert eng.evaluate(src, now=69.0).alerts[0].keep_firing_since is None
    p99(src, {})
    assert eng.evaluate(src, now=70.0).alerts[0].state == "firing"
    assert eng.evaluate(src, now=129.0).alerts[0].state == "firing"
    r = eng.evaluate(src, now=130.0)
    assert (r.alerts[0].state, r.alerts[0].resolved_at) == ("resolved", 130.0)
    assert [m.status for m in r.to_send] == ["resolved"]


def test_keep_firing_for_does_not_hold_a_pending_alert():
    eng = engine_for(LATENCY.replace("for: 30s", "for: 30s\n  keep_firing_for: 1m"))
    src = ScriptedSource()
    p99(src, {K1: 0.8})
    eng.evaluate(src, now=0.0)
    p99(src, {})
    assert eng.evaluate(src, now=1.0).alerts == []


def test_value_and_annotations_follow_each_evaluation_and_groups_are_separate():
    eng, src = engine_for(LATENCY.replace("for: 30s", "for: 0s")), ScriptedSource()
    p99(src, {K1: 0.8, K2: 0.6})
    eng.evaluate(src, now=0.0)
    p99(src, {K1: 1.25, K2: 0.6})
    r = eng.evaluate(src, now=1.0)
    by_key = {a.key: a for a in r.alerts}
    assert by_key[K1].value == 1.25
    assert by_key[K1].annotations["summary"] == "p99 1.25s on Classifier"
    assert by_key[K2].annotations["summary"] == "p99 0.6s on Ranker"


def test_groups_run_when_their_interval_is_due():
    text = """groups:
  - name: fast
    rules:
      - {alert: A, expr: "rate(requests[1m]) > 1"}
  - name: slow
    interval: 5s
    rules:
      - {alert: B, expr: "rate(errors[1m]) > 1"}
"""
    eng, src = RuleEngine(rules=load_rules(text), clock=lambda: 0.0), ScriptedSource()
    ran = {t: eng.evaluate(src, now=t).evaluated_groups for t in
           (0.0, 1.0, 2.0, 3.0, 4.0, 4.9, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0)}
    assert [t for t, groups in ran.items() if "slow" in groups] == [0.0, 4.9, 10.0]
    assert all("fast" in groups for groups in ran.values())
    # after a long pause the next run is due one interval later, not a burst of catch-ups
    assert "slow" in eng.evaluate(src, now=100.0).evaluated_groups
    assert "slow" not in eng.evaluate(src, now=101.0).evaluated_groups


def test_ends_at_uses_the_group_interval_when_it_exceeds_the_resend_delay():
    text = ruleset(LATENCY.replace("for: 30s", "for: 0s"), interval="    interval: 2m\n")
    eng, src = RuleEngine(rules=load_rules(text)), ScriptedSource()
    p99(src, {K1: 0.8})
    [msg] = eng.evaluate(src, now=1000.0).to_send
    assert msg.ends_at == 1000.0 + 4 * 120.0


def test_and_keeps_groups_matching_every_side_with_the_first_sides_value():
    eng = engine_for("""
- alert: SlowAndBusy
  expr: p99(latency_seconds[1m]) by (application, deployment) > 0.5 and rate(requests[1m]) by (application, deployment) > 10
""")
    src = ScriptedSource()
    p99(src, {K1: 0.8, K2: 0.9})
    src.set("rate", "requests", 60.0, {K1: 50.0, K2: 2.0})
    [a] = eng.evaluate(src, now=0.0).alerts
    assert a.key == K1 and a.value == 0.8


def test_a_failing_query_is_reported_and_leaves_alerts_as_they_were():
    eng, src = engine_for(LATENCY.replace("for: 30s", "for: 0s")), ScriptedSource()
    p99(src, {K1: 0.8})
    eng.evaluate(src, now=0.0)
    src.fail = True
    r = eng.evaluate(src, now=1.0)
    assert [(e.group, e.rule) for e in r.errors] == [("serving", "HighLatency")]
    assert "window store is away" in r.errors[0].message
    assert r.alerts[0].state == "firing"


def test_alert_series_lists_pending_and_firing():
    eng = engine_for(LATENCY + LATENCY.replace("HighLatency", "VeryHighLatency")
                     .replace("for: 30s", "for: 0s").replace("> 0.5", "> 0.7"))
    src = ScriptedSource()
    p99(src, {K1: 0.8})
    eng.evaluate(src, now=0.0)
    series = sorted((labels["alertname"], state) for labels, state in eng.alert_series())
    assert series == [("HighLatency", "pending"), ("VeryHighLatency", "firing")]


def test_generator_url_links_the_expression():
    eng = engine_for(LATENCY.replace("for: 30s", "for: 0s"), generator_url="http://mon:8265/alerts")
    src = ScriptedSource()
    p99(src, {K1: 0.8})
    [msg] = eng.evaluate(src, now=0.0).to_send
    assert msg.generator_url.startswith("http://mon:8265/alerts?expr=p99%28latency_seconds")


def test_engine_uses_its_clock_and_checks_its_options():
    now = [500.0]
    eng = RuleEngine(rules=load_rules(ruleset(LATENCY)), clock=lambda: now[0])
    src = ScriptedSource()
    p99(src, {K1: 0.8})
    assert eng.evaluate(src).alerts[0].active_at == 500.0
    with pytest.raises(ValueError, match="resend_delay_s"):
        RuleEngine(rules=load_rules(ruleset(LATENCY)), resend_delay_s=0)
    with pytest.raises(TypeError, match="RuleSet"):
        RuleEngine(rules={"groups": []})


# ------------------------------------------------------------------------- reload

def fire(eng, src, now=0.0):
    p99(src, {K1: 0.8})
    eng.evaluate(src, now=now)
    return eng.evaluate(src, now=now + 30.0)


def test_reload_keeps_state_of_unchanged_rules_and_drops_removed_ones():
    two = LATENCY + LATENCY.replace("HighLatency", "Other")
    eng, src = engine_for(two), ScriptedSource()
    fire(eng, src)
    # whitespace and label order in expr do not make a different rule; labels may change
    eng.reload(load_rules(ruleset(LATENCY.replace(
        "p99(latency_seconds[1m]) by (application, deployment)",
        "p99( latency_seconds[1m] ) by (deployment,application)").replace("page", "ticket"))),
        now=31.0)
    [a] = eng.alerts()
    assert (a.rule, a.state, a.active_at, a.fired_at) == ("HighLatency", "firing", 0.0, 30.0)
    assert a.labels["severity"] == "ticket"
    # the next send is still governed by the resend delay, not re-sent on reload
    assert eng.evaluate(src, now=32.0).to_send == []


def test_reload_drops_alerts_of_a_rule_whose_expr_changed():
    eng, src = engine_for(), ScriptedSource()
    fire(eng, src)
    eng.reload(load_rules(ruleset(LATENCY.replace("> 0.5", "> 0.6"))), now=31.0)
    assert eng.alerts() == []


def test_reload_demotes_firing_alerts_whose_raised_for_has_not_passed():
    eng, src = engine_for(), ScriptedSource()
    fire(eng, src)  # active since 0, firing since 30
    eng.reload(load_rules(ruleset(LATENCY.replace("for: 30s", "for: 5m"))), now=40.0)
    [a] = eng.alerts()
    assert (a.state, a.fired_at, a.active_at) == ("pending", None, 0.0)
    assert eng.evaluate(src, now=299.0).alerts[0].state == "pending"
    assert eng.evaluate(src, now=300.0).alerts[0].state == "firing"


def test_a_bad_file_never_reaches_the_engine_and_old_rules_keep_running():
    eng, src = engine_for(), ScriptedSource()
    fire(eng, src)
    with pytest.raises(ConfigError):
        eng.reload(load_rules(ruleset(LATENCY.replace("for: 30s", "for: soon"))), now=40.0)
    assert [r.name for _, r in eng.ruleset.rules()] == ["HighLatency"]
    assert eng.evaluate(src, now=41.0).alerts[0].state == "firing"


# -------------------------------------------------------------------- persistence

def test_state_survives_a_restart_without_duplicate_firing():
    rules = LATENCY + LATENCY.replace("HighLatency", "Other").replace("> 0.5", "> 0.7")
    eng, src = engine_for(rules), ScriptedSource()
    p99(src, {K1: 0.8, K2: 0.6})
    eng.evaluate(src, now=0.0)
    eng.evaluate(src, now=20.0)
    r = eng.evaluate(src, now=30.0)  # K1 fires on both rules, K2 fires on HighLatency
    assert len(r.to_send) == 3
    p99(src, {K1: 0.8, K2: 0.6, (("application", "shop"), ("deployment", "New")): 0.9})
    eng.evaluate(src, now=35.0)  # a new pending one, active since 35
    saved = json.loads(json.dumps(eng.state_dict()))

    # (restore_grace_s=0: this test is about the state; the grace period has its own test)
    fresh = RuleEngine(rules=load_rules(ruleset(LATENCY)), restore_grace_s=0)  # "Other" is gone
    fresh.restore(saved, now=50.0)
    got = {(a.rule, a.key[1][1]): (a.state, a.active_at, a.last_sent_at) for a in fresh.alerts()}
    assert got == {("HighLatency", "Classifier"): ("firing", 0.0, 30.0),
                   ("HighLatency", "Ranker"): ("firing", 0.0, 30.0),
                   ("HighLatency", "New"): ("pending", 35.0, None)}
    assert fresh.evaluate(src, now=60.0).to_send == []  # not sent again before its resend time
    r = fresh.evaluate(src, now=65.0)  # the pending one kept its for timer
    assert {a.key[1][1]: a.state for a in r.alerts}["New"] == "firing"
    assert [m.labels["deployment"] for m in r.to_send] == ["New"]
    assert len(fresh.evaluate(src, now=91.0).to_send) == 2


def test_restore_drops_resolved_alerts_past_retention_and_refuses_other_data():
    eng, src = engine_for(LATENCY.replace("for: 30s", "for: 0s")), ScriptedSource()
    p99(src, {K1: 0.8})
    eng.evaluate(src, now=0.0)
    p99(src, {})
    eng.evaluate(src, now=10.0)
    saved = eng.state_dict()
    fresh = engine_for(LATENCY.replace("for: 30s", "for: 0s"))
    fresh.restore(saved, now=100.0)
    assert [a.state for a in fresh.alerts()] == ["resolved"]
    fresh.restore(saved, now=1000.0)
    assert fresh.alerts() == []
    with pytest.raises(ValueError, match="state_dict"):
        fresh.restore({"alerts": []})


# ----------------------------------------------------------------------------- SLO

SLO = """
- slo: availability
  objective: 99.9
  sli: error_ratio
  by: [application, deployment]
  labels: {team: search}
"""


def test_slo_expands_into_fast_and_slow_multiwindow_burn_rate_alerts():
    rs = load_rules(ruleset(SLO))
    fast, slow = [r for _, r in rs.rules()]
    assert (fast.name, slow.name) == ("AvailabilitySLOBurnRateFast", "AvailabilitySLOBurnRateSlow")
    assert fast.labels == {"severity": "page", "team": "search", "slo": "availability",
                           "burn_rate_window": "1h"}
    for rule, factor, windows in ((fast, 14.4, (3600.0, 300.0)), (slow, 6.0, (21600.0, 1800.0))):
        assert [c.query.window_s for c in rule.conditions] == list(windows)
        assert all(c.query.function == "error_ratio" and c.query.metric == "requests"
                   and c.query.by == ("application", "deployment") and c.op == ">"
                   and math.isclose(c.threshold, factor * 0.001) for c in rule.conditions)
        assert set(rule.annotations) == {"summary", "description"}


def test_latency_slo_uses_the_share_of_requests_above_the_threshold():
    rs = load_rules(ruleset("- {slo: fast-answers, objective: 99, sli: {latency_threshold: 0.25}}"))
    fast = next(r for _, r in rs.rules())
    assert fast.name == "FastAnswersSLOBurnRateFast"
    q = fast.conditions[0].query
    assert (q.function, q.metric, q.param, q.by) == ("ratio_above", "latency_seconds", 0.25, None)
    assert math.isclose(fast.conditions[0].threshold, 0.144)


def test_slo_pages_only_when_long_and_short_windows_both_burn():
    eng, src = RuleEngine(rules=load_rules(ruleset(SLO))), ScriptedSource()

    def burn(**windows):
        for w, ratio in windows.items():
            src.set("error_ratio", "requests", {"h1": 3600.0, "m5": 300.0, "h6": 21600.0,
                                                "m30": 1800.0}[w], {K1: ratio})

    burn(h1=0.02, m5=0.02, h6=0.004, m30=0.004)  # 20x over 1h and 5m: fast burn only
    r = eng.evaluate(src, now=0.0)
    assert [(m.labels["alertname"], m.status) for m in r.to_send] == [
        ("AvailabilitySLOBurnRateFast", "firing")]
    msg = r.to_send[0]
    assert msg.labels["team"] == "search" and msg.value == 0.02
    assert msg.annotations["summary"] == ("SLO availability (99.9%) on shop/Classifier: "
                                          "error budget burning 14.4x too fast")
    assert msg.annotations["description"].startswith("2% of requests that failed over the last 1h")

    burn(h1=0.02, m5=0.001)  # the incident is over: the 5m window stops the page quickly
    r = eng.evaluate(src, now=1.0)
    assert [(m.labels["alertname"], m.status) for m in r.to_send] == [
        ("AvailabilitySLOBurnRateFast", "resolved")]

    burn(h1=0.001, m5=0.001, h6=0.007, m30=0.008)  # a slow, steady 7x burn
    r = eng.evaluate(src, now=2.0)
    assert [(m.labels["alertname"], m.status) for m in r.to_send] == [
        ("AvailabilitySLOBurnRateSlow", "firing")]


# ----------------------------------------------------------------------- templates

@pytest.mark.parametrize("text, value, expected", [
    ("{{ $value }}", 0.51, "0.51"),
    ("{{$value}}", 123456.0, "123456"),
    ("{{ $value }}", 1e6, "1e+06"),  # as Go prints a float64, so it reads as in Prometheus
    ("{{ $value }}", 3.0, "3"),
    ("{{ $value }}", 0.00001, "1e-05"),
    ("{{ $value }}", math.nan, "NaN"),
    ("{{ $value | humanize }}", 1234567.0, "1.235M"),
    ("{{ humanize $value }}", 0.0025, "2.5m"),
    ("{{ $value | humanizePercentage }}", 0.0512, "5.12%"),
    ("{{ $value | humanizeDuration }}", 3725.0, "1h 2m 5s"),
    ("{{ $value | humanizeDuration }}", 0.25, "250ms"),
    ('{{ $value | printf "%.2f" }}s', 0.5123, "0.51s"),
    ("p99 {{ $value }}s on {{ $labels.deployment }}", 0.8, "p99 0.8s on Classifier"),
])
def test_templates_substitute(text, value, expected):
    assert Template.parse(text, ("application", "deployment")).render(value, dict(K1)) == expected


@pytest.mark.parametrize("text, fragment", [
    ("{{ $foo }}", "not supported"),
    ("{{ .Value }}", "not supported"),
    ("{{ $value.__class__ }}", "not supported"),
    ("{{ range $labels }}x{{ end }}", "not supported"),
    ("{{ $value ", "unbalanced"),
    ("value }}", "unbalanced"),
    ("{{ $labels.replica }}", "does not have"),
    ('{{ $value | printf "%s %s" }}', "printf"),
])
def test_templates_refuse_anything_but_substitution(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        Template.parse(text, ("application", "deployment"))


def test_scale_action_is_rendered_per_alert():
    eng = engine_for(LATENCY.replace("for: 30s", "for: 0s")
                     + "  scale: {deployment: '{{ $labels.deployment }}', factor: 1.5, cooldown: 2m}\n")
    src = ScriptedSource()
    p99(src, {K1: 0.8})
    [a] = eng.evaluate(src, now=0.0).alerts
    assert a.scale == {"deployment": "Classifier", "step": None, "factor": 1.5, "cooldown_s": 120.0}


# -------------------------------------------------------------------- default file

def test_default_rules_load_and_each_has_for_severity_and_summary():
    rs = load_rules(ROOT / "deployments" / "rules" / "default.yaml")
    rules = {r.name: r for _, r in rs.rules()}
    assert {"HighLatencyP99", "HighErrorRatio", "AvailabilitySLOBurnRateFast",
            "AvailabilitySLOBurnRateSlow", "GPUSaturated", "GPUTemperatureHigh", "GPUXidErrors",
            "HungRequests", "ReplicaMemoryGrowth"} <= set(rules)
    for rule in rules.values():
        assert rule.labels["severity"] in ("page", "ticket")
        assert "summary" in rule.annotations
    assert rules["HighLatencyP99"].for_s == 300.0
    assert rules["ReplicaMemoryGrowth"].conditions[0].query.function == "deriv"
    assert rules["GPUXidErrors"].for_s == 0.0  # an XID error is worth a page at once


def test_restored_alerts_are_held_until_their_window_has_new_data():
    """After a restart the windows are empty; "no data" must not resolve a firing alert."""
    from ray_monitor.alerting.engine import RuleEngine
    from ray_monitor.alerting.loader import load_rules

    rules = load_rules({"groups": [{"name": "g", "rules": [
        {"alert": "A", "expr": "error_ratio(requests[30s]) by (deployment) > 0.5"}]}]})

    class Src:
        def __init__(self, values):
            self.values = values

        def evaluate(self, query, now):
            return self.values

    key = (("deployment", "d"),)
    first = RuleEngine(rules=rules)
    first.evaluate(Src({key: 0.9}), now=100.0)
    assert [a.state for a in first.alerts()] == ["firing"]
    second = RuleEngine(rules=rules)
    second.restore(first.state_dict(), now=200.0)
    second.evaluate(Src({}), now=201.0)  # empty windows right after the restart
    assert [a.state for a in second.alerts()] == ["firing"]
    second.evaluate(Src({}), now=231.0)  # a whole window of new data says it is over
    assert [a.state for a in second.alerts()] == ["resolved"]
