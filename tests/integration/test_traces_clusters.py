"""One trace per request with Ray Serve's tracing off, and with its proxy at ratios 0 and
1.0, each on a small cluster of its own.

Ray Serve reads its tracing settings from the environment once per process when it
starts, and its HTTP proxy starts once per cluster: the session's cluster has Serve's
tracing on at its default ratio (0.01, test_traces_sampling.py), so these settings run
in a subprocess (tests/trace_cluster.py) that starts a local Ray with them, its own OTLP
receiver and ray-monitor, drives the same scenarios through a plain HTTP client, and
writes what the receiver and the aggregator got to a JSON file; the assertions are
here. Bounds on the fraction of fast requests exported are 4.5 sigma of the binomial
(exact at 0 and 1): a correct run falls outside them about once in 150,000.

- ``off``: no Serve tracing anywhere (the proxy neither decides nor carries context):
  the ingress's ``RAY_MONITOR_SAMPLE_RATIO`` decides (0, 0.01, 1.0; the model's ratio is
  1.0 in every app, so a model that decided for itself would export every request), and
  a caller's ``traceparent``, sampled or not, is honoured.
- ``on-1.0`` / ``on-0``: Serve's proxy decides at that ratio.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trace_scenarios import KEPT_KINDS, Sent, analyse, binomial_bounds

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("config", ["off", "on-1.0", "on-0"])
def test_one_trace_per_request(config, tmp_path):
    out = tmp_path / f"{config}.json"
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith(("OTEL_", "RAY_SERVE_TRACING", "RAY_ADDRESS"))}
    proc = subprocess.run([sys.executable, "-m", "tests.trace_cluster", config, str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    data = json.loads(out.read_text())
    for res in data["results"]:
        sent = [Sent(**q) for q in res["sent"]]
        what = f"{config}/{res['scenario']}"
        assert {q.status for q in sent if q.kind == "fail"} == {500}, what
        assert {q.status for q in sent if q.kind != "fail"} == {200}, what
        rep = analyse(sent, res["spans"], tuple(res["names"]))
        kept = sum(1 for q in sent if q.kind in KEPT_KINDS)
        assert not rep.problems and rep.kept_complete == kept, (what, rep.problems[:5])
        ratio = res["ratio"] if res["ratio"] is not None else float(config[3:]) \
            if config.startswith("on-") else None
        if res["header"] == "sampled":
            ratio = 1.0
        elif res["header"] == "unsampled":
            ratio = 0.0
        if ratio is not None:
            lo, hi = binomial_bounds(rep.fast, ratio)
            assert lo <= rep.fast_exported <= hi, (what, rep.as_dict(), (lo, hi))
        # The aggregator keeps the same whole traces.
        whole = [t for t in res["aggregator"] if set(res["names"]) <= set(t["names"])]
        assert len(whole) >= kept, (what, res["aggregator"])
