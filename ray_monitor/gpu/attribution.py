"""Runs in the aggregator, and in the GPU-stats actor once it knows its node's replicas:
the join of GPU processes to the Serve replica that owns each of them.
"""

from __future__ import annotations

import dataclasses

from ray_monitor.common.snapshot import GpuSnapshot, ReplicaIdentity

__all__ = ["attribute_processes"]


def attribute_processes(snapshot: GpuSnapshot, replicas: dict[int, ReplicaIdentity]) -> GpuSnapshot:
    """Sets ``GpuProcess.replica``: the replica whose pid is the process's own or nearest ancestor's.

    ``replicas`` maps pid -> identity and may hold other nodes' replicas too; only those on
    ``snapshot.node_id`` are used, since pids mean nothing across nodes. A process that no
    replica of ``replicas`` owns keeps the replica it was joined to already (a sharded
    monitor joins the other shards' replicas first), else ``replica=None``. The input
    snapshot is left unchanged.
    """
    local = {pid: r for pid, r in replicas.items() if r.node_id == snapshot.node_id}
    processes = []
    for p in snapshot.processes:
        owner = local.get(p.pid)
        if owner is None:
            owner = next((local[a] for a in p.ancestors if a in local), p.replica)
        processes.append(dataclasses.replace(p, replica=owner))
    return dataclasses.replace(snapshot, processes=processes)
