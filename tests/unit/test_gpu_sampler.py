"""GpuSampler, XidWatcher and attribute_processes against the fake NVML (no Ray, no GPU)."""

from __future__ import annotations

import logging
import os
import sys
import time

import pynvml
import pytest

from ray_monitor.gpu.attribution import attribute_processes
from ray_monitor.gpu.sampler import GpuSampler
from ray_monitor.gpu.xid import XidWatcher
from ray_monitor.common.snapshot import GpuProcess, GpuSnapshot, ReplicaIdentity
from tests.fake_nvml import GiB, FakeGpu, FakeHandle, FakeMig, FakeNvml, FakeProcess
from tests.helpers import Clock

NODE = "a" * 56


def make(fake: FakeNvml, clock: Clock | None = None, **kwargs) -> GpuSampler:
    kwargs.setdefault("watch_xid", False)
    kwargs.setdefault("process_ancestors", lambda pid: ())
    return GpuSampler(node_id=NODE, nvml=fake, clock=clock or fake.clock, **kwargs)


def fixed_gpu(**overrides) -> FakeGpu:
    values = dict(memory_total=80 * GiB, memory_reserved=512 << 20, memory_used=10 * GiB,
                  utilization_gpu=87, utilization_memory=41, power_mw=312_500, power_limit_mw=700_000,
                  energy_mj=5_000_000, temperature_c=63, sm_clock_mhz=1980, mem_clock_mhz=2619,
                  clock_reasons=0x1, ecc_corrected=3, ecc_uncorrected=1, pcie_replay=7)
    values.update(overrides)
    return FakeGpu(**values)


def test_every_reading_in_base_units():
    fake = FakeNvml(gpus=[fixed_gpu(uuid="GPU-x")], clock=Clock(100.0))
    snap = make(fake).sample()
    assert snap.node_id == NODE and snap.time == 100.0 and snap.no_gpus_reason is None
    (dev,) = snap.devices
    assert (dev.index, dev.uuid, dev.model, dev.mig_parent, dev.lost) == (0, "GPU-x", "NVIDIA H100 80GB HBM3", None, False)
    assert dev.values == {
        "utilization_ratio": 0.87,
        "memory_utilization_ratio": 0.41,
        "memory_used_bytes": 10 * GiB,
        "memory_free_bytes": 80 * GiB - (512 << 20) - 10 * GiB,
        "memory_total_bytes": 80 * GiB,
        "memory_reserved_bytes": 512 << 20,
        "power_watts": pytest.approx(312.5),
        "power_limit_watts": pytest.approx(700.0),
        "energy_joules": pytest.approx(5000.0),
        "temperature_celsius": 63.0,
        "sm_clock_hz": 1.98e9,
        "memory_clock_hz": 2.619e9,
        "throttle_reasons": 0x1,
        "throttled": 0,
        "ecc_corrected_total": 3,
        "ecc_uncorrected_total": 1,
        "pcie_replay_total": 7,
    }
    assert snap.self_errors == {}


@pytest.mark.parametrize("reasons, throttled", [
    (0x0, 0), (0x1, 0), (0x2, 0), (0x1 | 0x2, 0),  # idle, application clocks: not throttling
    (0x4, 1), (0x20 | 0x1, 1), (0x40, 1), (0x8, 1),  # power cap, thermal, hardware slowdown
])
def test_throttled_is_any_reason_but_idle_or_application_clocks(reasons, throttled):
    fake = FakeNvml(gpus=[fixed_gpu(clock_reasons=reasons)], clock=Clock(100.0))
    values = make(fake).sample().devices[0].values
    assert values["throttle_reasons"] == reasons and values["throttled"] == throttled


def test_readings_follow_time_and_static_facts_are_read_once():
    clock = Clock(10.0)
    fake = FakeNvml(gpus=2, clock=clock)
    sampler = make(fake)
    first = sampler.sample()
    clock.t = 14.0
    second = sampler.sample()
    assert second.time == 14.0
    a, b = first.devices[0].values, second.devices[0].values
    assert b["energy_joules"] - a["energy_joules"] == pytest.approx(250.0 * 4)  # 250 W for 4 s
    assert b["utilization_ratio"] == 0.14 and a["utilization_ratio"] == 0.10
    assert b["temperature_celsius"] == 54 and a["temperature_celsius"] == 50
    assert b["memory_used_bytes"] - a["memory_used_bytes"] == 4 << 20
    for once in ("nvmlInit", "nvmlDeviceGetCount"):
        assert fake.calls[once] == 1
    for per_gpu in ("nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID", "nvmlDeviceGetName",
                    "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetMigMode"):
        assert fake.calls[per_gpu] == 2, per_gpu


def test_power_energy_and_pcie_replays_come_in_one_batched_call():
    fake = FakeNvml(gpus=2, clock=Clock(100.0))
    sampler = make(fake)
    for _ in range(3):
        values = sampler.sample().devices[1].values
    assert {"power_watts", "energy_joules", "pcie_replay_total"} <= values.keys()
    assert fake.calls["nvmlDeviceGetFieldValues"] == 2 * 3
    for single in ("nvmlDeviceGetPowerUsage", "nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetPcieReplayCounter"):
        assert fake.calls[single] == 0


def test_a_field_the_driver_lacks_is_read_with_its_own_call_from_then_on():
    gpu = fixed_gpu(unsupported_fields={pynvml.NVML_FI_DEV_POWER_INSTANT})
    fake = FakeNvml(gpus=[gpu], clock=Clock(100.0))
    sampler = make(fake)
    for _ in range(3):
        snap = sampler.sample()
    assert snap.devices[0].values["power_watts"] == pytest.approx(312.5)
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 3
    assert fake.calls["nvmlDeviceGetFieldValues"] == 3  # energy and PCIe replays still batched
    assert snap.self_errors == {}


def test_a_failing_field_skips_only_that_field_for_that_sample():
    fake = FakeNvml(gpus=[fixed_gpu()], clock=Clock(100.0))
    fake.fail(f"field:{pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER}", pynvml.NVML_ERROR_UNKNOWN, times=1)
    sampler = make(fake)
    first = sampler.sample()
    assert "pcie_replay_total" not in first.devices[0].values
    assert first.devices[0].values["energy_joules"] == pytest.approx(5000.0)
    assert first.self_errors == {"nvmlDeviceGetFieldValues[pcie_replay_total]:Unknown": 1}
    second = sampler.sample()
    assert second.devices[0].values["pcie_replay_total"] == 7
    assert fake.calls["nvmlDeviceGetPcieReplayCounter"] == 0  # a transient failure keeps the batch


def test_without_field_values_every_reading_uses_its_own_call():
    fake = FakeNvml(gpus=[fixed_gpu()], clock=Clock(100.0), missing=("nvmlDeviceGetFieldValues",))
    sampler = make(fake)
    for _ in range(2):
        values = sampler.sample().devices[0].values
    assert values["power_watts"] == pytest.approx(312.5)
    assert values["energy_joules"] == pytest.approx(5000.0)
    assert values["pcie_replay_total"] == 7
    assert sampler.self_errors == {"nvmlDeviceGetFieldValues:FunctionNotFound": 1}


def test_not_supported_is_counted_once_and_not_asked_again():
    fake = FakeNvml(gpus=2, clock=Clock(100.0))
    fake.fail("nvmlDeviceGetTotalEccErrors", pynvml.NVML_ERROR_NOT_SUPPORTED, gpu=1)
    sampler = make(fake)
    for _ in range(3):
        snap = sampler.sample()
    assert "ecc_corrected_total" in snap.devices[0].values
    assert "ecc_corrected_total" not in snap.devices[1].values
    assert "temperature_celsius" in snap.devices[1].values
    assert snap.self_errors == {"nvmlDeviceGetTotalEccErrors(corrected):NotSupported": 1,
                                "nvmlDeviceGetTotalEccErrors(uncorrected):NotSupported": 1}
    assert fake.calls["nvmlDeviceGetTotalEccErrors"] == 2 * 3 + 2  # GPU 1 asked once per kind


def test_a_function_the_driver_lacks_is_remembered():
    fake = FakeNvml(gpus=2, clock=Clock(100.0))
    fake.fail("nvmlDeviceGetTemperature", pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    sampler = make(fake)
    for _ in range(3):
        snap = sampler.sample()
    assert fake.calls["nvmlDeviceGetTemperature"] == 1
    assert all("temperature_celsius" not in d.values and "power_watts" in d.values for d in snap.devices)
    assert snap.self_errors == {"nvmlDeviceGetTemperature:FunctionNotFound": 1}


def test_old_binding_names_and_pre_v2_memory_info():
    fake = FakeNvml(gpus=[fixed_gpu(clock_reasons=0x4)], clock=Clock(100.0),
                    missing=("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetMemoryInfo_v2"))
    sampler = make(fake)
    for _ in range(2):
        values = sampler.sample().devices[0].values
    assert values["throttle_reasons"] == 0x4 and values["throttled"] == 1
    assert fake.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 2
    assert values["memory_total_bytes"] == 80 * GiB and values["memory_used_bytes"] == 10 * GiB
    assert "memory_reserved_bytes" not in values  # v1 has no reserved memory
    assert sampler.self_errors == {}  # a fallback that works is not a failure


def test_transient_error_skips_the_reading_for_one_sample_and_logs_once(caplog):
    fake = FakeNvml(gpus=[fixed_gpu()], clock=Clock(100.0))
    fake.fail("nvmlDeviceGetPowerUsage", pynvml.NVML_ERROR_UNKNOWN)  # read singly: field unsupported
    fake.gpus[0].unsupported_fields.add(pynvml.NVML_FI_DEV_POWER_INSTANT)
    fake.fail("nvmlDeviceGetTemperature", pynvml.NVML_ERROR_UNKNOWN, times=1)
    sampler = make(fake)
    with caplog.at_level(logging.WARNING, logger="ray_monitor.gpu.sampler"):
        snaps = [sampler.sample() for _ in range(4)]
    assert "temperature_celsius" not in snaps[0].devices[0].values
    assert snaps[1].devices[0].values["temperature_celsius"] == 63.0
    assert all("power_watts" not in s.devices[0].values for s in snaps)
    assert snaps[-1].self_errors == {"nvmlDeviceGetPowerUsage:Unknown": 4, "nvmlDeviceGetTemperature:Unknown": 1}
    logged = [r.getMessage() for r in caplog.records]
    assert sum("nvmlDeviceGetPowerUsage:Unknown" in m for m in logged) == 1
    assert sum("nvmlDeviceGetTemperature:Unknown" in m for m in logged) == 1


def test_a_lost_gpu_is_reported_and_sampled_again_later():
    fake = FakeNvml(gpus=2, clock=Clock(100.0))
    sampler = make(fake)
    sampler.sample()
    fake.fail("*", pynvml.NVML_ERROR_GPU_IS_LOST, gpu=1)
    lost = sampler.sample()
    assert [d.lost for d in lost.devices] == [False, True]
    assert lost.devices[1].values == {} and lost.devices[1].uuid.endswith("1")
    assert lost.devices[0].values["power_watts"] == 250.0
    assert any(cause.endswith(":GpuIsLost") for cause in lost.self_errors)
    fake.clear()
    back = sampler.sample()
    assert [d.lost for d in back.devices] == [False, False]
    assert back.devices[1].values["power_watts"] == 250.0


def test_a_gpu_lost_at_start_is_opened_when_it_returns():
    fake = FakeNvml(gpus=2, clock=Clock(100.0))
    fake.fail("nvmlDeviceGetHandleByIndex", pynvml.NVML_ERROR_GPU_IS_LOST, gpu=1, times=1)
    sampler = make(fake)
    first = sampler.sample()
    assert [(d.index, d.lost) for d in first.devices] == [(0, False), (1, True)]
    second = sampler.sample()
    assert [(d.index, d.lost) for d in second.devices] == [(0, False), (1, False)]
    assert second.devices[1].uuid.endswith("1")


@pytest.mark.parametrize("code, words", [
    (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "libnvidia-ml.so.1"),
    (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "driver is not loaded"),
    (pynvml.NVML_ERROR_UNKNOWN, "nvmlInit failed: Unknown"),
])
def test_without_nvml_every_snapshot_says_why_and_it_is_logged_once(caplog, code, words):
    fake = FakeNvml(gpus=2, clock=Clock(100.0), init_error=code)
    sampler = make(fake)
    with caplog.at_level(logging.WARNING, logger="ray_monitor.gpu.sampler"):
        snaps = [sampler.sample() for _ in range(3)]
    assert all(words in s.no_gpus_reason and s.devices == [] and s.processes == [] for s in snaps)
    assert fake.calls["nvmlInit"] == 1
    assert sum("no GPUs on node" in r.getMessage() for r in caplog.records) == 1
    sampler.shutdown()
    assert fake.shutdowns == 0  # never initialized, so nothing to shut down


def test_no_gpus_and_no_pynvml(monkeypatch):
    assert make(FakeNvml(gpus=0, clock=Clock(100.0))).sample().no_gpus_reason == "NVML sees no NVIDIA GPU"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` now raises ImportError
    snap = GpuSampler(node_id=NODE, nvml=None, watch_xid=False).sample()
    assert "install nvidia-ml-py" in snap.no_gpus_reason


def test_process_memory_and_utilization_with_the_timestamp_carried_forward():
    gpu = fixed_gpu(processes=[FakeProcess(100, 3 * GiB), FakeProcess(101, None)],
                    process_samples=[(100, 5_000, 40, 10), (100, 7_000, 60, 12), (101, 6_000, 5, 1)])
    fake = FakeNvml(gpus=[gpu], clock=Clock(100.0))
    sampler = make(fake)
    first = sampler.sample()
    assert [(p.pid, p.memory_bytes, p.sm_utilization_ratio) for p in first.processes] == [
        (100, 3 * GiB, 0.6), (101, None, 0.05)]  # the newest sample of each pid
    assert {(p.gpu_index, p.gpu_uuid) for p in first.processes} == {(0, gpu.uuid)}
    second = sampler.sample()  # nothing newer than 7000 us: NotFound, not an error
    assert [p.sm_utilization_ratio for p in second.processes] == [None, None]
    gpu.process_samples.append((101, 9_000, 30, 2))
    third = sampler.sample()
    assert [p.sm_utilization_ratio for p in third.processes] == [None, 0.3]
    assert fake.process_util_since == [0, 7_000, 7_000]
    assert third.self_errors == {}


def test_ancestors_come_from_the_injected_lookup_and_from_proc_by_default():
    gpu = fixed_gpu(processes=[FakeProcess(100, GiB), FakeProcess(os.getpid(), GiB)])
    asked = []
    sampler = make(FakeNvml(gpus=[gpu], clock=Clock(100.0)),
                   process_ancestors=lambda pid: asked.append(pid) or (pid + 1, 1))
    sampler.sample()
    snap = sampler.sample()
    assert [p.ancestors for p in snap.processes] == [(101, 1), (os.getpid() + 1, 1)]
    assert asked == [100, os.getpid()]  # looked up once per process while it runs
    default = GpuSampler(node_id=NODE, nvml=FakeNvml(gpus=[gpu], clock=Clock(100.0)), watch_xid=False).sample()
    assert default.processes[1].ancestors[0] == os.getppid()
    assert default.processes[0].ancestors == () or default.processes[0].ancestors[0] > 0


def test_mig_memory_per_mig_device_and_no_per_process_utilization(caplog):
    migs = [FakeMig(uuid="MIG-a", memory_total=10 * GiB, memory_used=2 * GiB,
                    processes=[FakeProcess(200, 2 * GiB)]),
            None,  # an empty slot
            FakeMig(uuid="MIG-c", memory_total=20 * GiB, memory_used=0)]
    fake = FakeNvml(gpus=[fixed_gpu(mig=migs, process_samples=[(200, 1, 50, 5)]), fixed_gpu()], clock=Clock(100.0))
    sampler = make(fake)
    with caplog.at_level(logging.INFO, logger="ray_monitor.gpu.sampler"):
        sampler.sample()
        snap = sampler.sample()
    assert [(d.index, d.uuid[:5], d.mig_parent) for d in snap.devices] == [
        (0, "GPU-0", None), (0, "MIG-a", 0), (2, "MIG-c", 0), (1, "GPU-0", None)]
    parent, mig_a, mig_c, _ = snap.devices
    assert "utilization_ratio" not in parent.values and parent.values["power_watts"] == pytest.approx(312.5)
    assert mig_a.values == {"memory_total_bytes": 10 * GiB, "memory_used_bytes": 2 * GiB,
                            "memory_free_bytes": 8 * GiB - (64 << 20), "memory_reserved_bytes": 64 << 20}
    assert mig_c.values["memory_total_bytes"] == 20 * GiB
    assert [(p.pid, p.gpu_uuid, p.memory_bytes, p.sm_utilization_ratio) for p in snap.processes] == [
        (200, "MIG-a", 2 * GiB, None)]
    assert fake.calls["nvmlDeviceGetProcessUtilization"] == 0
    assert snap.self_errors == {}
    assert sum("per-process SM utilization is not available" in r.getMessage() for r in caplog.records) == 1


def wait_until(predicate, timeout_s: float = 10.0):
    """Bounded poll for work done on another thread; the bound is a safety net, not a timing check."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_xid_errors_are_counted_per_gpu_and_code(caplog):
    fake = FakeNvml(gpus=[FakeGpu(), FakeGpu(xid_supported=False), FakeGpu()], clock=Clock(100.0))
    sampler = make(fake, watch_xid=True, xid_wait_ms=20)
    with caplog.at_level(logging.INFO, logger="ray_monitor.gpu.xid"):
        sampler.sample()
    assert sum("cannot be watched on GPU" in r.getMessage() for r in caplog.records) == 1
    for gpu, xid in ((0, 79), (0, 79), (0, 48), (2, 13)):
        fake.queue_xid(gpu, xid)
    wait_until(lambda: sum(sum(c.values()) for c in sampler._xid.counts().values()) == 4)
    snap = sampler.sample()
    assert [d.xid_errors for d in snap.devices] == [{79: 2, 48: 1}, {}, {13: 1}]
    sampler.shutdown()
    (event_set,) = fake.event_sets
    assert event_set.freed and not event_set.freed_during_wait
    assert fake.shutdowns == 1
    assert sampler.sample().no_gpus_reason == "the GPU sampler is shut down"


def test_xid_watcher_without_supporting_devices_starts_no_thread():
    fake = FakeNvml(gpus=[FakeGpu(xid_supported=False)], clock=Clock(100.0))
    watcher = XidWatcher(nvml=fake, devices=[("GPU-0", FakeHandle(0))], wait_ms=20)
    assert watcher.start() is False
    assert fake.event_sets[0].freed and watcher.stop() is True


def test_xid_wait_failures_are_counted_and_do_not_stop_the_watcher():
    fake = FakeNvml(gpus=1, clock=Clock(100.0))
    fake.fail("nvmlEventSetWait", pynvml.NVML_ERROR_UNKNOWN, times=1)
    watcher = XidWatcher(nvml=fake, devices=[("GPU-0", FakeHandle(0))], wait_ms=20, retry_s=0.01)
    assert watcher.start()
    fake.queue_xid(0, 31)
    wait_until(lambda: watcher.counts() == {fake.gpus[0].uuid: {31: 1}})
    assert watcher.errors() == {"nvmlEventSetWait:Unknown": 1}
    assert watcher.stop() and fake.event_sets[0].freed


def test_gpus_without_mig_support_are_not_an_error_and_shutdown_before_start_inits_nothing():
    fake = FakeNvml(gpus=1, clock=Clock(100.0))
    fake.fail("nvmlDeviceGetMigMode", pynvml.NVML_ERROR_NOT_SUPPORTED)
    sampler = make(fake)
    assert sampler.sample().self_errors == {} and sampler.sample().devices[0].mig_parent is None
    idle = make(FakeNvml(gpus=1, clock=Clock(100.0)))
    idle.shutdown()
    assert idle.sample().no_gpus_reason == "the GPU sampler is shut down"
    assert idle._nvml.calls["nvmlInit"] == 0


def test_validation_names_the_field():
    with pytest.raises(ValueError, match="node_id"):
        GpuSampler(node_id="", nvml=FakeNvml())
    with pytest.raises(TypeError, match="process_ancestors"):
        GpuSampler(node_id=NODE, nvml=FakeNvml(), process_ancestors=5)
    with pytest.raises(ValueError, match="xid_wait_ms"):
        GpuSampler(node_id=NODE, nvml=FakeNvml(), xid_wait_ms=0)


def replica(name: str, pid: int, node: str = NODE) -> ReplicaIdentity:
    return ReplicaIdentity(application="app", deployment="Classifier", replica=name, node_id=node, pid=pid)


def proc(pid: int, ancestors: tuple[int, ...] = ()) -> GpuProcess:
    return GpuProcess(gpu_index=0, gpu_uuid="GPU-0", pid=pid, memory_bytes=GiB, sm_utilization_ratio=0.5,
                      ancestors=ancestors)


def test_attribute_processes_by_pid_then_nearest_ancestor():
    snap = GpuSnapshot(node_id=NODE, time=1.0, processes=[
        proc(10),  # a replica itself
        proc(21, ancestors=(20, 10, 1)),  # a worker process started by replica r2 (pid 20)
        proc(30, ancestors=(1,)),  # nobody's
        proc(40, ancestors=(1,)),  # pid 40 is a replica on another node: pids do not cross nodes
    ])
    replicas = {10: replica("r1", 10), 20: replica("r2", 20), 40: replica("r4", 40, node="b" * 56)}
    out = attribute_processes(snap, replicas)
    assert [p.replica.replica if p.replica else None for p in out.processes] == ["r1", "r2", None, None]
    assert all(p.replica is None for p in snap.processes)  # the input is left as it was
    assert attribute_processes(snap, {}).processes[0].replica is None


# -- NVML failing, then working again (no restart of the actor) ---------------------------

def test_nvml_failing_at_start_is_tried_again_with_backoff_and_recovers(caplog):
    """The issue's case: a GPU actor that starts while NVML fails ("nvmlDeviceGetCount
    failed") reports GPUs as soon as NVML works again, without a restart."""
    clock = Clock(100.0)
    fake = FakeNvml(gpus=2, clock=clock)
    fake.fail("nvmlDeviceGetCount", pynvml.NVML_ERROR_UNKNOWN, times=3)
    sampler = make(fake, clock)
    seen = []
    with caplog.at_level(logging.WARNING, logger="ray_monitor.gpu.sampler"):
        for _ in range(12):
            snap = sampler.sample()
            seen.append((clock.t, snap.no_gpus_reason is None, len(snap.devices)))
            clock.advance(1.0)
    # Tried at 100, 101, 103 (1 s, then 2 s later), working from 107 (4 s later).
    assert fake.calls["nvmlDeviceGetCount"] == 4
    assert [t for t, ok, n in seen if ok and n == 2][0] == 107.0
    assert all(n == 2 for t, ok, n in seen if t >= 107.0)
    assert fake.initialized - fake.shutdowns == 1  # each failed start was shut down again
    assert snap.self_errors["nvmlDeviceGetCount:Unknown"] == 3
    messages = [r.getMessage() for r in caplog.records]
    assert sum("no GPUs on node" in m for m in messages) == 1  # once, not per retry
    assert sum("GPU readings are back" in m for m in messages) == 1


def _init_calls(init_error: int, seconds: int) -> int:
    """nvmlInit calls over ``seconds`` of one-second samples while nvmlInit fails."""
    clock = Clock(0.0)
    fake = FakeNvml(gpus=1, clock=clock, init_error=init_error)
    sampler = make(fake, clock)
    for _ in range(seconds):
        sampler.sample()
        clock.advance(1.0)
    return fake.calls["nvmlInit"]


def test_backoff_is_capped_and_long_for_a_node_without_the_library():
    # 0, 1, 3, 7, then every 5 s (the cap) until 60.
    assert _init_calls(pynvml.NVML_ERROR_UNKNOWN, 60) == 4 + len(range(12, 60, 5))
    # a CPU node: 0, 1, 3, 7, 15, 31, 63 s, then once a minute
    assert _init_calls(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, 120) == 7


def test_nvml_failing_under_a_running_sampler_is_started_afresh_and_readings_return():
    clock = Clock(100.0)
    fake = FakeNvml(gpus=2, clock=clock)
    sampler = make(fake, clock, watch_xid=True)
    assert len(sampler.sample().devices) == 2
    fake.fail("*", pynvml.NVML_ERROR_UNKNOWN)  # every device call fails (a driver reload)
    snaps = []
    for _ in range(6):
        clock.advance(1.0)
        snaps.append(sampler.sample())
    assert any(s.no_gpus_reason and "starting it again" in s.no_gpus_reason for s in snaps)
    assert sampler.self_errors["nvml_restarted"] >= 1
    assert fake.shutdowns >= 1  # the stale handles went with the old NVML session
    fake.clear()
    back = None
    for _ in range(8):
        clock.advance(1.0)
        snap = sampler.sample()
        if snap.devices and all(d.values for d in snap.devices):
            back = clock.t
            break
    assert back is not None and len(snap.devices) == 2
    sampler.shutdown()
