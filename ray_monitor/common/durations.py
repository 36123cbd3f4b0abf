"""Durations as people write them in rule files, options and query strings.

Imported by every process that reads configuration (CLI, driver, aggregator). One
grammar, Prometheus's: ``500ms``, ``30s``, ``1h30m``, and a bare ``0``.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["format_duration", "parse_duration", "parse_seconds"]

_DURATION_RE = re.compile(
    r"(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?")
_DURATION_UNITS = (("y", 365 * 86400.0), ("w", 7 * 86400.0), ("d", 86400.0), ("h", 3600.0),
                   ("m", 60.0), ("s", 1.0), ("ms", 0.001))


def _show(v: Any) -> str:
    """A value as the user wrote it: strings in double quotes."""
    return '"' + v + '"' if isinstance(v, str) else repr(v)


def parse_duration(text: Any) -> float:
    """A Prometheus duration (``500ms``, ``30s``, ``1h30m``, ``0``) in seconds.

    Raises ``ValueError`` saying how to write one.
    """
    bad = ValueError(f"{_show(text)[:80]} is not a duration; write it like 30s, 5m or 1h")
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise bad
    if text == 0 or text == "0":
        return 0.0  # Prometheus accepts a bare 0
    m = _DURATION_RE.fullmatch(text) if isinstance(text, str) else None
    if not text or m is None or not any(m.groups()):
        raise bad
    return sum(int(g) * unit for g, (_, unit) in zip(m.groups(), _DURATION_UNITS) if g)


def parse_seconds(value: Any) -> float:
    """Seconds from a number (``5``, ``0.5``; also as a string) or a Prometheus duration.

    Raises ``ValueError`` for anything else, for negative numbers, NaN and infinity.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            seconds = parse_duration(value.strip())
    else:
        raise ValueError(f"{_show(value)[:80]} is not a duration; use seconds (e.g. 5) or a "
                         "Prometheus duration such as 500ms, 30s, 5m or 4h")
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"{_show(value)[:80]} must be a finite number of seconds, 0 or more")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds as a Prometheus duration: 90 -> ``1m30s``, 0.5 -> ``500ms``."""
    ms = round(seconds * 1000)
    if ms == 0:
        return "0s"
    out = []
    for suffix, unit in _DURATION_UNITS[2:]:  # d h m s ms: no y/w, they read worse
        n, ms = divmod(ms, round(unit * 1000))
        if n:
            out.append(f"{n}{suffix}")
    return "".join(out)
