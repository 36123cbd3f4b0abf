"""The ``prices:`` section of a rule file: what a model's tokens and GPU time cost.

Read where the rule file is read (through :mod:`ray_monitor.alerting.loader`); the
aggregator prices every request's exact token counts with it at ingestion
(:mod:`ray_monitor.aggregator.tenants`), so ``cost`` is a counter rules can alert on
(``sum(cost[1d]) by (application, deployment) > 50``). ::

    prices:
      toy-gpt:                    # the model the responses name (OpenAI "model")
        prompt_per_1k: 0.5        # per 1000 input tokens, in your currency
        completion_per_1k: 1.5    # per 1000 output tokens
        per_gpu_second: 0.0011    # per GPU-second its deployment's replicas held
      Embedder: {per_gpu_second: 0.0008}   # GPU time may be priced by deployment name too
      "*": {prompt_per_1k: 0.1, completion_per_1k: 0.2}   # any other model (optional)

Each part takes the first entry that prices it: tokens the model's, then ``*``; GPU time
the model the deployment's responses named last, then the deployment's name, then ``*``
(:mod:`ray_monitor.aggregator.gpu_cost` attributes the GPU-seconds). Every mistake is refused with the field path named (``prices.toy-gpt.prompt_per_1k``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ray_monitor.common.errors import ConfigError, Problem

__all__ = ["ANY_MODEL", "Price", "gpu_price_for", "parse_prices", "price_for",
           "token_prices_json"]

#: The key of the price used for models the table does not name.
ANY_MODEL = "*"
_TOKEN_KEYS = ("prompt_per_1k", "completion_per_1k")
_KEYS = _TOKEN_KEYS + ("per_gpu_second",)


@dataclass(frozen=True)
class Price:
    prompt_per_1k: float = 0.0
    completion_per_1k: float = 0.0
    per_gpu_second: Optional[float] = None  # None: this entry does not price GPU time
    tokens: bool = True  # False: the entry names no token price (GPU time only)

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
                                        f"{key!r}; use {', '.join(_KEYS)}"))
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    math.isfinite(v) and v >= 0):
                what = ("a price per GPU-second, a number >= 0 like 0.0011"
                        if key == "per_gpu_second" else
                        "a price per 1000 tokens, a number >= 0 like 0.5")
                problems.append(Problem(file, field=f"{path}.{key}",
                                        message=f"{v!r} must be {what}"))
            else:
                values[key] = float(v)
        out[model] = Price(**values, tokens=any(k in entry for k in _TOKEN_KEYS))
    if problems:
        raise ConfigError(problems)
    return out


def price_for(prices: Mapping[str, Price], model: str) -> Optional[Price]:
    """The token price of ``model``: its entry's, else ``*``'s, else None (no cost counted)."""
    for key in (model, ANY_MODEL):
        p = prices.get(key)
        if p is not None and p.tokens:
            return p
    return None


def token_prices_json(prices: Mapping[str, Price]) -> bytes:
    """The token prices as replicas read them (:data:`~ray_monitor.common.names.PRICES_KEY`):
    ``{model: [prompt_per_1k, completion_per_1k]}``, entries that price tokens only."""
    import json

    return json.dumps({m: [p.prompt_per_1k, p.completion_per_1k]
                       for m, p in prices.items() if p.tokens}, sort_keys=True).encode()


def gpu_price_for(prices: Mapping[str, Price], model: str, deployment: str) -> Optional[float]:
    """The price of one GPU-second of a deployment that serves ``model`` ("" unknown):
    the model's entry, else the deployment's, else ``*``'s; None: GPU time is not priced."""
    for key in (model, deployment, ANY_MODEL):
        p = prices.get(key) if key else None
        if p is not None and p.per_gpu_second is not None:
            return p.per_gpu_second
    return None
