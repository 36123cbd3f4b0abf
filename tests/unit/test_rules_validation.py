"""Rule files: what loads, and what is refused with the file, group, rule and field named."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from ray_monitor.common import catalog
from ray_monitor.alerting.expr import parse_expr
from ray_monitor.alerting.loader import load_hint_config, load_rule_file, load_rules
from ray_monitor.common.durations import format_duration, parse_duration
from ray_monitor.common.errors import ConfigError


def one_rule(rule: str) -> str:
    body = "\n".join("      " + line for line in rule.strip("\n").splitlines())
    return f"groups:\n  - name: serving\n    rules:\n{body}\n"


def alert(expr="p99(latency_seconds[1m]) by (application, deployment) > 0.5", **extra) -> str:
    lines = ["- alert: HighLatency", f"  expr: '{expr}'"]
    lines += [f"  {k}: {v}" for k, v in extra.items()]
    return one_rule("\n".join(lines))


def refuse(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_rules(text, filename="rules.yaml")
    return info.value


# (rule file, group, rule, field, a fragment of the message)
CASES = {
    "top level not a mapping": ("- alert: A\n", None, None, None, "must be a mapping"),
    "unknown top-level key": ("groups: []\nalerts: []\n", None, None, "alerts", "unknown top-level key"),
    "groups not a list": ("groups: {name: a}\n", None, None, "groups", "must be a list"),
    "group without name": ("groups:\n  - rules: []\n", "#1", None, "name", "needs a name"),
    "duplicate group name": ("groups:\n  - {name: a, rules: []}\n  - {name: a, rules: []}\n",
                             "a", None, "name", "used twice"),
    "unknown key in a group": ("groups:\n  - {name: a, rules: [], limit: 5}\n", "a", None, "limit",
                               "unknown key"),
    "bad group interval": ("groups:\n  - {name: a, interval: fast, rules: []}\n", "a", None,
                           "interval", "not a duration"),
    "unknown key in a rule": (alert(severity="page"), "serving", "HighLatency", "severity",
                              "unknown key 'severity'"),
    "neither alert nor slo": (one_rule("- record: x\n  expr: rate(requests[1m])"), "serving", "#1",
                              None, "alert: NAME"),
    "missing expr": (one_rule("- alert: HighLatency\n  for: 5m"), "serving", "HighLatency", "expr",
                     "missing"),
    "expr syntax error": (alert("p99(latency_seconds[1m] > 0.5"), "serving", "HighLatency", "expr",
                          "syntax error at position 24"),
    "expr without comparison": (alert("p99(latency_seconds[1m])"), "serving", "HighLatency", "expr",
                                "expected a comparison"),
    "unknown function": (alert("p98(latency_seconds[1m]) > 1"), "serving", "HighLatency", "expr",
                         "unknown function 'p98' at position 0; did you mean"),
    "unknown metric": (alert("p99(latency[1m]) > 1"), "serving", "HighLatency", "expr",
                       "unknown metric 'latency' at position 4; did you mean 'latency_seconds'"),
    "function not for the kind": (alert("p99(rss_bytes[1m]) > 1"), "serving", "HighLatency", "expr",
                                  "does not apply to 'rss_bytes', a gauge"),
    "unknown label in by": (alert("p99(latency_seconds[1m]) by (deploymnet) > 1"), "serving",
                            "HighLatency", "expr", "'deploymnet' in by (...) at position 29"),
    "unknown label in a matcher": (alert('p99(latency_seconds{node="a"}[1m]) > 1'), "serving",
                                   "HighLatency", "expr", "label 'node' in a matcher"),
    "bad regex in a matcher": (alert('p99(latency_seconds{deployment=~"(a"}[1m]) > 1'), "serving",
                               "HighLatency", "expr", "not a valid regular expression"),
    "window of 0": (alert("p99(latency_seconds[0s]) > 1"), "serving", "HighLatency", "expr",
                    "is empty"),
    "bad window": (alert("p99(latency_seconds[5 minutes]) > 1"), "serving", "HighLatency", "expr",
                   "not a duration"),
    "bad quantile": (alert("quantile(1.5, latency_seconds[1m]) > 1"), "serving", "HighLatency",
                     "expr", "not between 0 and 1"),
    "quantile without q": (alert("quantile(latency_seconds[1m]) > 1"), "serving", "HighLatency",
                           "expr", "needs a number first"),
    "number on a function without one": (alert("p99(0.5, latency_seconds[1m]) > 1"), "serving",
                                         "HighLatency", "expr", "takes no number"),
    "error_ratio of a non-request counter": (alert("error_ratio(gpu_xid_errors[1m]) > 0"), "serving",
                                             "HighLatency", "expr", "error_ratio(requests"),
    "and with different by": (alert("p99(latency_seconds[1m]) by (deployment) > 1 and "
                                    "rate(requests[1m]) > 1"), "serving", "HighLatency", "expr",
                              "same by (...)"),
    "bad duration": (alert(**{"for": "-5s"}), "serving", "HighLatency", "for",
                     '"-5s" is not a duration; write it like 30s, 5m or 1h'),
    "negative keep_firing_for": (alert(keep_firing_for="-1m"), "serving", "HighLatency",
                                 "keep_firing_for", "not a duration"),
    "number as a duration": (alert(**{"for": "30"}), "serving", "HighLatency", "for",
                             "not a duration"),
    "duplicate alert name": (one_rule("- {alert: A, expr: 'rate(requests[1m]) > 1'}\n"
                                      "- {alert: A, expr: 'rate(errors[1m]) > 1'}"),
                             "serving", "A", "alert", "used twice"),
    "non-string label value": (alert(labels="{severity: 1}"), "serving", "HighLatency", "labels",
                               "not a string; quote it"),
    "non-string annotation": (alert(annotations="{summary: [a]}"), "serving", "HighLatency",
                              "annotations", "not a string"),
    "invalid label name": (alert(labels="{1severity: page}"), "serving", "HighLatency", "labels",
                           "is not valid"),
    "reserved label": (alert(labels="{deployment: x}"), "serving", "HighLatency", "labels",
                       "'deployment' is reserved"),
    "alertname label": (alert(labels="{alertname: x}"), "serving", "HighLatency", "labels",
                        "'alertname' is reserved"),
    "templated label": (alert(labels="{owner: '{{ $labels.deployment }}'}"), "serving",
                        "HighLatency", "labels", "not expanded in labels"),
    "unknown placeholder": (alert(annotations="{summary: '{{ $foo }}'}"), "serving", "HighLatency",
                            "annotations", "is not supported"),
    "unbalanced braces": (alert(annotations="{summary: 'p99 {{ $value }'}"), "serving",
                          "HighLatency", "annotations", "unbalanced"),
    "template label not in by": (alert(annotations="{summary: '{{ $labels.replica }}'}"), "serving",
                                 "HighLatency", "annotations", "does not have"),
    "scale without step or factor": (alert(scale="{deployment: x}"), "serving", "HighLatency",
                                     "scale", "exactly one of step"),
    "negative step": (alert(scale="{step: -1}"), "serving", "HighLatency", "scale", "1 or more"),
    "factor not above 1": (alert(scale="{factor: 1}"), "serving", "HighLatency", "scale",
                           "above 1"),
    "unknown scale key": (alert(scale="{step: 1, max: 9}"), "serving", "HighLatency", "scale",
                          "unknown key 'max'"),
    "objective of 100": (one_rule("- {slo: availability, objective: 100, sli: error_ratio}"),
                         "serving", "availability", "objective", "between 0 and 100"),
    "objective of 0": (one_rule("- {slo: availability, objective: 0, sli: error_ratio}"),
                       "serving", "availability", "objective", "between 0 and 100"),
    "objective too low to page": (one_rule("- {slo: availability, objective: 90, sli: error_ratio}"),
                                  "serving", "availability", "objective", "could never fire"),
    "unknown sli": (one_rule("- {slo: availability, objective: 99, sli: uptime}"), "serving",
                    "availability", "sli", "not an SLI"),
    "slo by an unknown label": (one_rule("- {slo: availability, objective: 99, sli: error_ratio, "
                                         "by: [gpu]}"), "serving", "availability", "by",
                                "'gpu' is not a label of 'requests'"),
    "slo label set by the expansion": (one_rule("- {slo: availability, objective: 99, "
                                                "sli: error_ratio, labels: {slo: x}}"),
                                       "serving", "availability", "labels", "'slo' is reserved"),
    "alert and slo at once": (one_rule("- {alert: A, slo: b}"), "serving", "#1", "alert",
                              "not both"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_refused_with_file_group_rule_and_field_named(name):
    text, group, rule, fld, fragment = CASES[name]
    err = refuse(text)
    assert (err.file, err.group, err.rule, err.field) == ("rules.yaml", group, rule, fld)
    message = str(err)
    assert message.startswith("rules.yaml: ")
    for part, shown in ((group, f"group {group!r}"), (rule, f"rule {rule!r}"),
                        (fld, f"field {fld!r}")):
        if part is not None:
            assert (shown if not part.startswith("#") else part) in message
    assert fragment in message


def test_message_reads_as_documented():
    err = refuse(alert(**{"for": "-5s"}))
    assert str(err) == ("rules.yaml: group 'serving', rule 'HighLatency': field 'for': "
                        '"-5s" is not a duration; write it like 30s, 5m or 1h')


def test_yaml_syntax_error_names_the_line():
    err = refuse("groups:\n  - name: serving\n    rules: [\n      {alert: A\n")
    assert err.file == "rules.yaml" and "YAML syntax error at line" in str(err)


def test_every_problem_in_the_file_is_reported_at_once():
    text = ("groups:\n"
            "  - name: serving\n"
            "    rules:\n"
            "      - {alert: A, expr: 'p98(latency_seconds[1m]) by (deploymnet) > 1', for: soon}\n"
            "      - {alert: B, expr: 'rate(requests[1m]) > 1', labels: {severity: 2}}\n"
            "  - rules: []\n")
    err = refuse(text)
    where = [(p.group, p.rule, p.field) for p in err.problems]
    assert where == [("serving", "A", "expr"), ("serving", "A", "expr"), ("serving", "A", "for"),
                     ("serving", "B", "labels"), ("#2", None, "name")]
    assert str(err).startswith("5 problems in rules.yaml:")
    assert "unknown function 'p98'" in str(err) and "'deploymnet'" in str(err)


def test_a_missing_file_is_refused_with_its_path(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_rules(tmp_path / "nope.yaml")


def test_load_from_a_path_a_string_and_a_dict_alike(tmp_path):
    text = alert(**{"for": "1m30s"})
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    import yaml
    loaded = [load_rules(path), load_rules(str(path)), load_rules(text), load_rules(yaml.safe_load(text))]
    assert loaded[0].file == str(path) and loaded[2].file == "<rules>"
    assert all(lr.groups == loaded[0].groups for lr in loaded)
    assert loaded[0].groups[0].rules[0].for_s == 90.0


@pytest.mark.parametrize("text, seconds", [
    ("500ms", 0.5), ("1s", 1.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1d", 86400.0),
    ("1h30m", 5400.0), ("1w", 604800.0), ("0", 0.0), (0, 0.0), ("0s", 0.0), ("1m500ms", 60.5),
])
def test_durations_like_prometheus(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["-5s", "5", "5 m", "1.5h", "30m1h", "", "soon", True, 5, None])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="write it like 30s"):
        parse_duration(text)


def test_format_duration_round_trips():
    for s in (0.5, 1.0, 90.0, 3600.0, 5400.0, 86400.0 * 2 + 7200.0):
        assert parse_duration(format_duration(s)) == s
    assert format_duration(90.0) == "1m30s"


def test_expressions_parse_into_catalog_queries():
    [c] = parse_expr('quantile(0.95, latency_seconds{deployment=~"cls.*", method!="health"}[5m]) '
                     'by (deployment, application) >= 0.25')
    assert c.query == catalog.Query(
        function="quantile", metric="latency_seconds", window_s=300.0,
        by=("application", "deployment"), param=0.95,
        matchers=(catalog.Matcher("deployment", "=~", "cls.*"),
                  catalog.Matcher("method", "!=", "health")))
    assert (c.op, c.threshold) == (">=", 0.25)
    conds = parse_expr("ratio_above(0.5, latency_seconds[5m]) > 0.01 and rate(requests[5m]) > 1e-1")
    assert [(c.query.function, c.query.param, c.threshold) for c in conds] == [
        ("ratio_above", 0.5, 0.01), ("rate", None, 0.1)]
    assert parse_expr("last(inflight[30s]) != -1")[0].query.by is None
    assert str(parse_expr("rate(requests[90s]) by (deployment) < 2")[0]) == \
        "rate(requests[1m30s]) by (deployment) < 2"


# ------------------------------------------------------- the whole file, through one reader

EVERY_SECTION = """\
groups:
  - name: serving
    rules:
      - alert: HighLatency
        expr: p99(latency_seconds[1m]) by (application, deployment) > 0.5
        scale: {step: 1}
      - {slo: availability, objective: 99.9, sli: error_ratio, by: [application, deployment]}
autoscaling:
  deployments:
    - application: shop
      deployment: Classifier
      max_replicas: 4
      cooldown: 1m
      targets:
        - {metric: 'p95(latency_seconds[30s])', value: 0.2}
        - gpu_utilization: 0.8
notifications:
  webhooks: [{url: "http://hooks.test/alerts"}]
  route: {group_wait: 10s}
"""


def test_a_file_with_every_section_is_read_whole(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(EVERY_SECTION)
    rf = load_rule_file(path)
    assert (rf.file, rf.source) == (str(path), EVERY_SECTION)
    assert [r.name for _, r in rf.ruleset.rules()] == [
        "HighLatency", "AvailabilitySLOBurnRateFast", "AvailabilitySLOBurnRateSlow"]
    [spec] = rf.autoscaling.deployments
    assert (spec.application, spec.deployment, spec.max_replicas, spec.cooldown_s,
            len(spec.targets)) == ("shop", "Classifier", 4, 60.0, 2)
    assert rf.notifications == {"webhooks": [{"url": "http://hooks.test/alerts"}],
                                "route": {"group_wait": "10s"}}
    with pytest.raises(dataclasses.FrozenInstanceError):
        rf.file = "other.yaml"  # type: ignore[misc]
    # The same file as text or as a dict reads the same; a dict is kept as given.
    data = yaml.safe_load(EVERY_SECTION)
    for other in (load_rule_file(EVERY_SECTION), load_rule_file(data)):
        assert other.file == "<rules>"
        assert (other.ruleset.groups, other.autoscaling) == (rf.ruleset.groups, rf.autoscaling)
    assert load_rule_file(data).source is data
    # The narrower readers are the same reader.
    assert load_rules(path).groups == rf.ruleset.groups
    assert load_hint_config(path) == rf.autoscaling and load_hint_config(None).deployments == ()


def with_autoscaling(entry: str) -> str:
    return f"groups: []\nautoscaling:\n  deployments:\n    - {entry}\n"


# (entry, field under autoscaling.deployments[0], a fragment of the message)
BAD_AUTOSCALING = {
    "min above max": ("{deployment: Classifier, min_replicas: 5, max_replicas: 2}",
                      "min_replicas", "min_replicas 5 is above max_replicas 2"),
    "target on an unknown metric": (
        "{deployment: Classifier, targets: [{metric: 'p95(latency[30s])', value: 0.2}]}",
        "targets[0].metric", "unknown metric 'latency'"),
    "target with an unknown function": (
        "{deployment: Classifier, targets: [{metric: 'p96(latency_seconds[30s])', value: 0.2}]}",
        "targets[0].metric", "unknown function 'p96'"),
    "negative target value": ("{deployment: Classifier, targets: [{gpu_utilization: -0.5}]}",
                              "targets[0].gpu_utilization", "must be a number above 0"),
    "negative max_replicas": ("{deployment: Classifier, max_replicas: -2}", "max_replicas",
                              "1 or more"),
    "tolerance not a number": ("{deployment: Classifier, tolerance: lots}", "tolerance",
                               "must be a number"),
    "target value not a number": (
        "{deployment: Classifier, targets: [{metric: 'p95(latency_seconds[30s])', value: fast}]}",
        "targets[0].value", "must be a number above 0"),
    "bad cooldown": ("{deployment: Classifier, cooldown: 30 seconds}", "cooldown",
                     "not a duration"),
    "bad stabilization": ("{deployment: Classifier, scale_down_stabilization: soon}",
                          "scale_down_stabilization", "not a duration"),
}


@pytest.mark.parametrize("name", list(BAD_AUTOSCALING))
def test_a_bad_autoscaling_section_is_refused_naming_deployment_and_field(name):
    entry, fld, fragment = BAD_AUTOSCALING[name]
    with pytest.raises(ConfigError) as info:
        load_rule_file(with_autoscaling(entry), filename="rules.yaml")
    err = info.value
    assert [(p.file, p.deployment, p.field) for p in err.problems] == [
        ("rules.yaml", "Classifier", f"autoscaling.deployments[0].{fld}")]
    assert str(err).startswith("rules.yaml: deployment 'Classifier': field "
                               f"'autoscaling.deployments[0].{fld}': ")
    assert fragment in str(err)
    # Whoever asks for part of the file gets the same refusal.
    for read in (load_rules, load_hint_config):
        with pytest.raises(ConfigError) as again:
            read(with_autoscaling(entry), filename="rules.yaml")
        assert again.value.problems == err.problems


def test_an_unnamed_autoscaling_entry_is_named_by_its_place():
    with pytest.raises(ConfigError) as info:
        load_rule_file(with_autoscaling("{max_replicas: 3}") + "    - {deployment: B}\n")
    [p] = info.value.problems
    assert (p.deployment, p.field) == ("#1", "autoscaling.deployments[0].deployment")


def test_every_problem_of_every_section_is_in_one_error():
    text = (
        "groups:\n"
        "  - name: serving\n"
        "    rules:\n"
        "      - {alert: A, expr: 'rate(requests[1m]) > 1', for: soon}\n"
        "      - {slo: availability, objective: 100, sli: error_ratio}\n"
        "autoscaling:\n"
        "  deployments:\n"
        "    - {deployment: Classifier, min_replicas: 3, max_replicas: 1}\n"
        "notifications:\n"
        "  webhooks: [{url: not-a-url}]\n"
        "alerts: []\n")
    with pytest.raises(ConfigError) as info:
        load_rule_file(text, filename="rules.yaml")
    err = info.value
    assert [(p.group, p.rule, p.deployment, p.field) for p in err.problems] == [
        (None, None, None, "alerts"),
        ("serving", "A", None, "for"),
        ("serving", "availability", None, "objective"),
        (None, None, "Classifier", "autoscaling.deployments[0].min_replicas"),
        (None, None, None, "notifications.webhooks[0].url")]
    assert all(p.file == "rules.yaml" for p in err.problems)
    assert str(err).startswith("5 problems in rules.yaml:\n")
    assert len(str(err).splitlines()) == 6  # the count, then one problem a line


def test_a_bad_notifications_section_is_refused_with_the_file_named():
    with pytest.raises(ConfigError) as info:
        load_rule_file("groups: []\nnotifications: webhooks\n", filename="rules.yaml")
    assert str(info.value).startswith("rules.yaml: notifications: expected a mapping")


MISSING = "<rules>: no rule file 'myrules'; pass a path to a YAML file, the YAML text, or a dict"


@pytest.mark.parametrize("read", [load_rule_file, load_rules, load_hint_config])
def test_a_word_that_names_no_file_is_refused_by_every_reader(read, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        read("myrules")
    assert str(info.value) == MISSING
    (tmp_path / "myrules").write_text("groups: []\n")  # once it exists, it is a file
    assert read("myrules") is not None


def test_sources_are_told_apart_as_documented(tmp_path):
    assert load_rule_file("groups: []").ruleset.groups == ()  # one line of YAML: a mapping
    with pytest.raises(ConfigError) as info:
        load_rule_file(str(tmp_path / "nope.yml"))
    assert str(info.value).endswith("; pass a path to a YAML file, the YAML text, or a dict")
    assert info.value.file == str(tmp_path / "nope.yml") and "cannot read" in str(info.value)
    with pytest.raises(ConfigError, match="cannot be a int"):
        load_rule_file(5)  # type: ignore[arg-type]
