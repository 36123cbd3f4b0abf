"""What a rule's query means over the window store: which buckets, which series, which function.

Runs in the aggregator actor, under :meth:`~ray_monitor.aggregator.windows.WindowStore.evaluate`,
reading the rings of :mod:`~ray_monitor.aggregator.rings`; it never writes them.

Windows. A query over ``window_s`` ending at ``end`` (the store's
:meth:`~ray_monitor.aggregator.windows.WindowStore.window_end`: the last whole second whose
data has arrived) reads the finest resolution whose span (``step * slots``) covers the
window (windows longer than the coarsest span are cut to it: see
:attr:`~ray_monitor.aggregator.windows.WindowStore.max_window_s`) and takes the buckets
whose *start* lies in ``[end - window_s, end)``: ``window_s`` whole seconds at the finest
resolution, and to one step at a coarser one (whose newest bucket may hold seconds past
``end``). Runs of whole coarse buckets inside the window are read from the coarser rings
(same data, far fewer reads). Per-series queries read the series' finest ring only, and
their windows are cut to its span (10 min by default): those whose ``by`` or matchers
name ``replica`` or ``pid``, and gauge ``last`` / ``sum`` (which add per-series values)
of metrics with those labels. Other queries read rollups, and equal the per-series
computation up to the order of floating-point additions.

No data and zero, as Prometheus over ``/metrics``. A counter or histogram series that is
alive (:meth:`~ray_monitor.aggregator.rings.Table.alive`: its replica reports, or did
within ``series_ttl_s``) reads 0 over a window without data: ``count``, ``sum``,
``rate`` are 0, as ``rate()`` is over a counter that stopped moving. What needs an
observation or a sample has no value without one, and its group is absent from the
result (never NaN): ``error_ratio`` without requests (0/0), quantiles, ``avg``, ``min``,
``max`` and ``ratio_above`` of a histogram without observations, gauges without samples
(Prometheus: NaN, which no comparison but ``!=`` matches, or an empty result).

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
resolution, the metric's natural value (counter: rate, 0 in a step without data after
its first one; histogram: mean; gauge: average); ``latest`` is the newest step with a
value and the history the earlier ones in the window;
``z = (latest - mean) / max(std, 1% of |mean|, 1e-9)`` (population std), so a flat series
reads 0 and a flat series followed by a jump is a large anomaly. Absent with fewer than 5
history steps. For counters a step past ``end`` is left out: it is still filling.
``absent_over_time``: see :meth:`WindowQuery._absent`.

Sharing. Within one evaluation round (same ``end``, no ingest in between) per-row
window aggregates, per-group merges and whole results are memoised, so rules that differ
only in function or threshold cost one dictionary copy; a rule whose matchers name only
labels of its ``by`` (``p99(...{deployment="a"}) by (application, deployment)``) reads
the result of the same query without matchers, restricted to the matching groups. Which rows a matcher set selects,
and their groups, is kept until a series of the metric comes or goes, and is recomputed
with array operations over label codes.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from ray_monitor.aggregator.packing import bucket_values
from ray_monitor.aggregator.rings import ROLLUP_DROPS, GroupKey, Table
from ray_monitor.aggregator.timeline import Timeline
from ray_monitor.common.catalog import (ABSENT, FUNCTIONS, SHORTHAND_QUANTILES, Query,
                                        absence_metric, absent_labels)
from ray_monitor.common.matchers import Matcher, check_regex, matches

__all__ = ["DERIV_MIN_STEPS", "GroupKey", "WindowQuery", "ZSCORE_ABS_FLOOR", "ZSCORE_MIN_HISTORY",
           "ZSCORE_REL_FLOOR"]

ZSCORE_MIN_HISTORY = 5
DERIV_MIN_STEPS = 3
#: std floor of zscore, relative to the history's mean, and absolute.
ZSCORE_REL_FLOOR = 0.01
ZSCORE_ABS_FLOOR = 1e-9


class _SeriesWindow:
    """Per-row aggregates of one metric over one window: rows of the series (per-series
    queries, finest ring only) or of the rollups (all rings)."""

    def __init__(self, ri: int, a: int, b: int, fine_only: bool, rows: int) -> None:
        self.ri, self.a, self.b, self.fine_only = ri, a, b, fine_only
        self.present = np.zeros(rows, dtype=bool)
        self.pair_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._dense = None
        #: per-series gauge parts whose min and max are not in ``lo``/``hi`` yet: a round's
        #: per-series windows are mostly read for ``last`` and ``sum`` (see settle)
        self.pending: list[tuple[np.ndarray, np.ndarray, slice]] = []

    def settle(self) -> None:
        """Adds the pending parts' min and max into ``lo`` and ``hi``."""
        for last, has, out in self.pending:
            np.minimum(self.lo[out], np.where(has, last, np.inf).min(axis=1), out=self.lo[out])
            np.maximum(self.hi[out], np.where(has, last, -np.inf).max(axis=1), out=self.hi[out])
        self.pending = []

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-row histogram counts ``[rows, C]`` and the bucket index of each column."""
        if self._dense is None:
            rows = len(self.present)
            parts = [p for p in self.pair_parts if len(p[0])]
            if not parts:
                self._dense = (np.zeros((rows, 0)), np.zeros(0, dtype=np.int64))
                return self._dense
            tags, idx, cnt = (np.concatenate(c) for c in zip(*parts))
            keep = tags < rows  # rows added since the window was read are not in it
            if not keep.all():
                tags, idx, cnt = tags[keep], idx[keep], cnt[keep]
            lo, hi = (int(idx.min()), int(idx.max())) if len(idx) else (0, 0)
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


def _run_starts(a: np.ndarray) -> np.ndarray:
    """Where each run of equal values in the sorted ``a`` starts (np.r_ costs more than
    the comparison at a thousand rules a round)."""
    if not len(a):
        return np.zeros(0, dtype=np.int64)
    edge = np.empty(len(a), dtype=bool)
    edge[0] = True
    np.not_equal(a[1:], a[:-1], out=edge[1:])
    return np.flatnonzero(edge)


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
            if self.sw.pending and name in ("lo", "hi"):
                self.sw.settle()
            self._memo[key] = ufunc.reduceat(getattr(self.sw, name)[self.rows], self.starts)
        return self._memo[key]

    def hist_cum(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-group cumulative bucket counts, and the columns' bucket indices and values."""
        if "cum" not in self._memo:
            d, cols = self.sw.dense()
            g = np.add.reduceat(d[self.rows], self.starts, axis=0) if d.shape[1] else \
                np.zeros((len(self.starts), 0))
            self._memo["cum"] = (np.cumsum(g, axis=1), cols, bucket_values(cols))
        return self._memo["cum"]


class WindowQuery:
    """Answers queries over a store's tables, sharing work within a round (see Sharing).

    ``stamp`` (the instant and the store's data version) says when the round's memo is
    stale: any other stamp empties it.
    """

    def __init__(self, timeline: Timeline, tables: Mapping[str, Table]) -> None:
        self._tl = timeline
        self._tables = tables
        self._memo: dict = {}
        self._stamp: Optional[tuple[float, int]] = None
        #: (application, deployment) -> replicas Ray Serve runs (None: unknown), for
        #: ``absent_over_time(...) by (...)``; the store sets it.
        self.running: Optional[dict[tuple[str, str], int]] = None

    def forget(self) -> None:
        """Frees the round's memo."""
        self._memo.clear()
        self._stamp = None

    def evaluate(self, query: Query, end: float, version: int) -> dict[GroupKey, float]:
        """The query's value per group over the window that ends at ``end`` (see
        Windows); groups without a value are absent. Raises ``ValueError`` naming what is
        wrong with the query."""
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
        stamp = (end, version)
        if stamp != self._stamp:
            self._memo.clear()
            self._stamp = stamp
        result = self._memo.get(query)
        if result is None:
            result = self._whole_groups(query, table, end)
            if result is None:
                result = self._compute(query, table, end)
            self._memo[query] = result
        return dict(result)

    def _whole_groups(self, q: Query, table: Table, end: float) -> Optional[dict[GroupKey, float]]:
        """Matchers only on labels of ``by`` select whole groups, and every function is
        computed per group from the group's rows alone: such a query's value is that of
        the query without matchers, restricted to the groups that match (the same rows in
        the same order, so the same numbers), computed once for every such rule of the
        round. None where that does not hold."""
        if not q.matchers or not q.by or q.function == ABSENT or \
                any(m.label not in q.by for m in q.matchers):
            return None
        unmatched = Query(q.function, q.metric, q.window_s, by=q.by, param=q.param)
        full = self._memo.get(unmatched)
        if full is None:
            full = self._memo[unmatched] = self._compute(unmatched, table, end)
        at = {b: i for i, b in enumerate(sorted(q.by))}  # a key's (label, value) pairs
        if any(m.op != "=" for m in q.matchers):
            return {k: v for k, v in full.items()
                    if all(matches(m, k[at[m.label]][1]) for m in q.matchers)}
        # equality only: the groups by the matched labels' values, once per result
        labels = tuple(sorted({m.label for m in q.matchers}))
        want = {}
        for m in q.matchers:
            if want.setdefault(m.label, m.value) != m.value:
                return {}  # two values for one label: nothing matches
        key = ("by-value", unmatched, labels)
        index = self._memo.get(key)
        if index is None:
            index = self._memo[key] = {}
            for k, v in full.items():
                index.setdefault(tuple(k[at[b]][1] for b in labels), {})[k] = v
        return index.get(tuple(want[b] for b in labels), {})

    # -- which rows, which buckets ---------------------------------------------------------

    @staticmethod
    def _per_series(q: Query, table: Table) -> bool:
        """Whether the query needs per-series data, which only the finest ring holds."""
        if not table.has_drops:
            return False
        if table.kind == "gauge" and q.function in ("last", "sum"):
            return True
        return any(m.label in ROLLUP_DROPS for m in q.matchers) or \
            any(b in ROLLUP_DROPS for b in q.by or ())

    def _series_window(self, table: Table, window_s: float, end: float,
                       fine_only: bool) -> _SeriesWindow:
        key = ("series", table.metric.name, window_s, fine_only)
        sw = self._memo.get(key)
        if sw is not None:
            return sw
        tl = self._tl
        ri, a, b = tl.span(window_s, end, fine_only)
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
        parts = [(ri, a, b)] if fine_only else tl.cover(ri, a, b, tl.max_time < end)
        for pri, lo, hi in parts:
            _, cols = tl.columns(pri, lo, hi)
            if not len(cols):
                continue
            ring = table.series_ring if fine_only else table.rings[pri]
            n = rows
            out = slice(0, n)
            # a run of adjacent slots reads as a view, not a copy
            at = (slice(0, n), slice(int(cols[0]), int(cols[-1]) + 1)
                  if cols[-1] - cols[0] + 1 == len(cols) else cols)
            if kind == "counter":
                v = ring.read("v", at)
                has = ~np.isnan(v)
                sw.present[out] |= has.any(axis=1)
                sw.v[out] += np.where(has, v, 0.0).sum(axis=1)
                continue
            cnt = ring.count(at)
            has = cnt > 0
            any_ = has.any(axis=1)
            sw.present[out] |= any_
            sw.n[out] += cnt.sum(axis=1, dtype=np.float64)
            if ring.single:  # one sample per bucket: sum, min and max are that sample
                last = ring.last[at]
                sw.s[out] += np.where(has, last, 0.0).sum(axis=1)
                sw.pending.append((last, has, out))  # min and max: when a query reads them
            else:
                sw.s[out] += ring.s[at].sum(axis=1)
                np.minimum(sw.lo[out], ring.lo[at].min(axis=1), out=sw.lo[out])
                np.maximum(sw.hi[out], ring.hi[at].max(axis=1), out=sw.hi[out])
            if kind == "histogram":
                sw.z[out] += ring.z[at].sum(axis=1, dtype=np.float64)
                sw.pair_parts.append(ring.pairs(cols))
            elif ring.latest:  # parts in time order: the newest column with data holds the latest
                newest = len(cols) - 1 - has[:, ::-1].argmax(axis=1)
                sw.last[out] = np.where(any_, ring.last[np.arange(n), cols[newest]], sw.last[out])
        sw.has_data = sw.present.copy()
        if kind == "gauge":
            with np.errstate(invalid="ignore", divide="ignore"):
                sw.avg = sw.s / sw.n
        else:  # zero is a value: an alive counter or histogram without data reads 0
            sw.present |= table.alive(fine_only)[:rows]
        self._memo[key] = sw
        return sw

    @staticmethod
    def _selection(table: Table, matchers: tuple[Matcher, ...],
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

    def _groups(self, table: Table, q: Query, end: float) -> _Groups:
        fine_only = self._per_series(q, table)
        key = ("groups", table.metric.name, q.window_s, q.matchers, q.by, fine_only)
        g = self._memo.get(key)
        if g is not None:
            return g
        sw = self._series_window(table, q.window_s, end, fine_only)
        sel_rows, sel_gids, keys = self._selection(table, q.matchers, q.by, fine_only)
        keep = sw.present[sel_rows]
        rows, gids = sel_rows[keep], sel_gids[keep]
        starts = _run_starts(gids)
        g = self._memo[key] = _Groups([keys[i] for i in gids[starts]], rows, starts, sw)
        g.selected = (sel_rows, sel_gids)
        g.gid_pos = np.full(len(keys), -1, dtype=np.int64)
        g.gid_pos[gids[starts]] = np.arange(len(starts))
        return g

    # -- the functions ---------------------------------------------------------------------

    def _compute(self, q: Query, table: Table, end: float) -> dict[GroupKey, float]:
        if q.function == ABSENT:
            return self._absent(q, end)
        if q.function == "error_ratio":
            req = self._groups(self._tables["requests"], q, end)
            err = self._groups(self._tables["errors"], q, end)
            errors = dict(zip(err.keys, err.reduce("v").tolist())) if err.keys else {}
            return {k: errors.get(k, 0.0) / n
                    for k, n in zip(req.keys, req.reduce("v").tolist()) if n > 0}
        g = self._groups(table, q, end)
        if not g.keys:
            return {}
        f, kind = q.function, table.kind
        if f == "zscore":
            return self._zscore(table, g, end)
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
        rank = np.maximum(np.ceil(q * n) - 1, 0)  # histogram.quantile_rank, vectorised
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

    def _steps(self, table: Table, g: _Groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per group and held step of the window's resolution: (bucket keys, sum, count).

        Counter: (increase, samples); histogram: (sum of values, observations); gauge:
        (sum of samples, samples). A step has data where its count is > 0. The fine ring
        is read from the group's series rows, a coarse one from its rollup rows."""
        memo = g._memo.get("steps")
        if memo is not None:
            return memo
        sw = g.sw
        ring = table.series_ring if sw.fine_only else table.rings[sw.ri]
        ks, cols = self._tl.columns(sw.ri, sw.a, sw.b)
        rows, gids = g.selected  # present in the window's cover or not
        pos = g.gid_pos[gids]
        rows, pos = rows[pos >= 0], pos[pos >= 0]
        idx = np.ix_(rows, cols)
        if table.kind == "counter":
            v = ring.read("v", idx)
            has = ~np.isnan(v)
            total, count = np.where(has, v, 0.0), has.astype(np.float64)
        else:
            total, count = ring.read("s", idx), ring.read("n", idx)
        out_t = np.zeros((len(g.keys), len(cols)))
        out_c = np.zeros((len(g.keys), len(cols)))
        if len(rows):
            starts = _run_starts(pos)
            out_t[pos[starts]] = np.add.reduceat(total, starts, axis=0)
            out_c[pos[starts]] = np.add.reduceat(count, starts, axis=0)
        memo = (ks, out_t, out_c)
        g._memo["steps"] = memo
        return memo

    def _deriv(self, table: Table, g: _Groups) -> dict[GroupKey, float]:
        """Least-squares slope per group, all groups at once (steps without data left out)."""
        ks, total, count = self._steps(table, g)
        has = count > 0
        m = has.sum(axis=1)
        ok = np.flatnonzero(m >= DERIV_MIN_STEPS)
        if not len(ok):
            return {}
        has, m = has[ok], m[ok]
        x = np.broadcast_to(ks * self._tl.res[g.sw.ri][0], has.shape)
        y = np.where(has, total[ok] / np.where(has, count[ok], 1.0), 0.0)
        xc = np.where(has, x - (np.where(has, x, 0.0).sum(axis=1) / m)[:, None], 0.0)
        yc = np.where(has, y - (y.sum(axis=1) / m)[:, None], 0.0)
        slope = (xc * yc).sum(axis=1) / (xc * xc).sum(axis=1)
        return dict(zip([g.keys[i] for i in ok.tolist()], slope.tolist()))

    def _zscore(self, table: Table, g: _Groups, end: float) -> dict[GroupKey, float]:
        """z of each group's latest step against its earlier steps, all groups at once."""
        ks, total, count = self._steps(table, g)
        step = self._tl.res[g.sw.ri][0]
        has = count > 0
        if table.kind == "counter":
            # zero is a value: after its first step with data, a counter's empty steps
            # read 0 (its group is alive); a step not yet complete is left out
            has = (np.cumsum(has, axis=1) > 0) & ((ks + 1) * step <= end)[None, :]
            values = total / step
        else:
            values = total / np.where(count > 0, count, 1.0)
        m = has.sum(axis=1)
        ok = np.flatnonzero(m >= ZSCORE_MIN_HISTORY + 1)
        if not len(ok):
            return {}
        has, values, m = has[ok], values[ok], m[ok]
        newest = has.shape[1] - 1 - has[:, ::-1].argmax(axis=1)
        rows = np.arange(len(ok))
        latest = values[rows, newest]
        history = has.copy()
        history[rows, newest] = False
        n = m - 1
        mean = np.where(history, values, 0.0).sum(axis=1) / n
        std = np.sqrt((np.where(history, values - mean[:, None], 0.0) ** 2).sum(axis=1) / n)
        std = np.maximum(np.maximum(std, ZSCORE_REL_FLOOR * np.abs(mean)), ZSCORE_ABS_FLOOR)
        return dict(zip([g.keys[i] for i in ok.tolist()], ((latest - mean) / std).tolist()))

    # -- absence ---------------------------------------------------------------------------

    def _absent(self, q: Query, end: float) -> dict[GroupKey, float]:
        """``absent_over_time``: 1 where nothing matching reported in the window.

        A sample of a request series is a report of its replica (the ``inflight`` gauge of
        the same method, written with every report); of any other metric, its own data.
        Without ``by``: one group labelled by the equality matchers (Prometheus' rule),
        present only when no matching series has a sample. With ``by``: one group per
        deployment Ray Serve runs (at least one replica) that the matchers on
        ``application``/``deployment`` select, present when none of its matching series
        has a sample."""
        metric = absence_metric(q.metric)
        table = self._tables[metric]
        names = table.metric.labels
        matchers = tuple(m for m in q.matchers if m.label in names)
        sq = Query("count", metric, q.window_s, by=q.by, matchers=matchers)
        fine_only = self._per_series(sq, table)
        sw = self._series_window(table, q.window_s, end, fine_only)
        rows, gids, keys = self._selection(table, matchers, q.by, fine_only)
        has = sw.has_data[rows]
        if q.by is None:
            return {} if has.any() else {absent_labels(q.matchers): 1.0}
        seen = {keys[i] for i in np.unique(gids[has]).tolist()}
        out = {}
        for (app, dep), replicas in (self.running or {}).items():
            value = {"application": app, "deployment": dep}
            if replicas > 0 and all(matches(m, value[m.label]) for m in q.matchers
                                    if m.label in value):
                key = tuple((b, value.get(b, "")) for b in q.by)
                if key not in seen:
                    out[key] = 1.0
        return out

