"""Aggregator scale: WindowStore ingest rate, one round of rule queries, memory.

    nice .venv/bin/python benchmarks/bench_aggregator.py [--deployments 50] [--replicas 20]
        [--case realistic|simple|both]

A fake clock drives time, and every figure is the process's CPU time
(``time.process_time``), so other work on the machine does not inflate it. Two cases of
replica snapshot: "realistic", 2 methods x 2 outcomes ("ok" with ~30 latency buckets, an error with a few),
in-flight per method and health; "simple", 1 method x ok. The store is first filled for ``--fill-s`` seconds
of cluster traffic (one snapshot per replica per second; enough to fill the 10 min fine
ring), then a round is: one second of new snapshots, then ``--queries`` distinct rules
(mixed functions over counters, histograms and gauges, windows 1m/5m, by (application,
deployment), a third with a deployment matcher) timed with ``begin_round``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import shlex
import sys
import time
import tracemalloc

import numpy as np

from ray_monitor.common.catalog import Query
from ray_monitor.common.matchers import Matcher
from ray_monitor.common.histogram import Histogram
from ray_monitor.common.snapshot import (ReplicaHealth, ReplicaIdentity, ReplicaSnapshot,
                                  SeriesDelta)
from ray_monitor.aggregator.windows import WindowStore


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def histogram(rng: np.random.Generator, n: int, spread: float) -> Histogram:
    h = Histogram()
    for v in rng.lognormal(np.log(0.05), spread, n):
        h.record(float(v))
    return h


def snapshot_maker(deployments: int, replicas: int, seed: int = 0, simple: bool = False):
    """Returns make(replica_no, seq, t): snapshots reuse a pool of histograms (cheap to build)."""
    rng = np.random.default_rng(seed)
    ok_pool = [histogram(rng, 38, 0.3) for _ in range(64)]  # ~30 buckets each
    err_pool = [histogram(rng, 3, 0.2) for _ in range(64)]
    idents = [ReplicaIdentity("app", f"d{d}", f"d{d}#r{r}", f"node{d % 8}", 1000 + r, "v1")
              for d in range(deployments) for r in range(replicas)]

    merged: dict[int, tuple[list, list]] = {1: (ok_pool, err_pool)}

    def pools(span: int) -> tuple[list, list]:
        """Histograms of ``span`` seconds of traffic, for filling the coarse rings fast."""
        if span not in merged:
            merged[span] = tuple([Histogram.merged(pool[(j + x) % 64] for x in range(span))
                                  for j in range(8)] for pool in (ok_pool, err_pool))
        return merged[span]

    def make(i: int, seq: int, t: float, span: int = 1) -> ReplicaSnapshot:
        j = (i + seq) % 64
        ok, err = pools(span)
        series = [SeriesDelta(m, o, o != "ok", (ok if o == "ok" else err)[(j + k) % len(ok)])
                  for k, (m, o) in enumerate(itertools.product(
                      ("__call__",) if simple else ("__call__", "predict"),
                      ("ok",) if simple else ("ok", "ValueError")))]
        return ReplicaSnapshot(idents[i], seq, t - span, t, series,
                               inflight={"__call__": j % 5} if simple else
                               {"__call__": j % 5, "predict": j % 3},
                               health=ReplicaHealth(cpu_percent=30.0 + j, rss_bytes=2 ** 30 + j,
                                                    loop_lag_s=0.001 * j, longest_request_s=0.1))
    return make, len(idents)


def queries(n: int, deployments: int) -> list[Query]:
    by = ("application", "deployment")
    kinds = [("latency_seconds", f) for f in ("p50", "p90", "p99", "avg", "max", "rate",
                                              "ratio_above", "zscore")]
    kinds += [("requests", f) for f in ("rate", "count", "error_ratio", "zscore")]
    kinds += [("inflight", f) for f in ("last", "avg", "max", "sum")]
    kinds += [("cpu_percent", f) for f in ("avg", "max", "deriv")]
    kinds += [("rss_bytes", f) for f in ("max", "deriv")]
    out, seen = [], set()
    for i in itertools.count():
        metric, f = kinds[i % len(kinds)]
        window = (60.0, 300.0)[(i // len(kinds)) % 2]
        variant = (i // (2 * len(kinds)))
        matchers = ((Matcher("deployment", "=", f"d{variant % deployments}"),)
                    if variant % 3 == 1 else ())
        param = {"ratio_above": 0.1 + 0.01 * variant}.get(f)
        q = Query(f, metric, window, by=by, matchers=matchers, param=param)
        if q not in seen:
            seen.add(q)
            out.append(q)
        if len(out) == n:
            return out
    return out


def fill_full(store: WindowStore, clock: Clock, make, n_rep: int, now: float) -> int:
    """Fills every ring of every series: one snapshot per coarse step where only the coarse
    ring keeps the time, per medium step where the medium ring does, per second after.

    The per-second part lasts two turns of the 1 s ring (20 min), not one: a medium-step
    snapshot holds 10 s of traffic in one second of the 1 s ring, which widens its counts
    to uint16 until a full turn of the ring has passed since (rings.Ring._narrow_back), as
    a burst does; a replica at steady traffic holds them in a byte after that."""
    res = ((60, 6 * 3600), (10, 3600), (1, 600))
    seq, t = 0, now - res[0][1]
    for step, span in res:
        end = now - (span // 6 if step == 60 else 1200 if step == 10 else 0)
        while t < end:
            clock.t = t + 0.5
            for i in range(n_rep):
                store.ingest(make(i, seq, t + 0.4, span=step))
            seq, t = seq + 1, t + step
    return seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deployments", type=int, default=50)
    ap.add_argument("--replicas", type=int, default=20)
    ap.add_argument("--fill-s", type=int, default=330, help="seconds of traffic before queries")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--max-series", type=int, default=10_000,
                    help="the store's max_series_per_metric (past it, series fold into "
                         "'other': at 10,000 replicas of 2 methods x 2 outcomes, 40,000 "
                         "holds every one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--memory-replicas", type=int, default=100,
                    help="replicas whose every ring is filled for the memory figure (0: all)")
    ap.add_argument("--no-gc-freeze", action="store_true",
                    help="do not move the objects made before the store out of full garbage "
                         "collections (the aggregator actor does it once started)")
    ap.add_argument("--case", choices=("realistic", "simple", "both"), default="both",
                    help="simple: one method, outcome ok only (one series per replica per "
                         "request metric)")
    args = ap.parse_args()
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv))
    for simple in {"realistic": (False,), "simple": (True,), "both": (False, True)}[args.case]:
        run_case(args, simple)


def run_case(args: argparse.Namespace, simple: bool) -> None:
    make, n_rep = snapshot_maker(args.deployments, args.replicas, simple=simple)
    if not args.no_gc_freeze:  # as the aggregator actor does once started (actor._start)
        gc.collect()
        gc.freeze()
    full_gc: list[list[float]] = []  # [start, CPU s] of each full (generation 2) collection

    def on_gc(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                full_gc.append([time.process_time(), 0.0])
            elif full_gc:
                full_gc[-1][1] = time.process_time() - full_gc[-1][0]
    gc.callbacks.append(on_gc)
    clock = Clock(1_000_000.0)
    store = WindowStore(clock=clock, max_series_per_metric=args.max_series)

    t0 = 1_000_000.0 - args.fill_s
    times = []
    for sec in range(args.fill_s):
        clock.t = t0 + sec + 0.5
        batch = [make(i, sec, t0 + sec + 0.4) for i in range(n_rep)]
        start = time.process_time()
        for s in batch:
            store.ingest(s)
        times.append(time.process_time() - start)
    ingest_rate = (len(times) - 60) * n_rep / sum(times[60:])
    start = time.process_time()
    store.expire()
    expire_ms = (time.process_time() - start) * 1000  # steady state: series exist
    create_rate = 60 * n_rep / sum(times[:60])

    qs = queries(args.queries, args.deployments)
    keys = {(q.metric, q.window_s, q.matchers, q.by) for q in qs}
    round_ms, round_gc = [], []
    for r in range(args.rounds):
        sec = args.fill_s + r
        clock.t = t0 + sec + 0.5
        for i in range(n_rep):
            store.ingest(make(i, sec, t0 + sec + 0.4))
        clock.t += 0.3
        full_gc.clear()
        start = time.process_time()
        store.begin_round()
        results = [store.evaluate(q) for q in qs]
        store.end_round()
        round_ms.append((time.process_time() - start) * 1000)
        round_gc.append(sum(d for _, d in full_gc) * 1000)
    gc.callbacks.remove(on_gc)
    # what rule rounds keep from one round to the next: sliding histogram windows, and
    # (since issue 17b) per-series gauge windows and zscore/deriv steps
    kept = sum(sl.nbytes() if hasattr(sl, "nbytes") else sl.d.nbytes
               for sl in store._query._slides.values())
    # without the memo: each query at its own instant computes everything from the rings
    sample = qs[::10]
    start = time.process_time()
    for k, q in enumerate(sample):
        store.evaluate(q, now=clock.t + 1e-6 * (k + 1))
    single_ms = (time.process_time() - start) * 1000 / len(sample)
    st = store.stats()

    mem_rep = n_rep if args.memory_replicas <= 0 else min(args.memory_replicas, n_rep)
    mclock = Clock(1_000_000.0)
    tracemalloc.start()
    mstore = WindowStore(clock=mclock)
    fill_full(mstore, mclock, make, mem_rep, 1_000_000.0)
    mem, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    mst = mstore.stats()
    per_rep = mem / mem_rep

    answered = sum(1 for r in results if r)
    rows = [
        ("replicas (snapshots per second)", f"{n_rep}"),
        ("series in the store", f"{st['series_total']} (latency {st['series']['latency_seconds']}, "
                                f"requests {st['series']['requests']}, "
                                f"inflight {st['series']['inflight']})"),
        ("ingest, snapshots/s on one core (series exist)", f"{ingest_rate:,.0f}"),
        ("ingest, first 60 s (creating series), snapshots/s", f"{create_rate:,.0f}"),
        (f"round of {len(qs)} distinct queries ({len(keys)} metric/window/matcher/by keys), ms",
         f"first {round_ms[0]:.1f}, median {np.median(round_ms):.1f}, max {max(round_ms):.1f}"),
        ("  of which full garbage collections, ms (per round)",
         ", ".join(f"{x:.1f}" for x in round_gc) + ("" if args.no_gc_freeze else
                                                     " (gc.freeze() before the store)")),
        ("  kept between rounds (sliding windows), KiB",
         f"{kept / 2 ** 10:,.0f} ({kept / n_rep:,.0f} bytes per replica)"),
        ("one query without the round memo, ms (mean of 100)", f"{single_ms:.2f}"),
        (f"expire() with {st['series_total']} live series, ms", f"{expire_ms:.2f}"),
        ("queries with a non-empty answer", f"{answered}/{len(qs)}"),
        (f"memory, every ring full, {mem_rep} replicas (tracemalloc), MiB",
         f"{mem / 2 ** 20:,.0f} ({per_rep / 2 ** 10:,.0f} KiB per replica, "
         f"{mst['series_total'] // mem_rep} series each)"),
        (f"  scaled to {n_rep} replicas ({args.replicas} per deployment), MiB",
         f"{per_rep * n_rep / 2 ** 20:,.0f}"),
        ("  store's own estimate (stats approx_bytes), MiB", f"{mst['approx_bytes'] / 2 ** 20:,.0f}"),
        ("  buckets held (fine per series, coarse per rollup)",
         f"{mst['buckets']:,} ({mst['rollups_total']} rollups)"),
    ]
    width = max(len(a) for a, _ in rows)
    print(f"WindowStore, {args.deployments} deployments x {args.replicas} replicas, "
          f"{'1 method x ok' if simple else '2 methods x 2 outcomes'} per snapshot, "
          f"{args.fill_s} s of traffic before the queries")
    for a, b in rows:
        print(f"  {a:<{width}}  {b}")


if __name__ == "__main__":
    main()
