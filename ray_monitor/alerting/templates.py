"""Annotation templates: the ``{{ $value }}`` and ``{{ $labels.NAME }}`` of a rule's annotations.

Checked where a rule file is read (CLI, driver, aggregator on reload) and rendered in the
aggregator each time an alert's value changes. The syntax is a fixed subset of
Prometheus' Go templates, so an exported rule renders the same text in Prometheus; a
template substitutes values and runs no code.
"""

from __future__ import annotations

import decimal
import math
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from ray_monitor.alerting.expr import LABEL_NAME

__all__ = ["Template", "go_float"]


def go_float(v: float) -> str:
    """A float as Go's ``fmt`` prints it (``%v``), which is what Prometheus' $value shows."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == 0:
        return "-0" if math.copysign(1.0, v) < 0 else "0"
    sign, digits, exp = decimal.Decimal(repr(v)).as_tuple()
    digits = list(digits)
    while len(digits) > 1 and digits[-1] == 0:
        digits.pop()
        exp += 1
    s = "".join(map(str, digits))
    dp = len(s) + exp  # digits before the decimal point
    x = dp - 1
    neg = "-" if sign else ""
    if x < -4 or x >= 6:  # strconv's 'g' with shortest digits switches to %e here
        mant = s[0] + ("." + s[1:] if len(s) > 1 else "")
        return f"{neg}{mant}e{'-' if x < 0 else '+'}{abs(x):02d}"
    if dp <= 0:
        return f"{neg}0.{'0' * -dp}{s}"
    if dp >= len(s):
        return f"{neg}{s}{'0' * (dp - len(s))}"
    return f"{neg}{s[:dp]}.{s[dp:]}"


def _si(v: float, prefixes_up: str, prefixes_down: str) -> tuple[float, str]:
    prefix = ""
    if abs(v) >= 1:
        for p in prefixes_up:
            if abs(v) < 1000:
                break
            prefix, v = p, v / 1000
    else:
        for p in prefixes_down:
            if abs(v) >= 1:
                break
            prefix, v = p, v * 1000
    return v, prefix


def _humanize(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return "%.4g" % v if math.isfinite(v) else go_float(v)
    v, prefix = _si(v, "kMGTPEZY", "munpfazy")
    return "%.4g%s" % (v, prefix)


def _humanize_duration(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return ("%.4gs" % v) if math.isfinite(v) else go_float(v) + "s"
    if abs(v) >= 1:
        sign = "-" if v < 0 else ""
        v = abs(v)
        d = int(v)
        days, hours, minutes, secs = d // 86400, d // 3600 % 24, d // 60 % 60, d % 60
        if days:
            return f"{sign}{days}d {hours}h {minutes}m {secs}s"
        if hours:
            return f"{sign}{hours}h {minutes}m {secs}s"
        if minutes:
            return f"{sign}{minutes}m {secs}s"
        return "%s%.4gs" % (sign, v)
    v, prefix = _si(v, "", "munpfazy")
    return "%.4g%ss" % (v, prefix)


_FILTERS: dict[str, Callable[[float], str]] = {
    "humanize": _humanize,
    "humanizePercentage": lambda v: "%.4g%%" % (v * 100) if math.isfinite(v) else go_float(v) + "%",
    "humanizeDuration": _humanize_duration,
}
_PRINTF_RE = re.compile(r"(?:[^%]|%%)*%[-+ #0]*\d*(?:\.\d+)?[eEfFgG](?:[^%]|%%)*")
_BLOCK_RE = re.compile(r"\{\{(.*?)\}\}", re.S)
_PLACEHOLDERS = (
    (re.compile(r"\$value"), lambda m: ("value", None)),
    (re.compile(rf"\$labels\.({LABEL_NAME})"), lambda m: ("label", m.group(1))),
    (re.compile(r"\$value\s*\|\s*(humanize|humanizePercentage|humanizeDuration)"),
     lambda m: ("filter", m.group(1))),
    (re.compile(r"(humanize|humanizePercentage|humanizeDuration)\s+\$value"),
     lambda m: ("filter", m.group(1))),
    (re.compile(r'\$value\s*\|\s*printf\s+"([^"\\]*)"'), lambda m: ("printf", m.group(1))),
    (re.compile(r'printf\s+"([^"\\]*)"\s+\$value'), lambda m: ("printf", m.group(1))),
)
_TEMPLATE_HELP = ('use {{ $value }}, {{ $labels.NAME }}, {{ $value | humanize }}, '
                  '{{ $value | humanizePercentage }}, {{ $value | humanizeDuration }} '
                  'or {{ $value | printf "%.2f" }}')


@dataclass(frozen=True)
class Template:
    """A checked annotation template; :meth:`render` substitutes and runs no code.

    The syntax is a subset of Prometheus' Go templates, so an exported rule file
    renders the same text in Prometheus.
    """

    text: str
    parts: tuple[tuple[str, Optional[str]], ...]  # ("text", s) | ("value"|"label"|"filter"|"printf", arg)

    @classmethod
    def parse(cls, text: str, labels: Optional[tuple[str, ...]] = None) -> "Template":
        """Check ``text``; ``labels`` are the names ``$labels.NAME`` may use (None: any)."""
        parts: list[tuple[str, Optional[str]]] = []
        pos = 0
        for m in _BLOCK_RE.finditer(text):
            parts.append(("text", cls._literal(text[pos:m.start()], pos)))
            inner = m.group(1).strip()
            for regex, make in _PLACEHOLDERS:
                pm = regex.fullmatch(inner)
                if pm:
                    kind, arg = make(pm)
                    break
            else:
                raise ValueError(f"template {m.group(0)!r} at position {m.start()} is not "
                                 f"supported; {_TEMPLATE_HELP}")
            if kind == "label" and labels is not None and arg not in labels:
                have = ", ".join(labels) if labels else "none: the expression has no by (...)"
                raise ValueError(f"template {m.group(0)!r} names label {arg!r}, which the alert "
                                 f"does not have; its labels from by (...) are {have}")
            if kind == "printf" and not _PRINTF_RE.fullmatch(arg):
                raise ValueError(f"template {m.group(0)!r}: printf needs exactly one float verb "
                                 f"such as %.2f, %g or %e")
            parts.append((kind, arg))
            pos = m.end()
        parts.append(("text", cls._literal(text[pos:], pos)))
        return cls(text, tuple(p for p in parts if p != ("text", "")))

    @staticmethod
    def _literal(chunk: str, offset: int) -> str:
        for brace in ("{{", "}}"):
            i = chunk.find(brace)
            if i >= 0:
                raise ValueError(f"unbalanced {brace!r} at position {offset + i}; "
                                 f"close every {{{{ with }}}}")
        return chunk

    def render(self, value: float, labels: Mapping[str, str]) -> str:
        out = []
        for kind, arg in self.parts:
            if kind == "text":
                out.append(arg)
            elif kind == "value":
                out.append(go_float(value))
            elif kind == "label":
                out.append(labels.get(arg, ""))
            elif kind == "filter":
                out.append(_FILTERS[arg](value))
            else:
                out.append(arg % value)
        return "".join(out)
