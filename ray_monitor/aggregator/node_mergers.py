"""The node mergers of the cluster, kept by the aggregator: one per node with replicas.

Runs in the aggregator actor, which calls :meth:`NodeMergerManager.reconcile` every few
seconds with the nodes its replicas reported from. It decides which nodes get a merger
(:class:`~ray_monitor.node.actor.NodeMergerActor`): every alive node from which a
monitored replica delivered, whether or not GPU monitoring is on. A replica delivers to
the aggregator directly until its node has one (the aggregator's answer then tells it to
look again), so the first deliveries of a new node arrive direct, counted as such.
"""

from __future__ import annotations

from typing import Any

from ray_monitor.aggregator.per_node import PerNodeActors
from ray_monitor.common.names import AGGREGATOR_NAME, node_merger_name
from ray_monitor.node.actor import NodeMergerActor

__all__ = ["MERGER_CONCURRENCY", "NodeMergerManager"]

#: Deliveries a merger may hold waiting at once: each replica has at most a few in flight
#: (replica.delivery.MAX_IN_FLIGHT), so this covers hundreds of replicas per node.
MERGER_CONCURRENCY = 8192


class NodeMergerManager(PerNodeActors):
    """Keeps one ``NodeMergerActor`` per alive node that ``reconcile(wanted)`` names."""

    label = "node mergers"

    def _start(self, node_id: str) -> Any:
        return NodeMergerActor.options(
            **self.pinned(node_merger_name(node_id), node_id),
            max_concurrency=MERGER_CONCURRENCY,
        ).remote(node_id=node_id, sink=AGGREGATOR_NAME, namespace=self._namespace)
