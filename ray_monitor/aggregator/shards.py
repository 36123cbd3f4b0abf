"""The front of a sharded monitor: shard 0 gathering the other aggregators' answers.

Runs in the aggregator actors when ``StartConfig.shards > 1``. Shard 0 keeps the one HTTP
API, ``/metrics`` and alert view; every other shard owns the applications that hash to
it (:func:`~ray_monitor.common.shards.shard_of`) and answers shard 0's calls with its own
part. This module decides how those parts become one answer (the pure ``merge_*`` and
``route_feedback`` functions), how shard 0 reaches the others (:class:`ShardFront`), and
how the trace ids that replicas kept reach every shard (:class:`KeptExchange`), so a
trace that crosses applications on different shards is still exported whole.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections import deque
from typing import Any, Callable, Iterable, Optional, Sequence

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from ray_monitor.common.names import NAMESPACE
from ray_monitor.common.shards import shard_name

__all__ = ["CALL_TIMEOUT_S", "GpuRelay", "KeptExchange", "NODE_FAMILIES", "RELAY_EVERY_S",
           "REROUTE_MAX", "SELF_PREFIX", "ShardFront", "front_feedback", "gpu_share",
           "ingest_gpu_share", "merge_families", "merge_feedback", "merge_groups",
           "merge_stats", "merge_traces", "reroute_held", "route_feedback"]

log = logging.getLogger(__name__)

#: How long shard 0 waits for another shard's part of an answer; a shard that does not
#: answer in time is left out of that answer and shown as ``ray_monitor_self_shard_up 0``
#: (under Prometheus' default 10 s scrape timeout, so the scrape itself still succeeds).
CALL_TIMEOUT_S = 5.0
#: How long shard 0 gathers GPU samples before passing them on to another shard (one
#: call per shard and second, :class:`GpuRelay`).
RELAY_EVERY_S = 1.0
#: The monitor's own metrics: every shard has them, so they get a ``shard`` label.
SELF_PREFIX = "ray_monitor_self_"
#: The node mergers' own counters: reported to shard 0 only (a node's, not a shard's;
#: :meth:`~ray_monitor.node.merger.NodeMerger.report`), so taken from shard 0 alone.
NODE_FAMILIES = frozenset({SELF_PREFIX + "ingest_calls_socket",
                           SELF_PREFIX + "node_snapshots_dropped"})


def merge_families(per_shard: Sequence[Optional[Iterable[Metric]]]) -> list[Metric]:
    """One exposition from the shards' metric families (index = shard; None: no answer).

    The shards' series are disjoint (each owns its applications), so a family's samples
    are concatenated under one HELP/TYPE; the monitor's own metrics get a ``shard`` label,
    except the node mergers' counters (:data:`NODE_FAMILIES`), shard 0's alone; a sample
    two shards both have (e.g. a series about the cluster as a whole) is kept once,
    shard 0's. ``ray_monitor_self_shard_up`` says which shards answered."""
    out: dict[str, Metric] = {}
    seen: set[tuple] = set()
    up = GaugeMetricFamily(SELF_PREFIX + "shard_up", "Whether each aggregator shard "
                           "answered this scrape (1) or is left out of it (0).",
                           labels=["shard"])
    for index, families in enumerate(per_shard):
        up.add_metric([str(index)], 0.0 if families is None else 1.0)
        for fam in families or ():
            if index and fam.name in NODE_FAMILIES:
                continue
            mine = fam.name.startswith(SELF_PREFIX)
            merged = out.get(fam.name)
            if merged is None:
                merged = out[fam.name] = Metric(fam.name, fam.documentation, fam.type,
                                                getattr(fam, "unit", ""))
            for s in fam.samples:
                if mine:
                    s = s._replace(labels={**s.labels, "shard": str(index)})
                key = (s.name, tuple(sorted(s.labels.items())))
                if key in seen:
                    continue
                seen.add(key)
                merged.samples.append(s)
    out[up.name] = up
    return list(out.values())


def merge_traces(per_shard: Sequence[Iterable[dict]], limit: int) -> list[dict]:
    """The kept traces of every shard, newest first, at most ``limit``; a trace whose
    spans reached several shards (it crossed their applications) is shown once, whole."""
    from ray_monitor.aggregator.trace_store import KINDS, error_text, tree_order

    by_id: dict[str, list[dict]] = {}
    seen: set[tuple] = set()
    for traces in per_shard:
        for t in traces:
            key = (t["trace_id"], tuple(sorted(s.get("span_id") or "" for s in t["spans"])))
            if key not in seen:  # the same shard's part, asked for twice
                seen.add(key)
                by_id.setdefault(t["trace_id"], []).append(t)
    out = []
    for tid, parts in by_id.items():
        if len(parts) == 1:
            out.append(parts[0])
            continue
        spans = {}
        for p in parts:
            for s in p["spans"]:
                spans.setdefault(s.get("span_id") or id(s), dict(s))
        for s in spans.values():
            s.pop("depth", None)
        ordered = tree_order(list(spans.values()))
        ours = [s for s in ordered if s.get("source") == "ray_monitor"]
        root = min(ours or ordered, key=lambda s: s["start"])
        failed = [s for s in ordered if s.get("status") == "error"]
        first = min(failed, key=lambda s: s["start"] + s["duration_s"]) if failed else None
        kinds = {k for p in parts for k in p["kinds"]}
        out.append({"trace_id": tid, "kinds": [k for k in KINDS if k in kinds],
                    "start": root["start"], "duration_s": root["duration_s"],
                    "root": root["name"], "application": root.get("application", ""),
                    "deployment": root.get("deployment", ""),
                    "error": None if first is None else error_text(first),
                    "error_deployment": None if first is None else first.get("deployment", ""),
                    "span_count": len(ordered),
                    "spans_dropped": sum(p.get("spans_dropped", 0) for p in parts),
                    "spans": ordered})
    out.sort(key=lambda t: t["start"], reverse=True)
    return out[:limit]


def merge_groups(per_shard: Sequence[Optional[dict]]) -> dict:
    """``{json of a group's labels: value}`` of every shard, as one. Groups that include
    ``application`` are disjoint; a group two shards both answer (a query not grouped by
    application: each shard's part of it) is kept per shard, its key given a ``shard``
    label, never summed into a number that means something else for each function."""
    seen: dict = {}  # key -> the shards that answer it
    for index, groups in enumerate(per_shard):
        for key in groups or {}:
            seen.setdefault(key, []).append(index)
    out: dict = {}
    for index, groups in enumerate(per_shard):
        for key, value in (groups or {}).items():
            if len(seen[key]) > 1:  # every part labelled: none reads as the whole
                labels = json.loads(key)
                labels["shard"] = str(index)
                key = json.dumps(labels, sort_keys=True)
            out[key] = value
    return out


def merge_stats(per_shard: Sequence[Optional[dict]]) -> dict:
    """Shard 0's stats with the cluster's totals (``ingested``, ``replicas``, ``delivery``
    per deployment) and each shard's own under ``shards`` (None: it did not answer)."""
    out = dict(per_shard[0])
    out["delivery"] = dict(out.get("delivery") or {})
    for other in per_shard[1:]:
        if not other:
            continue
        for k in ("ingested", "replicas"):
            out[k] = out.get(k, 0) + other.get(k, 0)
        out["delivery"].update(other.get("delivery") or {})
    out["shards"] = list(per_shard)
    return out


def route_feedback(items: Sequence[Any], known: Sequence[Iterable[str]]
                   ) -> dict[int, list[int]]:
    """Which shard gets each feedback item (by index): the first whose ``known`` request
    ids hold its request id (that shard has the prediction), else shard 0, which holds it
    for a late prediction and hands it on once its shard has it (:func:`reroute_held`)."""
    owners: dict[str, int] = {}
    for index, rids in enumerate(known):
        for rid in rids:
            owners.setdefault(rid, index)
    out: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        rid = item.get("request_id") if isinstance(item, dict) else None
        out.setdefault(owners.get(rid, 0) if isinstance(rid, str) else 0, []).append(i)
    return out


async def front_feedback(core: Any, front: "ShardFront", items: list) -> dict:
    """Shard 0's answer to a batch of feedback: each item to the shard that holds its
    prediction (:func:`route_feedback`), the answers merged; the rest held on shard 0."""
    rids = [it.get("request_id") for it in items if isinstance(it, dict)]
    known = [core.quality.join.known(rids)] + \
        [k or [] for k in await front.gather("known_requests", rids, True)]
    parts = []
    for shard, indices in sorted(route_feedback(items, known).items()):
        part = [items[i] for i in indices]
        if shard == 0:
            res = await core.feedback_async(part)
        else:  # an owner that went away since: shard 0 holds them for late predictions
            try:
                res = await front.call(shard, "feedback", part, True)
            except Exception:
                res = await core.feedback_async(part)
        parts.append((indices, res))
    return merge_feedback(parts)


#: Held feedback ids shard 0 asks the other shards about per round, at most (oldest first).
REROUTE_MAX = 20_000


async def reroute_held(join: Any, front: Any) -> int:
    """Shard 0's held feedback (no prediction anywhere when it came) to the shard that
    has its prediction now: asked each round while held (``early_grace_s``), so
    feedback sent before its prediction reached the monitor joins on whichever shard
    owns the application, as on one aggregator. What the owner does not take stays
    held here (counted unknown after the grace, once). Returns the items moved."""
    rids = join.held_ids(REROUTE_MAX)
    if not rids:
        return 0
    known = await front.gather("known_requests", rids, True)
    moved = 0
    for shard, ids in sorted(route_feedback(
            [{"request_id": r} for r in rids], [()] + [k or () for k in known]).items()):
        if shard == 0:  # no shard has it yet (or it is ours and joins here)
            continue
        released = join.release(rids[i] for i in ids)
        items = [{"request_id": rid, **({"label": label} if label is not None
                                        else {"value": value})}
                 for rid, _, label, value in released]
        try:
            await front.call(shard, "feedback", items, True)
        except Exception:  # away: held here again, asked again next round
            join.hold(released)
            continue
        moved += len(items)
    return moved


def gpu_share(snap: Any, own: dict, mine: Callable[[str], bool]) -> Any:
    """The part of a node's GPU sample (already joined to every shard's replicas by shard
    0) that another shard ingests: its replicas joined afresh (``own``: pid -> identity),
    no devices (shard 0 keeps the device series), and only the processes on GPUs that one
    of its applications (``mine``) uses, the other replicas there included, so each
    replica's share of a GPU is the same on every shard. Ingested even when empty: the
    next sample's interval runs from this one."""
    from ray_monitor.gpu.attribution import attribute_processes

    snap = attribute_processes(snap, own)
    lost = {d.uuid for d in snap.devices if d.lost}
    used = {p.gpu_uuid for p in snap.processes
            if p.replica is not None and mine(p.replica.application)}
    return dataclasses.replace(snap, devices=[], processes=[
        p for p in snap.processes if p.gpu_uuid in used and p.gpu_uuid not in lost])


def ingest_gpu_share(core: Any, batch: list, mine: Callable[[str], bool]) -> None:
    """Another shard's handling of the GPU samples shard 0 passed on (:func:`gpu_share`):
    ``(sample, since)`` pairs, oldest first; ``since``: the time of the node's previous
    sample (this shard is passed only the samples that concern it,
    :meth:`GpuRelay.targets`)."""
    own = {i.pid: i for i, _ in core.replicas.values()}
    for snap, since in batch:
        try:
            core.store.ingest_gpu(gpu_share(snap, own, mine), since=since)
        except Exception as e:  # one bad sample never stops the next
            core.count_error("aggregator", f"ingest_gpu_failed:{type(e).__name__}", e)


def merge_feedback(parts: Sequence[tuple[list[int], dict]], limit: int = 100) -> dict:
    """One answer from the shards' answers to their parts of a batch: counts summed, the
    problems' ``index`` put back to the item's place in the whole batch."""
    counts: dict[str, int] = {}
    problems: list[dict] = []
    omitted = 0
    for indices, res in parts:
        for status, n in res.get("counts", {}).items():
            counts[status] = counts.get(status, 0) + n
        for p in res.get("problems", []):
            p = dict(p)
            if isinstance(p.get("index"), int) and 0 <= p["index"] < len(indices):
                p["index"] = indices[p["index"]]
            problems.append(p)
        omitted += res.get("problems_omitted", 0)
    problems.sort(key=lambda p: p.get("index", 0))
    omitted += max(0, len(problems) - limit)
    out: dict[str, Any] = {"counts": counts, "problems": problems[:limit]}
    if omitted:
        out["problems_omitted"] = omitted
    return out


class ShardFront:
    """Shard 0's handles on the other shards, found by name off the event loop and found
    again after a failed call (a shard that Ray restarts keeps its name)."""

    def __init__(self, shards: int, *, namespace: str = NAMESPACE,
                 timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.shards = shards
        self.namespace = namespace
        self.timeout_s = timeout_s
        self._handles: dict[int, Any] = {}
        self._failed: set[str] = set()

    async def handle(self, index: int) -> Any:
        h = self._handles.get(index)
        if h is None:
            import ray

            h = await asyncio.to_thread(ray.get_actor, shard_name(index),
                                        namespace=self.namespace)
            self._handles[index] = h
        return h

    async def call(self, index: int, method: str, *args: Any) -> Any:
        """Shard ``index``'s answer to ``method(*args)``; raises when it does not answer."""
        try:
            h = await self.handle(index)
            return await asyncio.wait_for(getattr(h, method).remote(*args), self.timeout_s)
        except Exception as e:
            self._handles.pop(index, None)
            cause = f"{method}:{type(e).__name__}"
            if cause not in self._failed:
                self._failed.add(cause)
                log.warning("ray-monitor: shard %d did not answer %s (%r); logged once per "
                            "cause", index, method, e)
            raise

    async def gather(self, method: str, *args: Any) -> list[Any]:
        """The other shards' answers to ``method(*args)``, index 1.. (None: no answer)."""
        async def one(i: int) -> Any:
            try:
                return await self.call(i, method, *args)
            except Exception:
                return None
        return list(await asyncio.gather(*(one(i) for i in range(1, self.shards))))


class KeptExchange:
    """A shard's (index > 0) share of the cluster's kept trace ids, traded with shard 0.

    Each round, the ids this shard's replicas reported since the last trade go to shard 0
    (``outgoing``), whose log is the cluster's; its answer, the ids kept anywhere since
    this shard's cursor, goes into this shard's own log (``incoming``), so replicas that
    deliver here hear of traces kept on every shard, one round later. Ids that came from
    shard 0 are never sent back, and one already logged is not logged twice."""

    def __init__(self, *, remember: int = 20000) -> None:
        self.pushed_seq = 0  # this shard's log, up to where it was sent
        self.cursor: Optional[tuple] = None  # shard 0's (epoch, seq) last answered
        self._known: set[str] = set()
        self._order: deque[str] = deque()
        self._remember = remember
        self.traded = 0

    def _note(self, tid: str) -> None:
        self._known.add(tid)
        self._order.append(tid)
        while len(self._order) > self._remember:
            self._known.discard(self._order.popleft())

    def outgoing(self, kept_log: Any) -> tuple[list[str], int]:
        """The ids ``kept_log`` took from replicas since the last trade, minus those that
        came from shard 0, and the log's number to record once the trade succeeded."""
        ids = kept_log.reply((kept_log.epoch, self.pushed_seq))["kept"]
        return [t for t in ids if t not in self._known], kept_log.seq

    def incoming(self, kept_log: Any, reply: Any, sent: Iterable[str] = (),
                 upto: Optional[int] = None) -> list[str]:
        """A trade succeeded: ``sent`` (from :meth:`outgoing`, up to ``upto``) reached
        shard 0, and its answer ``{"epoch", "seq", "kept"}`` goes into this shard's log.
        Returns the ids new here (kept elsewhere). (A failed trade calls nothing: the
        same ids go out again next time.)"""
        for t in sent:
            self._note(t)
        if upto is not None:
            self.pushed_seq = max(self.pushed_seq, upto)
        if not isinstance(reply, dict) or "seq" not in reply:
            return []
        self.cursor = (reply.get("epoch"), reply["seq"])
        new = [t for t in reply.get("kept") or () if t not in self._known]
        for t in new:
            self._note(t)
        if new:
            before = kept_log.seq
            kept_log.add(new)
            if self.pushed_seq == before:  # what we just logged is not ours to send
                self.pushed_seq = kept_log.seq
        self.traded += 1
        return new


class GpuRelay:
    """Shard 0's GPU samples, joined to every shard's replicas, passed on to the other
    shards whose replicas use the node's GPUs, which count their GPU time
    (:func:`gpu_share`): gathered for ``every_s``, one call per shard (not one per node
    sample and shard: 300 Ray calls a second from shard 0 at 100 nodes and 4 shards)."""

    def __init__(self, front: "ShardFront", *, max_pending: int = 10_000,
                 every_s: float = RELAY_EVERY_S) -> None:
        self.front = front
        self.pids: dict[str, dict[int, Any]] = {}  # node -> pid -> another shard's replica
        self.max_pending = max_pending
        self.every_s = every_s
        self._last: dict[str, float] = {}  # node -> time of its previous sample
        self._pending: dict[int, list] = {}  # shard -> [(sample, since)], oldest first
        self._tasks: dict[int, asyncio.Task] = {}  # shard -> its pass in the making

    async def refresh(self) -> None:
        """The other shards' replicas, asked again (at the aggregator's reconcile)."""
        pids: dict[str, dict[int, Any]] = {}
        for part in await self.front.gather("replica_identities", True):
            for ident in part or ():
                pids.setdefault(ident.node_id, {})[ident.pid] = ident
        self.pids = pids

    def joined(self, snap: Any, own: dict) -> Any:
        """``snap`` with its processes joined to every shard's replicas (``own``: shard
        0's, pid -> identity, which win)."""
        from ray_monitor.gpu.attribution import attribute_processes

        return attribute_processes(snap, {**self.pids.get(snap.node_id, {}), **own})

    def targets(self, snap: Any) -> list[int]:
        """The other shards that ``snap`` (joined) concerns: those whose applications have
        a process on its GPUs. Every other shard while a process is not joined (a replica
        of the last 3 s that only its own shard knows yet, or no replica: its shard
        cannot be told), so no GPU time is missed; the rest would ingest nothing."""
        from ray_monitor.common.shards import shard_of

        n = self.front.shards
        if any(p.replica is None for p in snap.processes):
            return list(range(1, n))
        return sorted({shard_of(p.replica.application, n) for p in snap.processes} - {0})

    def send(self, snap: Any) -> bool:
        """Queues ``snap`` for :meth:`targets`, passed on within ``every_s`` without
        waiting (a shard away must not hold shard 0's GPU samples), with the time of the
        node's previous sample, which that shard may not have had (its interval starts
        there). False when a target has ``max_pending`` samples queued (this one is not
        sent: the next one's interval covers it). A shard that is away loses the
        intervals of the samples it did not take."""
        targets = self.targets(snap)
        if any(len(self._pending.get(i, ())) >= self.max_pending for i in targets):
            return False
        since = self._last.get(snap.node_id)
        self._last[snap.node_id] = snap.time
        for i in targets:
            self._pending.setdefault(i, []).append((snap, since))
            task = self._tasks.get(i)
            if task is None or task.done():  # else it takes this one after its call
                self._tasks[i] = asyncio.get_running_loop().create_task(self._pass(i))
        return True

    async def _pass(self, index: int) -> None:
        while self._pending.get(index):
            await asyncio.sleep(self.every_s)
            batch = self._pending.pop(index, [])
            try:
                await self.front.call(index, "ingest_gpu", batch, True)
            except Exception:  # logged once by the front
                pass
