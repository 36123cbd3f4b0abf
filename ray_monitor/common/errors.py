"""Every error ray-monitor raises to its callers, drawn in one place (as httpx's
``_exceptions.py``) so that callers catch at the level they mean.

Imported by every process. The tree::

    RayMonitorError
    ├── ConfigError        a rule file, an ``autoscaling:`` or ``notifications:`` section,
    │                      a ``start()`` or ``@monitor`` option that cannot be used; carries
    │                      every :class:`Problem` found, not only the first
    ├── BadRequest         an HTTP request or API argument that is malformed (answered 400)
    └── MonitorNotRunning  no aggregator runs in this cluster

``ConfigError`` and ``BadRequest`` are also ``ValueError`` (and ``ConfigError`` a
``TypeError``), so code written against the built-in exceptions keeps working.
Nothing on the request path raises any of these into user code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

__all__ = ["BadRequest", "ConfigError", "MonitorNotRunning", "Problem", "RayMonitorError"]


class RayMonitorError(Exception):
    """The base of every error ray-monitor raises."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a configuration: where (``file``; the ``group`` and ``rule`` of a
    rule file, or the ``deployment`` of an ``autoscaling:`` entry), which ``field`` (its
    path, like ``autoscaling.deployments[0].max_replicas``), and what to do about it.

    ``file`` is the file name, or the call that took the value (``ray_monitor.start()``,
    ``@monitor``) when there is no file.
    """

    file: str
    group: Optional[str] = None
    rule: Optional[str] = None
    field: Optional[str] = None
    message: str = ""
    deployment: Optional[str] = None

    def __str__(self) -> str:
        if self.field is not None and (self.file.startswith("@") or self.file.endswith("()")):
            # An option of a call reads as the call: "@monitor(sample_ratio=...): ..."
            return f"{self.file.removesuffix('()')}({self.field}=...): {self.message}"

        def name(kind: str, v: str) -> str:
            return f"{kind} {v}" if v.startswith("#") else f"{kind} {v!r}"  # "#2": the 2nd, unnamed

        place = [name(k, v) for k, v in (("group", self.group), ("rule", self.rule),
                                         ("deployment", self.deployment)) if v is not None]
        parts = [self.file] + ([", ".join(place)] if place else [])
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        return ": ".join(parts + [self.message])


#: Longest message a ConfigError carries: a hostile file cannot make a huge error.
MAX_MESSAGE_CHARS = 8192
#: Problems listed in an HTTP answer (all are counted), and the longest value in each.
MAX_PROBLEMS_SHOWN = 100
MAX_FIELD_CHARS = 1000


class ConfigError(RayMonitorError, ValueError, TypeError):
    """A configuration that cannot be used; ``problems`` holds every problem found.

    ``file``, ``group``, ``rule``, ``deployment`` and ``field`` are those of the first
    problem, for callers that show one.
    """

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        if not self.problems:
            raise ValueError("ConfigError needs at least one problem")
        first = self.problems[0]
        self.file, self.group, self.rule = first.file, first.group, first.rule
        self.field, self.deployment = first.field, first.deployment
        if len(self.problems) == 1:
            text = str(first)
        else:
            text = f"{len(self.problems)} problems in {first.file}:\n" + "\n".join(
                f"  - {p}" for p in self.problems)
        if len(text) > MAX_MESSAGE_CHARS:
            text = text[:MAX_MESSAGE_CHARS] + f"... ({len(self.problems)} problems in all)"
        super().__init__(text)

    @classmethod
    def one(cls, file: str, field: Optional[str], message: str, **where) -> "ConfigError":
        """A ConfigError with a single problem."""
        return cls([Problem(file, field=field, message=message, **where)])

    def as_dicts(self, limit: int = MAX_PROBLEMS_SHOWN) -> list[dict]:
        """The first ``limit`` problems as JSON-ready dicts, for HTTP answers and ``--json``;
        each value cut to MAX_FIELD_CHARS (a hostile file cannot make a huge answer)."""
        return [{k: v if not isinstance(v, str) or len(v) <= MAX_FIELD_CHARS
                 else v[:MAX_FIELD_CHARS] + "..."
                 for k, v in (("file", p.file), ("group", p.group), ("rule", p.rule),
                              ("deployment", p.deployment), ("field", p.field),
                              ("message", p.message)) if v is not None}
                for p in self.problems[:limit]]


class BadRequest(RayMonitorError, ValueError):
    """A request the HTTP API or a ``Monitor`` method cannot answer; the message names the
    field and the fix. ``status`` is the HTTP status it is answered with."""

    def __init__(self, message: str, *, field: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.field = field
        self.status = status


class MonitorNotRunning(RayMonitorError, RuntimeError):
    """No aggregator is running in this cluster."""
