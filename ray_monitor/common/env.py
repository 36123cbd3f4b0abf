"""Every environment variable ray-monitor reads, named once, with one rule for bad values.

Imported by every process; each variable is read where it matters (a replica reads its
own when it starts, so one image can be tuned per cluster). The rule, as OpenTelemetry's
SDK has it: an argument passed in code wins; an unset variable gives the default; a bad
value is logged once, naming the variable and what it expects, and the default is used.
Nothing here raises: a typo in a cluster's environment must not take replicas down.

The ``OTEL_*`` variables are OpenTelemetry's own; they are listed here because the
monitor decides from them whether an OTLP endpoint is set.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generic, Mapping, Optional, TypeVar

__all__ = ["ALL", "EnvVar", "count", "flag", "positive_seconds", "port", "ratio",
           "reset_warnings", "text", "url"]

logger = logging.getLogger("ray_monitor.env")
T = TypeVar("T")

_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def _warn_once(name: str, raw: str, expects: str, default: Any) -> None:
    with _warned_lock:
        if (name, raw) in _warned:
            return
        _warned.add((name, raw))
    logger.warning("ray-monitor: ignoring %s=%r (expected %s); using %r", name, raw[:200],
                   expects, default)


def reset_warnings() -> None:
    """Forget which bad values were logged (tests)."""
    with _warned_lock:
        _warned.clear()


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    """One variable: its name, its default, how its text becomes a value (``parse`` raises
    ``ValueError`` on a bad one), what it expects (for the log line) and what it does."""

    name: str
    default: T
    parse: Callable[[str], T]
    expects: str
    doc: str

    def get(self, environ: Optional[Mapping[str, str]] = None) -> T:
        """The value, or the default when unset, empty or bad (bad: logged once)."""
        raw = (os.environ if environ is None else environ).get(self.name)
        if raw is None or raw.strip() == "":
            return self.default
        try:
            return self.parse(raw.strip())
        except (TypeError, ValueError):
            _warn_once(self.name, raw, self.expects, self.default)
            return self.default

    def is_set(self, environ: Optional[Mapping[str, str]] = None) -> bool:
        return bool(((os.environ if environ is None else environ).get(self.name) or "").strip())


# -- parsers: each raises ValueError on a bad value ------------------------------------


def ratio(raw: str) -> float:
    v = float(raw)
    if not 0.0 <= v <= 1.0:
        raise ValueError(raw)
    return v


def positive_seconds(raw: str) -> float:
    v = float(raw)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(raw)
    return v


def port(raw: str) -> int:
    v = int(raw)
    if not 0 <= v <= 65535:
        raise ValueError(raw)
    return v


def flag(raw: str) -> bool:
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def count(raw: str) -> int:
    v = int(raw)
    if v < 1:
        raise ValueError(raw)
    return v


def text(raw: str) -> str:
    return raw


def url(raw: str) -> str:
    if not raw.startswith(("http://", "https://")) or len(raw) < 10:
        raise ValueError(raw)
    return raw


def _lower(raw: str) -> str:
    return raw.lower()


def _millis(raw: str) -> float:
    v = float(raw)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(raw)
    return v


# -- ray-monitor's own -------------------------------------------------------------------

SAMPLE_RATIO = EnvVar("RAY_MONITOR_SAMPLE_RATIO", 0.1, ratio, "a number from 0 to 1",
                      "@monitor(sample_ratio=...) when not passed: head sampling of traces")
SLOW_THRESHOLD_S = EnvVar("RAY_MONITOR_SLOW_THRESHOLD_S", 1.0, positive_seconds,
                          "seconds above 0", "@monitor(slow_threshold_s=...) when not passed")
FLUSH_INTERVAL_S = EnvVar("RAY_MONITOR_FLUSH_INTERVAL_S", 1.0, positive_seconds,
                          "seconds above 0", "@monitor(flush_interval_s=...) when not passed")
HANG_THRESHOLD_S = EnvVar("RAY_MONITOR_HANG_THRESHOLD_S", 60.0, positive_seconds,
                          "seconds above 0", "@monitor(hang_threshold_s=...) when not passed")
TRACES = EnvVar("RAY_MONITOR_TRACES", True, flag, "1 or 0",
                "replicas send the traces of slow and failed requests to the aggregator")
TRACE_HOLD_SPANS = EnvVar("RAY_MONITOR_TRACE_HOLD_SPANS", 4096, count, "a whole number >= 1",
                          "spans a replica holds until it knows their request is not kept")
NODE_SOCKET = EnvVar("RAY_MONITOR_NODE_SOCKET", True, flag, "1 or 0",
                     "replicas deliver to their node's merger over its Unix socket (0: by "
                     "Ray actor call, as when the socket is absent)")
HOST = EnvVar("RAY_MONITOR_HOST", "127.0.0.1", text, "an address",
              "ray_monitor.start(host=...) when not passed")
PORT = EnvVar("RAY_MONITOR_PORT", 8266, port, "a port from 0 to 65535",
              "ray_monitor.start(port=...) when not passed")
TOKEN = EnvVar("RAY_MONITOR_TOKEN", None, text, "a token",
               "ray_monitor.start(token=...) when not passed; the CLI sends it too")
ALERTMANAGER_URL = EnvVar("RAY_MONITOR_ALERTMANAGER_URL", None, url, "an http(s) URL",
                          "one Alertmanager when notifications name none")
WEBHOOK_URL = EnvVar("RAY_MONITOR_WEBHOOK_URL", None, url, "an http(s) URL",
                     "one webhook when notifications name none")
SLACK_WEBHOOK_URL = EnvVar("RAY_MONITOR_SLACK_WEBHOOK_URL", None, url, "an http(s) URL",
                           "one Slack incoming webhook when notifications name none")

# -- Ray's and OpenTelemetry's, as the monitor reads them ---------------------------------

RAY_ADDRESS = EnvVar("RAY_ADDRESS", None, text, "a Ray address",
                     "the cluster that start(), connect() and the CLI attach to")
OTEL_SDK_DISABLED = EnvVar("OTEL_SDK_DISABLED", False, flag, "true or false",
                           "no OTLP export at all")
OTEL_TRACES_EXPORTER = EnvVar("OTEL_TRACES_EXPORTER", "otlp", _lower, "otlp or none",
                              "none: no span export over OTLP")
OTEL_METRICS_EXPORTER = EnvVar("OTEL_METRICS_EXPORTER", "otlp", _lower, "otlp or none",
                               "none: no metric export over OTLP")
OTLP_ENDPOINT = EnvVar("OTEL_EXPORTER_OTLP_ENDPOINT", None, text, "a URL",
                       "where OTLP traces and metrics go")
OTLP_TRACES_ENDPOINT = EnvVar("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None, text, "a URL",
                              "where OTLP traces go (overrides OTEL_EXPORTER_OTLP_ENDPOINT)")
OTLP_METRICS_ENDPOINT = EnvVar("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", None, text, "a URL",
                               "where OTLP metrics go (overrides OTEL_EXPORTER_OTLP_ENDPOINT)")
OTLP_PROTOCOL = EnvVar("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf", _lower,
                       "grpc or http/protobuf", "the OTLP transport")
OTLP_TRACES_PROTOCOL = EnvVar("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", None, _lower,
                              "grpc or http/protobuf", "the OTLP transport of traces")
OTLP_METRICS_PROTOCOL = EnvVar("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", None, _lower,
                               "grpc or http/protobuf", "the OTLP transport of metrics")
OTLP_TIMEOUT = EnvVar("OTEL_EXPORTER_OTLP_TIMEOUT", None, text, "a timeout",
                      "the OTLP exporters' timeout (read by the SDK; when unset, OTLP metrics "
                      "use the shorter of 10 s and the export interval)")
OTLP_METRICS_TIMEOUT = EnvVar("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", None, text, "a timeout",
                              "the OTLP metric exporter's timeout (read by the SDK)")
OTEL_METRIC_EXPORT_INTERVAL = EnvVar("OTEL_METRIC_EXPORT_INTERVAL", 60000.0, _millis,
                                     "milliseconds above 0", "how often OTLP metrics are sent")
OTEL_SERVICE_NAME = EnvVar("OTEL_SERVICE_NAME", None, text, "a name",
                           "service.name of spans and metrics (default: the application)")

#: Every variable, for the README's table and its test.
ALL: tuple[EnvVar, ...] = tuple(v for v in globals().values() if isinstance(v, EnvVar))
