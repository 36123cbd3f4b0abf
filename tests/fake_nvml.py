"""A fake NVML for tests: an object with pynvml's function names, struct shapes and errors.

There is no GPU here, so the tests drive the sampler with this. Errors are the real
``pynvml`` classes (``pynvml.NVMLError(code)``), so ``except pynvml.NVMLError_NotFound``
works as it does against the real library. Readings may be numbers or functions of the
injected time ``t`` (seconds), so values change from one sample to the next.

    fake = FakeNvml(gpus=[FakeGpu(), FakeGpu(power_mw=lambda t: 100_000 + t)])
    fake.fail("nvmlDeviceGetPowerUsage", pynvml.NVML_ERROR_NOT_SUPPORTED, gpu=1)
    fake.missing.add("nvmlDeviceGetCurrentClocksEventReasons")   # an old binding
    fake.queue_xid(0, 79)                                          # GPU 0 fell off the bus

Inside a real ``GpuStatsActor`` (``nvml_factory="tests.fake_nvml:make_fake"``) the fake cannot
be reached from the test, so ``make_fake()`` reads extra compute processes from Ray's GCS
key-value store on every call: a test on the cluster publishes them with
``set_cluster_processes([ExtraProcess(gpu=0, pid=replica_pid, used_memory=GiB)])`` and
withdraws them with ``set_cluster_processes([])``; it makes every NVML call of every node
fail with ``set_cluster_nvml_fault(pynvml.NVML_ERROR_UNKNOWN)`` (``nvmlInit`` included: a
driver going away) and work again with ``set_cluster_nvml_fault(None)``. The store is per
cluster, so concurrent test sessions on other clusters never see each other's processes.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence, Union

import pynvml

Reading = Union[int, float, Callable[[float], Union[int, float]]]
GiB = 1 << 30


@dataclass
class FakeProcess:
    pid: int
    used_memory: Optional[int]  # bytes; None where the driver cannot say


@dataclass(frozen=True)
class ExtraProcess:
    """A compute process on a physical GPU, added at run time (see ``process_source``)."""

    gpu: int
    pid: int
    used_memory: Optional[int]  # bytes
    sm_util: Optional[int] = None  # percent; sampled afresh at every utilization call
    node_id: str = ""  # for ``make_fake()``: only the node with this Ray node id ("": every node)


@dataclass
class FakeMig:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3 MIG 1g.10gb"
    memory_total: int = 10 * GiB
    memory_reserved: int = 64 << 20
    memory_used: Reading = 1 * GiB
    processes: list[FakeProcess] = field(default_factory=list)


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = ""  # default: derived from the index
    memory_total: int = 80 * GiB
    memory_reserved: int = 512 << 20
    memory_used: Reading = lambda t: 10 * GiB + (int(t) % 1024) * (1 << 20)  # 10..11 GiB
    utilization_gpu: Reading = lambda t: int(t) % 101  # percent
    utilization_memory: Reading = lambda t: (int(t) * 3) % 101  # percent of time the bus is busy
    power_mw: Reading = 250_000
    power_limit_mw: int = 700_000
    energy_mj: Reading = lambda t: 1_000_000 + int(250_000 * t)  # 250 W since t=0
    temperature_c: Reading = lambda t: 40 + int(t) % 30
    sm_clock_mhz: Reading = 1980
    mem_clock_mhz: Reading = 2619
    clock_reasons: Reading = 0x1  # GPU idle
    ecc_corrected: Reading = 3
    ecc_uncorrected: Reading = 0
    pcie_replay: Reading = 7
    processes: list[FakeProcess] = field(default_factory=list)
    # (pid, timestamp_us, smUtil, memUtil): returned when newer than the caller's timestamp
    process_samples: list[tuple[int, int, int, int]] = field(default_factory=list)
    mig: list[Optional[FakeMig]] = field(default_factory=list)  # slots; None: empty slot
    xid_supported: bool = True
    unsupported_fields: set[int] = field(default_factory=set)  # field ids answering NotSupported


@dataclass(frozen=True)
class FakeHandle:
    gpu: int
    mig_slot: Optional[int] = None


class FakeEventSet:
    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self.handles: list[FakeHandle] = []
        self.waiting = 0
        self.freed = False
        self.freed_during_wait = False


@dataclass
class _Fault:
    code: int
    gpu: Optional[int]
    times: Optional[int]  # None: until cleared


class FakeNvml:
    """pynvml-shaped fake. ``missing`` holds function names to hide (old drivers/bindings)."""

    NVMLError = pynvml.NVMLError

    def __init__(self, *, gpus: Union[int, list[FakeGpu]] = 2, clock: Callable[[], float] = time.time,
                 init_error: Optional[int] = None, missing: tuple[str, ...] = (),
                 process_source: Optional[Callable[[], Sequence[ExtraProcess]]] = None,
                 fault_source: Optional[Callable[[], Optional[int]]] = None) -> None:
        self.gpus = [FakeGpu() for _ in range(gpus)] if isinstance(gpus, int) else list(gpus)
        for i, gpu in enumerate(self.gpus):
            gpu.uuid = gpu.uuid or f"GPU-00000000-0000-0000-0000-{i:012d}"
        self.clock = clock
        self.init_error = init_error
        self.missing = set(missing)
        self.process_source = process_source  # called at every process query
        self.fault_source = fault_source  # an NVML error code every call raises, or None
        self._fault_read = (-1.0, None)  # (monotonic time read, code): read at most 4x a second
        self.calls: Counter = Counter()
        self.process_util_since: list[int] = []  # the timestamps nvmlDeviceGetProcessUtilization was given
        self.event_sets: list[FakeEventSet] = []
        self.initialized = 0
        self.shutdowns = 0
        self._faults: dict[str, list[_Fault]] = {}
        self._lock = threading.Lock()

    # -- test controls -------------------------------------------------------------------

    def fail(self, name: str, code: int, *, gpu: Optional[int] = None, times: Optional[int] = None) -> None:
        """Makes ``name`` (``"*"``: every device call) raise ``pynvml.NVMLError(code)``."""
        self._faults.setdefault(name, []).append(_Fault(code, gpu, times))

    def clear(self, name: Optional[str] = None) -> None:
        if name is None:
            self._faults.clear()
        else:
            self._faults.pop(name, None)

    def queue_xid(self, gpu: int, xid: int) -> None:
        """Delivers an XID critical-error event to every event set registered for ``gpu``."""
        for event_set in self.event_sets:
            for h in event_set.handles:
                if h.gpu == gpu:
                    event_set.events.put(SimpleNamespace(device=h, eventType=pynvml.nvmlEventTypeXidCriticalError,
                                                         eventData=xid, gpuInstanceId=0xFFFFFFFF,
                                                         computeInstanceId=0xFFFFFFFF))

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("nvml") and name in object.__getattribute__(self, "missing"):
            raise AttributeError(f"module 'pynvml' has no attribute '{name}'")
        return object.__getattribute__(self, name)

    # -- plumbing ---------------------------------------------------------------------------

    def _enter(self, name: str, handle: Optional[FakeHandle] = None) -> None:
        if self.fault_source is not None:
            code = self._cluster_fault()
            if code is not None:
                with self._lock:
                    self.calls[name] += 1
                raise pynvml.NVMLError(code)
        with self._lock:
            self.calls[name] += 1
            for key in (name, "*" if handle is not None else None):
                for fault in self._faults.get(key, []):
                    if fault.gpu is not None and (handle is None or handle.gpu != fault.gpu):
                        continue
                    if fault.times is not None:
                        if fault.times <= 0:
                            continue
                        fault.times -= 1
                    raise pynvml.NVMLError(fault.code)

    def _cluster_fault(self) -> Optional[int]:
        read_at, code = self._fault_read
        now = time.monotonic()
        if now - read_at > 0.25:
            code = self.fault_source()
            self._fault_read = (now, code)
        return code

    def _t(self) -> float:
        return self.clock()

    def _read(self, reading: Reading) -> Union[int, float]:
        return reading(self._t()) if callable(reading) else reading

    def _gpu(self, handle: FakeHandle) -> FakeGpu:
        return self.gpus[handle.gpu]

    def _physical_only(self, handle: FakeHandle) -> FakeGpu:
        """Calls NVML answers NotSupported on MIG devices and on GPUs in MIG mode."""
        gpu = self._gpu(handle)
        if handle.mig_slot is not None or gpu.mig:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    # -- library ---------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByIndex", FakeHandle(index))
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return FakeHandle(index)

    # -- static facts --------------------------------------------------------------------------

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        self._enter("nvmlDeviceGetName", handle)
        if handle.mig_slot is not None:
            return self._gpu(handle).mig[handle.mig_slot].name
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        self._enter("nvmlDeviceGetUUID", handle)
        if handle.mig_slot is not None:
            return self._gpu(handle).mig[handle.mig_slot].uuid
        return self._gpu(handle).uuid

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetEnforcedPowerLimit", handle)
        return self._gpu(handle).power_limit_mw

    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        self._enter("nvmlDeviceGetMigMode", handle)
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if self._gpu(handle).mig else pynvml.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetMaxMigDeviceCount", handle)
        return len(self._gpu(handle).mig)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeHandle, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetMigDeviceHandleByIndex", handle)
        slots = self._gpu(handle).mig
        if not 0 <= index < len(slots) or slots[index] is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return FakeHandle(handle.gpu, index)

    # -- readings ----------------------------------------------------------------------------------

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: Optional[int] = None) -> Any:
        self._enter("nvmlDeviceGetMemoryInfo", handle)
        if handle.mig_slot is not None:
            mig = self._gpu(handle).mig[handle.mig_slot]
            total, reserved, used = mig.memory_total, mig.memory_reserved, self._read(mig.memory_used)
        else:
            gpu = self._gpu(handle)
            total, reserved, used = gpu.memory_total, gpu.memory_reserved, self._read(gpu.memory_used)
        if version is None:
            return pynvml.c_nvmlMemory_t(total=total, free=total - used, used=used)
        if "nvmlDeviceGetMemoryInfo_v2" in self.missing:  # the symbol a pre-v2 driver lacks
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return pynvml.c_nvmlMemory_v2_t(version=version, total=total, reserved=reserved,
                                        free=total - reserved - used, used=used)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> Any:
        self._enter("nvmlDeviceGetUtilizationRates", handle)
        gpu = self._physical_only(handle)
        return pynvml.c_nvmlUtilization_t(gpu=self._read(gpu.utilization_gpu), memory=self._read(gpu.utilization_memory))

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetPowerUsage", handle)
        return int(self._read(self._gpu(handle).power_mw))

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetTotalEnergyConsumption", handle)
        return int(self._read(self._gpu(handle).energy_mj))

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        self._enter("nvmlDeviceGetTemperature", handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return int(self._read(self._gpu(handle).temperature_c))

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, clock_type: int) -> int:
        self._enter("nvmlDeviceGetClockInfo", handle)
        gpu = self._gpu(handle)
        readings = {pynvml.NVML_CLOCK_SM: gpu.sm_clock_mhz, pynvml.NVML_CLOCK_MEM: gpu.mem_clock_mhz}
        if clock_type not in readings:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return int(self._read(readings[clock_type]))

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetCurrentClocksEventReasons", handle)
        return int(self._read(self._gpu(handle).clock_reasons))

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetCurrentClocksThrottleReasons", handle)
        return int(self._read(self._gpu(handle).clock_reasons))

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, error_type: int, counter_type: int) -> int:
        self._enter("nvmlDeviceGetTotalEccErrors", handle)
        if counter_type != pynvml.NVML_VOLATILE_ECC:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self._gpu(handle)
        reading = gpu.ecc_corrected if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED else gpu.ecc_uncorrected
        return int(self._read(reading))

    def nvmlDeviceGetPcieReplayCounter(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetPcieReplayCounter", handle)
        return int(self._read(self._gpu(handle).pcie_replay))

    def nvmlDeviceGetFieldValues(self, handle: FakeHandle, field_ids: list[int]) -> Any:
        self._enter("nvmlDeviceGetFieldValues", handle)
        gpu = self._gpu(handle)
        readings = {
            pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER: (pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, "uiVal", gpu.pcie_replay),
            pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION: (pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, "ullVal",
                                                          gpu.energy_mj),
            pynvml.NVML_FI_DEV_POWER_INSTANT: (pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, "uiVal", gpu.power_mw),
        }
        out = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        for slot, field_id in zip(out, field_ids):
            slot.fieldId = field_id
            code = self._field_fault(field_id, handle)
            if code is not None:
                slot.nvmlReturn = code
            elif field_id not in readings or field_id in gpu.unsupported_fields:
                slot.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
            else:
                value_type, member, reading = readings[field_id]
                slot.valueType = value_type
                setattr(slot.value, member, int(self._read(reading)))
                slot.nvmlReturn = pynvml.NVML_SUCCESS
        return out

    def _field_fault(self, field_id: int, handle: FakeHandle) -> Optional[int]:
        """A per-field return code injected with ``fail("field:<id>", code)``."""
        with self._lock:
            for fault in self._faults.get(f"field:{field_id}", []):
                if fault.gpu not in (None, handle.gpu) or fault.times == 0:
                    continue
                if fault.times is not None:
                    fault.times -= 1
                return fault.code
        return None

    # -- processes -----------------------------------------------------------------------------------

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        self._enter("nvmlDeviceGetComputeRunningProcesses", handle)
        gpu = self._gpu(handle)
        procs = gpu.mig[handle.mig_slot].processes if handle.mig_slot is not None else gpu.processes
        if handle.mig_slot is None:
            procs = procs + [FakeProcess(p.pid, p.used_memory) for p in self._extra(handle)]
        return [SimpleNamespace(pid=p.pid, usedGpuMemory=p.used_memory, gpuInstanceId=0xFFFFFFFF,
                                computeInstanceId=0xFFFFFFFF) for p in procs]

    def nvmlDeviceGetProcessUtilization(self, handle: FakeHandle, timestamp: int) -> list[Any]:
        self._enter("nvmlDeviceGetProcessUtilization", handle)
        self.process_util_since.append(timestamp)
        gpu = self._physical_only(handle)
        now_us = int(self._t() * 1e6)
        extra = [(p.pid, now_us, p.sm_util, 0) for p in self._extra(handle) if p.sm_util is not None]
        newer = [s for s in gpu.process_samples + extra if s[1] > timestamp]
        if not newer:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return [pynvml.c_nvmlProcessUtilizationSample_t(pid=pid, timeStamp=ts, smUtil=sm, memUtil=mem)
                for pid, ts, sm, mem in newer]

    def _extra(self, handle: FakeHandle) -> list[ExtraProcess]:
        if self.process_source is None:
            return []
        return [p for p in self.process_source() if p.gpu == handle.gpu]

    # -- events ----------------------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> FakeEventSet:
        self._enter("nvmlEventSetCreate")
        event_set = FakeEventSet()
        self.event_sets.append(event_set)
        return event_set

    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, event_types: int, event_set: FakeEventSet) -> None:
        self._enter("nvmlDeviceRegisterEvents", handle)
        if not self._gpu(handle).xid_supported or event_types != pynvml.nvmlEventTypeXidCriticalError:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        event_set.handles.append(handle)

    def nvmlEventSetWait(self, event_set: FakeEventSet, timeout_ms: int) -> Any:
        self._enter("nvmlEventSetWait")
        event_set.waiting += 1
        try:
            return event_set.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT) from None
        finally:
            event_set.waiting -= 1

    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        self._enter("nvmlEventSetFree")
        event_set.freed_during_wait = event_set.waiting > 0
        event_set.freed = True


#: Where ``set_cluster_processes`` puts the extra processes (Ray's GCS key-value store).
KV_KEY = b"fake_nvml/processes"
#: Where ``set_cluster_nvml_fault`` puts the error code every call raises.
FAULT_KEY = b"fake_nvml/fault"
KV_NAMESPACE = "ray_monitor_tests"


def set_cluster_processes(processes: Sequence[ExtraProcess]) -> None:
    """From a driver connected to the cluster: the extra processes every ``make_fake()`` reports."""
    from ray.experimental import internal_kv

    text = json.dumps([dataclasses.asdict(p) for p in processes])
    internal_kv._internal_kv_put(KV_KEY, text.encode(), overwrite=True, namespace=KV_NAMESPACE)


def cluster_processes() -> list[ExtraProcess]:
    """The extra processes published for this node; none outside a Ray worker or driver."""
    import ray
    from ray.experimental import internal_kv

    if not ray.is_initialized():
        return []
    raw = internal_kv._internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)
    if not raw:
        return []
    node_id = ray.get_runtime_context().get_node_id()
    return [p for p in (ExtraProcess(**d) for d in json.loads(raw)) if p.node_id in ("", node_id)]


def set_cluster_nvml_fault(code: Optional[int]) -> None:
    """From a driver connected to the cluster: every ``make_fake()`` NVML call raises
    ``pynvml.NVMLError(code)`` from now on (within a quarter second); None: none does."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(FAULT_KEY, json.dumps(code).encode(), overwrite=True,
                                 namespace=KV_NAMESPACE)


def cluster_nvml_fault() -> Optional[int]:
    import ray
    from ray.experimental import internal_kv

    if not ray.is_initialized():
        return None
    raw = internal_kv._internal_kv_get(FAULT_KEY, namespace=KV_NAMESPACE)
    return json.loads(raw) if raw else None


def make_fake() -> FakeNvml:
    """Two busy H100s, for a real GpuStatsActor: ``nvml_factory="tests.fake_nvml:make_fake"``.

    Their compute processes are those published with ``set_cluster_processes``; their
    faults, the one set with ``set_cluster_nvml_fault``."""
    return FakeNvml(gpus=2, process_source=cluster_processes, fault_source=cluster_nvml_fault)
