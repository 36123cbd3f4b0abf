"""Options of ``@monitor``, checked at decoration time, with documented env fallbacks.

Checked in the driver when the class is decorated; resolved in each replica when it
starts.

An option passed to the decorator wins; an option not passed falls back to its
environment variable, read in the replica when it starts (so one image can be tuned
per cluster); a bad environment value is logged and the default used, as
OpenTelemetry's SDK does (see :mod:`ray_monitor.common.env`). A bad decorator argument raises at once, naming the option.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ray_monitor.common import env
from ray_monitor.common.errors import ConfigError

__all__ = ["ENV_VARS", "MonitorOptions", "UNSET", "from_env", "refuse"]


class _Unset:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"

    def __reduce__(self):
        return "UNSET"


#: "Not passed", as distinct from ``None``.
UNSET: Any = _Unset()


def refuse(option: str, message: str) -> ConfigError:
    """The error for a bad ``@monitor`` option: it names the option and the fix."""
    return ConfigError.one("@monitor", option, message)

#: The options that fall back to an environment variable when not passed.
ENV_VARS: dict[str, env.EnvVar] = {
    "sample_ratio": env.SAMPLE_RATIO,
    "slow_threshold_s": env.SLOW_THRESHOLD_S,
    "flush_interval_s": env.FLUSH_INTERVAL_S,
    "hang_threshold_s": env.HANG_THRESHOLD_S,
}


def _ratio(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise refuse(name, "expected a number between 0 and 1, "
                     f"got {type(v).__name__} {v!r}")
    if not 0.0 <= float(v) <= 1.0:
        raise refuse(name, f"{v!r} must be between 0 and 1 "
                     "(0.1 keeps one request in ten, plus every error and slow one)")
    return float(v)


def _positive(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise refuse(name, "expected seconds as a number, "
                     f"got {type(v).__name__} {v!r}")
    if not (float(v) > 0.0 and math.isfinite(float(v))):
        raise refuse(name, f"{v!r} must be a positive number of seconds")
    return float(v)


_CHECKS: dict[str, Callable[[str, Any], float]] = {
    "sample_ratio": _ratio, "slow_threshold_s": _positive, "flush_interval_s": _positive,
    "hang_threshold_s": _positive,
}


def from_env(name: str, environ: Optional[dict] = None) -> Any:
    """The environment's value for option ``name``, or its default if unset or bad."""
    return ENV_VARS[name].get(environ)


@dataclass(frozen=True)
class MonitorOptions:
    model_version: str = ""
    sample_ratio: Optional[float] = None  # None: from the environment at start
    slow_threshold_s: Optional[float] = None
    flush_interval_s: Optional[float] = None
    hang_threshold_s: Optional[float] = None
    exclude: frozenset[str] = frozenset()
    tracing_enabled: Optional[bool] = None  # None: on (aggregator copy; OTLP when configured)
    prediction: Optional[Callable[..., Any]] = None  # the extractor: result -> prediction dict
    prediction_input: bool = False  # call it as fn(result, args, kwargs)
    prediction_methods: tuple[str, ...] = ("__call__",)
    positive_label: Optional[str] = None
    tokens: Optional[Callable[[Any], Any]] = None  # result or last stream item -> usage
    tokens_auto: bool = True  # read OpenAI-shaped usage when there is no extractor
    tokens_input: bool = False  # call it as fn(result, args, kwargs) (see _takes_the_call)
    tenant: Optional[Callable[..., Any]] = None  # the call's arguments -> tenant name
    tenant_header: Optional[str] = None  # HTTP header naming the tenant (lower case)

    @classmethod
    def build(cls, **kwargs: Any) -> "MonitorOptions":
        out: dict[str, Any] = {}
        out.update(_prediction_options(kwargs.pop("prediction", UNSET),
                                       kwargs.pop("prediction_input", UNSET),
                                       kwargs.pop("prediction_methods", UNSET),
                                       kwargs.pop("positive_label", UNSET)))
        out.update(_genai_options(kwargs.pop("tokens", UNSET), kwargs.pop("tenant", UNSET),
                                  kwargs.pop("tenant_header", UNSET)))
        mv = kwargs.pop("model_version")
        if mv is not UNSET and mv is not None:
            if not isinstance(mv, str):
                raise refuse("model_version", "expected a string such as "
                             f"'v3', got {type(mv).__name__} {mv!r}")
            out["model_version"] = mv
        ex = kwargs.pop("exclude")
        if ex is not UNSET and ex is not None:
            if isinstance(ex, str) or not all(isinstance(n, str) for n in ex):
                raise refuse("exclude", "expected a list of method names, "
                             f"e.g. exclude=['health'], got {ex!r}")
            out["exclude"] = frozenset(ex)
        te = kwargs.pop("tracing_enabled")
        if te is not UNSET and te is not None:
            if not isinstance(te, bool):
                raise refuse("tracing_enabled", "expected True, False or "
                             f"None (auto), got {te!r}")
            out["tracing_enabled"] = te
        for name, v in kwargs.items():
            if v is UNSET or v is None:
                continue
            out[name] = _CHECKS[name](name, v)
        return cls(**out)

    def extractor(self, method: str) -> Optional[Callable[..., Any]]:
        """The prediction extractor of ``method``, or None when it has none."""
        return self.prediction if method in self.prediction_methods else None

    def resolved(self, name: str) -> Any:
        v = getattr(self, name)
        return from_env(name) if v is None else v


def _prediction_options(fn: Any, with_input: Any, methods: Any, positive: Any) -> dict[str, Any]:
    """Checks the model-quality options together: the others mean nothing without ``prediction``."""
    out: dict[str, Any] = {}
    if fn is UNSET or fn is None:
        given = [n for n, v in (("prediction_input", with_input), ("prediction_methods", methods),
                                ("positive_label", positive)) if v is not UNSET and v is not None]
        if given:
            raise refuse(given[0], "needs prediction=<extractor>, a function "
                         "from the method's result to {'label': ..., 'score': ...} or "
                             "{'value': ...}")
        return out
    if not callable(fn):
        raise refuse("prediction", "expected a function such as "
                     f"lambda result: {{'label': result['label']}}, got {type(fn).__name__} {fn!r:.60}")
    out["prediction"] = fn
    if with_input is not UNSET and with_input is not None:
        if not isinstance(with_input, bool):
            raise refuse("prediction_input", f"expected True or False, got {with_input!r}")
        out["prediction_input"] = with_input
    if methods is not UNSET and methods is not None:
        if isinstance(methods, str) or not methods or not all(
                isinstance(n, str) and n for n in methods):
            raise refuse("prediction_methods", "expected a non-empty list of "
                         f"method names, e.g. prediction_methods=['predict'], got {methods!r}")
        out["prediction_methods"] = tuple(dict.fromkeys(methods))
    if positive is not UNSET and positive is not None:
        from ray_monitor.quality.prediction import check_label

        try:
            out["positive_label"] = check_label(positive, "positive_label")
        except (TypeError, ValueError) as e:
            raise refuse("positive_label", f"{e}; it names the class whose score the "
                         "extractor returns") from None
    return out


def _takes_the_call(fn: Callable[..., Any]) -> bool:
    """Whether a ``tokens`` extractor asks for the request's arguments too: it cannot be
    called with the result alone but can with three positional arguments, as
    ``fn(result, args, kwargs)`` (``prediction_input``'s shape). An extractor of one
    argument, as before, is called as before."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: the old call
        return False
    try:
        sig.bind(None)
        return False
    except TypeError:
        pass
    try:
        sig.bind(None, (), {})
        return True
    except TypeError:
        return False


def _genai_options(tokens: Any, tenant: Any, header: Any) -> dict[str, Any]:
    """Token usage and tenant options (issue 14): extractors must be functions, the header a
    plain HTTP header name."""
    out: dict[str, Any] = {}
    if tokens is False:
        out["tokens_auto"] = False
    elif tokens is not UNSET and tokens is not None and tokens is not True:
        if not callable(tokens):
            raise refuse("tokens", "expected a function from the result (or a stream's last "
                         "item) to (input_tokens, output_tokens), True (OpenAI usage, the "
                         f"default) or False (off), got {type(tokens).__name__} {tokens!r:.60}")
        out["tokens"] = tokens
        out["tokens_input"] = _takes_the_call(tokens)
    if tenant is not UNSET and tenant is not None:
        if not callable(tenant):
            raise refuse("tenant", "expected a function of the call's arguments returning the "
                         f"tenant's name, got {type(tenant).__name__} {tenant!r:.60}")
        out["tenant"] = tenant
    if header is not UNSET and header is not None:
        if not isinstance(header, str) or not header or any(
                c.isspace() or c in ':()<>@,;\\"/[]?={}' for c in header):
            raise refuse("tenant_header", "expected an HTTP header name such as 'x-tenant', "
                         f"got {header!r:.60}")
        out["tenant_header"] = header.lower()
    return out
