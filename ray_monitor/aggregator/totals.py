"""Each series' value since the store started (counter totals, latest gauge samples,
cumulative histograms), held in arrays per metric for ``/metrics``.

Runs in the aggregator actor, under :class:`~ray_monitor.aggregator.rings.Table` (which
writes every sample here as well as into its rings); :meth:`Totals.histogram` and
:meth:`Totals.value` are what :meth:`~ray_monitor.aggregator.windows.WindowStore.cumulative`
shows. Why arrays (issue 15): one Python list and, for histograms, a ``Histogram`` with a
dictionary of bucket counts per series took about 30 KiB per replica and tens of
thousands of objects that every full garbage collection of the aggregator scans (a
collection landing in a rule round took 45 ms of it). Here a metric holds a few float
arrays indexed by series row, and each histogram row one array of bucket counts over
the range of bucket indices it has seen (uint32, int64 once the row's count could pass
2**32 - 1), so nothing is rounded and nothing per series is a tracked object but its
exemplars.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ray_monitor.common.histogram import Histogram
from ray_monitor.common.snapshot import Exemplar

__all__ = ["Totals"]

_U32 = 2 ** 32 - 1
_MARGIN = 8  # spare bucket indices on each side when a row's range grows


def _grow(a: np.ndarray, cap: int, fill) -> np.ndarray:
    return np.concatenate((a, np.full(cap - len(a), fill, dtype=a.dtype)))


class Totals:
    """Per series row of one metric: its value since the store started.

    Counter: ``v`` (the total). Gauge: ``v`` (the latest sample) and ``t`` (its time).
    Histogram: ``n``, ``s``, ``z``, ``lo``, ``hi`` (count, sum, zero count, min, max),
    per row an array of bucket counts from bucket index ``base[row]``, and the newest
    exemplar per latency bucket (rows that have any).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.v = np.zeros(0)
        self.t = np.zeros(0)
        self.n, self.s, self.z = np.zeros(0), np.zeros(0), np.zeros(0)
        self.lo, self.hi = np.zeros(0), np.zeros(0)
        self.base = np.zeros(0, dtype=np.int64)
        self.counts: list[Optional[np.ndarray]] = []
        self.exemplars: dict[int, dict[int, Exemplar]] = {}

    def reset(self, row: int) -> None:
        """Row ``row`` starts empty (a new series, or a reused row)."""
        if row >= len(self.v):
            cap = max(2 * len(self.v), row + 1, 8)
            self.v = _grow(self.v, cap, 0.0)
            self.t = _grow(self.t, cap, -math.inf)
            if self.kind == "histogram":
                for name in ("n", "s", "z"):
                    setattr(self, name, _grow(getattr(self, name), cap, 0.0))
                self.lo = _grow(self.lo, cap, math.inf)
                self.hi = _grow(self.hi, cap, -math.inf)
                self.base = _grow(self.base, cap, 0)
                self.counts.extend([None] * (cap - len(self.counts)))
        self.v[row] = math.nan if self.kind == "gauge" else 0.0
        self.t[row] = -math.inf
        if self.kind == "histogram":
            self.n[row] = self.s[row] = self.z[row] = 0.0
            self.lo[row], self.hi[row] = math.inf, -math.inf
            self.counts[row] = None
            self.exemplars.pop(row, None)

    def add(self, row: int, value: float) -> None:
        self.v[row] += value

    def set(self, row: int, value: float, t: float) -> None:
        """A gauge sample at ``t``: kept if it is the latest by time."""
        if t >= self.t[row]:
            self.v[row], self.t[row] = value, t

    def merge(self, row: int, h: Histogram, idx: np.ndarray, cnt: np.ndarray,
              exemplars: Optional[dict[int, Exemplar]]) -> None:
        """Adds one delta: ``h``'s count, sum, zero count, min and max, and its bucket
        counts ``cnt`` at the (distinct) bucket indices ``idx``."""
        total = self.n[row] + h.count
        self.n[row] = total
        self.s[row] += h.sum
        self.z[row] += h.zero_count
        if h.min < self.lo[row]:
            self.lo[row] = h.min
        if h.max > self.hi[row]:
            self.hi[row] = h.max
        if len(idx):
            a, b = int(idx.min()), int(idx.max())
            counts, base = self.counts[row], int(self.base[row])
            if counts is None:
                counts, base = np.zeros(b - a + 1, dtype=np.uint32), a
            elif a < base or b >= base + len(counts):
                lo, hi = min(a, base) - _MARGIN, max(b, base + len(counts) - 1) + _MARGIN
                wider = np.zeros(hi - lo + 1, dtype=counts.dtype)
                wider[base - lo:base - lo + len(counts)] = counts
                counts, base = wider, lo
            if total > _U32 and counts.dtype != np.int64:  # a bucket could pass uint32
                counts = counts.astype(np.int64)
            counts[idx - base] += cnt.astype(counts.dtype)
            self.counts[row], self.base[row] = counts, base
        if exemplars:
            ex = self.exemplars.setdefault(row, {})
            for i, e in exemplars.items():
                cur = ex.get(i)
                if cur is None or e.timestamp >= cur.timestamp:
                    ex[i] = e

    def take(self, rows: np.ndarray) -> "Totals":
        """A copy of rows ``rows`` (its row ``i`` is row ``rows[i]`` here), sharing nothing
        that this one writes in place: ``/metrics`` takes it on the aggregator's loop and
        reads it on a worker thread while ingest goes on changing this one."""
        out = Totals(self.kind)
        out.v, out.t = self.v[rows], self.t[rows]
        if self.kind == "histogram":
            for name in ("n", "s", "z", "lo", "hi", "base"):
                setattr(out, name, getattr(self, name)[rows])
            counts, ex, at = self.counts, self.exemplars, rows.tolist()
            out.counts = [None if c is None else c.copy() for c in map(counts.__getitem__, at)]
            out.exemplars = {i: dict(ex[r]) for i, r in enumerate(at) if r in ex}
        return out

    def value(self, row: int) -> float:
        return float(self.v[row])

    def histogram(self, row: int) -> tuple[Histogram, dict[int, Exemplar]]:
        """Row ``row`` as a new Histogram, and a copy of its exemplars."""
        h = Histogram()
        counts = self.counts[row]
        if counts is not None:
            at = np.flatnonzero(counts)
            h.buckets = dict(zip((at + int(self.base[row])).tolist(), counts[at].tolist()))
        h.count, h.zero_count = int(self.n[row]), int(self.z[row])
        h.sum, h.min, h.max = float(self.s[row]), float(self.lo[row]), float(self.hi[row])
        return h, dict(self.exemplars.get(row, {}))
