"""Span ids drawn ahead by the flush thread (``replica/span_ids.py``): what the request path
takes is a valid OpenTelemetry span id (16 lower-case hex digits, never zero, random), the
pool stays within its bound and follows the request rate, the path draws its own when the
pool ran dry, and a forked child never takes its parent's ids."""

from __future__ import annotations

import os
import re
import sys

import pytest

from ray_monitor.common.snapshot import ReplicaIdentity
from ray_monitor.replica import span_ids
from ray_monitor.replica.recorder import Recorder
from ray_monitor.replica.request_span import FromCaller, RequestSpan
from ray_monitor.replica.tracing import Tracer

HEX16 = re.compile(r"[0-9a-f]{16}")
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


@pytest.fixture(autouse=True)
def empty_pool():
    span_ids.reset()
    yield
    span_ids.reset()


class Ctx:
    def __init__(self, came=None):
        self.request_id = "req-1"
        self.route = ""
        self._ray_trace_ctx = came


def take_all() -> list[str]:
    out = []
    while True:
        try:
            out.append(span_ids.take())
        except IndexError:
            return out


def test_refilled_ids_are_valid_distinct_span_ids():
    got = []
    for _ in range(20):
        span_ids.refill(0)
        got += take_all()
    assert len(got) >= 20 * span_ids.MIN_POOL
    assert all(HEX16.fullmatch(s) and s != "0" * 16 for s in got)
    assert len(set(got)) == len(got)  # 64 random bits: a repeat here would be a bug
    # random, not a counter: every hex digit shows up in every position
    for pos in range(16):
        assert len({s[pos] for s in got}) == 16


def test_a_zero_draw_is_never_an_id(monkeypatch):
    draws = iter([0, 0, 5] + [7] * 10_000)
    monkeypatch.setattr(span_ids, "_bits", lambda n: next(draws))
    assert span_ids.draw() == "0000000000000005"
    span_ids.reset()
    draws = iter([0] + [9] * 10_000)
    span_ids.refill(0)
    assert "0" * 16 not in span_ids.POOL and span_ids.POOL


def test_the_pool_follows_the_rate_within_its_bound():
    assert span_ids.refill(0) == span_ids.MIN_POOL  # nothing taken yet: the least
    assert len(span_ids.POOL) == span_ids.MIN_POOL
    for _ in range(50):
        span_ids.take()
    span_ids.refill(0)
    assert len(span_ids.POOL) == 100  # twice what was taken
    for _ in range(20):  # dry every interval: doubles, up to the bound, never past it
        take_all()
        span_ids.refill(0)
        assert len(span_ids.POOL) <= span_ids.MAX_POOL
    assert len(span_ids.POOL) == span_ids.MAX_POOL
    span_ids.refill(0)  # idle: nothing taken, the memory given back down to the least
    assert len(span_ids.POOL) == span_ids.MIN_POOL
    assert span_ids.refill(0) == 0  # still idle: nothing drawn


def test_begin_takes_an_id_from_the_pool_and_draws_one_when_it_is_dry():
    t = Tracer(sample_ratio=0.0, slow_threshold_s=1.0, enabled=False)
    span_ids.POOL[:] = ["00000000000000aa", "123456789abcdef0"]
    rs = t.begin("M.run", {}, Ctx({"traceparent": TP}))
    assert type(rs) is FromCaller and rs.sid == "123456789abcdef0"
    assert rs.span_id == 0x123456789ABCDEF0 and rs.ids[1] == rs.span_id
    root = t.begin("M.run", {}, None)
    assert type(root) is RequestSpan and root.sid == "00000000000000aa"
    dry = [t.begin("M.run", {}, None) for _ in range(50)]  # the pool is empty now
    assert all(HEX16.fullmatch(d.sid) and d.span_id != 0 for d in dry)
    assert len({d.sid for d in dry}) == 50
    root.span_id = 0xAB  # the setter writes the text
    assert root.sid == "00000000000000ab"


def test_log_records_and_the_handle_call_carry_the_taken_text():
    import logging

    from opentelemetry import context as otel_context
    from ray.serve._private.common import RequestMetadata

    from ray_monitor.replica import propagation, tracing
    from tests.helpers import running_request

    t = Tracer(sample_ratio=0.0, slow_threshold_s=1.0, enabled=False)
    span_ids.POOL[:] = ["0fedcba987654321"]
    rs = t.begin("M.run", {}, Ctx({"traceparent": TP}))
    tracing.install_log_correlation()
    token = propagation.CURRENT.set(running_request(rs))
    ctx_token = otel_context.attach(otel_context.Context())  # no OpenTelemetry context
    try:
        record = logging.getLogRecordFactory()("x", logging.INFO, __file__, 0, "m", None, None)

        class Pending:
            metadata = RequestMetadata(request_id="r", internal_request_id="i")
            created_at = 1.5
        sent = propagation._wrap(lambda self, pr, w: pr)(None, Pending(), False)
    finally:
        otel_context.detach(ctx_token)
        propagation.CURRENT.reset(token)
    assert (record.trace_id, record.span_id) == (TP[3:35], "0fedcba987654321")
    assert sent.metadata.tracing_context["traceparent"] == f"00-{TP[3:35]}-0fedcba987654321-00"


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin",
                    reason="needs os.fork")
def test_a_forked_child_starts_with_an_empty_pool():
    span_ids.refill(0)
    parent = list(span_ids.POOL)
    assert parent
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it would take, then leave at once
        try:
            os.close(r)
            left = len(span_ids.POOL)
            span_ids.refill(0)  # its own ids, and its lock usable
            mine = set(span_ids.POOL)
            os.write(w, f"{left} {len(mine & set(parent))} {len(mine)}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        left, shared, made = map(int, f.read().split())
    os.waitpid(pid, 0)
    assert (left, shared) == (0, 0) and made == span_ids.MIN_POOL
    assert span_ids.POOL == parent  # the parent's pool is its own


def test_refills_close_together_are_one(monkeypatch):
    """Two monitored deployments in one process flush on the same whole second: the
    second refill must not read "nothing taken" and give the pool back."""
    now = [100.0]
    monkeypatch.setattr(span_ids, "_clock", lambda: now[0])
    assert span_ids.refill() == span_ids.MIN_POOL
    for _ in range(50):
        span_ids.take()
    now[0] += 1.0
    assert span_ids.refill() == 86 and len(span_ids.POOL) == 100  # twice the 50 taken
    now[0] += 0.01  # the other deployment's flush, the same second
    assert span_ids.refill() == 0 and len(span_ids.POOL) == 100  # kept, not trimmed to 64
    now[0] += 1.0
    assert span_ids.refill() == 0 and len(span_ids.POOL) == span_ids.MIN_POOL  # idle


def test_the_flush_refills_after_its_snapshot_and_counts_a_failure():
    rec = Recorder(identity=ReplicaIdentity("app", "dep", "r1", "n1", 1))
    calls = []
    rec.after_snapshot = lambda: calls.append(1)
    rec.flush()
    assert calls == [1]

    def broken():
        raise RuntimeError("boom")
    rec.after_snapshot = broken
    rec.flush()  # the round goes on; the failure is counted, not raised
    assert rec.self_errors.snapshot().get("after_snapshot_failed") == 1
