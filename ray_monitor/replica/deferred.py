"""Deferred recording: the end of a request, recorded on the flush thread.

Runs in every replica. On the request path (:func:`end`, called by the middleware) a
request that ended without an exception only reads the clock, takes its in-flight entry
out (so the in-flight gauge and hung-request detection stay live) and appends one tuple
to its recorder's queue (``Recorder.ended``, a ``collections.deque``: one atomic append,
no lock): the request object itself, whose call records it (:func:`record_queued`). The flush thread records it (:func:`record`): latency histogram, queue time,
token usage, span end with the tail-keeping and export decisions, exemplar. It drains
the queue at the start of every snapshot (``Recorder.drain``), so a snapshot holds every
request that ended before its flush began, and before exporting the spans of kept
traces. What is recorded does not change by waiting: latency and stream timings are
taken on the path, and token figures are read there from a returned result or a stream
(the tokens extractor is user code: it runs where it ran; a result is never queued).

Why: inside a Serve replica every Python call of the request path costs about 1 us, as
the replica evicts the monitor's code from the CPU's caches between requests (RESULTS.md
§18); on the flush thread the same work runs hot and in a batch (§21).

Not deferred: a request that raised (its exception holds the frames of user code, kept
alive no longer than the request), and an ASGI route's end (middleware._finish_route).
A full queue (the flush thread stuck) records on the path again, so memory stays bounded.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from opentelemetry import context as otel_context

from ray_monitor.common.snapshot import Exemplar
from ray_monitor.replica import queueing, streaming
from ray_monitor.replica.http_semantics import status_of
from ray_monitor.replica.propagation import current_reset
from ray_monitor.replica.genai import _MARK as USAGE
from ray_monitor.replica.streaming import NO_USAGE

__all__ = ["MAX_QUEUED", "end", "record", "record_queued"]

#: Ended requests waiting for the flush thread, per deployment and replica; past this
#: many (about 20 MB) the request path records its requests itself.
MAX_QUEUED = 65536
_perf = time.perf_counter


def end(req: Any, outcome: str, error: Optional[BaseException], is_error: bool,
        stream: Optional[streaming.Stream] = None, result: Any = None) -> None:
    """The request path's part of a request's end (``req``: a middleware ``_Request``).
    It first leaves the request's context (``_Request.exit``, inline: one Python frame
    less per request; a stream has left it already)."""
    token = req.otel_token
    if token is not None:
        req.otel_token = None
        otel_context.detach(token)
    token = req.ctx_token
    if token is not None:
        req.ctx_token = None
        current_reset(token)  # (bound once: see propagation.current_get)
    t1 = _perf()
    fig = None
    kind = type(result)
    if stream is not None or result is not None and (
            (opts := req.runtime.options).tokens is not None or opts.tokens_auto and not (
                kind in NO_USAGE or kind is str and USAGE not in result or
                kind is dict and USAGE not in result and "response" not in result)):
        # (without a stream or a tokens extractor, the results measure() answers None
        # for after its own shortcut are left out here: one Python frame less; and with
        # no result, the options are not read: one object less touched cold, §27)
        # read now, on the thread that ran the request: a tokens extractor is user code,
        # and the queue never holds a result or a stream's last item (their memory)
        fig = streaming.measure(req.runtime, stream, result, t1 - req.t0, req.call)
    req.call = None  # the request's arguments (tokens=fn's): not held while queued
    queue = req.cells.ended
    if error is None and len(queue) < MAX_QUEUED:
        req.cells.running.pop(req.token, None)  # in flight no more, from now
        # the request object itself is queued (its call is record_queued): no tuple
        # made, and one object fewer for the garbage collector per request (§29)
        req.outcome = outcome
        req.is_error = is_error
        req.stream = stream
        req.fig = fig
        req.t1 = t1
        queue.append(req)
        return
    record(req, outcome, error, is_error, stream, fig, t1)


def record_queued(req: Any) -> None:
    """Records a request :func:`end` queued (the flush thread, through ``Recorder.drain``,
    as the request object's call)."""
    record(req, req.outcome, None, req.is_error, req.stream, req.fig, req.t1)


def record(req: Any, outcome: str, error: Optional[BaseException], is_error: bool,
           stream: Optional[streaming.Stream], fig: Any, t1: float) -> None:
    """Records one ended request (the flush thread; the request path for the few above)."""
    latency = t1 - req.t0
    runtime = req.runtime
    if req.tenant is not None or fig is not None and fig.usage is not None:
        streaming.record_usage(runtime.state.recorder, req.tenant, fig, is_error, latency)
    exemplar = None
    sp = req.span
    if sp is not None:
        extra = queueing.span_attributes(req.cells, req.token, fig)
        kept = req.tracer.end(sp, latency, error if is_error else None, extra,
                              error_status=outcome if is_error and error is None else None,
                              status=None if sp.http is None else status_of(outcome, is_error))
        if kept:  # the wall-clock time the request ended, not the time it is recorded
            exemplar = Exemplar(f"{sp.trace_id:032x}", sp.sid, latency,
                                time.time() - (_perf() - t1))
    req.cells.end(req.token, outcome, is_error, latency,
                  None if stream is None else stream.first, exemplar, fig)
