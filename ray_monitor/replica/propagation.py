"""One trace id and one sampling decision per request, carried over every handle call.

Runs in every replica of a monitored deployment, and in every Ray Serve process whose
tracing loads :func:`ray_monitor.tracing.serve_span_processors` (its HTTP proxy too).

Ray Serve hands the caller's trace context to the callee in
``RequestMetadata.tracing_context`` only when its own routing span is sampled, and not at
all when its tracing is off; left alone, every deployment would start a trace of its own
with a sampling decision of its own. So ray-monitor fills that field when Serve left it
empty, at the one place every handle call passes through
(``RunningReplica.try_send_request``: ``assign_request``, ``dispatch`` and ``broadcast``
all send there), with the caller's current span, sampled or not. Serve delivers it to the
callee, where it is ``_get_serve_request_context()._ray_trace_ctx`` (read whether Serve's
tracing is on or off), and where Serve's own replica span, when its tracing is on, takes
it as its parent, so Serve follows the same decision. The same dict carries the caller's
send time (:mod:`~ray_monitor.replica.queueing`), from which the callee knows how long the
request queued.

In Serve's proxy, a request that Serve's sampler declined and that came without a
``traceparent`` has no context at all; the proxy then sends a placeholder parent marked
``tracestate: ray_monitor=root``, which carries the "no" to the first deployment and is
never a span: a span under it is the root of its trace. Serve's proxy would also decide
twice (Ray 2.60): its routing span, started under no current span when the request span
was declined, is a root with a sampling decision of its own, so about 2% of requests
would be traced at 1%; :func:`one_decision_in_proxy` gives the proxy a sampler whose
roots are its request spans only.

What wins as the parent of a request's span is :func:`resolve`; the hook is
:func:`install`, once per process, feature-detected; if this Ray's internals differ it
says so once in the log and requests are linked only when Serve's sampler keeps them.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import logging
import random
import re
import threading
import time
from typing import Any, Callable, Optional

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import sampling

from ray_monitor.replica.queueing import SENT_AT, stamp

__all__ = ["BIT128", "BIT64", "CURRENT", "DECLINED", "PLACEHOLDER", "Parent",
           "TRACEPARENT_COMMON", "carrier", "current_get", "current_reset", "current_set",
           "install", "installed", "one_decision_in_proxy", "otel_current",
           "outgoing", "parse_traceparent", "request_root_sampler", "resolve"]

logger = logging.getLogger(__name__)

#: The monitored request running in this context (the middleware's request object, set
#: where it starts and reset where it ends), one variable for what were two (one set, one
#: reset and one read fewer per request: RESULTS.md §29). Its ``runtime``: the deployment
#: whose request it is (a public method the deployment calls on itself,
#: ``self.preprocess(x)``, is part of that request, not a request of its own); its
#: ``ctx_span``: the ``tracing.RequestSpan`` whose ids log records and handle calls made
#: here carry (the request's own; with tracing off, the enclosing monitored request's, or
#: None).
CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("ray_monitor_current",
                                                               default=None)
#: ``CURRENT``'s methods, bound once, for the modules that import it: CPython 3.11
#: compiles ``CURRENT.get()`` on an imported name as an attribute read, not a method
#: call, so each call looked the method up generically (the type cache, cold in a busy
#: replica) and made a bound-method object (RESULTS.md §29).
current_get, current_set, current_reset = CURRENT.get, CURRENT.set, CURRENT.reset

#: The tracestate entry of a placeholder parent (see the module's docstring).
PLACEHOLDER = "ray_monitor=root"
_TRACEPARENT = re.compile(
    r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*$")
#: The common form exactly (what every W3C propagator writes), matched first.
TRACEPARENT_COMMON = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_PROXY_ACTOR_PREFIX = "SERVE_PROXY_ACTOR"
#: ``hex(id | BIT64)[3:]`` is ``f"{id:016x}"`` for a 64-bit id (``BIT128``: ``:032x`` for
#: a 128-bit one): the bit above the id fixes the width, with no format spec parsed.
BIT64, BIT128 = 1 << 64, 1 << 128
_time = time.time


def _context_getter() -> Callable[[], Any]:
    """OpenTelemetry's current context, read straight from its ContextVar when its runtime
    context is the standard one (a C call, where ``otel_context.get_current`` is two
    Python frames: about 2 us inside a replica, per handle call and per log record);
    else through its API."""
    try:
        rc = otel_context._RUNTIME_CONTEXT
        var = rc._current_context
        if type(rc).__name__ == "ContextVarsRuntimeContext" and \
                isinstance(var, contextvars.ContextVar):
            return var.get
    except AttributeError:
        pass
    return otel_context.get_current


otel_current = _context_getter()


class Parent:
    """Where a request's span hangs: the ids of its parent and the sampling decision."""

    __slots__ = ("trace_id", "span_id", "sampled", "remote", "tracestate")

    def __init__(self, trace_id: int, span_id: int, sampled: bool, remote: bool = True,
                 tracestate: Optional[str] = None) -> None:
        self.trace_id = trace_id
        self.span_id = span_id  # 0: no parent span (a placeholder's "no", or a root)
        self.sampled = sampled
        self.remote = remote
        self.tracestate = tracestate

    def __repr__(self) -> str:
        return (f"Parent({self.trace_id:032x}, {self.span_id:016x}, sampled={self.sampled}, "
                f"remote={self.remote}, tracestate={self.tracestate!r})")


#: Ray Serve's tracing is on here, nothing came in, and Serve's span is not current: Serve
#: made the decision for this request (its replica span was a root) and it was "no".
DECLINED = Parent(0, 0, False, False)


def parse_traceparent(value: Any, tracestate: Any = None) -> Optional[Parent]:
    """A W3C ``traceparent`` (and ``tracestate``) as a :class:`Parent`, or None when it is
    not valid (as the spec asks, an invalid one is ignored, never an error)."""
    if not isinstance(value, str):
        return None
    m = TRACEPARENT_COMMON.fullmatch(value)  # one C-level match, 0.4 us
    if m is not None:
        version, tid, sid, flags = m.groups()
        rest = None
    else:
        m = _TRACEPARENT.match(value)
        if m is None:
            return None
        version, tid, sid, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(tid, 16), int(sid, 16)
    if not trace_id or not span_id:
        return None
    state = tracestate.strip() if isinstance(tracestate, str) and tracestate.strip() else None
    sampled = bool(int(flags, 16) & 1)
    if state is not None and PLACEHOLDER in state:
        entries = [e for e in state.split(",") if e.strip() and e.strip() != PLACEHOLDER]
        return Parent(trace_id, 0, sampled, True, ",".join(entries) or None)
    return Parent(trace_id, span_id, sampled, True, state)


def carrier(trace_id: int, span_id: int, sampled: bool,
            tracestate: Optional[str] = None) -> dict[str, str]:
    """The W3C headers of a span context, as Serve carries them (``tracing_context``)."""
    out = {"traceparent": f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"}
    if tracestate:
        out["tracestate"] = tracestate
    return out


def resolve(serve_span: Optional[Parent], from_caller: Optional[Parent],
            from_header: Optional[Parent], serve_decides: bool) -> Optional[Parent]:
    """The parent of a request's span; None: none, the request is a root (sample it).

    ``serve_span``: Ray Serve's replica span when it is current (sampled); ``from_caller``:
    the context the caller sent (``_ray_trace_ctx``: ray-monitor's, or Serve's own);
    ``from_header``: the HTTP ``traceparent``; ``serve_decides``: Serve's tracing is on
    here and handled this request, so its replica span was the head sampler when nothing
    came in. Serve's span wins when it continues what came in (the caller's context
    passes through the proxy, so the caller's trace id is the header's); a Serve span in
    another trace means Serve lost the caller's context (a proxy without Serve's tracing),
    and the caller's trace wins.
    """
    incoming = from_caller if from_caller is not None else from_header
    if serve_span is not None and (incoming is None or incoming.trace_id == serve_span.trace_id):
        return serve_span
    if incoming is not None:
        return incoming
    return DECLINED if serve_decides else None


# -- the caller's side: fill Serve's tracing_context ----------------------------------

_lock = threading.Lock()
_installed: Optional[bool] = None  # None: not tried yet in this process
_in_proxy: Optional[bool] = None
_failed = False
on_failure: Optional[Callable[[str, Optional[BaseException]], None]] = None


def installed() -> Optional[bool]:
    """Whether the hook is in place in this process (None: not tried)."""
    return _installed


_REQUEST_CONTEXT: Any = None  # Serve's request-context variable, looked up once


def _current_request() -> Any:
    global _REQUEST_CONTEXT
    if _REQUEST_CONTEXT is None:
        try:
            from ray.serve.context import _serve_request_context
        except ImportError:  # pragma: no cover - ray[serve] is a dependency
            return None
        _REQUEST_CONTEXT = _serve_request_context
    return _REQUEST_CONTEXT.get()


def _proxy() -> bool:
    global _in_proxy
    if _in_proxy is None:
        try:
            import ray

            name = ray.get_runtime_context().get_actor_name() or ""
        except Exception:
            name = ""
        _in_proxy = name.startswith(_PROXY_ACTOR_PREFIX)
    return _in_proxy


def outgoing() -> Optional[dict[str, str]]:
    """The context a handle call made here carries to its callee, or None.

    In order: a sampled span current here (ray-monitor's, or one under it: FastAPI's, a
    user's); the request's own ray-monitor span, sampled or not (an unsampled span
    current here is never exported, so a kept callee must not hang under it); the context
    that came in with this request (a replica without ``@monitor`` passes it on); any
    other valid current span (the proxy: the caller's ``traceparent``); in the proxy, a
    placeholder that carries its sampler's "no".
    """
    cur = CURRENT.get()
    rs = None if cur is None else cur.ctx_span
    if rs is not None and not otel_current():
        # No OpenTelemetry context here (Serve's tracing off, no user span): the request's
        # own span, without OpenTelemetry's lookups; every handle call of every request.
        return carrier(rs.trace_id, rs.span_id, rs.sampled, rs.tracestate)
    span = trace.get_current_span()
    sc = span.get_span_context()
    if sc.is_valid and sc.trace_flags & 1:
        return carrier(sc.trace_id, sc.span_id, True, _state_header(sc))
    if rs is not None:
        return carrier(rs.trace_id, rs.span_id, rs.sampled, rs.tracestate)
    req = _current_request()
    came_in = getattr(req, "_ray_trace_ctx", None) if req is not None else None
    if came_in and isinstance(came_in, dict) and came_in.get("traceparent"):
        return dict(came_in)
    if sc.is_valid:
        return carrier(sc.trace_id, sc.span_id, bool(sc.trace_flags & 1), _state_header(sc))
    if _proxy():
        return carrier(random.getrandbits(128) or 1, random.getrandbits(64) or 1, False,
                       PLACEHOLDER)
    return None


def _state_header(sc) -> Optional[str]:
    ts = sc.trace_state
    return ts.to_header() if ts else None


def _fill(metadata: Any, pr: Any = None) -> None:
    global _failed
    try:
        ctx = metadata.tracing_context
        if not ctx:
            ctx = outgoing()
            if ctx is not None:
                metadata.tracing_context = ctx
        if ctx is not None and pr is not None:
            stamp(ctx, pr)  # the caller's send time, for the callee's queue time
    except Exception as e:  # never into the user's call
        if on_failure is not None:
            on_failure("trace_propagation_failed", e)
        elif not _failed:
            _failed = True
            logger.warning("ray-monitor: carrying the trace context over a handle call failed "
                           "(logged once): %r", e)


def _wrap(original: Callable) -> Callable:
    @functools.wraps(original)
    def try_send_request(self, pr, *args, **kwargs):
        try:  # an attribute read, not getattr(): no cold type-cache lookup (RESULTS.md §27)
            md = pr.metadata
        except AttributeError:
            md = None
        if md is not None:
            rs = CURRENT.get()  # the request running here (see CURRENT), then its span
            if rs is not None and (rs := rs.ctx_span) is not None and \
                    not md.tracing_context and not otel_current():
                # _fill's common case without its three calls (each about 1 us inside a
                # replica): a monitored request's own span, no OpenTelemetry context here
                # (outgoing()'s first answer), and its send time (stamp())
                try:
                    tp = rs.tp  # the caller's text: the trace id without a 128-bit format
                    # hex(id | 2**bits)[3:] is f"{id:0{bits//4}x}" without the format-spec
                    # machinery, about 90 more cache lines of code run cold (§27)
                    tid = tp[3:35] if tp is not None else hex(rs.trace_id | BIT128)[3:]
                    ctx = {"traceparent": f"00-{tid}-{rs.sid}-"  # sid: text (span_ids)
                                          f"{'01' if rs.sampled else '00'}"}
                    if rs.tracestate:
                        ctx["tracestate"] = rs.tracestate
                    sent = pr.created_at  # (none: _fill below, which reads the clock)
                    ctx[SENT_AT] = sent if isinstance(sent, float) else _time()
                    md.tracing_context = ctx
                except Exception:
                    _fill(md, pr)  # the same again, where a failure is counted
            else:
                _fill(md, pr)
        return original(self, pr, *args, **kwargs)
    try_send_request.__ray_monitor_wrapped__ = True  # type: ignore[attr-defined]
    return try_send_request


def _missing() -> list[str]:
    """What of Ray Serve's internals the hook relies on is not there (empty: all is)."""
    missing = []
    try:
        from ray.serve._private.common import RequestMetadata
        from ray.serve._private.request_router.replica_wrapper import RunningReplica
        from ray.serve.context import _RequestContext
    except ImportError as e:
        return [f"import: {e}"]
    if not callable(getattr(RunningReplica, "try_send_request", None)):
        missing.append("RunningReplica.try_send_request")
    for cls, field in ((RequestMetadata, "tracing_context"), (_RequestContext, "_ray_trace_ctx")):
        if not dataclasses.is_dataclass(cls) or field not in {
                f.name for f in dataclasses.fields(cls)}:
            missing.append(f"{cls.__name__}.{field}")
    return missing


def install() -> bool:
    """Puts the caller-side hook in place, once per process; False (said once in the log)
    when this Ray's Serve lacks what it relies on."""
    global _installed
    if _installed is not None:
        return _installed
    with _lock:
        if _installed is not None:
            return _installed
        missing = _missing()
        if missing:
            logger.warning(
                "ray-monitor: this Ray Serve lacks %s, so the trace context is not carried "
                "over DeploymentHandle calls by ray-monitor: a request's spans in different "
                "deployments share a trace only when Ray Serve's own tracing samples it",
                ", ".join(missing))
            _installed = False
            return False
        from ray.serve._private.request_router.replica_wrapper import RunningReplica

        current = RunningReplica.try_send_request
        if not getattr(current, "__ray_monitor_wrapped__", False):
            RunningReplica.try_send_request = _wrap(current)
        _installed = True
        return True


# -- Serve's proxy: one decision ------------------------------------------------------

#: The names Serve's proxy gives its request spans when it starts them.
PROXY_REQUEST_SPANS = ("proxy_http_request", "proxy_grpc_request")


class _RequestRoots(sampling.Sampler):
    """Roots only for the proxy's request spans, decided as Serve's sampler does."""

    def __init__(self, ratio: float) -> None:
        self._ratio = sampling.TraceIdRatioBased(ratio)

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None,
                      links=None, trace_state=None):
        if name.startswith(PROXY_REQUEST_SPANS):
            return self._ratio.should_sample(parent_context, trace_id, name, kind, attributes,
                                             links, trace_state)
        return sampling.SamplingResult(sampling.Decision.DROP, None, trace_state)

    def get_description(self) -> str:
        return f"RequestRoots{{{self._ratio.get_description()}}}"


def request_root_sampler(ratio: float) -> sampling.Sampler:
    """Serve's proxy sampler (``ParentBasedTraceIdRatio(ratio)``) where only the request
    span may be a root; any other span with no parent (the routing span of a declined
    request) is not sampled. Children follow their parent, as before."""
    return sampling.ParentBased(root=_RequestRoots(ratio))


def one_decision_in_proxy() -> bool:
    """In Serve's proxy, before Serve builds its TracerProvider: its sampler becomes
    :func:`request_root_sampler`. Elsewhere, or if Serve differs, nothing (said once)."""
    if not _proxy():
        return False
    try:
        from ray.serve._private import tracing_utils
    except ImportError:  # pragma: no cover - ray[serve] is a dependency
        return False
    if not isinstance(getattr(tracing_utils, "ParentBasedTraceIdRatio", None), type):
        logger.warning("ray-monitor: Ray Serve's proxy has no ParentBasedTraceIdRatio to "
                       "replace; its routing spans may be sampled on their own")
        return False
    tracing_utils.ParentBasedTraceIdRatio = request_root_sampler
    return True
