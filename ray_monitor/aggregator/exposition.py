"""``/metrics``: the window store's cumulative series through prometheus_client.

A custom collector, built at scrape time (the registry never holds per-series
state of its own): counters, gauges, classic-bucket histograms derived from our
exponential buckets (with trace-id exemplars in OpenMetrics), the ``ALERTS``-style
series, and the monitor's own health as ``ray_monitor_self_*``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from prometheus_client import CollectorRegistry
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OM_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as om_generate
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.samples import Exemplar

from ray_monitor.common.catalog import METRICS
from ray_monitor.common.histogram import DEFAULT_CLASSIC_BOUNDS


def _le(v: float) -> str:
    return "+Inf" if v == float("inf") else repr(float(v))


class MonitorCollector:
    """Collects from callables so the aggregator decides what is current."""

    def __init__(self, *, series: Callable[[], Iterable], alerts: Callable[[], Iterable],
                 self_metrics: Callable[[], dict],
                 autoscale: Optional[Callable[[], tuple[list, dict]]] = None) -> None:
        self._series = series
        self._alerts = alerts
        self._self = self_metrics
        self._autoscale = autoscale

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for s in self._series():
            m = METRICS[s.metric]
            labels = dict(s.labels)
            names = list(m.labels)
            for k in labels:
                if k not in names:
                    names.append(k)
            fam = families.get(m.name)
            if fam is None:
                if m.kind == "counter":
                    fam = CounterMetricFamily(m.prometheus, m.help, labels=names)
                elif m.kind == "gauge":
                    fam = GaugeMetricFamily(m.prometheus, m.help, labels=names)
                else:
                    fam = HistogramMetricFamily(m.prometheus, m.help, labels=names)
                families[m.name] = fam
            values = [str(labels.get(n, "")) for n in fam._labelnames]
            if m.kind == "histogram":
                fam.add_metric(values, _buckets(s.histogram, s.exemplars), s.histogram.sum)
            else:
                fam.add_metric(values, float(s.value))
        yield from families.values()
        # Like Prometheus' ALERTS: one series per pending or firing alert, with its
        # labels; alerts of different rules have different label names, so the family
        # takes their union and leaves the missing ones empty (as PromQL reads them).
        current = list(self._alerts())
        names = ["alertname", "alertstate"]
        for labels, _ in current:
            names.extend(k for k in sorted(labels) if k not in names)
        alerts = GaugeMetricFamily("ray_monitor_alerts",
                                   "Alerts pending or firing (like Prometheus' ALERTS).",
                                   labels=names)
        for labels, state in current:
            row = {**labels, "alertstate": state}
            alerts.add_metric([str(row.get(n, "")) for n in names], 1.0)
        yield alerts
        if self._autoscale is not None:
            yield from autoscale_families(*self._autoscale())
        yield from self_families(self._self())


def _buckets(h, exemplars) -> list:
    out = []
    # The newest exemplar whose value falls in each classic bucket.
    by_le: dict[float, Exemplar] = {}
    bounds = list(DEFAULT_CLASSIC_BOUNDS) + [float("inf")]
    for e in (exemplars or {}).values():
        for le in bounds:
            if e.value <= le:
                prev = by_le.get(le)
                if prev is None or (prev.timestamp or 0) < e.timestamp:
                    by_le[le] = Exemplar({"trace_id": e.trace_id, "span_id": e.span_id},
                                         e.value, e.timestamp)
                break
    for le, count in h.classic(DEFAULT_CLASSIC_BOUNDS):
        ex = by_le.get(le)
        out.append([_le(le), count, ex] if ex is not None else [_le(le), count])
    return out


def autoscale_families(hints: list, decisions: dict) -> Iterable[Metric]:
    """The autoscaling hints: what the monitor asks for, and every decision it made."""
    desired = GaugeMetricFamily("ray_monitor_autoscale_desired_replicas",
                                "Replicas the monitor asks for, per deployment.",
                                labels=["application", "deployment"])
    for h in hints:
        if h.desired is not None:
            desired.add_metric([h.application, h.deployment], float(h.desired))
    yield desired
    made = CounterMetricFamily("ray_monitor_autoscale_decisions",
                               "Hint decisions, by direction and reason.",
                               labels=["application", "deployment", "direction", "reason"])
    for (app, dep, direction, reason), n in sorted(decisions.items()):
        made.add_metric([app, dep, direction, reason], float(n))
    yield made


def self_families(stats: dict) -> Iterable[Metric]:
    """``ray_monitor_self_*``: counters by cause, gauges for sizes."""
    errors = CounterMetricFamily("ray_monitor_self_errors",
                                 "Failures of the monitor itself, by where and cause.",
                                 labels=["component", "cause"])
    for (component, cause), n in sorted(stats.get("errors", {}).items()):
        errors.add_metric([component, cause], n)
    yield errors
    for name, (help_, value) in sorted(stats.get("gauges", {}).items()):
        yield GaugeMetricFamily(f"ray_monitor_self_{name}", help_, value=value)
    for name, (help_, value) in sorted(stats.get("counters", {}).items()):
        yield CounterMetricFamily(f"ray_monitor_self_{name}", help_, value=value)


def render(collector: MonitorCollector, accept: str = "") -> tuple[bytes, str]:
    """The exposition in OpenMetrics when asked (exemplars), else Prometheus text."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if "application/openmetrics-text" in (accept or ""):
        return om_generate(registry), OM_CONTENT_TYPE
    return generate_latest(registry), CONTENT_TYPE_LATEST

