"""How the window store packs histogram buckets: 4-byte (index, count) pairs while a bucket
fills, and a complete bucket's cells in 2-byte (index step, count) entries where smaller.

Runs in the aggregator actor, under :mod:`~ray_monitor.aggregator.rings` (which decides
when a bucket is complete and where its cells are held); this module decides only how
(index, count) entries are coded, and never rounds: every form decodes to the same sums
of counts per bucket index. Indices outside int16 (values beyond 2**+-512) are clamped to
the edge; the ring keeps min and max exact.
"""

from __future__ import annotations

import math
from itertools import chain

import numpy as np

from ray_monitor.common.histogram import BASE, Histogram

__all__ = ["GAP8", "PAIR", "bucket_values", "compact", "compact_cells", "entries",
           "histogram_entries", "narrow", "pack_histogram", "unnarrow", "unpack"]

_LOG_BASE = math.log(BASE)
#: A bucket's entry while it fills: int16 index, uint16 count (a count above 65535 takes
#: several entries).
PAIR = np.dtype([("i", "<i2"), ("c", "<u2")])
#: A complete bucket's entry where smaller (see :func:`narrow`).
GAP8 = np.dtype([("g", "u1"), ("c", "u1")])
_MAX_COUNT = 65535


def _split(idx: np.ndarray, cnt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts above 65535 as several entries (bincount adds the pieces back up): (index,
    count, position of each entry's source)."""
    src = np.arange(len(cnt))
    if len(cnt) and cnt.max() > _MAX_COUNT:
        reps = -(-cnt // _MAX_COUNT)
        first = np.repeat(np.cumsum(reps) - reps, reps)
        piece = np.arange(int(reps.sum())) - first
        cnt = np.minimum(np.repeat(cnt, reps) - piece * _MAX_COUNT, _MAX_COUNT)
        idx, src = np.repeat(idx, reps), np.repeat(src, reps)
    return idx, cnt, src


def _encode(idx: np.ndarray, cnt: np.ndarray) -> bytes:
    """(index, count) entries as 4-byte pairs: indices clamped to int16, counts split at
    65535."""
    idx, cnt, _ = _split(np.clip(idx, -32768, 32767), cnt)
    out = np.empty(len(idx), dtype=PAIR)
    out["i"], out["c"] = idx, cnt
    return out.tobytes()


def histogram_entries(h: Histogram) -> np.ndarray:
    """``h``'s (bucket index, count) entries, interleaved in one int64 array."""
    b = h.buckets
    return np.fromiter(chain.from_iterable(b.items()), dtype=np.int64, count=2 * len(b))


def pack_histogram(a: np.ndarray) -> bytes:
    """Interleaved entries (:func:`histogram_entries`) as 4-byte pairs."""
    idx, cnt = a[0::2], a[1::2]
    if len(a) and (cnt.max() > _MAX_COUNT or idx.min() < -32768 or idx.max() > 32767):
        return _encode(idx, cnt)
    return a.astype(np.int16).tobytes()  # same bytes as PAIR: counts wrap into int16's bits


def unpack(b) -> tuple[np.ndarray, np.ndarray]:
    """Packed pairs (bytes or a PAIR array) as (bucket indices, counts)."""
    pairs = np.frombuffer(b, dtype=PAIR) if isinstance(b, bytes) else b
    return pairs["i"].astype(np.int64), pairs["c"].astype(np.int64)


def compact(b: bytes) -> bytes:
    idx, cnt = unpack(b)
    u, inv = np.unique(idx, return_inverse=True)
    return _encode(u, np.bincount(inv.ravel(), weights=cnt).astype(np.int64))


def compact_cells(rows: np.ndarray, lens: np.ndarray,
                   pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells (row, entry count) over ``pairs`` with each row once and each index once per
    row, in row order."""
    tags = np.repeat(rows.astype(np.int64), lens)
    idx, cnt = unpack(pairs)
    u, inv = np.unique(tags * 65536 + (idx + 32768), return_inverse=True)
    total = np.bincount(inv.ravel(), weights=cnt).astype(np.int64)
    uidx, total, src = _split(u % 65536 - 32768, total)
    out = np.empty(len(uidx), dtype=PAIR)
    out["i"], out["c"] = uidx, total
    urows, ulens = np.unique(u[src] // 65536, return_counts=True)
    return urows.astype(np.int32), ulens.astype(np.int32), out


def _small(a: np.ndarray) -> np.ndarray:
    """``a`` (non-negative integers) in the narrowest unsigned type that holds it."""
    top = int(a.max()) if len(a) else 0
    return a.astype(np.uint8 if top < 2 ** 8 else np.uint16 if top < 2 ** 16 else np.uint32)


def narrow(rows: np.ndarray, gen: np.ndarray, lens: np.ndarray, pairs: np.ndarray) -> tuple:
    """A complete bucket's cells (sorted, one entry per row and index) as held in a slot:
    ``(rows, gen, lens, pairs)`` with 4-byte pairs, or, where smaller, ``(rows, gen, lens,
    gaps, first)`` with 2-byte entries (GAP8: the index's step from the row's previous
    entry, and a count up to 255). A step over 255 takes extra entries (255, 0) before, a
    count over 255 extra entries (0, up to 255) after; ``first`` is each row's first index.
    Nothing is rounded: :func:`entries` gives back the same (index, count) sums."""
    n = len(pairs)
    rows, lens = _small(rows), _small(lens)
    if not n:
        return rows, gen, lens, pairs
    idx, cnt = unpack(pairs)
    starts = np.cumsum(lens, dtype=np.int64) - lens
    has = lens > 0
    gap = np.diff(idx, prepend=0)
    gap[starts[has]] = 0
    skips = np.maximum(gap - 1, 0) // 255
    extra = np.maximum(cnt - 1, 0) // 255
    per = 1 + skips + extra
    total = int(per.sum())
    if 2 * total >= PAIR.itemsize * n:
        return rows, gen, lens, pairs
    src = np.repeat(np.arange(n), per)
    pos = np.arange(total) - np.repeat(np.cumsum(per) - per, per)
    sk = skips[src]
    out = np.empty(total, dtype=GAP8)
    out["g"] = np.where(pos < sk, 255, np.where(pos == sk, gap[src] - 255 * sk, 0))
    out["c"] = np.where(pos < sk, 0, np.minimum(cnt[src] - 255 * (pos - sk), 255))
    first = np.zeros(len(lens), dtype=np.int16)
    first[has] = idx[starts[has]]
    lens8 = np.bincount(np.repeat(np.arange(len(lens)), lens), weights=per,
                        minlength=len(lens)).astype(np.int64)
    return rows, gen, _small(lens8), out, first


def entries(held: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A slot's packed cells as (rows, gen, entries per row, bucket index, count) in
    int64, from either form of :func:`narrow` (entries of count 0 are steps only)."""
    rows, gen, lens = held[0].astype(np.int64), held[1], held[2].astype(np.int64)
    if len(held) == 4:
        idx, cnt = unpack(held[3])
        return rows, gen, lens, idx, cnt
    g, cnt = held[3]["g"].astype(np.int64), held[3]["c"].astype(np.int64)
    rowid = np.repeat(np.arange(len(lens)), lens)
    csum = np.cumsum(g)
    before = np.concatenate(([0], csum))[np.cumsum(lens) - lens]  # steps before each row
    idx = held[4].astype(np.int64)[rowid] + csum - before[rowid]
    keep = cnt > 0
    if keep.all():
        return rows, gen, lens, idx, cnt
    lens = np.bincount(rowid[keep], minlength=len(lens)).astype(np.int64)
    return rows, gen, lens, idx[keep], cnt[keep]


def unnarrow(held: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A slot's packed cells as (rows, gen, lens, 4-byte pairs), for merging."""
    rows, gen, lens, idx, cnt = entries(held)
    idx, cnt, src = _split(idx, cnt)
    out = np.empty(len(idx), dtype=PAIR)
    out["i"], out["c"] = idx, cnt
    return rows, gen, np.bincount(np.repeat(np.arange(len(lens)), lens)[src],
                                  minlength=len(lens)).astype(np.int64), out


def bucket_values(idx: np.ndarray) -> np.ndarray:
    """Vectorised :func:`~ray_monitor.common.histogram.bucket_value`."""
    return 2.0 * np.exp((idx + 1) * _LOG_BASE) / (BASE + 1.0)
