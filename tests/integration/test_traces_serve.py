"""The aggregator keeps the traces of slow and failed requests, on a real Ray Serve.

A request through two composed deployments (an HTTP ingress calling a model through a
handle, tests/trace_scenarios.py) fails, another is slow; each shows up in
``mon.traces()`` as one trace with both deployments' spans, linked parent to child
through Ray Serve's own spans (the client's traceparent is sampled), and the CLI
prints it. The session also exports to an OTLP receiver: the aggregator's
copy does not depend on it (the path without an endpoint is in the unit tests).
"""

from __future__ import annotations

import io
import json
import uuid

import pytest
import requests
from ray_monitor.client.cli import main
from tests.conftest import wait_until
from tests.trace_scenarios import SLOW_S, deploy_plain

pytestmark = pytest.mark.ray

def _get(serve_http: str, app: str, what: str) -> tuple[str, requests.Response]:
    trace_id = uuid.uuid4().hex
    r = requests.get(f"{serve_http}/{app}?what={what}", timeout=30,
                     headers={"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"})
    return trace_id, r


def _kept(mon, kind: str, trace_id: str) -> dict:
    """The kept trace once both deployments' spans have arrived, linked: the spans of a
    kept request that were neither failed nor slow (Serve's among them) follow a few
    seconds after the kept ones."""
    def ready():
        t = next((t for t in mon.traces(kind=kind, limit=500) if t["trace_id"] == trace_id), None)
        names = {s["name"] for s in t["spans"]} if t else set()
        if not {"Ingress.__call__", "Model.__call__"} <= names:
            return None
        model = next(s for s in t["spans"] if s["name"] == "Model.__call__")
        return t if "Ingress.__call__" in [s["name"] for s in _ancestors(t, model)] else None
    return wait_until(ready, timeout=60, what=f"the {kind} trace {trace_id} with both spans")


def _ancestors(trace: dict, span: dict) -> list[dict]:
    by_id = {s["span_id"]: s for s in trace["spans"]}
    out = []
    while span["parent_span_id"] in by_id:
        span = by_id[span["parent_span_id"]]
        out.append(span)
    return out


def _check_composed(t: dict) -> tuple[dict, dict]:
    spans = {s["name"]: s for s in t["spans"]}
    ingress, model = spans["Ingress.__call__"], spans["Model.__call__"]
    assert (ingress["deployment"], model["deployment"]) == ("Ingress", "Model")
    assert model["model_version"] == "m1" and ingress["replica"] != model["replica"]
    # The model's span descends from the ingress's span, through Serve's routing and
    # replica spans, which the aggregator got from the same replicas.
    chain = _ancestors(t, model)
    assert ingress in chain, [s["name"] for s in chain]
    assert any(s["source"] == "ray_serve" for s in chain[:chain.index(ingress)])
    assert model["depth"] > ingress["depth"]
    assert (t["deployment"], t["root"]) == ("Ingress", "Ingress.__call__")
    return ingress, model


def test_failed_and_slow_composed_requests_are_kept_with_both_deployments(mon, serve_apps,
                                                                          serve_http):
    app = f"tr{uuid.uuid4().hex[:8]}"
    serve_apps.append(app)
    deploy_plain(app)
    ok_id, r = _get(serve_http, app, "ok")
    assert r.json() == {"got": "ok"}
    failed_id, r = _get(serve_http, app, "fail")
    assert r.status_code == 500
    slow_id, r = _get(serve_http, app, "slow")
    assert r.json() == {"got": "slow"}

    failed = _kept(mon, "errors", failed_id)
    ingress, model = _check_composed(failed)
    assert model["status"] == "error" and model["exception"]["type"] == "KeyError"
    assert ingress["status"] == "error"
    assert failed["error"] == "KeyError: 'no such item'"
    assert failed["error_deployment"] == "Model"
    assert failed["kinds"] == ["errors"]

    slow = _kept(mon, "slow", slow_id)
    ingress, model = _check_composed(slow)
    assert model["slow"] and ingress["slow"] and model["status"] == "ok"
    assert slow["duration_s"] >= SLOW_S and slow["error"] is None
    assert failed_id not in {t["trace_id"] for t in mon.traces(kind="slow", limit=500)}
    # A fast, successful request is not kept, even though it was head-sampled.
    assert ok_id not in {t["trace_id"] for t in mon.traces(limit=500)}

    out, err = io.StringIO(), io.StringIO()
    assert main(["traces", "--errors", "--limit", "500"], connect=lambda: mon, out=out,
                err=err) == 0
    row = next(line for line in out.getvalue().splitlines() if failed_id in line)
    assert f"{app}/Ingress" in row and "Ingress.__call__" in row and "KeyError" in row
    out = io.StringIO()
    assert main(["traces", "--slow", "--json", "--limit", "500"], connect=lambda: mon,
                out=out) == 0
    [printed] = [t for t in json.loads(out.getvalue()) if t["trace_id"] == slow_id]
    assert {s["deployment"] for s in printed["spans"]} >= {"Ingress", "Model"}
