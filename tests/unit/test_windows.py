"""WindowStore: functions against hand-computed values, windows, resolutions, upkeep."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ray_monitor.common.catalog import SHORTHAND_QUANTILES, Query
from ray_monitor.common.matchers import Matcher
from ray_monitor.common.histogram import Histogram, bucket_index, bucket_value
from ray_monitor.common.snapshot import (Exemplar, GpuDevice, GpuProcess, GpuSnapshot, HungRequest,
                                  ReplicaHealth, ReplicaIdentity, ReplicaSnapshot, SeriesDelta)
from ray_monitor.aggregator.windows import WindowStore
from tests.helpers import Clock, hist

T0 = 1_000_020.0  # a multiple of 60: bucket edges of every ring fall on whole numbers


def ident(replica: str = "r1", deployment: str = "d1", application: str = "app") -> ReplicaIdentity:
    return ReplicaIdentity(application, deployment, replica, "node1", 100, "v1")


def snap(end: float, *, replica: str = "r1", deployment: str = "d1", seq: int = 0,
         series=(), inflight=None, health=None, dropped: int = 0) -> ReplicaSnapshot:
    return ReplicaSnapshot(ident(replica, deployment), seq, end - 1.0, end, list(series),
                           inflight or {}, health, dropped=dropped)


def ok(*values: float, method: str = "__call__") -> SeriesDelta:
    return SeriesDelta(method, "ok", False, hist(*values))


def err(*values: float, method: str = "__call__") -> SeriesDelta:
    return SeriesDelta(method, "ValueError", True, hist(*values))


def q(function: str, metric: str, window_s: float = 60.0, by=None, matchers=(), param=None):
    return Query(function, metric, window_s, by=by, matchers=tuple(matchers), param=param)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def store(clock: Clock) -> WindowStore:
    return WindowStore(clock=clock)


def feed(store: WindowStore, clock: Clock, times, make) -> None:
    for t in times:
        clock.t = t
        store.ingest(make(t))


# ---------------------------------------------------------------------------- counters

def test_counter_functions_and_error_ratio(store, clock):
    # 10 seconds, each: 4 ok and 1 error on r1, 2 ok on r2
    for i in range(10):
        t = T0 - 9 + i
        clock.t = t
        store.ingest(snap(t, replica="r1", seq=i, series=[ok(*[0.1] * 4), err(0.2)]))
        store.ingest(snap(t, replica="r2", seq=i, series=[ok(0.1, 0.1)]))
    clock.t = T0
    by_rep = ("replica",)
    assert store.evaluate(q("count", "requests", by=by_rep)) == {
        (("replica", "r1"),): 50.0, (("replica", "r2"),): 20.0}
    assert store.evaluate(q("sum", "requests")) == {(): 70.0}
    assert store.evaluate(q("rate", "requests", 60.0)) == {(): pytest.approx(70 / 60)}
    assert store.evaluate(q("count", "errors")) == {(): 10.0}
    ratio = store.evaluate(q("error_ratio", "requests", by=by_rep))
    assert ratio == {(("replica", "r1"),): pytest.approx(10 / 50), (("replica", "r2"),): 0.0}
    assert store.evaluate(q("error_ratio", "errors")) == {(): pytest.approx(10 / 70)}


def test_error_ratio_is_absent_without_requests(store, clock):
    assert store.evaluate(q("error_ratio", "requests")) == {}
    store.ingest(snap(T0, series=[ok(0.1)]))
    clock.t = T0 + 120
    assert store.evaluate(q("error_ratio", "requests")) == {}


# ---------------------------------------------------------------------------- histograms

def test_histogram_quantiles_match_numpy_within_one_percent(store, clock):
    rng = np.random.default_rng(7)
    raw = []
    for i in range(30):
        t = T0 - 29 + i
        values = rng.lognormal(np.log(0.08), 0.8, 200)
        raw.extend(values)
        clock.t = t
        store.ingest(snap(t, replica=f"r{i % 3}", seq=i // 3, series=[ok(*values)]))
    clock.t = T0
    for fn, quant in (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99)):
        got = store.evaluate(q(fn, "latency_seconds"))[()]
        assert got == pytest.approx(np.quantile(raw, quant, method="inverted_cdf"), rel=0.01), fn
    got = store.evaluate(q("quantile", "latency_seconds", param=0.75))[()]
    assert got == pytest.approx(np.quantile(raw, 0.75, method="inverted_cdf"), rel=0.01)
    # and the same as merging Histogram objects by hand
    assert got == pytest.approx(hist(*raw).quantile(0.75), rel=1e-12)


def test_histogram_count_sum_avg_min_max_rate_ratio_above(store, clock):
    values = [0.01, 0.02, 0.03, 0.5, 1.0, 2.0]
    for i, v in enumerate(values):
        clock.t = T0 - 5 + i
        store.ingest(snap(clock.t, seq=i, series=[ok(v)]))
    lat = "latency_seconds"
    assert store.evaluate(q("count", lat)) == {(): 6.0}
    assert store.evaluate(q("sum", lat))[()] == pytest.approx(sum(values))
    assert store.evaluate(q("avg", lat))[()] == pytest.approx(sum(values) / 6)
    assert store.evaluate(q("min", lat)) == {(): 0.01}
    assert store.evaluate(q("max", lat)) == {(): 2.0}
    assert store.evaluate(q("rate", lat, 60.0)) == {(): pytest.approx(6 / 60)}
    assert store.evaluate(q("ratio_above", lat, param=0.25)) == {(): pytest.approx(3 / 6)}
    assert store.evaluate(q("ratio_above", lat, param=5.0)) == {(): 0.0}
    assert store.evaluate(q("ratio_above", lat, param=0.0)) == {(): 1.0}


# ---------------------------------------------------------------------------- gauges

def test_gauge_functions(store, clock):
    # two replicas, in-flight r1: 1,2,3 ; r2: 10,10,20
    for i, (a, b) in enumerate(((1, 10), (2, 10), (3, 20))):
        clock.t = T0 - 2 + i
        store.ingest(snap(clock.t, replica="r1", seq=i, inflight={"__call__": a}))
        store.ingest(snap(clock.t, replica="r2", seq=i, inflight={"__call__": b}))
    clock.t = T0
    g = "inflight"
    assert store.evaluate(q("avg", g)) == {(): pytest.approx(46 / 6)}
    assert store.evaluate(q("min", g)) == {(): 1.0}
    assert store.evaluate(q("max", g)) == {(): 20.0}
    assert store.evaluate(q("count", g)) == {(): 6.0}
    assert store.evaluate(q("last", g)) == {(): 23.0}  # 3 + 20: in flight now, deployment-wide
    assert store.evaluate(q("sum", g))[()] == pytest.approx(2.0 + 40 / 3)
    assert store.evaluate(q("last", g, by=("replica",))) == {
        (("replica", "r1"),): 3.0, (("replica", "r2"),): 20.0}


def test_health_gauges_and_loop_lag_skipped_when_none(store, clock):
    health = ReplicaHealth(cpu_percent=55.0, rss_bytes=2 ** 30, loop_lag_s=None,
                           longest_request_s=4.0,
                           hung=[HungRequest("__call__", "id1", 40.0, "stack")])
    store.ingest(snap(T0, health=health))
    assert store.evaluate(q("last", "cpu_percent")) == {(): 55.0}
    assert store.evaluate(q("last", "rss_bytes")) == {(): float(2 ** 30)}
    assert store.evaluate(q("last", "longest_request_seconds")) == {(): 4.0}
    assert store.evaluate(q("last", "hung_requests")) == {(): 1.0}
    assert store.evaluate(q("last", "loop_lag_seconds")) == {}
    node = store.evaluate(q("last", "cpu_percent", by=("node", "model_version")))
    assert node == {(("model_version", "v1"), ("node", "node1")): 55.0}


def test_deriv_of_a_growing_gauge(store, clock):
    for i in range(30):
        clock.t = T0 - 29 + i
        store.ingest(snap(clock.t, seq=i, health=ReplicaHealth(rss_bytes=1000 + 50 * i)))
    clock.t = T0
    assert store.evaluate(q("deriv", "rss_bytes"))[()] == pytest.approx(50.0)
    # two steps with data are enough, as two samples are for Prometheus' deriv()
    clock.t = T0 + 58
    assert store.evaluate(q("deriv", "rss_bytes"))[()] == pytest.approx(50.0)
    # one step: absent
    clock.t = T0 + 59
    assert store.evaluate(q("deriv", "rss_bytes")) == {}


# ---------------------------------------------------------------------------- zscore

def test_zscore_flat_then_jump_is_large_and_flat_is_zero(store, clock):
    for i in range(60):
        clock.t = T0 - 59 + i
        latency = 0.1 if i < 59 else 0.5
        store.ingest(snap(clock.t, seq=i, series=[ok(latency, latency)],
                          health=ReplicaHealth(cpu_percent=20.0)))
    clock.t = T0
    assert store.evaluate(q("zscore", "latency_seconds"))[()] > 100
    assert store.evaluate(q("zscore", "cpu_percent")) == {(): 0.0}


def test_zscore_of_noise_is_small_and_needs_history(store, clock):
    rng = np.random.default_rng(3)
    for i in range(120):
        clock.t = T0 - 119 + i
        n = int(rng.integers(90, 111))
        store.ingest(snap(clock.t, seq=i, series=[ok(*[0.1] * n)],
                          health=ReplicaHealth(cpu_percent=float(rng.normal(50, 5)))))
    clock.t = T0 + 0.5
    assert abs(store.evaluate(q("zscore", "cpu_percent", 120.0))[()]) < 4
    # counters: per-step rate; the step still filling (T0) is left out
    assert abs(store.evaluate(q("zscore", "requests", 120.0))[()]) < 4
    clock.t = T0 + 55.5  # only the last 5 steps are in the window: 4 history steps
    assert store.evaluate(q("zscore", "cpu_percent", 60.0)) == {}


def test_zscore_of_a_counter_jump(store, clock):
    for i in range(40):
        clock.t = T0 - 39 + i
        n = 10 if i < 39 else 100
        store.ingest(snap(clock.t, seq=i, series=[ok(*[0.1] * n)]))
    clock.t = T0 + 0.5  # the delta ending at T0 is the second T0 - 1: complete, and latest
    assert store.evaluate(q("zscore", "requests"))[()] > 100


def test_zscore_of_a_counter_that_stops_reads_the_silence(store, clock):
    for i in range(40):
        clock.t = T0 - 39 + i
        store.ingest(snap(clock.t, seq=i, series=[ok(*[0.1] * (10 + i % 3))] if i < 39 else []))
    clock.t = T0 + 0.5  # the last second had no request: a step of 0, far below the history
    assert store.evaluate(q("zscore", "requests"))[()] < -10


# ---------------------------------------------------------------------------- windows

def test_window_edges_count_whole_seconds_before_the_window_end(store, clock):
    # deltas of one second each, landing in the second of their midpoint
    for t in (T0 - 60.5, T0 - 59.0, T0 - 0.5, T0):  # seconds T0-61, T0-60, T0-1, T0-1
        clock.t = t
        store.ingest(snap(t, series=[ok(0.1)]))
    clock.t = T0
    assert store.window_end() == T0
    # a window of W seconds is the W whole seconds before its end: [T0 - W, T0)
    assert store.evaluate(q("count", "requests", 1.0)) == {(): 2.0}
    assert store.evaluate(q("count", "requests", 60.0)) == {(): 3.0}
    assert store.evaluate(q("count", "requests", 61.0)) == {(): 4.0}
    assert store.evaluate(q("count", "requests", 59.5)) == {(): 2.0}  # starts inside T0-60


def test_silence_reads_zero_while_the_series_is_alive(store, clock):
    for m in ("requests", "latency_seconds", "inflight"):
        assert store.evaluate(q("count", m)) == {}  # no series at all: no value
    store.ingest(snap(T0, series=[ok(0.1)], inflight={"__call__": 1}))
    clock.t = T0 + 299  # no request for longer than the window, the series still alive
    # counters and histogram counts read 0, as Prometheus' rate over a counter that stopped
    for f, m in (("rate", "requests"), ("count", "requests"), ("count", "latency_seconds"),
                 ("rate", "latency_seconds"), ("sum", "latency_seconds"),
                 ("count", "errors")):  # errors: the known method's ok series, at 0
        assert store.evaluate(q(f, m)) == {(): 0.0}, (f, m)
    # what needs an observation or a sample has none: no value (Prometheus: NaN)
    for f, m in (("p99", "latency_seconds"), ("avg", "latency_seconds"),
                 ("max", "latency_seconds"), ("ratio_above", "latency_seconds"),
                 ("error_ratio", "requests"), ("max", "inflight"), ("last", "inflight"),
                 ("zscore", "inflight")):
        assert store.evaluate(q(f, m, param=0.5 if f == "ratio_above" else None)) == {}, f
    assert store.evaluate(q("count", "requests", 600.0)) == {(): 1.0}
    clock.t = T0 + 301  # past series_ttl_s: the series are gone, and so are the zeros
    store.expire()
    assert store.evaluate(q("rate", "requests")) == {}
    # its data stays in the deployment's rollup (a longer window still counts it)
    assert store.evaluate(q("count", "requests", 600.0)) == {(): 1.0}


def test_resolution_choice(store, clock):
    # T0 is a multiple of 60. A snapshot 1785 s ago sits in a 10 s bucket that starts
    # inside a 30 min window, but in a 60 s bucket that starts before it.
    clock.t = T0
    store.ingest(snap(T0 - 1785, seq=0, series=[ok(0.1)]))  # late: kept by the 10 s and 60 s rings
    store.ingest(snap(T0 - 5 * 3600, seq=1, series=[ok(0.1)]))  # only the 60 s ring keeps it
    assert store.evaluate(q("count", "requests", 1800.0)) == {(): 1.0}  # read from the 10 s ring
    assert store.evaluate(q("count", "requests", 6 * 3600.0)) == {(): 2.0}  # from the 60 s ring
    assert store.evaluate(q("count", "requests", 600.0)) == {(): 0.0}  # alive, none in 10 min
    assert store.max_window_s == 6 * 3600.0


def test_coarse_blocks_give_the_same_answers_as_fine_buckets(clock):
    # The default store reads whole 10 s / 60 s buckets inside long windows; a store with
    # a single fine ring reads every second. Both must agree exactly.
    fine = WindowStore(resolutions=((1.0, 600),), clock=clock)
    multi = WindowStore(clock=clock)
    rng = np.random.default_rng(11)
    for i in range(590):
        clock.t = T0 - 589 + i + 0.3
        s = snap(clock.t, seq=i, series=[ok(*rng.lognormal(-2, 0.5, int(rng.integers(1, 20))))],
                 inflight={"__call__": int(rng.integers(0, 9))})
        fine.ingest(s)
        multi.ingest(s)
    for now in (T0 + 0.5, T0 + 7.25):
        for f, m in (("count", "requests"), ("p99", "latency_seconds"), ("p50", "latency_seconds"),
                     ("min", "latency_seconds"), ("max", "latency_seconds"),
                     ("sum", "latency_seconds"), ("avg", "inflight"), ("max", "inflight"),
                     ("last", "inflight"), ("sum", "inflight"), ("count", "inflight")):
            for w in (37.0, 300.0, 555.0):
                a, b = fine.evaluate(q(f, m, w), now), multi.evaluate(q(f, m, w), now)
                assert a.keys() == b.keys() and all(
                    math.isclose(a[k], b[k], rel_tol=1e-9) for k in a), (f, m, w, now)


def test_late_snapshots_land_at_their_own_time(store, clock):
    clock.t = T0
    # the aggregator was away; buffered snapshots arrive together
    store.ingest(snap(T0 - 200, seq=1, series=[ok(0.1, 0.1)]))
    store.ingest(snap(T0 - 30, seq=2, series=[ok(0.1)]))
    assert store.evaluate(q("count", "requests", 60.0)) == {(): 1.0}
    assert store.evaluate(q("count", "requests", 300.0)) == {(): 3.0}
    # older than the coarsest ring: dropped and counted
    store.ingest(snap(T0 - 7 * 3600, seq=3, series=[ok(0.1)]))
    assert store.evaluate(q("count", "requests", 6 * 3600.0)) == {(): 3.0}
    stats = store.stats()
    assert stats["late_snapshots"] == 0 and stats["too_old_snapshots"] == 1
    # a replica clock ahead of ours cannot write the future
    store.ingest(snap(T0 + 500, seq=4, series=[ok(0.1)]))
    assert store.evaluate(q("count", "requests", 1.0), now=T0 + 3.5) == {(): 0.0}
    assert store.evaluate(q("count", "requests", 4.0), now=T0 + 3.5) == {(): 1.0}  # second T0


def test_windows_wait_for_every_replicas_flush_and_count_late_ones(store, clock):
    # two replicas flushing on whole seconds, 10 requests a second each
    def flush(rep: str, end: float, seq: int) -> None:
        store.ingest(ReplicaSnapshot(ident(rep), seq, end - 1.0, end, [ok(*[0.1] * 10)], {}))

    for i in range(1, 21):
        clock.t = T0 + i + 0.05
        flush("r1", T0 + i + 0.01, i)
        flush("r2", T0 + i + 0.02, i)
    # r2's flush of the second T0 + 21 is late: the window ends one second earlier, so
    # it holds 10 complete seconds of both replicas: rate 20 exactly, never 19
    clock.t = T0 + 21.3
    flush("r1", T0 + 21.01, 21)
    assert store.window_end() == T0 + 20
    assert not store.complete()  # what the aggregator's round waits a little for
    assert store.evaluate(q("rate", "requests", 10.0)) == {(): 20.0}
    # once it arrives, the window moves on
    flush("r2", T0 + 21.02, 21)
    assert store.window_end() == T0 + 21 and store.complete()
    assert store.evaluate(q("rate", "requests", 10.0)) == {(): 20.0}
    # a replica that stops reporting is waited for only until its next flush is
    # COMPLETE_WAIT_S overdue
    for i in range(22, 26):
        clock.t = T0 + i + 0.05
        flush("r1", T0 + i + 0.01, i)
        assert store.window_end() == (T0 + 21 if i < 24 else T0 + i)
        assert store.complete() == (i >= 24)  # a stopped replica is waited for no longer
    # a flush for a second a round has already read is counted as late
    store.begin_round(T0 + 25.5)
    store.evaluate(q("rate", "requests", 10.0))
    store.end_round()
    flush("r2", T0 + 22.02, 22)
    assert store.stats()["late_snapshots"] == 1


# ---------------------------------------------------------------------------- matchers, by

def test_matchers_and_by(store, clock):
    for dep in ("d1", "d10", "api"):
        for rep in ("a", "b"):
            store.ingest(snap(T0, replica=f"{dep}-{rep}", deployment=dep,
                              series=[ok(0.1), err(0.2, method="predict")]))
    by = ("deployment",)
    m = lambda op, v, label="deployment": Matcher(label, op, v)  # noqa: E731
    assert store.evaluate(q("count", "requests", by=by, matchers=[m("=", "d1")])) == {
        (("deployment", "d1"),): 4.0}
    assert set(store.evaluate(q("count", "requests", by=by, matchers=[m("!=", "d1")]))) == {
        (("deployment", "d10"),), (("deployment", "api"),)}
    # regexes are fully anchored, as in PromQL: "d1" does not match "d10"
    assert set(store.evaluate(q("count", "requests", by=by, matchers=[m("=~", "d1")]))) == {
        (("deployment", "d1"),)}
    assert set(store.evaluate(q("count", "requests", by=by, matchers=[m("=~", "d.*")]))) == {
        (("deployment", "d1"),), (("deployment", "d10"),)}
    assert set(store.evaluate(q("count", "requests", by=by, matchers=[m("!~", "d.*")]))) == {
        (("deployment", "api"),)}
    both = store.evaluate(q("count", "requests", by=("method", "deployment"),
                            matchers=[m("=", "api"), m("=", "predict", "method")]))
    assert both == {(("deployment", "api"), ("method", "predict")): 2.0}
    # a label the metric lacks reads as "": matches "" and groups under ""
    assert store.evaluate(q("count", "requests", matchers=[m("=", "", "gpu")])) == {(): 12.0}
    assert store.evaluate(q("count", "requests", matchers=[m("=", "x", "gpu")])) == {}
    assert store.evaluate(q("count", "requests", by=("gpu",))) == {(("gpu", ""),): 12.0}


def test_bad_queries_and_options_are_refused(store):
    with pytest.raises(ValueError, match="unknown"):
        store.evaluate(q("count", "nope"))
    with pytest.raises(ValueError, match="does not apply"):
        store.evaluate(q("p99", "requests"))
    with pytest.raises(ValueError, match="regex"):
        store.evaluate(q("count", "requests", matchers=[Matcher("replica", "=~", "(")]))
    with pytest.raises(ValueError, match="whole multiple"):
        WindowStore(resolutions=((1.0, 600), (15.5, 360)))
    with pytest.raises(ValueError, match="series_ttl_s"):
        WindowStore(series_ttl_s=0)
    with pytest.raises(ValueError, match="max_series_per_metric"):
        WindowStore(max_series_per_metric=0)


# ---------------------------------------------------------------------------- the round memo

def test_round_memo_is_shared_and_never_stale(store, clock):
    store.ingest(snap(T0, series=[ok(0.1)]))
    now = store.begin_round(T0 + 0.5)
    first = store.evaluate(q("count", "requests"))
    first[()] = -1.0  # the caller's copy: the memo must not see it
    assert store.evaluate(q("count", "requests")) == {(): 1.0}
    clock.t = now
    store.ingest(snap(T0, replica="r2", series=[ok(0.1)]))  # data arrives mid-round
    assert store.evaluate(q("count", "requests")) == {(): 2.0}
    assert store.evaluate(q("count", "requests"), now=T0 + 120) == {(): 0.0}
    store.end_round()
    clock.t = T0 + 1000
    assert store.evaluate(q("count", "requests")) == {(): 0.0}  # the clock, not the round's now


# ---------------------------------------------------------------------------- upkeep

def test_expiry_drops_series_not_updated(clock):
    store = WindowStore(series_ttl_s=60.0, clock=clock)
    store.ingest(snap(T0, replica="gone", series=[ok(0.1)], health=ReplicaHealth()))
    clock.t = T0 + 50
    store.ingest(snap(T0 + 50, replica="alive", series=[ok(0.1)]))
    assert store.expire() == 0
    clock.t = T0 + 61
    removed = store.expire()
    assert removed == 2 + 4  # requests, latency; cpu, rss, longest, hung (no loop lag)
    reps = {s.labels["replica"] for s in store.cumulative()}
    assert reps == {"alive"}
    assert store.evaluate(q("count", "requests", 120.0, by=("replica",))) == {
        (("replica", "alive"),): 1.0}
    # the freed rows are reused by new series without leaking old data
    store.ingest(snap(T0 + 61, replica="new", series=[ok(0.3)]))
    assert store.evaluate(q("max", "latency_seconds", 120.0, by=("replica",))) == {
        (("replica", "alive"),): 0.1, (("replica", "new"),): 0.3}


def test_cardinality_cap_folds_into_other(clock):
    store = WindowStore(max_series_per_metric=3, clock=clock)
    for i in range(5):
        store.ingest(snap(T0, replica=f"r{i}", series=[ok(0.1)]))
    per_rep = store.evaluate(q("count", "requests", by=("replica",)))
    assert per_rep == {(("replica", "r0"),): 1.0, (("replica", "r1"),): 1.0,
                       (("replica", "r2"),): 1.0, (("replica", "other"),): 2.0}
    other = [s for s in store.cumulative() if s.metric == "requests" and s.labels["replica"] == "other"]
    assert other[0].labels == {n: "other" for n in other[0].labels}
    stats = store.stats()
    assert stats["series"]["requests"] == 4
    assert stats["overflowed_series"]["requests"] == 2


def test_gaps_are_counted(store):
    store.ingest(snap(T0, seq=1))
    store.ingest(snap(T0, seq=2))
    store.ingest(snap(T0, seq=6, dropped=3))
    store.ingest(snap(T0, replica="r2", seq=40))
    stats = store.stats()
    assert stats["snapshots_missed"] == 3
    assert stats["replica_dropped"] == 3
    assert stats["snapshots_ingested"] == 4


def test_cumulative_contents(store, clock):
    ex_old = Exemplar("a" * 32, "b" * 16, 0.1, T0 - 1)
    ex_new = Exemplar("c" * 32, "d" * 16, 0.1, T0)
    d1 = ok(0.1, 0.2)
    d1.exemplars = {5: ex_old}
    clock.t = T0 - 1
    store.ingest(snap(T0 - 1, seq=0, series=[d1], inflight={"__call__": 4}))
    d2 = ok(0.3)
    d2.exemplars = {5: ex_new, 7: ex_old}
    clock.t = T0
    store.ingest(snap(T0, seq=1, series=[d2, err(0.4)], inflight={"__call__": 2}))
    # a late gauge sample does not replace the latest one
    store.ingest(snap(T0 - 10, seq=2, inflight={"__call__": 9}))
    by = {(s.metric, s.labels.get("outcome")): s for s in store.cumulative()}
    assert by[("requests", "ok")].value == 3.0 and by[("requests", "ok")].kind == "counter"
    assert by[("errors", "ValueError")].value == 1.0
    assert by[("errors", "ok")].value == 0.0  # a known method's ok series exist from the start
    lat = by[("latency_seconds", "ok")]
    assert lat.histogram == hist(0.1, 0.2, 0.3)
    assert lat.exemplars == {5: ex_new, 7: ex_old}
    assert lat.labels == {"application": "app", "deployment": "d1", "replica": "r1",
                          "method": "__call__", "model_version": "v1", "outcome": "ok"}
    assert by[("inflight", None)].value == 2.0
    assert by[("inflight", None)].updated == T0


# ---------------------------------------------------------------------------- GPU

def gpu_snapshot(t: float, xid0: dict, xid1: dict, lost1: bool = False) -> GpuSnapshot:
    values = {"utilization_ratio": 0.5, "memory_used_bytes": 4e9, "memory_total_bytes": 16e9,
              "temperature_celsius": 60.0, "power_watts": 200.0, "throttled": 0.0}
    return GpuSnapshot("node1", t, devices=[
        GpuDevice(0, "GPU-0", "H100", dict(values), xid_errors=xid0),
        GpuDevice(1, "GPU-1", "H100", {"utilization_ratio": 0.9}, xid_errors=xid1, lost=lost1),
    ], processes=[
        GpuProcess(0, "GPU-0", 11, 1e9, 0.3, replica=ident("r1", "d1")),
        GpuProcess(0, "GPU-0", 12, 2e9, None, replica=ident("r2", "d2")),
        GpuProcess(0, "GPU-0", 13, 5e8, 0.1),
        GpuProcess(1, "GPU-1", 14, 5e8, 0.1),
    ])


def test_gpu_device_series_per_deployment_and_processes(store):
    store.ingest_gpu(gpu_snapshot(T0, {}, {}))
    by = ("gpu", "deployment")
    util = store.evaluate(q("last", "gpu_utilization", by=by))
    assert util == {(("deployment", "d1"), ("gpu", "0")): 0.5,
                    (("deployment", "d2"), ("gpu", "0")): 0.5,
                    (("deployment", ""), ("gpu", "1")): 0.9}
    assert store.evaluate(q("last", "gpu_memory_utilization", by=by))[
        (("deployment", "d1"), ("gpu", "0"))] == pytest.approx(0.25)
    # device 1 reports no memory: those gauges are skipped, not zero
    assert (("deployment", ""), ("gpu", "1")) not in store.evaluate(
        q("last", "gpu_memory_used_bytes", by=by))
    full = store.evaluate(q("last", "gpu_power_watts", by=("node", "gpu", "uuid", "model",
                                                         "application", "deployment")))
    assert (("application", "app"), ("deployment", "d1"), ("gpu", "0"), ("model", "H100"),
            ("node", "node1"), ("uuid", "GPU-0")) in full
    mem = store.evaluate(q("last", "replica_gpu_memory_bytes", by=("replica", "pid")))
    assert mem == {(("pid", "11"), ("replica", "r1")): 1e9, (("pid", "12"), ("replica", "r2")): 2e9,
                   (("pid", "13"), ("replica", "")): 5e8, (("pid", "14"), ("replica", "")): 5e8}
    sm = store.evaluate(q("last", "replica_gpu_utilization", by=("pid",)))
    assert set(sm) == {(("pid", "11"),), (("pid", "13"),), (("pid", "14"),)}  # None skipped


def test_gpu_xid_increases_and_lost_devices(store, clock):
    def xid():
        skip_d2 = [Matcher("deployment", "!=", "d2")]  # GPU 0's errors also show under d2
        return store.evaluate(q("count", "gpu_xid_errors", 600.0, by=("gpu",), matchers=skip_d2))

    store.ingest_gpu(gpu_snapshot(T0, {79: 2}, {}))  # first sight: counts in full
    assert xid() == {(("gpu", "0"),): 2.0, (("gpu", "1"),): 0.0}
    clock.t = T0 + 1
    store.ingest_gpu(gpu_snapshot(T0 + 1, {79: 3, 48: 1}, {13: 1}, lost1=True))
    assert xid() == {(("gpu", "0"),): 4.0, (("gpu", "1"),): 1.0}  # lost: XIDs still counted
    # lost device: its values are skipped
    assert store.evaluate(q("last", "gpu_utilization", by=("gpu",)))[(("gpu", "1"),)] == 0.9
    assert store.evaluate(q("count", "gpu_utilization", by=("gpu",)))[(("gpu", "1"),)] == 1.0
    clock.t = T0 + 2
    store.ingest_gpu(gpu_snapshot(T0 + 2, {79: 1}, {13: 1}))  # decrease: the actor restarted
    assert xid() == {(("gpu", "0"),): 5.0, (("gpu", "1"),): 1.0}
    # each deployment on GPU 0 sees the device's errors
    per_dep = store.evaluate(q("count", "gpu_xid_errors", 600.0, by=("gpu", "deployment")))
    assert per_dep[(("deployment", "d1"), ("gpu", "0"))] == 5.0
    totals = {(s.labels["gpu"], s.labels["deployment"]): s.value for s in store.cumulative()
              if s.metric == "gpu_xid_errors"}
    assert totals == {("0", "d1"): 5.0, ("0", "d2"): 5.0, ("1", ""): 1.0}


def test_stats_shape(store):
    store.ingest(snap(T0, series=[ok(0.1, 0.2)], health=ReplicaHealth()))
    stats = store.stats()
    assert stats["series"]["latency_seconds"] == 1
    assert stats["buckets"] == 3 * stats["series_total"]  # one bucket per ring per series
    assert stats["approx_bytes"] > 0


# ---------------------------------------------------------------------------- reference model

def _reference(samples, query, end):
    """A plain recomputation of ``query`` from raw samples ``(labels, t, value)``, value a
    number (counter, gauge) or a Histogram, each read at ``t`` for the second before it
    (placed at ``t - 0.5``); the window is the whole seconds in ``[end - window, end)``.
    Zero is a value: a counter or histogram series that exists reads 0 without data."""
    first, last = end - query.window_s, end - 1
    by = sorted(query.by) if query.by else []
    per_series: dict = {}
    for labels, t, value in samples:
        if not all((labels.get(m.label, "") == m.value) == (m.op == "=") for m in query.matchers):
            continue
        points = per_series.setdefault(tuple(sorted(labels.items())), [])
        if first <= math.floor(t - 0.5) <= last:
            points.append((t, value))
    gauge = query.metric == "inflight"
    groups: dict = {}
    for series, points in per_series.items():
        if gauge and not points:
            continue
        labels = dict(series)
        groups.setdefault(tuple((b, labels.get(b, "")) for b in by), []).append(points)
    out = {}
    for key, members in groups.items():
        values = [v for points in members for _, v in points]
        f = query.function
        if query.metric == "latency_seconds":
            h = Histogram.merged(values)
            if not h.count:
                if f in ("count", "sum"):
                    out[key] = 0.0
                continue
            out[key] = {"count": h.count, "sum": h.sum, "avg": h.mean, "min": h.min,
                        "max": h.max}.get(f) if f not in ("ratio_above", "p50", "p99") else (
                sum(c for i, c in h.buckets.items() if bucket_value(i) > query.param) / h.count
                if f == "ratio_above" else h.quantile(SHORTHAND_QUANTILES[f]))
        elif f in ("count", "rate") and query.metric == "requests":
            out[key] = sum(values) / (query.window_s if f == "rate" else 1.0)
        elif f == "last":
            out[key] = sum(max(points)[1] for points in members)
        elif f == "sum":
            out[key] = sum(sum(v for _, v in points) / len(points) for points in members)
        else:
            out[key] = {"avg": sum(values) / len(values), "min": min(values),
                        "max": max(values), "count": float(len(values))}[f]
    return out


def test_results_match_a_reference_computation(store, clock):
    rng = np.random.default_rng(21)
    samples = {"requests": [], "latency_seconds": [], "inflight": []}
    seq = 0
    for i in range(400):
        t = T0 - 400 + i + 0.25
        clock.t = t
        for dep in ("d1", "d2"):
            for rep in ("a", "b", "c"):
                if rep == "c" and i % 3:  # one replica sends every third second only
                    continue
                seq += 1
                latency = hist(*rng.lognormal(-2.5, 0.7, int(rng.integers(1, 25))))
                inflight = float(rng.integers(0, 9))
                base = {"application": "app", "deployment": dep, "replica": f"{dep}-{rep}"}
                store.ingest(snap(t, replica=base["replica"], deployment=dep, seq=seq,
                                  series=[SeriesDelta("__call__", "ok", False, latency)],
                                  inflight={"__call__": inflight}))
                labels = {**base, "method": "__call__", "model_version": "v1"}
                samples["requests"].append(({**labels, "outcome": "ok"}, t, latency.count))
                samples["latency_seconds"].append(({**labels, "outcome": "ok"}, t, latency))
                samples["inflight"].append((labels, t, inflight))
    funcs = {"requests": ("count", "rate"),
             "latency_seconds": ("count", "sum", "avg", "min", "max", "p50", "p99", "ratio_above"),
             "inflight": ("avg", "min", "max", "count", "last", "sum")}
    compared = 0
    # every replica reported up to T0 - 0.75: the window ends at T0 - 1 (T0 - 0.25, where
    # the next delta's midpoint will fall, rounded down to the second); 3.25 s later no
    # replica is waited for any more and the window ends at the last whole second
    for now, end in ((T0 + 0.5, T0 - 1), (T0 + 3.75, T0 + 3)):
        assert store.window_end(now) == end
        for metric, fs in funcs.items():
            for f in fs:
                for w in (1.0, 45.0, 60.0, 300.0, 390.0):
                    for by in (None, ("deployment",), ("replica",)):
                        for matchers in ((), (Matcher("deployment", "=", "d2"),),
                                         (Matcher("replica", "!=", "d1-a"),)):
                            query = q(f, metric, w, by=by, matchers=matchers,
                                      param=0.08 if f == "ratio_above" else None)
                            got, want = store.evaluate(query, now), _reference(
                                samples[metric], query, end)
                            assert got.keys() == want.keys(), query
                            # pNN: the store reports a bucket's value where Histogram.quantile
                            # reports the exact min or max; both are within 1%
                            rel = 0.011 if f in ("p50", "p99") else 1e-9
                            for k in want:
                                assert got[k] == pytest.approx(want[k], rel=rel), (query, k)
                            compared += 1
    assert compared == 2 * 16 * 5 * 3 * 3


# ---------------------------------------------------------------------------- rollups, encoding

def test_coarse_rings_are_per_rollup_and_per_replica_queries_use_the_fine_ring(clock):
    store = WindowStore(series_ttl_s=60.0, clock=clock)
    clock.t = T0
    for rep in ("r1", "r2"):
        store.ingest(snap(T0 - 1800, replica=rep, seq=1, series=[ok(0.1)],
                          inflight={"__call__": 5}))  # late: only the coarse rings keep it
        store.ingest(snap(T0, replica=rep, seq=2, series=[ok(0.2), err(0.3)],
                          inflight={"__call__": 1}))
    hour = 3600.0
    assert store.evaluate(q("count", "requests", hour)) == {(): 6.0}
    assert store.evaluate(q("count", "requests", hour, by=("deployment",))) == {
        (("deployment", "d1"),): 6.0}
    # by replica: the window is cut to the finest ring's span (10 min)
    assert store.evaluate(q("count", "requests", hour, by=("replica",))) == {
        (("replica", "r1"),): 2.0, (("replica", "r2"),): 2.0}
    assert store.evaluate(q("count", "requests", hour,
                            matchers=[Matcher("replica", "=", "r1")])) == {(): 2.0}
    # gauge last/sum add per-series values: also per series, also cut
    assert store.evaluate(q("last", "inflight", hour)) == {(): 2.0}
    assert store.evaluate(q("max", "inflight", hour)) == {(): 5.0}
    stats = store.stats()  # 2 replicas x (requests 2, errors 2, latency 2, inflight 1)
    assert (stats["series_total"], stats["rollups_total"]) == (14, 7)
    # a replica that goes away: its series expire, its past stays in the coarse rings
    clock.t = T0 + 50
    store.ingest(snap(T0 + 50, replica="r1", seq=3, series=[ok(0.1)]))
    clock.t = T0 + 61
    store.expire()
    assert {s.labels["replica"] for s in store.cumulative()} == {"r1"}
    assert store.evaluate(q("count", "requests", hour)) == {(): 7.0}
    # r1 still reports: its series without new data (the error outcome) stay alive
    assert store.evaluate(q("count", "requests", hour, by=("replica",))) == {
        (("replica", "r1"),): 3.0}
    # rollups go once the coarsest span has passed without data
    clock.t = T0 + store.max_window_s + 100
    store.expire()
    assert store.stats()["rollups_total"] == 0
    assert store.evaluate(q("count", "requests", hour)) == {}


def test_histogram_counts_above_16_bits_and_extreme_values_are_kept(store, clock):
    h = Histogram()
    for v in (0.1, 0.1, 1e-200, 1e200):
        h.record(v)
    h.buckets[bucket_index(0.1)] += 200_000  # as if 200,000 more requests took 0.1 s
    h.count += 200_000
    h.sum += 20_000.0
    store.ingest(snap(T0, series=[SeriesDelta("__call__", "ok", False, h)]))
    lat = "latency_seconds"
    assert store.evaluate(q("count", lat)) == {(): 200_004.0}
    assert store.evaluate(q("p50", lat))[()] == pytest.approx(0.1, rel=0.01)
    assert store.evaluate(q("ratio_above", lat, param=0.2))[()] == pytest.approx(1 / 200_004)
    # min and max stay exact though the extreme values' buckets are clamped
    assert store.evaluate(q("min", lat)) == {(): 1e-200}
    assert store.evaluate(q("max", lat)) == {(): 1e200}
    assert [s.histogram for s in store.cumulative() if s.metric == lat] == [h]
