"""Cost of one GpuSampler.sample() per GPU, and the sampler's own CPU at 1 Hz.

    .venv/bin/python benchmarks/bench_gpu_sampler.py [--samples N] [--cpu-seconds S]

With the fake NVML (tests/fake_nvml.py) the figure is the Python-side cost of the sampler
(plus the fake's own, which is of the same order as pynvml's ctypes wrappers). With real
NVML, where a driver is present, it is what a node pays; the target is <= 1 ms per GPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ray_monitor.gpu.sampler import GpuSampler  # noqa: E402
from tests.fake_nvml import FakeGpu, FakeNvml, FakeProcess  # noqa: E402


def fake_gpus(n: int) -> list[FakeGpu]:
    # Two processes per GPU with utilization samples: the per-process path is measured too.
    gpus = []
    for i in range(n):
        pids = (1000 + 2 * i, 1001 + 2 * i)
        gpus.append(FakeGpu(processes=[FakeProcess(pid, 1 << 30) for pid in pids],
                            process_samples=[(pid, 0, 50, 10) for pid in pids]))
    return gpus


def per_sample_ms(sampler: GpuSampler, samples: int) -> float:
    sampler.sample()  # the first sample opens handles and reads static facts
    start = time.perf_counter()
    for _ in range(samples):
        sampler.sample()
    return (time.perf_counter() - start) / samples * 1e3


def cpu_at_1hz(sampler: GpuSampler, seconds: int) -> float:
    """Process CPU time spent over `seconds` of 1 Hz sampling, as a fraction of one core."""
    cpu0, wall0 = time.process_time(), time.monotonic()
    for i in range(seconds):
        sampler.sample()
        time.sleep(max(0.0, wall0 + i + 1 - time.monotonic()))
    return (time.process_time() - cpu0) / (time.monotonic() - wall0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--cpu-seconds", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print("command:", " ".join([os.path.relpath(sys.executable)] + sys.argv))
    print(f"{'nvml':<6} {'gpus':>4} {'ms/sample':>10} {'ms/GPU':>8}")
    for n in (1, 4, 8):
        sampler = GpuSampler(node_id="bench", nvml=FakeNvml(gpus=fake_gpus(n)), watch_xid=False,
                             process_ancestors=lambda pid: (1,))
        ms = per_sample_ms(sampler, args.samples)
        print(f"{'fake':<6} {n:>4} {ms:>10.4f} {ms / n:>8.4f}")
    cpu = cpu_at_1hz(GpuSampler(node_id="bench", nvml=FakeNvml(gpus=fake_gpus(8)), watch_xid=False,
                                process_ancestors=lambda pid: (1,)), args.cpu_seconds)
    print(f"fake, 8 GPUs, 1 Hz for {args.cpu_seconds} s: sampler CPU {cpu * 100:.3f}% of a core")

    real = GpuSampler(node_id="bench")
    first = real.sample()
    if first.no_gpus_reason:
        print(f"real NVML: not measured ({first.no_gpus_reason})")
        return
    n = sum(1 for d in first.devices if d.mig_parent is None)
    ms = per_sample_ms(real, min(args.samples, 500))
    print(f"{'real':<6} {n:>4} {ms:>10.4f} {ms / n:>8.4f}   target <= 1 ms/GPU")
    cpu = cpu_at_1hz(real, args.cpu_seconds)
    print(f"real, {n} GPUs, 1 Hz for {args.cpu_seconds} s: sampler CPU {cpu * 100:.3f}% of a core "
          "(XID thread included)")
    real.shutdown()


if __name__ == "__main__":
    main()
