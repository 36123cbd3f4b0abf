"""The ``autoscaling:`` section of a rule file, checked completely when the file is read.

Read where the rule file is (through :mod:`ray_monitor.alerting.loader`: CLI, driver,
aggregator on reload); the aggregator's :class:`~ray_monitor.autoscaling.hints.HintEngine`
runs on the result. It decides what an entry may say, and refuses every mistake with
the deployment and the field path named (``autoscaling.deployments[0].max_replicas``):
bounds the wrong way round, a target on an unknown metric or function, a negative or
non-number value, a bad duration. Whether a named deployment runs is not known when
rules are read (they come before ``serve.run``): that is a run-time warning, see
:func:`~ray_monitor.autoscaling.hints.validate_against`.

::

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
            - metric: rate(output_tokens[30s])    # a deployment's total, divided by
              value: 200                          # its running replicas: tokens/s
              per_replica: true                   # per replica, as Serve's targets
          apply: policy               # or external (Serve's external scaler endpoint)

Deployments that scale actions name without an entry get the defaults above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from ray_monitor.alerting.expr import check_expr, did_you_mean
from ray_monitor.common import catalog
from ray_monitor.common.durations import parse_duration
from ray_monitor.common.errors import ConfigError, Problem

__all__ = ["APPLY_MODES", "BY", "PER_REPLICA_FUNCTIONS", "DeploymentKey", "DeploymentScaling", "HintConfig", "Target",
           "is_number", "parse_hint_config"]

#: Targets are tracked per deployment: every target query is grouped by these.
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
_TARGET_KEYS = ("metric", "value", "per_replica")
#: Functions whose value is a deployment's total, which ``per_replica`` may divide.
PER_REPLICA_FUNCTIONS = ("rate", "sum", "count", "last")

DeploymentKey = tuple[str, str]  # (application, deployment)
Add = Callable[[str, str], None]  # (field path, message)


@dataclass(frozen=True)
class Target:
    """Track ``query`` at ``value``; ``metric`` is the query as the user wrote it.

    ``per_replica``: the query's value (a deployment's total) is divided by the replicas
    running before it is compared, as Serve's ``target_ongoing_requests`` is per replica.
    """

    metric: str
    query: catalog.Query
    value: float
    per_replica: bool = False


@dataclass(frozen=True)
class DeploymentScaling:
    """One entry of ``autoscaling.deployments``, checked; defaults as the module doc says."""

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
    """The whole ``autoscaling:`` section; empty when the file has none."""

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


def parse_hint_config(section: Optional[Mapping], *, file: str = "<rules>") -> HintConfig:
    """Check the value of the ``autoscaling:`` key; ``None`` gives an empty config.

    Raises :class:`~ray_monitor.common.errors.ConfigError` with every problem, each
    naming ``file``, the deployment (``#2`` for an entry without a name) and the field.
    """
    problems: list[Problem] = []

    def adder(deployment: Optional[str]) -> Add:
        return lambda path, message: problems.append(
            Problem(file, field=path, message=message, deployment=deployment))

    if section is None:
        return HintConfig()
    out = []
    add = adder(None)
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
        seen = set()
        for i, entry in enumerate(raw):
            name = entry.get("deployment") if isinstance(entry, Mapping) else None
            name = name if isinstance(name, str) and name else f"#{i + 1}"
            spec = _parse_deployment(entry, f"autoscaling.deployments[{i}]", adder(name))
            if spec is None:
                continue
            ident = (spec.application, spec.deployment)
            if ident in seen:
                adder(name)(f"autoscaling.deployments[{i}]", f"deployment {spec.deployment!r}"
                            + (f" of application {spec.application!r}" if spec.application else "")
                            + " is listed twice; keep one entry")
            seen.add(ident)
            out.append(spec)
    if problems:
        raise ConfigError(problems)
    return HintConfig(tuple(out))


def is_number(v: Any) -> bool:
    """A finite int or float, and not a bool (YAML's ``yes`` is not a number)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_deployment(raw: Any, path: str, add: Add) -> Optional[DeploymentScaling]:
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
                did_you_mean(str(key), _DEPLOYMENT_KEYS, aside=True)
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
    if not is_number(tol) or not 0 <= tol < 1:
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


def _gauges() -> list[str]:
    return [m.name for m in catalog.METRICS.values() if m.kind == "gauge"]


def _parse_target(raw: Any, path: str, add: Add) -> Optional[Target]:
    example = "{metric: p95(latency_seconds[30s]), value: 0.2} or {gpu_utilization: 0.8}"
    if not isinstance(raw, Mapping) or not raw:
        add(path, f"must be a mapping like {example}")
        return None
    if "metric" in raw or "value" in raw:
        unknown = [k for k in raw if k not in _TARGET_KEYS]
        if unknown:
            add(f"{path}.{unknown[0]}", f"unknown key {unknown[0]!r} in a target; "
                f"use metric, value and per_replica")
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
            add(vpath, f"{name!r} is not a gauge for the shorthand"
                f"{did_you_mean(str(name), _gauges(), aside=True)}; use one of "
                f"{', '.join(_gauges())}, or write {{metric: QUERY, value: N}}")
            return None
        text = f"avg({name}[{SHORTHAND_WINDOW}])"
    ok = True
    if not is_number(value) or not value > 0:
        add(vpath, f"target value {value!r} must be a number above 0, like 0.2")
        ok = False
    per_replica = raw.get("per_replica", False) if "metric" in raw else False
    if not isinstance(per_replica, bool):
        add(f"{path}.per_replica", f"{per_replica!r} must be true or false")
        ok = False
    query = _parse_query(text, f"{path}.metric", add)
    if query is None or not ok:
        return None
    if per_replica and query.function not in PER_REPLICA_FUNCTIONS:
        add(f"{path}.per_replica", f"{text.strip()!r}: per_replica divides a deployment's "
            f"total by its running replicas, and {query.function} is not a total; use "
            f"{', '.join(PER_REPLICA_FUNCTIONS)} (like rate(output_tokens[30s])), or leave "
            "per_replica out")
        return None
    return Target(metric=text.strip(), query=query, value=float(value), per_replica=per_replica)


def _parse_query(text: str, path: str, add: Add) -> Optional[catalog.Query]:
    """``FUNCTION(METRIC{...}[W])`` through the rule parser, with ``by`` forced to ours."""
    if any(op in text for op in ("<", ">", "==", "!=")) or " and " in f" {text} ":
        add(path, f"{text!r}: a target is a query without a comparison, like "
            "p95(latency_seconds[30s]); the value to hold goes in value:")
        return None
    conditions, problems = check_expr(f"{text} > 0")
    if problems:
        add(path, f"{text!r}: {'; '.join(problems)}")
        return None
    q = conditions[0].query
    if q.function == catalog.ABSENT:
        add(path, f"{text!r}: absent_over_time says whether data exists, not a load to track; "
            "use it in an alert rule")
        return None
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
