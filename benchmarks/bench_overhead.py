"""In-process cost per call of ``@monitor``, against no instrumentation and against
the same signals written by hand with the OpenTelemetry SDK. No Ray cluster.

    .venv/bin/python benchmarks/bench_overhead.py [--calls 10000] [--repeats 7] [--json OUT]

Each method is a no-op, so what is measured is the instrumentation. Variants, for a
sync method (called N times in a loop) and an async one (``await m.coro()`` N times
inside one coroutine, on one event loop):

- ``unwrapped``: the plain class;
- ``monitor metrics``: ``@monitor(tracing_enabled=False)``;
- ``monitor unsampled``: ``@monitor(tracing_enabled=True, sample_ratio=0.0)``, the
  fast path that still keeps slow and failed requests;
- ``monitor sampled``: ``@monitor(tracing_enabled=True, sample_ratio=1.0)``;
- ``otel metrics`` / ``otel unsampled`` / ``otel sampled``: the same signals written by
  hand, idiomatically (pre-bound attribute dicts, ``time.perf_counter()`` around the
  body): a histogram record (seconds) and a counter add with the labels application,
  deployment, replica, method, model_version, outcome, and for the traced ones a SERVER
  span from ``start_as_current_span`` under ``ParentBased(TraceIdRatioBased(1 or 0))``.

Plus a streaming case: a generator (and an async generator) of 10 items, drained per
request, wrapped against unwrapped.

Both tracing sides export through a ``BatchSpanProcessor`` to the same no-op exporter,
so they pay the same export cost. The monitor's runtime builds its tracer from the
``OTEL_EXPORTER_OTLP_*`` variables and has no exporter argument, so after it starts
this script swaps in a ``tracing.Tracer`` identical but for the exporter. The
recorder's flush thread runs as in a replica (every 1 s; no sink outside Ray).

Variants run interleaved: every repeat runs every variant once, in a rotated order;
the figure is the median over repeats, the overhead is the median of the per-repeat
differences to ``unwrapped`` measured in the same repeat, and the ratio is the median
of per-repeat (monitor overhead / hand-written overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind

from ray_monitor import monitor
from ray_monitor.replica import tracing

US = 1000.0
TARGET_METRICS_NS = 3 * US
TARGET_UNSAMPLED_NS = 5 * US
STREAM_ITEMS = 10


class NullExporter(SpanExporter):
    """Accepts every batch and keeps nothing: export cost without a network."""

    def export(self, spans):
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


# -- the deployments under test -----------------------------------------------

def plain_class() -> type:
    class Model:
        def sync(self):
            return None

        async def coro(self):
            return None

        def gen(self):
            for i in range(STREAM_ITEMS):
                yield i

        async def agen(self):
            for i in range(STREAM_ITEMS):
                yield i
    return Model


def monitored(**options) -> object:
    cls = monitor(**options)(plain_class())
    m = cls()  # starts the runtime, as a replica's constructor does
    st = cls.__ray_monitor__.state
    old = st.tracer
    if old.enabled:
        st.tracer = tracing.Tracer(
            sample_ratio=old.sample_ratio, slow_threshold_s=old.slow_threshold_s,
            resource=dict(old.provider.resource.attributes), exporter=NullExporter(),
            on_failure=st.recorder.self_errors.count, enabled=True)
        old.shutdown()
    return m


def handwritten(*, traced: bool, sample_ratio: float = 1.0) -> object:
    """What a careful user would write with the OpenTelemetry SDK for the same signals."""
    resource = Resource.create({"service.name": "bench"})
    meter = MeterProvider(metric_readers=[InMemoryMetricReader()],
                          resource=resource).get_meter("bench")
    latency = meter.create_histogram("request.duration", unit="s")
    requests = meter.create_counter("requests", unit="{request}")
    base = {"application": "", "deployment": "Model", "replica": "bench", "model_version": ""}
    ok = {m: {**base, "method": m, "outcome": "ok"} for m in ("sync", "coro")}
    span_attrs = {m: {"ray.serve.application": "", "ray.serve.deployment": "Model",
                      "ray.serve.replica": "bench", "ray.serve.model_version": "",
                      "ray.serve.method": m} for m in ok}
    perf = time.perf_counter
    if not traced:
        class Model:
            def sync(self):
                t0 = perf()
                attrs = ok["sync"]
                try:
                    return None
                except Exception as e:
                    attrs = {**attrs, "outcome": type(e).__name__}
                    raise
                finally:
                    latency.record(perf() - t0, attrs)
                    requests.add(1, attrs)

            async def coro(self):
                t0 = perf()
                attrs = ok["coro"]
                try:
                    return None
                except Exception as e:
                    attrs = {**attrs, "outcome": type(e).__name__}
                    raise
                finally:
                    latency.record(perf() - t0, attrs)
                    requests.add(1, attrs)
        return Model()

    provider = TracerProvider(resource=resource,
                              sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    provider.add_span_processor(BatchSpanProcessor(NullExporter()))
    tracer = provider.get_tracer("bench")

    class TracedModel:
        def sync(self):
            with tracer.start_as_current_span("Model.sync", kind=SpanKind.SERVER,
                                              attributes=span_attrs["sync"]):
                t0 = perf()
                attrs = ok["sync"]
                try:
                    return None
                except Exception as e:
                    attrs = {**attrs, "outcome": type(e).__name__}
                    raise
                finally:
                    latency.record(perf() - t0, attrs)
                    requests.add(1, attrs)

        async def coro(self):
            with tracer.start_as_current_span("Model.coro", kind=SpanKind.SERVER,
                                              attributes=span_attrs["coro"]):
                t0 = perf()
                attrs = ok["coro"]
                try:
                    return None
                except Exception as e:
                    attrs = {**attrs, "outcome": type(e).__name__}
                    raise
                finally:
                    latency.record(perf() - t0, attrs)
                    requests.add(1, attrs)
    return TracedModel()


# -- timing ---------------------------------------------------------------------

def time_sync(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return (time.perf_counter_ns() - t0) / n


def time_gen(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        for _ in fn():
            pass
    return (time.perf_counter_ns() - t0) / n


async def _time_coro(fn, n: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        await fn()
    return (time.perf_counter_ns() - t0) / n


async def _time_agen(fn, n: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        async for _ in fn():
            pass
    return (time.perf_counter_ns() - t0) / n


def build_cases(loop: asyncio.AbstractEventLoop) -> dict[str, dict[str, Callable[[int], float]]]:
    """group -> variant -> run(n) returning ns per call. The first variant is the baseline."""
    plain = plain_class()()
    mon = {"monitor metrics": monitored(tracing_enabled=False),
           "monitor unsampled": monitored(tracing_enabled=True, sample_ratio=0.0),
           "monitor sampled": monitored(tracing_enabled=True, sample_ratio=1.0)}
    otel = {"otel metrics": handwritten(traced=False),
            "otel unsampled": handwritten(traced=True, sample_ratio=0.0),
            "otel sampled": handwritten(traced=True, sample_ratio=1.0)}
    every = {"unwrapped": plain, **mon, **otel}
    streams = {"unwrapped": plain, **mon}

    def sync(m):
        return lambda n: time_sync(m.sync, n)

    def coro(m):
        return lambda n: loop.run_until_complete(_time_coro(m.coro, n))

    def gen(m):
        return lambda n: time_gen(m.gen, n)

    def agen(m):
        return lambda n: loop.run_until_complete(_time_agen(m.agen, n))
    return {"sync": {k: sync(m) for k, m in every.items()},
            "async": {k: coro(m) for k, m in every.items()},
            f"generator x{STREAM_ITEMS}": {k: gen(m) for k, m in streams.items()},
            f"async generator x{STREAM_ITEMS}": {k: agen(m) for k, m in streams.items()}}


def measure(cases, calls: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    samples = {g: {v: [] for v in vs} for g, vs in cases.items()}
    for g, vs in cases.items():  # warm-up: caches, lazily created cells and attributes
        for run in vs.values():
            run(max(calls // 10, 100))
    for r in range(repeats):
        for g, vs in cases.items():
            names = list(vs)
            k = r % len(names)
            for name in names[k:] + names[:k]:  # rotate, so no variant always runs first
                gc.collect()
                samples[g][name].append(vs[name](calls))
    return samples


# -- report ---------------------------------------------------------------------

HANDWRITTEN = {"monitor metrics": "otel metrics", "monitor unsampled": "otel unsampled",
               "monitor sampled": "otel sampled"}


def verdict(variant: str, overhead: float, ratio: float | None) -> str:
    limit = {"monitor metrics": TARGET_METRICS_NS,
             "monitor unsampled": TARGET_UNSAMPLED_NS}.get(variant)
    checks = []
    if limit is not None:
        checks.append(overhead <= limit)
    if ratio is not None:
        checks.append(ratio < 1.0)
    if not checks:
        return ""
    return "PASS" if all(checks) else "MISS"


def summarize(samples) -> list[dict]:
    rows = []
    for group, vs in samples.items():
        base = vs["unwrapped"]
        over = {v: [x - b for x, b in zip(xs, base)] for v, xs in vs.items()}
        for v, xs in vs.items():
            hw = HANDWRITTEN.get(v)
            ratio = None
            if hw in vs:
                ratio = statistics.median(a / b for a, b in zip(over[v], over[hw]) if b > 0)
            row = {"group": group, "variant": v, "ns_per_call": statistics.median(xs),
                   "min_ns": min(xs), "max_ns": max(xs),
                   "overhead_ns": statistics.median(over[v]), "vs_handwritten": ratio}
            row["verdict"] = "" if v == "unwrapped" else verdict(v, row["overhead_ns"], ratio)
            rows.append(row)
    return rows


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def reference_ns() -> float:
    """``sum(range(100))``, best of 5: how fast this machine runs Python right now.
    On a shared host it moves by 2x within minutes, hence the interleaving."""
    import timeit

    return min(timeit.repeat("sum(range(100))", number=20000, repeat=5)) / 20000 * 1e9


def environment() -> dict:
    return {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "python": sys.version.split()[0], "cpu": cpu_model(), "cores": os.cpu_count(),
            "loadavg_start": os.getloadavg(), "reference_ns_start": reference_ns()}


def print_table(rows: list[dict]) -> None:
    print(f"{'case':<30}{'variant':<20}{'ns/call':>10}{'  min..max':<20}"
          f"{'overhead ns':>12}{'vs hand-OTel':>14}  verdict")
    group = None
    for r in rows:
        if r["group"] != group:
            group = r["group"]
            print()
        ratio = f"{r['vs_handwritten']:.2f}x" if r["vs_handwritten"] is not None else ""
        spread = f"  {r['min_ns']:.0f}..{r['max_ns']:.0f}"
        print(f"{r['group']:<30}{r['variant']:<20}{r['ns_per_call']:>10.0f}{spread:<20}"
              f"{r['overhead_ns']:>12.0f}{ratio:>14}  {r['verdict']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=10000, help="calls per variant per repeat")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds; median taken")
    ap.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.repeats < 1:
        ap.error("--calls and --repeats must be at least 1")

    # The monitor reads these when it starts; nothing here may export anywhere (and an
    # OTLP metrics endpoint would add an export per flush to the monitor's side only).
    for k in [k for k in os.environ if k.startswith("OTEL_EXPORTER_OTLP")]:
        del os.environ[k]
    env = environment()
    print(f"command: {env['command']}")
    print(f"python {env['python']}, cpu: {env['cpu']} ({env['cores']} cores), "
          f"load average at start: {env['loadavg_start']}")
    print(f"speed reference: sum(range(100)) takes {env['reference_ns_start']:.0f} ns")
    print("note: a shared, noisy machine gives noisy figures; compare within one run.")
    print(f"{args.calls} calls x {args.repeats} interleaved repeats per variant; "
          "no-op methods, so ns/call is the instrumentation's cost plus the loop's.\n")

    loop = asyncio.new_event_loop()
    try:
        cases = build_cases(loop)
        t0 = time.monotonic()
        samples = measure(cases, args.calls, args.repeats)
        elapsed = time.monotonic() - t0
    finally:
        loop.close()
    rows = summarize(samples)
    print_table(rows)
    env["loadavg_end"] = os.getloadavg()
    env["reference_ns_end"] = reference_ns()
    print(f"\ntargets: monitor metrics overhead <= {TARGET_METRICS_NS:.0f} ns, monitor "
          f"unsampled <= {TARGET_UNSAMPLED_NS:.0f} ns, and every monitor variant's overhead "
          "below its hand-written OpenTelemetry equivalent (vs hand-OTel < 1).")
    print(f"measured in {elapsed:.1f} s; load average at end: {env['loadavg_end']}; "
          f"speed reference at end: {env['reference_ns_end']:.0f} ns")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "calls": args.calls, "repeats": args.repeats,
                       "rows": rows, "samples_ns": samples}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
