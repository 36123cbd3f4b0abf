"""What the aggregator shows: the JSON shapes of its API, the CLI and the status page.

Runs in the aggregator actor. Pure functions from the stores and the core's bookkeeping
to JSON-ready lists and dicts: the deployments table, alerts (with the hung requests of
the replica they name), hung requests, rules, the quality summary, one query as a time
series for the page's charts, the GPUs of each node, and the kept traces. A bad query
parameter raises :class:`~ray_monitor.common.errors.BadRequest` naming it; the HTTP layer
answers it with its status.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional

from ray_monitor.aggregator.tenants import OTHER
from ray_monitor.aggregator.trace_store import MAX_LIMIT, check_kind, check_limit
from ray_monitor.common.catalog import ALIASES, FUNCTIONS, METRICS, Query
from ray_monitor.common.errors import BadRequest
from ray_monitor.quality.store import GAUGE_WINDOW_S

__all__ = ["DEFAULT_BY", "DEFAULT_STEP_S", "DEFAULT_TRACE_LIMIT", "DEFAULT_WINDOW_S", "MAX_POINTS",
           "NO_TRACES_NOTE", "SUMMARY_WINDOW_S", "TOP_TENANTS_SHOWN", "alerts", "check_query",
           "deployments", "finite", "gpu_nodes", "hung", "quality_summary", "rules",
           "streams", "timeseries", "traces_view"]

#: The deployments table reads these windows.
SUMMARY_WINDOW_S = 60.0
DEFAULT_WINDOW_S = 3600.0
DEFAULT_STEP_S = 60.0
#: Points per series at most: a poll must stay cheap for the aggregator's event loop.
MAX_POINTS = 720
DEFAULT_TRACE_LIMIT = 50
#: What the page says while the aggregator has no trace of the kind asked for.
NO_TRACES_NOTE = ("no slow or failed request yet: a request that fails or takes at least its "
                  "deployment's slow_threshold_s (default 1 s) shows here within seconds")
DEFAULT_BY = ("application", "deployment")
#: Tenants a deployment's row names (the heaviest by requests); the rest are on /metrics.
TOP_TENANTS_SHOWN = 3


def finite(v: Any) -> Optional[float]:
    """``v`` as a float, or None when it is missing, not a number, or not finite (JSON has
    no NaN or Infinity)."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# -- deployments, alerts, hung requests, rules -------------------------------------------

def deployments(store, replicas: Mapping[str, tuple[Any, float]], now: float,
                alive_s: float) -> list[dict]:
    """One row per deployment: running replicas (reported within ``alive_s``), model
    versions seen, and the last minute's traffic, errors, latency and requests in flight;
    a deployment that streamed in that minute also has ``stream`` (see :func:`streams`).
    ``replicas`` maps a replica to its identity and when it last reported."""
    by = ("application", "deployment")
    w = SUMMARY_WINDOW_S

    def q(func: str, metric: str, param=None) -> dict:
        return store.evaluate(Query(func, metric, w, by, (), param), now)

    rate, errs = q("rate", "requests"), q("error_ratio", "requests")
    p50, p99 = q("p50", "latency_seconds"), q("p99", "latency_seconds")
    count = q("count", "requests")
    inflight = store.evaluate(Query("last", "inflight", 5.0, by), now)
    running: dict[tuple, set] = {}
    versions: dict[tuple, set] = {}
    for ident, seen in replicas.values():
        key = (("application", ident.application), ("deployment", ident.deployment))
        if now - seen <= alive_s:  # running now, as the hints count them
            running.setdefault(key, set()).add(ident.replica)
        if ident.model_version:
            versions.setdefault(key, set()).add(ident.model_version)
    out = []
    for key in sorted(set(running) | set(rate)):
        out.append({**dict(key), "replicas": len(running.get(key, ())),
                    "model_versions": sorted(versions.get(key, ())),
                    "requests_1m": finite(count.get(key)), "rate_per_s": finite(rate.get(key)),
                    "error_ratio": finite(errs.get(key)), "p50_s": finite(p50.get(key)),
                    "p99_s": finite(p99.get(key)), "inflight": finite(inflight.get(key))})
    for row, stream in zip(out, streams(store, [(r["application"], r["deployment"]) for r in out],
                                        now)):
        if stream is not None:
            row["stream"] = stream
    return out


def streams(store, keys: list[tuple[str, str]], now: float) -> list[Optional[dict]]:
    """The last minute of each (application, deployment) in ``keys`` as a generative
    deployment: TTFT and TPOT p50/p95, output tokens per second (None where no response
    carried token usage; ``items_per_s`` is the streamed items then), queue time p50/p95
    (None where no caller sent its time; see replica.queueing) and the heaviest
    tenants by requests with their output tokens. None for a deployment that streamed
    nothing in that minute, so a plain deployment's row stays as it was."""
    by = ("application", "deployment")
    w = SUMMARY_WINDOW_S

    def q(func: str, metric: str, group=by) -> dict:
        return store.evaluate(Query(func, metric, w, group), now)

    first = q("count", "first_item_seconds")
    if not any(first.get(_key(k)) for k in keys):
        return [None] * len(keys)  # no stream anywhere: the plain table, no more queries
    ttft50, ttft95 = q("p50", "first_item_seconds"), q("p95", "first_item_seconds")
    tpot50, tpot95 = q("p50", "time_per_output_token_seconds"), q(
        "p95", "time_per_output_token_seconds")
    tokens, items = q("sum", "output_tokens"), q("sum", "stream_items")
    queue50, queue95 = q("p50", "queue_seconds"), q("p95", "queue_seconds")
    tby = by + ("tenant",)
    t_requests, t_tokens = q("sum", "tenant_requests", tby), q("sum", "tenant_output_tokens", tby)
    tenants: dict[tuple, list[dict]] = {}
    for tkey, n in t_requests.items():
        labels = dict(tkey)
        # "": the deployment names no tenant; other: the many light ones, not a tenant
        if labels.get("tenant") in ("", None, OTHER) or not n:
            continue
        tenants.setdefault(_key((labels["application"], labels["deployment"])), []).append(
            {"tenant": labels["tenant"], "requests": finite(n),
             "output_tokens": finite(t_tokens.get(tkey))})
    out: list[Optional[dict]] = []
    for k in keys:
        key = _key(k)
        if not first.get(key):
            out.append(None)
            continue
        n_tokens = finite(tokens.get(key))
        top = sorted(tenants.get(key, ()), key=lambda t: (-(t["requests"] or 0), t["tenant"]))
        out.append({"ttft_p50_s": finite(ttft50.get(key)), "ttft_p95_s": finite(ttft95.get(key)),
                    "tpot_p50_s": finite(tpot50.get(key)), "tpot_p95_s": finite(tpot95.get(key)),
                    "queue_p50_s": finite(queue50.get(key)),
                    "queue_p95_s": finite(queue95.get(key)),
                    "tokens_per_s": n_tokens / w if n_tokens else None,
                    "items_per_s": (finite(items.get(key)) or 0.0) / w,
                    "top_tenants": top[:TOP_TENANTS_SHOWN]})
    return out


def _key(k: tuple[str, str]) -> tuple:
    return (("application", k[0]), ("deployment", k[1]))


def hung(latest: Mapping[str, tuple[Any, list, float]]) -> list[dict]:
    """The hung requests each replica reported last (``latest``: replica -> identity, hung
    requests, when reported), oldest first within a replica."""
    out = []
    for rid, (ident, requests, seen) in sorted(latest.items()):
        for h in requests:
            out.append({"application": ident.application, "deployment": ident.deployment,
                        "replica": rid, "model_version": ident.model_version,
                        "node": ident.node_id, "method": h.method,
                        "request_id": h.request_id, "running_s": h.running_s,
                        "stack": h.stack, "reported_at": seen})
    return out


def alerts(active: Iterable, hung_requests: list[dict]) -> list[dict]:
    """Alerts as the API shows them; one whose labels name a replica that reports hung
    requests carries them (with the replica's stacks) under ``hung``."""
    by_replica: dict[str, list[dict]] = {}
    for h in hung_requests:
        by_replica.setdefault(h["replica"], []).append(h)
    out = []
    for a in active:
        view = {"name": a.labels.get("alertname", ""), "state": a.state,
                "labels": dict(a.labels), "annotations": dict(a.annotations),
                "value": finite(a.value), "active_at": a.active_at,
                "fired_at": a.fired_at, "resolved_at": a.resolved_at}
        if a.labels.get("replica") in by_replica:
            view["hung"] = by_replica[a.labels["replica"]]
        out.append(view)
    return out


def rules(ruleset) -> list[dict]:
    """Every alert rule of the running rule set, as the API lists them."""
    return [{"group": group.name, "alert": rule.name, "expr": rule.expr, "for": rule.for_s,
             "keep_firing_for": rule.keep_firing_for_s, "labels": dict(rule.labels)}
            for group, rule in ruleset.rules()]


def quality_summary(quality, window_s: float = 0.0) -> list[dict]:
    """Quality and drift per model over ``window_s`` (0: the gauges' window, 1 h)."""
    return quality.summary(window_s or GAUGE_WINDOW_S)


# -- the status page's charts, GPUs and traces --------------------------------------------

def check_query(function: str, metric: str, by: Optional[tuple[str, ...]],
                param: Optional[float]) -> None:
    """Refuses a function/metric pair the store cannot evaluate, naming the fix."""
    m = METRICS.get(metric)
    if m is None:
        raise BadRequest(f"metric={metric!r} is unknown; use one of {sorted(METRICS)}",
                         field="metric")
    kinds = FUNCTIONS.get(function)
    if kinds is None:
        raise BadRequest(f"function={function!r} is unknown; use one of {sorted(FUNCTIONS)}",
                         field="function")
    if m.kind not in kinds:
        fits = sorted(f for f, k in FUNCTIONS.items() if m.kind in k)
        raise BadRequest(f"function={function!r} does not apply to the {m.kind} {metric!r}; "
                         f"use one of {fits}", field="function")
    if function in ("quantile", "ratio_above") and param is None:
        raise BadRequest(f"function={function!r} needs param=NUMBER", field="param")
    if param is not None and not math.isfinite(param):
        raise BadRequest(f"param={param!r} must be a finite number", field="param")
    if function == "quantile" and not 0 <= param <= 1:
        raise BadRequest(f"param={param!r}: quantile takes a number from 0 to 1 "
                         "(0.95 for p95)", field="param")
    if function == "ratio_above" and not param > 0:
        raise BadRequest(f"param={param!r}: ratio_above takes a latency threshold in seconds, "
                         "above 0", field="param")
    for label in by or ():
        if label not in m.labels:
            raise BadRequest(f"by={label!r} is not a label of {metric!r}; "
                             f"use some of {list(m.labels)}", field="by")


def timeseries(store, function: str, metric: str, *, now: float,
               window_s: float = DEFAULT_WINDOW_S, step_s: float = DEFAULT_STEP_S,
               by: Optional[tuple[str, ...]] = DEFAULT_BY, param: Optional[float] = None) -> dict:
    """``function(metric[step]) by (by)`` at each step of the last ``window_s``.

    Points are the whole steps that ended in the window, each evaluated over its own
    step, and a last point at ``now`` over the step before it (a rolling value, so the
    chart's end moves every poll). Steps that are whole multiples of the store's
    resolutions are read from its coarse rings, which keep the whole hour. A step with
    no data is ``None``: the chart shows a gap, never a made-up 0.
    """
    metric = ALIASES.get(metric, metric)
    check_query(function, metric, by, param)
    window_s = min(window_s, store.max_window_s)
    if window_s / step_s > MAX_POINTS:
        raise BadRequest(f"window/step gives {math.ceil(window_s / step_s)} points; at most "
                         f"{MAX_POINTS}: use a larger step or a shorter window", field="step")
    first = math.floor((now - window_s) / step_s) + 1
    last = math.floor(now / step_s)
    # A hair before each step's end: the buckets starting in [end - step, end).
    times = [k * step_s for k in range(first + 1, last + 1)]
    at = [t - 1e-3 for t in times]
    if not times or times[-1] < now:
        times.append(now)
        at.append(now)
    series: dict[tuple, list[Optional[float]]] = {}
    for i, t in enumerate(at):
        result = store.evaluate(Query(function, metric, step_s, by, (), param), t)
        for key, value in result.items():
            values = series.setdefault(key, [None] * len(times))
            values[i] = value if math.isfinite(value) else None
    return {"function": function, "metric": metric, "param": param, "step_s": step_s,
            "window_s": window_s, "by": list(by) if by else None, "times": times,
            "series": [{"labels": dict(key), "values": values}
                       for key, values in sorted(series.items())]}


def gpu_nodes(gpu_latest: Mapping[str, Any]) -> list[dict]:
    """The latest GPU snapshot of each node as JSON: devices with their readings and the
    replicas using each, or ``no_gpus_reason`` where NVML is absent."""
    out = []
    for node_id, snap in sorted(gpu_latest.items()):
        devices = []
        for dev in snap.devices:
            replicas = sorted({p.replica.replica for p in snap.processes
                               if p.gpu_index == dev.index and p.replica is not None})
            devices.append({"index": dev.index, "uuid": dev.uuid, "model": dev.model,
                            "lost": dev.lost, "mig_parent": dev.mig_parent,
                            "values": {k: v for k, v in dev.values.items() if math.isfinite(v)},
                            "xid_errors": sum(dev.xid_errors.values()), "replicas": replicas})
        out.append({"node_id": node_id, "time": snap.time, "devices": devices,
                    "no_gpus_reason": snap.no_gpus_reason})
    return out


def traces_view(store, kind: Optional[str] = None, limit: Any = None) -> dict:
    """The body of ``/api/v1/traces``: kept traces of ``kind`` (``slow``, ``errors``;
    absent or ``all``: both) from a :class:`~ray_monitor.aggregator.trace_store.TraceStore`,
    newest first, at most ``limit`` (text from the query string, default 50); with a note
    that says why when there are none."""
    try:
        kind = check_kind(kind)
    except ValueError as e:
        raise BadRequest(str(e), field="kind") from None
    if limit is None or limit == "":
        n = DEFAULT_TRACE_LIMIT
    else:
        try:
            n = check_limit(int(limit))
        except ValueError:
            raise BadRequest(f"limit={limit!r}: expected a whole number from 1 to "
                             f"{MAX_LIMIT}", field="limit") from None
    data = store.traces(kind, n)
    return {"status": "success", "data": data, **({} if data else {"note": NO_TRACES_NOTE})}
