"""``ray_monitor.start()``, ``connect()``, ``stop()`` and the handle they return."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import ray

from .options import AGGREGATOR_NAME, NAMESPACE

_START_OPTIONS = {"host", "port", "token", "eval_interval_s", "notifications", "gpu",
                  "gpu_interval_s", "series_ttl_s", "nvml_factory"}


class MonitorNotRunning(RuntimeError):
    """No aggregator is running in this cluster."""


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

    def __repr__(self) -> str:
        return f"Monitor(url={self.url!r})"


def _rules_source(rules: Union[None, str, Path, dict]) -> tuple[Any, Optional[str]]:
    """Rules as text (or a dict) plus a filename for error messages, checked here."""
    from .rules import load_rules

    if rules is None:
        return None, None
    if isinstance(rules, dict):
        load_rules(rules, filename="<dict>")
        return rules, "<dict>"
    if isinstance(rules, Path) or (isinstance(rules, str) and "\n" not in rules
                                   and rules.endswith((".yaml", ".yml"))):
        path = Path(rules)
        if not path.is_file():
            raise FileNotFoundError(f"rules: no file {str(path)!r}; pass a path to a YAML "
                                    "rule file, the YAML text itself, or a dict")
        text = path.read_text()
        load_rules(text, filename=str(path))
        return text, str(path)
    load_rules(rules, filename="<rules>")
    return rules, "<rules>"


def _ensure_ray() -> None:
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, ignore_reinit_error=True)


def start(rules: Union[None, str, Path, dict] = None, **options: Any) -> Monitor:
    """Starts the cluster's monitor, or returns the running one (updating its rules
    when ``rules`` is given). Options: ``host`` (127.0.0.1), ``port`` (8266; 0 for
    any), ``token``, ``eval_interval_s`` (1), ``notifications`` (see README),
    ``gpu`` (True), ``gpu_interval_s`` (1), ``series_ttl_s`` (300)."""
    unknown = set(options) - _START_OPTIONS
    if unknown:
        raise TypeError(f"ray_monitor.start(): unknown option(s) {sorted(unknown)}; "
                        f"known: {sorted(_START_OPTIONS)}")
    text, filename = _rules_source(rules)  # a bad file is refused here, before any actor
    if "notifications" in options and options["notifications"] is not None:
        from .notify import Notifier

        from .notify import NotifyConfig

        NotifyConfig.from_dict(options["notifications"])  # a bad section is refused here
    _ensure_ray()
    config = {"host": os.environ.get("RAY_MONITOR_HOST", "127.0.0.1"),
              "port": int(os.environ.get("RAY_MONITOR_PORT", "8266")),
              "token": os.environ.get("RAY_MONITOR_TOKEN") or None, **options,
              "rules_text": text, "rules_file": filename}
    from .aggregator import get_or_create

    actor = get_or_create(config)
    url = ray.get(actor.ready.remote(), timeout=120)
    if text is not None:
        ray.get(actor.reload.remote(text, filename), timeout=60)
    if options.get("notifications") is not None:
        ray.get(actor.configure.remote(options["notifications"]), timeout=60)
    return Monitor(actor, url)


def connect(timeout: float = 30.0) -> Monitor:
    """Attaches to the running monitor; raises :class:`MonitorNotRunning` if none."""
    _ensure_ray()
    try:
        actor = ray.get_actor(AGGREGATOR_NAME, namespace=NAMESPACE)
    except ValueError:
        raise MonitorNotRunning("no ray-monitor is running in this cluster; start one with "
                                "ray_monitor.start() or `ray-monitor start`") from None
    return Monitor(actor, ray.get(actor.ready.remote(), timeout=timeout))


def stop() -> bool:
    """Removes the monitor (and its GPU actors); False if none was running."""
    _ensure_ray()
    try:
        actor = ray.get_actor(AGGREGATOR_NAME, namespace=NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(actor.shutdown.remote(), timeout=30)
    except Exception:
        pass
    ray.kill(actor, no_restart=True)
    from ray.experimental import internal_kv

    from .aggregator import CONFIG_KEY, KV_NAMESPACE, PORT_KEY, STATE_KEY

    for key in (STATE_KEY, CONFIG_KEY, PORT_KEY):
        internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
    return True
