"""The aggregator actor: one per cluster, named, detached, restartable.

Plumbing only: the decisions live in pure modules (windows, rules, notify, hints).
Everything runs on the actor's event loop, so ingestion, evaluation and the HTTP
server never race; evaluation happens every ``eval_interval_s`` and hands alerts to
the notifier's queue, which sends from a thread of its own. Alert and notification
state is written to Ray's GCS key-value store after each evaluation that changed
it, so a restarted aggregator resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from typing import Any, Optional

import ray

from ray_monitor.common.names import (AGGREGATOR_NAME, CONFIG_KEY, KV_NAMESPACE, NAMESPACE,
                                      PORT_KEY, STATE_KEY)
from ray_monitor.common.snapshot import GpuSnapshot, ReplicaIdentity, ReplicaSnapshot

logger = logging.getLogger("ray_monitor.aggregator.actor")

#: Summaries per deployment read these windows.
SUMMARY_WINDOW_S = 60.0
#: A replica counts as running when it reported this recently (it flushes every second).
REPLICA_ALIVE_S = 5.0
#: How often the autoscaling config is checked against the running deployments.
CONFIG_CHECK_S = 30.0
#: Default window of ``compare``.
COMPARE_WINDOW_S = 600.0


class CompositeSource:
    """What rules and hints query: quality and drift functions go to the quality store,
    everything else to the window store."""

    def __init__(self, store, quality) -> None:
        self.store = store
        self.quality = quality

    def evaluate(self, query, now: Optional[float] = None) -> dict:
        from ray_monitor.common.catalog import is_model_query

        if is_model_query(query.function, query.metric):
            return self.quality.evaluate(query, now)
        return self.store.evaluate(query, now)


def _kv_get(key: bytes) -> Optional[bytes]:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)


def _kv_put(key: bytes, value: bytes) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, value, overwrite=True, namespace=KV_NAMESPACE)


class AggregatorCore:
    """Everything the actor does, without Ray: tests drive it with an injected clock."""

    def __init__(self, config: dict, *, clock=time.time, persist=None, load=None) -> None:
        from ray_monitor.autoscaling.hints import HintEngine, load_hint_config
        from ray_monitor.alerting.notify import Notifier
        from ray_monitor.quality.store import QualityStore
        from ray_monitor.alerting.rules import RuleEngine, load_rules
        from ray_monitor.aggregator.trace_store import TraceStore
        from ray_monitor.aggregator.windows import WindowStore

        self.config = config
        self.clock = clock
        self.eval_interval_s = float(config.get("eval_interval_s", 1.0))
        self.store = WindowStore(clock=clock, series_ttl_s=float(config.get("series_ttl_s", 300.0)))
        self.quality = QualityStore(
            clock=clock, horizon_s=float(config.get("feedback_horizon_s", 3600.0)),
            reference_size=int(config.get("drift_reference_size", 1000)))
        self.source = CompositeSource(self.store, self.quality)
        self.trace_store = TraceStore(clock=clock)
        # replica -> (identity, hung requests, when reported): the latest report only
        self.hung_latest: dict[str, tuple[ReplicaIdentity, list, float]] = {}
        self.rules_text = config.get("rules_text")
        self.rules_file = config.get("rules_file") or "<rules>"
        ruleset = load_rules(self.rules_text or {"groups": []}, filename=self.rules_file)
        self.engine = RuleEngine(rules=ruleset, clock=clock, eval_interval_s=self.eval_interval_s,
                                 generator_url=config.get("external_url", ""))
        self.hints = HintEngine(config=load_hint_config(self.rules_text, filename=self.rules_file),
                                clock=clock)
        self._applied: dict[tuple[str, str], int] = {}  # external scaler: last target sent
        self.config_warnings: list[str] = []  # autoscaling names no running deployment
        self._next_config_check = 0.0
        self.notifier = Notifier(config.get("notifications") or {}, clock=clock)
        self.replicas: dict[str, tuple[ReplicaIdentity, float]] = {}  # replica -> (identity, seen)
        self.gpu_latest: dict[str, GpuSnapshot] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.ingested = 0
        self.evaluations = 0
        self.last_eval_s = 0.0
        self._persist = persist
        self._next_expire = 0.0
        self._last_state: Optional[str] = None
        if load is not None:
            self.restore(load())
        self.notifier.start()  # after restore: its notification log must be loaded first

    # -- ingestion ----------------------------------------------------------------

    def ingest(self, snaps: list[ReplicaSnapshot]) -> None:
        now = self.clock()
        for snap in snaps:
            try:
                self.store.ingest(snap)
            except Exception as e:  # one bad snapshot never loses the rest of the batch
                self.count_error("aggregator", f"ingest_failed:{type(e).__name__}", e)
                continue
            self.replicas[snap.identity.replica] = (snap.identity, now)
            for cause, n in snap.self_errors.items():
                self.errors[("replica", cause)] = max(self.errors.get(("replica", cause), 0), n)
            self.ingested += 1
            if snap.health is not None:
                if snap.health.hung:
                    self.hung_latest[snap.identity.replica] = (snap.identity, snap.health.hung, now)
                else:
                    self.hung_latest.pop(snap.identity.replica, None)
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

    def feedback(self, items: list) -> dict:
        """Joins ground truth; the body of ``POST /api/v1/feedback`` and ``record_feedback``:
        counts by status and every item that did not join, with why."""
        return self.quality.add_feedback(items).as_dict()

    def set_drift_reference(self, application: str, deployment: str, model_version: str,
                            references: dict) -> dict:
        return self.quality.set_references(application, deployment, model_version, references)

    def traces(self, kind: Optional[str] = None, limit: int = 50) -> list[dict]:
        """Kept traces of slow (``slow``) or failed (``errors``) requests, or both
        (None), newest first, each with its spans (see :mod:`~ray_monitor.aggregator.trace_store`)."""
        return self.trace_store.traces(kind, limit)

    def hung(self) -> list[dict]:
        """The hung requests each replica reported last, oldest first within a replica."""
        out = []
        for rid, (ident, hung, seen) in sorted(self.hung_latest.items()):
            for h in hung:
                out.append({"application": ident.application, "deployment": ident.deployment,
                            "replica": rid, "model_version": ident.model_version,
                            "node": ident.node_id, "method": h.method,
                            "request_id": h.request_id, "running_s": h.running_s,
                            "stack": h.stack, "reported_at": seen})
        return out

    def ingest_gpu(self, snap: GpuSnapshot) -> None:
        from ray_monitor.gpu.sampler import attribute_processes

        pids = {ident.pid: ident for ident, _ in self.replicas.values()
                if ident.node_id == snap.node_id}
        snap = attribute_processes(snap, pids)
        self.gpu_latest[snap.node_id] = snap
        try:
            self.store.ingest_gpu(snap)
        except Exception as e:
            self.count_error("aggregator", f"ingest_gpu_failed:{type(e).__name__}", e)

    def count_error(self, component: str, cause: str, exc: Optional[BaseException] = None) -> None:
        key = (component, cause)
        if key not in self.errors:
            logger.warning("ray-monitor aggregator: %s: %s %r (logged once)", component, cause, exc)
        self.errors[key] = self.errors.get(key, 0) + 1

    # -- evaluation -----------------------------------------------------------------

    def evaluate(self, now: Optional[float] = None):
        now = self.clock() if now is None else now
        t = time.perf_counter()
        if now >= self._next_expire:  # a scan of every series: not every second
            self._next_expire = now + 10.0
            self.store.expire(now)
            self.quality.expire(now)
        ttl = float(self.config.get("series_ttl_s", 300.0))
        for rid, (_, seen) in list(self.replicas.items()):
            if now - seen > ttl:
                del self.replicas[rid]
        for rid, (_, _, seen) in list(self.hung_latest.items()):
            if now - seen > REPLICA_ALIVE_S:  # a replica that stopped reporting is not hanging
                del self.hung_latest[rid]
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
        known = set(self.current_replicas(now))
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
            apply_external(hint, dashboard_url=self.config.get("dashboard_url",
                                                               "http://127.0.0.1:8265"),
                           headers=_ray_auth_headers())
        except Exception as e:
            self._applied.pop((hint.application, hint.deployment), None)
            self.count_error("hints", f"external_scale_failed:{type(e).__name__}", e)

    def state(self) -> dict:
        return {"alerts": self.engine.state_dict(), "notifier": self.notifier.state_dict(),
                "hints": self.hints.state_dict()}

    def save(self) -> None:
        if self._persist is None:
            return
        text = json.dumps(self.state(), sort_keys=True)
        if text != self._last_state:
            try:
                self._persist(text.encode())
                self._last_state = text
            except Exception as e:
                self.count_error("aggregator", "state_save_failed", e)

    def restore(self, raw: Optional[bytes]) -> None:
        if not raw:
            return
        try:
            state = json.loads(raw)
            self.engine.restore(state.get("alerts", {}), now=self.clock())
            self.notifier.restore(state.get("notifier", {}))
            if state.get("hints"):
                self.hints.restore(state["hints"])
            self._last_state = json.dumps(state, sort_keys=True)
            logger.info("ray-monitor aggregator: restored %d alerts from the GCS",
                        len(self.engine.alerts()))
        except Exception as e:
            self.count_error("aggregator", "state_restore_failed", e)

    def reload(self, rules_text: Any, filename: Optional[str] = None) -> dict:
        from ray_monitor.alerting.rules import load_rules

        from ray_monitor.autoscaling.hints import load_hint_config

        ruleset = load_rules(rules_text, filename=filename or self.rules_file)  # raises first
        hint_config = load_hint_config(rules_text, filename=filename or self.rules_file)
        self.engine.reload(ruleset, now=self.clock())
        self.hints.reload(hint_config)
        self._next_config_check = 0.0  # check the new names at the next evaluation
        self.rules_text, self.rules_file = rules_text, filename or self.rules_file
        return {"status": "ok", "rules": sum(1 for _ in ruleset.rules())}

    def configure_notifications(self, notifications: Optional[dict]) -> None:
        """Replaces the receivers; the notification log carries over (no duplicates)."""
        from ray_monitor.alerting.notify import Notifier

        new = Notifier(notifications or {}, clock=self.clock)
        new.restore(self.notifier.state_dict())
        self.notifier.close(2.0)
        self.notifier = new.start()
        self.config["notifications"] = notifications

    # -- views ------------------------------------------------------------------------

    def alerts(self) -> list[dict]:
        """Alerts as the API shows them; one whose labels name a replica that reports
        hung requests carries them (with the replica's stacks) under ``hung``."""
        hung: dict[str, list[dict]] = {}
        for h in self.hung():
            hung.setdefault(h["replica"], []).append(h)
        out = []
        for a in self.engine.alerts():
            view = {"name": a.labels.get("alertname", ""), "state": a.state,
                    "labels": dict(a.labels), "annotations": dict(a.annotations),
                    "value": _num(a.value), "active_at": a.active_at,
                    "fired_at": a.fired_at, "resolved_at": a.resolved_at}
            if a.labels.get("replica") in hung:
                view["hung"] = hung[a.labels["replica"]]
            out.append(view)
        return out

    def quality_summary(self, window_s: float = 0.0) -> list[dict]:
        from ray_monitor.quality.store import GAUGE_WINDOW_S

        return self.quality.summary(window_s or GAUGE_WINDOW_S)

    def compare(self, deployment: str, versions: tuple[str, str], *,
                application: Optional[str] = None, window_s: float = COMPARE_WINDOW_S,
                now: Optional[float] = None) -> dict:
        """Two model versions of a deployment side by side over a window, each difference
        with its test (see :func:`~ray_monitor.quality.store.compare_versions`)."""
        from ray_monitor.common.catalog import Query
        from ray_monitor.common.matchers import Matcher
        from ray_monitor.quality.store import COMPARE_QUANTILES, compare_versions, quantile_levels

        if not (isinstance(deployment, str) and deployment):
            raise ValueError("deployment must name a deployment")
        if len(versions) != 2 or not all(isinstance(v, str) for v in versions):
            raise ValueError(f"versions must be two model versions, got {versions!r}")
        if not window_s > 0:
            raise ValueError(f"window_s must be above 0, got {window_s!r}")
        now = self.clock() if now is None else now
        window_s = min(float(window_s), self.store.max_window_s)

        def figures(version: str) -> dict:
            ms = [Matcher("deployment", "=", deployment), Matcher("model_version", "=", version)]
            if application is not None:
                ms.append(Matcher("application", "=", application))

            def one(function: str, metric: str, param=None) -> Optional[float]:
                res = self.store.evaluate(Query(function, metric, window_s, None, tuple(ms),
                                                param), now)
                return res.get(())

            n_lat = int(one("count", "latency_seconds") or 0)
            quantiles = {}
            for name, q in COMPARE_QUANTILES:
                levels = quantile_levels(q, n_lat)
                if levels is None:
                    continue
                quantiles[name] = {"value": one("quantile", "latency_seconds", q),
                                   "low": one("quantile", "latency_seconds", levels[0]),
                                   "high": one("quantile", "latency_seconds", levels[1])}
            return {"model_version": version, "window_s": window_s,
                    "requests": int(one("count", "requests") or 0),
                    "errors": int(one("count", "errors") or 0), "latency_count": n_lat,
                    "quantiles": quantiles,
                    "quality": self.quality.figures(deployment=deployment, model_version=version,
                                                    window_s=window_s, application=application,
                                                    now=now)}

        a, b = figures(versions[0]), figures(versions[1])
        return {"deployment": deployment, "application": application, "window_s": window_s,
                "versions": list(versions), "figures": [a, b], "rows": compare_versions(a, b)}

    def rules(self) -> list[dict]:
        out = []
        for group, rule in self.engine.ruleset.rules():
            out.append({"group": group.name, "alert": rule.name, "expr": rule.expr,
                        "for": rule.for_s, "keep_firing_for": rule.keep_firing_for_s,
                        "labels": dict(rule.labels)})
        return out

    def deployments(self, now: Optional[float] = None) -> list[dict]:
        from ray_monitor.common.catalog import Query

        now = self.clock() if now is None else now
        by = ("application", "deployment")
        w = SUMMARY_WINDOW_S

        def q(func: str, metric: str, param=None) -> dict:
            return self.store.evaluate(Query(func, metric, w, by, (), param), now)

        rate, errs = q("rate", "requests"), q("error_ratio", "requests")
        p50, p99 = q("p50", "latency_seconds"), q("p99", "latency_seconds")
        count = q("count", "requests")
        inflight = self.store.evaluate(Query("last", "inflight", 5.0, by), now)
        replicas: dict[tuple, set] = {}
        versions: dict[tuple, set] = {}
        for ident, seen in self.replicas.values():
            key = (("application", ident.application), ("deployment", ident.deployment))
            if now - seen <= REPLICA_ALIVE_S:  # running now, as the hints count them
                replicas.setdefault(key, set()).add(ident.replica)
            if ident.model_version:
                versions.setdefault(key, set()).add(ident.model_version)
        out = []
        for key in sorted(set(replicas) | set(rate)):
            d = dict(key)
            out.append({**d, "replicas": len(replicas.get(key, ())),
                        "model_versions": sorted(versions.get(key, ())),
                        "requests_1m": _num(count.get(key)), "rate_per_s": _num(rate.get(key)),
                        "error_ratio": _num(errs.get(key)), "p50_s": _num(p50.get(key)),
                        "p99_s": _num(p99.get(key)), "inflight": _num(inflight.get(key))})
        return out

    def self_metrics(self) -> dict:
        errors = dict(self.errors)
        for cause, n in (self.notifier.stats().get("by_cause") or {}).items():
            errors[("notifier", str(cause))] = n
        st = self.store.stats()
        gauges = {
            "series": ("Series held by the aggregator's window store.",
                       float(sum(st.get("series", {}).values())
                             if isinstance(st.get("series"), dict) else st.get("series", 0))),
            "replicas": ("Replicas that reported in the last series_ttl_s.",
                         float(len(self.replicas))),
            "last_evaluation_seconds": ("How long the last rule evaluation took.",
                                        self.last_eval_s),
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
        return {"errors": errors, "gauges": gauges, "counters": counters}


def _ray_auth_headers() -> dict:
    """Ray's dashboard wants its token when token authentication is on."""
    try:
        from ray._private.authentication.http_token_authentication import (
            get_auth_headers_if_auth_enabled)

        return dict(get_auth_headers_if_auth_enabled({}) or {})
    except Exception:
        return {}


def _num(v):
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None  # JSON has no NaN or Infinity


@ray.remote(num_cpus=0)
class Aggregator:
    """The actor around :class:`AggregatorCore`: the loop, the HTTP server, the GCS."""

    def __init__(self, config: dict) -> None:
        saved = _kv_get(CONFIG_KEY)
        if saved:
            config = {**config, **json.loads(saved)}
        self.config = config
        self.core = AggregatorCore(config, persist=lambda b: _kv_put(STATE_KEY, b),
                                   load=lambda: _kv_get(STATE_KEY))
        self.host = config.get("host", "127.0.0.1")
        self.port = int(config.get("port", 0))
        self.token = config.get("token") or None
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
        prev = _kv_get(PORT_KEY)
        port = self.port or (int(prev) if prev else 0)
        for attempt in range(40):
            try:
                self._server, self.port = await start_server(self, self.host, port)
                break
            except OSError:
                if attempt == 39:
                    raise
                await asyncio.sleep(0.25)
        _kv_put(PORT_KEY, str(self.port).encode())
        self.core.config["external_url"] = self.url()
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())
        if self.config.get("gpu", True):
            from ray_monitor.gpu.actor import GpuActorManager

            self._gpu = GpuActorManager(
                sink=AGGREGATOR_NAME, namespace=NAMESPACE,
                gpu_interval_s=float(self.config.get("gpu_interval_s", 1.0)),
                nvml_factory=self.config.get("nvml_factory"))

    async def _loop(self) -> None:
        next_gpu = 0.0
        while True:
            started = time.monotonic()
            try:
                self.core.evaluate()
            except Exception as e:  # the loop must outlive any bad round
                self.core.count_error("aggregator", f"evaluate_failed:{type(e).__name__}", e)
            if self._gpu is not None and started >= next_gpu:
                next_gpu = started + 3.0
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

    def _save_config(self) -> None:
        core = self.core
        _kv_put(CONFIG_KEY, json.dumps({"rules_text": core.rules_text, "rules_file": core.rules_file,
                                        "notifications": core.config.get("notifications")}
                                       ).encode())

    async def reload(self, rules_text: Any, filename: Optional[str] = None) -> dict:
        res = self.core.reload(rules_text, filename)
        self._save_config()
        return res

    async def configure(self, notifications: Optional[dict]) -> None:
        self.core.configure_notifications(notifications)
        self._save_config()

    async def query(self, function: str, metric: str, window_s: float,
                    by: Optional[tuple] = None, param: Optional[float] = None) -> dict:
        from ray_monitor.common.catalog import Query

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


def get_or_create(config: dict):
    """The aggregator actor, created on the head node if it is not running."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = _head_node_id()
    opts: dict[str, Any] = dict(name=AGGREGATOR_NAME, namespace=NAMESPACE, lifetime="detached",
                                max_restarts=-1, max_task_retries=-1, get_if_exists=True,
                                max_concurrency=64)
    if head:
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=True)
    return Aggregator.options(**opts).remote(config)


def _head_node_id() -> Optional[str]:
    for n in ray.nodes():
        if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {}):
            return n["NodeID"]
    return None
