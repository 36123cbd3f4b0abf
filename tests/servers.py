"""Real Prometheus and Alertmanager servers on loopback, for end-to-end tests.

Uses Debian's packages (``prometheus``, ``prometheus-alertmanager``). A missing binary
skips the test, except under ``CI=true``, where the set-up installs them and a skip would
hide a broken environment.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import pytest

PROMETHEUS = "/usr/bin/prometheus"
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"  # Debian's name for alertmanager
PROMTOOL = "/usr/bin/promtool"
AMTOOL = "/usr/bin/amtool"

READY_TIMEOUT_S = 30.0

DEFAULT_ALERTMANAGER_CONFIG = """\
route:
  receiver: blackhole
receivers:
  - name: blackhole
"""


def require_binary(path: str) -> str:
    """The binary's path; skip the test when it is missing (fail under CI=true)."""
    found = path if os.access(path, os.X_OK) else shutil.which(os.path.basename(path))
    if found:
        return found
    reason = (f"{path} not found; install Debian's prometheus / prometheus-alertmanager "
              f"packages to run end-to-end tests")
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " (CI=true: CI must install them)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


@dataclass
class Server:
    """A server process on loopback; ``stop()`` always kills it."""

    name: str
    url: str
    proc: subprocess.Popen
    log_path: Path
    _log_file: object = field(repr=False, default=None)

    def log_tail(self, lines: int = 30) -> str:
        return _tail(self.log_path, lines)

    def get_json(self, path: str) -> object:
        try:
            return json.loads(_get(self.url + path))
        except OSError as e:
            raise AssertionError(
                f"{self.name}: GET {path} failed: {e}\n--- log tail ---\n{self.log_tail()}") from e

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Alertmanager(Server):
    def api_alerts(self, **filters: str) -> list[dict]:
        """``GET /api/v2/alerts`` parsed (active, unsilenced alerts by default)."""
        query = f"?{urllib.parse.urlencode(filters)}" if filters else ""
        return self.get_json("/api/v2/alerts" + query)


class Prometheus(Server):
    config_path: Optional[Path] = None
    config: Optional[dict] = None

    def query(self, expr: str) -> list[dict]:
        """The ``result`` of an instant query."""
        body = self.get_json("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        return body["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        """The ``result`` of a range query (a matrix: ``values`` of ``[t, "v"]``)."""
        body = self.get_json("/api/v1/query_range?" + urllib.parse.urlencode(
            {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}))
        return body["data"]["result"]

    def alerts(self) -> list[dict]:
        """``GET /api/v1/alerts``: pending and firing alerts with ``activeAt`` and value."""
        return self.get_json("/api/v1/alerts")["data"]["alerts"]

    def load_rule_files(self, rule_files: Sequence[str | Path], timeout: float = 30.0) -> None:
        """Rewrites the config with these rule files and reloads it (SIGHUP), so rules can
        start once the first scrapes are in; returns when the rules API lists them."""
        import signal

        self.config["rule_files"] = [str(Path(f).resolve()) for f in rule_files]
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.get_json("/api/v1/rules")["data"]["groups"] or not rule_files:
                return
            time.sleep(0.1)
        raise AssertionError(f"prometheus did not load {rule_files}\n{self.log_tail()}")

    def targets(self) -> list[dict]:
        """Active scrape targets, with ``health`` and ``lastError``."""
        return self.get_json("/api/v1/targets")["data"]["activeTargets"]


def _launch(cls, name: str, argv: list[str], port: int, log_path: Path) -> Server:
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    server = cls(name=name, url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path,
                 _log_file=log_file)
    deadline = time.monotonic() + READY_TIMEOUT_S
    last_error: Optional[Exception] = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            server.stop()
            raise RuntimeError(f"{name} exited with {proc.returncode} before it was ready\n"
                               f"argv: {argv}\n--- log tail ---\n{_tail(log_path)}")
        try:
            _get(server.url + "/-/ready", timeout=1.0)
            return server
        except OSError as e:  # not listening yet, or 503 while starting
            last_error = e
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{name} not ready within {READY_TIMEOUT_S}s ({last_error})\n"
                       f"argv: {argv}\n--- log tail ---\n{_tail(log_path)}")


def start_alertmanager(tmp_path: Path, config_text: Optional[str] = None) -> Alertmanager:
    """A real Alertmanager on a free loopback port, no clustering, storage in tmp_path."""
    binary = require_binary(ALERTMANAGER)
    base = Path(tmp_path) / f"alertmanager-{free_port()}"
    base.mkdir(parents=True)
    config = base / "alertmanager.yml"
    config.write_text(config_text or DEFAULT_ALERTMANAGER_CONFIG)
    port = free_port()
    argv = [binary, f"--config.file={config}", f"--storage.path={base / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
            f"--web.external-url=http://127.0.0.1:{port}", "--log.level=info"]
    return _launch(Alertmanager, "alertmanager", argv, port, base / "alertmanager.log")


def start_prometheus(tmp_path: Path, scrape_targets: Sequence[str] = (),
                     rule_files: Sequence[str | Path] = (), scrape_interval: str = "1s",
                     evaluation_interval: str = "1s",
                     alertmanager_url: Optional[str] = None,
                     resend_delay: str = "1s") -> Prometheus:
    """A real Prometheus scraping ``host:port`` targets (job ``ray-monitor``) on loopback.

    With ``alertmanager_url`` it sends its alerts there, re-sending firing ones every
    ``resend_delay`` (Prometheus' default, 1m, would make a test wait: its first send
    can happen before it has discovered the Alertmanager, and is then dropped).
    """
    binary = require_binary(PROMETHEUS)
    base = Path(tmp_path) / f"prometheus-{free_port()}"
    base.mkdir(parents=True)
    config: dict = {
        "global": {"scrape_interval": scrape_interval,
                   "evaluation_interval": evaluation_interval},
        "rule_files": [str(Path(f).resolve()) for f in rule_files],
        "scrape_configs": [{"job_name": "ray-monitor",
                            "static_configs": [{"targets": list(scrape_targets)}]}],
    }
    if alertmanager_url:
        target = urllib.parse.urlsplit(alertmanager_url).netloc
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [target]}]}]}
    config_path = base / "prometheus.yml"
    config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    port = free_port()
    argv = [binary, f"--config.file={config_path}", f"--storage.tsdb.path={base / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", f"--rules.alert.resend-delay={resend_delay}",
            "--log.level=info"]
    prom = _launch(Prometheus, "prometheus", argv, port, base / "prometheus.log")
    prom.config_path, prom.config = config_path, config
    return prom


def promtool(*args: str, input: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run promtool; the result carries stdout and stderr as text."""
    return subprocess.run([require_binary(PROMTOOL), *map(str, args)], input=input,
                          capture_output=True, text=True, timeout=60)


def amtool(*args: str) -> subprocess.CompletedProcess:
    """Run amtool (e.g. ``amtool("check-config", path)``)."""
    return subprocess.run([require_binary(AMTOOL), *map(str, args)], capture_output=True,
                          text=True, timeout=60)
