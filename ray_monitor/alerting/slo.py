"""SLO entries of a rule file, and the alerts they become.

Checked where a rule file is read (CLI, driver, aggregator on reload); the alerts they
expand to run in the aggregator like any other. An ``slo:`` entry becomes two paging
alerts (SRE workbook, ch. 5: multiwindow, multi-burn-rate, a 30-day budget of
``1 - objective/100``): ``<Name>SLOBurnRateFast`` when the bad ratio over 1h and over 5m
both exceed 14.4x the budget, ``<Name>SLOBurnRateSlow`` for 6h and 30m over 6x
(``<Name>`` is the SLO name in CamelCase). They carry ``severity: page`` (overridable),
``slo: <name>`` and ``burn_rate_window: 1h|6h``, and no ``for``: the short window
already ends the page soon after the burn stops. ``period`` (default 30d) is the budget's
period: the windows scale with it (``period: 7d`` gives 14m/70s and 1h24m/7m, as the
workbook's windows are 1/720 and 1/120 of the period), the burn factors do not.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from ray_monitor.alerting.expr import Condition, did_you_mean, format_number
from ray_monitor.alerting.model import AlertRule
from ray_monitor.alerting.templates import Template
from ray_monitor.common import catalog
from ray_monitor.common.durations import format_duration, parse_duration

__all__ = ["SLO_BURN_WINDOWS", "SLO_KEYS", "SLO_LABELS", "SLO_MIN_PERIOD_S", "SLO_PERIOD_S", "Slo",
           "check_slo", "expand_slo"]

SLO_KEYS = ("slo", "objective", "sli", "by", "period", "labels", "annotations")
#: Labels the expansion sets on the alerts it makes; an entry's own labels may not use them.
SLO_LABELS = ("slo", "burn_rate_window")
#: (suffix, burn-rate factor, long window, short window) from the SRE workbook, ch. 5,
#: for a 30-day budget: 14.4x spends 2% of it in 1h, 6x spends 5% in 6h.
SLO_BURN_WINDOWS = (("Fast", 14.4, 3600.0, 300.0), ("Slow", 6.0, 21600.0, 1800.0))
SLO_PERIOD_S = 30 * 86400.0
#: Shortest period whose windows are all at least a second (5m x 2h24m / 30d = 1s); the
#: longest is 30d, whose 6h window is all the window store keeps.
SLO_MIN_PERIOD_S = 8640.0

Add = Callable[[Optional[str], str], None]  # (field, message)


@dataclass(frozen=True)
class Slo:
    """An ``slo:`` entry: ``threshold`` is the latency SLI's bound in seconds (None: the
    error-ratio SLI); ``by`` the labels it is kept per (None: one SLO for everything)."""

    name: str
    objective: float
    threshold: Optional[float] = None
    by: Optional[tuple[str, ...]] = None
    period_s: float = SLO_PERIOD_S

    def windows(self) -> tuple[tuple[str, float, float, float], ...]:
        """(suffix, burn factor, long window, short window) of each alert, for this period."""
        scale = self.period_s / SLO_PERIOD_S
        return tuple((suffix, factor, float(round(long_w * scale)), float(round(short_w * scale)))
                     for suffix, factor, long_w, short_w in SLO_BURN_WINDOWS)

    @property
    def budget(self) -> float:
        return 1.0 - self.objective / 100.0

    @property
    def metric(self) -> catalog.Metric:
        return catalog.METRICS["latency_seconds" if self.threshold is not None else "requests"]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_slo(raw: Mapping, add: Add) -> Slo:
    """The entry's own fields, each problem passed to ``add``; labels and annotations are
    the caller's. The result is usable only when ``add`` was not called."""
    name = raw["slo"]
    if not isinstance(name, str) or not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_-]*", name):
        add("slo", f"SLO name {name!r} must be letters, digits, _ and -, like availability")
    for key in raw:
        if key not in SLO_KEYS:
            add(str(key), f"unknown key {key!r} in an slo rule; use {', '.join(SLO_KEYS)}")
    objective = raw.get("objective")
    if not _is_number(objective) or not 0 < objective < 100:
        add("objective", f"{objective!r} must be a percentage between 0 and 100 (exclusive), "
            "like 99.9")
        objective = math.nan
    elif SLO_BURN_WINDOWS[0][1] * (1.0 - objective / 100.0) >= 1:
        add("objective", f"{objective} leaves an error budget of {1.0 - objective / 100.0:.0%}: a "
            "14.4x burn would need more than 100% bad requests, so the fast alert could never "
            "fire; use an objective of 93.1 or more")
    sli = raw.get("sli")
    threshold = None
    if isinstance(sli, Mapping) and set(sli) == {"latency_threshold"}:
        threshold = sli["latency_threshold"]
        if not _is_number(threshold) or not threshold > 0:
            add("sli", f"latency_threshold {threshold!r} must be a number of seconds above 0")
            threshold = None
    elif sli != "error_ratio":
        add("sli", f"{sli!r} is not an SLI; use error_ratio or {{latency_threshold: 0.5}} (seconds)")
    period = SLO_PERIOD_S
    if "period" in raw:
        try:
            period = parse_duration(raw["period"])
        except ValueError as exc:
            add("period", str(exc))
        else:
            if not SLO_MIN_PERIOD_S <= period <= SLO_PERIOD_S:
                add("period", f"{raw['period']!r} must be between {format_duration(SLO_MIN_PERIOD_S)} "
                    f"(its shortest window is then 1s) and 30d (its longest, 6h, is what the "
                    "monitor keeps)")
                period = SLO_PERIOD_S
    slo = Slo(str(name), float(objective), None if threshold is None else float(threshold))
    return Slo(slo.name, slo.objective, slo.threshold, _check_by(raw.get("by"), slo.metric, add),
               period)


def _check_by(by: Any, metric: catalog.Metric, add: Add) -> Optional[tuple[str, ...]]:
    if by is None:
        return None
    if not isinstance(by, list) or not all(isinstance(b, str) for b in by):
        add("by", "must be a list of label names, like [application, deployment]")
        return None
    for b in by:
        if b not in metric.labels:
            add("by", f"label {b!r} is not a label of {metric.name!r}"
                f"{did_you_mean(b, metric.labels)} (labels: {', '.join(metric.labels)})")
    return tuple(sorted(set(by))) or None


def _camel(name: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in re.split(r"[_\-]+", name) if p)


def expand_slo(slo: Slo, labels: Mapping[str, str],
               annotations: Mapping[str, Template]) -> list[AlertRule]:
    """The two burn-rate alerts of a checked SLO; ``labels`` and ``annotations`` are the
    entry's own, which win over the defaults written here."""
    by, budget, objective = slo.by, slo.budget, format_number(slo.objective)
    where = (" on " + "/".join(f"{{{{ $labels.{b} }}}}" for b in by)) if by else ""
    what = (f"requests slower than {format_number(slo.threshold)}s" if slo.threshold is not None
            else "requests that failed")
    rules = []
    for suffix, factor, long_w, short_w in slo.windows():
        level = float(f"{factor * budget:.12g}")
        conds = tuple(
            Condition(catalog.Query(
                function="ratio_above" if slo.threshold is not None else "error_ratio",
                metric=slo.metric.name, window_s=w, by=by, param=slo.threshold), ">", level)
            for w in (long_w, short_w))
        default_ann = {
            "summary": f"SLO {slo.name} ({objective}%){where}: error budget burning "
                       f"{format_number(factor)}x too fast",
            "description": f"{{{{ $value | humanizePercentage }}}} of {what} over the last "
                           f"{format_duration(long_w)} (and over {format_duration(short_w)}) "
                           f"against a budget of {budget * 100:.4g}% ({objective}% over "
                           f"{format_duration(slo.period_s)}); at this rate the whole budget is "
                           f"spent in {format_duration(slo.period_s / factor)}.",
        }
        anns = {k: Template.parse(v, by or ()) for k, v in default_ann.items()}
        anns.update(annotations)
        rules.append(AlertRule(
            name=f"{_camel(slo.name)}SLOBurnRate{suffix}", expr=" and ".join(map(str, conds)),
            conditions=conds, labels={"severity": "page", **labels, "slo": slo.name,
                                      "burn_rate_window": format_duration(long_w)},
            annotations=anns, slo=slo.name))
    return rules
