"""Runs in the GPU-stats actor on every node: how NVML failures are named and counted.

The sampler and the XID watcher both count a failing NVML call under
``"<call>:<reason>"`` in ``self_errors`` and log each cause once; this module decides the
reason's name (:func:`nvml_reason`) and keeps the counts (:class:`ErrorBook`).
"""

from __future__ import annotations

import logging
import threading

__all__ = ["ErrorBook", "nvml_reason"]


def nvml_reason(exc: BaseException) -> str:
    """``NVMLError_NotSupported`` -> ``NotSupported``; a missing attribute is a missing function."""
    if isinstance(exc, AttributeError):
        return "FunctionNotFound"
    name = type(exc).__name__
    return name[len("NVMLError_"):] if name.startswith("NVMLError_") else name


class ErrorBook:
    """Cumulative failure counts by cause, each cause logged once on ``log``. Thread-safe."""

    def __init__(self, what: str, log: logging.Logger) -> None:
        self._what = what
        self._log = log
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, cause: str, detail: object = "") -> None:
        with self._lock:
            first = cause not in self._counts
            self._counts[cause] = self._counts.get(cause, 0) + 1
        if first:
            self._log.warning("%s: %s (%s); counted in self_errors, logged once", self._what, cause, detail)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
