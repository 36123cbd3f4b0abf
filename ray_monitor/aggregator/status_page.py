"""The status page: one HTML page served by the aggregator, its assets, and the JSON it polls.

Routes added to the aggregator's aiohttp app by :func:`add_routes`:

- ``/`` and ``/status``: the page (``static/index.html``); it polls the JSON below every
  2 s and draws charts with ``static/minichart.js``, so it works with no network beyond
  the aggregator (a cluster may be offline).
- ``/static/{file}``: the page's assets, from the package.
- ``/api/v1/timeseries?function=p99&metric=latency_seconds&window=1h&step=1m&by=...``: one
  rule-language query evaluated at each step of the window (see :func:`timeseries`).
- ``/api/v1/gpus``: the latest GPU snapshot of each node (see :func:`gpu_nodes`).
- ``/api/v1/traces?kind=slow|errors&limit=50``: the kept traces of slow and failed
  requests, newest first, each with its spans (see :func:`traces_view`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, Optional

from aiohttp import web

from ray_monitor.common.catalog import FUNCTIONS, METRICS, Query

STATIC_DIR = Path(__file__).with_name("static")
DEFAULT_WINDOW_S = 3600.0
DEFAULT_STEP_S = 60.0
#: Points per series at most: a poll must stay cheap for the aggregator's event loop.
MAX_POINTS = 720
DEFAULT_TRACE_LIMIT = 50
#: What the page says while the aggregator has no trace of the kind asked for.
NO_TRACES_NOTE = ("no slow or failed request yet: a request that fails or takes at least its "
                  "deployment's slow_threshold_s (default 1 s) shows here within seconds")
DEFAULT_BY = ("application", "deployment")


class BadRequest(ValueError):
    """A query parameter the page or a script got wrong; the message names it."""


def parse_seconds(text: Optional[str], field: str, default: float) -> float:
    """``1h``, ``90s``, ``5m`` or a bare number of seconds; ``default`` when absent."""
    from ray_monitor.common.durations import parse_duration

    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        try:
            value = parse_duration(text)
        except ValueError:
            raise BadRequest(f"{field}={text!r} is not a duration; write it like 60, 30s, "
                             "5m or 1h") from None
    if not (math.isfinite(value) and value > 0):
        raise BadRequest(f"{field}={text!r} must be a duration above 0")
    return value


def check_query(function: str, metric: str, by: Optional[tuple[str, ...]],
                param: Optional[float]) -> None:
    """Refuses a function/metric pair the store cannot evaluate, naming the fix."""
    m = METRICS.get(metric)
    if m is None:
        raise BadRequest(f"metric={metric!r} is unknown; use one of {sorted(METRICS)}")
    kinds = FUNCTIONS.get(function)
    if kinds is None:
        raise BadRequest(f"function={function!r} is unknown; use one of {sorted(FUNCTIONS)}")
    if m.kind not in kinds:
        fits = sorted(f for f, k in FUNCTIONS.items() if m.kind in k)
        raise BadRequest(f"function={function!r} does not apply to the {m.kind} {metric!r}; "
                         f"use one of {fits}")
    if function in ("quantile", "ratio_above") and param is None:
        raise BadRequest(f"function={function!r} needs param=NUMBER")
    for label in by or ():
        if label not in m.labels:
            raise BadRequest(f"by={label!r} is not a label of {metric!r}; "
                             f"use some of {list(m.labels)}")


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
    check_query(function, metric, by, param)
    window_s = min(window_s, store.max_window_s)
    if window_s / step_s > MAX_POINTS:
        raise BadRequest(f"window/step gives {math.ceil(window_s / step_s)} points; at most "
                         f"{MAX_POINTS}: use a larger step or a shorter window")
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
    absent or ``all``: both) from a :class:`~ray_monitor.aggregator.trace_store.TraceStore`, newest
    first, at most ``limit`` (text from the query string, default 50); with a note that
    says why when there are none."""
    from ray_monitor.aggregator.trace_store import MAX_LIMIT, check_kind, check_limit

    try:
        kind = check_kind(kind)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if limit is None or limit == "":
        n = DEFAULT_TRACE_LIMIT
    else:
        try:
            n = check_limit(int(limit))
        except ValueError:
            raise BadRequest(f"limit={limit!r}: expected a whole number from 1 to "
                             f"{MAX_LIMIT}") from None
    data = store.traces(kind, n)
    return {"status": "success", "data": data, **({} if data else {"note": NO_TRACES_NOTE})}


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats as null (JSON has no Infinity), tuples as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _clean(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _ok(data: Any, **extra: Any) -> web.Response:
    return web.json_response(_clean({"status": "success", "data": data, **extra}))


def _bad(e: Exception) -> web.Response:
    return web.json_response({"status": "error", "error": str(e)}, status=400)


def add_routes(app: web.Application, agg) -> None:
    """The page, its assets and its JSON, on the aggregator's app (``agg`` is the actor)."""
    core = agg.core
    index = STATIC_DIR / "index.html"

    async def page(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(index, headers={"Cache-Control": "no-cache"})

    async def series(request: web.Request) -> web.Response:
        qs = request.query
        try:
            by_text = qs.get("by")
            by = DEFAULT_BY if by_text is None else tuple(b for b in by_text.split(",") if b) or None
            param = None
            if qs.get("param"):
                try:
                    param = float(qs["param"])
                except ValueError:
                    raise BadRequest(f"param={qs['param']!r} is not a number") from None
            data = timeseries(core.store, qs.get("function", "rate"), qs.get("metric", "requests"),
                              now=core.clock(), by=by, param=param,
                              window_s=parse_seconds(qs.get("window"), "window", DEFAULT_WINDOW_S),
                              step_s=parse_seconds(qs.get("step"), "step", DEFAULT_STEP_S))
        except BadRequest as e:
            return _bad(e)
        return _ok(data)

    async def gpus(request: web.Request) -> web.Response:
        return _ok(gpu_nodes(core.gpu_latest))

    async def traces(request: web.Request) -> web.Response:
        try:
            view = traces_view(core.trace_store, request.query.get("kind"),
                               request.query.get("limit"))
        except BadRequest as e:
            return _bad(e)
        return web.json_response(_clean(view))

    app.add_routes([web.get("/", page), web.get("/status", page),
                    web.get("/api/v1/timeseries", series), web.get("/api/v1/gpus", gpus),
                    web.get("/api/v1/traces", traces),
                    web.static("/static", STATIC_DIR, append_version=False)])
