"""Which rules can run when the monitor is sharded across several aggregators.

Runs wherever a rule file is checked against a monitor with ``shards > 1``: ``start()``
and ``ray-monitor rules check --shards N`` in the driver, ``reload`` in the aggregator.
It decides one thing: every shard evaluates the whole file over the applications it
owns, so a condition is right only when each of its groups lies inside one application:
it groups ``by`` ``application`` (each shard answers for its own applications' groups)
or pins one application with ``application="NAME"`` (only the owning shard evaluates it:
:func:`rules_for_shard`).
A condition that sums or compares across applications would be evaluated on each
shard's part separately and fire on the wrong numbers: it is refused, naming the rule
and the fix (README, "Large clusters": cross-application rules are refused, not merged).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from ray_monitor.common.errors import Problem

__all__ = ["pinned_application", "rules_for_shard", "sharding_problems"]


def _within_one_application(query: Any) -> bool:
    if query.by is not None and "application" in query.by:
        return True
    return any(m.label == "application" and m.op == "=" for m in query.matchers)


def pinned_application(rule: Any) -> Optional[str]:
    """The application every condition of ``rule`` pins with ``application="NAME"``
    (None: it pins none, or not the same one in every condition)."""
    apps = set()
    for cond in rule.conditions:
        pins = {m.value for m in cond.query.matchers if m.label == "application" and m.op == "="}
        if len(pins) != 1:
            return None
        apps |= pins
    return apps.pop() if len(apps) == 1 else None


def rules_for_shard(ruleset: Any, shard: int, shards: int) -> Any:
    """The rules shard ``shard`` evaluates: every rule but those pinned to an application
    another shard owns (there it would see no data, and ``absent_over_time`` would fire
    for an application that is only elsewhere). Groups keep their names and intervals."""
    if shards <= 1:
        return ruleset
    from ray_monitor.alerting.model import RuleSet
    from ray_monitor.common.shards import shard_of

    groups = []
    for g in ruleset.groups:
        rules = tuple(r for r in g.rules if (app := pinned_application(r)) is None
                      or shard_of(app, shards) == shard)
        groups.append(dataclasses.replace(g, rules=rules))
    return RuleSet(tuple(groups), ruleset.file)


def sharding_problems(ruleset: Any, shards: int) -> list[Problem]:
    """The rules of ``ruleset`` (a :class:`~ray_monitor.alerting.model.RuleSet`) that
    aggregate across applications, which ``shards`` > 1 aggregators cannot evaluate."""
    if shards <= 1:
        return []
    problems = []
    for group, rule in ruleset.rules():
        for cond in rule.conditions:
            if _within_one_application(cond.query):
                continue
            by = ", ".join(cond.query.by or ())
            fix = f"by ({by + ', ' if by else ''}application)"
            problems.append(Problem(ruleset.file, group=group.name, rule=rule.name,
                                    field="expr", message=(
                f"'{cond}' aggregates across applications, which live on different "
                f"aggregator shards (shards={shards}); group it {fix}, or pin one "
                f"application with {{application=\"NAME\"}}, or run with shards=1")))
            break
    return problems
