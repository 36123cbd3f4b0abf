"""Shared fixtures: one real Ray cluster per test session, one OTLP receiver, one monitor.

The receiver starts before the cluster, and the ``OTEL_*`` variables that point at it
are set before the raylet starts, so every replica (a child of the raylet) exports
its spans and metrics to it over the wire. Ray Serve's own tracing is on for the
session through ``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH``, as the README sets it up, at
Serve's default sampling ratio (0.01): the setting people run, so a test that needs a
head-sampled trace sends a sampled ``traceparent``, as a real client would. Serve's
tracing off, and other ratios, run on small clusters of their own
(tests/integration/test_traces_clusters.py).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable, TypeVar

import pytest

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(fn: Callable[[], T], timeout: float = 60.0, interval: float = 0.25,
               what: str = "") -> T:
    """Polls ``fn`` until it returns something truthy; fails with its last value."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = fn()
        except Exception as e:  # keep polling; report the last failure
            last = e
        if last and not isinstance(last, Exception):
            return last  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or fn}: "
                                 f"last value {last!r}")
        time.sleep(interval)


@pytest.fixture
def capture_server():
    """An HTTP server on loopback recording every POST (see :class:`tests.helpers.CaptureServer`)."""
    from tests.helpers import CaptureServer

    with CaptureServer() as server:
        yield server


@pytest.fixture
def otlp_env(monkeypatch):
    """A real OTLP receiver of this test's own, and the standard variables pointing at
    it (for code that runs in the test's process; the cluster's is ``otlp``)."""
    from tests.otlp_receiver import OtlpReceiver

    with OtlpReceiver() as rx:
        for k, v in rx.env("http/protobuf").items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
        yield rx


@pytest.fixture(scope="session")
def otlp():
    from tests.otlp_receiver import OtlpReceiver

    rx = OtlpReceiver().start()
    yield rx
    rx.stop()


@pytest.fixture(scope="session")
def ray_cluster(otlp, tmp_path_factory):
    """A real Ray cluster (head node only; multi-node tests add and remove nodes)."""
    env = {**otlp.env("grpc"), "OTEL_BSP_SCHEDULE_DELAY": "100",
           "OTEL_METRIC_EXPORT_INTERVAL": "1000", "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1",
           "RAY_DEDUP_LOGS": "0",
           # The README's setting: Serve's own tracing (proxy, routing, replicas) exports
           # through ray-monitor, at Serve's default ratio (RAY_SERVE_TRACING_SAMPLING_RATIO
           # unset: 0.01).
           "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH": "ray_monitor.tracing:serve_span_processors",
           "RAY_SERVE_TRACING_SAMPLING_RATIO": None, "PYTHONPATH": os.pathsep.join(
               [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.environ.get("PYTHONPATH", "")])}
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    import ray
    from ray.cluster_utils import Cluster

    head_args = {"num_cpus": 8, "include_dashboard": False,
                 "_system_config": {"health_check_period_ms": 1000,
                                    "health_check_failure_threshold": 5}}
    try:
        cluster = Cluster(initialize_head=True, head_node_args=head_args)
    except Exception as e:
        # Ray gives a raylet 30 s to register, hard-coded; on a loaded two-core machine
        # that is sometimes too little. One more try, said out loud.
        import warnings

        warnings.warn(f"Ray cluster did not start ({e}); trying once more")
        cluster = Cluster(initialize_head=True, head_node_args=head_args)
    ray.init(address=cluster.address, namespace="ray_monitor_tests", log_to_driver=True)
    yield cluster
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
    cluster.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def serve_http(ray_cluster):
    """Ray Serve on a free loopback port (its tracing is on through the environment)."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def mon(ray_cluster):
    import ray_monitor

    mon = ray_monitor.start(port=0, eval_interval_s=1.0, gpu_interval_s=1.0,
                            nvml_factory="tests.fake_nvml:make_fake")
    yield mon
    ray_monitor.stop()


@pytest.fixture
def serve_apps(serve_http):
    """Deletes the applications a test deployed, so the next test starts clean."""
    from ray import serve

    names: list[str] = []
    yield names
    for name in names:
        try:
            serve.delete(name)
        except Exception:
            pass
