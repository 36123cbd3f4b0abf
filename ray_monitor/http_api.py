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

from . import status_page
from .exposition import MonitorCollector, render

logger = logging.getLogger("ray_monitor.http")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
    collector = MonitorCollector(series=core.store.cumulative,
                                 alerts=core.engine.alert_series,
                                 self_metrics=core.self_metrics,
                                 autoscale=lambda: (core.hints.hints(), core.hints.decisions))

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
        return _json({"status": "success", "data": await agg.hints()})

    async def reload(request):
        ok, why = writes_allowed(agg.host, agg.token, request.headers.get("Authorization"))
        if not ok:
            return _json({"status": "error", "error": why}, 403 if agg.token is None else 401)
        text = await request.text()
        from .rules import RuleError

        try:
            res = await agg.reload(text, request.query.get("filename"))
        except RuleError as e:  # the old rules keep running
            return _json({"status": "error", "error": str(e)}, 400)
        return _json({"status": "success", "data": res})

    async def health(request):
        return web.Response(text="ok")

    app = web.Application()
    app.add_routes([web.get("/metrics", metrics), web.get("/api/v1/alerts", alerts),
                    web.get("/api/v1/rules", rules), web.get("/api/v1/deployments", deployments),
                    web.get("/api/v1/hints", hints), web.post("/api/v1/rules/reload", reload),
                    web.get("/-/healthy", health)])
    status_page.add_routes(app, agg)
    return app


async def start_server(agg, host: str, port: int):
    runner = web.AppRunner(make_app(agg), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    logger.info("ray-monitor: serving /metrics and /api/v1 on %s:%s", host, bound)
    return runner, bound
