"""``bench_cold_hop.py``'s cold Serve hop counted under valgrind: instructions and cache
misses per hop, simulated (no timer: the machine's load does not enter).

    .venv/bin/python benchmarks/cachegrind_hop.py [--hops 60] [--evict-mb 12] \
        [--ll-mb 8] [--variants NAME,...] [--parts] [--jobs 2] [--keep DIR] \
        [--from DIR] [--annotate VARIANT] [--top 40] [--json OUT]

Each variant runs in a process of its own under ``valgrind --tool=callgrind
--cache-sim=yes`` (cachegrind's cache simulation; callgrind because it can collect
inside one function only: ``--toggle-collect=_operator_call``, and each hop, nothing
else, is called through ``operator.call``). Every process does the same set-up (all
variants of the hop built and warmed as ``bench_cold_hop.py`` does), then ``--hops`` hops
of its one variant, each after a walk over ``--evict-mb`` of memory that empties the
simulated caches, as a request finds them inside a busy replica. The walks, start-up and
set-up are not collected; ``empty call`` (a no-op through ``operator.call``) is
subtracted from every variant, and ``+`` columns are a variant minus ``unwrapped``.

Printed per hop: ``Ir`` (instructions), ``D1 miss`` (data reads and writes missing the
first-level cache), ``LL miss`` (data and instruction fetches missing the last level:
every distinct cache line the hop touches, code and data, since the walk left none of
them cached; split into data ``DLL`` and instructions ``ILL``), ``I1 miss``, and ``GC+``:
the objects the garbage collector tracks that a hop leaves alive (a generation-0
collection runs every 700; automatic collections are off during the counted hops, as
where one falls among a few dozen hops is chance, and are charged by this figure).

The simulated caches: I1 and D1 as this machine's (32 KiB, 8-way, 64-byte lines), LL
``--ll-mb`` (default 8 MiB, 16-way; the machine's L3 is 32 MiB, but with a walk larger
than the LL a cold hop misses on every line it touches whatever the LL's size, and the
walks are cheaper to simulate). Flush threads are kept asleep
(``RAY_MONITOR_FLUSH_INTERVAL_S`` a day, the span processor's delay a day, OpenBLAS on
one thread), so no other thread runs during the hops: the deferred part of a request
(``replica/deferred.py``) is not in these counts, as it is not in ``bench_cold_hop.py``'s
hop time. What the flush thread does for the path between requests, the refill of the
span ids drawn ahead (``replica/span_ids.py``), runs before each walk, uncounted. ``PYTHONHASHSEED=0`` keeps string-keyed dict layouts the same from run to run;
Python's own allocator (pymalloc) is left on, as in a replica. Two runs of one tree agree
to about 0.5% per variant and 2% (a dozen lines) in a ``+LL`` difference: addresses
still differ from run to run (address-space randomisation: dicts keyed by types or ids,
cache-set conflicts).

``--variants "traced: unwrapped,traced: monitor unsampled, in context"`` counts the hop
with Serve's tracing on (subtract the first from the second by hand: the ``+`` columns are
over the plain ``unwrapped``). ``--parts`` adds ``bench_cold_hop.py --parts``'s variants (the defaults with one piece
taken out; ``defaults, no hook`` is a leaf deployment). ``--annotate VARIANT`` prints that
variant minus ``unwrapped`` by C function of the interpreter (``callgrind_annotate``,
exclusive cost, per hop), the most LL misses first: which routines the monitor's code
runs that the hop does not run anyway, and where its data misses are taken
(``_PyEval_EvalFrameDefault``: bytecode and the objects it reads). ``--keep DIR`` keeps
the output files; ``--from DIR`` reads them again (a different ``--annotate``). Valgrind
makes Python about 50 times slower: a variant takes 3-7 minutes (longer on a loaded machine). Results:
``RESULTS.md`` §27, §29, §32.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

WALK = "empty call"
BASE = "unwrapped"
VARIANTS = (WALK, BASE, "monitor metrics", "monitor unsampled")
PARTS = ("defaults, begin ready", "defaults, no hook", "defaults, no factory")
#: The prefix of ``bench_overhead``'s hop with Serve's tracing on ("traced: unwrapped",
#: "traced: monitor unsampled, in context"); its processes also build and warm those.
TRACED = "traced: "
#: Cachegrind's events, as its output file names them.
EVENTS = ("Ir", "I1mr", "ILmr", "Dr", "D1mr", "DLmr", "Dw", "D1mw", "DLmw")
DAY = "86400"
#: The C function of ``operator.call``, through which each hop (and nothing else) runs:
#: callgrind collects only inside it.
MARK = "_operator_call"


def inner(variant: str, hops: int, evict_mb: int) -> int:
    """Under valgrind: the set-up every run shares, then ``hops`` hops of ``variant``."""
    import asyncio
    import gc
    from operator import call

    from bench_cold_hop import part_cases
    from bench_overhead import SERVE_HOP, SERVE_HOP_TRACED, serve_hop_cases

    loop = asyncio.new_event_loop()
    caller = "00-0123456789abcdef0123456789abcdef-0123456789abcdef-00"
    every = serve_hop_cases(loop, caller)
    cases = every[SERVE_HOP]
    cases.update(part_cases(loop, caller))
    if variant.startswith(TRACED):  # Serve's tracing on: compare with "traced: unwrapped"
        cases.update({TRACED + v: fn for v, fn in every[SERVE_HOP_TRACED].items()})
    for fn in cases.values():  # first-call caches, in every run alike
        fn(50)
    buf = bytearray(evict_mb << 20)
    view = memoryview(buf)
    ones = b"\x01" * (len(buf) // 64)
    fn = cases.get(variant) if variant != WALK else (lambda n: 0.0)
    if fn is None:
        raise SystemExit(f"no variant {variant!r}; variants: {', '.join(cases)}")
    import ray_monitor
    try:  # the flush thread's refill of the span ids drawn ahead (asleep here)
        from ray_monitor.replica.span_ids import refill
    except ImportError:  # a tree from before them
        refill = None
    gc.collect()
    gc.disable()  # collections counted apart (below): where one falls is chance
    for _ in range(hops):
        if refill is not None:
            refill(0)  # as the flush thread between requests; not counted, then evicted
        view[::64] = ones  # a byte in every cache line: the caches emptied
        call(fn, 1)  # counted (callgrind collects inside operator.call only)
    # objects the garbage collector tracks, made and still alive, per hop: a generation-0
    # collection runs every 700 of them
    print(f"SURVIVORS {gc.get_count()[0] / hops} {ray_monitor.__file__}")
    loop.close()
    return 0


def totals(path: str) -> dict[str, int]:
    """The summary line of a cachegrind output file, by event."""
    events = summary = None
    with open(path) as f:
        for line in f:
            if line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith(("summary:", "totals:")):
                summary = [int(x) for x in line.split()[1:]]
    if events is None or summary is None:
        raise RuntimeError(f"{path}: no cachegrind summary")
    return dict(zip(events, summary))


def per_hop(t: dict[str, int]) -> dict[str, float]:
    return {"Ir": t["Ir"], "D1 miss": t["D1mr"] + t["D1mw"], "LL miss": t["DLmr"] + t["DLmw"]
            + t["ILmr"], "I1 miss": t["I1mr"], "DLL miss": t["DLmr"] + t["DLmw"],
            "ILL miss": t["ILmr"]}


def by_function(path: str) -> dict[str, dict[str, int]]:
    """``callgrind_annotate``'s exclusive cost of every C function in ``path``
    (recursion levels merged)."""
    text = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", path],
                          capture_output=True, text=True, check=True).stdout
    lines = text.splitlines()
    events = None
    out: dict[str, dict[str, int]] = {}
    for line in lines:
        if line.startswith("Events shown:"):
            events = line.split(":", 1)[1].split()
            continue
        parts = line.split()
        if events is None or len(parts) < 2 or not parts[0][:1].isdigit() or \
                "PROGRAM" in line or ":" not in line:
            continue
        nums, rest = [], []
        i = 0
        while i < len(parts):  # "1,234 (5.6%)" or "." per event, then the name
            if len(nums) < len(events):
                if parts[i] == ".":
                    nums.append(0)
                    i += 1
                    continue
                if parts[i].replace(",", "").isdigit():
                    nums.append(int(parts[i].replace(",", "")))
                    i += 2 if i + 1 < len(parts) and parts[i + 1].startswith("(") else 1
                    if i < len(parts) and parts[i - 1].startswith("(") and \
                            not parts[i - 1].endswith(")"):
                        i += 1  # "( 5.6%)" split in two
                    continue
            rest = parts[i:]
            break
        if len(nums) != len(events) or not rest:
            continue
        name = " ".join(rest).split(" [")[0]
        name = name.split(":", 1)[-1].split("'")[0]  # file:function'2 -> function
        acc = out.setdefault(name, dict.fromkeys(events, 0))
        for e, v in zip(events, nums):
            acc[e] += v
    return out


def annotate_diff(base: str, other: str, n: int, top: int) -> list:
    """Per C function, per hop: ``other`` minus ``base``, the largest LL misses first."""
    a, b = by_function(base), by_function(other)
    zero = dict.fromkeys(EVENTS, 0)
    rows = []
    for name in set(a) | set(b):
        x, y = a.get(name, zero), b.get(name, zero)
        d = {k: (y.get(k, 0) - x.get(k, 0)) / n for k in EVENTS}
        rows.append((name, {"Ir": d["Ir"], "D1": d["D1mr"] + d["D1mw"],
                            "DLL": d["DLmr"] + d["DLmw"], "ILL": d["ILmr"]}))
    rows.sort(key=lambda r: -(abs(r[1]["DLL"]) + abs(r[1]["ILL"])))
    return rows[:top]


def survivors(path: str) -> float:
    try:
        with open(path + ".survivors") as f:
            return float(f.read())
    except (OSError, ValueError):
        return float("nan")


def out_file(out_dir: str, variant: str) -> str:
    return os.path.join(out_dir, "cg." + variant.replace(" ", "_").replace(",", ""))


def run_one(variant: str, args: argparse.Namespace, out_dir: str) -> str:
    out = out_file(out_dir, variant)
    env = dict(os.environ, PYTHONHASHSEED="0",
               RAY_MONITOR_FLUSH_INTERVAL_S=DAY, OTEL_BSP_SCHEDULE_DELAY=DAY + "000",
               OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    for k in [k for k in env if k.startswith("OTEL_EXPORTER_OTLP")]:
        del env[k]
    cmd = ["valgrind", "--tool=callgrind", "--cache-sim=yes", "--I1=32768,8,64",
           "--D1=32768,8,64", f"--LL={args.ll_mb << 20},16,64", "--collect-atstart=no",
           f"--toggle-collect={MARK}", "--separate-threads=no",
           f"--callgrind-out-file={out}", sys.executable, os.path.abspath(__file__),
           "--inner", variant, "--hops", str(args.hops), "--evict-mb", str(args.evict_mb)]
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{variant}: valgrind exited {p.returncode}:\n{p.stderr[-3000:]}")
    print(f"  {variant}: {time.time() - t0:.0f} s; {p.stdout.strip()}", flush=True)
    with open(out + ".survivors", "w") as f:
        f.write(p.stdout.split()[1] if p.stdout.startswith("SURVIVORS") else "nan")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inner", metavar="VARIANT", help=argparse.SUPPRESS)
    ap.add_argument("--hops", type=int, default=60, help="hops per variant")
    ap.add_argument("--evict-mb", type=int, default=12, help="memory walked before each hop")
    ap.add_argument("--ll-mb", type=int, default=8, help="the simulated last-level cache")
    ap.add_argument("--variants", help="comma-separated (default: walk only, unwrapped, "
                    "monitor metrics, monitor unsampled)")
    ap.add_argument("--parts", action="store_true", help="also the defaults with a piece out")
    ap.add_argument("--jobs", type=int, default=2, help="valgrind runs at once")
    ap.add_argument("--keep", metavar="DIR", help="keep cachegrind's output files here")
    ap.add_argument("--annotate", metavar="VARIANT",
                    help="cg_annotate of VARIANT minus unwrapped, by function")
    ap.add_argument("--top", type=int, default=40, help="functions --annotate shows")
    ap.add_argument("--from", dest="reuse", metavar="DIR",
                    help="read the output files of an earlier --keep DIR (and run the variants it lacks, "
                    "keeping them there)")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    if args.inner:
        return inner(args.inner, args.hops, args.evict_mb)
    # names hold ", " ("defaults, no hook"): split on commas not followed by a space
    variants = re.split(r",(?! )", args.variants) if args.variants else list(VARIANTS)
    for need in (BASE, WALK):
        if need not in variants:
            variants.insert(0, need)
    if args.parts:
        variants += [p for p in PARTS if p not in variants]
    if args.annotate and args.annotate not in variants:
        variants.append(args.annotate)
    print(f"command: {' '.join(sys.argv)}; load average {os.getloadavg()}", flush=True)
    out_dir = args.reuse or args.keep or tempfile.mkdtemp(prefix="cg_hop.")
    os.makedirs(out_dir, exist_ok=True)
    files = {v: out_file(out_dir, v) for v in variants}
    todo = [v for v in variants if not (args.reuse and os.path.exists(files[v]))]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # --from: only what is missing
        list(pool.map(lambda v: run_one(v, args, out_dir), todo))
    tot = {v: totals(f) for v, f in files.items()}
    walk, base = per_hop(tot[WALK]), per_hop(tot[BASE])
    rows = {}
    n = args.hops
    print(f"\nper hop, cold ({args.evict_mb} MiB walked before each, LL {args.ll_mb} MiB), "
          f"{n} hops a variant; + over unwrapped")
    print(f"  {'variant':<24}{'Ir':>9}{'D1 miss':>9}{'LL miss':>9}{'I1 miss':>9}   "
          f"{'+Ir':>8}{'+D1':>7}{'+LL':>7}{'(+DLL':>7}{'+ILL)':>7}{'+I1':>7}{'GC+':>6}")
    for v in variants[1:]:
        h = per_hop(tot[v])
        row = {k: (h[k] - walk[k]) / n for k in h}
        row.update({"+" + k: (h[k] - base[k]) / n for k in h})
        row["gc survivors"] = survivors(files[v])
        rows[v] = row
        print(f"  {v:<24}{row['Ir']:9.0f}{row['D1 miss']:9.1f}{row['LL miss']:9.1f}"
              f"{row['I1 miss']:9.1f}   {row['+Ir']:+8.0f}{row['+D1 miss']:+7.1f}"
              f"{row['+LL miss']:+7.1f}{row['+DLL miss']:+7.1f}{row['+ILL miss']:+7.1f}"
              f"{row['+I1 miss']:+7.1f}{row['gc survivors']:6.1f}")
    if args.annotate:
        print(f"\n{args.annotate} minus {BASE}, by C function (exclusive), per hop; "
              "by LL misses:")
        print(f"  {'+Ir':>8}{'+D1':>7}{'+DLL':>7}{'+ILL':>7}  function")
        for name, d in annotate_diff(files[BASE], files[args.annotate], n, args.top):
            print(f"  {d['Ir']:+8.0f}{d['D1']:+7.1f}{d['DLL']:+7.1f}{d['ILL']:+7.1f}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "hops": n, "totals": tot,
                       "per_hop": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
