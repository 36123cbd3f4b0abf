"""Per-replica cells that the middleware records into, and the loop that flushes them.

Runs in every replica: the request path writes the cells; the flush thread reads them.

The request path writes an in-flight entry and queues the request's end (``ended``,
see replica/deferred.py); recording it is one lock and a few additions
(prometheus_client's habit), on the flush thread: no I/O, no actor call, nothing that
grows with traffic. Everything else (building a
snapshot, health readings, delivery) runs on the flush thread, every
``flush_interval_s``, and can fail without the request ever noticing.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional, Protocol

from ray_monitor.common.histogram import Histogram, bucket_index
from ray_monitor.replica.usage import UsageTable
from ray_monitor.common.snapshot import (Exemplar, GenAIDelta, HungRequest, ReplicaHealth, ReplicaIdentity,
                       ReplicaSnapshot, SeriesDelta)

#: The ray_monitor package's folder: threads running only its code are not the user's.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

__all__ = ["MAX_OUTCOMES_PER_METHOD", "MAX_PREDICTIONS_PER_FLUSH", "MAX_TRACE_SNAPSHOTS_BUFFERED",
           "ProcessUsage", "Recorder", "SelfErrors", "find_hung", "process_health",
           "thread_stacks"]

logger = logging.getLogger(__name__)

#: Outcomes beyond this many per method are counted under ``other`` (label cap).
MAX_OUTCOMES_PER_METHOD = 32
OTHER = "other"
#: Captured predictions kept per flush; the excess is dropped and counted, so quality
#: metrics become a sample rather than memory growing with traffic.
MAX_PREDICTIONS_PER_FLUSH = 2000
#: Bound of the thread stacks sent with hung requests, per replica and snapshot.
MAX_STACK_BYTES = 32 * 1024
#: Innermost frames kept of each thread's stack.
STACK_FRAMES = 40
#: Buffered snapshots (the aggregator away) that keep their span records; older ones
#: lose them, so a replica's memory for traces stays bounded however long it waits.
MAX_TRACE_SNAPSHOTS_BUFFERED = 10


class SpanSource(Protocol):
    """Where the span records come from (``tracing.SpanRecords``)."""

    def drain(self) -> tuple[list[dict], dict[str, int]]:
        """The records since the last drain, and drops by cause."""


class KeptSource(Protocol):
    """The trace ids this replica kept (``tail.TailBuffer``), for the aggregator to spread."""

    def drain(self) -> tuple[list[str], dict[str, int]]:
        """The kept trace ids (hex) since the last drain, and drops by cause."""


class Sink(Protocol):
    """Where snapshots go. ``send`` may raise; the recorder keeps them and counts."""

    def send(self, snapshots: list[ReplicaSnapshot]) -> list[ReplicaSnapshot]:
        """Delivers what it can and returns the snapshots to try again later."""


class SelfErrors:
    """Failures of the monitor itself, counted by cause and logged once per cause."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, cause: str, exc: Optional[BaseException] = None, n: int = 1) -> None:
        with self._lock:
            first = cause not in self.counts
            self.counts[cause] = self.counts.get(cause, 0) + n
        if first:
            logger.warning("ray-monitor: %s%s (logged once; counted in "
                           "ray_monitor_self_errors_total{cause=%r})", cause,
                           f": {exc!r}" if exc is not None else "", cause)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


class _Cell:
    __slots__ = ("latency", "first_item", "exemplars", "error", "genai")

    def __init__(self, error: bool) -> None:
        self.latency = Histogram()
        self.first_item: Optional[Histogram] = None
        self.exemplars: dict[int, Exemplar] = {}
        self.error = error
        self.genai: Optional[GenAIDelta] = None  # streams and token usage (streaming.Figures)


class MethodCells:
    """The pre-bound cells of one method: what a request touches, and only that."""

    __slots__ = ("name", "running", "cells", "ended", "_lock", "_ids", "_recorder", "_queued")

    def __init__(self, name: str, recorder: "Recorder") -> None:
        self.name = name
        self.running: dict[int, tuple[float, str]] = {}  # token -> (start, request id)
        self.cells: dict[str, _Cell] = {}
        self._lock = recorder._lock
        self._ids = recorder._ids
        self._recorder = recorder
        self._queued = recorder.queued
        self.ended = recorder.ended  # requests ended, waiting to be recorded (deferred)

    def begin(self, start: float, request_id: str = "", queue: Optional[float] = None) -> int:
        """A request starts; ``queue``: its queue time, when its caller sent one."""
        token = next(self._ids)  # itertools.count is atomic under the GIL
        self.running[token] = (start, request_id)
        if queue is not None:
            self._queued[token] = queue
        return token

    def queued(self, token: int) -> Optional[float]:
        """The queue time of a running request (None: unknown)."""
        q = self._queued
        return q.get(token) if q else None

    def end(self, token: int, outcome: str, error: bool, latency: float,
            first_item: Optional[float] = None, exemplar: Optional[Exemplar] = None,
            genai: Any = None) -> None:
        self.running.pop(token, None)
        queue = self._queued.pop(token, None) if self._queued else None
        with self._lock:
            cell = self.cells.get(outcome)
            if cell is None:
                cell = self._new_cell(outcome, error)
            cell.latency.record(latency)
            if queue is not None:
                _record_queue(cell, queue, first_item)
            if first_item is not None:
                if cell.first_item is None:
                    cell.first_item = Histogram()
                cell.first_item.record(first_item)
            if exemplar is not None and latency > 0.0:
                cell.exemplars[bucket_index(latency)] = exemplar
            if genai is not None:  # a streaming.Figures
                if cell.genai is None:
                    cell.genai = GenAIDelta()
                genai.add_to(cell.genai)

    def _new_cell(self, outcome: str, error: bool) -> _Cell:
        # Exception type names come from user code: cap them so a bug cannot grow labels.
        if len(self.cells) >= MAX_OUTCOMES_PER_METHOD:
            self._recorder.self_errors.count("label_overflow:outcome")
            outcome = OTHER
            cell = self.cells.get(outcome)
            if cell is not None:
                return cell
        cell = self.cells[outcome] = _Cell(error)
        return cell


def _record_queue(cell: _Cell, queue: float, first_item: Optional[float]) -> None:
    g = cell.genai
    if g is None:
        g = cell.genai = GenAIDelta()
    (g.queue or _new(g, "queue")).record(queue)
    if first_item is not None:
        (g.first_with_queue or _new(g, "first_with_queue")).record(queue + first_item)


def _new(g: GenAIDelta, name: str) -> Histogram:
    h = Histogram()
    setattr(g, name, h)
    return h


class Recorder:
    """All the cells of one monitored deployment in one process, and its flush loop."""

    def __init__(self, *, identity: ReplicaIdentity, sink: Optional[Sink] = None,
                 flush_interval_s: float = 1.0, buffer_size: int = 300,
                 hang_threshold_s: float = 0.0, clock: Callable[[], float] = time.time,
                 health: Optional[Callable[[], ReplicaHealth]] = None,
                 on_flush: Optional[Callable[[ReplicaSnapshot], None]] = None,
                 max_predictions: int = MAX_PREDICTIONS_PER_FLUSH,
                 spans: Optional[SpanSource] = None,
                 self_errors: Optional[SelfErrors] = None,
                 kept: Optional[KeptSource] = None) -> None:
        self.identity = identity
        self.sink = sink
        self.flush_interval_s = flush_interval_s
        self.buffer_size = buffer_size
        self.clock = clock
        self.health = health
        self.on_flush = on_flush
        self.max_predictions = max_predictions
        self.spans = spans
        self.kept = kept
        #: Work for the flush thread after each snapshot (the span ids drawn ahead:
        #: replica/span_ids.py), so it is never on the request path.
        self.after_snapshot: Optional[Callable[[], Any]] = None
        self._predictions: list[Any] = []
        self.usage = UsageTable()  # per (model, tenant), for tenants and cost
        self.self_errors = self_errors if self_errors is not None else SelfErrors()
        self.methods: dict[str, MethodCells] = {}
        self.routed: list[str] = []  # see ReplicaSnapshot.routed
        self._lock = threading.Lock()
        self._ids = itertools.count()
        #: token -> queue time of running requests whose caller sent its time (queueing)
        self.queued: dict[int, float] = {}
        #: requests that ended, each a callable of no arguments that records it (the
        #: middleware's request object itself: no tuple made per request; see
        #: replica/deferred.py), appended on the request path, called by :meth:`drain`
        self.ended: collections.deque = collections.deque()
        self._seq = 0
        self._window_start = clock()
        self._buffer: list[ReplicaSnapshot] = []
        self._dropped = 0
        self._totals: dict[str, int] = {}  # "method\toutcome" -> requests since start
        self.last_flush_s: Optional[float] = None
        self.max_flush_s = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def method(self, name: str) -> MethodCells:
        cells = self.methods.get(name)
        if cells is None:
            cells = self.methods.setdefault(name, MethodCells(name, self))
        return cells

    def record_prediction(self, prediction: Any) -> None:
        """Keeps one captured prediction for the next snapshot (extractor methods only)."""
        with self._lock:
            if len(self._predictions) < self.max_predictions:
                self._predictions.append(prediction)
                return
        self.self_errors.count("predictions_dropped:buffer_full")

    # -- off the request path -------------------------------------------------

    def drain(self) -> int:
        """Records the requests that ended since the last drain (replica/deferred.py);
        returns how many. Runs at the start of every snapshot; a test that reads the
        cells or the spans right after a request calls it first."""
        ended = self.ended
        n = 0
        while True:
            try:
                item = ended.popleft()  # atomic: two drains never take one request
            except IndexError:
                return n
            n += 1
            try:
                item()
            except Exception as e:  # one bad request's record, never the rest
                self.self_errors.count("middleware_failed", e)

    def snapshot(self, now: Optional[float] = None) -> ReplicaSnapshot:
        """Takes the deltas since the last snapshot (and resets them)."""
        now = self.clock() if now is None else now
        self.drain()  # every request that ended before this flush began is in it
        series: list[SeriesDelta] = []
        with self._lock:
            taken = [(m.name, m.cells) for m in self.methods.values()]
            for m in self.methods.values():
                m.cells = {}
            predictions, self._predictions = self._predictions, []
        totals = self._totals
        for name, cells in taken:
            for outcome, c in cells.items():
                series.append(SeriesDelta(name, outcome, c.error, c.latency, c.first_item,
                                          c.exemplars, c.genai))
                key = f"{name}\t{outcome}"
                totals[key] = totals.get(key, 0) + c.latency.count
        traces: list[dict] = []
        if self.spans is not None:
            traces, drops = self.spans.drain()
            for cause, n in drops.items():
                self.self_errors.count(cause, n=n)
        kept: list[str] = []
        if self.kept is not None:
            kept, drops = self.kept.drain()
            for cause, n in drops.items():
                self.self_errors.count(cause, n=n)
        inflight = {m.name: len(m.running) for m in self.methods.values()}
        health = None
        if self.health is not None:
            try:
                health = self.health()
            except Exception as e:  # health is a nice-to-have; never lose the counts for it
                self.self_errors.count("health_probe_failed", e)
        self._seq += 1
        snap = ReplicaSnapshot(self.identity, self._seq, self._window_start, now, series,
                               inflight, health, self.self_errors.snapshot(), self._dropped,
                               predictions, traces, dict(totals), self.last_flush_s,
                               self.max_flush_s, kept_traces=kept, routed=self.routed,
                               usage=self.usage.drain())
        self._window_start = now
        return snap

    def running(self, now: Optional[float] = None) -> list[tuple[str, float, str]]:
        """``(method, seconds running, request id)`` of every request in flight."""
        now = time.perf_counter() if now is None else now
        out = []
        for m in list(self.methods.values()):
            for start, rid in list(m.running.values()):
                out.append((m.name, now - start, rid))
        return out

    def flush(self, now: Optional[float] = None) -> None:
        """One round: snapshot, buffer, deliver what can be delivered; timed, and the
        time sent with the next snapshot (nothing in it may wait on a network)."""
        t0 = time.perf_counter()
        try:
            self._flush(now)
        finally:
            took = time.perf_counter() - t0
            self.last_flush_s = took
            if took > self.max_flush_s:
                self.max_flush_s = took

    def _flush(self, now: Optional[float]) -> None:
        if self.sink is not None and len(self._buffer) >= self.buffer_size:
            # Make room first, oldest out: the newest data matters most to alerts, and
            # the new snapshot then tells the aggregator how many never arrived.
            excess = len(self._buffer) - self.buffer_size + 1
            del self._buffer[:excess]
            self._dropped += excess
            self.self_errors.count("snapshot_buffer_full")
        snap = self.snapshot(now)
        if self.after_snapshot is not None:
            try:
                self.after_snapshot()
            except Exception as e:
                self.self_errors.count("after_snapshot_failed", e)
        if self.on_flush is not None:
            try:
                self.on_flush(snap)
            except Exception as e:
                self.self_errors.count("otlp_metrics_export_failed", e)
        if self.sink is None:
            return
        self._buffer.append(snap)
        self._trim_traces()
        try:
            self._buffer = self.sink.send(self._buffer)
        except Exception as e:
            self.self_errors.count(f"sink_failed:{type(e).__name__}", e)

    def _trim_traces(self) -> None:
        """Buffered snapshots past the newest few give up their span records."""
        for old in self._buffer[:-MAX_TRACE_SNAPSHOTS_BUFFERED]:
            if old.traces:
                self.self_errors.count("trace_spans_dropped:aggregator_away", n=len(old.traces))
                old.traces = []
            old.kept_traces = []  # by the time it arrives, no replica holds their spans

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="ray-monitor-flush",
                                        daemon=True)
        self._thread.start()

    def next_flush_at(self, now: float) -> float:
        """The next whole multiple of ``flush_interval_s`` after ``now`` (wall clock).

        Flushes on whole seconds make every delta cover one second of the aggregator's
        windows exactly (it files a delta under the second of its midpoint), so a window
        of N seconds holds N deltas of each replica, never N - 1 or N + 1 as free-running
        flushes drift across second boundaries (see the window store's Time)."""
        interval = self.flush_interval_s
        return (math.floor(now / interval) + 1) * interval

    def _loop(self) -> None:
        # the first flush a whole interval away at least: a replica's first delta is not
        # a sliver, and a test that takes snapshots itself (a long interval) is never raced
        target = self.next_flush_at(self.clock() + self.flush_interval_s)
        while not self._stop.wait(max(0.0, target - self.clock())):
            try:
                self.flush()
            except Exception as e:  # the loop must outlive any single bad round
                self.self_errors.count("flush_failed", e)
            # the next grid point (a wake-up a hair early must not flush twice); a flush
            # that overran skips the points it missed
            target += self.flush_interval_s
            if target <= self.clock():
                target = self.next_flush_at(self.clock())

    def close(self, timeout: float = 5.0) -> None:
        """Stops the loop after one last flush, so short-lived replicas lose nothing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        try:
            self.flush()
        except Exception as e:
            self.self_errors.count("flush_failed", e)

    @property
    def buffered(self) -> int:
        return len(self._buffer)


def process_health(recorder: "Recorder", loop_lag: Callable[[], Optional[float]],
                   hang_threshold_s: float = 0.0) -> Callable[[], ReplicaHealth]:
    """A health probe for the flush thread: CPU and RSS of this process (see
    :class:`ProcessUsage`), the event loop's lag, the oldest request still running, and the
    requests running longer than ``hang_threshold_s`` (0: none reported) with every
    thread's stack."""
    usage = ProcessUsage()

    def probe() -> ReplicaHealth:
        running = recorder.running()
        longest = max((r[1] for r in running), default=0.0)
        return ReplicaHealth(cpu_percent=usage.cpu_percent(), rss_bytes=usage.rss(),
                             loop_lag_s=loop_lag(), longest_request_s=longest,
                             hung=find_hung(running, hang_threshold_s, thread_stacks))
    return probe


class ProcessUsage:
    """This process's CPU (percent of one core since the last reading, as psutil's
    ``cpu_percent(None)``) and resident memory. Read every flush of every replica, so
    from the clocks and ``/proc/self/statm`` on an open descriptor (about 2 us, where
    psutil took 40 us, several times that on a cold cache); psutil where there is no
    ``/proc`` (it ships with Ray)."""

    def __init__(self) -> None:
        self._cpu, self._wall = time.process_time(), time.monotonic()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        try:
            self._statm: Optional[int] = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._statm = None
            import psutil

            self._proc = psutil.Process(os.getpid())

    def cpu_percent(self) -> float:
        cpu, wall = time.process_time(), time.monotonic()
        dt = wall - self._wall
        pct = (cpu - self._cpu) / dt * 100.0 if dt > 0 else 0.0
        self._cpu, self._wall = cpu, wall
        return round(pct, 1)

    def rss(self) -> int:
        if self._statm is None:
            return self._proc.memory_info().rss
        return int(os.pread(self._statm, 128, 0).split()[1]) * self._page


def find_hung(running: list[tuple[str, float, str]], threshold_s: float,
              stacks: Callable[[], str]) -> list[HungRequest]:
    """The requests of ``running`` (``recorder.running()``) in flight longer than
    ``threshold_s``, oldest first, each with ``stacks()``: taken once, shared by all."""
    if not threshold_s > 0:
        return []
    hung = sorted((r for r in running if r[1] > threshold_s), key=lambda r: -r[1])
    if not hung:
        return []
    try:
        text = stacks()
    except Exception as e:  # the report without stacks still says which request hangs
        text = f"stacks unavailable: {e!r}"
    return [HungRequest(method, rid, round(age, 3), text) for method, age, rid in hung]


def thread_stacks(limit_bytes: int = MAX_STACK_BYTES, frames: Optional[dict] = None,
                  names: Optional[dict[int, str]] = None) -> str:
    """Every thread's stack but the caller's, innermost ``STACK_FRAMES`` frames each,
    within ``limit_bytes`` (UTF-8). Threads running code outside the Python installation
    (the user's) come first, so a hung request's stack survives the cut."""
    frames = sys._current_frames() if frames is None else frames
    if names is None:
        names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    # Not user code: the Python installation, installed packages, and ray-monitor itself
    # (its flush and notifier threads, wherever the package is installed from).
    roots = tuple({p for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, _PACKAGE_DIR) if p})
    parts = []
    for ident, frame in frames.items():
        if ident == me:
            continue
        summary = traceback.extract_stack(frame, limit=STACK_FRAMES)
        user = any(not f.filename.startswith(roots) and "site-packages" not in f.filename
                   and not f.filename.startswith("<") for f in summary)
        text = (f"Thread {names.get(ident, '?')} ({ident}):\n"
                + "".join(traceback.format_list(summary)))
        parts.append((not user, names.get(ident, ""), text))
    parts.sort(key=lambda p: (p[0], p[1]))
    out, used, left_out = [], 0, 0
    for _, _, text in parts:
        size = len(text.encode())
        if used + size > limit_bytes:
            left_out += 1
            continue
        out.append(text)
        used += size
    if left_out:
        out.append(f"... {left_out} more thread(s) left out to stay within {limit_bytes} bytes\n")
    return "\n".join(out)
