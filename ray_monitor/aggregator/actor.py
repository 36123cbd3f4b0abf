"""The aggregator actor: one per cluster, named, detached, restartable.

Runs in its own Ray actor process, on the head node when it can. Plumbing only: the
decisions live in :class:`~ray_monitor.aggregator.core.AggregatorCore` and the pure
modules under it. Everything runs on the actor's event loop, so ingestion, evaluation and
the HTTP server never race; evaluation happens every ``eval_interval_s`` and hands alerts
to the notifier's queue, which sends from a thread of its own. What must outlive a
restart is kept in Ray's GCS (:mod:`~ray_monitor.aggregator.persistence`), so a restarted
aggregator resumes where it stopped, on the port it had.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Mapping, Optional

import ray

from ray_monitor.aggregator import persistence
from ray_monitor.aggregator.core import AggregatorCore
from ray_monitor.common.catalog import Query
from ray_monitor.common.config import StartConfig
from ray_monitor.common.names import AGGREGATOR_NAME, NAMESPACE
from ray_monitor.common.snapshot import GpuSnapshot, ReplicaSnapshot
from ray_monitor.quality.compare import COMPARE_WINDOW_S

__all__ = ["Aggregator", "GPU_RECONCILE_S", "get_or_create"]

#: How often the GPU-stats actors are matched to the alive nodes.
GPU_RECONCILE_S = 3.0


@ray.remote(num_cpus=0)
class Aggregator:
    """The actor around :class:`AggregatorCore`: the loop, the HTTP server, the GCS.

    ``rules_text`` and ``rules_file`` are the rule file it starts with; rules and receivers
    changed later (``reload``, ``configure``) are saved in the GCS and win on a restart.
    """

    def __init__(self, config: StartConfig, rules_text: Any = None,
                 rules_file: Optional[str] = None) -> None:
        config = StartConfig.of(config)
        saved = persistence.load_config()
        if saved:
            rules_text = saved.get("rules_text", rules_text)
            rules_file = saved.get("rules_file", rules_file)
            config = config.model_copy(update={"notifications": saved.get("notifications")})
        self.config = config
        persist, load = persistence.gcs_state()
        persist_log, load_log = persistence.gcs_notification_log()
        self.core = AggregatorCore(config, rules_text=rules_text, rules_file=rules_file,
                                   persist=persist, load=load, persist_log=persist_log,
                                   load_log=load_log)
        self.host = config.host
        self.port = config.port
        self.token = config.token or None
        self._server = None
        self._loop_task = None
        self._gpu = None
        self._start_lock: Optional[asyncio.Lock] = None

    async def _ensure_started(self) -> None:
        if self._server is not None:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:  # ready() and ingest() may both arrive first
            if self._server is None:
                await self._start()

    async def _start(self) -> None:
        from ray_monitor.aggregator.http_api import start_server

        # Reuse the port of a previous incarnation so scrape configs keep working; the
        # old process may still hold it for a moment after a restart.
        port = self.port or persistence.load_port() or 0
        for attempt in range(40):
            try:
                self._server, self.port = await start_server(self, self.host, port)
                break
            except OSError:
                if attempt == 39:
                    raise
                await asyncio.sleep(0.25)
        persistence.save_port(self.port)
        self.core.set_external_url(self.url())
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())
        if self.config.gpu:
            from ray_monitor.aggregator.gpu_actors import GpuActorManager

            self._gpu = GpuActorManager(sink=AGGREGATOR_NAME, namespace=NAMESPACE,
                                        gpu_interval_s=self.config.gpu_interval_s,
                                        nvml_factory=self.config.nvml_factory)

    async def _loop(self) -> None:
        next_gpu = 0.0
        while True:
            started = time.monotonic()
            try:
                self.core.evaluate()
            except Exception as e:  # the loop must outlive any bad round
                self.core.count_error("aggregator", f"evaluate_failed:{type(e).__name__}", e)
            if self._gpu is not None and started >= next_gpu:
                next_gpu = started + GPU_RECONCILE_S
                try:
                    _, forgotten = await asyncio.get_running_loop().run_in_executor(
                        None, self._gpu.reconcile)
                    for node_id in forgotten:  # a dead node's last sample is not current
                        self.core.gpu_latest.pop(node_id, None)
                except Exception as e:
                    self.core.count_error("gpu", f"reconcile_failed:{type(e).__name__}", e)
            await asyncio.sleep(max(0.0, self.core.eval_interval_s - (time.monotonic() - started)))

    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = ray.util.get_node_ip_address()
        return f"http://{host}:{self.port}"

    def _save_config(self) -> None:
        core = self.core
        persistence.save_config(core.rules_text, core.rules_file, core.config.notifications)

    # -- remote API -------------------------------------------------------------------

    async def ready(self) -> str:
        await self._ensure_started()
        return self.url()

    async def ingest(self, snaps: list[ReplicaSnapshot]) -> None:
        await self._ensure_started()
        self.core.ingest(snaps)

    async def ingest_gpu(self, snap: GpuSnapshot) -> None:
        self.core.ingest_gpu(snap)

    async def alerts(self) -> list[dict]:
        return self.core.alerts()

    async def rules(self) -> list[dict]:
        return self.core.rules()

    async def deployments(self) -> list[dict]:
        return self.core.deployments()

    async def hints(self) -> list[dict]:
        return [h.to_dict() for h in self.core.hints.hints()]

    async def reload(self, rules_text: Any, filename: Optional[str] = None) -> dict:
        res = self.core.reload(rules_text, filename)
        self._save_config()
        return res

    async def configure(self, notifications: Optional[dict]) -> None:
        self.core.configure_notifications(notifications)
        self._save_config()

    async def query(self, function: str, metric: str, window_s: float,
                    by: Optional[tuple] = None, param: Optional[float] = None) -> dict:
        res = self.core.source.evaluate(Query(function, metric, window_s,
                                              tuple(by) if by else None, (), param), None)
        return {json.dumps(dict(k), sort_keys=True): v for k, v in res.items()}

    async def feedback(self, items: list) -> dict:
        return self.core.feedback(items)

    async def set_drift_reference(self, application: str, deployment: str, model_version: str,
                                  references: dict) -> dict:
        return self.core.set_drift_reference(application, deployment, model_version, references)

    async def hung(self) -> list[dict]:
        return self.core.hung()

    async def traces(self, kind: Optional[str] = None, limit: int = 50) -> list[dict]:
        return self.core.traces(kind, limit)

    async def quality(self, window_s: float = 0.0) -> list[dict]:
        return self.core.quality_summary(window_s)

    async def compare(self, deployment: str, versions: tuple, application: Optional[str] = None,
                      window_s: float = COMPARE_WINDOW_S) -> dict:
        return self.core.compare(deployment, tuple(versions), application=application,
                                 window_s=window_s)

    async def gpus(self) -> dict:
        return {node: snap for node, snap in self.core.gpu_latest.items()}

    async def gpu_actors(self) -> dict:
        return {} if self._gpu is None else dict(self._gpu.actors())

    async def stats(self) -> dict:
        return {"ingested": self.core.ingested, "evaluations": self.core.evaluations,
                "store": self.core.store.stats(), "replicas": len(self.core.replicas),
                "notifier": self.core.notifier.stats(), "quality": self.core.quality.stats(),
                "traces": self.core.trace_store.stats()}

    async def shutdown(self) -> None:
        if self._gpu is not None:
            self._gpu.stop_all()
        self.core.notifier.flush(2.0)
        self.core.notifier.close(2.0)
        if self._server is not None:
            await self._server.cleanup()


def get_or_create(config: "StartConfig | Mapping[str, Any]", *, rules_text: Any = None,
                  rules_file: Optional[str] = None):
    """The aggregator actor, created on the head node if it is not running.

    ``config`` is a :class:`StartConfig` or a mapping of its options, checked here, in the
    caller's process, so a bad one is refused before any actor starts. ``rules_text`` is
    the rule file's content (text or a dict), already checked by the caller.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    config = StartConfig.of(config)
    head = _head_node_id()
    opts: dict[str, Any] = dict(name=AGGREGATOR_NAME, namespace=NAMESPACE, lifetime="detached",
                                max_restarts=-1, max_task_retries=-1, get_if_exists=True,
                                max_concurrency=64)
    if head:
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=True)
    return Aggregator.options(**opts).remote(config, rules_text, rules_file)


def _head_node_id() -> Optional[str]:
    for n in ray.nodes():
        if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {}):
            return n["NodeID"]
    return None
