"""Token usage of a response: OpenAI-shaped ``usage`` objects, SSE chunks, and ``tokens=fn``.

Runs in every replica, once per request after the response is complete (never per item).

What counts as usage (the OpenAI API and the servers that copy it, vLLM and Ray Serve LLM):
a mapping or object with a ``usage`` holding ``prompt_tokens``/``completion_tokens``
(chat and legacy completions) or ``input_tokens``/``output_tokens`` (the Responses API,
also under ``response.usage`` of its ``response.completed`` event). A stream carries it
in its last chunk when the client set ``stream_options.include_usage``; a stream's last
two items are looked at (see :func:`~ray_monitor.replica.streaming.figures`), as
``data: [DONE]`` may come alone after it. Items may be the
chunk objects, the SSE text (``str`` or ``bytes``, several ``data:`` events in one), or a
list of them (Serve LLM's batches). Text is parsed only when it contains ``"usage"``,
so a stream without usage costs one substring search of its last items.

Nothing here raises: a shape it does not know is no usage (``None``).
"""

from __future__ import annotations

import json
from typing import Any, Callable, NamedTuple, Optional

__all__ = ["Usage", "check_tokens_result", "extract", "usage_of"]

_KEYS = (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens"))
_MARK = "usage"
_MARK_B = b'"usage"'
#: Text longer than this is not searched for usage: a response body that large is not an
#: OpenAI chat answer, and the search would cost more than the request's telemetry.
MAX_TEXT = 1 << 20
#: Items of a list (a batch of chunks) looked at from its end.
_LIST_TAIL = 4


class Usage(NamedTuple):
    input_tokens: int
    output_tokens: int
    model: str = ""


def _count(v: Any) -> Optional[int]:
    if type(v) is int and v >= 0:
        return v
    return None


def _from_mapping_usage(u: Any, model: Any) -> Optional[Usage]:
    getter = u.get if isinstance(u, dict) else (lambda k: getattr(u, k, None))
    for ki, ko in _KEYS:
        i, o = _count(getter(ki)), _count(getter(ko))
        if i is not None or o is not None:
            return Usage(i or 0, o or 0, model if isinstance(model, str) else "")
    return None


def _from_dict(d: dict) -> Optional[Usage]:
    u = d.get(_MARK)
    if u is not None:
        return _from_mapping_usage(u, d.get("model"))
    inner = d.get("response")  # Responses API: response.completed carries the response
    if isinstance(inner, dict) and inner.get(_MARK) is not None:
        return _from_mapping_usage(inner[_MARK], inner.get("model"))
    return None


def _from_text(text: Any) -> Optional[Usage]:
    if isinstance(text, (bytes, bytearray, memoryview)):
        if len(text) > MAX_TEXT or _MARK_B not in text:
            return None
        text = bytes(text).decode("utf-8", "replace")
    elif len(text) > MAX_TEXT or _MARK not in text:
        return None
    body = text.strip()
    if body.startswith("{"):  # a JSON body, not an event stream
        try:
            d = json.loads(body)
        except ValueError:
            return None
        return _from_dict(d) if isinstance(d, dict) else None
    # An event stream: the last data: event that carries usage wins.
    for line in reversed(body.splitlines()):
        if not line.startswith("data:") or _MARK not in line:
            continue
        try:
            d = json.loads(line[5:])
        except ValueError:
            continue
        if isinstance(d, dict):
            u = _from_dict(d)
            if u is not None:
                return u
    return None


def usage_of(obj: Any) -> Optional[Usage]:
    """The token usage ``obj`` carries (a response, a chunk, SSE text), or None."""
    try:
        if isinstance(obj, dict):
            return _from_dict(obj)
        if isinstance(obj, (str, bytes, bytearray, memoryview)):
            return _from_text(obj)
        if isinstance(obj, (list, tuple)):
            for x in obj[-1:-_LIST_TAIL - 1:-1]:
                u = usage_of(x)
                if u is not None:
                    return u
            return None
        if obj is None or isinstance(obj, (int, float, bool)):
            return None
        body = getattr(obj, "body", None)  # a Starlette Response with its body rendered
        if isinstance(body, (bytes, bytearray)):
            return _from_text(body)
        u = getattr(obj, _MARK, None)  # a pydantic ChatCompletion (openai, vLLM)
        if u is not None and not callable(u):
            return _from_mapping_usage(u, getattr(obj, "model", None))
    except Exception:  # an odd object's attribute raised: it carries no usage we can read
        return None
    return None


def check_tokens_result(raw: Any) -> Optional[Usage]:
    """What a ``tokens=fn`` extractor returned, as Usage; raises ValueError when it is
    neither None, ``(input, output)``, nor a mapping with ``input``/``prompt`` and
    ``output``/``completion`` counts (and optionally ``model``)."""
    if raw is None:
        return None
    if isinstance(raw, Usage):
        return raw
    if isinstance(raw, (tuple, list)) and len(raw) == 2:
        i, o = _count(raw[0]), _count(raw[1])
        if i is None or o is None:
            raise ValueError(f"token counts must be ints >= 0, got {raw!r:.80}")
        return Usage(i, o)
    if isinstance(raw, dict):
        i = raw.get("input", raw.get("prompt", raw.get("prompt_tokens", 0)))
        o = raw.get("output", raw.get("completion", raw.get("completion_tokens", 0)))
        ci, co, model = _count(i), _count(o), raw.get("model", "")
        if ci is None or co is None or not isinstance(model, str):
            raise ValueError(f"token counts must be ints >= 0 and model a string, got {raw!r:.80}")
        return Usage(ci, co, model)
    raise ValueError("a tokens extractor returns None, (input, output) or "
                     f"{{'input': n, 'output': m}}, got {type(raw).__name__}")


def extract(fn: Optional[Callable[[Any], Any]], obj: Any) -> Optional[Usage]:
    """``fn(obj)`` checked when the deployment has an extractor, else the OpenAI shapes.
    Raises only what ``fn`` raised or :func:`check_tokens_result` refused."""
    if fn is None:
        return usage_of(obj)
    return check_tokens_result(fn(obj))
