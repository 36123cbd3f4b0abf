"""The GPU-stats actors of the cluster, kept by the aggregator: one per alive node.

Runs in the aggregator actor, which calls :meth:`GpuActorManager.reconcile` every few
seconds. It decides where the actors (:class:`~ray_monitor.gpu.actor.GpuStatsActor`) run:
exactly one per alive node, pinned there with hard node affinity, so an actor whose node
dies is never re-created elsewhere. The actors are owned by whoever calls ``reconcile()``
and share its fate.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_monitor.common.names import gpu_actor_name
from ray_monitor.gpu.actor import GpuStatsActor, check_factory, check_interval

__all__ = ["GpuActorManager"]

log = logging.getLogger(__name__)


class GpuActorManager:
    """Keeps one ``GpuStatsActor`` per alive node; call ``reconcile()`` every few seconds.

    ``sink`` is passed to every actor: an actor handle, or the name of a named actor in
    ``namespace`` (preferred for the aggregator: see ``GpuStatsActor``).
    """

    def __init__(self, *, sink: Any, namespace: str, gpu_interval_s: float = 1.0,
                 nvml_factory: Optional[str] = None, list_nodes: Callable[[], list[dict]] = ray.nodes) -> None:
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be the monitor's Ray namespace (a non-empty string), got {namespace!r}")
        if not callable(list_nodes):
            raise TypeError(f"list_nodes must be a callable returning ray.nodes()-shaped dicts, got {list_nodes!r}")
        self._sink = sink
        self._namespace = namespace
        self._interval = check_interval(gpu_interval_s)
        self._factory = check_factory(nvml_factory)
        self._list_nodes = list_nodes
        self._actors: dict[str, Any] = {}
        self._failed: set[str] = set()  # causes already logged

    def actors(self) -> dict[str, Any]:
        """node_id -> actor handle, for the nodes that were alive at the last reconcile."""
        return dict(self._actors)

    def reconcile(self) -> tuple[list[str], list[str]]:
        """Starts actors on new nodes, forgets those of dead nodes; returns (started, forgotten)."""
        try:
            alive = {n["NodeID"] for n in self._list_nodes() if n.get("Alive")}
        except Exception as exc:
            self._log_once(f"list_nodes:{type(exc).__name__}", exc)
            return [], []
        started, forgotten = [], []
        for node_id in sorted(alive - self._actors.keys()):
            try:
                self._actors[node_id] = self._start(node_id)
                started.append(node_id)
            except Exception as exc:  # e.g. the node died meanwhile: try again next reconcile
                self._log_once(f"start:{type(exc).__name__}", exc)
        for node_id in sorted(self._actors.keys() - alive):
            handle = self._actors.pop(node_id)
            forgotten.append(node_id)
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass  # the node and its actor are already gone
        if started or forgotten:
            log.info("GPU-stats actors: started on %s, forgotten for %s", started, forgotten)
        return started, forgotten

    def stop_all(self, timeout_s: float = 10.0) -> None:
        """Stops every actor (NVML shut down cleanly where reachable), then kills them."""
        handles = list(self._actors.values())
        self._actors.clear()
        refs = []
        for handle in handles:
            try:
                refs.append(handle.stop.remote())
            except Exception:
                pass
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for handle in handles:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass

    def _start(self, node_id: str) -> Any:
        return GpuStatsActor.options(
            name=gpu_actor_name(node_id),
            namespace=self._namespace,
            get_if_exists=True,  # a restarted aggregator finds the actors that still run
            num_cpus=0,
            max_restarts=-1,
            # soft=False: never placed, nor restarted, on any other node
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
        ).remote(node_id=node_id, sink=self._sink, sink_namespace=self._namespace,
                 gpu_interval_s=self._interval, nvml_factory=self._factory)

    def _log_once(self, cause: str, exc: BaseException) -> None:
        if cause not in self._failed:
            self._failed.add(cause)
            log.warning("GPU actor manager: %s (%s); logged once", cause, exc)
