"""The aggregator's HTTP API: every route of ``/metrics``, ``/api/v1/...`` and ``/-/healthy``.

Runs in the aggregator actor: aiohttp on the actor's own event loop (Ray ships aiohttp).
It decides who may write and how a request's parameters read; what each answer holds is
:mod:`~ray_monitor.aggregator.views`, and the status page that polls some of these routes
is :mod:`~ray_monitor.aggregator.status_page`.

Reads are open; anything that writes needs ``Authorization: Bearer TOKEN`` unless the
server is bound to loopback, where only processes on the node can reach it; and every
write must also be one a web page cannot forge (JSON or YAML ``Content-Type``, no foreign
``Origin``, a loopback ``Host`` without a token) and small enough (see
:mod:`~ray_monitor.aggregator.request_body`). Every malformed request is answered 400
(403, 413, 415) naming the field, never 500. Every JSON
answer is ``{"status": "success", "data": ...}`` or ``{"status": "error", "error": ...}``
(a :class:`~ray_monitor.common.errors.BadRequest`, answered with its ``status``), with
non-finite numbers as ``null`` (JSON has no NaN). Durations in query strings are seconds
(``90``) or Prometheus durations (``90s``, ``5m``, ``1h``).

- ``GET /metrics``: prometheus_client's exposition, OpenMetrics when the scraper asks for it.
- ``GET /api/v1/alerts``, ``/rules``, ``/deployments``, ``/hung``: the current state.
- ``GET /api/v1/hints``: autoscaling hints; config problems that do not stop them in ``warnings``.
- ``GET /api/v1/quality?window=1h``: quality and drift per model.
- ``GET /api/v1/compare?deployment=D&versions=v1,v2&window=10m[&application=A]``.
- ``GET /api/v1/timeseries?function=p99&metric=latency_seconds&window=1h&step=1m&by=...``:
  one rule-language query at each step of the window (the page's charts).
- ``GET /api/v1/gpus``: the latest GPU snapshot of each node.
- ``GET /api/v1/traces?kind=slow|errors&limit=50``: kept traces of slow and failed requests.
- ``POST /api/v1/rules/reload[?filename=F]`` (a rule file), ``POST /api/v1/feedback``
  (ground truth), ``POST /api/v1/drift/reference``: writes.
- ``GET /-/healthy``: ``ok``.

On a sharded monitor (``StartConfig.shards > 1``) this app runs on shard 0 only, and
``/metrics`` and the JSON routes answer for every shard (see
:mod:`~ray_monitor.aggregator.shards`); with one aggregator they read its core directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hmac
import json
import logging
import math
from typing import Any, Mapping, Optional

from aiohttp import web
from prometheus_client import ProcessCollector

from ray_monitor.aggregator import status_page, views
from ray_monitor.aggregator.exposition import MonitorCollector, QualityCollector, registry, render
from ray_monitor.aggregator.request_body import (JSON_TYPES, MAX_JSON_BYTES, MAX_RULES_BYTES,
                                                 YAML_TYPES, check_origin, parse_json, read_text)
from ray_monitor.common.durations import parse_seconds
from ray_monitor.common.errors import BadRequest, ConfigError
from ray_monitor.quality.compare import COMPARE_WINDOW_S
from ray_monitor.quality.store import GAUGE_WINDOW_S

__all__ = ["LOOPBACK", "MAX_BODY_BYTES", "collect_off_loop", "gc_paused", "make_app",
           "monitor_collectors",
           "monitor_registry", "query_seconds", "start_server", "writes_allowed"]

logger = logging.getLogger("ray_monitor.http")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: Largest request body (a feedback batch, a drift reference).
MAX_BODY_BYTES = MAX_JSON_BYTES


# -- what requests say, what answers hold ------------------------------------------------

def writes_allowed(host: str, token: str | None, header: str | None) -> tuple[bool, str]:
    """Whether a write request may proceed, and why not."""
    if token:
        given = (header or "").removeprefix("Bearer ").strip()
        if hmac.compare_digest(given.encode(), token.encode()):
            return True, ""
        return False, "send 'Authorization: Bearer <token>' (the token given to ray_monitor.start)"
    if host in LOOPBACK:
        return True, ""
    return False, ("writes are refused on a non-loopback address without a token: "
                   "start the monitor with token=... (or RAY_MONITOR_TOKEN)")


def query_seconds(text: Optional[str], field: str, default: float) -> float:
    """A duration from a query string (``1h``, ``90s``, ``5m`` or a bare number of
    seconds), above 0; ``default`` when absent. Raises :class:`BadRequest` naming ``field``."""
    if text is None or text == "":
        return default
    try:
        value = parse_seconds(text)
    except ValueError:
        raise BadRequest(f"{field}={text!r} is not a duration; write it like 60, 30s, 5m or 1h",
                         field=field) from None
    if not value > 0:
        raise BadRequest(f"{field}={text!r} must be a duration above 0", field=field)
    return value


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats as null (JSON has no Infinity), dataclasses as dicts,
    tuples and sets as lists, keys as strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _clean(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(_clean(body), default=str), status=status,
                        content_type="application/json")


def _ok(data: Any, **extra: Any) -> web.Response:
    return _json({"status": "success", "data": data, **extra})


@web.middleware
async def _bad_requests(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadRequest as e:
        return _json({"status": "error", "error": str(e),
                      **({"field": e.field} if e.field else {})}, e.status)
    except ConfigError as e:  # a rule file or section that cannot be used: every problem
        body = {"status": "error", "error": str(e), "problems": e.as_dicts()}
        if len(e.problems) > len(body["problems"]):
            body["problems_total"] = len(e.problems)
        return _json(body, 400)


def _float_param(query: Mapping[str, str], name: str) -> Optional[float]:
    """A finite number from the query string (NaN and infinities are refused here)."""
    if not query.get(name):
        return None
    try:
        value = float(query[name])
    except ValueError:
        raise BadRequest(f"{name}={query[name][:80]!r} is not a number", field=name) from None
    if not math.isfinite(value):
        raise BadRequest(f"{name}={query[name][:80]!r} must be a finite number", field=name)
    return value


# -- the app ------------------------------------------------------------------------------

def monitor_collectors(core, hints=None) -> list:
    """The collectors of one aggregator's (or shard's) series; ``hints`` the hints it
    exposes (default: all its engine has)."""
    hints = hints or core.hints.hints
    return [MonitorCollector(series=core.store.cumulative, alerts=core.engine.alert_series,
                             self_metrics=core.self_metrics,
                             autoscale=lambda: (hints(), core.hints.decisions),
                             bounds=lambda: core.classic_bounds, serve=core.serve_running,
                             series_reader=core.store.cumulative_reader),
            QualityCollector(core.quality_summary)]


def monitor_registry(core, hints=None, *extra):
    """The registry of :func:`monitor_collectors` (and ``extra`` collectors)."""
    return registry(*monitor_collectors(core, hints), *extra)


@contextlib.contextmanager
def gc_paused():
    """The garbage collector off inside (on the loop's thread; nested uses share one
    pause). A large scrape makes hundreds of thousands of objects that live until it
    ends; each full collection meanwhile scans them all, 20-100 ms with the GIL held,
    which stalls the loop whichever thread it lands in (RESULTS §24). They are freed by
    reference counting at the end (no cycles): cyclic garbage made meanwhile waits for the
    next collection, a second or two later."""
    if _gc_pause["depth"] == 0:
        _gc_pause["enabled"] = gc.isenabled()
        gc.disable()
    _gc_pause["depth"] += 1
    try:
        yield
    finally:
        _gc_pause["depth"] -= 1
        if _gc_pause["depth"] == 0 and _gc_pause["enabled"]:
            gc.enable()


_gc_pause = {"depth": 0, "enabled": True}


async def collect_off_loop(collectors: list) -> list:
    """The metric families of ``collectors``: their sources read now, on the loop (one
    consistent snapshot of the state: ``frozen()``, copies), the families built on a
    worker thread, so a large cluster's series do not hold ingest and rule rounds
    meanwhile (nor do garbage collections of what it makes: :func:`gc_paused`)."""
    with gc_paused():
        snap = [c.frozen() if hasattr(c, "frozen") else c for c in collectors]
        return await asyncio.to_thread(lambda: [f for c in snap for f in c.collect()])


class _Families:
    """A collector of metric families already collected (a sharded monitor's, merged)."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


def _render_dropping(box: list, accept: str) -> tuple[bytes, str]:
    """:func:`render` of the families in ``box`` (made for this scrape alone), then the
    families emptied here, a slice of samples at a time: freeing a large scrape's objects
    takes 100 ms at 3,000 replicas, and one C call that frees them all would hold the GIL
    (so the loop) as long."""
    families = box.pop()
    try:
        return render(_Families(families), accept)
    finally:
        while families:
            samples = families.pop().samples
            while samples:
                del samples[-2000:]


def make_app(agg) -> web.Application:
    """The aggregator's app; ``agg`` is the actor (``core``, ``host``, ``token``, and the
    async methods that gather every shard's part on a sharded monitor and keep the GCS
    copy current)."""
    core = agg.core
    # The aggregator's own process (process_resident_memory_bytes, CPU, open fds), as
    # every Prometheus client exports it.
    collectors = monitor_collectors(core, getattr(agg, "_hints", None)) + [
        ProcessCollector(registry=None)]
    sharded = getattr(agg, "_peers", None) is not None

    def check_writer(request: web.Request, content_types: tuple[str, ...]) -> None:
        ok, why = writes_allowed(agg.host, agg.token, request.headers.get("Authorization"))
        if not ok:
            raise BadRequest(why, field="Authorization", status=403 if agg.token is None else 401)
        check_origin(request, content_types=content_types, loopback_exception=not agg.token)

    async def metrics(request):
        # The state read on the loop, in one go (a consistent snapshot, copies); the
        # families and their text made on worker threads: at a large cluster's series they
        # take seconds, which ingest and rule rounds would otherwise wait out (the threads
        # only share the GIL with them). The collector stays off until the families are
        # freed (a collection while they live scans them all, see gc_paused).
        with gc_paused():
            families = await collect_off_loop(collectors)
            if sharded:  # every shard's series, one exposition (see aggregator.shards)
                from ray_monitor.aggregator.shards import merge_families

                parts = [families] + await agg._peers.gather("metric_families", True)
                families = await asyncio.to_thread(merge_families, parts)  # every sample
                del parts
            box = [families]
            del families  # the thread holds the last reference: frees them there
            body, ctype = await asyncio.get_running_loop().run_in_executor(
                None, _render_dropping, box, request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def alerts(request):
        return _ok(await agg.alerts() if sharded else core.alerts())

    async def rules(request):
        return _ok(core.rules())

    async def deployments(request):
        return _ok(await agg.deployments() if sharded else core.deployments())

    async def hints(request):
        # Like Prometheus' API, problems that do not stop the answer go in "warnings".
        return _ok(await agg.hints(), warnings=list(core.config_warnings))

    async def hung(request):
        return _ok(await agg.hung() if sharded else core.hung())

    async def quality(request):
        window_s = query_seconds(request.query.get("window"), "window", GAUGE_WINDOW_S)
        return _ok(await agg.quality(window_s) if sharded else core.quality_summary(window_s))

    async def compare(request):
        q = request.query
        versions = [v for v in q.get("versions", "").split(",") if v]
        if len(versions) != 2:
            raise BadRequest("versions: name two model versions, e.g. versions=v1,v2",
                             field="versions")
        window_s = query_seconds(q.get("window"), "window", COMPARE_WINDOW_S)
        try:
            args = (q.get("deployment", ""), tuple(versions), q.get("application") or None,
                    window_s)
            data = await agg.compare(*args) if sharded else \
                core.compare(*args[:2], application=args[2], window_s=window_s)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return _ok(data)

    async def timeseries(request):
        qs = request.query
        by_text = qs.get("by")
        by = views.DEFAULT_BY if by_text is None else \
            tuple(b for b in by_text.split(",") if b) or None
        function, metric = qs.get("function", "rate"), qs.get("metric", "requests")
        param = _float_param(qs, "param")
        window_s = query_seconds(qs.get("window"), "window", views.DEFAULT_WINDOW_S)
        step_s = query_seconds(qs.get("step"), "step", views.DEFAULT_STEP_S)
        if sharded:
            return _ok(await agg.timeseries(function, metric, core.clock(), window_s, step_s,
                                            by, param))
        return _ok(views.timeseries(core.store, function, metric, now=core.clock(), by=by,
                                    param=param, window_s=window_s, step_s=step_s))

    async def gpus(request):
        return _ok(views.gpu_nodes(core.gpu_latest))

    async def traces(request):
        if not sharded:
            return _json(views.traces_view(core.trace_store, request.query.get("kind"),
                                           request.query.get("limit")))
        asked: list = []  # the kind and limit, checked by traces_view as for one store
        views.traces_view(type("_Ask", (), {"traces": lambda _, *a: asked.extend(a) or []})(),
                          request.query.get("kind"), request.query.get("limit"))
        data = await agg.traces(*asked)
        return _json({"status": "success", "data": data,
                      **({} if data else {"note": views.NO_TRACES_NOTE})})

    async def reload(request):
        check_writer(request, YAML_TYPES)
        text = await read_text(request, MAX_RULES_BYTES)
        # A bad file raises ConfigError (400, every problem listed); the old rules and
        # receivers keep running.
        return _ok(await agg.reload(text, request.query.get("filename")))

    async def feedback(request):
        check_writer(request, JSON_TYPES)
        body = await parse_json(await read_text(request, MAX_JSON_BYTES))
        if isinstance(body, dict):
            body = [body]
        if not isinstance(body, list):
            raise BadRequest('body: send one object {"request_id": ..., "label": ...} or a '
                             "list of them", field="body")
        return _ok(await agg.feedback(body) if sharded else await core.feedback_async(body))

    async def drift_reference(request):
        check_writer(request, JSON_TYPES)
        body = await parse_json(await read_text(request, MAX_JSON_BYTES))
        if not isinstance(body, dict) or not isinstance(body.get("references"), dict):
            raise BadRequest('body: send {"application": ..., "deployment": ..., '
                             '"model_version": "", "references": {"feature_age": [values...]}}',
                             field="references")
        try:
            args = (body.get("application", ""), body.get("deployment"),
                    body.get("model_version", ""), body["references"])
            data = await agg.set_drift_reference(*args) if sharded else \
                await core.set_drift_reference_async(*args)
        except (TypeError, ValueError) as e:
            text = str(e)[:500]
            field = text.split(":", 1)[0] if text.startswith("references") else \
                next((f for f in ("application", "deployment", "model_version") if
                      text.startswith(f)), "references")
            raise BadRequest(text, field=field) from None
        return _ok(data)

    async def health(request):
        return web.Response(text="ok")

    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_bad_requests])
    app.add_routes([web.get("/metrics", metrics),
                    web.get("/api/v1/alerts", alerts), web.get("/api/v1/rules", rules),
                    web.get("/api/v1/deployments", deployments), web.get("/api/v1/hints", hints),
                    web.get("/api/v1/hung", hung), web.get("/api/v1/quality", quality),
                    web.get("/api/v1/compare", compare),
                    web.get("/api/v1/timeseries", timeseries), web.get("/api/v1/gpus", gpus),
                    web.get("/api/v1/traces", traces),
                    web.post("/api/v1/rules/reload", reload),
                    web.post("/api/v1/feedback", feedback),
                    web.post("/api/v1/drift/reference", drift_reference),
                    web.get("/-/healthy", health)])
    status_page.add_routes(app)
    return app


async def start_server(agg, host: str, port: int):
    """Serves :func:`make_app` on ``host:port`` (0: any free port); returns the runner and
    the port bound."""
    runner = web.AppRunner(make_app(agg), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound = runner.addresses[0][1]
    logger.info("ray-monitor: serving /metrics and /api/v1 on %s:%s", host, bound)
    return runner, bound
