"""Every example in examples/ runs and succeeds.

Each example's ``run(mon, ...)`` (what its ``main()`` calls after starting a local Ray,
Serve and the monitor) runs on the session's cluster under a fresh application name, so
the suite pays for one Ray start, not one per example; the standalone command of one
example runs as the README gives it, in a process of its own, to cover ``main()``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]


def _app(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def test_sklearn_classifier(mon, serve_http, serve_apps, capsys):
    from examples import sklearn_classifier

    app = _app("sk")
    serve_apps.append(app)
    assert sklearn_classifier.run(mon, serve_http, app=app, requests=60, labelled=0.5) == 0
    out = capsys.readouterr().out
    assert "sent 60 requests" in out and "feedback for 30 of them: {'joined': 30}" in out
    assert "accuracy (monitor)" in out and "drift of feature_mean_radius" in out


def test_streaming(mon, serve_http, serve_apps, capsys):
    from examples import streaming

    app = _app("st")
    serve_apps.append(app)
    assert streaming.run(mon, serve_http, app=app, requests=3, tokens=8) == 0
    out = capsys.readouterr().out
    assert "handle stream" in out and "HTTP stream" in out
    # a row per way, each with the monitor's first-item and whole-stream p50
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("generate", "__call__"))]
    assert [r[0] for r in rows] == ["generate", "__call__"] and all("ms" in r for r in rows)


def test_fastapi_app(mon, serve_http, serve_apps, capsys):
    from examples import fastapi_app

    app = _app("fa")
    serve_apps.append(app)
    assert fastapi_app.run(mon, serve_http, app=app, requests=40) == 0
    out = capsys.readouterr().out
    assert "the monitor's counts match the client's: 40 requests" in out
    book = next(line for line in out.splitlines() if line.startswith("GET /books/{book_id}"))
    assert "200:" in book and "404:" in book  # the seeded traffic asks for missing books
    recommend = next(line for line in out.splitlines() if line.startswith("GET /users/"))
    assert "500:" in recommend


def test_gpu_model_falls_back_to_cpu_and_shows_the_monitors_gpus(mon, serve_apps, capsys):
    from examples import gpu_model

    app = _app("gm")
    serve_apps.append(app)
    assert gpu_model.run(mon, app=app, requests=5, batch=8) == 0
    out = capsys.readouterr().out
    # the session's cluster has no GPU resource: the CPU, in torch or numpy
    assert "model runs on cpu" in out
    assert "the monitor counted 5 batches" in out
    # the session's monitor samples a fake NVML with two GPUs (tests/fake_nvml.py)
    gpu_section = out.split("GPUs as the monitor sees them:")[1]
    assert " GPU 0 " in gpu_section and " GPU 1 " in gpu_section and "utilization" in gpu_section


def test_standalone_command():
    """``.venv/bin/python examples/fastapi_app.py``: its own local Ray, exit code 0."""
    env = {k: v for k, v in os.environ.items()
           if k != "RAY_ADDRESS" and not k.startswith(("OTEL_", "RAY_SERVE_TRACING"))}
    proc = subprocess.run([sys.executable, "examples/fastapi_app.py", "--requests", "20"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the monitor's counts match the client's: 20 requests" in proc.stdout


def test_genai_stream(mon, serve_http, serve_apps, capsys):
    from examples import genai_stream

    app = _app("gn")
    serve_apps.append(app)
    try:
        assert genai_stream.run(mon, serve_http, app=app, requests=2, tokens=8) == 0
    finally:
        mon.reload("groups: []")
    out = capsys.readouterr().out
    assert "time to first token   monitor" in out and "time per output token monitor" in out
    # a row per tenant: the monitor's tokens next to the usage the responses carried
    rows = [line.split() for line in out.splitlines() if "[usage" in line]
    assert [r[0] for r in rows] == ["acme", "globex"]
    for r in rows:
        assert r[1] == r[3].rstrip("]") and r[4] == r[6].rstrip("]")
