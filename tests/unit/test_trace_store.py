"""The aggregator's trace store: grouping by trace id across replicas, parent links,
what makes a trace kept, and the bounds that keep its memory independent of traffic."""

from __future__ import annotations

import pytest

from ray_monitor.common.snapshot import ReplicaIdentity
from ray_monitor.aggregator.trace_store import TraceStore, check_kind, check_limit, tree_order

T0 = 1_700_000_000.0
INGRESS = ReplicaIdentity("shop", "Ingress", "Ingress#a1", "node1", 11, "v1")
MODEL = ReplicaIdentity("shop", "Model", "Model#b2", "node1", 12, "v2")


def record(trace: int, span: int, parent: int = 0, *, name: str = "Model.__call__",
           start: float = T0, duration: float = 0.01, error: str = "", slow: bool = False,
           source: str = "ray_monitor") -> dict:
    """A span record as ``tracing.span_record`` makes it."""
    return {"trace_id": f"{trace:032x}", "span_id": f"{span:016x}",
            "parent_span_id": f"{parent:016x}" if parent else "", "name": name,
            "kind": "SERVER", "start": start, "duration_s": duration,
            "status": "error" if error else "ok", "status_message": error,
            "kept": "error" if error else "slow" if slow else "", "slow": slow,
            "source": source, "attributes": {},
            "exception": {"type": error.split(":")[0], "message": error.split(": ", 1)[-1]}
            if error else None}


def composed_failure(trace: int, start: float = T0) -> tuple[list[dict], list[dict]]:
    """Ingress -> Serve's replica span -> Model, the model raising: what each replica sends."""
    ingress = [record(trace, 1, 0, name="Ingress.__call__", start=start, duration=0.05,
                      error="RayTaskError(KeyError): 'x'")]
    model = [record(trace, 2, 1, name="replica_handle_request Model __call__", start=start + 0.01,
                    duration=0.03, source="ray_serve"),
             record(trace, 3, 2, name="Model.__call__", start=start + 0.011, duration=0.02,
                    error="KeyError: 'x'")]
    return ingress, model


def test_spans_of_one_trace_from_two_replicas_are_one_trace_with_parent_links():
    store = TraceStore(clock=lambda: T0)
    ingress, model = composed_failure(7)
    store.add(model, MODEL)  # the callee's flush may come first
    store.add(ingress, INGRESS)
    [t] = store.traces("errors")
    assert t["trace_id"] == f"{7:032x}" and t["kinds"] == ["errors"]
    assert (t["application"], t["deployment"], t["root"]) == ("shop", "Ingress", "Ingress.__call__")
    assert t["duration_s"] == 0.05 and t["span_count"] == 3 and t["start"] == T0
    # The error is where it began (the model), not the wrapped one its caller passed on.
    assert t["error"] == "KeyError: 'x'" and t["error_deployment"] == "Model"
    assert [(s["name"], s["depth"], s["deployment"]) for s in t["spans"]] == [
        ("Ingress.__call__", 0, "Ingress"),
        ("replica_handle_request Model __call__", 1, "Model"),
        ("Model.__call__", 2, "Model")]
    assert t["spans"][2]["replica"] == "Model#b2" and t["spans"][2]["model_version"] == "v2"
    assert store.traces("slow") == []


def test_context_spans_join_a_trace_kept_later_and_are_dropped_if_none_is():
    clock = [T0]
    store = TraceStore(pending_s=30.0, clock=lambda: clock[0])
    store.add([record(1, 1, name="Ingress.__call__", duration=0.003)], INGRESS)  # sampled, ok
    store.add([record(2, 5, name="Ingress.__call__")], INGRESS)  # ok, never kept
    assert store.traces() == [] and store.stats()["pending_spans"] == 2
    clock[0] += 1
    store.add([record(1, 2, 1, duration=1.5, slow=True)], MODEL)
    [t] = store.traces("slow")
    assert [s["name"] for s in t["spans"]] == ["Ingress.__call__", "Model.__call__"]
    assert t["kinds"] == ["slow"] and t["error"] is None
    clock[0] += 31
    store.add([], INGRESS)
    assert store.stats()["pending_spans"] == 0 and store.stats()["spans_expired"] == 1
    # A context span of a trace already kept joins it at once.
    store.add([record(1, 3, 1, name="late.ok")], INGRESS)
    assert store.traces("slow")[0]["span_count"] == 3


def test_a_slow_failure_is_in_both_lists_and_once_in_the_list_of_all():
    store = TraceStore(clock=lambda: T0)
    store.add([record(1, 1, duration=3.0, error="TimeoutError: upstream", slow=True)], MODEL)
    store.add([record(2, 1, start=T0 + 1, duration=2.0, slow=True)], MODEL)
    assert [t["trace_id"][-1] for t in store.traces("errors")] == ["1"]
    assert [t["trace_id"][-1] for t in store.traces("slow")] == ["2", "1"]  # newest first
    both = store.traces(None)
    assert [t["trace_id"][-1] for t in both] == ["2", "1"]
    assert both[1]["kinds"] == ["errors", "slow"]


def test_traces_per_kind_are_bounded_oldest_out():
    store = TraceStore(max_traces=5, clock=lambda: T0)
    for i in range(1, 13):
        ingress, model = composed_failure(i, start=T0 + i)
        store.add(ingress + model, INGRESS)
    kept = store.traces("errors", limit=50)
    assert [int(t["trace_id"], 16) for t in kept] == [12, 11, 10, 9, 8]
    assert store.stats()["traces"] == 5 and store.stats()["spans"] == 15
    assert store.traces("errors", limit=2) == kept[:2]


def test_spans_per_trace_are_bounded_and_a_kept_span_displaces_context():
    store = TraceStore(max_spans=4, clock=lambda: T0)
    store.add([record(1, 1, error="ValueError: bad")], MODEL)
    store.add([record(1, 10 + i, 1, start=T0 + i) for i in range(6)], MODEL)  # context
    t = store.traces("errors")[0]
    assert t["span_count"] == 4 and t["spans_dropped"] == 3
    store.add([record(1, 99, 1, error="KeyError: 'k'", start=T0 + 9)], MODEL)
    t = store.traces("errors")[0]
    assert t["span_count"] == 4 and t["spans_dropped"] == 4
    assert "0000000000000063" in {s["span_id"] for s in t["spans"]}


def test_pending_context_is_bounded():
    store = TraceStore(max_pending_spans=10, clock=lambda: T0)
    for i in range(30):
        store.add([record(100 + i, 1)], INGRESS)
    assert store.stats()["pending_spans"] == 10 and store.stats()["spans_expired"] == 20


def test_a_snapshot_delivered_twice_does_not_duplicate_spans():
    store = TraceStore(clock=lambda: T0)
    ingress, model = composed_failure(3)
    for _ in range(2):
        store.add([dict(r) for r in ingress + model], INGRESS)
    assert store.traces()[0]["span_count"] == 3


def test_tree_order_survives_missing_parents_and_cycles():
    spans = [record(1, 2, 1, start=T0 + 1), record(1, 3, 4, start=T0 + 2),
             record(1, 4, 3, start=T0 + 3)]
    out = tree_order(spans)
    assert sorted(s["span_id"][-1] for s in out) == ["2", "3", "4"]
    assert out[0]["span_id"].endswith("2") and out[0]["depth"] == 0


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="kind='fast'"):
        check_kind("fast")
    assert check_kind("all") is None and check_kind("slow") == "slow"
    with pytest.raises(ValueError, match="limit=0"):
        check_limit(0)
    with pytest.raises(ValueError, match="max_traces"):
        TraceStore(max_traces=0)
    with pytest.raises(ValueError, match="pending_s"):
        TraceStore(pending_s=0)
