"""One trace per request at the sampling ratio people run, read back over the wire.

The session's cluster runs Ray Serve's tracing as the README sets it up, at Serve's
default ratio (0.01), so Serve's proxy is the head sampler. A plain HTTP client sends
requests through an ingress and a model (tests/trace_scenarios.py): fast ones, failing
ones, failures the ingress catches (it answers 200), slow ones, and ones where only the
ingress is slow. What the OTLP receiver got, per request: at most one trace; when
exported, one connected tree with both deployments' spans, under the client's span
when it sent one; every failed and slow request exported whole; the fraction of fast
requests exported within binomial bounds of the ratio (4.5 sigma: a run outside them is
about 1 in 150,000 by chance). The aggregator's kept traces are the same trees.
Serve's tracing off and the ratios 0 and 1.0 run on clusters of their own
(test_traces_clusters.py).
"""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import wait_until
from tests.trace_scenarios import (KEPT_KINDS, analyse, binomial_bounds, deploy_fastapi,
                                   deploy_plain, drive, fastapi_url, plan, span_dict)

pytestmark = pytest.mark.ray

PLAIN = ("Ingress.__call__", "Model.__call__")
NESTED = ("GET /items/{item}", "Mid.__call__", "Leaf.__call__", "Leaf.stream")


def _serve_ratio() -> float:
    from ray.serve._private.constants import RAY_SERVE_TRACING_SAMPLING_RATIO

    return RAY_SERVE_TRACING_SAMPLING_RATIO


def _app(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def _settled(otlp, sent, ours, what):
    """The analysis once every kept request is whole and nothing is a fragment (spans
    of one request arrive seconds apart: tail keeping goes through the aggregator)."""
    last = [None]

    def done():
        rep = analyse(sent, [span_dict(s) for s in otlp.spans()], ours)
        last[0] = rep
        kept = sum(1 for q in sent if q.kind in KEPT_KINDS)
        return rep if not rep.problems and rep.kept_complete == kept else None
    try:
        return wait_until(done, timeout=120, interval=1.0, what=what)
    except AssertionError:
        rep = last[0]
        raise AssertionError(f"{what}: {len(rep.problems)} problems, e.g. "
                             f"{rep.problems[:5]}; {rep.as_dict() | {'problems': '...'}}")


def _plain(otlp, serve_apps, serve_http, prefix: str, counts: dict, header: str,
           **deploy) -> tuple[list, object]:
    """Deploys Ingress -> Model, sends ``counts`` requests of each kind with ``header``
    (none, sampled, unsampled), and returns them with the settled analysis."""
    app = _app(prefix)
    serve_apps.append(app)
    deploy_plain(app, **deploy)
    sent = drive(f"{serve_http}/{app}", plan(counts, header))
    assert {(q.kind, q.status) for q in sent} == {
        (k, 500 if k == "fail" else 200) for k in counts}
    return sent, _settled(otlp, sent, PLAIN, f"every {header} request of {prefix} whole, "
                          "no fragments")


def _trace_of(otlp, request_id: str) -> str:
    return next(s.trace_id for s in otlp.spans()
                if s.attributes.get("ray.serve.request_id") == request_id)


def _check_kept_by_the_aggregator(mon, otlp, sent, names):
    """The aggregator keeps the same trees: both deployments' spans, the model's under
    the ingress's."""
    want = {_trace_of(otlp, q.request_id): q for q in sent if q.kind in KEPT_KINDS}

    def whole():
        got = {t["trace_id"]: t for t in mon.traces(limit=500) if t["trace_id"] in want}
        ok = {tid: t for tid, t in got.items()
              if set(names) <= {s["name"] for s in t["spans"]}}
        return ok if len(ok) == len(want) else None
    kept = wait_until(whole, timeout=60, what="the kept traces whole in the aggregator")
    for tid, t in kept.items():
        by_id = {s["span_id"]: s for s in t["spans"]}
        model = next(s for s in t["spans"] if s["name"] == names[1])
        chain, span = [], model
        while span["parent_span_id"] in by_id:
            span = by_id[span["parent_span_id"]]
            chain.append(span["name"])
        assert names[0] in chain, (want[tid].kind, chain)
        kind = want[tid].kind
        assert t["kinds"] == (["errors"] if kind in ("fail", "caught") else ["slow"]), kind
        assert t["root"] == names[0] and t["deployment"] == "Ingress"
        if kind in ("fail", "caught"):
            assert t["error"] == "KeyError: 'no such item'" and t["error_deployment"] == "Model"
        if kind == "caught":  # the ingress answered 200: its span is there for the model's
            ingress = next(s for s in t["spans"] if s["name"] == names[0])
            assert ingress["status"] == "ok" and ingress["kept"] in ("trace", ""), ingress


def test_without_traceparent_the_proxy_decides_once_for_the_whole_request(mon, otlp,
                                                                         serve_apps,
                                                                         serve_http):
    sent, rep = _plain(otlp, serve_apps, serve_http, "sd", {
        "ok": 1500, "fail": 12, "caught": 12, "slow": 6, "slow_after": 6}, "none")
    lo, hi = binomial_bounds(rep.fast, _serve_ratio())
    assert lo <= rep.fast_exported <= hi, (rep.as_dict(), (lo, hi))
    _check_kept_by_the_aggregator(mon, otlp, sent, PLAIN)


def test_a_sampled_caller_gets_every_request_under_its_span(otlp, serve_apps, serve_http):
    sent, rep = _plain(otlp, serve_apps, serve_http, "ss", {
        "ok": 40, "fail": 4, "caught": 4, "slow": 2, "slow_after": 2}, "sampled")
    assert rep.fast_exported + rep.fast_kept == rep.fast + rep.fast_kept == 40
    # Under the proxy's span, which is exported: Serve's spans are part of the tree.
    q = sent[0]
    trace = [s for s in otlp.spans() if s.trace_id == q.trace_id]
    top = next(s for s in trace if s.parent_span_id == q.parent)
    assert top.name.startswith("proxy_http_request"), [s.name for s in trace]


def test_an_unsampled_caller_is_honoured_and_kept_requests_hang_under_it(mon, otlp,
                                                                         serve_apps,
                                                                         serve_http):
    sent, rep = _plain(otlp, serve_apps, serve_http, "su", {
        "ok": 200, "fail": 4, "caught": 4, "slow": 2, "slow_after": 2}, "unsampled")
    assert rep.fast_exported == 0, rep.as_dict()
    _check_kept_by_the_aggregator(mon, otlp, sent, PLAIN)


def test_replicas_without_serve_tracing_follow_the_proxys_decision(otlp, serve_apps,
                                                                   serve_http):
    """Serve's proxy traces (the cluster's environment) but the app's replicas do not
    (``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH=""`` in their runtime_env): the proxy's
    "no" reaches them as a placeholder parent, its "yes" as its routing span."""
    sent, rep = _plain(otlp, serve_apps, serve_http, "sr", {
        "ok": 800, "fail": 4, "caught": 4, "slow": 2, "slow_after": 2}, "none",
        serve_tracing=False)
    lo, hi = binomial_bounds(rep.fast, _serve_ratio())
    assert lo <= rep.fast_exported <= hi, (rep.as_dict(), (lo, hi))


def test_fastapi_nested_and_streaming_calls_are_one_trace(otlp, serve_apps, serve_http):
    """FastAPI ingress -> Mid -> Leaf, a plain call and a ``stream=True`` one. FastAPI's
    own telemetry span (on, since Serve's tracing sets a global TracerProvider) joins the
    trace under ours."""
    app = _app("sf")
    serve_apps.append(app)
    deploy_fastapi(app)
    base = f"{serve_http}/{app}"
    sent = drive(base, plan({"ok": 10, "fail": 3}, "sampled"), url_of=fastapi_url)
    sent += drive(base, plan({"ok": 100, "fail": 3}, "unsampled"), url_of=fastapi_url)
    sent += drive(base, plan({"ok": 300, "fail": 3}, "none"), url_of=fastapi_url)
    assert {(q.kind, q.status) for q in sent} == {("ok", 200), ("fail", 500)}
    rep = _settled(otlp, sent, NESTED, "every FastAPI request whole")
    sampled = [q for q in sent if q.header == "sampled" and q.kind == "ok"]
    unsampled = [q for q in sent if q.header == "unsampled" and q.kind == "ok"]
    exported = {s.attributes.get("ray.serve.request_id") for s in otlp.spans()}
    assert all(q.request_id in exported for q in sampled)
    assert not any(q.request_id in exported for q in unsampled)
    q = sampled[0]
    names = {s.name for s in otlp.spans() if s.trace_id == q.trace_id}
    assert {"proxy_http_request " + n for n in ()} <= names and "GET /items/{item}" in names
    fastapi_own = [s for s in otlp.spans() if s.trace_id == q.trace_id
                   and s.scope.startswith("fastapi")]
    assert fastapi_own, sorted(names)  # FastAPI's span is in this trace, not one of its own
    route = next(s for s in otlp.spans() if s.trace_id == q.trace_id
                 and s.name == "GET /items/{item}" and "ray.serve.method" in s.attributes)
    assert route.attributes["http.route"].endswith("/items/{item}")
    lo, hi = binomial_bounds(300, _serve_ratio())
    assert rep.fast_exported - 10 <= hi, rep.as_dict()
