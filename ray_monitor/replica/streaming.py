"""Streamed responses: timing each item, and what one stream or token-using request records.

Runs in every replica, on the request path: per item a clock read, a few additions and,
from the second item on, one histogram record into a histogram of the request's own (no
lock); per request, at its end, :func:`figures` turns the stream and its token usage into
what the recorder adds under its one lock (:meth:`Figures.add_to`).

Definitions (OpenTelemetry GenAI semantic conventions, with items standing for tokens
until the usage says how many tokens there were):

- time to first token: from the request's start to its first item;
- inter-item gap: between two consecutive items (one sample per gap);
- time per output token: ``(t_last - t_first) / (n - 1)``, ``n`` the output tokens when
  the usage is known, else the items; one sample per stream of ``n >= 2``;
- items per second: items over the request's whole duration.

The generator wrappers keep the kind of what they wrap (Serve inspects it) and make the
request's context current while the stream produces an item, never while the caller
holds it.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from ray_monitor.common.histogram import Histogram
from ray_monitor.common.snapshot import GenAIDelta
from ray_monitor.replica.genai import _MARK as _USAGE
from ray_monitor.replica.genai import Usage, extract

__all__ = ["Figures", "NO_USAGE", "Stream", "figures", "measure", "on_body", "record_usage",
           "timed_async_generator", "timed_generator"]

_perf = time.perf_counter

#: ``end(error, stream)``: how a wrapper reports the end of a stream (``error`` None: done).
End = Callable[[Optional[BaseException], Optional["Stream"]], None]


class Stream:
    """One stream's items so far: first and last times, count, gaps, and its last two items
    (kept by reference, for the usage an OpenAI stream sends last)."""

    __slots__ = ("t0", "first", "last", "items", "gaps", "tail", "prev", "streamed")

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.streamed = True  # False: an ASGI response sent in one body message
        self.first: Optional[float] = None  # seconds from t0 to the first item
        self.last = t0
        self.items = 0
        self.gaps: Optional[Histogram] = None
        self.tail: Any = None
        self.prev: Any = None

    def item(self, item: Any, now: float) -> None:
        if self.items:
            gaps = self.gaps
            if gaps is None:
                gaps = self.gaps = Histogram()
            gaps.record(now - self.last)
        else:
            self.first = now - self.t0
        self.items += 1
        self.last = now
        self.prev = self.tail
        self.tail = item


class Figures:
    """What one request adds to its method's stream and token series, and its span."""

    __slots__ = ("stream", "usage", "latency", "cost")

    def __init__(self, stream: Optional[Stream], usage: Optional[Usage], latency: float) -> None:
        self.stream = stream
        self.usage = usage
        self.latency = latency
        self.cost: Optional[float] = None  # at the replica's copy of the prices

    def time_per_token(self) -> Optional[float]:
        st = self.stream
        if st is None or st.first is None:
            return None
        n = self.usage.output_tokens if self.usage is not None else st.items
        if n < 2 or st.items < 2:
            return None
        return (st.last - st.t0 - st.first) / (n - 1)

    def add_to(self, d: GenAIDelta) -> None:
        """Records into ``d``; the caller holds the recorder's lock."""
        st, u = self.stream, self.usage
        if st is not None and st.items:
            tpot = self.time_per_token()
            if tpot is not None:
                (d.time_per_token or _set(d, "time_per_token")).record(tpot)
            if st.gaps is not None:
                (d.gaps or _set(d, "gaps")).merge(st.gaps)
            (d.items or _set(d, "items")).record(float(st.items))
            if self.latency > 0:
                (d.items_per_s or _set(d, "items_per_s")).record(st.items / self.latency)
        if u is not None:
            (d.input_tokens or _set(d, "input_tokens")).record(float(u.input_tokens))
            (d.output_tokens or _set(d, "output_tokens")).record(float(u.output_tokens))

    def span_attributes(self) -> dict:
        """GenAI span attributes (semantic conventions 1.41) and the monitor's own."""
        a: dict = {}
        st, u = self.stream, self.usage
        if st is not None:
            a["gen_ai.request.stream"] = True
            a["ray_monitor.stream.items"] = st.items
            if st.first is not None:
                a["gen_ai.response.time_to_first_chunk"] = st.first
            tpot = self.time_per_token()
            if tpot is not None:
                a["ray_monitor.stream.time_per_output_token"] = tpot
        if u is not None:
            a["gen_ai.usage.input_tokens"] = u.input_tokens
            a["gen_ai.usage.output_tokens"] = u.output_tokens
            if u.model:
                a["gen_ai.response.model"] = u.model
            if self.cost is not None:
                a["ray_monitor.request.cost"] = self.cost
        return a


def _set(d: GenAIDelta, name: str) -> Histogram:
    h = Histogram()
    setattr(d, name, h)
    return h


def figures(stream: Optional[Stream], result: Any, latency: float,
            tokens: Optional[Callable[[Any], Any]], auto: bool,
            call: Optional[tuple] = None) -> Optional[Figures]:
    """The figures of a finished request: its stream (None for a returned result) and the
    usage read from the stream's last items or the result (``tokens`` the user's
    extractor, called as ``tokens(item, *call)`` when ``call`` is the request's
    ``(args, kwargs)``; ``auto`` whether OpenAI shapes are read without one). None when
    there is nothing to add. Raises what the user's extractor raised."""
    usage = None
    if tokens is not None and call is not None:
        fn, args, kwargs = tokens, call[0], call[1] or {}
        tokens = lambda item: fn(item, args, kwargs)  # noqa: E731
    if tokens is not None or auto:
        if stream is not None:
            # OpenAI puts usage in the last chunk; data: [DONE] may follow it alone
            if stream.tail is not None:
                usage = extract(tokens, stream.tail)
                if usage is None and stream.prev is not None:
                    usage = extract(tokens, stream.prev)
        elif result is not None:
            usage = extract(tokens, result)
    if stream is None and usage is None:
        return None
    return Figures(stream, usage, latency)


#: Result types that never carry token usage.
NO_USAGE = frozenset({int, float, bool, type(None)})


def measure(runtime: Any, stream: Optional[Stream], result: Any,
            latency: float, call: Optional[tuple] = None) -> Optional[Figures]:
    """:func:`figures` with the deployment's options (``call``: the request's ``(args,
    kwargs)`` for an extractor that takes them); a failing extractor is counted
    (``tokens_extractor:<type>``) and the request goes on without usage; a failing price
    lookup is counted as itself (``span_cost:<type>``) and only the span's cost is lost."""
    opts = runtime.options
    if stream is None and opts.tokens is None:
        # A returned result that cannot carry OpenAI usage (what figures() would find
        # after five calls): none of them. Inside a replica each Python call of the
        # request path costs about 1 us (RESULTS.md §18), so the common case is cut short.
        kind = type(result)
        if not opts.tokens_auto or kind in NO_USAGE or (
                kind is str and _USAGE not in result) or (
                kind is dict and _USAGE not in result and "response" not in result):
            return None
    try:
        fig = figures(stream, result, latency, opts.tokens, opts.tokens_auto, call)
    except Exception as e:
        runtime.self_error(f"tokens_extractor:{type(e).__name__}", e)
        return figures(stream, None, latency, None, False)
    u = fig.usage if fig is not None else None
    if u is not None and runtime.state is not None:
        try:
            fig.cost = runtime.state.prices.cost(u.model, u.input_tokens, u.output_tokens)
        except Exception as e:  # the usage still counts; the span goes without its cost
            runtime.self_error(f"span_cost:{type(e).__name__}", e)
    return fig


def record_usage(recorder: Any, tenant: Optional[str], fig: Optional[Figures], error: bool,
                 latency: float) -> None:
    """Adds a finished request to the (model, tenant) table when it names a tenant or
    carried token usage."""
    u = fig.usage if fig is not None else None
    if tenant is None and u is None:
        return
    if u is None:
        recorder.usage.record("", tenant, error, latency, 0, 0, counted=False)
    else:
        recorder.usage.record(u.model, tenant or "", error, latency, u.input_tokens,
                              u.output_tokens)


def on_body(st: Optional[Stream], t0: float, message: dict) -> Stream:
    """Times one ``http.response.body`` message of an ASGI response: a response sent in
    several messages is a stream (its empty closing message is not an item)."""
    if st is None:
        st = Stream(t0)
        st.streamed = bool(message.get("more_body"))
    body = message.get("body")
    if body:
        st.item(body, _perf())
    return st


def timed_generator(gen, req: Any, end: End):
    """Yields from ``gen``, timing each item; ``end`` is called once when it stops.
    ``req`` (None: not monitored) has ``t0``, ``enter()`` and ``exit()``."""
    st = Stream(req.t0) if req is not None else None
    error = None
    try:
        while True:
            if req is not None:
                req.enter()
            try:
                item = next(gen)
            except StopIteration as stop:
                return stop.value
            finally:
                if req is not None:
                    req.exit()
            if st is not None:
                st.item(item, _perf())
            yield item
    except BaseException as e:
        error = e
        raise
    finally:
        gen.close()
        end(error, st)


async def timed_async_generator(agen, req: Any, end: End):
    """The async form of :func:`timed_generator` (also a StreamingResponse's body)."""
    st = Stream(req.t0) if req is not None else None
    error = None
    it = agen.__aiter__()
    try:
        while True:
            if req is not None:
                req.enter()  # the request's context while the stream produces an item
            try:
                item = await it.__anext__()
            except StopAsyncIteration:
                break
            finally:
                if req is not None:
                    req.exit()
            if st is not None:
                st.item(item, _perf())
            yield item
    except BaseException as e:
        error = e
        raise
    finally:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            await aclose()
        end(error, st)
