"""The main demo: a monitored two-deployment Ray Serve app, a fault, alerts and a scale-out.

    ./demo.sh [--healthy-s 15] [--fault-s 30] [--keep]

Starts a local Ray cluster and Ray Serve, starts ray-monitor with
``deployments/rules/demo.yaml``, and serves an iris classifier (scikit-learn, trained in
each replica at start-up on the data set that ships with scikit-learn) behind a
preprocessing ingress. The classifier uses ray-monitor's autoscaling policy. HTTP
traffic runs through three phases: healthy; a fault injected into every classifier
replica (30% errors, up to 400 ms of added latency); healthy again until the alerts have
resolved and the replicas are back to one. Prints alerts and replica changes as they
happen, then a summary: what fired and when, the replicas before, at peak and after,
and where to look. Exits 0 when at least one alert fired and resolved and the classifier
scaled out; non-zero, saying why, otherwise. About two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

import ray_monitor
from ray_monitor import monitor
from ray_monitor.client.tables import deployments_table

REPO = Path(__file__).resolve().parents[1]
APP, MODEL = "demo", "Classifier"
RULES = REPO / "deployments" / "rules" / "demo.yaml"
MODEL_VERSION = "iris-logreg-1"
MAX_REPLICAS = 3


def iris():
    """``(X_train, X_test, y_train, y_test, class names)``: scikit-learn's iris, split."""
    from sklearn.datasets import load_iris
    from sklearn.model_selection import train_test_split

    data = load_iris()
    X_train, X_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.3, random_state=0, stratify=data.target)
    return X_train, X_test, y_train, y_test, [str(n) for n in data.target_names]


@ray.remote(num_cpus=0)
class FaultSwitch:
    """The fault every classifier replica reads, so that replicas started by the
    scale-out have it too."""

    def __init__(self) -> None:
        self.fault = {"error_ratio": 0.0, "delay_s": 0.0}

    def set(self, error_ratio: float, delay_s: float) -> None:
        self.fault = {"error_ratio": error_ratio, "delay_s": delay_s}

    def get(self) -> dict:
        return self.fault


@serve.deployment(
    ray_actor_options={"num_cpus": 0}, max_ongoing_requests=20,
    autoscaling_config=AutoscalingConfig(
        min_replicas=1, max_replicas=MAX_REPLICAS, initial_replicas=1,
        upscale_delay_s=0.5, downscale_delay_s=1, look_back_period_s=2, metrics_interval_s=0.5,
        # Serve's own queue-length rule would scale out at this load by itself; a high
        # target leaves the decision to ray-monitor's hint, so the demo shows that.
        target_ongoing_requests=100,
        policy=AutoscalingPolicy(policy_function="ray_monitor.autoscaling:MonitorPolicy",
                                 policy_kwargs={"stale_after_s": 3, "refresh_interval_s": 0.5})))
@monitor(model_version=MODEL_VERSION)
class Classifier:
    """A logistic regression on iris, trained when the replica starts."""

    def __init__(self, switch=None) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        X_train, _, y_train, _, self.classes = iris()
        self.model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
        self.model.fit(X_train, y_train)
        self.switch, self.fault, self.checked = switch, {"error_ratio": 0.0, "delay_s": 0.0}, 0.0

    async def _fault(self) -> dict:
        if self.switch is None:  # deployed from the Serve config: no fault to inject
            return self.fault
        if time.monotonic() - self.checked > 0.5:  # ask the switch twice a second at most
            self.checked = time.monotonic()
            self.fault = await self.switch.get.remote()
        return self.fault

    async def __call__(self, features: list[float]) -> dict:
        fault = await self._fault()
        if fault["delay_s"]:
            await asyncio.sleep(fault["delay_s"] * random.random() * 2)
        if random.random() < fault["error_ratio"]:
            raise RuntimeError("injected fault: model backend unavailable")
        p = self.model.predict_proba([features])[0]
        return {"label": self.classes[int(p.argmax())], "score": round(float(p.max()), 3),
                "model_version": MODEL_VERSION}


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
@monitor
class Preprocess:
    """HTTP ingress: checks the JSON body and calls the classifier."""

    def __init__(self, classifier) -> None:
        self.classifier = classifier

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        try:
            features = [float(x) for x in (await request.json())["features"]]
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": 'send {"features": [4 numbers]}'}, status_code=400)
        if len(features) != 4:
            return JSONResponse({"error": "iris has 4 features"}, status_code=400)
        return await self.classifier.remote(features)


def serve_app(args: dict | None = None):
    """The demo app without its fault switch, for Serve's config file
    (``deployments/serve-demo.yaml``)."""
    return Preprocess.bind(Classifier.bind())


class Traffic:
    """``threads`` clients, each sending held-out iris rows (with a little noise) at
    ``rate_per_s`` until stopped; counts answers by status."""

    def __init__(self, url: str, rows: np.ndarray, *, threads: int = 4, rate_per_s: float = 3.0):
        self.url, self.rows, self.period = url, rows, 1.0 / rate_per_s
        self.counts = {"ok": 0, "failed": 0}
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self._stop.is_set():
            row = self.rows[rng.integers(len(self.rows))] + rng.normal(0, 0.05, 4)
            req = urllib.request.Request(
                self.url, data=json.dumps({"features": row.round(2).tolist()}).encode(),
                headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    resp.read()
                    outcome = "ok"
            except (urllib.error.HTTPError, OSError):  # the injected 500s, mostly
                outcome = "failed"
            with self._lock:
                self.counts[outcome] += 1
            self._stop.wait(self.period)

    def start(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def running_replicas(deployment: str = MODEL) -> int:
    app = serve.status().applications.get(APP)
    dep = app.deployments.get(deployment) if app else None
    return dep.replica_states.get("RUNNING", 0) if dep else 0


class Watch:
    """Polls alerts and replicas once a second, prints changes, keeps the timeline."""

    def __init__(self, mon, t0: float) -> None:
        self.mon, self.t0 = mon, t0
        self.alerts: dict[tuple, dict] = {}  # (name, application, deployment) -> latest
        self.episodes: dict[tuple, list[list]] = {}  # key -> [[fired_at, resolved_at], ...]
        self.replicas: list[tuple[float, int]] = []  # (t, running) on every change
        self.reasons: set[str] = set()

    def t(self, when: float, width: int = 5) -> str:
        return f"t+{when - self.t0:{width}.1f}s"

    def poll(self) -> None:
        now = time.time()
        seen = set()
        for a in self.mon.alerts():
            key = (a["name"], a["labels"].get("application", ""), a["labels"].get("deployment", ""))
            seen.add(key)
            old = self.alerts.get(key)
            self.alerts[key] = a
            if old is None or old["state"] != a["state"]:
                when = {"firing": a.get("fired_at"), "resolved": a.get("resolved_at")}.get(
                    a["state"]) or now
                print(f"   {self.t(when)}  alert {a['name']} on {key[1]}/{key[2]}: {a['state']}")
            episodes = self.episodes.setdefault(key, [])
            if a.get("fired_at") and (not episodes or episodes[-1][0] != a["fired_at"]):
                episodes.append([a["fired_at"], None])
            if a["state"] == "resolved" and episodes and episodes[-1][1] is None:
                episodes[-1][1] = a.get("resolved_at") or now
        for key in set(self.alerts) - seen:  # a pending alert that stopped matching is dropped
            if self.alerts.pop(key)["state"] == "pending":
                print(f"   {self.t(now)}  alert {key[0]} on {key[1]}/{key[2]}: dropped "
                      "(stopped matching before its `for`)")
        n = running_replicas()
        if not self.replicas or self.replicas[-1][1] != n:
            why = ""
            hint = next((h for h in self.mon.hints()
                         if h["application"] == APP and h["deployment"] == MODEL), None)
            if self.replicas and hint and hint.get("desired"):
                because = "; ".join(f"rule {r.get('name')}" if r.get("source") == "rule"
                                    else str(r.get("source")) for r in hint.get("reasons") or ())
                why = f" (ray-monitor's hint: {hint['desired']}, because of {because or hint['reason']})"
                self.reasons.add(because or str(hint["reason"]))
            elif self.replicas:
                why = " (the hint asks for nothing now: Serve's own decision)"
            print(f"   {self.t(now)}  {MODEL} replicas running: {n}{why}")
            self.replicas.append((now, n))

    def during(self, seconds: float, until=None) -> None:
        """Polls for ``seconds``; with ``until``, stops early once it returns True."""
        end = time.time() + seconds
        while time.time() < end:
            self.poll()
            if until is not None and until():
                return
            time.sleep(1.0)

    def settled(self) -> bool:
        firing = any(a["state"] in ("firing", "pending") for a in self.alerts.values())
        return not firing and bool(self.replicas) and self.replicas[-1][1] == 1


def summary(w: Watch, traffic: Traffic, phases: dict, mon) -> tuple[list[str], tuple]:
    """Prints the summary; returns the reasons for failure (none: success) and
    ``(alerts fired and resolved, replicas before, at peak, after)``."""
    print("\n== Summary (t+0 = first request)")
    c = traffic.counts
    print(f"requests: {c['ok'] + c['failed']} ({c['ok']} ok, {c['failed']} failed); "
          f"fault from {w.t(phases['fault'], 0)} to {w.t(phases['recover'], 0)}")
    print("alerts:")
    fired_and_resolved = 0
    for (name, app, dep), episodes in sorted(w.episodes.items(), key=lambda kv: kv[1][0][0]
                                              if kv[1] else 0):
        if not episodes:
            continue  # pending only: never fired
        text = "; ".join(f"fired {w.t(f, 0)}, " + (f"resolved {w.t(r, 0)}" if r else "still firing")
                         for f, r in episodes)
        fired_and_resolved += any(r for _, r in episodes)
        print(f"  {name:<16} {app}/{dep:<12} {text}")
    if not any(w.episodes.values()):
        print("  none fired")
    counts = [n for _, n in w.replicas]
    before = ([n for t, n in w.replicas if t <= phases["fault"]] or counts or [0])[-1]
    peak = max(counts, default=0)
    t_peak = next((t for t, n in w.replicas if n == peak), None)
    after = counts[-1] if counts else 0
    print(f"{MODEL} replicas: before {before}, at peak {peak}"
          + (f" ({w.t(t_peak, 0)})" if t_peak and peak > before else "")
          + f", after {after}" + (f"; scaled by {', '.join(sorted(w.reasons))}" if w.reasons else ""))
    print("\nDeployments over the last minute (as the monitor saw them):")
    print(deployments_table([d for d in mon.deployments() if d["application"] == APP]))
    endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    print("\nWhere to look:")
    print(f"  status page:  {mon.url}/")
    print(f"  Prometheus:   {mon.metrics_url}")
    print(f"  alerts API:   {mon.url}/api/v1/alerts   (and /api/v1/hints, /api/v1/deployments)")
    if endpoint:
        print(f"  traces:       sent over OTLP to {endpoint} (service.name {APP!r}); "
              "every failed or slow request is kept")
    else:
        print("  traces:       slow and failed ones kept by the monitor: the status page, "
              "`ray-monitor traces --errors` (with --keep); set OTEL_EXPORTER_OTLP_ENDPOINT "
              "(Jaeger, Tempo, Phoenix) to export them all")
    print("  logs:         /tmp/ray/session_latest/logs/serve/ (each line of a request "
          "carries its trace_id)")
    print("  (all of it stops when the demo exits; ./demo.sh --keep keeps it running)")
    problems = []
    if not fired_and_resolved:
        problems.append("no alert both fired and resolved")
    if peak <= before:
        problems.append(f"{MODEL} did not scale out (replicas stayed at {before})")
    return problems, (fired_and_resolved, before, peak, after)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--healthy-s", type=float, default=15, help="healthy phase (default 15)")
    ap.add_argument("--fault-s", type=float, default=30, help="fault phase (default 30)")
    ap.add_argument("--recover-max-s", type=float, default=60,
                    help="the longest to wait for alerts to resolve and replicas to come back")
    ap.add_argument("--port", type=int, default=8000, help="Serve's HTTP port (default 8000)")
    ap.add_argument("--monitor-port", type=int, default=8266, help="ray-monitor's (default 8266)")
    ap.add_argument("--keep", action="store_true",
                    help="after the summary, keep everything running (with light traffic) "
                    "until Ctrl-C, to look at the status page and the CLI")
    args = ap.parse_args(argv)
    try:
        X_train, X_test, *_ = iris()
    except ImportError:
        print("the demo needs scikit-learn: run ./demo.sh, or pip install -e '.[examples]'",
              file=sys.stderr)
        return 2

    # Serve's own tracing, exported through ray-monitor: one trace per request across
    # both deployments (exported only when an OTLP endpoint is set).
    os.environ.setdefault("RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH",
                          "ray_monitor.tracing:serve_span_processors")
    print("starting Ray, Ray Serve and ray-monitor ...", flush=True)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    traffic = None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        mon = ray_monitor.start(rules=RULES, port=args.monitor_port)
        switch = FaultSwitch.remote()
        serve.run(Preprocess.bind(Classifier.bind(switch)), name=APP, route_prefix="/classify")
        url = f"http://127.0.0.1:{args.port}/classify"
        print(f"serving {url} ({MODEL} trained on iris, {len(X_train)} rows); "
              f"ray-monitor at {mon.url}/ with {RULES.relative_to(REPO)}")

        traffic = Traffic(url, X_test)
        t0 = time.time()
        w = Watch(mon, t0)
        traffic.start()
        phases = {"healthy": t0}
        print(f"\n== healthy traffic, about 10 requests/s ({args.healthy_s:.0f}s)")
        w.during(args.healthy_s)
        ray.get(switch.set.remote(0.3, 0.2))
        phases["fault"] = time.time()
        print(f"\n== fault injected into {MODEL}: 30% errors, up to 400 ms latency "
              f"({args.fault_s:.0f}s)")
        w.during(args.fault_s)
        ray.get(switch.set.remote(0.0, 0.0))
        phases["recover"] = time.time()
        print(f"\n== healthy again, until the alerts resolve and {MODEL} is back to 1 replica "
              f"(at most {args.recover_max_s:.0f}s)")
        w.during(args.recover_max_s, until=w.settled)
        problems, (resolved, before, peak, after) = summary(w, traffic, phases, mon)
        if args.keep:
            print("\nstill running, Ctrl-C to stop; e.g. .venv/bin/ray-monitor status --address "
                  f"{ray.get_runtime_context().gcs_address}")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        if problems:
            print("\nFAILED: " + "; ".join(problems), file=sys.stderr)
            return 1
        print(f"\nOK: {resolved} alert(s) fired and resolved; {MODEL} scaled out "
              f"{before} -> {peak} -> {after} replicas")
        return 0
    finally:
        if traffic is not None:
            traffic.stop()
        print("stopping ...", flush=True)
        # The cluster is this process's own: shutting it down stops Serve and the monitor
        # with it (serve.shutdown() first would only add retry warnings to the console).
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
