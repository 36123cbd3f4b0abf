"""The status page in a real browser (Debian's headless Chromium driven by Playwright),
against the session's monitor with a monitored deployment under traffic and a firing
alert; and the Grafana dashboard's metrics against the same monitor's live /metrics."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from ray_monitor import monitor
from ray_monitor.client.dashboard import build_dashboard, queried_metrics
from ray_monitor.common.catalog import GENAI_METRICS, METRICS, TENANT_METRICS
from tests.conftest import wait_until
from tests.integration.test_alerts_serve import Faulty, Traffic

pytestmark = [pytest.mark.e2e, pytest.mark.ray]
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PAGE_TIMEOUT_MS = 60_000


def _missing(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " (CI=true: CI must install it)")
    pytest.skip(reason)


def require_browser():
    """Playwright's sync API and Debian's Chromium; skip without them (fail under CI=true)."""
    chromium = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if not chromium:
        _missing(f"{CHROMIUM} not found; install Debian's chromium package "
                 "(apt-get install chromium) to run the browser test")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed; pip install playwright (no `playwright install`: "
                 "the test uses Debian's chromium)")
    return sync_playwright, chromium


def _rules(app: str) -> str:
    return f"""
groups:
  - name: status-page
    interval: 1s
    rules:
      - alert: StatusPageErrors
        expr: error_ratio(requests{{application="{app}"}}[10s]) by (application, deployment) > 0.2
        for: 1s
        labels: {{severity: page}}
        annotations: {{summary: "errors on {{{{ $labels.deployment }}}}"}}
"""


#: /metrics names that exist once a streaming or token-counting request reported.
_STREAM_NAMES = tuple(METRICS[m].prometheus for m in (
    "first_item_seconds", *GENAI_METRICS, *TENANT_METRICS))


#: /metrics names that exist once a caller sent its time (not the HTTP calls here).
QUEUE_NAMES = tuple(METRICS[m].prometheus for m in ("queue_seconds",
                                                    "first_item_with_queue_seconds"))


def _streams_only(name: str) -> bool:
    return name.startswith(_STREAM_NAMES)


def _live_names(url: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(requests.get(url, timeout=10).text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def test_status_page_shows_deployments_alerts_charts_and_gpus(mon, serve_apps):
    sync_playwright, chromium = require_browser()
    app = f"sp{uuid.uuid4().hex[:8]}"
    serve_apps.append(app)
    handle = serve.run(Faulty.bind(), name=app, route_prefix=f"/{app}")
    row_key = f"{app}/Faulty"
    mon.reload(_rules(app))
    console: list[str] = []
    try:
        with Traffic(handle):
            wait_until(lambda: any(d["application"] == app and d["rate_per_s"]
                                   for d in mon.deployments()), what="the deployment's rate")
            handle.set_fault.remote("errors").result()
            wait_until(lambda: any(a["name"] == "StatusPageErrors" and a["state"] == "firing"
                                   for a in mon.alerts()), what="the alert to fire")
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    page.set_default_timeout(PAGE_TIMEOUT_MS)
                    page.on("console", lambda m: m.type == "error" and console.append(m.text))
                    page.on("pageerror", lambda e: console.append(f"uncaught: {e}"))
                    page.goto(mon.url + "/")
                    assert page.title() == "ray-monitor"

                    row = page.locator(f'#deployments tr[data-deployment="{row_key}"]')
                    row.wait_for()
                    cells = row.locator("td").all_inner_texts()
                    assert cells[:2] == [app, "Faulty"]
                    assert cells[4] not in ("", "-", "0"), f"rate column: {cells}"

                    firing = page.locator('#alerts table.firing tr[data-alert="StatusPageErrors"]')
                    firing.wait_for()
                    assert "deployment=Faulty" in firing.inner_text()

                    card = page.locator(f'#charts .card[data-deployment="{row_key}"]')
                    drawn = card.locator(".latency svg g.series .line, .latency svg g.series .dot")
                    drawn.first.wait_for()
                    assert card.locator(".errors svg g.series .line, .errors svg g.series .dot").count()

                    gpus = page.locator("#gpus tr.gpu, #gpus .no-gpus")
                    gpus.first.wait_for()
                    if any(snap.devices for snap in mon.gpus().values()):  # the fake NVML's GPUs
                        assert "NVIDIA H100" in page.locator("#gpus tr.gpu").first.inner_text()

                    # The failed requests' traces, kept by the aggregator.
                    trace = page.locator("#traces tr.trace", has_text="Faulty")
                    trace.first.wait_for(timeout=30_000)
                    assert "Faulty" in trace.first.inner_text()

                    page.wait_for_timeout(2500)  # one more poll: the redraw must not error either
                    ARTIFACTS.mkdir(exist_ok=True)
                    page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
                finally:
                    browser.close()
            assert console == [], console

            # Every metric the Grafana dashboard queries is on the live /metrics; those of
            # streams and tokens once a stream reported (the next test).
            queried = {n for n in queried_metrics(build_dashboard()) if not _streams_only(n)}
            if not any(snap.devices for snap in mon.gpus().values()):
                queried = {n for n in queried if not n.startswith("ray_monitor_gpu_")}
            missing = queried - _live_names(mon.metrics_url)
            assert not missing, f"the dashboard queries metrics /metrics lacks: {sorted(missing)}"
    finally:
        mon.reload("groups: []")


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor(tenant=lambda n, user="": user)
class Streamer:
    async def chat(self, n: int, user: str = ""):
        for i in range(n):
            yield {"object": "chat.completion.chunk", "model": "toy",
                   "choices": [{"index": 0, "delta": {"content": f"w{i}"}}]}
        yield {"object": "chat.completion.chunk", "model": "toy", "choices": [],
               "usage": {"prompt_tokens": 2, "completion_tokens": n, "total_tokens": n + 2}}


def test_status_page_shows_stream_columns_for_a_streaming_deployment(mon, serve_apps):
    sync_playwright, chromium = require_browser()
    app = f"st{uuid.uuid4().hex[:8]}"
    serve_apps.append(app)
    handle = serve.run(Streamer.bind(), name=app, route_prefix=f"/{app}")
    for user in ("acme", "acme", "zeta"):
        list(handle.options(stream=True).chat.remote(5, user))
    row = wait_until(lambda: next((d for d in mon.deployments() if d["application"] == app
                                   and (d.get("stream") or {}).get("top_tenants")), None),
                     what="the deployment's stream figures")
    assert [t["tenant"] for t in row["stream"]["top_tenants"]] == ["acme", "zeta"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.goto(mon.url + "/")
            tr = page.locator(f'#streams tr[data-deployment="{app}/Streamer"]')
            tr.wait_for()
            cells = tr.locator("td").all_inner_texts()
            assert cells[:2] == [app, "Streamer"]
            assert cells[2] not in ("", "-"), f"TTFT p50 column: {cells}"
            assert cells[8] not in ("", "-", "0"), f"tokens/s column: {cells}"
            assert cells[9].startswith("acme:2(10)"), f"top tenants column: {cells}"
        finally:
            browser.close()
    # the Grafana dashboard's stream and token panels read metrics /metrics now has
    queried = {n for n in queried_metrics(build_dashboard())
               if _streams_only(n) and not n.startswith(QUEUE_NAMES)}
    assert queried, "the dashboard has a generative-serving row"
    missing = queried - _live_names(mon.metrics_url)
    assert not missing, f"the dashboard queries metrics /metrics lacks: {sorted(missing)}"
