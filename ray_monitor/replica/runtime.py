"""What a monitored deployment holds inside its replica process once it starts.

Runs in every replica (built in the driver, started where it lands).

The decorator creates a :class:`Runtime` in the driver; it travels to the replica
with the class (pickled without its live parts) and starts when the replica builds
the deployment (or on the first call of a function deployment): it finds out which
replica it is, creates the recorder and the tracer, and starts the flush loop.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import socket
import threading
import time
from typing import Any, Optional

from ray_monitor.common import env
from ray_monitor.replica.prices import PriceBoard
from ray_monitor.replica import otlp_refusal, propagation, span_ids, tracing
from ray_monitor.replica.options import MonitorOptions
from ray_monitor.replica.export_worker import quiet_otel_export_logs
from ray_monitor.replica.recorder import Recorder, SelfErrors, process_health
from ray_monitor.common.snapshot import ReplicaIdentity

__all__ = ["Runtime", "resolve_identity"]

logger = logging.getLogger(__name__)

#: How long closing a replica waits for the OTLP exporters (a dead endpoint retries for
#: seconds); the last snapshot to the aggregator never waits on them longer than this.
CLOSE_EXPORT_WAIT_S = 2.0


def resolve_identity(model_version: str) -> ReplicaIdentity:
    """Who we are: from Ray Serve's replica context, or ``deployment="unknown"``
    outside Serve (a plain class in a unit test, a script)."""
    app, dep, rep = "", "unknown", f"{socket.gethostname()}:{os.getpid()}"
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        app, dep, rep = ctx.app_name, ctx.deployment, ctx.replica_id.unique_id
    except Exception:
        pass
    node_id = ""
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    return ReplicaIdentity(application=app, deployment=dep, replica=rep, node_id=node_id,
                           pid=os.getpid(), model_version=model_version)


class LoopLag:
    """How late the replica's event loop runs a callback, measured from the flush thread."""

    def __init__(self, loop: Optional[asyncio.AbstractEventLoop]) -> None:
        self.loop = loop
        self.last: Optional[float] = None

    def __call__(self) -> Optional[float]:
        loop = self.loop
        if loop is None or loop.is_closed():
            return None
        t = time.perf_counter()

        def ran() -> None:
            self.last = time.perf_counter() - t
        try:
            loop.call_soon_threadsafe(ran)
        except RuntimeError:
            return None
        return self.last


class State:
    def __init__(self, runtime: "Runtime") -> None:
        opts = runtime.options
        self.identity = resolve_identity(opts.model_version)
        from ray_monitor.replica.delivery import make_sinks

        errors = SelfErrors()
        quiet_otel_export_logs()  # the OTel exporters' own logs, once per cause
        sink, on_flush = make_sinks(self.identity, on_failure=errors.count)
        # The aggregator's copy of kept spans: on unless tracing is off for the
        # deployment or RAY_MONITOR_TRACES=0.
        self.spans = tracing.SpanRecords() if opts.tracing_enabled is not False and \
            tracing.aggregator_traces_enabled() else None
        self.recorder = Recorder(identity=self.identity, sink=sink, on_flush=on_flush,
                                 flush_interval_s=opts.resolved("flush_interval_s"),
                                 spans=self.spans, self_errors=errors)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self.loop_lag = LoopLag(loop)
        self.prices = PriceBoard(on_failure=errors.count)  # the span's cost (issue 14)
        self.recorder.health = process_health(self.recorder, self.loop_lag,
                                              opts.resolved("hang_threshold_s"))
        ident = self.identity
        errors = self.recorder.self_errors
        self.tracer = tracing.Tracer(
            sample_ratio=opts.resolved("sample_ratio"),
            slow_threshold_s=opts.resolved("slow_threshold_s"),
            resource=_resource(ident), on_failure=errors.count,
            enabled=opts.tracing_enabled, records=self.spans)
        otlp_refusal.on_refused = errors.count
        if self.spans is not None and self.tracer.enabled:
            # Serve's own spans in this replica, sent with the rest of a kept request
            tracing.claim_serve_spans(self.spans, self.tracer.tail)
        # Empty values are left out: an attribute says something or is not there.
        self._base_attrs = {k: v for k, v in (
            ("ray.serve.application", ident.application),
            ("ray.serve.deployment", ident.deployment), ("ray.serve.replica", ident.replica),
            ("ray.serve.model_version", ident.model_version)) if v}
        self._attrs: dict[str, dict] = {}
        if self.tracer.enabled:
            tracing.install_log_correlation()
            # The request's context rides along every handle call made from here, and
            # the trace ids kept anywhere come back with the aggregator's answers.
            propagation.on_failure = errors.count
            propagation.install()
            self.recorder.kept = self.tracer.tail
            # span ids drawn ahead for the request path, refilled every flush
            span_ids.refill()
            self.recorder.after_snapshot = span_ids.refill
            if sink is not None:
                sink.on_kept = self.export_kept
            _say_who_samples(opts, self.tracer)

    def export_kept(self, trace_ids: list[str]) -> int:
        """Exports the held spans of kept traces, with every request that ended before
        (their spans are held when recorded: replica/deferred.py)."""
        self.recorder.drain()
        return self.tracer.export_kept(trace_ids)

    def span_attributes(self, method: str) -> dict:
        a = self._attrs.get(method)
        if a is None:
            a = self._attrs[method] = {**self._base_attrs, "ray.serve.method": method}
        return a


def _resource(ident: ReplicaIdentity) -> dict:
    attrs = {"service.instance.id": ident.replica, "ray.node.id": ident.node_id,
             "ray.serve.replica.id": ident.replica, "ray.serve.deployment": ident.deployment,
             "ray.serve.application": ident.application, "process.pid": ident.pid,
             "service.version": ident.model_version}
    if not env.OTEL_SERVICE_NAME.is_set():
        attrs["service.name"] = ident.application or ident.deployment
    return {k: v for k, v in attrs.items() if v != ""}


def _say_who_samples(opts: MonitorOptions, tracer: "tracing.Tracer") -> None:
    """With Ray Serve's tracing on, its sampler decides; a ratio of ours set anyway is
    not used, and the replica says so once."""
    if not tracer.serve_tracing:
        return
    given = "sample_ratio" if opts.sample_ratio is not None else \
        env.SAMPLE_RATIO.name if env.SAMPLE_RATIO.is_set() else None
    if given is not None:
        logger.warning(
            "ray-monitor: %s=%s is not used here: Ray Serve's tracing is on, so its sampler "
            "(RAY_SERVE_TRACING_SAMPLING_RATIO, in its proxy for HTTP requests) makes each "
            "request's one sampling decision and every deployment follows it",
            given, opts.resolved("sample_ratio"))


class Runtime:
    def __init__(self, target_name: str, options: MonitorOptions) -> None:
        self.target_name = target_name
        self.options = options
        self.hooks: list = []
        # An ASGI ingress labels its requests by route, never by these method names: they
        # get no zero series of their own (set by the ASGI wrapper, before start()).
        self.routed = False
        self.state: Optional[State] = None
        self._lock = threading.Lock()
        self._logged: set[str] = set()

    def start(self) -> State:
        state = self.state
        if state is not None:
            return state
        with self._lock:
            if self.state is None:
                state = State(self)
                opts = self.options
                # no tenant and no tokens function taking the call: the request path
                # then reads none of these options per request
                plain = opts.tenant is None and opts.tenant_header is None and \
                    not opts.tokens_input
                for hook in self.hooks:
                    hook.cells = state.recorder.method(hook.name)
                    hook.attrs = state.span_attributes(hook.name)
                    hook.plain = plain
                if self.routed:
                    state.recorder.routed = sorted({h.name for h in self.hooks} | {"__call__"})
                state.recorder.start()
                atexit.register(self.close)
                self.state = state
                for hook in self.hooks:  # last: a request seeing it finds the state whole
                    hook.state = state
        return self.state

    def self_error(self, cause: str, exc: Optional[BaseException] = None) -> None:
        st = self.state
        if st is not None:
            st.recorder.self_errors.count(cause, exc)
        elif cause not in self._logged:
            self._logged.add(cause)
            logger.warning("ray-monitor: %s: %r", cause, exc)

    def close(self) -> None:
        st = self.state
        if st is None:
            return
        st.recorder.drain()  # the requests that ended, while the tracer can end spans
        self.state = None
        for hook in self.hooks:
            hook.cells = hook.attrs = hook.plain = hook.state = None
        # First the tracer, so the spans it still holds go into the last flush; but the
        # SDK's batch processor flushes without a timeout, so never wait on it for long.
        _bounded(st.tracer.shutdown, CLOSE_EXPORT_WAIT_S, "tracer_shutdown_slow",
                 st.recorder.self_errors)
        if st.spans is not None:
            tracing.release_serve_spans(st.spans)
        st.prices.close()
        st.recorder.close()
        close_sink = getattr(st.recorder.sink, "close", None)  # the node socket (LocalSink)
        if close_sink is not None:
            try:
                close_sink()
            except Exception as e:  # stopping never raises into the replica
                st.recorder.self_errors.count(f"sink_close_failed:{type(e).__name__}", e)
        otlp = st.recorder.on_flush
        if otlp is not None and hasattr(otlp, "shutdown"):
            _bounded(otlp.shutdown, CLOSE_EXPORT_WAIT_S, "otlp_metrics_shutdown_slow",
                     st.recorder.self_errors)

    def __getstate__(self) -> dict[str, Any]:
        return {"target_name": self.target_name, "options": self.options, "hooks": self.hooks}

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__init__(d["target_name"], d["options"])
        self.hooks = d["hooks"]


def _bounded(fn, timeout: float, cause: str, errors: SelfErrors) -> None:
    """Runs ``fn`` on a daemon thread and waits at most ``timeout`` for it."""
    def run() -> None:
        try:
            fn()
        except Exception as e:
            errors.count(f"{cause}:{type(e).__name__}", e)
    t = threading.Thread(target=run, name="ray-monitor-close", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        errors.count(cause)
