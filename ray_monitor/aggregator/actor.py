"""The aggregator actor: one per cluster (or one per shard, ``StartConfig.shards``), named,
detached, restartable.

Runs in its own Ray actor process, on the head node when it can. Plumbing only: the
decisions live in :class:`~ray_monitor.aggregator.core.AggregatorCore` and the pure
modules under it. Everything runs on the actor's event loop, so ingestion, evaluation and
the HTTP server never race; evaluation happens every ``eval_interval_s`` and hands alerts
to the notifier's queue, which sends from a thread of its own. What must outlive a
restart is kept in Ray's GCS (:mod:`~ray_monitor.aggregator.persistence`), so a restarted
aggregator resumes where it stopped, on the port it had. Sharded, shard 0 alone serves
HTTP and answers for every shard, gathering their parts (:mod:`~ray_monitor.aggregator.shards`);
each shard owns the applications that hash to it. It starts by itself: the
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
from ray_monitor.aggregator.core import ROUND_WAIT_S, AggregatorCore
from ray_monitor.common.catalog import ALIASES, Query, is_model_query
from ray_monitor.common.config import StartConfig
from ray_monitor.common.errors import ConfigError
from ray_monitor.common.names import AGGREGATOR_NAME, NAMESPACE
from ray_monitor.common.shards import shard_name, shard_of
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
    ``shard`` is its index among ``config.shards`` aggregators (0: the front, which
    serves HTTP and gathers the others' answers, see :mod:`~ray_monitor.aggregator.shards`).
    """

    def __init__(self, config: StartConfig, rules_text: Any = None,
                 rules_file: Optional[str] = None, shard: int = 0) -> None:
        config = StartConfig.of(config)
        saved = persistence.load_config()
        if saved:
            rules_text = saved.get("rules_text", rules_text)
            rules_file = saved.get("rules_file", rules_file)
            config = config.model_copy(update={"notifications": saved.get("notifications"),
                                               **(saved.get("http") or {})})
        self.config = config
        self.shard = shard
        self._peers = None  # the other shards (config.shards > 1)
        self._exchange = None  # kept trace ids traded with shard 0 (shards other than 0)
        self._trade = None  # the trade in flight
        self._reroute = None  # shard 0: held feedback handed on to its shard, in flight
        self._relay = None  # shard 0: GPU samples to the other shards
        if config.shards > 1:
            from ray_monitor.aggregator.shards import GpuRelay, KeptExchange, ShardFront

            self._peers = ShardFront(config.shards)
            self._exchange = KeptExchange() if shard else None
            self._relay = None if shard else GpuRelay(self._peers)
        persist, load = persistence.gcs_state(shard)
        persist_log, load_log = persistence.gcs_notification_log(shard)
        self.core = AggregatorCore(config, rules_text=rules_text, rules_file=rules_file,
                                   persist=persist, load=load, persist_log=persist_log,
                                   load_log=load_log, shard=shard)
        # token prices for the replicas' spans (issue 14): now, and at every reload
        self.core.on_prices = persistence.publish_prices
        if config.shards > 1:  # GPU time counted by the shard that owns the replica
            self.core.store.tenants.gpu_owner = self._mine
        persistence.publish_prices(self.core.store.tenants.prices)
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
        if self.config.gpu and not self.shard:  # GPU snapshots go to shard 0 (README)
            from ray_monitor.aggregator.gpu_actors import GpuActorManager

            self._gpu = GpuActorManager(sink=AGGREGATOR_NAME, namespace=NAMESPACE,
                                        gpu_interval_s=self.config.gpu_interval_s,
                                        nvml_factory=self.config.nvml_factory)
        if self.config.node_fanin:
            from ray_monitor.aggregator.node_mergers import NodeMergerManager

            self._nodes = NodeMergerManager(namespace=NAMESPACE)
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())
        self._serve_task = asyncio.get_running_loop().create_task(self._serve_loop())
        if not self.shard:  # only the front serves HTTP
            await self._serve_http()
        # What exists now (the interpreter's, Ray's and numpy's objects, the rules) lives as
        # long as the actor: out of every later full garbage collection, which otherwise
        # scans it all inside whichever rule round triggers it (issue 15: 45 of 110 ms).
        gc.collect()
        gc.freeze()

    async def _serve_http(self) -> None:
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

    async def _loop(self) -> None:
        next_gpu = 0.0
        while True:
            started = time.monotonic()
            # a late delivery of the second just ended: wait for it a little rather
            # than end every window a second early until the next round
            while not self.core.round_ready() and time.monotonic() - started < ROUND_WAIT_S:
                await asyncio.sleep(0.05)
            try:
                self.core.evaluate(self.core.round_time(self.core.clock()))
            except Exception as e:  # the loop must outlive any bad round
                self.core.count_error("aggregator", f"evaluate_failed:{type(e).__name__}", e)
            if started >= next_gpu:
                next_gpu = started + GPU_RECONCILE_S
                await self._reconcile()
            if self._exchange is not None and (self._trade is None or self._trade.done()):
                # Not awaited: shard 0 away must not hold this shard's evaluation.
                self._trade = asyncio.get_running_loop().create_task(self._trade_kept())
            if self._front(False) and (self._reroute is None or self._reroute.done()):
                self._reroute = asyncio.get_running_loop().create_task(self._reroute_held())
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
            if self._relay is not None:
                await self._relay.refresh()
        if self._nodes is not None:
            wanted = {ident.node_id for ident, _ in self.core.replicas.values() if ident.node_id}
            try:
                await loop.run_in_executor(None, self._nodes.reconcile, wanted)
            except Exception as e:
                self.core.count_error("node", f"reconcile_failed:{type(e).__name__}", e)

    async def _trade_kept(self) -> None:
        """A shard's kept trace ids to shard 0, and those kept anywhere back (see
        :class:`~ray_monitor.aggregator.shards.KeptExchange`); shard 0 away: next round."""
        ex, log = self._exchange, self.core.kept_log
        try:  # a task nobody awaits: whatever fails is counted here or never seen
            out, upto = ex.outgoing(log)
            reply = await self._peers.call(0, "kept_trade", out, ex.cursor)
            self.core.trace_store.adopt(ex.incoming(log, reply, out, upto))
        except Exception as e:  # the same ids go out again next round
            self.core.count_error("aggregator", f"kept_trade_failed:{type(e).__name__}", e)

    async def _reroute_held(self) -> None:
        """Shard 0: feedback held for a prediction that reached another shard since, to
        that shard (:func:`~ray_monitor.aggregator.shards.reroute_held`)."""
        from ray_monitor.aggregator.shards import reroute_held

        try:  # a task nobody awaits, as the trade
            await reroute_held(self.core.quality.join, self._peers)
        except Exception as e:
            self.core.count_error("aggregator", f"feedback_reroute_failed:{type(e).__name__}", e)

    def _owned(self, running: Optional[dict]) -> Optional[dict]:
        """Serve's (application, deployment) -> replicas, of this shard's applications only:
        absence rules and Serve's replica counts belong to the shard that owns them."""
        if running is None or self.config.shards <= 1:
            return running
        mine = {k: v for k, v in running.items()
                if shard_of(k[0], self.config.shards) == self.shard}
        self.core.elsewhere = set(running) - set(mine)
        return mine

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
                self.core.set_serve_state(self._owned(running))
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
        if self.shard:  # shard 0 saves what every shard reads back on a restart
            return
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
        if self.shard:  # the other shards serve no HTTP: the front's address is the URL
            return ""
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

    async def ingest_gpu(self, snap: GpuSnapshot | list, local: bool = False) -> None:
        """A node's GPU sample, from its GPU-stats actor to shard 0. Sharded, shard 0 joins
        it to every shard's replicas and passes it on (to another shard: a batch, GpuRelay);
        each shard counts its replicas' GPU time (shards.gpu_share), shard 0 the devices."""
        if self._peers is None:
            return self.core.ingest_gpu(snap)
        from ray_monitor.aggregator.shards import ingest_gpu_share

        if self.shard:
            return ingest_gpu_share(self.core, snap, self._mine)
        snap = self._relay.joined(snap, {i.pid: i for i, _ in self.core.replicas.values()})
        if not self._relay.send(snap):
            self.core.count_error("gpu", "shard_forward_backlog")
        self.core.ingest_gpu(snap)

    async def replica_identities(self, local: bool = True) -> list:
        """This shard's replicas (shard 0 joins GPU processes to them by pid)."""
        return [ident for ident, _ in self.core.replicas.values()]

    # -- answers: shard 0 (the front) gathers every shard's part ------------------------

    def _front(self, local: bool) -> bool:
        """Whether this call gathers the other shards' parts: on shard 0 of several,
        unless it is shard 0 asking (``local``)."""
        return self._peers is not None and not self.shard and not local

    def _mine(self, application: Optional[str]) -> bool:
        return self.config.shards <= 1 or \
            shard_of(application, self.config.shards) == self.shard

    async def _all(self, method: str, mine: list, *args: Any) -> list:
        """``mine`` followed by every other shard's list for ``method(*args, local=True)``."""
        out = list(mine)
        for part in await self._peers.gather(method, *args, True):
            out.extend(part or ())
        return out

    async def kept_trade(self, ids: list, cursor: Any = None) -> dict:
        """Shard 0: another shard's kept trace ids in, the cluster's since ``cursor`` out."""
        self.core.kept_log.add(ids)
        self.core.trace_store.adopt(ids)  # their spans here belong to traces kept there
        return self.core.kept_log.reply(cursor)

    async def alerts(self, local: bool = False) -> list[dict]:
        mine = self.core.alerts()
        return await self._all("alerts", mine) if self._front(local) else mine

    async def rules(self) -> list[dict]:
        return self.core.rules()

    async def deployments(self, local: bool = False) -> list[dict]:
        mine = self.core.deployments()
        return await self._all("deployments", mine) if self._front(local) else mine

    def _hints(self) -> list:
        return [h for h in self.core.hints.hints() if self._mine(h.application)]

    async def hints(self, local: bool = False) -> list[dict]:
        mine = [h.to_dict() for h in self._hints()]
        return await self._all("hints", mine) if self._front(local) else mine

    async def metric_families(self, local: bool = True) -> list:
        """This shard's ``/metrics`` families (prometheus_client Metric objects)."""
        from ray_monitor.aggregator.http_api import collect_off_loop, monitor_collectors

        return await collect_off_loop(monitor_collectors(self.core, self._hints))

    async def reload(self, rules_text: Any, filename: Optional[str] = None,
                     local: bool = False) -> dict:
        # Read and checked on a worker thread (a 1 MiB file takes a while); swapped in here.
        rule_file = await asyncio.to_thread(self.core.read_rules, rules_text, filename)
        res = self.core.apply_rules(rule_file, rules_text, filename)
        self._save_config()
        if self._front(local):  # checked here first: a bad file changes no shard
            for i, ans in enumerate(await self._peers.gather("reload", rules_text, filename,
                                                             True), 1):
                if ans is None:
                    self.core.count_error("aggregator", "shard_reload_failed")
                    res.setdefault("warnings", []).append(
                        f"shard {i} did not take the rules now; it reads them from the GCS "
                        "when it restarts")
        return res

    async def configure(self, notifications: Optional[dict], local: bool = False) -> None:
        self.core.configure_notifications(notifications)
        self._save_config()
        if self._front(local):
            await self._peers.gather("configure", notifications, True)

    async def query(self, function: str, metric: str, window_s: float,
                    by: Optional[tuple] = None, param: Optional[float] = None,
                    local: bool = False) -> dict:
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
        mine = {json.dumps(dict(k), sort_keys=True): v for k, v in res.items()}
        if not self._front(local):
            return mine
        from ray_monitor.aggregator.shards import merge_groups

        return merge_groups([mine] + await self._peers.gather(
            "query", function, metric, window_s, by, param, True))

    async def evaluate(self, exprs: list, local: bool = False) -> list:
        mine = self.core.evaluate_exprs(exprs)
        if not self._front(local):
            return mine
        from ray_monitor.aggregator.shards import merge_groups

        parts = [mine] + await self._peers.gather("evaluate", exprs, True)
        return [[merge_groups([p[e][c] if p else None for p in parts])
                 for c in range(len(mine[e]))] for e in range(len(mine))]

    async def timeseries(self, function: str, metric: str, now: float, window_s: float,
                         step_s: float, by: Optional[tuple], param: Optional[float],
                         local: bool = False) -> dict:
        """The status page's chart query (``/api/v1/timeseries``) at ``now`` (the front's,
        so every shard's points fall on the same times); series of every shard."""
        from ray_monitor.aggregator import views

        mine = views.timeseries(self.core.store, function, metric, now=now, by=by,
                                param=param, window_s=window_s, step_s=step_s)
        if self._front(local):
            for part in await self._peers.gather("timeseries", function, metric, now,
                                                 window_s, step_s, by, param, True):
                mine["series"].extend((part or {}).get("series", ()))
            mine["series"].sort(key=lambda s: sorted(s["labels"].items()))
        return mine

    async def known_requests(self, rids: list, local: bool = True) -> list:
        """The request ids of ``rids`` whose predictions this shard holds."""
        return self.core.quality.join.known(rids)

    async def feedback(self, items: list, local: bool = False) -> dict:
        items = list(items)
        if not self._front(local):
            return await self.core.feedback_async(items)
        from ray_monitor.aggregator.shards import front_feedback

        return await front_feedback(self.core, self._peers, items)

    async def set_drift_reference(self, application: str, deployment: str, model_version: str,
                                  references: dict, local: bool = False) -> dict:
        owner = 0 if self.config.shards <= 1 else shard_of(application, self.config.shards)
        if self._front(local) and owner:
            return await self._peers.call(owner, "set_drift_reference", application,
                                          deployment, model_version, references, True)
        return await self.core.set_drift_reference_async(application, deployment,
                                                         model_version, references)

    async def hung(self, local: bool = False) -> list[dict]:
        mine = self.core.hung()
        return await self._all("hung", mine) if self._front(local) else mine

    async def traces(self, kind: Optional[str] = None, limit: int = 50,
                     local: bool = False) -> list[dict]:
        mine = self.core.traces(kind, limit)
        if not self._front(local):
            return mine
        from ray_monitor.aggregator.shards import merge_traces

        parts = [mine] + [p or [] for p in await self._peers.gather("traces", kind, limit,
                                                                    True)]
        # The other parts of those traces: spans of shards whose replicas kept none.
        ids = sorted({t["trace_id"] for part in parts for t in part})
        parts.append(self.core.trace_store.parts(ids))
        parts.extend(p or [] for p in await self._peers.gather("trace_parts", ids, True))
        return merge_traces(parts, limit)

    async def trace_parts(self, trace_ids: list, local: bool = True) -> list[dict]:
        """This shard's parts of ``trace_ids``, however they were kept."""
        return self.core.trace_store.parts(trace_ids)

    async def quality(self, window_s: float = 0.0, local: bool = False) -> list[dict]:
        mine = self.core.quality_summary(window_s)
        return await self._all("quality", mine, window_s) if self._front(local) else mine

    async def compare(self, deployment: str, versions: tuple, application: Optional[str] = None,
                      window_s: float = COMPARE_WINDOW_S, local: bool = False) -> dict:
        if self._front(local) and application is not None \
                and shard_of(application, self.config.shards):
            return await self._peers.call(shard_of(application, self.config.shards),
                                          "compare", deployment, tuple(versions), application,
                                          window_s, True)
        return self.core.compare(deployment, tuple(versions), application=application,
                                 window_s=window_s)

    async def gpus(self) -> dict:
        return {node: snap for node, snap in self.core.gpu_latest.items()}

    async def gpu_actors(self) -> dict:
        return {} if self._gpu is None else dict(self._gpu.actors())

    async def node_mergers(self, local: bool = False) -> dict:
        """node_id -> the node merger's handle, for the nodes that have one."""
        mine = {} if self._nodes is None else dict(self._nodes.actors())
        if self._front(local):
            for part in await self._peers.gather("node_mergers", True):
                mine.update(part or {})
        return mine

    async def stats(self, local: bool = False) -> dict:
        mine = {"ingested": self.core.ingested, "evaluations": self.core.evaluations,
                "store": self.core.store.stats(), "replicas": len(self.core.replicas),
                "notifier": self.core.notifier.stats(), "quality": self.core.quality.stats(),
                "traces": self.core.trace_store.stats(),
                "delivery": self.core.ledger.by_deployment(), "fanin": self.core.fanin_stats()}
        if not self._front(local):
            return mine
        from ray_monitor.aggregator.shards import merge_stats

        return merge_stats([mine] + await self._peers.gather("stats", True))

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
                  rules_file: Optional[str] = None, shard: int = 0):
    """The aggregator actor (of a sharded monitor: shard ``shard``), created on the head
    node if it is not running.

    ``config`` is a :class:`StartConfig` or a mapping of its options, checked here, in the
    caller's process, so a bad one is refused before any actor starts. ``rules_text`` is
    the rule file's content (text or a dict), already checked by the caller.
    """
    config = StartConfig.of(config)
    head = _head_node_id()
    opts: dict[str, Any] = dict(name=shard_name(shard), namespace=NAMESPACE, lifetime="detached",
                                max_restarts=-1, max_task_retries=-1, get_if_exists=True,
                                max_concurrency=64)
    if head:
        # On the head node, as a requirement: a soft affinity lets the head's raylet spill
        # the actor to a worker node when it is busy starting workers (seen on a loaded
        # head), and a worker node may be scaled away, taking the windows with it. The
        # head's resource, not its node id, so a restarted head (GCS fault tolerance, a
        # new node id) takes the aggregator back.
        opts["resources"] = {HEAD_RESOURCE: 0.001}
    return Aggregator.options(**opts).remote(config, rules_text, rules_file, shard)


def _head_node_id() -> Optional[str]:
    for n in ray.nodes():
        if n.get("Alive") and HEAD_RESOURCE in n.get("Resources", {}):
            return n["NodeID"]
    return None
