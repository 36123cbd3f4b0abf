"""Traffic through composed deployments over HTTP, and what an OTLP backend got of it.

Shared by the session's trace tests (tests/integration/test_traces_sampling.py) and the
small clusters those tests start in a subprocess (tests/trace_cluster.py) for Ray
Serve's tracing off and at other sampling ratios. Plain functions: deploy, drive
(a plain HTTP client, ``requests``, with or without a ``traceparent``), then
:func:`analyse` what the receiver holds per request: one trace, connected, with every
``@monitor`` span of the request, and how many fast requests were exported.

Request kinds: ``ok`` (fast); ``fail`` (the model raises KeyError, the ingress answers
500); ``caught`` (the model fails, the ingress catches it and answers 200: its own span
is neither failed nor slow); ``slow`` (the model sleeps past both thresholds);
``slow_after`` (the model is fast, then the ingress is slow: the model's span is neither
failed nor slow). The FastAPI app adds nesting and a streaming handle call.
"""

from __future__ import annotations

import asyncio
import math
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional
from urllib.parse import urlsplit

import requests
from fastapi import FastAPI
from ray import serve

from ray_monitor import monitor

__all__ = ["KEPT_KINDS", "SLOW_S", "Sent", "analyse", "binomial_bounds", "deploy_fastapi",
           "deploy_plain", "drive", "fastapi_url", "plain_url", "plan", "span_dict"]

SLOW_S = 1.0  # slow_threshold_s of every deployment here
SLEEP_S = 1.3  # how long a slow request sleeps
KEPT_KINDS = ("fail", "caught", "slow", "slow_after")
SIGMAS = 4.5


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor(slow_threshold_s=SLOW_S, model_version="m1")
class Model:
    async def __call__(self, what: str) -> str:
        if what == "fail":
            raise KeyError("no such item")
        if what == "slow":
            await asyncio.sleep(SLEEP_S)
        return what


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor(slow_threshold_s=SLOW_S)
class Ingress:
    def __init__(self, model) -> None:
        self.model = model

    async def __call__(self, request) -> dict:
        what = request.query_params.get("what", "ok")
        if what == "caught":
            try:
                await self.model.remote("fail")
            except KeyError:
                return {"caught": True}
        if what == "slow_after":
            got = await self.model.remote("ok")
            await asyncio.sleep(SLEEP_S)
            return {"got": got}
        return {"got": await self.model.remote(what)}


def _env(ratio: Optional[float], serve_tracing: Optional[bool]) -> dict:
    env: dict[str, str] = {}
    if ratio is not None:
        env["RAY_MONITOR_SAMPLE_RATIO"] = str(ratio)
    if serve_tracing is False:
        env["RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH"] = ""  # Serve's tracing off here
    return env


def _opts(env: dict) -> dict:
    return {"ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": env}}} if env \
        else {}


def deploy_plain(app: str, *, ratio: Optional[float] = None,
                 serve_tracing: Optional[bool] = None) -> None:
    """Ingress -> Model at ``/{app}``. ``ratio``: the ingress's RAY_MONITOR_SAMPLE_RATIO
    (the model's is always 1.0: were it asked, every request would be exported);
    ``serve_tracing`` False turns Serve's tracing off in both replicas."""
    model = Model.options(**_opts({**_env(1.0, serve_tracing)}))
    ingress = Ingress.options(**_opts(_env(ratio, serve_tracing)))
    serve.run(ingress.bind(model.bind()), name=app, route_prefix=f"/{app}")


# -- FastAPI, nesting, streaming ----------------------------------------------------------

api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor(slow_threshold_s=SLOW_S)
class Leaf:
    async def __call__(self, item: str) -> str:
        if item == "bad":
            raise KeyError("bad item")
        return item.upper()

    async def stream(self, n: int):
        for i in range(n):
            yield i


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor(slow_threshold_s=SLOW_S)
class Mid:
    def __init__(self, leaf) -> None:
        self.leaf = leaf

    async def __call__(self, item: str) -> dict:
        parts = [p async for p in self.leaf.options(stream=True, method_name="stream").remote(2)]
        return {"item": await self.leaf.remote(item), "parts": parts}


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Api:
    def __init__(self, mid) -> None:
        self.mid = mid

    @api.get("/items/{item}")
    async def item(self, item: str) -> dict:
        return await self.mid.remote(item)


MonitoredApi = monitor(Api, slow_threshold_s=SLOW_S)


def deploy_fastapi(app: str, *, serve_tracing: Optional[bool] = None) -> None:
    """Api (FastAPI) -> Mid -> Leaf (a plain call and a ``stream=True`` one) at ``/{app}``."""
    env = _env(None, serve_tracing)
    leaf = Leaf.options(**_opts(env)).bind()
    mid = Mid.options(**_opts(env)).bind(leaf)
    serve.run(MonitoredApi.options(**_opts(env)).bind(mid), name=app, route_prefix=f"/{app}")


# -- traffic ------------------------------------------------------------------------------

@dataclass
class Sent:
    kind: str  # ok, fail, caught, slow, slow_after (or the FastAPI item)
    header: str  # none, sampled, unsampled
    request_id: str
    trace_id: str = ""  # the client's, when it sent a traceparent
    parent: str = ""
    status: int = 0
    path: str = ""


def plan(counts: dict[str, int], header: str) -> list[Sent]:
    out = []
    for kind, n in counts.items():
        for _ in range(n):
            s = Sent(kind, header, f"t10-{uuid.uuid4().hex}")
            if header != "none":
                s.trace_id, s.parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
            out.append(s)
    return out


def plain_url(base: str, s: Sent) -> str:
    return f"{base}?what={s.kind}"


def fastapi_url(base: str, s: Sent) -> str:
    return f"{base}/items/{'bad' if s.kind == 'fail' else 'good'}"


def drive(base_url: str, sent: list[Sent], *, url_of=plain_url,
          concurrency: int = 12) -> list[Sent]:
    """Sends every request of ``sent`` (fills in status and path); slow ones go first,
    so they overlap the fast ones instead of adding their sleep at the end."""
    order = sorted(sent, key=lambda s: s.kind not in ("slow", "slow_after"))
    local = threading.local()

    def one(s: Sent) -> None:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        headers = {"x-request-id": s.request_id}
        if s.header != "none":
            flags = "01" if s.header == "sampled" else "00"
            headers["traceparent"] = f"00-{s.trace_id}-{s.parent}-{flags}"
        url = url_of(base_url, s)
        s.path = urlsplit(url).path
        s.status = session.get(url, headers=headers, timeout=60).status_code
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, order))
    return sent


# -- what the backend got -----------------------------------------------------------------

def span_dict(s: Any) -> dict:
    """A received span (tests.otlp_receiver.ReceivedSpan) as a plain dict (JSON)."""
    return {"trace_id": s.trace_id, "span_id": s.span_id, "parent": s.parent_span_id,
            "name": s.name, "attributes": s.attributes, "status": s.status_code,
            "status_message": s.status_message, "events": s.events,
            "start_ns": s.start_ns, "end_ns": s.end_ns}


def binomial_bounds(n: int, p: float, sigmas: float = SIGMAS) -> tuple[int, int]:
    """Where the count of ``n`` draws at ``p`` lies but for about 1 in 150,000 runs at
    4.5 sigma (exact at p = 0 and 1)."""
    if p <= 0:
        return 0, 0
    if p >= 1:
        return n, n
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    return max(0, math.floor(mean - sigmas * sd)), min(n, math.ceil(mean + sigmas * sd))


@dataclass
class Report:
    requests: int = 0
    fast: int = 0
    fast_exported: int = 0
    fast_kept: int = 0  # fast requests that turned slow on a loaded machine: not counted
    kept_complete: int = 0
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _request_id(span: dict) -> str:
    a = span["attributes"]
    return a.get("ray.serve.request_id") or a.get("request_id") or ""


def _tops(spans: list[dict]) -> list[dict]:
    ids = {s["span_id"] for s in spans}
    return [s for s in spans if not s["parent"] or s["parent"] not in ids]


def analyse(sent: Iterable[Sent], spans: list[dict], ours: tuple[str, ...]) -> Report:
    """Checks every request of ``sent`` against the spans received (:func:`span_dict`).

    ``ours``: the names of the ``@monitor`` spans every request makes (one per
    deployment). Per request: its spans (ours carry ``ray.serve.request_id``, Serve's
    ``request_id``) are in at most one trace; an exported request's trace has each of
    ``ours``, one top span whose parent is the client's span (or none), and every other
    span's parent in the trace; a failed, caught or slow request is exported.
    """
    sent = list(sent)
    by_trace: dict[str, list[dict]] = {}
    for s in spans:
        by_trace.setdefault(s["trace_id"], []).append(s)
    traces_of: dict[str, set[str]] = {}
    for s in spans:
        rid = _request_id(s)
        if rid:
            traces_of.setdefault(rid, set()).add(s["trace_id"])
    r = Report(requests=len(sent))
    for q in sent:
        tids = traces_of.get(q.request_id, set())
        exported = bool(tids)
        if len(tids) > 1:
            r.problems.append(f"{q.kind}/{q.header} {q.request_id}: split over {len(tids)} "
                              f"traces {sorted(tids)}")
            continue
        if q.kind in KEPT_KINDS and not exported:
            r.problems.append(f"{q.kind}/{q.header} {q.request_id}: not exported")
            continue
        if not exported:
            if q.kind not in KEPT_KINDS:
                r.fast += 1
            continue
        (tid,) = tids
        trace = by_trace[tid]
        problem = _check_trace(q, tid, trace, ours)
        if problem:
            r.problems.append(f"{q.kind}/{q.header} {q.request_id} trace {tid}: {problem}")
            continue
        if q.kind in KEPT_KINDS:
            r.kept_complete += 1
        elif any(s["attributes"].get("ray_monitor.kept") for s in trace):
            r.fast_kept += 1  # a fast request the loaded machine made slow: kept, not sampled
        else:
            r.fast += 1
            r.fast_exported += 1
    return r


def _check_trace(q: Sent, tid: str, trace: list[dict], ours: tuple[str, ...]) -> str:
    names = [s["name"] for s in trace]
    missing = [n for n in ours if n not in names]
    if missing:
        return f"fragment: no {missing} among {sorted(names)}"
    tops = _tops(trace)
    if len(tops) != 1:
        return f"not connected: {len(tops)} tops {[(t['name'], t['parent']) for t in tops]}"
    top = tops[0]
    want_parent = q.parent if q.header != "none" else ""
    if top["parent"] != want_parent:
        return f"top {top['name']!r} has parent {top['parent']!r}, expected {want_parent!r}"
    if q.header != "none" and tid != q.trace_id:
        return f"not the caller's trace {q.trace_id}"
    return _check_http_and_errors(q, trace)


def _check_http_and_errors(q: Sent, trace: list[dict]) -> str:
    mine = [s for s in trace if "ray.serve.method" in s["attributes"]]
    ingress = next((s for s in mine if "url.path" in s["attributes"]), None)
    if ingress is None:
        return f"no HTTP ingress span among {[s['name'] for s in mine]}"
    a = ingress["attributes"]
    status = 500 if q.kind == "fail" else 200
    got = (a.get("http.request.method"), a.get("url.path"), a.get("http.response.status_code"),
           ingress["status"] == "ERROR")
    if got != ("GET", q.path, status, status >= 500):
        return f"ingress HTTP attributes {got}, expected {('GET', q.path, status, status >= 500)}"
    for s in mine:
        if "" in s["attributes"].values():
            return f"empty attribute on {s['name']}: {s['attributes']}"
        if "\x1b" in s["status_message"] or len(s["status_message"]) > 512:
            return f"status message of {s['name']} not clean: {s['status_message'][:100]!r}"
        for name, ev in s["events"]:
            if name == "exception" and ev.get("exception.type") != "KeyError":
                return f"exception.type {ev.get('exception.type')!r} on {s['name']}"
    return ""
