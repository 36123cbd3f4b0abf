"""``@monitor``: wraps every public method of a Ray Serve deployment.

Runs in the driver (decoration) and in every replica (each request): decides what is
wrapped, and what one request records.

Each wrapper has the same kind as what it wraps (sync, async, generator, async
generator), because Ray Serve decides how to call a method by inspecting it. Per
request it does a timer, a span's ids (see :mod:`tracing`) and queues the request's end
for the flush thread to record (see :mod:`deferred`), and any failure of its own is
counted and swallowed: the user's result or exception passes through untouched.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from types import AsyncGeneratorType, GeneratorType
from typing import Any, Callable, Optional

from opentelemetry import context as otel_context

from ray_monitor.replica import deferred, http_semantics, queueing, streaming
from ray_monitor.replica.http_semantics import (HTTP_TYPES, carry_traceparent, from_scope,
                                                is_http_type, method_label)
from ray_monitor.replica.propagation import current_get, current_reset, current_set
from ray_monitor.replica.queueing import SENT, SENT_AT
from ray_monitor.replica.span_errors import error_type
from ray_monitor.replica.options import UNSET, MonitorOptions, refuse
from ray_monitor.replica.capture import HttpResponse as _HttpResponse, capturing as _capturing
from ray_monitor.replica.runtime import Runtime
from ray_monitor.replica.usage import tenant_of
from ray_monitor.common.snapshot import OK, Exemplar

__all__ = ["monitor", "public_methods", "wrap_callable"]

logger = logging.getLogger(__name__)

#: Methods Ray Serve calls itself: passed through untouched.
SERVE_HOOKS = frozenset({"reconfigure", "check_health", "record_autoscaling_stats",
                         "__serve_build_asgi_app__"})
_CANCELLED = "cancelled"
_perf = time.perf_counter
_time = time.time


def monitor(target: Any = None, /, *, model_version: Any = UNSET, sample_ratio: Any = UNSET,
            slow_threshold_s: Any = UNSET, exclude: Any = UNSET, flush_interval_s: Any = UNSET,
            tracing_enabled: Any = UNSET, hang_threshold_s: Any = UNSET,
            prediction: Any = UNSET, prediction_input: Any = UNSET,
            prediction_methods: Any = UNSET, positive_label: Any = UNSET, tokens: Any = UNSET,
            tenant: Any = UNSET, tenant_header: Any = UNSET):
    """Monitor a Ray Serve deployment (a class, a function, or a ``Deployment``).

    Works bare (``@monitor``) and with options (``@monitor(model_version="v3")``),
    above or below ``@serve.deployment``. Bad options raise ``TypeError`` or
    ``ValueError`` here, naming the option.

    Model quality (opt-in): ``prediction=fn`` runs ``fn(result)`` (``fn(result, args,
    kwargs)`` with ``prediction_input=True``) after each successful call of the
    ``prediction_methods`` (default ``("__call__",)``); it returns ``{"label": L,
    "score": p}`` or ``{"value": x}``, optionally with ``"features": {name: value}``,
    or None to skip the request. Only that is kept, never the payload.
    ``positive_label`` is the class ``score`` is the probability of.

    Generative serving: ``tokens=fn`` reads ``(input, output)`` tokens from a result or a
    stream's last item (default: OpenAI ``usage``; ``False``: off); ``tenant=fn`` (the
    call's arguments) or ``tenant_header="x-tenant"`` names the tenant.
    """
    options = MonitorOptions.build(model_version=model_version, sample_ratio=sample_ratio,
                                   slow_threshold_s=slow_threshold_s, exclude=exclude,
                                   flush_interval_s=flush_interval_s,
                                   tracing_enabled=tracing_enabled,
                                   hang_threshold_s=hang_threshold_s, prediction=prediction,
                                   prediction_input=prediction_input,
                                   prediction_methods=prediction_methods,
                                   positive_label=positive_label, tokens=tokens, tenant=tenant,
                                   tenant_header=tenant_header)
    if target is None:
        return functools.partial(_apply, options=options)
    return _apply(target, options=options)


def _apply(target: Any, *, options: MonitorOptions):
    try:
        from ray.serve.deployment import Deployment
    except ImportError:  # pragma: no cover - ray[serve] is a dependency
        Deployment = ()
    if isinstance(target, Deployment):
        return target.options(func_or_class=_apply(target.func_or_class, options=options))
    if getattr(target, "__ray_monitor__", None) is not None:
        raise ValueError(f"{_name(target)} is already monitored: apply @monitor once")
    if inspect.isclass(target):
        return _wrap_class(target, options)
    if inspect.isfunction(target) or inspect.ismethod(target):
        return _wrap_function(target, options)
    raise TypeError(
        f"@monitor takes a deployment class, function or Deployment, got {target!r}; "
        "options are keyword-only, e.g. @monitor(model_version='v3')")


def _name(target: Any) -> str:
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))


def _is_asgi_wrapper(cls: type) -> bool:
    try:
        from ray.serve._private.http_util import ASGIAppReplicaWrapper
    except ImportError:  # pragma: no cover
        return False
    return issubclass(cls, ASGIAppReplicaWrapper)


def public_methods(cls: type, exclude: frozenset[str] = frozenset()) -> dict[str, Callable]:
    """The methods a handle can call: ``__call__`` and every public function."""
    out = {}
    for klass in reversed(cls.__mro__[:-1]):  # base first, so subclasses override
        for name, raw in vars(klass).items():
            if name != "__call__" and name.startswith("_"):
                continue
            if name in SERVE_HOOKS or name in exclude:
                out.pop(name, None)
                continue
            if inspect.isfunction(raw):
                out[name] = raw
            else:
                out.pop(name, None)  # staticmethod, property, attribute: not a request
    return out


def _wrap_class(cls: type, options: MonitorOptions) -> type:
    unknown = [n for n in options.exclude if not hasattr(cls, n)]
    if unknown:
        raise refuse("exclude", f"{cls.__name__} has no method "
                     f"{', '.join(map(repr, unknown))}; name methods of the class")
    asgi = _is_asgi_wrapper(cls)
    methods = public_methods(cls, options.exclude)
    if options.prediction is not None:
        _check_prediction_methods(cls.__name__, methods, options, asgi)
    runtime = Runtime(cls.__name__, options)
    ns: dict[str, Any] = {"__ray_monitor__": runtime, "__module__": cls.__module__,
                          "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
    for name, fn in methods.items():
        if asgi and name == "__call__":
            ns[name] = _wrap_asgi(fn, runtime)
        else:
            ns[name] = wrap_callable(fn, name, runtime)
    user_init = cls.__init__
    if inspect.iscoroutinefunction(user_init):
        async def __init__(self, *args, **kwargs):
            await user_init(self, *args, **kwargs)
            runtime.start()
    else:
        def __init__(self, *args, **kwargs):
            user_init(self, *args, **kwargs)
            runtime.start()
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    ns["__init__"] = __init__
    wrapped = type(cls.__name__, (cls,), ns)

    def __init_subclass__(sub, **kwargs):
        # @serve.ingress(app) above @monitor: Serve's ASGI wrapper serves every route.
        super(wrapped, sub).__init_subclass__(**kwargs)
        if _is_asgi_wrapper(sub) and not hasattr(sub.__call__, "__wrapped_by_ray_monitor__"):
            sub.__call__ = _wrap_asgi(sub.__call__, runtime)
    wrapped.__init_subclass__ = classmethod(__init_subclass__)
    return wrapped


def _check_prediction_methods(owner: str, methods: dict[str, Callable],
                              options: MonitorOptions, asgi: bool = False) -> None:
    for name in options.prediction_methods:
        fn = methods.get(name)
        if fn is None or (asgi and name == "__call__"):
            where = ("a FastAPI ingress is called per route; put the extractor on a deployment "
                     "it calls (the request id is shared)") if asgi else \
                f"monitored methods: {', '.join(sorted(methods)) or 'none'}"
            raise refuse("prediction_methods", f"{owner} has no monitored method "
                         f"{name!r} to take predictions from ({where})")
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise refuse("prediction_methods", f"{owner}.{name} streams its "
                         "result; predictions come from methods that return one value")


def _wrap_function(fn: Callable, options: MonitorOptions) -> Callable:
    # A function deployment is called as `__call__` through its handle.
    if options.prediction is not None:
        _check_prediction_methods(fn.__name__, {"__call__": fn}, options)
    runtime = Runtime(fn.__name__, options)
    wrapped = wrap_callable(fn, "__call__", runtime, bound=False)
    wrapped.__ray_monitor__ = runtime
    return wrapped


# -- the per-request part ------------------------------------------------------

class _Request:
    """State of one request between start and finish; lives only as long as it. Made by
    :func:`_start` (no ``__init__``: one Python frame less per request)."""

    __slots__ = ("cells", "token", "t0", "span", "ctx_token", "otel_token", "tracer", "runtime",
                 "ctx_span", "tenant", "call",
                 # how it ended, set by deferred.end when it queues the request itself
                 "outcome", "is_error", "stream", "fig", "t1")

    #: Queued by deferred.end, the request object is what the flush thread calls to record it.
    __call__ = deferred.record_queued

    def enter(self) -> None:
        """Makes this request the one running around user code (``CURRENT``: the
        deployment busy with it, its ids for log records and handle calls), and its span
        OpenTelemetry's current one there (child spans)."""
        self.ctx_token = current_set(self)
        sp = self.span
        if sp is not None and (sp.span is not None or self.tracer.attach_unsampled):
            self.otel_token = otel_context.attach(sp.otel_context())

    def exit(self) -> None:
        if self.otel_token is not None:
            otel_context.detach(self.otel_token)
            self.otel_token = None
        if self.ctx_token is not None:
            current_reset(self.ctx_token)
            self.ctx_token = None


def _tenant(hook: "_Hook", scope: Any, args: tuple, kwargs: Optional[dict]) -> Optional[str]:
    try:
        return tenant_of(hook.runtime.options, scope, args[hook.at:], kwargs)
    except Exception as e:  # a bad tenant function: the request goes on, as tenant ""
        hook.runtime.self_error(f"tenant_extractor:{type(e).__name__}", e)
        return ""


_REQUEST_CONTEXT: Any = None  # Serve's request-context variable, looked up once


def _serve_context() -> Any:
    """Ray Serve's context of the request running here (None outside Serve)."""
    global _REQUEST_CONTEXT
    var = _REQUEST_CONTEXT
    if var is None:
        try:
            from ray.serve.context import _serve_request_context as var
        except ImportError:  # pragma: no cover - ray[serve] is a dependency
            return None
        _REQUEST_CONTEXT = var
    return var.get()


def _outcome(e: BaseException) -> tuple[str, bool]:
    if isinstance(e, (asyncio.CancelledError, GeneratorExit)):
        return _CANCELLED, False  # the caller went away: not the server's fault
    # A downstream deployment's error arrives wrapped; label it by its cause, so one
    # KeyError reads the same in the deployment that raised it and its callers.
    return error_type(e), True


def _headers(args: tuple, i: int) -> Any:
    """The ASGI scope when argument ``i`` is a Starlette request (Serve's HTTP path)."""
    if len(args) <= i:
        return None
    http = HTTP_TYPES.get(type(args[i]))
    return args[i].scope if (is_http_type(type(args[i])) if http is None else http) else None


class _Hook:
    """What a wrapper needs, bound once: the runtime, the method's name and cells."""

    __slots__ = ("runtime", "name", "span_name", "cells", "attrs", "at", "plain", "state")

    def __init__(self, runtime: Runtime, name: str, at: int = 0) -> None:
        self.runtime = runtime
        self.at = at  # where the call's own arguments start (after `self`)
        self.name = name
        self.span_name = f"{runtime.target_name}.{name}"
        # bound by the runtime when it starts
        self.cells = self.attrs = self.plain = self.state = None

    def __getstate__(self):
        return {"runtime": self.runtime, "name": self.name, "span_name": self.span_name,
                "at": self.at}

    def __setstate__(self, state):
        self.runtime, self.name, self.span_name = (state["runtime"], state["name"],
                                                   state["span_name"])
        self.at = state.get("at", 0)
        self.cells = self.attrs = self.plain = self.state = None


def _start(hook: _Hook, scope: Any, asgi: bool = False, args: tuple = (),
           kwargs: Optional[dict] = None) -> Optional[_Request]:
    """A request starts: its timer, in-flight entry, queue time, span ids, and its context
    made current (:meth:`_Request.enter`), or None when it is not a request of its own (or
    the monitor failed: counted, and the request goes on unmonitored).

    One Python frame for what were six (``MethodCells.begin``, ``queueing.queue_of``,
    ``_Request.__init__``, ``enter``, ...): inside a replica each call of the request path
    costs about 1 us, as the replica evicts the monitor's code from the CPU's caches
    between requests (RESULTS.md §18, §22)."""
    runtime = hook.runtime
    cur = current_get()  # the monitored request running here, if any (one variable, §29)
    if cur is not None and cur.runtime is runtime:
        return None  # the deployment calling its own method: part of the same request
    try:
        req = _Request()
        req.runtime = runtime
        st = hook.state  # bound at start: the runtime object itself is not read (§27)
        if st is None:
            st = runtime.state or runtime.start()
            req.cells = cells = st.recorder.method(hook.name)
        else:
            req.cells = cells = hook.cells
        req.t0 = t0 = _perf()
        var = _REQUEST_CONTEXT  # Serve's request context, without a call once looked up
        ctx = var.get() if var is not None else _serve_context()
        # MethodCells.begin and queueing.queue_of, inline
        req.token = token = next(cells._ids)  # itertools.count is atomic under the GIL
        cells.running[token] = (t0, ctx.request_id if ctx is not None else "")
        carried = None
        if ctx is not None:
            try:  # an attribute read, not getattr(): no cold type-cache lookup (§27)
                carried = ctx._ray_trace_ctx
            except AttributeError:
                pass
        if carried and type(carried) is dict:
            sent = carried.get(SENT_AT)  # a float from this version (queueing.sent_time)
            if type(sent) is float:
                if sent - sent == 0.0:  # nan and inf are no time
                    q = _time() - sent
                    cells._queued[token] = q if q > 0.0 else 0.0
            elif SENT in carried:  # text, from a caller of the version before
                try:
                    q = _time() - int(carried[SENT]) * 1e-6
                    cells._queued[token] = q if q > 0.0 else 0.0
                except (TypeError, ValueError, OverflowError):
                    pass  # an unreadable send time: no queue time, as queue_of
        if hook.plain:  # bound at start: none of the options below
            req.tenant = req.call = None
        else:
            opts = runtime.options
            req.tenant = None if opts.tenant is None and opts.tenant_header is None else \
                _tenant(hook, scope, args, kwargs)
            req.call = (args[hook.at:], kwargs) if opts.tokens_input else None  # tokens=fn's
        req.tracer = tracer = st.tracer
        req.otel_token = None
        if tracer.enabled:
            # A plain HTTP ingress's route is Serve's route prefix; FastAPI's is its
            # template, known once the app has routed the request.
            http = None if scope is None else from_scope(
                scope, None if asgi or ctx is None else ctx.route)
            attrs = hook.attrs  # bound at start
            if attrs is None:
                attrs = st.span_attributes(hook.name)
            req.span = req.ctx_span = sp = tracer.begin(hook.span_name, attrs, ctx, http)
            # enter(), inline
            req.ctx_token = current_set(req)
            if sp.span is not None or tracer.attach_unsampled:
                req.otel_token = otel_context.attach(sp.otel_context())
        else:  # no span of its own: log records and handle calls carry the enclosing
            # monitored request's, if any (another deployment's, called in process)
            req.span = None
            req.ctx_span = None if cur is None else cur.ctx_span
            req.ctx_token = current_set(req)  # enter(), inline
        return req
    except Exception as e:
        runtime.self_error("middleware_failed", e)
        return None


def _done(hook: _Hook, req: Optional[_Request], outcome: str, error: Optional[BaseException],
          is_error: bool, stream: Optional[streaming.Stream] = None, result: Any = None) -> None:
    if req is None:
        return
    try:
        deferred.end(req, outcome, error, is_error, stream, result)  # leaves its context too
    except Exception as e:
        hook.runtime.self_error("middleware_failed", e)


def _end(hook: _Hook, req: Optional[_Request], outcome: str = OK,
         is_error: bool = False) -> streaming.End:
    """How a stream of ``req`` reports its end: ``outcome`` unless it raised."""
    def end(error: Optional[BaseException], stream: Optional[streaming.Stream]) -> None:
        if error is None:
            _done(hook, req, outcome, None, is_error, stream)
        else:
            failed, is_failure = _outcome(error)
            _done(hook, req, failed, error, is_failure, stream)
    return end


def wrap_callable(fn: Callable, name: str, runtime: Runtime, bound: bool = True) -> Callable:
    """Wraps one method (``bound``) or function, keeping its kind."""
    original = fn
    if runtime.options.extractor(name) is not None:
        fn = _capturing(fn, runtime, bound)
    at = 1 if bound else 0  # where a Starlette request would be: after `self`
    hook = _Hook(runtime, name, at)
    runtime.hooks.append(hook)

    if inspect.isasyncgenfunction(fn):
        async def wrapper(*args, **kwargs):
            req = _start(hook, _headers(args, at), False, args, kwargs)
            if req is not None:
                req.exit()
            timed = streaming.timed_async_generator(fn(*args, **kwargs), req, _end(hook, req))
            try:
                async for item in timed:
                    yield item
            finally:
                await timed.aclose()

    elif inspect.iscoroutinefunction(fn):
        async def wrapper(*args, **kwargs):
            kind = type(args[at]) if len(args) > at else type(None)  # _headers, inline
            # (through the module: Ray pickles this closure with a copy of its globals)
            http = http_semantics.HTTP_TYPES.get(kind)
            if http is None:
                http = is_http_type(kind)
            req = _start(hook, args[at].scope if http else None, False, args, kwargs)
            try:
                result = await fn(*args, **kwargs)
            except BaseException as e:
                outcome, is_error = _outcome(e)
                _done(hook, req, outcome, e, is_error)
                raise
            kind = type(result)
            if req is None or kind is GeneratorType or kind is AsyncGeneratorType or \
                    isinstance(result, _HttpResponse):
                return _finish(hook, req, result)
            try:  # _finish's common case, without its frame
                deferred.end(req, OK, None, False, None, result)
            except Exception as e:
                hook.runtime.self_error("middleware_failed", e)
            return result

    elif inspect.isgeneratorfunction(fn):
        def wrapper(*args, **kwargs):
            req = _start(hook, _headers(args, at), False, args, kwargs)
            if req is not None:
                req.exit()
            return (yield from streaming.timed_generator(fn(*args, **kwargs), req,
                                                         _end(hook, req)))

    else:
        def wrapper(*args, **kwargs):
            req = _start(hook, _headers(args, at), False, args, kwargs)
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:
                outcome, is_error = _outcome(e)
                _done(hook, req, outcome, e, is_error)
                raise
            return _finish(hook, req, result)

    functools.update_wrapper(wrapper, original)
    wrapper.__wrapped_by_ray_monitor__ = True
    return wrapper


def _finish(hook: _Hook, req: Optional[_Request], result: Any) -> Any:
    """Records a returned result. A returned (async) generator, as a plain function or an
    ``async def`` returns it (Serve LLM's servers do), and a streaming HTTP response
    (Starlette's ``StreamingResponse``) are timed to their last item."""
    kind = type(result)
    if req is not None and (kind is GeneratorType or kind is AsyncGeneratorType):
        req.exit()  # time the stream, not the call
        if kind is GeneratorType:
            return streaming.timed_generator(result, req, _end(hook, req))
        return streaming.timed_async_generator(result, req, _end(hook, req))
    if isinstance(result, _HttpResponse):
        status = result.status_code
        body = getattr(result, "body_iterator", None)
        if body is not None and req is not None:
            req.exit()
            result.body_iterator = streaming.timed_async_generator(
                body, req, _end(hook, req, str(status), status >= 500))
            return result
        _done(hook, req, str(status), None, status >= 500, None, result)
        return result
    if req is not None:  # _done, inline: the common case of every request
        try:
            deferred.end(req, OK, None, False, None, result)
        except Exception as e:
            hook.runtime.self_error("middleware_failed", e)
    return result


# -- FastAPI / ASGI ingress -----------------------------------------------------

def _method(scope: dict) -> str:
    return method_label(scope.get("method", "GET"))


def _route_label(scope: dict) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path is None:
        # No matched route (404, a plain ASGI app) or no path template (a Host route): a
        # fixed label keeps the label set bounded whatever clients try.
        return f"{_method(scope)} " + ("unmatched" if route is None else
                                       getattr(route, "name", None) or type(route).__name__)
    return f"{_method(scope)} {path}"


def _wrap_asgi(fn: Callable, runtime: Runtime) -> Callable:
    # Per-route cells: the method label is ``GET /items/{id}``.
    hook = _Hook(runtime, "__call__")
    runtime.routed = True

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await fn(self, scope, receive, send)
        status = [None, None]  # the response's status, and its body's timing (a Stream)

        async def send_status(message):
            kind = message.get("type")
            if kind == "http.response.start":
                status[0] = message.get("status")
            elif kind == "http.response.body" and req is not None:
                status[1] = streaming.on_body(status[1], req.t0, message)
            await send(message)

        req = None
        try:
            req = _start(hook, scope, True)
            if req is not None and req.span is not None and req.tracer.attach_unsampled:
                # FastAPI's own span (on with any global TracerProvider, as Serve's
                # tracing sets one) takes its parent from the headers alone.
                rs = req.span
                carry_traceparent(scope, rs.trace_id, rs.span_id, rs.sampled)
        except Exception as e:
            runtime.self_error("middleware_failed", e)
        error = None
        try:
            await fn(self, scope, receive, send_status)
        except BaseException as e:
            error = e
            raise
        finally:
            _finish_route(hook, req, scope, status[0], error, status[1])

    functools.update_wrapper(__call__, fn)
    __call__.__wrapped_by_ray_monitor__ = True
    return __call__


def _finish_route(hook: _Hook, req: Optional[_Request], scope: dict, status: Optional[int],
                  error: Optional[BaseException],
                  body: Optional[streaming.Stream] = None) -> None:
    if req is None:
        return
    try:
        req.exit()
        label = _route_label(scope)
        req.cells = hook.runtime.state.recorder.method(label)
        # the request was begun on the generic cells; move its in-flight entry
        hook_cells = hook.runtime.state.recorder.method(hook.name)
        hook_cells.running.pop(req.token, None)
        if error is not None and status is None:
            outcome, is_error = _outcome(error)
            if is_error:
                outcome = "500"
        else:
            outcome = str(status or 500)
            is_error = (status or 500) >= 500
        template = getattr(scope.get("route"), "path", None)
        attrs = {"http.route": f"{scope.get('root_path', '')}{template}"} if template else None
        if req.span is not None:
            req.span.name = label
            if req.span.span is not None:
                req.span.span.update_name(label)
        latency = _perf() - req.t0
        exemplar = fig = None
        stream = body if body is not None and body.streamed else None
        if body is not None:  # one body message: a returned result, maybe with usage
            fig = streaming.measure(hook.runtime, stream, None if stream else body.tail, latency,
                                    req.call)
        if req.tenant is not None or fig is not None and fig.usage is not None:
            streaming.record_usage(hook.runtime.state.recorder, req.tenant, fig, is_error,
                                   latency)
        attrs = queueing.span_attributes(req.cells, req.token, fig, attrs)
        if req.span is not None:
            kept = req.tracer.end(req.span, latency, error if is_error else None, attrs,
                                  error_status=outcome if is_error and error is None else None,
                                  status=status or (500 if is_error else None))
            if kept:
                exemplar = Exemplar(f"{req.span.trace_id:032x}", req.span.sid,
                                    latency, time.time())
        req.cells.end(req.token, outcome, is_error, latency,
                      None if stream is None else stream.first, exemplar, fig)
    except Exception as e:
        hook.runtime.self_error("middleware_failed", e)
