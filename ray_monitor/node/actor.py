"""The node merger actor: one per node with monitored replicas, pinned there.

Runs in its own Ray actor process on its node; the aggregator starts and forgets these
(:class:`~ray_monitor.aggregator.node_mergers.NodeMergerManager`), and the replicas of
the node find it by name (:func:`~ray_monitor.common.names.node_merger_name`). Plumbing
only: what a forward carries and what is kept is decided by
:class:`~ray_monitor.node.merger.NodeMerger`. Everything runs on the actor's event loop:
``ingest`` queues a replica's delivery and waits for the forward that carries it; one
forward is in flight at a time, so the aggregator receives each replica's snapshots in
the order the replica sent them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

import ray

from ray_monitor.common.names import AGGREGATOR_NAME, NAMESPACE
from ray_monitor.common.node_socket import session_dir, socket_path
from ray_monitor.common.shards import load_count, shard_name, split_by_shard
from ray_monitor.common.snapshot import ReplicaSnapshot
from ray_monitor.node.local_socket import LocalServer
from ray_monitor.node.merger import MAX_SNAPSHOTS, Delivery, NodeMerger

__all__ = ["FORWARD_TIMEOUT_S", "GATHER_S", "NodeMergerActor", "REPORT_EVERY_S", "RETRY_S"]

log = logging.getLogger(__name__)

#: How long a forward waits after the first delivery that wakes it: replicas flush on
#: the same whole second, so their deliveries arrive within a few milliseconds of each
#: other and one forward per flush carries all of them.
GATHER_S = 0.05
#: How long a failed forward waits before the next try (the aggregator is restarting).
RETRY_S = 1.0
#: A forward not answered in this long counts as failed (sent again; the aggregator drops
#: what arrives twice by replica and sequence number).
FORWARD_TIMEOUT_S = 5.0
#: Sharded, how often at least a merger's counters reach shard 0, which alone exposes
#: them, when none of its node's replicas' applications is shard 0's (a forward of none).
REPORT_EVERY_S = 5.0


@ray.remote(num_cpus=0)
class NodeMergerActor:
    """Takes the deliveries of its node's replicas (``ingest``, the aggregator's own
    signature) and forwards them, merged, with ``aggregator.ingest_node``.

    ``sink`` is the aggregator's actor name in ``namespace``, looked up when first
    needed and again after a failed forward (a name, not a handle: Ray warns about
    handles as constructor arguments of restartable actors).
    """

    def __init__(self, *, node_id: str, sink: str = AGGREGATOR_NAME,
                 namespace: str = NAMESPACE, gather_s: float = GATHER_S,
                 max_snapshots: int = MAX_SNAPSHOTS) -> None:
        if not isinstance(sink, str) or not sink:
            raise ValueError(f"sink must be the aggregator's actor name, got {sink!r}")
        if isinstance(gather_s, bool) or not isinstance(gather_s, (int, float)) \
                or not 0 <= gather_s < 1:
            raise ValueError(f"gather_s must be seconds in [0, 1), got {gather_s!r}")
        self.merger = NodeMerger(node_id, max_snapshots=max_snapshots)
        self._sink_name = sink
        self._namespace = namespace
        self._gather_s = float(gather_s)
        self._sinks: dict[int, Any] = {}  # aggregator shard -> handle (see _aggregator)
        self._shards: Optional[int] = None  # the monitor's shard count, read from the GCS
        self._cursors: dict[int, Any] = {}  # each shard's kept-traces (epoch, seq)
        self._out: dict[int, asyncio.Task] = {}  # each shard's forward in flight
        self._reported = time.monotonic()  # when shard 0 last took a forward (and counters)
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._failed: set[str] = set()  # causes already logged
        # The replicas' cheap way in (a Unix socket; Ray calls stay the fallback).
        self._local = LocalServer(socket_path(session_dir(), node_id), self.ingest,
                                  self.merger.socket_counts)
        try:  # Ray runs an async actor's __init__ on its event loop: listen from the start
            self._ensure_loop()
        except RuntimeError:  # no running loop here: at the first call then
            pass

    def _ensure_loop(self) -> None:
        self._local.ensure()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._forward_loop())

    async def ingest(self, snaps: list, kept_since: Any = None) -> dict:
        """A replica's delivery; answered once the aggregator took it (see NodeMerger)."""
        self._ensure_loop()
        bad = next((s for s in snaps if not isinstance(s, ReplicaSnapshot)), None)
        if bad is not None:  # refused here, not inside the forward loop that serves all
            raise TypeError(f"a delivery holds ReplicaSnapshot objects only, got "
                            f"{type(bad).__name__}")
        delivery = Delivery(list(snaps), kept_since, asyncio.get_running_loop().create_future())
        for old in self.merger.add(delivery):
            if not old.waiter.done():
                old.waiter.set_result(self.merger.dropped_reply(old))
        self._wake.set()
        return await delivery.waiter

    async def _forward_loop(self) -> None:
        # One forward per aggregator shard at a time (one shard: one call), the shards'
        # forwards side by side: a shard's part is sent, kept, given back and retried on
        # its own, so a shard that is away (or slow: a call past FORWARD_TIMEOUT_S counts
        # as failed) holds back only the deliveries of its applications, and each shard
        # still receives a replica's snapshots in the order sent.
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._gather_s:
                await asyncio.sleep(self._gather_s)
            if not len(self.merger):
                continue
            batch, taken = self.merger.take()
            try:
                shards = await self._shard_count()
                parts = sorted(split_by_shard(taken, _application, shards).items())
            except Exception as e:  # never lose what was taken, never end the loop
                self._log_once(f"split:{type(e).__name__}", e)
                self.merger.give_back(taken)
                await asyncio.sleep(RETRY_S)
                self._wake.set()
                continue
            if shards > 1 and 0 not in self._out and all(shard for shard, _ in parts) \
                    and time.monotonic() - self._reported >= REPORT_EVERY_S:
                parts.insert(0, (0, []))  # nothing for shard 0: the counters all the same
            held = []
            for shard, deliveries in parts:
                if shard in self._out:  # its previous forward is still out: the next one
                    held.extend(deliveries)
                else:
                    snaps = batch if len(parts) == 1 else None
                    self._out[shard] = asyncio.get_running_loop().create_task(
                        self._forward(shard, deliveries, snaps))
            if held:
                self.merger.give_back(held, failed=False)

    async def _forward(self, shard: int, deliveries: list, snaps: Optional[list] = None) -> None:
        """One shard's part of a forward; a failed one goes back to the front of the queue
        and its shard waits RETRY_S before its next forward."""
        if snaps is None:
            snaps = [s for d in deliveries for s in d.snaps]
        try:
            try:
                sink = await self._aggregator(shard)
                # a shard Ray is restarting answers late rather than failing: bounded, so
                # the replicas' deliveries are answered (or sent again) and the ledger
                # drops whatever a late call still delivers twice
                reply = await asyncio.wait_for(
                    sink.ingest_node.remote(snaps, self._cursors.get(shard),
                                            self.merger.report(shard)), FORWARD_TIMEOUT_S)
            except Exception as e:  # away, restarting or slow: keep them, try again
                self._sinks.pop(shard, None)
                self._shards = None  # a stop() and start() may have changed it
                self._log_once(f"forward:{type(e).__name__}", e)
                self.merger.give_back(deliveries, shard=shard)
                await asyncio.sleep(RETRY_S)
                return
            if isinstance(reply, dict) and "seq" in reply:
                self._cursors[shard] = (reply.get("epoch"), reply["seq"])
            if shard == 0:
                self._reported = time.monotonic()
            self.merger.answered(reply, shard)
            for d in deliveries:
                if not d.waiter.done():  # a replica that went away cancelled its wait
                    d.waiter.set_result(self.merger.reply(d))
        finally:
            self._out.pop(shard, None)
            if len(self.merger) and self._wake is not None:
                self._wake.set()  # what waited for this shard's slot, or arrived meanwhile

    async def _shard_count(self) -> int:
        if self._shards is None:  # a GCS call: off the event loop
            self._shards = await asyncio.to_thread(load_count)
        return self._shards

    async def _aggregator(self, shard: int = 0) -> Any:
        """The aggregator (shard) that owns ``shard``'s applications, found by name."""
        sink = self._sinks.get(shard)
        if sink is None:  # a GCS call: off the event loop
            name = self._sink_name if shard == 0 else shard_name(shard)
            sink = self._sinks[shard] = await asyncio.to_thread(
                ray.get_actor, name, namespace=self._namespace)
        return sink

    async def stats(self) -> dict:
        """This merger's counters (each forward reports its shard's part of them)."""
        return self.merger.report()

    def running_node_id(self) -> str:
        """The node this actor actually runs on (for checking the pinning)."""
        return ray.get_runtime_context().get_node_id()

    def _log_once(self, cause: str, exc: BaseException) -> None:
        if cause not in self._failed:
            self._failed.add(cause)
            log.warning("ray-monitor node merger: %s (%r); logged once", cause, exc)


def _application(delivery: Delivery) -> Optional[str]:
    """The application of a delivery: one replica's snapshots, all of one application."""
    return delivery.snaps[0].identity.application if delivery.snaps else None
