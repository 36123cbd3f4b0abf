"""The ``prices:`` section of a rule file: what a model's tokens cost.

Read where the rule file is read (through :mod:`ray_monitor.alerting.loader`); the
aggregator prices every request's exact token counts with it at ingestion
(:mod:`ray_monitor.aggregator.tenants`), so ``cost`` is a counter rules can alert on
(``sum(cost[1d]) by (application, deployment) > 50``). ::

    prices:
      toy-gpt:                    # the model the responses name (OpenAI "model")
        prompt_per_1k: 0.5        # per 1000 input tokens, in your currency
        completion_per_1k: 1.5    # per 1000 output tokens
      "*": {prompt_per_1k: 0.1, completion_per_1k: 0.2}   # any other model (optional)

Every mistake is refused with the field path named (``prices.toy-gpt.prompt_per_1k``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ray_monitor.common.errors import ConfigError, Problem

__all__ = ["ANY_MODEL", "Price", "parse_prices", "price_for"]

#: The key of the price used for models the table does not name.
ANY_MODEL = "*"
_KEYS = ("prompt_per_1k", "completion_per_1k")


@dataclass(frozen=True)
class Price:
    prompt_per_1k: float = 0.0
    completion_per_1k: float = 0.0

    def cost(self, input_tokens: float, output_tokens: float) -> float:
        return (input_tokens * self.prompt_per_1k + output_tokens * self.completion_per_1k) / 1000.0


def parse_prices(raw: Any, *, file: str) -> dict[str, Price]:
    """``{model: Price}`` of a ``prices:`` section (None: no prices); raises
    :class:`ConfigError` listing every problem."""
    if raw is None:
        return {}
    example = "prices: {my-model: {prompt_per_1k: 0.5, completion_per_1k: 1.5}}"
    if not isinstance(raw, Mapping):
        raise ConfigError.one(file, "prices", f"must be a mapping of model names, like {example}")
    problems, out = [], {}
    for model, entry in raw.items():
        path = f"prices.{model}"
        if not isinstance(model, str) or not model:
            problems.append(Problem(file, field=path, message="a model name must be a non-empty "
                                    "string (the model your responses name, or '*')"))
            continue
        if not isinstance(entry, Mapping) or not entry:
            problems.append(Problem(file, field=path, message=f"must be a mapping, like {example}"))
            continue
        values = {}
        for key, v in entry.items():
            if key not in _KEYS:
                problems.append(Problem(file, field=f"{path}.{key}", message=f"unknown key "
                                        f"{key!r}; use {' and '.join(_KEYS)}"))
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    math.isfinite(v) and v >= 0):
                problems.append(Problem(file, field=f"{path}.{key}", message=f"{v!r} must be a "
                                        "price per 1000 tokens, a number >= 0 like 0.5"))
            else:
                values[key] = float(v)
        out[model] = Price(**values)
    if problems:
        raise ConfigError(problems)
    return out


def price_for(prices: Mapping[str, Price], model: str) -> Optional[Price]:
    """The model's price, else the ``*`` price, else None (no cost counted)."""
    p = prices.get(model)
    return p if p is not None else prices.get(ANY_MODEL)
