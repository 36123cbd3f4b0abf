"""`ray-monitor compare` on a real cluster: two versions of one deployment side by side,
the second worse on purpose (more errors, slower, less accurate), and the report shows each
difference as significant."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from ray import serve

import ray_monitor
from ray_monitor import monitor
from ray_monitor.client import cli
from tests.conftest import wait_until

pytestmark = pytest.mark.ray

N = 240


class Scorer:
    """Labels x by its parity. ``worse`` adds 40 ms, fails one request in four and gets the
    label wrong one time in five."""

    def __init__(self, worse: bool) -> None:
        self.worse = worse

    async def __call__(self, x: int) -> dict:
        if self.worse:
            await asyncio.sleep(0.04)
            if x % 4 == 0:
                raise ValueError("worse on purpose")
        label = x % 2
        if self.worse and x % 5 == 1:
            label = 1 - label
        return {"label": str(label)}


def label_of(result: dict) -> dict:
    return {"label": result["label"]}


def drive(handle, n: int) -> list[tuple[str, int]]:
    """``n`` requests, a few at a time; returns (request id, x) of every one."""
    def one(x: int) -> tuple[str, int]:
        resp = handle.remote(x)
        try:
            resp.result(timeout_s=60)
        except Exception:
            pass
        return resp.request_id, x
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(n)))


def test_compare_shows_a_worse_version_as_significantly_worse(mon, serve_apps):
    suffix = uuid.uuid4().hex[:6]
    name = f"Scorer{suffix}"
    apps = [f"cmp{suffix}a", f"cmp{suffix}b"]
    serve_apps.extend(apps)
    dep = serve.deployment(Scorer, name=name, ray_actor_options={"num_cpus": 0},
                           max_ongoing_requests=16)
    handles = []
    for app, version, worse in ((apps[0], "v1", False), (apps[1], "v2", True)):
        wrapped = monitor(dep, model_version=version, prediction=label_of)
        handles.append(serve.run(wrapped.bind(worse), name=app, route_prefix=f"/{app}"))
    sent = [drive(h, N) for h in handles]
    wait_until(lambda: sum(m["predictions"] for m in mon.quality(600) if m["deployment"] == name)
               == N + N * 3 // 4, timeout=60, what="every ok prediction at the aggregator")
    res = ray_monitor.record_feedback([{"request_id": rid, "label": str(x % 2)}
                                       for ids in sent for rid, x in ids])
    # the failed requests made no prediction: their feedback is held, then unknown
    assert res["counts"] == {"joined": N + N * 3 // 4, "held": N // 4}

    out = io.StringIO()
    code = cli.main(["compare", "--deployment", name, "--versions", "v1", "v2",
                     "--window", "5m", "--json"], connect=lambda: mon, out=out)
    assert code == 0
    report = json.loads(out.getvalue())
    rows = {r["metric"]: r for r in report["rows"]}
    assert rows["error_ratio"]["a"] == 0.0 and rows["error_ratio"]["b"] == 0.25
    assert rows["error_ratio"]["significant"] and rows["error_ratio"]["p_value"] < 1e-6
    assert rows["accuracy"]["a"] == 1.0 and rows["accuracy"]["b"] == pytest.approx(0.8, abs=0.02)
    assert rows["accuracy"]["significant"]
    for q in ("p50_s", "p95_s"):
        assert rows[q]["b"] - rows[q]["a"] > 0.03, rows[q]
        assert rows[q]["significant"], rows[q]
    assert report["figures"][0]["requests"] == N and report["figures"][1]["requests"] == N

    table = io.StringIO()
    assert cli.main(["compare", "--deployment", name, "--versions", "v1", "v2"],
                    connect=lambda: mon, out=table) == 0
    print(table.getvalue())
    lines = {line.split("  ")[0]: line for line in table.getvalue().splitlines()}
    assert lines["error ratio"].rstrip().endswith("yes")
    assert lines["accuracy"].rstrip().endswith("yes")
    assert lines["p50 (ms)"].rstrip().endswith("yes")
