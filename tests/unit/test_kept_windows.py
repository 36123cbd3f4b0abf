"""Windows a rule round keeps for the next (issue 15, 10,000 replicas): per-series gauge
windows (``inflight`` ``last`` and ``sum``) and the per-step sums of ``zscore`` and
``deriv`` give, every round, exactly what a fresh read of the same store gives (compared
by ``repr``: bit for bit, the sign of zero included), through late deltas into seconds a
round read, replicas coming and going, a gauge sample that is not a whole number, two
samples in one second (the per-series ring unfolds), a clock jump, and windows that do not
slide (a coarse ring's steps). Kept windows stay through a replica coming or going (a
rollup window as it was; a per-series window rereads the rows of the series that came or
went), and still equal a fresh read."""

from __future__ import annotations

import math

import numpy as np

from ray_monitor.aggregator.window_query import WindowQuery
from ray_monitor.aggregator.windows import WindowStore
from ray_monitor.common.catalog import Query
from ray_monitor.common.matchers import Matcher
from ray_monitor.common.snapshot import ReplicaHealth, ReplicaSnapshot
from tests.helpers import Clock
from tests.unit.test_windows import T0, ident, ok

BYS = (None, ("deployment",), ("application", "deployment"))


def _queries() -> list[Query]:
    out = []
    for w in (10.0, 60.0, 300.0, 900.0):  # 900: past the 1 s ring, its steps do not slide
        for by in BYS:
            out += [Query(f, "inflight", w, by=by) for f in ("last", "sum", "avg", "max", "min")]
            out += [Query("zscore", m, w, by=by) for m in ("requests", "latency_seconds",
                                                           "inflight", "cpu_percent")]
            out += [Query("deriv", m, w, by=by) for m in ("cpu_percent", "rss_bytes", "inflight")]
            out += [Query("p99", "latency_seconds", w, by=by), Query("rate", "requests", w, by=by)]
        out.append(Query("last", "inflight", w, by=("application", "deployment"),
                         matchers=(Matcher("deployment", "=", "d2"),)))
        out.append(Query("sum", "inflight", w, by=("replica",)))
    return out


def _snap(dep: str, rep: str, seq: int, start: float, end: float, rng, inflight: float):
    return ReplicaSnapshot(ident(rep, dep), seq, start, end,
                           [ok(*rng.lognormal(-2.5, 0.7, int(rng.integers(1, 20))))],
                           {"__call__": inflight},
                           ReplicaHealth(cpu_percent=float(rng.integers(10, 90)) + 0.25,
                                         rss_bytes=int(rng.integers(1, 2 ** 30))))


def test_windows_kept_between_rounds_equal_a_fresh_read_bit_for_bit():
    clock = Clock(T0)
    store = WindowStore(clock=clock, series_ttl_s=20.0)
    rng = np.random.default_rng(17)
    queries = _queries()
    replicas = [("d1", "a"), ("d1", "b"), ("d2", "a")]
    seq, kinds, survived = 0, set(), set()
    for sec in range(420):
        if sec == 380:
            clock.t += 80.0  # past the 60 s window: nothing of the kept one is in the new
        t = math.floor(clock.t) + 1.0
        versions = [tb.version for tb in store._tables.values()]
        if sec == 40:
            replicas.append(("d3", "a"))
        if sec == 70:
            replicas.remove(("d1", "b"))  # expires 20 s later
        if 100 <= sec < 360 and sec % 9 == 0:  # replicas of a deployment come and go
            replicas.append(("d1", f"n{sec}"))
            if sec >= 127:  # rows freed by the ones gone are used again
                replicas.remove(("d1", f"n{sec - 27}"))
        clock.t = t + 0.5
        for dep, rep in replicas:
            seq += 1
            if dep == "d2" and sec % 17 == 5:  # held back, delivered late below
                continue
            # whole numbers of requests in flight, but a few samples that are not (a gauge
            # that is not a count: the sums stop sliding while a window holds one)
            value = float(rng.integers(0, 4))
            if rep == "a" and dep == "d1" and sec in (150, 151, 153, 160, 230):
                value += 0.1 * (sec % 7) + 0.1
            if sec == 200 and dep == "d1":
                # two reports in one second: the per-series ring keeps every column from now
                store.ingest(_snap(dep, rep, seq, t - 1.0, t - 0.5, rng, value + 1))
                seq += 1
                store.ingest(_snap(dep, rep, seq, t - 0.5, t + 0.4, rng, value))
            else:
                store.ingest(_snap(dep, rep, seq, t - 1.0, t + 0.4, rng, value))
        clock.t = t + 0.8
        if sec % 17 == 7:  # two seconds late: it lands in seconds the last round read
            seq += 1
            store.ingest(_snap("d2", "a", seq, t - 3.0, t - 1.6, rng, 2.0))
        store.expire()
        churn = versions != [tb.version for tb in store._tables.values()]
        kept = {k: v for k, v in store._query._slides.items()}
        now = store.begin_round()
        got = [store.evaluate(query) for query in queries]
        if churn:  # a series came or went: which kept windows served this round
            survived |= {type(v).__name__ for k, v in kept.items()
                         if store._query._slides.get(k) is v and k in store._query._slides_used}
        fresh = WindowQuery(store._tl, store._tables)
        end = store.window_end(now)
        want = [fresh.evaluate(query, end, store._version) for query in queries]
        kinds |= {type(store._query._slides[k]).__name__ for k in store._query._slides_used}
        store.end_round()
        assert [repr(sorted(g.items())) for g in got] == \
            [repr(sorted(w.items())) for w in want], sec
    assert {"SlidingGauge", "SlidingSteps", "SlidingCounts"} <= kinds
    assert {"SlidingGauge", "SlidingSteps", "SlidingCounts"} <= survived
    assert sum(1 for g in got if g) > len(queries) // 2  # most queries have an answer


def _deriv_masked(x: np.ndarray, total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """window_query's deriv with its masks (steps without data left out), as before."""
    has = count > 0
    m = has.sum(axis=1)
    xb = np.broadcast_to(x, has.shape)
    y = np.where(has, total / np.where(has, count, 1.0), 0.0)
    xc = np.where(has, xb - (np.where(has, xb, 0.0).sum(axis=1) / m)[:, None], 0.0)
    yc = np.where(has, y - (y.sum(axis=1) / m)[:, None], 0.0)
    return (xc * yc).sum(axis=1) / (xc * xc).sum(axis=1)


def test_deriv_without_masks_gives_the_masked_slopes_bit_for_bit():
    from ray_monitor.aggregator.row_windows import deriv_dense
    rng = np.random.default_rng(18)
    for steps in (3, 7, 8, 9, 60, 129, 300, 600):
        x = (1_000_000 + np.arange(steps)) * float(rng.choice([1.0, 10.0, 60.0]))
        total = rng.lognormal(3, 2, (50, steps)) * rng.choice([1, -1], (50, steps))
        count = rng.integers(1, 40, (50, steps)).astype(np.float64)
        assert deriv_dense(x, total / count).tobytes() == _deriv_masked(x, total, count).tobytes()


def test_deriv_with_the_same_steps_in_every_group_gives_the_masked_slopes_bit_for_bit():
    from ray_monitor.aggregator.row_windows import deriv_same_steps
    rng = np.random.default_rng(19)
    for steps in (3, 7, 8, 9, 60, 129, 300, 600):
        x = (1_000_000 + np.arange(steps)) * float(rng.choice([1.0, 10.0, 60.0]))
        total = rng.lognormal(3, 2, (50, steps)) * rng.choice([1, -1], (50, steps))
        count = rng.integers(1, 40, (50, steps)).astype(np.float64)
        has = rng.random(steps) < 0.6  # the steps with data, the same in every group
        has[:2] = True
        count[:, ~has], total[:, ~has] = 0.0, 0.0
        y = np.where(has, total / np.where(has, count, 1.0), 0.0)
        got = deriv_same_steps(x, has, int(has.sum()), y)
        assert got.tobytes() == _deriv_masked(x, total, count).tobytes()


def test_a_rule_group_with_a_longer_interval_keeps_its_windows_between_its_rounds():
    """Rounds that evaluate only some rules (a group due every 5 s among 1 s ones) leave the
    other rules' kept windows in place, still equal to a fresh read when next read; a
    window no round reads for longer than it could slide is freed."""
    clock = Clock(T0)
    store = WindowStore(clock=clock)
    rng = np.random.default_rng(5)
    often = [Query("p99", "latency_seconds", 60.0, by=("deployment",))]
    seldom = [Query("last", "inflight", 60.0, by=("deployment",)),
              Query("zscore", "requests", 60.0, by=("deployment",))]
    seq, kept = 0, {}
    for sec in range(80):
        t = math.floor(clock.t) + 1.0
        clock.t = t + 0.5
        for dep, rep in (("d1", "a"), ("d1", "b"), ("d2", "a")):
            seq += 1
            store.ingest(_snap(dep, rep, seq, t - 1.0, t + 0.4, rng, float(rng.integers(0, 4))))
        clock.t = t + 0.8
        both = sec % 5 == 0 and sec < 40
        queries = often + seldom if both else often
        now = store.begin_round()
        got = [store.evaluate(q) for q in queries]
        fresh = WindowQuery(store._tl, store._tables)
        want = [fresh.evaluate(q, store.window_end(now), store._version) for q in queries]
        assert [repr(sorted(g.items())) for g in got] == [repr(sorted(w.items())) for w in want]
        if both and sec > 0:  # read 5 rounds ago: the same kept objects served this round
            assert all(store._query._slides.get(k) is v for k, v in kept.items())
        store.end_round()
        if both:
            kept = {k: v for k, v in store._query._slides.items() if k[0] in ("gauge", "steps")}
            assert kept
    assert not any(k[0] in ("gauge", "steps") for k in store._query._slides)  # 40 rounds unread


def test_rules_are_planned_at_load_and_a_reload_of_the_same_rules_keeps_every_kept_window():
    from ray_monitor.aggregator.core import AggregatorCore

    rules = {"groups": [{"name": "g", "rules": [
        {"alert": "Slow", "expr": 'p99(latency_seconds{deployment="d1"}[1m]) by (application, deployment) > 9'},
        {"alert": "Busy", "expr": "last(inflight[1m]) by (application, deployment) > 99"},
        {"alert": "Jump", "expr": "zscore(requests[1m]) by (application, deployment) > 99"}]}]}
    clock = Clock(T0)
    core = AggregatorCore({}, rules_text=rules, clock=clock)
    try:
        plans = dict(core.store._query._plans)
        assert {q for q in plans} >= set(core.engine.ruleset.queries())  # planned at load
        rng = np.random.default_rng(3)
        kept, seq = {}, 0
        for sec in range(12):
            clock.t = math.floor(clock.t) + 1.5
            for dep, rep in (("d1", "a"), ("d2", "a")):
                seq += 1
                core.ingest([_snap(dep, rep, seq, clock.t - 1.5, clock.t - 0.1, rng, 1.0)])
            clock.t += 0.3
            if sec == 8:  # the same rules again: nothing of the store's is read afresh
                core.reload(rules)
            core.evaluate()
            slides = core.store._query._slides
            if sec == 9:
                assert all(slides.get(k) is v for k, v in kept.items()) and kept
                assert all(core.store._query._plans.get(q) is p for q, p in plans.items())
            kept = {k: v for k, v in slides.items() if k[0] in ("gauge", "steps", "slide")}
    finally:
        core.notifier.close(1.0)


def test_step_sums_with_one_row_per_group_are_what_the_runs_of_rows_give():
    """A grouping with one row per group (a deployment's one rollup) takes each row's step
    sums as they are: the same bits as summing runs of rows (one group more, left empty,
    takes that path), for counter, gauge and histogram rings, a run of slots or not."""
    from ray_monitor.aggregator.rings import Ring
    from ray_monitor.aggregator.row_windows import step_sums
    rng = np.random.default_rng(20)
    for kind in ("counter", "gauge", "histogram"):
        ring = Ring(1.0, 50, kind, latest=False)
        ring.grow(40)
        if kind == "counter":
            ring.v[:] = rng.integers(0, 200, ring.v.shape)  # value + 1, 0: empty
        else:
            ring.n[:] = rng.integers(0, 5, ring.n.shape)
            ring.s[:] = rng.lognormal(0, 2, ring.s.shape) * (ring.n > 0)
        rows = np.sort(rng.choice(40, 25, replace=False))
        pos = np.arange(25)
        for cols in (np.arange(10, 40), np.array([3, 7, 8, 30, 49])):
            one = step_sums(kind, ring, rows, pos, cols, 25)
            runs = step_sums(kind, ring, rows, pos, cols, 26)
            for a, b in zip(one, runs):
                assert a.tobytes() == b[:25].tobytes() and not b[25].any(), kind
