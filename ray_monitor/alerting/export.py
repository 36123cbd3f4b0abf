"""Export of a rule set to a Prometheus rule file, over the names on ``/metrics``.

Runs in the CLI (``ray-monitor rules export``) and wherever a user calls it; it decides
the PromQL equivalent of each condition, and says in the ``ray_monitor_export_note``
annotation where that is only an approximation. SLO entries appear as the alerts they
expand to; scale actions and rules over model quality or drift have no Prometheus
equivalent and are left out.
"""

from __future__ import annotations

from typing import Optional

import yaml

from ray_monitor.alerting.expr import format_number, quote
from ray_monitor.alerting.model import AlertRule, RuleSet
from ray_monitor.common import catalog
from ray_monitor.common.durations import format_duration
from ray_monitor.common.histogram import DEFAULT_CLASSIC_BOUNDS

__all__ = ["EXPORT_NOTE", "export_prometheus", "export_prometheus_yaml", "not_exported"]

#: Annotation that says where an exported rule only approximates the monitor's own.
EXPORT_NOTE = "ray_monitor_export_note"
_GAUGE_OVER_TIME = {"avg": ("avg", "avg_over_time"), "min": ("min", "min_over_time"),
                    "max": ("max", "max_over_time"), "last": ("sum", "last_over_time"),
                    "sum": ("sum", "avg_over_time"), "count": ("sum", "count_over_time"),
                    "deriv": ("avg", "deriv")}
#: The rate window of the per-step signal a zscore is taken over in Prometheus.
_ZSCORE_STEP = "1m"


def _promql(q: catalog.Query) -> tuple[str, list[str]]:
    """The PromQL for one query over the /metrics names, and notes on any approximation."""
    metric = catalog.METRICS[q.metric]
    by = q.by or ()
    window = format_duration(q.window_s)
    notes: list[str] = []

    def sel(name: str, extra: str = "", win: Optional[str] = window) -> str:
        ms = [f"{m.label}{m.op}{quote(m.value)}" for m in q.matchers] + ([extra] if extra else [])
        out = name + ("{" + ", ".join(ms) + "}" if ms else "")
        return out + (f"[{win}]" if win else "")

    def agg(op: str, inner: str) -> str:
        return f"{op} by ({', '.join(by)}) ({inner})" if by else f"{op} ({inner})"

    def hq(quant: float) -> str:
        return (f"histogram_quantile({format_number(quant)}, sum by ({', '.join(by + ('le',))}) "
                f"(rate({sel(metric.prometheus + '_bucket')})))")

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
        return agg(op, f"{over_time}({sel(base)})"), notes
    # histograms, over the classic buckets /metrics exposes
    if fn in catalog.SHORTHAND_QUANTILES or fn == "quantile":
        return hq(catalog.SHORTHAND_QUANTILES.get(fn, q.param)), notes
    if fn in ("min", "max"):
        notes.append(f"{fn} of a histogram is estimated from classic bucket bounds")
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
    # ratio_above: the share above a bound is 1 - (bucket at that bound / count)
    bounds = sorted(DEFAULT_CLASSIC_BOUNDS)
    bound = next((b for b in bounds if b >= q.param), bounds[-1])
    if bound != q.param:
        notes.append(f"ratio_above threshold {format_number(q.param)}s is not a classic bucket bound; "
                     f"exported with le=\"{bound!r}\"")
    below = agg("sum", f"rate({sel(base + '_bucket', 'le=' + quote(repr(bound)))})")
    return f"1 - ({below} / {count_rate})", notes


def _export_rule(rule: AlertRule) -> dict:
    parts, notes = [], []
    for cond in rule.conditions:
        text, n = _promql(cond.query)
        notes.extend(n)
        parts.append(f"{text} {cond.op} {format_number(cond.threshold)}")
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
    skipped = not_exported(ruleset)
    if skipped:
        header += ("# Not exported: rules over model quality or drift have no Prometheus "
                   "equivalent (they are computed inside ray-monitor; /metrics has their "
                   "values over 1h as ray_monitor_model_* and ray_monitor_drift_* gauges): "
                   + ", ".join(skipped) + "\n")
    return header + yaml.safe_dump(export_prometheus(ruleset), sort_keys=False,
                                   allow_unicode=True, width=1000)
