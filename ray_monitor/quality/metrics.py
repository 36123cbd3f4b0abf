"""Runs in the aggregator: mergeable per-window accumulators of model quality, and the
metrics read from them (accuracy, precision, recall, F1, ROC AUC, MAE, RMSE).

Per ``(application, deployment, model_version)`` and time bucket the aggregator keeps a
:class:`QualityAccumulator`: it counts the predictions (:meth:`~QualityAccumulator.add_prediction`)
and the outcomes of the feedback join (:meth:`~QualityAccumulator.add_outcome`, see
:mod:`ray_monitor.quality.feedback`), both placed at the *prediction's* time, so a window
means "predictions made in the window, with the labels that have arrived for them by now".
Accumulators merge by adding, like the store's other buckets, and
:meth:`QualityAccumulator.value` reads any metric of
:data:`~ray_monitor.common.catalog.QUALITY_METRICS`.

Definitions follow scikit-learn with ``zero_division=0``: the classes are every label seen
as truth or prediction; precision of a class never predicted, recall of a class never
true, and F1 with ``2tp + fp + fn == 0`` are 0. ``macro`` is the unweighted mean over the
classes, ``weighted`` the mean weighted by each class's true count, ``binary`` the
positive class's own value (scikit-learn's ``average="binary"`` with two classes,
one-vs-rest with more).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np

from ray_monitor.common.catalog import QUALITY_METRICS
from ray_monitor.quality.feedback import LabeledOutcome
from ray_monitor.quality.prediction import Prediction

__all__ = ["ClassificationCounts", "ScoreHistogram", "RegressionSums", "QualityAccumulator",
           "SCORE_BINS"]

#: Equal score bins of :class:`ScoreHistogram` (bin ``k`` is centred on ``k / SCORE_BINS``).
SCORE_BINS = 1000

_AVERAGES = ("macro", "weighted", "binary")
_SCORES = ("precision", "recall", "f1")


class ClassificationCounts:
    """Confusion counts per ``(true, predicted)`` label pair; merge by adding."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: Optional[Mapping[tuple[str, str], int]] = None) -> None:
        self.pairs: dict[tuple[str, str], int] = dict(pairs or {})

    def add(self, true: str, predicted: str, n: int = 1) -> None:
        key = (true, predicted)
        self.pairs[key] = self.pairs.get(key, 0) + n

    def merge(self, other: "ClassificationCounts") -> "ClassificationCounts":
        """Adds ``other`` into this one and returns it."""
        for key, n in other.pairs.items():
            self.pairs[key] = self.pairs.get(key, 0) + n
        return self

    @property
    def n(self) -> int:
        return sum(self.pairs.values())

    def labels(self) -> list[str]:
        """Every label seen as truth or prediction, sorted (scikit-learn's ``unique_labels``)."""
        return sorted({t for t, _ in self.pairs} | {p for _, p in self.pairs})

    def accuracy(self) -> Optional[float]:
        n = self.n
        return sum(c for (t, p), c in self.pairs.items() if t == p) / n if n else None

    def per_class(self) -> dict[str, tuple[float, float, float, int]]:
        """``label -> (precision, recall, f1, support)`` with ``zero_division=0``."""
        tp: dict[str, int] = {}
        predicted: dict[str, int] = {}
        true: dict[str, int] = {}
        for (t, p), c in self.pairs.items():
            true[t] = true.get(t, 0) + c
            predicted[p] = predicted.get(p, 0) + c
            if t == p:
                tp[t] = tp.get(t, 0) + c
        out = {}
        for label in self.labels():
            k, np_, nt = tp.get(label, 0), predicted.get(label, 0), true.get(label, 0)
            precision = k / np_ if np_ else 0.0
            recall = k / nt if nt else 0.0
            denom = np_ + nt  # 2tp + fp + fn
            out[label] = (precision, recall, 2 * k / denom if denom else 0.0, nt)
        return out

    def positive(self, positive_label: Optional[str] = None) -> Optional[str]:
        """The positive class: as given, else the larger of exactly two labels (as
        scikit-learn picks it); ``None`` when that cannot be told."""
        if positive_label is not None:
            return positive_label
        labels = self.labels()
        return labels[1] if len(labels) == 2 else None

    def score(self, metric: str, average: str = "macro",
              positive_label: Optional[str] = None) -> Optional[float]:
        """``precision``, ``recall`` or ``f1`` averaged ``macro``, ``weighted`` or
        ``binary``; ``None`` without data (or, for ``binary``, without a positive class)."""
        if metric not in _SCORES:
            raise ValueError(f"metric must be one of {_SCORES}, got {metric!r}")
        i = _SCORES.index(metric)
        if average not in _AVERAGES:
            raise ValueError(f"average must be one of {_AVERAGES}, got {average!r}")
        if not self.pairs:
            return None
        per = self.per_class()
        if average == "binary":
            pos = self.positive(positive_label)
            if pos is None:
                return None
            return per[pos][i] if pos in per else 0.0
        if average == "macro":
            return sum(v[i] for v in per.values()) / len(per)
        support = sum(v[3] for v in per.values())
        return sum(v[i] * v[3] for v in per.values()) / support


class ScoreHistogram:
    """Scores of the positive class, counted per true label over ``SCORE_BINS + 1`` bins.

    Bin ``k`` holds scores in ``[(k - 0.5) / B, (k + 0.5) / B)`` (``B = SCORE_BINS``), so
    scores given to three decimals fall exactly on bin centres. ROC AUC counts each
    (positive, negative) pair in different bins as ordered by the bins and each pair in
    the same bin as a tie (1/2, the midrank rule): that equals scikit-learn's
    ``roc_auc_score`` exactly when scores are multiples of ``1/B``, and is otherwise within
    :meth:`auc_error_bound` = half the share of (positive, negative) pairs that share a bin
    (at most ``0.5 * max_k negatives_k / N``). Merge by adding.
    """

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, dict[int, int]] = {}  # true label -> bin -> count (sparse)

    def add(self, true: str, score: float, n: int = 1) -> None:
        k = int(score * SCORE_BINS + 0.5)
        bins = self.counts.setdefault(true, {})
        bins[k] = bins.get(k, 0) + n

    def merge(self, other: "ScoreHistogram") -> "ScoreHistogram":
        for label, bins in other.counts.items():
            mine = self.counts.setdefault(label, {})
            for k, n in bins.items():
                mine[k] = mine.get(k, 0) + n
        return self

    def _split(self, positive_label: Optional[str]) -> Optional[tuple[np.ndarray, np.ndarray]]:
        labels = sorted(self.counts)
        if positive_label is None:
            if len(labels) != 2:
                return None
            positive_label = labels[1]
        pos, neg = np.zeros(SCORE_BINS + 1), np.zeros(SCORE_BINS + 1)
        for label, bins in self.counts.items():
            target = pos if label == positive_label else neg
            for k, n in bins.items():
                target[k] += n
        if not pos.sum() or not neg.sum():
            return None  # one class only: AUC is undefined (scikit-learn raises)
        return pos, neg

    def roc_auc(self, positive_label: Optional[str] = None) -> Optional[float]:
        """Binary ROC AUC (one-vs-rest for ``positive_label`` among more classes)."""
        split = self._split(positive_label)
        if split is None:
            return None
        pos, neg = split
        below = np.cumsum(neg) - neg
        return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))

    def auc_error_bound(self, positive_label: Optional[str] = None) -> Optional[float]:
        """Largest possible difference from the exact ROC AUC of the unbinned scores."""
        split = self._split(positive_label)
        if split is None:
            return None
        pos, neg = split
        return float(0.5 * (pos * neg).sum() / (pos.sum() * neg.sum()))


class RegressionSums:
    """``n``, sum of absolute errors and of squared errors; merge by adding."""

    __slots__ = ("n", "abs_err", "sq_err")

    def __init__(self) -> None:
        self.n, self.abs_err, self.sq_err = 0, 0.0, 0.0

    def add(self, true: float, predicted: float) -> None:
        e = predicted - true
        self.n += 1
        self.abs_err += abs(e)
        self.sq_err += e * e

    def merge(self, other: "RegressionSums") -> "RegressionSums":
        self.n += other.n
        self.abs_err += other.abs_err
        self.sq_err += other.sq_err
        return self

    def mae(self) -> Optional[float]:
        return self.abs_err / self.n if self.n else None

    def rmse(self) -> Optional[float]:
        return math.sqrt(self.sq_err / self.n) if self.n else None


class QualityAccumulator:
    """Everything the quality metrics need for one model over one time bucket.

    ``predictions`` counts predictions made in the bucket, ``labeled`` those of them
    joined with truth: place both by the prediction's time (see the module docstring), so
    ``label_coverage`` is at most 1. ``positive_label`` is the first one a prediction
    carried (a model version has one).
    """

    __slots__ = ("predictions", "labeled", "classes", "scores", "regression", "positive_label")

    def __init__(self) -> None:
        self.predictions = 0
        self.labeled = 0
        self.classes = ClassificationCounts()
        self.scores = ScoreHistogram()
        self.regression = RegressionSums()
        self.positive_label: Optional[str] = None

    def add_prediction(self, pred: Prediction) -> None:
        self.predictions += 1
        if self.positive_label is None:
            self.positive_label = pred.positive_label

    def add_outcome(self, outcome: LabeledOutcome) -> None:
        p = outcome.prediction
        self.labeled += 1
        if self.positive_label is None:
            self.positive_label = p.positive_label
        if outcome.label is not None and p.label is not None:
            self.classes.add(outcome.label, p.label)
            if p.score is not None:
                self.scores.add(outcome.label, p.score)
        elif outcome.value is not None and p.value is not None:
            self.regression.add(outcome.value, p.value)

    def merge(self, other: "QualityAccumulator") -> "QualityAccumulator":
        """Adds ``other`` into this one and returns it."""
        self.predictions += other.predictions
        self.labeled += other.labeled
        self.classes.merge(other.classes)
        self.scores.merge(other.scores)
        self.regression.merge(other.regression)
        if self.positive_label is None:
            self.positive_label = other.positive_label
        return self

    def value(self, metric: str, *, positive_label: Optional[str] = None) -> Optional[float]:
        """A metric of :data:`~ray_monitor.common.catalog.QUALITY_METRICS` (``kind == "quality"``); ``None`` when the
        window has no data for it (rules then see no series, never 0)."""
        pos = positive_label if positive_label is not None else self.positive_label
        if metric == "label_coverage":
            return self.labeled / self.predictions if self.predictions else None
        if metric == "labeled":
            return float(self.labeled)
        if metric == "accuracy":
            return self.classes.accuracy()
        if metric == "roc_auc":
            return self.scores.roc_auc(pos)
        if metric == "mae":
            return self.regression.mae()
        if metric == "rmse":
            return self.regression.rmse()
        name, _, average = metric.partition("_")
        if name in _SCORES and average in ("", "weighted", "binary"):
            return self.classes.score(name, average or "macro", pos)
        raise ValueError(f"unknown quality metric {metric!r}; one of "
                         f"{sorted(k for k, m in QUALITY_METRICS.items() if m.kind == 'quality')}")
