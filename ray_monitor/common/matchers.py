"""Label matchers with PromQL's semantics, written once for every store that selects series.

Imported by the aggregator (window store, quality store) and by the rule parser, which
checks regexes when a file is read. ``=``, ``!=``, ``=~``, ``!~``; regexes are fully
anchored, as PromQL's are, and a missing label reads as "".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Mapping

__all__ = ["Matcher", "OPS", "check_regex", "matches", "matches_all"]

OPS = ("=", "!=", "=~", "!~")


@dataclass(frozen=True)
class Matcher:
    label: str
    op: Literal["=", "!=", "=~", "!~"]
    value: str


@lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"matcher regex {pattern!r} is invalid: {e}; use Python regex syntax") from e


def check_regex(pattern: str) -> None:
    """Raises ``ValueError`` naming the problem when ``pattern`` does not compile."""
    _regex(pattern)


def matches(m: Matcher, value: str) -> bool:
    """Whether a label ``value`` satisfies ``m``. A bad regex raises ``ValueError``."""
    if m.op == "=":
        return value == m.value
    if m.op == "!=":
        return value != m.value
    hit = _regex(m.value).fullmatch(value) is not None
    return hit if m.op == "=~" else not hit


def matches_all(matchers, labels: Mapping[str, str]) -> bool:
    """Whether a label set satisfies every matcher (a missing label reads as "")."""
    return all(matches(m, labels.get(m.label, "")) for m in matchers)
