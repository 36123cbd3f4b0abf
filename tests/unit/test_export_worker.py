"""Exports never hold up the flush: a dead or hanging OTLP endpoint costs the flush thread
nothing, its failures are counted by cause and logged once, and a replica's snapshots
carry its running totals and how long its last flush took."""

from __future__ import annotations

import logging
import socket
import threading
import time

from opentelemetry.sdk.metrics.export import MetricExportResult

from ray_monitor.common.snapshot import ReplicaIdentity
from ray_monitor.replica.export_worker import ExportWorker, quiet_otel_export_logs
from ray_monitor.replica.otlp_metrics import OtlpMetrics
from ray_monitor.replica.recorder import Recorder

IDENT = ReplicaIdentity("app", "Dep", "r1", "node", 1)


class Counted:
    def __init__(self) -> None:
        self.causes: list[str] = []

    def __call__(self, cause, exc=None) -> None:
        self.causes.append(cause)


def test_submit_never_waits_and_a_full_queue_drops_the_oldest():
    started, release = threading.Event(), threading.Event()
    seen = []

    def export(item):
        started.set()
        release.wait(10)
        seen.append(item)
        return MetricExportResult.SUCCESS

    failures = Counted()
    w = ExportWorker(export, what="x", on_failure=failures, max_queue=2)
    w.submit(0)
    assert started.wait(5)  # 0 is in flight, and its export hangs
    for i in range(1, 6):
        w.submit(i)  # returns while the export still hangs: the flush never waits
    assert not release.is_set()
    release.set()
    assert w.idle(5)
    # Of those that waited, only the newest two were kept (metrics are cumulative).
    assert seen == [0, 4, 5]
    assert failures.causes == ["x:queue_full"] * 3
    assert w.close(2)


def test_failures_are_counted_by_cause():
    results = iter([MetricExportResult.FAILURE, RuntimeError("boom"), MetricExportResult.SUCCESS])

    def export(item):
        r = next(results)
        if isinstance(r, Exception):
            raise r
        return r

    failures = Counted()
    w = ExportWorker(export, what="otlp_metrics_export", on_failure=failures)
    for i in range(3):
        w.submit(i)
        assert w.idle(5)
    assert failures.causes == ["otlp_metrics_export:failed", "otlp_metrics_export:RuntimeError"]
    assert w.exported == 1
    w.close(1)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_otlp_endpoint_never_slows_the_flush(monkeypatch, caplog):
    """The issue's fault: OTLP metrics at a closed port. The flush stays short (criterion:
    no flush over 0.5 s), the failure is counted and logged once, and snapshots still go."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                       f"http://127.0.0.1:{_closed_port()}/v1/metrics")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TIMEOUT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf")

    class Sink:
        sent = 0

        def send(self, snaps):
            Sink.sent += len(snaps)
            return []

    rec = Recorder(identity=IDENT, sink=Sink())
    otlp = OtlpMetrics(IDENT, interval_s=0.0, on_failure=rec.self_errors.count)
    rec.on_flush = otlp
    cells = rec.method("__call__")
    caplog.set_level(logging.WARNING)
    longest = 0.0
    for _ in range(20):
        cells.end(cells.begin(time.perf_counter()), "ok", False, 0.01)
        rec.flush()
        longest = max(longest, rec.last_flush_s)
    assert otlp.worker.idle(30)
    assert Sink.sent == 20
    print(f"longest flush {longest * 1000:.1f} ms (criterion 500 ms)")
    assert longest < 0.5, longest
    errors = rec.self_errors.snapshot()
    assert errors.get("otlp_metrics_export:failed", 0) + \
        errors.get("otlp_metrics_export:queue_full", 0) >= 19
    # The SDK's own messages and ours: each said once, not once per export.
    messages = [r.getMessage() for r in caplog.records]
    assert sum("otlp_metrics_export:failed" in m for m in messages) == 1
    exporter_lines = [m for m in messages if "Failed to export" in m]
    assert len(exporter_lines) <= 2, exporter_lines
    otlp.shutdown(1)


def test_exporter_messages_are_logged_once_per_cause(caplog):
    quiet_otel_export_logs()
    quiet_otel_export_logs()  # idempotent: one filter
    log = logging.getLogger("opentelemetry.exporter.otlp.common.http")
    assert sum(type(f).__name__ == "_OncePerCause" for f in log.filters) == 1
    caplog.set_level(logging.WARNING)
    for delay in (0.5, 1.25, 2.0):
        log.warning("Transient error %s encountered, retrying in %.2fs.", "refused", delay)
    log.warning("Transient error %s encountered, retrying in %.2fs.", "reset", 1.0)
    lines = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert len(lines) == 2 and "refused" in lines[0] and "reset" in lines[1]


def test_snapshots_carry_totals_since_start_and_the_last_flush_time():
    rec = Recorder(identity=IDENT)
    cells = rec.method("__call__")
    for outcome in ("ok", "ok", "ValueError"):
        cells.end(cells.begin(0.0), outcome, outcome != "ok", 0.01)
    first = rec.snapshot()
    assert first.totals == {"__call__\tok": 2, "__call__\tValueError": 1}
    assert first.flush_s is None
    rec.flush()
    cells.end(cells.begin(0.0), "ok", False, 0.01)
    third = rec.snapshot()
    assert third.totals == {"__call__\tok": 3, "__call__\tValueError": 1}
    assert third.flush_s is not None and third.flush_s >= 0


def test_finding_the_aggregator_never_holds_the_flush(monkeypatch):
    """ray.get_actor takes about a second while the aggregator restarts: it runs on a thread
    of its own, and the handle found is kept across restarts."""
    import ray

    from ray_monitor.replica.delivery import ActorSink

    release, calls = threading.Event(), []

    class Actor:
        class ingest:
            @staticmethod
            def options(**kwargs):
                return Actor.ingest

            @staticmethod
            def remote(batch):
                calls.append(len(batch))
                return object()

    def slow_get_actor(name, namespace=None):
        release.wait(10)
        return Actor()

    monkeypatch.setattr(ray, "get_actor", slow_get_actor)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns, timeout: (list(refs), []))
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: None)
    snaps = Recorder(identity=IDENT)
    sink = ActorSink()
    first = [snaps.snapshot()]
    assert sink.send(first) == first  # no handle yet: kept, and the flush goes on
    release.set()
    wait = time.monotonic() + 10
    while sink._actor is None and time.monotonic() < wait:
        time.sleep(0.01)
    assert sink.send(first + [snaps.snapshot()]) == [] and calls == [2]
