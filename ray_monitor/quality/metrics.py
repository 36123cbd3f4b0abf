"""Model quality from late ground truth: captured predictions, the feedback join, and
mergeable per-window accumulators for accuracy, precision, recall, F1, ROC AUC, MAE, RMSE.

Flow. The middleware runs the user's extractor on a method's result, checks it with
:func:`validate_extractor_result` (counting, never raising, at request time) and ships a
:class:`Prediction` to the aggregator. The aggregator feeds predictions and ground-truth
feedback to one :class:`FeedbackJoin`; every join comes out as a :class:`LabeledOutcome`.
Per ``(application, deployment, model_version)`` and time bucket the aggregator keeps a
:class:`QualityAccumulator`: it counts the predictions (:meth:`~QualityAccumulator.add_prediction`)
and the joined outcomes (:meth:`~QualityAccumulator.add_outcome`), both placed at the
*prediction's* time, so a window means "predictions made in the window, with the labels
that have arrived for them by now". Accumulators merge by adding, like the store's other
buckets, and :meth:`QualityAccumulator.value` reads any metric of :data:`~ray_monitor.common.catalog.QUALITY_METRICS`.

Labels are strings. ``int`` and ``bool`` labels (NumPy's too) become their integer's
decimal form, so ``1``, ``True``, ``np.int64(1)`` and ``"1"`` are one class in both
predictions and feedback.

Definitions follow scikit-learn with ``zero_division=0``: the classes are every label seen
as truth or prediction; precision of a class never predicted, recall of a class never
true, and F1 with ``2tp + fp + fn == 0`` are 0. ``macro`` is the unweighted mean over the
classes, ``weighted`` the mean weighted by each class's true count, ``binary`` the
positive class's own value (scikit-learn's ``average="binary"`` with two classes,
one-vs-rest with more).
"""

from __future__ import annotations

import math
import numbers
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

import numpy as np

from ray_monitor.common.catalog import QUALITY_LABELS, QUALITY_METRICS

__all__ = ["Prediction", "LabeledOutcome", "validate_extractor_result", "FeedbackJoin",
           "FeedbackResult", "ItemStatus", "ClassificationCounts", "ScoreHistogram",
           "RegressionSums", "QualityAccumulator", "SCORE_BINS"]

#: Labels of the quality and drift series: quality is per model, not per replica.
#: Equal score bins of :class:`ScoreHistogram` (bin ``k`` is centred on ``k / SCORE_BINS``).
SCORE_BINS = 1000
#: Bounds that keep one captured prediction small.
MAX_FEATURES = 64
MAX_STRING = 256
_FEATURE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_EXTRACTOR_KEYS = frozenset({"label", "score", "value", "features"})
_FEEDBACK_KEYS = frozenset({"request_id", "label", "value"})


class Prediction(NamedTuple):
    """What the middleware keeps of one request: the extracted prediction, not the payload.

    ``label`` is set for classification and ``value`` for regression, never both. ``score``
    is the probability of the positive class (binary ROC AUC), ``positive_label`` that
    class as the deployment configured it (``None``: scikit-learn's default, the larger of
    two labels). ``time`` is wall-clock seconds at the end of the request.
    """

    request_id: str
    time: float
    application: str
    deployment: str
    model_version: str
    label: Optional[str] = None
    score: Optional[float] = None
    value: Optional[float] = None
    features: Optional[dict[str, Any]] = None  # name -> float or str
    positive_label: Optional[str] = None


class LabeledOutcome(NamedTuple):
    """A prediction joined with its ground truth (``label`` or ``value``) at ``joined_at``."""

    prediction: Prediction
    label: Optional[str]
    value: Optional[float]
    joined_at: float


# -- validation at the edge ----------------------------------------------------------------

def _label(v: Any, field_name: str) -> str:
    if isinstance(v, str):
        if not v or len(v) > MAX_STRING:
            raise ValueError(f"{field_name} must be a non-empty string of at most {MAX_STRING} "
                             f"characters, got {len(v)} characters")
        return v
    if isinstance(v, (numbers.Integral, np.bool_)):
        return str(int(v))
    raise TypeError(f"{field_name} must be a class label (str, int or bool), got "
                    f"{type(v).__name__} {v!r:.60}; map scores to a class before returning it")


def _number(v: Any, field_name: str) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{field_name} must be a real number, got {type(v).__name__} {v!r:.60}")
    x = float(v)
    if not math.isfinite(x):
        raise ValueError(f"{field_name} must be finite, got {x!r}")
    return x


def validate_extractor_result(obj: Any) -> dict[str, Any]:
    """Checks what a user's extractor returned; returns the :class:`Prediction` fields
    ``label``, ``score``, ``value`` and ``features`` (absent ones ``None``).

    Accepted: ``{"label": L}`` or ``{"label": L, "score": p}`` (classification, ``p`` in
    [0, 1] the probability of the positive class), ``{"value": x}`` (regression), each
    with optional ``"features": {name: number or str}``. Raises ``TypeError`` or
    ``ValueError`` naming the field and the fix.
    """
    if not isinstance(obj, Mapping):
        raise TypeError("the prediction extractor must return a dict such as "
                        '{"label": "spam", "score": 0.93} or {"value": 3.2}, '
                        f"got {type(obj).__name__}")
    unknown = set(obj) - _EXTRACTOR_KEYS
    if unknown:
        raise ValueError(f"the prediction extractor returned unknown keys {sorted(map(str, unknown))}; "
                         f"use only {sorted(_EXTRACTOR_KEYS)}")
    has_label, has_value = obj.get("label") is not None, obj.get("value") is not None
    if has_label == has_value:
        raise ValueError('the prediction extractor must return exactly one of "label" '
                         '(classification) and "value" (regression)')
    out: dict[str, Any] = {"label": None, "score": None, "value": None, "features": None}
    if has_label:
        out["label"] = _label(obj["label"], "prediction label")
        if obj.get("score") is not None:
            score = _number(obj["score"], "prediction score")
            if not 0.0 <= score <= 1.0:
                raise ValueError(f"prediction score must be in [0, 1] (the probability of the "
                                 f"positive class), got {score!r}")
            out["score"] = score
    else:
        if obj.get("score") is not None:
            raise ValueError('prediction "score" goes with a class "label", not with a '
                             'regression "value"')
        out["value"] = _number(obj["value"], "prediction value")
    features = obj.get("features")
    if features is not None:
        out["features"] = _features(features)
    return out


def _features(features: Any) -> dict[str, Any]:
    if not isinstance(features, Mapping):
        raise TypeError(f'prediction "features" must be a dict of name -> number or str, '
                        f"got {type(features).__name__}")
    if len(features) > MAX_FEATURES:
        raise ValueError(f'prediction "features" has {len(features)} entries; keep at most '
                         f"{MAX_FEATURES} (the ones worth watching for drift)")
    out = {}
    for name, v in features.items():
        if not isinstance(name, str) or not _FEATURE_NAME.fullmatch(name):
            raise ValueError(f"feature name {name!r} must be an identifier of at most 64 "
                             "characters ([A-Za-z_][A-Za-z0-9_]*), so rules can name it as "
                             "feature_<name>")
        if isinstance(v, str):
            if len(v) > MAX_STRING:
                raise ValueError(f"feature {name!r} is a string of {len(v)} characters; "
                                 f"categories may have at most {MAX_STRING}")
            out[name] = v
        else:
            out[name] = _number(v, f"feature {name!r}")
    return out


# -- the feedback join ---------------------------------------------------------------------

class ItemStatus(NamedTuple):
    """What became of one feedback item; ``reason`` says why for anything but ``joined``."""

    index: int
    request_id: Optional[str]
    status: str  # joined | held | duplicate | unknown | expired | dropped | invalid
    reason: str = ""


@dataclass
class FeedbackResult:
    """The answer to one :meth:`FeedbackJoin.add_feedback` call, item by item."""

    items: list[ItemStatus] = field(default_factory=list)
    outcomes: list[LabeledOutcome] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for it in self.items:
            out[it.status] = out.get(it.status, 0) + 1
        return out

    def as_dict(self) -> dict:
        """The HTTP API's body: counts by status, and every item that did not join."""
        return {"counts": self.counts(),
                "problems": [it._asdict() for it in self.items if it.status != "joined"]}


_REASONS = {
    "duplicate": "this request already has ground truth; the first one is kept",
    "unknown": "no prediction was captured for this request id (not a monitored deployment "
               "with a prediction extractor, or a wrong id)",
    "expired": "the prediction is older than the feedback horizon and was let go",
    "dropped": "the prediction was dropped to bound memory (more predictions waiting than "
               "max_pending); raise max_pending or send feedback sooner",
    "held": "no prediction with this id yet: held for early_grace_s seconds in case it is "
            "still on its way from the replica",
}


class FeedbackJoin:
    """Joins predictions with ground truth that arrives later, by request id.

    A prediction waits up to ``horizon_s`` after its ``time`` for its truth; past that it
    expires (counted). At most ``max_pending`` predictions wait; past that the oldest is
    dropped (counted). Feedback for an id whose prediction has not arrived yet (replicas
    flush every second or so) is held ``early_grace_s`` seconds, then counted as unknown.
    The fate of the last ``max_pending`` ids that left (joined with its truth, expired,
    dropped) is remembered so late feedback is told apart from a wrong id, and a second
    label for a joined id is a ``duplicate``: counted, and the first label kept, because
    the first answer is what any outcome already emitted was computed from.

    Several predictions may share an id (a request through two monitored deployments):
    the truth joins each of them whose kind (label or value) it matches.
    Memory: at most ``max_pending`` waiting predictions, held feedback items and
    remembered fates each, whatever the traffic. Expiry sweeps from the oldest arrival
    and stops at the first live one; a straggler behind it expires when its feedback comes.
    Not thread-safe: the aggregator calls it from one thread.
    """

    def __init__(self, *, horizon_s: float = 3600.0, max_pending: int = 100_000,
                 early_grace_s: float = 10.0, clock: Callable[[], float] = time.time) -> None:
        if not (isinstance(horizon_s, (int, float)) and horizon_s > 0):
            raise ValueError(f"horizon_s must be a positive number of seconds, got {horizon_s!r}")
        if not (isinstance(max_pending, int) and max_pending >= 1):
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        if not (isinstance(early_grace_s, (int, float)) and early_grace_s >= 0):
            raise ValueError("early_grace_s must be a number of seconds >= 0 (0: report "
                             f"unknown ids at once), got {early_grace_s!r}")
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        self._horizon, self._max, self._grace = float(horizon_s), max_pending, float(early_grace_s)
        self._clock = clock
        self._pending: OrderedDict[str, list[Prediction]] = OrderedDict()
        self._n_pending = 0
        # id -> (fate, truth label, truth value); truth kept so a late second prediction joins
        self._done: OrderedDict[str, tuple[str, Optional[str], Optional[float]]] = OrderedDict()
        self._held: OrderedDict[str, tuple[float, Optional[str], Optional[float]]] = OrderedDict()
        self._counts = dict.fromkeys((
            "predictions", "predictions_joined", "predictions_expired", "predictions_dropped",
            "predictions_kind_mismatch", "feedback_joined", "feedback_duplicate",
            "feedback_unknown", "feedback_expired", "feedback_dropped", "feedback_invalid"), 0)

    def stats(self) -> dict[str, int]:
        """Counters since start (final fates), and the ``pending`` / ``held`` gauges."""
        return {**self._counts, "pending": self._n_pending, "held": len(self._held)}

    def _forget(self, rid: str, fate: str, label=None, value=None) -> None:
        self._done[rid] = (fate, label, value)
        self._done.move_to_end(rid)
        while len(self._done) > self._max:
            self._done.popitem(last=False)

    def _sweep(self, now: float) -> None:
        # Ids are in arrival order, close to time order: stop at the first one still waiting;
        # an out-of-order straggler is caught when its feedback comes, and memory stays bounded.
        while self._pending:
            rid, preds = next(iter(self._pending.items()))
            if now - min(p.time for p in preds) <= self._horizon:
                break
            self._pending.popitem(last=False)
            self._n_pending -= len(preds)
            self._counts["predictions_expired"] += len(preds)
            self._forget(rid, "expired")
        while self._held:
            rid, (arrived, _, _) = next(iter(self._held.items()))
            if now - arrived <= self._grace:
                break
            self._held.popitem(last=False)
            self._counts["feedback_unknown"] += 1

    def _unpend(self, rid: str, fate: str, label=None, value=None) -> None:
        self._n_pending -= len(self._pending.pop(rid))
        self._forget(rid, fate, label, value)

    def _join(self, preds: list[Prediction], label, value, now: float) -> list[LabeledOutcome]:
        out = [LabeledOutcome(p, label, value, now) for p in preds if _fits(p, label)]
        self._counts["predictions_joined"] += len(out)
        self._counts["predictions_kind_mismatch"] += len(preds) - len(out)
        return out

    def add_predictions(self, preds: Iterable[Prediction]) -> list[LabeledOutcome]:
        """Adds captured predictions; returns those that joined feedback already here
        (held early feedback, or the truth of a sibling prediction with the same id)."""
        now = self._clock()
        self._sweep(now)
        out: list[LabeledOutcome] = []
        for p in preds:
            self._counts["predictions"] += 1
            done = self._done.get(p.request_id)
            if now - p.time > self._horizon:
                self._counts["predictions_expired"] += 1
                if done is None:
                    self._forget(p.request_id, "expired")
                continue
            if done is not None and done[0] == "joined":
                out += self._join([p], done[1], done[2], now)
                continue
            held = self._held.pop(p.request_id, None)
            if held is not None:
                if _fits(p, held[1]):
                    self._counts["feedback_joined"] += 1
                    self._forget(p.request_id, "joined", held[1], held[2])
                    out += self._join([p], held[1], held[2], now)
                    continue
                self._counts["feedback_invalid"] += 1  # truth of the wrong kind: let it go
            self._pending.setdefault(p.request_id, []).append(p)
            self._n_pending += 1
            while self._n_pending > self._max:
                rid, old = self._pending.popitem(last=False)
                self._n_pending -= len(old)
                self._counts["predictions_dropped"] += len(old)
                self._forget(rid, "dropped")
        return out

    def add_feedback(self, items: Iterable[Any]) -> FeedbackResult:
        """Joins ground truth, one dict per item: ``{"request_id": ..., "label": ...}`` or
        ``{"request_id": ..., "value": ...}``. Never raises for a bad item: each gets its
        :class:`ItemStatus`, and the valid rest of the batch lands."""
        if isinstance(items, (Mapping, str, bytes)):
            raise TypeError("add_feedback takes a list of feedback items; wrap a single item "
                            "in a list")
        now = self._clock()
        self._sweep(now)
        result = FeedbackResult()
        for i, item in enumerate(items):
            try:
                rid, label, value = _parse_feedback(item)
            except (TypeError, ValueError) as e:
                rid = item.get("request_id") if isinstance(item, Mapping) else None
                self._item(result, i, rid if isinstance(rid, str) else None, "invalid", str(e))
                continue
            preds = self._pending.get(rid)
            if preds is not None:
                if now - min(p.time for p in preds) > self._horizon:
                    self._unpend(rid, "expired")
                    self._counts["predictions_expired"] += len(preds)
                    self._item(result, i, rid, "expired")
                elif not any(_fits(p, label) for p in preds):
                    # keep the predictions: the right kind of truth may still come
                    want = "label" if preds[0].label is not None else "value"
                    self._item(result, i, rid, "invalid",
                               "the prediction for this request is a "
                               f"{'class label' if want == 'label' else 'regression value'}; "
                               f'send "{want}"')
                else:
                    self._unpend(rid, "joined", label, value)
                    result.outcomes += self._join(preds, label, value, now)
                    self._item(result, i, rid, "joined")
            elif rid in self._done:
                fate = self._done[rid][0]
                self._item(result, i, rid, "duplicate" if fate == "joined" else fate)
            elif rid in self._held:
                self._item(result, i, rid, "duplicate")
            elif self._grace > 0:
                self._held[rid] = (now, label, value)
                while len(self._held) > self._max:
                    self._held.popitem(last=False)
                    self._counts["feedback_unknown"] += 1
                self._item(result, i, rid, "held")
            else:
                self._item(result, i, rid, "unknown")
        return result

    def _item(self, result: FeedbackResult, i: int, rid: Optional[str], status: str,
              reason: str = "") -> None:
        if status != "held":
            self._counts["feedback_" + status] += 1
        result.items.append(ItemStatus(i, rid, status, reason or _REASONS.get(status, "")))


def _fits(p: Prediction, truth_label: Optional[str]) -> bool:
    """Whether a truth (a label, or else a value) is of the prediction's kind."""
    return (p.label is not None) == (truth_label is not None)


def _parse_feedback(item: Any) -> tuple[str, Optional[str], Optional[float]]:
    if not isinstance(item, Mapping):
        raise TypeError('a feedback item must be an object such as {"request_id": "...", '
                        f'"label": "spam"}}, got {type(item).__name__}')
    unknown = set(item) - _FEEDBACK_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(map(str, unknown))}; a feedback item has "
                         '"request_id" and one of "label" or "value"')
    rid = item.get("request_id")
    if not isinstance(rid, str) or not rid or len(rid) > MAX_STRING:
        raise ValueError('"request_id" must be the non-empty X-Request-ID string of the '
                         f"request, got {rid!r:.60}")
    has_label, has_value = item.get("label") is not None, item.get("value") is not None
    if has_label == has_value:
        raise ValueError('a feedback item needs exactly one of "label" (classification) and '
                         '"value" (regression)')
    if has_label:
        return rid, _label(item["label"], "feedback label"), None
    return rid, None, _number(item["value"], "feedback value")


# -- mergeable accumulators ----------------------------------------------------------------

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
