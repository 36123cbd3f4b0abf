"""GPU-seconds attributed to Serve replicas, and what they cost at the rule file's prices.

Runs in the aggregator actor: :meth:`~ray_monitor.aggregator.windows.WindowStore.ingest_gpu`
hands each GPU sample of a node (its processes already joined to replicas by
:mod:`ray_monitor.gpu.attribution`) to :func:`feed_gpu_seconds`, with the interval the
sample stands for (the time since the node's previous sample, at most 60 s; 1 s for a
node's first).

Attribution: a GPU's interval is shared equally by the replicas that have a process on it
(two replicas with ``num_gpus=0.5`` each get half; a replica with processes on two GPUs
gets both). A GPU that no replica uses, or that fell off the bus, is attributed to nobody.
A MIG device counts as one GPU. The result is the counter ``replica_gpu_seconds`` per
(node, gpu, uuid, application, deployment, replica).

Cost: each replica's GPU-seconds times its deployment's GPU price
(:func:`~ray_monitor.alerting.prices.gpu_price_for`: the model its responses named last,
then the deployment's name, then ``*``), added to ``cost`` with ``part="gpu"`` and
``tenant=""`` (GPU time is the deployment's, not a tenant's), next to the tokens' part.

Sharded (``StartConfig.shards``), each shard counts and prices the GPU time of its own
applications' replicas (``TenantBook.gpu_owner``), from the samples shard 0 passes on
(:func:`~ray_monitor.aggregator.shards.gpu_share`): the share of a GPU still counts
every replica on it, whichever shard owns them.
"""

from __future__ import annotations

from typing import Mapping

from ray_monitor.aggregator.tenants import TenantBook
from ray_monitor.alerting.prices import gpu_price_for
from ray_monitor.common.snapshot import GpuSnapshot, ReplicaIdentity

__all__ = ["attributed_seconds", "feed_gpu_seconds"]


def attributed_seconds(snap: GpuSnapshot, interval: float
                       ) -> dict[tuple[str, str, ReplicaIdentity], float]:
    """(gpu index, uuid, replica) -> GPU-seconds of this sample, shared as the module says."""
    lost = {d.uuid for d in snap.devices if d.lost}
    users: dict[tuple[str, str], set[ReplicaIdentity]] = {}
    for p in snap.processes:
        if p.replica is not None and p.gpu_uuid not in lost:
            users.setdefault((str(p.gpu_index), p.gpu_uuid), set()).add(p.replica)
    out = {}
    for (gpu, uuid), replicas in users.items():
        share = interval / len(replicas)
        for r in replicas:
            out[(gpu, uuid, r)] = share
    return out


def feed_gpu_seconds(tables: Mapping, book: TenantBook, snap: GpuSnapshot, interval: float,
                     where, now: float, cap: int) -> None:
    """Adds one node sample's GPU-seconds per replica, and their cost where priced."""
    if interval <= 0:
        return
    seconds, costs = tables["replica_gpu_seconds"], tables["cost"]
    owner = book.gpu_owner
    for (gpu, uuid, r), s in sorted(attributed_seconds(snap, interval).items(),
                                    key=lambda kv: (kv[0][0], kv[0][2].replica)):
        if owner is not None and not owner(r.application):
            continue  # another shard's replica: counted there, with its share
        labels = (snap.node_id, gpu, uuid, r.application, r.deployment, r.replica)
        seconds.add_counter(seconds.row_for(labels, cap), where, s, now)
        model = book.models.get((r.application, r.deployment), "")
        price = gpu_price_for(book.prices, model, r.deployment)
        if price is not None:
            row = costs.row_for((r.application, r.deployment, model, "", "gpu"), cap)
            costs.add_counter(row, where, price * s, now)
