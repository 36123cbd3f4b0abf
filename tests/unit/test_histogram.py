"""The histogram's promise: every quantile within 1% of the exact one, and exact merges."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ray_monitor.common.histogram import (BASE, DEFAULT_CLASSIC_BOUNDS, RELATIVE_ERROR, Histogram,
                                   bucket_index, bucket_upper)

QUANTILES = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)

DISTRIBUTIONS = {
    "lognormal latency": lambda rng, n: rng.lognormal(mean=-4.0, sigma=1.0, size=n),
    "exponential": lambda rng, n: rng.exponential(scale=0.05, size=n),
    "uniform": lambda rng, n: rng.uniform(0.001, 2.0, size=n),
    "pareto tail": lambda rng, n: (rng.pareto(1.5, size=n) + 1) * 1e-3,
    "bimodal": lambda rng, n: np.where(rng.random(n) < 0.9, rng.normal(0.01, 0.001, n).clip(1e-5),
                                       rng.normal(2.0, 0.2, n).clip(1e-5)),
    "microseconds to hours": lambda rng, n: 10 ** rng.uniform(-6, 3.6, size=n),
}


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_every_quantile_within_one_percent_of_exact(name):
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    values = DISTRIBUTIONS[name](rng, 200_000)
    h = Histogram()
    for v in values.tolist():
        h.record(v)
    assert h.count == len(values)
    assert math.isclose(h.sum, float(values.sum()), rel_tol=1e-9)
    for q in QUANTILES:
        exact = float(np.quantile(values, q, method="inverted_cdf"))
        got = h.quantile(q)
        assert abs(got - exact) <= RELATIVE_ERROR * exact + 1e-15, (q, got, exact)
    assert RELATIVE_ERROR < 0.01


def test_merge_of_parts_equals_the_whole_and_keeps_the_bound():
    rng = np.random.default_rng(7)
    parts = [rng.lognormal(-3, 0.5 + i / 10, 20_000) for i in range(8)]  # 8 "replicas"
    whole = Histogram()
    merged = Histogram()
    for p in parts:
        h = Histogram()
        for v in p.tolist():
            h.record(v)
            whole.record(v)
        merged.merge(h)
    assert merged == whole
    allv = np.concatenate(parts)
    for q in (0.5, 0.9, 0.99):
        exact = float(np.quantile(allv, q, method="inverted_cdf"))
        assert abs(merged.quantile(q) - exact) <= RELATIVE_ERROR * exact


def test_buckets_are_otlp_exponential_buckets_at_scale_6():
    # OTLP: bucket i holds (base**i, base**(i+1)], base = 2**(2**-6).
    assert BASE == 2 ** (2 ** -6)
    for i in (-1500, -64, -1, 0, 1, 63, 64, 700):
        lower, upper = BASE ** i, BASE ** (i + 1)
        assert bucket_index(upper * (1 - 1e-9)) == i
        assert bucket_index(lower * (1 + 1e-9)) == i
        assert math.isclose(bucket_upper(i), upper, rel_tol=1e-12)
    assert bucket_index(1.0) == -1  # 1.0 is the upper bound of bucket -1
    assert bucket_index(2.0) == 63


def test_zero_and_empty():
    h = Histogram()
    assert math.isnan(h.quantile(0.5)) and math.isnan(h.mean)
    h.record(0.0)
    h.record(0.0)
    h.record(1.0)
    assert h.zero_count == 2 and h.quantile(0.0) == 0.0 and h.quantile(1.0) == 1.0
    with pytest.raises(ValueError, match="between 0 and 1"):
        h.quantile(1.5)


def test_classic_buckets_are_cumulative_and_end_at_inf():
    h = Histogram()
    for v in (0.001, 0.004, 0.02, 0.3, 0.3, 7.0, 50.0):
        h.record(v)
    classic = h.classic()
    assert [le for le, _ in classic] == list(DEFAULT_CLASSIC_BOUNDS) + [math.inf]
    counts = dict(classic)
    assert counts[0.005] == 2 and counts[0.025] == 3 and counts[0.5] == 5
    assert counts[10.0] == 6 and counts[math.inf] == 7
    assert [c for _, c in classic] == sorted(c for _, c in classic)


def test_dense_and_dict_round_trip():
    h = Histogram()
    for v in (0.01, 0.02, 0.02, 3.0):
        h.record(v)
    offset, counts = h.dense()
    assert offset == min(h.buckets) and sum(counts) == 4
    assert Histogram.from_dict(h.to_dict()) == h
