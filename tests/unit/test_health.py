"""Replica health without Ray: hung requests with every thread's stack, the aggregator's view
of them on alerts and in the API, and prediction capture in the middleware and recorder."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ray_monitor import monitor
from ray_monitor.aggregator.core import AggregatorCore
from ray_monitor.replica.recorder import Recorder, find_hung, thread_stacks
from ray_monitor.common.snapshot import HungRequest, ReplicaHealth, ReplicaIdentity, ReplicaSnapshot

IDENT = ReplicaIdentity("app", "Dep", "rep-1", "node", 1, "v1")


def wait_in_blocking_call(release: threading.Event) -> None:
    release.wait(30)


@pytest.fixture
def blocked_thread():
    release = threading.Event()
    t = threading.Thread(target=wait_in_blocking_call, args=(release,), name="worker-7")
    t.start()
    yield t
    release.set()
    t.join(5)


def test_a_request_past_the_threshold_is_reported_with_the_stack_that_blocks(blocked_thread):
    rec = Recorder(identity=IDENT)
    now = time.perf_counter()
    rec.method("__call__").begin(now - 90.0, "req-hung")
    rec.method("__call__").begin(now - 0.5, "req-fresh")
    hung = find_hung(rec.running(now), 60.0, thread_stacks)
    assert [(h.method, h.request_id, round(h.running_s)) for h in hung] == [
        ("__call__", "req-hung", 90)]
    stack = hung[0].stack
    assert "Thread worker-7" in stack and "wait_in_blocking_call" in stack
    assert "release.wait(30)" in stack  # the line it is stuck on
    assert find_hung(rec.running(now), 120.0, thread_stacks) == []
    assert find_hung(rec.running(now), 0.0, thread_stacks) == []  # 0: hang reports are off


def test_stacks_are_bounded_and_user_threads_come_first(blocked_thread):
    full = thread_stacks()
    assert full.index("wait_in_blocking_call") < len(full)
    small = thread_stacks(limit_bytes=2048)
    assert len(small.encode()) <= 2048 + 200  # the "left out" line may follow
    assert "wait_in_blocking_call" in small  # the test's thread is user code: it is kept


def test_the_health_probe_reports_hung_requests():
    from ray_monitor.replica.recorder import process_health

    rec = Recorder(identity=IDENT)
    rec.method("slow").begin(time.perf_counter() - 5.0, "r1")
    probe = process_health(rec, lambda: None, hang_threshold_s=1.0)
    out = []
    flush = threading.Thread(target=lambda: out.append(probe()))  # as the flush thread runs it
    flush.start()
    flush.join(10)
    (health,) = out
    assert health.rss_bytes > 0 and health.longest_request_s >= 5.0
    assert [h.request_id for h in health.hung] == ["r1"]
    # the caller's stack is left out; this test's thread, waiting in join(), is in
    assert "test_the_health_probe_reports_hung_requests" in health.hung[0].stack


def hung_snapshot(seq: int, t: float, hung: list) -> ReplicaSnapshot:
    return ReplicaSnapshot(IDENT, seq, t - 1, t, health=ReplicaHealth(rss_bytes=1, hung=hung))


def test_the_aggregator_shows_hung_requests_on_the_alert_and_in_the_api():
    clock = [1_700_000_000.0]
    core = AggregatorCore({}, rules_text={"groups": [{"name": "health", "rules": [
        {"alert": "HungRequests",
         "expr": "max(hung_requests[1m]) by (application, deployment, replica) > 0"}]}]},
        clock=lambda: clock[0])
    try:
        core.ingest([hung_snapshot(1, clock[0], [HungRequest("__call__", "rid-9", 75.0,
                                                             "Thread x:\n  in stuck()\n")])])
        core.evaluate()
        (alert,) = core.alerts()
        assert alert["state"] == "firing" and alert["labels"]["replica"] == "rep-1"
        assert [(h["request_id"], h["running_s"]) for h in alert["hung"]] == [("rid-9", 75.0)]
        assert "in stuck()" in alert["hung"][0]["stack"]
        assert [h["replica"] for h in core.hung()] == ["rep-1"]
        # the next report without hung requests clears them
        clock[0] += 1
        core.ingest([hung_snapshot(2, clock[0], [])])
        assert core.hung() == [] and "hung" not in core.alerts()[0]
    finally:
        core.notifier.close(1.0)


# -- prediction capture -----------------------------------------------------------------

def classifier(**options):
    options.setdefault("flush_interval_s", 3600.0)

    @monitor(model_version="v2", **options)
    class Clf:
        def __call__(self, x):
            if x == "boom":
                raise RuntimeError("user error")
            return {"label": "spam" if x > 0 else "ham", "p": min(1.0, abs(x) / 10)}

        async def predict(self, x, *, scale=1.0):
            return {"label": "spam", "p": 0.9, "scale": scale}

        def other(self, x):
            return x
    return Clf


def snapshot(cls):
    return cls.__ray_monitor__.state.recorder.snapshot()


def test_predictions_are_extracted_from_ok_results_only():
    Clf = classifier(prediction=lambda r: {"label": r["label"], "score": r["p"]},
                     positive_label="spam")
    m = Clf()
    assert m(3) == {"label": "spam", "p": 0.3} and m(-2)["label"] == "ham"
    with pytest.raises(RuntimeError):
        m("boom")
    assert m.other(5) == 5
    snap = snapshot(Clf)
    got = [(p.label, p.score, p.deployment, p.model_version, p.positive_label)
           for p in snap.predictions]
    assert got == [("spam", 0.3, "unknown", "v2", "spam"), ("ham", 0.2, "unknown", "v2", "spam")]
    assert snapshot(Clf).predictions == []  # a snapshot takes them
    Clf.__ray_monitor__.close()


def test_the_extractor_can_read_the_inputs_of_the_listed_methods():
    seen = []

    def extract(result, args, kwargs):
        seen.append((args, kwargs))
        return {"label": result["label"], "features": {"x": args[0], "scale": kwargs["scale"]}}

    Clf = classifier(prediction=extract, prediction_input=True, prediction_methods=["predict"])
    m = Clf()
    assert asyncio.run(m.predict(4, scale=2.0))["scale"] == 2.0
    m(1)  # __call__ is not listed
    assert seen == [((4,), {"scale": 2.0})]
    (p,) = snapshot(Clf).predictions
    assert p.features == {"x": 4.0, "scale": 2.0}
    Clf.__ray_monitor__.close()


def test_a_failing_or_bad_extractor_never_reaches_the_request(caplog):
    def bad(result):
        if result["label"] == "ham":
            return {"label": "ham", "score": 7}  # out of [0, 1]
        raise TypeError("extractor bug")

    Clf = classifier(prediction=bad)
    m = Clf()
    for x in (1, 2, -1):
        assert m(x)["label"] in ("spam", "ham")
    snap = snapshot(Clf)
    assert snap.predictions == []
    assert snap.self_errors == {"prediction_extractor:TypeError": 2,
                                "prediction_extractor:ValueError": 1}
    logged = [r for r in caplog.records if "prediction_extractor:TypeError" in r.getMessage()]
    assert len(logged) == 1  # once per cause, not per request
    Clf.__ray_monitor__.close()


def test_none_skips_a_request_and_the_buffer_is_bounded():
    Clf = classifier(prediction=lambda r: None if r["label"] == "ham" else {"label": r["label"]})
    m = Clf()
    Clf.__ray_monitor__.state.recorder.max_predictions = 3
    for x in (-1, 1, 2, 3, 4, 5):
        m(x)
    snap = snapshot(Clf)
    assert [p.label for p in snap.predictions] == ["spam"] * 3
    assert snap.self_errors == {"predictions_dropped:buffer_full": 2}
    Clf.__ray_monitor__.close()


@pytest.mark.parametrize("kwargs, exc, message", [
    ({"prediction": "label"}, TypeError, "prediction=...): expected a function"),
    ({"prediction_input": True}, ValueError, "needs prediction=<extractor>"),
    ({"prediction": lambda r: r, "prediction_methods": "predict"}, TypeError,
     "expected a non-empty list of method names"),
    ({"prediction": lambda r: r, "prediction_methods": ["nope"]}, ValueError,
     "has no monitored method 'nope'"),
    ({"prediction": lambda r: r, "prediction_methods": ["stream"]}, ValueError, "streams its result"),
    ({"prediction": lambda r: r, "positive_label": 0.5}, TypeError, "positive_label"),
    ({"prediction": lambda r: r, "prediction_input": "yes"}, TypeError, "prediction_input"),
])
def test_bad_prediction_options_are_refused_at_decoration(kwargs, exc, message):
    class Model:
        def __call__(self, x):
            return x

        def stream(self, n):
            yield n

    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        monitor(**kwargs)(Model)


def test_process_usage_reads_what_psutil_reads():
    """The flush thread's CPU and RSS come from the clocks and /proc, not psutil (40 us a
    flush of every replica); they must say what psutil says."""
    import psutil

    from ray_monitor.replica.recorder import ProcessUsage

    usage, proc = ProcessUsage(), psutil.Process()
    proc.cpu_percent(None)
    x = 0
    for i in range(300_000):  # some CPU of this process between the two readings
        x += i * i
    ours, theirs = usage.cpu_percent(), proc.cpu_percent(None)
    assert ours > 0 and theirs > 0 and x
    rss, ref = usage.rss(), proc.memory_info().rss
    assert abs(rss - ref) <= 0.05 * ref  # the same page counts, read a moment apart
