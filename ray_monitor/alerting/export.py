"""Export of a rule set to a Prometheus rule file, over the names on ``/metrics``.

Runs in the CLI (``ray-monitor rules export``) and wherever a user calls it; it decides
the PromQL equivalent of each condition, and says in the ``ray_monitor_export_note``
annotation where that only approximates the monitor's decision. SLO entries appear as
the alerts they expand to; scale actions and rules over model quality or drift have no
Prometheus equivalent and are left out.

What makes the exported rules decide as the monitor does, given the same data: the
monitor's zeros (a live series that stopped moving reads 0; /metrics keeps the counter,
at its last value, for as long), its "no value" (no requests: no ratio, as Prometheus'
NaN never matches; ``!=`` rules are guarded so that a NaN does not fire them), the
quantile rank (``histogram_quantile``'s), and the classic buckets: :func:`classic_bounds`
names every threshold a loaded rule compares a quantile, ``max`` or ``ratio_above``
against, and the aggregator adds them to the ``le`` bounds on /metrics, so the decision
at the threshold is exact.
"""

from __future__ import annotations

import math
from typing import Optional

import yaml

from ray_monitor.alerting.expr import Condition, format_number, quote
from ray_monitor.alerting.model import AlertRule, RuleSet
from ray_monitor.common import catalog
from ray_monitor.common.durations import format_duration
from ray_monitor.common.histogram import DEFAULT_CLASSIC_BOUNDS

__all__ = ["EXPORT_NOTE", "SERVE_REPLICAS", "bucket_rates_promql", "classic_bounds",
           "condition_promql", "export_prometheus", "export_prometheus_yaml", "le_value",
           "not_exported"]

#: Annotation that says where an exported rule only approximates the monitor's own.
EXPORT_NOTE = "ray_monitor_export_note"
#: The gauge on /metrics of the replicas Ray Serve runs per deployment (from its controller).
SERVE_REPLICAS = "ray_monitor_serve_running_replicas"
_GAUGE_OVER_TIME = {"avg": ("avg", "avg_over_time"), "min": ("min", "min_over_time"),
                    "max": ("max", "max_over_time"), "last": ("sum", "last_over_time"),
                    "sum": ("sum", "avg_over_time"), "count": ("sum", "count_over_time"),
                    "deriv": ("avg", "deriv")}
#: The rate window of the per-step signal a zscore is taken over in Prometheus.
_ZSCORE_STEP = "1m"
#: Functions whose PromQL can be NaN (a division, histogram_quantile): "!=" needs a guard.
_MAY_BE_NAN = frozenset({"error_ratio", "p50", "p90", "p95", "p99", "quantile", "ratio_above",
                         "zscore"})
_HISTOGRAM_NAN = frozenset({"avg", "min", "max"})


def le_value(bound: float) -> str:
    """A classic bucket bound as /metrics writes its ``le`` label (``0.4``, ``1.0``,
    ``+Inf``); Prometheus 2.42 does not normalise them, so rules must match the text."""
    return "+Inf" if bound == math.inf else repr(float(bound))


def _bound_of(cond: Condition) -> Optional[float]:
    """The threshold a histogram condition needs as a classic bound, if any."""
    q = cond.query
    metric = catalog.METRICS.get(q.metric)
    if metric is None or metric.kind != "histogram":
        return None
    if q.function == "ratio_above":
        return q.param
    if q.function in catalog.SHORTHAND_QUANTILES or q.function in ("quantile", "max", "min"):
        return cond.threshold if cond.op is not None else None
    return None


def classic_bounds(ruleset: Optional[RuleSet]) -> dict[str, tuple[float, ...]]:
    """Classic ``le`` bounds per histogram metric: Prometheus' defaults plus every positive
    threshold the rules compare a quantile, ``max`` or ``min`` with, and every
    ``ratio_above`` threshold (SLO latency thresholds included), so that
    ``histogram_quantile`` over /metrics decides at the threshold as the monitor does."""
    extra: dict[str, set[float]] = {}
    for _, rule in (ruleset.rules() if ruleset is not None else ()):
        for cond in rule.conditions:
            bound = _bound_of(cond)
            if bound is not None and 0 < bound < math.inf:
                extra.setdefault(cond.query.metric, set()).add(float(bound))
    return {name: tuple(sorted(set(m.classic or DEFAULT_CLASSIC_BOUNDS) | extra.get(name, set())))
            for name, m in catalog.METRICS.items() if m.kind == "histogram"}


def _absent(q: catalog.Query, cond: Condition) -> tuple[str, list[str]]:
    """``absent_over_time``: over the series a report writes (see catalog.absence_metric)."""
    metric = catalog.METRICS[catalog.absence_metric(q.metric)]
    name = metric.prometheus + ("_total" if metric.kind == "counter" else "")
    window = format_duration(q.window_s)
    ms = ", ".join(f"{m.label}{m.op}{quote(m.value)}" for m in q.matchers)
    sel = f"{name}{{{ms}}}[{window}]" if ms else f"{name}[{window}]"
    notes = []
    if metric.name != q.metric:
        notes.append(f"absence of {q.metric} is exported over {name}, which every replica "
                     f"report writes for each method: a counter stays on /metrics while its "
                     f"replica is alive, so its own absence would show only after series_ttl_s")
    if metric.kind == "gauge":
        notes.append("a gauge leaves /metrics 3s (or 3 report intervals) after its source "
                     "stopped reporting, so Prometheus sees the absence that much later")
    if q.by is None:
        return f"absent_over_time({sel})", notes
    by = ", ".join(q.by)
    serve = [f"{m.label}{m.op}{quote(m.value)}" for m in q.matchers if m.label in catalog.ABSENT_BY]
    serve_sel = SERVE_REPLICAS + ("{" + ", ".join(serve) + "}" if serve else "")
    notes.append(f"relies on {SERVE_REPLICAS} (replicas Ray Serve's controller reports running, "
                 "polled by the aggregator every 5s); with Ray's own metrics scraped, "
                 "ray_serve_deployment_replica_healthy > 0 names the same deployments")
    return (f"group by ({by}) ({serve_sel} > 0) unless "
            f"group by ({by}) (count_over_time({sel}))"), notes


def _promql(q: catalog.Query, cond: Optional[Condition] = None) -> tuple[str, list[str]]:
    """The PromQL for one query over the /metrics names, and notes on any approximation."""
    if q.function == catalog.ABSENT:
        return _absent(q, cond)
    metric = catalog.METRICS[q.metric]
    by = q.by or ()
    window = format_duration(q.window_s)
    notes: list[str] = []

    def sel(name: str, extra: str = "", win: Optional[str] = window) -> str:
        return _selector(q, name, extra, win)

    def agg(op: str, inner: str) -> str:
        return f"{op} by ({', '.join(by)}) ({inner})" if by else f"{op} ({inner})"

    def hq(quant: float) -> str:
        return f"histogram_quantile({format_number(quant)}, {_bucket_rates(q)})"

    fn, kind, base = q.function, metric.kind, metric.prometheus
    counter = f"{base}_total"
    if fn == "zscore":
        # The store's per-step value: counter rate, histogram mean, gauge average.
        step_rate = lambda name: agg("sum", f"rate({sel(name, win=_ZSCORE_STEP)})")  # noqa: E731
        signal = {"gauge": agg("avg", sel(base, win=None)),
                  "counter": step_rate(counter),
                  "histogram": f"{step_rate(base + '_sum')} / {step_rate(base + '_count')}"}[kind]
        notes.append(f"zscore is approximated over a {window} subquery of the {kind}'s "
                     f"{ {'gauge': 'average', 'counter': 'rate', 'histogram': 'mean'}[kind]}, "
                     "with the latest step in its history and no floor on the deviation")
        return (f"(({signal}) - avg_over_time(({signal})[{window}:])) / "
                f"stddev_over_time(({signal})[{window}:])"), notes
    if fn == "error_ratio":
        errors = catalog.METRICS["errors"].prometheus + "_total"
        requests = catalog.METRICS["requests"].prometheus + "_total"
        return f"{agg('sum', f'rate({sel(errors)})')} / {agg('sum', f'rate({sel(requests)})')}", notes
    if kind == "counter":
        return agg("sum", f"{'rate' if fn == 'rate' else 'increase'}({sel(counter)})"), notes
    if kind == "gauge":
        op, over_time = _GAUGE_OVER_TIME[fn]
        if fn == "deriv":
            notes.append("deriv: Prometheus fits each series' raw samples and averages the "
                         "slopes, ray-monitor fits the group's per-second average (per-10s "
                         "steps past 10m); the same slope for a steady trend sampled every "
                         "second, apart on noise and gaps; Prometheus needs 2 samples, "
                         "ray-monitor 2 seconds with data")
        if fn == "count":
            notes.append("count of a gauge counts samples: Prometheus its scrapes, ray-monitor "
                         "the replicas' reports (the same at a scrape interval of flush_interval_s)")
        return agg(op, f"{over_time}({sel(base)})"), notes
    # histograms, over the classic buckets /metrics exposes
    if fn in catalog.SHORTHAND_QUANTILES or fn == "quantile":
        return hq(catalog.SHORTHAND_QUANTILES.get(fn, q.param)), notes
    if fn in ("min", "max"):
        notes.append(f"{fn} of a histogram is estimated from classic bucket bounds"
                     + (" (max > threshold is exact: the threshold is a bound)" if fn == "max"
                        else ""))
        return hq(0.0 if fn == "min" else 1.0), notes
    count_rate = agg("sum", f"rate({sel(base + '_count')})")
    if fn == "rate":
        return count_rate, notes
    if fn == "count":
        return agg("sum", f"increase({sel(base + '_count')})"), notes
    if fn == "sum":
        return agg("sum", f"increase({sel(base + '_sum')})"), notes
    if fn == "avg":
        return f"{agg('sum', 'rate(' + sel(base + '_sum') + ')')} / {count_rate}", notes
    # ratio_above: the share above a bound is 1 - (bucket at that bound / count); the
    # threshold is a bound on /metrics while the rule is loaded (classic_bounds)
    below = agg("sum", f"rate({sel(base + '_bucket', 'le=' + quote(le_value(q.param)))})")
    return f"1 - ({below} / {count_rate})", notes


def _selector(q: catalog.Query, name: str, extra: str = "", win: Optional[str] = None) -> str:
    """``name{<the query's matchers>, extra}[win]`` (no braces without matchers)."""
    ms = [f"{m.label}{m.op}{quote(m.value)}" for m in q.matchers] + ([extra] if extra else [])
    out = name + ("{" + ", ".join(ms) + "}" if ms else "")
    return out + (f"[{win}]" if win else "")


def _bucket_rates(q: catalog.Query) -> str:
    """The per-bucket rates a histogram quantile reads: ``sum by (<by>, le) (rate(..._bucket))``."""
    name = catalog.METRICS[q.metric].prometheus + "_bucket"
    return (f"sum by ({', '.join((q.by or ()) + ('le',))}) "
            f"(rate({_selector(q, name, win=format_duration(q.window_s))}))")


def bucket_rates_promql(cond: Condition) -> Optional[str]:
    """For a quantile condition (p50..p99, quantile, min and max of a histogram), the PromQL
    of the per-bucket rates ``histogram_quantile`` ranks in; None for any other condition.
    What a comparison with Prometheus needs to tell how near a bound the rank sits."""
    q = cond.query
    if q.function == catalog.ABSENT or catalog.METRICS[q.metric].kind != "histogram":
        return None
    if q.function in catalog.SHORTHAND_QUANTILES or q.function in ("quantile", "min", "max"):
        return _bucket_rates(q)
    return None


def condition_promql(cond: Condition) -> str:
    """The PromQL of a condition's query alone (no comparison): the value Prometheus
    compares, for setting it beside the monitor's."""
    return _promql(cond.query, cond)[0]


def _condition(cond: Condition) -> tuple[str, list[str]]:
    """One condition as PromQL: the query, its comparison, and a NaN guard for ``!=``
    (Prometheus' ``NaN != x`` is true; the monitor has no value there)."""
    text, notes = _promql(cond.query, cond)
    if cond.op is None:
        return text, notes
    q = cond.query
    kind = catalog.METRICS[q.metric].kind
    threshold = format_number(cond.threshold)
    if cond.op == "!=" and (q.function in _MAY_BE_NAN or (kind == "histogram" and
                                                          q.function in _HISTOGRAM_NAN)):
        return f"({text}) != {threshold} unless ({text}) != ({text})", notes
    return f"{text} {cond.op} {threshold}", notes


def _export_rule(rule: AlertRule) -> dict:
    parts, notes = [], []
    for cond in rule.conditions:
        text, n = _condition(cond)
        notes.extend(n)
        parts.append(text)
    expr = parts[0] if len(parts) == 1 else " and ".join(f"({p})" for p in parts)
    out: dict = {"alert": rule.name, "expr": expr}
    if rule.for_s:
        out["for"] = format_duration(rule.for_s)
    if rule.keep_firing_for_s:
        out["keep_firing_for"] = format_duration(rule.keep_firing_for_s)
    if rule.labels:
        out["labels"] = dict(rule.labels)
    annotations = {k: t.text for k, t in rule.annotations.items()}
    if notes:
        annotations[EXPORT_NOTE] = "; ".join(dict.fromkeys(notes))
    if annotations:
        out["annotations"] = annotations
    return out


def _is_model_rule(rule: AlertRule) -> bool:
    return any(catalog.is_model_query(c.query.function, c.query.metric) for c in rule.conditions)


def not_exported(ruleset: RuleSet) -> list[str]:
    """``group/alert`` of the rules over model quality or drift, which Prometheus cannot
    evaluate: their inputs (predictions joined with late feedback, drift counts) exist
    only inside the aggregator. /metrics shows their values over a fixed 1h window as
    ``ray_monitor_model_*`` and ``ray_monitor_drift_*`` gauges."""
    return [f"{g.name}/{r.name}" for g, r in ruleset.rules() if _is_model_rule(r)]


def export_prometheus(ruleset: RuleSet) -> dict:
    """The rule set as a Prometheus rule file (a dict), over the names on /metrics.

    SLO entries appear as the alerts they expand to; ``scale`` actions have no
    Prometheus equivalent and are left out, and so are rules over model quality or
    drift (see :func:`not_exported`; a group left empty is left out too).
    Approximations are named in the ``ray_monitor_export_note`` annotation of the rule.
    """
    groups = []
    for g in ruleset.groups:
        group: dict = {"name": g.name}
        if g.interval_s:
            group["interval"] = format_duration(g.interval_s)
        group["rules"] = [_export_rule(r) for r in g.rules if not _is_model_rule(r)]
        if group["rules"] or not g.rules:
            groups.append(group)
    return {"groups": groups}


def export_prometheus_yaml(ruleset: RuleSet) -> str:
    """:func:`export_prometheus` as YAML text for ``promtool check rules`` and Prometheus."""
    header = (f"# Prometheus rules exported by ray-monitor from {ruleset.file}.\n"
              f"# Scale actions are not exported; approximations are named in the "
              f"{EXPORT_NOTE} annotation.\n")
    added = {name: [b for b in bounds
                    if b not in (catalog.METRICS[name].classic or DEFAULT_CLASSIC_BOUNDS)]
             for name, bounds in classic_bounds(ruleset).items()}
    added = {name: bounds for name, bounds in added.items() if bounds}
    if added:
        header += ("# Thresholds that are not default classic buckets: ray-monitor adds them as le "
                   "bounds on /metrics while it has these rules loaded, which the quantile and "
                   "ratio_above rules below rely on: "
                   + "; ".join(f"{catalog.METRICS[n].prometheus}_bucket "
                               + ", ".join(le_value(b) for b in bounds)
                               for n, bounds in sorted(added.items())) + "\n")
    skipped = not_exported(ruleset)
    if skipped:
        header += ("# Not exported: rules over model quality or drift have no Prometheus "
                   "equivalent (they are computed inside ray-monitor; /metrics has their "
                   "values over 1h as ray_monitor_model_* and ray_monitor_drift_* gauges): "
                   + ", ".join(skipped) + "\n")
    return header + yaml.safe_dump(export_prometheus(ruleset), sort_keys=False,
                                   allow_unicode=True, width=1000)
