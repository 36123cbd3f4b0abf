"""The aggregator's HTTP server: ``/metrics``, ``/api/v1/...``, and reload.

aiohttp on the actor's own event loop (Ray ships aiohttp). Reads are open; anything
that writes needs ``Authorization: Bearer TOKEN`` unless the server is bound to
loopback, where only processes on the node can reach it.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from aiohttp import web

from ray_monitor.aggregator import status_page
from ray_monitor.aggregator.exposition import MonitorCollector, render

logger = logging.getLogger("ray_monitor.http")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: Largest request body (a feedback batch, a drift reference).
MAX_BODY_BYTES = 16 * 1024 * 1024


class _Collectors:
    """Several collectors rendered as one registry entry."""

    def __init__(self, *collectors) -> None:
        self._collectors = collectors

    def collect(self):
        for c in self._collectors:
            yield from c.collect()


class QualityCollector:
    """Quality and drift of each model over the fixed gauge window (1h), as gauges:
    ``ray_monitor_model_*`` per application, deployment and model_version, and
    ``ray_monitor_drift_*`` with a ``metric`` label (``prediction`` or ``feature_<name>``)."""

    def __init__(self, summary) -> None:
        self._summary = summary

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from ray_monitor.common.catalog import QUALITY_LABELS, QUALITY_METRICS

        models = self._summary()
        for name, m in QUALITY_METRICS.items():
            drift = m.kind == "drift"
            fam = GaugeMetricFamily(m.prometheus, m.help + " Over the last hour.",
                                    labels=list(QUALITY_LABELS) + (["metric"] if drift else []))
            for model in models:
                labels = [model[k] for k in QUALITY_LABELS]
                if drift:
                    for metric, values in sorted(model["drift"].items()):
                        if values.get(name) is not None:
                            fam.add_metric(labels + [metric], float(values[name]))
                elif model["quality"].get(name) is not None:
                    fam.add_metric(labels, float(model["quality"][name]))
            yield fam


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, default=_default, indent=1), status=status,
                        content_type="application/json")


def _default(o: Any):
    if hasattr(o, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)


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


def make_app(agg) -> web.Application:
    core = agg.core
    collector = _Collectors(
        MonitorCollector(series=core.store.cumulative, alerts=core.engine.alert_series,
                         self_metrics=core.self_metrics,
                         autoscale=lambda: (core.hints.hints(), core.hints.decisions)),
        QualityCollector(core.quality_summary))

    async def metrics(request: web.Request) -> web.Response:
        body, ctype = render(collector, request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def alerts(request):
        return _json({"status": "success", "data": core.alerts()})

    async def rules(request):
        return _json({"status": "success", "data": core.rules()})

    async def deployments(request):
        return _json({"status": "success", "data": core.deployments()})

    async def hints(request):
        # Like Prometheus' API, problems that do not stop the answer go in "warnings".
        return _json({"status": "success", "data": await agg.hints(),
                      "warnings": list(core.config_warnings)})

    async def reload(request):
        ok, why = writes_allowed(agg.host, agg.token, request.headers.get("Authorization"))
        if not ok:
            return _json({"status": "error", "error": why}, 403 if agg.token is None else 401)
        text = await request.text()
        from ray_monitor.alerting.rules import RuleError

        try:
            res = await agg.reload(text, request.query.get("filename"))
        except RuleError as e:  # the old rules keep running
            return _json({"status": "error", "error": str(e)}, 400)
        return _json({"status": "success", "data": res})

    def refused(request) -> web.Response | None:
        ok, why = writes_allowed(agg.host, agg.token, request.headers.get("Authorization"))
        if ok:
            return None
        return _json({"status": "error", "error": why}, 403 if agg.token is None else 401)

    async def body_json(request) -> Any:
        try:
            return json.loads(await request.text())
        except ValueError as e:
            raise _BadRequest(f"the body must be JSON: {e}") from None

    async def feedback(request):
        if (no := refused(request)) is not None:
            return no
        try:
            body = await body_json(request)
        except _BadRequest as e:
            return _json({"status": "error", "error": str(e)}, 400)
        if isinstance(body, dict):
            body = [body]
        if not isinstance(body, list):
            return _json({"status": "error", "error": 'send one object {"request_id": ..., '
                          '"label": ...} or a list of them'}, 400)
        return _json({"status": "success", "data": core.feedback(body)})

    async def drift_reference(request):
        if (no := refused(request)) is not None:
            return no
        try:
            body = await body_json(request)
            if not isinstance(body, dict) or not isinstance(body.get("references"), dict):
                raise _BadRequest('send {"application": ..., "deployment": ..., '
                                  '"model_version": "", "references": {"feature_age": [values...]}}')
            data = core.set_drift_reference(body.get("application", ""), body.get("deployment"),
                                            body.get("model_version", ""), body["references"])
        except (_BadRequest, TypeError, ValueError) as e:
            return _json({"status": "error", "error": str(e)}, 400)
        return _json({"status": "success", "data": data})

    async def hung(request):
        return _json({"status": "success", "data": core.hung()})

    async def quality(request):
        from ray_monitor.common.durations import parse_duration

        try:
            window = parse_duration(request.query.get("window", "1h"))
        except ValueError as e:
            return _json({"status": "error", "error": f"window: {e}"}, 400)
        return _json({"status": "success", "data": core.quality_summary(window)})

    async def compare(request):
        from ray_monitor.common.durations import parse_duration

        q = request.query
        versions = [v for v in q.get("versions", "").split(",") if v]
        try:
            if len(versions) != 2:
                raise ValueError("versions: name two model versions, e.g. versions=v1,v2")
            data = core.compare(q.get("deployment", ""), tuple(versions),
                                application=q.get("application") or None,
                                window_s=parse_duration(q.get("window", "10m")))
        except ValueError as e:
            return _json({"status": "error", "error": str(e)}, 400)
        return _json({"status": "success", "data": data})

    async def health(request):
        return web.Response(text="ok")

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.add_routes([web.get("/metrics", metrics), web.get("/api/v1/alerts", alerts),
                    web.get("/api/v1/rules", rules), web.get("/api/v1/deployments", deployments),
                    web.get("/api/v1/hints", hints), web.post("/api/v1/rules/reload", reload),
                    web.post("/api/v1/feedback", feedback),
                    web.post("/api/v1/drift/reference", drift_reference),
                    web.get("/api/v1/hung", hung), web.get("/api/v1/quality", quality),
                    web.get("/api/v1/compare", compare),
                    web.get("/-/healthy", health)])
    status_page.add_routes(app, agg)
    return app


class _BadRequest(ValueError):
    pass


async def start_server(agg, host: str, port: int):
    runner = web.AppRunner(make_app(agg), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    logger.info("ray-monitor: serving /metrics and /api/v1 on %s:%s", host, bound)
    return runner, bound
