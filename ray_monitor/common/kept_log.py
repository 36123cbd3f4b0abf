"""The trace ids replicas kept, numbered, named back to every replica with its next answer.

Runs in the aggregator (the cluster's log) and in every node merger (a relay of the
aggregator's log to the replicas of its node, so a replica that delivers through its
node still hears of every trace kept anywhere). It decides which ids an answer names:
those logged after the asker's cursor.
"""

from __future__ import annotations

import bisect
import time
import uuid
from typing import Any, Callable, Iterable

__all__ = ["KeptLog"]


class KeptLog:
    """Trace ids kept by any replica, numbered as they arrive, the newest ``max_ids``.

    A replica's delivery carries the trace ids it kept and the ``(epoch, seq)`` of the
    answer it last had; :meth:`reply` names every id logged since. A replica that has
    had no answer yet (it just started, or its first answer is still on the way) gets
    the ids of the last ``first_s`` seconds: the requests it served before asking; after
    an aggregator restart (another epoch) it gets all the log holds. At most
    ``max_reply`` ids per answer, the newest; a replica that falls further behind misses
    the older ones (counted in ``missed``). An answer costs what it names, not what the
    log holds.
    """

    def __init__(self, *, max_ids: int = 20000, max_reply: int = 2000, first_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_ids = max_ids
        self.max_reply = max_reply
        self.first_s = first_s
        self.clock = clock
        self.epoch = uuid.uuid4().hex[:12]
        self._ids: list[str] = []  # the number of _ids[i] is _base + 1 + i
        self._times: list[float] = []  # when each arrived, in order
        self._base = 0
        self.seq = 0
        self.missed = 0

    def add(self, trace_ids: Iterable[str]) -> None:
        now = self.clock()
        for tid in trace_ids:
            if isinstance(tid, str) and len(tid) == 32:
                self._ids.append(tid)
                self._times.append(now)
                self.seq += 1
        excess = len(self._ids) - self.max_ids
        if excess > self.max_ids // 4:  # trimmed in steps, so adding stays O(1) on average
            del self._ids[:excess], self._times[:excess]
            self._base += excess

    def reply(self, cursor: Any = None) -> dict:
        """``{"epoch", "seq", "kept"}``: the ids after ``cursor`` (``(epoch, seq)``)."""
        out: dict[str, Any] = {"epoch": self.epoch, "seq": self.seq, "kept": []}
        if isinstance(cursor, (tuple, list)) and len(cursor) == 2:
            since = cursor[1] if cursor[0] == self.epoch and isinstance(cursor[1], int) else 0
        else:  # no answer yet: what was kept while it served its first requests
            since = self._base + bisect.bisect_left(self._times, self.clock() - self.first_s)
        if since >= self.seq:
            return out
        start = max(since, self._base, self.seq - self.max_reply)
        self.missed += start - since
        out["kept"] = list(dict.fromkeys(self._ids[start - self._base:]))
        return out
