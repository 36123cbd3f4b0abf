"""Per-row aggregates of one metric over one window: what a rule round reads from the rings.

Runs in the aggregator actor, under :mod:`~ray_monitor.aggregator.window_query` (which
decides what a window is, which rows and buckets it covers, and what a query means); this
module reads those buckets into one value per row and aggregate (``n``, ``s``, ``lo``,
``hi``, ``last``, ``v``, ``z``), and keeps a per-series gauge window from round to round
(:class:`SlidingGauge`).

Cost at 10,000 replicas: a per-series gauge window (``inflight`` ``last`` and ``sum``) is
10,000 rows x 300 one-second buckets. Its min and max are read only when a query asks for
them (``last`` and ``sum`` do not), the newest bucket with data is found from the last
column first (every series reporting each second has data there), and a round one second
after the last adds the second that entered and takes off the one that left (whole
numbers only, so the sums equal a fresh read's exactly; see :class:`SlidingGauge`).
"""

from __future__ import annotations


import numpy as np

from ray_monitor.aggregator.rings import Ring, Table
from ray_monitor.aggregator.timeline import Timeline
from ray_monitor.aggregator.window_counts import whole_sums

__all__ = ["RowWindow", "read_rows"]

#: Largest magnitude of a gauge bucket's sum that a sliding window adds up: whole numbers
#: below 2**43, a window of at most 600 buckets, so every partial sum is below 2**53 and
#: exact, in any order (the sum a fresh read makes, bit for bit).
_WHOLE_TOP = float(2 ** 43)


class RowWindow:
    """Per-row aggregates of one metric over one window: rows of the series (per-series
    queries, finest ring only) or of the rollups (all rings)."""

    def __init__(self, ri: int, a: int, b: int, fine_only: bool, rows: int) -> None:
        self.ri, self.a, self.b, self.fine_only = ri, a, b, fine_only
        self.present = np.zeros(rows, dtype=bool)
        #: (ring, slots) whose histogram entries the window holds: decoded by dense()
        self.pair_src: list[tuple] = []
        self._dense = None
        #: makes dense()'s answer (WindowQuery._dense: from a sliding window when it can)
        self.make_dense = None
        #: parts whose min and max are not in ``lo``/``hi`` yet, as (ring, index, out): a
        #: round's per-series windows are mostly read for ``last`` and ``sum``, which need
        #: neither (see settle)
        self.pending: list[tuple[Ring, tuple, slice]] = []

    def settle(self) -> None:
        """Adds the pending parts' min and max into ``lo`` and ``hi``."""
        for ring, at, out in self.pending:
            if ring.single:  # one sample per bucket: min and max are that sample
                last, has = ring.last[at], ring.count(at) > 0
                lo = np.where(has, last, np.inf).min(axis=1)
                hi = np.where(has, last, -np.inf).max(axis=1)
            else:
                lo, hi = ring.lo[at].min(axis=1), ring.hi[at].max(axis=1)
            np.minimum(self.lo[out], lo, out=self.lo[out])
            np.maximum(self.hi[out], hi, out=self.hi[out])
        self.pending = []

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-row histogram counts ``[rows, C]`` and the bucket index of each column."""
        if self._dense is None:
            self._dense = self.make_dense()
        return self._dense

    def finish(self, table: Table) -> "RowWindow":
        """What every window has once read: ``has_data``, and ``avg`` of a gauge."""
        self.has_data = self.present.copy()
        if table.kind == "gauge":
            with np.errstate(invalid="ignore", divide="ignore"):
                self.avg = self.s / self.n
        else:  # zero is a value: an alive counter or histogram without data reads 0
            self.present |= table.alive(self.fine_only)[:len(self.present)]
        return self


def _empty(kind: str, sw: RowWindow, rows: int) -> None:
    if kind == "counter":
        sw.v = np.zeros(rows)
        return
    sw.n, sw.s = np.zeros(rows), np.zeros(rows)
    sw.lo, sw.hi = np.full(rows, np.inf), np.full(rows, -np.inf)
    if kind == "histogram":
        sw.z = np.zeros(rows)
    else:
        sw.last = np.zeros(rows)


def _newest(cnt: np.ndarray, any_: np.ndarray) -> np.ndarray:
    """Per row, the column of the newest bucket with data (rows without any: the last
    column, as ``argmax`` of no data gives): the last column where it has data, which is
    every row reporting each second, else a search of those rows only."""
    newest = np.full(len(cnt), cnt.shape[1] - 1, dtype=np.int64)
    rest = np.flatnonzero(any_ & (cnt[:, -1] == 0))
    if len(rest):
        newest[rest] -= (cnt[rest][:, ::-1] > 0).argmax(axis=1)
    return newest


def read_rows(tl: Timeline, table: Table, ri: int, a: int, b: int, fine_only: bool,
              rows: int, tail_ok: bool) -> RowWindow:
    """Reads buckets ``a..b`` of ring ``ri`` (runs of whole coarse buckets from the coarser
    rings, unless ``fine_only``) into a window's per-row aggregates."""
    sw = RowWindow(ri, a, b, fine_only, rows)
    kind = table.kind
    _empty(kind, sw, rows)
    parts = [(ri, a, b)] if fine_only else tl.cover(ri, a, b, tail_ok)
    for pri, lo, hi in parts:
        _, cols = tl.columns(pri, lo, hi)
        if not len(cols):
            continue
        ring = table.series_ring if fine_only else table.rings[pri]
        n = rows
        out = slice(0, n)
        # a run of adjacent slots reads as a view, not a copy
        at = (slice(0, n), slice(int(cols[0]), int(cols[-1]) + 1)
              if cols[-1] - cols[0] + 1 == len(cols) else cols)
        if kind == "counter":
            v = ring.read("v", at)
            has = ~np.isnan(v)
            sw.present[out] |= has.any(axis=1)
            sw.v[out] += np.where(has, v, 0.0).sum(axis=1)
            continue
        cnt = ring.count(at)
        n_sum = whole_sums(cnt)
        any_ = n_sum > 0  # counts are whole numbers >= 0: any bucket with data
        sw.present[out] |= any_
        sw.n[out] += n_sum
        if ring.single:  # one sample per bucket: the sum is that sample's
            last = ring.last[at]
            # an empty bucket's sample is 0: whole-number samples add up as integers
            sw.s[out] += whole_sums(last) if last.dtype.itemsize <= 2 and \
                last.dtype.kind == "u" else np.where(cnt > 0, last, 0.0).sum(axis=1)
        else:
            sw.s[out] += ring.s[at].sum(axis=1)
        sw.pending.append((ring, at, out))  # min and max: when a query reads them
        if kind == "histogram":
            sw.z[out] += ring.z[at].sum(axis=1, dtype=np.float64)
            sw.pair_src.append((ring, cols))
        elif ring.latest:  # parts in time order: the newest column with data holds the latest
            newest = _newest(cnt, any_)
            sw.last[out] = np.where(any_, ring.last[np.arange(n), cols[newest]], sw.last[out])
    return sw
