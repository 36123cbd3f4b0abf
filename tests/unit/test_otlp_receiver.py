"""The OTLP receiver, fed by the real OpenTelemetry SDK exporters over loopback."""

from __future__ import annotations

import contextlib
import gzip
import math
import threading
from collections.abc import Iterator

import grpc
import pytest
import requests
from google.rpc import status_pb2
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from ray_monitor.common.histogram import BASE, SCALE, bucket_index
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

RESOURCE = Resource.create(
    {"service.name": "rx-test", "deployment.environment": "test", "replica.count": 2}
)
SCOPE = "rx-test-scope"
SIGNAL_OVERRIDES = [
    f"OTEL_EXPORTER_OTLP_{signal}_{setting}"
    for signal in ("TRACES", "METRICS", "LOGS")
    for setting in ("ENDPOINT", "PROTOCOL", "INSECURE", "COMPRESSION")
] + ["OTEL_EXPORTER_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_HEADERS"]


@pytest.fixture
def rx() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


def exporters(protocol: str):
    """The SDK's (span, metric, log) exporter classes for an OTEL_EXPORTER_OTLP_PROTOCOL value."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter, OTLPMetricExporter, OTLPLogExporter


def make_exporter(rx: OtlpReceiver, protocol: str, signal: str, compression: str = "none"):
    span_cls, metric_cls, log_cls = exporters(protocol)
    cls = {"traces": span_cls, "metrics": metric_cls, "logs": log_cls}[signal]
    if protocol == "grpc":
        grpc_compression = {"none": grpc.Compression.NoCompression, "gzip": grpc.Compression.Gzip}[
            compression
        ]
        return cls(
            endpoint=rx.grpc_endpoint, insecure=True, timeout=5, compression=grpc_compression
        )
    return cls(
        endpoint=f"{rx.http_endpoint}/v1/{signal}",
        timeout=5,
        compression=HttpCompression(compression),
    )


@contextlib.contextmanager
def tracer_exporting_to(exporter) -> Iterator:
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield provider.get_tracer(SCOPE)
    finally:
        provider.shutdown()


def emit_request_trace(tracer) -> tuple[str, str]:
    """A SERVER span with a failing INTERNAL child; returns (trace id, parent span id) in hex."""
    with tracer.start_as_current_span("POST /predict", kind=SpanKind.SERVER) as parent:
        parent.set_attribute("http.route", "/predict")
        with pytest.raises(ValueError):
            with tracer.start_as_current_span(
                "predict",
                attributes={
                    "model.version": "v3",
                    "batch.size": 4,
                    "score": 0.5,
                    "cached": False,
                    "tags": ["a", "b"],
                },
            ):
                raise ValueError("bad input")
        parent.set_status(Status(StatusCode.OK))
        context = parent.get_span_context()
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def metrics_by_name(rx: OtlpReceiver, *names: str) -> dict:
    """The latest metric of each name, or {} until all of ``names`` have arrived."""
    by_name = {m.name: m for m in rx.metrics()}
    return by_name if by_name.keys() >= set(names) else {}


def one_readable_span():
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer(SCOPE).start_as_current_span("retried"):
        pass
    return memory.get_finished_spans()


@pytest.mark.parametrize(
    "protocol, compression",
    [
        ("grpc", "none"),
        ("grpc", "gzip"),
        ("http/protobuf", "none"),
        ("http/protobuf", "gzip"),
        ("http/protobuf", "deflate"),
    ],
)
def test_spans_arrive_decoded_with_parent_links_status_and_events(rx, protocol, compression):
    with tracer_exporting_to(make_exporter(rx, protocol, "traces", compression)) as tracer:
        trace_id, parent_id = emit_request_trace(tracer)

    [parent] = rx.wait_for(
        lambda r: [s for s in r.spans() if s.name == "POST /predict"], timeout=10
    )
    [child] = [s for s in rx.spans() if s.name == "predict"]
    assert (parent.trace_id, parent.span_id, parent.parent_span_id) == (trace_id, parent_id, "")
    assert child.trace_id == trace_id and child.parent_span_id == parent_id
    assert len(child.span_id) == 16 and child.span_id != parent_id
    assert (parent.kind, child.kind) == ("SERVER", "INTERNAL")
    assert parent.attributes == {"http.route": "/predict"}
    assert child.attributes == {
        "model.version": "v3",
        "batch.size": 4,
        "score": 0.5,
        "cached": False,
        "tags": ["a", "b"],
    }
    assert (parent.status_code, parent.status_message) == ("OK", "")
    assert child.status_code == "ERROR" and "bad input" in child.status_message
    [(event_name, event_attributes)] = child.events
    assert event_name == "exception"
    assert event_attributes["exception.type"] == "ValueError"
    assert event_attributes["exception.message"] == "bad input"
    assert parent.start_ns <= child.start_ns <= child.end_ns <= parent.end_ns
    assert parent.resource["service.name"] == "rx-test"
    assert parent.resource["replica.count"] == 2
    assert parent.scope == SCOPE
    wire = "grpc" if protocol == "grpc" else "http"
    assert {s.protocol for s in rx.spans()} == {wire}
    # SimpleSpanProcessor sends one request per ended span.
    assert rx.request_counts() == {"grpc": 0, "http": 0, "rejected": 0} | {wire: 2}
    assert [s.name for s in rx.traces()[trace_id]] == ["POST /predict", "predict"]


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_metrics_arrive_with_sums_histograms_exponential_buckets_and_exemplars(rx, protocol):
    reader = PeriodicExportingMetricReader(
        make_exporter(rx, protocol, "metrics"), export_interval_millis=math.inf
    )
    provider = MeterProvider(
        resource=RESOURCE,
        metric_readers=[reader],
        views=[
            View(
                instrument_name="latency_exp",
                aggregation=ExponentialBucketHistogramAggregation(max_scale=SCALE),
            )
        ],
    )
    tracer = TracerProvider().get_tracer(SCOPE)
    try:
        meter = provider.get_meter(SCOPE)
        requests_counter = meter.create_counter("requests", unit="1", description="requests served")
        latency = meter.create_histogram(
            "latency", unit="s", explicit_bucket_boundaries_advisory=[0.1, 0.5, 1.0]
        )
        latency_exp = meter.create_histogram("latency_exp", unit="s")
        requests_counter.add(3, {"route": "/predict"})
        requests_counter.add(2, {"route": "/predict"})
        requests_counter.add(1, {"route": "/health"})
        latency.record(0.05)
        with tracer.start_as_current_span("slow request") as span:
            latency.record(0.3)
            exemplar_trace_id = format(span.get_span_context().trace_id, "032x")
        latency.record(2.0)
        exp_values = [0.1, 0.15, 0.2]
        for value in [0.0, *exp_values]:
            latency_exp.record(value)
        assert provider.force_flush()
    finally:
        provider.shutdown()

    # shutdown() exports once more; both exports are cumulative, so either one will do.
    by_name = rx.wait_for(
        lambda r: metrics_by_name(r, "requests", "latency", "latency_exp"), timeout=10
    )

    counter = by_name["requests"]
    assert (counter.kind, counter.unit, counter.description) == ("sum", "1", "requests served")
    assert counter.monotonic and counter.temporality == "CUMULATIVE"
    assert {p["attributes"]["route"]: p["value"] for p in counter.data_points} == {
        "/predict": 5,
        "/health": 1,
    }
    assert counter.resource["service.name"] == "rx-test"
    assert counter.protocol == ("grpc" if protocol == "grpc" else "http")

    [point] = by_name["latency"].data_points
    assert by_name["latency"].kind == "histogram"
    assert point["explicit_bounds"] == [0.1, 0.5, 1.0]
    assert point["bucket_counts"] == [1, 1, 0, 1]
    assert (point["count"], point["sum"], point["min"], point["max"]) == (
        3,
        pytest.approx(2.35),
        0.05,
        2.0,
    )
    [exemplar] = point["exemplars"]
    assert exemplar["trace_id"] == exemplar_trace_id and exemplar["value"] == 0.3

    [point] = by_name["latency_exp"].data_points
    assert by_name["latency_exp"].kind == "exponential_histogram"
    assert point["scale"] == SCALE
    assert (point["count"], point["zero_count"], point["sum"]) == (4, 1, pytest.approx(0.45))
    assert sum(point["positive_bucket_counts"]) == len(exp_values)
    filled = [
        point["positive_offset"] + i for i, n in enumerate(point["positive_bucket_counts"]) if n
    ]
    # Bucket i holds (base**i, base**(i+1)]: the same indices ray_monitor's histogram uses.
    assert filled == [bucket_index(v) for v in exp_values]
    assert all(BASE**i < v <= BASE ** (i + 1) for i, v in zip(filled, exp_values, strict=True))


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_logs_arrive_with_body_attributes_and_span_context(rx, protocol):
    provider = LoggerProvider(resource=RESOURCE)
    provider.add_log_record_processor(SimpleLogRecordProcessor(make_exporter(rx, protocol, "logs")))
    tracer = TracerProvider().get_tracer(SCOPE)
    try:
        with tracer.start_as_current_span("request") as span:
            provider.get_logger(SCOPE).emit(
                body="replica slow",
                severity_text="WARN",
                severity_number=SeverityNumber.WARN,
                attributes={"ms": 812},
            )
            context = span.get_span_context()
    finally:
        provider.shutdown()

    [log] = rx.wait_for(lambda r: r.logs(), timeout=10)
    assert (log.body, log.attributes, log.severity_text) == ("replica slow", {"ms": 812}, "WARN")
    assert log.severity_number == SeverityNumber.WARN.value
    assert (log.trace_id, log.span_id) == (
        format(context.trace_id, "032x"),
        format(context.span_id, "016x"),
    )
    assert log.resource["service.name"] == "rx-test" and log.scope == SCOPE


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_exporters_configured_only_by_env_reach_the_receiver(rx, protocol, monkeypatch):
    for name in SIGNAL_OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    for name, value in rx.env(protocol).items():
        monkeypatch.setenv(name, value)
    span_cls, metric_cls, _ = exporters(protocol)

    with tracer_exporting_to(span_cls()) as tracer:
        trace_id, _ = emit_request_trace(tracer)
    reader = PeriodicExportingMetricReader(metric_cls(), export_interval_millis=math.inf)
    provider = MeterProvider(resource=RESOURCE, metric_readers=[reader])
    try:
        provider.get_meter(SCOPE).create_counter("env_requests").add(1)
        assert provider.force_flush()
    finally:
        provider.shutdown()

    wire = "grpc" if protocol == "grpc" else "http"
    spans = rx.wait_for(lambda r: r.traces().get(trace_id), timeout=10)
    assert sorted(s.name for s in spans) == ["POST /predict", "predict"]
    assert {s.protocol for s in spans} == {wire}
    [metric, *_] = rx.wait_for(
        lambda r: [m for m in r.metrics() if m.name == "env_requests"], timeout=10
    )
    assert metric.protocol == wire and metric.data_points[0]["value"] == 1
    assert rx.request_counts()[wire] >= 3


def test_env_names_the_endpoint_of_each_protocol(rx):
    assert rx.env("grpc") == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": rx.grpc_endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    assert rx.env("http/protobuf") == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": rx.http_endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    }
    assert rx.grpc_endpoint.startswith("http://127.0.0.1:") and rx.grpc_endpoint != rx.http_endpoint
    with pytest.raises(ValueError, match="protocol must be one of"):
        rx.env("http/json")


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_fail_next_with_retry_after_is_retried_by_the_exporter(rx, protocol):
    exporter = make_exporter(rx, protocol, "traces")
    rx.fail_next(2, retry_after=0)
    try:
        assert exporter.export(one_readable_span()) == SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    wire = "grpc" if protocol == "grpc" else "http"
    assert rx.request_counts() == {"grpc": 0, "http": 0, "rejected": 2} | {wire: 1}
    assert [s.name for s in rx.spans()] == ["retried"]


@pytest.mark.parametrize(
    "protocol, code",
    [("grpc", grpc.StatusCode.INVALID_ARGUMENT), ("http/protobuf", 400), ("grpc", 403)],
)
def test_fail_next_with_a_permanent_error_drops_the_batch(rx, protocol, code):
    exporter = make_exporter(rx, protocol, "traces")
    rx.fail_next(1, code)
    try:
        assert exporter.export(one_readable_span()) == SpanExportResult.FAILURE
        assert rx.spans() == [] and rx.request_counts()["rejected"] == 1
        # Only the next request fails; the one after is accepted.
        assert exporter.export(one_readable_span()) == SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    assert [s.name for s in rx.spans()] == ["retried"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be a positive int"),
        ({"n": 1.5}, "n must be a positive int"),
        ({"code": grpc.StatusCode.OK}, "code must be one of"),
        ({"code": 200}, "code must be one of"),
        ({"retry_after": -1}, "retry_after must be"),
    ],
)
def test_fail_next_rejects_bad_arguments(rx, kwargs, message):
    with pytest.raises(ValueError, match=message):
        rx.fail_next(**kwargs)


def test_wait_for_timeout_says_what_did_arrive(rx):
    with tracer_exporting_to(make_exporter(rx, "grpc", "traces")) as tracer:
        trace_id, parent_id = emit_request_trace(tracer)

    with pytest.raises(AssertionError) as failure:
        rx.wait_for(
            lambda r: [s for s in r.spans() if s.name == "never sent"],
            timeout=0,
            what="span 'never sent'",
        )
    message = str(failure.value)
    assert "span 'never sent'" in message
    assert "grpc=2 http=0 rejected=0" in message
    assert f"trace {trace_id}" in message
    assert "'POST /predict'[SERVER OK root" in message
    assert f"'predict'[INTERNAL ERROR 'ValueError: bad input' parent={parent_id}" in message
    assert "Metrics: 0 received" in message


def test_wait_for_wakes_when_data_arrives_from_another_thread(rx):
    exporter = make_exporter(rx, "http/protobuf", "traces")
    sender = threading.Thread(target=lambda: exporter.export(one_readable_span()))
    sender.start()
    try:
        spans = rx.wait_for(lambda r: [s for s in r.spans() if s.name == "retried"])
    finally:
        sender.join()
        exporter.shutdown()
    assert [type(s) for s in spans] == [ReceivedSpan]


def test_clear_forgets_data_counts_and_pending_failures(rx):
    exporter = make_exporter(rx, "grpc", "traces")
    try:
        exporter.export(one_readable_span())
        rx.fail_next(1, grpc.StatusCode.INVALID_ARGUMENT)
        rx.clear()
        assert (rx.spans(), rx.metrics(), rx.logs()) == ([], [], [])
        assert rx.request_counts() == {"grpc": 0, "http": 0, "rejected": 0}
        assert exporter.export(one_readable_span()) == SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()


def test_http_endpoint_answers_bad_requests_with_an_rpc_status(rx):
    cases = [
        ("/v1/nothing", {"Content-Type": "application/x-protobuf"}, b"", 404, "/v1/traces"),
        ("/v1/traces", {"Content-Type": "application/json"}, b"{}", 415, "application/x-protobuf"),
        (
            "/v1/traces",
            {"Content-Type": "application/x-protobuf"},
            b"\xff\xff",
            400,
            "ExportTraceServiceRequest",
        ),
        (
            "/v1/traces",
            {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"},
            b"nope",
            400,
            "cannot",
        ),
    ]
    for path, headers, body, status, hint in cases:
        response = requests.post(rx.http_endpoint + path, headers=headers, data=body, timeout=5)
        assert response.status_code == status, path
        assert hint in status_pb2.Status.FromString(response.content).message
    empty = requests.post(
        rx.http_endpoint + "/v1/metrics",
        headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"},
        data=gzip.compress(b""),
        timeout=5,
    )
    assert (empty.status_code, empty.headers["Content-Type"]) == (200, "application/x-protobuf")
    assert rx.request_counts()["http"] == 1 and rx.metrics() == []


def test_endpoints_need_a_started_receiver_and_stop_is_idempotent():
    receiver = OtlpReceiver()
    with pytest.raises(RuntimeError, match="not started"):
        _ = receiver.grpc_endpoint
    receiver.stop()
    with receiver:
        with pytest.raises(RuntimeError, match="called twice"):
            receiver.start()
    receiver.stop()
    with pytest.raises(RuntimeError, match="not started"):
        receiver.env("grpc")
