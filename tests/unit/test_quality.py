"""Model quality: extractor validation, the feedback join, and every metric against scikit-learn."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn import metrics as skm

from ray_monitor.common.catalog import QUALITY_METRICS
from ray_monitor.quality.feedback import FeedbackJoin, LabeledOutcome
from ray_monitor.quality.metrics import ClassificationCounts, QualityAccumulator, ScoreHistogram
from ray_monitor.quality.prediction import Prediction, validate_extractor_result
from tests.helpers import Clock


def pred(rid: str, t: float = 10_000.0, **kw) -> Prediction:
    kw.setdefault("label", None if "value" in kw else "a")
    return Prediction(rid, t, "app", "dep", "v1", **kw)


def outcome(true, predicted, score=None, positive_label=None) -> LabeledOutcome:
    p = Prediction("r", 0.0, "app", "dep", "v1", label=predicted, score=score,
                   positive_label=positive_label)
    return LabeledOutcome(p, true, None, 1.0)


def accumulate(y_true, y_pred, scores=None, positive_label=None) -> QualityAccumulator:
    acc = QualityAccumulator()
    for i, (t, p) in enumerate(zip(y_true, y_pred)):
        acc.add_outcome(outcome(t, p, None if scores is None else float(scores[i]), positive_label))
    return acc


# -- classification against scikit-learn ----------------------------------------------------

def labelled_data(seed: int, n_classes: int, *, imbalanced: bool, missing_in_pred: bool,
                  n: int = 700) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    classes = [f"c{i}" for i in range(n_classes)]
    weights = 0.5 ** np.arange(n_classes) if imbalanced else np.ones(n_classes)
    y_true = rng.choice(classes, size=n, p=weights / weights.sum())
    # a model that is right 60% of the time and otherwise guesses among its classes
    pool = classes[:-1] if missing_in_pred else classes
    guess = rng.choice(pool, size=n)
    right = rng.random(n) < 0.6
    y_pred = np.where(right & np.isin(y_true, pool), y_true, guess)
    return list(y_true), list(y_pred)


CASES = [(seed, k, imb, miss) for seed, (k, imb, miss) in enumerate(
    [(2, False, False), (2, True, False), (3, False, False), (3, True, True),
     (7, False, False), (7, True, False), (7, True, True)])]


@pytest.mark.parametrize("seed,n_classes,imbalanced,missing", CASES)
def test_classification_metrics_equal_sklearn(seed, n_classes, imbalanced, missing):
    y_true, y_pred = labelled_data(seed, n_classes, imbalanced=imbalanced, missing_in_pred=missing)
    acc = accumulate(y_true, y_pred)
    if missing:
        assert f"c{n_classes - 1}" not in set(y_pred)
    assert acc.value("accuracy") == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    labels = sorted(set(y_true) | set(y_pred))
    sk = {"precision": skm.precision_score, "recall": skm.recall_score, "f1": skm.f1_score}
    for name, fn in sk.items():
        for average, suffix in (("macro", ""), ("weighted", "_weighted")):
            want = fn(y_true, y_pred, average=average, zero_division=0)
            assert acc.value(name + suffix) == pytest.approx(want, abs=1e-12), (name, average)
        per_class = fn(y_true, y_pred, average=None, labels=labels, zero_division=0)
        pos = labels[-1]
        # binary: scikit-learn's average="binary" for two classes, one-vs-rest otherwise
        want = fn(y_true, y_pred, average="binary", pos_label=pos, zero_division=0) \
            if n_classes == 2 else per_class[-1]
        assert acc.value(name + "_binary", positive_label=pos) == pytest.approx(want, abs=1e-12)
        got = acc.classes.per_class()
        i = ("precision", "recall", "f1").index(name)
        assert [got[c][i] for c in labels] == pytest.approx(list(per_class), abs=1e-12)


def test_binary_defaults_to_the_larger_label_like_sklearn():
    y_true, y_pred = labelled_data(11, 2, imbalanced=True, missing_in_pred=False)
    acc = accumulate(y_true, y_pred)
    assert acc.value("recall_binary") == pytest.approx(
        skm.recall_score(y_true, y_pred, pos_label="c1"), abs=1e-12)
    three = accumulate(["a", "b", "c"], ["a", "b", "b"])
    assert three.value("f1_binary") is None  # three classes and no positive label: no answer
    assert three.value("f1_binary", positive_label="c") == 0.0


def test_prediction_only_classes_and_absent_positive_follow_zero_division_0():
    y_true, y_pred = ["a", "a", "b", "b"], ["a", "z", "b", "a"]  # "z" never true
    acc = accumulate(y_true, y_pred)
    for name, fn in (("precision", skm.precision_score), ("recall", skm.recall_score),
                     ("f1", skm.f1_score)):
        assert acc.value(name) == pytest.approx(fn(y_true, y_pred, average="macro",
                                                   zero_division=0), abs=1e-12)
    assert acc.value("precision_binary", positive_label="q") == 0.0  # never seen at all


@pytest.mark.parametrize("n_classes", [2, 3, 7])
def test_merged_partial_accumulators_equal_the_whole(n_classes):
    rng = np.random.default_rng(n_classes)
    y_true, y_pred = labelled_data(n_classes, n_classes, imbalanced=True, missing_in_pred=False)
    scores = np.round(rng.random(len(y_true)), 3)
    whole = accumulate(y_true, y_pred, scores, positive_label="c1")
    cuts = sorted(rng.choice(np.arange(1, len(y_true)), size=5, replace=False))
    parts = [accumulate(t, p, s, "c1") for t, p, s in zip(np.split(np.array(y_true), cuts),
                                                          np.split(np.array(y_pred), cuts),
                                                          np.split(scores, cuts))]
    merged = QualityAccumulator()
    for part in parts:
        merged.merge(part)
    assert merged.classes.pairs == whole.classes.pairs
    assert merged.scores.counts == whole.scores.counts
    for name in QUALITY_METRICS:
        if QUALITY_METRICS[name].kind == "quality":
            assert merged.value(name) == whole.value(name), name


# -- ROC AUC ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_roc_auc_is_exact_for_bin_aligned_scores(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    y = rng.random(n) < (0.1 if seed % 2 else 0.5)  # imbalanced half the time
    scores = np.round(np.clip(rng.normal(0.45 + 0.2 * y, 0.2), 0, 1), 3)  # many ties
    acc = accumulate(np.where(y, "1", "0"), np.where(scores > 0.5, "1", "0"), scores)
    assert acc.value("roc_auc") == pytest.approx(skm.roc_auc_score(y, scores), abs=1e-12)


def test_roc_auc_of_continuous_scores_is_within_its_stated_bound():
    rng = np.random.default_rng(7)
    n = 5000
    y = rng.random(n) < 0.3
    scores = 1 / (1 + np.exp(-rng.normal(1.2 * y, 1.0)))
    h = ScoreHistogram()
    for t, s in zip(y, scores):
        h.add("1" if t else "0", float(s))
    exact = skm.roc_auc_score(y, scores)
    bound = h.auc_error_bound()
    assert abs(h.roc_auc() - exact) <= bound
    assert bound < 0.005  # 1,000 bins: half the share of pairs that share a bin


def test_roc_auc_one_vs_rest_with_a_configured_positive_label():
    rng = np.random.default_rng(3)
    classes = np.array(["fraud", "legit", "review"])
    y = rng.choice(classes, size=1500, p=[0.2, 0.7, 0.1])
    scores = np.round(np.clip(rng.normal(0.3 + 0.3 * (y == "fraud"), 0.2), 0, 1), 3)
    acc = accumulate(y, y, scores, positive_label="fraud")
    assert acc.value("roc_auc") == pytest.approx(skm.roc_auc_score(y == "fraud", scores), abs=1e-12)
    assert acc.value("roc_auc", positive_label="legit") == pytest.approx(
        skm.roc_auc_score(y == "legit", scores), abs=1e-12)


def test_roc_auc_is_absent_without_both_classes_or_with_many_and_no_positive():
    assert accumulate(["1", "1"], ["1", "1"], [0.2, 0.9]).value("roc_auc") is None
    assert accumulate(["a", "b", "c"], ["a", "b", "c"], [0.1, 0.5, 0.9]).value("roc_auc") is None
    assert accumulate(["0", "1"], ["0", "1"]).value("roc_auc") is None  # labels without scores


# -- regression and coverage -------------------------------------------------------------------

def test_mae_and_rmse_equal_sklearn_and_merge():
    rng = np.random.default_rng(5)
    y = rng.normal(10, 3, size=999)
    yhat = y + rng.standard_t(3, size=999)
    parts = [QualityAccumulator() for _ in range(3)]
    for i, (t, p) in enumerate(zip(y, yhat)):
        parts[i % 3].add_outcome(LabeledOutcome(pred(str(i), value=float(p)), None, float(t), 1.0))
    acc = parts[0].merge(parts[1]).merge(parts[2])
    assert acc.value("mae") == pytest.approx(skm.mean_absolute_error(y, yhat), rel=1e-12)
    assert acc.value("rmse") == pytest.approx(skm.root_mean_squared_error(y, yhat), rel=1e-12)
    assert acc.value("accuracy") is None  # no classification here: absent, not 0


def test_label_coverage_is_labeled_predictions_over_predictions():
    acc = QualityAccumulator()
    assert acc.value("label_coverage") is None
    preds = [pred(str(i)) for i in range(10)]
    for p in preds:
        acc.add_prediction(p)
    for p in preds[:4]:
        acc.add_outcome(LabeledOutcome(p, "a", None, 2.0))
    assert acc.value("label_coverage") == 0.4
    assert acc.value("labeled") == 4.0


def test_every_quality_metric_name_is_readable_and_unknown_names_are_refused():
    acc = accumulate(["a", "b"], ["a", "a"], [0.1, 0.7])
    for name, m in QUALITY_METRICS.items():
        if m.kind == "quality":
            acc.value(name)
        assert m.prometheus.startswith("ray_monitor_")
    with pytest.raises(ValueError, match="unknown quality metric 'precison'"):
        acc.value("precison")
    with pytest.raises(ValueError, match="average"):
        ClassificationCounts({("a", "a"): 1}).score("f1", "micro")
    with pytest.raises(ValueError, match="metric must be one of"):
        ClassificationCounts({("a", "a"): 1}).score("accuracy")


# -- the extractor's result ---------------------------------------------------------------------

def test_valid_extractor_results_become_prediction_fields():
    assert validate_extractor_result({"label": "spam", "score": 0.93}) == {
        "label": "spam", "score": 0.93, "value": None, "features": None}
    got = validate_extractor_result({"value": np.float32(3.5), "features": {"age": 41, "city": "Oslo"}})
    assert got == {"label": None, "score": None, "value": 3.5,
                   "features": {"age": 41.0, "city": "Oslo"}}
    # int, bool and NumPy integer labels are one class with their decimal string
    assert validate_extractor_result({"label": np.int64(1)})["label"] == "1"
    assert validate_extractor_result({"label": True})["label"] == "1"
    p = Prediction("r1", 1.0, "app", "dep", "v1", **got)
    assert pickle.loads(pickle.dumps(p)) == p


@pytest.mark.parametrize("obj,message", [
    ([("label", "x")], "must return a dict"),
    ({"label": "x", "proba": 0.2}, r"unknown keys \['proba'\]"),
    ({"label": "x", "value": 1.0}, "exactly one of"),
    ({"score": 0.5}, "exactly one of"),
    ({"label": 0.7}, "class label"),
    ({"label": "x", "score": 1.5}, r"score must be in \[0, 1\]"),
    ({"label": "x", "score": "high"}, "score must be a real number"),
    ({"value": 1.0, "score": 0.5}, "goes with a class"),
    ({"value": float("nan")}, "finite"),
    ({"value": 1.0, "features": [1, 2]}, "features\" must be a dict"),
    ({"value": 1.0, "features": {"my age": 3}}, "identifier"),
    ({"value": 1.0, "features": {"age": None}}, "feature 'age' must be a real number"),
    ({"value": 1.0, "features": {f"f{i}": 1 for i in range(65)}}, "at most 64"),
])
def test_bad_extractor_results_are_refused_with_the_field_named(obj, message):
    with pytest.raises((TypeError, ValueError), match=message):
        validate_extractor_result(obj)


# -- the feedback join -----------------------------------------------------------------------------

def test_one_batch_with_every_kind_of_item_lands_its_valid_rest():
    clock = Clock(10_000.0)
    join = FeedbackJoin(horizon_s=3600, early_grace_s=0, clock=clock)
    join.add_predictions([pred("fresh", 10_000.0, label="spam"), pred("late", 7_000.0, label="ham"),
                          pred("old", 6_800.0, label="ham"), pred("reg", 10_000.0, value=2.5),
                          pred("twice", 10_000.0, label="ham")])
    first = join.add_feedback([{"request_id": "twice", "label": "ham"}])
    assert first.counts() == {"joined": 1}
    clock.t = 10_500.0  # "old" (made at 6800) is now past the one-hour horizon
    result = join.add_feedback([
        {"request_id": "fresh", "label": "ham"},
        {"request_id": "late", "label": "ham"},  # 58 minutes after its prediction
        {"request_id": "fresh", "label": "spam"},  # a second answer in the same batch
        {"request_id": "twice", "label": "spam"},  # a second answer in a later batch
        {"request_id": "nobody", "label": "ham"},
        {"request_id": "old", "label": "ham"},
        "not a dict",
        {"request_id": "reg"},
        {"request_id": "reg", "label": "ham"},  # a class for a regression prediction
        {"request_id": 42, "label": "ham"},
        {"request_id": "x", "label": "ham", "note": "typo"},
        {"request_id": "reg", "value": 3.0},
    ])
    statuses = [(it.index, it.request_id, it.status) for it in result.items]
    assert statuses == [(0, "fresh", "joined"), (1, "late", "joined"), (2, "fresh", "duplicate"),
                        (3, "twice", "duplicate"), (4, "nobody", "unknown"), (5, "old", "expired"),
                        (6, None, "invalid"), (7, "reg", "invalid"), (8, "reg", "invalid"),
                        (9, None, "invalid"), (10, "x", "invalid"), (11, "reg", "joined")]
    reasons = {it.index: it.reason for it in result.items}
    assert "exactly one of" in reasons[7] and 'send "value"' in reasons[8]
    assert "request_id" in reasons[9] and "note" in reasons[10] and "first one is kept" in reasons[2]
    joined = {(o.prediction.request_id, o.label, o.value, o.joined_at) for o in result.outcomes}
    assert joined == {("fresh", "ham", None, 10_500.0), ("late", "ham", None, 10_500.0),
                      ("reg", None, 3.0, 10_500.0)}
    body = result.as_dict()
    assert body["counts"] == {"joined": 3, "duplicate": 2, "unknown": 1, "expired": 1, "invalid": 5}
    assert len(body["problems"]) == 9
    stats = join.stats()
    assert (stats["feedback_joined"], stats["feedback_duplicate"], stats["feedback_unknown"],
            stats["feedback_expired"], stats["feedback_invalid"]) == (4, 2, 1, 1, 5)
    assert stats["pending"] == 0 and stats["predictions_expired"] == 1


def test_predictions_expire_after_the_horizon_and_later_feedback_says_so():
    clock = Clock(0.0)
    join = FeedbackJoin(horizon_s=60, early_grace_s=0, clock=clock)
    join.add_predictions([pred("a", 0.0), pred("b", 30.0)])
    clock.t = 61.0
    join.add_predictions([])  # any call sweeps
    assert join.stats()["pending"] == 1 and join.stats()["predictions_expired"] == 1
    r = join.add_feedback([{"request_id": "a", "label": "a"}, {"request_id": "b", "label": "a"}])
    assert [it.status for it in r.items] == ["expired", "joined"]
    assert join.add_predictions([pred("stale", 0.0)]) == []  # already past the horizon on arrival
    assert join.stats()["predictions_expired"] == 2
    r = join.add_feedback([{"request_id": "stale", "label": "a"}])
    assert r.items[0].status == "expired"


def test_memory_is_bounded_the_oldest_predictions_are_dropped_and_counted():
    join = FeedbackJoin(max_pending=3, early_grace_s=0, clock=Clock(10_000.0))
    join.add_predictions([pred(f"r{i}") for i in range(5)])
    stats = join.stats()
    assert stats["pending"] == 3 and stats["predictions_dropped"] == 2
    r = join.add_feedback([{"request_id": f"r{i}", "label": "a"} for i in range(5)])
    assert [it.status for it in r.items] == ["dropped", "dropped", "joined", "joined", "joined"]
    assert "max_pending" in r.items[0].reason
    join.add_predictions([pred(f"s{i}") for i in range(10)])
    assert join.stats()["pending"] == 3
    # what is remembered about ids that left is bounded too
    r = join.add_feedback([{"request_id": "r3", "label": "a"}])
    assert r.items[0].status == "unknown"


def test_feedback_that_beats_its_prediction_is_held_then_joined_or_counted_unknown():
    clock = Clock(100.0)
    join = FeedbackJoin(early_grace_s=10, clock=clock)
    r = join.add_feedback([{"request_id": "early", "label": "spam"},
                           {"request_id": "never", "label": "spam"},
                           {"request_id": "early", "label": "ham"}])
    assert [it.status for it in r.items] == ["held", "held", "duplicate"]
    clock.t = 105.0
    out = join.add_predictions([pred("early", 104.0, label="spam")])
    assert [(o.prediction.request_id, o.label) for o in out] == [("early", "spam")]
    clock.t = 111.0
    join.add_predictions([])
    stats = join.stats()
    assert stats["feedback_joined"] == 1 and stats["feedback_unknown"] == 1 and stats["held"] == 0


def test_a_request_through_two_monitored_deployments_joins_both_predictions():
    clock = Clock(10_000.0)
    join = FeedbackJoin(early_grace_s=0, clock=clock)
    join.add_predictions([pred("r", label="spam")])
    r = join.add_feedback([{"request_id": "r", "label": "spam"}])
    assert len(r.outcomes) == 1
    # the second deployment's snapshot arrives after the feedback: it joins the kept truth
    late = Prediction("r", clock.t, "app", "ranker", "v1", label="ham")
    out = join.add_predictions([late])
    assert [(o.prediction.deployment, o.label) for o in out] == [("ranker", "spam")]


def test_join_options_are_checked():
    with pytest.raises(ValueError, match="horizon_s"):
        FeedbackJoin(horizon_s=0)
    with pytest.raises(ValueError, match="max_pending"):
        FeedbackJoin(max_pending=0)
    with pytest.raises(ValueError, match="early_grace_s"):
        FeedbackJoin(early_grace_s=-1)
    with pytest.raises(TypeError, match="clock"):
        FeedbackJoin(clock=5)
    with pytest.raises(TypeError, match="wrap a single item in a list"):
        FeedbackJoin().add_feedback({"request_id": "r", "label": "a"})
