"""Sharding (issue 15): an application's shard is stable; a node merger's forward splits by
shard; shard 0 merges the shards' /metrics, traces, feedback, queries and stats into one
answer; kept trace ids travel between shards without echoes; rules that aggregate across
applications are refused naming the rule and the fix. (The actors on a real cluster:
tests/integration/test_shards.py.)"""

from __future__ import annotations

import json

import pytest

from ray_monitor.aggregator.core import AggregatorCore
from ray_monitor.aggregator.exposition import render
from ray_monitor.aggregator.http_api import monitor_registry
from ray_monitor.aggregator.shards import (KeptExchange, merge_families, merge_feedback,
                                           merge_groups, merge_stats, merge_traces,
                                           route_feedback)
from ray_monitor.alerting.loader import load_rule_file
from ray_monitor.alerting.sharding import sharding_problems
from ray_monitor.common.config import StartConfig
from ray_monitor.common.errors import ConfigError
from ray_monitor.common.kept_log import KeptLog
from ray_monitor.common.names import AGGREGATOR_NAME
from ray_monitor.common.shards import shard_name, shard_of, split_by_shard
from ray_monitor.common.snapshot import ReplicaIdentity
from ray_monitor.node.merger import Delivery, NodeMerger
from tests.helpers import Clock, replica_snapshots

# crc32("alpha") is even, crc32("beta") odd: with two shards they land apart.
A, B = "alpha", "beta"


def test_an_applications_shard_is_stable_and_spread():
    assert shard_of(A, 2) == 0 and shard_of(B, 2) == 1  # crc32, the same in every process
    assert shard_of(A, 1) == shard_of(B, 1) == 0
    assert shard_of(None, 3) == shard_of("", 3)
    counts = [0, 0, 0, 0]
    for i in range(4000):
        counts[shard_of(f"app-{i}", 4)] += 1
    assert min(counts) > 800  # spread, not all on one
    assert shard_name(0) == AGGREGATOR_NAME and shard_name(2) == AGGREGATOR_NAME + "_2"
    parts = split_by_shard(["x1", "y1", "x2", "y2"], lambda s: A if s[0] == "x" else B, 2)
    assert parts == {0: ["x1", "x2"], 1: ["y1", "y2"]}


def test_shards_is_one_setting_checked_at_start():
    assert StartConfig().shards == 1
    assert StartConfig.build(shards=4).shards == 4
    for bad in (0, 65, True, "2"):
        with pytest.raises(ConfigError) as e:
            StartConfig.build(shards=bad)
        assert e.value.problems[0].field == "shards"


def test_a_node_forward_split_by_shard_keeps_each_shards_counts_exact():
    """What the merger's forward loop does with one take(): one call per shard, each
    shard's ledger exact; a shard's part that failed goes back alone, in order."""
    shards = [AggregatorCore({"shards": 2}, clock=Clock(1000.0)),
              AggregatorCore({"shards": 2}, clock=Clock(1000.0))]
    merger = NodeMerger("node-a")
    a, b = replica_snapshots("ra", 3, app=A), replica_snapshots("rb", 3, app=B)
    for i in range(3):
        merger.add(Delivery([a[i]], None))
        merger.add(Delivery([b[i]], None))
        _, taken = merger.take()
        parts = split_by_shard(taken, lambda d: d.snaps[0].identity.application, 2)
        assert sorted(parts) == [0, 1]
        if i == 1:  # shard 1 away: its part back to the front, shard 0's taken
            shards[0].ingest([s for d in parts[0] for s in d.snaps], node_report=merger.report())
            merger.give_back(parts[1])
            _, taken = merger.take()
            assert [d.snaps[0].seq for d in taken] == [b[1].seq]
            shards[1].ingest([s for d in taken for s in d.snaps], node_report=merger.report())
            continue
        for shard, deliveries in parts.items():
            shards[shard].ingest([s for d in deliveries for s in d.snaps],
                                 node_report=merger.report())
    assert shards[0].ledger.by_deployment()[f"{A}/Dep"]["totals"] == {"__call__\tok": 6}
    assert shards[1].ledger.by_deployment()[f"{B}/Dep"]["totals"] == {"__call__\tok": 6}
    assert f"{B}/Dep" not in shards[0].ledger.by_deployment()
    assert all(c.ledger.by_deployment()[k]["unaccounted"] == 0
               for c, k in ((shards[0], f"{A}/Dep"), (shards[1], f"{B}/Dep")))


def test_metrics_of_two_shards_are_one_exposition_with_help_once():
    cores = [AggregatorCore({"shards": 2}, clock=Clock(1000.0)),
             AggregatorCore({"shards": 2}, clock=Clock(1000.0))]
    cores[0].ingest(replica_snapshots("ra", 2, app=A))
    cores[1].ingest(replica_snapshots("rb", 2, app=B))
    fams = [list(monitor_registry(c).collect()) for c in cores]
    merged = merge_families(fams)
    text = render(type("C", (), {"collect": lambda _: iter(merged)})())[0].decode()
    req = [line for line in text.splitlines()
           if line.startswith("ray_monitor_requests_total{")]
    assert any(f'application="{A}"' in line for line in req)
    assert any(f'application="{B}"' in line for line in req)
    assert text.count("# HELP ray_monitor_requests_total ") == 1
    assert text.count("# TYPE ray_monitor_requests_total ") == 1
    # The monitor's own metrics, which both have, are told apart by shard.
    own = [line for line in text.splitlines()
           if line.startswith("ray_monitor_self_snapshots_ingested_total")]
    assert own == ['ray_monitor_self_snapshots_ingested_total{shard="0"} 2.0',
                   'ray_monitor_self_snapshots_ingested_total{shard="1"} 2.0']
    assert 'ray_monitor_self_shard_up{shard="1"} 1.0' in text
    # A shard that did not answer is shown down, the others' series still there.
    text = render(type("C", (), {"collect": lambda _: iter(merge_families(
        [fams[0], None]))})())[0].decode()
    assert 'ray_monitor_self_shard_up{shard="1"} 0.0' in text and f'application="{A}"' in text


def span(tid: str, sid: str, parent, app: str, start: float, status: str = "ok") -> dict:
    return {"trace_id": tid, "span_id": sid, "parent_span_id": parent, "name": f"{app} call",
            "start": start, "duration_s": 1.0, "status": status, "application": app,
            "deployment": "Dep", "source": "ray_monitor"}


def test_a_trace_that_crossed_shards_is_shown_whole():
    t = "a" * 32
    part0 = {"trace_id": t, "kinds": ["slow"], "start": 10.0, "duration_s": 2.0, "root": "x",
             "application": A, "deployment": "Dep", "error": None, "error_deployment": None,
             "span_count": 1, "spans_dropped": 0, "spans": [span(t, "s1", None, A, 10.0)]}
    part1 = {**part0, "kinds": ["errors"], "application": B, "start": 10.5,
             "spans": [span(t, "s2", "s1", B, 10.5, "error")], "spans_dropped": 1}
    other = {**part0, "trace_id": "b" * 32, "start": 20.0}
    out = merge_traces([[part0], [part1, other]], limit=10)
    assert [x["trace_id"] for x in out] == ["b" * 32, t]
    whole = out[1]
    assert whole["span_count"] == 2 and whole["kinds"] == ["errors", "slow"]
    assert whole["application"] == A and whole["error_deployment"] == "Dep"
    assert [s["depth"] for s in whole["spans"]] == [0, 1] and whole["spans_dropped"] == 1
    assert merge_traces([[part0], [other]], limit=1) == [other]


def test_feedback_goes_to_the_shard_that_holds_the_prediction():
    items = [{"request_id": "r0"}, {"request_id": "r1"}, {"request_id": "nobody"}, "bad"]
    routes = route_feedback(items, [["r0"], ["r1"]])
    assert routes == {0: [0, 2, 3], 1: [1]}
    merged = merge_feedback([
        ([0, 2, 3], {"counts": {"joined": 1, "held": 1, "invalid": 1},
                     "problems": [{"index": 1, "status": "held"},
                                  {"index": 2, "status": "invalid"}]}),
        ([1], {"counts": {"joined": 1}, "problems": []})])
    assert merged["counts"] == {"joined": 2, "held": 1, "invalid": 1}
    assert [p["index"] for p in merged["problems"]] == [2, 3]


class _Peers:
    """ShardFront's ``gather`` and ``call`` on real cores (index 1..), as the actors answer."""

    def __init__(self, cores, away=()) -> None:
        self.cores, self.away, self.calls = cores, set(away), []
        self.refuse = False  # answers gather, fails the call that hands feedback on

    async def gather(self, method, *args):
        return [None if i in self.away else await self._one(i, method, *args)
                for i in range(1, len(self.cores))]

    async def call(self, index, method, *args):
        if index in self.away or self.refuse:
            raise TimeoutError(f"shard {index} away")
        return await self._one(index, method, *args)

    async def _one(self, index, method, *args):
        self.calls.append((index, method))
        core = self.cores[index]
        if method == "known_requests":
            return core.quality.join.known(args[0])
        assert method == "feedback"
        return await core.feedback_async(list(args[0]))


def test_early_feedback_joins_on_the_shard_that_owns_the_application():
    """Ground truth sent before its prediction reached any shard is held by shard 0, then
    handed to the shard whose replica's prediction arrived since, and joins there, counted
    once (before: held on shard 0 until its grace ran out, reported unknown)."""
    import asyncio

    from ray_monitor.aggregator.shards import reroute_held
    from ray_monitor.quality.prediction import Prediction

    clock = Clock(1000.0)
    cores = [AggregatorCore({"shards": 2}, clock=clock), AggregatorCore({"shards": 2}, clock=clock)]
    for core in cores:
        core.quality.join._clock = clock
    peers = _Peers(cores)
    first = cores[0].feedback([{"request_id": "r-b", "label": "yes"},
                               {"request_id": "r-a", "label": "no"},
                               {"request_id": "r-none", "value": 1.0}])
    assert first["counts"] == {"held": 3}
    assert asyncio.run(reroute_held(cores[0].quality.join, peers)) == 0  # nowhere yet
    # The predictions reach their applications' shards a flush later.
    cores[1].quality.add_predictions([Prediction("r-b", 1000.0, B, "Dep", "v1", label="yes")])
    cores[0].quality.add_predictions([Prediction("r-a", 1000.0, A, "Dep", "v1", label="yes")])
    assert cores[0].quality.join.held_ids(10) == ["r-b", "r-none"]  # r-a joined here at once
    peers.away = {1}  # shard 1 away this round: r-b stays held on shard 0
    assert asyncio.run(reroute_held(cores[0].quality.join, peers)) == 0
    peers.away, peers.refuse = set(), True  # it knows r-b, then fails to take it: held again
    assert asyncio.run(reroute_held(cores[0].quality.join, peers)) == 0
    assert sorted(cores[0].quality.join.held_ids(10)) == ["r-b", "r-none"]
    peers.refuse = False
    assert asyncio.run(reroute_held(cores[0].quality.join, peers)) == 1
    assert cores[0].quality.join.held_ids(10) == ["r-none"]
    st0, st1 = cores[0].quality.join.stats(), cores[1].quality.join.stats()
    assert st1["feedback_joined"] == 1 and st1["predictions_joined"] == 1
    assert st0["feedback_joined"] == 1  # r-a, on its own shard
    clock.advance(11.0)  # past early_grace_s: the one nobody predicted is unknown, once
    cores[0].feedback([])
    cores[1].feedback([])
    assert cores[0].quality.join.stats()["feedback_unknown"] == 1
    assert cores[1].quality.join.stats()["feedback_unknown"] == 0
    assert st0["held"] == 1 and cores[0].quality.join.stats()["held"] == 0


def test_query_groups_and_stats_merge():
    ga = json.dumps({"application": A}, sort_keys=True)
    gb = json.dumps({"application": B}, sort_keys=True)
    assert merge_groups([{ga: 1.0}, {gb: 2.0}]) == {ga: 1.0, gb: 2.0}
    # Not grouped by application: each shard's part kept apart, never summed.
    both = merge_groups([{"{}": 1.0}, None, {"{}": 2.0}])
    assert both == {json.dumps({"shard": "0"}): 1.0, json.dumps({"shard": "2"}): 2.0}
    s = merge_stats([{"ingested": 3, "replicas": 1, "delivery": {"a/D": {}}},
                     {"ingested": 4, "replicas": 2, "delivery": {"b/D": {}}}, None])
    assert s["ingested"] == 7 and s["replicas"] == 3 and set(s["delivery"]) == {"a/D", "b/D"}
    assert s["shards"][2] is None


def test_kept_ids_reach_every_shard_once():
    t0, t1 = "0" * 31 + "a", "1" * 31 + "b"
    front, log1 = KeptLog(), KeptLog()
    ex = KeptExchange()
    front.add([t0])  # kept by a replica of shard 0's applications
    log1.add([t1])  # kept by one of shard 1's
    out, upto = ex.outgoing(log1)
    assert out == [t1]  # shard 0 was away: nothing recorded, the same ids next time
    for _ in range(3):  # rounds: nothing is sent twice, nothing logged twice
        out, upto = ex.outgoing(log1)
        front.add(out)
        ex.incoming(log1, front.reply(ex.cursor), out, upto)
    assert front._ids == [t0, t1]
    assert sorted(log1._ids) == sorted([t0, t1])
    # A replica delivering to shard 1 hears of the trace kept on shard 0.
    assert t0 in log1.reply(None)["kept"]


RULES = """
groups:
  - name: g
    rules:
      - alert: PerApp
        expr: rate(requests[1m]) by (application, deployment) > 100
      - alert: Pinned
        expr: error_ratio(requests{application="shop"}[5m]) > 0.1
      - alert: ClusterWide
        expr: rate(requests[1m]) by (deployment) > 1000
"""


def test_rules_across_applications_are_refused_when_sharded():
    ruleset = load_rule_file(RULES, from_text=True).ruleset
    assert sharding_problems(ruleset, 1) == []
    problems = sharding_problems(ruleset, 2)
    assert [(p.rule, p.field) for p in problems] == [("ClusterWide", "expr")]
    assert "by (deployment, application)" in problems[0].message
    core = AggregatorCore({"shards": 2})
    with pytest.raises(ConfigError) as e:
        core.reload(RULES)
    assert "ClusterWide" in str(e.value) and "shards=2" in str(e.value)
    assert core.reload(RULES.split("      - alert: ClusterWide")[0])["rules"] == 2


def test_a_rule_pinned_to_an_application_runs_only_on_its_shard():
    """Elsewhere it would see no data, and an absence rule would fire for nothing."""
    text = RULES.split("      - alert: ClusterWide")[0] + """\
      - alert: BetaGone
        expr: absent_over_time(requests{application="beta"}[1m])
"""
    cores = [AggregatorCore({"shards": 2}, rules_text=text, shard=i) for i in range(2)]
    names = [sorted(r.name for _, r in c.engine.ruleset.rules()) for c in cores]
    assert names == [["PerApp", "Pinned"], ["BetaGone", "PerApp"]]  # shop: 0, beta: 1
    assert [len(c.rules()) for c in cores] == [3, 3]  # the API lists the whole file


def test_rules_check_with_shards_names_the_rule_and_the_fix(tmp_path):
    import io

    from ray_monitor.client.cli import main

    f = tmp_path / "rules.yaml"
    f.write_text(RULES)
    for argv, code in ((["rules", "check", str(f)], 0),
                       (["rules", "check", "--shards", "2", str(f)], 1)):
        out = io.StringIO()
        assert main(argv, out=out, err=io.StringIO()) == code
    text = out.getvalue()
    assert "rule 'ClusterWide'" in text and "by (deployment, application)" in text
    assert "PerApp" not in text and "Pinned" not in text
    err = io.StringIO()
    assert main(["rules", "check", "--shards", "0", str(f)], out=io.StringIO(), err=err) == 2
    assert "--shards: expected a whole number from 1 to 64, got '0'" in err.getvalue()


def test_context_spans_of_a_trace_kept_on_another_shard_are_kept_and_shown_whole():
    """Shard 0 holds the ingress's context span; shard 1's replica failed and kept the
    trace. Once the id reaches shard 0 (adopt), its span is kept, whether it was held
    already or arrives later, and the front's merge shows one trace."""
    from ray_monitor.aggregator.trace_store import TraceStore

    def rec(tid, sid, parent, app, status="ok"):
        return {**span(tid, sid, parent, app, 10.0 if app == A else 10.1, status),
                "kept": "error" if status == "error" else "", "slow": False,
                "status_message": "boom" if status == "error" else "",
                "kind": "SERVER", "attributes": {}, "exception": None}

    t1, t2 = "1" * 32, "2" * 32
    front, back = TraceStore(clock=lambda: 10.0), TraceStore(clock=lambda: 10.0)
    ident_a = ReplicaIdentity(A, "Front", "fa", "n", 1)
    ident_b = ReplicaIdentity(B, "Back", "bb", "n", 2)
    front.add([rec(t1, "f1", None, A)], ident_a)  # held: nothing here says it is kept
    back.add([rec(t1, "b1", "f1", B, "error"), rec(t2, "b2", "f2", B, "error")], ident_b)
    assert front.traces() == [] and front.stats()["pending_spans"] == 1
    front.adopt([t1, t2])
    front.add([rec(t2, "f2", None, A)], ident_a)  # exported after its replica heard of t2
    assert front.stats()["pending_spans"] == 0
    assert front.traces("errors") == []  # not failed here: listed by the shard that kept it
    parts = [front.traces("errors"), back.traces("errors"), front.parts([t1, t2]),
             back.parts([t1, t2])]
    merged = {t["trace_id"]: t for t in merge_traces(parts, limit=10)}
    for tid in (t1, t2):
        t = merged[tid]
        assert {s["application"] for s in t["spans"]} == {A, B} and t["kinds"] == ["errors"]
        assert t["application"] == A and t["span_count"] == 2 and t["spans_dropped"] == 0


def test_a_gpu_sample_is_passed_only_to_the_shards_it_concerns_and_their_time_stays_right():
    """Shard 0 passes a node's sample on only to the shards with a process on its GPUs,
    gathered into one call per shard (issue 15: one Ray call per node per second per
    shard, most of them for nothing); a process not joined (a replica only its own shard
    knows yet) sends it to every shard.
    A shard that missed the node's samples while it had no process there counts its next
    interval from the node's previous sample, not from the last one it had."""
    import asyncio
    import dataclasses

    from ray_monitor.aggregator.shards import GpuRelay, ingest_gpu_share
    from ray_monitor.common.catalog import Query
    from ray_monitor.common.snapshot import GpuDevice, GpuProcess, GpuSnapshot

    a, b = "zeta", "gamma"  # of 3 shards: shard 0's, shard 2's
    kb = shard_of(b, 3)
    assert (shard_of(a, 3), kb) == (0, 2)
    clock = Clock(1000.0)
    core = AggregatorCore({"shards": 3}, clock=clock)  # shard kb
    core.store.tenants.gpu_owner = lambda app: shard_of(app, 3) == kb  # as the actor
    ids = {a: ReplicaIdentity(a, "Dep", "ra", "node-a", 101),
           b: ReplicaIdentity(b, "Dep", "rb", "node-a", 202)}
    snap = replica_snapshots("rb", 1, app=b)[0]
    core.ingest([dataclasses.replace(snap, identity=ids[b])])
    sent = []

    class Front:
        shards = 3

        async def call(self, index, method, batch, local):
            assert method == "ingest_gpu" and local
            sent.append((index, [(snap.time, since) for snap, since in batch]))
            ingest_gpu_share(core, batch, lambda app: shard_of(app, 3) == kb)
    relay = GpuRelay(Front(), every_s=0.0)
    relay.pids = {"node-a": {202: ids[b]}}
    own = {101: ids[a]}
    devices = [GpuDevice(0, "G0", "H100")]

    async def go():
        for t, pids in ((1001.0, [101]), (1002.0, [101, 202]), (1003.0, [101]),
                        (1004.0, [101]), (1005.0, [101, 202]), (1005.5, [101, 202]),
                        (1006.0, [101, 999])):
            clock.t = t
            procs = [GpuProcess(0, "G0", pid, 1, 0.5) for pid in pids]
            assert relay.send(relay.joined(GpuSnapshot("node-a", t, devices, procs), own))
            if t != 1005.0:  # 1005 and 1005.5 go in one call: a batch
                await asyncio.gather(*relay._tasks.values())
    asyncio.run(go())
    assert sent == [(kb, [(1002.0, 1001.0)]), (kb, [(1005.0, 1004.0), (1005.5, 1005.0)]),
                    *[(k, [(1006.0, 1005.5)]) for k in (1, 2)]]
    # b's replica shared G0 for the intervals ending at 1002, 1005 and 1005.5: 0.5 s,
    # 0.5 s and 0.25 s
    got = core.store.evaluate(Query("sum", "replica_gpu_seconds", 60.0, by=("application",)),
                              1010.0)
    assert got == {(("application", b),): 1.25}


def test_every_shards_replicas_get_their_gpu_time_counted_and_priced_on_their_shard():
    """Shard 0 joins a node's GPU sample to every shard's replicas (their pids asked for at
    each reconcile) and passes it on; each shard counts and prices its own replicas' GPU
    time, a shared GPU split over every replica on it; shard 0 alone keeps the device
    series. (Before: beta's GPU time was not counted anywhere, nor priced.)"""
    import asyncio
    import dataclasses

    from ray_monitor.aggregator.shards import GpuRelay, ingest_gpu_share
    from ray_monitor.common.catalog import Query
    from ray_monitor.common.snapshot import GpuDevice, GpuProcess, GpuSnapshot

    prices = {"groups": [], "prices": {"*": {"per_gpu_second": 0.01}}}
    clock = Clock(1000.0)
    cores = [AggregatorCore({"shards": 2}, rules_text=prices, clock=clock) for _ in range(2)]
    ids = [ReplicaIdentity(A, "Dep", "ra", "node-a", 101), ReplicaIdentity(B, "Dep", "rb", "node-a", 202)]
    for i, core in enumerate(cores):
        core.store.tenants.gpu_owner = lambda app, i=i: shard_of(app, 2) == i  # as the actor
        snap = replica_snapshots(ids[i].replica, 1, app=ids[i].application)[0]
        core.ingest([dataclasses.replace(snap, identity=ids[i])])

    class Front:
        async def gather(self, method, *args):
            assert method == "replica_identities"
            return [[ident for ident, _ in cores[1].replicas.values()]]
    relay = GpuRelay(Front())
    asyncio.run(relay.refresh())
    devices = [GpuDevice(0, "G0", "H100"), GpuDevice(1, "G1", "H100")]
    procs = [GpuProcess(0, "G0", 101, 1, 0.5), GpuProcess(0, "G0", 202, 1, 0.5),
             GpuProcess(1, "G1", 202, 1, 0.5), GpuProcess(1, "G1", 999, 1, 0.5)]
    for t in (1001.0, 1003.0, 1004.0):  # 1 s (the node's first), 2 s, 1 s: 4 s in all
        clock.t = t
        snap = relay.joined(GpuSnapshot("node-a", t, devices, procs),
                            {i.pid: i for i, _ in cores[0].replicas.values()})
        cores[0].ingest_gpu(snap)  # shard 0, as the actor does once it passed it on
        ingest_gpu_share(cores[1], [(snap, None)], lambda app: shard_of(app, 2) == 1)
    clock.t = 1006.0

    def ev(core, fn, metric, by):
        return core.store.evaluate(Query(fn, metric, 60.0, by=by), clock.t)
    by = ("application", "gpu")
    assert ev(cores[0], "sum", "replica_gpu_seconds", by) == {
        (("application", A), ("gpu", "0")): 2.0}  # half of G0
    assert ev(cores[1], "sum", "replica_gpu_seconds", by) == {
        (("application", B), ("gpu", "0")): 2.0, (("application", B), ("gpu", "1")): 4.0}
    cost = [ev(c, "sum", "cost", ("application", "part")) for c in cores]
    assert cost[0] == pytest.approx({(("application", A), ("part", "gpu")): 2.0 * 0.01})
    assert cost[1] == pytest.approx({(("application", B), ("part", "gpu")): 6.0 * 0.01})
    # Device series on shard 0 only, labelled with every application using the GPU.
    xid = ev(cores[0], "count", "gpu_xid_errors", ("gpu", "application"))
    assert sorted(xid) == [(("application", A), ("gpu", "0")), (("application", B), ("gpu", "0")),
                           (("application", B), ("gpu", "1"))]
    assert ev(cores[1], "count", "gpu_xid_errors", ("gpu",)) == {}
    assert cores[0].gpu_latest["node-a"].processes[1].replica == ids[1]
    fams = merge_families([list(monitor_registry(c).collect()) for c in cores])
    text = render(type("C", (), {"collect": lambda _: iter(fams)})())[0].decode()
    secs = [line for line in text.splitlines()
            if line.startswith("ray_monitor_gpu_replica_seconds_total{")]
    assert len(secs) == 3 and sum('application="beta"' in line for line in secs) == 2, secs
    mem = [line for line in text.splitlines()
           if line.startswith("ray_monitor_gpu_replica_memory_used_bytes{") and 'pid="202"' in line]
    assert len(mem) == 2 and all('application="beta"' in line for line in mem), mem  # once each
