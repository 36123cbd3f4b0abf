"""The Ray Serve autoscaling policy that follows the monitor's hints.

Runs in Ray Serve's controller, inside its control loop (every 100 ms), so it never waits
on anything. For deployments that keep Serve's autoscaling::

    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

    @serve.deployment(autoscaling_config=AutoscalingConfig(
        min_replicas=1, max_replicas=8,
        policy=AutoscalingPolicy(policy_function="ray_monitor.autoscaling:MonitorPolicy",
                                 policy_kwargs={"stale_after_s": 10})))

(``policy_function="ray_monitor.autoscaling:monitor_policy"`` is the same with the
defaults.) Each tick it takes Serve's default decision (``replica_queue_length_
autoscaling_policy`` on the same context) and returns the larger of it and the hint's
``desired``, within ``capacity_adjusted_min/max_replicas``. Serve then applies its
scaling factors, ``upscale_delay_s``/``downscale_delay_s`` and bounds around that, as it
does for every custom policy. Hints come from a cache that a daemon thread refreshes
from the aggregator every ``refresh_interval_s``: the controller calls policies every
100 ms and never waits on the aggregator. With the aggregator away, its hint older than
``stale_after_s``, or no hint for the deployment, the policy returns Serve's default
decision and says so once in the controller's log (and once when hints come back).

Serve pickles this module by value into its controller, so nothing here imports the
rest of ray_monitor at call time, and a policy object pickles as its constructor
arguments (its thread and cache start afresh where it lands).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from typing import Any, Callable, Optional, Union

from ray_monitor.common.names import AGGREGATOR_NAME, NAMESPACE

__all__ = ["AggregatorHints", "MonitorPolicy", "STATE_KEY", "monitor_policy"]

# A child of Serve's logger, so that these lines land in the controller's log.
logger = logging.getLogger("ray.serve.ray_monitor")

#: The key of this policy's own entry in Serve's ``policy_state``.
STATE_KEY = "ray_monitor"
DEFAULT_STALE_AFTER_S = 10.0
DEFAULT_REFRESH_INTERVAL_S = 1.0
DEFAULT_FETCH_TIMEOUT_S = 2.0


class AggregatorHints:
    """Fetches ``Aggregator.hints()`` with a timeout; keeps the actor handle between calls."""

    def __init__(self, *, timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
                 name: str = AGGREGATOR_NAME, namespace: str = NAMESPACE):
        self.timeout_s = timeout_s
        self.name, self.namespace = name, namespace
        self._actor = None

    def __call__(self) -> list:
        import ray

        if self._actor is None:
            self._actor = ray.get_actor(self.name, namespace=self.namespace)
        try:
            return ray.get(self._actor.hints.remote(), timeout=self.timeout_s)
        except Exception:
            self._actor = None  # a killed and recreated aggregator needs a new handle
            raise


class _Cache:
    """What the refresh thread shares with the policy; never holds the policy itself,
    so a replaced policy is collected and its thread stops."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        # One tuple replaced whole: the policy reads it without a lock, in O(1).
        self.snapshot: tuple[dict, Optional[float], Optional[str]] = ({}, None, None)

    def refresh(self, fetch: Callable[[], Any], clock: Callable[[], float]) -> None:
        by_key, fetched_at, _ = self.snapshot
        try:
            hints = fetch()
            by_key = {(h["application"], h["deployment"]): h for h in hints}
            self.snapshot = (by_key, clock(), None)
        except Exception as exc:  # the aggregator being away is expected; the policy says so
            self.snapshot = (by_key, fetched_at, f"{type(exc).__name__}: {exc}"[:300])


def _run(cache: _Cache, fetch: Callable[[], Any], clock: Callable[[], float],
         interval_s: float) -> None:
    while not cache.stop.is_set():
        cache.refresh(fetch, clock)
        cache.stop.wait(interval_s)


def _default_policy(ctx):
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

    return replica_queue_length_autoscaling_policy(ctx)


def _new_policy(kwargs: dict) -> "MonitorPolicy":
    return MonitorPolicy(**kwargs)


class MonitorPolicy:
    """The larger of Serve's default decision and ray-monitor's hint; see the module doc.

    ``fetcher`` (a callable returning the aggregator's hint dicts), ``clock`` and
    ``background`` (False: no thread, call :meth:`refresh` yourself) are seams for tests.
    """

    def __init__(self, *, stale_after_s: float = DEFAULT_STALE_AFTER_S,
                 refresh_interval_s: float = DEFAULT_REFRESH_INTERVAL_S,
                 fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
                 fetcher: Optional[Callable[[], list]] = None,
                 clock: Callable[[], float] = time.time, background: bool = True):
        for name, v in (("stale_after_s", stale_after_s), ("refresh_interval_s", refresh_interval_s),
                        ("fetch_timeout_s", fetch_timeout_s)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a number of seconds above 0, got {v!r}")
        self._kwargs = dict(stale_after_s=stale_after_s, refresh_interval_s=refresh_interval_s,
                            fetch_timeout_s=fetch_timeout_s, fetcher=fetcher, clock=clock,
                            background=background)
        self.stale_after_s = float(stale_after_s)
        self.refresh_interval_s = float(refresh_interval_s)
        self._fetch = fetcher or AggregatorHints(timeout_s=fetch_timeout_s)
        self._clock = clock
        self._background = background
        self._cache = _Cache()
        self._thread: Optional[threading.Thread] = None
        self._failed: set[str] = set()

    def __reduce__(self):
        return _new_policy, ({k: v for k, v in self._kwargs.items()
                              if not (k == "clock" and v is time.time)},)

    def refresh(self) -> None:
        """Fetch hints once, now, on the calling thread (the background thread's step)."""
        self._cache.refresh(self._fetch, self._clock)

    def close(self) -> None:
        """Stop the refresh thread."""
        self._cache.stop.set()

    def _ensure_thread(self) -> None:
        if self._thread is not None or not self._background:
            return
        self._thread = threading.Thread(
            target=_run, args=(self._cache, self._fetch, self._clock, self.refresh_interval_s),
            name="ray-monitor-hints", daemon=True)
        self._thread.start()
        weakref.finalize(self, self._cache.stop.set)

    def __call__(self, ctx) -> tuple[Union[int, float], dict]:
        try:
            default, default_state = _default_policy(ctx)
        except Exception as exc:
            # Nothing sane to add to: keep Serve's current target.
            self._once("default", "Serve's default policy raised; keeping the target of "
                       f"{ctx.target_num_replicas} replicas: {type(exc).__name__}: {exc}")
            return ctx.target_num_replicas, dict(ctx.policy_state or {})
        state = {**(ctx.policy_state or {}), **(default_state or {})}
        try:
            return self._decide(ctx, default, state)
        except Exception as exc:  # never into the controller
            self._once("decide", f"ray-monitor policy failed, using Serve's default decision: "
                       f"{type(exc).__name__}: {exc}")
            return default, state

    def _once(self, cause: str, message: str) -> None:
        if cause not in self._failed:
            self._failed.add(cause)
            logger.warning("%s (logged once)", message)

    def _decide(self, ctx, default: Union[int, float], state: dict) -> tuple[Union[int, float], dict]:
        self._ensure_thread()
        by_key, fetched_at, error = self._cache.snapshot
        now = self._clock()
        app, dep = ctx.app_name, ctx.deployment_name
        hint = by_key.get((app, dep))
        mine = dict(state.get(STATE_KEY) or {})
        previous = mine.get("mode")
        fallback = None
        if fetched_at is None:
            fallback = f"the aggregator has not answered ({error})" if error else None
        elif now - fetched_at > self.stale_after_s:
            fallback = f"no answer from the aggregator for {now - fetched_at:.0f}s ({error})"
        elif hint is None:
            fallback = f"the aggregator has no hint for {app}/{dep} (is the deployment monitored?)"
        elif now - float(hint.get("updated_at") or 0.0) > self.stale_after_s:
            age = now - float(hint.get("updated_at") or 0.0)
            fallback = f"the hint for {app}/{dep} is {age:.0f}s old"
        desired = None
        if fetched_at is None and fallback is None:
            mode = "waiting"  # the first fetch is in flight: nothing to report yet
        elif fallback is not None:
            mode = "default"
            if previous != "default":
                logger.warning("ray-monitor: %s/%s: falling back to Serve's default decision: %s",
                               app, dep, fallback)
        else:
            mode = "hint"
            desired = hint.get("desired")
            if previous != "hint":
                logger.info("ray-monitor: %s/%s: following ray-monitor's hints%s", app, dep,
                            " again" if previous == "default" else "")
        decision = default
        if desired is not None and desired > default:
            decision = int(min(max(desired, ctx.capacity_adjusted_min_replicas),
                               ctx.capacity_adjusted_max_replicas))
        mine.update(mode=mode, reason=fallback, default=_json_num(default), hint_desired=desired,
                    hint_reason=hint.get("reason") if hint else None,
                    decision=_json_num(decision))
        state[STATE_KEY] = mine
        return decision, state


def _json_num(v: Union[int, float]) -> Union[int, float, None]:
    return v if isinstance(v, int) or math.isfinite(v) else None


#: The policy behind :func:`monitor_policy`; pickled into Serve's controller as a new one.
_DEFAULT_POLICY = MonitorPolicy()


def monitor_policy(ctx) -> tuple[Union[int, float], dict]:
    """:class:`MonitorPolicy` with its defaults, as a plain function:
    ``policy_function="ray_monitor.autoscaling:monitor_policy"``."""
    return _DEFAULT_POLICY(ctx)
