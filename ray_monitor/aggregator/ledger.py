"""What each replica says it counted, against what this aggregator received from it.

Runs in the aggregator actor (fed by :meth:`~ray_monitor.aggregator.core.AggregatorCore.ingest`).
A replica's snapshots carry deltas and, since this version, its totals since it started
(``ReplicaSnapshot.totals``) and how long its previous flush took (``flush_s``). From
them the ledger decides two things per replica. The requests it counted in all: exact
whatever happened to the aggregator, since a restarted one reads them from the next
snapshot. And whether every snapshot between the first and the last one received was
received exactly once: the totals of the newest snapshot must equal those before the
oldest one plus every delta received; the difference is ``unaccounted`` (lost when
positive, counted twice when negative; snapshots a replica dropped from its full
buffer show here too). And whether a snapshot arrives a second time (:meth:`Ledger.seen`:
a node merger that died after forwarding a delivery but before answering it has the
replica send it again), so the copy is dropped and nothing is counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ray_monitor.common.snapshot import ReplicaIdentity, ReplicaSnapshot

__all__ = ["Ledger", "RECENT_SEQS", "ReplicaLedger"]


@dataclass
class ReplicaLedger:
    identity: ReplicaIdentity
    first_seq: int
    base: dict[str, int]  # totals before the oldest snapshot received
    last_seq: int
    totals: dict[str, int]  # totals of the newest snapshot received
    received: dict[str, int] = field(default_factory=dict)  # sum of the deltas received
    flush_s: Optional[float] = None  # the newest snapshot's report
    flush_max_s: float = 0.0  # the longest flush the replica reported since it started
    recent: set = field(default_factory=set)  # the sequence numbers of the newest snapshots

    def unaccounted(self) -> int:
        keys = set(self.totals) | set(self.base) | set(self.received)
        return sum(self.totals.get(k, 0) - self.base.get(k, 0) - self.received.get(k, 0)
                   for k in keys)


def _deltas(snap: ReplicaSnapshot) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in snap.series:
        key = f"{s.method}\t{s.outcome}"
        out[key] = out.get(key, 0) + s.latency.count
    return out


#: Sequence numbers remembered per replica for :meth:`Ledger.seen`: a copy comes back
#: within a few flushes of the first (the replica's deliveries in flight, at most 8).
RECENT_SEQS = 256


class Ledger:
    """Per replica: totals, deliveries and flush times (see the module docstring)."""

    def __init__(self) -> None:
        self.replicas: dict[str, ReplicaLedger] = {}

    def seen(self, snap: ReplicaSnapshot) -> bool:
        """Whether this replica's snapshot of this sequence number was received before."""
        led = self.replicas.get(snap.identity.replica)
        return led is not None and snap.seq in led.recent

    def add(self, snap: ReplicaSnapshot) -> None:
        totals = getattr(snap, "totals", None)  # absent in older replicas' pickles
        if totals is None:
            return
        deltas = _deltas(snap)
        rid = snap.identity.replica
        led = self.replicas.get(rid)
        if led is None:
            base = {k: totals.get(k, 0) - deltas.get(k, 0) for k in set(totals) | set(deltas)}
            led = self.replicas[rid] = ReplicaLedger(snap.identity, snap.seq, base, snap.seq,
                                                     dict(totals))
        elif snap.seq < led.first_seq:  # an older snapshot arrived late
            led.first_seq = snap.seq
            led.base = {k: totals.get(k, 0) - deltas.get(k, 0) for k in set(totals) | set(deltas)}
        if snap.seq >= led.last_seq:
            led.last_seq, led.totals = snap.seq, dict(totals)
            led.flush_s = getattr(snap, "flush_s", None)
        for k, n in deltas.items():
            led.received[k] = led.received.get(k, 0) + n
        led.recent.add(snap.seq)
        if len(led.recent) > 2 * RECENT_SEQS:  # pruned in steps: adding stays O(1)
            floor = led.last_seq - RECENT_SEQS
            led.recent = {q for q in led.recent if q > floor}
        longest = max(getattr(snap, "flush_s", None) or 0.0, getattr(snap, "flush_max_s", 0.0))
        if longest > led.flush_max_s:
            led.flush_max_s = longest

    def forget(self, replica: str) -> None:
        self.replicas.pop(replica, None)

    def flush_now_max_s(self, alive: set[str]) -> float:
        """The longest flush the replicas in ``alive`` reported last."""
        return max((led.flush_s or 0.0 for rid, led in self.replicas.items() if rid in alive),
                   default=0.0)

    def by_deployment(self) -> dict[str, dict]:
        """``"application/deployment"`` -> totals by ``"method\\toutcome"``, requests
        unaccounted, the longest flush of any replica since it started, replicas."""
        out: dict[str, dict] = {}
        for led in self.replicas.values():
            key = f"{led.identity.application}/{led.identity.deployment}"
            d = out.setdefault(key, {"totals": {}, "unaccounted": 0, "flush_max_s": 0.0,
                                     "replicas": 0})
            for k, n in led.totals.items():
                d["totals"][k] = d["totals"].get(k, 0) + n
            d["unaccounted"] += led.unaccounted()
            d["flush_max_s"] = max(d["flush_max_s"], led.flush_max_s)
            d["replicas"] += 1
        return out
