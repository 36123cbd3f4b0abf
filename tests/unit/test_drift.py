"""Drift: PSI, Jensen-Shannon and KS against hand-computed values and SciPy; references; monitor."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

from ray_monitor.quality.drift import (PSI_EPSILON, DriftMonitor, FeatureCounts, Reference, jensen_shannon,
                               ks_bound, ks_from_counts, ks_statistic, psi)
from ray_monitor.quality.prediction import Prediction


def test_psi_against_hand_computed_values():
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5) = 0.25 ln 2 + 0.25 ln 1.5
    assert psi([50, 50], [25, 75]) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5), abs=1e-12)
    assert psi([10, 20, 30], [1, 2, 3]) == 0.0
    # an empty reference bin counts as PSI_EPSILON (1e-4) of the reference
    want = (0.5 - 1) * math.log(0.5 / 1) + (0.5 - 1e-4) * math.log(0.5 / 1e-4)
    assert PSI_EPSILON == 1e-4
    assert psi([100, 0], [50, 50]) == pytest.approx(want, abs=1e-12)
    assert math.isfinite(psi([100, 0], [0, 100]))


def test_jensen_shannon_against_hand_computed_values_and_scipy():
    # p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4): divergence = (log2(4/3) + (log2(2/3) + 1) / 2) / 2
    div = (math.log2(4 / 3) + (0.5 * math.log2(2 / 3) + 0.5)) / 2
    assert jensen_shannon([1, 0], [1, 1]) == pytest.approx(math.sqrt(div), abs=1e-12)
    assert jensen_shannon([5, 5], [1, 1]) == 0.0
    assert jensen_shannon([1, 0], [0, 1]) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.integers(0, 50, size=12), rng.integers(0, 50, size=12)
        a[0] += 1
        b[0] += 1
        assert jensen_shannon(a, b) == pytest.approx(jensenshannon(a, b, base=2), abs=1e-9)


def test_statistics_refuse_counts_that_cannot_be_compared():
    with pytest.raises(ValueError, match="same bins"):
        psi([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least one observation"):
        jensen_shannon([0, 0], [1, 1])
    with pytest.raises(ValueError, match="counts >= 0"):
        psi([1, -1], [1, 1])
    with pytest.raises(ValueError, match="at least one value"):
        ks_statistic([], [1.0])


@pytest.mark.parametrize("seed", range(6))
def test_ks_statistic_equals_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1, size=int(rng.integers(5, 800)))
    b = rng.normal(0.3 * seed, 1 + 0.1 * seed, size=int(rng.integers(5, 800)))
    if seed % 2:  # ties within and across samples
        a, b = np.round(a, 1), np.round(b, 1)
    assert ks_statistic(a, b) == pytest.approx(ks_2samp(a, b).statistic, abs=1e-12)


@pytest.mark.parametrize("shift", [0.0, 0.2, 1.0])
def test_ks_from_reference_bins_brackets_the_exact_statistic(shift):
    rng = np.random.default_rng(1)
    ref_sample, cur_sample = rng.normal(size=3000), rng.normal(shift, 1.0, size=2000)
    ref = Reference.from_values(list(ref_sample))
    cur = np.bincount([ref.bin(v) for v in cur_sample], minlength=ref.size)
    exact = ks_2samp(ref_sample, cur_sample).statistic
    approx, bound = ks_from_counts(ref.counts, cur), ks_bound(ref.counts, cur)
    assert approx <= exact + 1e-12 <= approx + bound + 1e-12
    if shift == 0.0:
        assert bound < 0.03  # 100 reference-quantile bins, each about 1% of either sample
    assert ref.compare("ks", cur) == approx


def test_ks_from_counts_is_exact_when_every_value_has_its_own_bin():
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 8, size=300), rng.integers(1, 9, size=200)
    ca, cb = np.bincount(a, minlength=9), np.bincount(b, minlength=9)
    assert ks_from_counts(ca, cb) == pytest.approx(ks_2samp(a, b).statistic, abs=1e-12)


# -- references -------------------------------------------------------------------------------

def test_numeric_reference_uses_decile_bins_for_psi_and_percentiles_for_ks():
    ref = Reference.from_values([float(i) for i in range(1000)])
    assert ref.size == 100 and ref.counts == (10,) * 100
    assert np.bincount(ref.coarse, weights=ref.counts).tolist() == [100.0] * 10
    assert ref.bin(-50.0) == 0 and ref.bin(1e9) == 99  # beyond the range: the end bins
    assert ref.bin(ref.edges[3]) == 4  # a value on a cut goes to the bin above
    assert ref.bin("x") is None
    counts, mismatched = ref.count([-50.0, 5.0, 5.5, "x", 999.0])
    assert counts[0] == 3 and counts[99] == 1 and counts.sum() == 4 and mismatched == 1
    same = np.asarray(ref.counts)
    assert ref.compare("psi", same) == 0.0 and ref.compare("js", same) == 0.0


def test_numeric_reference_with_heavy_ties_collapses_bins():
    ref = Reference.from_values([1] * 500 + [2] * 300 + [3] * 200)
    assert ref.edges == (2.0, 3.0) and ref.counts == (500, 300, 200)
    assert ref.compare("psi", np.array([500, 300, 200])) == 0.0
    constant = Reference.from_values([4.0] * 100)  # drift either way still shows
    assert [constant.bin(v) for v in (3.0, 4.0, 5.0)] == [0, 1, 2]
    assert constant.compare("psi", np.array([0, 0, 100])) > 0.25


def test_categorical_reference_keeps_unseen_categories_apart():
    ref = Reference.from_values(["a"] * 6 + ["b"] * 3 + ["c"], max_categories=2)
    assert ref.categories == ("a", "b") and ref.counts == (6, 3, 1)
    assert ref.bin("b") == 1 and ref.bin("c") == 2 and ref.bin("never seen") == 2
    assert ref.bin(3.0) is None
    assert ref.count(["a", "c", "zz", 3.0, "b"])[0].tolist() == [1, 1, 2]
    assert ref.compare("ks", np.array([1, 1, 1])) is None  # no order: no KS
    # hand-computed: p = (.6, .3, .1), q = (.2, .3, .5)
    want = (0.2 - 0.6) * math.log(0.2 / 0.6) + (0.5 - 0.1) * math.log(0.5 / 0.1)
    assert ref.compare("psi", np.array([2, 3, 5])) == pytest.approx(want, abs=1e-12)


def test_references_round_trip_through_json_and_pickle_and_bad_ones_are_refused():
    for values in ([0.5, 1.5, 2.5, 9.0] * 30, ["x", "y", "y"]):
        ref = Reference.from_values(values)
        back = Reference.from_json(ref.to_json())
        assert back == ref and back.key == ref.key
        assert pickle.loads(pickle.dumps(ref)).key == ref.key
    assert Reference.from_values([1.0, 2.0]).key != Reference.from_values([1.0, 3.0]).key
    with pytest.raises(ValueError, match="not a mix"):
        Reference.from_values([1.0, "a"])
    with pytest.raises(ValueError, match="finite"):
        Reference.from_values([1.0, math.inf])
    with pytest.raises(ValueError, match="at least one value"):
        Reference.from_values([])
    with pytest.raises(ValueError, match="ks_bins a multiple"):
        Reference.from_values([1.0], bins=10, ks_bins=15)
    with pytest.raises(ValueError, match="kind"):
        Reference.from_json({"counts": [1, 2]})
    with pytest.raises(ValueError, match="len\\(edges\\) \\+ 1"):
        Reference.from_json({"kind": "numeric", "counts": [1, 2], "edges": [1.0, 2.0],
                             "coarse": [0, 1]})


def test_feature_counts_merge_to_the_whole_and_keep_references_apart():
    ref, other = Reference.from_values([1.0, 2.0, 3.0]), Reference.from_values(["a", "b"])
    whole, parts = FeatureCounts(), [FeatureCounts() for _ in range(3)]
    rng = np.random.default_rng(4)
    for i, v in enumerate(rng.normal(2, 1, size=300)):
        for fc in (whole, parts[i % 3]):
            fc.add("feature_x", ref, ref.count([float(v)])[0])
            fc.add("feature_c", other, other.count(["a" if v > 2 else "z"])[0])
    merged = FeatureCounts().merge(parts[0]).merge(parts[1]).merge(parts[2])
    assert merged.counts.keys() == whole.counts.keys()
    for key in whole.counts:
        assert merged.counts[key].tolist() == whole.counts[key].tolist()
    newer = Reference.from_values([5.0, 6.0, 7.0])
    assert merged.get("feature_x", newer) is None
    assert parts[0].get("feature_x", ref).sum() == 100  # merge did not alias the parts


# -- the monitor ------------------------------------------------------------------------------

def preds(rng, n, *, shift=0.0, t=0.0, city_p=(0.7, 0.3)):
    out = []
    for i in range(n):
        age = float(rng.normal(40 + shift, 10))
        city = str(rng.choice(["oslo", "rome"], p=city_p))
        label = "spam" if age > 45 else "ham"
        out.append(Prediction(f"r{i}", t, "app", "dep", "v1", label=label,
                              features={"age": age, "city": city}))
    return out


def test_monitor_builds_its_reference_from_the_first_n_then_sees_drift():
    rng = np.random.default_rng(8)
    mon = DriftMonitor(reference_size=1000)
    warmup = mon.observe(preds(rng, 1000))
    assert not warmup  # the reference observations are not compared with themselves
    assert set(mon.references()) == {"prediction", "feature_age", "feature_city"}
    same = mon.observe(preds(rng, 2000))
    shifted = mon.observe(preds(rng, 2000, shift=8.0, city_p=(0.3, 0.7)))
    for metric in ("feature_age", "feature_city", "prediction"):
        assert mon.value("psi", metric, same) < 0.1, metric
        assert mon.value("psi", metric, shifted) > 0.25, metric
        assert mon.value("js", metric, same) < mon.value("js", metric, shifted)
    assert mon.value("ks", "feature_age", same) < 0.05 < 0.25 < mon.value("ks", "feature_age", shifted)
    assert mon.value("ks", "feature_city", shifted) is None
    stats = mon.statistics(shifted)
    assert stats["feature_age"]["n"] == 2000 and stats["feature_age"]["psi"] > 0.25
    assert mon.stats()["observations"] == 5000


def test_monitor_answers_nothing_for_small_windows_or_unknown_metrics():
    rng = np.random.default_rng(9)
    mon = DriftMonitor(reference_size=100, min_observations=30)
    mon.observe(preds(rng, 100))
    small = mon.observe(preds(rng, 29))
    assert mon.value("psi", "feature_age", small) is None
    assert mon.value("psi", "feature_height", small) is None
    with pytest.raises(ValueError, match="unknown drift function"):
        mon.value("kl", "feature_age", small)


def test_user_set_and_uploaded_references_win_and_replace_old_counts():
    rng = np.random.default_rng(10)
    mon = DriftMonitor(reference_size=50)
    mon.set_reference("feature_age", list(rng.normal(60, 10, size=1000)))  # trained on older people
    counts = mon.observe(preds(rng, 500))
    assert mon.value("psi", "feature_age", counts) > 0.25
    exported = mon.export()
    other = DriftMonitor()
    other.set_references(exported)
    assert other.value("psi", "feature_age", counts) == mon.value("psi", "feature_age", counts)
    # a new reference: counts made against the old bins are no longer compared
    mon.set_reference("feature_age", list(rng.normal(40, 10, size=1000)))
    assert mon.value("psi", "feature_age", counts) is None
    assert mon.value("psi", "feature_age", mon.observe(preds(rng, 500))) < 0.1
    with pytest.raises(ValueError, match="feature_<feature name>"):
        mon.set_reference("age", [1.0])
    with pytest.raises(TypeError, match="metric -> reference"):
        mon.set_references([1, 2])


def test_monitor_counts_values_of_the_wrong_kind_and_bounds_its_metrics():
    mon = DriftMonitor(reference_size=2, max_metrics=2)
    p = lambda i, v: Prediction(str(i), 0.0, "a", "d", "v", value=1.0 + i,  # noqa: E731
                                features={"x": v, "y": 1.0, "z": 2.0})
    mon.observe([p(0, 1.0), p(1, "one"), p(2, 2.0), p(3, "two")])
    stats = mon.stats()
    assert stats["mismatched"] == 2
    assert stats["references"] == 2 and stats["metrics_over_cap"] > 0
    with pytest.raises(ValueError, match="reference_size"):
        DriftMonitor(reference_size=0)
    with pytest.raises(ValueError, match="ks_bins"):
        DriftMonitor(bins=10, ks_bins=25)
