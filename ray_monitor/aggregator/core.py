"""Everything the aggregator actor does, without Ray: ingestion, the evaluation round, errors.

Runs in the aggregator actor (:mod:`~ray_monitor.aggregator.actor` wraps it), and in unit
tests, which drive it with an injected clock. It owns the stores (windows, quality,
traces), the rule and hint engines and the notifier; each round it expires old series,
evaluates every rule at one instant, hands what must be sent to the notifier's queue,
updates the autoscaling hints and saves what changed. Nothing that goes wrong in one
snapshot, rule or hint stops the others: the failure is counted by cause (the
``ray_monitor_self_errors`` counter) and logged once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from typing import Any, Callable, Mapping, Optional

from ray_monitor.aggregator import views
from ray_monitor.aggregator.persistence import StateSaver, restore_state, state_of
from ray_monitor.aggregator.serve_state import MAX_AGE_S as SERVE_STATE_MAX_AGE_S
from ray_monitor.common.catalog import is_model_query
from ray_monitor.common.config import StartConfig
from ray_monitor.common.snapshot import GpuSnapshot, ReplicaIdentity, ReplicaSnapshot
from ray_monitor.quality.compare import COMPARE_WINDOW_S, compare

__all__ = ["AggregatorCore", "CONFIG_CHECK_S", "CompositeSource", "EVAL_PHASE_S", "EXPIRE_EVERY_S",
           "FEEDBACK_PART", "REPLICA_ALIVE_S", "ROUND_WAIT_S"]

logger = logging.getLogger("ray_monitor.aggregator.actor")

#: A replica counts as running when it reported this recently (it flushes every second).
REPLICA_ALIVE_S = 5.0
#: How often the autoscaling config is checked against the running deployments.
CONFIG_CHECK_S = 30.0
#: How often series are expired: a scan of every series, not for every round.
EXPIRE_EVERY_S = 10.0
#: Rounds run this long after each whole ``eval_interval_s`` of the wall clock: replicas
#: flush on whole seconds, so their deltas of the second just ended have arrived and
#: the windows end at it (see windows.WindowStore.window_end).
EVAL_PHASE_S = 0.3
#: How much longer than the phase a round may wait for a replica whose delta of the
#: second just ended is late (a loaded node, the node merger's forward): its window
#: would otherwise end a whole second earlier until the next round, and every alert
#: reading it fire a second later. Past this the round runs with what has arrived.
ROUND_WAIT_S = 0.4
#: Feedback items joined between two yields to the event loop (a few milliseconds' work).
FEEDBACK_PART = 1000


class CompositeSource:
    """What rules and hints query: quality and drift functions go to the quality store,
    everything else to the window store."""

    def __init__(self, store, quality) -> None:
        self.store = store
        self.quality = quality

    def evaluate(self, query, now: Optional[float] = None) -> dict:
        if is_model_query(query.function, query.metric):
            return self.quality.evaluate(query, now)
        return self.store.evaluate(query, now)


class AggregatorCore:
    """The aggregator's state and decisions; tests drive it with an injected clock.

    ``config`` is a :class:`~ray_monitor.common.config.StartConfig` (or a mapping of its
    options). ``rules_text`` is the rule file's content (YAML text or a dict) and
    ``rules_file`` the name its problems are reported under. ``external_url`` is where
    the aggregator is reached (the actor sets it once its server is up). ``persist`` and
    ``load`` write and read the saved alert and hint state, ``persist_log`` and ``load_log``
    the notification log (see :mod:`~ray_monitor.aggregator.persistence`).
    """

    def __init__(self, config: "StartConfig | Mapping[str, Any] | None" = None, *,
                 rules_text: Any = None, rules_file: Optional[str] = None,
                 external_url: str = "", clock=time.time, persist=None, load=None,
                 persist_log=None, load_log=None, shard: int = 0) -> None:
        from ray_monitor.aggregator.ledger import Ledger
        from ray_monitor.aggregator.trace_store import KeptLog, TraceStore
        from ray_monitor.aggregator.windows import WindowStore
        from ray_monitor.alerting.engine import RuleEngine
        from ray_monitor.alerting.export import classic_bounds
        from ray_monitor.alerting.loader import load_rule_file
        from ray_monitor.alerting.notifier import Notifier
        from ray_monitor.autoscaling.hints import HintEngine
        from ray_monitor.quality.store import QualityStore

        self.config = config = StartConfig.of(config)
        self.shard = shard  # its index among config.shards aggregators
        self.clock = clock
        self.eval_interval_s = config.eval_interval_s
        self.store = WindowStore(clock=clock, series_ttl_s=config.series_ttl_s,
                                 max_series_per_metric=config.max_series_per_metric)
        self.quality = QualityStore(clock=clock, horizon_s=config.feedback_horizon_s,
                                    reference_size=config.drift_reference_size)
        self.source = CompositeSource(self.store, self.quality)
        self.trace_store = TraceStore(clock=clock)
        self.kept_log = KeptLog()  # where whole-request tail keeping meets
        self.ledger = Ledger()  # per replica: its totals, what arrived, its flush times
        # replica -> (identity, hung requests, when reported): the latest report only
        self.hung_latest: dict[str, tuple[ReplicaIdentity, list, float]] = {}
        self.rules_text = rules_text
        self.rules_file = rules_file or "<rules>"
        self.external_url = external_url
        rule_file = load_rule_file(self.rules_text or {"groups": []}, filename=self.rules_file,
                                   from_text=True)
        self.all_rules = rule_file.ruleset  # what /api/v1/rules lists, on every shard
        self.engine = RuleEngine(rules=self._mine(rule_file.ruleset), clock=clock,
                                 eval_interval_s=self.eval_interval_s, generator_url=external_url)
        self.store.prepare(self.engine.ruleset.queries())  # planned at load, not in a round
        #: Classic ``le`` bounds per histogram on /metrics: the defaults and every threshold
        #: a loaded rule compares a quantile with (see alerting.export.classic_bounds).
        self.classic_bounds = classic_bounds(rule_file.ruleset)
        self._serve_state_at: Optional[float] = None  # when Serve's controller last answered
        self.hints = HintEngine(config=rule_file.autoscaling, clock=clock)
        self.store.tenants.prices = rule_file.prices
        self.store.tenants.top_k = config.top_tenants
        self.on_prices: Optional[Callable[[Mapping], None]] = None  # prices changed (actor)
        self._applied: dict[tuple[str, str], int] = {}  # external scaler: last target sent
        self.config_warnings: list[str] = []  # autoscaling names no running deployment
        #: Deployments Serve runs whose applications another aggregator shard owns: not
        #: reported here, and not missing either.
        self.elsewhere: set[tuple[str, str]] = set()
        self._next_config_check = 0.0
        # start(notifications=...) is the caller's word for this start; without it, the
        # rule file's section; without that, receivers from the environment.
        notifications = config.notifications if config.notifications is not None \
            else rule_file.notifications
        self.config = config = config.model_copy(update={"notifications": notifications})
        self._persist_log = persist_log
        self.notifier = Notifier(notifications or {}, clock=clock, persist_log=persist_log)
        self.replicas: dict[str, tuple[ReplicaIdentity, float]] = {}  # replica -> (identity, seen)
        self.gpu_latest: dict[str, GpuSnapshot] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.ingested = 0
        #: Calls and snapshots by path (direct from a replica, or a node merger's forward).
        self.fanin = {"direct_calls": 0, "direct_snapshots": 0, "node_calls": 0,
                      "node_snapshots": 0, "duplicates": 0}
        self.node_reports: dict[str, dict] = {}  # node -> its merger's latest counters
        self.evaluations = 0
        self.last_eval_s = 0.0
        self._saver = StateSaver(persist) if persist is not None else None
        self._next_expire = 0.0
        if load is not None:
            self.restore(load())
        if load_log is not None:
            self.restore_log(load_log)
        self.notifier.start()  # after restore: its notification log must be loaded first

    # -- ingestion ----------------------------------------------------------------

    def ingest(self, snaps: list[ReplicaSnapshot], node_report: Optional[dict] = None) -> None:
        """Takes a batch: one replica's delivery, or a node merger's forward of its node's
        (``node_report``: the merger's counters). A snapshot received before (sent again
        after a merger died before answering) is dropped, counted."""
        now = self.clock()
        self._count_call(snaps, node_report)
        for snap in snaps:
            if self.ledger.seen(snap):
                self.fanin["duplicates"] += 1
                continue
            try:
                self.store.ingest(snap)
            except Exception as e:  # one bad snapshot never loses the rest of the batch
                self.count_error("aggregator", f"ingest_failed:{type(e).__name__}", e)
                continue
            self.replicas[snap.identity.replica] = (snap.identity, now)
            try:
                self.ledger.add(snap)
            except Exception as e:
                self.count_error("aggregator", f"ledger_failed:{type(e).__name__}", e)
            for cause, n in snap.self_errors.items():
                self.errors[("replica", cause)] = max(self.errors.get(("replica", cause), 0), n)
            self.ingested += 1
            if snap.health is not None:
                if snap.health.hung:
                    self.hung_latest[snap.identity.replica] = (snap.identity, snap.health.hung, now)
                else:
                    self.hung_latest.pop(snap.identity.replica, None)
            kept = getattr(snap, "kept_traces", None)  # absent in older replicas' pickles
            if kept:
                self.kept_log.add(kept)
            traces = getattr(snap, "traces", None)  # absent in older replicas' pickles
            if traces:
                try:
                    self.trace_store.add(traces, snap.identity, now)
                except Exception as e:
                    self.count_error("aggregator", f"traces_failed:{type(e).__name__}", e)
            predictions = getattr(snap, "predictions", None)  # absent in older replicas' pickles
            if predictions:
                try:
                    self.quality.add_predictions(predictions)
                except Exception as e:
                    self.count_error("aggregator", f"predictions_failed:{type(e).__name__}", e)

    def _count_call(self, snaps: list, report: Optional[dict]) -> None:
        f = self.fanin
        if report is None:
            f["direct_calls"] += 1
            f["direct_snapshots"] += len(snaps)
            return
        f["node_calls"] += 1
        f["node_snapshots"] += len(snaps)
        if isinstance(report, dict) and isinstance(report.get("node_id"), str):
            self.node_reports[report["node_id"]] = report

    def fanin_stats(self) -> dict:
        """Calls and snapshots received direct and through node mergers, and each
        merger's own counters as last reported (dead nodes' included until they expire)."""
        return {**self.fanin, "nodes": {k: dict(v) for k, v in self.node_reports.items()}}

    def ingest_gpu(self, snap: GpuSnapshot) -> None:
        from ray_monitor.gpu.attribution import attribute_processes

        pids = {ident.pid: ident for ident, _ in self.replicas.values()
                if ident.node_id == snap.node_id}
        snap = attribute_processes(snap, pids)
        self.gpu_latest[snap.node_id] = snap
        try:
            self.store.ingest_gpu(snap)
        except Exception as e:
            self.count_error("aggregator", f"ingest_gpu_failed:{type(e).__name__}", e)

    def feedback(self, items: list) -> dict:
        """Joins ground truth; the body of ``POST /api/v1/feedback`` and ``record_feedback``:
        counts by status and every item that did not join, with why."""
        return self.quality.add_feedback(items).as_dict()

    async def feedback_async(self, items: list) -> dict:
        """As :meth:`feedback`, FEEDBACK_PART items at a time, giving the event loop back
        in between: a 100,000-item batch never holds evaluation or HTTP for long."""
        from ray_monitor.quality.feedback import FeedbackResult

        result = FeedbackResult()
        for start in range(0, len(items), FEEDBACK_PART):
            self.quality.add_feedback(items[start:start + FEEDBACK_PART], result=result,
                                      start=start)
            await asyncio.sleep(0)
        return result.as_dict()

    def set_drift_reference(self, application: str, deployment: str, model_version: str,
                            references: dict) -> dict:
        return self.quality.set_references(application, deployment, model_version, references)

    async def set_drift_reference_async(self, application: str, deployment: str,
                                        model_version: str, references: dict) -> dict:
        """As :meth:`set_drift_reference`, the references built on a worker thread (sorting
        up to 200,000 values each), then set on the loop."""
        built = await asyncio.to_thread(self.quality.build_references, references)
        return self.set_drift_reference(application, deployment, model_version, built)

    def count_error(self, component: str, cause: str, exc: Optional[BaseException] = None) -> None:
        key = (component, cause)
        if key not in self.errors:
            logger.warning("ray-monitor aggregator: %s: %s %r (logged once)", component, cause, exc)
        self.errors[key] = self.errors.get(key, 0) + 1

    # -- evaluation -----------------------------------------------------------------

    def evaluate(self, now: Optional[float] = None):
        now = self.clock() if now is None else now
        t = time.perf_counter()
        if now >= self._next_expire:
            self._next_expire = now + EXPIRE_EVERY_S
            self.store.expire(now)
            self.quality.expire(now)
        ttl = self.config.series_ttl_s
        for rid, (_, seen) in list(self.replicas.items()):
            if now - seen > ttl:
                del self.replicas[rid]
                self.ledger.forget(rid)
        for rid, (_, _, seen) in list(self.hung_latest.items()):
            if now - seen > REPLICA_ALIVE_S:  # a replica that stopped reporting is not hanging
                del self.hung_latest[rid]
        if self._serve_state_at is not None and now - self._serve_state_at > SERVE_STATE_MAX_AGE_S:
            self._serve_state_at = None  # too old to stand for what Serve runs now
            self.store.set_serve_deployments(None)
        self.store.begin_round(now)  # one instant per round, shared work across rules
        try:
            result = self.engine.evaluate(self.source, now)
        finally:
            self.store.end_round()
        for err in getattr(result, "errors", []) or []:
            self.count_error("rules", f"eval_failed:{err.group}/{err.rule}")
        if result.to_send:
            self.notifier.submit(result.to_send, now=now)
        self.store.begin_round(now)
        try:
            hints = self.hints.update(now, current_replicas=self.current_replicas(now),
                                      firing=[a for a in result.alerts if a.state == "firing"],
                                      query=self.source.evaluate)
        except Exception as e:  # a hint bug must not stop alerting
            self.count_error("hints", f"update_failed:{type(e).__name__}", e)
            hints = []
        finally:
            self.store.end_round()
        self._apply_external(hints)
        self._check_scaling_config(now)
        self.evaluations += 1
        self.last_eval_s = time.perf_counter() - t
        self.save()
        return result

    def evaluate_exprs(self, exprs: list, now: Optional[float] = None) -> list[list[dict]]:
        """Each rule expression's conditions evaluated now, comparisons left out: per
        expression, per condition, ``{json of the group's labels: value}``. Raises
        ``ValueError`` naming what is wrong with an expression."""
        from ray_monitor.alerting.expr import parse_expr

        out = []
        for expr in exprs:
            values = []
            for cond in parse_expr(expr):
                res = self.source.evaluate(cond.query, now)
                values.append({json.dumps(dict(k), sort_keys=True): v for k, v in res.items()})
            out.append(values)
        return out

    def round_time(self, now: float) -> float:
        """A round's evaluation timestamp: the last grid point (:data:`EVAL_PHASE_S` past
        a multiple of ``eval_interval_s``, at most half an interval) at or before ``now``.
        As in Prometheus, ``for: 3s`` is then three rounds however late each ran (by wall
        clock a round 2 ms late read 2.998 s and fired a whole round later)."""
        interval = self.eval_interval_s
        phase = min(EVAL_PHASE_S, interval / 2)
        return math.floor((now - phase) / interval) * interval + phase

    def next_round_at(self, now: float) -> float:
        """When the next evaluation round runs: the first point of the round grid after
        ``now`` (see :meth:`round_time`); a round that overran skips the points it missed."""
        return self.round_time(now) + self.eval_interval_s

    def round_ready(self, now: Optional[float] = None) -> bool:
        """Whether a round at ``now`` reads complete seconds up to the last whole one
        (the actor waits up to :data:`ROUND_WAIT_S` for this before evaluating)."""
        return self.store.complete(self.clock() if now is None else now)

    def current_replicas(self, now: float) -> dict[tuple[str, str], int]:
        """Replicas per deployment that reported in the last few flushes."""
        out: dict[tuple[str, str], int] = {}
        for ident, seen in self.replicas.values():
            if now - seen <= REPLICA_ALIVE_S:
                key = (ident.application, ident.deployment)
                out[key] = out.get(key, 0) + 1
        return out

    def _check_scaling_config(self, now: float) -> None:
        """Deployments named by the autoscaling config or a scale action that are not
        running: reported (log once, /api/v1/hints warnings), not refused, since rules
        are often loaded before ``serve.run``."""
        from ray_monitor.autoscaling.hints import validate_against

        if now < self._next_config_check:
            return
        self._next_config_check = now + CONFIG_CHECK_S
        known = set(self.current_replicas(now)) | self.elsewhere
        if not known:  # nothing has reported yet: nothing to check against
            return
        problems = validate_against(self.hints.config, known, ruleset=self.engine.ruleset)
        for problem in problems:
            if problem not in self.config_warnings:
                logger.warning("ray-monitor: %s", problem)
        self.config_warnings = problems

    def _apply_external(self, hints) -> None:
        """Deployments with ``apply: external`` are scaled through Serve's external
        scaler endpoint, off the evaluation loop, only when the target changes."""
        for h in hints:
            key = (h.application, h.deployment)
            if h.apply != "external" or h.desired is None or self._applied.get(key) == h.desired:
                continue
            self._applied[key] = h.desired
            threading.Thread(target=self._post_scale, args=(h,), daemon=True).start()

    def _post_scale(self, hint) -> None:
        from ray_monitor.autoscaling.external import apply_external

        try:
            apply_external(hint, dashboard_url=self.config.dashboard_url,
                           headers=_ray_auth_headers())
        except Exception as e:
            self._applied.pop((hint.application, hint.deployment), None)
            self.count_error("hints", f"external_scale_failed:{type(e).__name__}", e)

    # -- saved state ------------------------------------------------------------------

    def state(self) -> dict:
        return state_of(self.engine, self.hints)

    def save(self) -> None:
        if self._saver is None:
            return
        try:
            self._saver.save(self.state())
        except Exception as e:
            self.count_error("aggregator", "state_save_failed", e)

    def restore(self, raw: Optional[bytes]) -> None:
        if not raw:
            return
        try:
            state = json.loads(raw)
            restore_state(state, self.engine, self.hints, now=self.clock())
            if state.get("notifier"):  # saved by a version that kept the log here
                self.notifier.restore(state["notifier"], restarted=True)
            if self._saver is not None:
                self._saver.restored(state)
            logger.info("ray-monitor aggregator: restored %d alerts from the GCS",
                        len(self.engine.alerts()))
        except Exception as e:
            self.count_error("aggregator", "state_restore_failed", e)

    def restore_log(self, load_log) -> None:
        """The notification log as the notifier last saved it (before each send)."""
        try:
            log = load_log()
            if log:
                self.notifier.restore(log, restarted=True)
        except Exception as e:
            self.count_error("aggregator", "notification_log_restore_failed", e)

    # -- changes after start ----------------------------------------------------------

    def reload(self, rules_text: Any, filename: Optional[str] = None) -> dict:
        """Replaces the rules, autoscaling and (when the file has that section) the
        receivers, all or nothing: a bad file raises ConfigError and changes nothing."""
        return self.apply_rules(self.read_rules(rules_text, filename), rules_text, filename)

    def read_rules(self, rules_text: Any, filename: Optional[str] = None):
        """The rule file, read and checked (changes nothing: may run on another thread)."""
        from ray_monitor.alerting.loader import load_rule_file
        from ray_monitor.alerting.sharding import sharding_problems
        from ray_monitor.common.errors import ConfigError

        rule_file = load_rule_file(rules_text, filename=filename or self.rules_file,
                                   from_text=True)
        problems = sharding_problems(rule_file.ruleset, self.config.shards)
        if problems:
            raise ConfigError(problems)
        return rule_file

    def apply_rules(self, rule_file, rules_text: Any, filename: Optional[str] = None) -> dict:
        """Puts a file :meth:`read_rules` read in place of the running one."""
        self.engine.reload(self._mine(rule_file.ruleset), now=self.clock())
        self.store.prepare(self.engine.ruleset.queries())
        self.all_rules = rule_file.ruleset
        self._add_bounds(rule_file.ruleset)
        self.hints.reload(rule_file.autoscaling)
        self.store.tenants.prices = rule_file.prices
        if self.on_prices is not None:
            self.on_prices(rule_file.prices)
        if rule_file.notifications is not None:
            self.configure_notifications(rule_file.notifications)
        self._next_config_check = 0.0  # check the new names at the next evaluation
        self.rules_text, self.rules_file = rules_text, filename or self.rules_file
        return {"status": "ok", "rules": sum(1 for _ in rule_file.ruleset.rules())}

    def _add_bounds(self, ruleset) -> None:
        """New thresholds become classic bounds; bounds of thresholds that went stay until
        a restart, so a reload back and forth does not make and end ``le`` series (see the
        README on what a new bound does to a Prometheus rate over the change)."""
        from ray_monitor.alerting.export import classic_bounds

        for name, bounds in classic_bounds(ruleset).items():
            self.classic_bounds[name] = tuple(sorted(set(self.classic_bounds.get(name, ()))
                                                     | set(bounds)))

    def set_serve_state(self, running: Optional[dict], now: Optional[float] = None) -> None:
        """What Ray Serve's controller says it runs (``serve_state.poll``); rules with
        ``absent_over_time(...) by (...)`` expect data from each deployment with a replica
        running. Kept for :data:`SERVE_STATE_MAX_AGE_S` while later polls fail."""
        self._serve_state_at = self.clock() if now is None else now
        self.store.set_serve_deployments(running)

    def serve_running(self) -> dict[tuple[str, str], int]:
        """``(application, deployment) -> replicas running``, as last polled (fresh only)."""
        return dict(self.store.serve_deployments or {})

    def set_external_url(self, url: str) -> None:
        """Where the aggregator is reached: alerts link to it (``generatorURL``)."""
        self.external_url = url
        self.engine.generator_url = url

    def configure_notifications(self, notifications: Optional[dict]) -> None:
        """Replaces the receivers; the notification log carries over (no duplicates)."""
        from ray_monitor.alerting.notifier import Notifier

        new = Notifier(notifications or {}, clock=self.clock, persist_log=self._persist_log)
        new.restore(self.notifier.state_dict())
        self.notifier.close(2.0)
        self.notifier = new.start()
        self.config = self.config.model_copy(update={"notifications": notifications})

    # -- what the API shows (shaped in views) -------------------------------------------

    def alerts(self) -> list[dict]:
        return views.alerts(self.engine.alerts(), self.hung())

    def hung(self) -> list[dict]:
        """The hung requests each replica reported last, oldest first within a replica."""
        return views.hung(self.hung_latest)

    def rules(self) -> list[dict]:
        return views.rules(self.all_rules)

    def _mine(self, ruleset):
        """The rules this shard evaluates: all but those pinned to another's application."""
        from ray_monitor.alerting.sharding import rules_for_shard

        return rules_for_shard(ruleset, self.shard, self.config.shards)

    def deployments(self, now: Optional[float] = None) -> list[dict]:
        now = self.clock() if now is None else now
        return views.deployments(self.store, self.replicas, now, REPLICA_ALIVE_S)

    def quality_summary(self, window_s: float = 0.0) -> list[dict]:
        return views.quality_summary(self.quality, window_s)

    def traces(self, kind: Optional[str] = None, limit: int = 50) -> list[dict]:
        """Kept traces of slow (``slow``) or failed (``errors``) requests, or both
        (None), newest first, each with its spans (see :mod:`~ray_monitor.aggregator.trace_store`)."""
        return self.trace_store.traces(kind, limit)

    def compare(self, deployment: str, versions: tuple[str, str], *,
                application: Optional[str] = None, window_s: float = COMPARE_WINDOW_S,
                now: Optional[float] = None) -> dict:
        """Two model versions of a deployment side by side over a window, each difference
        with its test (see :func:`~ray_monitor.quality.compare.compare`)."""
        now = self.clock() if now is None else now
        return compare(self.store, self.quality, deployment, versions, now=now,
                       application=application, window_s=window_s)

    def self_metrics(self) -> dict:
        """The monitor's own health for ``/metrics`` (``ray_monitor_self_*``): errors by
        component and cause, gauges and counters, each with its help text."""
        errors = dict(self.errors)
        for cause, n in (self.notifier.stats().get("by_cause") or {}).items():
            errors[("notifier", str(cause))] = n
        gauges = {  # the series count only: stats() reads every ring (~20 ms, on the loop)
            "series": ("Series held by the aggregator's window store.",
                       float(self.store.series_count())),
            "replicas": ("Replicas that reported in the last series_ttl_s.",
                         float(len(self.replicas))),
            "last_evaluation_seconds": ("How long the last rule evaluation took.",
                                        self.last_eval_s),
            "replica_flush_seconds": (
                "The longest flush (snapshot and delivery) the running replicas reported "
                "last; over 1 s, the replicas' flush thread waits on something.",
                self.ledger.flush_now_max_s({r for r, (_, seen) in self.replicas.items()
                                             if self.clock() - seen <= REPLICA_ALIVE_S})),
        }
        counters = {
            "snapshots_ingested": ("Replica snapshots ingested.", float(self.ingested)),
            "evaluations": ("Rule evaluations run.", float(self.evaluations)),
        }
        ts = self.trace_store.stats()
        gauges["traces_kept"] = ("Traces of slow or failed requests the aggregator keeps.",
                                 float(ts["traces"]))
        counters["trace_spans_received"] = ("Span records received from replicas.",
                                            float(ts["spans_received"]))
        counters["ingest_calls_direct"] = ("Deliveries received from replicas directly (their "
                                           "node had no merger yet, or node_fanin is off).",
                                           float(self.fanin["direct_calls"]))
        counters["ingest_calls_node"] = ("Forwards received from node mergers, each carrying "
                                         "the deliveries of its node's replicas.",
                                         float(self.fanin["node_calls"]))
        counters["ingest_duplicates"] = ("Snapshots received a second time (a node merger "
                                         "died before answering) and dropped.",
                                         float(self.fanin["duplicates"]))
        # A restarted merger counts from 0 again (a counter reset, as the GPU actors').
        counters["ingest_calls_socket"] = (
            "Replica deliveries node mergers received over their node's Unix socket (the "
            "rest of their deliveries came by Ray actor call).",
            float(sum(r.get("socket_calls", 0) for r in self.node_reports.values())))
        counters["node_snapshots_dropped"] = (
            "Snapshots node mergers dropped while the aggregator was away (past their bound).",
            float(sum(r.get("dropped", 0) for r in self.node_reports.values())))
        counters["trace_kept_ids"] = ("Trace ids replicas kept, named back to every replica "
                                      "so it exports what it holds of them.",
                                      float(self.kept_log.seq))
        counters["trace_kept_ids_missed"] = ("Kept trace ids a replica was not told of (it "
                                             "fell behind the kept log).",
                                             float(self.kept_log.missed))
        q = self.quality.stats()
        gauges["predictions_pending"] = ("Captured predictions waiting for their feedback.",
                                         float(q["pending"]))
        for name, help_ in (
                ("predictions", "Captured predictions received."),
                ("predictions_joined", "Predictions joined with their ground truth."),
                ("predictions_expired", "Predictions that got no feedback within the horizon."),
                ("predictions_dropped", "Predictions dropped to bound the join's memory."),
                ("feedback_joined", "Feedback items joined with a prediction."),
                ("feedback_duplicate", "Feedback items for a request that already had one."),
                ("feedback_unknown", "Feedback items for no known prediction."),
                ("feedback_expired", "Feedback items that came after the horizon."),
                ("feedback_dropped", "Feedback items for a prediction dropped to bound memory."),
                ("feedback_invalid", "Feedback items refused as malformed.")):
            counters[name] = (help_, float(q[name]))
        # Per node: the GPU actor's counts are cumulative since it started (a new actor
        # starts again from 0, a counter reset); a dead node's are dropped with its sample.
        gpu_errors = {node: dict(snap.self_errors) for node, snap in self.gpu_latest.items()
                      if snap.self_errors}
        return {"errors": errors, "gauges": gauges, "counters": counters,
                "gpu_errors": gpu_errors}


def _ray_auth_headers() -> dict:
    """Ray's dashboard wants its token when token authentication is on."""
    try:
        from ray._private.authentication.http_token_authentication import (
            get_auth_headers_if_auth_enabled)

        return dict(get_auth_headers_if_auth_enabled({}) or {})
    except Exception:
        return {}
