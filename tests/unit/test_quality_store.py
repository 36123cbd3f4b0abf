"""The quality store (predictions + late feedback in time windows, drift), the composite
source rules read through, rules over quality and drift, and the version comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from ray_monitor.aggregator.core import AggregatorCore, CompositeSource
from ray_monitor.common.catalog import Query
from ray_monitor.common.matchers import Matcher
from ray_monitor.common.histogram import Histogram
from ray_monitor.quality.prediction import Prediction
from ray_monitor.quality.compare import compare_versions, quantile_levels, two_proportion_p
from ray_monitor.quality.store import QualityStore
from ray_monitor.alerting.engine import RuleEngine
from ray_monitor.alerting.export import export_prometheus, export_prometheus_yaml
from ray_monitor.alerting.expr import parse_expr
from ray_monitor.alerting.loader import load_rules
from ray_monitor.common.snapshot import ReplicaIdentity, ReplicaSnapshot, SeriesDelta
from ray_monitor.aggregator.windows import WindowStore
from tests.helpers import Clock

T0 = 1_700_000_000.0


def pred(rid: str, t: float, label=None, *, score=None, value=None, features=None,
         dep="Clf", version="v1", app="app") -> Prediction:
    return Prediction(rid, t, app, dep, version, label=label, score=score, value=value,
                      features=features)


def q(function: str, metric: str = "predictions", window_s: float = 600.0, by=None,
      matchers=()) -> Query:
    return Query(function, metric, window_s, by, tuple(matchers))


def test_accuracy_and_coverage_match_scikit_learn_as_labels_arrive_late():
    rng = np.random.default_rng(3)
    clock = Clock(T0)
    store = QualityStore(clock=clock)
    n = 400
    truth = rng.choice(["a", "b", "c"], size=n, p=[0.6, 0.3, 0.1])
    guess = np.where(rng.random(n) < 0.7, truth, rng.choice(["a", "b", "c"], size=n))
    scores = rng.random(n)
    store.add_predictions(pred(f"r{i}", T0 - 60 + i * 0.1, guess[i], score=float(scores[i]))
                          for i in range(n))
    clock.t += 30  # the labels come later, for 3 requests in 4
    labelled = [i for i in range(n) if i % 4]
    res = store.add_feedback([{"request_id": f"r{i}", "label": truth[i]} for i in labelled])
    assert res.counts() == {"joined": len(labelled)}
    got = store.evaluate(q("accuracy"))[()]
    assert got == pytest.approx(accuracy_score(truth[labelled], guess[labelled]))
    assert store.evaluate(q("f1_weighted"))[()] == pytest.approx(
        f1_score(truth[labelled], guess[labelled], average="weighted", zero_division=0))
    assert store.evaluate(q("label_coverage"))[()] == pytest.approx(len(labelled) / n)
    assert store.evaluate(q("labeled"))[()] == len(labelled)


def test_outcomes_count_at_the_prediction_time_not_the_feedback_time():
    clock = Clock(T0)
    store = QualityStore(clock=clock)
    store.add_predictions([pred("old", T0 - 50, "x"), pred("new", T0 - 5, "y")])
    clock.t += 100
    store.add_feedback([{"request_id": "old", "label": "x"}, {"request_id": "new", "label": "x"}])
    # a 60 s window now holds neither prediction; 3 minutes holds both
    assert store.evaluate(q("accuracy", window_s=60)) == {}
    assert store.evaluate(q("accuracy", window_s=180)) == {(): 0.5}
    # only "new" was made in the last 110 s: right label x, predicted y
    assert store.evaluate(q("accuracy", window_s=110)) == {(): 0.0}


def test_regression_and_roc_auc_against_scikit_learn():
    rng = np.random.default_rng(7)
    store = QualityStore(clock=Clock(T0))
    y = rng.integers(0, 2, 300)
    s = np.round(np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1), 3)
    store.add_predictions(pred(f"c{i}", T0 - 10, int(s[i] > 0.5), score=float(s[i]))
                          for i in range(300))
    store.add_feedback([{"request_id": f"c{i}", "label": int(y[i])} for i in range(300)])
    assert store.evaluate(q("roc_auc"))[()] == pytest.approx(roc_auc_score(y, s))
    truth, guess = rng.normal(size=50), rng.normal(size=50)
    store.add_predictions(pred(f"g{i}", T0 - 10, value=float(guess[i]), dep="Reg")
                          for i in range(50))
    store.add_feedback([{"request_id": f"g{i}", "value": float(truth[i])} for i in range(50)])
    by_dep = store.evaluate(q("rmse", by=("deployment",)))
    assert by_dep == {(("deployment", "Reg"),): pytest.approx(
        math.sqrt(np.mean((truth - guess) ** 2)))}
    assert store.evaluate(q("mae", matchers=[Matcher("deployment", "=", "Reg")]))[()] == \
        pytest.approx(np.mean(np.abs(truth - guess)))


def test_groups_merge_models_and_matchers_select_them():
    store = QualityStore(clock=Clock(T0))
    store.add_predictions([pred("1", T0, "a", version="v1"), pred("2", T0, "a", version="v2"),
                           pred("3", T0, "a", version="v2")])
    store.add_feedback([{"request_id": r, "label": "a" if r != "3" else "b"} for r in "123"])
    assert store.evaluate(q("accuracy", by=("model_version",))) == {
        (("model_version", "v1"),): 1.0, (("model_version", "v2"),): 0.5}
    assert store.evaluate(q("accuracy", by=("deployment",))) == {
        (("deployment", "Clf"),): pytest.approx(2 / 3)}
    assert store.evaluate(q("accuracy", matchers=[Matcher("model_version", "=~", "v[2-9]")])) \
        == {(): 0.5}


def test_drift_against_an_uploaded_reference_and_the_first_observations():
    rng = np.random.default_rng(11)
    clock = Clock(T0)
    store = QualityStore(clock=clock, reference_size=200)
    info = store.set_references("app", "Clf", "v1", {"feature_age": rng.normal(40, 5, 2000).tolist()})
    assert info == {"feature_age": {"kind": "numeric", "bins": 100, "observations": 2000}}
    same = rng.normal(40, 5, 300)
    store.add_predictions(pred(f"s{i}", T0 - 100, "a", features={"age": float(same[i])})
                          for i in range(300))
    calm = store.evaluate(q("psi", "feature_age", 120))
    assert calm[()] < 0.1
    clock.t += 60
    shifted = rng.normal(55, 5, 300)
    store.add_predictions(pred(f"d{i}", clock.t - 1, "a", features={"age": float(shifted[i])})
                          for i in range(300))
    assert store.evaluate(q("psi", "feature_age", 30))[()] > 1.0
    assert store.evaluate(q("ks", "feature_age", 30))[()] > 0.8
    # the output has no uploaded reference: its first 200 observations are the reference,
    # and drift needs 30 more (one class only, so it reads no drift)
    assert store.evaluate(q("js", "prediction", 600)) == {(): 0.0}
    # a group's drift is its most drifted model's
    store.set_references("app", "Clf", "v2", {"feature_age": rng.normal(55, 5, 2000).tolist()})
    store.add_predictions(pred(f"e{i}", clock.t - 1, "a", version="v2",
                               features={"age": float(shifted[i])}) for i in range(300))
    by_version = store.evaluate(q("psi", "feature_age", 30, by=("model_version",)))
    assert by_version[(("model_version", "v2"),)] < 0.1 < by_version[(("model_version", "v1"),)]
    assert store.evaluate(q("psi", "feature_age", 30))[()] == by_version[(("model_version", "v1"),)]


def test_bad_references_are_refused_with_the_field_named():
    store = QualityStore(clock=Clock(T0))
    with pytest.raises(ValueError, match="feature_<feature name>"):
        store.set_references("app", "Clf", "", {"age": [1, 2, 3]})
    with pytest.raises(TypeError, match="deployment must be a string"):
        store.set_references("app", None, "", {"feature_age": [1, 2]})


def test_buckets_expire_past_the_coarsest_span():
    clock = Clock(T0)
    store = QualityStore(clock=clock, resolutions=((5.0, 4), (60.0, 2)))
    store.add_predictions([pred("x", T0, "a")])
    assert store.stats()["buckets"] == 2 and store.stats()["models"] == 1
    clock.t += 200
    store.expire()
    assert store.stats()["buckets"] == 0  # the model stays: its drift reference is building


# -- the composite source and rules ---------------------------------------------------------

def replica_snapshot(t: float, version: str, preds: list, *, n: int = 10, errors: int = 0,
                     latency: float = 0.01, dep: str = "Clf") -> ReplicaSnapshot:
    ident = ReplicaIdentity("app", dep, f"{dep}-{version}", "node", 1, version)
    ok, bad = Histogram(), Histogram()
    for _ in range(n - errors):
        ok.record(latency)
    for _ in range(errors):
        bad.record(latency)
    series = [SeriesDelta("__call__", "ok", False, ok)]
    if errors:
        series.append(SeriesDelta("__call__", "ValueError", True, bad))
    return ReplicaSnapshot(ident, int(t), t - 1, t, series, predictions=preds)


def test_composite_source_sends_each_query_to_its_store_and_rules_fire_on_quality():
    clock = Clock(T0)
    windows, quality = WindowStore(clock=clock), QualityStore(clock=clock)
    windows.ingest(replica_snapshot(T0, "v1", []))
    quality.add_predictions([pred("1", T0, "a"), pred("2", T0, "a")])
    quality.add_feedback([{"request_id": "1", "label": "a"}, {"request_id": "2", "label": "b"}])
    source = CompositeSource(windows, quality)
    assert source.evaluate(Query("count", "requests", 60.0), T0) == {(): 10.0}
    assert source.evaluate(q("accuracy"), T0) == {(): 0.5}
    rules = load_rules({"groups": [{"name": "quality", "rules": [
        {"alert": "LowAccuracy",
         "expr": "accuracy(predictions[10m]) by (deployment, model_version) < 0.9"}]}]})
    engine = RuleEngine(rules=rules, clock=clock)
    res = engine.evaluate(source, T0)
    assert [(a.state, a.labels) for a in res.alerts] == [
        ("firing", {"alertname": "LowAccuracy", "deployment": "Clf", "model_version": "v1"})]


@pytest.mark.parametrize("expr", [
    "accuracy(predictions[1h]) by (deployment, model_version) < 0.9",
    'label_coverage(predictions{application="a"}[1h]) by (application, deployment) < 0.5',
    "roc_auc(predictions[30m]) < 0.7", "mae(predictions[1h]) > 3", "rmse(predictions[1h]) > 3",
    "f1_weighted(predictions[1h]) < 0.8",
    "psi(feature_age[1h]) by (deployment) > 0.2", "js(prediction[1h]) > 0.1",
    "ks(feature_x[1h]) > 0.3 and accuracy(predictions[1h]) < 0.9",
])
def test_quality_and_drift_expressions_parse(expr):
    assert parse_expr(expr)


@pytest.mark.parametrize("expr, message", [
    ("acuracy(predictions[1h]) < 0.9", "did you mean 'accuracy'?"),
    ("accuracy(latency_seconds[1h]) < 0.9", "write accuracy(predictions[1h])"),
    ("p99(predictions[1h]) > 1", "does not apply to 'predictions'; use one of accuracy"),
    ("psi(predictions[1h]) > 0.2", "write psi(feature_age[1h]) or psi(prediction[1h])"),
    ("rate(feature_age[1h]) > 0.2", "use one of js, ks, psi"),
    ("accuracy(predictions[1h]) by (replica) < 0.9", "label 'replica' in by (...)"),
    ("quantile(0.5, predictions[1h]) > 1", "does not apply to 'predictions'"),
    ("accuracy(0.5, predictions[1h]) > 1", "accuracy takes no number argument"),
])
def test_bad_quality_expressions_are_refused_naming_the_fix(expr, message):
    with pytest.raises(ValueError) as err:
        parse_expr(expr)
    assert message in str(err.value)


def test_export_leaves_quality_rules_out_and_says_so():
    rules = load_rules({"groups": [
        {"name": "serving", "rules": [
            {"alert": "Errors", "expr": "error_ratio(requests[5m]) > 0.05"},
            {"alert": "Drift", "expr": "psi(feature_age[1h]) by (deployment) > 0.2"}]},
        {"name": "quality", "rules": [
            {"alert": "LowAccuracy", "expr": "accuracy(predictions[1h]) < 0.9"}]}]})
    out = export_prometheus(rules)
    assert [(g["name"], [r["alert"] for r in g["rules"]]) for g in out["groups"]] == [
        ("serving", ["Errors"])]
    text = export_prometheus_yaml(rules)
    assert "# Not exported:" in text and "serving/Drift, quality/LowAccuracy" in text


# -- comparing versions ------------------------------------------------------------------

def test_two_proportion_p_value_matches_the_normal_tail():
    from scipy.stats import norm

    z = (0.5 - 0.3) / math.sqrt(0.4 * 0.6 * (2 / 100))
    assert two_proportion_p(50, 100, 30, 100) == pytest.approx(2 * norm.sf(z))
    assert two_proportion_p(0, 50, 0, 80) == 1.0
    assert two_proportion_p(3, 0, 1, 10) is None


def test_quantile_levels_cover_the_true_quantile_as_often_as_promised():
    rng = np.random.default_rng(5)
    for q, n in ((0.5, 200), (0.95, 400), (0.99, 1000)):
        lo, hi = quantile_levels(q, n)
        true = -math.log(1 - q)  # exponential(1)
        hits = 0
        for _ in range(400):
            x = np.sort(rng.exponential(size=n))
            a = x[min(n - 1, int(lo * n))]
            b = x[min(n - 1, max(0, math.ceil(hi * n) - 1))]
            hits += a <= true <= b
        assert hits / 400 >= 0.97, (q, n, hits)
    assert quantile_levels(0.5, 0) is None
    assert quantile_levels(0.99, 10) == (0.8, 1.0)  # from the 9th smallest to beyond the max


def figures(version, requests, errors, p50, interval, correct, labeled):
    return {"model_version": version, "window_s": 100.0, "requests": requests, "errors": errors,
            "quantiles": {"p50": {"value": p50, "low": interval[0], "high": interval[1]}},
            "quality": {"correct": correct, "labeled_classes": labeled,
                        "accuracy": correct / labeled if labeled else None, "f1": None}}


def test_compare_versions_flags_real_differences_only():
    rows = {r["metric"]: r for r in compare_versions(
        figures("v1", 1000, 10, 0.010, (0.0098, 0.0102), 900, 1000),
        figures("v2", 1000, 150, 0.050, (0.049, 0.051), 700, 1000))}
    assert rows["rate_per_s"]["a"] == 10.0 and rows["rate_per_s"]["significant"] is None
    assert rows["error_ratio"]["significant"] and rows["error_ratio"]["p_value"] < 1e-10
    assert rows["p50_s"]["significant"] and rows["p50_s"]["difference"] == pytest.approx(0.04)
    assert rows["accuracy"]["significant"] and rows["accuracy"]["b"] == 0.7
    assert "p95_s" not in rows or rows["p95_s"]["significant"] is None
    same = {r["metric"]: r for r in compare_versions(
        figures("v1", 1000, 10, 0.010, (0.0098, 0.0102), 900, 1000),
        figures("v2", 1000, 12, 0.0101, (0.0099, 0.0103), 905, 1000))}
    assert not same["error_ratio"]["significant"] and not same["accuracy"]["significant"]
    assert not same["p50_s"]["significant"]


def test_aggregator_compare_reads_both_stores():
    clock = Clock(T0)
    core = AggregatorCore({}, clock=clock)
    try:
        for i in range(10):
            t = T0 - 10 + i
            core.ingest([replica_snapshot(t, "v1", [pred(f"a{i}{j}", t, "x") for j in range(10)],
                                          n=50, errors=0, latency=0.010),
                         replica_snapshot(t, "v2", [pred(f"b{i}{j}", t, "x", version="v2")
                                                    for j in range(10)],
                                          n=50, errors=10, latency=0.030)])
        core.feedback([{"request_id": f"a{i}{j}", "label": "x"} for i in range(10) for j in range(10)]
                      + [{"request_id": f"b{i}{j}", "label": "x" if j < 5 else "y"}
                         for i in range(10) for j in range(10)])
        report = core.compare("Clf", ("v1", "v2"), window_s=60)
    finally:
        core.notifier.close(1.0)
    rows = {r["metric"]: r for r in report["rows"]}
    assert rows["error_ratio"]["a"] == 0.0 and rows["error_ratio"]["b"] == 0.2
    assert rows["error_ratio"]["significant"]
    assert rows["p50_s"]["a"] == pytest.approx(0.010, rel=0.01)
    assert rows["p50_s"]["b"] == pytest.approx(0.030, rel=0.01)
    assert rows["p50_s"]["significant"] and rows["p99_s"]["significant"]
    assert rows["accuracy"]["a"] == 1.0 and rows["accuracy"]["b"] == 0.5
    assert rows["accuracy"]["significant"]
    assert rows["rate_per_s"]["a"] == pytest.approx(500 / 60)


def test_the_compare_command_prints_both_versions_and_the_verdicts():
    import io
    import json

    from ray_monitor.client import cli

    a = figures("v1", 1000, 10, 0.010, (0.0098, 0.0102), 900, 1000)
    b = figures("v2", 1000, 150, 0.050, (0.049, 0.051), 700, 1000)

    class FakeMonitor:
        def compare(self, deployment, versions, *, application=None, window_s=600.0):
            self.asked = (deployment, versions, application, window_s)
            return {"deployment": deployment, "application": application, "window_s": window_s,
                    "versions": list(versions), "figures": [a, b],
                    "rows": compare_versions(a, b)}

    fake, out = FakeMonitor(), io.StringIO()
    assert cli.main(["compare", "--deployment", "Clf", "--versions", "v1", "v2",
                     "--window", "100s"], connect=lambda: fake, out=out) == 0
    assert fake.asked == ("Clf", ("v1", "v2"), None, 100.0)
    lines = {line.split("  ")[0]: line.split() for line in out.getvalue().splitlines()}
    assert lines["rate/s"][1:3] == ["10.0", "10.0"]
    assert lines["error ratio"][2:] == ["1.00%", "(n=1000)", "15.0%", "(n=1000)", "+14pp",
                                        lines["error ratio"][-2], "yes"]
    assert lines["p50 (ms)"][-1] == "yes" and lines["accuracy"][-1] == "yes"
    assert "Clf: v1 vs v2 (all applications, last 1m40s)" in out.getvalue()
    out = io.StringIO()
    assert cli.main(["compare", "--deployment", "Clf", "--versions", "v1", "v2", "--json"],
                    connect=lambda: fake, out=out) == 0
    assert json.loads(out.getvalue())["rows"][1]["metric"] == "error_ratio"
    assert cli.main(["compare", "--deployment", "Clf", "--versions", "v1"],
                    connect=lambda: fake, out=io.StringIO(), err=io.StringIO()) == 2
