"""Span ids drawn ahead, as text, off the request path.

Runs in every replica of a monitored deployment with tracing on: the flush thread fills a
pool (:func:`refill`, every flush), the request path takes one id from it
(:data:`take`, one ``list.pop()``) and falls back to drawing one itself (:func:`draw`)
when the pool ran dry. Decides how many ids are drawn ahead: twice what the process took
between the last two refills (its recent request rate), at least :data:`MIN_POOL` and at
most :data:`MAX_POOL` (73 bytes each: 146 KiB at most, only at that rate). Several
monitored deployments in one process share the pool: a refill less than
:data:`MIN_GAP_S` after the last one (another flush thread's, on the same whole second)
does nothing, so it does not read "nothing taken" and give the pool back.

Why: a request's span id is needed on the path only as 16 hex digits (the handle call's
``traceparent``, log records); drawn and formatted there it ran the random generator's
and the int formatting's code cold, about 65 cache lines a hop in a busy replica
(RESULTS.md §29, §32); the int is made from the text where it is read (the flush thread).

The ids are what OpenTelemetry's ``RandomIdGenerator`` makes: ``random.getrandbits(64)``,
never zero. A forked child empties its copy of the pool (``os.register_at_fork``): the
parent's ids, taken in both processes, would be taken twice.
"""

from __future__ import annotations

import os
import random
import threading
import time

from ray_monitor.replica.propagation import BIT64

__all__ = ["MAX_POOL", "MIN_GAP_S", "MIN_POOL", "POOL", "draw", "refill", "reset", "take", "text"]

#: The fewest ids a refill leaves ready, and the most (the pool's memory bound).
MIN_POOL = 64
MAX_POOL = 2048
#: Refills closer together than this are one refill (see above).
MIN_GAP_S = 0.25
_bits = random.getrandbits

#: The ready ids (16 lower-case hex digits each); the path takes from its end.
POOL: list[str] = []
#: ``POOL.pop``, bound once (a method call on an imported name is an attribute read in
#: CPython 3.11: RESULTS.md §29). Raises IndexError when the pool is empty.
take = POOL.pop
_lock = threading.Lock()  # refills (one flush thread per monitored deployment), never the path
_left = 0  # the pool's length after the last refill
_target = MIN_POOL
_last = float("-inf")  # when the last refill ran (_clock)
_clock = time.monotonic


def text(value: int) -> str:
    """A 64-bit span id as its 16 lower-case hex digits (``f"{value:016x}"`` without the
    format-spec machinery: propagation.BIT64)."""
    return hex(value | BIT64)[3:]


def draw() -> str:
    """One span id drawn now (the pool ran dry): 16 hex digits, never all zero."""
    value = _bits(64)
    while not value:
        value = _bits(64)
    return text(value)


def refill(min_gap_s: float = MIN_GAP_S) -> int:
    """Tops the pool up for the next interval (the flush thread); returns how many ids it
    drew. Twice what was taken since the last refill; when the pool ran dry (requests drew
    their own), twice the last size. Nothing within ``min_gap_s`` of the last refill."""
    global _left, _target, _last
    with _lock:
        now = _clock()
        if now - _last < min_gap_s:
            return 0
        _last = now
        have = len(POOL)
        taken = max(0, _left - have)
        if have == 0 and _left > 0:
            target = _target * 2  # ran dry: how many more were wanted is not known
        else:
            target = taken * 2
        target = min(MAX_POOL, max(MIN_POOL, target))
        _target = target
        made = 0
        if have < target:
            new = [text(v) for v in [_bits(64) for _ in range(target - have)] if v]
            POOL.extend(new)
            made = len(new)
        elif have > target:  # the rate fell: give the memory back
            del POOL[target:]
        _left = len(POOL)
        return made


def reset() -> None:
    """Empties the pool (a forked child: the parent's ids are the parent's)."""
    global _left, _target, _lock, _last
    POOL.clear()
    _left, _target, _last = 0, MIN_POOL, float("-inf")
    _lock = threading.Lock()  # a fork while a refill held it would leave it held


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=reset)
