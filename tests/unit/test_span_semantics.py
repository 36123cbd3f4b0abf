"""What a span says, without Ray: HTTP server semantics on ingress spans, errors as the
user wrote them, no empty attributes, and a backend that refuses a signal.

Spans are read back over the wire from the test OTLP receiver, as a backend sees them.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ray_monitor import monitor
from ray_monitor.replica import otlp_refusal
from ray_monitor.replica.span_errors import MAX_MESSAGE, exception_attributes, original_error
from tests.otlp_receiver import OtlpReceiver


@pytest.fixture(autouse=True)
def fresh_refusals():
    """A refusal stops a signal for the whole process: each test starts without one."""
    otlp_refusal.reset()
    yield
    otlp_refusal.reset()


def _request(method="GET", path="/shop/items", headers=()):
    return Request({"type": "http", "method": method, "path": path, "query_string": b"",
                    "headers": list(headers)})


def _spans(cls, rx, n):
    cls.__ray_monitor__.state.recorder.drain()  # the requests ended: recorded off the path
    cls.__ray_monitor__.state.tracer.provider.force_flush()
    return rx.wait_for(lambda r: r.spans() if len(r.spans()) >= n else None,
                       what=f"{n} spans")


def _ray_task_error(cause: BaseException) -> BaseException:
    from ray.exceptions import RayTaskError

    colours = "\x1b[36mray::Model.__call__()\x1b[39m (pid=1, ip=10.0.0.1)\n" + \
        "Traceback (most recent call last):\n" + "  File \"model.py\", line 9\n" * 120 + \
        f"\x1b[31m{type(cause).__name__}: {cause}\x1b[0m"
    return RayTaskError("Model.__call__", colours, cause, proctitle="ray::Model", pid=1,
                        ip="10.0.0.1").as_instanceof_cause()


def test_errors_read_as_the_user_wrote_them():
    wrapped = _ray_task_error(KeyError("no such item"))
    assert type(wrapped).__name__ == "RayTaskError(KeyError)"
    assert isinstance(original_error(wrapped), KeyError)
    attrs = exception_attributes(wrapped)
    assert attrs["exception.type"] == "KeyError"
    assert attrs["exception.message"] == "'no such item'"
    assert "\x1b" not in attrs["exception.stacktrace"]
    assert attrs["exception.stacktrace"].endswith("KeyError: 'no such item'")
    long = exception_attributes(ValueError("x" * 5000), stack=False)
    assert len(long["exception.message"]) == MAX_MESSAGE and "exception.stacktrace" not in long


def test_http_ingress_spans_carry_the_semantic_conventions(otlp_env):
    @monitor(sample_ratio=1.0, flush_interval_s=3600)
    class Ingress:
        def __call__(self, request):
            what = request.scope["path"]
            if what.endswith("/missing"):
                return JSONResponse({"error": "not found"}, status_code=404)
            if what.endswith("/down"):
                return Response("down", status_code=503)
            if what.endswith("/fail"):
                raise _ray_task_error(KeyError("no such item"))
            return {"ok": True}
    m = Ingress()
    assert m(_request()) == {"ok": True}
    assert m(_request("POST", "/shop/missing")).status_code == 404
    assert m(_request("GET", "/shop/down")).status_code == 503
    with pytest.raises(KeyError):
        m(_request("PURGE", "/shop/fail"))
    spans = {s.attributes["url.path"]: s for s in _spans(Ingress, otlp_env, 4)}
    ok = spans["/shop/items"]
    assert ok.attributes["http.request.method"] == "GET"
    assert ok.attributes["http.response.status_code"] == 200 and ok.status_code == "UNSET"
    missing = spans["/shop/missing"]  # the client's error: not the server span's
    assert missing.attributes["http.response.status_code"] == 404
    assert missing.status_code == "UNSET" and missing.attributes["http.request.method"] == "POST"
    down = spans["/shop/down"]
    assert down.attributes["http.response.status_code"] == 503
    assert down.status_code == "ERROR" and down.attributes["error.type"] == "503"
    fail = spans["/shop/fail"]
    assert fail.attributes["http.response.status_code"] == 500 and fail.status_code == "ERROR"
    assert fail.attributes["http.request.method"] == "_OTHER"
    assert fail.attributes["http.request.method_original"] == "PURGE"
    assert fail.attributes["error.type"] == "KeyError"
    assert fail.status_message == "KeyError: 'no such item'"
    [(name, event)] = fail.events
    assert name == "exception" and event["exception.type"] == "KeyError"
    assert "\x1b" not in event["exception.stacktrace"]
    for s in spans.values():  # an attribute says something or is not there
        assert "" not in s.attributes.values() and "" not in s.resource.values(), s.attributes
        assert "ray.serve.model_version" not in s.attributes
    Ingress.__ray_monitor__.close()


def test_a_function_deployment_is_an_http_ingress_too(otlp_env):
    @monitor(sample_ratio=0.0, flush_interval_s=3600)
    def handler(request):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        handler(_request("GET", "/fn"))
    [span] = _spans(handler, otlp_env, 1)
    assert (span.attributes["http.response.status_code"], span.attributes["url.path"],
            span.attributes["ray_monitor.kept"], span.status_code) == (500, "/fn", "error",
                                                                        "ERROR")
    handler.__ray_monitor__.close()


@contextlib.contextmanager
def _refusing(monkeypatch, protocol: str, signal: str, http_status: int = 405):
    """A receiver that does not take ``signal``, and the variables pointing at it."""
    with OtlpReceiver() as rx:
        for k, v in rx.env(protocol).items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
        rx.refuse(signal, http_status=http_status)
        yield rx


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_a_backend_that_refuses_traces_is_told_once(protocol, monkeypatch, caplog):
    with _refusing(monkeypatch, protocol, "traces") as rx:
        @monitor(sample_ratio=1.0, flush_interval_s=3600)
        class M:
            def __call__(self, x):
                return x
        m = M()
        state = M.__ray_monitor__.state
        with caplog.at_level(logging.WARNING):
            for round_ in range(3):
                for i in range(5):
                    m(i)
                state.recorder.drain()  # the requests ended: recorded off the path
                state.tracer.provider.force_flush()
        assert rx.request_counts()["rejected"] == 1  # then nothing more was sent
        lines = [r.getMessage() for r in caplog.records]
        assert not [x for x in lines if "Failed to export" in x], lines
        said = [x for x in lines if "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" in x]
        assert len(said) == 1 and "refused traces" in said[0], lines
        assert ("HTTP 405" if protocol != "grpc" else "gRPC UNIMPLEMENTED") in said[0]
        assert state.recorder.self_errors.snapshot() == {"otlp_traces_refused": 1}
        M.__ray_monitor__.close()


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_a_backend_that_refuses_metrics_is_told_once(protocol, monkeypatch, caplog):
    from ray_monitor.common.snapshot import ReplicaIdentity
    from ray_monitor.replica.otlp_metrics import OtlpMetrics

    with _refusing(monkeypatch, protocol, "metrics", 404) as rx:
        counted = []
        monkeypatch.setattr(otlp_refusal, "on_refused", lambda c, e: counted.append((c, e)))
        metrics = OtlpMetrics(ReplicaIdentity("app", "dep", "r1", "node", 1), interval_s=60)
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                metrics.export()
        assert rx.request_counts()["rejected"] == 1
        assert not [r for r in caplog.records if "Failed to export" in r.getMessage()]
        [(cause, err)] = counted
        assert cause == "otlp_metrics_refused"
        assert "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT" in str(err)
        assert ("HTTP 404" if protocol != "grpc" else "gRPC UNIMPLEMENTED") in str(err)
        metrics.shutdown()
