"""Compact storage of the window store (issue 15) decides nothing: rule values over a long
random sequence, through slot reuse, packed and open buckets, late deltas, several deltas
in one second and counts past float32, equal a plain recomputation from the raw samples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ray_monitor.aggregator import aside
from ray_monitor.aggregator.packing import GAP_FORMS, RICE
from ray_monitor.aggregator.window_query import WindowQuery
from ray_monitor.aggregator.windows import WindowStore
from ray_monitor.common.catalog import Query
from ray_monitor.common.matchers import Matcher
from ray_monitor.common.snapshot import ReplicaSnapshot, SeriesDelta
from tests.helpers import Clock, hist
from tests.unit.test_windows import T0, _reference, ident, ok

FUNCS = {"requests": ("count", "rate"),
         "latency_seconds": ("count", "sum", "avg", "min", "max", "p50", "p99", "ratio_above"),
         "inflight": ("avg", "min", "max", "count", "last", "sum")}


def _compare(store: WindowStore, samples: dict, now: float) -> int:
    end = store.window_end(now)
    compared = 0
    for metric, fs in FUNCS.items():
        for f in fs:
            for w in (1.0, 7.0, 30.0, 45.0, 60.0):  # 60: the fine ring's whole span
                for by in (None, ("deployment",), ("replica",)):
                    for matchers in ((), (Matcher("replica", "!=", "d1-a"),),
                                     (Matcher("deployment", "=", "d2"),)):
                        query = Query(f, metric, w, by=by, matchers=matchers,
                                      param=0.08 if f == "ratio_above" else None)
                        got, want = store.evaluate(query, now), _reference(samples[metric], query, end)
                        assert got.keys() == want.keys(), (query, now)
                        rel = 0.011 if f in ("p50", "p99") else 1e-9
                        for k in want:
                            assert got[k] == pytest.approx(want[k], rel=rel), (query, k, now)
                        compared += 1
    return compared


@pytest.mark.parametrize("aside_rows", [aside.ASIDE_ROWS, 0])
def test_compact_rings_give_the_reference_values_over_a_long_random_sequence(aside_rows, monkeypatch):
    # aside_rows 0: a per-series gauge row with two samples in a bucket unfolds the ring
    monkeypatch.setattr(aside, "ASIDE_ROWS", aside_rows)
    clock = Clock(T0 - 400)
    # a 60 s fine ring wraps five times: every slot is packed, cleared and reused
    store = WindowStore(resolutions=((1.0, 60), (10.0, 60)), clock=clock)
    rng = np.random.default_rng(15)
    samples: dict = {m: [] for m in FUNCS}
    held: list = []  # deltas of replica d2-b held back, delivered late
    seq = 0
    compared = 0

    def deliver(end: float, interval: float, dep: str, rep: str) -> None:
        nonlocal seq
        seq += 1
        n = int(rng.integers(1, 25))
        latency = hist(*rng.lognormal(-2.5, 0.7, n))
        if rng.random() < 0.01:  # a count past float32's whole numbers
            big = 2 ** 24 + int(rng.integers(1, 1000))
            i = next(iter(latency.buckets))
            latency.buckets[i] += big
            latency.count += big
            latency.sum += big * 0.05
        if rng.random() < 0.1:  # a far bucket: a gap of over 255 buckets in the 2-byte form
            latency.record(float(rng.choice((40.0, 1e-4))))
        if rng.random() < 0.1:  # a count over 255 in one bucket: continued entries
            i = next(iter(latency.buckets))
            latency.buckets[i] += 300
            latency.count += 300
            latency.sum += 300 * 0.05
        inflight = float(rng.integers(0, 9)) + (0.1 if rng.random() < 0.3 else 0.0)
        replica = f"{dep}-{rep}"
        snap = ReplicaSnapshot(ident(replica, dep), seq, end - interval, end,
                               [SeriesDelta("__call__", "ok", False, latency)],
                               {"__call__": inflight}, None)
        labels = {"application": "app", "deployment": dep, "replica": replica,
                  "method": "__call__", "model_version": "v1"}
        t = end - interval / 2 + 0.5  # the reference files a sample in the second of t - 0.5
        if (dep, rep) == ("d2", "b") and 240 <= end - (T0 - 400) < 260:
            held.append((snap, labels, t, latency, inflight))
            return
        store.ingest(snap)
        record(labels, t, latency, inflight)

    def record(labels, t, latency, inflight) -> None:
        samples["requests"].append(({**labels, "outcome": "ok"}, t, latency.count))
        samples["latency_seconds"].append(({**labels, "outcome": "ok"}, t, latency))
        samples["inflight"].append((labels, t, inflight))

    for i in range(400):
        base = T0 - 400 + i
        clock.t = base + 0.25
        for dep in ("d1", "d2"):
            for rep in ("a", "b", "c"):
                if rep == "c" and i % 3:  # sends every third second only
                    continue
                if rep == "a" and 200 <= i < 300:  # three short deltas a second
                    for k in range(3):
                        clock.t = base + 0.25 + 0.3 * k
                        deliver(clock.t, 0.3, dep, rep)
                    clock.t = base + 0.25
                    continue
                deliver(clock.t, 1.0, dep, rep)
        if i == 265:  # the held deltas arrive: they land in buckets already packed
            for snap, labels, t, latency, inflight in held:
                store.ingest(snap)
                record(labels, t, latency, inflight)
        if i % 37 == 36 or i in (262, 266, 299, 300, 399):
            compared += _compare(store, samples, clock.t + 0.3)
    assert compared > 10 * 16 * 4 * 3 * 3
    # the rings did widen and unfold or keep rows aside (else this test would not cover
    # those paths)
    lat = store._tables["latency_seconds"]
    assert lat.series_ring.n.dtype == np.float64
    inflight = store._tables["inflight"].series_ring
    assert (inflight.single and inflight.aside_of) if aside_rows else not inflight.single
    assert store._tables["cpu_percent"].series_ring.single  # never written: stays compact
    # complete buckets are held in gap forms (with long steps and large counts continued),
    # Rice forms (few observations a second) and, where those would take more room
    # (2**24), in 4-byte pairs; a slot's rows as a bitmap where that is smaller
    forms, skips, more, bitmaps = set(), False, False, False
    for ring in (lat.series_ring, lat.rings[0]):
        for p, held in enumerate(ring.packed):
            if held is None:
                continue
            form, rw, lw, n, rb = ring.meta[p].tolist()
            forms.add(form)
            bitmaps |= rw == 0
            if 0 < form < RICE:
                gb, cb = GAP_FORMS[form - 1]
                e = np.frombuffer(held, np.uint8 if gb + cb == 8 else np.uint16,
                                  offset=rb + n * (lw + 2)).astype(np.int64)
                g, c = e >> cb, e & (2 ** cb - 1)
                lens = np.frombuffer(held, np.uint8 if lw == 1 else np.uint16, n, rb)
                later = np.ones(len(e), dtype=bool)  # not a row's first entry
                later[np.cumsum(lens) - lens] = False
                skips |= bool(((g == 2 ** gb - 1) & (c == 0)).any())
                more |= bool(((g == 0) & (c > 0) & later).any())
    assert 0 in forms and len(forms) >= 3 and max(forms) >= RICE, forms
    assert skips and more and bitmaps


def test_an_unfolded_gauge_ring_and_a_widened_counter_keep_every_value():
    clock = Clock(T0)
    store = WindowStore(clock=clock)
    for k, (value, end) in enumerate(((3.0, T0 - 0.5), (7.5, T0 - 0.2), (1.25, T0 - 0.7))):
        store.ingest(ReplicaSnapshot(ident(), k + 1, end - 0.1, end, [], {"__call__": value}, None))
    now = T0 + 5
    q = lambda f: Query(f, "inflight", 10.0, by=("replica",))  # noqa: E731
    key = (("replica", "r1"),)
    # three samples in one second: the latest by time is 7.5, not the last delivered
    assert {f: store.evaluate(q(f), now)[key] for f in ("last", "min", "max", "count", "avg")} == {
        "last": 7.5, "min": 1.25, "max": 7.5, "count": 3.0, "avg": pytest.approx(11.75 / 3)}
    # counts past uint16 (70,000 in one second): the count column widens to float32
    mid = hist(0.1)
    mid.buckets[next(iter(mid.buckets))] += 69_999
    mid.count += 69_999
    store.ingest(ReplicaSnapshot(ident(), 8, T0 - 2, T0 - 1, [SeriesDelta("__call__", "ok", False, mid)],
                                 {}, None))
    lat = store._tables["latency_seconds"]
    assert lat.series_ring.n.dtype == np.float32 and lat.series_ring.z.dtype == np.uint8
    assert store.evaluate(Query("count", "latency_seconds", 10.0, by=("replica",)), now) == {
        key: 70_000.0}
    h = hist(0.1)
    h.buckets[next(iter(h.buckets))] += 2 ** 24
    h.count += 2 ** 24
    store.ingest(ReplicaSnapshot(ident(), 9, T0 - 1, T0, [SeriesDelta("__call__", "ok", False, h)],
                                 {}, None))
    store.ingest(ReplicaSnapshot(ident(), 10, T0 - 1, T0, [SeriesDelta("__call__", "ok", False,
                                                                      hist(0.2))], {}, None))
    total = 2 ** 24 + 2  # after 2**24 + 1, which a float32 would round
    assert store.evaluate(Query("count", "requests", 10.0), now) == {(): float(total + 70_000)}
    assert store.evaluate(Query("count", "latency_seconds", 10.0, by=("replica",)), now) == {
        key: float(total + 70_000)}
    assert lat.series_ring.n.dtype == np.float64
    assert not math.isnan(store.stats()["approx_bytes"])


@pytest.mark.parametrize("resolutions", [((1.0, 600), (10.0, 360), (60.0, 360)), ((1.0, 60),)])
def test_a_window_as_long_as_the_fine_ring_reads_its_oldest_second(resolutions):
    # The open bucket (the clock's) takes a slot while windows end a few seconds behind
    # the clock: a ring of exactly ``slots`` slots had lost the window's oldest seconds.
    span = resolutions[0][1]
    clock = Clock(T0)
    store = WindowStore(resolutions=resolutions, clock=clock)
    for i in range(span + 20):
        clock.t = T0 + i + 0.25
        store.ingest(ReplicaSnapshot(ident(), i + 1, clock.t - 1.0, clock.t,
                                     [SeriesDelta("__call__", "ok", False, hist(*[0.1] * (i + 1)))],
                                     {"__call__": float(i)}, None))
    for lag in (0.3, 1.2, 2.9):  # the clock a little, and up to the wait, past the last report
        now = clock.t + lag
        end = store.window_end(now)
        # report i (i + 1 requests, in flight i) lands in second T0 + i - 1, its midpoint's
        seconds = range(int(end - span - T0), int(end - T0))
        want_count = float(sum(j + 2 for j in seconds))
        for by in (None, ("replica",)):  # rollup rows, and per-series rows
            got = store.evaluate(Query("count", "latency_seconds", float(span), by=by), now)
            assert list(got.values()) == [want_count], (by, lag)
        got = store.evaluate(Query("min", "inflight", float(span), by=("replica",)), now)
        assert list(got.values()) == [float(seconds[0] + 1)], lag


def test_a_per_series_gauge_ring_holds_whole_samples_narrow_and_widens_for_any_other():
    # One sample a second per series: whole numbers 0-255 are held in one byte, and the
    # first value that does not fit (300, then 2.5, then -1.5) widens the ring, keeping
    # every earlier sample.
    clock = Clock(T0)
    store = WindowStore(clock=clock)
    ring = store._tables["inflight"].series_ring
    values = [float(v) for v in range(0, 256, 15)] + [300.0, 2.5, -1.5, 7.0]
    dtypes = []
    for i, value in enumerate(values):
        clock.t = T0 + i + 0.25
        store.ingest(ReplicaSnapshot(ident(), i + 1, clock.t - 1.0, clock.t, [], {"__call__": value}, None))
        dtypes.append(ring.last.dtype)
    assert ring.single
    assert dtypes[:18] == [np.uint8] * 18 and dtypes[18] == np.uint16
    assert dtypes[19] == dtypes[20] == np.float32 and dtypes[-1] == np.float32
    q = lambda f, w: Query(f, "inflight", w, by=("replica",))  # noqa: E731
    now = clock.t + 1.0
    key = (("replica", "r1"),)
    got = {f: store.evaluate(q(f, 60.0), now)[key] for f in ("min", "max", "sum", "count")}
    assert got == {"min": -1.5, "max": 300.0, "sum": pytest.approx(sum(values) / len(values)),
                   "count": float(len(values))}
    # the last sample, and every sample one by one (1 s windows ending at each second)
    assert store.evaluate(q("last", 60.0), now)[key] == 7.0
    for i, value in enumerate(values):
        end = T0 + i  # sample i lands in second T0 + i - 1 (its delta's midpoint)
        assert store._query.evaluate(q("last", 1.0), end, store._version)[key] == value


def test_a_window_kept_from_round_to_round_equals_a_fresh_read():
    """The per-row histogram counts a rollup window keeps between rounds (window_query's
    _Slide: it adds the second that entered, takes off the one that left) give exactly
    what a fresh read gives, through a delta that lands late in a second it holds, a
    replica and a deployment that appear, a replica that goes away and a jump of the
    clock past the window."""
    clock = Clock(T0)
    store = WindowStore(clock=clock, series_ttl_s=20.0)
    rng = np.random.default_rng(16)
    queries = [Query(f, "latency_seconds", w, by=by, param=0.08 if f == "ratio_above" else None)
               for f in ("p50", "p99", "ratio_above", "count")
               for w in (10.0, 60.0, 300.0) for by in (None, ("deployment",))]
    replicas = [("d1", "a"), ("d1", "b"), ("d2", "a")]
    seq = 0
    slid = 0
    for sec in range(160):
        if sec == 100:
            clock.t += 80.0  # past the 60 s window: nothing of the kept one is in the new
        t = math.floor(clock.t) + 1.0
        if sec == 40:
            replicas.append(("d3", "a"))
        if sec == 70:
            replicas.remove(("d1", "b"))  # expires 20 s later: its rollup stays
        clock.t = t + 0.5
        for dep, rep in replicas:
            seq += 1
            late = dep == "d2" and sec % 17 == 5  # held back, delivered late below
            if not late:
                store.ingest(ReplicaSnapshot(ident(rep, dep), seq, t - 1.0, t + 0.4,
                                             [ok(*rng.lognormal(-2.5, 0.7, int(rng.integers(1, 30))))],
                                             {}, None))
        clock.t = t + 0.8
        if sec % 17 == 7:  # two seconds late: it lands in seconds the last round read
            store.ingest(ReplicaSnapshot(ident("a", "d2"), seq, t - 3.0, t - 1.6,
                                         [ok(*rng.lognormal(-2.5, 0.7, 5))], {}, None))
        store.expire()
        now = store.begin_round()
        got = [store.evaluate(query) for query in queries]
        fresh = WindowQuery(store._tl, store._tables)
        end = store.window_end(now)
        want = [fresh.evaluate(query, end, store._version) for query in queries]
        slid += len(store._query._slides_used)
        store.end_round()
        assert got == want, sec
    assert slid > 200  # the kept windows were read (two a round, the 300 s one included)


def test_a_burst_widens_counts_for_one_turn_of_the_ring_only():
    # 300 requests in one second widen the request and count columns to uint16; once
    # every slot has been reused and all values fit a byte again, they are uint8 again,
    # and every value reads the same through both changes.
    clock = Clock(T0)
    store = WindowStore(resolutions=((1.0, 60), (10.0, 60)), clock=clock)
    lat, req = store._tables["latency_seconds"], store._tables["requests"]
    dtypes = []
    for i in range(140):
        clock.t = T0 + i + 0.25
        n = 300 if i == 5 else 2
        store.ingest(ReplicaSnapshot(ident(), i + 1, clock.t - 1.0, clock.t,
                                     [SeriesDelta("__call__", "ok", False, hist(*[0.1] * n))],
                                     {}, None))
        dtypes.append((lat.series_ring.n.dtype, req.series_ring.v.dtype))
        if i in (30, 139):
            now = clock.t + 0.3
            for by in (None, ("replica",)):
                got = store.evaluate(Query("count", "requests", 60.0, by=by), now)
                want = 300 + 2 * 30 if i == 30 else 2 * 60  # every report so far; the last 60 s
                assert list(got.values()) == [float(want)], (i, by)
                got = store.evaluate(Query("count", "latency_seconds", 60.0, by=by), now)
                assert list(got.values()) == [float(want)], (i, by)
    assert dtypes[4] == (np.uint8, np.uint8) and dtypes[5] == (np.uint16, np.uint16)
    assert dtypes[-1] == (np.uint8, np.uint8)


def test_the_zero_bucket_column_is_made_at_its_first_observation_and_reads_the_same():
    # Latencies of exactly 0 are rare: the zero-count column takes no memory until one
    # comes, then holds it; a quantile and a ratio over the window count it either way.
    clock = Clock(T0)
    store = WindowStore(resolutions=((1.0, 60), (10.0, 60)), clock=clock)
    ring = store._tables["latency_seconds"].series_ring
    for i in range(20):
        clock.t = T0 + i + 0.25
        values = [0.0, 0.2] if i == 12 else [0.1, 0.2]
        store.ingest(ReplicaSnapshot(ident(), i + 1, clock.t - 1.0, clock.t,
                                     [SeriesDelta("__call__", "ok", False, hist(*values))],
                                     {}, None))
        if i == 11:
            assert "z" in ring.lazy and ring.z.strides == (0, 0) and not ring.z.any()
    assert "z" not in ring.lazy and int(ring.z.sum()) == 1 and ring.z.flags.writeable
    now = clock.t + 0.3
    below = store.evaluate(Query("ratio_above", "latency_seconds", 30.0, param=0.05), now)
    assert list(below.values()) == [pytest.approx(39 / 40)]  # the one 0.0 is not above
    low = store.evaluate(Query("min", "latency_seconds", 30.0), now)
    assert list(low.values()) == [0.0]


def _send(stores: dict, clocks: dict, names: dict, monkeypatch, snap: ReplicaSnapshot) -> None:
    """``snap`` into every store, each holding at most ``names[store]`` rows aside."""
    for name, rows in names.items():
        clocks[name].t = snap.end + 0.1
        with monkeypatch.context() as m:
            m.setattr(aside, "ASIDE_ROWS", rows)
            stores[name].ingest(snap)


def _round(stores: dict, queries: list, expire: bool = False) -> dict:
    """A rule round of every store: each query's answer, by store."""
    got = {}
    for name, store in stores.items():
        store.begin_round()
        got[name] = [store.evaluate(query) for query in queries]
        store.end_round()
        if expire:
            store.expire()
    return got


def test_the_overflow_series_is_kept_aside_and_the_other_rows_stay_compact(monkeypatch):
    """At the series cap the overflow series ``other`` gets a sample per folded replica a
    second: its row is kept aside with every column while every other row keeps one
    sample a bucket (5 bytes), and every per-series gauge answer, round after round (kept
    windows included), is the one of the ring unfolded (``ASIDE_ROWS`` 0, as before) and
    of a ring that unfolds later with its rows aside merged back (``ASIDE_ROWS`` 1 and a
    replica that reports twice in a second)."""
    names = {"aside": aside.ASIDE_ROWS, "unfolded": 0, "merged": 1}
    clocks = {name: Clock(T0) for name in names}
    stores = {name: WindowStore(clock=clocks[name], max_series_per_metric=4) for name in names}
    rng = np.random.default_rng(19)
    replicas = [(f"d{i % 2}", f"r{i}") for i in range(7)]  # 3 past the cap fold into other
    queries = [Query(f, "inflight", w, by=by)
               for f in ("min", "max", "avg", "last", "count", "sum")
               for w in (1.0, 10.0, 60.0, 300.0) for by in (None, ("replica",), ("deployment",))]
    seq = 0
    for sec in range(90):
        t = T0 + sec + 1.0
        sends = [(dep, rep, t) for dep, rep in replicas]
        if sec == 60:  # a real series with two samples in one second
            sends.append(("d0", "r0", t + 0.3))
        for dep, rep, end in sends:
            seq += 1
            value = float(rng.integers(0, 9))
            if sec in (20, 21) and rep == "r6":
                value = 2.5  # not a whole number: sums re-added, not slid
            if sec == 40 and rep == "r5":
                value = 300.0  # past a byte
            _send(stores, clocks, names, monkeypatch,
                  ReplicaSnapshot(ident(rep, dep), seq, end - 1.0, end + 0.4, [], {"__call__": value}, None))
        got = _round(stores, queries)
        assert got["aside"] == got["unfolded"] == got["merged"], sec
        other = (("replica", "other"),)
        assert got["aside"][queries.index(Query("count", "inflight", 1.0, by=("replica",)))][other] == 3.0
    table = stores["aside"]._tables["inflight"]
    ring = table.series_ring
    assert ring.single and dict(ring.aside_of) == {table.series.index[table.other]: 0,
                                                   table.series.index[("app", "d0", "r0", "__call__", "v1")]: 1}
    # a byte and a float32 offset a cell (the 300 went to other, aside)
    assert ring.nbytes() - ring.aside.nbytes() == ring.rows * ring.slots * (1 + 4)
    assert not stores["unfolded"]._tables["inflight"].series_ring.single
    assert not stores["merged"]._tables["inflight"].series_ring.single


def test_rows_kept_aside_read_as_the_unfolded_ring_in_every_form(monkeypatch):
    """Rows kept aside (the overflow series ``other`` from its first second, a replica that
    reports twice in a second, whose row later expires and is reused) holding samples that
    are not whole numbers: every read of them gives the unfolded ring's answers (``==``),
    round after round. Covered: a window's per-row counts, sums, min, max and latest, read
    fresh, kept from round to round, re-read for a series that came (``np.ix_``), and
    across the fine ring's end (a read that numpy sums column by column); per-step group
    sums (zscore, deriv); groupings by replica, deployment and application, with
    matchers."""
    names = {"aside": aside.ASIDE_ROWS, "unfolded": 0}
    clocks = {name: Clock(T0) for name in names}
    stores = {name: WindowStore(resolutions=((1.0, 60), (10.0, 60)), clock=clocks[name],
                                max_series_per_metric=4, series_ttl_s=20.0) for name in names}
    rng = np.random.default_rng(20)
    queries = [Query(f, "inflight", w, by=by, matchers=m)
               for f in ("min", "max", "avg", "last", "count", "sum", "zscore", "deriv")
               for w in (1.0, 7.0, 45.0, 60.0)
               for by in (None, ("replica",), ("deployment",), ("application",))
               for m in ((), (Matcher("replica", "!=", "r1"),), (Matcher("deployment", "=", "d0"),))]
    seq = 0
    for sec in range(150):
        t = T0 + sec + 1.0
        reps = [f"r{i}" for i in range(7)]
        if 70 <= sec < 100:
            reps.remove("r3")  # its row (aside since 41) expires, emptied, reused by r4
        if sec < 25:
            reps = reps[:4]  # r4-r6 come at 25, past the cap: ``other`` comes then
        if sec >= 110:
            reps.append("r7")  # folded into other
        sends = [(rep, t) for rep in reps]
        if sec in (40, 41, 130):  # a real series with two samples in one second
            sends.append(("r3" if sec < 100 else "r4", t + 0.3))
        for rep, end in sends:
            seq += 1
            # whole numbers first (a uint8 ring), then floats of every kind: float32
            # (2.5) and float64 (rng), whose sums depend on the order of addition
            value = float(rng.integers(0, 9)) if sec < 15 else \
                2.5 * int(rng.integers(0, 4)) if sec < 30 else float(rng.normal(3.0, 2.0))
            dep = f"d{int(rep[1:]) % 2}"
            _send(stores, clocks, names, monkeypatch,
                  ReplicaSnapshot(ident(rep, dep), seq, end - 1.0, end + 0.4, [], {"__call__": value}, None))
        if 50 <= sec < 85:  # no rounds: the next one reads afresh (r3 aside, silent since 70)
            continue
        got = _round(stores, queries, expire=True)
        for query, a, b in zip(queries, got["aside"], got["unfolded"]):
            assert a == b, (sec, query)
        ring = stores["aside"]._tables["inflight"].series_ring
        want = {} if sec < 25 else {4: 0} if sec < 41 or 90 <= sec < 131 else {4: 0, 3: 1}
        assert ring.single and dict(ring.aside_of) == want, sec
    assert not stores["unfolded"]._tables["inflight"].series_ring.single


@pytest.mark.parametrize("form", ["slices", "slots", "ix"])
def test_a_row_aside_sums_as_its_row_of_the_window_would(form):
    """``aside.Rows.row_sums``: a row kept aside summed alone gives the bits its row of
    the whole window's read gives (numpy sums a read laid out column by column one column
    after another, and one laid out row by row pairwise), for each index form a read uses."""
    rng = np.random.default_rng(7)
    whole = rng.normal(0.0, 1e3, (40, 604))
    cols = (550 + np.arange(300)) % 604  # across the ring's end
    at = {"slices": (slice(0, 40), slice(100, 400)), "slots": (slice(0, 40), cols),
          "ix": np.ix_(np.arange(40), cols)}[form]
    want = whole[at].sum(axis=1)

    class Held:  # what rows_in reads of a ring: its rows, which rows are aside, and where
        rows = 40
        aside = type("Side", (), {"s": whole[[3, 17, 39]]})()
        aside_of = {3: 0, 17: 1, 39: 2}

    for keep in ({3: 0}, {3: 0, 17: 1, 39: 2}):
        Held.aside_of = keep
        side = aside.rows_in(Held, at)
        assert side.row_sums("s").tolist() == want[side.pos].tolist()
    # the test can tell: a read of one row alone is summed pairwise, not as the window
    if form == "slots":
        assert whole[3:4][:, cols].sum(axis=1)[0] != want[3]
