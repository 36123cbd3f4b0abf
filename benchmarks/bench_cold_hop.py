"""``bench_overhead.py``'s "one Serve replica hop", one hop at a time with the CPU's caches
emptied before each, as a request finds them inside a busy replica.

    .venv/bin/python benchmarks/bench_cold_hop.py [--hops 2000] [--repeats 5] \
        [--evict-mb 48] [--json OUT]

In process, hop after hop, the monitor's code and data stay in the CPU's caches: a hop
costs 13-18 us at the defaults (``RESULTS.md`` §12). Inside a Serve replica each request
finds them evicted by everything the replica, Ray and the machine ran since the last
one, and the same Python code costs several times more (``RESULTS.md`` §18: about 1 us
per Python call on Serve's user-code thread, against 5.8 us for the whole monitored
method in a tight loop on that same thread). Here each hop is preceded by a walk over
``--evict-mb`` of memory (more than the CPU's last-level cache) and timed alone; the
variants take turns hop by hop. The figure is the median of each repeat's median hop
time, minus the unwrapped hop's.

``--parts`` adds variants of the default one with one piece taken out, to say where its
cost goes: ``Tracer.begin`` answering a ready-made span, the handle-call hook left out
(the unwrapped ``send``), the log-record factory left out (Ray's own). ``--ops`` times
single operations of the path instead, each after the walk (a regex match, an int
parsed from hex, a hex format, ...): the cold cost of one C routine.

Where the monitor defers part of a request to its flush thread (``replica/deferred.py``,
RESULTS.md §21), that part is not in the hop: after each repeat the queued requests are
recorded (``Recorder.drain``, as the flush thread does, with warm caches) and the time
per request is printed as ``deferred``, to add to the hop's for the replica's CPU (the
flush thread records the rest while the hops run, as in a replica).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_overhead import SERVE_HOP, US, serve_hop_cases  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hops", type=int, default=2000, help="hops per variant per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--evict-mb", type=int, default=48,
                    help="memory walked before each hop (0: hot, as bench_overhead.py)")
    ap.add_argument("--parts", action="store_true",
                    help="also the defaults with one piece out (where the cost goes)")
    ap.add_argument("--ops", action="store_true", help="time single operations instead")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    if args.ops:
        return cold_ops(args.hops, args.evict_mb)
    for k in [k for k in os.environ if k.startswith("OTEL_EXPORTER_OTLP")]:
        del os.environ[k]
    print(f"command: {' '.join(sys.argv)}; load average {os.getloadavg()}")
    buf = bytearray(args.evict_mb << 20)
    view = memoryview(buf)

    def evict() -> None:
        # One byte in every 64 (a cache line) written: the whole buffer passes through
        # the caches, pushing out what the last hop left there.
        view[::64] = b"\x01" * (len(buf) // 64)

    loop = asyncio.new_event_loop()
    caller = "00-0123456789abcdef0123456789abcdef-0123456789abcdef-00"
    cases = serve_hop_cases(loop, caller)[SERVE_HOP]
    if args.parts:
        cases.update(part_cases(loop, caller))
    for fn in cases.values():  # warm-up: first-call caches
        fn(200)
    per: dict[str, list[float]] = {v: [] for v in cases}
    from ray_monitor.replica.recorder import Recorder
    recorders = [o for o in gc.get_objects() if isinstance(o, Recorder)
                 and hasattr(o, "drain")]  # none before deferred recording
    drained = [0, 0.0]  # requests, seconds

    def drain() -> None:
        for rec in recorders:
            t0 = time.perf_counter()
            n = rec.drain()
            drained[1] += time.perf_counter() - t0
            drained[0] += n
    drain()
    drained[:] = [0, 0.0]
    try:  # the span ids drawn ahead, as the flush thread refills them within a second
        from ray_monitor.replica.span_ids import refill
        refill(0)
    except ImportError:  # a tree from before them
        pass
    for r in range(args.repeats):
        got: dict[str, list[float]] = {v: [] for v in cases}
        names = list(cases)
        for i in range(args.hops):
            for v in names[i % len(names):] + names[:i % len(names)]:
                if args.evict_mb:
                    evict()
                got[v].append(cases[v](1))
        drain()
        for v, xs in got.items():
            per[v].append(statistics.median(xs))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{v} {statistics.median(xs) / US:.1f} us" for v, xs in got.items()))
    loop.close()
    base = per["unwrapped"]
    rows = {v: {"median_us": statistics.median(xs) / US,
                "overhead_us": statistics.median(a - b for a, b in zip(xs, base)) / US,
                "overhead_min_us": min(a - b for a, b in zip(xs, base)) / US,
                "overhead_max_us": max(a - b for a, b in zip(xs, base)) / US}
            for v, xs in per.items()}
    print(f"\n{SERVE_HOP}, {'cold' if args.evict_mb else 'hot'} "
          f"({args.evict_mb} MB walked before each hop):")
    for v, row in rows.items():
        print(f"  {v:<20}{row['median_us']:8.1f} us  overhead {row['overhead_us']:+7.1f} us "
              f"({row['overhead_min_us']:+.1f}..{row['overhead_max_us']:+.1f})")
    per_request = drained[1] / drained[0] * 1e6 if drained[0] else 0.0
    print(f"  deferred: {per_request:.1f} us a request (warm, batched; timed on the "
          f"{drained[0]} requests left queued at the ends of repeats, the flush thread "
          "recorded the others)")
    print(f"load average at end {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows,
                       "deferred_us_per_request": per_request,
                       "per_repeat_ns": per}, f, indent=1)
    return 0


def part_cases(loop: asyncio.AbstractEventLoop, caller: str) -> dict:
    """The default variant ("monitor unsampled") with one piece taken out each."""
    import logging

    from ray.serve._private.common import RequestMetadata
    from ray.serve.context import _RequestContext, _serve_request_context

    from bench_overhead import PLAIN_RECORD_FACTORY, monitored, serve_pending
    from ray_monitor.replica import propagation

    class Hop:  # as bench_overhead's
        async def __call__(self, send, pending):
            send(None, pending, False)
            return None

    def send(self, pr, with_rejection):
        return pr
    hooked = propagation._wrap(send)
    md = RequestMetadata(request_id="r", internal_request_id="i")

    pending = serve_pending(md, loop)  # as bench_overhead's
    request = _RequestContext(request_id="bench", _ray_trace_ctx={"traceparent": caller})

    def hop(m, call, make_record):
        async def go(n: int) -> float:
            t0 = time.perf_counter_ns()
            for _ in range(n):
                token = _serve_request_context.set(request)
                md.tracing_context = None
                await m(call, pending)
                make_record("ray.serve", logging.INFO, __file__, 0, "access log", None, None)
                _serve_request_context.reset(token)
            return (time.perf_counter_ns() - t0) / n
        return lambda n: loop.run_until_complete(go(n))
    full = monitored(cls=Hop, tracing_enabled=True, sample_ratio=0.0)
    ready = monitored(cls=Hop, tracing_enabled=True, sample_ratio=0.0)
    tracer = type(ready).__ray_monitor__.state.tracer
    span = tracer.begin("Hop.__call__", {}, request)
    tracer.begin = lambda *a, **k: span  # a ready-made span: begin's own work out
    factory = logging.getLogRecordFactory()
    return {"defaults, begin ready": hop(ready, hooked, factory),
            "defaults, no hook": hop(full, send, factory),
            "defaults, no factory": hop(full, hooked, PLAIN_RECORD_FACTORY)}


def cold_ops(n: int, evict_mb: int) -> int:
    """Single operations of the request path, each timed alone after the walk (minus an
    empty call's time): what one C routine costs when its code and data are cold."""
    import random

    from ray_monitor.replica.propagation import TRACEPARENT_COMMON
    from os import urandom

    from ray_monitor.replica.queueing import SENT, SENT_AT

    HEX_DASH = "0123456789abcdef-"
    t = time.time()
    tp = "00-0123456789abcdef0123456789abcdef-0123456789abcdef-00"
    t128, s64 = random.getrandbits(128), random.getrandbits(64)
    bits = random.getrandbits
    ops = {"empty call": lambda: None,
           "regex fullmatch (traceparent)": lambda: TRACEPARENT_COMMON.fullmatch(tp),
           "int(32 hex digits, 16)": lambda: int(tp[3:35], 16),
           "random.getrandbits(64)": lambda: bits(64),
           "f'{id:032x}'": lambda: f"{t128:032x}",
           "traceparent f-string": lambda: f"00-{t128:032x}-{s64:016x}-00",
           "str(int(time.time() * 1e6))": lambda: str(int(time.time() * 1e6)),
           "time.time_ns()": time.time_ns,
           "{2 keys} dict": lambda: {"traceparent": tp, SENT: "1"},
           "slices + concatenation": lambda: "00-" + tp[3:35] + "-" + tp[36:52] + "-00",
           # candidates for §25: ids kept as text, a send time kept as a float
           "{2 keys} dict, a float value": lambda: {"traceparent": tp, SENT_AT: t},
           "tp[3:35] (a slice)": lambda: tp[3:35],
           "os.urandom(8).hex()": lambda: urandom(8).hex(),
           "random.randbytes(8).hex()": lambda: random.randbytes(8).hex(),
           "f'{getrandbits(64):016x}'": lambda: f"{bits(64):016x}",
           "hex check: not s.strip(HEX)": lambda: not tp[3:52].strip(HEX_DASH),
           "len + 3 dashes + strip check": lambda: len(tp) == 55 and tp[2] == tp[35] == tp[52]
           == "-" and not tp.strip(HEX_DASH) and tp.count("-") == 3,
           "tp[54] in '13579bdf'": lambda: tp[54] in "13579bdf"}
    buf = bytearray(evict_mb << 20)
    view = memoryview(buf)
    got: dict[str, list[int]] = {k: [] for k in ops}
    names = list(ops)
    clock = time.perf_counter_ns
    for i in range(n):
        for k in names[i % len(names):] + names[:i % len(names)]:
            if evict_mb:
                view[::64] = b"\x01" * (len(buf) // 64)
            op = ops[k]
            t0 = clock()
            op()
            got[k].append(clock() - t0)
    empty = statistics.median(got["empty call"])
    print(f"one operation, {'cold' if evict_mb else 'hot'}, median of {n}, minus an empty "
          f"call ({empty / US:.2f} us); load average {os.getloadavg()}")
    for k in names[1:]:
        print(f"  {k:<32}{(statistics.median(got[k]) - empty) / US:7.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
