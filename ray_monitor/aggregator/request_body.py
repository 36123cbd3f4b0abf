"""What a write request must be before the aggregator reads it: from where, of what type,
how large, how deep.

Runs in the aggregator actor, for the HTTP API's writes (rule reload, feedback, drift
references). Every refusal is a :class:`~ray_monitor.common.errors.BadRequest` that
names the field (``Origin``, ``Host``, ``Content-Type``, ``body``) and the fix:

- **Browsers.** A page on another site can make a browser POST to an address on the
  head node, but only as a "simple" request: a form or text type, or none, and with its
  own ``Origin``. So a write must say ``Content-Type: application/json`` (YAML for a rule
  file), which a page can only send after a CORS preflight this server never grants; an
  ``Origin`` header, when present, must be the server's own; and without a token (the
  loopback exception) ``Host`` must be a loopback name, which defeats DNS rebinding.
  ``curl`` and scripts send none of ``Origin`` and the right type with one flag.
- **Size.** A rule file up to :data:`MAX_RULES_BYTES`, other bodies up to
  :data:`MAX_JSON_BYTES`: 413 past that, before anything is parsed.
- **JSON.** Parsed by :func:`parse_json` a value at a time, giving the event loop back
  every few milliseconds, nesting at most :data:`MAX_JSON_DEPTH` deep, and without the
  NaN and Infinity that Python's parser accepts and JSON does not have.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from typing import Any, Optional
from urllib.parse import urlsplit

from aiohttp import web

from ray_monitor.common.errors import BadRequest

__all__ = ["JSON_TYPES", "LOOPBACK_HOSTS", "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_RULES_BYTES",
           "YAML_TYPES", "check_origin", "parse_json", "read_text"]

#: A rule file's largest size (the default rules are 5 KiB).
MAX_RULES_BYTES = 1024 * 1024
#: Largest feedback batch or drift reference body.
MAX_JSON_BYTES = 16 * 1024 * 1024
#: Deepest nesting of a JSON body (feedback items are 2 deep, drift references 3).
MAX_JSON_DEPTH = 32
JSON_TYPES = ("application/json",)
#: JSON is YAML, so a rule file may come as either.
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml",
              "application/json")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
#: Work done between two yields to the event loop while parsing.
_SLICE_S = 0.005


def _host_name(host: str) -> str:
    """``127.0.0.1:8266`` -> ``127.0.0.1``; ``[::1]:8266`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def check_origin(request: web.Request, *, content_types: tuple[str, ...],
                 loopback_exception: bool) -> None:
    """Refuses a write a web page could have made a browser send (see the module docstring).
    ``loopback_exception``: the write is allowed without a token because the server is
    bound to loopback; then ``Host`` must name loopback too."""
    host = request.headers.get("Host", "")
    origin = request.headers.get("Origin")
    if origin is not None:
        parts = urlsplit(origin)
        if origin == "null" or parts.netloc.lower() != host.strip().lower():
            raise BadRequest(f"Origin {origin[:100]!r} is not this server ({host[:100]}): "
                             "writes from other sites' pages are refused; send them from "
                             "curl, the CLI or Python", field="Origin", status=403)
    if loopback_exception and _host_name(host) not in LOOPBACK_HOSTS:
        raise BadRequest(f"Host {host[:100]!r} is not a loopback name: a monitor bound to "
                         "loopback without a token takes writes only addressed to 127.0.0.1, "
                         "localhost or ::1 (start it with token=... to write from elsewhere)",
                         field="Host", status=403)
    ctype = request.content_type  # without parameters; aiohttp says octet-stream when absent
    given = request.headers.get("Content-Type")
    if given is None or ctype not in content_types:
        raise BadRequest(f"Content-Type {given[:100] if given else 'missing'}: send "
                         f"'Content-Type: {content_types[0]}' (accepted: "
                         f"{', '.join(content_types)})", field="Content-Type", status=415)


async def read_text(request: web.Request, limit: int) -> str:
    """The body as text, refused with 413 past ``limit`` bytes (before reading it when the
    request says its length)."""
    length = request.content_length
    if length is not None and length > limit:
        raise BadRequest(f"body: {length} bytes is over the limit of {limit} bytes",
                         field="body", status=413)
    parts, size = [], 0
    while True:  # read() gives what has arrived; a body sent without a length is counted
        chunk = await request.content.read(min(limit + 1 - size, 1 << 20))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"body: over the limit of {limit} bytes", field="body", status=413)
    raw = b"".join(parts)
    try:
        return raw.decode(request.charset or "utf-8")
    except (UnicodeDecodeError, LookupError) as e:
        raise BadRequest(f"body: not {request.charset or 'utf-8'} text ({e})",
                         field="body") from None


# -- JSON, a value at a time ---------------------------------------------------------------

def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


_DECODER = json.JSONDecoder(parse_constant=_no_constants)
_SCAN = _DECODER.scan_once
_WS = re.compile(r"[ \t\n\r]*")


class _JsonError(ValueError):
    pass


def _parse_steps(text: str, max_depth: int):
    """A generator that parses ``text`` and returns its value (``StopIteration.value``),
    yielding every few milliseconds. Containers are walked here, scalars by the C
    scanner, so no single step is long and nesting is counted."""
    ws, scan, n = _WS.match, _SCAN, len(text)
    stack: list[tuple[Any, Optional[str]]] = []  # (container, pending key) ...
    i = ws(text, 0).end()
    deadline = time.perf_counter() + _SLICE_S
    value: Any = None
    while True:
        if time.perf_counter() > deadline:
            yield
            deadline = time.perf_counter() + _SLICE_S
        if i >= n:
            raise _JsonError(f"unexpected end of the body at character {i}")
        c = text[i]
        if c == "[" or c == "{":
            if len(stack) >= max_depth:
                raise _JsonError(f"nested deeper than {max_depth} levels at character {i}")
            container: Any = [] if c == "[" else {}
            i = ws(text, i + 1).end()
            close = "]" if c == "[" else "}"
            if i < n and text[i] == close:
                value, i = container, i + 1
            else:
                stack.append((container, None))
                if c == "{":
                    i = _key(text, i, stack)
                continue
        else:
            try:
                value, i = scan(text, i)
            except StopIteration:
                raise _JsonError(f"expected a value at character {i}") from None
            if value.__class__ is float and not math.isfinite(value):
                raise _JsonError(f"a number too large for a float at character {i}")
        # a value is complete: put it in its container, and close what is complete
        while True:
            if not stack:
                i = ws(text, i).end()
                if i != n:
                    raise _JsonError(f"extra data at character {i}")
                return value
            container, key = stack[-1]
            if key is None:
                container.append(value)
            else:
                container[key] = value
            i = ws(text, i).end()
            sep = text[i] if i < n else ""
            if sep == ",":
                i = ws(text, i + 1).end()
                if isinstance(container, dict):
                    i = _key(text, i, stack)
                break
            close = "]" if key is None else "}"
            if sep != close:
                raise _JsonError(f"expected ',' or '{close}' at character {i}")
            stack.pop()
            value, i = container, i + 1


def _key(text: str, i: int, stack: list) -> int:
    """Reads ``"key":`` at ``i`` into the top of ``stack``; returns where its value starts."""
    if i >= len(text) or text[i] != '"':
        raise _JsonError(f"expected a string key at character {i}")
    key, i = _SCAN(text, i)
    i = _WS.match(text, i).end()
    if i >= len(text) or text[i] != ":":
        raise _JsonError(f"expected ':' at character {i}")
    stack[-1] = (stack[-1][0], key)
    return _WS.match(text, i + 1).end()


async def parse_json(text: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``text`` as JSON, parsed without holding the event loop more than a few
    milliseconds at a time; a BadRequest naming ``body`` when it is not JSON, nests
    deeper than ``max_depth``, or holds NaN or Infinity."""
    steps = _parse_steps(text, max_depth)
    try:
        while True:
            next(steps)
            await asyncio.sleep(0)
    except StopIteration as done:
        return done.value
    except (ValueError, RecursionError) as e:  # _JsonError, the scanner's, the constants'
        raise BadRequest(f"body: not valid JSON: {str(e)[:200]}", field="body") from None
