"""Labels stay bounded on a real cluster, whatever clients send: every HTTP method the
proxy accepts and 10,000 distinct paths make at most the standard methods plus _OTHER,
per route template and "unmatched"; and @monitor below @serve.ingress(app) records too."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from fastapi import FastAPI
from ray import serve

from ray_monitor import monitor
from tests.integration.test_middleware_serve import wait_counts

pytestmark = pytest.mark.ray

#: The methods of llhttp, the HTTP parser of the proxy's server (uvicorn with httptools).
PROXY_METHODS = ("DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND "
                 "PROPPATCH SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT "
                 "MERGE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK "
                 "SOURCE QUERY").split()
STANDARD = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}

below = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(below)
@monitor
class Below:
    """The order the issue found silent: the ingress above @monitor."""

    @below.get("/items/{item_id}")
    def item(self, item_id: int):
        return {"id": item_id}


def _labels(mon, app: str) -> dict:
    res = mon.query("count", "requests", 600.0, by=("application", "method"))
    return {json.loads(k)["method"]: int(v) for k, v in res.items()
            if json.loads(k)["application"] == app}


def test_monitor_below_ingress_records_every_route(mon, serve_apps, serve_http):
    app = f"c{uuid.uuid4().hex[:8]}"
    serve_apps.append(app)
    serve.run(Below.bind(), name=app, route_prefix=f"/{app}")
    with requests.Session() as s:
        for i in range(100):
            assert s.get(f"{serve_http}/{app}/items/{i}", timeout=30).json() == {"id": i}
        assert s.get(f"{serve_http}/{app}/nowhere", timeout=30).status_code == 404
    wait_counts(mon, app, {("Below", "GET /items/{item_id}", "200"): 100,
                           ("Below", "GET unmatched", "404"): 1})


def test_methods_and_paths_cannot_grow_the_label_set(mon, serve_apps, serve_http):
    app = f"c{uuid.uuid4().hex[:8]}"
    serve_apps.append(app)
    serve.run(Below.bind(), name=app, route_prefix=f"/{app}")
    base = f"{serve_http}/{app}"
    answered: dict[str, int] = {}  # method -> requests the application answered
    with requests.Session() as s:
        for method in PROXY_METHODS:
            for path in ("/items/1", "/nowhere"):
                r = s.request(method, base + path, timeout=30)
                if r.status_code in (200, 404, 405):  # the app's answers (not the proxy's 400)
                    answered[method] = answered.get(method, 0) + 1
    exotic = [m for m in answered if m not in STANDARD]
    assert len(exotic) >= 10, answered  # the proxy lets many non-standard methods through

    def scan(chunk: range) -> int:
        with requests.Session() as s:
            for i in chunk:
                method = PROXY_METHODS[i % len(PROXY_METHODS)]
                s.request(method, f"{base}/scan/{i}/{uuid.uuid4().hex[:6]}", timeout=30)
        return len(chunk)
    with ThreadPoolExecutor(8) as pool:
        sent = sum(pool.map(scan, [range(k, 10_000, 8) for k in range(8)]))
    assert sent == 10_000

    expected_total = sum(answered.values()) + sum(
        1 for i in range(10_000) if PROXY_METHODS[i % len(PROXY_METHODS)] in answered)

    def settled():
        got = _labels(mon, app)
        return sum(got.values()) >= expected_total and got
    from tests.conftest import wait_until
    labels = wait_until(settled, timeout=120, what=f"{expected_total} requests counted")
    allowed = {f"{m} {r}" for m in STANDARD | {"_OTHER"}
               for r in ("/items/{item_id}", "unmatched")}
    print(f"{len(answered)} methods answered by the app, {len(exotic)} non-standard; "
          f"{sum(labels.values())} requests under {len(labels)} labels: {sorted(labels)}")
    assert set(labels) <= allowed, set(labels) - allowed
    assert "_OTHER unmatched" in labels and "_OTHER /items/{item_id}" in labels
    assert sum(labels.values()) == expected_total  # nothing lost to the cap, nothing doubled
