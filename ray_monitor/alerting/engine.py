"""The alert state machine of Prometheus' ``rules/alerting.go``, over the window store.

Runs in the aggregator, which calls :meth:`RuleEngine.evaluate` every ``eval_interval_s``.
It decides, per rule and per group of series, whether an alert is inactive, pending,
firing or resolved, and which alerts are (re-)sent, exactly as Prometheus does:
``keep_firing_for`` counts from the first evaluation without a match; an alert is
re-sent when ``last_sent + resend_delay`` is *before* now; ``starts_at`` of a message is
the time the alert fired (Prometheus' ``FiredAt``); ``ends_at`` is
``now + 4 * max(group interval, resend delay)`` while firing and the resolve time once
resolved.

Where this differs from Prometheus, on purpose: :meth:`RuleEngine.reload` demotes a
firing alert to pending when its rule's ``for`` was raised above the time it has been
active (Prometheus keeps it firing); alerts of rules that were removed, or whose
``expr`` changed, are dropped, as Prometheus does.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Protocol
from urllib.parse import urlencode

from ray_monitor.alerting.message import AlertMessage
from ray_monitor.alerting.model import AlertRule, RuleGroup, RuleSet
from ray_monitor.alerting.templates import go_float
from ray_monitor.common import catalog

__all__ = ["ActiveAlert", "EvalError", "EvalResult", "GroupKey", "RuleEngine", "Source"]

#: One group of series: its ``by`` labels as (name, value) pairs, sorted by name.
GroupKey = tuple[tuple[str, str], ...]


class Source(Protocol):
    """Where rule queries get their numbers: the window store."""

    def evaluate(self, query: catalog.Query, now: float) -> dict[GroupKey, float]:
        """Value per group (labels restricted to ``query.by``); a group with no data is absent."""


@dataclass
class ActiveAlert:
    """One alert of one rule for one group of series, as the state machine holds it."""

    group: str
    rule: str
    key: GroupKey
    state: str  # "pending" | "firing" | "resolved"
    labels: dict[str, str]
    annotations: dict[str, str]
    value: float
    active_at: float
    fired_at: Optional[float] = None
    resolved_at: Optional[float] = None
    last_sent_at: Optional[float] = None
    keep_firing_since: Optional[float] = None
    valid_until: Optional[float] = None
    scale: Optional[dict] = None  # the rule's scale action, rendered for this group


@dataclass(frozen=True)
class EvalError:
    group: str
    rule: str
    message: str


@dataclass
class EvalResult:
    now: float
    evaluated_groups: list[str]
    alerts: list[ActiveAlert]  # every alert held after this evaluation (copies)
    to_send: list[AlertMessage]
    errors: list[EvalError] = field(default_factory=list)  # rules whose query raised


def _needs_sending(a: ActiveAlert, now: float, resend_delay_s: float) -> bool:
    """Prometheus' ``needsSending``: never pending; resolved once; otherwise every resend delay."""
    if a.state == "pending":
        return False
    if a.resolved_at is not None and (a.last_sent_at is None or a.resolved_at > a.last_sent_at):
        return True
    return a.last_sent_at is None or a.last_sent_at + resend_delay_s < now


def _json_float(v: Optional[float]):
    return v if v is None or math.isfinite(v) else go_float(v)


def _from_json_float(v) -> Optional[float]:
    return float(v.replace("+Inf", "inf")) if isinstance(v, str) else v


class RuleEngine:
    """The alert state machine of Prometheus' ``rules/alerting.go``, over a :class:`Source`.

    Call :meth:`evaluate` every ``eval_interval_s``; each group runs when its interval
    is due. Not thread-safe: the aggregator calls it from one loop.
    """

    def __init__(self, *, rules: RuleSet, clock: Callable[[], float] = time.time,
                 eval_interval_s: float = 1.0, resend_delay_s: float = 60.0,
                 resolved_retention_s: float = 900.0, generator_url: str = "",
                 restore_grace_s: float = 600.0):
        if not isinstance(rules, RuleSet):
            raise TypeError(f"rules must be a RuleSet from load_rules, not {type(rules).__name__}")
        for name, v in (("eval_interval_s", eval_interval_s), ("resend_delay_s", resend_delay_s),
                        ("resolved_retention_s", resolved_retention_s)):
            if not v > 0:
                raise ValueError(f"{name} must be above 0, got {v!r}")
        self._clock = clock
        self.eval_interval_s = float(eval_interval_s)
        self.resend_delay_s = float(resend_delay_s)
        self.resolved_retention_s = float(resolved_retention_s)
        # After a restore the windows are empty: a rule is held as it was until it has
        # seen its own window of new data (at most restore_grace_s, like Prometheus'
        # for-grace-period), instead of reading "no data" as "resolved".
        self.restore_grace_s = float(restore_grace_s)
        self._restored_at: Optional[float] = None
        self.generator_url = generator_url
        self._ruleset = rules
        self._alerts: dict[tuple[str, str], dict[GroupKey, ActiveAlert]] = {}
        self._next_due: dict[str, float] = {}

    @property
    def ruleset(self) -> RuleSet:
        return self._ruleset

    def _interval(self, group: RuleGroup) -> float:
        return group.interval_s or self.eval_interval_s

    def _due(self, group: RuleGroup, now: float) -> bool:
        due = self._next_due.get(group.name)
        # Half a tick of slack so a caller's timer firing a little early skips nothing.
        return due is None or now >= due - min(self.eval_interval_s, self._interval(group)) / 2

    def evaluate(self, source: Source, now: Optional[float] = None) -> EvalResult:
        now = self._clock() if now is None else now
        evaluated, to_send, errors = [], [], []
        for group in self._ruleset.groups:
            if not self._due(group, now):
                continue
            interval = self._interval(group)
            due = self._next_due.get(group.name, now) + interval
            self._next_due[group.name] = due if due > now else now + interval
            evaluated.append(group.name)
            for rule in group.rules:
                alerts = self._alerts.setdefault((group.name, rule.name), {})
                if self._warming(rule, now):
                    to_send.extend(self._send(rule, alerts, now, interval))
                    continue
                try:
                    matched = self._query(rule, source, now)
                except Exception as exc:  # a failing query leaves its alerts as they were
                    errors.append(EvalError(group.name, rule.name, f"{type(exc).__name__}: {exc}"))
                else:
                    self._step(group.name, rule, alerts, matched, now)
                to_send.extend(self._send(rule, alerts, now, interval))
        return EvalResult(now, evaluated, self.alerts(), to_send, errors)

    def _warming(self, rule: AlertRule, now: float) -> bool:
        if self._restored_at is None:
            return False
        window = max(c.query.window_s for c in rule.conditions)
        return now - self._restored_at < min(window, self.restore_grace_s)

    @staticmethod
    def _query(rule: AlertRule, source: Source, now: float) -> dict[GroupKey, float]:
        result: Optional[dict[GroupKey, float]] = None
        for cond in rule.conditions:
            values = source.evaluate(cond.query, now)
            held = {k: v for k, v in values.items() if cond.holds(v)}
            # ``and`` keeps the groups present on every side, with the first side's value.
            result = held if result is None else {k: v for k, v in result.items() if k in held}
        return result or {}

    def _step(self, group: str, rule: AlertRule, alerts: dict[GroupKey, ActiveAlert],
              matched: dict[GroupKey, float], now: float) -> None:
        for key, value in matched.items():
            series = dict(key)
            annotations = {k: t.render(value, series) for k, t in rule.annotations.items()}
            scale = rule.scale.render(value, series) if rule.scale else None
            a = alerts.get(key)
            if a is not None and a.state != "resolved":
                a.value, a.annotations, a.scale = value, annotations, scale
                a.labels = self._labels(rule, key)
                continue
            alerts[key] = ActiveAlert(
                group=group, rule=rule.name, key=key, state="pending", labels=self._labels(rule, key),
                annotations=annotations, value=value, active_at=now, scale=scale)
        for key, a in list(alerts.items()):
            if key not in matched:
                keep_firing = False
                if a.state == "firing" and rule.keep_firing_for_s > 0:
                    if a.keep_firing_since is None:
                        a.keep_firing_since = now
                    keep_firing = now - a.keep_firing_since < rule.keep_firing_for_s
                if a.state == "pending" or (
                        a.resolved_at is not None and now - a.resolved_at > self.resolved_retention_s):
                    del alerts[key]
                    continue
                if not keep_firing:
                    if a.state != "resolved":
                        a.state, a.resolved_at = "resolved", now
                    continue
            else:
                a.keep_firing_since = None
            if a.state == "pending" and now - a.active_at >= rule.for_s:
                a.state, a.fired_at = "firing", now

    @staticmethod
    def _labels(rule: AlertRule, key: GroupKey) -> dict[str, str]:
        return {**dict(key), **rule.labels, "alertname": rule.name}

    def _send(self, rule: AlertRule, alerts: dict[GroupKey, ActiveAlert], now: float,
              interval: float) -> list[AlertMessage]:
        out = []
        url = (f"{self.generator_url}?{urlencode({'expr': rule.expr})}"
               if self.generator_url else "")
        for a in alerts.values():
            if not _needs_sending(a, now, self.resend_delay_s):
                continue
            a.last_sent_at = now
            # Valid for four sends, so two lost evaluations or sends do not resolve it.
            a.valid_until = now + 4 * max(interval, self.resend_delay_s)
            out.append(AlertMessage(
                labels=dict(a.labels), annotations=dict(a.annotations),
                # Prometheus sends FiredAt as startsAt (what Alertmanager shows as "since").
                starts_at=a.fired_at if a.fired_at is not None else a.active_at,
                ends_at=a.resolved_at if a.state == "resolved" else a.valid_until,
                status="resolved" if a.state == "resolved" else "firing",
                generator_url=url, value=a.value))
        return out

    def alerts(self) -> list[ActiveAlert]:
        """Copies of every alert held: pending, firing, and resolved within retention."""
        out = []
        for alerts in self._alerts.values():
            for a in alerts.values():
                out.append(dataclasses.replace(a, labels=dict(a.labels),
                                               annotations=dict(a.annotations)))
        return out

    def alert_series(self) -> list[tuple[dict[str, str], str]]:
        """``ALERTS``: (labels, state) of every pending and firing alert."""
        return [(dict(a.labels), a.state) for alerts in self._alerts.values()
                for a in alerts.values() if a.state in ("pending", "firing")]

    # ------------------------------------------------------------ reload, persistence

    def _demote(self, rule: AlertRule, a: ActiveAlert, now: float) -> None:
        if a.state == "firing" and now - a.active_at < rule.for_s:
            a.state, a.fired_at, a.keep_firing_since = "pending", None, None

    def reload(self, ruleset: RuleSet, now: Optional[float] = None) -> None:
        """Swap in new rules; alerts of rules with the same group, name and expr carry over."""
        if not isinstance(ruleset, RuleSet):
            raise TypeError(f"reload takes a RuleSet from load_rules, not {type(ruleset).__name__}")
        now = self._clock() if now is None else now
        old = {(g.name, r.name): r for g, r in self._ruleset.rules()}
        old_intervals = {g.name: g.interval_s for g in self._ruleset.groups}
        kept: dict[tuple[str, str], dict[GroupKey, ActiveAlert]] = {}
        for group, rule in ruleset.rules():
            ident = (group.name, rule.name)
            prev = old.get(ident)
            if prev is None or prev.expr != rule.expr or ident not in self._alerts:
                continue
            kept[ident] = self._alerts[ident]
            for key, a in kept[ident].items():
                a.labels = self._labels(rule, key)
                self._demote(rule, a, now)
        self._alerts = kept
        self._next_due = {g.name: self._next_due[g.name] for g in ruleset.groups
                          if g.name in self._next_due and old_intervals.get(g.name, -1) == g.interval_s}
        self._ruleset = ruleset

    def state_dict(self) -> dict:
        """Alert state as JSON-serialisable data, for :meth:`restore` after a restart."""
        exprs = {(g.name, r.name): r.expr for g, r in self._ruleset.rules()}
        entries = []
        for (group, rule), alerts in self._alerts.items():
            for a in alerts.values():
                entries.append({
                    "group": group, "rule": rule, "expr": exprs.get((group, rule), ""),
                    "key": [list(p) for p in a.key], "labels": dict(a.labels),
                    "annotations": dict(a.annotations), "state": a.state,
                    "value": _json_float(a.value), "active_at": a.active_at,
                    "fired_at": a.fired_at, "resolved_at": a.resolved_at,
                    "last_sent_at": a.last_sent_at, "keep_firing_since": a.keep_firing_since,
                    "valid_until": a.valid_until})
        return {"version": 1, "alerts": entries}

    def restore(self, state: Mapping, now: Optional[float] = None) -> None:
        """Replace the alert state with ``state`` from :meth:`state_dict`.

        Alerts of rules that no longer exist (or whose expr changed) are ignored; a
        firing alert stays firing and is not re-sent before its resend time.
        """
        if not isinstance(state, Mapping) or state.get("version") != 1:
            raise ValueError("not a rule engine state (expected the dict from state_dict(), version 1)")
        now = self._clock() if now is None else now
        rules = {(g.name, r.name): r for g, r in self._ruleset.rules()}
        restored: dict[tuple[str, str], dict[GroupKey, ActiveAlert]] = {}
        for e in state.get("alerts", []):
            rule = rules.get((e["group"], e["rule"]))
            if rule is None or rule.expr != e["expr"]:
                continue
            if e["resolved_at"] is not None and now - e["resolved_at"] > self.resolved_retention_s:
                continue
            key: GroupKey = tuple((k, v) for k, v in e["key"])
            a = ActiveAlert(
                group=e["group"], rule=rule.name, key=key, state=e["state"], labels=self._labels(rule, key),
                annotations=dict(e["annotations"]), value=_from_json_float(e["value"]),
                active_at=e["active_at"], fired_at=e["fired_at"], resolved_at=e["resolved_at"],
                last_sent_at=e["last_sent_at"], keep_firing_since=e["keep_firing_since"],
                valid_until=e.get("valid_until"))
            self._demote(rule, a, now)
            restored.setdefault((e["group"], e["rule"]), {})[key] = a
        self._alerts = restored
        self._restored_at = now
