"""The aggregator's time-window store: every series at several resolutions, queried by rules.

The aggregator hands each :class:`~ray_monitor.common.snapshot.ReplicaSnapshot` and
:class:`~ray_monitor.common.snapshot.GpuSnapshot` to :meth:`WindowStore.ingest` /
:meth:`WindowStore.ingest_gpu`; alert rules call :meth:`WindowStore.evaluate` with a parsed
:class:`~ray_monitor.common.catalog.Query`; ``/metrics`` reads :meth:`WindowStore.cumulative`.

Series. One series per metric of :data:`~ray_monitor.common.catalog.METRICS` and full label set
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
times in ``[k*step, (k+1)*step)`` and lives in slot ``k % slots``; the ring remembers each
slot's ``k`` (one key per slot for all rows: when the clock enters a new bucket its slot is
cleared in every row), so stale slots are never read. Counter buckets hold a sum; gauge
buckets count, sum, min, max and the latest sample (with its offset in the bucket);
histogram buckets count, sum, zero count, min, max and the sparse exponential-bucket counts,
4 bytes a bucket (int16 index, uint16 count; a count above 65535 takes several entries, and
an index outside int16 -- values beyond 2**+-512 -- is clamped to the edge, while min and
max stay exact), compacted when the bucket closes. Every sample is written into every
resolution, so a coarse bucket is exactly the union of its fine buckets.

Rollups. Every ring is kept per *rollup*: the series' labels without ``replica`` and
``pid`` (request series: per application, deployment, method, model version and outcome),
so the coarse rings' memory grows with deployments, not replicas, and queries that need no
per-series data read a few rollup rows instead of every replica's. The finest ring is also
kept per series. Memory is (series + rollups) x fine slots + rollups x coarse slots bucket
sizes, whatever the traffic. A rollup lives while any of its series sends, and then for the
coarsest span (or ``series_ttl_s`` if longer): the data of a replica that went away stays
in the rollups (a 6 h SLO still counts its errors) while its own series expires. Metrics
without those labels (GPU devices) have their series as rollups. Steps must each be a whole
multiple of the previous one.

Windows. A query over ``window_s`` at time ``now`` reads the finest resolution whose span
(``step * slots``) covers the window (windows longer than the coarsest span are cut to
it: see :attr:`WindowStore.max_window_s`) and takes the buckets whose *start* lies in
``(now - window_s, now]``, so the edges are honoured to one step of that resolution. Runs
of whole coarse buckets inside the window are read from the coarser rings (same data, far
fewer reads). Per-series queries read the series' finest ring only, and their windows are
cut to its span (10 min by default): those whose ``by`` or matchers name ``replica`` or
``pid``, and gauge ``last`` / ``sum`` (which add per-series values) of metrics with those
labels. Other queries read rollups, and equal the per-series computation up to the order
of floating-point additions.
Groups with no data in the window are absent from the result: never NaN, never 0 for
"no data".

Functions (see :data:`~ray_monitor.common.catalog.FUNCTIONS`). Matchers (``=``, ``!=``, ``=~``,
``!~``; regexes fully anchored, a missing label reads as "") select series, then ``by``
groups them; the result key is the sorted ``(label, value)`` pairs of ``by`` (``()``
without ``by``). Counters: ``count``/``sum`` = increase in the window, ``rate`` = that
over ``window_s``; ``error_ratio`` (on ``requests`` or ``errors``) = errors / requests of
the group, absent when there were no requests. Histograms (merged over the window and
group): ``pNN``/``quantile`` (within 1%, see :mod:`~ray_monitor.common.histogram`), ``avg``
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

Sharing. Within one evaluation round (same ``now``, no ingest in between) per-row
window aggregates, per-group merges and whole results are memoised, so rules that differ
only in function or threshold cost one dictionary copy. :meth:`WindowStore.begin_round`
pins ``now`` for the round; any ingest or expiry invalidates the memo. Which rows a
matcher set selects, and their groups, is kept until a series of the metric comes or goes,
and is recomputed with array operations over label codes.

Cardinality. At most ``max_series_per_metric`` real series per metric; a new label set
past the cap is folded into one extra series whose label values are all ``"other"``, and
counted (``overflowed_series``: distinct label sets folded, since the overflow series
was created). Gaps: ``seq`` jumps of a replica are counted as ``snapshots_missed``; the
sum of the replicas' own ``dropped`` counters (the usual reason) is ``replica_dropped``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable, Optional

import numpy as np

from ray_monitor.common.catalog import FUNCTIONS, METRICS, SHORTHAND_QUANTILES, Metric, Query
from ray_monitor.common.matchers import Matcher, check_regex, matches
from ray_monitor.common.histogram import BASE, Histogram
from ray_monitor.common.snapshot import Exemplar, GpuSnapshot, ReplicaSnapshot

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
#: Labels the coarse rings leave out (see Rollups in the module docstring).
ROLLUP_DROPS = frozenset({"replica", "pid"})

# column -> (dtype, value of an empty bucket); sums and mins read empty buckets as no-ops
_COLUMNS = {"counter": {"v": (np.float64, np.nan)},
            "histogram": {"n": (np.float64, 0.0), "s": (np.float64, 0.0), "z": (np.float32, 0.0),
                          "lo": (np.float64, np.inf), "hi": (np.float64, -np.inf)},
            "gauge": {"n": (np.float32, 0.0), "s": (np.float64, 0.0), "lo": (np.float64, np.inf),
                      "hi": (np.float64, -np.inf), "last": (np.float64, 0.0),
                      "to": (np.float32, -np.inf)}}  # to: the latest sample's offset in the bucket
_EMPTY = -(2 ** 62)  # bucket key of a slot never used: below any real one, even before 1970
_GROW_ROWS = 16
_COMPACT_AT = 8  # appended deltas in one histogram bucket before it is compacted
_LOG_BASE = math.log(BASE)
_BYTES_OVERHEAD = 41  # a bytes object's header and its pointer, for the memory estimate
_PAIR = np.dtype([("i", "<i2"), ("c", "<u2")])
_MAX_COUNT = 65535

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


def _encode(idx: np.ndarray, cnt: np.ndarray) -> bytes:
    """(index, count) entries as 4-byte pairs: indices clamped to int16, counts split at
    65535 (bincount adds the pieces back up)."""
    idx = np.clip(idx, -32768, 32767)
    if len(cnt) and cnt.max() > _MAX_COUNT:
        reps = -(-cnt // _MAX_COUNT)
        first = np.repeat(np.cumsum(reps) - reps, reps)
        piece = np.arange(int(reps.sum())) - first
        cnt = np.minimum(np.repeat(cnt, reps) - piece * _MAX_COUNT, _MAX_COUNT)
        idx = np.repeat(idx, reps)
    out = np.empty(len(idx), dtype=_PAIR)
    out["i"], out["c"] = idx, cnt
    return out.tobytes()


def _pack(h: Histogram) -> bytes:
    b = h.buckets
    a = np.fromiter(chain.from_iterable(b.items()), dtype=np.int64, count=2 * len(b))
    idx, cnt = a[0::2], a[1::2]
    if len(b) and (cnt.max() > _MAX_COUNT or idx.min() < -32768 or idx.max() > 32767):
        return _encode(idx, cnt)
    return a.astype(np.int16).tobytes()  # same bytes as _PAIR: counts wrap into int16's bits


def _unpack(b: bytes) -> tuple[np.ndarray, np.ndarray]:
    pairs = np.frombuffer(b, dtype=_PAIR)
    return pairs["i"].astype(np.int64), pairs["c"].astype(np.int64)


def _compact(b: bytes) -> bytes:
    idx, cnt = _unpack(b)
    u, inv = np.unique(idx, return_inverse=True)
    return _encode(u, np.bincount(inv.ravel(), weights=cnt).astype(np.int64))


def _bucket_values(idx: np.ndarray) -> np.ndarray:
    """Vectorised :func:`~ray_monitor.common.histogram.bucket_value`."""
    return 2.0 * np.exp((idx + 1) * _LOG_BASE) / (BASE + 1.0)


def _pad(a: np.ndarray, rows: int, fill) -> np.ndarray:
    return np.concatenate((a, np.full((rows - a.shape[0],) + a.shape[1:], fill, dtype=a.dtype)))


class _Ring:
    """One resolution of one metric: 2-D arrays [row, slot] (rows of series or rollups)."""

    def __init__(self, step: float, slots: int, kind: str) -> None:
        self.step, self.slots, self.kind = step, slots, kind
        self.columns = _COLUMNS[kind]
        for c, (dtype, fill) in self.columns.items():
            setattr(self, c, np.full((0, slots), fill, dtype=dtype))
        if kind == "histogram":
            self.hb = np.full((0, slots), None, dtype=object)  # packed pairs, or None
            self.hbn = np.zeros((0, slots), dtype=np.int8)  # deltas appended since compaction
            self.hb_bytes = 0

    @property
    def rows(self) -> int:
        return getattr(self, next(iter(self.columns))).shape[0]

    def grow(self, cap: int) -> None:
        for c, (_, fill) in self.columns.items():
            setattr(self, c, _pad(getattr(self, c), cap, fill))
        if self.kind == "histogram":
            self.hb = _pad(self.hb, cap, None)
            self.hbn = _pad(self.hbn, cap, 0)

    def clear(self, rows, slots) -> None:
        """Empties ``[rows, slots]`` (index expressions)."""
        for c, (_, fill) in self.columns.items():
            getattr(self, c)[rows, slots] = fill
        if self.kind == "histogram":
            old = self.hb[rows, slots]
            self.hb_bytes -= sum(len(b) + _BYTES_OVERHEAD for b in np.ravel(old) if b is not None)
            self.hb[rows, slots] = None
            self.hbn[rows, slots] = 0

    def close(self, p: int) -> None:
        """The bucket in slot ``p`` is complete: compact what was appended to it."""
        if self.kind != "histogram":
            return
        for row in np.flatnonzero(self.hbn[:, p] > 1).tolist():
            old = self.hb[row, p]
            self.hb[row, p] = new = _compact(old)
            self.hbn[row, p] = 1
            self.hb_bytes += len(new) - len(old)

    def nbytes(self) -> int:
        n = sum(getattr(self, c).nbytes for c in self.columns)
        if self.kind == "histogram":
            n += self.hb.nbytes + self.hbn.nbytes + self.hb_bytes
        return n


class _Space:
    """Rows and their label values: a metric's series, or its rollups. Label values are
    also kept as integer codes per label, so matchers and ``by`` run as array operations."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.pos = {n: i for i, n in enumerate(names)}
        self.index: dict[tuple[str, ...], int] = {}
        self.labels: list[Optional[tuple[str, ...]]] = []
        self.free: list[int] = []
        self.updated = np.zeros(0)
        self.live = np.zeros(0, dtype=bool)
        self.codes = np.zeros((0, len(names)), dtype=np.int32)
        self._recode()

    def _recode(self) -> None:
        self.code_of: list[dict[str, int]] = [{} for _ in self.names]
        self.strings: list[list[str]] = [[] for _ in self.names]
        for values, row in self.index.items():
            self._set_codes(row, values)

    def _set_codes(self, row: int, values: tuple[str, ...]) -> None:
        for j, v in enumerate(values):
            c = self.code_of[j].get(v)
            if c is None:
                c = self.code_of[j][v] = len(self.strings[j])
                self.strings[j].append(v)
            self.codes[row, j] = c

    def add(self, values: tuple[str, ...]) -> int:
        if self.free:
            row = self.free.pop()
        else:
            row = len(self.labels)
            self.labels.append(None)
            if row >= len(self.live):
                cap = row + max(_GROW_ROWS, row // 8)  # grows rarely: series come in bursts
                self.updated = _pad(self.updated, cap, 0.0)
                self.live = _pad(self.live, cap, False)
                self.codes = _pad(self.codes, cap, 0)
        self.index[values] = row
        self.labels[row] = values
        self.live[row] = True
        self._set_codes(row, values)
        return row

    def remove(self, row: int) -> None:
        del self.index[self.labels[row]]
        self.labels[row] = None
        self.live[row] = False
        self.free.append(row)

    def forget_codes(self) -> None:
        """Drops codes of values no live row has any more (replica names churn)."""
        if max(map(len, self.strings), default=0) > 2 * len(self.index) + 64:
            self._recode()

    def select(self, matchers: tuple[Matcher, ...],
               by_names: list[str]) -> tuple[np.ndarray, list[GroupKey], np.ndarray]:
        """Live rows matching ``matchers``: (rows, group keys, group index per row)."""
        n = len(self.labels)
        ok = self.live[:n].copy()
        for m in matchers:
            j = self.pos.get(m.label)
            if j is None:  # a label the metric lacks reads as ""
                if not matches(m, ""):
                    ok[:] = False
                continue
            truth = np.fromiter((matches(m, v) for v in self.strings[j]), dtype=bool,
                                count=len(self.strings[j]))
            ok &= truth[self.codes[:n, j]]
        rows = np.flatnonzero(ok)
        cols = [self.pos[b] for b in by_names if b in self.pos]
        if not len(rows):
            return rows, [], np.zeros(0, dtype=np.int64)
        if not cols:
            return rows, [tuple((b, "") for b in by_names)], np.zeros(len(rows), dtype=np.int64)
        combos, inv = np.unique(self.codes[rows][:, cols], axis=0, return_inverse=True)
        keys = []
        for combo in combos.tolist():
            value = dict(zip((self.names[j] for j in cols),
                             (self.strings[j][c] for j, c in zip(cols, combo))))
            keys.append(tuple((b, value.get(b, "")) for b in by_names))
        return rows, keys, inv.ravel()


class _Table:
    """All series of one metric: label index, per-series fine ring, rollup rings (every
    resolution, see Rollups in the module docstring), cumulative values."""

    def __init__(self, metric: Metric, resolutions: tuple[tuple[float, int], ...]) -> None:
        self.metric = metric
        self.kind = metric.kind
        self.series = _Space(metric.labels)
        self.cum: list = []  # per row: [total] | [value, time] | [Histogram, exemplars]
        self.keep = tuple(i for i, n in enumerate(metric.labels) if n not in ROLLUP_DROPS)
        self.has_drops = len(self.keep) < len(metric.labels)
        # without labels to drop, a rollup is its series: one space, one set of rings
        self.rollups = _Space(tuple(metric.labels[i] for i in self.keep)) \
            if self.has_drops else self.series
        self.rings = [_Ring(step, slots, metric.kind) for step, slots in resolutions]
        self.series_ring = _Ring(*resolutions[0], metric.kind) if self.has_drops else self.rings[0]
        self.up: list[int] = []  # series row -> rollup row
        self.version = 0  # bumps when a series or rollup comes or goes: selections depend on it
        self.other = (OTHER,) * len(metric.labels)
        self.folded: set[int] = set()
        self.selections: dict = {}

    def all_rings(self, ri: int) -> list[_Ring]:
        return [self.rings[ri], self.series_ring] if ri == 0 and self.has_drops else [self.rings[ri]]

    def row_for(self, values: tuple[str, ...], cap: int) -> int:
        row = self.series.index.get(values)
        if row is not None:
            return row
        if len(self.series.index) - (self.other in self.series.index) >= cap:
            self.folded.add(hash(values))
            values = self.other
            row = self.series.index.get(values)
            if row is not None:
                return row
        row = self.series.add(values)
        if row >= len(self.cum):
            self.cum.append(None)
            self.up.append(-1)
        self.cum[row] = ([0.0] if self.kind == "counter" else [math.nan, -math.inf]
                         if self.kind == "gauge" else [Histogram(), {}])
        up = row
        if self.has_drops:
            if len(self.series.live) > self.series_ring.rows:
                self.series_ring.grow(len(self.series.live))
            rvalues = tuple(values[i] for i in self.keep)
            up = self.rollups.index.get(rvalues)
            if up is None:
                up = self.rollups.add(rvalues)
        if len(self.rollups.live) > self.rings[0].rows:
            for ring in self.rings:
                ring.grow(len(self.rollups.live))
        self.up[row] = up
        self.version += 1
        return row

    def remove(self, row: int) -> None:
        values = self.series.labels[row]
        self.series.remove(row)
        self.cum[row] = None
        for ring in [self.series_ring] if self.has_drops else self.rings:
            ring.clear(row, slice(None))
        self.version += 1
        if values == self.other:
            self.folded.clear()

    def remove_rollup(self, row: int) -> None:
        self.rollups.remove(row)
        for ring in self.rings:
            ring.clear(row, slice(None))
        self.version += 1


class _SeriesWindow:
    """Per-row aggregates of one metric over one window: rows of the series (per-series
    queries, finest ring only) or of the rollups (all rings)."""

    def __init__(self, ri: int, a: int, b: int, fine_only: bool, rows: int) -> None:
        self.ri, self.a, self.b, self.fine_only = ri, a, b, fine_only
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
            lens = np.fromiter(map(len, objs), dtype=np.int64, count=len(objs)) // _PAIR.itemsize
            idx, cnt = _unpack(b"".join(objs))
            tags = np.repeat(np.concatenate(self.pair_rows), lens)
            lo, hi = int(idx.min()), int(idx.max())
            width = hi - lo + 1
            if rows * width <= 50_000_000:
                d = np.bincount(tags * width + (idx - lo), weights=cnt,
                                minlength=rows * width).reshape(rows, width)
                used = np.flatnonzero(d.any(axis=0))
                self._dense = (d[:, used], used + lo)
            else:  # outliers spread the range: index the buckets actually used
                cols, inv = np.unique(idx, return_inverse=True)
                d = np.bincount(tags * len(cols) + inv.ravel(), weights=cnt,
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
        # per resolution: the newest bucket the clock has entered, and each slot's bucket
        self._cur = [_EMPTY] * len(self._res)
        self._keys = [np.full(slots, _EMPTY, dtype=np.int64) for _, slots in self._res]
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

    def _advance(self, now: float) -> None:
        """Moves every ring to the bucket holding ``now``, emptying the slots it reuses."""
        for ri, (step, slots) in enumerate(self._res):
            k = math.floor(now / step)
            cur = self._cur[ri]
            if k <= cur:
                continue
            keys = self._keys[ri]
            rings = [ring for table in self._tables.values() for ring in table.all_rings(ri)]
            if cur != _EMPTY:
                for ring in rings:
                    ring.close(cur % slots)
            fresh = range(max(cur + 1, k - slots + 1), k + 1)
            reused = [j % slots for j in fresh if keys[j % slots] != _EMPTY]
            if reused:
                cols = slice(None) if len(reused) == slots else np.array(reused)
                for ring in rings:
                    ring.clear(slice(None), cols)
            for j in fresh:
                keys[j % slots] = j
            self._cur[ri] = k

    def _begin_write(self, t: float, now: float) -> Optional[list[tuple[int, int, int]]]:
        """(ring, bucket, slot) for each resolution that still keeps time ``t``."""
        self._advance(now)
        where = []
        for ri, (step, slots) in enumerate(self._res):
            k = math.floor(t / step)
            if k > self._cur[ri] - slots:
                where.append((ri, k, k % slots))
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
    def _targets(table: _Table, row: int, where, now: float) -> list[tuple[_Ring, int, int, int]]:
        """(ring, row, bucket, slot) to write: the rollup in every ring that keeps the time,
        and the series in the finest one."""
        up = table.up[row]
        out = [(table.rings[ri], up, k, p) for ri, k, p in where]
        if table.has_drops and where[0][0] == 0:
            out.append((table.series_ring, row, where[0][1], where[0][2]))
        table.series.updated[row] = now
        table.rollups.updated[up] = now
        return out

    def _add_counter(self, table: _Table, row: int, where, value: float, now: float) -> None:
        for ring, r, k, p in self._targets(table, row, where, now):
            v = ring.v
            cur = v[r, p]
            v[r, p] = value if cur != cur else cur + value  # NaN: the bucket was empty
        table.cum[row][0] += value

    def _add_gauge(self, table: _Table, row: int, where, value: float, t: float,
                   now: float) -> None:
        for ring, r, k, p in self._targets(table, row, where, now):
            off = t - k * ring.step
            if ring.n[r, p]:
                ring.n[r, p] += 1
                ring.s[r, p] += value
                if value < ring.lo[r, p]:
                    ring.lo[r, p] = value
                if value > ring.hi[r, p]:
                    ring.hi[r, p] = value
                if off >= ring.to[r, p]:
                    ring.last[r, p] = value
                    ring.to[r, p] = off
            else:
                ring.n[r, p] = 1
                ring.s[r, p] = ring.lo[r, p] = ring.hi[r, p] = ring.last[r, p] = value
                ring.to[r, p] = off
        cum = table.cum[row]
        if t >= cum[1]:
            cum[0], cum[1] = value, t

    def _add_hist(self, table: _Table, row: int, where, h: Histogram, t: float, now: float,
                  exemplars: Optional[dict[int, Exemplar]]) -> None:
        packed = _pack(h)
        for ring, r, k, p in self._targets(table, row, where, now):
            if ring.n[r, p]:
                ring.n[r, p] += h.count
                ring.s[r, p] += h.sum
                ring.z[r, p] += h.zero_count
                if h.min < ring.lo[r, p]:
                    ring.lo[r, p] = h.min
                if h.max > ring.hi[r, p]:
                    ring.hi[r, p] = h.max
                old = ring.hb[r, p]
                new = old + packed
                n = ring.hbn[r, p] + 1
                if n >= _COMPACT_AT:
                    new, n = _compact(new), 1
                ring.hb[r, p] = new
                ring.hbn[r, p] = n
                ring.hb_bytes += len(new) - len(old)
            else:
                ring.n[r, p] = h.count
                ring.s[r, p] = h.sum
                ring.z[r, p] = h.zero_count
                ring.lo[r, p] = h.min
                ring.hi[r, p] = h.max
                ring.hb[r, p] = packed
                ring.hbn[r, p] = 1
                ring.hb_bytes += len(packed) + _BYTES_OVERHEAD
        cum_hist, cum_ex = table.cum[row]
        cum_hist.merge(h)
        if exemplars:
            for i, ex in exemplars.items():
                cur = cum_ex.get(i)
                if cur is None or ex.timestamp >= cur.timestamp:
                    cum_ex[i] = ex

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
                check_regex(m.value)
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

    @staticmethod
    def _per_series(q: Query, table: _Table) -> bool:
        """Whether the query needs per-series data, which only the finest ring holds."""
        if not table.has_drops:
            return False
        if table.kind == "gauge" and q.function in ("last", "sum"):
            return True
        return any(m.label in ROLLUP_DROPS for m in q.matchers) or \
            any(b in ROLLUP_DROPS for b in q.by or ())

    def _span(self, window_s: float, now: float, fine_only: bool) -> tuple[int, int, int]:
        """(ring, first bucket, last bucket) of a window: the buckets starting inside it."""
        for ri, (step, slots) in enumerate(self._res):
            if fine_only or step * slots >= window_s:
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

    def _columns(self, ri: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Buckets lo..hi of ring ``ri`` that it still holds: (bucket keys, slots)."""
        slots = self._res[ri][1]
        ks = np.arange(max(lo, self._cur[ri] - slots + 1), min(hi, self._cur[ri]) + 1)
        ps = ks % slots
        held = self._keys[ri][ps] == ks
        return ks[held], ps[held]

    def _series_window(self, table: _Table, window_s: float, now: float,
                       fine_only: bool) -> _SeriesWindow:
        key = ("series", table.metric.name, window_s, fine_only)
        sw = self._memo.get(key)
        if sw is not None:
            return sw
        ri, a, b = self._span(window_s, now, fine_only)
        space = table.series if fine_only else table.rollups
        rows = len(space.labels)
        sw = _SeriesWindow(ri, a, b, fine_only, rows)
        kind = table.kind
        if kind == "counter":
            sw.v = np.zeros(rows)
        else:
            sw.n, sw.s = np.zeros(rows), np.zeros(rows)
            sw.lo, sw.hi = np.full(rows, np.inf), np.full(rows, -np.inf)
            if kind == "histogram":
                sw.z = np.zeros(rows)
            else:
                sw.last = np.zeros(rows)
        parts = [(ri, a, b)] if fine_only else self._cover(ri, a, b, now >= self._max_time)
        for pri, lo, hi in parts:
            _, cols = self._columns(pri, lo, hi)
            if not len(cols):
                continue
            ring = table.series_ring if fine_only else table.rings[pri]
            n = rows
            out = slice(0, n)
            if kind == "counter":
                v = ring.v[:n, cols]
                has = ~np.isnan(v)
                sw.present[out] |= has.any(axis=1)
                sw.v[out] += np.where(has, v, 0.0).sum(axis=1)
                continue
            cnt = ring.n[:n, cols]
            has = cnt > 0
            sw.present[out] |= has.any(axis=1)
            sw.n[out] += cnt.sum(axis=1, dtype=np.float64)
            sw.s[out] += ring.s[:n, cols].sum(axis=1)
            np.minimum(sw.lo[out], ring.lo[:n, cols].min(axis=1), out=sw.lo[out])
            np.maximum(sw.hi[out], ring.hi[:n, cols].max(axis=1), out=sw.hi[out])
            if kind == "histogram":
                sw.z[out] += ring.z[:n, cols].sum(axis=1, dtype=np.float64)
                r, c = np.nonzero(has)
                sw.pair_rows.append(r)
                sw.pair_objs.append(ring.hb[r, cols[c]].tolist())
            else:  # parts come in time order: the newest column with data holds the latest
                newest = len(cols) - 1 - has[:, ::-1].argmax(axis=1)
                any_ = has.any(axis=1)
                sw.last[out] = np.where(any_, ring.last[np.arange(n), cols[newest]], sw.last[out])
        if kind == "gauge":
            with np.errstate(invalid="ignore", divide="ignore"):
                sw.avg = sw.s / sw.n
        self._memo[key] = sw
        return sw

    def _selection(self, table: _Table, matchers: tuple[Matcher, ...],
                   by: Optional[tuple[str, ...]], fine_only: bool,
                   ) -> tuple[np.ndarray, np.ndarray, list[GroupKey]]:
        """Rows (of series or of rollups) matching ``matchers``, sorted by group id, their
        group ids and the group keys; kept until a series or rollup of the metric comes or
        goes."""
        key = (matchers, by, fine_only)
        hit = table.selections.get(key)
        if hit is not None and hit[0] == table.version:
            return hit[1]
        space = table.series if fine_only else table.rollups
        rows, keys, gids = space.select(matchers, sorted(by) if by else [])
        order = np.argsort(gids, kind="stable")
        sel = (rows[order], gids[order], keys)
        if len(table.selections) > 4096:  # rules change: forget selections nobody asks for
            table.selections.clear()
        table.selections[key] = (table.version, sel)
        return sel

    def _groups(self, table: _Table, q: Query, now: float) -> _Groups:
        fine_only = self._per_series(q, table)
        key = ("groups", table.metric.name, q.window_s, q.matchers, q.by, fine_only)
        g = self._memo.get(key)
        if g is not None:
            return g
        sw = self._series_window(table, q.window_s, now, fine_only)
        sel_rows, sel_gids, keys = self._selection(table, q.matchers, q.by, fine_only)
        keep = sw.present[sel_rows]
        rows, gids = sel_rows[keep], sel_gids[keep]
        starts = np.flatnonzero(np.r_[True, gids[1:] != gids[:-1]]) if len(gids) else \
            np.zeros(0, dtype=np.int64)
        g = self._memo[key] = _Groups([keys[i] for i in gids[starts]], rows, starts, sw)
        g.selected = (sel_rows, sel_gids)
        g.gid_pos = np.full(len(keys), -1, dtype=np.int64)
        g.gid_pos[gids[starts]] = np.arange(len(starts))
        return g

    def _compute(self, q: Query, table: _Table, now: float) -> dict[GroupKey, float]:
        if q.function == "error_ratio":
            req = self._groups(self._tables["requests"], q, now)
            err = self._groups(self._tables["errors"], q, now)
            errors = dict(zip(err.keys, err.reduce("v").tolist())) if err.keys else {}
            return {k: errors.get(k, 0.0) / n
                    for k, n in zip(req.keys, req.reduce("v").tolist()) if n > 0}
        g = self._groups(table, q, now)
        if not g.keys:
            return {}
        f, kind = q.function, table.kind
        if f == "zscore":
            return self._zscore(table, g, now)
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
        """Per group and held step of the window's resolution: (bucket keys, sum, count).

        Counter: (increase, samples); histogram: (sum of values, observations); gauge:
        (sum of samples, samples). A step has data where its count is > 0. The fine ring
        is read from the group's series rows, a coarse one from its rollup rows."""
        memo = g._memo.get("steps")
        if memo is not None:
            return memo
        sw = g.sw
        ring = table.series_ring if sw.fine_only else table.rings[sw.ri]
        ks, cols = self._columns(sw.ri, sw.a, sw.b)
        rows, gids = g.selected  # present in the window's cover or not
        pos = g.gid_pos[gids]
        rows, pos = rows[pos >= 0], pos[pos >= 0]
        idx = np.ix_(rows, cols)
        if table.kind == "counter":
            v = ring.v[idx]
            has = ~np.isnan(v)
            total, count = np.where(has, v, 0.0), has.astype(np.float64)
        else:
            total, count = ring.s[idx], ring.n[idx].astype(np.float64)
        out_t = np.zeros((len(g.keys), len(cols)))
        out_c = np.zeros((len(g.keys), len(cols)))
        if len(rows):
            starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
            out_t[pos[starts]] = np.add.reduceat(total, starts, axis=0)
            out_c[pos[starts]] = np.add.reduceat(count, starts, axis=0)
        memo = (ks, out_t, out_c)
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

    def _zscore(self, table: _Table, g: _Groups, now: float) -> dict[GroupKey, float]:
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
        """Drops series (and replica / GPU trackers) not updated for ``series_ttl_s``, and
        rollups not updated for the coarsest span; returns how many series went.

        Cost: one array comparison per metric, plus the rows that go."""
        now = self._now(now)
        cutoff = now - self._ttl
        roll_cutoff = now - max(self._ttl, self.max_window_s)
        gone = 0
        for table in self._tables.values():
            sp = table.series
            n = len(sp.labels)
            stale = np.flatnonzero(sp.live[:n] & (sp.updated[:n] < cutoff)).tolist()
            for row in stale:
                table.remove(row)
            gone += len(stale)
            if stale:
                sp.forget_codes()
            rp = table.rollups
            if table.has_drops:
                n = len(rp.labels)
                old = np.flatnonzero(rp.live[:n] & (rp.updated[:n] < roll_cutoff)).tolist()
                for row in old:
                    table.remove_rollup(row)
                if old:
                    rp.forget_codes()
                    self._version += 1
        if any(v[2] < cutoff for v in self._replicas.values()):
            self._replicas = {k: v for k, v in self._replicas.items() if v[2] >= cutoff}
        if any(v[1] < cutoff for v in self._xid.values()):
            self._xid = {k: v for k, v in self._xid.items() if v[1] >= cutoff}
        if gone:
            self._version += 1
        return gone

    def cumulative(self) -> list[CumulativeSeries]:
        """Every live series since the store started (totals, latest values, histograms)."""
        out = []
        for name, table in self._tables.items():
            names, kind = table.metric.labels, table.kind
            for values, row in table.series.index.items():
                cum = table.cum[row]
                s = CumulativeSeries(metric=name, kind=kind, labels=dict(zip(names, values)),
                                     updated=float(table.series.updated[row]))
                if kind == "histogram":
                    s.histogram, s.exemplars = cum[0].copy(), dict(cum[1])
                else:
                    s.value = cum[0]
                out.append(s)
        return out

    def stats(self) -> dict:
        """Sizes and counters for the monitor's own metrics and status page.

        ``buckets`` counts the finest buckets of series plus the coarser buckets of rollups
        (the rollups' own finest ring, which serves queries that need no per-series data,
        is in ``approx_bytes`` but not counted here)."""
        series = {name: len(t.series.index) for name, t in self._tables.items()}
        buckets = 0
        for ri in range(len(self._res)):
            _, cols = self._columns(ri, _EMPTY + 1, self._cur[ri])
            for t in self._tables.values():
                for ring in [t.series_ring if ri == 0 else t.rings[ri]]:
                    if t.kind == "counter":
                        buckets += int((~np.isnan(ring.v[:, cols])).sum())
                    else:
                        buckets += int((ring.n[:, cols] > 0).sum())
        nbytes = sum(ring.nbytes() for t in self._tables.values() for ring in t.all_rings(0)
                     + t.rings[1:])
        nbytes += sum(200 * (len(t.series.index) + len(t.rollups.index) * t.has_drops)
                      for t in self._tables.values())  # labels and index
        return {
            "series": series,
            "series_total": sum(series.values()),
            "rollups_total": sum(len(t.rollups.index) for t in self._tables.values()),
            "buckets": buckets,
            "approx_bytes": nbytes,
            "overflowed_series": {n: len(t.folded) for n, t in self._tables.items() if t.folded},
            "replicas": len(self._replicas),
            "replica_dropped": sum(v[1] for v in self._replicas.values()),
            **self._counts,
        }
