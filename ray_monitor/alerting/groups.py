"""The ``groups:`` section of a rule file: every group, alert and SLO entry, checked.

Runs where a rule file is read (through :mod:`~ray_monitor.alerting.loader`, in the CLI,
the driver and the aggregator on reload). It decides what a group and a rule may hold
and says what is wrong with each, naming the group, the rule and the field: every
problem is collected, none stops the reading of the rest.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional

from ray_monitor.alerting.expr import LABEL_NAME, Condition, check_expr
from ray_monitor.alerting.model import AlertRule, RuleGroup, ScaleAction
from ray_monitor.alerting.slo import SLO_LABELS, check_slo, expand_slo
from ray_monitor.alerting.templates import Template
from ray_monitor.common import catalog
from ray_monitor.common.durations import parse_duration
from ray_monitor.common.errors import ConfigError, Problem

__all__ = ["parse_groups"]

_NAME_RE = re.compile(LABEL_NAME)
_GROUP_KEYS = ("name", "interval", "rules")
_ALERT_KEYS = ("alert", "expr", "for", "keep_firing_for", "labels", "annotations", "scale")
_SCALE_KEYS = ("deployment", "step", "factor", "cooldown")

Add = Callable[[Optional[str], str], None]  # (field, message), for one rule


def _show(v: Any) -> str:
    """A value from the file as the user wrote it: strings in double quotes."""
    return '"' + v + '"' if isinstance(v, str) else repr(v)


class _Collector:
    def __init__(self, file: str):
        self.file = file
        self.problems: list[Problem] = []

    def add(self, group: Optional[str], rule: Optional[str], fld: Optional[str],
            message: str) -> None:
        self.problems.append(Problem(self.file, group, rule, fld, message))


def parse_groups(section: Any, *, file: str) -> tuple[RuleGroup, ...]:
    """The value of ``groups:``, checked; raises :class:`ConfigError` with every problem."""
    out = _Collector(file)
    if not isinstance(section, list):
        out.add(None, None, "groups", "must be a list of groups, each with a name and rules")
        section = []
    groups: list[RuleGroup] = []
    seen: set[str] = set()
    for index, raw in enumerate(section, 1):
        group = _load_group(raw, index, seen, out)
        if group is not None:
            groups.append(group)
    if out.problems:
        raise ConfigError(out.problems)
    return tuple(groups)


def _load_group(raw, index: int, seen: set[str], out: _Collector) -> Optional[RuleGroup]:
    gname = f"#{index}"
    if not isinstance(raw, Mapping):
        out.add(gname, None, None, "a group must be a mapping with name and rules")
        return None
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        out.add(gname, None, "name", "every group needs a name (a non-empty string)")
    elif name in seen:
        gname = name
        out.add(gname, None, "name", f"group name {name!r} is used twice; give each group its own name")
    else:
        gname = name
        seen.add(name)
    for key in raw:
        if key not in _GROUP_KEYS:
            out.add(gname, None, str(key), f"unknown key {key!r} in a group; use {', '.join(_GROUP_KEYS)}")
    interval = None
    if "interval" in raw:
        try:
            interval = parse_duration(raw["interval"])
            if interval <= 0:
                raise ValueError(f"{raw['interval']!r} is not a usable interval; use 1s or more")
        except ValueError as exc:
            out.add(gname, None, "interval", str(exc))
    raw_rules = raw.get("rules")
    if not isinstance(raw_rules, list):
        out.add(gname, None, "rules", "must be a list of rules (each an alert: or slo: entry)")
        raw_rules = []
    rules: list[AlertRule] = []
    names: set[str] = set()
    for ri, rraw in enumerate(raw_rules, 1):
        made = _load_rule(rraw, gname, ri, out)
        for rule in made:
            if rule.name in names:
                out.add(gname, rule.name, "alert" if rule.slo is None else "slo",
                        f"alert name {rule.name!r} is used twice in this group; rename one")
            names.add(rule.name)
            rules.append(rule)
    return RuleGroup(name=gname, rules=tuple(rules), interval_s=interval)


def _load_rule(raw, gname: str, index: int, out: _Collector) -> list[AlertRule]:
    if not isinstance(raw, Mapping):
        out.add(gname, f"#{index}", None, "a rule must be a mapping with alert: and expr:, or slo:")
        return []
    if "alert" in raw and "slo" in raw:
        out.add(gname, f"#{index}", "alert", "a rule is either alert: or slo:, not both")
        return []
    if "slo" in raw:
        return _load_slo(raw, gname, index, out)
    if "alert" not in raw:
        out.add(gname, f"#{index}", None, "a rule needs alert: NAME (with expr:) or slo: NAME; "
                "recording rules (record:) are not supported")
        return []
    name = raw["alert"]
    rname = name if isinstance(name, str) and name else f"#{index}"
    add = lambda fld, msg: out.add(gname, rname, fld, msg)  # noqa: E731
    before = len(out.problems)
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        add("alert", f"alert name {name!r} must be letters, digits and _, like HighLatencyP99")
    for key in raw:
        if key not in _ALERT_KEYS:
            add(str(key), f"unknown key {key!r} in an alert rule; use {', '.join(_ALERT_KEYS)}")
    conditions: tuple[Condition, ...] = ()
    if "expr" not in raw:
        add("expr", "missing; write it like p99(latency_seconds[5m]) by (deployment) > 0.5")
    else:
        conditions, messages = check_expr(raw["expr"])
        for message in messages:
            add("expr", f"{_show(raw['expr'])}: {message}")
    durations = {}
    for key in ("for", "keep_firing_for"):
        durations[key] = 0.0
        if key in raw:
            try:
                durations[key] = parse_duration(raw[key])
            except ValueError as exc:
                add(key, str(exc))
    by = conditions[0].query.by or () if conditions else None
    labels = _check_labels(raw.get("labels"), add, reserved=catalog.RESERVED_LABELS)
    annotations = _check_annotations(raw.get("annotations"), by, add)
    scale = _check_scale(raw["scale"], by, add) if "scale" in raw else None
    if len(out.problems) > before:
        return []
    return [AlertRule(name=name, expr=" and ".join(map(str, conditions)), conditions=conditions,
                      for_s=durations["for"], keep_firing_for_s=durations["keep_firing_for"],
                      labels=labels, annotations=annotations, scale=scale)]


def _check_labels(raw: Any, add: Add, *, reserved) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        add("labels", "must be a mapping of label name to string value, like {severity: page}")
        return {}
    labels = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not _NAME_RE.fullmatch(k) or k.startswith("__"):
            add("labels", f"label name {k!r} is not valid; use letters, digits and _, not "
                "starting with a digit or __")
        elif k in reserved:
            add("labels", f"label name {k!r} is reserved (the monitor sets it); choose another name")
        elif not isinstance(v, str):
            add("labels", f"label {k!r} has value {v!r}, which is not a string; quote it: {k}: \"{v}\"")
        elif "{{" in v or "}}" in v:
            add("labels", f"label {k!r}: templates are not expanded in labels (they would make "
                "a new alert per value); put {{ ... }} in an annotation instead")
        else:
            labels[k] = v
    return labels


def _check_annotations(raw: Any, by, add: Add) -> dict[str, Template]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        add("annotations", "must be a mapping of name to string, like {summary: \"...\"}")
        return {}
    out = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not _NAME_RE.fullmatch(k):
            add("annotations", f"annotation name {k!r} is not valid; use letters, digits and _")
        elif not isinstance(v, str):
            add("annotations", f"annotation {k!r} has value {v!r}, which is not a string; quote it")
        else:
            try:
                out[k] = Template.parse(v, by)
            except ValueError as exc:
                add("annotations", f"annotation {k!r}: {exc}")
    return out


def _check_scale(raw: Any, by, add: Add) -> Optional[ScaleAction]:
    if not isinstance(raw, Mapping):
        add("scale", "must be a mapping like {deployment: \"{{ $labels.deployment }}\", step: 1}")
        return None
    for key in raw:
        if key not in _SCALE_KEYS:
            add("scale", f"unknown key {key!r} in scale; use {', '.join(_SCALE_KEYS)}")
    step, factor, cooldown, deployment = raw.get("step"), raw.get("factor"), None, None
    if (step is None) == (factor is None):
        add("scale", "give exactly one of step (replicas to add, like 1) or factor "
            "(multiply replicas, like 1.5)")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
        add("scale", f"step {step!r} must be a whole number of replicas to add, 1 or more")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                               or not factor > 1):
        add("scale", f"factor {factor!r} must be a number above 1, like 1.5")
    if "cooldown" in raw:
        try:
            cooldown = parse_duration(raw["cooldown"])
        except ValueError as exc:
            add("scale", f"cooldown: {exc}")
    dep = raw.get("deployment", "{{ $labels.deployment }}")
    if not isinstance(dep, str) or not dep:
        add("scale", "deployment must be a deployment name or \"{{ $labels.deployment }}\"")
    else:
        try:
            deployment = Template.parse(dep, by)
        except ValueError as exc:
            add("scale", f"deployment: {exc}")
    if deployment is None:
        return None
    return ScaleAction(deployment, step, float(factor) if factor is not None else None, cooldown)


def _load_slo(raw, gname: str, index: int, out: _Collector) -> list[AlertRule]:
    name = raw["slo"]
    rname = name if isinstance(name, str) and name else f"#{index}"
    add = lambda fld, msg: out.add(gname, rname, fld, msg)  # noqa: E731
    before = len(out.problems)
    slo = check_slo(raw, add)
    labels = _check_labels(raw.get("labels"), add, reserved=catalog.RESERVED_LABELS | set(SLO_LABELS))
    annotations = _check_annotations(raw.get("annotations"), slo.by or (), add)
    if len(out.problems) > before:
        return []
    return expand_slo(slo, labels, annotations)
