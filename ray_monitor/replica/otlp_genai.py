"""The GenAI semantic-convention metrics of a replica's streams and token usage, for OTLP.

Runs in every replica, on its flush thread (see :mod:`ray_monitor.replica.otlp_metrics`,
which calls :meth:`GenAIMetrics.add` per snapshot and :meth:`GenAIMetrics.metrics` per export).

Names and units after OpenTelemetry's GenAI semantic conventions (Development status):
``gen_ai.server.time_to_first_token`` and ``gen_ai.server.time_per_output_token`` (s),
``gen_ai.client.token.usage`` ({token}, one point per ``gen_ai.token.type``: ``input`` /
``output``), each with the method's labels plus ``gen_ai.operation.name`` (``chat`` or
``text_completion`` when the route says so, else ``generate_content``),
``gen_ai.provider.name`` ``ray.serve`` (a custom value: the spec reserves ``openai`` for
OpenAI's own telemetry flavour) and ``gen_ai.request.model`` when the responses named a
model (the last one this replica saw).

Queue time (:mod:`ray_monitor.replica.queueing`) goes with them, in the monitor's own
namespace (GenAI's conventions name no queue metric), with the method's labels only:
``ray_monitor.request.queue.duration`` (s; any request whose caller sent its time) and
``ray_monitor.request.first_item_with_queue.duration`` (s; streams: queue + first item).
"""

from __future__ import annotations

from typing import Callable

from opentelemetry.sdk.metrics.export import AggregationTemporality, ExponentialHistogram, Metric

from ray_monitor.common.histogram import Histogram
from ray_monitor.common.snapshot import ReplicaSnapshot

__all__ = ["GenAIMetrics", "PROVIDER"]

PROVIDER = "ray.serve"
_TTFT, _TPOT, _IN, _OUT, _QUEUE, _FIRST_Q = range(6)


def _operation(method: str) -> str:
    if "chat" in method:
        return "chat"
    return "text_completion" if "completion" in method else "generate_content"


class GenAIMetrics:
    """Cumulative GenAI histograms per (method, outcome), from the snapshots' deltas."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], list] = {}
        self.model = ""

    def add(self, snap: ReplicaSnapshot) -> None:
        for s in snap.series:
            g = s.genai
            if g is None:
                continue
            cur = self._series.get((s.method, s.outcome))
            if cur is None:
                cur = self._series[(s.method, s.outcome)] = [None] * 6
            for i, h in ((_TTFT, s.first_item), (_TPOT, g.time_per_token),
                         (_IN, g.input_tokens), (_OUT, g.output_tokens), (_QUEUE, g.queue),
                         (_FIRST_Q, g.first_with_queue)):
                if h is not None and h.count:
                    cur[i] = (cur[i] or Histogram()).merge(h)
        for u in snap.usage:
            if u.model:
                self.model = u.model

    def metrics(self, t0: int, now_ns: int, attrs: Callable[[str, str], dict],
                point: Callable) -> list[Metric]:
        """The GenAI metrics; ``attrs(method, outcome)`` gives a series' attributes and
        ``point(attrs, t0, now_ns, histogram, exemplars)`` its data point."""
        points: list[list] = [[], [], [], [], []]
        for (method, outcome), hs in self._series.items():
            plain = attrs(method, outcome)
            for i in (_QUEUE, _FIRST_Q):
                if hs[i] is not None:
                    points[i - 1].append(point(plain, t0, now_ns, hs[i], {}))
            if all(h is None for h in hs[:4]):  # a queue time only: not a GenAI request
                continue
            a = {**plain, "gen_ai.operation.name": _operation(method),
                 "gen_ai.provider.name": PROVIDER}
            if self.model:
                a["gen_ai.request.model"] = self.model
            for i, h in enumerate(hs[:2]):
                if h is not None:
                    points[i].append(point(a, t0, now_ns, h, {}))
            for kind, h in (("input", hs[_IN]), ("output", hs[_OUT])):
                if h is not None:
                    points[2].append(point({**a, "gen_ai.token.type": kind}, t0, now_ns, h, {}))
        cum = AggregationTemporality.CUMULATIVE
        out = []
        for (name, desc, unit), pts in zip((
                ("gen_ai.server.time_to_first_token", "Time to generate the first token.", "s"),
                ("gen_ai.server.time_per_output_token",
                 "Time per output token after the first (one sample per stream).", "s"),
                ("gen_ai.client.token.usage", "Tokens used per request.", "{token}"),
                ("ray_monitor.request.queue.duration", "Time from the caller's send to the "
                 "request's start in the replica.", "s"),
                ("ray_monitor.request.first_item_with_queue.duration",
                 "Streams: queue time plus time to the first item.", "s")), points):
            if pts:
                out.append(Metric(name, desc, unit, ExponentialHistogram(pts, cum)))
        return out
