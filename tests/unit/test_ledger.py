"""The aggregator's ledger: a replica's own totals survive an aggregator restart, every
snapshot received exactly once adds up, a lost or doubled one shows; and NVML failures
reach /metrics per node and cause."""

from __future__ import annotations

from ray_monitor.aggregator.core import AggregatorCore
from ray_monitor.aggregator.exposition import registry, render
from ray_monitor.common.snapshot import GpuSnapshot, ReplicaIdentity
from ray_monitor.replica.recorder import Recorder
from tests.helpers import Clock

IDENT = ReplicaIdentity("app", "Dep", "r1", "node", 1)


def snapshots(n_flushes: int, per_flush: int = 3):
    rec = Recorder(identity=IDENT, clock=Clock(1000.0))
    cells = rec.method("__call__")
    out = []
    for i in range(n_flushes):
        for _ in range(per_flush):
            cells.end(cells.begin(0.0), "ok" if i % 2 else "KeyError", i % 2 == 0, 0.01)
        out.append(rec.snapshot())
    return out


def test_every_snapshot_once_adds_up_and_a_restarted_aggregator_knows_the_totals():
    snaps = snapshots(6)
    first = AggregatorCore({}, clock=Clock(1000.0))
    first.ingest(snaps[:3])
    # "Killed": a new aggregator sees only what comes next, in any order.
    second = AggregatorCore({}, clock=Clock(1000.0))
    second.ingest([snaps[4], snaps[3], snaps[5]])
    d = second.ledger.by_deployment()["app/Dep"]
    assert d["totals"] == {"__call__\tok": 9, "__call__\tKeyError": 9}  # all 18, exactly
    assert d["unaccounted"] == 0 and d["replicas"] == 1


def test_a_lost_snapshot_is_unaccounted_and_one_sent_again_is_dropped():
    snaps = snapshots(5)
    lost = AggregatorCore({}, clock=Clock(1000.0))
    lost.ingest([snaps[0], snaps[1], snaps[3], snaps[4]])
    assert lost.ledger.by_deployment()["app/Dep"]["unaccounted"] == 3
    # Sent again (a node merger died before answering): the copy is dropped, counted.
    doubled = AggregatorCore({}, clock=Clock(1000.0))
    doubled.ingest([snaps[0], snaps[1], snaps[1], snaps[2]])
    d = doubled.ledger.by_deployment()["app/Dep"]
    assert d["unaccounted"] == 0 and d["totals"] == {"__call__\tok": 3, "__call__\tKeyError": 6}
    assert doubled.fanin["duplicates"] == 1 and doubled.ingested == 3


def test_nvml_errors_are_on_metrics_per_node_and_cause():
    core = AggregatorCore({}, clock=Clock(1000.0))
    core.ingest_gpu(GpuSnapshot("node-a", 999.0, no_gpus_reason="nvmlInit failed: Unknown",
                                self_errors={"nvmlInit:Unknown": 4}))
    core.ingest_gpu(GpuSnapshot("node-b", 999.0, self_errors={"nvmlDeviceGetPowerUsage:GpuIsLost": 2,
                                                              "nvml_restarted": 1}))
    from ray_monitor.aggregator.exposition import MonitorCollector

    text = render(registry(MonitorCollector(series=lambda: [], alerts=lambda: [],
                                            self_metrics=core.self_metrics)))[0].decode()
    assert 'ray_monitor_self_gpu_errors_total{cause="nvmlInit:Unknown",node="node-a"} 4.0' in text
    assert ('ray_monitor_self_gpu_errors_total{cause="nvmlDeviceGetPowerUsage:GpuIsLost",'
            'node="node-b"} 2.0') in text
    assert 'ray_monitor_self_gpu_errors_total{cause="nvml_restarted",node="node-b"} 1.0' in text
