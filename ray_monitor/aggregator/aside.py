"""Rows of a per-series gauge ring kept aside: the rows with several samples in a bucket.

Runs in the aggregator actor, under :class:`~ray_monitor.aggregator.rings.Ring` (which
holds a per-series gauge ring's buckets as one sample and its offset, 5 bytes a cell,
while each series reports once a second); this module decides where a row goes that gets
a second sample in a bucket, and how its cells are read. Such rows are few: the overflow
series ``other`` (past ``max_series_per_metric`` it gets one sample per folded series a
second), a replica that reported twice in a second. Each is kept with every column (count,
sum, min, max, latest and its offset: 38 bytes a cell) in a small ring of its own
(``ring.aside``, the row ``ring.aside_of[row]``), so that one such row does not hold the
whole ring's rows in every column (at 10,000 replicas capped: 250 MB against 33 MB;
RESULTS.md §31). Reads give the values an unfolded ring gives, bit for bit, two ways: a
read of a window's per-row figures (row_windows) reads the single cells as they are held
and puts in each row aside its own figures (:func:`rows_in`: no copy of the window's
cells, which made the first round at 10,000 capped 72-77 ms against 40-46); a read of
cells (:meth:`Ring.count`, ``sums``, ``samples``, ``read``: a few columns, or the cells
of groups' steps) gets the aside rows' cells put in (:func:`patch`). Past ``ASIDE_ROWS``
rows the ring unfolds (every row in every column, as before).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Optional

import numpy as np

__all__ = ["ASIDE_ROWS", "Rows", "add_sample", "merge_back", "patch", "put_aside", "rows_in"]

#: rows kept aside before the whole ring unfolds (64 x 604 slots x 38 bytes: 1.5 MB)
ASIDE_ROWS = 64
_FULL = ("n", "s", "lo", "hi", "last", "to")


def put_aside(ring, r: int) -> Optional[int]:
    """Row ``r`` of a single-sample ``ring`` got a second sample in a bucket: its row in
    ``ring.aside`` (its cells so far moved there, in every column), or None where the
    whole ring unfolded instead (``ASIDE_ROWS`` rows aside already)."""
    if len(ring.aside_of) >= ASIDE_ROWS:
        ring.unfold()
        return None
    if ring.aside is None:
        ring.aside, ring.aside_of, ring.aside_free = \
            type(ring)(ring.step, ring.slots, "gauge"), {}, []
    side = ring.aside
    if ring.aside_free:
        i = ring.aside_free.pop()
    else:
        i = side.rows
        side.grow(i + 1)
    has = ring.to[r] > -np.inf
    last = ring.last[r].astype(np.float64)
    side.n[i] = has
    side.s[i] = np.where(has, last, 0.0)
    side.lo[i] = np.where(has, last, np.inf)
    side.hi[i] = np.where(has, last, -np.inf)
    side.last[i], side.to[i] = last, ring.to[r]
    ring.last[r], ring.to[r] = 0, -np.inf  # empty here: read from aside from now on
    ring.aside_of[r] = i
    return i


def merge_back(ring) -> None:
    """The ring unfolds (its columns all made): the rows aside go back in place, in
    columns of types that hold them."""
    side = ring.aside
    for c in _FULL:
        have = getattr(ring, c)
        want = np.result_type(have, getattr(side, c))
        if want != have.dtype:
            setattr(ring, c, have.astype(want))
    for r, i in ring.aside_of.items():
        for c in _FULL:
            getattr(ring, c)[r] = getattr(side, c)[i]
    ring.aside, ring.aside_of = None, MappingProxyType({})


def _hits(ring, ri) -> tuple[list, int, bool]:
    """The rows of a read's row index ``ri`` (a slice, an array or ``np.ix_``'s column of
    rows) kept aside, as ``(positions along the read's first axis, aside row)``; the rows
    the read has; whether ``ri`` is ``np.ix_``'s."""
    if isinstance(ri, slice):
        start, stop, step = ri.indices(ring.rows)
        return [((r - start) // step, i) for r, i in ring.aside_of.items()
                if start <= r < stop and (r - start) % step == 0], \
            len(range(start, stop, step)), False
    ri = np.asarray(ri)
    flat = ri.reshape(-1)
    hits = [(pos, i) for r, i in ring.aside_of.items() if len(pos := np.flatnonzero(flat == r))]
    return hits, len(flat), ri.ndim == 2


class Rows:
    """The rows kept aside in a read of a ring's cells at ``(rows, slots)`` (not element-wise
    pairs): ``pos``, their places along the read's first axis, and their cells and row
    sums as the read would give them from an unfolded ring."""

    __slots__ = ("side", "pos", "at", "ci", "ix", "pad", "_got")

    def __init__(self, side, hits: list, ci, ix: bool, total: int) -> None:
        self.side, self.ci, self.ix, self._got = side, ci, ix, {}
        self.pos = np.concatenate([np.atleast_1d(p) for p, _ in hits]).astype(np.int64)
        self.at = [i for p, i in hits for _ in np.atleast_1d(p)]
        # numpy sums the rows of a read laid out column by column (a slice of rows and an
        # array of slots: a window across the ring's end) one column after another, and of
        # one row or a read laid out row by row pairwise: the aside rows are read with the
        # read's own index form, two rows at least where it has two or more
        self.pad = max(0, min(2, total) - len(self.at))

    def _read(self, column: str) -> np.ndarray:
        got = self._got.get(column)
        if got is None:
            held = getattr(self.side, column)[self.at + self.at[:1] * self.pad]
            got = self._got[column] = \
                held[np.ix_(np.arange(len(held)), np.asarray(self.ci).reshape(-1))] \
                if self.ix else held[:, self.ci]
        return got

    def cells(self, column: str) -> np.ndarray:
        """``column``'s cells of these rows, ``[len(pos), slots]``."""
        return self._read(column)[:len(self.at)]

    def row_sums(self, column: str) -> np.ndarray:
        """Per row, ``column`` summed over the read's slots as numpy sums the rows of
        that read of an unfolded ring (the same additions in the same order)."""
        return self._read(column).sum(axis=1)[:len(self.at)]


def rows_in(ring, index) -> Optional[Rows]:
    """The rows kept aside in a read of ``ring``'s cells at ``index`` (``(rows, slots)``:
    a slice or an array of rows with a slice or an array of slots, or ``np.ix_``); None
    where it has none. Their cells in the ring's single columns read empty."""
    if not ring.aside_of:
        return None
    ri, ci = index
    hits, total, ix = _hits(ring, ri)
    return Rows(ring.aside, hits, ci, ix, total) if hits else None


def patch(ring, a: np.ndarray, index, column: str, fresh: bool = False) -> np.ndarray:
    """``a``, the cells ``ring``'s single columns give at ``index`` (``(rows, slots)``: a
    slice, an array, ``np.ix_``, element-wise pairs or one row), with the cells of the rows
    kept aside taken from ``ring.aside``'s ``column`` (in a type that holds both). ``a``
    is written into where ``fresh`` (made for this read, not a view of a column) and of
    that type already; else copied."""
    ri, ci = index
    pairwise = False
    if np.ndim(ri) == 0 and not isinstance(ri, slice):  # one row
        i = ring.aside_of.get(int(ri))
        if i is None:
            return a
        hits = [(Ellipsis, i)]
    else:
        if not isinstance(ri, slice) and np.ndim(ri) == 1 and not isinstance(ci, slice):
            ri, ci = np.broadcast_arrays(np.asarray(ri), np.asarray(ci))  # element-wise
            pairwise = True
        elif not isinstance(ri, slice) and np.ndim(ri) == 2:  # np.ix_(rows, cols)
            ci = np.asarray(ci).reshape(-1)
        hits = _hits(ring, ri)[0]
    if not hits:
        return a
    src = getattr(ring.aside, column)
    want = np.result_type(a, src)
    out = a if fresh and a.dtype == want else a.astype(want)  # ``a`` may be a view of a column
    for pos, i in hits:
        out[pos] = src[i][ci[pos]] if pairwise else src[i][ci]
    return out


def add_sample(ring, r: int, p: int, value: float, off: float) -> None:
    """A gauge sample into bucket ``[r, p]`` of a ring with every column."""
    if ring.n[r, p]:
        n = float(ring.n[r, p]) + 1
        if n > ring.top["n"]:  # counts are whole numbers: top is what the type holds
            ring.widen("n", n)
        ring.n[r, p] = n
        ring.s[r, p] += value
        if value < ring.lo[r, p]:
            ring.lo[r, p] = value
        if value > ring.hi[r, p]:
            ring.hi[r, p] = value
        if ring.latest and off >= ring.to[r, p]:
            ring.last[r, p] = value
            ring.to[r, p] = off
    else:
        ring.n[r, p] = 1
        ring.s[r, p] = ring.lo[r, p] = ring.hi[r, p] = value
        if ring.latest:
            ring.last[r, p] = value
            ring.to[r, p] = off
