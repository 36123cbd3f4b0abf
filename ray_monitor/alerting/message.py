"""An alert as notifiers send it: the shape of Alertmanager's ``POST /api/v2/alerts``.

Made and sent in the aggregator: the rule engine produces these; notifiers turn them
into Alertmanager, webhook (payload version "4"), Slack and email messages. Times are
Unix seconds; fingerprints are Alertmanager's, so both name an alert alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal, Optional

__all__ = ["AlertMessage", "fingerprint", "rfc3339"]

_FNV_OFFSET = 14695981039346656037
_FNV_PRIME = 1099511628211
_SEP = 0xFF  # Prometheus' label separator byte


def fingerprint(labels: dict[str, str]) -> str:
    """Alertmanager's fingerprint of a label set: FNV-1a 64 over sorted name/value pairs.

    Same algorithm as ``model.LabelSet.Fingerprint`` in prometheus/common, so the
    fingerprints in our webhook payloads match the ones Alertmanager shows.
    """
    h = _FNV_OFFSET
    for name in sorted(labels):
        for part in (name.encode(), labels[name].encode()):
            for byte in part:
                h ^= byte
                h = (h * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
            h ^= _SEP
            h = (h * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def rfc3339(ts: Optional[float]) -> str:
    if ts is None:
        return "0001-01-01T00:00:00Z"  # Go's zero time, what Alertmanager uses for "unset"
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class AlertMessage:
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: float
    ends_at: Optional[float]  # firing: now + 4 x max(interval, resend_delay); resolved: when
    status: Literal["firing", "resolved"]
    generator_url: str = ""
    value: Optional[float] = None  # the expression's value at the last evaluation
    extra: dict = field(default_factory=dict)  # e.g. hung-request stacks, for our own API

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "")

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.labels)

    def to_alertmanager(self) -> dict:
        """One element of the JSON array for ``POST /api/v2/alerts``."""
        out = {"labels": dict(self.labels), "annotations": dict(self.annotations),
               "startsAt": rfc3339(self.starts_at), "generatorURL": self.generator_url}
        if self.ends_at is not None:
            out["endsAt"] = rfc3339(self.ends_at)
        return out
