"""The metrics that rules can use, the functions over them, and a parsed query.

Imported everywhere (the rule parser, the window store, the exposition, the CLI).

One table so that the rule parser, the window store, the Prometheus exposition and
the rule exporter agree on names: a rule says ``p99(latency_seconds[1m])``, the store
knows ``latency_seconds`` is a histogram, and ``/metrics`` calls it
``ray_monitor_request_duration_seconds``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ray_monitor.common.matchers import Matcher

__all__ = ["ABSENT", "ABSENT_BY", "ALIASES", "COST_BOUNDS", "COST_LABELS", "COUNT_BOUNDS",
           "FEATURE_PREFIX", "FUNCTIONS", "GENAI_METRICS", "GPU_SECONDS_LABELS",
           "METRICS", "MODEL_FUNCTIONS", "MODEL_LABELS", "Metric", "PREDICTION",
           "PREDICTIONS", "QUALITY_LABELS", "QUALITY_METRICS", "QualityMetric", "Query",
           "REQUEST_METRICS", "RESERVED_LABELS", "SHORTHAND_QUANTILES", "TENANT_LABELS",
           "TENANT_METRICS", "absence_metric", "absent_labels", "is_model_query"]


Kind = Literal["counter", "histogram", "gauge"]

#: Labels of request series, in exposition order.
REQUEST_LABELS = ("application", "deployment", "replica", "method", "model_version", "outcome")
#: Labels of replica health series.
REPLICA_LABELS = ("application", "deployment", "replica", "model_version", "node")
#: Labels of GPU device series. ``deployment``/``application`` are present when a
#: replica of that deployment uses the GPU (one series per deployment on it).
GPU_LABELS = ("node", "gpu", "uuid", "model", "application", "deployment")
#: Labels of per-replica GPU use.
GPU_REPLICA_LABELS = ("node", "gpu", "uuid", "application", "deployment", "replica", "pid")

#: Labels of per-tenant usage series: ``model`` is the model the responses named, ``tenant``
#: one of the deployment's top tenants or ``other`` (see aggregator.tenants).
TENANT_LABELS = ("application", "deployment", "model", "tenant")
#: Labels of ``cost``: ``part`` is ``tokens`` (the tokens' price) or ``gpu`` (GPU-seconds'
#: price; ``tenant`` is ``""`` there, GPU time is the deployment's, not a tenant's).
COST_LABELS = TENANT_LABELS + ("part",)
#: Labels of GPU-seconds attributed to a replica.
GPU_SECONDS_LABELS = ("node", "gpu", "uuid", "application", "deployment", "replica")

#: Label names the monitor sets; user-chosen labels may not use them.
RESERVED_LABELS = frozenset(REQUEST_LABELS + REPLICA_LABELS + GPU_LABELS + GPU_REPLICA_LABELS
                            + COST_LABELS
                            + ("alertname", "le", "quantile", "direction", "reason", "cause"))


@dataclass(frozen=True)
class Metric:
    name: str  # the name in rules
    kind: Kind
    labels: tuple[str, ...]
    prometheus: str  # the name on /metrics (counters without the _total suffix)
    help: str
    unit: str = ""
    classic: tuple[float, ...] = ()  # classic le bounds on /metrics (default: Prometheus')


#: Classic bounds of histograms that count things (items per stream, items per second).
COUNT_BOUNDS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)
#: Classic bounds of the cost of one request (in the prices' currency).
COST_BOUNDS = (1e-5, 3e-5, 1e-4, 3e-4, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
#: GenAI's advice for time per output token (OpenTelemetry semantic conventions).
TPOT_BOUNDS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("requests", "counter", REQUEST_LABELS, "ray_monitor_requests",
           "Requests finished, by outcome."),
    Metric("errors", "counter", REQUEST_LABELS, "ray_monitor_request_errors",
           "Requests that raised, or answered with an HTTP status of 500 or more."),
    Metric("latency_seconds", "histogram", REQUEST_LABELS, "ray_monitor_request_duration_seconds",
           "Time from the start of a request to its end (the last item for streams).", "s"),
    Metric("first_item_seconds", "histogram", REQUEST_LABELS,
           "ray_monitor_request_first_item_seconds",
           "Streaming methods: time from the start of a request to its first item (time to "
           "first token; rules may call it time_to_first_token_seconds).", "s"),
    Metric("time_per_output_token_seconds", "histogram", REQUEST_LABELS,
           "ray_monitor_time_per_output_token_seconds",
           "Streams: (last item - first item) / (output tokens - 1), items when tokens are "
           "unknown; one sample per stream.", "s", TPOT_BOUNDS),
    Metric("inter_item_seconds", "histogram", REQUEST_LABELS,
           "ray_monitor_stream_inter_item_seconds",
           "Streams: time between two consecutive items.", "s", TPOT_BOUNDS),
    Metric("stream_items", "histogram", REQUEST_LABELS, "ray_monitor_stream_items",
           "Streams: items per request.", "{item}", COUNT_BOUNDS),
    Metric("stream_items_per_second", "histogram", REQUEST_LABELS,
           "ray_monitor_stream_items_per_second",
           "Streams: items per second over the request.", "{item}/s", COUNT_BOUNDS),
    Metric("input_tokens", "counter", REQUEST_LABELS, "ray_monitor_input_tokens",
           "Prompt (input) tokens of requests whose usage is known."),
    Metric("output_tokens", "counter", REQUEST_LABELS, "ray_monitor_output_tokens",
           "Completion (output) tokens of requests whose usage is known."),
    Metric("queue_seconds", "histogram", REQUEST_LABELS, "ray_monitor_request_queue_seconds",
           "Handle calls: time from the caller handing the request to Ray Serve's router to "
           "its start in the replica (wall clocks of two processes; see the README on "
           "clock skew between nodes). Only requests whose caller carried its send time.",
           "s"),
    Metric("first_item_with_queue_seconds", "histogram", REQUEST_LABELS,
           "ray_monitor_request_first_item_with_queue_seconds",
           "Streams whose queue time is known: queue_seconds + first_item_seconds, the time "
           "to first token from the caller's send (rules may call it "
           "time_to_first_token_with_queue_seconds).", "s"),
    Metric("tenant_requests", "counter", TENANT_LABELS, "ray_monitor_tenant_requests",
           "Requests per tenant (top tenants, the rest as other) and model."),
    Metric("tenant_errors", "counter", TENANT_LABELS, "ray_monitor_tenant_errors",
           "Failed requests per tenant and model."),
    Metric("tenant_input_tokens", "counter", TENANT_LABELS, "ray_monitor_tenant_input_tokens",
           "Input tokens per tenant and model."),
    Metric("tenant_output_tokens", "counter", TENANT_LABELS, "ray_monitor_tenant_output_tokens",
           "Output tokens per tenant and model."),
    Metric("tenant_latency_seconds", "histogram", TENANT_LABELS,
           "ray_monitor_tenant_request_duration_seconds",
           "Request duration per tenant and model.", "s"),
    Metric("cost", "counter", COST_LABELS, "ray_monitor_cost",
           "Cost from the rule file's prices: section (in the prices' currency), per tenant "
           "and model: part=tokens the tokens used, part=gpu the GPU-seconds its replicas "
           "held (tenant \"\")."),
    Metric("request_cost", "histogram", TENANT_LABELS, "ray_monitor_request_cost",
           "Token cost of each request whose usage is known and whose model has a price, per "
           "tenant and model (in the prices' currency).", "", COST_BOUNDS),
    Metric("replica_gpu_seconds", "counter", GPU_SECONDS_LABELS, "ray_monitor_gpu_replica_seconds",
           "GPU time attributed to a replica: each GPU sample's interval, shared equally by "
           "the replicas with a process on that GPU.", "s"),
    Metric("inflight", "gauge", REQUEST_LABELS[:-1], "ray_monitor_inflight_requests",
           "Requests running in a replica."),
    Metric("cpu_percent", "gauge", REPLICA_LABELS, "ray_monitor_replica_cpu_percent",
           "CPU used by a replica's process, in percent of one core."),
    Metric("rss_bytes", "gauge", REPLICA_LABELS, "ray_monitor_replica_rss_bytes",
           "Resident memory of a replica's process.", "By"),
    Metric("loop_lag_seconds", "gauge", REPLICA_LABELS, "ray_monitor_replica_event_loop_lag_seconds",
           "How late the replica's event loop ran a timer.", "s"),
    Metric("longest_request_seconds", "gauge", REPLICA_LABELS,
           "ray_monitor_replica_longest_request_seconds",
           "Age of the oldest request still running in a replica.", "s"),
    Metric("hung_requests", "gauge", REPLICA_LABELS, "ray_monitor_replica_hung_requests",
           "Requests running longer than hang_threshold_s.")
    ,
    Metric("gpu_utilization", "gauge", GPU_LABELS, "ray_monitor_gpu_utilization_ratio",
           "Share of time a kernel ran on the GPU (0..1)."),
    Metric("gpu_memory_used_bytes", "gauge", GPU_LABELS, "ray_monitor_gpu_memory_used_bytes",
           "GPU memory in use.", "By"),
    Metric("gpu_memory_total_bytes", "gauge", GPU_LABELS, "ray_monitor_gpu_memory_total_bytes",
           "GPU memory in all.", "By"),
    Metric("gpu_memory_utilization", "gauge", GPU_LABELS, "ray_monitor_gpu_memory_used_ratio",
           "Share of GPU memory in use (0..1)."),
    Metric("gpu_temperature_celsius", "gauge", GPU_LABELS, "ray_monitor_gpu_temperature_celsius",
           "GPU die temperature.", "Cel"),
    Metric("gpu_power_watts", "gauge", GPU_LABELS, "ray_monitor_gpu_power_watts",
           "GPU power draw.", "W"),
    Metric("gpu_throttled", "gauge", GPU_LABELS, "ray_monitor_gpu_throttled",
           "1 while the GPU's clocks are held down for a reason other than idling."),
    Metric("gpu_xid_errors", "counter", GPU_LABELS, "ray_monitor_gpu_xid_errors",
           "XID critical errors reported by the driver."),
    Metric("replica_gpu_memory_bytes", "gauge", GPU_REPLICA_LABELS,
           "ray_monitor_gpu_replica_memory_used_bytes", "GPU memory used by a replica.", "By"),
    Metric("replica_gpu_utilization", "gauge", GPU_REPLICA_LABELS,
           "ray_monitor_gpu_replica_utilization_ratio",
           "Share of the GPU's SMs a replica kept busy (0..1)."),
)}

#: Functions by the kinds of metric they accept. Counters: ``count``/``sum`` are the
#: increase over the window, ``rate`` that per second. Histograms: merged over the
#: window and the group. Gauges: ``avg``/``min``/``max`` over every sample of every
#: series in the group; ``last`` and ``sum`` add the series' latest values / averages
#: (the total in flight of a deployment); ``deriv`` is the least-squares slope per second.
FUNCTIONS: dict[str, frozenset[Kind]] = {
    "rate": frozenset({"counter", "histogram"}),
    "count": frozenset({"counter", "histogram", "gauge"}),
    "sum": frozenset({"counter", "histogram", "gauge"}),
    "avg": frozenset({"histogram", "gauge"}),
    "min": frozenset({"histogram", "gauge"}),
    "max": frozenset({"histogram", "gauge"}),
    "last": frozenset({"gauge"}),
    "deriv": frozenset({"gauge"}),
    "p50": frozenset({"histogram"}),
    "p90": frozenset({"histogram"}),
    "p95": frozenset({"histogram"}),
    "p99": frozenset({"histogram"}),
    "quantile": frozenset({"histogram"}),
    "error_ratio": frozenset({"counter"}),  # errors / requests, over `requests` or `errors`
    "ratio_above": frozenset({"histogram"}),  # share of observations above a threshold
    "zscore": frozenset({"counter", "histogram", "gauge"}),
    "absent_over_time": frozenset({"counter", "histogram", "gauge"}),
}

#: Prometheus' ``absent_over_time``: 1 when nothing matching reported in the window (see
#: :func:`absence_metric`); with ``by (application, deployment)``, per deployment Ray
#: Serve runs. The one function whose rule needs no comparison.
ABSENT = "absent_over_time"
#: Labels an ``absent_over_time(...) by (...)`` may group by: Serve knows deployments.
ABSENT_BY = ("application", "deployment")
#: Series written per request: a replica reports them with every snapshot (its
#: ``inflight`` gauge is the sample), even when no request finished.
REQUEST_METRICS = ("requests", "errors", "latency_seconds", "first_item_seconds", "inflight",
                   "time_per_output_token_seconds", "inter_item_seconds", "stream_items",
                   "stream_items_per_second", "input_tokens", "output_tokens", "queue_seconds",
                   "first_item_with_queue_seconds")
#: Request metrics fed by streams, token usage and queue times (SeriesDelta.genai).
GENAI_METRICS = REQUEST_METRICS[5:]
#: Per-tenant metrics, fed by ReplicaSnapshot.usage.
TENANT_METRICS = ("tenant_requests", "tenant_errors", "tenant_input_tokens",
                  "tenant_output_tokens", "tenant_latency_seconds", "cost", "request_cost")
#: Other names rules may use for a metric: GenAI's words for what the monitor measures.
ALIASES = {"time_to_first_token_seconds": "first_item_seconds",
           "time_to_first_item_seconds": "first_item_seconds",
           "time_to_first_token_with_queue_seconds": "first_item_with_queue_seconds"}


def absence_metric(metric: str) -> str:
    """The metric whose samples say that ``metric`` was reported: a request series is
    sampled by every report of its replica, which writes the ``inflight`` gauge of each
    method it knows; any other metric by its own samples."""
    return "inflight" if metric in REQUEST_METRICS else metric


def absent_labels(matchers) -> tuple[tuple[str, str], ...]:
    """The labels of ``absent_over_time``'s 1, as Prometheus makes them
    (``createLabelsForAbsentFunction``): each ``=`` matcher's label, in order, unless the
    label is matched again (then it is dropped); empty values are no label."""
    out: dict[str, str] = {}
    seen: set[str] = set()
    for m in matchers:
        if m.op == "=" and m.label not in seen:
            out[m.label] = m.value
            seen.add(m.label)
        else:
            out.pop(m.label, None)
    return tuple(sorted((k, v) for k, v in out.items() if v))

#: Labels of quality and drift series: per model, not per replica.
QUALITY_LABELS = ("application", "deployment", "model_version")


# -- what rules can ask for ----------------------------------------------------------------

@dataclass(frozen=True)
class QualityMetric:
    """A rule function over quality or drift data.

    ``kind == "quality"``: ``FUNC(predictions[W]) by (...)`` merges the group's
    :class:`~ray_monitor.quality.metrics.QualityAccumulator` buckets in the window and reads :meth:`~ray_monitor.quality.metrics.QualityAccumulator.value`.
    ``kind == "drift"``: ``FUNC(feature_<name>[W])`` or ``FUNC(prediction[W])`` merges the
    window's :class:`~ray_monitor.quality.drift.FeatureCounts` of one model and reads
    :meth:`~ray_monitor.quality.drift.DriftMonitor.value`.
    """

    name: str
    kind: str  # "quality" | "drift"
    prometheus: str
    help: str


QUALITY_METRICS: dict[str, QualityMetric] = {m.name: m for m in (
    QualityMetric("accuracy", "quality", "ray_monitor_model_accuracy_ratio",
                  "Share of labelled predictions whose class was right."),
    *(QualityMetric(f"{name}{suffix}", "quality", f"ray_monitor_model_{name}{suffix}_ratio",
                    f"{title}, {avg} over the classes (scikit-learn, zero_division=0).")
      for name, title in (("precision", "Precision"), ("recall", "Recall"), ("f1", "F1 score"))
      for suffix, avg in (("", "macro average"), ("_weighted", "average weighted by true count"),
                          ("_binary", "of the positive class"))),
    QualityMetric("roc_auc", "quality", "ray_monitor_model_roc_auc_ratio",
                  "Binary ROC AUC of the positive class's score (1/1000 score bins)."),
    QualityMetric("label_coverage", "quality", "ray_monitor_model_label_coverage_ratio",
                  "Share of the predictions made in the window that have ground truth by now."),
    QualityMetric("labeled", "quality", "ray_monitor_model_labeled_predictions",
                  "Predictions made in the window that have ground truth by now."),
    QualityMetric("mae", "quality", "ray_monitor_model_mean_absolute_error",
                  "Mean absolute error of regression predictions."),
    QualityMetric("rmse", "quality", "ray_monitor_model_root_mean_squared_error",
                  "Root mean squared error of regression predictions."),
    QualityMetric("psi", "drift", "ray_monitor_drift_psi",
                  "Population stability index against the reference (10 quantile bins)."),
    QualityMetric("js", "drift", "ray_monitor_drift_jensen_shannon",
                  "Jensen-Shannon distance (base 2, 0..1) against the reference."),
    QualityMetric("ks", "drift", "ray_monitor_drift_ks",
                  "Two-sample Kolmogorov-Smirnov D against the reference (numbers only)."),
)}


#: Functions over model quality and drift, answered by the aggregator's quality store:
#: ``accuracy(predictions[1h])``, ``psi(feature_age[1h])``, ``js(prediction[1h])``.
MODEL_FUNCTIONS = QUALITY_METRICS
#: Labels of quality and drift series: per model, not per replica.
MODEL_LABELS = QUALITY_LABELS
#: The metric quality functions read, the model's output, and the prefix of input features.
PREDICTIONS = "predictions"
PREDICTION = "prediction"
FEATURE_PREFIX = "feature_"


def is_model_query(function: str, metric: str) -> bool:
    """Whether a query goes to the quality store rather than the window store."""
    return (function in MODEL_FUNCTIONS or metric in (PREDICTIONS, PREDICTION)
            or metric.startswith(FEATURE_PREFIX))


#: Quantile of the pN shorthands.
SHORTHAND_QUANTILES = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}


@dataclass(frozen=True)
class Query:
    """``FUNCTION(METRIC{matchers}[WINDOW]) by (LABELS)`` after parsing.

    ``param`` is the quantile for ``quantile`` and the threshold for ``ratio_above``.
    ``by`` is ``None`` when the rule gave no ``by``: everything is aggregated into one
    series with no labels. ``window_s`` is in seconds.
    """

    function: str
    metric: str
    window_s: float
    by: Optional[tuple[str, ...]] = None
    matchers: tuple[Matcher, ...] = field(default_factory=tuple)
    param: Optional[float] = None
