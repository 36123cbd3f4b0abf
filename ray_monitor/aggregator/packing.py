"""How the window store packs histogram buckets: 4-byte (index, count) pairs while a bucket
fills, and a complete bucket's cells in one bytes object per slot, in 1- or 2-byte (index
step, count) entries of whichever form is smallest (:data:`GAP_FORMS`), or 4-byte pairs.

Runs in the aggregator actor, under :mod:`~ray_monitor.aggregator.rings` (which decides
when a bucket is complete and where its cells are held); this module decides only how
(index, count) entries are coded, and never rounds: every form decodes to the same sums
of counts per bucket index. Indices outside int16 (values beyond 2**+-512) are clamped to
the edge; the ring keeps min and max exact. A window's read decodes packed slots only as
far as each row's first index and its entries' steps (:class:`Runs`), from which
:mod:`~ray_monitor.aggregator.window_counts` places every entry in its count matrix with
one cumulative sum (a first round's histogram counts: RESULTS.md §30).
"""

from __future__ import annotations

import math
from itertools import chain

import numpy as np

from ray_monitor.common.histogram import BASE, Histogram

__all__ = ["GAP_FORMS", "PAIR", "RICE", "Runs", "bucket_values", "compact", "compact_cells",
           "decode", "decode_runs", "histogram_entries", "narrow", "pack_histogram", "unnarrow",
           "unpack"]

_LOG_BASE = math.log(BASE)
#: A bucket's entry while it fills: int16 index, uint16 count (a count above 65535 takes
#: several entries).
PAIR = np.dtype([("i", "<i2"), ("c", "<u2")])
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


#: Gap forms of a complete bucket's entries: (bits of the index step, bits of the count)
#: in one uint8 or uint16; form ``k`` is ``GAP_FORMS[k - 1]``, form 0 the 4-byte pairs.
GAP_FORMS = ((4, 4), (3, 5), (2, 6), (8, 8), (4, 12), (6, 10))
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _width(top: int) -> int:
    """Bytes of the narrowest unsigned type that holds ``top``."""
    return 1 if top < 2 ** 8 else 2 if top < 2 ** 16 else 4


#: Rice forms: form ``RICE + k`` codes every observation's index step from the previous
#: one in its row as ``k`` low bits and the rest in unary (see :func:`narrow`).
RICE = len(GAP_FORMS) + 1
_RICE_K = 6


def _rows_part(rows: np.ndarray) -> tuple[bytes, int]:
    """A slot's row numbers (sorted, distinct) as bytes, and their width: a bitmap over
    rows ``0..max`` (width 0) where that is smaller than the numbers (a per-series ring
    has most of its rows in every slot)."""
    top = int(rows.max()) if len(rows) else 0
    rw = _width(top)
    if top // 8 + 1 < len(rows) * rw:
        bits = np.zeros(top + 1, dtype=np.uint8)
        bits[rows] = 1
        return np.packbits(bits).tobytes(), 0
    return rows.astype(_UINT[rw]).tobytes(), rw


def _bits_of(v: np.ndarray, k: int) -> bytes:
    """The ``k`` low bits of each value, high bit first, packed."""
    return np.packbits(((v[:, None] >> np.arange(k - 1, -1, -1)) & 1).astype(np.uint8)).tobytes()


def narrow(rows: np.ndarray, lens: np.ndarray, pairs: np.ndarray,
           forms=None) -> tuple[bytes, tuple]:
    """A complete bucket's cells (sorted, one entry per row and index, every row with an
    entry) as one bytes object, and its header ``(form, row width, length bytes, rows,
    row bytes)``.

    The bytes hold the row numbers (or, row width 0, a bitmap of them), each row's entry
    count, then (gap and Rice forms) each row's first index as int16, then the entries:
    4-byte pairs (form 0), or, where smaller, the form that takes the fewest bytes. Gap
    forms (:data:`GAP_FORMS`): each entry is the index's step from the row's previous
    entry and a count (``step << count bits | count``); a step over the form's largest
    takes extra entries (largest, 0) before, a count over its largest extra entries (0, up
    to largest) after. Rice forms (``RICE + k``, few observations spread over many
    indices, as a replica's second of latency): the row's count is its observations, and
    each observation's step from the previous one is coded as its ``k`` low bits (all
    observations' first) and the rest in unary (ones ended by a zero). Nothing is
    rounded: :func:`decode` gives back the same (index, count) sums. ``forms``: the form
    numbers to choose from (all by default; the tests force each)."""
    n = len(pairs)
    idx, cnt = unpack(pairs)
    gap = np.diff(idx, prepend=0)
    starts = np.cumsum(lens, dtype=np.int64) - lens
    gap[starts] = 0
    g1, c1 = np.maximum(gap - 1, 0), np.maximum(cnt - 1, 0)
    allowed = range(RICE + _RICE_K + 1) if forms is None else forms
    best, form, per = (PAIR.itemsize * n, 0, None) if 0 in allowed else (np.inf, 0, None)
    for k, (gb, cb) in enumerate(GAP_FORMS, 1):
        if k not in allowed:
            continue
        p = 1 + g1 // (2 ** gb - 1) + c1 // (2 ** cb - 1)
        size = int(p.sum()) * (gb + cb) // 8 + 2 * len(lens)
        if size < best:
            best, form, per = size, k, p
    obs = int(cnt.sum())
    # Rice forms only where observations are at most twice the entries: a read decodes
    # one entry per observation (a rollup's second of 20 replicas would take 6 times the
    # work of its gap form), and a smaller one needs under 8 observations a byte
    if (obs <= 2 * n or forms is not None) and obs < 8 * best:
        for k in range(_RICE_K + 1):
            if RICE + k not in allowed:
                continue
            size = (obs * k + 7) // 8 + (int((gap >> k).sum()) + obs + 7) // 8 + 2 * len(lens)
            if size < best:
                best, form = size, RICE + k
    head, rw = _rows_part(rows)
    if not form:
        lw = _width(int(lens.max()) if len(lens) else 0)
        return (b"".join((head, lens.astype(_UINT[lw]).tobytes(), pairs.tobytes())),
                (0, rw, lw, len(rows), len(head)))
    first = idx[starts].astype(np.int16)
    if form >= RICE:
        k = form - RICE
        step = np.zeros(obs, dtype=np.int64)  # an entry's first observation steps, the rest 0
        step[np.cumsum(cnt) - cnt] = gap
        q = step >> k
        unary = np.ones(int(q.sum()) + obs, dtype=np.uint8)
        unary[np.cumsum(q + 1) - 1] = 0
        body = (_bits_of(step, k) if k else b"") + np.packbits(unary).tobytes()
        lens8 = np.add.reduceat(cnt, starts) if n else np.zeros(0, dtype=np.int64)
    else:
        gb, cb = GAP_FORMS[form - 1]
        gmax, cmax = 2 ** gb - 1, 2 ** cb - 1
        skips = g1 // gmax
        total = int(per.sum())
        src = np.repeat(np.arange(n), per)
        pos = np.arange(total) - np.repeat(np.cumsum(per) - per, per)
        sk = skips[src]
        g = np.where(pos < sk, gmax, np.where(pos == sk, gap[src] - gmax * sk, 0))
        c = np.where(pos < sk, 0, np.minimum(cnt[src] - cmax * (pos - sk), cmax))
        body = ((g << cb) | c).astype(_UINT[(gb + cb) // 8]).tobytes()
        lens8 = np.add.reduceat(per, starts) if n else np.zeros(0, dtype=np.int64)
    lw = _width(int(lens8.max()) if len(lens8) else 0)
    return (b"".join((head, lens8.astype(_UINT[lw]).tobytes(), first.tobytes(), body)),
            (form, rw, lw, len(rows), len(head)))


def _rice_steps(buf, off: int, obs: int, k: int) -> np.ndarray:
    """The ``obs`` observation steps of a Rice form's entries at ``buf[off:]``."""
    low = np.zeros(obs, dtype=np.int64)
    if k:
        nb = (obs * k + 7) // 8
        bits = np.unpackbits(np.frombuffer(buf, np.uint8, nb, off))[:obs * k].reshape(obs, k)
        low = bits.astype(np.int64) @ (1 << np.arange(k - 1, -1, -1))
        off += nb
    ends = np.flatnonzero(np.unpackbits(np.frombuffer(buf, np.uint8, offset=off)) == 0)[:obs]
    return ((np.diff(ends, prepend=-1) - 1) << k) | low


class Runs:
    """Packed rows' histogram entries, decoded as far as a count matrix needs them: per row
    its number (``rows``) and entry count (``lens``), and either each entry's bucket index
    (``idx``: 4-byte pairs, open cells) or the row's first index and each entry's step
    from the one before (``first``, ``steps``: gap and Rice forms, the step of a row's
    first entry 0), with each entry's count (``counts``; None: 1 each, the Rice forms).
    A gap form's entries that only carry a step have count 0."""

    __slots__ = ("rows", "lens", "counts", "idx", "first", "steps")

    def __init__(self, rows: np.ndarray, lens: np.ndarray, counts, idx=None, first=None,
                 steps=None) -> None:
        self.rows, self.lens, self.counts = rows, lens, counts
        self.idx, self.first, self.steps = idx, first, steps

    def size(self) -> int:
        return len(self.idx if self.idx is not None else self.steps)

    def take(self, ok: np.ndarray) -> "Runs":
        """The rows where ``ok`` (a row's steps start from its own first index)."""
        keep = np.repeat(ok, self.lens)
        return Runs(self.rows[ok], self.lens[ok],
                    None if self.counts is None else self.counts[keep],
                    None if self.idx is None else self.idx[keep],
                    None if self.first is None else self.first[ok],
                    None if self.steps is None else self.steps[keep])

    def _starts(self) -> np.ndarray:
        return np.cumsum(self.lens) - self.lens

    def nonempty(self) -> "Runs":
        """The rows with an entry: :meth:`bounds` and :meth:`keys` take a row's first
        entry at its start, so a row without one (none is packed so) is left out."""
        return self if self.lens.all() else self.take(self.lens > 0)

    def bounds(self) -> tuple[int, int]:
        """The smallest and largest bucket index of the entries (rows with entries only)."""
        if self.idx is not None:
            return int(self.idx.min()), int(self.idx.max())
        starts = self._starts()
        span = np.add.reduceat(self.steps, starts, dtype=np.int64)
        return int((self.first + self.steps[starts]).min()), int((self.first + span).max())

    def keys(self, base: np.ndarray, lo: int) -> np.ndarray:
        """Each entry's place ``base[row] + index - lo`` (``base``: per row), in one pass of
        the steps: a row's first step carries the jump from the previous row's last place,
        so one cumulative sum gives every place (every row has an entry)."""
        if self.idx is not None:
            return np.repeat(base - lo, self.lens) + self.idx
        starts = self._starts()
        key0 = base + self.first - lo  # the place of index ``first``
        out = self.steps.astype(np.int64)
        end = key0 + np.add.reduceat(self.steps, starts, dtype=np.int64)
        out[starts] += key0 - np.concatenate(([0], end[:-1]))
        return np.cumsum(out, out=out)

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bucket index, count, entries per row) of the entries with a count, in int64."""
        if self.idx is not None:
            return self.idx, self.counts, self.lens
        lens = self.lens
        rowid = np.repeat(np.arange(len(lens)), lens)
        csum = np.cumsum(self.steps, dtype=np.int64)
        before = np.concatenate(([0], csum))[np.cumsum(lens) - lens]  # steps before each row
        idx = self.first[rowid] + csum - before[rowid]
        if self.counts is None:
            return idx, np.ones(len(idx), dtype=np.int64), lens
        cnt = self.counts.astype(np.int64)
        keep = cnt > 0
        if not keep.all():
            lens = np.bincount(rowid[keep], minlength=len(lens)).astype(np.int64)
            idx, cnt = idx[keep], cnt[keep]
        return idx, cnt, lens


def decode_runs(helds: list[tuple[bytes, tuple]]) -> list[tuple[Runs, np.ndarray]]:
    """Packed slots (bytes and header from :func:`narrow`) as :class:`Runs`, one per form
    (slots of one form in one pass; Rice forms' steps slot by slot), each with the position
    in ``helds`` of each of its rows."""
    forms: dict[int, list] = {}
    for at, (buf, (form, rw, lw, n, rb)) in enumerate(helds):
        if rw:
            rows = np.frombuffer(buf, _UINT[rw], n)
        else:
            rows = np.flatnonzero(np.unpackbits(np.frombuffer(buf, np.uint8, rb)))
        lens = np.frombuffer(buf, _UINT[lw], n, rb)
        off = rb + n * lw
        if form >= RICE:
            first = np.frombuffer(buf, np.int16, n, off)
            ent = _rice_steps(buf, off + 2 * n, int(lens.sum()), form - RICE)
            form = RICE  # one pass for every k: the steps are decoded
        elif form:
            first = np.frombuffer(buf, np.int16, n, off)
            gb, cb = GAP_FORMS[form - 1]
            ent = np.frombuffer(buf, _UINT[(gb + cb) // 8], offset=off + 2 * n)
        else:
            first, ent = None, np.frombuffer(buf, PAIR, offset=off)
        forms.setdefault(form, []).append((rows, lens, first, ent, np.full(n, at)))
    out = []
    for form, parts in forms.items():
        rows, lens, first, ent, where = (np.concatenate(c) if c[0] is not None else None
                                         for c in zip(*parts))
        rows, lens = rows.astype(np.int64), lens.astype(np.int64)
        if not form:
            idx, cnt = unpack(ent)
            out.append((Runs(rows, lens, cnt, idx=idx), where))
            continue
        first = first.astype(np.int64)
        if form == RICE:
            out.append((Runs(rows, lens, None, first=first, steps=ent), where))
        else:
            cb = GAP_FORMS[form - 1][1]
            out.append((Runs(rows, lens, ent & (2 ** cb - 1), first=first, steps=ent >> cb), where))
    return out


def decode(helds: list[tuple[bytes, tuple]]) -> tuple[np.ndarray, ...]:
    """Packed slots (bytes and header from :func:`narrow`) as (rows, entries per row,
    bucket index, count, position in ``helds`` of each row) in int64, the entries with a
    count only (see :func:`decode_runs`)."""
    out = []
    for runs, where in decode_runs(helds):
        idx, cnt, lens = runs.entries()
        out.append((runs.rows, lens, idx, cnt, where))
    if len(out) == 1:
        return out[0]
    if not out:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty, empty
    return tuple(np.concatenate(c) for c in zip(*out))


def unnarrow(held: tuple[bytes, tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A packed slot as (rows, lens, 4-byte pairs), for merging."""
    rows, lens, idx, cnt, _ = decode([held])
    idx, cnt, src = _split(idx, cnt)
    out = np.empty(len(idx), dtype=PAIR)
    out["i"], out["c"] = idx, cnt
    return rows, np.bincount(np.repeat(np.arange(len(lens)), lens)[src],
                             minlength=len(lens)).astype(np.int64), out


def bucket_values(idx: np.ndarray) -> np.ndarray:
    """Vectorised :func:`~ray_monitor.common.histogram.bucket_value`."""
    return 2.0 * np.exp((idx + 1) * _LOG_BASE) / (BASE + 1.0)
