"""The aggregator's model-quality and drift data over time.

Runs in the aggregator actor. :class:`QualityStore` receives the predictions that replicas
capture and the ground-truth feedback that users send; it joins them
(:class:`~ray_monitor.quality.feedback.FeedbackJoin`) and keeps, per model
(``application``, ``deployment``, ``model_version``) and time bucket, one
:class:`~ray_monitor.quality.metrics.QualityAccumulator` and the drift counts of
:class:`~ray_monitor.quality.drift.FeatureCounts`. Rules read it through
:meth:`QualityStore.evaluate`, with the same :class:`~ray_monitor.common.catalog.Query`
the window store answers.

Time. A prediction, and the outcome its feedback makes later, are placed at the
*prediction's* time (clamped to the store's clock), so ``accuracy(predictions[1h])`` means
"predictions made in the last hour, with the labels that have arrived for them by now".
Buckets come at two resolutions (5 s for 10 min, 60 s for 6 h, by default) and every
observation goes into both; a query reads the finest resolution whose span covers its
window and takes the buckets whose start lies in ``(now - window, now]``. Buckets exist
only where there was data; past the coarsest span they are dropped. Feedback for a
prediction older than that still joins (and counts in the join's statistics) but lands in
no window.

Groups. Quality metrics merge the accumulators of every model in a group, so
``accuracy(predictions[1h]) by (deployment)`` is the accuracy over all its versions. Drift
compares each model with its own reference; a group's drift value is the largest of its
models' values, so a rule fires when any model in the group drifts.

References. A metric's reference is the first ``reference_size`` observations a model
makes (see :class:`~ray_monitor.quality.drift.DriftMonitor`), unless one is set with
:meth:`QualityStore.set_references` (e.g. the training data).

Figures. :meth:`QualityStore.figures` gathers one version's figures for the comparison of
two versions (:mod:`~ray_monitor.quality.compare`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Mapping, Optional

from ray_monitor.common.catalog import QUALITY_LABELS, QUALITY_METRICS, Query
from ray_monitor.common.matchers import matches_all
from ray_monitor.quality.drift import DriftMonitor, FeatureCounts
from ray_monitor.quality.feedback import FeedbackJoin, FeedbackResult, LabeledOutcome
from ray_monitor.quality.metrics import QualityAccumulator
from ray_monitor.quality.prediction import Prediction

__all__ = ["DEFAULT_RESOLUTIONS", "GAUGE_WINDOW_S", "QualityStore"]

#: (step seconds, buckets kept): 5 s for 10 minutes, 60 s for 6 hours.
DEFAULT_RESOLUTIONS = ((5.0, 120), (60.0, 360))
#: The window of the quality and drift gauges on /metrics and of ``GET /api/v1/quality``.
GAUGE_WINDOW_S = 3600.0

ModelKey = tuple[str, str, str]  # application, deployment, model_version
GroupKey = tuple[tuple[str, str], ...]


class _Bucket:
    __slots__ = ("quality", "drift")

    def __init__(self) -> None:
        self.quality = QualityAccumulator()
        self.drift = FeatureCounts()


class _Model:
    """One model's buckets per resolution and its drift references."""

    __slots__ = ("rings", "drift")

    def __init__(self, resolutions: int, drift: DriftMonitor) -> None:
        self.rings: list[dict[int, _Bucket]] = [{} for _ in range(resolutions)]
        self.drift = drift


class QualityStore:
    """Predictions, feedback, quality accumulators and drift counts, in time buckets.

    Not thread-safe: the aggregator calls it from one thread.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time, horizon_s: float = 3600.0,
                 max_pending: int = 100_000, early_grace_s: float = 10.0,
                 reference_size: int = 1000, min_observations: int = 30,
                 resolutions: tuple[tuple[float, int], ...] = DEFAULT_RESOLUTIONS) -> None:
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        res = tuple((float(step), int(slots)) for step, slots in resolutions)
        if not res or any(step <= 0 or slots < 1 for step, slots in res) or any(
                a[0] * a[1] > b[0] * b[1] for a, b in zip(res, res[1:])):
            raise ValueError("resolutions must be (step seconds > 0, buckets >= 1) pairs with "
                             f"spans that do not shrink, e.g. ((5, 120), (60, 360)); got {resolutions!r}")
        self._clock = clock
        self._res = res
        self.join = FeedbackJoin(horizon_s=horizon_s, max_pending=max_pending,
                                 early_grace_s=early_grace_s, clock=clock)
        self._drift_options = {"reference_size": reference_size,
                               "min_observations": min_observations}
        DriftMonitor(**self._drift_options)  # a bad option is refused now, not per model
        self._models: dict[ModelKey, _Model] = {}

    @property
    def max_window_s(self) -> float:
        step, slots = self._res[-1]
        return step * slots

    def _model(self, key: ModelKey) -> _Model:
        m = self._models.get(key)
        if m is None:
            m = self._models[key] = _Model(len(self._res), DriftMonitor(**self._drift_options))
        return m

    def _buckets(self, model: _Model, t: float, now: float) -> list[_Bucket]:
        """The bucket of time ``t`` in every resolution that still keeps it."""
        out = []
        for ring, (step, slots) in zip(model.rings, self._res):
            k = math.floor(t / step)
            if k > math.floor(now / step) - slots:
                b = ring.get(k)
                if b is None:
                    b = ring[k] = _Bucket()
                out.append(b)
        return out

    # -- writes ------------------------------------------------------------------------

    def add_predictions(self, preds: Iterable[Prediction]) -> None:
        """Counts captured predictions, their drift observations, and joins any feedback
        that is already waiting for them."""
        now = self._clock()
        preds = list(preds)
        batches: dict[tuple[ModelKey, int], list[Prediction]] = {}
        step = self._res[0][0]
        for p in preds:
            t = min(p.time, now)
            model_key = (p.application, p.deployment, p.model_version)
            for b in self._buckets(self._model(model_key), t, now):
                b.quality.add_prediction(p)
            batches.setdefault((model_key, math.floor(t / step)), []).append(p)
        for (model_key, k), batch in batches.items():
            model = self._models[model_key]
            counts = model.drift.observe(batch)
            if counts:
                for b in self._buckets(model, min(batch[0].time, now), now):
                    b.drift.merge(counts)
        self._add_outcomes(self.join.add_predictions(p for p in preds if p.request_id), now)

    def add_feedback(self, items: Iterable[Any], *, result: Optional[FeedbackResult] = None,
                     start: int = 0) -> FeedbackResult:
        """Joins ground truth (see :meth:`FeedbackJoin.add_feedback`, which also says how
        a batch comes in parts): never raises for a bad item; each item's fate is in the
        result."""
        before = len(result.outcomes) if result is not None else 0
        result = self.join.add_feedback(items, result=result, start=start)
        self._add_outcomes(result.outcomes[before:], self._clock())
        return result

    def _add_outcomes(self, outcomes: list[LabeledOutcome], now: float) -> None:
        for o in outcomes:
            p = o.prediction
            model = self._model((p.application, p.deployment, p.model_version))
            for b in self._buckets(model, min(p.time, now), now):
                b.quality.add_outcome(o)

    def set_references(self, application: str, deployment: str, model_version: str,
                       references: Mapping[str, Any]) -> dict[str, dict]:
        """Sets drift references of one model (``{metric: values or Reference JSON}``, as
        :meth:`DriftMonitor.set_references`); returns each reference's kind and bins."""
        for name, v in (("application", application), ("deployment", deployment),
                        ("model_version", model_version)):
            if not isinstance(v, str):
                raise TypeError(f"{name} must be a string, got {type(v).__name__} {v!r:.60}")
        if not deployment:
            raise ValueError("deployment must name the deployment whose reference this is")
        drift = self._model((application, deployment, model_version)).drift
        drift.set_references(references)
        refs = drift.references()
        return {m: {"kind": refs[m].kind, "bins": refs[m].size, "observations": sum(refs[m].counts)}
                for m in references}

    def build_references(self, references: Mapping[str, Any]) -> dict:
        """References built and checked for :meth:`set_references`, touching no model
        (safe on another thread)."""
        return DriftMonitor(**self._drift_options).build_references(references)

    def expire(self, now: Optional[float] = None) -> None:
        """Drops buckets past each resolution's span, and models left with neither data
        nor references."""
        now = self._clock() if now is None else now
        for key, model in list(self._models.items()):
            for ring, (step, slots) in zip(model.rings, self._res):
                oldest = math.floor(now / step) - slots
                for k in [k for k in ring if k <= oldest]:
                    del ring[k]
            if not any(model.rings) and not model.drift.stats()["references"] \
                    and not model.drift.stats()["building"]:
                del self._models[key]

    # -- reads -------------------------------------------------------------------------

    def _span(self, window_s: float, now: float) -> tuple[int, int, int]:
        for ri, (step, slots) in enumerate(self._res):
            if step * slots >= window_s:
                break
        step, slots = self._res[ri]
        b = math.floor(now / step)
        return ri, max(math.floor((now - window_s) / step) + 1, b - slots + 1), b

    def window(self, key: ModelKey, window_s: float,
               now: Optional[float] = None) -> Optional[_Bucket]:
        """One model's buckets in the window, merged; None without any."""
        model = self._models.get(key)
        if model is None:
            return None
        now = self._clock() if now is None else now
        ri, a, b = self._span(window_s, now)
        merged, seen = _Bucket(), False
        for k, bucket in model.rings[ri].items():
            if a <= k <= b:
                merged.quality.merge(bucket.quality)
                merged.drift.merge(bucket.drift)
                seen = True
        return merged if seen else None

    def evaluate(self, query: Query, now: Optional[float] = None) -> dict[GroupKey, float]:
        """A quality or drift query's value per group; groups without data are absent."""
        metric = QUALITY_METRICS.get(query.function)
        if metric is None:
            raise ValueError(f"{query.function!r} is not a quality or drift function")
        if not query.window_s > 0:
            raise ValueError(f"query window_s must be > 0, got {query.window_s!r}")
        now = self._clock() if now is None else float(now)
        by = query.by or ()
        groups: dict[GroupKey, list[tuple[ModelKey, _Bucket]]] = {}
        for key in self._models:
            labels = dict(zip(QUALITY_LABELS, key))
            if not matches_all(query.matchers, labels):
                continue
            data = self.window(key, query.window_s, now)
            if data is None:
                continue
            gkey = tuple(sorted((name, labels.get(name, "")) for name in by))
            groups.setdefault(gkey, []).append((key, data))
        out: dict[GroupKey, float] = {}
        for gkey, members in groups.items():
            if metric.kind == "quality":
                acc = QualityAccumulator()
                for _, data in members:
                    acc.merge(data.quality)
                value = acc.value(query.function)
            else:
                values = [self._models[key].drift.value(query.function, query.metric, data.drift)
                          for key, data in members]
                values = [v for v in values if v is not None]
                value = max(values) if values else None
            if value is not None and math.isfinite(value):
                out[gkey] = float(value)
        return out

    def summary(self, window_s: float = GAUGE_WINDOW_S,
                now: Optional[float] = None) -> list[dict]:
        """Per model over the window: every quality metric with data, and each drift
        metric's ``n``, ``psi``, ``js`` and ``ks``; for the API and the /metrics gauges."""
        now = self._clock() if now is None else now
        out = []
        for key in sorted(self._models):
            data = self.window(key, window_s, now)
            model = self._models[key]
            if data is None and not model.drift.stats()["references"]:
                continue
            acc = data.quality if data is not None else QualityAccumulator()
            quality = {name: acc.value(name) for name, m in QUALITY_METRICS.items()
                       if m.kind == "quality"}
            out.append({**dict(zip(QUALITY_LABELS, key)), "window_s": window_s,
                        "predictions": acc.predictions,
                        "quality": {k: v for k, v in quality.items() if v is not None},
                        "drift": model.drift.statistics(data.drift if data is not None
                                                        else FeatureCounts()),
                        "drift_building": model.drift.stats()["building"]})
        return out

    def figures(self, *, deployment: str, model_version: str, window_s: float,
                application: Optional[str] = None, now: Optional[float] = None) -> dict:
        """Quality figures of one version (all its applications unless one is named),
        for :func:`~ray_monitor.quality.compare.compare_versions`."""
        now = self._clock() if now is None else now
        acc = QualityAccumulator()
        for key in self._models:
            if key[1] == deployment and key[2] == model_version and \
                    (application is None or key[0] == application):
                data = self.window(key, window_s, now)
                if data is not None:
                    acc.merge(data.quality)
        n = acc.classes.n
        correct = sum(c for (t, p), c in acc.classes.pairs.items() if t == p)
        out = {"predictions": acc.predictions, "labeled_classes": n, "correct": correct}
        for name in ("accuracy", "label_coverage", "f1", "roc_auc", "mae", "rmse"):
            out[name] = acc.value(name)
        return out

    def stats(self) -> dict[str, int]:
        """The join's counters and gauges, and how many models and buckets are held."""
        return {**self.join.stats(), "models": len(self._models),
                "buckets": sum(len(r) for m in self._models.values() for r in m.rings)}
