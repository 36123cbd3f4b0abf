"""One GPU-stats actor per node: runs a GpuSampler and pushes its snapshots to the aggregator.

Runs on every node, pinned there (one actor each). The aggregator starts and forgets them
(:class:`~ray_monitor.aggregator.gpu_actors.GpuActorManager`); this module decides how a
node is sampled and how its snapshots reach the aggregator without ever queueing
without bound.
"""

from __future__ import annotations

import importlib
import threading
import time
from typing import Any, Callable, Optional

import ray

from ray_monitor.common.snapshot import GpuSnapshot, ReplicaIdentity
from ray_monitor.gpu.attribution import attribute_processes
from ray_monitor.gpu.sampler import GpuSampler

__all__ = ["GpuStatsActor", "check_factory", "check_interval"]


def check_interval(gpu_interval_s: object) -> float:
    """``gpu_interval_s`` as float seconds; raises ``ValueError`` unless it is above 0."""
    if isinstance(gpu_interval_s, bool) or not isinstance(gpu_interval_s, (int, float)) or not gpu_interval_s > 0:
        raise ValueError(f"gpu_interval_s must be a positive number of seconds, got {gpu_interval_s!r}")
    return float(gpu_interval_s)


def check_factory(nvml_factory: object) -> Optional[str]:
    """``nvml_factory`` when it is None or a ``'module:function'`` path; else ``ValueError``."""
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
        self._interval = check_interval(gpu_interval_s)
        factory = check_factory(nvml_factory)
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
