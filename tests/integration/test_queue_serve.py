"""Queue time on a real Ray Serve (issue 14): a replica that takes one request at a time
(``max_ongoing_requests=1``) is kept busy by a slow first request, so a second one waits;
the monitor's ``queue_seconds`` of the waiting request is compared with the wait the test
caused, over a handle (from a monitored deployment, whose router carries its send time)
and over HTTP (Serve's proxy carries it).

Relations that hold on any machine, never a timed pass/fail: the queued request waited at
least the part of the slow request left when it was sent, so its queue time is above half
the injected wait (it was sent at most a fraction of the wait after the slow one), and
below the whole latency its caller saw; its time to first token from the caller's send
(queue + first item in the replica) is at least its queue and at most what a caller saw.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import pytest
import requests
from ray import serve
from starlette.requests import Request

from ray_monitor import monitor
from ray_monitor.common.histogram import RELATIVE_ERROR
from tests.conftest import wait_until

pytestmark = pytest.mark.ray

WAIT_S = 2.0  # how long the slow request holds the replica
SEND_AFTER_S = 0.3  # the queued request is sent this long after the slow one


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1)
@monitor()
class Busy:
    async def stream(self, hold_s: float, n: int):
        await asyncio.sleep(hold_s)
        for i in range(n):
            await asyncio.sleep(0.01)
            yield i

    async def __call__(self, request: Request) -> str:
        await asyncio.sleep(float(request.query_params.get("hold", "0")))
        return "ok"


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10)
@monitor()
class Front:
    def __init__(self, busy):
        self.busy = busy

    async def stream(self, hold_s: float, n: int) -> dict:
        """Calls Busy and says what it saw: its latency and time to first item (s)."""
        t0 = time.time()
        first = None
        async for _ in self.busy.options(stream=True).stream.remote(hold_s, n):
            if first is None:
                first = time.time() - t0
        return {"latency": time.time() - t0, "first": first}


def _value(mon, fn: str, metric: str, app: str, deployment: str, method=None) -> float:
    by = ("application", "deployment") + (("method",) if method else ())
    for key, v in mon.query(fn, metric, 600.0, by=by).items():
        labels = json.loads(key)
        if (labels.get("application"), labels.get("deployment"), labels.get("method")) == (
                app, deployment, method):
            return v
    return 0.0


def _max(mon, metric: str, app: str, deployment: str, method: str) -> float:
    return _value(mon, "max", metric, app, deployment, method)


def _count(mon, metric: str, app: str, deployment: str) -> float:
    return _value(mon, "count", metric, app, deployment)


def test_a_request_that_waits_for_a_busy_replica_has_that_wait_as_queue_time(
        mon, serve_apps, serve_http):
    app = f"q{uuid.uuid4().hex[:8]}"
    serve_apps.append(app)
    h = serve.run(Front.bind(Busy.bind()), name=app, route_prefix=f"/{app}")
    h.stream.remote(0.0, 2).result()  # both replicas up, routers warm

    # over a handle: the slow stream first, the queued one SEND_AFTER_S later
    slow = h.stream.remote(WAIT_S, 2)
    time.sleep(SEND_AFTER_S)
    queued = h.stream.remote(0.0, 3).result(timeout_s=60)
    slow = slow.result(timeout_s=60)
    wait_until(lambda: _count(mon, "queue_seconds", app, "Busy") >= 3, timeout=60,
               what="three queue times of Busy")
    q = _max(mon, "queue_seconds", app, "Busy", "stream")
    with_first = _max(mon, "first_item_with_queue_seconds", app, "Busy", "stream")
    print(f"handle: queue {q * 1000:.0f} ms, queue + first item {with_first * 1000:.0f} ms; "
          f"caller saw first item {queued['first'] * 1000:.0f} ms, latency "
          f"{queued['latency'] * 1000:.0f} ms (injected wait {WAIT_S * 1000:.0f} ms)")
    assert 0.5 * WAIT_S < q < queued["latency"] * (1 + RELATIVE_ERROR)
    # the largest queue + first item is the queued stream's or the slow one's
    assert q * (1 - RELATIVE_ERROR) <= with_first <= max(
        queued["first"], slow["first"]) * (1 + RELATIVE_ERROR)


def test_an_http_request_that_waits_for_a_busy_replica_has_that_wait_as_queue_time(
        mon, serve_apps, serve_http):
    app = f"q{uuid.uuid4().hex[:8]}"
    serve_apps.append(app)
    serve.run(Busy.bind(), name=app, route_prefix=f"/{app}")
    url = f"{serve_http}/{app}"
    assert requests.get(url, timeout=60).text == "ok"  # up, and the proxy knows the route

    slow = threading.Thread(target=requests.get, args=(url,),
                            kwargs={"params": {"hold": WAIT_S}, "timeout": 60})
    slow.start()
    time.sleep(SEND_AFTER_S)
    t0 = time.perf_counter()
    assert requests.get(url, timeout=60).text == "ok"
    latency = time.perf_counter() - t0
    slow.join()
    wait_until(lambda: _count(mon, "queue_seconds", app, "Busy") >= 3, timeout=60,
               what="three queue times of Busy (Serve's proxy carries the send time)")
    q = _max(mon, "queue_seconds", app, "Busy", "__call__")
    print(f"HTTP: queue {q * 1000:.0f} ms, client latency {latency * 1000:.0f} ms "
          f"(injected wait {WAIT_S * 1000:.0f} ms)")
    assert 0.5 * WAIT_S < q < latency * (1 + RELATIVE_ERROR)
    metrics = requests.get(mon.metrics_url, timeout=10).text
    assert "ray_monitor_request_queue_seconds" in metrics
