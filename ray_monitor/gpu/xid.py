"""Runs in the GPU-stats actor on every node: the XID watcher, which counts the XID
critical errors the driver reports per GPU and code (``GpuDevice.xid_errors``).

NVML delivers XID events only to a blocking wait, so the watcher waits on a daemon thread
of its own and the sampler reads its counts; the sampler starts it after its first sample.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional, Sequence

from ray_monitor.gpu.errors import ErrorBook, nvml_reason

__all__ = ["XidWatcher"]

log = logging.getLogger(__name__)

_XID_CRITICAL = 0x8  # nvmlEventTypeXidCriticalError, from nvml.h


class XidWatcher:
    """Counts XID critical errors per device and code, on a daemon thread of its own.

    ``devices`` are ``(uuid, handle)`` pairs of physical GPUs. The event set is freed by the
    thread itself after its last wait, never while a wait is in flight.
    """

    def __init__(self, *, nvml: Any, devices: Sequence[tuple[str, Any]], wait_ms: int = 1000,
                 retry_s: float = 1.0) -> None:
        if not isinstance(wait_ms, int) or wait_ms <= 0:
            raise ValueError(f"wait_ms must be a positive int of milliseconds, got {wait_ms!r}")
        self._nvml = nvml
        self._devices = list(devices)
        self._wait_ms = wait_ms
        self._retry_s = retry_s
        self._errors = ErrorBook("XID watcher", log)
        self._counts: dict[str, dict[int, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._set: Any = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> bool:
        """Registers for XID events; False (and no thread) where no device supports them."""
        try:
            self._set = self._nvml.nvmlEventSetCreate()
        except Exception as exc:
            self._errors.count(f"nvmlEventSetCreate:{nvml_reason(exc)}", exc)
            return False
        registered = 0
        for uuid, handle in self._devices:
            try:
                self._nvml.nvmlDeviceRegisterEvents(handle, _XID_CRITICAL, self._set)
                registered += 1
            except Exception as exc:
                log.info("XID events cannot be watched on GPU %s (%s); it is skipped", uuid, nvml_reason(exc))
        if not registered:
            self._free()
            return False
        self._thread = threading.Thread(target=self._run, name="ray-monitor-xid", daemon=True)
        self._thread.start()
        return True

    def counts(self) -> dict[str, dict[int, int]]:
        """Cumulative counts: device UUID -> XID code -> count."""
        with self._lock:
            return {uuid: dict(codes) for uuid, codes in self._counts.items()}

    def errors(self) -> dict[str, int]:
        return self._errors.snapshot()

    def stop(self, timeout_s: Optional[float] = None) -> bool:
        """Stops the thread; True once it has ended (and freed the event set)."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(self._wait_ms / 1000 + 5 if timeout_s is None else timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    data = self._nvml.nvmlEventSetWait(self._set, self._wait_ms)
                except Exception as exc:
                    reason = nvml_reason(exc)
                    if reason != "Timeout":
                        self._errors.count(f"nvmlEventSetWait:{reason}", exc)
                        self._stop.wait(self._retry_s)  # a lasting failure must not spin
                    continue
                if int(data.eventType) & _XID_CRITICAL:
                    self._record(data)
        finally:
            self._free()

    def _record(self, data: Any) -> None:
        try:
            uuid = self._nvml.nvmlDeviceGetUUID(data.device)
        except Exception as exc:
            self._errors.count(f"nvmlDeviceGetUUID:{nvml_reason(exc)}", exc)
            uuid = ""  # counted, under an unknown device, rather than lost
        xid = int(data.eventData)
        log.warning("XID %d on GPU %s", xid, uuid or "(unknown)")
        with self._lock:
            codes = self._counts.setdefault(uuid, {})
            codes[xid] = codes.get(xid, 0) + 1

    def _free(self) -> None:
        event_set, self._set = self._set, None
        if event_set is None:
            return
        try:
            self._nvml.nvmlEventSetFree(event_set)
        except Exception as exc:
            self._errors.count(f"nvmlEventSetFree:{nvml_reason(exc)}", exc)

