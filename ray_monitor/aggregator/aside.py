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
RESULTS.md §31). A read of the ring's cells (:meth:`Ring.count`, ``sums``, ``latest``,
``read``) takes those rows' cells from there, with the values and types an unfolded ring
gives, so every answer is the same bit for bit. Past ``ASIDE_ROWS`` rows the ring unfolds
(every row in every column, as before).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Optional

import numpy as np

__all__ = ["ASIDE_ROWS", "add_sample", "merge_back", "patch", "put_aside"]

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


def patch(ring, a: np.ndarray, index, column: str) -> np.ndarray:
    """``a``, the cells ``ring``'s single columns give at ``index`` (``(rows, slots)``: a
    slice, an array, ``np.ix_`` or element-wise pairs), with the cells of the rows kept
    aside taken from ``ring.aside``'s ``column`` (in a type that holds both)."""
    ri, ci = index
    hits = []  # (positions along a's first axis, aside row)
    pairwise = False
    if isinstance(ri, slice):
        start, stop, step = ri.indices(ring.rows)
        for r, i in ring.aside_of.items():
            if start <= r < stop and (r - start) % step == 0:
                hits.append(((r - start) // step, i))
    elif np.ndim(ri) == 0:  # one row
        i = ring.aside_of.get(int(ri))
        if i is None:
            return a
        src = getattr(ring.aside, column)[i][ci]
        out = a.astype(np.result_type(a, src))
        out[...] = src
        return out
    else:
        ri = np.asarray(ri)
        if ri.ndim == 2:  # np.ix_(rows, cols)
            ri, ci = ri[:, 0], np.asarray(ci).reshape(-1)
        elif not isinstance(ci, slice):  # element-wise: (rows[j], cols[j])
            ri, ci = np.broadcast_arrays(ri, np.asarray(ci))
            pairwise = True
        for r, i in ring.aside_of.items():
            pos = np.flatnonzero(ri == r)
            if len(pos):
                hits.append((pos, i))
    if not hits:
        return a
    src = getattr(ring.aside, column)
    out = a.astype(np.result_type(a, src))  # a copy: ``a`` may be a view of a column
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
