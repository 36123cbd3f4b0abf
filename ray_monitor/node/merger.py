"""What a node merger holds between its replicas' deliveries and its one call upstream.

Runs in the node merger actor (:mod:`ray_monitor.node.actor`), one per node with monitored
replicas, and in unit tests. It decides what one forward carries, in what order, what is
kept while the aggregator is away and what is dropped past the bound.

Every delivery of a replica (a list of its snapshots) waits here, in arrival order, until
the next forward takes them all: one call to the aggregator per node per flush instead of
one per replica. A delivery is answered only once the aggregator took the forward that
carried it, so a replica keeps its snapshots (and sends them again) until they are
really upstream: a merger that dies loses nothing that a replica does not send again,
and the aggregator drops the copies it already had (see
:meth:`~ray_monitor.aggregator.ledger.Ledger.seen`). A forward that fails goes back to
the front, in order. While the aggregator is away each replica has at most a few
deliveries waiting here (it buffers the rest itself); past ``max_snapshots`` the oldest
deliveries are answered as dropped and counted (``dropped``), and the ledger shows the
gap in the replicas' totals.

A sharded monitor gets one forward per shard with deliveries per flush; ``forwards`` and
``forward_failures`` count those calls, per shard too, and each shard is told its own
(:meth:`NodeMerger.report`). The node's counters (deliveries, snapshots, drops, the
socket's) go to shard 0 only (at least every few seconds, in a forward of nothing when
shard 0 has no deliveries of this node), so the front's ``/metrics`` has each of them once.

The aggregator's answer names the trace ids kept anywhere since this merger's cursor;
they go into a local :class:`~ray_monitor.common.kept_log.KeptLog`, from which each
replica's answer names the ids since its own cursor.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Optional

from ray_monitor.common.kept_log import KeptLog

__all__ = ["Delivery", "MAX_SNAPSHOTS", "NodeMerger"]

#: Snapshots a merger holds at most while the aggregator is away (about 8 deliveries of
#: a few snapshots from each of hundreds of replicas fit well under it).
MAX_SNAPSHOTS = 50_000


class Delivery:
    """One replica call: its snapshots, its kept-traces cursor, and whoever waits for the answer."""

    __slots__ = ("snaps", "cursor", "waiter")

    def __init__(self, snaps: list, cursor: Any, waiter: Any = None) -> None:
        self.snaps = snaps
        self.cursor = cursor
        self.waiter = waiter


class NodeMerger:
    """Deliveries in arrival order, taken whole by each forward (see the module docstring)."""

    def __init__(self, node_id: str, *, max_snapshots: int = MAX_SNAPSHOTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(max_snapshots, int) or isinstance(max_snapshots, bool) \
                or max_snapshots < 1:
            raise ValueError(f"max_snapshots must be a positive int, got {max_snapshots!r}")
        self.node_id = node_id
        self.max_snapshots = max_snapshots
        self._pending: deque[Delivery] = deque()
        self._held = 0  # snapshots in _pending
        self.kept = KeptLog(clock=clock)
        self.cursor: Optional[tuple] = None  # the aggregator's (epoch, seq) last answered
        self.calls = 0  # deliveries received
        self.snapshots = 0  # snapshots received
        self.forwards = 0  # forward calls the aggregator took (one per shard per flush)
        self.forward_failures = 0
        self.by_shard: dict[int, dict[str, int]] = {}  # shard -> its forwards and failures
        self.dropped = 0  # snapshots dropped past max_snapshots
        #: Deliveries over the node's Unix socket and its refusals (node/local_socket.py).
        self.socket_counts: dict[str, int] = {}

    @property
    def held(self) -> int:
        """Snapshots waiting for a forward."""
        return self._held

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, delivery: Delivery) -> list[Delivery]:
        """Queues a delivery; returns the oldest ones dropped to stay within the bound
        (the caller answers them with :meth:`dropped_reply`)."""
        self.calls += 1
        self.snapshots += len(delivery.snaps)
        self._pending.append(delivery)
        self._held += len(delivery.snaps)
        out = []
        while self._held > self.max_snapshots and len(self._pending) > 1:
            old = self._pending.popleft()
            self._held -= len(old.snaps)
            self.dropped += len(old.snaps)
            out.append(old)
        return out

    def take(self) -> tuple[list, list[Delivery]]:
        """Everything waiting, as one batch in arrival order, and the deliveries it holds."""
        taken = list(self._pending)
        self._pending.clear()
        self._held = 0
        return [s for d in taken for s in d.snaps], taken

    def _shard(self, shard: int) -> dict[str, int]:
        counts = self.by_shard.get(shard)
        if counts is None:
            counts = self.by_shard[shard] = {"forwards": 0, "forward_failures": 0}
        return counts

    def give_back(self, taken: list[Delivery], failed: bool = True, shard: int = 0) -> None:
        """A forward to ``shard`` failed (or, ``failed=False``, waits for its shard's
        forward in flight): its deliveries go back to the front, in their order."""
        if failed:
            self.forward_failures += 1
            self._shard(shard)["forward_failures"] += 1
        self._pending.extendleft(reversed(taken))
        self._held += sum(len(d.snaps) for d in taken)

    def answered(self, reply: Any, shard: int = 0) -> None:
        """The aggregator (``shard``) took a forward; ``reply`` is its
        ``{"epoch", "seq", "kept"}``."""
        self.forwards += 1
        self._shard(shard)["forwards"] += 1
        if isinstance(reply, dict) and "seq" in reply:
            self.cursor = (reply.get("epoch"), reply["seq"])
            kept = reply.get("kept")
            if kept:
                self.kept.add(kept)

    def reply(self, delivery: Delivery) -> dict:
        """The answer to a delivery the aggregator took: kept ids since its cursor."""
        out = self.kept.reply(delivery.cursor)
        out["merger"] = True
        return out

    def dropped_reply(self, delivery: Delivery) -> dict:
        """The answer to a delivery dropped past the bound: the replica must not send it
        again (it would only be dropped again); the ledger shows it missing."""
        out = self.reply(delivery)
        out["dropped"] = len(delivery.snaps)
        return out

    def report(self, shard: Optional[int] = None) -> dict:
        """What travels with each forward to ``shard``, for its counters of this node: the
        node's own counters to shard 0 only (else a sharded ``/metrics`` would sum them
        once per shard), and that shard's forwards. ``None``: everything, with the
        forwards of every shard under ``by_shard`` (the merger's ``stats()``)."""
        if shard is not None and shard > 0:
            return {"node_id": self.node_id, **self._shard(shard)}
        out = {"node_id": self.node_id, "calls": self.calls, "snapshots": self.snapshots,
               "forwards": self.forwards, "forward_failures": self.forward_failures,
               "dropped": self.dropped, "held": self._held, **self.socket_counts}
        if shard == 0:
            out.update(self._shard(0))
        else:
            out["by_shard"] = {str(k): dict(v) for k, v in sorted(self.by_shard.items())}
        return out
