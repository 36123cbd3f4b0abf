"""Model quality from late ground truth: a scikit-learn classifier served with
``@monitor(prediction=...)``, its accuracy and label coverage read back from the monitor.

    .venv/bin/python examples/sklearn_classifier.py [--requests 171] [--labelled 0.7]

Needs scikit-learn (the ``examples`` extra: ``pip install -e '.[examples]'``; ``./demo.sh``
installs it); the data set (breast cancer, Wisconsin) ships with scikit-learn, so
nothing is downloaded. It starts a local Ray, trains a logistic regression in each
replica at start-up, serves it over HTTP, sends the held-out rows, sends the true labels
of part of them later (by the ``X-Request-ID`` Ray Serve returned), and prints the
accuracy and label coverage the monitor computed next to the accuracy computed here
from the same labels. It also uploads the training data as the drift reference of three
input features and prints their PSI. About 20 s in all; exits 0 when the two
accuracies agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from typing import Any

from ray import serve

from ray_monitor import monitor

try:  # imported as examples.NAME (the tests) or run as a script (examples/ on sys.path)
    from examples._local import local_cluster
except ImportError:
    from _local import local_cluster

APP, MODEL_VERSION = "cancer", "logreg-1"
LABELS = ("malignant", "benign")  # scikit-learn's target 0 and 1
#: Inputs kept with each prediction for drift; the rest of the payload is never kept.
WATCHED = ("mean_radius", "mean_texture", "mean_smoothness")


def load_data(test_size: float = 0.3, seed: int = 0):
    """``(X_train, X_test, y_train, y_test, feature names)``; names as identifiers."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    names = [n.replace(" ", "_") for n in data.feature_names]
    X_train, X_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=test_size, random_state=seed, stratify=data.target)
    return X_train, X_test, y_train, y_test, names


def extract(result: dict, args: tuple, kwargs: dict) -> dict:
    """The prediction the monitor keeps: the class, the score of the positive class
    (malignant), and the watched inputs for drift."""
    features = args[0]
    return {"label": result["label"], "score": result["probability_malignant"],
            "features": {k: features[k] for k in WATCHED if k in features}}


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor(model_version=MODEL_VERSION, prediction=extract, prediction_input=True,
         prediction_methods=("predict",), positive_label="malignant")
class CancerClassifier:
    def __init__(self) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        X_train, _, y_train, _, self.names = load_data()
        self.model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        self.model.fit(X_train, y_train)

    def predict(self, features: dict) -> dict:
        row = [[float(features[n]) for n in self.names]]
        p = self.model.predict_proba(row)[0]
        return {"label": LABELS[int(p.argmax())], "probability_malignant": round(float(p[0]), 3)}

    async def __call__(self, request) -> dict:
        return self.predict((await request.json())["features"])


def post(url: str, body: Any) -> tuple[dict, Any]:
    """JSON over HTTP: ``(response body, response headers)`` (case-insensitive)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read()), resp.headers


def run(mon, base_url: str, *, app: str = APP, requests: int = 171, labelled: float = 0.7,
        timeout_s: float = 30.0) -> int:
    """Deploys the classifier as ``app`` on the running Serve (HTTP at ``base_url``), sends
    held-out rows, sends part of the true labels back, prints the monitor's figures; 0
    when its accuracy is the one computed here from the same labels."""
    serve.run(CancerClassifier.bind(), name=app, route_prefix=f"/{app}")
    X_train, X_test, _, y_test, names = load_data()
    mon.set_drift_reference(app, "CancerClassifier", {
        f"feature_{n}": X_train[:, names.index(n)].tolist() for n in WATCHED},
        model_version=MODEL_VERSION)

    sent = []
    for i in range(min(requests, len(X_test))):
        body, headers = post(f"{base_url}/{app}", {"features": dict(zip(names, X_test[i].tolist()))})
        sent.append((headers["X-Request-ID"], body["label"], LABELS[y_test[i]]))
    print(f"sent {len(sent)} requests to {app}/CancerClassifier ({MODEL_VERSION})")

    # Ground truth arrives later, for part of the requests only.
    labelled_rows = sent[:round(len(sent) * labelled)]
    deadline = time.monotonic() + timeout_s
    while sum(m["predictions"] for m in mon.quality() if m["application"] == app) < len(sent):
        if time.monotonic() > deadline:
            print(f"the monitor did not receive the {len(sent)} predictions in {timeout_s:.0f} s",
                  file=sys.stderr)
            return 1
        time.sleep(0.5)
    result = mon.record_feedback([{"request_id": rid, "label": truth}
                                  for rid, _, truth in labelled_rows])
    print(f"feedback for {len(labelled_rows)} of them: {result['counts']}")

    model = next(m for m in mon.quality() if m["application"] == app)
    q = model["quality"]
    here = sum(pred == truth for _, pred, truth in labelled_rows) / len(labelled_rows)
    print(f"accuracy (monitor): {q['accuracy']:.4f}   accuracy (computed here): {here:.4f}")
    print(f"label coverage: {q['label_coverage']:.2f}   f1 (macro): {q['f1']:.4f}   "
          f"roc auc: {q['roc_auc']:.4f}   labelled: {q['labeled']:.0f}")
    for metric, d in sorted(model["drift"].items()):
        psi = "-" if d["psi"] is None else f"{d['psi']:.3f}"
        print(f"drift of {metric} against the training data: psi {psi} over {d['n']} requests")
    print(f"metrics: {mon.metrics_url} (ray_monitor_model_accuracy_ratio, ...)")
    return 0 if abs(q["accuracy"] - here) < 1e-9 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=171, help="held-out rows to send (max 171)")
    parser.add_argument("--labelled", type=float, default=0.7,
                        help="share of them whose true label is sent back (default 0.7)")
    args = parser.parse_args(argv)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("this example needs scikit-learn: pip install -e '.[examples]'", file=sys.stderr)
        return 2
    with local_cluster(gpu=False, feedback_horizon_s=600) as (mon, url):
        return run(mon, url, requests=args.requests, labelled=args.labelled)


if __name__ == "__main__":
    sys.exit(main())
