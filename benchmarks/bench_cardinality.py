"""The aggregator at its series cap: memory with every ring full, and the size of /metrics.

    nice .venv/bin/python benchmarks/bench_cardinality.py [--cap 5000] [--memory-series 500]

What a hostile or simply large cluster costs once every request metric holds the cap's
number of series (each a latency histogram of about 30 buckets, a request and an error
counter, an in-flight gauge): labels are replicas x route labels x outcomes, as a
FastAPI ingress makes them. Memory is tracemalloc of a WindowStore with every ring full
(6 hours of traffic) for ``--memory-series`` series, scaled to the cap (the store's
memory is linear in series); /metrics is rendered for the full cap, in the Prometheus
text format and in OpenMetrics, through the aggregator's own collector. The label sets
offered are twice the cap, so the overflow series (``other``) is there too.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_aggregator import Clock, fill_full, histogram  # noqa: E402

from ray_monitor.aggregator.exposition import MonitorCollector, registry, render  # noqa: E402
from ray_monitor.aggregator.windows import WindowStore  # noqa: E402
from ray_monitor.common.config import StartConfig  # noqa: E402
from ray_monitor.common.snapshot import (ReplicaIdentity, ReplicaSnapshot,  # noqa: E402
                                         SeriesDelta)

#: Route labels of one FastAPI ingress under a scanner: every standard method plus
#: _OTHER, on two routes and the unmatched label (what the method cap leaves possible).
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
           "_OTHER")
ROUTES = ("/items/{item_id}", "/items", "unmatched")


def snapshot_maker(series: int, seed: int = 0):
    """make(replica_no, seq, t, span) for replicas of 30 labels (methods x routes) x ok."""
    rng = np.random.default_rng(seed)
    pool = [histogram(rng, 38, 0.3) for _ in range(64)]
    labels = [f"{m} {r}" for m in METHODS for r in ROUTES]
    replicas = max(1, -(-series // len(labels)))
    idents = [ReplicaIdentity("shop", "Api", f"Api#r{i}", f"node{i % 8}", 1000 + i, "v1")
              for i in range(replicas)]

    def make(i: int, seq: int, t: float, span: int = 1) -> ReplicaSnapshot:
        j = (i + seq) % 64
        return ReplicaSnapshot(idents[i], seq, t - span, t,
                               [SeriesDelta(lab, "404" if "unmatched" in lab else "200",
                                            False, pool[(j + k) % 64])
                                for k, lab in enumerate(labels)],
                               inflight={lab: 1 for lab in labels[:3]})
    return make, replicas, len(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap", type=int, default=StartConfig().max_series_per_metric,
                    help="series per metric (default: StartConfig's max_series_per_metric)")
    ap.add_argument("--memory-series", type=int, default=600,
                    help="series whose every ring is filled for the memory figure")
    args = ap.parse_args()
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv))

    # /metrics at the cap: twice the cap's label sets offered, one second of traffic.
    make, replicas, per_replica = snapshot_maker(2 * args.cap)
    clock = Clock(1_000_000.0)
    store = WindowStore(clock=clock, max_series_per_metric=args.cap)
    for i in range(replicas):
        store.ingest(make(i, 1, clock.t - 0.1))
    st = store.stats()
    collector = MonitorCollector(series=store.cumulative, alerts=lambda: [],
                                 self_metrics=lambda: {})
    reg = registry(collector)
    start = time.perf_counter()
    text, _ = render(reg)
    text_s = time.perf_counter() - start
    start = time.perf_counter()
    om, _ = render(reg, "application/openmetrics-text")
    om_s = time.perf_counter() - start

    # Memory: every ring full for a sample of the series, scaled to the cap.
    mem_series = max(per_replica, args.memory_series)
    mmake, mrep, _ = snapshot_maker(mem_series)
    mclock = Clock(1_000_000.0)
    tracemalloc.start()
    mstore = WindowStore(clock=mclock, max_series_per_metric=args.cap)
    fill_full(mstore, mclock, mmake, mrep, 1_000_000.0)
    mem, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = mstore.stats()["series"]["latency_seconds"]
    per_series = mem / held

    rows = [
        ("cap (series per metric)", f"{args.cap:,}"),
        ("label sets offered", f"{replicas * per_replica:,} ({replicas} replicas x "
                               f"{per_replica} route labels)"),
        ("series held", f"{st['series_total']:,} (latency {st['series']['latency_seconds']:,}, "
                        f"requests {st['series']['requests']:,}); folded into 'other': "
                        f"{st['overflowed_series'].get('latency_seconds', 0):,}"),
        ("/metrics, Prometheus text", f"{len(text) / 2 ** 20:.1f} MiB, rendered in "
                                      f"{text_s * 1000:.0f} ms"),
        ("/metrics, OpenMetrics", f"{len(om) / 2 ** 20:.1f} MiB, rendered in {om_s * 1000:.0f} ms"),
        (f"memory, every ring full, {held} series (tracemalloc)",
         f"{mem / 2 ** 20:.0f} MiB ({per_series / 2 ** 10:.0f} KiB per request series, with "
         "its counters and gauge)"),
        ("  scaled to the cap", f"{per_series * args.cap / 2 ** 20:,.0f} MiB"),
    ]
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"  {a:<{width}}  {b}")


if __name__ == "__main__":
    main()
