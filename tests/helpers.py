"""What several tests share: an injected clock, histogram builders, an HTTP capture server.

Plain objects, importable from any test (``from tests.helpers import Clock``); the
fixtures that wrap them live in ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from ray_monitor.common.histogram import Histogram

__all__ = ["Captured", "CaptureServer", "Clock", "genai_queried", "hist", "http_down",
           "replica_snapshots",
           "kill_aggregator"]


class Clock:
    """A clock the test moves: pass it where code takes ``clock=``. ``sleep`` advances it
    and records the delay, for code that takes ``sleep=``."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


def hist(*values: float) -> Histogram:
    """A histogram holding ``values``."""
    h = Histogram()
    for v in values:
        h.record(v)
    return h


@dataclass(frozen=True)
class Captured:
    path: str
    headers: dict
    body: Any  # parsed JSON, or the raw text when it is not JSON


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        server: CaptureServer = self.server.owner  # type: ignore[attr-defined]
        server.received.put(Captured(self.path, dict(self.headers), body))
        status = server.next_status()
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"ok" if status < 300 else b"refused")

    def log_message(self, *args) -> None:
        pass


class CaptureServer:
    """An HTTP server on loopback that records every POST (webhooks, Alertmanager,
    Slack) and answers 200, or the statuses queued with :meth:`answer`."""

    def __init__(self) -> None:
        self.received: "queue.Queue[Captured]" = queue.Queue()
        self._statuses: list[int] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def answer(self, *statuses: int) -> None:
        """Answer the next requests with these statuses, then 200 again."""
        with self._lock:
            self._statuses.extend(statuses)

    def next_status(self) -> int:
        with self._lock:
            return self._statuses.pop(0) if self._statuses else 200

    def get(self, timeout: float = 15.0) -> Captured:
        return self.received.get(timeout=timeout)

    def drain(self) -> list[Captured]:
        out = []
        while True:
            try:
                out.append(self.received.get_nowait())
            except queue.Empty:
                return out

    def start(self) -> "CaptureServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "CaptureServer":
        return self.start()

    def __exit__(self, *exc: Optional[BaseException]) -> None:
        self.stop()


def http_down(url: str) -> bool:
    """Whether nothing answers ``url``/-/healthy (within half a second)."""
    import requests

    try:
        requests.get(f"{url}/-/healthy", timeout=0.5)
        return False
    except requests.RequestException:
        return True


def kill_aggregator(mon) -> float:
    """Kills the aggregator (Ray restarts it) and waits, over HTTP only, for the old server
    to go and the new one to answer; returns the seconds that took. No actor call: that
    would wake an aggregator that starts only when called."""
    import time

    import ray
    import requests

    from tests.conftest import wait_until

    t0 = time.monotonic()
    ray.kill(mon.actor, no_restart=False)
    wait_until(lambda: http_down(mon.url), timeout=30, interval=0.05, what="the old server to go")
    wait_until(lambda: requests.get(f"{mon.url}/-/healthy", timeout=1).ok, timeout=90,
               interval=0.1, what="the aggregator back after a kill")
    return time.monotonic() - t0


def genai_queried() -> set[str]:
    """The series the dashboard's "Generative serving" row reads: they exist on /metrics
    once a deployment streamed or reported tokens, not before."""
    from ray_monitor.client.dashboard import _rows, queried_metrics

    from ray_monitor.common.catalog import METRICS

    panels = dict(_rows())["Generative serving"]
    queue = METRICS["queue_seconds"].prometheus  # only once a caller sent its time
    return {n for n in queried_metrics({"panels": panels, "templating": {"list": []}})
            if not n.startswith(queue)}


def replica_snapshots(replica: str, n: int, per_flush: int = 2, app: str = "app") -> list:
    """``n`` consecutive snapshots of one replica of ``app``/``Dep`` (a real Recorder),
    each carrying ``per_flush`` ok requests."""
    from ray_monitor.common.snapshot import ReplicaIdentity
    from ray_monitor.replica.recorder import Recorder

    rec = Recorder(identity=ReplicaIdentity(app, "Dep", replica, "node-a", 1),
                   clock=Clock(1000.0))
    cells = rec.method("__call__")
    out = []
    for _ in range(n):
        for _ in range(per_flush):
            cells.end(cells.begin(0.0), "ok", False, 0.01)
        out.append(rec.snapshot())
    return out


def running_request(span: Any) -> Any:
    """A monitored request running, as the middleware makes it current
    (``propagation.CURRENT``): ``span`` is what log records and handle calls carry."""
    from ray_monitor.replica.middleware import _Request

    req = _Request()
    req.runtime, req.ctx_span = None, span
    return req
