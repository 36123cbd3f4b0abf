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
from typing import Any, Optional

import ray

from ray_monitor.common.names import AGGREGATOR_NAME, NAMESPACE
from ray_monitor.common.node_socket import session_dir, socket_path
from ray_monitor.common.shards import load_count, shard_name, split_by_shard
from ray_monitor.node.local_socket import LocalServer
from ray_monitor.node.merger import MAX_SNAPSHOTS, Delivery, NodeMerger

__all__ = ["GATHER_S", "NodeMergerActor", "RETRY_S"]

log = logging.getLogger(__name__)

#: How long a forward waits after the first delivery that wakes it: replicas flush on
#: the same whole second, so their deliveries arrive within a few milliseconds of each
#: other and one forward per flush carries all of them.
GATHER_S = 0.05
#: How long a failed forward waits before the next try (the aggregator is restarting).
RETRY_S = 1.0


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
        delivery = Delivery(list(snaps), kept_since, asyncio.get_running_loop().create_future())
        for old in self.merger.add(delivery):
            if not old.waiter.done():
                old.waiter.set_result(self.merger.dropped_reply(old))
        self._wake.set()
        return await delivery.waiter

    async def _forward_loop(self) -> None:
        # One call per aggregator shard per forward (one shard: one call), the shards'
        # calls at once: each shard's part is kept, given back and retried on its own, so
        # a shard that is away holds back only the deliveries of its applications.
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._gather_s:
                await asyncio.sleep(self._gather_s)
            while len(self.merger):
                batch, taken = self.merger.take()
                shards = await self._shard_count()
                parts = sorted(split_by_shard(taken, _application, shards).items())
                if len(parts) == 1:
                    failed = [await self._forward(parts[0][0], parts[0][1], batch)]
                else:
                    failed = await asyncio.gather(*(self._forward(shard, deliveries)
                                                    for shard, deliveries in parts))
                failed = [f for f in failed if f]
                if failed:
                    for deliveries in reversed(failed):  # back to the front, in order
                        self.merger.give_back(deliveries)
                    await asyncio.sleep(RETRY_S)

    async def _forward(self, shard: int, deliveries: list, snaps: Optional[list] = None
                       ) -> Optional[list]:
        """One shard's part of a forward; returns its deliveries when the call failed."""
        if snaps is None:
            snaps = [s for d in deliveries for s in d.snaps]
        try:
            sink = await self._aggregator(shard)
            reply = await sink.ingest_node.remote(snaps, self._cursors.get(shard),
                                                 self.merger.report())
        except Exception as e:  # away or restarting: keep them, try again
            self._sinks.pop(shard, None)
            self._shards = None  # a stop() and start() may have changed it
            self._log_once(f"forward:{type(e).__name__}", e)
            return deliveries
        if isinstance(reply, dict) and "seq" in reply:
            self._cursors[shard] = (reply.get("epoch"), reply["seq"])
        self.merger.answered(reply)
        for d in deliveries:
            if not d.waiter.done():  # a replica that went away cancelled its wait
                d.waiter.set_result(self.merger.reply(d))
        return None

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
        """This merger's counters (what every forward reports too)."""
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
