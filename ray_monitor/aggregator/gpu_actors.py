"""The GPU-stats actors of the cluster, kept by the aggregator: one per alive node.

Runs in the aggregator actor, which calls :meth:`GpuActorManager.reconcile` every few
seconds. It decides how the actors (:class:`~ray_monitor.gpu.actor.GpuStatsActor`) are
started and stopped; where they run (one per alive node, pinned) is
:class:`~ray_monitor.aggregator.per_node.PerNodeActors`'.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import ray

from ray_monitor.aggregator.per_node import PerNodeActors
from ray_monitor.common.names import gpu_actor_name
from ray_monitor.gpu.actor import GpuStatsActor, check_factory, check_interval

__all__ = ["GpuActorManager"]


class GpuActorManager(PerNodeActors):
    """Keeps one ``GpuStatsActor`` per alive node; call ``reconcile()`` every few seconds.

    ``sink`` is passed to every actor: an actor handle, or the name of a named actor in
    ``namespace`` (preferred for the aggregator: see ``GpuStatsActor``).
    """

    label = "GPU-stats actors"

    def __init__(self, *, sink: Any, namespace: str, gpu_interval_s: float = 1.0,
                 nvml_factory: Optional[str] = None, list_nodes: Callable[[], list[dict]] = ray.nodes) -> None:
        super().__init__(namespace=namespace, list_nodes=list_nodes)
        self._sink = sink
        self._interval = check_interval(gpu_interval_s)
        self._factory = check_factory(nvml_factory)

    def stop_all(self, timeout_s: float = 10.0) -> None:
        """Stops every actor (NVML shut down cleanly where reachable), then kills them."""
        refs = []
        for handle in self._actors.values():
            try:
                refs.append(handle.stop.remote())
            except Exception:
                pass
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        self.kill_all()

    def _start(self, node_id: str) -> Any:
        return GpuStatsActor.options(
            **self.pinned(gpu_actor_name(node_id), node_id),
        ).remote(node_id=node_id, sink=self._sink, sink_namespace=self._namespace,
                 gpu_interval_s=self._interval, nvml_factory=self._factory)
