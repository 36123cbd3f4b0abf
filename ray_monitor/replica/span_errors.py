"""How a request's exception reads on its span: the type and message the user wrote.

Runs in every replica, when a failed request's span is made.

An error raised by a downstream deployment reaches its caller wrapped by Ray
(``RayTaskError(KeyError)``, whose text is the remote traceback in terminal colours, often
a thousand characters and more). A span says what went wrong: ``exception.type`` is the
cause's type, ``exception.message`` its message, both without colour codes and bounded;
the remote traceback, cleaned and bounded, is the ``exception.stacktrace``. The outcome
label of the metrics is the same type name (see ``middleware._outcome``).
"""

from __future__ import annotations

import re
import traceback
from typing import Optional

__all__ = ["MAX_MESSAGE", "MAX_STACKTRACE", "clean", "error_type", "exception_attributes",
           "original_error"]

#: ``exception.message`` and the span's status description are cut to this many characters.
MAX_MESSAGE = 512
#: ``exception.stacktrace`` keeps its last this many characters (the innermost frames).
MAX_STACKTRACE = 8192
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")
_WRAPPER = "RayTaskError"


def clean(text: str, limit: int, keep_end: bool = False) -> str:
    """``text`` without terminal control sequences, at most ``limit`` characters."""
    text = _ANSI.sub("", text)
    if len(text) <= limit:
        return text
    return "..." + text[-(limit - 3):] if keep_end else text[:limit - 3] + "..."


def _is_wrapper(e: BaseException) -> bool:
    return any(k.__name__ == _WRAPPER and k.__module__.startswith("ray")
               for k in type(e).__mro__)


def original_error(e: BaseException) -> BaseException:
    """The exception the user's code raised: Ray's task-error wrappers taken off."""
    for _ in range(8):  # a chain of wrappers is short; a cycle must not hang the request
        cause = getattr(e, "cause", None) if _is_wrapper(e) else None
        if not isinstance(cause, BaseException) or cause is e:
            return e
        e = cause
    return e


def error_type(e: BaseException) -> str:
    """The name ``exception.type`` and the outcome label use (as the SDK: the qualname)."""
    return type(original_error(e)).__qualname__


def exception_attributes(e: BaseException, stack: bool = True) -> dict:
    """The ``exception`` event's attributes (OpenTelemetry's semantic conventions)."""
    cause = original_error(e)
    attrs = {"exception.type": type(cause).__qualname__,
             "exception.message": clean(str(cause), MAX_MESSAGE)}
    if stack:
        if cause is not e:
            text: Optional[str] = str(e)  # Ray's text of a wrapper is the remote traceback
        else:
            text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        attrs["exception.stacktrace"] = clean(text, MAX_STACKTRACE, keep_end=True)
    return attrs
