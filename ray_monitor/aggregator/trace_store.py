"""The aggregator's traces of slow and failed requests, grouped by trace id, bounded.

Runs in the aggregator actor (the CLI and ``Monitor.traces`` use its checks of ``kind``
and ``limit``). It decides which spans are kept and for how long. Replicas send span
records (:func:`ray_monitor.replica.tracing.span_record`) in their snapshots. A trace is
kept once one of its spans failed (kind ``errors``) or was slower than its deployment's
``slow_threshold_s`` (kind ``slow``); from then on every span of it that arrives, from any
replica, joins it, up to ``max_spans`` per trace. Head-sampled ok spans are context: they
wait ``pending_s`` in a bounded pending area for a kept span of their trace (another
replica's flush may bring it a second later) and are dropped if none comes.

Bounds, independent of traffic: the newest ``max_traces`` traces of each kind (the
oldest out), ``max_spans`` per trace, ``max_pending_spans`` context spans waiting.

:class:`KeptLog` (in :mod:`ray_monitor.common.kept_log`, which node mergers use too) is
where whole-request tail keeping meets (see :mod:`ray_monitor.replica.tail`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Iterable, Optional

from ray_monitor.common.kept_log import KeptLog
from ray_monitor.common.snapshot import ReplicaIdentity

__all__ = ["KINDS", "KeptLog", "MAX_LIMIT", "TraceStore", "check_kind", "check_limit",
           "error_text", "tree_order"]

KINDS = ("errors", "slow")
MAX_TRACES = 500
MAX_SPANS_PER_TRACE = 32
MAX_PENDING_SPANS = 5000
PENDING_S = 30.0
MAX_LIMIT = 500


class _Trace:
    __slots__ = ("spans", "start", "dropped")

    def __init__(self) -> None:
        self.spans: dict[str, dict] = {}  # span id -> record
        self.start = float("inf")
        self.dropped = 0


def _kinds(rec: dict) -> list[str]:
    return [k for k, hit in (("errors", rec.get("status") == "error"),
                             ("slow", bool(rec.get("slow")))) if hit]


def check_kind(kind: Optional[str]) -> Optional[str]:
    """``errors``, ``slow``, or None (``all``) for both; anything else is refused."""
    if kind in (None, "", "all"):
        return None
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is unknown; use one of {list(KINDS)} (or leave it "
                         "out for both)")
    return kind


def check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit={limit!r}: expected a whole number from 1 to {MAX_LIMIT}")
    return limit


class TraceStore:
    def __init__(self, *, max_traces: int = MAX_TRACES, max_spans: int = MAX_SPANS_PER_TRACE,
                 max_pending_spans: int = MAX_PENDING_SPANS, pending_s: float = PENDING_S,
                 clock: Callable[[], float] = time.time) -> None:
        for name, v in (("max_traces", max_traces), ("max_spans", max_spans),
                        ("max_pending_spans", max_pending_spans)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TraceStore({name}={v!r}): expected a whole number >= 1")
        if not pending_s > 0:
            raise ValueError(f"TraceStore(pending_s={pending_s!r}): expected seconds above 0")
        self.max_traces = max_traces
        self.max_spans = max_spans
        self.max_pending_spans = max_pending_spans
        self.pending_s = float(pending_s)
        self.clock = clock
        self._traces: dict[str, _Trace] = {}
        # kind -> trace ids, in the order they became that kind (oldest first)
        self._order: dict[str, OrderedDict[str, None]] = {k: OrderedDict() for k in KINDS}
        # trace id -> (first seen, context records) for traces not kept (yet)
        self._pending: OrderedDict[str, tuple[float, list[dict]]] = OrderedDict()
        self._pending_spans = 0
        # ids kept by another aggregator shard (its replicas hold the failed or slow
        # span): this store keeps their context spans too, the newest max_traces
        self._elsewhere: OrderedDict[str, None] = OrderedDict()
        self.received = 0
        self.dropped = 0  # spans over a trace's max_spans
        self.expired = 0  # context spans whose trace was never kept

    # -- ingestion ------------------------------------------------------------------

    def add(self, records: Iterable[dict], identity: Optional[ReplicaIdentity] = None,
            now: Optional[float] = None) -> None:
        """Span records of one replica; ``identity`` says where they ran."""
        now = self.clock() if now is None else now
        for rec in records:
            self.received += 1
            if identity is not None:
                rec["application"] = identity.application
                rec["deployment"] = identity.deployment
                rec["replica"] = identity.replica
                rec["model_version"] = identity.model_version
            tid = rec["trace_id"]
            kinds = _kinds(rec)
            t = self._traces.get(tid)
            if t is None and (kinds or tid in self._elsewhere):
                t = self._traces[tid] = _Trace()
                waiting = self._pending.pop(tid, None)
                if waiting is not None:
                    self._pending_spans -= len(waiting[1])
                    for r in waiting[1]:
                        self._put(t, r)
            if t is None:
                self._hold(tid, rec, now)
                continue
            self._put(t, rec)
            for kind in kinds:
                order = self._order[kind]
                if tid not in order:
                    order[tid] = None
                    if len(order) > self.max_traces:
                        self._forget(order.popitem(last=False)[0])
        self._expire(now)

    def adopt(self, trace_ids: Iterable[str]) -> None:
        """Traces kept on another aggregator shard: their spans here (held, or still to
        come) are kept too, so the front can show each such trace whole."""
        for tid in trace_ids:
            if tid in self._elsewhere:
                continue
            self._elsewhere[tid] = None
            if len(self._elsewhere) > self.max_traces:
                self._forget(self._elsewhere.popitem(last=False)[0])
            waiting = self._pending.pop(tid, None)
            if waiting is not None:
                self._pending_spans -= len(waiting[1])
                t = self._traces.setdefault(tid, _Trace())
                for r in waiting[1]:
                    self._put(t, r)

    def parts(self, trace_ids: Iterable[str]) -> list[dict]:
        """The views of those of ``trace_ids`` this store holds, kept here or elsewhere."""
        return [self.view(tid) for tid in dict.fromkeys(trace_ids) if tid in self._traces]

    def _put(self, t: _Trace, rec: dict) -> None:
        sid = rec["span_id"]
        if sid not in t.spans and len(t.spans) >= self.max_spans:
            # A failed or slow span is worth more than context: it takes a context span's place.
            victim = next((k for k, r in t.spans.items() if not r.get("kept")), None) \
                if rec.get("kept") else None
            t.dropped += 1
            self.dropped += 1
            if victim is None:
                return
            del t.spans[victim]
        t.spans[sid] = rec  # a snapshot delivered twice replaces, never duplicates
        t.start = min(t.start, rec["start"])

    def _hold(self, tid: str, rec: dict, now: float) -> None:
        entry = self._pending.get(tid)
        if entry is None:
            entry = self._pending[tid] = (now, [])
        if len(entry[1]) >= self.max_spans:
            self.expired += 1
            return
        entry[1].append(rec)
        self._pending_spans += 1
        while self._pending_spans > self.max_pending_spans:
            _, (_, old) = self._pending.popitem(last=False)
            self._pending_spans -= len(old)
            self.expired += len(old)

    def _expire(self, now: float) -> None:
        while self._pending:
            tid, (seen, recs) = next(iter(self._pending.items()))
            if now - seen <= self.pending_s:
                return
            del self._pending[tid]
            self._pending_spans -= len(recs)
            self.expired += len(recs)

    def _forget(self, tid: str) -> None:
        if not any(tid in order for order in self._order.values()) \
                and tid not in self._elsewhere:
            self._traces.pop(tid, None)

    # -- views ----------------------------------------------------------------------

    def traces(self, kind: Optional[str] = None, limit: int = 50) -> list[dict]:
        """Kept traces of ``kind`` (None: both), newest first, each with its spans in
        tree order (``depth`` 0 for a span whose parent is not in the trace)."""
        kind = check_kind(kind)
        limit = check_limit(limit)
        ids = set(self._order[kind]) if kind else set(self._traces)
        newest = sorted(ids, key=lambda tid: self._traces[tid].start, reverse=True)[:limit]
        return [self.view(tid) for tid in newest]

    def view(self, tid: str) -> dict:
        t = self._traces[tid]
        spans = tree_order(list(t.spans.values()))
        ours = [s for s in spans if s.get("source") == "ray_monitor"]
        root = min(ours or spans, key=lambda s: s["start"])
        failed = [s for s in spans if s.get("status") == "error"]
        # The span that failed first is where the error began; callers only pass it on.
        first = min(failed, key=lambda s: s["start"] + s["duration_s"]) if failed else None
        return {"trace_id": tid, "kinds": [k for k in KINDS if tid in self._order[k]],
                "start": root["start"], "duration_s": root["duration_s"],
                "root": root["name"], "application": root.get("application", ""),
                "deployment": root.get("deployment", ""),
                "error": None if first is None else error_text(first),
                "error_deployment": None if first is None else first.get("deployment", ""),
                "span_count": len(spans), "spans_dropped": t.dropped, "spans": spans}

    def stats(self) -> dict:
        return {"traces": len(self._traces),
                **{f"traces_{k}": len(o) for k, o in self._order.items()},
                "spans": sum(len(t.spans) for t in self._traces.values()),
                "pending_spans": self._pending_spans, "spans_received": self.received,
                "spans_dropped": self.dropped, "spans_expired": self.expired}


def error_text(span: dict) -> str:
    exc = span.get("exception")
    if exc and exc.get("type"):
        return f"{exc['type']}: {exc.get('message', '')}"
    status = (span.get("attributes") or {}).get("http.response.status_code")
    return span.get("status_message") or (f"HTTP {status}" if status else "error")


def tree_order(spans: list[dict]) -> list[dict]:
    """Parents before their children, siblings by start time; each span gets ``depth``."""
    by_id = {s["span_id"]: s for s in spans}
    children: dict[str, list[dict]] = {}
    roots = []
    for s in sorted(spans, key=lambda s: s["start"]):
        parent = s.get("parent_span_id")
        if parent and parent in by_id and parent != s["span_id"]:
            children.setdefault(parent, []).append(s)
        else:
            roots.append(s)
    out: list[dict] = []
    seen: set[str] = set()
    stack = [(s, 0) for s in reversed(roots)]
    while stack:
        s, depth = stack.pop()
        if s["span_id"] in seen:
            continue
        seen.add(s["span_id"])
        out.append({**s, "depth": depth})
        stack.extend((c, depth + 1) for c in reversed(children.get(s["span_id"], ())))
    # A parent cycle (corrupt ids) leaves spans unreached: show them rather than lose them.
    out.extend({**s, "depth": 0} for s in spans if s["span_id"] not in seen)
    return out
