"""The replica's request metrics as OTLP metrics, built from the recorder's snapshots.

Runs in every replica, on its flush thread.

No OpenTelemetry instrument sits on the request path: the flush thread folds each
delta snapshot into cumulative series and, every ``OTEL_METRIC_EXPORT_INTERVAL`` ms
(the SDK's variable, default 60000), hands them to the standard OTLP metric exporter
(``OTEL_EXPORTER_OTLP_*``) on an :class:`~ray_monitor.replica.export_worker.ExportWorker`
thread: an endpoint that is down delays only that thread, never the flush that delivers
snapshots to the aggregator. Our histogram buckets are OTLP's exponential buckets at
scale 6, so they are sent as they are. HTTP ingress routes use the semantic
conventions' ``http.server.request.duration``; handle methods use
``ray_monitor.request.duration``.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from opentelemetry.sdk.metrics.export import (AggregationTemporality, Buckets,
                                              ExponentialHistogram,
                                              ExponentialHistogramDataPoint, Gauge, Metric,
                                              MetricExporter, MetricExportResult, MetricsData,
                                              NumberDataPoint, ResourceMetrics, ScopeMetrics,
                                              Sum)
from opentelemetry.sdk.metrics._internal.exemplar import Exemplar as OtelExemplar
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from ray_monitor.common import env
from ray_monitor.common.histogram import SCALE, Histogram
from ray_monitor.common.snapshot import ReplicaIdentity, ReplicaSnapshot
from ray_monitor.replica.export_worker import ExportWorker, quiet_otel_export_logs
from ray_monitor.replica.otlp_genai import GenAIMetrics
from ray_monitor.replica.otlp_refusal import RefusalGuard

__all__ = ["OtlpMetrics", "otlp_metrics_configured"]

logger = logging.getLogger(__name__)
#: Route labels start with one of these (the standard methods and OTel's ``_OTHER``).
_HTTP_VERBS = ("GET ", "POST ", "PUT ", "DELETE ", "PATCH ", "HEAD ", "OPTIONS ", "CONNECT ",
               "TRACE ", "_OTHER ")
#: Export timeout when OTEL_EXPORTER_OTLP_[METRICS_]TIMEOUT is not set: never longer than
#: an export interval, so a dead endpoint holds at most one export in flight.
MAX_TIMEOUT_S = 10.0


def otlp_metrics_configured() -> bool:
    if env.OTEL_SDK_DISABLED.get() or env.OTEL_METRICS_EXPORTER.get() == "none":
        return False
    return env.OTLP_METRICS_ENDPOINT.is_set() or env.OTLP_ENDPOINT.is_set()


def otlp_metric_exporter(interval_s: Optional[float] = None) -> MetricExporter:
    protocol = env.OTLP_METRICS_PROTOCOL.get() or env.OTLP_PROTOCOL.get()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    if env.OTLP_METRICS_TIMEOUT.is_set() or env.OTLP_TIMEOUT.is_set():
        exporter = OTLPMetricExporter()  # the user's timeout, read by the SDK
    else:
        interval_s = _interval_s() if interval_s is None else interval_s
        exporter = OTLPMetricExporter(timeout=max(1.0, min(MAX_TIMEOUT_S, interval_s)))
    # A backend that takes traces but not metrics (Phoenix) is told once, then left alone.
    return RefusalGuard(exporter, "metrics", MetricExportResult.SUCCESS)


def _interval_s() -> float:
    return max(env.OTEL_METRIC_EXPORT_INTERVAL.get() / 1000.0, 0.1)


class OtlpMetrics:
    """``on_flush`` hook of the recorder: accumulate, and export when the interval is due."""

    def __init__(self, identity: ReplicaIdentity, *, exporter: Optional[MetricExporter] = None,
                 interval_s: Optional[float] = None, clock=time.time, on_failure=None) -> None:
        self.identity = identity
        self.interval_s = _interval_s() if interval_s is None else interval_s
        self.exporter = exporter or otlp_metric_exporter(self.interval_s)
        self.clock = clock
        quiet_otel_export_logs()
        self.worker = ExportWorker(self._send, what="otlp_metrics_export", on_failure=on_failure)
        self.start_ns = time.time_ns()
        self._next = clock() + self.interval_s
        # (method, outcome) -> [requests, errors, latency Histogram, first-item Histogram|None, exemplars]
        self._series: dict[tuple[str, str], list] = {}
        self._inflight: dict[str, int] = {}
        self.genai = GenAIMetrics()  # gen_ai.* of streams and token usage
        self.resource = Resource.create({
            "service.name": env.OTEL_SERVICE_NAME.get()
            or identity.application or identity.deployment,
            "service.instance.id": identity.replica, "ray.node.id": identity.node_id,
            "ray.serve.deployment": identity.deployment,
            "ray.serve.application": identity.application})

    def __call__(self, snap: ReplicaSnapshot) -> None:
        for s in snap.series:
            cur = self._series.get((s.method, s.outcome))
            if cur is None:
                cur = self._series[(s.method, s.outcome)] = [0, 0, Histogram(), None, {}]
            cur[0] += s.latency.count
            cur[1] += s.latency.count if s.error else 0
            cur[2].merge(s.latency)
            if s.first_item is not None:
                cur[3] = (cur[3] or Histogram()).merge(s.first_item)
            cur[4].update(s.exemplars)
        self._inflight = dict(snap.inflight)
        self.genai.add(snap)
        now = self.clock()
        if now >= self._next:
            self._next = now + self.interval_s
            # Built here (the series change on this thread), sent on the worker's.
            self.worker.submit(self.metrics_data())

    def _attrs(self, method: str, outcome: Optional[str] = None) -> dict:
        ident = self.identity
        a = {"application": ident.application, "deployment": ident.deployment,
             "replica": ident.replica, "method": method, "model_version": ident.model_version}
        if outcome is not None:
            a["outcome"] = outcome
        if method.startswith(_HTTP_VERBS):
            verb, _, route = method.partition(" ")
            a["http.request.method"], a["http.route"] = verb, route
            if outcome is not None and outcome.isdigit():
                a["http.response.status_code"] = int(outcome)
        return a

    def metrics_data(self) -> MetricsData:
        now_ns = time.time_ns()
        t0 = self.start_ns
        cum = AggregationTemporality.CUMULATIVE
        req, err, dur, http_dur, first = [], [], [], [], []
        for (method, outcome), (n, e, h, f, ex) in self._series.items():
            attrs = self._attrs(method, outcome)
            req.append(NumberDataPoint(attrs, t0, now_ns, n))
            err.append(NumberDataPoint(attrs, t0, now_ns, e))
            point = _exp_point(attrs, t0, now_ns, h, ex)
            (http_dur if method.startswith(_HTTP_VERBS) else dur).append(point)
            if f is not None:
                first.append(_exp_point(attrs, t0, now_ns, f, {}))
        inflight = [NumberDataPoint(self._attrs(m), t0, now_ns, v)
                    for m, v in self._inflight.items()]
        metrics = [
            Metric("ray_monitor.requests", "Requests finished, by outcome.", "{request}",
                   Sum(req, cum, True)),
            Metric("ray_monitor.request.errors", "Requests that failed.", "{request}",
                   Sum(err, cum, True)),
            Metric("ray_monitor.requests.inflight", "Requests running.", "{request}",
                   Gauge(inflight)),
        ]
        if dur:
            metrics.append(Metric("ray_monitor.request.duration", "Request duration.", "s",
                                  ExponentialHistogram(dur, cum)))
        if http_dur:
            metrics.append(Metric("http.server.request.duration",
                                  "Duration of HTTP server requests.", "s",
                                  ExponentialHistogram(http_dur, cum)))
        if first:
            metrics.append(Metric("ray_monitor.request.first_item.duration",
                                  "Streaming: time to the first item.", "s",
                                  ExponentialHistogram(first, cum)))
        metrics.extend(self.genai.metrics(t0, now_ns, self._attrs, _exp_point))
        scope = ScopeMetrics(InstrumentationScope("ray_monitor"), metrics, "")
        return MetricsData([ResourceMetrics(self.resource, [scope], "")])

    def _send(self, data: MetricsData):
        return self.exporter.export(data)

    def export(self) -> None:
        """Exports the series now, in the caller's thread."""
        self._send(self.metrics_data())

    def shutdown(self, timeout: float = 2.0) -> None:
        self.worker.close(timeout)
        self.exporter.shutdown()


def _exp_point(attrs: dict, t0: int, now_ns: int, h: Histogram,
               exemplars: dict) -> ExponentialHistogramDataPoint:
    offset, counts = h.dense()
    ex = [OtelExemplar({}, e.value, int(e.timestamp * 1e9), int(e.span_id, 16),
                       int(e.trace_id, 16)) for e in list(exemplars.values())[-10:]]
    return ExponentialHistogramDataPoint(
        attributes=attrs, start_time_unix_nano=t0, time_unix_nano=now_ns, count=h.count,
        sum=h.sum, scale=SCALE, zero_count=h.zero_count, positive=Buckets(offset, counts),
        negative=Buckets(0, []), flags=0, min=h.min if h.count else 0.0,
        max=h.max if h.count else 0.0, exemplars=ex)
