"""The time axis the window store's rings share: which bucket each slot holds, when a
bucket is complete, and which buckets a window reads.

Runs in the aggregator actor, under :class:`~ray_monitor.aggregator.windows.WindowStore`;
the rings themselves (what a bucket holds) are :mod:`~ray_monitor.aggregator.rings`.
Each resolution ``(step, slots)`` is a ring of aligned buckets: bucket ``k`` holds times in
``[k*step, (k+1)*step)`` and lives in slot ``k % slots``; one key per slot for all rows
(when the clock enters a new bucket its slot is cleared in every row), so stale slots are
never read. Steps must each be a whole multiple of the previous one.

Held slots. Windows end where data is complete (``WindowStore.window_end``), up to
``lag_s`` behind the clock, while the clock's own bucket already takes a slot. So each
ring holds ``slots + floor(lag_s / step) + 1`` slots (:attr:`Timeline.held`): a window as
long as the ring's span (``step * slots``) then reads every one of its buckets, where with
only ``slots`` it lost its oldest ones to the open bucket. A window still never reads
more than ``slots`` buckets of a ring, so which ring answers and what it reads are as
configured; the extra slots cost ``(lag_s / step + 1) / slots`` more memory (5 of 600 in
the default fine ring).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["EMPTY", "Timeline", "check_resolutions"]

#: Bucket key of a slot never used: below any real one, even before 1970.
EMPTY = -(2 ** 62)


def check_resolutions(resolutions) -> tuple[tuple[float, int], ...]:
    """``(step seconds, slots)`` pairs as floats and ints; raises ``ValueError`` naming the
    pair that is wrong and why."""
    try:
        res = tuple((float(step), int(slots)) for step, slots in resolutions)
    except (TypeError, ValueError):
        raise ValueError("resolutions must be (step seconds, slots) pairs, "
                         f"e.g. ((1.0, 600), (10.0, 360)); got {resolutions!r}") from None
    if not res:
        raise ValueError("resolutions must name at least one (step seconds, slots) pair")
    for i, (step, slots) in enumerate(res):
        if step <= 0 or slots < 1:
            raise ValueError(f"resolutions[{i}] = {resolutions[i]!r}: step must be > 0 "
                             "and slots >= 1")
        if i:
            prev_step, prev_slots = res[i - 1]
            m = step / prev_step
            if m < 2 or abs(m - round(m)) > 1e-9:
                raise ValueError(f"resolutions[{i}]: step {step:g} must be a whole multiple "
                                 f"(>= 2) of the previous step {prev_step:g}")
            if step * slots < prev_step * prev_slots:
                raise ValueError(f"resolutions[{i}]: span {step * slots:g}s must not be "
                                 f"shorter than the previous span {prev_step * prev_slots:g}s")
    return res


class Timeline:
    """The time axis every ring shares: per resolution, the newest bucket the clock has
    entered and the bucket each slot holds; and which buckets a window reads."""

    def __init__(self, resolutions, lag_s: float = 0.0) -> None:
        self.res = check_resolutions(resolutions)
        #: (step, slots held) per resolution: see Held slots above
        self.held = tuple((step, slots + math.floor(lag_s / step + 1e-9) + 1)
                          for step, slots in self.res)
        self.mult = [round(self.res[i + 1][0] / self.res[i][0]) for i in range(len(self.res) - 1)]
        self.cur = [EMPTY] * len(self.res)
        self.keys = [np.full(slots, EMPTY, dtype=np.int64) for _, slots in self.held]
        self.max_time = -math.inf  # newest sample time held: tells if the future is empty
        #: per slot of the finest ring: the store's data version when it was last written
        #: (what a window kept from round to round checks; window_query's _Slide)
        self.written = np.zeros(self.held[0][1], dtype=np.int64)

    @property
    def max_window_s(self) -> float:
        step, slots = self.res[-1]
        return step * slots

    def advance(self, now: float, tables: Sequence) -> None:
        """Moves every ring to the bucket holding ``now``, emptying the slots it reuses."""
        for ri, (step, slots) in enumerate(self.held):
            k = math.floor(now / step)
            cur = self.cur[ri]
            if k <= cur:
                continue
            keys = self.keys[ri]
            rings = [ring for table in tables for ring in table.all_rings(ri)]
            # Compact the bucket the clock leaves, and the one before it: deltas land in
            # the second of their midpoint, so the previous bucket still fills for a while.
            # A bucket is final once it is behind the new one's predecessor: then it is
            # packed (late deltas for older buckets are packed at the next move too).
            for b in (cur - 1, cur):
                if cur != EMPTY and keys[b % slots] == b:
                    for ring in rings:
                        ring.close(b % slots, final=b < k - 1)
            keep = {k % slots, (k - 1) % slots}
            for ring in rings:
                if ring.kind == "histogram" and len(ring.open) > 2:
                    for p in [p for p in ring.open if p not in keep]:
                        ring.close(p, final=True)
            fresh = range(max(cur + 1, k - slots + 1), k + 1)
            reused = [j % slots for j in fresh if keys[j % slots] != EMPTY]
            if reused:
                cols = slice(None) if len(reused) == slots else np.array(reused)
                for ring in rings:
                    ring.clear(slice(None), cols)
            for j in fresh:
                keys[j % slots] = j
            self.cur[ri] = k

    def keeping(self, t: float) -> list[tuple[int, int, int]]:
        """(ring, bucket, slot) of time ``t`` in each resolution that still keeps it."""
        where = []
        for ri, (step, slots) in enumerate(self.held):
            k = math.floor(t / step)
            if k > self.cur[ri] - slots:
                where.append((ri, k, k % slots))
        return where

    def span(self, window_s: float, end: float, fine_only: bool) -> tuple[int, int, int]:
        """(ring, first bucket, last bucket) of the window ``[end - window_s, end)``: the
        buckets starting inside it."""
        for ri, (step, slots) in enumerate(self.res):
            if fine_only or step * slots >= window_s:
                break
        step, slots = self.res[ri]
        b = math.ceil(end / step - 1e-9) - 1
        a = max(math.ceil((end - window_s) / step - 1e-9), b - slots + 1)
        return ri, a, b

    def cover(self, ri: int, a: int, b: int, tail_ok: bool) -> list[tuple[int, int, int]]:
        """Splits buckets [a, b] of ring ``ri`` into runs, using coarser rings where whole
        coarse buckets fit. ``tail_ok``: nothing is held after ``now``, so the coarse
        bucket that holds ``now`` may stand for the fine buckets up to it."""
        if a > b:
            return []
        if ri + 1 >= len(self.res):
            return [(ri, a, b)]
        m = self.mult[ri]
        ja = -(-a // m)
        jb = b // m if tail_ok else (b + 1) // m - 1
        if ja > jb:
            return [(ri, a, b)]
        parts = [(ri, a, ja * m - 1)] if a < ja * m else []
        parts += self.cover(ri + 1, ja, jb, tail_ok)
        if not tail_ok and (jb + 1) * m <= b:
            parts.append((ri, (jb + 1) * m, b))
        return parts

    def columns(self, ri: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Buckets lo..hi of ring ``ri`` that it still holds: (bucket keys, slots)."""
        slots = self.held[ri][1]
        ks = np.arange(max(lo, self.cur[ri] - slots + 1), min(hi, self.cur[ri]) + 1)
        ps = ks % slots
        held = self.keys[ri][ps] == ks
        return ks[held], ps[held]
