"""The window store's storage: ring buffers of time buckets, label spaces, one table per metric.

Runs in the aggregator actor, under :class:`~ray_monitor.aggregator.windows.WindowStore`,
which decides what is written (snapshot to series) while this module decides how it is
held; :mod:`~ray_monitor.aggregator.window_query` reads it.

Storage. Each resolution ``(step, slots)`` is a ring of aligned buckets on the
:class:`~ray_monitor.aggregator.timeline.Timeline` (bucket ``k`` in slot ``k % slots``).
Counter buckets hold a sum; gauge buckets count, sum, min, max and the latest sample (with
its offset in the bucket); histogram buckets count, sum, zero count, min, max and the
sparse exponential-bucket counts (coded by :mod:`~ray_monitor.aggregator.packing`: 4 bytes
an entry while a bucket fills, bits to 2 bytes an entry once complete). Nothing is
rounded: counts and counter sums are held in the narrowest type that holds every value so
far exactly, and widen for the whole ring the first time one does not fit (counts uint8,
uint16, float32, float64; counter sums the same, holding the value + 1 while unsigned so
that 0 marks an empty bucket: :meth:`Ring.widen`), and a uint16 column goes back to
uint8 once a whole turn of the ring fits a byte again; sums, min, max and gauge samples
are float64. A rollup's gauge rings keep no latest sample (``last`` reads series rows
only). Memory (issue 15): a
bucket still filling keeps each row's histogram entries apart; once complete (the clock
has left it and the next one: deltas land in the second of their midpoint, so the bucket
behind the clock still fills) its rows are compacted, sorted and packed into one bytes
object per slot, with no Python object per bucket. A per-series gauge
ring (one report a second) keeps only each bucket's sample (a uint8 while every sample is
a whole number 0-255, widening like counts) and its offset; a row with a second sample in
a bucket (the overflow series ``other``) is kept aside with every column
(:mod:`~ray_monitor.aggregator.aside`), and past a few such rows the whole ring keeps
every column (:meth:`Ring.unfold`). Each series' value since the
store started (for ``/metrics``) is in :mod:`~ray_monitor.aggregator.totals`.
Every sample is written into every resolution, so a coarse bucket is exactly the union of
its fine buckets.

Rollups. Every ring is kept per *rollup*: the series' labels without ``replica`` and
``pid`` (request series: per application, deployment, method, model version and outcome),
so the coarse rings' memory grows with deployments, not replicas, and queries that need no
per-series data read a few rollup rows instead of every replica's. The finest ring is also
kept per series. Memory is (series + rollups) x fine slots + rollups x coarse slots bucket
sizes, whatever the traffic. A rollup lives while any of its series sends, and then for the
coarsest span (or ``series_ttl_s`` if longer): the data of a replica that went away stays
in the rollups (a 6 h SLO still counts its errors) while its own series expires. Metrics
without those labels (GPU devices) have their series as rollups.

Cardinality. At most ``max_series_per_metric`` real series per metric; a new label set
past the cap is folded into one extra series whose label values are all ``"other"``, and
counted (``overflowed_series``: distinct label sets folded, since the overflow series
was created).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Optional

import numpy as np

from ray_monitor.common.catalog import Metric
from ray_monitor.aggregator.aside import add_sample, merge_back, patch, put_aside
from ray_monitor.aggregator.packing import (PAIR, Runs, compact, compact_cells, decode_runs,
                                            histogram_entries, narrow, pack_histogram,
                                            unnarrow, unpack)
from ray_monitor.aggregator.label_space import GroupKey, LabelSpace
from ray_monitor.aggregator.label_space import pad_rows as _pad
from ray_monitor.aggregator.totals import Totals
from ray_monitor.common.histogram import Histogram
from ray_monitor.common.snapshot import Exemplar

__all__ = ["GroupKey", "LabelSpace", "OTHER", "ROLLUP_DROPS", "Ring", "Table", "WHOLE_SAMPLE",
           "exact32", "fits"]

OTHER = "other"
#: Gauge samples that are whole numbers up to this magnitude add up exactly in any order
#: over a window (a bucket's sum below 2**42 with at most 65,535 samples; 600 buckets).
WHOLE_SAMPLE = float(2 ** 26)
#: Labels the coarse rings leave out (see Rollups above).
ROLLUP_DROPS = frozenset({"replica", "pid"})

# column -> (dtype, value of an empty bucket); sums and mins read empty buckets as no-ops.
# Counts and counter sums start narrow and widen the first time a value does not fit
# exactly (see Ring.widen), so no stored value is ever rounded. A counter bucket must tell
# "no sample" from 0 (a request series reads as present with 0 requests): while its
# column is unsigned it holds the value + 1 and 0 means empty (requests and errors per
# second are whole numbers, mostly below 255: one byte, not a float32's four); once
# float, the value itself and NaN for empty (see Ring.read).
_COLUMNS = {"counter": {"v": (np.uint8, 0)},  # value + 1 while unsigned: 0 marks empty
            "histogram": {"n": (np.uint8, 0), "s": (np.float64, 0.0), "z": (np.uint8, 0),
                          "lo": (np.float64, np.inf), "hi": (np.float64, -np.inf)},
            "gauge": {"n": (np.uint8, 0), "s": (np.float64, 0.0), "lo": (np.float64, np.inf),
                      "hi": (np.float64, -np.inf), "last": (np.float64, 0.0),
                      "to": (np.float32, -np.inf)}}  # to: the latest sample's offset in the bucket
# A per-series gauge ring holds one sample per bucket (one report a second): until a bucket
# gets a second sample it keeps the sample and its offset only (see Ring.single).
# Its samples start as uint8 and widen like counts (gauges such as in-flight requests or
# hung requests are small whole numbers; a value that does not fit widens the ring).
# No count column: a bucket has its sample where its offset is not -inf (Ring.count).
_SINGLE = {"last": (np.uint8, 0), "to": (np.float32, -np.inf)}
# Columns held as a read-only broadcast of their empty value, no memory, until the first
# non-empty write (Ring.column): observations in the zero bucket are rare for latencies
# (a duration of exactly 0), and a full uint8 column is 2.4 KiB per replica.
_LAZY = frozenset({"z"})
_F64 = np.dtype(np.float64)
_NO_META = np.zeros((0, 5), dtype=np.uint32)
_COMPACT_AT = 8  # appended deltas in one histogram bucket before it is compacted


def exact32(x: float) -> bool:
    """Whether ``x`` is held exactly by a float32 (NaN counts as exact: it marks empty)."""
    return x != x or float(np.float32(x)) == x


_WIDER = {np.dtype(np.uint8): np.uint16, np.dtype(np.uint16): np.float32,
          np.dtype(np.float32): np.float64}


_UMAX = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}
_TOP = {**_UMAX, np.dtype(np.float32): 2 ** 24, np.dtype(np.float64): 2 ** 53}


def fits(dtype: np.dtype, x: float) -> bool:
    """Whether a column of ``dtype`` holds ``x`` exactly."""
    top = _UMAX.get(dtype)
    if top is not None:
        return 0 <= x <= top and float(x).is_integer()
    if dtype != np.float32:
        return True
    x = float(x)  # whole numbers up to 2**24 (counts) need no float32 round trip
    return (-16777216.0 <= x <= 16777216.0 and x.is_integer()) or exact32(x)


# -- rings and their time axis -----------------------------------------------------------

class Ring:
    """One resolution of one metric: 2-D arrays [row, slot] (rows of series or rollups).

    Histogram buckets: a bucket still filling (the clock's and the one behind it) keeps
    each row's packed pairs in ``open[slot][row]``; once complete, the slot's rows are
    packed into one bytes object (``packed[slot]``, its header in ``meta[slot]``: see
    :func:`~ray_monitor.aggregator.packing.narrow`), with no object per cell. A slot's
    packed entries of a row count only if the slot was sealed after the row was last
    cleared (``sealed[slot] > cleared[row]``: rows are reused). ``single``: a per-series gauge ring that keeps only the sample
    and its offset; a row with a second sample in a bucket is kept aside with every
    column (``aside``: :mod:`~ray_monitor.aggregator.aside`), and past ``ASIDE_ROWS``
    such rows the whole ring keeps every column (:meth:`unfold`).
    """

    aside: Optional["Ring"] = None  # class defaults: a ring pickled before has none
    aside_of: Mapping[int, int] = MappingProxyType({})  # row -> its row in ``aside``

    def __init__(self, step: float, slots: int, kind: str, single: bool = False,
                 latest: bool = True) -> None:
        self.step, self.slots, self.kind = step, slots, kind
        self.single = single and kind == "gauge"
        self.columns = dict(_SINGLE if self.single else _COLUMNS[kind])
        #: whether a gauge ring keeps each bucket's latest sample: ``last`` (and ``sum``,
        #: which adds per-series averages) read series rows only, so rollup rings do not
        self.latest = latest or self.single
        if kind == "gauge" and not self.latest:
            del self.columns["last"], self.columns["to"]
        #: per column: the largest whole number it holds exactly (a quick check on writes)
        self.top = {c: _TOP[np.dtype(d)] for c, (d, _) in self.columns.items()}
        self.lazy = set(_LAZY.intersection(self.columns))  # see _LAZY
        for c, (dtype, fill) in self.columns.items():
            setattr(self, c, self._empty(c, 0) if c in self.lazy else
                    np.full((0, slots), fill, dtype=dtype))
        self.reused = 0  # slots emptied for reuse since a look at the columns' types
        #: per slot of a gauge ring: a sample written since the slot was emptied is not a
        #: whole number of magnitude at most WHOLE_SAMPLE (a window's sums slide over the
        #: slots without one: row_windows.SlidingGauge)
        self.unwhole = np.zeros(slots, dtype=bool)
        if kind == "histogram":
            # slot -> row -> packed pairs, and slot -> row -> deltas appended where more
            # than one (bytes and ints only: no object per cell for the GC to scan)
            self.open: dict[int, dict[int, bytes]] = {}
            self.appended: dict[int, dict[int, int]] = {}
            self.packed: list[Optional[bytes]] = [None] * slots
            self.meta = _NO_META  # per slot: packing.narrow's header (made at the first seal)
            # A packed slot's entries of a row are valid if the slot was sealed after the
            # row was last cleared (rows are reused): one number per slot and per row.
            self.epoch = 0
            self.sealed = _NO_META[:, 0]
            self.cleared = np.zeros(0, dtype=np.int64)

    @property
    def rows(self) -> int:
        return getattr(self, next(iter(self.columns))).shape[0]

    def _empty(self, column: str, rows: int) -> np.ndarray:
        dtype, fill = self.columns[column]
        return np.broadcast_to(np.array(fill, dtype=dtype), (rows, self.slots))

    def column(self, name: str) -> np.ndarray:
        """``name``'s array, to write into (a lazy column is made then: see _LAZY)."""
        if name in self.lazy:
            self.lazy.discard(name)
            setattr(self, name, np.array(getattr(self, name)))  # a writable copy
        return getattr(self, name)

    def grow(self, cap: int) -> None:
        for c, (_, fill) in self.columns.items():
            setattr(self, c, self._empty(c, cap) if c in self.lazy else
                    _pad(getattr(self, c), cap, fill))
        if self.kind == "histogram":
            self.cleared = _pad(self.cleared, cap, 0)

    def widen(self, column: str, value: float) -> np.ndarray:
        """Holds ``column`` in the next type that holds ``value`` exactly, from now on."""
        dtype, fill = self.columns[column]
        shifted = self.kind == "counter"  # unsigned: value + 1 (see _COLUMNS)

        def holds(d) -> bool:
            d = np.dtype(d)
            return fits(d, value + 1 if shifted and d.kind == "u" else value)
        if holds(dtype):  # past ``top`` but held exactly all the same
            return getattr(self, column)
        while not holds(dtype):
            dtype = _WIDER[np.dtype(dtype)]
        old = getattr(self, column)
        if shifted and old.dtype.kind == "u" and np.dtype(dtype).kind == "f":
            fill = np.nan
            new = old.astype(dtype)
            new -= 1
            new[old == 0] = np.nan
        else:
            new = old.astype(dtype)
        self.columns[column] = (dtype, fill)
        self.top[column] = _TOP[np.dtype(dtype)]
        setattr(self, column, new)
        return new

    def _narrow_back(self) -> None:
        """Every slot has been reused since the last look: a uint16 column whose values
        all fit a byte again (a burst has left the ring) goes back to uint8."""
        for c, (dtype, fill) in self.columns.items():
            a = getattr(self, c)
            if a.dtype == np.uint16 and a.size and int(a.max()) <= 255:
                self.columns[c] = (np.uint8, fill)
                self.top[c] = 255
                setattr(self, c, a.astype(np.uint8))

    def unfold(self) -> None:
        """A single-sample gauge ring gets every column: a bucket has a second sample."""
        full = _COLUMNS["gauge"]
        has = self.to > -np.inf
        self.last = self.last.astype(np.float64)  # first: float32 samples' sums in float64
        self.s = np.where(has, self.last, full["s"][1])
        self.lo = np.where(has, self.last, full["lo"][1])
        self.hi = np.where(has, self.last, full["hi"][1])
        self.n = has.astype(full["n"][0])
        if self.aside is not None:
            merge_back(self)
        self.columns = {c: (getattr(self, c).dtype.type, fill) for c, (_, fill) in full.items()}
        self.top = {c: _TOP[np.dtype(d)] for c, (d, _) in self.columns.items()}
        self.single = False

    def samples(self, index) -> np.ndarray:
        """The latest sample of each bucket of ``[index]`` (of rows kept aside too)."""
        a = self.last[index]
        return patch(self, a, index, "last") if self.aside_of else a

    def sums(self, index, cnt: Optional[np.ndarray] = None, aside: bool = True) -> np.ndarray:
        """Per bucket of ``[index]``: its sum of samples (an empty bucket's: 0); of a
        single-sample ring, that sample (whole numbers of 1-2 bytes as they are held; rows
        kept aside read 0 unless ``aside``: see aside.rows_in)."""
        if not self.single:
            return self.s[index]
        last = self.last[index]
        if not (last.dtype.kind == "u" and last.dtype.itemsize <= 2):
            last = np.where((self.count(index) if cnt is None else cnt) > 0, last, 0.0)
        return patch(self, last, index, "s") if aside and self.aside_of else last

    def read(self, column: str, index) -> np.ndarray:
        """``column[index]`` as float64 (a single-sample ring derives n, s, lo, hi; a
        counter ring's empty buckets read NaN)."""
        if self.single and column in ("n", "s", "lo", "hi"):
            has = self.to[index] > -np.inf
            got = has.astype(np.float64) if column == "n" else \
                np.where(has, self.last[index], _COLUMNS["gauge"][column][1])
            return patch(self, got, index, column, fresh=True) if self.aside_of else got
        if self.single and self.aside_of and column in ("last", "to"):
            return patch(self, getattr(self, column)[index], index, column).astype(np.float64)
        a = getattr(self, column)[index]
        if self.kind == "counter" and a.dtype.kind == "u":
            return np.where(a == 0, np.nan, a - 1.0)
        return a.astype(np.float64, copy=False)

    def count(self, index, aside: bool = True) -> np.ndarray:
        """Samples (observations) per bucket of ``n[index]``, in its own type (a
        single-sample ring holds no count: a bucket has a sample where it has an offset;
        rows kept aside read 0 unless ``aside``)."""
        if self.single:
            has = (self.to[index] > -np.inf).view(np.uint8)
            return patch(self, has, index, "n") if aside and self.aside_of else has
        return self.n[index]

    def has(self, index) -> np.ndarray:
        """Whether each bucket of ``[index]`` holds data."""
        if self.kind == "counter":
            v = self.v[index]
            return v != 0 if v.dtype.kind == "u" else ~np.isnan(v)
        return self.count(index) > 0

    def clear(self, rows, slots) -> None:
        """Empties ``[rows, slots]``: whole slots (``rows`` a slice) or one row's every slot."""
        for c, (_, fill) in self.columns.items():
            if c not in self.lazy:  # a lazy column holds only its empty value
                getattr(self, c)[rows, slots] = fill
        if self.aside is not None:
            if isinstance(rows, slice):
                self.aside.clear(slice(None), slots)
            elif rows in self.aside_of:  # the row is emptied (reused): compact again
                i = self.aside_of.pop(rows)
                self.aside.clear(i, slice(None))
                self.aside_free.append(i)
        if isinstance(rows, slice):
            self.unwhole[slots] = False
            self.reused += self.slots if isinstance(slots, slice) else len(slots)
            if self.reused >= self.slots:
                self.reused = 0
                self._narrow_back()
        if self.kind != "histogram":
            return
        if isinstance(rows, slice):
            for p in (range(self.slots) if isinstance(slots, slice) else np.ravel(slots).tolist()):
                self.packed[p] = None
                self.open.pop(p, None)
                self.appended.pop(p, None)
        else:
            self.cleared[rows] = self.epoch
            for cells in self.open.values():
                cells.pop(rows, None)
            for counts in self.appended.values():
                counts.pop(rows, None)

    def close(self, p: int, final: bool) -> None:
        """The bucket in slot ``p`` is complete (``final``: no delta is due in it any more):
        compact what was appended to it, and pack it into one array once final."""
        if self.kind != "histogram":
            return
        cells = self.open.get(p)
        if not cells:
            return
        if final:
            self._seal(p)
            return
        for r in self.appended.pop(p, {}):
            cells[r] = compact(cells[r])

    def _seal(self, p: int) -> None:
        cells = self.open.pop(p)
        self.appended.pop(p, None)
        rows = np.fromiter(cells, dtype=np.int64, count=len(cells))
        blobs = list(cells.values())
        lens = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs)) // PAIR.itemsize
        pairs = np.frombuffer(b"".join(blobs), dtype=PAIR)
        old = self.packed[p]
        if old is not None:  # late deltas for a packed bucket: one array again
            orows, olens, opairs = unnarrow((old, tuple(self.meta[p].tolist())))
            ok = self.sealed[p] > self.cleared[orows]
            rows = np.concatenate((orows[ok], rows))
            pairs = np.concatenate((opairs[np.repeat(ok, olens)], pairs))
            lens = np.concatenate((olens[ok], lens))
        # sorted, one entry per (row, index): what the gap forms code as steps
        rows, lens, pairs = compact_cells(rows, lens, pairs)
        if not len(self.meta):
            self.meta = np.zeros((self.slots, 5), dtype=np.uint32)
            self.sealed = np.zeros(self.slots, dtype=np.int64)
        self.epoch += 1
        self.sealed[p] = self.epoch
        self.packed[p], self.meta[p] = narrow(rows, lens, pairs)

    def runs(self, slots) -> list[Runs]:
        """Histogram entries held in ``slots``, as :class:`~ray_monitor.aggregator.packing.Runs`
        (packed slots decoded at once, as far as their steps)."""
        at, out = [], []
        for p in np.ravel(slots).tolist():
            if self.packed[p] is not None:
                at.append(p)
            cells = self.open.get(p)
            if cells:
                blobs = list(cells.values())
                lens = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs)) // PAIR.itemsize
                idx, cnt = unpack(b"".join(blobs))
                out.append(Runs(np.fromiter(cells, dtype=np.int64, count=len(cells)), lens, cnt,
                                idx=idx))
        if at:
            helds = [(self.packed[p], tuple(m)) for p, m in zip(at, self.meta[at].tolist())]
            for runs, where in decode_runs(helds):
                ok = self.sealed[np.array(at)[where]] > self.cleared[runs.rows]
                out.append(runs if ok.all() else runs.take(ok))
        return out

    def nbytes(self) -> int:
        n = sum(getattr(self, c).nbytes for c in self.columns if c not in self.lazy)
        if self.aside is not None:
            n += self.aside.nbytes()
        if self.kind == "histogram":
            n += self.cleared.nbytes + self.sealed.nbytes + self.meta.nbytes
            n += sum(len(held) + 33 for held in self.packed if held is not None)
            n += sum(len(c) + 100 for cells in self.open.values() for c in cells.values())
        return n


# -- tables --------------------------------------------------------------------------------

class Table:
    """All series of one metric: label index, per-series fine ring, rollup rings (every
    resolution, see Rollups above), cumulative values; and the writes into them."""

    def __init__(self, metric: Metric, resolutions: tuple[tuple[float, int], ...]) -> None:
        self.metric = metric
        self.kind = metric.kind
        self.series = LabelSpace(metric.labels)
        self.totals = Totals(self.kind)  # per row: its value since the store started
        self.keep = tuple(i for i, n in enumerate(metric.labels) if n not in ROLLUP_DROPS)
        self.has_drops = len(self.keep) < len(metric.labels)
        # without labels to drop, a rollup is its series: one space, one set of rings
        self.rollups = LabelSpace(tuple(metric.labels[i] for i in self.keep)) \
            if self.has_drops else self.series
        self.rings = [Ring(step, slots, metric.kind, latest=not self.has_drops)
                      for step, slots in resolutions]
        self.series_ring = Ring(*resolutions[0], metric.kind, single=True) \
            if self.has_drops else self.rings[0]
        self.up: list[int] = []  # series row -> rollup row
        self.live_series = np.zeros(0, dtype=np.int32)  # rollup row -> its live series
        self.version = 0  # bumps when a series or rollup comes or goes (reads key on LabelSpace.edits)
        self.other = (OTHER,) * len(metric.labels)
        self.folded: set[int] = set()
        self.selections: dict = {}

    def all_rings(self, ri: int) -> list[Ring]:
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
        if row >= len(self.up):
            self.up.append(-1)
        self.totals.reset(row)
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
        if self.has_drops:
            if len(self.rollups.live) > len(self.live_series):
                self.live_series = _pad(self.live_series, len(self.rollups.live), 0)
            self.live_series[up] += 1
        self.version += 1
        return row

    def rows_version(self, fine_only: bool) -> int:
        """What a read of the series (``fine_only``) or of the rollups depends on: its
        space's count of rows that came or went (a replica coming or going in a deployment
        leaves the rollups' groupings and kept windows be)."""
        return (self.series if fine_only else self.rollups).edits

    def touch(self, row: int, now: float) -> None:
        """Marks a series (and its rollup) as current without writing data: its replica
        still reports it."""
        self.series.updated[row] = now
        up = self.up[row]
        if self.rollups.updated[up] < now:
            self.rollups.updated[up] = now

    def alive(self, fine_only: bool) -> np.ndarray:
        """Per row of the series (``fine_only``) or of the rollups: whether it is alive,
        i.e. a series that has not expired, or a rollup with such a series. A counter or
        histogram that is alive reads 0 over a window without data (see window_query)."""
        if fine_only or not self.has_drops:
            return self.series.live
        return self.live_series > 0

    def remove(self, row: int) -> None:
        values = self.series.labels[row]
        if self.has_drops:
            self.live_series[self.up[row]] -= 1
        self.series.remove(row)
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

    # -- writes: ``where`` is Timeline.keeping() of the sample's time ------------------

    def _targets(self, row: int, where, now: float) -> list[tuple[Ring, int, int, int]]:
        """(ring, row, bucket, slot) to write: the rollup in every ring that keeps the time,
        and the series in the finest one."""
        up = self.up[row]
        out = [(self.rings[ri], up, k, p) for ri, k, p in where]
        if self.has_drops and where[0][0] == 0:
            out.append((self.series_ring, row, where[0][1], where[0][2]))
        self.series.updated[row] = now
        self.rollups.updated[up] = now
        return out

    def add_counter(self, row: int, where, value: float, now: float) -> None:
        for ring, r, k, p in self._targets(row, where, now):
            v = ring.v
            if v.dtype.kind == "u":  # value + 1, 0: empty (see _COLUMNS)
                cur = v[r, p].item()
                new = value + cur - 1 if cur else value
                if 0 <= new < ring.top["v"] and float(new).is_integer():
                    v[r, p] = new + 1
                    continue
                v = ring.widen("v", new)
                if v.dtype.kind == "u":
                    v[r, p] = new + 1
                    continue
            else:
                cur = float(v[r, p])
                new = value if cur != cur else cur + value  # NaN: the bucket was empty
                if not fits(v.dtype, new):
                    v = ring.widen("v", new)
            v[r, p] = new
        self.totals.add(row, value)

    def add_gauge(self, row: int, where, value: float, t: float, now: float) -> None:
        whole = value.is_integer() and -WHOLE_SAMPLE <= value <= WHOLE_SAMPLE
        for ring, r, k, p in self._targets(row, where, now):
            off = t - k * ring.step
            if not whole:
                ring.unwhole[p] = True
            if ring.single:
                i = ring.aside_of.get(r)
                if i is None:
                    if ring.to[r, p] == -np.inf:
                        if ring.last.dtype != _F64 and not fits(ring.last.dtype, value):
                            ring.widen("last", value)
                        ring.last[r, p] = value
                        ring.to[r, p] = off
                        continue
                    i = put_aside(ring, r)  # a second sample in the bucket
                if i is not None:
                    add_sample(ring.aside, i, p, value, off)
                    continue
            add_sample(ring, r, p, value, off)
        self.totals.set(row, value, t)

    def add_hist(self, row: int, where, h: Histogram, now: float,
                 exemplars: Optional[dict[int, Exemplar]]) -> None:
        a = histogram_entries(h)
        packed = pack_histogram(a)
        for ring, r, k, p in self._targets(row, where, now):
            cells = ring.open.get(p)
            if cells is None:
                cells = ring.open[p] = {}
            if ring.n[r, p]:
                for c, add in (("n", h.count), ("z", h.zero_count)):
                    if add:
                        col = ring.column(c)
                        new = col[r, p].item() + add
                        if new > ring.top[c] or type(new) is not int and not fits(col.dtype, new):
                            col = ring.widen(c, new)
                        col[r, p] = new
                ring.s[r, p] += h.sum
                if h.min < ring.lo[r, p]:
                    ring.lo[r, p] = h.min
                if h.max > ring.hi[r, p]:
                    ring.hi[r, p] = h.max
                cell = cells.get(r)
                if cell is None:  # a late delta for a packed bucket: merged when sealed
                    cells[r] = packed
                else:
                    counts = ring.appended.get(p)
                    if counts is None:
                        counts = ring.appended[p] = {}
                    k = counts.get(r, 1) + 1
                    if k >= _COMPACT_AT:
                        cells[r] = compact(cell + packed)
                        counts.pop(r, None)
                    else:
                        cells[r] = cell + packed
                        counts[r] = k
            else:
                for c, value in (("n", h.count), ("z", h.zero_count)):
                    if value:  # a slot is emptied to 0
                        col = ring.column(c)
                        if value > ring.top[c] or type(value) is not int and not fits(col.dtype, value):
                            col = ring.widen(c, value)
                        col[r, p] = value
                ring.s[r, p] = h.sum
                ring.lo[r, p] = h.min
                ring.hi[r, p] = h.max
                cells[r] = packed
        self.totals.merge(row, h, a[0::2], a[1::2], exemplars)
