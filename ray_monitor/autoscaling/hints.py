"""Autoscaling hints: how many replicas each deployment should have, and why.

Runs in the aggregator, which calls :meth:`HintEngine.update` after every rule
evaluation; Serve's controller (:mod:`~ray_monitor.autoscaling.policy`) and the external
scaler (:mod:`~ray_monitor.autoscaling.external`) act on the result. Two sources
recommend a replica count per deployment, and the larger wins:

1. ``scale`` actions of *firing* alerts: ``current + step`` or ``ceil(current * factor)``,
   applied at most once per cooldown per deployment. The count reached is held while an
   alert keeps firing, so the next step comes only after the cooldown and adds to what is
   running (not to what was asked), which keeps a cluster without room from escalating.
2. Target tracking, as Kubernetes' HPA: ``ceil(current * value / target)``, no change while
   ``|value / target - 1| <= tolerance``. A target without data recommends nothing, and
   blocks a scale-down asked by the other targets (HPA does the same). A ``per_replica``
   target's value is the deployment's total divided by ``current``, so it recommends
   ``ceil(total / target)`` (Serve's ``target_ongoing_requests`` rule).

Scale-down is stabilized: the desired count is the highest recommendation of the last
``scale_down_stabilization`` seconds (scale-up is immediate), then bounded by
``min_replicas``/``max_replicas``. When nothing recommends anything (no firing action, no
target data, nothing in the window) ``desired`` is ``None``: the hint asks for nothing,
the Serve policy follows Serve's own decision and the external scaler is not called.

The configuration is the ``autoscaling:`` section of the rule file
(:mod:`ray_monitor.autoscaling.config`), checked when the file is read.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

from ray_monitor.alerting.expr import did_you_mean
from ray_monitor.autoscaling.config import (DeploymentKey, DeploymentScaling, HintConfig, Target,
                                            is_number)
from ray_monitor.common import catalog
from ray_monitor.common.durations import format_duration

__all__ = ["Hint", "HintEngine", "validate_against"]

logger = logging.getLogger(__name__)

GroupKey = tuple[tuple[str, str], ...]


def validate_against(config: HintConfig, known_deployments: Iterable[DeploymentKey], *,
                     ruleset=None) -> list[str]:
    """Problems with deployments that do not exist, for the aggregator or CLI to report.

    ``known_deployments`` are ``(application, deployment)`` pairs. With ``ruleset`` (a
    :class:`~ray_monitor.alerting.model.RuleSet`), scale actions naming a fixed deployment are
    checked too. Deployments may come after the rules, so this is a report, not a refusal.
    """
    known = {(str(a), str(d)) for a, d in known_deployments}
    names = sorted({d for _, d in known})
    listing = ", ".join(f"{a}/{d}" for a, d in sorted(known)) or "none"
    out = []
    for i, spec in enumerate(config.deployments):
        found = any(d == spec.deployment and (spec.application is None or a == spec.application)
                    for a, d in known)
        if not found:
            what = f"deployment {spec.deployment!r}" + (
                f" of application {spec.application!r}" if spec.application else "")
            elsewhere = sorted(a for a, d in known if d == spec.deployment)
            # The name runs, in another application: suggesting the same name helps nobody.
            hint = (f" (a deployment of that name runs in application(s) {', '.join(elsewhere)};"
                    f" check autoscaling.deployments[{i}].application)" if elsewhere
                    else did_you_mean(spec.deployment, names, aside=True))
            out.append(f"autoscaling.deployments[{i}]: {what} is not running{hint}; "
                       f"running deployments: {listing}")
    if ruleset is not None:
        for group, rule in ruleset.rules():
            scale = rule.scale
            if scale is None or any(kind != "text" for kind, _ in scale.deployment.parts):
                continue
            if scale.deployment.text not in names:
                out.append(f"group {group.name!r}, rule {rule.name!r}: scale.deployment "
                           f"{scale.deployment.text!r} is not running"
                           f"{did_you_mean(scale.deployment.text, names, aside=True)}; "
                           f"running deployments: {listing}")
    return out


# ----------------------------------------------------------------------------- hints


@dataclass
class Hint:
    """What the monitor asks for one deployment; ``desired`` None asks for nothing."""

    application: str
    deployment: str
    current: int
    desired: Optional[int]
    reason: str  # rule | target | stabilization | min_replicas | max_replicas | no_data
    reasons: list[dict] = field(default_factory=list)
    updated_at: float = 0.0
    apply: str = "policy"

    @property
    def direction(self) -> str:
        if self.desired is None or self.desired == self.current:
            return "none"
        return "up" if self.desired > self.current else "down"

    def to_dict(self) -> dict:
        """The JSON shape of ``/api/v1/hints`` and of ``Aggregator.hints()``."""
        return {"application": self.application, "deployment": self.deployment,
                "current": self.current, "desired": self.desired, "direction": self.direction,
                "reason": self.reason, "reasons": [dict(r) for r in self.reasons],
                "updated_at": self.updated_at, "apply": self.apply}


@dataclass
class _State:
    history: list[tuple[float, int]] = field(default_factory=list)  # (time, raw), decreasing
    last_step_at: Optional[float] = None
    rule_desired: Optional[int] = None  # held while a scale action's alert fires
    desired: Optional[int] = None  # the last published, to log changes
    seen_at: float = 0.0


def _ceil(x: float) -> int:
    # Rounded first so that 3 * (0.6 / 0.3) = 5.999...9 does not become 6 + 1 by noise.
    return math.ceil(round(x, 9))


def _finite(v: Any) -> Optional[float]:
    return float(v) if is_number(v) else None


class HintEngine:
    """Desired replicas per deployment from scale actions and targets; see the module doc.

    Not thread-safe: the aggregator calls it from its evaluation loop.
    """

    def __init__(self, *, config: HintConfig, clock: Callable[[], float] = time.time):
        if not isinstance(config, HintConfig):
            raise TypeError(f"config must be a HintConfig from load_rule_file(...).autoscaling, "
                            f"not {type(config).__name__}")
        self.config = config
        self._clock = clock
        self._state: dict[DeploymentKey, _State] = {}
        self._hints: list[Hint] = []
        self._bad_queries: set[str] = set()
        #: Decisions made, one per deployment per update: (application, deployment,
        #: direction up|down|none, reason) -> count.
        self.decisions: dict[tuple[str, str, str, str], int] = {}

    def reload(self, config: HintConfig) -> None:
        """Swap the configuration; histories and cooldowns carry over."""
        if not isinstance(config, HintConfig):
            raise TypeError(f"config must be a HintConfig, not {type(config).__name__}")
        self.config = config

    def hints(self) -> list[Hint]:
        """The hints of the last :meth:`update`."""
        return list(self._hints)

    def _spec(self, key: DeploymentKey) -> DeploymentScaling:
        return self.config.find(*key) or DeploymentScaling(deployment=key[1])

    def update(self, now: Optional[float] = None, *, current_replicas: Mapping[DeploymentKey, int],
               firing: Iterable[Any], query: Callable[[catalog.Query, float], Mapping]) -> list[Hint]:
        """One hint per deployment of ``current_replicas`` (running replicas per
        ``(application, deployment)``).

        ``firing``: alerts with ``.state``, ``.scale`` (the rendered action: deployment,
        step or factor, cooldown_s, optionally application) and ``.labels``; only firing
        ones with an action count. ``query``: the window store's ``evaluate``.
        """
        now = self._clock() if now is None else now
        actions: dict[DeploymentKey, list] = {}
        for a in firing:
            scale = getattr(a, "scale", None)
            if getattr(a, "state", None) != "firing" or not scale or not scale.get("deployment"):
                continue
            labels = getattr(a, "labels", None) or {}
            app = scale.get("application") or labels.get("application")
            for key in current_replicas:
                if key[1] == scale["deployment"] and (app is None or key[0] == app):
                    actions.setdefault(key, []).append(a)
        results: dict[catalog.Query, Mapping] = {}
        for key in current_replicas:
            for t in self._spec(key).targets:
                if t.query not in results:
                    results[t.query] = self._query(query, t, now)
        hints = [self._decide(key, int(current_replicas[key]), actions.get(key, []), results, now)
                 for key in sorted(current_replicas)]
        self._forget(now, current_replicas)
        self._hints = hints
        return list(hints)

    def _query(self, query, target: Target, now: float) -> Mapping:
        try:
            return query(target.query, now)
        except Exception as exc:  # a failing query is missing data: never scale on it
            if target.metric not in self._bad_queries:
                self._bad_queries.add(target.metric)
                logger.warning("ray-monitor hints: target query %s failed, treated as no data: "
                               "%s: %s (logged once)", target.metric, type(exc).__name__, exc)
            return {}

    def _decide(self, key: DeploymentKey, current: int, alerts: list, results: dict,
                now: float) -> Hint:
        spec = self._spec(key)
        st = self._state.setdefault(key, _State())
        st.seen_at = now
        reasons: list[dict] = []
        rule_rec = self._rules(st, spec, current, alerts, reasons, now)
        target_rec = self._targets(spec, key, current, results, reasons)
        recs = [r for r in (rule_rec, target_rec) if r is not None]
        raw = max(recs) if recs else None
        if raw is not None:
            # A sliding-window maximum: an entry at or below a newer one can never be the
            # highest again, so the history stays a short decreasing run.
            while st.history and st.history[-1][1] <= raw:
                st.history.pop()
            st.history.append((now, raw))
        st.history = [(t, n) for t, n in st.history
                      if now - t < spec.scale_down_stabilization_s or t == now]
        held = st.history[0][1] if st.history else None
        if held is None:
            desired, reason = None, "no_data"
        else:
            if raw == held:
                reason = "rule" if raw == rule_rec else "target"
            else:
                reason = "stabilization"
                reasons.append({"source": "stabilization", "desired": held,
                                "window_s": spec.scale_down_stabilization_s})
            desired = max(held, spec.min_replicas)
            if spec.max_replicas is not None:
                desired = min(desired, spec.max_replicas)
            if desired > held:
                reason = "min_replicas"
            elif desired < held:
                reason = "max_replicas"
        hint = Hint(application=key[0], deployment=key[1], current=current, desired=desired,
                    reason=reason, reasons=reasons, updated_at=now, apply=spec.apply)
        dkey = (key[0], key[1], hint.direction, reason)
        self.decisions[dkey] = self.decisions.get(dkey, 0) + 1
        if desired != st.desired:
            logger.info("ray-monitor hint for %s/%s: desired %s -> %s (current %d, %s): %s",
                        key[0], key[1], _show(st.desired), _show(desired), current, reason,
                        _explain(reasons))
            st.desired = desired
        return hint

    @staticmethod
    def _rules(st: _State, spec: DeploymentScaling, current: int, alerts: list,
               reasons: list[dict], now: float) -> Optional[int]:
        if not alerts:
            st.rule_desired = None  # the window still holds what it asked for
            return None
        step_to = None
        for a in alerts:
            scale = a.scale
            cooldown = scale.get("cooldown_s")
            cooldown = spec.cooldown_s if cooldown is None else cooldown
            if st.last_step_at is not None and now - st.last_step_at < cooldown:
                continue
            if scale.get("step") is not None:
                n = current + int(scale["step"])
            else:
                n = max(1, _ceil(current * float(scale["factor"])))  # from zero, one replica
            step_to = n if step_to is None else max(step_to, n)
        if step_to is not None:
            st.rule_desired = max(st.rule_desired or 0, step_to)
            st.last_step_at = now
        for a in alerts:
            r = {"source": "rule", "name": a.labels.get("alertname", getattr(a, "rule", "")),
                 "value": _finite(getattr(a, "value", None)), "desired": st.rule_desired}
            for k in ("step", "factor"):
                if a.scale.get(k) is not None:
                    r[k] = a.scale[k]
            reasons.append(r)
        return st.rule_desired

    @staticmethod
    def _targets(spec: DeploymentScaling, key: DeploymentKey, current: int, results: dict,
                 reasons: list[dict]) -> Optional[int]:
        group: GroupKey = (("application", key[0]), ("deployment", key[1]))
        recs, missing = [], False
        for t in spec.targets:
            value = _finite(results.get(t.query, {}).get(group))
            n = None
            if t.per_replica and value is not None:
                value = value / current if current > 0 else None
            if value is not None and current > 0:  # a ratio of zero replicas is still zero
                ratio = value / t.value
                n = current if abs(ratio - 1) <= spec.tolerance else _ceil(current * ratio)
                recs.append(n)
            else:
                missing = True
            reasons.append({"source": "target", "metric": t.metric, "value": value,
                            "target": t.value, "desired": n,
                            **({"per_replica": True} if t.per_replica else {})})
        if not recs:
            return None
        rec = max(recs)
        # HPA: a target without data may not let the others scale down.
        return current if missing and rec < current else rec

    def _forget(self, now: float, present: Mapping) -> None:
        for key in list(self._state):
            if key in present:
                continue
            spec = self._spec(key)
            if now - self._state[key].seen_at > max(spec.scale_down_stabilization_s, spec.cooldown_s):
                del self._state[key]

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict:
        """Histories and cooldowns as JSON data, so a restart neither scales down early
        nor steps again inside a cooldown."""
        return {"version": 1, "deployments": [
            {"application": a, "deployment": d, "history": [[t, n] for t, n in st.history],
             "last_step_at": st.last_step_at, "rule_desired": st.rule_desired,
             "desired": st.desired, "seen_at": st.seen_at}
            for (a, d), st in sorted(self._state.items())]}

    def restore(self, state: Mapping) -> None:
        """Replace the state with ``state`` from :meth:`state_dict`."""
        if not isinstance(state, Mapping) or state.get("version") != 1:
            raise ValueError("not a hint engine state (expected the dict from state_dict(), version 1)")
        restored = {}
        for e in state.get("deployments", []):
            restored[(e["application"], e["deployment"])] = _State(
                history=[(float(t), int(n)) for t, n in e.get("history", [])],
                last_step_at=e.get("last_step_at"), rule_desired=e.get("rule_desired"),
                desired=e.get("desired"), seen_at=float(e.get("seen_at", 0.0)))
        self._state = restored


def _show(n: Optional[int]) -> str:
    return "none" if n is None else str(n)


def _explain(reasons: list[dict]) -> str:
    parts = []
    for r in reasons:
        if r["source"] == "rule":
            how = f"step {r['step']}" if "step" in r else f"factor {r.get('factor')}"
            parts.append(f"rule {r['name']} firing ({how})")
        elif r["source"] == "target":
            v = "no data" if r["value"] is None else f"{r['value']:.4g}"
            each = " per replica" if r.get("per_replica") else ""
            parts.append(f"target {r['metric']}{each} = {v} (target {r['target']:g})")
        else:
            parts.append(f"highest of the last {format_duration(r['window_s'])}")
    return "; ".join(parts) or "nothing to go on"
