"""Rule rounds of two trees on the very same store: fill once, pickle, play the rounds.

    # fill as bench_aggregator.py --case realistic --fill-s FILL fills, and pickle it
    nice .venv/bin/python benchmarks/rounds_ab.py fill DEPLOYMENTS FILL STORE.pkl [MAX_SERIES]
    # then, once per tree, interleaved (PYTHONPATH picks the tree; it prints which loaded)
    PYTHONPATH=<tree> nice .venv/bin/python benchmarks/rounds_ab.py rounds STORE.pkl \
        DEPLOYMENTS FILL ROUNDS [RESULTS_PREFIX] [EVENTS]
    # and compare two runs' results byte for byte
    .venv/bin/python benchmarks/rounds_ab.py compare PREFIX_A PREFIX_B ROUNDS
    # a store pickled by a tree that unfolded a per-series gauge ring (its overflow row
    # several samples a bucket), held as aggregator/aside.py holds it (RESULTS.md §31)
    .venv/bin/python benchmarks/rounds_ab.py aside STORE.pkl OUT.pkl

A round is the benchmark's: one second of new snapshots, then ``begin_round``, the
``bench_aggregator.queries`` (1,000), ``end_round``; each round's CPU time
(``time.process_time``) is printed, and with RESULTS_PREFIX its results are pickled. The
store's query object is made afresh after loading, so the first round plans and reads
everything, as a started aggregator's first round does (RESULTS.md §23); a tree whose
store plans rules at load (``WindowStore.prepare``, RESULTS.md §28) plans them first, timed
on its own line. EVENTS (e.g.
``came@3,went@5``) change the replicas before a round's second of snapshots: ``came`` a
new replica of deployment d0 starts reporting (as its first snapshot arrives), ``went``
replica d0#r7 stops and its series expire (its last report aged past ``series_ttl_s``,
then ``WindowStore.expire``: what a replica's end does ``series_ttl_s`` later); the
round after is "a round after one replica came/went" (RESULTS.md §28). Filling 10,000
replicas takes minutes, loading the pickle seconds: before and after read one store.
Fill with the newer tree: what it adds to the store (``Ring.unwhole``) is missing from a
store an older tree pickled, and an older tree ignores it.
"""

from __future__ import annotations

import dataclasses
import gc
import pickle
import sys
import time

import numpy as np

from bench_aggregator import Clock, queries, snapshot_maker
from ray_monitor.aggregator import window_query
from ray_monitor.aggregator.windows import WindowStore


def fill(deps: int, fill_s: int, out: str, cap: int) -> None:
    make, n = snapshot_maker(deps, 20)
    clock = Clock(1_000_000.0)
    store = WindowStore(clock=clock, max_series_per_metric=cap)
    t0 = 1_000_000.0 - fill_s
    for sec in range(fill_s):
        clock.t = t0 + sec + 0.5
        for i in range(n):
            store.ingest(make(i, sec, t0 + sec + 0.4))
    with open(out, "wb") as f:
        pickle.dump(store, f, protocol=5)
    print(f"filled {n} replicas, {fill_s} s, max_series_per_metric {cap}: {out}")


def _went(store: WindowStore, replica: str) -> None:
    """Ages every series of ``replica`` and its last report past the store's TTL, and
    expires them as the aggregator's upkeep does."""
    for table in store._tables.values():
        sp = table.series
        for row, labels in enumerate(sp.labels):
            if labels is not None and replica in labels:
                sp.updated[row] = -1.0
    for key, seen in store._replicas.items():
        if key[2] == replica:
            seen[2] = -1.0
    store.expire()


def rounds(path: str, deps: int, fill_s: int, count: int, prefix: str, events: str = "") -> None:
    print("window_query from", window_query.__file__)
    make, n = snapshot_maker(deps, 20)
    with open(path, "rb") as f:
        store = pickle.load(f)
    clock = store._clock
    store._query = window_query.WindowQuery(store._tl, store._tables)
    gc.collect()
    gc.freeze()  # as the aggregator actor does once started
    t0 = 1_000_000.0 - fill_s
    qs = queries(1000, deps)
    if hasattr(store, "prepare"):  # planned when the rules are loaded, as the aggregator does
        start = time.process_time()
        store.prepare(qs)
        print(f"prepare (at rule load): {(time.process_time() - start) * 1000:.1f} ms cpu")
    at = {int(e.split("@")[1]): e.split("@")[0] for e in events.split(",") if e}
    new = dataclasses.replace(make(0, 0, 0.0).identity, replica="d0#r20", pid=2000)
    stopped, extra = set(), False
    for r in range(count):
        sec = fill_s + r
        clock.t = t0 + sec + 0.5
        if at.get(r) == "went":
            stopped.add(7)
            _went(store, "d0#r7")
        extra = extra or at.get(r) == "came"
        for i in range(n):
            if i not in stopped:
                store.ingest(make(i, sec, t0 + sec + 0.4))
        if extra:
            store.ingest(dataclasses.replace(make(0, sec, t0 + sec + 0.4), identity=new))
        clock.t += 0.3
        start = time.process_time()
        store.begin_round()
        res = [store.evaluate(q) for q in qs]
        store.end_round()
        print(f"round {r}: {(time.process_time() - start) * 1000:.1f} ms cpu",
              at.get(r, ""), flush=True)
        if prefix:
            with open(f"{prefix}.{r}", "wb") as f:
                pickle.dump(res, f)
    kept = {}
    for sl in store._query._slides.values():
        size = sl.nbytes() if hasattr(sl, "nbytes") else sl.d.nbytes
        kept[type(sl).__name__] = kept.get(type(sl).__name__, 0) + size
    print("kept between rounds, KiB:", {k: round(v / 1024) for k, v in kept.items()},
          f"total {sum(kept.values()) / 1024:,.0f} for {n} replicas")


def compare(a: str, b: str, count: int) -> None:
    bad = total = 0
    for r in range(count):
        with open(f"{a}.{r}", "rb") as fa, open(f"{b}.{r}", "rb") as fb:
            x, y = pickle.load(fa), pickle.load(fb)
        assert len(x) == len(y)
        for i, (p, q) in enumerate(zip(x, y)):
            total += 1
            if pickle.dumps(list(p.items())) != pickle.dumps(list(q.items())):
                bad += 1
                if bad <= 5:
                    print("differs: round", r, "query", i)
    print(f"rounds {count}, results compared {total}, differing {bad}")


def refold(path: str, out: str) -> None:
    """Each per-series gauge ring unfolded for a few rows with several samples a bucket,
    held as the tree with aggregator/aside.py builds it: those rows aside with every
    column, the rest one sample (in the narrowest type holding them all) and its offset."""
    from ray_monitor.aggregator import aside  # here: an older tree plays rounds too
    from ray_monitor.aggregator.rings import Ring, fits
    with open(path, "rb") as f:
        store = pickle.load(f)
    for name, t in store._tables.items():
        r = t.series_ring
        if t.kind != "gauge" or not t.has_drops or r.single:
            continue
        multi = np.flatnonzero((r.n > 1).any(axis=1))
        if len(multi) > aside.ASIDE_ROWS:
            continue
        before = r.nbytes()
        side = Ring(r.step, r.slots, "gauge")
        for c in ("n", "s", "lo", "hi", "last", "to"):
            setattr(side, c, getattr(r, c)[multi].copy())
            side.columns[c] = (getattr(side, c).dtype.type, side.columns[c][1])
            side.top[c] = r.top[c]
        last, to = r.last.copy(), r.to.copy()
        last[multi], to[multi] = 0.0, -np.inf
        held = last[to > -np.inf]
        dtype = next(d for d in (np.uint8, np.uint16, np.float32, np.float64)
                     if all(fits(np.dtype(d), x) for x in np.unique(held).tolist()))
        for c in ("n", "s", "lo", "hi"):
            delattr(r, c)
        r.last, r.to = last.astype(dtype), to
        r.columns = {"last": (dtype, 0), "to": (np.float32, -np.inf)}
        tops = {np.uint8: 255, np.uint16: 65535, np.float32: 2 ** 24, np.float64: 2 ** 53}
        r.top = {"last": tops[dtype], "to": 2 ** 24}  # as rings._TOP
        r.single = True
        r.aside, r.aside_of, r.aside_free = side, dict(zip(multi.tolist(), range(len(multi)))), []
        print(f"{name}: {len(multi)} rows aside, {before / 1e6:.1f} MB -> {r.nbytes() / 1e6:.1f} MB")
    with open(out, "wb") as f:
        pickle.dump(store, f, protocol=5)


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "fill":
        fill(int(args[0]), int(args[1]), args[2], int(args[3]) if len(args) > 3 else 10_000)
    elif mode == "rounds":
        rounds(args[0], int(args[1]), int(args[2]), int(args[3]), args[4] if len(args) > 4 else "",
               args[5] if len(args) > 5 else "")
    elif mode == "aside":
        refold(args[0], args[1])
    elif mode == "compare":
        compare(args[0], args[1], int(args[2]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
