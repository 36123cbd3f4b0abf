"""Autoscaling hints: how many replicas each deployment should have, and why.

The aggregator calls :meth:`HintEngine.update` after every rule evaluation. Two sources
recommend a replica count per deployment, and the larger wins:

1. ``scale`` actions of *firing* alerts: ``current + step`` or ``ceil(current * factor)``,
   applied at most once per cooldown per deployment. The count reached is held while an
   alert keeps firing, so the next step comes only after the cooldown and adds to what is
   running (not to what was asked), which keeps a cluster without room from escalating.
2. Target tracking, as Kubernetes' HPA: ``ceil(current * value / target)``, no change while
   ``|value / target - 1| <= tolerance``. A target without data recommends nothing, and
   blocks a scale-down asked by the other targets (HPA does the same).

Scale-down is stabilized: the desired count is the highest recommendation of the last
``scale_down_stabilization`` seconds (scale-up is immediate), then bounded by
``min_replicas``/``max_replicas``. When nothing recommends anything (no firing action, no
target data, nothing in the window) ``desired`` is ``None``: the hint asks for nothing,
the Serve policy follows Serve's own decision and the external scaler is not called.

Configuration is the optional top-level ``autoscaling:`` section of the rule file::

    autoscaling:
      deployments:
        - application: app1          # optional; any application when absent
          deployment: Classifier
          min_replicas: 1             # default 1
          max_replicas: 8             # default: no bound of ours (Serve's max applies)
          cooldown: 30s               # between two scale-ups by scale actions
          scale_down_stabilization: 300s
          tolerance: 0.1
          targets:
            - metric: p95(latency_seconds[30s])   # by (application, deployment) is implied
              value: 0.2
            - gpu_utilization: 0.8                # any gauge: avg(METRIC[1m])
          apply: policy               # or external (Serve's external scaler endpoint)

Deployments that scale actions name without an entry get the defaults above.
"""

from __future__ import annotations

import difflib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import yaml

from ray_monitor.common import catalog
from ray_monitor.alerting.rules import parse_expr
from ray_monitor.common.durations import format_duration, parse_duration

__all__ = [
    "DeploymentScaling", "Hint", "HintConfig", "HintConfigError", "HintEngine", "Target",
    "load_hint_config", "parse_hint_config", "validate_against",
]

logger = logging.getLogger("ray_monitor.autoscaling.hints")

BY = ("application", "deployment")
DEFAULT_COOLDOWN_S = 30.0
DEFAULT_STABILIZATION_S = 300.0
DEFAULT_TOLERANCE = 0.1
#: Window of the ``{METRIC: value}`` shorthand for gauge targets.
SHORTHAND_WINDOW = "1m"
APPLY_MODES = ("policy", "external")

_TOP_KEYS = ("deployments",)
_DEPLOYMENT_KEYS = ("application", "deployment", "min_replicas", "max_replicas", "cooldown",
                    "scale_down_stabilization", "tolerance", "targets", "apply")
_TARGET_KEYS = ("metric", "value")

GroupKey = tuple[tuple[str, str], ...]
DeploymentKey = tuple[str, str]  # (application, deployment)


class HintConfigError(ValueError):
    """An ``autoscaling:`` section that cannot be used; ``problems`` lists every problem.

    ``field`` is the path of the first problem, like ``autoscaling.deployments[0].max_replicas``.
    """

    def __init__(self, problems: list[str], *, file: str = "<rules>",
                 fields: Optional[list[str]] = None):
        self.problems = list(problems)
        self.file = file
        self.field = (fields or [None])[0]
        if len(self.problems) == 1:
            text = f"{file}: {self.problems[0]}"
        else:
            text = f"{len(self.problems)} problems in the autoscaling section of {file}:\n" + \
                "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


@dataclass(frozen=True)
class Target:
    """Track ``query`` at ``value``; ``metric`` is the query as the user wrote it."""

    metric: str
    query: catalog.Query
    value: float


@dataclass(frozen=True)
class DeploymentScaling:
    deployment: str
    application: Optional[str] = None  # None: any application
    min_replicas: int = 1
    max_replicas: Optional[int] = None  # None: no bound of ours
    cooldown_s: float = DEFAULT_COOLDOWN_S
    scale_down_stabilization_s: float = DEFAULT_STABILIZATION_S
    tolerance: float = DEFAULT_TOLERANCE
    targets: tuple[Target, ...] = ()
    apply: str = "policy"


@dataclass(frozen=True)
class HintConfig:
    deployments: tuple[DeploymentScaling, ...] = ()

    def find(self, application: str, deployment: str) -> Optional[DeploymentScaling]:
        """The entry for a deployment: one naming its application first, then one naming none."""
        fallback = None
        for d in self.deployments:
            if d.deployment != deployment:
                continue
            if d.application == application:
                return d
            if d.application is None:
                fallback = d
        return fallback


# ---------------------------------------------------------------------------- loading


def load_hint_config(source: Union[str, Path, Mapping, None], *,
                     filename: Optional[str] = None) -> HintConfig:
    """The ``autoscaling:`` section of a rule file (a path, YAML text or a parsed dict).

    A file without the section gives an empty config. Raises :class:`HintConfigError`.
    """
    file = filename or "<rules>"
    if source is None or isinstance(source, Mapping):
        data = source
    elif isinstance(source, Path) or (isinstance(source, str) and "\n" not in source
                                      and source.endswith((".yaml", ".yml"))):
        file = filename or str(source)
        try:
            data = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise HintConfigError([f"cannot read the rule file: {exc}"], file=file) from None
    elif isinstance(source, str):
        try:
            data = yaml.safe_load(source)
        except yaml.YAMLError as exc:
            raise HintConfigError([f"YAML syntax error: {exc}"], file=file) from None
    else:
        raise TypeError(f"load_hint_config takes a path, a YAML string or a dict, "
                        f"not {type(source).__name__}")
    section = data.get("autoscaling") if isinstance(data, Mapping) else None
    return parse_hint_config(section, file=file)


def parse_hint_config(section: Optional[Mapping], *, file: str = "<rules>") -> HintConfig:
    """Check the value of the ``autoscaling:`` key; ``None`` gives an empty config."""
    problems: list[tuple[str, str]] = []

    def add(path: str, message: str) -> None:
        problems.append((path, message))

    if section is None:
        return HintConfig()
    if not isinstance(section, Mapping):
        add("autoscaling", "must be a mapping with a 'deployments' list")
    else:
        for key in section:
            if key not in _TOP_KEYS:
                add(f"autoscaling.{key}", f"unknown key {key!r}; the section holds only 'deployments'")
        raw = section.get("deployments", [])
        if not isinstance(raw, list):
            add("autoscaling.deployments", "must be a list of deployments, each with at least "
                "'deployment: NAME'")
            raw = []
        out, seen = [], set()
        for i, entry in enumerate(raw):
            spec = _parse_deployment(entry, f"autoscaling.deployments[{i}]", add)
            if spec is None:
                continue
            ident = (spec.application, spec.deployment)
            if ident in seen:
                add(f"autoscaling.deployments[{i}]", f"deployment {spec.deployment!r}"
                    + (f" of application {spec.application!r}" if spec.application else "")
                    + " is listed twice; keep one entry")
            seen.add(ident)
            out.append(spec)
    if problems:
        raise HintConfigError([f"field {p!r}: {m}" for p, m in problems], file=file,
                              fields=[p for p, _ in problems])
    return HintConfig(tuple(out))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_deployment(raw: Any, path: str, add) -> Optional[DeploymentScaling]:
    if not isinstance(raw, Mapping):
        add(path, "must be a mapping like {deployment: Classifier, max_replicas: 8}")
        return None
    errors: list[str] = []

    def bad(key: str, message: str) -> None:
        errors.append(key)
        add(f"{path}.{key}", message)

    for key in raw:
        if key not in _DEPLOYMENT_KEYS:
            hint = " (a list: targets: [{metric: ..., value: ...}])" if key == "target" else \
                _close(str(key), _DEPLOYMENT_KEYS)
            bad(str(key), f"unknown key {key!r}{hint}; use {', '.join(_DEPLOYMENT_KEYS)}")
    dep = raw.get("deployment")
    if not isinstance(dep, str) or not dep:
        bad("deployment", "missing; name the Serve deployment, like deployment: Classifier")
    app = raw.get("application")
    if app is not None and (not isinstance(app, str) or not app):
        bad("application", "must be the Serve application's name, or left out to match any")
    lo, hi = raw.get("min_replicas", 1), raw.get("max_replicas")
    if isinstance(lo, bool) or not isinstance(lo, int) or lo < 0:
        bad("min_replicas", f"{lo!r} must be a whole number of replicas, 0 or more")
        lo = None
    if hi is not None and (isinstance(hi, bool) or not isinstance(hi, int) or hi < 1):
        bad("max_replicas", f"{hi!r} must be a whole number of replicas, 1 or more")
        hi = None
    if lo is not None and hi is not None and lo > hi:
        bad("min_replicas", f"min_replicas {lo} is above max_replicas {hi}; "
            "raise max_replicas or lower min_replicas")
    durations = {}
    for key, default in (("cooldown", DEFAULT_COOLDOWN_S),
                         ("scale_down_stabilization", DEFAULT_STABILIZATION_S)):
        durations[key] = default
        if key in raw:
            try:
                durations[key] = parse_duration(raw[key])
            except ValueError as exc:
                bad(key, str(exc))
    tol = raw.get("tolerance", DEFAULT_TOLERANCE)
    if not _is_number(tol) or not 0 <= tol < 1:
        bad("tolerance", f"{tol!r} must be a number from 0 to below 1, like 0.1 (10%)")
    apply = raw.get("apply", "policy")
    if apply not in APPLY_MODES:
        bad("apply", f"{apply!r} is not a way to apply hints; use policy (the Serve autoscaling "
            "policy) or external (Serve's external scaler endpoint)")
    if apply == "external" and hi is None and "max_replicas" not in errors:
        bad("max_replicas", "is needed with apply: external: nothing else bounds the replicas "
            "the external scaler asks for")
    targets = []
    raw_targets = raw.get("targets", [])
    if not isinstance(raw_targets, list):
        bad("targets", "must be a list like [{metric: p95(latency_seconds[30s]), value: 0.2}]")
        raw_targets = []
    for j, t in enumerate(raw_targets):
        target = _parse_target(t, f"{path}.targets[{j}]", add)
        if target is None:
            errors.append("targets")
        else:
            targets.append(target)
    if errors:
        return None
    return DeploymentScaling(
        deployment=dep, application=app, min_replicas=lo, max_replicas=hi,
        cooldown_s=durations["cooldown"],
        scale_down_stabilization_s=durations["scale_down_stabilization"],
        tolerance=float(tol), targets=tuple(targets), apply=apply)


def _close(name: str, choices) -> str:
    near = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _gauges() -> list[str]:
    return [m.name for m in catalog.METRICS.values() if m.kind == "gauge"]


def _parse_target(raw: Any, path: str, add) -> Optional[Target]:
    example = "{metric: p95(latency_seconds[30s]), value: 0.2} or {gpu_utilization: 0.8}"
    if not isinstance(raw, Mapping) or not raw:
        add(path, f"must be a mapping like {example}")
        return None
    if "metric" in raw or "value" in raw:
        unknown = [k for k in raw if k not in _TARGET_KEYS]
        if unknown:
            add(f"{path}.{unknown[0]}", f"unknown key {unknown[0]!r} in a target; use metric and value")
            return None
        text, value, vpath = raw.get("metric"), raw.get("value"), f"{path}.value"
        if not isinstance(text, str) or not text.strip():
            add(f"{path}.metric", f"missing; write a query like p95(latency_seconds[30s]) ({example})")
            return None
    else:
        if len(raw) != 1:
            add(path, "a shorthand target has one key, the gauge's name, like "
                f"{{gpu_utilization: 0.8}}; or write {example}")
            return None
        (name, value), = raw.items()
        vpath = f"{path}.{name}"
        if name not in _gauges():
            add(vpath, f"{name!r} is not a gauge for the shorthand{_close(str(name), _gauges())}; "
                f"use one of {', '.join(_gauges())}, or write {{metric: QUERY, value: N}}")
            return None
        text = f"avg({name}[{SHORTHAND_WINDOW}])"
    ok = True
    if not _is_number(value) or not value > 0:
        add(vpath, f"target value {value!r} must be a number above 0, like 0.2")
        ok = False
    query = _parse_query(text, f"{path}.metric", add)
    if query is None or not ok:
        return None
    return Target(metric=text.strip(), query=query, value=float(value))


def _parse_query(text: str, path: str, add) -> Optional[catalog.Query]:
    """``FUNCTION(METRIC{...}[W])`` through the rule parser, with ``by`` forced to ours."""
    if any(op in text for op in ("<", ">", "==", "!=")) or " and " in f" {text} ":
        add(path, f"{text!r}: a target is a query without a comparison, like "
            "p95(latency_seconds[30s]); the value to hold goes in value:")
        return None
    try:
        (cond,) = parse_expr(f"{text} > 0")
    except ValueError as exc:
        add(path, f"{text!r}: {exc}")
        return None
    q = cond.query
    if catalog.is_model_query(q.function, q.metric):
        add(path, f"{text!r}: model quality and drift are per model, not per replica load, so "
            "they cannot be tracked to a replica count; use an alert rule with a scale action")
        return None
    if q.by is not None and set(q.by) != set(BY):
        add(path, f"{text!r}: targets are tracked per deployment, so by is always "
            "(application, deployment); leave by (...) out")
        return None
    missing = [b for b in BY if b not in catalog.METRICS[q.metric].labels]
    if missing:
        add(path, f"{text!r}: {q.metric!r} has no {', '.join(missing)} label, so it cannot be "
            "tracked per deployment")
        return None
    return catalog.Query(q.function, q.metric, q.window_s, BY, q.matchers, q.param)


def validate_against(config: HintConfig, known_deployments: Iterable[DeploymentKey], *,
                     ruleset=None) -> list[str]:
    """Problems with deployments that do not exist, for the aggregator or CLI to report.

    ``known_deployments`` are ``(application, deployment)`` pairs. With ``ruleset`` (a
    :class:`~ray_monitor.alerting.rules.RuleSet`), scale actions naming a fixed deployment are
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
            out.append(f"autoscaling.deployments[{i}]: {what} is not running"
                       f"{_close(spec.deployment, names)}; running deployments: {listing}")
    if ruleset is not None:
        for group, rule in ruleset.rules():
            scale = rule.scale
            if scale is None or any(kind != "text" for kind, _ in scale.deployment.parts):
                continue
            if scale.deployment.text not in names:
                out.append(f"group {group.name!r}, rule {rule.name!r}: scale.deployment "
                           f"{scale.deployment.text!r} is not running"
                           f"{_close(scale.deployment.text, names)}; running deployments: {listing}")
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
    return float(v) if _is_number(v) else None


class HintEngine:
    """Desired replicas per deployment from scale actions and targets; see the module doc.

    Not thread-safe: the aggregator calls it from its evaluation loop.
    """

    def __init__(self, *, config: HintConfig, clock: Callable[[], float] = time.time):
        if not isinstance(config, HintConfig):
            raise TypeError(f"config must be a HintConfig from load_hint_config, "
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
            if value is not None and current > 0:  # a ratio of zero replicas is still zero
                ratio = value / t.value
                n = current if abs(ratio - 1) <= spec.tolerance else _ceil(current * ratio)
                recs.append(n)
            else:
                missing = True
            reasons.append({"source": "target", "metric": t.metric, "value": value,
                            "target": t.value, "desired": n})
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
            parts.append(f"target {r['metric']} = {v} (target {r['target']:g})")
        else:
            parts.append(f"highest of the last {format_duration(r['window_s'])}")
    return "; ".join(parts) or "nothing to go on"
