"""Per-row aggregates of one metric over one window: what a rule round reads from the rings.

Runs in the aggregator actor, under :mod:`~ray_monitor.aggregator.window_query` (which
decides what a window is, which rows and buckets it covers, and what a query means); this
module reads those buckets into one value per row and aggregate (``n``, ``s``, ``lo``,
``hi``, ``last``, ``v``, ``z``) and into per-group step sums (``zscore``, ``deriv``), and
keeps what a round one second later can reuse (:class:`SlidingGauge`,
:class:`SlidingSteps`; histogram counts: :mod:`~ray_monitor.aggregator.window_counts`).

Cost at 10,000 replicas (issue 15): a per-series gauge window (``inflight`` ``last`` and
``sum``) is 10,000 rows x 300 one-second buckets. Its min and max are read only when a
query asks for them (``last`` and ``sum`` do not), the newest bucket with data is found
from the last column first (every series reporting each second has data there), and a
round one second after the last adds the second that entered and takes off the one that
left. Per-step sums are summed per step, so a kept step is the one a fresh read makes.
Rows kept aside (:mod:`~ray_monitor.aggregator.aside`: the overflow series at the series
cap) get their own counts, sums, min, max and latest put in, not their cells into a copy
of the window's.
Whatever is kept gives exactly a fresh read's figures (tests/unit/test_kept_windows.py
compares them every round, bit for bit).
"""

from __future__ import annotations


from typing import Optional

import numpy as np

from ray_monitor.aggregator.aside import Rows, rows_in
from ray_monitor.aggregator.rings import Ring, Table
from ray_monitor.aggregator.timeline import Timeline
from ray_monitor.aggregator.window_counts import run_starts, whole_sums

__all__ = ["RowWindow", "SlidingGauge", "SlidingSteps", "deriv_dense", "deriv_same_steps",
           "read_rows", "step_sums"]

_NONE = np.iinfo(np.int64).min  # no bucket with data


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
            if ring.single:  # one sample a bucket: min and max are it
                last, has = ring.last[at], ring.count(at, aside=False) > 0
                lo = np.where(has, last, np.inf).min(axis=1)
                hi = np.where(has, last, -np.inf).max(axis=1)
                side = rows_in(ring, at)
                if side is not None:  # rows kept aside: their own
                    lo[side.pos] = side.cells("lo").min(axis=1)
                    hi[side.pos] = side.cells("hi").max(axis=1)
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


def _newest(cnt: np.ndarray, any_: np.ndarray, side: Optional[Rows] = None) -> np.ndarray:
    """Per row, the column of the newest bucket with data (rows without any: the last
    column, as ``argmax`` of no data gives): the last column where it has data, which is
    every row reporting each second, else a search of those rows only (rows kept aside
    ``side``: of their own counts)."""
    newest = np.full(len(cnt), cnt.shape[1] - 1, dtype=np.int64)
    rest = np.flatnonzero(any_ & (cnt[:, -1] == 0))
    if len(rest):
        newest[rest] -= (cnt[rest][:, ::-1] > 0).argmax(axis=1)
    if side is not None:
        newest[side.pos] = _newest(side.cells("n"), any_[side.pos])
    return newest


def _sums(ring: Ring, at: tuple, cnt: Optional[np.ndarray] = None,
          ) -> tuple[np.ndarray, Optional[Rows]]:
    """Per row of ``at``: its sum of samples as a fresh read adds them, and the rows kept
    aside (None: none). The single cells are summed as they are held and each row aside
    gets its own sum (aside.Rows.row_sums: an unfolded ring's bits), so that a window is
    not copied to put that one row in (issue 15: the first round at 10,000 capped)."""
    s = _row_sums(ring.sums(at, cnt, aside=False))
    side = rows_in(ring, at)
    if side is not None:
        s[side.pos] = side.row_sums("s")
    return s, side


def _counts_sums(ring: Ring, at: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray, Optional[Rows]]:
    """Per row of ``at``: the counts of its buckets (a row kept aside reads none here),
    its samples and its sum of samples (a row kept aside: its own), and the rows aside."""
    cnt = ring.count(at, aside=False)
    s, side = _sums(ring, at, cnt)
    n = whole_sums(cnt)
    if side is not None:
        n[side.pos] = whole_sums(side.cells("n"))
    return cnt, n, s, side


def read_rows(tl: Timeline, table: Table, ri: int, a: int, b: int, fine_only: bool,
              rows: int, tail_ok: bool) -> RowWindow:
    """Reads buckets ``a..b`` of ring ``ri`` (runs of whole coarse buckets from the coarser
    rings, unless ``fine_only``) into a window's per-row aggregates."""
    sw = RowWindow(ri, a, b, fine_only, rows)
    kind = table.kind
    _empty(kind, sw, rows)
    parts = [(ri, a, b)] if fine_only else tl.cover(ri, a, b, tail_ok)
    for pri, lo, hi in parts:
        ks, cols = tl.columns(pri, lo, hi)
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
        # one sample per bucket (ring.single): the sum is that sample; an empty bucket's
        # sample is 0: whole-number samples add up as integers
        cnt, n_sum, s_sum, side = _counts_sums(ring, at)
        any_ = n_sum > 0  # counts are whole numbers >= 0: any bucket with data
        sw.present[out] |= any_
        sw.n[out] += n_sum
        sw.s[out] += s_sum
        sw.pending.append((ring, at, out))  # min and max: when a query reads them
        if kind == "histogram":
            sw.z[out] += ring.z[at].sum(axis=1, dtype=np.float64)
            sw.pair_src.append((ring, cols))
        elif ring.latest:  # parts in time order: the newest column with data holds the latest
            newest = _newest(cnt, any_, side)
            sw.last[out] = np.where(any_, ring.samples((np.arange(n), cols[newest])), sw.last[out])
            if fine_only:  # the bucket it is in, for a window kept (SlidingGauge)
                sw.newest_k = np.where(any_, ks[newest], _NONE)
    return sw


def step_sums(kind: str, ring: Ring, rows: np.ndarray, pos: np.ndarray, cols: np.ndarray,
              groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group (``pos``: each row's group, sorted) and column of ``cols``: the sum and
    the count of the rows' buckets (counter: increase and samples; histogram: sum of values
    and observations; gauge: sum of samples and samples). Each column is summed on its
    own, in row order: the columns of a subset of ``cols`` equal those of the whole."""
    idx = (rows, slice(int(cols[0]), int(cols[-1]) + 1)) \
        if len(cols) and cols[-1] - cols[0] + 1 == len(cols) else np.ix_(rows, cols)
    if kind == "counter":
        v = ring.read("v", idx)
        has = ~np.isnan(v)
        total, count = np.where(has, v, 0.0), has.astype(np.float64)
    else:
        total, count = ring.read("s", idx), ring.read("n", idx)
    starts = run_starts(pos)
    if len(starts) == groups == len(rows):  # a row per group (a deployment's one rollup)
        return total, count  # what reduceat of one-row runs gives, without its pass
    out_t = np.zeros((groups, len(cols)))
    out_c = np.zeros((groups, len(cols)))
    if len(rows):
        out_t[pos[starts]] = np.add.reduceat(total, starts, axis=0)
        out_c[pos[starts]] = np.add.reduceat(count, starts, axis=0)
    return out_t, out_c


def deriv_dense(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of each row of ``y`` over the times ``x``, every step with data:
    window_query's deriv without its masks. Each row's sums are those of the masked form
    (the same values, summed along the same contiguous row), so the slopes are the same
    bits; the time terms, equal for every row, are summed once."""
    xc = x - x.sum() / x.shape[0]
    yc = y - (y.sum(axis=1) / x.shape[0])[:, None]
    return (xc * yc).sum(axis=1) / (xc * xc).sum()


def deriv_same_steps(x: np.ndarray, has: np.ndarray, m: int, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of each row of ``y`` (0 where a step has no data) over the times
    ``x``, where every row has data in the same steps ``has`` (``m`` of them; the usual
    case where a window reaches back past the data): window_query's masked deriv with its
    time terms, equal for every row, computed once (same values, same sums, same bits)."""
    xc = np.where(has, x - np.where(has, x, 0.0).sum() / m, 0.0)
    yc = np.where(has, y - (y.sum(axis=1) / m)[:, None], 0.0)
    return (xc * yc).sum(axis=1) / (xc * xc).sum()


class SlidingSteps:
    """A grouping's per-step sums over the finest ring (zscore, deriv), kept from round to
    round: a round reads only the steps that entered the window, or were written since
    (a late delta; the store marks each slot it writes), and copies the rest. Each step is
    summed on its own (:func:`step_sums`), so the copy is what a fresh read gives. Valid
    while the rows it reads stay (no rollup came or went, or over series rows
    (``fine_only``) no series) and the grouping's rows are the same ones (a group with no
    data in the window is left out of it)."""

    __slots__ = ("table_version", "fine_only", "single", "rows", "pos", "ks", "t", "c", "stamp")

    def __init__(self, table_version: int, fine_only: bool, single: bool, rows: np.ndarray,
                 pos: np.ndarray, ks: np.ndarray, t: np.ndarray, c: np.ndarray,
                 stamp: int) -> None:
        self.table_version, self.fine_only, self.single = table_version, fine_only, single
        self.rows, self.pos = rows, pos
        self.ks, self.t, self.c, self.stamp = ks, t, c, stamp

    def nbytes(self) -> int:
        return self.t.nbytes + self.c.nbytes + self.rows.nbytes + self.pos.nbytes

    def copy(self) -> "SlidingSteps":
        """Another window's start (move makes new arrays: nothing is shared that changes)."""
        return SlidingSteps(self.table_version, self.fine_only, self.single, self.rows,
                            self.pos, self.ks, self.t, self.c, self.stamp)

    def move(self, tl: Timeline, table: Table, ring: Ring, ks: np.ndarray, cols: np.ndarray,
             rows: np.ndarray, pos: np.ndarray, groups: int, stamp: int,
             ) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The sums of buckets ``ks`` (slots ``cols`` of the finest ring) at the store's data
        version ``stamp``; None where the kept ones cannot serve (then read afresh)."""
        if self.table_version != table.rows_version(self.fine_only) or \
                self.single != ring.single or \
                self.t.shape[0] != groups or not len(ks) or not len(self.ks) or \
                not np.array_equal(self.rows, rows) or not np.array_equal(self.pos, pos):
            return None
        j = ks - self.ks[0]  # bucket keys are consecutive: a key's column in the kept ones
        keep = (j >= 0) & (j < len(self.ks))
        keep[keep] = tl.written[cols[keep]] <= self.stamp
        t = np.empty((groups, len(ks)))
        c = np.empty((groups, len(ks)))
        kept = np.flatnonzero(keep)
        if len(kept):
            src = j[kept]
            if src[-1] - src[0] + 1 == len(src) and kept[-1] - kept[0] + 1 == len(kept):
                src, kept = slice(int(src[0]), int(src[-1]) + 1), slice(int(kept[0]), int(kept[-1]) + 1)
            t[:, kept], c[:, kept] = self.t[:, src], self.c[:, src]
        new = np.flatnonzero(~keep)
        if len(new):
            got = step_sums(table.kind, ring, rows, pos, cols[new], groups)
            if new[-1] - new[0] + 1 == len(new):  # a run of steps: a slice, not a scatter
                new = slice(int(new[0]), int(new[-1]) + 1)
            t[:, new], c[:, new] = got
        self.ks, self.t, self.c, self.stamp = ks, t, c, stamp
        return t, c


def _row_sums(cells: np.ndarray) -> np.ndarray:
    """Per row, as a fresh read adds them (whole-number samples as integers)."""
    if cells.dtype.kind == "u" and cells.dtype.itemsize <= 2:
        return whole_sums(cells)
    return cells.sum(axis=1)


def _exact(ring: Ring, cols) -> bool:
    """Whether the sums of samples of slots ``cols`` add up exactly in any order: every
    sample a whole number of magnitude at most rings.WHOLE_SAMPLE, at most 65,535 a bucket
    (a count column still unsigned), at most 600 buckets."""
    counts = ring.aside if ring.single else ring  # rows kept aside: their counts
    return (counts is None or counts.n.dtype.kind == "u") and not ring.unwhole[cols].any()


class SlidingGauge:
    """A per-series gauge window over the finest ring (``inflight`` ``last`` and ``sum``:
    10,000 rows x 300 s at 10,000 replicas), kept from round to round: the next round's
    window adds the buckets that entered it and takes off those that left. Counts are
    whole numbers, so they slide exactly; the latest sample moves to an entering bucket's,
    and a row whose latest left has no data left. The sums slide while every bucket of the
    last window and the new one holds whole-number samples (the ring marks each slot that
    gets one that is not: ``Ring.unwhole``), which add up exactly in any order; otherwise
    the round adds them afresh, as a fresh read does. So every figure equals a fresh
    read's exactly. A series that came or went since (``LabelSpace.changed_since``) has its row
    read afresh; valid while no bucket it holds was written or emptied since (as
    window_counts.SlidingCounts)."""

    __slots__ = ("a", "b", "held", "table_version", "single", "stamp", "exact", "n", "s",
                 "newest_k", "last")

    def __init__(self, sw: RowWindow, tl: Timeline, table: Table, stamp: int) -> None:
        ring = table.series_ring
        ks, cols = tl.columns(0, sw.a, sw.b)
        self.a, self.b, self.held, self.table_version = sw.a, sw.b, len(ks), table.series.edits
        self.single, self.stamp = ring.single, stamp
        self.exact = _exact(ring, cols)  # the kept sums are exact integer sums
        self.n, self.s, self.last = sw.n.copy(), sw.s.copy(), sw.last.copy()
        self.newest_k = sw.newest_k.copy() if hasattr(sw, "newest_k") else \
            np.full(len(sw.n), _NONE, dtype=np.int64)

    def nbytes(self) -> int:
        return self.n.nbytes + self.s.nbytes + self.newest_k.nbytes + self.last.nbytes

    def copy(self) -> "SlidingGauge":
        """Another window's start: a longer window of the same round ending alike (the
        300 s after the 60 s) adds only its older buckets (see move)."""
        other = object.__new__(SlidingGauge)
        for name in self.__slots__:
            value = getattr(self, name)
            setattr(other, name, value.copy() if isinstance(value, np.ndarray) else value)
        return other

    def _reread(self, ring: Ring, rows: np.ndarray, ks: np.ndarray, cols: np.ndarray) -> None:
        """Rows ``rows`` over slots ``cols`` (buckets ``ks``) as read_rows reads them."""
        n, s = np.zeros(len(rows)), np.zeros(len(rows))
        last, newest_k = np.zeros(len(rows)), np.full(len(rows), _NONE, dtype=np.int64)
        if len(cols):
            cnt, got_n, got_s, side = _counts_sums(ring, np.ix_(rows, cols))
            n += got_n
            s += got_s
            any_ = n > 0
            newest = _newest(cnt, any_, side)
            last = np.where(any_, ring.samples((rows, cols[newest])), last)
            newest_k = np.where(any_, ks[newest], _NONE)
        self.n[rows], self.s[rows], self.last[rows], self.newest_k[rows] = n, s, last, newest_k

    def move(self, tl: Timeline, table: Table, a: int, b: int, rows: int, stamp: int,
             ) -> Optional[RowWindow]:
        """The window of buckets ``a..b`` at the store's data version ``stamp``; None where
        the kept one cannot serve (then the caller reads it afresh)."""
        ring = table.series_ring
        # series that came or went since: their rows are read afresh (a removed series'
        # row was emptied, a new one's data is in entering buckets or marked written)
        changed = table.series.changed_since(self.table_version)
        if len(self.n) > rows or \
                self.single != ring.single or not ring.latest or b < self.b \
                or b - self.b > 30 or a > self.b:
            return None
        ks, ps = tl.columns(0, self.a, self.b)
        # every bucket it holds still held, and none written since it was read
        if len(ks) != self.held or (len(ps) and int(tl.written[ps].max()) > self.stamp):
            return None
        if len(self.n) < rows:  # rows added since (also in ``changed``)
            grow = rows - len(self.n)
            self.n, self.s = np.concatenate((self.n, np.zeros(grow))), np.concatenate((self.s, np.zeros(grow)))
            self.last = np.concatenate((self.last, np.zeros(grow)))
            self.newest_k = np.concatenate((self.newest_k, np.full(grow, _NONE, dtype=np.int64)))
        self.table_version = table.series.edits
        every = slice(0, rows)
        ek, enter = tl.columns(0, self.b + 1, b)
        leave = ps[ks < a]
        ks, cols = tl.columns(0, a, b)
        exact = _exact(ring, cols)
        slide = self.exact and exact
        n, s, newest_k, last = self.n, self.s, self.newest_k, self.last
        if a < self.a:  # a longer window ending alike: older buckets, older samples
            old = read_rows(tl, table, 0, a, self.a - 1, True, rows, False)
            n += old.n
            if slide:
                s += old.s
            if hasattr(old, "newest_k"):
                got = (old.newest_k != _NONE) & (newest_k == _NONE)
                newest_k[got], last[got] = old.newest_k[got], old.last[got]
        if len(enter):
            cnt = ring.count((every, enter))
            n += whole_sums(cnt)
            if slide:
                s += _row_sums(ring.sums((every, enter), cnt))  # a few columns: patched
            has = cnt > 0
            got = np.flatnonzero(has.any(axis=1))
            if len(got):
                col = len(enter) - 1 - has[got][:, ::-1].argmax(axis=1)
                newest_k[got] = ek[col]
                last[got] = ring.samples((got, enter[col]))
        if len(leave):
            cnt = ring.count((every, leave))
            n -= whole_sums(cnt)
            if slide:
                s -= _row_sums(ring.sums((every, leave), cnt))
        gone = newest_k < a  # its latest sample left the window, and every earlier one
        last[gone] = 0.0
        newest_k[gone] = _NONE
        self.a, self.b, self.stamp, self.held, self.exact = a, b, stamp, len(ks), exact
        at = (every, slice(int(cols[0]), int(cols[-1]) + 1)
              if len(cols) and cols[-1] - cols[0] + 1 == len(cols) else cols)
        if not slide:  # as read_rows adds them
            s[:] = 0.0
            if len(cols):
                s += _sums(ring, at)[0]
        if len(changed):
            self._reread(ring, changed, ks, cols)
        sw = RowWindow(0, a, b, True, rows)
        sw.n, sw.s, sw.last = n.copy(), s.copy(), last.copy()
        sw.lo, sw.hi = np.full(rows, np.inf), np.full(rows, -np.inf)
        sw.present = n > 0
        if len(cols):
            sw.pending.append((ring, at, every))
        return sw
