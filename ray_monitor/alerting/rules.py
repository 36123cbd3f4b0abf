"""Alert rules: the rule file, the alert state machine, and export to Prometheus.

A rule file is YAML shaped like a Prometheus rule file (see ``deployments/rules``)::

    groups:
      - name: serving
        interval: 1s
        rules:
          - alert: HighLatencyP99
            expr: p99(latency_seconds[1m]) by (application, deployment) > 0.5
            for: 30s
            labels: {severity: page}
            annotations: {summary: "p99 {{ $value }}s on {{ $labels.deployment }}"}
          - slo: availability
            objective: 99.9
            sli: error_ratio
            by: [application, deployment]

:func:`load_rules` checks the whole file and raises one :class:`RuleError` listing
every problem, each naming the file, group, rule and field. :class:`RuleEngine`
runs the alert state machine of Prometheus' ``rules/alerting.go`` over any
:class:`Source` (the window store), and :func:`export_prometheus` writes the same
rules as a Prometheus rule file over the names the aggregator exposes on /metrics.

Expressions are ``FUNCTION(METRIC{matchers}[WINDOW]) [by (LABELS)] OP NUMBER``, several
joined by ``and`` (same ``by`` on every side; the groups present on every side match,
with the first side's value). Functions and metrics come from :mod:`.catalog`.

An ``slo:`` entry expands into two paging alerts (SRE workbook, multiwindow multi-burn-
rate, 30-day budget ``1 - objective/100``): ``<Name>SLOBurnRateFast`` when the bad ratio
over 1h and over 5m both exceed 14.4x the budget, ``<Name>SLOBurnRateSlow`` for 6h and
30m over 6x (``<Name>`` is the SLO name in CamelCase). They carry ``severity: page``
(overridable), ``slo: <name>`` and ``burn_rate_window: 1h|6h``, and no ``for``: the
short window already ends the page soon after the burn stops.

The state machine follows ``rules/alerting.go`` exactly: ``keep_firing_for`` counts from
the first evaluation without a match; an alert is re-sent when ``last_sent + resend_delay``
is *before* now; ``starts_at`` of a message is the time the alert fired (Prometheus'
``FiredAt``); ``ends_at`` is ``now + 4 * max(group interval, resend delay)`` while firing
and the resolve time once resolved.

Where this differs from Prometheus, on purpose:

- ``engine.reload`` demotes a firing alert to pending when its rule's ``for`` was
  raised above the time it has been active (Prometheus keeps it firing); alerts of
  rules that were removed, or whose ``expr`` changed, are dropped, as Prometheus does.
- Annotation templates are a fixed set of substitutions, not Go templates: no code
  runs. Labels are not templated.
"""

from __future__ import annotations

import dataclasses
import decimal
import difflib
import math
import operator
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Union
from urllib.parse import urlencode

import yaml

from ray_monitor.common import catalog
from ray_monitor.common.durations import format_duration, parse_duration
from ray_monitor.alerting.message import AlertMessage
from ray_monitor.common.histogram import DEFAULT_CLASSIC_BOUNDS

__all__ = [
    "ActiveAlert", "AlertRule", "Condition", "EvalError", "EvalResult", "Problem",
    "RuleEngine", "RuleError", "RuleGroup", "RuleSet", "ScaleAction", "Source", "Template",
    "EXPORT_NOTE", "export_prometheus", "export_prometheus_yaml", "format_duration",
    "not_exported",
    "load_rules", "parse_duration", "parse_expr",
]

# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a rule file."""

    file: str
    group: Optional[str]
    rule: Optional[str]
    field: Optional[str]
    message: str

    def __str__(self) -> str:
        def name(kind: str, v: str) -> str:
            return f"{kind} {v}" if v.startswith("#") else f"{kind} {v!r}"  # "#2": the 2nd, unnamed

        place = [name(k, v) for k, v in (("group", self.group), ("rule", self.rule)) if v is not None]
        parts = [self.file] + ([", ".join(place)] if place else [])
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        return ": ".join(parts + [self.message])


class RuleError(ValueError):
    """A rule file that cannot be used; ``problems`` holds every problem found.

    ``file``, ``group``, ``rule`` and ``field`` are those of the first problem.
    """

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        first = self.problems[0]
        self.file, self.group, self.rule, self.field = first.file, first.group, first.rule, first.field
        if len(self.problems) == 1:
            text = str(first)
        else:
            text = f"{len(self.problems)} problems in {first.file}:\n" + "\n".join(
                f"  - {p}" for p in self.problems)
        super().__init__(text)


def _show(v: Any) -> str:
    """A value from the file as the user wrote it: strings in double quotes."""
    return '"' + v + '"' if isinstance(v, str) else repr(v)


# ------------------------------------------------------------------------ templates


def _go_float(v: float) -> str:
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
        return "%.4g" % v if math.isfinite(v) else _go_float(v)
    v, prefix = _si(v, "kMGTPEZY", "munpfazy")
    return "%.4g%s" % (v, prefix)


def _humanize_duration(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return ("%.4gs" % v) if math.isfinite(v) else _go_float(v) + "s"
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
    "humanizePercentage": lambda v: "%.4g%%" % (v * 100) if math.isfinite(v) else _go_float(v) + "%",
    "humanizeDuration": _humanize_duration,
}
_PRINTF_RE = re.compile(r"(?:[^%]|%%)*%[-+ #0]*\d*(?:\.\d+)?[eEfFgG](?:[^%]|%%)*")
_BLOCK_RE = re.compile(r"\{\{(.*?)\}\}", re.S)
_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
_PLACEHOLDERS = (
    (re.compile(r"\$value"), lambda m: ("value", None)),
    (re.compile(rf"\$labels\.({_NAME})"), lambda m: ("label", m.group(1))),
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
                out.append(_go_float(value))
            elif kind == "label":
                out.append(labels.get(arg, ""))
            elif kind == "filter":
                out.append(_FILTERS[arg](value))
            else:
                out.append(arg % value)
        return "".join(out)


# ---------------------------------------------------------------------- expressions

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
    "==": operator.eq, "!=": operator.ne}
_PARAM_FUNCTIONS = ("quantile", "ratio_above")
_ERROR_RATIO_METRICS = ("requests", "errors")


@dataclass(frozen=True)
class Condition:
    """One ``FUNCTION(METRIC[WINDOW]) by (...) OP NUMBER`` of an expression."""

    query: catalog.Query
    op: str
    threshold: float

    def __str__(self) -> str:
        q = self.query
        sel = q.metric
        if q.matchers:
            sel += "{" + ", ".join(f'{m.label}{m.op}{_quote(m.value)}' for m in q.matchers) + "}"
        sel += f"[{format_duration(q.window_s)}]"
        arg = f"{_num(q.param)}, {sel}" if q.param is not None else sel
        by = f" by ({', '.join(q.by)})" if q.by is not None else ""
        return f"{q.function}({arg}){by} {self.op} {_num(self.threshold)}"

    def holds(self, value: float) -> bool:
        return _OPS[self.op](value, self.threshold)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class _ExprError(Exception):
    def __init__(self, pos: int, message: str):
        super().__init__(message)
        self.pos = pos
        self.message = message


_IDENT_RE = re.compile(_NAME)
_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


class _ExprParser:
    """Recursive descent over ``cond ('and' cond)*``; positions are 0-based offsets."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def _ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _found(self) -> str:
        self._ws()
        if self.pos >= len(self.text):
            return "found the end of the expression"
        return f"found {self.text[self.pos:self.pos + 12]!r}"

    def _eat(self, s: str) -> bool:
        self._ws()
        if self.text.startswith(s, self.pos):
            self.pos += len(s)
            return True
        return False

    def _expect(self, s: str, what: str) -> None:
        if not self._eat(s):
            raise _ExprError(self.pos, f"expected {s!r} {what}, {self._found()}")

    def _regex(self, regex: re.Pattern, what: str) -> tuple[str, int]:
        self._ws()
        m = regex.match(self.text, self.pos)
        if not m:
            raise _ExprError(self.pos, f"expected {what}, {self._found()}")
        self.pos = m.end()
        return m.group(0), m.start()

    def _string(self) -> str:
        self._ws()
        if self.pos >= len(self.text) or self.text[self.pos] not in "\"'":
            raise _ExprError(self.pos, f"expected a quoted string, {self._found()}")
        quote, start = self.text[self.pos], self.pos
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c == "\\" and self.pos + 1 < len(self.text):
                nxt = self.text[self.pos + 1]
                out.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
                self.pos += 2
                continue
            self.pos += 1
            if c == quote:
                return "".join(out)
            out.append(c)
        raise _ExprError(start, "string is not closed")

    def parse(self) -> list[dict]:
        conds = [self._condition()]
        while True:
            self._ws()
            if self.pos >= len(self.text):
                return conds
            save = self.pos
            word = _IDENT_RE.match(self.text, self.pos)
            if not word or word.group(0) != "and":
                raise _ExprError(save, f"expected 'and' or the end of the expression, {self._found()}")
            self.pos = word.end()
            conds.append(self._condition())

    def _condition(self) -> dict:
        c: dict = {}
        c["function"], c["function_pos"] = self._regex(_IDENT_RE, "a function name such as p99 or rate")
        self._expect("(", f"after {c['function']}")
        c["param"] = None
        self._ws()
        if _NUMBER_RE.match(self.text, self.pos):
            num, c["param_pos"] = self._regex(_NUMBER_RE, "a number")
            c["param"] = float(num)
            self._expect(",", "after the number")
        c["metric"], c["metric_pos"] = self._regex(_IDENT_RE, "a metric name such as latency_seconds")
        c["matchers"] = []
        if self._eat("{"):
            while not self._eat("}"):
                label, pos = self._regex(_IDENT_RE, "a label name")
                self._ws()
                for op in ("=~", "!~", "!=", "="):
                    if self._eat(op):
                        break
                else:
                    raise _ExprError(self.pos, f"expected =, !=, =~ or !~ after {label}, {self._found()}")
                c["matchers"].append((label, op, self._string(), pos))
                if not self._eat(","):
                    self._expect("}", "to close the matchers")
                    break
        self._expect("[", "and a window such as [5m] after the metric")
        self._ws()
        wpos = self.pos
        end = self.text.find("]", self.pos)
        if end < 0:
            raise _ExprError(self.pos, "window is not closed with ']'")
        raw = self.text[self.pos:end].strip()
        try:
            c["window_s"] = parse_duration(raw)
        except ValueError:
            raise _ExprError(wpos, f"window {raw!r} is not a duration; write it like 30s, 5m or 1h")
        if c["window_s"] <= 0:
            raise _ExprError(wpos, f"window {raw!r} is empty; use a window of at least 1s")
        self.pos = end + 1
        self._expect(")", f"to close {c['function']}(")
        c["by"] = None
        self._ws()
        word = _IDENT_RE.match(self.text, self.pos)
        if word and word.group(0) == "by":
            self.pos = word.end()
            self._expect("(", "after by")
            c["by"] = []
            while not self._eat(")"):
                c["by"].append(self._regex(_IDENT_RE, "a label name"))
                if not self._eat(","):
                    self._expect(")", "to close by (...)")
                    break
        self._ws()
        for op in (">=", "<=", "==", "!=", ">", "<"):
            if self._eat(op):
                c["op"] = op
                break
        else:
            raise _ExprError(self.pos, f"expected a comparison (> >= < <= == !=), {self._found()}")
        num, _ = self._regex(_NUMBER_RE, "a number to compare with")
        c["threshold"] = float(num)
        return c


def _close(name: str, choices) -> str:
    near = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


_ALL_FUNCTIONS = {**catalog.FUNCTIONS, **catalog.MODEL_FUNCTIONS}
_ALL_METRICS = (*catalog.METRICS, catalog.PREDICTIONS, catalog.PREDICTION,
                catalog.FEATURE_PREFIX + "<name>")


def _check_selection(c: dict, labels: Optional[tuple[str, ...]], owner: str, owner_by: str,
                     errors: list[str]) -> tuple[tuple[catalog.Matcher, ...],
                                                 Optional[tuple[str, ...]]]:
    """The matchers and ``by`` of a condition, checked against the labels its metric has
    (``None``: the metric is unknown, already reported); problems go to ``errors``."""
    at = lambda p: f" at position {p}"  # noqa: E731
    matchers = []
    if labels is not None:
        for label, pos in (c["by"] or []):
            if label not in labels:
                errors.append(f"label {label!r} in by (...){at(pos)} is not a label of {owner_by}"
                              f"{_close(label, labels)} (labels: {', '.join(labels)})")
        for label, op, value, pos in c["matchers"]:
            if label not in labels:
                errors.append(f"label {label!r} in a matcher{at(pos)} is not a label of {owner}"
                              f"{_close(label, labels)} (labels: {', '.join(labels)})")
            if op in ("=~", "!~"):
                try:
                    re.compile(value)
                except re.error as exc:
                    errors.append(f"matcher {label}{op}{_quote(value)}{at(pos)} is not a valid "
                                  f"regular expression: {exc}")
            matchers.append(catalog.Matcher(label, op, value))
    names = [label for label, _ in (c["by"] or [])]
    if len(set(names)) != len(names):
        errors.append(f"by ({', '.join(names)}) names a label twice")
    return tuple(matchers), (tuple(sorted(set(names))) if names else None)


def _check_model_condition(c: dict) -> tuple[Optional[Condition], list[str]]:
    """A quality or drift condition: ``accuracy(predictions[1h])``, ``psi(feature_age[1h])``."""
    errors: list[str] = []
    fn, metric_name = c["function"], c["metric"]
    at = lambda p: f" at position {p}"  # noqa: E731
    quality = sorted(n for n, m in catalog.MODEL_FUNCTIONS.items() if m.kind == "quality")
    drift = sorted(n for n, m in catalog.MODEL_FUNCTIONS.items() if m.kind == "drift")
    model_fn = catalog.MODEL_FUNCTIONS.get(fn)
    is_drift_metric = metric_name == catalog.PREDICTION or (
        metric_name.startswith(catalog.FEATURE_PREFIX) and len(metric_name) > len(catalog.FEATURE_PREFIX))
    if fn not in _ALL_FUNCTIONS:
        errors.append(f"unknown function {fn!r}{at(c['function_pos'])}{_close(fn, _ALL_FUNCTIONS)}"
                      f" (functions: {', '.join(sorted(_ALL_FUNCTIONS))})")
    elif model_fn is None:
        errors.append(f"function {fn!r}{at(c['function_pos'])} does not apply to {metric_name!r}; "
                      + (f"use one of {', '.join(quality)} on predictions"
                         if metric_name == catalog.PREDICTIONS else
                         f"use one of {', '.join(drift)} (drift against the reference)"))
    elif model_fn.kind == "quality" and metric_name != catalog.PREDICTIONS:
        errors.append(f"{fn} reads the joined predictions; write {fn}({catalog.PREDICTIONS}[1h]), "
                      f"not {fn}({metric_name}[...])")
    elif model_fn.kind == "drift" and not is_drift_metric:
        errors.append(f"{fn} compares {catalog.PREDICTION} or {catalog.FEATURE_PREFIX}<name> with its "
                      f"reference; write {fn}({catalog.FEATURE_PREFIX}age[1h]) or "
                      f"{fn}({catalog.PREDICTION}[1h]), not {fn}({metric_name}[...])")
    if c["param"] is not None:
        errors.append(f"{fn} takes no number argument{at(c['param_pos'])}")
    matchers, by = _check_selection(c, catalog.MODEL_LABELS, "model quality and drift",
                                    "model quality and drift (per model, not per replica)",
                                    errors)
    if errors:
        return None, errors
    query = catalog.Query(function=fn, metric=metric_name, window_s=c["window_s"], by=by,
                          matchers=matchers)
    return Condition(query, c["op"], c["threshold"]), []


def _check_condition(c: dict) -> tuple[Optional[Condition], list[str]]:
    """Turn a parsed condition into a Condition, or say everything wrong with it."""
    errors: list[str] = []
    fn, metric_name = c["function"], c["metric"]
    if catalog.is_model_query(fn, metric_name):
        return _check_model_condition(c)
    at = lambda p: f" at position {p}"  # noqa: E731
    if fn not in catalog.FUNCTIONS:
        errors.append(f"unknown function {fn!r}{at(c['function_pos'])}{_close(fn, _ALL_FUNCTIONS)}"
                      f" (functions: {', '.join(sorted(_ALL_FUNCTIONS))})")
    metric = catalog.METRICS.get(metric_name)
    if metric is None:
        errors.append(f"unknown metric {metric_name!r}{at(c['metric_pos'])}"
                      f"{_close(metric_name, _ALL_METRICS)} (metrics: {', '.join(_ALL_METRICS)})")
    if fn in catalog.FUNCTIONS and metric is not None:
        if metric.kind not in catalog.FUNCTIONS[fn]:
            fits = sorted(f for f, kinds in catalog.FUNCTIONS.items() if metric.kind in kinds)
            errors.append(f"function {fn!r} does not apply to {metric_name!r}, a {metric.kind}; "
                          f"for a {metric.kind} use one of {', '.join(fits)}")
        elif fn == "error_ratio" and metric_name not in _ERROR_RATIO_METRICS:
            errors.append(f"error_ratio counts request errors; write error_ratio(requests[...]), "
                          f"not error_ratio({metric_name}[...])")
    if fn in _PARAM_FUNCTIONS and c["param"] is None:
        example = "quantile(0.95, latency_seconds[5m])" if fn == "quantile" else \
            "ratio_above(0.5, latency_seconds[5m])"
        errors.append(f"{fn} needs a number first, like {example}")
    if fn not in _PARAM_FUNCTIONS and c["param"] is not None and fn in catalog.FUNCTIONS:
        errors.append(f"{fn} takes no number argument{at(c['param_pos'])}")
    if fn == "quantile" and c["param"] is not None and not 0 <= c["param"] <= 1:
        errors.append(f"quantile {_num(c['param'])} is not between 0 and 1; write 0.95 for p95")
    if fn == "ratio_above" and c["param"] is not None and not c["param"] > 0:
        errors.append(f"ratio_above threshold {_num(c['param'])} must be above 0 (seconds)")
    matchers, by = _check_selection(c, metric.labels if metric is not None else None,
                                    repr(metric_name), repr(metric_name), errors)
    if errors:
        return None, errors
    query = catalog.Query(function=fn, metric=metric_name, window_s=c["window_s"], by=by,
                          matchers=matchers, param=c["param"])
    return Condition(query, c["op"], c["threshold"]), []


def parse_expr(text: str) -> tuple[Condition, ...]:
    """Parse and check an expression; raises ValueError naming every problem in it."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("must be a non-empty string; write it like "
                         "p99(latency_seconds[5m]) by (deployment) > 0.5")
    try:
        raw = _ExprParser(text).parse()
    except _ExprError as exc:
        before = text[:exc.pos].strip()[-30:]
        raise ValueError(f"syntax error at position {exc.pos}"
                         + (f' (after "{before}")' if before else "") + f": {exc.message}") from None
    conds, errors = [], []
    for c in raw:
        cond, errs = _check_condition(c)
        errors.extend(errs)
        if cond is not None:
            conds.append(cond)
    if not errors and len({c.query.by for c in conds}) > 1:
        errors.append("every side of 'and' needs the same by (...), so that their groups line up; "
                      + " vs ".join(f"by ({', '.join(c.query.by or ())})" for c in conds))
    if errors:
        raise _ExprProblems(errors)
    return tuple(conds)


class _ExprProblems(ValueError):
    def __init__(self, messages: list[str]):
        super().__init__("; ".join(messages))
        self.messages = messages


# ----------------------------------------------------------------------- rule model


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
    name: str
    rules: tuple[AlertRule, ...]
    interval_s: Optional[float] = None  # None: the engine's eval interval


@dataclass(frozen=True)
class RuleSet:
    groups: tuple[RuleGroup, ...]
    file: str = "<rules>"

    def rules(self) -> Iterator[tuple[RuleGroup, AlertRule]]:
        for g in self.groups:
            for r in g.rules:
                yield g, r


# -------------------------------------------------------------------------- loading

_LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_RULE_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# ``autoscaling`` belongs to the hints (see :mod:`ray_monitor.autoscaling.hints`), which read it from
# the same file.
_TOP_KEYS = ("groups", "autoscaling")
_GROUP_KEYS = ("name", "interval", "rules")
_ALERT_KEYS = ("alert", "expr", "for", "keep_firing_for", "labels", "annotations", "scale")
_SLO_KEYS = ("slo", "objective", "sli", "by", "labels", "annotations")
_SCALE_KEYS = ("deployment", "step", "factor", "cooldown")
#: Labels the SLO expansion sets on the alerts it makes.
_SLO_LABELS = ("slo", "burn_rate_window")
#: (suffix, burn-rate factor, long window, short window) from the SRE workbook, ch. 5,
#: for a 30-day budget: 14.4x spends 2% of it in 1h, 6x spends 5% in 6h.
SLO_BURN_WINDOWS = (("Fast", 14.4, 3600.0, 300.0), ("Slow", 6.0, 21600.0, 1800.0))
SLO_PERIOD_S = 30 * 86400.0


class _Collector:
    def __init__(self, file: str):
        self.file = file
        self.problems: list[Problem] = []

    def add(self, group, rule, fld, message) -> None:
        self.problems.append(Problem(self.file, group, rule, fld, message))


def _read_source(source, filename) -> tuple[Any, str]:
    if isinstance(source, Mapping):
        return source, filename or "<rules>"
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and (
            source.endswith((".yaml", ".yml")) or os.path.exists(source))):
        file = filename or str(source)
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise RuleError([Problem(file, None, None, None,
                                     f"cannot read the rule file: {exc.strerror or exc}")]) from None
    elif isinstance(source, str):
        file, text = filename or "<rules>", source
    else:
        raise TypeError(f"load_rules takes a path, a YAML string or a dict, "
                        f"not {type(source).__name__}")
    try:
        return yaml.safe_load(text), file
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RuleError([Problem(file, None, None, None,
                                 f"YAML syntax error{where}: {problem}")]) from None


def load_rules(source: Union[str, Path, Mapping], *, filename: Optional[str] = None) -> RuleSet:
    """Read and check a rule file (a path, YAML text or a parsed dict).

    Raises :class:`RuleError` listing every problem in the file.
    """
    data, file = _read_source(source, filename)
    out = _Collector(file)
    groups: list[RuleGroup] = []
    if not isinstance(data, Mapping):
        out.add(None, None, None, "the file must be a mapping with a 'groups' list, like "
                "'groups: [{name: serving, rules: [...]}]'")
        raise RuleError(out.problems)
    for key in data:
        if key not in _TOP_KEYS:
            out.add(None, None, str(key), f"unknown top-level key {key!r}; the file holds only 'groups'")
    raw_groups = data.get("groups")
    if not isinstance(raw_groups, list):
        out.add(None, None, "groups", "must be a list of groups, each with a name and rules")
        raw_groups = []
    seen_groups: set[str] = set()
    for gi, raw in enumerate(raw_groups, 1):
        group = _load_group(raw, gi, seen_groups, out)
        if group is not None:
            groups.append(group)
    if out.problems:
        raise RuleError(out.problems)
    return RuleSet(tuple(groups), file)


def _load_group(raw, index: int, seen: set[str], out: _Collector) -> Optional[RuleGroup]:
    gname = f"#{index}"
    if not isinstance(raw, Mapping):
        out.add(gname, None, None, "a group must be a mapping with name and rules")
        return None
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        out.add(gname, None, "name", "every group needs a name (a non-empty string)")
    elif name in seen:
        gname = name
        out.add(gname, None, "name", f"group name {name!r} is used twice; give each group its own name")
    else:
        gname = name
        seen.add(name)
    for key in raw:
        if key not in _GROUP_KEYS:
            out.add(gname, None, str(key), f"unknown key {key!r} in a group; use {', '.join(_GROUP_KEYS)}")
    interval = None
    if "interval" in raw:
        try:
            interval = parse_duration(raw["interval"])
            if interval <= 0:
                raise ValueError(f"{raw['interval']!r} is not a usable interval; use 1s or more")
        except ValueError as exc:
            out.add(gname, None, "interval", str(exc))
    raw_rules = raw.get("rules")
    if not isinstance(raw_rules, list):
        out.add(gname, None, "rules", "must be a list of rules (each an alert: or slo: entry)")
        raw_rules = []
    rules: list[AlertRule] = []
    names: set[str] = set()
    for ri, rraw in enumerate(raw_rules, 1):
        made = _load_rule(rraw, gname, ri, out)
        for rule in made:
            if rule.name in names:
                out.add(gname, rule.name, "alert" if rule.slo is None else "slo",
                        f"alert name {rule.name!r} is used twice in this group; rename one")
            names.add(rule.name)
            rules.append(rule)
    return RuleGroup(name=gname, rules=tuple(rules), interval_s=interval)


def _load_rule(raw, gname: str, index: int, out: _Collector) -> list[AlertRule]:
    if not isinstance(raw, Mapping):
        out.add(gname, f"#{index}", None, "a rule must be a mapping with alert: and expr:, or slo:")
        return []
    if "alert" in raw and "slo" in raw:
        out.add(gname, f"#{index}", "alert", "a rule is either alert: or slo:, not both")
        return []
    if "slo" in raw:
        return _load_slo(raw, gname, index, out)
    if "alert" not in raw:
        out.add(gname, f"#{index}", None, "a rule needs alert: NAME (with expr:) or slo: NAME; "
                "recording rules (record:) are not supported")
        return []
    name = raw["alert"]
    rname = name if isinstance(name, str) and name else f"#{index}"
    add = lambda fld, msg: out.add(gname, rname, fld, msg)  # noqa: E731
    before = len(out.problems)
    if not isinstance(name, str) or not _RULE_NAME_RE.fullmatch(name):
        add("alert", f"alert name {name!r} must be letters, digits and _, like HighLatencyP99")
    for key in raw:
        if key not in _ALERT_KEYS:
            add(str(key), f"unknown key {key!r} in an alert rule; use {', '.join(_ALERT_KEYS)}")
    conditions: tuple[Condition, ...] = ()
    if "expr" not in raw:
        add("expr", "missing; write it like p99(latency_seconds[5m]) by (deployment) > 0.5")
    else:
        try:
            conditions = parse_expr(raw["expr"])
        except ValueError as exc:
            for message in getattr(exc, "messages", [str(exc)]):
                add("expr", f"{_show(raw['expr'])}: {message}")
    durations = {}
    for key in ("for", "keep_firing_for"):
        durations[key] = 0.0
        if key in raw:
            try:
                durations[key] = parse_duration(raw[key])
            except ValueError as exc:
                add(key, str(exc))
    by = conditions[0].query.by or () if conditions else None
    labels = _check_labels(raw.get("labels"), add, reserved=catalog.RESERVED_LABELS)
    annotations = _check_annotations(raw.get("annotations"), by, add)
    scale = _check_scale(raw["scale"], by, add) if "scale" in raw else None
    if len(out.problems) > before:
        return []
    return [AlertRule(name=name, expr=" and ".join(map(str, conditions)), conditions=conditions,
                      for_s=durations["for"], keep_firing_for_s=durations["keep_firing_for"],
                      labels=labels, annotations=annotations, scale=scale)]


def _check_labels(raw, add, *, reserved) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        add("labels", "must be a mapping of label name to string value, like {severity: page}")
        return {}
    labels = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not _LABEL_NAME_RE.fullmatch(k) or k.startswith("__"):
            add("labels", f"label name {k!r} is not valid; use letters, digits and _, not "
                "starting with a digit or __")
        elif k in reserved:
            add("labels", f"label name {k!r} is reserved (the monitor sets it); choose another name")
        elif not isinstance(v, str):
            add("labels", f"label {k!r} has value {v!r}, which is not a string; quote it: {k}: \"{v}\"")
        elif "{{" in v or "}}" in v:
            add("labels", f"label {k!r}: templates are not expanded in labels (they would make "
                "a new alert per value); put {{ ... }} in an annotation instead")
        else:
            labels[k] = v
    return labels


def _check_annotations(raw, by, add) -> dict[str, Template]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        add("annotations", "must be a mapping of name to string, like {summary: \"...\"}")
        return {}
    out = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not _LABEL_NAME_RE.fullmatch(k):
            add("annotations", f"annotation name {k!r} is not valid; use letters, digits and _")
        elif not isinstance(v, str):
            add("annotations", f"annotation {k!r} has value {v!r}, which is not a string; quote it")
        else:
            try:
                out[k] = Template.parse(v, by)
            except ValueError as exc:
                add("annotations", f"annotation {k!r}: {exc}")
    return out


def _check_scale(raw, by, add) -> Optional[ScaleAction]:
    if not isinstance(raw, Mapping):
        add("scale", "must be a mapping like {deployment: \"{{ $labels.deployment }}\", step: 1}")
        return None
    for key in raw:
        if key not in _SCALE_KEYS:
            add("scale", f"unknown key {key!r} in scale; use {', '.join(_SCALE_KEYS)}")
    step, factor, cooldown, deployment = raw.get("step"), raw.get("factor"), None, None
    if (step is None) == (factor is None):
        add("scale", "give exactly one of step (replicas to add, like 1) or factor "
            "(multiply replicas, like 1.5)")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
        add("scale", f"step {step!r} must be a whole number of replicas to add, 1 or more")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                               or not factor > 1):
        add("scale", f"factor {factor!r} must be a number above 1, like 1.5")
    if "cooldown" in raw:
        try:
            cooldown = parse_duration(raw["cooldown"])
        except ValueError as exc:
            add("scale", f"cooldown: {exc}")
    dep = raw.get("deployment", "{{ $labels.deployment }}")
    if not isinstance(dep, str) or not dep:
        add("scale", "deployment must be a deployment name or \"{{ $labels.deployment }}\"")
    else:
        try:
            deployment = Template.parse(dep, by)
        except ValueError as exc:
            add("scale", f"deployment: {exc}")
    if deployment is None:
        return None
    return ScaleAction(deployment, step, float(factor) if factor is not None else None, cooldown)


def _camel(name: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in re.split(r"[_\-]+", name) if p)


def _load_slo(raw, gname: str, index: int, out: _Collector) -> list[AlertRule]:
    name = raw["slo"]
    rname = name if isinstance(name, str) and name else f"#{index}"
    add = lambda fld, msg: out.add(gname, rname, fld, msg)  # noqa: E731
    before = len(out.problems)
    if not isinstance(name, str) or not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_-]*", name):
        add("slo", f"SLO name {name!r} must be letters, digits, _ and -, like availability")
    for key in raw:
        if key not in _SLO_KEYS:
            add(str(key), f"unknown key {key!r} in an slo rule; use {', '.join(_SLO_KEYS)}")
    objective = raw.get("objective")
    budget = 0.0
    if isinstance(objective, bool) or not isinstance(objective, (int, float)) \
            or not 0 < objective < 100:
        add("objective", f"{objective!r} must be a percentage between 0 and 100 (exclusive), "
            "like 99.9")
    else:
        budget = 1.0 - objective / 100.0
        if SLO_BURN_WINDOWS[0][1] * budget >= 1:
            add("objective", f"{objective} leaves an error budget of {budget:.0%}: a 14.4x burn "
                "would need more than 100% bad requests, so the fast alert could never fire; "
                "use an objective of 93.1 or more")
    sli = raw.get("sli")
    threshold = None
    if sli == "error_ratio":
        pass
    elif isinstance(sli, Mapping) and set(sli) == {"latency_threshold"}:
        threshold = sli["latency_threshold"]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            add("sli", f"latency_threshold {threshold!r} must be a number of seconds above 0")
            threshold = None
    else:
        add("sli", f"{sli!r} is not an SLI; use error_ratio or {{latency_threshold: 0.5}} (seconds)")
    metric = catalog.METRICS["latency_seconds" if threshold is not None else "requests"]
    by = raw.get("by")
    if by is not None:
        if not isinstance(by, list) or not all(isinstance(b, str) for b in by):
            add("by", "must be a list of label names, like [application, deployment]")
            by = None
        else:
            for b in by:
                if b not in metric.labels:
                    add("by", f"label {b!r} is not a label of {metric.name!r}{_close(b, metric.labels)}"
                        f" (labels: {', '.join(metric.labels)})")
            by = tuple(sorted(set(by))) or None
    labels = _check_labels(raw.get("labels"), add, reserved=catalog.RESERVED_LABELS | set(_SLO_LABELS))
    annotations = _check_annotations(raw.get("annotations"), by or (), add)
    if len(out.problems) > before:
        return []
    rules = []
    where = (" on " + "/".join(f"{{{{ $labels.{b} }}}}" for b in by)) if by else ""
    what = (f"requests slower than {_num(threshold)}s" if threshold is not None
            else "requests that failed")
    for suffix, factor, long_w, short_w in SLO_BURN_WINDOWS:
        level = float(f"{factor * budget:.12g}")
        conds = tuple(
            Condition(catalog.Query(
                function="ratio_above" if threshold is not None else "error_ratio",
                metric=metric.name, window_s=w, by=by,
                param=float(threshold) if threshold is not None else None), ">", level)
            for w in (long_w, short_w))
        default_ann = {
            "summary": f"SLO {name} ({_num(objective)}%){where}: error budget burning "
                       f"{_num(factor)}x too fast",
            "description": f"{{{{ $value | humanizePercentage }}}} of {what} over the last "
                           f"{format_duration(long_w)} (and over {format_duration(short_w)}) against "
                           f"a budget of {budget * 100:.4g}% ({_num(objective)}% over 30 days); at this "
                           f"rate the whole budget is spent in {format_duration(SLO_PERIOD_S / factor)}.",
        }
        anns = {k: Template.parse(v, by or ()) for k, v in default_ann.items()}
        anns.update(annotations)
        rules.append(AlertRule(
            name=f"{_camel(name)}SLOBurnRate{suffix}", expr=" and ".join(map(str, conds)),
            conditions=conds, labels={"severity": "page", **labels, "slo": name,
                                      "burn_rate_window": format_duration(long_w)},
            annotations=anns, slo=name))
    return rules


# --------------------------------------------------------------------------- engine

GroupKey = tuple[tuple[str, str], ...]


class Source(Protocol):
    """Where rule queries get their numbers: the window store."""

    def evaluate(self, query: catalog.Query, now: float) -> dict[GroupKey, float]:
        """Value per group (labels restricted to ``query.by``); a group with no data is absent."""


@dataclass
class ActiveAlert:
    """One alert of one rule for one group of series, as the state machine holds it."""

    group: str
    rule: str
    key: GroupKey
    state: str  # "pending" | "firing" | "resolved"
    labels: dict[str, str]
    annotations: dict[str, str]
    value: float
    active_at: float
    fired_at: Optional[float] = None
    resolved_at: Optional[float] = None
    last_sent_at: Optional[float] = None
    keep_firing_since: Optional[float] = None
    valid_until: Optional[float] = None
    scale: Optional[dict] = None  # the rule's scale action, rendered for this group


@dataclass(frozen=True)
class EvalError:
    group: str
    rule: str
    message: str


@dataclass
class EvalResult:
    now: float
    evaluated_groups: list[str]
    alerts: list[ActiveAlert]  # every alert held after this evaluation (copies)
    to_send: list[AlertMessage]
    errors: list[EvalError] = field(default_factory=list)  # rules whose query raised


def _needs_sending(a: ActiveAlert, now: float, resend_delay_s: float) -> bool:
    """Prometheus' ``needsSending``: never pending; resolved once; otherwise every resend delay."""
    if a.state == "pending":
        return False
    if a.resolved_at is not None and (a.last_sent_at is None or a.resolved_at > a.last_sent_at):
        return True
    return a.last_sent_at is None or a.last_sent_at + resend_delay_s < now


def _json_float(v: Optional[float]):
    return v if v is None or math.isfinite(v) else _go_float(v)


def _from_json_float(v) -> Optional[float]:
    return float(v.replace("+Inf", "inf")) if isinstance(v, str) else v


class RuleEngine:
    """The alert state machine of Prometheus' ``rules/alerting.go``, over a :class:`Source`.

    Call :meth:`evaluate` every ``eval_interval_s``; each group runs when its interval
    is due. Not thread-safe: the aggregator calls it from one loop.
    """

    def __init__(self, *, rules: RuleSet, clock: Callable[[], float] = time.time,
                 eval_interval_s: float = 1.0, resend_delay_s: float = 60.0,
                 resolved_retention_s: float = 900.0, generator_url: str = "",
                 restore_grace_s: float = 600.0):
        if not isinstance(rules, RuleSet):
            raise TypeError(f"rules must be a RuleSet from load_rules, not {type(rules).__name__}")
        for name, v in (("eval_interval_s", eval_interval_s), ("resend_delay_s", resend_delay_s),
                        ("resolved_retention_s", resolved_retention_s)):
            if not v > 0:
                raise ValueError(f"{name} must be above 0, got {v!r}")
        self._clock = clock
        self.eval_interval_s = float(eval_interval_s)
        self.resend_delay_s = float(resend_delay_s)
        self.resolved_retention_s = float(resolved_retention_s)
        # After a restore the windows are empty: a rule is held as it was until it has
        # seen its own window of new data (at most restore_grace_s, like Prometheus'
        # for-grace-period), instead of reading "no data" as "resolved".
        self.restore_grace_s = float(restore_grace_s)
        self._restored_at: Optional[float] = None
        self.generator_url = generator_url
        self._ruleset = rules
        self._alerts: dict[tuple[str, str], dict[GroupKey, ActiveAlert]] = {}
        self._next_due: dict[str, float] = {}

    @property
    def ruleset(self) -> RuleSet:
        return self._ruleset

    def _interval(self, group: RuleGroup) -> float:
        return group.interval_s or self.eval_interval_s

    def _due(self, group: RuleGroup, now: float) -> bool:
        due = self._next_due.get(group.name)
        # Half a tick of slack so a caller's timer firing a little early skips nothing.
        return due is None or now >= due - min(self.eval_interval_s, self._interval(group)) / 2

    def evaluate(self, source: Source, now: Optional[float] = None) -> EvalResult:
        now = self._clock() if now is None else now
        evaluated, to_send, errors = [], [], []
        for group in self._ruleset.groups:
            if not self._due(group, now):
                continue
            interval = self._interval(group)
            due = self._next_due.get(group.name, now) + interval
            self._next_due[group.name] = due if due > now else now + interval
            evaluated.append(group.name)
            for rule in group.rules:
                alerts = self._alerts.setdefault((group.name, rule.name), {})
                if self._warming(rule, now):
                    to_send.extend(self._send(rule, alerts, now, interval))
                    continue
                try:
                    matched = self._query(rule, source, now)
                except Exception as exc:  # a failing query leaves its alerts as they were
                    errors.append(EvalError(group.name, rule.name, f"{type(exc).__name__}: {exc}"))
                else:
                    self._step(group.name, rule, alerts, matched, now)
                to_send.extend(self._send(rule, alerts, now, interval))
        return EvalResult(now, evaluated, self.alerts(), to_send, errors)

    def _warming(self, rule: AlertRule, now: float) -> bool:
        if self._restored_at is None:
            return False
        window = max(c.query.window_s for c in rule.conditions)
        return now - self._restored_at < min(window, self.restore_grace_s)

    @staticmethod
    def _query(rule: AlertRule, source: Source, now: float) -> dict[GroupKey, float]:
        result: Optional[dict[GroupKey, float]] = None
        for cond in rule.conditions:
            values = source.evaluate(cond.query, now)
            held = {k: v for k, v in values.items() if cond.holds(v)}
            # ``and`` keeps the groups present on every side, with the first side's value.
            result = held if result is None else {k: v for k, v in result.items() if k in held}
        return result or {}

    def _step(self, group: str, rule: AlertRule, alerts: dict[GroupKey, ActiveAlert],
              matched: dict[GroupKey, float], now: float) -> None:
        for key, value in matched.items():
            series = dict(key)
            annotations = {k: t.render(value, series) for k, t in rule.annotations.items()}
            scale = rule.scale.render(value, series) if rule.scale else None
            a = alerts.get(key)
            if a is not None and a.state != "resolved":
                a.value, a.annotations, a.scale = value, annotations, scale
                a.labels = self._labels(rule, key)
                continue
            alerts[key] = ActiveAlert(
                group=group, rule=rule.name, key=key, state="pending", labels=self._labels(rule, key),
                annotations=annotations, value=value, active_at=now, scale=scale)
        for key, a in list(alerts.items()):
            if key not in matched:
                keep_firing = False
                if a.state == "firing" and rule.keep_firing_for_s > 0:
                    if a.keep_firing_since is None:
                        a.keep_firing_since = now
                    keep_firing = now - a.keep_firing_since < rule.keep_firing_for_s
                if a.state == "pending" or (
                        a.resolved_at is not None and now - a.resolved_at > self.resolved_retention_s):
                    del alerts[key]
                    continue
                if not keep_firing:
                    if a.state != "resolved":
                        a.state, a.resolved_at = "resolved", now
                    continue
            else:
                a.keep_firing_since = None
            if a.state == "pending" and now - a.active_at >= rule.for_s:
                a.state, a.fired_at = "firing", now

    @staticmethod
    def _labels(rule: AlertRule, key: GroupKey) -> dict[str, str]:
        return {**dict(key), **rule.labels, "alertname": rule.name}

    def _send(self, rule: AlertRule, alerts: dict[GroupKey, ActiveAlert], now: float,
              interval: float) -> list[AlertMessage]:
        out = []
        url = (f"{self.generator_url}?{urlencode({'expr': rule.expr})}"
               if self.generator_url else "")
        for a in alerts.values():
            if not _needs_sending(a, now, self.resend_delay_s):
                continue
            a.last_sent_at = now
            # Valid for four sends, so two lost evaluations or sends do not resolve it.
            a.valid_until = now + 4 * max(interval, self.resend_delay_s)
            out.append(AlertMessage(
                labels=dict(a.labels), annotations=dict(a.annotations),
                # Prometheus sends FiredAt as startsAt (what Alertmanager shows as "since").
                starts_at=a.fired_at if a.fired_at is not None else a.active_at,
                ends_at=a.resolved_at if a.state == "resolved" else a.valid_until,
                status="resolved" if a.state == "resolved" else "firing",
                generator_url=url, value=a.value))
        return out

    def alerts(self) -> list[ActiveAlert]:
        """Copies of every alert held: pending, firing, and resolved within retention."""
        out = []
        for alerts in self._alerts.values():
            for a in alerts.values():
                out.append(dataclasses.replace(a, labels=dict(a.labels),
                                               annotations=dict(a.annotations)))
        return out

    def alert_series(self) -> list[tuple[dict[str, str], str]]:
        """``ALERTS``: (labels, state) of every pending and firing alert."""
        return [(dict(a.labels), a.state) for alerts in self._alerts.values()
                for a in alerts.values() if a.state in ("pending", "firing")]

    # ------------------------------------------------------------ reload, persistence

    def _demote(self, rule: AlertRule, a: ActiveAlert, now: float) -> None:
        if a.state == "firing" and now - a.active_at < rule.for_s:
            a.state, a.fired_at, a.keep_firing_since = "pending", None, None

    def reload(self, ruleset: RuleSet, now: Optional[float] = None) -> None:
        """Swap in new rules; alerts of rules with the same group, name and expr carry over."""
        if not isinstance(ruleset, RuleSet):
            raise TypeError(f"reload takes a RuleSet from load_rules, not {type(ruleset).__name__}")
        now = self._clock() if now is None else now
        old = {(g.name, r.name): r for g, r in self._ruleset.rules()}
        old_intervals = {g.name: g.interval_s for g in self._ruleset.groups}
        kept: dict[tuple[str, str], dict[GroupKey, ActiveAlert]] = {}
        for group, rule in ruleset.rules():
            ident = (group.name, rule.name)
            prev = old.get(ident)
            if prev is None or prev.expr != rule.expr or ident not in self._alerts:
                continue
            kept[ident] = self._alerts[ident]
            for key, a in kept[ident].items():
                a.labels = self._labels(rule, key)
                self._demote(rule, a, now)
        self._alerts = kept
        self._next_due = {g.name: self._next_due[g.name] for g in ruleset.groups
                          if g.name in self._next_due and old_intervals.get(g.name, -1) == g.interval_s}
        self._ruleset = ruleset

    def state_dict(self) -> dict:
        """Alert state as JSON-serialisable data, for :meth:`restore` after a restart."""
        exprs = {(g.name, r.name): r.expr for g, r in self._ruleset.rules()}
        entries = []
        for (group, rule), alerts in self._alerts.items():
            for a in alerts.values():
                entries.append({
                    "group": group, "rule": rule, "expr": exprs.get((group, rule), ""),
                    "key": [list(p) for p in a.key], "labels": dict(a.labels),
                    "annotations": dict(a.annotations), "state": a.state,
                    "value": _json_float(a.value), "active_at": a.active_at,
                    "fired_at": a.fired_at, "resolved_at": a.resolved_at,
                    "last_sent_at": a.last_sent_at, "keep_firing_since": a.keep_firing_since,
                    "valid_until": a.valid_until})
        return {"version": 1, "alerts": entries}

    def restore(self, state: Mapping, now: Optional[float] = None) -> None:
        """Replace the alert state with ``state`` from :meth:`state_dict`.

        Alerts of rules that no longer exist (or whose expr changed) are ignored; a
        firing alert stays firing and is not re-sent before its resend time.
        """
        if not isinstance(state, Mapping) or state.get("version") != 1:
            raise ValueError("not a rule engine state (expected the dict from state_dict(), version 1)")
        now = self._clock() if now is None else now
        rules = {(g.name, r.name): r for g, r in self._ruleset.rules()}
        restored: dict[tuple[str, str], dict[GroupKey, ActiveAlert]] = {}
        for e in state.get("alerts", []):
            rule = rules.get((e["group"], e["rule"]))
            if rule is None or rule.expr != e["expr"]:
                continue
            if e["resolved_at"] is not None and now - e["resolved_at"] > self.resolved_retention_s:
                continue
            key: GroupKey = tuple((k, v) for k, v in e["key"])
            a = ActiveAlert(
                group=e["group"], rule=rule.name, key=key, state=e["state"], labels=self._labels(rule, key),
                annotations=dict(e["annotations"]), value=_from_json_float(e["value"]),
                active_at=e["active_at"], fired_at=e["fired_at"], resolved_at=e["resolved_at"],
                last_sent_at=e["last_sent_at"], keep_firing_since=e["keep_firing_since"],
                valid_until=e.get("valid_until"))
            self._demote(rule, a, now)
            restored.setdefault((e["group"], e["rule"]), {})[key] = a
        self._alerts = restored
        self._restored_at = now


# --------------------------------------------------------------------------- export

#: Annotation that says where an exported rule only approximates the monitor's own.
EXPORT_NOTE = "ray_monitor_export_note"
_GAUGE_OVER_TIME = {"avg": ("avg", "avg_over_time"), "min": ("min", "min_over_time"),
                    "max": ("max", "max_over_time"), "last": ("sum", "last_over_time"),
                    "sum": ("sum", "avg_over_time"), "count": ("sum", "count_over_time"),
                    "deriv": ("avg", "deriv")}
#: The rate window of the per-step signal a zscore is taken over in Prometheus.
_ZSCORE_STEP = "1m"


def _promql(q: catalog.Query) -> tuple[str, list[str]]:
    """The PromQL for one query over the /metrics names, and notes on any approximation."""
    metric = catalog.METRICS[q.metric]
    by = q.by or ()
    window = format_duration(q.window_s)
    notes: list[str] = []

    def sel(name: str, extra: str = "", win: Optional[str] = window) -> str:
        ms = [f"{m.label}{m.op}{_quote(m.value)}" for m in q.matchers] + ([extra] if extra else [])
        out = name + ("{" + ", ".join(ms) + "}" if ms else "")
        return out + (f"[{win}]" if win else "")

    def agg(op: str, inner: str) -> str:
        return f"{op} by ({', '.join(by)}) ({inner})" if by else f"{op} ({inner})"

    def hq(quant: float) -> str:
        return (f"histogram_quantile({_num(quant)}, sum by ({', '.join(by + ('le',))}) "
                f"(rate({sel(metric.prometheus + '_bucket')})))")

    fn, kind, base = q.function, metric.kind, metric.prometheus
    counter = f"{base}_total"
    if fn == "zscore":
        # The store's per-step value: counter rate, histogram mean, gauge average.
        step_rate = lambda name: agg("sum", f"rate({sel(name, win=_ZSCORE_STEP)})")  # noqa: E731
        signal = {"gauge": agg("avg", sel(base, win=None)),
                  "counter": step_rate(counter),
                  "histogram": f"{step_rate(base + '_sum')} / {step_rate(base + '_count')}"}[kind]
        notes.append(f"zscore is approximated over a {window} subquery of the {kind}'s "
                     f"{ {'gauge': 'average', 'counter': 'rate', 'histogram': 'mean'}[kind]}, "
                     "with the latest step in its history and no floor on the deviation")
        return (f"(({signal}) - avg_over_time(({signal})[{window}:])) / "
                f"stddev_over_time(({signal})[{window}:])"), notes
    if fn == "error_ratio":
        errors = catalog.METRICS["errors"].prometheus + "_total"
        requests = catalog.METRICS["requests"].prometheus + "_total"
        return f"{agg('sum', f'rate({sel(errors)})')} / {agg('sum', f'rate({sel(requests)})')}", notes
    if kind == "counter":
        return agg("sum", f"{'rate' if fn == 'rate' else 'increase'}({sel(counter)})"), notes
    if kind == "gauge":
        op, over_time = _GAUGE_OVER_TIME[fn]
        return agg(op, f"{over_time}({sel(base)})"), notes
    # histograms, over the classic buckets /metrics exposes
    if fn in catalog.SHORTHAND_QUANTILES or fn == "quantile":
        return hq(catalog.SHORTHAND_QUANTILES.get(fn, q.param)), notes
    if fn in ("min", "max"):
        notes.append(f"{fn} of a histogram is estimated from classic bucket bounds")
        return hq(0.0 if fn == "min" else 1.0), notes
    count_rate = agg("sum", f"rate({sel(base + '_count')})")
    if fn == "rate":
        return count_rate, notes
    if fn == "count":
        return agg("sum", f"increase({sel(base + '_count')})"), notes
    if fn == "sum":
        return agg("sum", f"increase({sel(base + '_sum')})"), notes
    if fn == "avg":
        return f"{agg('sum', 'rate(' + sel(base + '_sum') + ')')} / {count_rate}", notes
    # ratio_above: the share above a bound is 1 - (bucket at that bound / count)
    bounds = sorted(DEFAULT_CLASSIC_BOUNDS)
    bound = next((b for b in bounds if b >= q.param), bounds[-1])
    if bound != q.param:
        notes.append(f"ratio_above threshold {_num(q.param)}s is not a classic bucket bound; "
                     f"exported with le=\"{bound!r}\"")
    below = agg("sum", f"rate({sel(base + '_bucket', 'le=' + _quote(repr(bound)))})")
    return f"1 - ({below} / {count_rate})", notes


def _export_rule(rule: AlertRule) -> dict:
    parts, notes = [], []
    for cond in rule.conditions:
        text, n = _promql(cond.query)
        notes.extend(n)
        parts.append(f"{text} {cond.op} {_num(cond.threshold)}")
    expr = parts[0] if len(parts) == 1 else " and ".join(f"({p})" for p in parts)
    out: dict = {"alert": rule.name, "expr": expr}
    if rule.for_s:
        out["for"] = format_duration(rule.for_s)
    if rule.keep_firing_for_s:
        out["keep_firing_for"] = format_duration(rule.keep_firing_for_s)
    if rule.labels:
        out["labels"] = dict(rule.labels)
    annotations = {k: t.text for k, t in rule.annotations.items()}
    if notes:
        annotations[EXPORT_NOTE] = "; ".join(dict.fromkeys(notes))
    if annotations:
        out["annotations"] = annotations
    return out


def _is_model_rule(rule: AlertRule) -> bool:
    return any(catalog.is_model_query(c.query.function, c.query.metric) for c in rule.conditions)


def not_exported(ruleset: RuleSet) -> list[str]:
    """``group/alert`` of the rules over model quality or drift, which Prometheus cannot
    evaluate: their inputs (predictions joined with late feedback, drift counts) exist
    only inside the aggregator. /metrics shows their values over a fixed 1h window as
    ``ray_monitor_model_*`` and ``ray_monitor_drift_*`` gauges."""
    return [f"{g.name}/{r.name}" for g, r in ruleset.rules() if _is_model_rule(r)]


def export_prometheus(ruleset: RuleSet) -> dict:
    """The rule set as a Prometheus rule file (a dict), over the names on /metrics.

    SLO entries appear as the alerts they expand to; ``scale`` actions have no
    Prometheus equivalent and are left out, and so are rules over model quality or
    drift (see :func:`not_exported`; a group left empty is left out too).
    Approximations are named in the ``ray_monitor_export_note`` annotation of the rule.
    """
    groups = []
    for g in ruleset.groups:
        group: dict = {"name": g.name}
        if g.interval_s:
            group["interval"] = format_duration(g.interval_s)
        group["rules"] = [_export_rule(r) for r in g.rules if not _is_model_rule(r)]
        if group["rules"] or not g.rules:
            groups.append(group)
    return {"groups": groups}


def export_prometheus_yaml(ruleset: RuleSet) -> str:
    """:func:`export_prometheus` as YAML text for ``promtool check rules`` and Prometheus."""
    header = (f"# Prometheus rules exported by ray-monitor from {ruleset.file}.\n"
              f"# Scale actions are not exported; approximations are named in the "
              f"{EXPORT_NOTE} annotation.\n")
    skipped = not_exported(ruleset)
    if skipped:
        header += ("# Not exported: rules over model quality or drift have no Prometheus "
                   "equivalent (they are computed inside ray-monitor; /metrics has their "
                   "values over 1h as ray_monitor_model_* and ray_monitor_drift_* gauges): "
                   + ", ".join(skipped) + "\n")
    return header + yaml.safe_dump(export_prometheus(ruleset), sort_keys=False,
                                   allow_unicode=True, width=1000)
