"""The aggregator's time-window store: every series at several resolutions, queried by rules.

The aggregator hands each :class:`~ray_monitor.snapshot.ReplicaSnapshot` and
:class:`~ray_monitor.snapshot.GpuSnapshot` to :meth:`WindowStore.ingest` /
:meth:`WindowStore.ingest_gpu`; alert rules call :meth:`WindowStore.evaluate` with a parsed
:class:`~ray_monitor.catalog.Query`; ``/metrics`` reads :meth:`WindowStore.cumulative`.

Series. One series per metric of :data:`~ray_monitor.catalog.METRICS` and full label set
(the metric's ``labels``, in that order). From a replica snapshot: ``requests`` (+= the
delta's count), ``errors`` (+= the count of deltas whose ``error`` is set), the histograms
``latency_seconds`` and ``first_item_seconds``, the gauge ``inflight`` per method, and the
health gauges (``node`` = the replica's node id; ``loop_lag_seconds`` is skipped when None,
``hung_requests`` is the number of hung requests). From a GPU snapshot: the device gauges
(``gpu_memory_utilization`` = used / total), and ``gpu_xid_errors``, a counter made from
the cumulative per-code counts the GPU actor sends: the first sight of a device counts in
full, a decrease means the actor restarted and the new value is the increase. A device
series exists once per deployment with a replica process on the GPU (``application`` and
``deployment`` "" when none), so a shared GPU's values appear under each deployment.
Per-process series (``replica_gpu_*``) always carry the pid; unattributed processes have
``application``/``deployment``/``replica`` "". Values absent from ``GpuDevice.values`` are
skipped, and so are all values (not the XID counts) of ``lost`` devices.

Time. A replica delta is placed at ``snap.end`` and a GPU sample at ``snap.time``, each
clamped to the store's clock (a replica clock running ahead cannot write the future).
A snapshot delivered late (buffered while the aggregator was away) still lands at its own
time in every resolution that keeps that time; one older than the coarsest resolution is
dropped and counted (``too_old_snapshots``). ``late_snapshots`` counts those whose finest
bucket was more than one step behind the current one on arrival. Series expire by arrival
time, so a replica catching up on old snapshots is alive.

Storage. Each resolution ``(step, slots)`` is a ring of aligned buckets: bucket ``k`` holds
times in ``[k*step, (k+1)*step)`` and lives in slot ``k % slots``, which remembers its
``k``, so stale slots are never read. Counter buckets hold a sum; gauge buckets count, sum,
min, max and the latest sample with its time; histogram buckets count, sum, zero count,
min, max and the sparse exponential-bucket counts (packed int32 pairs, compacted when the
bucket closes). Every sample is written into every resolution, so a coarse bucket is
exactly the union of its fine buckets. Memory is series x slots x bucket size, whatever
the traffic. Steps must each be a whole multiple of the previous one.

Windows. A query over ``window_s`` at time ``now`` reads the finest resolution whose span
(``step * slots``) covers the window (windows longer than the coarsest span are cut to
it: see :attr:`WindowStore.max_window_s`) and takes the buckets whose *start* lies in
``(now - window_s, now]``, so the edges are honoured to one step of that resolution. Runs
of whole coarse buckets inside the window are read from the coarser rings (same data, far
fewer reads). Groups with no data in the window are absent from the result: never NaN,
never 0 for "no data".

Functions (see :data:`~ray_monitor.catalog.FUNCTIONS`). Matchers (``=``, ``!=``, ``=~``,
``!~``; regexes fully anchored, a missing label reads as "") select series, then ``by``
groups them; the result key is the sorted ``(label, value)`` pairs of ``by`` (``()``
without ``by``). Counters: ``count``/``sum`` = increase in the window, ``rate`` = that
over ``window_s``; ``error_ratio`` (on ``requests`` or ``errors``) = errors / requests of
the group, absent when there were no requests. Histograms (merged over the window and
group): ``pNN``/``quantile`` (within 1%, see :mod:`~ray_monitor.histogram`), ``avg``
(mean), ``min``/``max`` (exact), ``count``, ``sum`` (of observed values), ``rate`` =
count / ``window_s``, ``ratio_above`` = share of observations above ``param``, decided
per exponential bucket by its representative value, so the threshold is honoured to
within 0.54%. Gauges: ``avg``/``min``/``max``/``count`` over every sample of every series
of the group; ``last`` = sum of each series' latest sample in the window; ``sum`` = sum of
each series' average; ``deriv`` = least-squares slope per second of the group's per-step
average (absent with fewer than 3 steps with data). ``zscore``: per step of the chosen
resolution, the metric's natural value (counter: rate, histogram: mean, gauge: average);
``latest`` is the newest step with data and the history the earlier ones in the window;
``z = (latest - mean) / max(std, 1% of |mean|, 1e-9)`` (population std), so a flat series
reads 0 and a flat series followed by a jump is a large anomaly. Absent with fewer than 5
history steps. For counters the step holding ``now`` is left out: it is still filling.

Sharing. Within one evaluation round (same ``now``, no ingest in between) per-series
window aggregates, per-group merges and whole results are memoised, so rules that differ
only in function or threshold cost one dictionary copy. :meth:`WindowStore.begin_round`
pins ``now`` for the round; any ingest or expiry invalidates the memo.

Cardinality. At most ``max_series_per_metric`` real series per metric; a new label set
past the cap is folded into one extra series whose label values are all ``"other"``, and
counted (``overflowed_series``: distinct label sets folded, since the overflow series
was created). Gaps: ``seq`` jumps of a replica are counted as ``snapshots_missed``; the
sum of the replicas' own ``dropped`` counters (the usual reason) is ``replica_dropped``.
"""

from __future__ import annotations

import math
import re
import time
from array import array
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain
from typing import Callable, Optional

import numpy as np

from .catalog import FUNCTIONS, METRICS, SHORTHAND_QUANTILES, Matcher, Metric, Query
from .histogram import BASE, Histogram
from .snapshot import Exemplar, GpuSnapshot, ReplicaSnapshot

__all__ = ["CumulativeSeries", "GroupKey", "WindowStore"]

#: A group's labels: sorted ``(name, value)`` pairs of the query's ``by``.
GroupKey = tuple[tuple[str, str], ...]

OTHER = "other"
DEFAULT_RESOLUTIONS = ((1.0, 600), (10.0, 360), (60.0, 360))
ZSCORE_MIN_HISTORY = 5
DERIV_MIN_STEPS = 3
#: std floor of zscore, relative to the history's mean, and absolute.
ZSCORE_REL_FLOOR = 0.01
ZSCORE_ABS_FLOOR = 1e-9

_COLUMNS = {"counter": ("v",), "histogram": ("n", "s", "z", "lo", "hi"),
            "gauge": ("n", "s", "lo", "hi", "last", "t")}
_EMPTY = -(2 ** 62)  # bucket index of an empty slot: below any real one, even before 1970
_GROW_ROWS = 16
_COMPACT_AT = 8  # appended deltas in one histogram bucket before it is compacted
_LOG_BASE = math.log(BASE)
_BYTES_OVERHEAD = 33  # a bytes object's header, for the memory estimate

# GpuDevice.values key -> gauge metric
_GPU_GAUGES = (("utilization_ratio", "gpu_utilization"),
               ("memory_used_bytes", "gpu_memory_used_bytes"),
               ("memory_total_bytes", "gpu_memory_total_bytes"),
               ("temperature_celsius", "gpu_temperature_celsius"),
               ("power_watts", "gpu_power_watts"),
               ("throttled", "gpu_throttled"))


@dataclass
class CumulativeSeries:
    """One series since the store started, for ``/metrics``.

    ``value`` is a counter's total or a gauge's latest value (``None`` for histograms);
    ``histogram`` and ``exemplars`` (the newest per latency bucket) are set for histograms.
    ``updated`` is when the series last received data (store clock).
    """

    metric: str
    kind: str
    labels: dict[str, str]
    value: Optional[float] = None
    histogram: Optional[Histogram] = None
    exemplars: dict[int, Exemplar] = field(default_factory=dict)
    updated: float = 0.0


def _pack(h: Histogram) -> bytes:
    return array("i", chain.from_iterable(h.buckets.items())).tobytes()


def _pairs(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.int32).reshape(-1, 2)


def _compact(b: bytes) -> bytes:
    a = _pairs(b)
    idx, inv = np.unique(a[:, 0], return_inverse=True)
    out = np.empty((len(idx), 2), dtype=np.int32)
    out[:, 0] = idx
    out[:, 1] = np.bincount(inv.ravel(), weights=a[:, 1])
    return out.tobytes()


def _bucket_values(idx: np.ndarray) -> np.ndarray:
    """Vectorised :func:`~ray_monitor.histogram.bucket_value`."""
    return 2.0 * np.exp((idx + 1) * _LOG_BASE) / (BASE + 1.0)


@lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"matcher regex {pattern!r} is invalid: {e}; use Python regex syntax") from e


def _matches(m: Matcher, value: str) -> bool:
    if m.op == "=":
        return value == m.value
    if m.op == "!=":
        return value != m.value
    hit = _regex(m.value).fullmatch(value) is not None
    return hit if m.op == "=~" else not hit


class _Ring:
    """One resolution of one metric: 2-D arrays [series row, slot]."""

    def __init__(self, step: float, slots: int, kind: str) -> None:
        self.step, self.slots, self.kind = step, slots, kind
        self.keys = np.full((0, slots), _EMPTY, dtype=np.int64)
        for c in _COLUMNS[kind]:
            setattr(self, c, np.zeros((0, slots)))
        if kind == "histogram":
            self.hb = np.empty((0, slots), dtype=object)  # packed pairs, or None
            self.hbn = np.zeros((0, slots), dtype=np.int16)  # deltas appended since compaction
            self.open = np.full(0, _EMPTY, dtype=np.int64)  # newest bucket written, per row
            self.hb_bytes = 0

    def grow(self, cap: int) -> None:
        extra = cap - self.keys.shape[0]
        pad = lambda a, fill: np.concatenate(  # noqa: E731
            (a, np.full((extra,) + a.shape[1:], fill, dtype=a.dtype)))
        self.keys = pad(self.keys, _EMPTY)
        for c in _COLUMNS[self.kind]:
            setattr(self, c, pad(getattr(self, c), 0.0))
        if self.kind == "histogram":
            self.hb = pad(self.hb, None)
            self.hbn = pad(self.hbn, 0)
            self.open = pad(self.open, _EMPTY)

    def clear_row(self, row: int) -> None:
        self.keys[row] = _EMPTY
        if self.kind == "histogram":
            self.hb_bytes -= sum(len(b) + _BYTES_OVERHEAD for b in self.hb[row] if b is not None)
            self.hb[row] = None
            self.hbn[row] = 0
            self.open[row] = _EMPTY

    def nbytes(self) -> int:
        n = self.keys.nbytes + sum(getattr(self, c).nbytes for c in _COLUMNS[self.kind])
        if self.kind == "histogram":
            n += self.hb.nbytes + self.hbn.nbytes + self.open.nbytes + self.hb_bytes
        return n


class _Table:
    """All series of one metric: label index, rings, cumulative values."""

    def __init__(self, metric: Metric, resolutions: tuple[tuple[float, int], ...]) -> None:
        self.metric = metric
        self.kind = metric.kind
        self.index: dict[tuple[str, ...], int] = {}
        self.labels: list[Optional[tuple[str, ...]]] = []
        self.free: list[int] = []
        self.updated: list[float] = []
        self.cum: list = []  # per row: [total] | [value, time] | [Histogram, exemplars]
        self.rings = [_Ring(step, slots, metric.kind) for step, slots in resolutions]
        self.version = 0  # bumps when a series comes or goes: selections depend on it
        self.other = (OTHER,) * len(metric.labels)
        self.folded: set[int] = set()
        self.selections: dict = {}

    def row_for(self, values: tuple[str, ...], cap: int) -> int:
        row = self.index.get(values)
        if row is not None:
            return row
        if len(self.index) - (self.other in self.index) >= cap:
            self.folded.add(hash(values))
            values = self.other
            row = self.index.get(values)
            if row is not None:
                return row
        if self.free:
            row = self.free.pop()
        else:
            row = len(self.labels)
            self.labels.append(None)
            self.updated.append(0.0)
            self.cum.append(None)
            if row >= self.rings[0].keys.shape[0]:
                cap_rows = row + max(_GROW_ROWS, row // 2)
                for ring in self.rings:
                    ring.grow(cap_rows)
        self.index[values] = row
        self.labels[row] = values
        self.cum[row] = ([0.0] if self.kind == "counter" else [math.nan, -math.inf]
                         if self.kind == "gauge" else [Histogram(), {}])
        self.version += 1
        return row

    def remove(self, values: tuple[str, ...]) -> None:
        row = self.index.pop(values)
        self.labels[row] = None
        self.cum[row] = None
        for ring in self.rings:
            ring.clear_row(row)
        self.free.append(row)
        self.version += 1
        if values == self.other:
            self.folded.clear()


class _SeriesWindow:
    """Per-row aggregates of one metric over one window (arrays indexed by row)."""

    def __init__(self, ri: int, a: int, b: int, rows: int) -> None:
        self.ri, self.a, self.b = ri, a, b
        self.present = np.zeros(rows, dtype=bool)
        self.pair_rows: list[np.ndarray] = []
        self.pair_objs: list[list] = []
        self._dense = None

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-row histogram counts ``[rows, C]`` and the bucket index of each column."""
        if self._dense is None:
            objs = list(chain.from_iterable(self.pair_objs))
            rows = len(self.present)
            if not objs:
                self._dense = (np.zeros((rows, 0)), np.zeros(0, dtype=np.int64))
                return self._dense
            lens = np.fromiter(map(len, objs), dtype=np.int64, count=len(objs)) // 8
            pairs = _pairs(b"".join(objs))
            tags = np.repeat(np.concatenate(self.pair_rows), lens)
            idx = pairs[:, 0].astype(np.int64)
            lo, hi = int(idx.min()), int(idx.max())
            width = hi - lo + 1
            if rows * width <= 50_000_000:
                d = np.bincount(tags * width + (idx - lo), weights=pairs[:, 1],
                                minlength=rows * width).reshape(rows, width)
                used = np.flatnonzero(d.any(axis=0))
                self._dense = (d[:, used], used + lo)
            else:  # outliers spread the range: index the buckets actually used
                cols, inv = np.unique(idx, return_inverse=True)
                d = np.bincount(tags * len(cols) + inv.ravel(), weights=pairs[:, 1],
                                minlength=rows * len(cols)).reshape(rows, len(cols))
                self._dense = (d, cols)
        return self._dense


class _Groups:
    """One (metric, window, matchers, by): the present rows sorted by group, and sums."""

    def __init__(self, keys: list[GroupKey], rows: np.ndarray, starts: np.ndarray,
                 sw: _SeriesWindow) -> None:
        self.keys, self.rows, self.starts, self.sw = keys, rows, starts, sw
        self._memo: dict = {}

    def reduce(self, name: str, ufunc=np.add) -> np.ndarray:
        """``ufunc``-reduce the per-row array ``sw.<name>`` within each group (memoised)."""
        key = (name, ufunc)
        if key not in self._memo:
            self._memo[key] = ufunc.reduceat(getattr(self.sw, name)[self.rows], self.starts)
        return self._memo[key]

    def hist_cum(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-group cumulative bucket counts, and the columns' bucket indices and values."""
        if "cum" not in self._memo:
            d, cols = self.sw.dense()
            g = np.add.reduceat(d[self.rows], self.starts, axis=0) if d.shape[1] else \
                np.zeros((len(self.starts), 0))
            self._memo["cum"] = (np.cumsum(g, axis=1), cols, _bucket_values(cols))
        return self._memo["cum"]


class WindowStore:
    """Replica and GPU series at several resolutions, for rules, /metrics and the API.

    Not thread-safe: the aggregator actor calls it from one thread.
    """

    def __init__(self, *, resolutions: tuple[tuple[float, int], ...] = DEFAULT_RESOLUTIONS,
                 series_ttl_s: float = 300.0, max_series_per_metric: int = 10_000,
                 clock: Callable[[], float] = time.time) -> None:
        self._res = self._check_resolutions(resolutions)
        if not (isinstance(series_ttl_s, (int, float)) and series_ttl_s > 0):
            raise ValueError(f"series_ttl_s must be a positive number of seconds, got {series_ttl_s!r}")
        if not (isinstance(max_series_per_metric, int) and max_series_per_metric >= 1):
            raise ValueError("max_series_per_metric must be an int >= 1, "
                             f"got {max_series_per_metric!r}")
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        self._ttl = float(series_ttl_s)
        self._cap = max_series_per_metric
        self._clock = clock
        self._mult = [round(self._res[i + 1][0] / self._res[i][0]) for i in range(len(self._res) - 1)]
        self._tables = {name: _Table(m, self._res) for name, m in METRICS.items()}
        self._replicas: dict[tuple[str, str, str], list] = {}  # -> [last seq, dropped, seen]
        self._xid: dict[tuple[str, str], tuple[dict[int, int], float]] = {}
        self._max_time = -math.inf  # newest sample time held: tells if the future is empty
        self._version = 0  # bumps on every change of data: the round memo depends on it
        self._round_now: Optional[float] = None
        self._memo: dict = {}
        self._memo_stamp: Optional[tuple[float, int]] = None
        self._counts = dict.fromkeys(("snapshots_ingested", "gpu_snapshots_ingested",
                                      "snapshots_missed", "late_snapshots",
                                      "too_old_snapshots"), 0)

    @staticmethod
    def _check_resolutions(resolutions) -> tuple[tuple[float, int], ...]:
        try:
            res = tuple((float(step), int(slots)) for step, slots in resolutions)
        except (TypeError, ValueError):
            raise ValueError("resolutions must be (step seconds, slots) pairs, "
                             f"e.g. ((1.0, 600), (10.0, 360)); got {resolutions!r}") from None
        if not res:
            raise ValueError("resolutions must name at least one (step seconds, slots) pair")
        for i, (step, slots) in enumerate(res):
            if step <= 0 or slots < 1:
                raise ValueError(f"resolutions[{i}] = {resolutions[i]!r}: step must be > 0 "
                                 "and slots >= 1")
            if i:
                prev_step, prev_slots = res[i - 1]
                m = step / prev_step
                if m < 2 or abs(m - round(m)) > 1e-9:
                    raise ValueError(f"resolutions[{i}]: step {step:g} must be a whole multiple "
                                     f"(>= 2) of the previous step {prev_step:g}")
                if step * slots < prev_step * prev_slots:
                    raise ValueError(f"resolutions[{i}]: span {step * slots:g}s must not be "
                                     f"shorter than the previous span {prev_step * prev_slots:g}s")
        return res

    @property
    def max_window_s(self) -> float:
        """The longest window a query can see; longer windows are cut to it."""
        step, slots = self._res[-1]
        return step * slots

    # ------------------------------------------------------------------ ingest

    def _placement(self, t: float, now: float) -> list[tuple[int, int, int]]:
        """(ring, bucket, slot) for each resolution that still keeps time ``t``."""
        where = []
        for ri, (step, slots) in enumerate(self._res):
            k = math.floor(t / step)
            if k > math.floor(now / step) - slots:
                where.append((ri, k, k % slots))
        return where

    def _begin_write(self, t: float, now: float) -> Optional[list[tuple[int, int, int]]]:
        where = self._placement(t, now)
        if not where:
            self._counts["too_old_snapshots"] += 1
            return None
        step = self._res[0][0]
        if math.floor(t / step) < math.floor(now / step) - 1:
            self._counts["late_snapshots"] += 1
        self._version += 1
        if t > self._max_time:
            self._max_time = t
        return where

    def ingest(self, snap: ReplicaSnapshot) -> None:
        """Adds one replica delta snapshot (see the module docstring for what it becomes)."""
        now = self._clock()
        self._counts["snapshots_ingested"] += 1
        ident = snap.identity
        rkey = (ident.application, ident.deployment, ident.replica)
        seen = self._replicas.get(rkey)
        if seen is None:
            self._replicas[rkey] = [snap.seq, snap.dropped, now]
        else:
            if snap.seq > seen[0] + 1:
                self._counts["snapshots_missed"] += snap.seq - seen[0] - 1
            seen[0] = max(seen[0], snap.seq)
            seen[1] = snap.dropped
            seen[2] = now
        t = min(snap.end, now)
        where = self._begin_write(t, now)
        if where is None:
            return
        app, dep, rep, mv = ident.application, ident.deployment, ident.replica, ident.model_version
        tables, cap = self._tables, self._cap
        requests, errors = tables["requests"], tables["errors"]
        latency, first_item = tables["latency_seconds"], tables["first_item_seconds"]
        for d in snap.series:
            labels = (app, dep, rep, d.method, mv, d.outcome)
            n = d.latency.count
            self._add_counter(requests, requests.row_for(labels, cap), where, n, now)
            if d.error:
                self._add_counter(errors, errors.row_for(labels, cap), where, n, now)
            if n:
                self._add_hist(latency, latency.row_for(labels, cap), where, d.latency, t, now,
                               d.exemplars)
            if d.first_item is not None and d.first_item.count:
                self._add_hist(first_item, first_item.row_for(labels, cap), where, d.first_item,
                               t, now, None)
        inflight = tables["inflight"]
        for method, value in snap.inflight.items():
            row = inflight.row_for((app, dep, rep, method, mv), cap)
            self._add_gauge(inflight, row, where, float(value), t, now)
        h = snap.health
        if h is not None:
            labels = (app, dep, rep, mv, ident.node_id)
            for name, value in (("cpu_percent", h.cpu_percent), ("rss_bytes", h.rss_bytes),
                                ("loop_lag_seconds", h.loop_lag_s),
                                ("longest_request_seconds", h.longest_request_s),
                                ("hung_requests", len(h.hung))):
                if value is not None:
                    table = tables[name]
                    self._add_gauge(table, table.row_for(labels, cap), where, float(value), t, now)

    def ingest_gpu(self, snap: GpuSnapshot) -> None:
        """Adds one GPU sample of a node (see the module docstring for what it becomes)."""
        now = self._clock()
        self._counts["gpu_snapshots_ingested"] += 1
        node = snap.node_id
        increases = {}
        for dev in snap.devices:  # XID baselines move even if the sample is too old to keep
            key = (node, dev.uuid)
            prev = self._xid.get(key, ({}, 0.0))[0]
            inc = 0
            for code, count in dev.xid_errors.items():
                before = prev.get(code)
                inc += count if before is None or count < before else count - before
            self._xid[key] = (dict(dev.xid_errors), now)
            increases[dev.uuid] = inc
        t = min(snap.time, now)
        where = self._begin_write(t, now)
        if where is None:
            return
        tables, cap = self._tables, self._cap
        users: dict[str, set[tuple[str, str]]] = {}
        for p in snap.processes:
            if p.replica is not None:
                users.setdefault(p.gpu_uuid, set()).add((p.replica.application, p.replica.deployment))
        lost = set()
        xid = tables["gpu_xid_errors"]
        for dev in snap.devices:
            if dev.lost:
                lost.add(dev.uuid)
            gauges = []
            if not dev.lost:
                v = dev.values
                gauges = [(tables[name], v[key]) for key, name in _GPU_GAUGES if key in v]
                used, total = v.get("memory_used_bytes"), v.get("memory_total_bytes")
                if used is not None and total:
                    gauges.append((tables["gpu_memory_utilization"], used / total))
            for app, dep in sorted(users.get(dev.uuid, ())) or [("", "")]:
                labels = (node, str(dev.index), dev.uuid, dev.model, app, dep)
                self._add_counter(xid, xid.row_for(labels, cap), where, increases[dev.uuid], now)
                for table, value in gauges:
                    self._add_gauge(table, table.row_for(labels, cap), where, float(value), t, now)
        for p in snap.processes:
            if p.gpu_uuid in lost:
                continue
            r = p.replica
            labels = (node, str(p.gpu_index), p.gpu_uuid, r.application if r else "",
                      r.deployment if r else "", r.replica if r else "", str(p.pid))
            for name, value in (("replica_gpu_memory_bytes", p.memory_bytes),
                                ("replica_gpu_utilization", p.sm_utilization_ratio)):
                if value is not None:
                    table = tables[name]
                    self._add_gauge(table, table.row_for(labels, cap), where, float(value), t, now)

    @staticmethod
    def _add_counter(table: _Table, row: int, where, value: float, now: float) -> None:
        for ri, k, p in where:
            ring = table.rings[ri]
            cur = ring.keys[row, p]
            if cur == k:
                ring.v[row, p] += value
            elif cur < k:  # a slot holding a newer bucket means k has left this ring
                ring.keys[row, p] = k
                ring.v[row, p] = value
        table.cum[row][0] += value
        table.updated[row] = now

    @staticmethod
    def _add_gauge(table: _Table, row: int, where, value: float, t: float, now: float) -> None:
        for ri, k, p in where:
            ring = table.rings[ri]
            cur = ring.keys[row, p]
            if cur == k:
                ring.n[row, p] += 1
                ring.s[row, p] += value
                if value < ring.lo[row, p]:
                    ring.lo[row, p] = value
                if value > ring.hi[row, p]:
                    ring.hi[row, p] = value
                if t >= ring.t[row, p]:
                    ring.last[row, p] = value
                    ring.t[row, p] = t
            elif cur < k:
                ring.keys[row, p] = k
                ring.n[row, p] = 1
                ring.s[row, p] = ring.lo[row, p] = ring.hi[row, p] = ring.last[row, p] = value
                ring.t[row, p] = t
        cum = table.cum[row]
        if t >= cum[1]:
            cum[0], cum[1] = value, t
        table.updated[row] = now

    @staticmethod
    def _add_hist(table: _Table, row: int, where, h: Histogram, t: float, now: float,
                  exemplars: Optional[dict[int, Exemplar]]) -> None:
        packed = _pack(h)
        for ri, k, p in where:
            ring = table.rings[ri]
            cur = ring.keys[row, p]
            if cur == k:
                ring.n[row, p] += h.count
                ring.s[row, p] += h.sum
                ring.z[row, p] += h.zero_count
                if h.min < ring.lo[row, p]:
                    ring.lo[row, p] = h.min
                if h.max > ring.hi[row, p]:
                    ring.hi[row, p] = h.max
                old = ring.hb[row, p]
                new = old + packed
                n = ring.hbn[row, p] + 1
                if n >= _COMPACT_AT:
                    new, n = _compact(new), 1
                ring.hb[row, p] = new
                ring.hbn[row, p] = n
                ring.hb_bytes += len(new) - len(old)
            elif cur < k:
                prev = ring.open[row]
                if prev > k:
                    pass  # a late write into an old bucket: the open one stays open
                else:
                    ring.open[row] = k
                    pp = prev % ring.slots
                    # the bucket being left is complete: compact it once
                    if prev != _EMPTY and ring.keys[row, pp] == prev and ring.hbn[row, pp] > 1:
                        old = ring.hb[row, pp]
                        ring.hb[row, pp] = new = _compact(old)
                        ring.hbn[row, pp] = 1
                        ring.hb_bytes += len(new) - len(old)
                old = ring.hb[row, p]
                ring.hb_bytes += len(packed) + _BYTES_OVERHEAD - (
                    len(old) + _BYTES_OVERHEAD if old is not None else 0)
                ring.keys[row, p] = k
                ring.n[row, p] = h.count
                ring.s[row, p] = h.sum
                ring.z[row, p] = h.zero_count
                ring.lo[row, p] = h.min
                ring.hi[row, p] = h.max
                ring.hb[row, p] = packed
                ring.hbn[row, p] = 1
        cum_hist, cum_ex = table.cum[row]
        cum_hist.merge(h)
        if exemplars:
            for i, ex in exemplars.items():
                cur = cum_ex.get(i)
                if cur is None or ex.timestamp >= cur.timestamp:
                    cum_ex[i] = ex
        table.updated[row] = now

    # ------------------------------------------------------------------ queries

    def begin_round(self, now: Optional[float] = None) -> float:
        """Pins ``now`` for the evaluations that follow (``evaluate(q)`` without ``now``),
        so one round of rules sees one instant and shares work. Returns that instant."""
        self._round_now = self._clock() if now is None else float(now)
        return self._round_now

    def end_round(self) -> None:
        """Unpins ``now`` and frees the round's memo."""
        self._round_now = None
        self._memo.clear()
        self._memo_stamp = None

    def _now(self, now: Optional[float]) -> float:
        if now is not None:
            return float(now)
        return self._round_now if self._round_now is not None else self._clock()

    def evaluate(self, query: Query, now: Optional[float] = None) -> dict[GroupKey, float]:
        """The query's value per group at ``now``; groups without data are absent."""
        table = self._tables.get(query.metric)
        if table is None:
            raise ValueError(f"query metric {query.metric!r} is unknown; "
                             f"use one of {sorted(self._tables)}")
        kinds = FUNCTIONS.get(query.function)
        if kinds is None or table.kind not in kinds:
            raise ValueError(f"query function {query.function!r} does not apply to "
                             f"{table.kind} {query.metric!r}")
        if query.function in ("quantile", "ratio_above") and query.param is None:
            raise ValueError(f"query function {query.function!r} needs a param")
        if query.function == "quantile" and not 0.0 <= query.param <= 1.0:
            raise ValueError(f"quantile param must be between 0 and 1, got {query.param!r}")
        for m in query.matchers:
            if m.op in ("=~", "!~"):
                _regex(m.value)
        if not query.window_s > 0:
            raise ValueError(f"query window_s must be > 0, got {query.window_s!r}")
        now = self._now(now)
        stamp = (now, self._version)
        if stamp != self._memo_stamp:
            self._memo.clear()
            self._memo_stamp = stamp
        result = self._memo.get(query)
        if result is None:
            result = self._memo[query] = self._compute(query, table, now)
        return dict(result)

    def _span(self, window_s: float, now: float) -> tuple[int, int, int]:
        """(ring, first bucket, last bucket) of a window: the buckets starting inside it."""
        for ri, (step, slots) in enumerate(self._res):
            if step * slots >= window_s:
                break
        step, slots = self._res[ri]
        b = math.floor(now / step)
        a = max(math.floor((now - window_s) / step) + 1, b - slots + 1)
        return ri, a, b

    def _cover(self, ri: int, a: int, b: int, tail_ok: bool) -> list[tuple[int, int, int]]:
        """Splits buckets [a, b] of ring ``ri`` into runs, using coarser rings where whole
        coarse buckets fit. ``tail_ok``: nothing is held after ``now``, so the coarse
        bucket that holds ``now`` may stand for the fine buckets up to it."""
        if a > b:
            return []
        if ri + 1 >= len(self._res):
            return [(ri, a, b)]
        m = self._mult[ri]
        ja = -(-a // m)
        jb = b // m if tail_ok else (b + 1) // m - 1
        if ja > jb:
            return [(ri, a, b)]
        parts = [(ri, a, ja * m - 1)] if a < ja * m else []
        parts += self._cover(ri + 1, ja, jb, tail_ok)
        if not tail_ok and (jb + 1) * m <= b:
            parts.append((ri, (jb + 1) * m, b))
        return parts

    def _series_window(self, table: _Table, window_s: float, now: float) -> _SeriesWindow:
        key = ("series", table.metric.name, window_s)
        sw = self._memo.get(key)
        if sw is not None:
            return sw
        ri, a, b = self._span(window_s, now)
        rows = len(table.labels)
        sw = _SeriesWindow(ri, a, b, rows)
        kind = table.kind
        if kind == "counter":
            sw.v = np.zeros(rows)
        elif kind == "histogram":
            sw.n, sw.s, sw.z = np.zeros(rows), np.zeros(rows), np.zeros(rows)
            sw.lo, sw.hi = np.full(rows, np.inf), np.full(rows, -np.inf)
        else:
            sw.n, sw.s, sw.last = np.zeros(rows), np.zeros(rows), np.zeros(rows)
            sw.lo, sw.hi = np.full(rows, np.inf), np.full(rows, -np.inf)
            sw.last_t = np.full(rows, -np.inf)
        every = np.arange(rows)
        for pri, lo, hi in self._cover(ri, a, b, now >= self._max_time):
            ring = table.rings[pri]
            ks = np.arange(lo, hi + 1)
            slots = ks % ring.slots
            mask = ring.keys[:rows, slots] == ks
            sw.present |= mask.any(axis=1)
            take = lambda col, fill=0.0: np.where(mask, col[:rows, slots], fill)  # noqa: E731
            if kind == "counter":
                sw.v += take(ring.v).sum(axis=1)
                continue
            sw.n += take(ring.n).sum(axis=1)
            sw.s += take(ring.s).sum(axis=1)
            np.minimum(sw.lo, take(ring.lo, np.inf).min(axis=1), out=sw.lo)
            np.maximum(sw.hi, take(ring.hi, -np.inf).max(axis=1), out=sw.hi)
            if kind == "histogram":
                sw.z += take(ring.z).sum(axis=1)
                r, c = np.nonzero(mask)
                sw.pair_rows.append(r)
                sw.pair_objs.append(ring.hb[r, slots[c]].tolist())
            else:
                tt = take(ring.t, -np.inf)
                j = tt.argmax(axis=1)
                newest_t = tt[every, j]
                newer = newest_t > sw.last_t
                sw.last = np.where(newer, ring.last[every, slots[j]], sw.last)
                sw.last_t = np.where(newer, newest_t, sw.last_t)
        if kind == "gauge":
            with np.errstate(invalid="ignore", divide="ignore"):
                sw.avg = sw.s / sw.n
        self._memo[key] = sw
        return sw

    def _selection(self, table: _Table, matchers: tuple[Matcher, ...],
                   by: Optional[tuple[str, ...]]) -> tuple[np.ndarray, np.ndarray, list[GroupKey]]:
        """Rows matching ``matchers``, their group ids and the group keys; kept until a
        series of the metric comes or goes."""
        key = (matchers, by)
        hit = table.selections.get(key)
        if hit is not None and hit[0] == table.version:
            return hit[1]
        names = table.metric.labels
        pos = {n: i for i, n in enumerate(names)}
        by_names = sorted(by) if by else []
        groups: dict[GroupKey, int] = {}
        rows, gids = [], []
        for values, row in table.index.items():
            label = lambda n: values[pos[n]] if n in pos else ""  # noqa: E731
            if all(_matches(m, label(m.label)) for m in matchers):
                gk = tuple((n, label(n)) for n in by_names)
                rows.append(row)
                gids.append(groups.setdefault(gk, len(groups)))
        sel = (np.array(rows, dtype=np.int64), np.array(gids, dtype=np.int64), list(groups))
        if len(table.selections) > 4096:  # rules change: forget selections nobody asks for
            table.selections.clear()
        table.selections[key] = (table.version, sel)
        return sel

    def _groups(self, table: _Table, window_s: float, matchers: tuple[Matcher, ...],
                by: Optional[tuple[str, ...]], now: float) -> _Groups:
        key = ("groups", table.metric.name, window_s, matchers, by)
        g = self._memo.get(key)
        if g is not None:
            return g
        sw = self._series_window(table, window_s, now)
        rows, gids, keys = self._selection(table, matchers, by)
        keep = sw.present[rows]
        rows, gids = rows[keep], gids[keep]
        order = np.argsort(gids, kind="stable")
        rows, gids = rows[order], gids[order]
        starts = np.flatnonzero(np.r_[True, gids[1:] != gids[:-1]]) if len(gids) else \
            np.zeros(0, dtype=np.int64)
        g = self._memo[key] = _Groups([keys[i] for i in gids[starts]], rows, starts, sw)
        return g

    def _compute(self, q: Query, table: _Table, now: float) -> dict[GroupKey, float]:
        if q.function == "error_ratio":
            req = self._groups(self._tables["requests"], q.window_s, q.matchers, q.by, now)
            err = self._groups(self._tables["errors"], q.window_s, q.matchers, q.by, now)
            errors = dict(zip(err.keys, err.reduce("v").tolist())) if err.keys else {}
            return {k: errors.get(k, 0.0) / n
                    for k, n in zip(req.keys, req.reduce("v").tolist()) if n > 0}
        g = self._groups(table, q.window_s, q.matchers, q.by, now)
        if not g.keys:
            return {}
        f, kind = q.function, table.kind
        if f == "zscore":
            return self._zscore(q, table, g, now)
        if f == "deriv":
            return self._deriv(table, g)
        if kind == "counter":
            inc = g.reduce("v")
            return dict(zip(g.keys, (inc / q.window_s if f == "rate" else inc).tolist()))
        if kind == "gauge":
            values = {"avg": lambda: g.reduce("s") / g.reduce("n"),
                      "min": lambda: g.reduce("lo", np.minimum),
                      "max": lambda: g.reduce("hi", np.maximum),
                      "count": lambda: g.reduce("n"),
                      "last": lambda: g.reduce("last"),
                      "sum": lambda: g.reduce("avg")}[f]()
            return dict(zip(g.keys, values.tolist()))
        n = g.reduce("n")
        if f in ("count", "rate"):
            return dict(zip(g.keys, (n / q.window_s if f == "rate" else n).tolist()))
        if f == "sum":
            return dict(zip(g.keys, g.reduce("s").tolist()))
        if f == "avg":
            values = g.reduce("s") / np.where(n > 0, n, 1)
        elif f == "min":
            values = g.reduce("lo", np.minimum)
        elif f == "max":
            values = g.reduce("hi", np.maximum)
        elif f == "ratio_above":
            values = self._ratio_above(g, q.param, n)
        else:
            values = self._quantile(g, SHORTHAND_QUANTILES.get(f, q.param), n)
        return {k: v for k, v, c in zip(g.keys, values.tolist(), n.tolist()) if c > 0}

    @staticmethod
    def _quantile(g: _Groups, q: float, n: np.ndarray) -> np.ndarray:
        """Histogram.quantile for every group at once (same rank rule, same clamping)."""
        cum, _, values = g.hist_cum()
        zero = g.reduce("z")
        rank = np.floor(q * (n - 1))
        if cum.shape[1] == 0:
            return np.zeros(len(n))
        j = (cum <= (rank - zero)[:, None]).sum(axis=1)
        value = values[np.minimum(j, len(values) - 1)]
        value = np.minimum(np.maximum(value, g.reduce("lo", np.minimum)), g.reduce("hi", np.maximum))
        return np.where(rank < zero, 0.0, value)

    @staticmethod
    def _ratio_above(g: _Groups, threshold: float, n: np.ndarray) -> np.ndarray:
        cum, _, values = g.hist_cum()
        above = np.zeros(len(n))
        if cum.shape[1]:
            below = np.flatnonzero(values <= threshold)
            above = cum[:, -1] - (cum[:, below[-1]] if len(below) else 0.0)
        if threshold < 0:  # the zero bucket holds values <= 0
            above = above + g.reduce("z")
        return above / np.where(n > 0, n, 1)

    def _steps(self, table: _Table, g: _Groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per group and step of the window's resolution: (bucket indices, sum, count).

        Counter: (increase, samples); histogram: (sum of values, observations); gauge:
        (sum of samples, samples). A step has data where its count is > 0."""
        memo = g._memo.get("steps")
        if memo is not None:
            return memo
        sw = g.sw
        ring = table.rings[sw.ri]
        ks = np.arange(sw.a, sw.b + 1)
        idx = np.ix_(g.rows, ks % ring.slots)
        mask = ring.keys[idx] == ks
        if table.kind == "counter":
            total, count = np.where(mask, ring.v[idx], 0.0), mask.astype(float)
        else:
            total, count = np.where(mask, ring.s[idx], 0.0), np.where(mask, ring.n[idx], 0.0)
        memo = (ks, np.add.reduceat(total, g.starts, axis=0), np.add.reduceat(count, g.starts, axis=0))
        g._memo["steps"] = memo
        return memo

    def _deriv(self, table: _Table, g: _Groups) -> dict[GroupKey, float]:
        ks, total, count = self._steps(table, g)
        x_all = ks * self._res[g.sw.ri][0]
        out = {}
        for key, tot, cnt in zip(g.keys, total, count):
            has = cnt > 0
            if has.sum() < DERIV_MIN_STEPS:
                continue
            x, y = x_all[has], tot[has] / cnt[has]
            x = x - x.mean()
            out[key] = float((x * (y - y.mean())).sum() / (x * x).sum())
        return out

    def _zscore(self, q: Query, table: _Table, g: _Groups, now: float) -> dict[GroupKey, float]:
        ks, total, count = self._steps(table, g)
        step = self._res[g.sw.ri][0]
        out = {}
        for key, tot, cnt in zip(g.keys, total, count):
            has = cnt > 0
            if table.kind == "counter":
                has = has & ((ks + 1) * step <= now)  # the step still filling is left out
                values = tot[has] / step
            else:
                values = tot[has] / cnt[has]
            if len(values) < ZSCORE_MIN_HISTORY + 1:
                continue
            history, latest = values[:-1], values[-1]
            mean = history.mean()
            std = max(history.std(), ZSCORE_REL_FLOOR * abs(mean), ZSCORE_ABS_FLOOR)
            out[key] = float((latest - mean) / std)
        return out

    # ------------------------------------------------------------------ upkeep and reads

    def expire(self, now: Optional[float] = None) -> int:
        """Drops series (and replica / GPU trackers) not updated for ``series_ttl_s``;
        returns how many series went."""
        cutoff = self._now(now) - self._ttl
        gone = 0
        for table in self._tables.values():
            stale = [v for v, row in table.index.items() if table.updated[row] < cutoff]
            for values in stale:
                table.remove(values)
            gone += len(stale)
        self._replicas = {k: v for k, v in self._replicas.items() if v[2] >= cutoff}
        self._xid = {k: v for k, v in self._xid.items() if v[1] >= cutoff}
        if gone:
            self._version += 1
        return gone

    def cumulative(self) -> list[CumulativeSeries]:
        """Every live series since the store started (totals, latest values, histograms)."""
        out = []
        for name, table in self._tables.items():
            names, kind = table.metric.labels, table.kind
            for values, row in table.index.items():
                cum = table.cum[row]
                s = CumulativeSeries(metric=name, kind=kind, labels=dict(zip(names, values)),
                                     updated=table.updated[row])
                if kind == "histogram":
                    s.histogram, s.exemplars = cum[0].copy(), dict(cum[1])
                else:
                    s.value = cum[0]
                out.append(s)
        return out

    def stats(self) -> dict:
        """Sizes and counters for the monitor's own metrics and status page."""
        series = {name: len(t.index) for name, t in self._tables.items()}
        buckets = sum(int((ring.keys[:len(t.labels)] != _EMPTY).sum())
                      for t in self._tables.values() for ring in t.rings)
        nbytes = sum(ring.nbytes() for t in self._tables.values() for ring in t.rings)
        nbytes += sum(200 * len(t.index) for t in self._tables.values())  # labels and index
        return {
            "series": series,
            "series_total": sum(series.values()),
            "buckets": buckets,
            "approx_bytes": nbytes,
            "overflowed_series": {n: len(t.folded) for n, t in self._tables.items() if t.folded},
            "replicas": len(self._replicas),
            "replica_dropped": sum(v[1] for v in self._replicas.values()),
            **self._counts,
        }
