"""Model quality on a real cluster: the scikit-learn example served over HTTP, ground truth
sent later by X-Request-ID (over HTTP and from Python), accuracy and coverage read back and
checked against the same labels, then inputs shifted until the drift alert fires."""

from __future__ import annotations

import threading
import uuid

import pytest
import requests
from ray import serve

import ray_monitor
from examples.sklearn_classifier import LABELS, MODEL_VERSION, WATCHED, CancerClassifier, load_data
from tests.conftest import wait_until

pytestmark = pytest.mark.ray


def model(mon, app: str, window_s: float = 600.0):
    return next((m for m in mon.quality(window_s) if m["application"] == app), None)


def send(url: str, features: dict) -> tuple[str, str]:
    r = requests.post(url, json={"features": features}, timeout=30)
    r.raise_for_status()
    return r.headers["X-Request-ID"], r.json()["label"]


def test_accuracy_and_coverage_from_late_feedback_then_drift_fires(mon, serve_http, serve_apps):
    app = f"q{uuid.uuid4().hex[:8]}"
    serve_apps.append(app)
    serve.run(CancerClassifier.bind(), name=app, route_prefix=f"/{app}")
    X_train, X_test, _, y_test, names = load_data()
    url = f"{serve_http}/{app}"
    # the drift reference is the training data, uploaded over HTTP
    ref = requests.post(f"{mon.url}/api/v1/drift/reference", timeout=30, json={
        "application": app, "deployment": "CancerClassifier", "model_version": MODEL_VERSION,
        "references": {f"feature_{n}": X_train[:, names.index(n)].tolist() for n in WATCHED}})
    assert ref.status_code == 200, ref.text
    assert set(ref.json()["data"]) == {f"feature_{n}" for n in WATCHED}

    sent = [send(url, dict(zip(names, X_test[i].tolist()))) + (LABELS[y_test[i]],)
            for i in range(120)]
    assert len({rid for rid, _, _ in sent}) == 120
    wait_until(lambda: (m := model(mon, app)) and m["predictions"] == 120, timeout=60,
               what="120 predictions at the aggregator")

    # Labels for 90 of the 120: a batch over HTTP (with one bad item and one duplicate),
    # a single object over HTTP, a batch and a single call from Python.
    http_batch = [{"request_id": rid, "label": truth} for rid, _, truth in sent[:40]]
    http_batch += [{"request_id": sent[0][0], "label": sent[0][2]}, {"label": "benign"}]
    r = requests.post(f"{mon.url}/api/v1/feedback", json=http_batch, timeout=30)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["counts"] == {"joined": 40, "duplicate": 1, "invalid": 1}
    assert {p["status"]: p["index"] for p in data["problems"]} == {"duplicate": 40, "invalid": 41}
    one = requests.post(f"{mon.url}/api/v1/feedback", timeout=30,
                        json={"request_id": sent[40][0], "label": sent[40][2]})
    assert one.json()["data"]["counts"] == {"joined": 1}
    res = ray_monitor.record_feedback([{"request_id": rid, "label": truth}
                                       for rid, _, truth in sent[41:89]])
    assert res == {"counts": {"joined": 48}, "problems": []}
    assert ray_monitor.record_feedback(sent[89][0], sent[89][2])["counts"] == {"joined": 1}

    labelled = sent[:90]
    expected = sum(pred == truth for _, pred, truth in labelled) / len(labelled)
    m = wait_until(lambda: (m := model(mon, app)) and m["quality"].get("labeled") == 90 and m,
                   timeout=30, what="90 labelled predictions")
    assert m["model_version"] == MODEL_VERSION and m["deployment"] == "CancerClassifier"
    assert m["quality"]["accuracy"] == pytest.approx(expected)
    assert m["quality"]["label_coverage"] == pytest.approx(90 / 120)
    print(f"accuracy {m['quality']['accuracy']:.4f} (expected {expected:.4f}), "
          f"coverage {m['quality']['label_coverage']:.2f}, roc auc {m['quality']['roc_auc']:.4f}")
    # the same figures through a rule query and on /metrics
    by_app = mon.query("accuracy", "predictions", 600.0, by=("application",))
    assert by_app[f'{{"application": "{app}"}}'] == pytest.approx(expected)
    metrics = requests.get(mon.metrics_url, timeout=30).text
    assert f'ray_monitor_model_label_coverage_ratio{{application="{app}"' in metrics
    calm = m["drift"]["feature_mean_radius"]["psi"]

    # Inputs drift: mean_radius grows by half. The drift alert fires.
    mon.reload(f"""
groups:
  - name: drift
    interval: 1s
    rules:
      - alert: InputDrift
        expr: psi(feature_mean_radius{{application="{app}"}}[15s]) by (application, deployment) > 0.5
        labels: {{severity: ticket}}
""")
    stop = threading.Event()

    def shifted_traffic():
        i = 0
        while not stop.is_set():
            row = dict(zip(names, X_test[i % len(X_test)].tolist()))
            row["mean_radius"] *= 1.5
            send(url, row)
            i += 1
    t = threading.Thread(target=shifted_traffic, daemon=True)
    t.start()
    try:
        firing = wait_until(lambda: next((a for a in mon.alerts() if a["name"] == "InputDrift"
                                          and a["state"] == "firing"), None),
                            timeout=90, what="InputDrift firing")
    finally:
        stop.set()
        t.join(30)
        mon.reload({"groups": []})
    assert firing["labels"] == {"alertname": "InputDrift", "application": app,
                                "deployment": "CancerClassifier", "severity": "ticket"}
    assert firing["value"] > 0.5 > calm
    print(f"psi of mean_radius: {calm:.3f} before the shift, {firing['value']:.3f} after")
