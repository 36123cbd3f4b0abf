"""Deferred recording (replica/deferred.py): what a request's end leaves on the path, and
what the flush thread records, without Ray. The clock is injected."""

from __future__ import annotations

import pytest

from ray_monitor import monitor
from ray_monitor.replica import deferred, middleware


@pytest.fixture
def clock(monkeypatch):
    for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
              "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    now = [100.0]
    monkeypatch.setattr(middleware, "_perf", lambda: now[0])
    monkeypatch.setattr(deferred, "_perf", lambda: now[0])
    return now


def make():
    @monitor(flush_interval_s=3600.0, tracing_enabled=False)  # the test snapshots itself
    class Model:
        def __init__(self, clock=None):
            self.clock = clock

        def run(self, s):
            self.clock[0] += s  # the request takes s seconds
            if s < 0:
                raise ValueError("negative")
            return s
    return Model


def test_an_ended_request_leaves_flight_at_once_and_is_recorded_as_it_ended(clock):
    M = make()
    m = M(clock)
    recorder = M.__ray_monitor__.state.recorder
    assert m.run(0.25) == 0.25
    # on the path: no longer in flight (the gauge, hang detection), queued for the flush
    assert recorder.running() == [] and len(recorder.ended) == 1
    assert recorder.methods["run"].cells == {}
    clock[0] += 50.0  # the flush comes later; the latency is the request's own
    snap = recorder.snapshot()  # drains first: every request ended before it is in it
    (s,) = snap.series
    assert (s.method, s.outcome, s.latency.count, s.latency.sum) == ("run", "ok", 1, 0.25)
    assert snap.inflight == {"run": 0} and len(recorder.ended) == 0
    M.__ray_monitor__.close()


def test_a_failed_request_is_recorded_on_the_path(clock):
    M = make()
    m = M(clock)
    recorder = M.__ray_monitor__.state.recorder
    with pytest.raises(ValueError):
        m.run(-0.5)
    # its exception holds the user's frames: recorded now, never held in the queue
    assert len(recorder.ended) == 0
    (cell,) = recorder.methods["run"].cells.values()
    assert cell.error and cell.latency.count == 1
    M.__ray_monitor__.close()


def test_a_full_queue_records_on_the_path(clock, monkeypatch):
    monkeypatch.setattr(deferred, "MAX_QUEUED", 1)
    M = make()
    m = M(clock)
    recorder = M.__ray_monitor__.state.recorder
    m.run(0.1)
    m.run(0.2)  # the queue holds one: this one is recorded at once
    assert len(recorder.ended) == 1
    assert recorder.methods["run"].cells["ok"].latency.count == 1
    assert recorder.drain() == 1
    assert recorder.methods["run"].cells["ok"].latency.count == 2
    M.__ray_monitor__.close()


def test_a_record_that_fails_on_the_flush_thread_is_counted_and_the_rest_recorded(clock):
    M = make()
    m = M(clock)
    recorder = M.__ray_monitor__.state.recorder

    def broken(*args):
        raise RuntimeError("bad record")
    recorder.ended.append(lambda: broken(1))  # an item is a callable that records
    m.run(0.3)
    assert recorder.drain() == 2  # never raised
    assert recorder.self_errors.snapshot() == {"middleware_failed": 1}
    assert recorder.methods["run"].cells["ok"].latency.count == 1
    M.__ray_monitor__.close()


def test_closing_records_what_is_queued(clock):
    M = make()
    m = M(clock)
    recorder = M.__ray_monitor__.state.recorder
    sent = []
    recorder.on_flush = sent.append
    m.run(0.1)
    M.__ray_monitor__.close()
    assert sum(s.latency.count for snap in sent for s in snap.series) == 1


def test_a_queued_request_does_not_hold_its_arguments(clock):
    # tokens=fn(result, args, kwargs) reads the request's arguments on the path; the
    # queue then keeps none of them (a payload can be large, and is held up to a flush)
    @monitor(flush_interval_s=3600.0, tracing_enabled=False,
             tokens=lambda result, args, kwargs: {"input": len(args[0]), "output": 1})
    class Chat:
        def run(self, prompt):
            return "ok"
    c = Chat()
    recorder = Chat.__ray_monitor__.state.recorder
    assert c.run("x" * 1000) == "ok"
    (item,) = recorder.ended  # the request object itself
    assert isinstance(item, middleware._Request) and item.call is None
    assert recorder.drain() == 1
    Chat.__ray_monitor__.close()
