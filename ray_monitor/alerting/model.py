"""The rules a rule file holds, once checked: what the engine runs and the exporter writes.

Built where a rule file is read (:mod:`~ray_monitor.alerting.loader`, in the CLI, the
driver and the aggregator) and run in the aggregator. Values here are checked already:
past the reader, nothing validates them again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

from ray_monitor.alerting.expr import Condition
from ray_monitor.alerting.templates import Template

__all__ = ["AlertRule", "RuleGroup", "RuleSet", "ScaleAction"]


@dataclass(frozen=True)
class ScaleAction:
    """What a firing alert asks the autoscaler for: ``step`` more replicas, or ``factor`` times."""

    deployment: Template
    step: Optional[int] = None
    factor: Optional[float] = None
    cooldown_s: Optional[float] = None

    def render(self, value: float, labels: Mapping[str, str]) -> dict:
        return {"deployment": self.deployment.render(value, labels), "step": self.step,
                "factor": self.factor, "cooldown_s": self.cooldown_s}


@dataclass(frozen=True)
class AlertRule:
    """One alert: its conditions, how long they must hold, and what it carries when it fires."""

    name: str
    expr: str  # canonical text of ``conditions``: two rules with the same expr are the same query
    conditions: tuple[Condition, ...]
    for_s: float = 0.0
    keep_firing_for_s: float = 0.0
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, Template] = field(default_factory=dict)
    scale: Optional[ScaleAction] = None
    slo: Optional[str] = None  # the ``slo:`` entry this rule was expanded from

    @property
    def by(self) -> Optional[tuple[str, ...]]:
        return self.conditions[0].query.by


@dataclass(frozen=True)
class RuleGroup:
    """Rules evaluated together, every ``interval_s``."""

    name: str
    rules: tuple[AlertRule, ...]
    interval_s: Optional[float] = None  # None: the engine's eval interval


@dataclass(frozen=True)
class RuleSet:
    """Every group of one rule file; ``file`` names it in messages and exports."""

    groups: tuple[RuleGroup, ...]
    file: str = "<rules>"

    def rules(self) -> Iterator[tuple[RuleGroup, AlertRule]]:
        for g in self.groups:
            for r in g.rules:
                yield g, r

    def queries(self) -> list:
        """Every condition's query, in rule order."""
        return [c.query for _, r in self.rules() for c in r.conditions]
