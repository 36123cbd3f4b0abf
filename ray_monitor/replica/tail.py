"""Whole-request tail keeping: a replica holds its unexported spans for a few seconds, so a
request kept anywhere is exported everywhere.

Runs in every replica: the request path holds spans and notes kept traces; the flush
thread hands the kept trace ids to the aggregator and exports what the aggregator names.

A span that was not head-sampled and ended fast and ok is not exported when it ends, yet
another span of the same request may fail or be slow elsewhere, before or after it (the
model fails and the ingress catches it and answers 200; the ingress is slow after a fast
model call). So such spans wait in a bounded ring (a ``collections.deque``: appending is
one atomic step, no lock on the request path), and the trace ids this replica keeps
itself (a failed or slow span) go to the aggregator with the next snapshot. The
aggregator hears from every replica; it answers each delivery with the trace ids kept
anywhere since that replica's previous one (:class:`~ray_monitor.aggregator.trace_store.
KeptLog`), and the replica then exports the spans it holds of those traces, with their
real ids and times, to the OTLP backend and to the aggregator's copy. A backend takes
spans of one trace arriving seconds apart; the whole request is there about two flush
intervals after its last span ended.

Bounds: ``capacity`` spans held (about 0.5 KB each); when the ring turns over faster
than ``MIN_HOLD_S`` the replica says so, counted as ``trace_buffer_short`` (raise
``RAY_MONITOR_TRACE_HOLD_SPANS``); at most ``max_kept`` kept trace ids per snapshot.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Iterable

__all__ = ["DEFAULT_CAPACITY", "HeldRecord", "MAX_KEPT_PER_FLUSH", "MIN_HOLD_S", "TailBuffer"]

#: Spans held per monitored deployment in a replica, by default.
DEFAULT_CAPACITY = 4096
#: Kept trace ids a replica reports per snapshot; more are dropped and counted.
MAX_KEPT_PER_FLUSH = 1000
#: The ring should hold spans at least this long: the kept ids of other replicas reach
#: this one about two flush intervals after their spans ended.
MIN_HOLD_S = 5.0


class HeldRecord:
    """A span already exported to OTLP (head-sampled; or Ray Serve's), whose record for
    the aggregator waits here until its request is known to be kept."""

    __slots__ = ("trace_id", "end_ns", "done", "record")

    def __init__(self, record: dict) -> None:
        self.trace_id = int(record["trace_id"], 16)
        self.end_ns = time.time_ns()
        self.done = False
        self.record = record


class TailBuffer:
    """The held spans (``tracing.RequestSpan`` with ``end_ns`` set, or
    :class:`HeldRecord`) and the trace ids kept here."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, *,
                 max_kept: int = MAX_KEPT_PER_FLUSH) -> None:
        for name, v in (("capacity", capacity), ("max_kept", max_kept)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TailBuffer({name}={v!r}): expected a count >= 1")
        self.capacity = capacity
        self.max_kept = max_kept
        self._ring: collections.deque = collections.deque(maxlen=capacity)
        self._kept: dict[int, None] = {}  # insertion-ordered, each id once
        self._kept_dropped = 0
        self._lock = threading.Lock()  # kept ids only: rare, never around user code

    # -- request path ---------------------------------------------------------------

    def hold(self, rs: Any) -> None:
        self._ring.append(rs)

    def hold_record(self, record: dict) -> None:
        self._ring.append(HeldRecord(record))

    def kept(self, trace_id: int) -> None:
        """This replica kept a span of ``trace_id`` (failed or slow)."""
        with self._lock:
            if trace_id in self._kept:
                return
            if len(self._kept) < self.max_kept:
                self._kept[trace_id] = None
            else:
                self._kept_dropped += 1

    # -- flush thread ---------------------------------------------------------------

    def drain(self, now_ns: int | None = None) -> tuple[list[str], dict[str, int]]:
        """The trace ids kept here since the last drain (hex, each once), and what went
        wrong since (cause -> count)."""
        with self._lock:
            ids, dropped = self._kept, self._kept_dropped
            self._kept, self._kept_dropped = {}, 0
        drops = {"trace_kept_ids_dropped:buffer_full": dropped} if dropped else {}
        if self.short(now_ns):
            drops["trace_buffer_short"] = 1
        return [f"{t:032x}" for t in ids], drops

    def short(self, now_ns: int | None = None) -> bool:
        """Whether the ring is full and its oldest span ended less than ``MIN_HOLD_S`` ago."""
        ring = self._ring
        if len(ring) < self.capacity:
            return False
        try:
            oldest = ring[0]
        except IndexError:  # pragma: no cover - emptied meanwhile
            return False
        now_ns = time.time_ns() if now_ns is None else now_ns
        return (now_ns - oldest.end_ns) < MIN_HOLD_S * 1e9

    def take(self, trace_ids: Iterable[int]) -> list[Any]:
        """The held spans of ``trace_ids`` not taken before; each is taken once."""
        wanted = trace_ids if isinstance(trace_ids, (set, frozenset)) else set(trace_ids)
        if not wanted:
            return []
        out = []
        for rs in self._ring.copy():  # a C-level copy: appends cannot interleave with it
            if rs.trace_id in wanted and not rs.done:
                rs.done = True
                out.append(rs)
        return out

    def __len__(self) -> int:
        return len(self._ring)
