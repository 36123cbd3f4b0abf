"""``ray_monitor.start()``, ``connect()``, ``stop()`` and the handle they return.

Runs in the user's driver and in the CLI: it checks what it is given (rule file, options)
before anything starts, then creates or finds the aggregator actor and talks to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import ray

from ray_monitor.common import env
from ray_monitor.common.config import StartConfig
from ray_monitor.common.errors import ConfigError, MonitorNotRunning, Problem
from ray_monitor.common.names import AGGREGATOR_NAME, NAMESPACE

__all__ = ["Monitor", "connect", "record_feedback", "start", "stop"]

class Monitor:
    """A handle on the cluster's aggregator."""

    def __init__(self, actor, url: str) -> None:
        self.actor = actor
        self.url = url

    @property
    def metrics_url(self) -> str:
        return f"{self.url}/metrics"

    def _get(self, ref, timeout: float = 30.0):
        return ray.get(ref, timeout=timeout)

    def alerts(self) -> list[dict]:
        return self._get(self.actor.alerts.remote())

    def rules(self) -> list[dict]:
        return self._get(self.actor.rules.remote())

    def hints(self) -> list[dict]:
        return self._get(self.actor.hints.remote())

    def deployments(self) -> list[dict]:
        return self._get(self.actor.deployments.remote())

    def query(self, function: str, metric: str, window_s: float, by=None, param=None) -> dict:
        """One rule-language query, e.g. ``query("count", "requests", 60, by=("method",))``."""
        return self._get(self.actor.query.remote(function, metric, window_s, by, param))

    def evaluate(self, exprs: Union[str, list[str]]) -> list[list[dict]]:
        """The values of rule expressions now, whether or not their comparisons hold: per
        expression, per condition (sides of ``and``), ``{json of the group's labels:
        value}``, over the windows the next evaluation round reads. A bad expression
        raises ``ValueError`` naming the problem."""
        return self._get(self.actor.evaluate.remote([exprs] if isinstance(exprs, str)
                                                    else list(exprs)))

    def stats(self) -> dict:
        return self._get(self.actor.stats.remote())

    def gpus(self) -> dict:
        """The latest GPU snapshot of each node: ``{node_id: GpuSnapshot}``."""
        return self._get(self.actor.gpus.remote())

    def gpu_actors(self) -> dict:
        """The GPU-stats actor of each node: ``{node_id: actor handle}``."""
        return self._get(self.actor.gpu_actors.remote())

    def reload(self, rules: Union[str, Path, dict]) -> dict:
        text, filename = _rules_source(rules)
        return self._get(self.actor.reload.remote(text, filename))

    def record_feedback(self, request_id: Any, label: Any = None, *, value: Any = None) -> dict:
        """As :func:`record_feedback`, through this handle."""
        return self._get(self.actor.feedback.remote(_feedback_items(request_id, label, value)))

    def quality(self, window_s: float = 3600.0) -> list[dict]:
        """Per model (application, deployment, model_version) over the window: the
        predictions made, every quality metric with data, and drift per metric."""
        return self._get(self.actor.quality.remote(window_s))

    def set_drift_reference(self, application: str, deployment: str, references: dict, *,
                            model_version: str = "") -> dict:
        """Sets a model's drift references, e.g. from its training data:
        ``{"feature_age": [31, 45, ...], "prediction": ["spam", "ham", ...]}``."""
        return self._get(self.actor.set_drift_reference.remote(application, deployment,
                                                               model_version, references))

    def hung(self) -> list[dict]:
        """Requests running longer than their replica's ``hang_threshold_s``, with stacks."""
        return self._get(self.actor.hung.remote())

    def traces(self, kind: Optional[str] = None, limit: int = 50) -> list[dict]:
        """Kept traces of slow (``kind="slow"``) or failed (``kind="errors"``) requests,
        or both (None), newest first, each with its spans from every replica. Traces are
        kept whether or not an OTLP endpoint is configured."""
        from ray_monitor.aggregator.trace_store import check_kind, check_limit

        return self._get(self.actor.traces.remote(check_kind(kind), check_limit(limit)))

    def compare(self, deployment: str, versions: tuple[str, str], *,
                application: Optional[str] = None, window_s: float = 600.0) -> dict:
        """Two model versions side by side, each difference with its significance test."""
        return self._get(self.actor.compare.remote(deployment, tuple(versions), application,
                                                   window_s))

    def __repr__(self) -> str:
        return f"Monitor(url={self.url!r})"


def _feedback_items(request_id: Any, label: Any, value: Any) -> list:
    if isinstance(request_id, (list, tuple)):
        if label is not None or value is not None:
            raise TypeError("record_feedback([...]) takes the labels inside the items: "
                            '[{"request_id": ..., "label": ...}, ...]')
        return list(request_id)
    if label is None and value is None:
        raise TypeError("record_feedback(request_id, label) needs a label (classification) or "
                        "value=... (regression)")
    item = {"request_id": request_id}
    if label is not None:
        item["label"] = label
    if value is not None:
        item["value"] = value
    return [item]


def record_feedback(request_id: Any, label: Any = None, *, value: Any = None,
                    timeout: float = 30.0) -> dict:
    """Ground truth for earlier predictions, joined by request id (the ``X-Request-ID``
    Ray Serve returned): ``record_feedback(rid, "spam")``, ``record_feedback(rid,
    value=3.2)``, or a batch ``record_feedback([{"request_id": rid, "label": "spam"},
    ...])``. Returns ``{"counts": {status: n}, "problems": [...]}``: items that did not
    join (unknown, expired, duplicate, invalid, held for a late prediction) say why; a
    bad item never loses the rest of a batch. Raises :class:`MonitorNotRunning` when no
    monitor runs."""
    items = _feedback_items(request_id, label, value)
    return ray.get(_running_aggregator().feedback.remote(items), timeout=timeout)


def _running_aggregator():
    """The aggregator actor; :class:`MonitorNotRunning` when there is none."""
    _ensure_ray()
    try:
        return ray.get_actor(AGGREGATOR_NAME, namespace=NAMESPACE)
    except ValueError:
        raise MonitorNotRunning("no ray-monitor is running in this cluster; start one with "
                                "ray_monitor.start() or `ray-monitor start`") from None


def _rules_source(rules: Union[None, str, Path, dict], shards: int = 1
                  ) -> tuple[Any, Optional[str]]:
    """The rule file's content (text or a dict) and its name, every section checked here,
    in the caller: the aggregator gets content, never a path on another machine. With
    ``shards`` > 1, rules that aggregate across applications are refused too."""
    from ray_monitor.alerting.loader import load_rule_file
    from ray_monitor.alerting.sharding import sharding_problems

    if rules is None:
        return None, None
    rule_file = load_rule_file(rules)
    problems = sharding_problems(rule_file.ruleset, shards)
    if problems:
        raise ConfigError(problems)
    return rule_file.source, rule_file.file


def _ensure_ray() -> None:
    if not ray.is_initialized():
        ray.init(address=env.RAY_ADDRESS.get(), ignore_reinit_error=True)


def start(rules: Union[None, str, Path, dict] = None, *, config: Optional[StartConfig] = None,
          **options: Any) -> Monitor:
    """Starts the cluster's monitor, or returns the running one (updating its rules
    when ``rules`` is given).

    ``rules`` is a rule file: a path, its YAML text, or a dict. Options are the fields of
    :class:`~ray_monitor.StartConfig` (``host``, ``port``, ``token``, ``eval_interval_s``,
    ``notifications``, ``gpu``, ``gpu_interval_s``, ``series_ttl_s``,
    ``feedback_horizon_s``, ``drift_reference_size``, ...), as keywords or as ``config=``
    (keywords win). A bad rule file or option raises
    :class:`~ray_monitor.ConfigError` naming every problem, before anything starts.

    On a running monitor, the options given here (not those left to their defaults) are
    applied or refused, never ignored: a new ``host``, ``port`` or ``token`` rebinds its
    HTTP server (saved for restarts); any other option that differs from the running
    one raises ConfigError naming it (``stop()`` first to change it)."""
    cfg = StartConfig.build(config, **options)
    # A bad file is refused here, before any actor.
    text, filename = _rules_source(rules, cfg.shards)
    _ensure_ray()
    from ray_monitor.aggregator.actor import HTTP_FIELDS, get_or_create
    from ray_monitor.common.shards import save_count

    try:
        ray.get_actor(AGGREGATOR_NAME, namespace=NAMESPACE)
    except ValueError:  # none running: the count first, replicas and mergers route by it
        save_count(cfg.shards)
    actor = get_or_create(cfg, rules_text=text, rules_file=filename)
    url = _unwrapped(lambda: ray.get(actor.ready.remote(), timeout=120))
    given = {k: getattr(cfg, k) for k in cfg.model_fields_set if k != "notifications"}
    _refuse_changes(actor, {k: v for k, v in given.items() if k not in HTTP_FIELDS})
    shards = ray.get(actor.settings.remote(), timeout=60).get("shards", 1)
    if shards > 1:  # the other shards, started (or found running) like shard 0
        save_count(shards)
        others = [get_or_create(cfg.model_copy(update={"shards": shards}), rules_text=text,
                                rules_file=filename, shard=i) for i in range(1, shards)]
        _unwrapped(lambda: ray.get([a.ready.remote() for a in others], timeout=120))
    http = {k: v for k, v in given.items() if k in HTTP_FIELDS}
    if http:
        url = _unwrapped(lambda: ray.get(actor.rebind.remote(http), timeout=60))
    if text is not None:
        ray.get(actor.reload.remote(text, filename), timeout=60)
    if cfg.notifications is not None:
        ray.get(actor.configure.remote(cfg.notifications), timeout=60)
    return Monitor(actor, url)


def _unwrapped(call):
    """``call()``, raising a ConfigError from the actor as itself (not RayTaskError)."""
    try:
        return call()
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ConfigError):
            raise e.cause from None
        raise


def _refuse_changes(actor, given: dict) -> None:
    """Options that only a new aggregator can take: refused when they differ."""
    if not given:
        return
    running = ray.get(actor.settings.remote(), timeout=60)
    problems = [Problem("ray_monitor.start()", field=k, message=(
        f"the running monitor has {k}={running.get(k)!r}, not {v!r}; it cannot change "
        "while running: ray_monitor.stop() it and start it again with the new value"))
        for k, v in sorted(given.items()) if running.get(k) != v]
    if problems:
        raise ConfigError(problems)


def connect(timeout: float = 30.0) -> Monitor:
    """Attaches to the running monitor; raises :class:`MonitorNotRunning` if none."""
    actor = _running_aggregator()
    return Monitor(actor, ray.get(actor.ready.remote(), timeout=timeout))


def _running_shards() -> Optional[int]:
    """The shard count saved by the running monitor's start() (None: none saved)."""
    from ray.experimental import internal_kv

    from ray_monitor.common.names import KV_NAMESPACE
    from ray_monitor.common.shards import SHARDS_KEY

    raw = internal_kv._internal_kv_get(SHARDS_KEY, namespace=KV_NAMESPACE)
    return int(raw) if raw else None


def stop() -> bool:
    """Removes the monitor (every aggregator shard, its GPU actors and node mergers);
    False if none was running."""
    _ensure_ray()
    from ray.experimental import internal_kv

    from ray_monitor.aggregator.persistence import shard_key
    from ray_monitor.common.names import (CONFIG_KEY, KV_NAMESPACE, NOTIFY_LOG_KEY, PORT_KEY,
                                          PRICES_KEY, STATE_KEY)
    from ray_monitor.common.shards import MAX_SHARDS, SHARDS_KEY, shard_name

    shards = min(_running_shards() or 1, MAX_SHARDS)
    found = False
    for index in reversed(range(shards)):  # shard 0 last: it is the one start() finds
        try:
            actor = ray.get_actor(shard_name(index), namespace=NAMESPACE)
        except ValueError:
            continue
        found = True
        try:
            ray.get(actor.shutdown.remote(), timeout=30)
        except Exception:
            pass
        ray.kill(actor, no_restart=True)
    if not found:
        return False
    for index in range(shards):
        for key in (STATE_KEY, NOTIFY_LOG_KEY):
            internal_kv._internal_kv_del(shard_key(key, index), namespace=KV_NAMESPACE)
    # PRICES_KEY too: replicas read it every 10 s, and a later monitor started without
    # prices must not have its spans priced with this one's.
    for key in (CONFIG_KEY, PORT_KEY, SHARDS_KEY, PRICES_KEY):
        internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
    return True
