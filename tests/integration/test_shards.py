"""A monitor sharded across two aggregators on a real Ray cluster (issue 15): two
applications that hash to different shards; each shard holds only its own; the totals
equal what the clients sent; shard 0's ``/metrics`` has both applications' series under
one HELP/TYPE; the rule fires for each application on its own shard and both show in the
one alert view; a trace that crosses applications on the two shards and is kept by one
of them only is shown whole; shard 1 killed (and restarted by Ray) while a client sends
loses and doubles nothing the ledger does not count; a rule that sums across applications is
refused before any actor starts; stop() removes every shard.

The cluster runs in a subprocess (tests/shards_cluster.py), beside the session's, because
it needs a sharded monitor of its own; the assertions are here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("shards") / "shards.json"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "RAY_SERVE_TRACING", "RAY_ADDRESS"))}
    proc = subprocess.run([sys.executable, "-m", "tests.shards_cluster", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_cross_application_rule_is_refused_before_any_shard_starts(run):
    refused = run["phases"]["refused"]
    assert refused["refused"] and refused["actors"] == []
    assert "'Busy'" in refused["message"] and "by (deployment, application)" in \
        refused["message"] and "shards=2" in refused["message"]


def test_each_application_lives_on_its_shard_and_counts_are_exact(run):
    assert run["owner"] == {"alpha": 0, "beta": 1, "shop": 0, "gamma": 1}
    steady = run["phases"]["steady"]
    assert steady["totals"] == steady["sent"] == {"alpha": 30, "beta": 30}
    assert steady["own"] == [["alpha/A"], ["beta/B"]]  # nothing of beta on shard 0
    assert all(v["unaccounted"] == 0 for v in steady["delivery"].values())
    assert steady["query"] == {'{"application": "alpha"}': 30.0,
                               '{"application": "beta"}': 30.0}
    assert steady["deployments"] == steady["http_deployments"] == ["alpha", "beta"]
    assert run["second_start_url"]  # a second start() finds the same front


def test_one_metrics_with_both_shards_series(run):
    steady = run["phases"]["steady"]
    apps = sorted(line.split('application="')[1].split('"')[0]
                  for line in steady["requests_lines"])
    assert apps == ["alpha", "beta"]
    assert all(line.endswith(" 30.0") for line in steady["requests_lines"])
    assert steady["help_requests"] == 1
    assert steady["shard_up"] == ['ray_monitor_self_shard_up{shard="0"} 1.0',
                                  'ray_monitor_self_shard_up{shard="1"} 1.0']


def test_an_alert_on_each_shard_shows_in_the_one_view(run):
    assert run["phases"]["steady"]["alerts"] == {"alpha": "firing", "beta": "firing"}
    assert run["phases"]["steady"]["http_alerts"] == ["alpha", "beta"]  # the HTTP API too


def test_a_trace_across_shards_is_kept_whole(run):
    """gamma (shard 1) failed and kept the trace; shop (shard 0) caught the failure, so
    its replica exported its span only on hearing the kept id from shard 1 via shard 0."""
    assert run["owner"]["shop"] == 0 and run["owner"]["gamma"] == 1
    cross = run["phases"]["cross_trace"]
    tid = cross["trace"]["trace_id"]
    shop = [s for s in cross["spans"] if s["application"] == "shop"]
    gamma = [s for s in cross["spans"] if s["application"] == "gamma"]
    assert shop and gamma and len(shop) + len(gamma) == len(cross["spans"])
    root = cross["spans"][0]  # tree order: the ingress's span first, not failed
    assert root["application"] == "shop" and root["depth"] == 0 and root["status"] != "error"
    assert any(s["status"] == "error" for s in gamma)
    shop_ids = {s["span_id"] for s in shop}
    assert any(s["parent_span_id"] in shop_ids for s in gamma)  # one tree
    # each shard holds its application's part (shard 0's kept only because shard 1
    # kept the trace); the one view shows it whole
    assert [sorted(s["application"] for s in part) for part in cross["shard_parts"]] == [
        sorted(s["application"] for s in shop), sorted(s["application"] for s in gamma)]
    assert cross["http"] == [{"trace_id": tid, "span_count": cross["trace"]["span_count"]}]
    assert cross["trace"]["span_count"] == len(cross["spans"]) >= 2


def test_a_killed_shard_restarts_without_loss_beyond_what_is_counted(run):
    steady, killed = run["phases"]["steady"], run["phases"]["shard_killed"]
    assert killed["sent"] == {"alpha": 40, "beta": 100}
    assert killed["totals"] == killed["sent"]  # the ledger: every request, once
    assert all(u == 0 for o in killed["own_unaccounted"] for u in o.values())
    lines = {line.split('application="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
             for line in killed["requests_lines"]}
    # alpha's shard never stopped; beta's counter restarted with its shard (a counter
    # reset to Prometheus): it holds the requests delivered since, at least the 10 sent
    # after the kill, at most all sent since the steady phase.
    assert lines["alpha"] == 40.0
    assert 10 <= lines["beta"] <= killed["sent"]["beta"] - steady["sent"]["beta"]
    assert killed["alerts"] == {"alpha": "firing", "beta": "firing"}
    assert killed["shard_up"][1].endswith(" 1.0")


def test_every_shards_replicas_get_their_gpu_time_counted_and_priced(run):
    """alpha's replica (shard 0) on GPU 0, beta's (shard 1) on GPU 1 of the fake NVML:
    both applications' GPU-seconds and cost{part="gpu"}, at the rule file's price (before,
    shard 0 alone counted GPU time, and only its own applications')."""
    gpu = run["phases"]["gpu"]
    secs = {json.loads(k)["application"]: v for k, v in gpu["seconds"].items()}
    cost = {(json.loads(k)["application"], json.loads(k)["part"]): v
            for k, v in gpu["cost"].items()}
    assert set(secs) == {"alpha", "beta"} and all(v > 0 for v in secs.values()), gpu
    assert set(cost) == {("alpha", "gpu"), ("beta", "gpu")}, gpu
    for app in ("alpha", "beta"):  # read in two queries: a sample may land between them
        assert cost[(app, "gpu")] == pytest.approx(0.01 * secs[app], rel=0.5)


def test_feedback_sent_before_its_prediction_joins_on_the_owning_shard(run):
    early = run["phases"]["early_feedback"]
    assert early["owner"] == 1 and early["answer"] == "yes"
    assert early["first"]["counts"] == {"held": 1}  # no prediction anywhere yet
    assert early["labeled"] == 1  # joined on shard 1 (before: held on shard 0, then unknown)
    assert early["stats"][1]["feedback_joined"] == 1
    assert early["stats"][0]["feedback_joined"] == 0 and early["stats"][0]["feedback_unknown"] == 0


def test_stop_removes_every_shard(run):
    assert run["stopped"] is True and run["left_after_stop"] == []
    # and the token prices it published for the replicas' spans (a later monitor without
    # prices must not have its spans priced with these)
    assert run["prices_before_stop"] and run["prices_after_stop"] is None
