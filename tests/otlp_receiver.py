"""A real OTLP receiver on loopback, so tests check traces, metrics and logs over the wire.

``OtlpReceiver`` listens on 127.0.0.1 for OTLP/gRPC (the collector ``TraceService``,
``MetricsService`` and ``LogsService``) and OTLP/HTTP protobuf (``POST /v1/traces``,
``/v1/metrics``, ``/v1/logs``, plain, gzip or deflate bodies), both on free ports. What
arrives is decoded into plain dataclasses with hex ids and Python attribute values, so a
test asserts what a user would see in a backend::

    with OtlpReceiver() as rx:
        for name, value in rx.env("grpc").items():
            monkeypatch.setenv(name, value)
        ...  # run the code under test
        spans = rx.wait_for(lambda r: [s for s in r.spans() if s.name == "predict"])

``fail_next`` makes the next export requests fail the way a collector does when it is
overloaded or rejects data, for tests of the exporting side's retries and drops;
``refuse`` makes it a backend that does not take a signal at all (Arize Phoenix answers
405 on ``/v1/metrics``; over gRPC such a backend answers UNIMPLEMENTED).
"""

from __future__ import annotations

import gzip
import math
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = ["OtlpReceiver", "ReceivedLog", "ReceivedMetric", "ReceivedSpan"]

T = TypeVar("T")

PROTOCOLS = ("grpc", "http/protobuf")

# The OTLP spec pairs these gRPC codes with HTTP statuses; the exporters treat the
# retryable ones (UNAVAILABLE/503, RESOURCE_EXHAUSTED/429, DEADLINE_EXCEEDED/504) alike.
_HTTP_STATUS_OF = {
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.INTERNAL: 500,
}
_GRPC_CODE_OF = {status: code for code, status in _HTTP_STATUS_OF.items()}


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    name: str
    kind: str  # "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER" or "UNSPECIFIED"
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: str  # "UNSET", "OK" or "ERROR"
    status_message: str
    events: list[tuple[str, dict[str, Any]]]
    resource: dict[str, Any]
    scope: str
    protocol: str  # "grpc" or "http"


@dataclass(frozen=True)
class ReceivedMetric:
    """One metric of one export request.

    Every data point has ``attributes``, ``start_time_ns`` and ``time_ns``; sums and gauges
    add ``value`` and ``exemplars``; histograms add ``count``, ``sum``, ``min``, ``max``,
    ``explicit_bounds``, ``bucket_counts`` and ``exemplars``; exponential histograms add
    ``count``, ``sum``, ``min``, ``max``, ``scale``, ``zero_count``, ``zero_threshold``,
    ``positive_offset``, ``positive_bucket_counts``, ``negative_offset``,
    ``negative_bucket_counts`` and ``exemplars``; summaries add ``count``, ``sum`` and
    ``quantiles`` as (quantile, value) pairs. An exemplar is a dict of ``trace_id``,
    ``span_id`` (hex, "" when none), ``value``, ``time_ns`` and ``attributes``.
    """

    name: str
    unit: str
    description: str
    kind: str  # "sum", "gauge", "histogram", "exponential_histogram" or "summary"
    data_points: list[dict[str, Any]]
    resource: dict[str, Any]
    scope: str
    protocol: str
    temporality: str = ""  # "DELTA" or "CUMULATIVE"; "" for gauges and summaries
    monotonic: bool = False  # sums only


@dataclass(frozen=True)
class ReceivedLog:
    body: Any
    attributes: dict[str, Any]
    trace_id: str  # "" when the record is outside a span
    span_id: str
    severity_text: str
    severity_number: int
    time_ns: int
    resource: dict[str, Any]
    scope: str
    protocol: str


@dataclass
class _Failures:
    remaining: int = 0
    grpc_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    http_status: int = 503
    retry_after: float | None = None


@dataclass
class _Store:
    spans: list[ReceivedSpan] = field(default_factory=list)
    metrics: list[ReceivedMetric] = field(default_factory=list)
    logs: list[ReceivedLog] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"grpc": 0, "http": 0, "rejected": 0})
    failures: _Failures = field(default_factory=_Failures)
    refused: dict[str, int] = field(default_factory=dict)  # signal -> HTTP status answered


class OtlpReceiver:
    """OTLP/gRPC and OTLP/HTTP protobuf receiver on 127.0.0.1; use it as a context manager."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._store = _Store()
        self._grpc_server: grpc.Server | None = None
        self._http_server: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._grpc_port = 0
        self._http_port = 0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> OtlpReceiver:
        if self._grpc_server is not None:
            raise RuntimeError("OtlpReceiver.start() called twice; create one receiver per test")
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-rx-grpc")
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceServicer(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
            _MetricsServicer(self), server
        )
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_LogsServicer(self), server)
        self._grpc_port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._grpc_server = server

        http_server = ThreadingHTTPServer(("127.0.0.1", 0), _HttpHandler)
        http_server.receiver = self  # type: ignore[attr-defined]
        self._http_port = http_server.server_address[1]
        self._http_thread = threading.Thread(
            target=http_server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="otlp-rx-http",
            daemon=True,
        )
        self._http_thread.start()
        self._http_server = http_server
        return self

    def stop(self) -> None:
        """Stop both servers; safe to call twice, and on a receiver that never started."""
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=None).wait()
            self._grpc_server = None
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            assert self._http_thread is not None
            self._http_thread.join()
            self._http_server = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- where to send -----------------------------------------------------------------

    @property
    def grpc_endpoint(self) -> str:
        self._require_started()
        return f"http://127.0.0.1:{self._grpc_port}"

    @property
    def http_endpoint(self) -> str:
        self._require_started()
        return f"http://127.0.0.1:{self._http_port}"

    def env(self, protocol: str = "grpc") -> dict[str, str]:
        """The ``OTEL_EXPORTER_OTLP_*`` variables that point an exporter at this receiver."""
        if protocol == "grpc":
            return {
                "OTEL_EXPORTER_OTLP_ENDPOINT": self.grpc_endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
            }
        if protocol == "http/protobuf":
            return {
                "OTEL_EXPORTER_OTLP_ENDPOINT": self.http_endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            }
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")

    # -- what arrived ------------------------------------------------------------------

    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            return list(self._store.spans)

    def traces(self) -> dict[str, list[ReceivedSpan]]:
        """Spans grouped by trace id, each trace ordered by start time."""
        grouped: dict[str, list[ReceivedSpan]] = {}
        for span in sorted(self.spans(), key=lambda s: s.start_ns):
            grouped.setdefault(span.trace_id, []).append(span)
        return grouped

    def metrics(self) -> list[ReceivedMetric]:
        with self._cond:
            return list(self._store.metrics)

    def logs(self) -> list[ReceivedLog]:
        with self._cond:
            return list(self._store.logs)

    def request_counts(self) -> dict[str, int]:
        """Export requests by outcome: ``{"grpc": n, "http": n, "rejected": n}``.

        ``grpc`` and ``http`` count accepted requests; ``rejected`` those failed by ``fail_next``.
        """
        with self._cond:
            return dict(self._store.counts)

    def clear(self) -> None:
        """Forget everything received, the request counts and any pending ``fail_next``."""
        with self._cond:
            self._store = _Store()

    def fail_next(
        self,
        n: int = 1,
        code: grpc.StatusCode | int = grpc.StatusCode.UNAVAILABLE,
        *,
        retry_after: float | None = None,
    ) -> None:
        """Reject the next ``n`` export requests, whatever their protocol and signal.

        ``code`` is a gRPC status code or the HTTP status paired with it (UNAVAILABLE/503,
        RESOURCE_EXHAUSTED/429, DEADLINE_EXCEEDED/504, INVALID_ARGUMENT/400,
        UNAUTHENTICATED/401, PERMISSION_DENIED/403, INTERNAL/500). ``retry_after`` (seconds)
        is sent as gRPC ``RetryInfo`` and HTTP ``Retry-After``, which the SDK exporters honour
        instead of their exponential backoff: ``retry_after=0`` keeps retry tests fast.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(
                f"n must be a positive int (the number of requests to reject), got {n!r}"
            )
        if isinstance(code, grpc.StatusCode) and code in _HTTP_STATUS_OF:
            grpc_code, http_status = code, _HTTP_STATUS_OF[code]
        elif isinstance(code, int) and not isinstance(code, bool) and code in _GRPC_CODE_OF:
            grpc_code, http_status = _GRPC_CODE_OF[code], code
        else:
            choices = ", ".join(f"{c.name}/{s}" for c, s in _HTTP_STATUS_OF.items())
            raise ValueError(f"code must be one of {choices}, got {code!r}")
        if retry_after is not None and not (
            isinstance(retry_after, (int, float)) and 0 <= retry_after < math.inf
        ):
            raise ValueError(
                f"retry_after must be None or a finite number of seconds >= 0, got {retry_after!r}"
            )
        with self._cond:
            self._store.failures = _Failures(n, grpc_code, http_status, retry_after)

    def refuse(self, *signals: str, http_status: int = 405) -> None:
        """From now on, answer every export of ``signals`` (``traces``, ``metrics``,
        ``logs``) with ``http_status`` (404 or 405) over HTTP and UNIMPLEMENTED over gRPC,
        as a backend that does not take them; counted as ``rejected``."""
        unknown = [s for s in signals if s not in _SIGNALS]
        if unknown or not signals:
            raise ValueError(f"signals must be some of {_SIGNALS}, got {signals!r}")
        if http_status not in (404, 405):
            raise ValueError(f"http_status must be 404 or 405, got {http_status!r}")
        with self._cond:
            for s in signals:
                self._store.refused[s] = http_status

    def _refuses(self, signal: str) -> int | None:
        with self._cond:
            status = self._store.refused.get(signal)
            if status is not None:
                self._store.counts["rejected"] += 1
                self._cond.notify_all()
            return status

    def wait_for(
        self,
        predicate: Callable[[OtlpReceiver], T],
        timeout: float = 30.0,
        interval: float = 0.1,
        *,
        what: str = "",
    ) -> T:
        """Return ``predicate(self)`` as soon as it is truthy, re-checking on every arrival.

        On timeout, raises ``AssertionError`` summarising everything that did arrive;
        ``what`` names the awaited thing in that message.
        """
        deadline = self._clock() + timeout
        while True:
            with self._cond:
                # Snapshot the generation before checking so an arrival during the check wakes us.
                seen = self._arrivals()
            result = predicate(self)
            if result:
                return result
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise AssertionError(self._timeout_message(what or _describe(predicate), timeout))
            with self._cond:
                if self._arrivals() == seen:
                    self._cond.wait(timeout=min(interval, remaining))

    # -- internals ---------------------------------------------------------------------

    def _require_started(self) -> None:
        if self._grpc_server is None:
            raise RuntimeError(
                "OtlpReceiver is not started: call start() or use `with OtlpReceiver() as rx:`"
            )

    def _arrivals(self) -> int:
        counts = self._store.counts
        return counts["grpc"] + counts["http"] + counts["rejected"]

    def _admit(self) -> _Failures | None:
        """Take one pending failure, or None when this request is to be accepted."""
        with self._cond:
            failures = self._store.failures
            if failures.remaining == 0:
                return None
            failures.remaining -= 1
            self._store.counts["rejected"] += 1
            self._cond.notify_all()
            return failures

    def _accept(self, request: Any, protocol: str) -> None:
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            spans, metrics, logs = _decode_spans(request, protocol), [], []
        elif isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
            spans, metrics, logs = [], _decode_metrics(request, protocol), []
        else:
            spans, metrics, logs = [], [], _decode_logs(request, protocol)
        with self._cond:
            self._store.spans.extend(spans)
            self._store.metrics.extend(metrics)
            self._store.logs.extend(logs)
            self._store.counts[protocol] += 1
            self._cond.notify_all()

    def _timeout_message(self, what: str, timeout: float) -> str:
        with self._cond:
            counts = dict(self._store.counts)
            metrics = list(self._store.metrics)
            logs = list(self._store.logs)
        lines = [
            f"OTLP receiver: no match for {what} within {timeout:g} s.",
            f"Requests: grpc={counts['grpc']} http={counts['http']} rejected={counts['rejected']} "
            f"(grpc {self._endpoint_or_stopped('grpc')}, "
            f"http {self._endpoint_or_stopped('http')}).",
        ]
        traces = self.traces()
        lines.append(f"Spans: {sum(len(t) for t in traces.values())} in {len(traces)} trace(s)")
        for trace_id, spans in list(traces.items())[:_SUMMARY_LIMIT]:
            lines.append(
                f"  trace {trace_id}: "
                + ", ".join(_span_summary(s) for s in spans[:_SUMMARY_LIMIT])
            )
        if len(traces) > _SUMMARY_LIMIT:
            lines.append(f"  ... and {len(traces) - _SUMMARY_LIMIT} more trace(s)")
        names = sorted({f"{m.name}({m.kind}, {len(m.data_points)} pts)" for m in metrics})
        lines.append(f"Metrics: {len(metrics)} received: " + (", ".join(names[:50]) or "none"))
        lines.append(f"Logs: {len(logs)} received")
        return "\n".join(lines)

    def _endpoint_or_stopped(self, which: str) -> str:
        if self._grpc_server is None:
            return "stopped"
        return self.grpc_endpoint if which == "grpc" else self.http_endpoint


_SUMMARY_LIMIT = 20
_SIGNALS = ("traces", "metrics", "logs")


def _describe(predicate: Callable[..., Any]) -> str:
    name = getattr(predicate, "__qualname__", repr(predicate))
    code = getattr(predicate, "__code__", None)
    return f"{name} ({code.co_filename}:{code.co_firstlineno})" if code is not None else name


def _span_summary(span: ReceivedSpan) -> str:
    parent = f" parent={span.parent_span_id}" if span.parent_span_id else " root"
    status = f" {span.status_code}" if span.status_code != "UNSET" else ""
    if span.status_message:
        status += f" {span.status_message[:80]!r}"
    return f"{span.name!r}[{span.kind}{status}{parent} id={span.span_id}]"


# -- gRPC ------------------------------------------------------------------------------


def _grpc_export(
    receiver: OtlpReceiver, request: Any, context: grpc.ServicerContext, response: T
) -> T:
    if receiver._refuses(_signal_of(request)) is not None:
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("this receiver does not take this signal (OtlpReceiver.refuse)")
        return response
    failure = receiver._admit()
    if failure is None:
        receiver._accept(request, "grpc")
        return response
    if failure.retry_after is not None:
        seconds = int(failure.retry_after)
        info = error_details_pb2.RetryInfo()
        info.retry_delay.seconds = seconds
        info.retry_delay.nanos = int(round((failure.retry_after - seconds) * 1e9))
        context.set_trailing_metadata((("google.rpc.retryinfo-bin", info.SerializeToString()),))
    context.set_code(failure.grpc_code)
    context.set_details("rejected on purpose by OtlpReceiver.fail_next")
    return response


class _TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request, context):  # noqa: N802 - the generated service's name
        return _grpc_export(
            self._receiver, request, context, trace_service_pb2.ExportTraceServiceResponse()
        )


class _MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request, context):  # noqa: N802
        return _grpc_export(
            self._receiver, request, context, metrics_service_pb2.ExportMetricsServiceResponse()
        )


class _LogsServicer(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request, context):  # noqa: N802
        return _grpc_export(
            self._receiver, request, context, logs_service_pb2.ExportLogsServiceResponse()
        )


# -- HTTP ------------------------------------------------------------------------------

_HTTP_ROUTES = {
    "/v1/traces": (
        trace_service_pb2.ExportTraceServiceRequest,
        trace_service_pb2.ExportTraceServiceResponse,
    ),
    "/v1/metrics": (
        metrics_service_pb2.ExportMetricsServiceRequest,
        metrics_service_pb2.ExportMetricsServiceResponse,
    ),
    "/v1/logs": (
        logs_service_pb2.ExportLogsServiceRequest,
        logs_service_pb2.ExportLogsServiceResponse,
    ),
}


class _HttpHandler(BaseHTTPRequestHandler):
    # HTTP/1.0 closes each connection after its response, so no kept-alive connection
    # outlives stop() and keeps answering a test that simulates an outage.
    protocol_version = "HTTP/1.0"
    timeout = 10

    def do_POST(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's hook name
        route = _HTTP_ROUTES.get(self.path.split("?", 1)[0])
        if route is None:
            return self._error(
                404, f"no OTLP endpoint at {self.path}; use /v1/traces, /v1/metrics or /v1/logs"
            )
        content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/x-protobuf":
            return self._error(
                415, f"Content-Type {content_type!r} not supported; send application/x-protobuf"
            )
        length = self.headers.get("Content-Length")
        if length is None:
            return self._error(411, "Content-Length is required")
        body = self.rfile.read(int(length))
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        request_type, response_type = route
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding not in ("", "identity"):
                return self._error(
                    415, f"Content-Encoding {encoding!r} not supported; use gzip, deflate or none"
                )
            request = request_type.FromString(body)
        except (OSError, zlib.error, DecodeError) as error:
            return self._error(400, f"cannot decode {request_type.__name__}: {error}")
        receiver: OtlpReceiver = self.server.receiver  # type: ignore[attr-defined]
        refused = receiver._refuses(_signal_of(request))
        if refused is not None:
            return self._error(refused, "this receiver does not take this signal "
                               "(OtlpReceiver.refuse)")
        failure = receiver._admit()
        if failure is not None:
            headers = (
                {} if failure.retry_after is None else {"Retry-After": f"{failure.retry_after:g}"}
            )
            return self._error(
                failure.http_status, "rejected on purpose by OtlpReceiver.fail_next", headers
            )
        receiver._accept(request, "http")
        self._send(200, response_type().SerializeToString())

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        # OTLP/HTTP error bodies are a google.rpc.Status in the request's encoding.
        grpc_code = _GRPC_CODE_OF.get(status, grpc.StatusCode.UNKNOWN).value[0]
        self._send(
            status, status_pb2.Status(code=grpc_code, message=message).SerializeToString(), headers
        )

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base signature
        """Keep test output quiet; failures show up in the receiver's summaries instead."""


# -- decoding --------------------------------------------------------------------------


def _signal_of(request: Any) -> str:
    if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
        return "traces"
    if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
        return "metrics"
    return "logs"


def _value(any_value: common_pb2.AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(any_value.kvlist_value.values)
    return getattr(any_value, kind)


def _attributes(key_values: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in key_values}


def _enum_suffix(enum: Any, number: int, prefix: str) -> str:
    return enum.Name(number).removeprefix(prefix)


def _decode_spans(
    request: trace_service_pb2.ExportTraceServiceRequest, protocol: str
) -> list[ReceivedSpan]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=_enum_suffix(trace_pb2.Span.SpanKind, span.kind, "SPAN_KIND_"),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=_attributes(span.attributes),
                        status_code=_enum_suffix(
                            trace_pb2.Status.StatusCode, span.status.code, "STATUS_CODE_"
                        ),
                        status_message=span.status.message,
                        events=[
                            (event.name, _attributes(event.attributes)) for event in span.events
                        ],
                        resource=resource,
                        scope=scope_spans.scope.name,
                        protocol=protocol,
                    )
                )
    return spans


def _number(point: Any) -> int | float | None:
    kind = point.WhichOneof("value")
    return None if kind is None else getattr(point, kind)


def _exemplars(point: Any) -> list[dict[str, Any]]:
    return [
        {
            "trace_id": exemplar.trace_id.hex(),
            "span_id": exemplar.span_id.hex(),
            "value": _number(exemplar),
            "time_ns": exemplar.time_unix_nano,
            "attributes": _attributes(exemplar.filtered_attributes),
        }
        for exemplar in point.exemplars
    ]


def _data_point(kind: str, point: Any) -> dict[str, Any]:
    decoded: dict[str, Any] = {
        "attributes": _attributes(point.attributes),
        "start_time_ns": point.start_time_unix_nano,
        "time_ns": point.time_unix_nano,
    }
    if kind in ("sum", "gauge"):
        decoded["value"] = _number(point)
    elif kind == "summary":
        decoded.update(count=point.count, sum=point.sum)
        decoded["quantiles"] = [(q.quantile, q.value) for q in point.quantile_values]
        return decoded
    else:
        decoded.update(
            count=point.count,
            sum=point.sum if point.HasField("sum") else None,
            min=point.min if point.HasField("min") else None,
            max=point.max if point.HasField("max") else None,
        )
    if kind == "histogram":
        decoded.update(
            explicit_bounds=list(point.explicit_bounds), bucket_counts=list(point.bucket_counts)
        )
    elif kind == "exponential_histogram":
        decoded.update(
            scale=point.scale,
            zero_count=point.zero_count,
            zero_threshold=point.zero_threshold,
            positive_offset=point.positive.offset,
            positive_bucket_counts=list(point.positive.bucket_counts),
            negative_offset=point.negative.offset,
            negative_bucket_counts=list(point.negative.bucket_counts),
        )
    decoded["exemplars"] = _exemplars(point)
    return decoded


def _decode_metrics(
    request: metrics_service_pb2.ExportMetricsServiceRequest, protocol: str
) -> list[ReceivedMetric]:
    metrics = []
    for resource_metrics in request.resource_metrics:
        resource = _attributes(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data")
                if kind is None:
                    continue  # a metric without data carries nothing to assert on
                data = getattr(metric, kind)
                temporality = getattr(data, "aggregation_temporality", 0)
                metrics.append(
                    ReceivedMetric(
                        name=metric.name,
                        unit=metric.unit,
                        description=metric.description,
                        kind=kind,
                        data_points=[_data_point(kind, point) for point in data.data_points],
                        resource=resource,
                        scope=scope_metrics.scope.name,
                        protocol=protocol,
                        temporality=(
                            _enum_suffix(
                                metrics_pb2.AggregationTemporality,
                                temporality,
                                "AGGREGATION_TEMPORALITY_",
                            )
                            if temporality
                            else ""
                        ),
                        monotonic=bool(getattr(data, "is_monotonic", False)),
                    )
                )
    return metrics


def _decode_logs(
    request: logs_service_pb2.ExportLogsServiceRequest, protocol: str
) -> list[ReceivedLog]:
    logs = []
    for resource_logs in request.resource_logs:
        resource = _attributes(resource_logs.resource.attributes)
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                logs.append(
                    ReceivedLog(
                        body=_value(record.body),
                        attributes=_attributes(record.attributes),
                        trace_id=record.trace_id.hex(),
                        span_id=record.span_id.hex(),
                        severity_text=record.severity_text,
                        severity_number=record.severity_number,
                        time_ns=record.time_unix_nano,
                        resource=resource,
                        scope=scope_logs.scope.name,
                        protocol=protocol,
                    )
                )
    return logs
