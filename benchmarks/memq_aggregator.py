"""Window store memory per replica with every ring full, and where it goes, ring by ring.

    nice .venv/bin/python benchmarks/memq_aggregator.py DEPLOYMENTS REPLICAS [MAX_SERIES]

Fills a WindowStore with ``bench_aggregator.fill_full`` (every ring of every series: 6 h
at the default resolutions, realistic case) and prints tracemalloc's figure per replica
(from before the store is made to after the fill; the benchmark's histogram pools are
made before) and ``Ring.nbytes()`` per kind of ring per replica (RESULTS.md §11, §16, §20).
MAX_SERIES sets ``max_series_per_metric``: at the replicas' number, past it the series
fold into the overflow series ``other`` as at 10,000 replicas at the default cap (§31).
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc

from bench_aggregator import Clock, fill_full, snapshot_maker
from ray_monitor.aggregator.windows import WindowStore


def main() -> None:
    deps, reps = int(sys.argv[1]), int(sys.argv[2])
    cap = int(sys.argv[3]) if len(sys.argv) > 3 else 10_000
    make, n = snapshot_maker(deps, reps)
    make(0, 0, 1.0, span=10)  # pools built before tracing
    make(0, 0, 1.0, span=60)
    clock = Clock(1_000_000.0)
    c0 = time.process_time()
    tracemalloc.start()
    st = WindowStore(clock=clock, max_series_per_metric=cap)
    fill_full(st, clock, make, n, 1_000_000.0)
    mem, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"{deps}x{reps}, max_series_per_metric {cap}: tracemalloc {mem / n / 1024:.1f} KiB/replica  "
          f"cpu {time.process_time() - c0:.0f}s")
    agg: dict = {}
    for name, t in st._tables.items():
        for ri, ring in enumerate(t.rings):
            k = (t.kind, f"rollup{ri}")
            agg[k] = agg.get(k, 0) + ring.nbytes()
        if t.has_drops:
            k = (t.kind, "series")
            agg[k] = agg.get(k, 0) + t.series_ring.nbytes()
            agg[(name, "series")] = t.series_ring.nbytes()
            if t.folded:
                print(f"  {name}: {len(t.folded)} series folded into other, series ring single "
                      f"{t.series_ring.single}, rows aside {len(getattr(t.series_ring, 'aside_of', ()))}")
    tot = 0
    for k, v in sorted(agg.items()):
        if k[0] in ("counter", "gauge", "histogram"):
            tot += v
        print(f"  {k}: {v / n / 1024:.1f} KiB/replica")
    print(f"  rings total {tot / n / 1024:.1f} KiB/replica; gc objects {len(gc.get_objects())}")


if __name__ == "__main__":
    main()
