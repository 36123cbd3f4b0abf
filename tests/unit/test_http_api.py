"""The aggregator's HTTP API without Ray: writes need the token unless bound to loopback,
and a bad rule file is refused while the old rules keep running."""

from __future__ import annotations

import asyncio
import os

import pytest
from aiohttp.test_utils import TestClient, TestServer

from ray_monitor.aggregator.core import AggregatorCore
from ray_monitor.aggregator.http_api import make_app, writes_allowed

GOOD = """
groups:
  - name: g
    rules:
      - alert: Busy
        expr: rate(requests[1m]) by (deployment) > 100
"""


class Agg:
    """The actor's surface that the HTTP app uses, around a real AggregatorCore."""

    def __init__(self, host: str, token):
        self.host, self.token = host, token
        self.core = AggregatorCore({}, rules_text=GOOD)

    async def hints(self):
        return []

    async def reload(self, text, filename=None):
        return self.core.reload(text, filename)

    async def record_feedback(self, items):
        return self.core.record_feedback(items)


YAML = {"Content-Type": "application/yaml"}


def call(agg, method: str, path: str, **kw):
    async def go():
        async with TestClient(TestServer(make_app(agg))) as client:
            resp = await client.request(method, path, **kw)
            return resp.status, await resp.json()
    return asyncio.run(go())


@pytest.mark.parametrize("host, token, header, allowed", [
    ("127.0.0.1", None, None, True),
    ("0.0.0.0", None, None, False),
    ("0.0.0.0", "s3cret", None, False),
    ("0.0.0.0", "s3cret", "Bearer wrong", False),
    ("0.0.0.0", "s3cret", "Bearer s3cret", True),
    ("127.0.0.1", "s3cret", None, False),  # a token, once set, is always required
])
def test_who_may_write(host, token, header, allowed):
    ok, why = writes_allowed(host, token, header)
    assert ok is allowed and (ok or why)


def test_reload_without_the_token_is_refused_and_changes_nothing():
    agg = Agg("0.0.0.0", "s3cret")
    status, body = call(agg, "POST", "/api/v1/rules/reload", data="groups: []", headers=YAML)
    assert status == 401 and "Authorization" in body["error"]
    assert [r["alert"] for r in agg.core.rules()] == ["Busy"]
    status, body = call(agg, "POST", "/api/v1/rules/reload", data="groups: []",
                        headers={**YAML, "Authorization": "Bearer s3cret"})
    assert status == 200 and agg.core.rules() == []


def test_open_address_without_a_token_refuses_writes():
    agg = Agg("0.0.0.0", None)
    status, body = call(agg, "POST", "/api/v1/rules/reload", data="groups: []", headers=YAML)
    assert status == 403 and "token" in body["error"]


def test_bad_rule_file_keeps_the_old_rules():
    agg = Agg("127.0.0.1", None)
    status, body = call(agg, "POST", "/api/v1/rules/reload?filename=new.yaml",
                        data="groups:\n  - name: g\n    rules:\n      - alert: X\n        expr: nope(requests[1m]) > 1\n",
                        headers=YAML)
    assert status == 400 and "new.yaml" in body["error"] and "nope" in body["error"]
    assert [r["alert"] for r in agg.core.rules()] == ["Busy"]


def test_reads_are_open():
    agg = Agg("0.0.0.0", "s3cret")
    status, body = call(agg, "GET", "/api/v1/rules")
    assert status == 200 and body["data"][0]["alert"] == "Busy"


def test_autoscaling_config_naming_no_running_deployment_is_reported_not_refused():
    from ray_monitor.common.snapshot import ReplicaIdentity, ReplicaSnapshot

    agg = Agg("127.0.0.1", None)
    rules = GOOD + """
autoscaling:
  deployments:
    - deployment: Classifer
      max_replicas: 3
"""
    status, _ = call(agg, "POST", "/api/v1/rules/reload", data=rules, headers=YAML)
    assert status == 200  # accepted: deployments often come after the rules
    now = agg.core.clock()
    agg.core.ingest([ReplicaSnapshot(ReplicaIdentity("app", "Classifier", "r1", "n", 1), 1,
                                     now - 1, now)])
    agg.core.evaluate(now)
    status, body = call(agg, "GET", "/api/v1/hints")
    [warning] = body["warnings"]
    assert "autoscaling.deployments[0]" in warning and "'Classifer'" in warning
    assert "Classifier" in warning  # the close match is suggested


#: What Prometheus sends when it scrapes (it prefers OpenMetrics, which carries exemplars).
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,"
                     "*/*;q=0.1")


def test_metrics_are_built_off_the_event_loop_from_copies_taken_on_it(monkeypatch):
    """A large /metrics takes seconds to build and render: worker threads do it, so ingest
    and rule rounds are not held. On the loop the store's arrays are only copied, so state
    that changes meanwhile (ingest, on the loop in production: here while the series are
    built, and while the text is made) is not in this scrape, even where ingest writes a
    series' arrays in place (a second delta of the same histogram)."""
    import threading

    import ray_monitor.aggregator.http_api as http_api
    from ray_monitor.common.histogram import Histogram
    from ray_monitor.common.snapshot import ReplicaIdentity, ReplicaSnapshot, SeriesDelta

    def snap(app, seq=1):
        now, latency = agg.core.clock(), Histogram()
        latency.record(0.2)
        return ReplicaSnapshot(ReplicaIdentity(app, "D", f"{app}-r", "n", 1), seq, now - 1, now,
                               [SeriesDelta("__call__", "ok", False, latency)])
    agg = Agg("127.0.0.1", None)
    agg.core.ingest([snap("one")])
    seen = {}
    real, reader = http_api.render, agg.core.store.cumulative_reader

    def read(*a, **k):  # the store is copied on the loop, in one go
        seen["read"] = threading.current_thread()
        build = reader(*a, **k)

        def built():
            seen["built"] = threading.current_thread()
            agg.core.ingest([snap("one", 2)])  # the same series: its bucket counts grow
            return build()
        return built
    agg.core.store.cumulative_reader = read

    def render(source, accept=""):
        seen["thread"] = threading.current_thread()
        agg.core.ingest([snap("two")])
        return real(source, accept)
    monkeypatch.setattr(http_api, "render", render)

    async def go():
        async with TestClient(TestServer(make_app(agg))) as client:
            seen["loop"] = threading.current_thread()
            resp = await client.get("/metrics")
            return resp.status, await resp.text()
    try:
        status, text = asyncio.run(go())
    finally:
        agg.core.notifier.close(1.0)
    assert status == 200 and seen["read"] is seen["loop"]
    assert seen["built"] is not seen["loop"] and seen["thread"] is not seen["loop"]
    assert 'application="one"' in text and 'application="two"' not in text
    one = [line for line in text.splitlines() if 'application="one"' in line]
    assert [line.rsplit(" ", 1)[1] for line in one if 'le="0.25"' in line] == ["1.0"]
    assert [line.rsplit(" ", 1)[1] for line in one
            if line.startswith("ray_monitor_requests_total")] == ["1.0"]
    # and the store did take both deltas
    assert [s.histogram.buckets for s in agg.core.store.cumulative()
            if s.metric == "latency_seconds" and s.labels["application"] == "one"
            ][0] == {k: 2 * v for k, v in snap("one").series[0].latency.buckets.items()}


def test_metrics_answer_openmetrics_when_asked_and_the_text_format_otherwise():
    from ray_monitor.common.histogram import Histogram
    from ray_monitor.common.snapshot import Exemplar, ReplicaIdentity, ReplicaSnapshot, SeriesDelta
    from tests.servers import PROMTOOL, promtool

    agg = Agg("127.0.0.1", None)
    now = agg.core.clock()
    latency = Histogram()
    latency.record(0.2)
    delta = SeriesDelta("__call__", "ok", False, latency)
    delta.exemplars = {0: Exemplar("a" * 32, "b" * 16, 0.2, now)}
    agg.core.ingest([ReplicaSnapshot(ReplicaIdentity("app", "Classifier", "r1", "n", 1), 1,
                                     now - 1, now, [delta])])

    def scrape(headers):
        async def go():
            async with TestClient(TestServer(make_app(agg))) as client:
                resp = await client.get("/metrics", headers=headers)
                return resp.status, resp.headers["Content-Type"], await resp.text()
        return asyncio.run(go())

    try:
        status, ctype, om = scrape({"Accept": PROMETHEUS_ACCEPT})
        assert status == 200 and ctype.startswith("application/openmetrics-text")
        assert om.endswith("# EOF\n")
        assert 'ray_monitor_request_duration_seconds_bucket{' in om
        assert '# {span_id="' + "b" * 16 + '",trace_id="' + "a" * 32 + '"} 0.2' in om
        for headers in ({}, {"Accept": "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"},
                        {"Accept": "*/*"}):
            status, ctype, text = scrape(headers)
            assert status == 200 and ctype.startswith("text/plain"), headers
            assert "# EOF" not in text and "trace_id" not in text
            assert 'ray_monitor_requests_total{application="app"' in text
        if os.access(PROMTOOL, os.X_OK):
            check = promtool("check", "metrics", input=text)
            assert check.returncode == 0, check.stdout + check.stderr
    finally:
        agg.core.notifier.close(1.0)


@pytest.mark.parametrize("entry, field, words", [
    ("min_replicas: 5\n      max_replicas: 2", "autoscaling.deployments[0].min_replicas", "above"),
    ("targets:\n        - metric: p95(nothing_seconds[30s])\n          value: 0.2",
     "autoscaling.deployments[0].targets[0].metric", "nothing_seconds"),
    ("targets:\n        - metric: p96(latency_seconds[30s])\n          value: 0.2",
     "autoscaling.deployments[0].targets[0].metric", "p96"),
    ("tolerance: -0.1", "autoscaling.deployments[0].tolerance", "-0.1"),
    ("cooldown: soon", "autoscaling.deployments[0].cooldown", "duration"),
])
def test_reload_refuses_a_bad_autoscaling_section_with_400_naming_the_field(entry, field, words):
    agg = Agg("127.0.0.1", None)
    rules = "groups: []\nautoscaling:\n  deployments:\n    - deployment: Classifier\n      " + entry
    status, body = call(agg, "POST", "/api/v1/rules/reload?filename=scale.yaml", data=rules,
                        headers=YAML)
    assert status == 400, body
    [problem] = body["problems"]
    assert problem["file"] == "scale.yaml" and problem["deployment"] == "Classifier"
    assert problem["field"] == field and words in problem["message"]
    assert [r["alert"] for r in agg.core.rules()] == ["Busy"]  # the old rules keep running


def test_reload_reads_the_body_never_a_path_on_the_aggregators_disk(tmp_path):
    path = tmp_path / "elsewhere.yaml"
    path.write_text("groups: []\n")
    agg = Agg("127.0.0.1", None)
    status, body = call(agg, "POST", "/api/v1/rules/reload", data=str(path), headers=YAML)
    assert status == 400 and [r["alert"] for r in agg.core.rules()] == ["Busy"]


def test_deployments_show_stream_figures_and_top_tenants_only_for_streaming_ones():
    from ray_monitor.common.snapshot import (GenAIDelta, ReplicaIdentity, ReplicaSnapshot,
                                             SeriesDelta, UsageDelta)
    from tests.helpers import Clock, hist

    clock = Clock(10_000.0)
    agg = Agg("127.0.0.1", None)
    agg.core = AggregatorCore({}, rules_text=GOOD, clock=clock)
    chat = ReplicaIdentity("app", "Chat", "r1", "n1", 1, "v1")
    plain = ReplicaIdentity("app", "Plain", "r2", "n1", 2, "v1")
    echo = ReplicaIdentity("app", "Echo", "r3", "n1", 3, "v1")  # streams, no usage, no tenant
    g = GenAIDelta(time_per_token=hist(0.02, 0.04, 0.03), items=hist(10, 20, 30),
                   input_tokens=hist(5, 5, 5), output_tokens=hist(100, 200, 300),
                   queue=hist(0.5, 0.5, 0.5))
    usage = [UsageDelta("toy", "acme", 2, 0, 10, 300, hist(1.0, 1.2)),
             UsageDelta("toy", "zeta", 1, 1, 5, 300, hist(2.0)),
             UsageDelta("toy", "other", 5, 0, 0, 0, hist(1.0, 1.0, 1.0, 1.0, 1.0))]
    clock.t = 10_001.0
    agg.core.ingest([
        ReplicaSnapshot(chat, 1, 10_000.0, 10_001.0,
                        [SeriesDelta("chat", "ok", False, hist(1.0, 1.2, 2.0),
                                     hist(0.1, 0.2, 0.3), genai=g)], {"chat": 0}, usage=usage),
        ReplicaSnapshot(plain, 1, 10_000.0, 10_001.0,
                        [SeriesDelta("__call__", "ok", False, hist(0.01, 0.02))], {"__call__": 0}),
        ReplicaSnapshot(echo, 1, 10_000.0, 10_001.0,
                        [SeriesDelta("gen", "ok", False, hist(0.5), hist(0.05),
                                     genai=GenAIDelta(items=hist(12)))], {"gen": 0})])
    clock.t = 10_003.0
    status, body = call(agg, "GET", "/api/v1/deployments")
    assert status == 200
    rows = {d["deployment"]: d for d in body["data"]}
    assert "stream" not in rows["Plain"]  # a plain deployment's row is as before
    assert set(rows["Plain"]) == {"application", "deployment", "replicas", "model_versions",
                                  "requests_1m", "rate_per_s", "error_ratio", "p50_s", "p99_s",
                                  "inflight"}
    s = rows["Chat"]["stream"]
    assert 0.2 * 0.99 <= s["ttft_p50_s"] <= 0.2 * 1.01  # the histogram's 1%
    assert 0.3 * 0.99 <= s["ttft_p95_s"] <= 0.3 * 1.01
    assert 0.03 * 0.99 <= s["tpot_p50_s"] <= 0.03 * 1.01
    assert 0.5 * 0.99 <= s["queue_p50_s"] <= s["queue_p95_s"] <= 0.5 * 1.01
    assert s["tokens_per_s"] == pytest.approx(600 / 60.0)
    assert s["items_per_s"] == pytest.approx(60 / 60.0)
    # heaviest by requests first; `other` is not a tenant
    assert s["top_tenants"] == [{"tenant": "acme", "requests": 2.0, "output_tokens": 300.0},
                                {"tenant": "zeta", "requests": 1.0, "output_tokens": 300.0}]
    e = rows["Echo"]["stream"]
    assert e["tokens_per_s"] is None and e["items_per_s"] == pytest.approx(12 / 60.0)
    assert e["top_tenants"] == [] and e["tpot_p50_s"] is None
    assert e["queue_p95_s"] is None  # no caller sent its time


def test_garbage_collection_is_paused_while_a_scrape_builds_and_renders_then_restored():
    """A full collection during a large scrape scans all it made so far, with the GIL
    held: the loop would stall whichever thread it lands in. The pause nests, ends with
    the scrape, and leaves a collector that was off (the user's choice) off."""
    import gc

    from ray_monitor.aggregator.http_api import collect_off_loop, gc_paused

    class Probe:
        def collect(self):
            seen.append(gc.isenabled())
            return iter(())
    seen: list = []
    assert gc.isenabled()
    assert asyncio.run(collect_off_loop([Probe()])) == [] and seen == [False]
    assert gc.isenabled()
    with gc_paused():
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
