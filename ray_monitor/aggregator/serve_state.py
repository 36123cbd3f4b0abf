"""What Ray Serve runs, from its controller: the deployments an absence rule expects data from.

Runs in the aggregator actor: :func:`poll` is called on a worker thread every
:data:`POLL_S` seconds, off the evaluation loop, and its answer goes to
:meth:`~ray_monitor.aggregator.core.AggregatorCore.set_serve_state`. The controller's
view is per deployment: how many replicas are ``RUNNING``. A failed poll is counted by
the core (``ray_monitor_self_errors_total{component="serve"}``); an answer older than
:data:`MAX_AGE_S` is dropped, as Prometheus drops the series of a target it cannot
scrape, so ``absent_over_time(...) by (...)`` then names no deployment rather than a
stale list.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["MAX_AGE_S", "POLL_S", "TIMEOUT_S", "poll", "running_replicas"]

#: How often the controller is asked.
POLL_S = 5.0
#: How long one poll may take before it is given up (and counted).
TIMEOUT_S = 10.0
#: How long an answer is used while later polls fail.
MAX_AGE_S = 30.0


def running_replicas(status: Any) -> dict[tuple[str, str], int]:
    """``(application, deployment) -> replicas RUNNING`` from a ``serve.status()`` answer
    (``ServeStatus``: ``applications[app].deployments[dep].replica_states``)."""
    out: dict[tuple[str, str], int] = {}
    for app, app_status in (getattr(status, "applications", None) or {}).items():
        for dep, dep_status in (getattr(app_status, "deployments", None) or {}).items():
            states: Mapping = getattr(dep_status, "replica_states", None) or {}
            out[(str(app), str(dep))] = int(sum(n for state, n in states.items()
                                                if str(getattr(state, "value", state)) == "RUNNING"))
    return out


def poll() -> dict[tuple[str, str], int]:
    """Asks Serve's controller (blocking: call it on a worker thread). An empty answer
    when Serve has not started."""
    from ray import serve

    return running_replicas(serve.status())
