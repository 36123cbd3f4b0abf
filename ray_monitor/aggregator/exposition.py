"""``/metrics``: the aggregator's series through prometheus_client's registry and encoders.

Runs in the aggregator actor. Custom collectors, built at scrape time (the registry never
holds per-series state of its own): counters, gauges, classic-bucket histograms derived
from our exponential buckets (with trace-id exemplars in OpenMetrics; the ``le`` bounds are
Prometheus' defaults plus every threshold a loaded rule compares a quantile with, so
``histogram_quantile`` decides at the threshold as the monitor does), the ``ALERTS``-style
series, what Ray Serve runs (``ray_monitor_serve_running_replicas``, for exported absence
rules), the autoscaling hints, the monitor's own health as ``ray_monitor_self_*``, and the
quality and drift gauges of each model. The format is prometheus_client's choice for the
scraper's ``Accept`` header (:func:`prometheus_client.exposition.choose_encoder`):
OpenMetrics for Prometheus, which asks for it, the text format otherwise.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Mapping, Optional, Union

from prometheus_client import CollectorRegistry
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from ray_monitor.alerting.export import SERVE_REPLICAS, le_value
from ray_monitor.common.catalog import METRICS, QUALITY_LABELS, QUALITY_METRICS
from ray_monitor.common.histogram import DEFAULT_CLASSIC_BOUNDS

__all__ = ["MonitorCollector", "QualityCollector", "autoscale_families", "registry", "render",
           "self_families"]


_le = le_value  # the text of an le label: exported rules match it exactly


class MonitorCollector:
    """Collects from callables so the aggregator decides what is current."""

    def __init__(self, *, series: Callable[[], Iterable], alerts: Callable[[], Iterable],
                 self_metrics: Callable[[], dict],
                 autoscale: Optional[Callable[[], tuple[list, dict]]] = None,
                 bounds: Optional[Callable[[], Mapping[str, tuple[float, ...]]]] = None,
                 serve: Optional[Callable[[], Mapping[tuple[str, str], int]]] = None,
                 series_reader: Optional[Callable[[], Callable[[], Iterable]]] = None) -> None:
        self._series = series
        # what frozen() calls on the loop: it copies the series' sources and returns what
        # lists them from the copies (default: the series listed there and then)
        self._series_reader = series_reader
        self._alerts = alerts
        self._self = self_metrics
        self._autoscale = autoscale
        self._bounds = bounds  # histogram metric -> classic bounds (default: Prometheus')
        self._serve = serve  # (application, deployment) -> replicas Serve runs

    def frozen(self) -> "MonitorCollector":
        """This collector over what its sources say now, read here (on the aggregator's
        loop): the copy's ``collect()`` reads nothing else, so it may run on a worker
        thread while ingest goes on. The series are built there too, from what
        ``series_reader`` copied (the store's arrays), when it is given."""
        if self._series_reader is not None:
            series = self._series_reader()
        else:
            listed = list(self._series())
            series = lambda: listed
        alerts = list(self._alerts())
        own = copy.deepcopy(self._self())
        auto = None
        if self._autoscale is not None:
            hints, decisions = self._autoscale()
            auto = (list(hints), dict(decisions))
        bounds = dict(self._bounds()) if self._bounds is not None else None
        serve = self._serve() if self._serve is not None else None
        serve = dict(serve) if serve is not None else None
        return MonitorCollector(series=series, alerts=lambda: alerts,
                                self_metrics=lambda: own,
                                autoscale=None if auto is None else (lambda: auto),
                                bounds=None if bounds is None else (lambda: bounds),
                                serve=None if self._serve is None else (lambda: serve))

    def collect(self) -> Iterable[Metric]:
        families: dict[str, tuple[Metric, list[str]]] = {}  # metric -> (family, label names)
        bounds = self._bounds() if self._bounds is not None else {}
        for s in self._series():
            m = METRICS[s.metric]
            labels = dict(s.labels)
            fam, names = families.get(m.name) or (None, None)
            if fam is None:
                names = list(m.labels)
                names.extend(k for k in labels if k not in names)
                family = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}.get(
                    m.kind, HistogramMetricFamily)
                fam = family(m.prometheus, m.help, labels=names)
                families[m.name] = (fam, names)
            values = [str(labels.get(n, "")) for n in names]
            if m.kind == "histogram":
                fam.add_metric(values, _buckets(s.histogram, s.exemplars,
                                                bounds.get(m.name, m.classic or DEFAULT_CLASSIC_BOUNDS)),
                               s.histogram.sum)
            else:
                fam.add_metric(values, float(s.value))
        yield from (fam for fam, _ in families.values())
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
        if self._serve is not None:
            serve = GaugeMetricFamily(
                SERVE_REPLICAS, "Replicas Ray Serve's controller reports running, per deployment "
                "(polled by the aggregator; absent while it cannot ask).",
                labels=["application", "deployment"])
            for (app, dep), n in sorted(self._serve().items()):
                serve.add_metric([app, dep], float(n))
            yield serve
        if self._autoscale is not None:
            yield from autoscale_families(*self._autoscale())
        yield from self_families(self._self())


def _buckets(h, exemplars, classic: tuple[float, ...] = DEFAULT_CLASSIC_BOUNDS) -> list:
    out = []
    # The newest exemplar whose value falls in each classic bucket.
    by_le: dict[float, Exemplar] = {}
    bounds = list(classic) + [float("inf")]
    for e in (exemplars or {}).values():
        for le in bounds:
            if e.value <= le:
                prev = by_le.get(le)
                if prev is None or (prev.timestamp or 0) < e.timestamp:
                    by_le[le] = Exemplar({"trace_id": e.trace_id, "span_id": e.span_id},
                                         e.value, e.timestamp)
                break
    for le, count in h.classic(classic):
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
    gpu = CounterMetricFamily("ray_monitor_self_gpu_errors",
                              "Failures in each node's GPU-stats actor: NVML calls by function "
                              "and NVML error ('nvmlInit:Unknown'), NVML restarts, pushes.",
                              labels=["node", "cause"])
    for node, causes in sorted(stats.get("gpu_errors", {}).items()):
        for cause, n in sorted(causes.items()):
            gpu.add_metric([node, cause], n)
    yield gpu
    for name, (help_, value) in sorted(stats.get("gauges", {}).items()):
        yield GaugeMetricFamily(f"ray_monitor_self_{name}", help_, value=value)
    for name, (help_, value) in sorted(stats.get("counters", {}).items()):
        yield CounterMetricFamily(f"ray_monitor_self_{name}", help_, value=value)


class QualityCollector:
    """Quality and drift of each model over the fixed gauge window (1h), as gauges:
    ``ray_monitor_model_*`` per application, deployment and model_version, and
    ``ray_monitor_drift_*`` with a ``metric`` label (``prediction`` or ``feature_<name>``)."""

    def __init__(self, summary: Callable[[], list[dict]]) -> None:
        self._summary = summary

    def frozen(self) -> "QualityCollector":
        """As :meth:`MonitorCollector.frozen`: the models' figures read now."""
        models = copy.deepcopy(self._summary())
        return QualityCollector(lambda: models)

    def collect(self) -> Iterable[Metric]:
        models = self._summary()
        for name, m in QUALITY_METRICS.items():
            drift = m.kind == "drift"
            fam = GaugeMetricFamily(m.prometheus, m.help + " Over the last hour.",
                                    labels=list(QUALITY_LABELS) + (["metric"] if drift else []))
            for model in models:
                labels = [model[k] for k in QUALITY_LABELS]
                if drift:
                    for metric, values in sorted(model["drift"].items()):
                        if values.get(name) is not None:
                            fam.add_metric(labels + [metric], float(values[name]))
                elif model["quality"].get(name) is not None:
                    fam.add_metric(labels, float(model["quality"][name]))
            yield fam


def registry(*collectors: Collector) -> CollectorRegistry:
    """A registry of ``collectors``, which are asked for their series at each scrape."""
    reg = CollectorRegistry(auto_describe=False)
    for c in collectors:
        reg.register(c)
    return reg


def render(source: Union[CollectorRegistry, Collector], accept: str = "") -> tuple[bytes, str]:
    """The exposition of a registry (or of one collector) in the format prometheus_client
    picks for the ``Accept`` header: OpenMetrics (with exemplars) when asked for, else the
    Prometheus text format. Returns the body and its content type."""
    reg = source if isinstance(source, CollectorRegistry) else registry(source)
    encode, content_type = choose_encoder(accept or "")
    return encode(reg), content_type
