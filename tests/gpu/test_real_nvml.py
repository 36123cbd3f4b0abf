"""The real sampler against real NVML, checked against nvidia-smi. Needs an NVIDIA GPU and driver."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from ray_monitor.gpu.sampler import GpuSampler

pytestmark = pytest.mark.gpu

QUERY = "index,uuid,name,memory.total,memory.used,temperature.gpu,power.draw,utilization.gpu"
MiB = 1 << 20


def _nvml_reason() -> str | None:
    """Why the test cannot run here, or None."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi is not on PATH: no NVIDIA driver on this machine"
    try:
        import pynvml
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception as exc:  # library missing, driver not loaded, ...
        return f"pynvml.nvmlInit() failed: {type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="module")
def sampler():
    reason = _nvml_reason()
    if reason:
        pytest.skip(reason)
    s = GpuSampler(node_id="real-node")
    yield s
    s.shutdown()


def _smi() -> dict[str, dict[str, str]]:
    out = subprocess.run(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    rows = [dict(zip(QUERY.split(","), (c.strip() for c in line.split(",")))) for line in out.strip().splitlines()]
    return {row["uuid"]: row for row in rows}


def test_sampler_agrees_with_nvidia_smi(sampler):
    snap = sampler.sample()  # opens handles (slow once), then measure steady-state samples
    assert snap.no_gpus_reason is None, snap.no_gpus_reason
    smi = _smi()
    snap = sampler.sample()
    physical = [d for d in snap.devices if d.mig_parent is None]
    assert {d.uuid for d in physical} == set(smi)
    for dev in physical:
        row = smi[dev.uuid]
        v = dev.values
        print(f"GPU {dev.index} {dev.model}: {v}")
        assert not dev.lost
        assert dev.index == int(row["index"]) and dev.model == row["name"]
        assert v["memory_total_bytes"] // MiB == int(row["memory.total"])  # nvidia-smi floors to MiB
        assert abs(v["memory_used_bytes"] / MiB - float(row["memory.used"])) <= 64 + 0.02 * int(row["memory.total"])
        assert abs(v["temperature_celsius"] - float(row["temperature.gpu"])) <= 3
        if row["power.draw"] not in ("[N/A]", "N/A") and "power_watts" in v:
            assert abs(v["power_watts"] - float(row["power.draw"])) <= max(15.0, 0.1 * float(row["power.draw"]))
        assert 0.0 <= v["utilization_ratio"] <= 1.0
        assert v["sm_clock_hz"] > 0 and v["memory_clock_hz"] > 0
        assert v["throttled"] in (0, 1)
    print(f"self_errors: {snap.self_errors}")

    n = 50
    start = time.perf_counter()
    for _ in range(n):
        sampler.sample()
    per_gpu_ms = (time.perf_counter() - start) / n / len(physical) * 1e3
    print(f"real NVML: {per_gpu_ms:.3f} ms per sample per GPU ({len(physical)} GPUs, {n} samples)")
