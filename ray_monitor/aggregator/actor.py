"""The aggregator actor: one per cluster, named, detached, restartable.

Runs in its own Ray actor process, on the head node when it can. Plumbing only: the
decisions live in :class:`~ray_monitor.aggregator.core.AggregatorCore` and the pure
modules under it. Everything runs on the actor's event loop, so ingestion, evaluation and
the HTTP server never race; evaluation happens every ``eval_interval_s`` and hands alerts
to the notifier's queue, which sends from a thread of its own. What must outlive a
restart is kept in Ray's GCS (:mod:`~ray_monitor.aggregator.persistence`), so a restarted
aggregator resumes where it stopped, on the port it had. It starts by itself: the
constructor queues a call to its own ``ready()``, so a restarted aggregator serves HTTP
and evaluates rules at once, whether or not any replica is left to send it data.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from typing import Any, Mapping, Optional

import ray

from ray_monitor.aggregator import persistence
from ray_monitor.aggregator.core import AggregatorCore
from ray_monitor.common.catalog import ALIASES, Query, is_model_query
from ray_monitor.common.config import StartConfig
from ray_monitor.common.errors import ConfigError
from ray_monitor.common.names import AGGREGATOR_NAME, NAMESPACE
from ray_monitor.common.snapshot import GpuSnapshot, ReplicaSnapshot
from ray_monitor.quality.compare import COMPARE_WINDOW_S

__all__ = ["Aggregator", "BIND_RETRY_S", "GPU_RECONCILE_S", "HEAD_RESOURCE", "HTTP_FIELDS",
           "get_or_create"]

#: How often the GPU-stats actors and node mergers are matched to the alive nodes.
GPU_RECONCILE_S = 3.0
#: How often a port that could not be bound is tried again (evaluation runs meanwhile).
BIND_RETRY_S = 5.0
#: start() options a running aggregator applies by rebinding (the others need a stop()).
HTTP_FIELDS = ("host", "port", "token")
#: The resource only the head node has (Ray 2.x): a share of it pins an actor there.
HEAD_RESOURCE = "node:__internal_head__"
_SOURCE = "ray_monitor.start()"


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
            config = config.model_copy(update={"notifications": saved.get("notifications"),
                                               **(saved.get("http") or {})})
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
        self._bind_error: Optional[str] = None
        self._started = False
        self._loop_task = None
        self._serve_task = None
        self._serve_poll = None  # the poll in flight on a worker thread
        self._bind_task = None
        self._gpu = None
        self._nodes = None  # the node mergers (config.node_fanin)
        self._start_lock: Optional[asyncio.Lock] = None
        # Start at once, not at the first call: a restarted actor must serve and evaluate
        # even when no replica is left to call it (the call runs once __init__ returns).
        ray.get_runtime_context().current_actor.start_now.remote()

    async def _ensure_started(self) -> None:
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:  # ready() and ingest() may both arrive first
            if not self._started:
                await self._start()
                self._started = True

    async def _bind(self, host: str, port: int, attempts: int = 40) -> None:
        """Serves HTTP on ``host:port``; the old process of a restarted actor may hold the
        port for a moment, so a busy port is tried ``attempts`` times, 0.25 s apart."""
        from ray_monitor.aggregator.http_api import start_server

        for attempt in range(attempts):
            try:
                self._server, self.port = await start_server(self, host, port)
                self.host = host
                self._bind_error = None
                return
            except OSError:
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.25)

    async def _start(self) -> None:
        # Rules and GPUs first: evaluation and notifications never wait for the port.
        if self.config.gpu:
            from ray_monitor.aggregator.gpu_actors import GpuActorManager

            self._gpu = GpuActorManager(sink=AGGREGATOR_NAME, namespace=NAMESPACE,
                                        gpu_interval_s=self.config.gpu_interval_s,
                                        nvml_factory=self.config.nvml_factory)
        if self.config.node_fanin:
            from ray_monitor.aggregator.node_mergers import NodeMergerManager

            self._nodes = NodeMergerManager(namespace=NAMESPACE)
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())
        self._serve_task = asyncio.get_running_loop().create_task(self._serve_loop())
        # Reuse the port of a previous incarnation so scrape configs keep working.
        port = self.port or persistence.load_port() or 0
        try:
            await self._bind(self.host, port)
        except OSError as e:
            self._bind_error = f"cannot serve HTTP on {self.host}:{port}: {e}"
            self.core.count_error("aggregator", f"http_bind_failed:{type(e).__name__}", e)
            self.port = port
            self._bind_task = asyncio.get_running_loop().create_task(self._bind_later())
        else:
            persistence.save_port(self.port)
            self.core.set_external_url(self.url())
        # What exists now (the interpreter's, Ray's and numpy's objects, the rules) lives as
        # long as the actor: out of every later full garbage collection, which otherwise
        # scans it all inside whichever rule round triggers it (issue 15: 45 of 110 ms).
        gc.collect()
        gc.freeze()

    async def _loop(self) -> None:
        next_gpu = 0.0
        while True:
            started = time.monotonic()
            try:
                self.core.evaluate()
            except Exception as e:  # the loop must outlive any bad round
                self.core.count_error("aggregator", f"evaluate_failed:{type(e).__name__}", e)
            if started >= next_gpu:
                next_gpu = started + GPU_RECONCILE_S
                await self._reconcile()
            now = time.time()
            await asyncio.sleep(max(0.0, self.core.next_round_at(now) - now))

    async def _reconcile(self) -> None:
        """GPU actors on every alive node, mergers on those with replicas (on a worker
        thread: listing nodes and creating actors are GCS calls)."""
        loop = asyncio.get_running_loop()
        if self._gpu is not None:
            try:
                _, forgotten = await loop.run_in_executor(None, self._gpu.reconcile)
                for node_id in forgotten:  # a dead node's last sample is not current
                    self.core.gpu_latest.pop(node_id, None)
            except Exception as e:
                self.core.count_error("gpu", f"reconcile_failed:{type(e).__name__}", e)
        if self._nodes is not None:
            wanted = {ident.node_id for ident, _ in self.core.replicas.values() if ident.node_id}
            try:
                await loop.run_in_executor(None, self._nodes.reconcile, wanted)
            except Exception as e:
                self.core.count_error("node", f"reconcile_failed:{type(e).__name__}", e)

    async def _serve_loop(self) -> None:
        """Asks Serve's controller what it runs every few seconds, on a worker thread so
        the evaluation loop never waits on it; at most one poll in flight, each bounded."""
        from ray_monitor.aggregator import serve_state

        loop = asyncio.get_running_loop()
        while True:
            if self._serve_poll is None or self._serve_poll.done():
                self._serve_poll = loop.run_in_executor(None, serve_state.poll)
            try:
                running = await asyncio.wait_for(asyncio.shield(self._serve_poll),
                                                 serve_state.TIMEOUT_S)
            except Exception as e:  # a slow or failed poll is counted; the last answer ages
                self.core.count_error("serve", f"status_failed:{type(e).__name__}", e)
            else:
                self.core.set_serve_state(running)
            await asyncio.sleep(serve_state.POLL_S)

    async def _bind_later(self) -> None:
        while self._server is None:
            await asyncio.sleep(BIND_RETRY_S)
            try:
                await self._bind(self.host, self.port, attempts=1)
            except OSError:
                continue
            persistence.save_port(self.port)
            self.core.set_external_url(self.url())

    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = ray.util.get_node_ip_address()
        return f"http://{host}:{self.port}"

    def _save_config(self) -> None:
        core = self.core
        persistence.save_config(core.rules_text, core.rules_file, core.config.notifications,
                                {"host": self.host, "port": self.port, "token": self.token})

    # -- remote API -------------------------------------------------------------------

    async def start_now(self) -> None:
        """Queued by the constructor; never raises (a port that cannot be bound is retried)."""
        try:
            await self._ensure_started()
        except Exception as e:  # pragma: no cover - _start counts its own failures
            self.core.count_error("aggregator", f"start_failed:{type(e).__name__}", e)

    async def ready(self) -> str:
        await self._ensure_started()
        if self._server is None:
            raise ConfigError.one(_SOURCE, "port", f"{self._bind_error}; the monitor "
                                  f"evaluates rules meanwhile and tries again every "
                                  f"{BIND_RETRY_S:g} s (or stop() it and start on another port)")
        return self.url()

    async def settings(self) -> dict:
        """The options it runs with (the token only as whether there is one)."""
        d = self.config.model_dump(exclude={"token", "notifications"})
        d.update(host=self.host, port=self.port, token_set=self.token is not None)
        return d

    async def rebind(self, changes: dict) -> str:
        """Applies ``host``, ``port`` and ``token`` given to a later ``start()``: serves on
        the new address (port 0: the current port), or, when it cannot be bound, keeps the
        old one and raises ConfigError naming the field. Saved for restarts."""
        await self._ensure_started()
        if "token" in changes:
            self.token = changes["token"] or None
        host = changes.get("host") or self.host
        port = changes.get("port") or self.port
        if self._server is None:  # still trying to bind: try the new address instead
            self.host, self.port = host, port
        elif (host, port) != (self.host, self.port):
            old_host, old_port = self.host, self.port
            await self._server.cleanup()  # free the port first: 0.0.0.0 overlaps 127.0.0.1
            self._server = None
            try:
                await self._bind(host, port, attempts=8)
            except OSError as e:
                await self._bind(old_host, old_port)
                field = "port" if "port" in changes and port != old_port else "host"
                raise ConfigError.one(_SOURCE, field, f"cannot serve on {host}:{port} ({e}); "
                                      f"the monitor still serves on {old_host}:{old_port}") \
                    from None
            persistence.save_port(self.port)
            self.core.set_external_url(self.url())
        self._save_config()
        return self.url()

    async def ingest(self, snaps: list[ReplicaSnapshot], kept_since: Any = None) -> dict:
        """Takes a replica's snapshots (never waiting for the HTTP port, started by
        ``__init__``); answers with the trace ids kept anywhere since ``kept_since`` (see
        :class:`~ray_monitor.aggregator.trace_store.KeptLog`)."""
        self.core.ingest(snaps)
        reply = self.core.kept_log.reply(kept_since)
        if self._nodes is not None and snaps and self._nodes.has(snaps[0].identity.node_id):
            reply["merger"] = True  # the replica looks for its node's merger again
        return reply

    async def ingest_node(self, snaps: list[ReplicaSnapshot], kept_since: Any = None,
                          report: Optional[dict] = None) -> dict:
        """Takes a node merger's forward: the deliveries of its node's replicas, merged;
        ``report`` is its counters. Answers as ``ingest``, for the merger's cursor."""
        self.core.ingest(snaps, node_report=report)
        return self.core.kept_log.reply(kept_since)

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
        # Read and checked on a worker thread (a 1 MiB file takes a while); swapped in here.
        rule_file = await asyncio.to_thread(self.core.read_rules, rules_text, filename)
        res = self.core.apply_rules(rule_file, rules_text, filename)
        self._save_config()
        return res

    async def configure(self, notifications: Optional[dict]) -> None:
        self.core.configure_notifications(notifications)
        self._save_config()

    async def query(self, function: str, metric: str, window_s: float,
                    by: Optional[tuple] = None, param: Optional[float] = None) -> dict:
        from ray_monitor.aggregator.views import check_query
        from ray_monitor.common.errors import BadRequest

        if not (isinstance(window_s, (int, float)) and 0 < window_s < float("inf")):
            raise BadRequest(f"window_s={window_s!r} must be a number of seconds above 0",
                             field="window_s")
        metric = ALIASES.get(metric, metric)  # time_to_first_token_seconds and the like
        if not is_model_query(function, metric):  # quality functions check their own
            check_query(function, metric, tuple(by) if by else None, param)
        res = self.core.source.evaluate(Query(function, metric, window_s,
                                              tuple(by) if by else None, (), param), None)
        return {json.dumps(dict(k), sort_keys=True): v for k, v in res.items()}

    async def evaluate(self, exprs: list) -> list:
        return self.core.evaluate_exprs(exprs)

    async def feedback(self, items: list) -> dict:
        return await self.core.feedback_async(list(items))

    async def set_drift_reference(self, application: str, deployment: str, model_version: str,
                                  references: dict) -> dict:
        return await self.core.set_drift_reference_async(application, deployment,
                                                         model_version, references)

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

    async def node_mergers(self) -> dict:
        """node_id -> the node merger's handle, for the nodes that have one."""
        return {} if self._nodes is None else dict(self._nodes.actors())

    async def stats(self) -> dict:
        return {"ingested": self.core.ingested, "evaluations": self.core.evaluations,
                "store": self.core.store.stats(), "replicas": len(self.core.replicas),
                "notifier": self.core.notifier.stats(), "quality": self.core.quality.stats(),
                "traces": self.core.trace_store.stats(),
                "delivery": self.core.ledger.by_deployment(), "fanin": self.core.fanin_stats()}

    async def shutdown(self) -> None:
        if self._serve_task is not None:  # no more calls into Ray from the poll thread
            self._serve_task.cancel()
        if self._gpu is not None:
            self._gpu.stop_all()
        if self._nodes is not None:
            self._nodes.kill_all()
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
    config = StartConfig.of(config)
    head = _head_node_id()
    opts: dict[str, Any] = dict(name=AGGREGATOR_NAME, namespace=NAMESPACE, lifetime="detached",
                                max_restarts=-1, max_task_retries=-1, get_if_exists=True,
                                max_concurrency=64)
    if head:
        # On the head node, as a requirement: a soft affinity lets the head's raylet spill
        # the actor to a worker node when it is busy starting workers (seen on a loaded
        # head), and a worker node may be scaled away, taking the windows with it. The
        # head's resource, not its node id, so a restarted head (GCS fault tolerance, a
        # new node id) takes the aggregator back.
        opts["resources"] = {HEAD_RESOURCE: 0.001}
    return Aggregator.options(**opts).remote(config, rules_text, rules_file)


def _head_node_id() -> Optional[str]:
    for n in ray.nodes():
        if n.get("Alive") and HEAD_RESOURCE in n.get("Resources", {}):
            return n["NodeID"]
    return None
