"""Node fan-in (issue 15): a node merger's forward carries its replicas' deliveries whole,
in order, counted exactly by the aggregator; a failed forward keeps them; past the bound
the oldest are dropped and counted; kept trace ids reach every replica through it; the
per-node actors start only where wanted and alive. (The actor itself, on a real
multi-node cluster: tests/integration/test_node_fanin.py.)"""

from __future__ import annotations

import pytest

from ray_monitor.aggregator.core import AggregatorCore
from ray_monitor.aggregator.exposition import MonitorCollector, registry, render
from ray_monitor.aggregator.per_node import PerNodeActors
from ray_monitor.node.merger import Delivery, NodeMerger
from tests.helpers import Clock, replica_snapshots


def test_one_forward_carries_every_replicas_delivery_and_the_counts_are_exact():
    core = AggregatorCore({}, clock=Clock(1000.0))
    merger = NodeMerger("node-a")
    snaps = {r: replica_snapshots(r, 3) for r in ("r1", "r2", "r3")}
    for i in range(3):  # three flushes of three replicas, each forwarded as one call
        for r in snaps:
            assert merger.add(Delivery([snaps[r][i]], None)) == []
        batch, taken = merger.take()
        assert [s.identity.replica for s in batch] == ["r1", "r2", "r3"] and len(taken) == 3
        assert merger.held == 0 and len(merger) == 0
        core.ingest(batch, node_report=merger.report())
    assert core.fanin["node_calls"] == 3 and core.fanin["direct_calls"] == 0
    assert core.fanin["node_snapshots"] == 9
    d = core.ledger.by_deployment()["app/Dep"]
    assert d == {"totals": {"__call__\tok": 18}, "unaccounted": 0, "flush_max_s": 0.0,
                 "replicas": 3}
    assert set(core.fanin_stats()["nodes"]) == {"node-a"}


def test_a_failed_forward_goes_back_to_the_front_in_order():
    merger = NodeMerger("node-a")
    a, b = replica_snapshots("r1", 2)
    merger.add(Delivery([a], None))
    batch, taken = merger.take()
    merger.add(Delivery([b], None))  # arrives while the forward is in flight
    merger.give_back(taken)  # the aggregator was away
    batch, taken = merger.take()
    assert [s.seq for s in batch] == [a.seq, b.seq]
    assert merger.report()["forward_failures"] == 1 and merger.report()["dropped"] == 0


def test_past_the_bound_the_oldest_deliveries_are_dropped_and_counted():
    core = AggregatorCore({}, clock=Clock(1000.0))
    snaps = replica_snapshots("r1", 6)
    core.ingest(snaps[:1])  # the aggregator knew the replica before it went away
    merger = NodeMerger("node-a", max_snapshots=3)
    dropped = []
    for s in snaps[1:]:
        dropped += merger.add(Delivery([s], None))
    assert [d.snaps[0].seq for d in dropped] == [snaps[1].seq, snaps[2].seq]
    assert merger.held == 3 and merger.report()["dropped"] == 2
    assert merger.dropped_reply(dropped[0])["dropped"] == 1
    # The ledger shows what never arrived: 2 snapshots of 2 requests each.
    core.ingest(merger.take()[0], node_report=merger.report())
    assert core.ledger.by_deployment()["app/Dep"]["unaccounted"] == 4


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "10"])
def test_a_bad_bound_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="max_snapshots"):
        NodeMerger("node-a", max_snapshots=bad)


def test_a_merger_that_died_before_answering_loses_and_doubles_nothing():
    core = AggregatorCore({}, clock=Clock(1000.0))
    snaps = replica_snapshots("r1", 4)
    first = NodeMerger("node-a")
    first.add(Delivery(snaps[:2], None))
    core.ingest(first.take()[0], node_report=first.report())  # taken, never answered
    # The replica sends its unanswered delivery again, with the next, to the new merger.
    second = NodeMerger("node-a")
    second.add(Delivery(snaps, None))
    core.ingest(second.take()[0], node_report=second.report())
    d = core.ledger.by_deployment()["app/Dep"]
    assert d["totals"] == {"__call__\tok": 8} and d["unaccounted"] == 0
    assert core.fanin["duplicates"] == 2 and core.ingested == 4


def test_kept_trace_ids_reach_each_replica_through_its_merger():
    core = AggregatorCore({}, clock=Clock(1000.0))
    merger = NodeMerger("node-a")
    tid = "ab" * 16
    core.kept_log.add([tid])
    first = Delivery([], None)  # a replica with no answer yet
    merger.add(first)
    batch, taken = merger.take()
    core.ingest(batch, node_report=merger.report())
    merger.answered(core.kept_log.reply(merger.cursor))
    reply = merger.reply(first)
    assert reply["kept"] == [tid] and reply["merger"] is True
    # Asked again from where it stood: nothing new, until another id is kept.
    later = Delivery([], (reply["epoch"], reply["seq"]))
    assert merger.reply(later)["kept"] == []
    core.kept_log.add(["cd" * 16])
    merger.answered(core.kept_log.reply(merger.cursor))
    assert merger.reply(later)["kept"] == ["cd" * 16]


def test_direct_and_node_deliveries_are_counted_on_metrics():
    core = AggregatorCore({}, clock=Clock(1000.0))
    s1, s2 = replica_snapshots("r1", 2)
    core.ingest([s1])
    merger = NodeMerger("node-a")
    merger.add(Delivery([s2], None))
    core.ingest(merger.take()[0], node_report=merger.report())
    text = render(registry(MonitorCollector(series=lambda: [], alerts=lambda: [],
                                            self_metrics=core.self_metrics)))[0].decode()
    assert "ray_monitor_self_ingest_calls_direct_total 1.0" in text
    assert "ray_monitor_self_ingest_calls_node_total 1.0" in text
    assert "ray_monitor_self_node_snapshots_dropped_total 0.0" in text


class FakeActors(PerNodeActors):
    def _start(self, node_id: str):
        if node_id == "broken":
            raise RuntimeError("cannot place")
        return f"actor-{node_id}"


def test_per_node_actors_start_where_wanted_and_alive_and_go_with_their_node():
    nodes = [{"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": True},
             {"NodeID": "c", "Alive": False}, {"NodeID": "broken", "Alive": True}]
    mgr = FakeActors(namespace="ns", list_nodes=lambda: nodes)
    assert mgr.reconcile(wanted={"a", "c", "broken"}) == (["a"], [])  # c is dead
    assert mgr.actors() == {"a": "actor-a"} and mgr.has("a") and not mgr.has("b")
    assert mgr.reconcile() == (["b"], [])  # everything alive (GPU actors)
    nodes[0]["Alive"] = False
    assert mgr.reconcile(wanted=set()) == ([], ["a"])
    assert mgr.actors() == {"b": "actor-b"}


def test_a_replica_looks_for_its_node_merger_once_the_aggregator_says_it_is_up():
    from ray_monitor.common.names import node_merger_name
    from ray_monitor.replica.delivery import ActorSink

    node = "ab" * 28
    sink = ActorSink(node_id=node, clock=Clock(1000.0))
    assert sink.node_name == node_merger_name(node) == "ray_monitor_node_" + node[:12]
    found = []
    sink._find = lambda: found.append(1)  # no Ray here: record that a lookup started
    sink._take_reply({"epoch": "e", "seq": 1, "kept": []})  # direct, no merger yet
    assert not sink._looking
    sink._take_reply({"epoch": "e", "seq": 2, "kept": [], "merger": True})
    assert sink._looking  # a lookup (merger first, then the aggregator) is under way
    # Delivering through the merger already: its own answers start nothing.
    through = ActorSink(node_id=node, clock=Clock(1000.0))
    through.via_node = True
    through._find = lambda: found.append(2)
    through._take_reply({"epoch": "m", "seq": 1, "kept": [], "merger": True})
    assert not through._looking
    # Without a node id (outside Ray Serve) there is no merger to look for.
    assert ActorSink().node_name is None


# -- the actor's forward loop (its plumbing, driven on an event loop without Ray) ----------

class _Shard:
    """A shard's ``ingest_node``: answers at once, or holds each call until released."""

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.release = None
        self.calls = 0

    @property
    def ingest_node(self):
        import asyncio
        from types import SimpleNamespace

        async def call(snaps, cursor, report):
            self.calls += 1
            if self.hold:
                self.release = self.release or asyncio.Event()
                await self.release.wait()
            return {"epoch": "e", "seq": self.calls, "kept": []}
        return SimpleNamespace(remote=call)


def _merger_actor(shards: dict, monkeypatch, **kw):
    import ray_monitor.node.actor as node_actor

    monkeypatch.setattr(node_actor, "RETRY_S", 0.01)
    actor = node_actor.NodeMergerActor.__ray_metadata__.modified_class(node_id="n1", **kw)

    async def count():
        return len(shards)

    async def aggregator(shard=0):
        return shards[shard]
    actor._shard_count, actor._aggregator = count, aggregator
    return actor


def _apps_on_each_shard() -> tuple[str, str]:
    from ray_monitor.common.shards import shard_of

    names = {shard_of(f"app{i}", 2): f"app{i}" for i in range(20)}
    return names[0], names[1]


def test_a_shard_that_does_not_answer_holds_back_only_its_own_applications(monkeypatch):
    import asyncio

    app0, app1 = _apps_on_each_shard()
    shards = {0: _Shard(), 1: _Shard(hold=True)}  # shard 1 restarting: its calls hang

    async def run():
        actor = _merger_actor(shards, monkeypatch, gather_s=0.0)
        slow = asyncio.ensure_future(actor.ingest(replica_snapshots("r", 1, app=app1)))
        await asyncio.sleep(0.05)
        for i in range(3):  # shard 0's deliveries go on while shard 1's forward is out
            reply = await asyncio.wait_for(actor.ingest(replica_snapshots("r", 1, app=app0)), 30)
            assert reply["merger"] is True
        assert not slow.done() and shards[1].calls == 1
        shards[1].release.set()
        assert (await asyncio.wait_for(slow, 30))["merger"] is True
        return actor.merger.report()
    report = asyncio.run(run())
    assert report["forward_failures"] == 0 and shards[0].calls == 3


def test_a_forward_past_its_timeout_is_sent_again(monkeypatch):
    import asyncio

    import ray_monitor.node.actor as node_actor

    monkeypatch.setattr(node_actor, "FORWARD_TIMEOUT_S", 0.1)
    shard = _Shard(hold=True)  # the first call never answers; later ones do

    async def run():
        actor = _merger_actor({0: shard}, monkeypatch, gather_s=0.0)

        async def unhold():
            while shard.calls < 1:
                await asyncio.sleep(0.01)
            shard.hold = False
        asyncio.ensure_future(unhold())
        reply = await asyncio.wait_for(actor.ingest(replica_snapshots("r", 2)), 30)
        return reply, actor.merger.report()
    reply, report = asyncio.run(run())
    assert reply["merger"] is True and shard.calls >= 2 and report["forward_failures"] >= 1


def test_a_delivery_of_anything_but_snapshots_is_refused_and_the_loop_goes_on(monkeypatch):
    import asyncio

    async def run():
        actor = _merger_actor({0: _Shard()}, monkeypatch, gather_s=0.0)
        with pytest.raises(TypeError, match="ReplicaSnapshot"):
            await actor.ingest([object()])
        reply = await asyncio.wait_for(actor.ingest(replica_snapshots("r", 1)), 30)
        return reply, actor._task.done()
    reply, loop_ended = asyncio.run(run())
    assert reply["merger"] is True and not loop_ended


class _CoreShard:
    """A shard's ``ingest_node`` into a real AggregatorCore, as the actor's method does."""

    def __init__(self, core) -> None:
        self.core = core
        self.calls = 0

    @property
    def ingest_node(self):
        from types import SimpleNamespace

        async def call(snaps, cursor, report):
            self.calls += 1
            self.core.ingest(snaps, node_report=report)
            return self.core.kept_log.reply(cursor)
        return SimpleNamespace(remote=call)


def test_a_mergers_counters_show_once_on_a_sharded_metrics_and_forwards_by_shard(monkeypatch):
    """The node's counters (deliveries, socket calls, drops) go to shard 0 only, so the
    front's merged /metrics has each once with the node's value (not once per shard);
    each shard is told the forwards it took, and the merger's stats say them by shard."""
    import asyncio

    from ray_monitor.aggregator.core import AggregatorCore
    from ray_monitor.aggregator.exposition import render
    from ray_monitor.aggregator.http_api import monitor_registry
    from ray_monitor.aggregator.shards import merge_families

    app0, app1 = _apps_on_each_shard()
    cores = [AggregatorCore({"shards": 2}, clock=Clock(1000.0)) for _ in range(2)]
    shards = {0: _CoreShard(cores[0]), 1: _CoreShard(cores[1])}

    async def run():
        actor = _merger_actor(shards, monkeypatch, gather_s=0.0)
        actor.merger.socket_counts["socket_calls"] = 7  # as the node's LocalServer counts
        a, b = replica_snapshots("ra", 3, app=app0), replica_snapshots("rb", 2, app=app1)
        for snap in a:
            await asyncio.wait_for(actor.ingest([snap]), 30)
        for snap in b:
            await asyncio.wait_for(actor.ingest([snap]), 30)
        return actor.merger.report()
    report = asyncio.run(run())
    assert shards[0].calls == 3 and shards[1].calls == 2
    assert report["forwards"] == 5 and report["by_shard"] == {
        "0": {"forwards": 3, "forward_failures": 0}, "1": {"forwards": 2, "forward_failures": 0}}
    # each forward carries the counts up to it: the forwards the shard took before it
    told = [c.fanin_stats()["nodes"]["n1"] for c in cores]
    assert told[0]["forwards"] == 2 and told[0]["calls"] == 3 and told[0]["socket_calls"] == 7
    assert told[1] == {"node_id": "n1", "forwards": 1, "forward_failures": 0}
    merged = merge_families([list(monitor_registry(c).collect()) for c in cores])
    text = render(type("C", (), {"collect": lambda _: iter(merged)})())[0].decode()
    for name, value in (("ingest_calls_socket", 7.0), ("node_snapshots_dropped", 0.0)):
        lines = [line for line in text.splitlines()
                 if line.startswith(f"ray_monitor_self_{name}_total")]
        assert lines == [f'ray_monitor_self_{name}_total{{shard="0"}} {value}'], lines
    # what each shard received itself stays by shard
    assert 'ray_monitor_self_ingest_calls_node_total{shard="1"} 2.0' in text


def test_a_node_without_shard_0s_applications_still_reports_its_counters_there(monkeypatch):
    """Shard 0 alone exposes a merger's counters, so a node whose replicas all belong to
    another shard's applications sends shard 0 a forward of nothing now and then (every
    REPORT_EVERY_S), carrying them; without it that node was missing from the sum."""
    import asyncio

    import ray_monitor.node.actor as node_actor
    from ray_monitor.aggregator.core import AggregatorCore

    monkeypatch.setattr(node_actor, "REPORT_EVERY_S", 0.0)
    _, app1 = _apps_on_each_shard()
    cores = [AggregatorCore({"shards": 2}, clock=Clock(1000.0)) for _ in range(2)]
    shards = {0: _CoreShard(cores[0]), 1: _CoreShard(cores[1])}

    async def run():
        actor = _merger_actor(shards, monkeypatch, gather_s=0.0)
        actor.merger.socket_counts["socket_calls"] = 4
        for snap in replica_snapshots("rb", 2, app=app1):
            await asyncio.wait_for(actor.ingest([snap]), 30)
    asyncio.run(run())
    assert shards[1].calls == 2 and shards[0].calls >= 1
    assert cores[0].fanin_stats()["nodes"]["n1"]["socket_calls"] == 4
    assert cores[0].ingested == 0 and cores[1].ingested == 2  # no snapshot went astray
