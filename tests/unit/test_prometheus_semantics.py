"""Alert decisions as Prometheus makes them, with an injected clock: silence reads 0,
absence is a rule, windows hold only data that has arrived, the quantile decision at a
threshold is histogram_quantile's, and /metrics carries what the exported rules need."""

from __future__ import annotations

import math
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from ray_monitor.aggregator.core import AggregatorCore
from ray_monitor.aggregator.exposition import MonitorCollector, registry, render
from ray_monitor.aggregator.serve_state import MAX_AGE_S, running_replicas
from ray_monitor.aggregator.windows import COMPLETE_WAIT_S, WindowStore
from ray_monitor.alerting.expr import check_expr
from ray_monitor.alerting.export import export_prometheus
from ray_monitor.alerting.loader import load_rules
from ray_monitor.autoscaling.config import parse_hint_config
from ray_monitor.common.catalog import Query
from ray_monitor.common.errors import ConfigError
from ray_monitor.common.histogram import DEFAULT_CLASSIC_BOUNDS
from ray_monitor.common.snapshot import ReplicaIdentity, ReplicaSnapshot, SeriesDelta
from ray_monitor.replica.recorder import Recorder
from tests.helpers import Clock, hist

T0 = 1_700_000_040.0  # a multiple of 60


def ident(replica: str = "r1", deployment: str = "d1") -> ReplicaIdentity:
    return ReplicaIdentity("app", deployment, replica, "node1", 100, "v1")


def report(end: float, seq: int, *, replica: str = "r1", deployment: str = "d1",
           ok: int = 0, errors: int = 0, latency: float = 0.01,
           interval: float = 1.0) -> ReplicaSnapshot:
    """One replica flush: ``ok`` and ``errors`` requests of ``latency`` seconds."""
    series = []
    if ok:
        series.append(SeriesDelta("__call__", "ok", False, hist(*[latency] * ok)))
    if errors:
        series.append(SeriesDelta("__call__", "RuntimeError", True, hist(*[latency] * errors)))
    return ReplicaSnapshot(ident(replica, deployment), seq, end - interval, end, series,
                           {"__call__": 0})


class Sim:
    """An aggregator core driven second by second: replicas flush just after each whole
    second (as the recorder does), rules are evaluated half a second later."""

    def __init__(self, rules: dict) -> None:
        self.clock = Clock(T0)
        self.core = AggregatorCore({}, rules_text=rules, clock=self.clock)
        self.seq = 0

    def second(self, *, flush: bool = True, **kw) -> dict:
        self.clock.t = math.floor(self.clock.t) + 1.01
        if flush:
            self.seq += 1
            self.core.ingest([report(self.clock.t, self.seq, **kw)])
        self.clock.t += 0.49
        self.core.evaluate()
        return self.state()

    def state(self) -> dict:
        """alert name -> (state, value, labels) of the alerts not resolved."""
        return {(a["name"], tuple(sorted((k, v) for k, v in a["labels"].items()
                                         if k in ("application", "deployment")))):
                (a["state"], a["value"]) for a in self.core.alerts() if a["state"] != "resolved"}

    def close(self) -> None:
        self.core.notifier.close(1.0)


def rule(name: str, expr: str, **extra) -> dict:
    return {"alert": name, "expr": expr, **extra}


def rules(*entries: dict) -> dict:
    return {"groups": [{"name": "g", "interval": "1s", "rules": list(entries)}]}


APP_D1 = (("application", "app"), ("deployment", "d1"))


# -- zero is a value ------------------------------------------------------------------------

def test_silence_pages_while_the_deployment_is_alive():
    sim = Sim(rules(rule("NoTraffic", 'rate(requests{application="app"}[10s]) '
                                      'by (application, deployment) < 1', **{"for": "3s"})))
    try:
        # known from its first report, before any request: rate 0 (Prometheus: the
        # zero series on /metrics), so the no-traffic alert is pending at once
        assert sim.second() == {("NoTraffic", APP_D1): ("pending", 0.0)}
        for _ in range(20):
            got = sim.second(ok=10)
        assert got == {}
        # the last requests (flushed at T0 + 21.01) are in the second T0 + 20; the window
        # [E - 10, E) holds none from E = T0 + 31, i.e. the round at T0 + 31.5; "for: 3s"
        # fires it at T0 + 34.5
        states = [(sim.second(), sim.clock.t - T0) for _ in range(20)]
        pending = [t for s, t in states if s.get(("NoTraffic", APP_D1), ("",))[0] == "pending"]
        firing = [t for s, t in states if s.get(("NoTraffic", APP_D1), ("",))[0] == "firing"]
        assert pending[0] == pytest.approx(31.5) and firing[0] == pytest.approx(34.5)
        assert firing[-1] == pytest.approx(states[-1][1])  # and it keeps firing: 0 is a value
        assert states[-1][0][("NoTraffic", APP_D1)] == ("firing", 0.0)
    finally:
        sim.close()


def test_error_ratio_has_no_value_without_requests_and_zero_before_the_first_error():
    sim = Sim(rules(rule("Errors", "error_ratio(requests[5s]) by (application, deployment) >= 0")))
    try:
        assert sim.second() == {}  # no request: 0/0 has no value (Prometheus: NaN)
        assert sim.second(ok=5) == {("Errors", APP_D1): ("firing", 0.0)}  # 0 before an error
        assert sim.second(ok=5, errors=5)[("Errors", APP_D1)] == ("firing", 5 / 15)
        for _ in range(6):
            got = sim.second()
        assert got == {}  # silent again: no ratio, resolved
    finally:
        sim.close()


# -- absence ----------------------------------------------------------------------------------

def test_absence_of_a_deployment_and_of_data_from_what_serve_runs():
    sim = Sim(rules(
        rule("Absent", 'absent_over_time(requests{application="app", deployment="d1"}[5s])'),
        rule("Unreported", 'absent_over_time(inflight{application="app"}[5s]) '
                           'by (application, deployment)')))
    try:
        # nothing reported at all: Prometheus' absent_over_time, labelled by the = matchers
        assert sim.second(flush=False) == {("Absent", APP_D1): ("firing", 1.0)}
        # Serve runs d1 (1 replica) and d2 (2), d3 has none running: no data is expected
        sim.core.set_serve_state({("app", "d1"): 1, ("app", "d2"): 2, ("app", "d3"): 0})
        got = sim.second(flush=False)
        assert set(got) == {("Absent", APP_D1), ("Unreported", APP_D1),
                            ("Unreported", (("application", "app"), ("deployment", "d2")))}
        # d1 reports (without requests: a report is a sample of its series)
        got = sim.second()
        assert set(got) == {("Unreported", (("application", "app"), ("deployment", "d2")))}
        for _ in range(10):
            sim.second()
        # d1 stops reporting: its last report is the second T0 + 12, out of the 5 s window
        # from E = T0 + 18 (the round at T0 + 18.5)
        times = []
        for _ in range(8):
            got = sim.second(flush=False)
            if ("Absent", APP_D1) in got:
                times.append(sim.clock.t - T0)
        assert times[0] == pytest.approx(18.5)
        assert ("Unreported", APP_D1) in got
        # the controller's answer ages out: no list, no Unreported alerts (as a Prometheus
        # whose ray_monitor_serve_running_replicas went stale)
        sim.clock.t += MAX_AGE_S
        assert set(sim.second(flush=False)) == {("Absent", APP_D1)}
    finally:
        sim.close()


def test_running_replicas_reads_serve_status():
    class Dep:
        def __init__(self, states):
            self.replica_states = states

    class App:
        def __init__(self, deps):
            self.deployments = deps

    class Status:
        applications = {"shop": App({"Cart": Dep({"RUNNING": 2, "STARTING": 1}),
                                     "Pay": Dep({"STARTING": 1})})}

    assert running_replicas(Status()) == {("shop", "Cart"): 2, ("shop", "Pay"): 0}
    assert running_replicas(object()) == {}


@pytest.mark.parametrize("expr, problem", [
    ('absent_over_time(requests{outcome="ok"}[1m])', "leave the outcome matcher out"),
    ("absent_over_time(inflight[1m]) by (replica)", "group by application and deployment only"),
    ("rate(requests[1m])", "expected a comparison"),
])
def test_absence_rules_are_checked_where_the_file_is_read(expr, problem):
    _, problems = check_expr(expr)
    assert problem in "; ".join(problems)


def test_absence_is_no_autoscaling_target():
    with pytest.raises(ConfigError, match="absent_over_time says whether data exists"):
        parse_hint_config({"deployments": [{"deployment": "d1", "targets": [
            {"metric": "absent_over_time(inflight[1m])", "value": 1}]}]}, file="r.yaml")


# -- complete windows ------------------------------------------------------------------------

def test_rate_is_exact_every_round_at_steady_traffic_whatever_the_arrival_lags():
    clock = Clock(T0)
    store = WindowStore(clock=clock)
    rng = random.Random(5)
    seqs = {"r1": 0, "r2": 0}
    pending: list[tuple[float, ReplicaSnapshot]] = []
    rates = []
    for sec in range(1, 200):
        # each replica flushes 20 requests just after the second, arriving 0-0.8 s later
        for rep in seqs:
            seqs[rep] += 1
            end = T0 + sec + rng.uniform(0.0, 0.05)
            snap = ReplicaSnapshot(ident(rep), seqs[rep], end - 1.0, end,
                                   [SeriesDelta("__call__", "ok", False, hist(*[0.01] * 20))],
                                   {"__call__": 0})
            pending.append((end + rng.uniform(0.0, 0.8), snap))
        phase = T0 + sec + rng.uniform(0.0, 0.99)  # the evaluation at any phase
        for at, snap in sorted(pending, key=lambda p: p[0]):
            if at <= phase:
                clock.t = at
                store.ingest(snap)
        pending = [p for p in pending if p[0] > phase]
        clock.t = phase
        store.begin_round()
        if sec > 12:
            rates.append(store.evaluate(Query("rate", "requests", 10.0))[()])
        store.end_round()
    assert rates and all(r == 40.0 for r in rates), sorted(set(rates))
    assert store.stats()["late_snapshots"] == 0


def test_flushes_later_than_the_wait_are_read_as_missing_then_counted_late():
    clock = Clock(T0)
    store = WindowStore(clock=clock)
    rates = {}
    held = []
    for sec in range(1, 40):
        end = T0 + sec + 0.01
        held.append(ReplicaSnapshot(ident(), sec, end - 1.0, end,
                                    [SeriesDelta("__call__", "ok", False, hist(*[0.01] * 10))], {}))
        # the replica's deliveries from the flush at T0 + 25 on are held up until T0 + 29.3
        # (it sends its buffer in order): longer than its next flush plus COMPLETE_WAIT_S
        if not 25 <= sec < 29:
            clock.t = end + (0.29 if sec == 29 else 0.1)
            for snap in held:
                store.ingest(snap)
            held = []
        clock.t = T0 + sec + 0.5
        store.begin_round()
        rates[sec] = store.evaluate(Query("rate", "requests", 10.0))[()]
        store.end_round()
    assert 24.01 + 1 + COMPLETE_WAIT_S < 27.5
    # the rounds at T0 + 25.5 and 26.5 wait (the window ends at T0 + 24); the next two
    # read the seconds T0 + 24.. without it; then everything is in again
    assert {s: r for s, r in rates.items() if s > 11 and r != 10.0} == {27: 7.0, 28: 6.0}
    # four flushes landed in seconds a round had already read
    assert store.stats()["late_snapshots"] == 4


def test_replicas_flush_on_whole_seconds():
    clock = Clock(T0 + 0.37)
    sent: list[ReplicaSnapshot] = []

    class Sink:
        def send(self, snaps):
            sent.extend(snaps)
            return []

    class Stop:  # stands for the flush thread's event: waiting moves the clock
        calls = 0

        def wait(self, timeout):
            Stop.calls += 1
            clock.advance(timeout + (0.004 if Stop.calls % 3 else -0.0005))  # wakes late or early
            return Stop.calls > 6

    rec = Recorder(identity=ident(), sink=Sink(), flush_interval_s=1.0, clock=clock)
    rec._stop = Stop()
    rec._loop()
    ends = [s.end for s in sent]
    # the first flush a whole interval on, then one per second, near the whole second
    assert [round(e - T0) for e in ends] == [2, 3, 4, 5, 6, 7]
    assert all(abs(e - round(e)) < 0.01 for e in ends)
    assert rec.next_flush_at(T0 + 0.2) == T0 + 1


def test_rounds_run_just_after_the_replicas_flush():
    sim = Sim(rules())
    try:
        # 0.3 s past each whole second: the deltas of the second just ended are in
        assert sim.core.next_round_at(T0 + 0.1) == T0 + 0.3
        assert sim.core.next_round_at(T0 + 0.3) == T0 + 1.3
        assert sim.core.next_round_at(T0 + 2.95) == T0 + 3.3  # an overrun skips, never bunches
        sim.core.eval_interval_s = 10.0
        assert sim.core.next_round_at(T0 + 4) == T0 + 10.3
    finally:
        sim.close()


def test_for_counts_grid_rounds_however_late_each_ran():
    # Rounds run 0.3 s past the second, some later (waiting up to 0.4 s for a late
    # delivery). A round evaluates at its grid point, as Prometheus evaluates at its
    # scheduled timestamps: "for: 3s" fires three rounds after the pending one, even where
    # by wall clock the later round ran less than 3 s after it.
    sim = Sim(rules(rule("Down", 'rate(requests{application="app"}[2s]) '
                                 'by (application, deployment) < 1', **{"for": "3s"})))
    try:
        for _ in range(5):
            sim.second(ok=10)
        states = []
        for i in range(10):
            sim.clock.t = math.floor(sim.clock.t) + 1.01
            sim.seq += 1
            sim.core.ingest([report(sim.clock.t, sim.seq)])
            sim.clock.t = math.floor(sim.clock.t) + 0.3 + 0.04 * (9 - i)  # late, less each time
            assert sim.core.round_time(sim.clock.t) == math.floor(sim.clock.t) + 0.3
            sim.core.evaluate(sim.core.round_time(sim.clock.t))
            states.append(sim.state().get(("Down", APP_D1), ("",))[0])
        assert "pending" in states and "firing" in states, states
        assert states.index("firing") - states.index("pending") == 3, states
    finally:
        sim.close()


# -- the quantile decision at a threshold ---------------------------------------------------

def prometheus_histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """promql/quantile.go bucketQuantile (v2.42) over cumulative (le, count) pairs."""
    if len(buckets) < 2 or buckets[-1][0] != math.inf:
        return math.nan
    total = buckets[-1][1]
    if total == 0:
        return math.nan
    rank = q * total
    b = next((i for i, (_, c) in enumerate(buckets[:-1]) if c >= rank), len(buckets) - 1)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    if b == 0 and buckets[0][0] <= 0:
        return buckets[0][0]
    start, end, count = 0.0, buckets[b][0], buckets[b][1]
    if b > 0:
        start = buckets[b - 1][0]
        count -= buckets[b - 1][1]
        rank -= buckets[b - 1][1]
    return start + (end - start) * (rank / count)


def test_quantile_threshold_decisions_equal_histogram_quantiles_at_a_bound():
    rng = np.random.default_rng(17)
    bounds = tuple(sorted(set(DEFAULT_CLASSIC_BOUNDS) | {0.04, 0.2, 0.4, 0.75}))
    compared = disagreed = 0
    for trial in range(300):
        n = int(rng.integers(1, 400))
        values = rng.lognormal(np.log(0.1), 1.0, n)
        # no value within the histogram's 0.54% of a bound: there both sides may decide
        # either way (each counts a value by its exponential bucket's representative)
        values = [v for v in values if all(abs(v / b - 1) > 0.006 for b in bounds)]
        if not values:
            continue
        h = hist(*values)
        classic = h.classic(bounds)
        for q in (0.5, 0.9, 0.95, 0.99, 0.999, 1.0):
            ours = h.quantile(q)
            theirs = prometheus_histogram_quantile(q, classic)
            for t in bounds:
                compared += 1
                disagreed += (ours > t) != (theirs > t)
    assert compared > 10_000 and disagreed == 0
    # the case: every request at 0.3 s; with 0.4 as a bound, both say p99 < 0.4
    h = hist(*[0.3] * 100)
    assert h.quantile(0.99) == pytest.approx(0.3, rel=0.006)
    assert prometheus_histogram_quantile(0.99, h.classic(DEFAULT_CLASSIC_BOUNDS)) == 0.4975
    assert prometheus_histogram_quantile(0.99, h.classic(bounds)) < 0.4


# -- what /metrics carries -----------------------------------------------------------------

def scrape(core: AggregatorCore) -> str:
    collector = MonitorCollector(series=core.store.cumulative, alerts=core.engine.alert_series,
                                 self_metrics=core.self_metrics,
                                 bounds=lambda: core.classic_bounds, serve=core.serve_running)
    return render(registry(collector))[0].decode()


def test_metrics_carry_zero_series_rule_thresholds_and_what_serve_runs():
    sim = Sim(rules(rule("Slow", "p99(latency_seconds[15s]) by (deployment) > 0.4"),
                    {"slo": "fast", "objective": 99, "sli": {"latency_threshold": 0.3}}))
    try:
        sim.second()  # the method is known; no request yet
        text = scrape(sim.core)
        labels = ('{application="app",deployment="d1",method="__call__",model_version="v1",'
                  'outcome="ok",replica="r1"}')
        assert f"ray_monitor_requests_total{labels} 0.0" in text
        assert f"ray_monitor_request_errors_total{labels} 0.0" in text
        sim.second(ok=3, latency=0.35)
        text = scrape(sim.core)
        buckets = {line.split('le="')[1].split('"')[0]: line.split()[-1]
                   for line in text.splitlines() if line.startswith("ray_monitor_request_duration_seconds_bucket")}
        assert (buckets["0.25"], buckets["0.3"], buckets["0.4"], buckets["0.5"]) == ("0.0", "0.0", "3.0", "3.0")
        # a reload adds new thresholds and keeps the old ones (no le series comes and goes)
        sim.core.reload(rules(rule("Slower", "p90(latency_seconds[15s]) > 0.6")))
        assert {0.3, 0.4, 0.6} <= set(sim.core.classic_bounds["latency_seconds"])
        sim.core.set_serve_state({("app", "d1"): 2})
        assert 'ray_monitor_serve_running_replicas{application="app",deployment="d1"} 2.0' in scrape(sim.core)
        # a replica that stops reporting: its gauges leave /metrics after 3 s, its counters stay
        sim.clock.t += 3.5
        text = scrape(sim.core)
        assert "ray_monitor_inflight_requests{" not in text
        assert 'ray_monitor_requests_total{application="app"' in text
    finally:
        sim.close()


# -- exported rules, checked with promtool -----------------------------------------------------

PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists()
                                        else None)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt install prometheus)")
def test_exported_absence_and_nan_guard_decide_in_prometheus_as_here(tmp_path):
    exported = export_prometheus(load_rules(rules(
        rule("Unreported", 'absent_over_time(inflight{application="app"}[5s]) '
                           'by (application, deployment)'),
        rule("RatioNot0", "error_ratio(requests[5s]) by (deployment) != 0"))))
    for r in exported["groups"][0]["rules"]:
        r.pop("annotations", None)  # the notes: promtool would compare them too
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(exported))
    inflight = 'ray_monitor_inflight_requests{application="app",deployment="%s",replica="r",method="m"}'
    tests = {"rule_files": ["rules.yml"], "evaluation_interval": "1s", "tests": [{
        "interval": "1s",
        "input_series": [
            {"series": 'ray_monitor_serve_running_replicas{application="app",deployment="d1"}',
             "values": "1x30"},
            {"series": 'ray_monitor_serve_running_replicas{application="app",deployment="d2"}',
             "values": "1x30"},
            {"series": 'ray_monitor_serve_running_replicas{application="app",deployment="d3"}',
             "values": "0x30"},
            {"series": inflight % "d1", "values": "0x30"},
            {"series": inflight % "d2", "values": "0x10 _x20"},  # d2 stops reporting at 10 s
            # no request at all: 0/0, NaN in Prometheus, which "!= 0" alone would fire on
            {"series": 'ray_monitor_request_errors_total{deployment="d1"}', "values": "0x30"},
            {"series": 'ray_monitor_requests_total{deployment="d1"}', "values": "0x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "10s", "alertname": "Unreported", "exp_alerts": []},
            {"eval_time": "15s", "alertname": "Unreported", "exp_alerts": []},
            {"eval_time": "16s", "alertname": "Unreported",
             "exp_alerts": [{"exp_labels": {"application": "app", "deployment": "d2"}}]},
            {"eval_time": "20s", "alertname": "RatioNot0", "exp_alerts": []},
        ]}]}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    done = subprocess.run([PROMTOOL, "test", "rules", "tests.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
