"""Runs in the GPU-stats actor on every node: the NVML sampler, which decides what one
GPU snapshot of the node holds (devices, MIG devices, processes) and what it leaves out.

``GpuSampler.sample()`` never raises. A node without NVML gets snapshots with
``no_gpus_reason`` set, and NVML is tried again with backoff (every 1, 2, 4, then 5 s
while the failure may pass; every 60 s when there is no library or no GPU), so a GPU
actor that started while NVML failed recovers without a restart. NVML failing under a
running sampler (every device's readings failing for ``REINIT_AFTER`` samples in a row:
a driver reload, a reset) shuts NVML down and starts it afresh the same way. An NVML call that fails for one device leaves that reading out of
that sample and is counted in ``self_errors`` under ``"<call>:<reason>"`` (logged once per
cause). Two kinds of failure are remembered so that they cost nothing afterwards: a
function the driver or binding lacks (``FunctionNotFound``) is never called again, and a
call a device does not support (``NotSupported``) is not made on that device again; both
are therefore counted once. ``GpuIsLost`` marks the device ``lost`` for that sample; it
is tried again on the next one.

Per-process SM utilization is the newest NVML sample taken since the previous call
(``nvmlDeviceGetProcessUtilization`` with the last-seen timestamp carried forward per
device). A process without a new sample, including every process when NVML answers
``NotFound`` (no sample since then: the GPU was idle for it), is reported as ``None``
rather than with a stale older value. MIG devices have no per-process utilization
(NVML cannot measure it): ``None`` there too.

XID errors are counted by :class:`~ray_monitor.gpu.xid.XidWatcher`; processes are joined
to replicas by :func:`~ray_monitor.gpu.attribution.attribute_processes`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ray_monitor.common.snapshot import GpuDevice, GpuProcess, GpuSnapshot
from ray_monitor.gpu.errors import ErrorBook, nvml_reason
from ray_monitor.gpu.xid import XidWatcher

__all__ = ["GpuSampler", "REINIT_AFTER", "RETRY_CAP_S", "RETRY_PERMANENT_S"]

log = logging.getLogger(__name__)

# Numbers from nvml.h (part of NVML's C ABI, so they never change); written out here so
# that older bindings without these names still work.
_MEMORY_V2 = 0x02000028  # nvmlMemory_v2
_TEMPERATURE_GPU = 0  # NVML_TEMPERATURE_GPU
_CLOCK_SM, _CLOCK_MEM = 1, 2  # NVML_CLOCK_SM, NVML_CLOCK_MEM
_ECC_CORRECTED, _ECC_UNCORRECTED, _ECC_VOLATILE = 0, 1, 0
_MIG_ENABLED = 1  # NVML_DEVICE_MIG_ENABLE
# Clock-event reasons that are not throttling: the GPU is idle, or clocks were set on purpose.
_BENIGN_CLOCK_REASONS = 0x1 | 0x2  # GpuIdle | ApplicationsClocksSetting
_NVML_SUCCESS = 0
_RETURN_REASONS = {2: "InvalidArgument", 3: "NotSupported", 15: "GpuIsLost"}
#: Starting NVML again: first retry after this, doubling up to RETRY_CAP_S; failures that
#: do not pass by themselves (no library, no pynvml, no GPU) every RETRY_PERMANENT_S.
RETRY_FIRST_S, RETRY_CAP_S, RETRY_PERMANENT_S = 1.0, 5.0, 60.0
_PERMANENT = ("LibraryNotFound", "ImportError", "NoGpu")
#: Samples in a row in which every device failed before NVML is started afresh.
REINIT_AFTER = 3
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


@dataclass(frozen=True)
class _Field:
    field_id: int  # NVML_FI_DEV_*
    key: str  # GpuDevice.values key
    scale: float  # NVML unit -> base unit
    fallback: str  # the single call that reads the same thing


# Read in one nvmlDeviceGetFieldValues call; a field the device or driver does not know
# is read with its own call from then on.
_FIELDS = (
    _Field(94, "pcie_replay_total", 1, "nvmlDeviceGetPcieReplayCounter"),  # PCIE_REPLAY_COUNTER
    _Field(83, "energy_joules", 1e-3, "nvmlDeviceGetTotalEnergyConsumption"),  # mJ
    _Field(186, "power_watts", 1e-3, "nvmlDeviceGetPowerUsage"),  # POWER_INSTANT, mW
)


def _proc_ancestors(pid: int) -> tuple[int, ...]:
    """Parent pids from /proc, nearest first; () where /proc cannot say (other OS, gone)."""
    chain: list[int] = []
    current = pid
    while len(chain) < 64:  # bounded: a cycle cannot happen, a corrupt read must not hang us
        try:
            with open(f"/proc/{current}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            break
        # The command name is in parentheses and may contain spaces and ')'.
        parent = int(stat.rpartition(b")")[2].split()[1])
        if parent <= 0:
            break
        chain.append(parent)
        if parent == 1:
            break
        current = parent
    return tuple(chain)


class _Skip:
    """A reading that is absent from this sample."""


_SKIP = _Skip()


class _Lost(Exception):
    """The device fell off the bus (NVML GpuIsLost) while it was being sampled."""


@dataclass(eq=False)
class _Device:
    """One physical GPU or MIG device: its handle and the facts that do not change."""

    index: int  # physical GPUs: NVML index; MIG devices: slot on the parent
    handle: Any = None
    uuid: str = ""
    model: str = ""
    mig_parent: Optional[int] = None
    mig_enabled: bool = False
    mig: list[_Device] = field(default_factory=list)
    power_limit_w: Optional[float] = None
    memory_total: Optional[int] = None
    unsupported: set[str] = field(default_factory=set)  # calls this device answered NotSupported
    batched: set[int] = field(default_factory=lambda: {f.field_id for f in _FIELDS})
    last_seen_us: int = 0  # newest process-utilization timestamp seen
    lost: bool = False

    @property
    def ready(self) -> bool:
        return self.handle is not None and bool(self.uuid)


class GpuSampler:
    """Samples every GPU of this node through NVML; one ``sample()`` per interval.

    ``nvml`` is an NVML-like module (``None``: ``import pynvml`` from nvidia-ml-py).
    ``process_ancestors(pid)`` returns the parent pids of a process, nearest first (default:
    read from /proc; NVML reports host pids, so run the sampler in the host's pid namespace).
    NVML is initialized on the first sample; handles and static facts are cached.
    """

    def __init__(self, *, node_id: str, nvml: Any = None, clock: Callable[[], float] = time.time,
                 process_ancestors: Optional[Callable[[int], tuple[int, ...]]] = None,
                 watch_xid: bool = True, xid_wait_ms: int = 1000) -> None:
        if not isinstance(node_id, str) or not node_id:
            raise ValueError(f"node_id must be a non-empty string (the Ray node id), got {node_id!r}")
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        if process_ancestors is not None and not callable(process_ancestors):
            raise TypeError(f"process_ancestors must be a callable pid -> tuple of pids, got {process_ancestors!r}")
        if not isinstance(xid_wait_ms, int) or xid_wait_ms <= 0:
            raise ValueError(f"xid_wait_ms must be a positive int of milliseconds, got {xid_wait_ms!r}")
        self.node_id = node_id
        self._nvml = nvml
        self._clock = clock
        self._ancestors_of = process_ancestors or _proc_ancestors
        self._watch_xid = watch_xid
        self._xid_wait_ms = xid_wait_ms
        self._errors = ErrorBook("GPU sampler", log)
        self._said: set[str] = set()
        self._started = False
        self._initialized = False
        self._closed = False
        self._no_gpus_reason: Optional[str] = None
        self._xid_wanted = watch_xid
        self._retry_at: Optional[float] = None  # when NVML is started again (None: never)
        self._retry_delay = RETRY_FIRST_S
        self._failed_samples = 0  # in a row, every device failing
        self._sample_errors = 0  # failures counted during the current sample
        self._sample_ok = 0  # NVML calls that answered during the current sample
        self._reasons_said: set[str] = set()  # logged once each until a healthy sample
        self._devices: list[_Device] = []
        self._missing: set[str] = set()  # calls the driver or binding lacks
        self._ancestors: dict[int, tuple[int, ...]] = {}
        self._xid: Optional[XidWatcher] = None

    @property
    def self_errors(self) -> dict[str, int]:
        """Cumulative failure counts by cause (the XID watcher's included)."""
        errors = self._errors.snapshot()
        if self._xid is not None:
            for cause, n in self._xid.errors().items():
                errors[cause] = errors.get(cause, 0) + n
        return errors

    def count_error(self, cause: str, detail: object = "") -> None:
        """Counts a failure of whoever drives the sampler (e.g. pushing snapshots) alongside NVML's."""
        self._errors.count(cause, detail)

    def sample(self) -> GpuSnapshot:
        try:
            return self._sample()
        except Exception as exc:  # a bug here must not stop the sampling loop
            self._errors.count(f"sample:{type(exc).__name__}", exc)
            return GpuSnapshot(node_id=self.node_id, time=self._clock(), self_errors=self.self_errors)

    def shutdown(self) -> None:
        """Stops the XID thread, then shuts NVML down. Later samples say the sampler is shut down."""
        if self._closed:
            return
        self._closed = True
        stopped = self._xid.stop() if self._xid is not None else True
        if not stopped:
            # nvmlShutdown under a wait in flight is unsafe; the process exit releases NVML.
            log.warning("XID watcher did not stop in time; NVML is left initialized")
        elif self._initialized:
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                self._errors.count(f"nvmlShutdown:{nvml_reason(exc)}", exc)
        self._initialized = False

    # -- setup ---------------------------------------------------------------------------

    def _say_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._said:
            self._said.add(key)
            log.info(msg, *args)

    def _unavailable(self, reason: str, kind: str) -> None:
        """NVML cannot be used now: say why in every snapshot, and try again later."""
        first = reason not in self._reasons_said
        self._reasons_said.add(reason)
        self._no_gpus_reason = reason
        cap = RETRY_PERMANENT_S if kind in _PERMANENT else RETRY_CAP_S
        delay = min(self._retry_delay, cap)
        self._retry_at = self._clock() + delay
        self._retry_delay = min(delay * 2, cap)
        if first:
            log.warning("no GPUs on node %s: %s (trying again, at most every %g s; logged once)",
                        self.node_id, reason, cap)

    def _start(self) -> None:
        self._started = True
        self._retry_at = None
        self._no_gpus_reason = None
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as exc:
                self._unavailable(f"the pynvml module cannot be imported ({exc}); install nvidia-ml-py",
                                  "ImportError")
                return
            self._nvml = pynvml
        try:
            self._nvml.nvmlInit()
        except Exception as exc:
            reason = nvml_reason(exc)
            self._errors.count(f"nvmlInit:{reason}", exc)
            self._unavailable({
                "LibraryNotFound": "NVML library (libnvidia-ml.so.1) not found: no NVIDIA driver installed",
                "DriverNotLoaded": "the NVIDIA driver is not loaded",
            }.get(reason, f"nvmlInit failed: {reason} ({exc})"), reason)
            return
        self._initialized = True
        try:
            count = int(self._nvml.nvmlDeviceGetCount())
        except Exception as exc:
            reason = nvml_reason(exc)
            self._errors.count(f"nvmlDeviceGetCount:{reason}", exc)
            self._stop_nvml()
            self._unavailable(f"nvmlDeviceGetCount failed: {reason} ({exc})", reason)
            return
        if count == 0:
            self._stop_nvml()
            self._unavailable("NVML sees no NVIDIA GPU", "NoGpu")
            return
        # Handles and static facts are read by the first sample, which then starts the watcher.
        self._devices = [_Device(index=i) for i in range(count)]

    def _stop_nvml(self) -> bool:
        """Stops the XID watcher and shuts NVML down (for a fresh start); False when the
        watcher would not stop (then NVML is left initialized, as shutdown() does)."""
        if self._xid is not None:
            if not self._xid.stop():
                return False
            self._xid = None
        if self._initialized:
            self._initialized = False
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                self._errors.count(f"nvmlShutdown:{nvml_reason(exc)}", exc)
        return True

    def _restart_nvml(self, why: str) -> None:
        """Every device failed REINIT_AFTER samples in a row: start NVML afresh (handles
        may be stale after a driver reload or a GPU reset)."""
        self._errors.count("nvml_restarted")
        self._stop_nvml()
        self._devices, self._watch_xid, self._failed_samples = [], self._xid_wanted, 0
        self._unavailable(f"NVML failed on every GPU ({why}); starting it again", "Restart")

    def _start_xid(self) -> None:
        """Watches the GPUs opened by the first sample (a GPU opened later is not watched)."""
        self._watch_xid = False
        physical = [(d.uuid, d.handle) for d in self._devices if d.ready]
        watcher = XidWatcher(nvml=self._nvml, devices=physical, wait_ms=self._xid_wait_ms)
        if watcher.start():
            self._xid = watcher
        else:
            log.info("XID events are not watched on node %s: no GPU supports them", self.node_id)

    def _open(self, d: _Device) -> None:
        """Fills in the handle and static facts still missing; failures are retried next sample."""
        if d.handle is None:
            got = self._call(d, "nvmlDeviceGetHandleByIndex", d.index)
            if got is _SKIP:
                return
            d.handle = got
        for attr, call in (("uuid", "nvmlDeviceGetUUID"), ("model", "nvmlDeviceGetName")):
            if not getattr(d, attr):
                got = self._call(d, call, d.handle)
                if got is not _SKIP:
                    setattr(d, attr, got.decode() if isinstance(got, bytes) else str(got))
        if not d.ready:
            return
        limit = self._call(d, "nvmlDeviceGetEnforcedPowerLimit", d.handle)
        if limit is not _SKIP:
            d.power_limit_w = limit * 1e-3
        mode = self._call(d, "nvmlDeviceGetMigMode", d.handle, quiet=("NotSupported",))  # no MIG: normal
        if mode is not _SKIP and int(mode[0]) == _MIG_ENABLED:
            d.mig_enabled = True
            self._open_mig(d)
            self._say_once("mig", "MIG is enabled on GPU %d: memory is reported per MIG device; "
                           "per-process SM utilization is not available there (NVML cannot measure it)",
                           d.index)

    def _open_mig(self, parent: _Device) -> None:
        slots = self._call(parent, "nvmlDeviceGetMaxMigDeviceCount", parent.handle)
        for slot in range(0 if slots is _SKIP else int(slots)):
            try:
                handle = self._nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent.handle, slot)
            except Exception:  # an empty slot raises: nothing to report there
                continue
            mig = _Device(index=slot, handle=handle, mig_parent=parent.index)
            for attr, call in (("uuid", "nvmlDeviceGetUUID"), ("model", "nvmlDeviceGetName")):
                got = self._call(mig, call, handle)
                if got is not _SKIP:
                    setattr(mig, attr, got.decode() if isinstance(got, bytes) else str(got))
            if mig.ready:
                parent.mig.append(mig)

    # -- one NVML call ---------------------------------------------------------------------

    def _call(self, d: _Device, name: str, *args: Any, label: Optional[str] = None,
              quiet: tuple[str, ...] = (), **kwargs: Any) -> Any:
        """Calls ``nvml.<name>``; returns ``_SKIP`` after counting a failure. Raises ``_Lost``."""
        label = label or name
        if label in self._missing or label in d.unsupported:
            return _SKIP
        try:
            got = getattr(self._nvml, name)(*args, **kwargs)
            self._sample_ok += 1
            return got
        except Exception as exc:
            reason = nvml_reason(exc)
            if reason == "TypeError" and kwargs:
                reason = "FunctionNotFound"  # a binding older than that keyword argument
            if reason == "FunctionNotFound":
                self._missing.add(label)
            elif reason == "NotSupported":
                d.unsupported.add(label)
            if reason not in quiet:
                self._errors.count(f"{label}:{reason}", exc)
                if reason not in ("NotSupported", "FunctionNotFound"):
                    self._sample_errors += 1
            if reason == "GpuIsLost":
                raise _Lost(label) from exc
            return _SKIP

    def _call_first(self, d: _Device, names: Sequence[str], *args: Any) -> Any:
        """The first of ``names`` the binding and driver have (newer names first)."""
        for i, name in enumerate(names):
            last = i == len(names) - 1
            got = self._call(d, name, *args, quiet=() if last else ("FunctionNotFound",))
            if got is not _SKIP or name not in self._missing:
                return got
        return _SKIP

    # -- one sample --------------------------------------------------------------------------

    def _sample(self) -> GpuSnapshot:
        if self._closed:
            return GpuSnapshot(node_id=self.node_id, time=self._clock(),
                               no_gpus_reason="the GPU sampler is shut down", self_errors=self.self_errors)
        if not self._started or (self._retry_at is not None and self._clock() >= self._retry_at):
            self._start()
        now = self._clock()
        if self._no_gpus_reason is not None:
            return GpuSnapshot(node_id=self.node_id, time=now, no_gpus_reason=self._no_gpus_reason,
                               self_errors=self.self_errors)
        xids = self._xid.counts() if self._xid is not None else {}
        devices: list[GpuDevice] = []
        processes: list[GpuProcess] = []
        self._sample_errors = self._sample_ok = 0
        for d in self._devices:
            self._sample_device(d, xids, devices, processes)
            for mig in d.mig:
                self._sample_device(mig, xids, devices, processes)
        if self._sample_errors and not self._sample_ok:  # cached facts aside, nothing answered
            self._failed_samples += 1
            if self._failed_samples >= REINIT_AFTER:
                self._restart_nvml(f"{REINIT_AFTER} samples in a row")
                return GpuSnapshot(node_id=self.node_id, time=now, devices=devices,
                                   no_gpus_reason=self._no_gpus_reason, self_errors=self.self_errors)
        else:
            self._failed_samples = 0
            if devices:
                self._retry_delay = RETRY_FIRST_S  # healthy: the next failure backs off from 1 s
                if self._reasons_said:
                    log.warning("GPU readings are back on node %s (after: %s)", self.node_id,
                                "; ".join(sorted(self._reasons_said)))
                    self._reasons_said.clear()
        if self._watch_xid:
            self._start_xid()
        live = {p.pid for p in processes}
        self._ancestors = {pid: a for pid, a in self._ancestors.items() if pid in live}
        return GpuSnapshot(node_id=self.node_id, time=now, devices=devices, processes=processes,
                           self_errors=self.self_errors)

    def _sample_device(self, d: _Device, xids: dict[str, dict[int, int]],
                       devices: list[GpuDevice], processes: list[GpuProcess]) -> None:
        try:
            if not d.ready:
                self._open(d)
                if not d.ready:
                    return
            values = self._mig_values(d) if d.mig_parent is not None else self._values(d)
            procs = [] if d.mig_enabled else self._processes(d)
        except _Lost:
            if not d.lost:
                log.warning("GPU %d (%s) on node %s fell off the bus; still trying", d.index, d.uuid, self.node_id)
            d.lost = True
            devices.append(GpuDevice(index=d.index, uuid=d.uuid, model=d.model, mig_parent=d.mig_parent,
                                     xid_errors=dict(xids.get(d.uuid, {})), lost=True))
            return
        if d.lost:
            log.warning("GPU %d (%s) on node %s answers again", d.index, d.uuid, self.node_id)
            d.lost = False
        devices.append(GpuDevice(index=d.index, uuid=d.uuid, model=d.model, values=values,
                                 xid_errors=dict(xids.get(d.uuid, {})), mig_parent=d.mig_parent))
        processes.extend(procs)

    def _memory(self, d: _Device, values: dict[str, float]) -> None:
        mem = self._call(d, "nvmlDeviceGetMemoryInfo", d.handle, version=_MEMORY_V2,
                         label="nvmlDeviceGetMemoryInfo_v2", quiet=("FunctionNotFound",))
        if "nvmlDeviceGetMemoryInfo_v2" in self._missing:
            self._say_once("memory_v1", "NVML memory info v2 is missing (old driver): no reserved memory")
            mem = self._call(d, "nvmlDeviceGetMemoryInfo", d.handle)
        if mem is not _SKIP:
            d.memory_total = int(mem.total)
            values["memory_used_bytes"] = int(mem.used)
            values["memory_free_bytes"] = int(mem.free)
            if hasattr(mem, "reserved"):
                values["memory_reserved_bytes"] = int(mem.reserved)
        if d.memory_total is not None:  # cached: still known when this sample's read failed
            values["memory_total_bytes"] = d.memory_total

    def _mig_values(self, d: _Device) -> dict[str, float]:
        values: dict[str, float] = {}
        self._memory(d, values)
        return values

    def _values(self, d: _Device) -> dict[str, float]:
        h = d.handle
        values: dict[str, float] = {}
        self._fields(d, values)
        if not d.mig_enabled:  # NVML has no whole-GPU utilization in MIG mode
            util = self._call(d, "nvmlDeviceGetUtilizationRates", h)
            if util is not _SKIP:
                values["utilization_ratio"] = util.gpu / 100
                values["memory_utilization_ratio"] = util.memory / 100  # memory-bus busy time
        self._memory(d, values)
        if d.power_limit_w is not None:
            values["power_limit_watts"] = d.power_limit_w
        temp = self._call(d, "nvmlDeviceGetTemperature", h, _TEMPERATURE_GPU)
        if temp is not _SKIP:
            values["temperature_celsius"] = float(temp)
        for key, clock, label in (("sm_clock_hz", _CLOCK_SM, "nvmlDeviceGetClockInfo(SM)"),
                                  ("memory_clock_hz", _CLOCK_MEM, "nvmlDeviceGetClockInfo(MEM)")):
            mhz = self._call(d, "nvmlDeviceGetClockInfo", h, clock, label=label)
            if mhz is not _SKIP:
                values[key] = mhz * 1e6
        reasons = self._call_first(d, ("nvmlDeviceGetCurrentClocksEventReasons",
                                       "nvmlDeviceGetCurrentClocksThrottleReasons"), h)
        if reasons is not _SKIP:
            values["throttle_reasons"] = int(reasons)
            values["throttled"] = 1 if int(reasons) & ~_BENIGN_CLOCK_REASONS else 0
        for key, kind, label in (("ecc_corrected_total", _ECC_CORRECTED, "nvmlDeviceGetTotalEccErrors(corrected)"),
                                 ("ecc_uncorrected_total", _ECC_UNCORRECTED,
                                  "nvmlDeviceGetTotalEccErrors(uncorrected)")):
            n = self._call(d, "nvmlDeviceGetTotalEccErrors", h, kind, _ECC_VOLATILE, label=label)
            if n is not _SKIP:
                values[key] = int(n)
        return values

    def _fields(self, d: _Device, values: dict[str, float]) -> None:
        """PCIe replays, energy and power: one batched call, single calls for what it cannot give."""
        done: set[int] = set()
        wanted = [f for f in _FIELDS if f.field_id in d.batched]
        got = self._call(d, "nvmlDeviceGetFieldValues", d.handle, [f.field_id for f in wanted]) if wanted else _SKIP
        if got is not _SKIP:
            for f, fv in zip(wanted, got):
                code = int(fv.nvmlReturn)
                if code == _NVML_SUCCESS:
                    values[f.key] = getattr(fv.value, _VALUE_MEMBERS[int(fv.valueType)]) * f.scale
                    done.add(f.field_id)
                    continue
                reason = self._return_reason(code)
                if reason == "GpuIsLost":
                    self._errors.count(f"nvmlDeviceGetFieldValues[{f.key}]:GpuIsLost")
                    raise _Lost(f.key)
                if reason in ("NotSupported", "InvalidArgument"):  # unknown here: the single call from now on
                    d.batched.discard(f.field_id)
                else:  # skipped for this sample only
                    self._errors.count(f"nvmlDeviceGetFieldValues[{f.key}]:{reason}")
                    done.add(f.field_id)
        for f in _FIELDS:
            if f.field_id not in done:
                raw = self._call(d, f.fallback, d.handle)
                if raw is not _SKIP:
                    values[f.key] = raw * f.scale

    def _return_reason(self, code: int) -> str:
        try:
            return nvml_reason(self._nvml.NVMLError(code))
        except Exception:
            return _RETURN_REASONS.get(code, f"Error{code}")

    def _processes(self, d: _Device) -> list[GpuProcess]:
        running = self._call(d, "nvmlDeviceGetComputeRunningProcesses", d.handle)
        if running is _SKIP or not running:
            return []
        sm = {} if d.mig_parent is not None else self._process_utilization(d)
        out = []
        for p in running:
            pid = int(p.pid)
            mem = p.usedGpuMemory
            out.append(GpuProcess(gpu_index=d.index, gpu_uuid=d.uuid, pid=pid,
                                  memory_bytes=None if mem is None else int(mem),
                                  sm_utilization_ratio=sm.get(pid), ancestors=self._ancestors_for(pid)))
        return out

    def _process_utilization(self, d: _Device) -> dict[int, float]:
        samples = self._call(d, "nvmlDeviceGetProcessUtilization", d.handle, d.last_seen_us, quiet=("NotFound",))
        if samples is _SKIP:
            return {}
        newest: dict[int, tuple[int, int]] = {}
        for s in samples:
            ts, pid = int(s.timeStamp), int(s.pid)
            if ts > newest.get(pid, (-1, 0))[0]:
                newest[pid] = (ts, int(s.smUtil))
            d.last_seen_us = max(d.last_seen_us, ts)
        return {pid: util / 100 for pid, (_, util) in newest.items()}

    def _ancestors_for(self, pid: int) -> tuple[int, ...]:
        if pid not in self._ancestors:
            try:
                self._ancestors[pid] = tuple(int(a) for a in self._ancestors_of(pid))
            except Exception as exc:
                self._errors.count(f"process_ancestors:{type(exc).__name__}", exc)
                return ()
        return self._ancestors[pid]
