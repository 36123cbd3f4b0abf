"""One GPU-stats actor per node: runs a GpuSampler and pushes its snapshots to the aggregator.

``GpuActorManager`` lives in the aggregator and keeps exactly one ``GpuStatsActor`` per alive
node, pinned there with hard node affinity, so an actor whose node dies is never re-created
elsewhere. The actors are owned by whoever calls ``reconcile()`` and share its fate.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from typing import Any, Callable, Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_monitor.gpu.sampler import GpuSampler, attribute_processes
from ray_monitor.common.names import gpu_actor_name
from ray_monitor.common.snapshot import GpuSnapshot, ReplicaIdentity

log = logging.getLogger(__name__)

def _check_interval(gpu_interval_s: object) -> float:
    if isinstance(gpu_interval_s, bool) or not isinstance(gpu_interval_s, (int, float)) or not gpu_interval_s > 0:
        raise ValueError(f"gpu_interval_s must be a positive number of seconds, got {gpu_interval_s!r}")
    return float(gpu_interval_s)


def _check_factory(nvml_factory: object) -> Optional[str]:
    if nvml_factory is None:
        return None
    if not isinstance(nvml_factory, str) or nvml_factory.count(":") != 1 or not all(nvml_factory.split(":")):
        raise ValueError(f"nvml_factory must be an import path 'module:function', got {nvml_factory!r}")
    return nvml_factory


def _load_factory(path: str) -> Callable[[], Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@ray.remote(num_cpus=0)
class GpuStatsActor:
    """Samples this node's GPUs every ``gpu_interval_s`` on a background thread.

    Each snapshot goes to ``sink.ingest_gpu.remote(snapshot)`` without waiting; at most
    ``max_pending`` pushes may be un-acknowledged, beyond that a snapshot is dropped and
    counted (``sink:backlog_full``) rather than queued without bound. ``sink`` is an actor
    handle, or the name of a named actor in ``sink_namespace``, looked up when first needed
    and again after a failed push. A name keeps Ray from storing a handle as a constructor
    argument of a restartable actor (which it warns about once per actor).
    """

    def __init__(self, *, node_id: str, sink: Any = None, gpu_interval_s: float = 1.0,
                 nvml_factory: Optional[str] = None, max_pending: int = 8,
                 sink_namespace: Optional[str] = None) -> None:
        self._interval = _check_interval(gpu_interval_s)
        factory = _check_factory(nvml_factory)
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive int, got {max_pending!r}")
        self._sampler = GpuSampler(node_id=node_id, nvml=_load_factory(factory)() if factory else None)
        if isinstance(sink, str) and not sink:
            raise ValueError("sink must be an actor handle, a named actor's name, or None; got ''")
        self._sink_name = sink if isinstance(sink, str) else None
        self._sink_namespace = sink_namespace
        self._sink = None if isinstance(sink, str) else sink
        self._max_pending = max_pending
        self._pending: list[ray.ObjectRef] = []
        self._replicas: dict[int, ReplicaIdentity] = {}
        self._latest: Optional[GpuSnapshot] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ray-monitor-gpu-sampler", daemon=True)
        self._thread.start()

    def latest(self) -> Optional[GpuSnapshot]:
        """The last snapshot taken (replica join applied); None before the first."""
        return self._latest

    def set_replicas(self, replicas: dict[int, ReplicaIdentity]) -> None:
        """The known replica pids (any node's; only this node's are used) for the pid join."""
        if not isinstance(replicas, dict) or not all(
                isinstance(pid, int) and isinstance(r, ReplicaIdentity) for pid, r in replicas.items()):
            raise TypeError("replicas must be a dict of pid (int) -> ReplicaIdentity")
        self._replicas = dict(replicas)

    def running_node_id(self) -> str:
        """The node this actor actually runs on (for checking the pinning)."""
        return ray.get_runtime_context().get_node_id()

    def stop(self) -> None:
        """Stops sampling and shuts NVML down; the actor stays, answering ``latest()``."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self._interval + 10)
        self._sampler.shutdown()

    def _loop(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as exc:  # the loop outlives any bug in one tick
                self._sampler.count_error(f"gpu_actor:{type(exc).__name__}", exc)
            due += self._interval
            now = time.monotonic()
            if due < now:  # fell behind (slow NVML, a paused process): skip ticks, never burst
                due = now
            self._stop.wait(due - now)

    def _tick(self) -> None:
        snapshot = self._sampler.sample()
        replicas = self._replicas
        if replicas and snapshot.processes:
            snapshot = attribute_processes(snapshot, replicas)
        self._latest = snapshot
        if self._sink is not None or self._sink_name is not None:
            self._push(snapshot)

    def _push(self, snapshot: GpuSnapshot) -> None:
        if self._pending:
            done, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
            for ref in done:
                try:
                    ray.get(ref, timeout=0)
                except Exception as exc:
                    self._sampler.count_error(f"sink.ingest_gpu:{type(exc).__name__}", exc)
                    self._forget_named_sink()
        if len(self._pending) >= self._max_pending:
            self._sampler.count_error("sink:backlog_full", f"{len(self._pending)} pushes un-acknowledged")
            return
        try:
            if self._sink is None:
                self._sink = ray.get_actor(self._sink_name, namespace=self._sink_namespace)
            self._pending.append(self._sink.ingest_gpu.remote(snapshot))
        except Exception as exc:
            self._sampler.count_error(f"sink.ingest_gpu:{type(exc).__name__}", exc)
            self._forget_named_sink()

    def _forget_named_sink(self) -> None:
        if self._sink_name is not None:
            self._sink = None


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
        self._interval = _check_interval(gpu_interval_s)
        self._factory = _check_factory(nvml_factory)
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


__all__ = ["GpuActorManager", "GpuStatsActor"]
