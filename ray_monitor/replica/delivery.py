"""Delivery of replica snapshots to the node's merger (or the aggregator), from the flush thread.

Runs in every replica, on its flush thread; decides nothing about the data, only
where it goes and what happens while the receiver is away. The receiver is the merger
of the replica's own node (:mod:`ray_monitor.node.actor`, found by name), which forwards
the deliveries of all the node's replicas in one call; while the node has none (the
aggregator starts one once the node's first replica delivered), the aggregator itself,
whose answer then says when to look for the merger again.

Fire-and-forget: a batch is sent with ``.remote()`` and not waited on; at the next
round the refs that finished are checked, and a batch whose call failed (the
aggregator died or is restarting) goes back to the front of the buffer to be sent
again. So while the aggregator is away the recorder's bounded buffer holds the
snapshots, and they arrive, in order, once it is back.

Nothing here waits on the network: finding the aggregator by name (a GCS call that
takes a second while the actor restarts) runs on a thread of its own, and the handle
found is kept across restarts (Ray sends its calls to the restarted actor); a failed
call only starts another lookup, for an aggregator that was stopped and created anew.

The aggregator's answer to a batch names the trace ids kept anywhere in the cluster
since this replica's previous batch (see :mod:`ray_monitor.replica.tail`); they go to
``on_kept``, which exports the spans this replica holds of them.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

from ray_monitor.common.names import AGGREGATOR_NAME, NAMESPACE, node_merger_name
from ray_monitor.common.snapshot import ReplicaIdentity, ReplicaSnapshot

__all__ = ["make_sinks"]

logger = logging.getLogger(__name__)

#: Batches sent but not yet acknowledged; past this we wait (the aggregator is slow).
MAX_IN_FLIGHT = 8
LOOKUP_EVERY_S = 2.0


class ActorSink:
    def __init__(self, *, name: str = AGGREGATOR_NAME, namespace: str = NAMESPACE,
                 node_id: Optional[str] = None, application: Optional[str] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        #: With a sharded monitor, the direct receiver is the shard that owns this
        #: application (``name`` is then shard 0's, the aggregator's own name).
        self.application = application
        #: The node merger's name, tried before ``name``; None: always ``name``.
        self.node_name = node_merger_name(node_id) if node_id else None
        self.via_node = False  # whether the handle found is the node merger's
        self.namespace = namespace
        self.clock = clock
        self._actor = None
        self._next_lookup = 0.0
        self._looking = False
        self._in_flight: list[tuple[object, list[ReplicaSnapshot]]] = []
        self._carry: list[ReplicaSnapshot] = []  # failed batches a raising send() kept
        #: Gets the trace ids kept anywhere since the last batch (flush thread).
        self.on_kept: Optional[Callable[[list[str]], Any]] = None
        self.kept_cursor: Optional[tuple[str, int]] = None  # the aggregator's (epoch, seq)
        self._kept_failed = False
        self._old_aggregator = False  # its ingest takes no cursor: no kept ids from it

    def _lookup(self, again: bool = False):
        """The receiver's handle as last found; starts a lookup on another thread when
        there is none yet (or ``again``, after a failed call), at most every 2 s."""
        if (self._actor is None or again) and not self._looking \
                and self.clock() >= self._next_lookup:
            self._looking = True
            self._next_lookup = self.clock() + LOOKUP_EVERY_S
            threading.Thread(target=self._find, name="ray-monitor-lookup", daemon=True).start()
        return self._actor

    def _find(self) -> None:
        import ray

        try:
            if self.node_name is not None:
                try:
                    self._actor = ray.get_actor(self.node_name, namespace=self.namespace)
                    self.via_node = True
                    return
                except ValueError:  # the node has no merger (yet): the aggregator
                    pass
            self._actor = ray.get_actor(self._direct_name(), namespace=self.namespace)
            self.via_node = False
            self._old_aggregator = False  # found anew: it may be a newer one
        except Exception:  # not started (yet), or Ray is going away: keep buffering
            pass
        finally:
            self._looking = False

    def _direct_name(self) -> str:
        """The aggregator this replica delivers to without a merger: its application's
        shard (the shard count is read from the GCS, on the lookup thread)."""
        if self.application is None or self.name != AGGREGATOR_NAME:
            return self.name
        from ray_monitor.common.shards import load_count, shard_name, shard_of

        return shard_name(shard_of(self.application, load_count()))

    def send(self, snapshots: list[ReplicaSnapshot]) -> list[ReplicaSnapshot]:
        import ray

        retry: list[ReplicaSnapshot] = []
        if self._in_flight:
            refs = [r for r, _ in self._in_flight]
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            done_set = set(done)
            still = []
            for ref, batch in self._in_flight:
                if ref not in done_set:
                    still.append((ref, batch))
                    continue
                try:
                    reply = ray.get(ref, timeout=0)
                except Exception:
                    retry.extend(batch)  # the call failed: deliver again, in order
                    self._lookup(again=True)
                    continue
                self._take_reply(reply)
            self._in_flight = still
        # Batches whose call failed go first; the caller keeps ``snapshots`` when this
        # raises, so those taken back from in flight are kept here until sent.
        retry, self._carry = self._carry + retry, []
        pending = retry + snapshots
        if not pending or len(self._in_flight) >= MAX_IN_FLIGHT:
            return pending
        actor = self._lookup()
        if actor is None:
            return pending
        try:
            ref = self._ingest(actor, pending)
        except Exception:
            self._carry = retry
            self._lookup(again=True)
            raise
        self._in_flight.append((ref, pending))
        return []

    def _ingest(self, actor, pending: list[ReplicaSnapshot]):
        # Without Ray's task events: a call a second from every replica would be as many
        # task records a second for the GCS and Ray's task list (1,000 replicas: 1,000 a
        # second), recorded in the replica first; our own counts say what was delivered.
        ingest = actor.ingest.options(enable_task_events=False)
        if not self._old_aggregator:
            try:
                return ingest.remote(pending, self.kept_cursor)
            except TypeError:  # an aggregator from before kept traces (it is detached)
                self._old_aggregator = True
        return ingest.remote(pending)

    def _take_reply(self, reply: Any) -> None:
        """``{"epoch", "seq", "kept"}`` from the receiver (None from an aggregator that
        predates it); ``"merger": True`` from the aggregator once this node has a merger."""
        if not isinstance(reply, dict) or "seq" not in reply:
            return
        if reply.get("merger") and not self.via_node and self.node_name is not None:
            self._lookup(again=True)  # the node's merger started: deliver through it
        self.kept_cursor = (reply.get("epoch"), reply["seq"])
        kept = reply.get("kept")
        if kept and self.on_kept is not None:
            try:
                self.on_kept(kept)
            except Exception as e:  # never in the way of delivery
                if not self._kept_failed:
                    self._kept_failed = True
                    logger.warning("ray-monitor: exporting the spans of kept traces failed "
                                   "(logged once): %r", e)


def make_sinks(identity: ReplicaIdentity, *, on_failure: Optional[Callable] = None
               ) -> tuple[Optional[ActorSink], Optional[Callable]]:
    """The aggregator sink when Ray is up, and the OTLP metrics export when an
    endpoint is configured (on a thread of its own; its failures go to ``on_failure``)."""
    sink = None
    try:
        import ray

        if ray.is_initialized():
            sink = ActorSink(node_id=identity.node_id or None,
                             application=identity.application)
    except ImportError:  # pragma: no cover
        pass
    from ray_monitor.replica.otlp_metrics import OtlpMetrics, otlp_metrics_configured

    on_flush = OtlpMetrics(identity, on_failure=on_failure) if otlp_metrics_configured() \
        else None
    from ray_monitor.replica.local_sink import with_local_socket

    return with_local_socket(sink, identity.node_id, on_failure=on_failure), on_flush
