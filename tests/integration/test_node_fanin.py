"""Node fan-in on a real three-node Ray cluster (issue 15): replicas on two worker nodes
deliver through their node's merger, over its Unix socket once it is up (by Ray call
before); the aggregator's totals equal what the clients
sent; a merger killed (and restarted by Ray) while a client sends loses and doubles
nothing (the script waits until the newest snapshots' totals equal what was sent and
every snapshot before them arrived: one sent again after the kill may come after a newer
one); a removed node's merger is forgotten and its replica's series age out.

The cluster runs in a subprocess (tests/fanin_cluster.py), beside the session's, because
it needs a monitor of its own (GPU monitoring off, a short ``series_ttl_s``); the
assertions are here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fanin") / "fanin.json"
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith(("OTEL_", "RAY_SERVE_TRACING", "RAY_ADDRESS"))}
    proc = subprocess.run([sys.executable, "-m", "tests.fanin_cluster", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_replicas_deliver_through_their_nodes_merger_and_counts_are_exact(run):
    steady = run["phases"]["steady"]
    ids = run["node_ids"]
    assert steady["totals"] == steady["sent"] == {"B": 50, "C": 50}
    for dep in ("B", "C"):
        d = steady["delivery"][f"fanin-{dep}/{dep}"]
        assert d["unaccounted"] == 0 and d["replicas"] == (2 if dep == "B" else 1)
    # A merger on each worker node, pinned there, taking its replicas' deliveries: GPU
    # monitoring is off in this cluster, so nothing but the fan-in started them.
    assert {ids["node_b"], ids["node_c"]} <= set(steady["merger_nodes"])
    for name in ("node_b", "node_c"):
        node = ids[name]
        assert steady["merger_running_on"][node] == node
        assert steady["merger_stats"][node]["calls"] > 0
        assert steady["merger_stats"][node]["forwards"] > 0
        assert steady["merger_stats"][node]["dropped"] == 0
    fanin = steady["fanin"]
    assert fanin["node_calls"] > 0 and fanin["node_snapshots"] > 0
    # node b's 2 replicas: fewer forwards than deliveries (one forward carries both)
    b = steady["merger_stats"][ids["node_b"]]
    assert b["forwards"] < b["calls"]


def test_replicas_deliver_over_their_nodes_socket_and_by_ray_call_without_one(run):
    steady = run["phases"]["steady"]
    ids = run["node_ids"]
    for name in ("node_b", "node_c"):  # each node's replicas found their own node's socket
        s = steady["merger_stats"][ids[name]]
        assert 0 < s["socket_calls"] <= s["calls"]
        assert s["socket_connections"] >= (2 if name == "node_b" else 1)
        assert s["socket_bad_frames"] == 0 and s["socket_refused"] == 0
    # Before their node had a merger (no socket yet) the replicas delivered by Ray call.
    assert steady["fanin"]["direct_calls"] > 0
    (line,) = steady["socket_metric"]  # as the mergers' forwards last reported it
    assert float(line.split()[-1]) > 0
    assert not [x for x in steady["self_errors"] if "node_socket" in x]


def test_a_killed_merger_restarts_without_loss_or_doubles(run):
    killed = run["phases"]["merger_killed"]
    assert killed["totals"] == killed["sent"]
    assert killed["sent"]["B"] == 50 + 120 + 20
    d = killed["delivery"]["fanin-B/B"]
    assert d["unaccounted"] == 0  # nothing lost, nothing counted twice
    node_b = run["node_ids"]["node_b"]
    assert node_b in killed["merger_nodes"]
    # the restarted merger (its counters start from 0) takes the replicas' deliveries,
    # over its socket again: the replicas reconnected
    assert killed["merger_stats"][node_b]["calls"] > 0
    assert killed["merger_stats"][node_b]["socket_calls"] > 0
    assert killed["merger_running_on"][node_b] == node_b


def test_a_removed_nodes_merger_is_forgotten_and_its_series_age_out(run):
    removed = run["phases"]["node_removed"]
    ids = run["node_ids"]
    assert ids["node_c"] not in removed["merger_nodes"]
    assert ids["node_b"] in removed["merger_nodes"]
    assert run["c_replicas"] and not set(run["c_replicas"]) & set(removed["replicas"]["C"])
    assert removed["replicas"]["B"]  # node b's series stay
