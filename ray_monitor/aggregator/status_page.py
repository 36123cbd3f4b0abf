"""The status page: one HTML page served by the aggregator, and its assets.

Runs in the aggregator actor, on the HTTP server of :mod:`~ray_monitor.aggregator.http_api`,
which calls :func:`add_routes`:

- ``/`` and ``/status``: the page (``static/index.html``); it polls ``/api/v1/deployments``,
  ``/api/v1/alerts``, ``/api/v1/timeseries``, ``/api/v1/gpus`` and ``/api/v1/traces``
  every 2 s and draws charts with ``static/minichart.js``, so it works with no network
  beyond the aggregator (a cluster may be offline).
- ``/static/{file}``: the page's assets, from the package.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

__all__ = ["STATIC_DIR", "add_routes"]

STATIC_DIR = Path(__file__).with_name("static")


def add_routes(app: web.Application) -> None:
    """The page and its assets, on the aggregator's app."""
    index = STATIC_DIR / "index.html"

    async def page(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(index, headers={"Cache-Control": "no-cache"})

    app.add_routes([web.get("/", page), web.get("/status", page),
                    web.static("/static", STATIC_DIR, append_version=False)])
