"""The package's layout holds: where code runs decides what it may load, every module says
where it runs, and the import strings users write keep working."""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ray_monitor"

#: What a replica must never load: the aggregator's, alerting's and quality store's code.
NOT_IN_REPLICA = ("ray_monitor.aggregator", "ray_monitor.alerting", "ray_monitor.quality.store",
                  "ray_monitor.quality.feedback", "ray_monitor.quality.metrics",
                  "ray_monitor.quality.drift", "ray_monitor.quality.compare",
                  "ray_monitor.autoscaling.hints", "ray_monitor.autoscaling.config",
                  "ray_monitor.client.cli", "ray_monitor.gpu", "ray_monitor.node")
#: What a node merger must never load: it merges and forwards, nothing else (beyond
#: what ``import ray_monitor`` itself loads, which every process pays).
NOT_IN_NODE = ("ray_monitor.aggregator", "ray_monitor.alerting", "ray_monitor.quality",
               "ray_monitor.autoscaling", "ray_monitor.client", "ray_monitor.gpu",
               "ray_monitor.replica")
#: What the autoscaling policy (in Serve's controller) must never load.
NOT_IN_POLICY = ("ray_monitor.aggregator", "ray_monitor.alerting", "ray_monitor.quality.store",
                 "ray_monitor.autoscaling.hints", "ray_monitor.gpu")


def _loaded_after(code: str) -> list[str]:
    """The ray_monitor modules loaded in a fresh interpreter after running ``code``."""
    script = code + ("\nimport json, sys\n"
                     "print(json.dumps(sorted(m for m in sys.modules if m.startswith('ray_monitor'))))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                      "RAY_MONITOR_FLUSH_INTERVAL_S": "3600"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _offenders(loaded: list[str], banned: tuple[str, ...]) -> list[str]:
    return [m for m in loaded if any(m == b or m.startswith(b + ".") for b in banned)]


def test_a_monitored_replica_loads_nothing_of_the_aggregator():
    # What every replica does: import, decorate, build the class, serve a request.
    loaded = _loaded_after(
        "import ray_monitor\n"
        "@ray_monitor.monitor(prediction=lambda r: {'label': r})\n"
        "class Model:\n"
        "    def __call__(self, x):\n"
        "        return x\n"
        "m = Model()\n"
        "assert m('a') == 'a'\n")
    assert "ray_monitor.replica.recorder" in loaded  # the request really went through
    assert _offenders(loaded, NOT_IN_REPLICA) == []


def test_a_node_merger_loads_nothing_but_its_own_and_common_code():
    loaded = _loaded_after("from ray_monitor.node.actor import NodeMergerActor\n")
    assert "ray_monitor.node.merger" in loaded
    extra = sorted(set(loaded) - set(_loaded_after("import ray_monitor\n")))
    assert _offenders(extra, NOT_IN_NODE) == []
    assert _offenders(loaded, NOT_IN_REPLICA[:-1]) == []  # never the aggregator's code


def test_the_serve_policy_loads_nothing_of_the_aggregator():
    loaded = _loaded_after("from ray_monitor.autoscaling import MonitorPolicy\nMonitorPolicy()\n")
    assert _offenders(loaded, NOT_IN_POLICY) == []


@pytest.mark.parametrize("spec", ["ray_monitor.autoscaling:MonitorPolicy",
                                  "ray_monitor.autoscaling:monitor_policy",
                                  "ray_monitor.tracing:serve_span_processors",
                                  "ray_monitor.client.cli:main"])
def test_the_import_strings_users_write_resolve(spec):
    module, name = spec.split(":")
    assert callable(getattr(importlib.import_module(module), name))


def test_the_console_script_names_the_cli():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'ray-monitor = "ray_monitor.client.cli:main"' in text


def test_the_public_surface_is_what_the_readme_documents():
    import ray_monitor

    readme = (ROOT / "README.md").read_text()
    line = re.search(r"^Public names[^:]*:(.*?)Import\s+strings", readme, re.M | re.S)
    assert line, "README.md lists the public names on a line starting 'Public names'"
    documented = set(re.findall(r"`([A-Za-z_]+)`", line.group(1)))
    assert set(ray_monitor.__all__) == documented
    for name in ray_monitor.__all__:
        assert hasattr(ray_monitor, name), name


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_opens_by_saying_what_it_is_and_names_its_surface(path):
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), f"{path}: open with a docstring: where it runs, what it decides"
    if path.name == "__init__.py" and len(tree.body) == 1:
        return  # a subpackage that only says where its modules run
    names = [t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
             for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
             if isinstance(t, ast.Name)]
    assert "__all__" in names, f"{path}: state the public surface in __all__"
    module = importlib.import_module(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"))
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert missing == [], f"{path}: __all__ names what the module lacks: {missing}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_holds_several_concepts_worth_of_lines(path):
    assert len(path.read_text().splitlines()) <= 620, f"{path}: split it by concept"
