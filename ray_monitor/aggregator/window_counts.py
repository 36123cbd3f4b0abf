"""Per-row histogram bucket counts over a rule's window, and the window kept from round
to round.

Runs in the aggregator actor, under :mod:`~ray_monitor.aggregator.window_query` (which
decides what a window is and what a query means); this module turns the histogram
entries a window holds into per-row counts per bucket index, and keeps a rollup window's
counts between rounds (:class:`SlidingCounts`): a round one second after the last reads
the second that entered the window and the one that left it, not the window's every
bucket (at 3,000 replicas, 600 rollup rows of ~35 buckets a second). Counts are whole
numbers, so added and taken off in any order they are exactly those of a fresh read
(tests/unit/test_window_storage.py compares the two every round).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ray_monitor.aggregator.packing import Runs
from ray_monitor.aggregator.rings import Table
from ray_monitor.aggregator.timeline import Timeline

__all__ = ["SlidingCounts", "bucket_counts", "run_starts", "used_columns", "whole_sums"]

#: Cells of a dense count matrix past which a window indexes only the bucket indices used.
_DENSE_CELLS = 50_000_000


def _within(rows: int, parts: list[Runs]) -> list[Runs]:
    """``parts`` in rows below ``rows`` (rows added since the window was read are not in
    it), those with entries."""
    parts = [r if int(r.rows.max()) < rows else r.take(r.rows < rows)
             for r in parts if len(r.rows)]
    return [r.nonempty() for r in parts if r.size()]


def _bounds(parts: list[Runs]) -> tuple[int, int]:
    bounds = [r.bounds() for r in parts]
    return min(b[0] for b in bounds), max(b[1] for b in bounds)


def _flat_counts(parts: list[Runs], rows: int, width: int, lo: int) -> np.ndarray:
    """Counts per (row, bucket index ``lo + j``), flat, as float64: each entry's place comes
    from one cumulative sum of its run's steps (:meth:`~ray_monitor.aggregator.packing.Runs.keys`),
    not from its bucket index and row spelt out. Counts are whole numbers: exact in any order."""
    d = None
    for r in parts:
        got = np.bincount(r.keys(r.rows * width, lo), weights=r.counts, minlength=rows * width)
        if d is None:
            d = got if got.dtype == np.float64 else got.astype(np.float64)
        else:
            d += got
    return d


def bucket_counts(rows: int, parts: list[Runs]) -> tuple[np.ndarray, int, Optional[np.ndarray]]:
    """Per-row counts of histogram entries (:class:`~ray_monitor.aggregator.packing.Runs`)
    in rows below ``rows``: ``(d, lo, None)`` with ``d[:, j]`` the counts of bucket index
    ``lo + j`` over the whole range of indices (columns without a count included), or,
    where outliers spread that range too wide, ``(d, 0, cols)`` over the indices counted."""
    parts = _within(rows, parts)
    if not parts:
        return np.zeros((rows, 0)), 0, None
    lo, hi = _bounds(parts)
    width = hi - lo + 1
    if rows * width > _DENSE_CELLS:  # index the buckets actually counted
        tags, idx, cnt = (np.concatenate(c) for c in zip(*(_explicit(r) for r in parts)))
        cols, inv = np.unique(idx, return_inverse=True)
        return np.bincount(tags * len(cols) + inv.ravel(), weights=cnt,
                           minlength=rows * len(cols)).reshape(rows, len(cols)), 0, cols
    return _flat_counts(parts, rows, width, lo).reshape(rows, width), lo, None


def _explicit(r: Runs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx, cnt, lens = r.entries()
    return np.repeat(r.rows, lens), idx, cnt


def used_columns(d: np.ndarray, lo: int) -> tuple[np.ndarray, np.ndarray]:
    """The columns of full-range counts with any count, and their bucket indices."""
    used = np.flatnonzero(d.any(axis=0))
    return d[:, used], used + lo


class SlidingCounts:
    """Per-row histogram counts of one window over the finest ring, kept from round to
    round: the next round's window adds the buckets that entered it and takes off those
    that left (counts are whole numbers, so the sums are exact in any order), and a
    rollup row that came or went since starts from nothing (a series coming or going
    leaves its rollup's buckets as they are). A longer window of the same round (the
    300 s after the 60 s) is read afresh, not extended from a copy of the shorter one:
    adding the older buckets to a copy cost more than a fresh read, whose coarse buckets
    cover most of the window (first round at 3,000 replicas 51-70 ms extended, 40-44
    fresh; RESULTS.md §28b). Valid while no bucket it holds was written or emptied since
    (a late delta: the store marks each slot it writes)."""

    __slots__ = ("a", "b", "held", "table_version", "stamp", "d", "lo")

    def __init__(self, a: int, b: int, held: int, table_version: int, stamp: int,
                 d: np.ndarray, lo: int) -> None:
        self.a, self.b, self.held, self.table_version = a, b, held, table_version
        self.stamp, self.d, self.lo = stamp, d, lo

    def nbytes(self) -> int:
        return self.d.nbytes

    def add(self, rows: int, parts: list[Runs], sign: float) -> bool:
        """Adds (``sign`` 1) or takes off (-1) histogram entries; False where the range of
        bucket indices would grow past what a dense matrix holds (then it is rebuilt)."""
        parts = _within(rows, parts)
        if not parts:
            return True
        lo, hi = _bounds(parts)
        width = self.d.shape[1]
        if width:
            lo, hi = min(lo, self.lo), max(hi, self.lo + width - 1)
        if not width or lo < self.lo or hi >= self.lo + width:  # a bucket index new to it
            if rows * (hi - lo + 1) > _DENSE_CELLS:
                return False
            d = np.zeros((rows, hi - lo + 1))
            d[:, self.lo - lo:self.lo - lo + width] = self.d
            self.d, self.lo = d, lo
        width = self.d.shape[1]
        counts = _flat_counts(parts, rows, width, lo).reshape(rows, width)
        if sign > 0:
            self.d += counts
        else:
            self.d -= counts
        return True

    def move(self, tl: Timeline, table: Table, a: int, b: int, rows: int, version: int) -> bool:
        """Moves to the window of buckets ``a..b`` of the finest ring at the store's data
        ``version``; False where it cannot (then the caller reads the window afresh)."""
        # rollups that came or went since hold nothing in the buckets it holds (a new
        # one's data is in entering buckets or marked written, a gone one's was emptied)
        changed = table.rollups.changed_since(self.table_version)
        if self.d.shape[0] > rows or a < self.a \
                or b < self.b or b - self.b > 30 or a > self.b:
            return False
        ks, ps = tl.columns(0, self.a, self.b)
        # every bucket it holds still held, and none written since it was read
        if len(ks) != self.held or (len(ps) and int(tl.written[ps].max()) > self.stamp):
            return False
        if self.d.shape[0] < rows:
            self.d = np.concatenate((self.d, np.zeros((rows - self.d.shape[0], self.d.shape[1]))))
        self.d[changed] = 0.0
        self.table_version = table.rollups.edits
        ring = table.rings[0]
        leave = ps[ks < a]
        _, enter = tl.columns(0, self.b + 1, b)
        if len(enter) and not self.add(rows, ring.runs(enter), 1.0):
            return False
        if len(leave) and not self.add(rows, ring.runs(leave), -1.0):
            return False
        self.a, self.b, self.stamp = a, b, version
        self.held = len(tl.columns(0, a, b)[0])
        return True


def whole_sums(a: np.ndarray) -> np.ndarray:
    """Row sums of a count column as float64. Counts of 1 or 2 bytes (at most 65535 a
    bucket, a few hundred buckets) add up exactly in uint32, twice as fast as float64;
    wider columns (float32/64 after a widen) sum as float64, as every count did before."""
    if a.dtype.kind == "u" and a.dtype.itemsize <= 2 and a.shape[1] <= 65536:
        return a.sum(axis=1, dtype=np.uint32).astype(np.float64)
    return a.sum(axis=1, dtype=np.float64)


def run_starts(a: np.ndarray) -> np.ndarray:
    """Where each run of equal values in the sorted ``a`` starts (np.r_ costs more than
    the comparison at a thousand rules a round)."""
    if not len(a):
        return np.zeros(0, dtype=np.int64)
    edge = np.empty(len(a), dtype=bool)
    edge[0] = True
    np.not_equal(a[1:], a[:-1], out=edge[1:])
    return np.flatnonzero(edge)
