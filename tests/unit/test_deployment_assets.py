"""The Serve config for the demo app is one Ray Serve accepts, and it builds the app."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_serve_config_is_valid_and_builds_the_demo_app(monkeypatch):
    from ray.serve._private.utils import import_attr
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema(**yaml.safe_load((REPO / "deployments/serve-demo.yaml").read_text()))
    [app] = config.applications
    assert app.import_path == "examples.demo:serve_app"
    monkeypatch.syspath_prepend(str(REPO))
    built = import_attr(app.import_path)(app.args)
    assert isinstance(built, Application)
    assert {d.name for d in app.deployments} <= {"Classifier", "Preprocess"}
