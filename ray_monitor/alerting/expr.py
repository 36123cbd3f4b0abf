"""The expression language of alert rules and autoscaling targets.

``FUNCTION(METRIC{matchers}[WINDOW]) [by (LABELS)] OP NUMBER``, several joined by ``and``
(the same ``by`` on every side). Parsed and checked where a rule file is read (CLI,
driver, aggregator on reload): it decides whether a function applies to a metric, which
labels a selection may name, and what every mistake is called, with its position.
Functions and metrics come from :mod:`ray_monitor.common.catalog`; the aggregator's
stores answer the :class:`~ray_monitor.common.catalog.Query` each condition holds.
"""

from __future__ import annotations

import difflib
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ray_monitor.common import catalog
from ray_monitor.common.durations import format_duration, parse_duration

__all__ = ["LABEL_NAME", "Condition", "check_expr", "did_you_mean", "format_number", "nearest",
           "parse_expr", "quote"]

#: A Prometheus label name; alert and annotation names have the same shape.
LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
    "==": operator.eq, "!=": operator.ne}
_PARAM_FUNCTIONS = ("quantile", "ratio_above")
_ERROR_RATIO_METRICS = ("requests", "errors")


@dataclass(frozen=True)
class Condition:
    """One ``FUNCTION(METRIC[WINDOW]) by (...) OP NUMBER`` of an expression; ``op`` is
    None for ``absent_over_time(...)`` written without a comparison (any value holds)."""

    query: catalog.Query
    op: Optional[str]
    threshold: float

    def __str__(self) -> str:
        q = self.query
        sel = q.metric
        if q.matchers:
            sel += "{" + ", ".join(f'{m.label}{m.op}{quote(m.value)}' for m in q.matchers) + "}"
        sel += f"[{format_duration(q.window_s)}]"
        arg = f"{format_number(q.param)}, {sel}" if q.param is not None else sel
        by = f" by ({', '.join(q.by)})" if q.by is not None else ""
        if self.op is None:
            return f"{q.function}({arg}){by}"
        return f"{q.function}({arg}){by} {self.op} {format_number(self.threshold)}"

    def holds(self, value: float) -> bool:
        return self.op is None or _OPS[self.op](value, self.threshold)


def format_number(v: float) -> str:
    """A number as a rule file writes it: ``2``, ``0.5``, ``1e-06``."""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


def quote(s: str) -> str:
    """A label value in double quotes, escaped as PromQL reads it."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class _ExprError(Exception):
    def __init__(self, pos: int, message: str):
        super().__init__(message)
        self.pos = pos
        self.message = message


_IDENT_RE = re.compile(LABEL_NAME)
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
        name, c["metric_pos"] = self._regex(_IDENT_RE, "a metric name such as latency_seconds")
        c["metric"] = catalog.ALIASES.get(name, name)  # GenAI's word for a metric we keep
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
            rest = self.text[self.pos:]
            if c["function"] == catalog.ABSENT and (not rest or re.match(r"and\b", rest)):
                c["op"], c["threshold"] = None, 1.0  # Prometheus' form: absence alone
                return c
            raise _ExprError(self.pos, f"expected a comparison (> >= < <= == !=), {self._found()}")
        num, _ = self._regex(_NUMBER_RE, "a number to compare with")
        c["threshold"] = float(num)
        return c


def nearest(name: str, choices) -> Optional[str]:
    """The choice closest to a misspelt ``name``, if one is close."""
    near = difflib.get_close_matches(name, list(choices), n=1)
    return near[0] if near else None


def did_you_mean(name: str, choices, *, aside: bool = False) -> str:
    """``; did you mean 'x'?`` (with ``aside``: `` (did you mean 'x'?)``) to append to a
    message, or nothing when no choice is close."""
    near = nearest(name, choices)
    if near is None:
        return ""
    return f" (did you mean {near!r}?)" if aside else f"; did you mean {near!r}?"


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
                              f"{did_you_mean(label, labels)} (labels: {', '.join(labels)})")
        for label, op, value, pos in c["matchers"]:
            if label not in labels:
                errors.append(f"label {label!r} in a matcher{at(pos)} is not a label of {owner}"
                              f"{did_you_mean(label, labels)} (labels: {', '.join(labels)})")
            if op in ("=~", "!~"):
                try:
                    re.compile(value)
                except re.error as exc:
                    errors.append(f"matcher {label}{op}{quote(value)}{at(pos)} is not a valid "
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
        errors.append(f"unknown function {fn!r}{at(c['function_pos'])}{did_you_mean(fn, _ALL_FUNCTIONS)}"
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
        errors.append(f"unknown function {fn!r}{at(c['function_pos'])}{did_you_mean(fn, _ALL_FUNCTIONS)}"
                      f" (functions: {', '.join(sorted(_ALL_FUNCTIONS))})")
    metric = catalog.METRICS.get(metric_name)
    if metric is None:
        errors.append(f"unknown metric {metric_name!r}{at(c['metric_pos'])}"
                      f"{did_you_mean(metric_name, _ALL_METRICS)} (metrics: {', '.join(_ALL_METRICS)})")
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
        errors.append(f"quantile {format_number(c['param'])} is not between 0 and 1; write 0.95 for p95")
    if fn == "ratio_above" and c["param"] is not None and not c["param"] > 0:
        errors.append(f"ratio_above threshold {format_number(c['param'])} must be above 0 (seconds)")
    matchers, by = _check_selection(c, metric.labels if metric is not None else None,
                                    repr(metric_name), repr(metric_name), errors)
    if fn == catalog.ABSENT and metric is not None:
        _check_absent(c, metric_name, errors)
    if errors:
        return None, errors
    query = catalog.Query(function=fn, metric=metric_name, window_s=c["window_s"], by=by,
                          matchers=matchers, param=c["param"])
    return Condition(query, c["op"], c["threshold"]), []


def _check_absent(c: dict, metric: str, errors: list[str]) -> None:
    """What ``absent_over_time`` may select: it asks whether something reports."""
    bad_by = [b for b, _ in (c["by"] or []) if b not in catalog.ABSENT_BY]
    if bad_by:
        errors.append(f"absent_over_time(...) by (...) gives one group per deployment Ray Serve "
                      f"runs, so it can group by {' and '.join(catalog.ABSENT_BY)} only, "
                      f"not {', '.join(bad_by)}")
    if metric in catalog.REQUEST_METRICS and any(m[0] == "outcome" for m in c["matchers"]):
        errors.append("absent_over_time of a request series asks whether its replicas report "
                      "(every report samples each method, whatever the outcome); leave the "
                      "outcome matcher out")


def check_expr(text: Any) -> tuple[tuple[Condition, ...], list[str]]:
    """The conditions of an expression and every problem in it; no problems: it is good."""
    if not isinstance(text, str) or not text.strip():
        return (), ["must be a non-empty string; write it like "
                    "p99(latency_seconds[5m]) by (deployment) > 0.5"]
    try:
        raw = _ExprParser(text).parse()
    except _ExprError as exc:
        before = text[:exc.pos].strip()[-30:]
        return (), [f"syntax error at position {exc.pos}"
                    + (f' (after "{before}")' if before else "") + f": {exc.message}"]
    conds, errors = [], []
    for c in raw:
        cond, errs = _check_condition(c)
        errors.extend(errs)
        if cond is not None:
            conds.append(cond)
    if not errors and len({c.query.by for c in conds}) > 1:
        errors.append("every side of 'and' needs the same by (...), so that their groups line up; "
                      + " vs ".join(f"by ({', '.join(c.query.by or ())})" for c in conds))
    return (tuple(conds), []) if not errors else ((), errors)


def parse_expr(text: str) -> tuple[Condition, ...]:
    """Parse and check an expression; raises ``ValueError`` naming every problem in it."""
    conds, problems = check_expr(text)
    if problems:
        raise ValueError("; ".join(problems))
    return conds
