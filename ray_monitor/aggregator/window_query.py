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
average (absent with fewer than 2 steps with data, as Prometheus' ``deriv()`` with
fewer than 2 samples). ``zscore``: per step of the chosen
resolution, the metric's natural value (counter: rate, 0 in a step without data after
its first one; histogram: mean; gauge: average); ``latest`` is the newest step with a
value and the history the earlier ones in the window;
``z = (latest - mean) / max(std, 1% of |mean|, 1e-9)`` (population std), so a flat series
reads 0 and a flat series followed by a jump is a large anomaly. Absent with fewer than 5
history steps. For counters a step past ``end`` is left out: it is still filling.
``absent_over_time``: see :meth:`WindowQuery._absent`.

Sharing. Within one round (same ``end``, no ingest in between) per-row window aggregates,
per-group merges and results are memoised; a rule whose matchers name only labels of its
``by`` (``p99(...{deployment="a"}) by (application, deployment)``) reads the result of
the query without matchers, restricted to the matching groups (looked up in an index of
the grouping). Each query's checks and plan are made when the rules are loaded
(:meth:`WindowQuery.prepare`) and kept; which rows a matcher set selects and their groups
are kept until a row of the space they read (series, or rollups) comes or goes. From round
to round, a rollup histogram window's counts (:mod:`~ray_monitor.aggregator.window_counts`),
a per-series gauge window and the per-step sums of zscore/deriv over the 1 s ring
(:mod:`~ray_monitor.aggregator.row_windows`), each equal to a fresh read bit for bit; a
replica coming or going leaves rollup windows as they are and has a per-series window
reread its rows only. Within a round, a longer per-series gauge window or per-step sums
ending alike (300 s after 60 s, same metric and grouping) start from the shorter one's and
read only its older buckets; histogram counts are read afresh (cheaper, see window_counts). A
kept window stays while a round read it in the last 32 (rule groups of longer intervals).
"""

from __future__ import annotations

from itertools import compress
from typing import Mapping, Optional

import numpy as np

from ray_monitor.aggregator.packing import bucket_values
from ray_monitor.aggregator.rings import ROLLUP_DROPS, GroupKey, Table
from ray_monitor.aggregator.row_windows import (RowWindow, SlidingGauge, SlidingSteps,
                                                deriv_dense, deriv_same_steps, read_rows,
                                                step_sums)
from ray_monitor.aggregator.timeline import Timeline
from ray_monitor.aggregator.window_counts import (SlidingCounts, bucket_counts, run_starts,
                                                  used_columns)
from ray_monitor.common.catalog import (ABSENT, FUNCTIONS, SHORTHAND_QUANTILES, Query,
                                        absence_metric, absent_labels)
from ray_monitor.common.matchers import Matcher, check_regex, matches

__all__ = ["DERIV_MIN_STEPS", "GroupKey", "WindowQuery", "ZSCORE_ABS_FLOOR", "ZSCORE_MIN_HISTORY",
           "ZSCORE_REL_FLOOR"]

ZSCORE_MIN_HISTORY = 5
DERIV_MIN_STEPS = 2  # as Prometheus' deriv(), which needs two samples
#: std floor of zscore, relative to the history's mean, and absolute.
ZSCORE_REL_FLOOR = 0.01
ZSCORE_ABS_FLOOR = 1e-9
#: rounds a kept window stays unread (rule groups with longer intervals, or rules changed):
#: a window slides at most 30 s, so one unread longer than that at 1 s rounds is read afresh
_KEEP_UNUSED_ROUNDS = 32


class _Groups:
    """One (metric, window, matchers, by): the present rows sorted by group, and sums."""

    def __init__(self, keys: list[GroupKey], rows: np.ndarray, starts: np.ndarray,
                 sw: RowWindow) -> None:
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


class _Plan:
    """How one query is answered (see WindowQuery._plan), and its result this round."""

    __slots__ = ("table", "whole", "result", "round", "keys", "keys_version")

    def __init__(self, table: Table, whole: Optional[tuple]) -> None:
        self.table, self.whole, self.result, self.round = table, whole, None, -1
        #: equality matchers on ``by`` labels: the matching group keys, and the table
        #: version they are of
        self.keys: tuple = ()
        self.keys_version = -1


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
        self._round = 0  # bumps with every new stamp: a plan's result is of one round
        self._plans: dict[Query, _Plan] = {}
        #: windows kept from round to round while a round reads them: histogram counts
        #: (window_counts.SlidingCounts) and per-step sums (row_windows.SlidingSteps)
        self._slides: dict[tuple, object] = {}
        self._slides_used: set[tuple] = set()  # this round
        #: key -> the round (count of forget) it was last used in: a rule group evaluated
        #: every 10 s keeps its windows through the 1 s group's rounds in between
        self._slides_seen: dict[tuple, int] = {}
        self._rounds_ended = 0
        #: (application, deployment) -> replicas Ray Serve runs (None: unknown), for
        #: ``absent_over_time(...) by (...)``; the store sets it.
        self.running: Optional[dict[tuple[str, str], int]] = None

    def forget(self) -> None:
        """Frees the round's memo."""
        self._memo.clear()
        self._stamp = None
        self._round += 1
        for plan in self._plans.values():
            plan.result = None
        self._rounds_ended += 1
        for k in self._slides_used:
            self._slides_seen[k] = self._rounds_ended
        if len(self._slides_used) < len(self._slides):  # free what no round read lately
            old = self._rounds_ended - _KEEP_UNUSED_ROUNDS
            self._slides = {k: v for k, v in self._slides.items()
                            if self._slides_seen.get(k, old) > old}
            self._slides_seen = {k: self._slides_seen[k] for k in self._slides}
        self._slides_used = set()

    def prepare(self, queries) -> None:
        """Plans the queries a rule file holds when it is loaded (about 7 us a query: 7 ms
        for 1,000 at load, not in the first round). A query that is not the store's (a
        model-quality one) or is wrong is left to its round, which says what is wrong."""
        for q in queries:
            if q not in self._plans:
                try:
                    self._plan(q)
                except ValueError:
                    pass

    def evaluate(self, query: Query, end: float, version: int) -> dict[GroupKey, float]:
        """The query's value per group over the window that ends at ``end`` (see
        Windows); groups without a value are absent. Raises ``ValueError`` naming what is
        wrong with the query."""
        plan = self._plans.get(query)
        if plan is None:
            plan = self._plan(query)
        stamp = (end, version)
        if stamp != self._stamp:
            self._memo.clear()
            self._stamp = stamp
            self._round += 1
        if plan.round != self._round:
            plan.result = self._answer(query, plan, end)
            plan.round = self._round
        return dict(plan.result)

    def _plan(self, query: Query) -> "_Plan":
        """Checks a query the first time it comes, and decides how it is answered (kept
        until the rules change: the same queries come every round)."""
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
        if len(self._plans) > 4096:  # rules change: forget queries nobody asks for
            self._plans.clear()
        whole = self._whole_groups(query, table)
        if whole is not None:  # the query without matchers: planned too, answered once
            unmatched = whole[0]
            whole = (self._plans.get(unmatched) or self._plan(unmatched),) + whole
        plan = self._plans[query] = _Plan(table, whole)
        return plan

    def _answer(self, q: Query, plan: "_Plan", end: float) -> dict[GroupKey, float]:
        if plan.whole is None:
            return self._compute(q, plan.table, end)
        uplan, unmatched, source, fine_only, at, labels, want = plan.whole
        if uplan.round != self._round:
            uplan.result = self._compute(unmatched, plan.table, end)
            uplan.round = self._round
        full = uplan.result
        if labels is None:  # not only "=": each group's labels matched
            return {k: v for k, v in full.items()
                    if all(matches(m, k[at[m.label]][1]) for m in q.matchers)}
        if want is None:
            return {}  # two values for one label: nothing matches
        version = source.rows_version(fine_only)
        if plan.keys_version != version:
            plan.keys = tuple(self._by_value(source, unmatched.by, fine_only, labels, at)
                              .get(want, ()))
            plan.keys_version = version
        return {k: full[k] for k in plan.keys if k in full}

    def _whole_groups(self, q: Query, table: Table) -> Optional[tuple]:
        """Matchers only on labels of ``by`` select whole groups, and every function is
        computed per group from the group's rows alone: such a query's value is that of
        the query without matchers, restricted to the groups that match (the same rows in
        the same order, so the same numbers), computed once for every such rule of the
        round. None where that does not hold; else (the query without matchers, the table
        its groups come from, whether it reads per-series rows, each ``by`` label's place
        in a group key, and for equality matchers only: the matched labels and values)."""
        if not q.matchers or not q.by or q.function == ABSENT or \
                any(m.label not in q.by for m in q.matchers):
            return None
        unmatched = Query(q.function, q.metric, q.window_s, by=q.by, param=q.param)
        source = self._tables["requests"] if q.function == "error_ratio" else table
        fine_only = self._per_series(unmatched, source)
        at = {b: i for i, b in enumerate(sorted(q.by))}  # a key's (label, value) pairs
        if any(m.op != "=" for m in q.matchers):
            return unmatched, source, fine_only, at, None, None
        labels = tuple(sorted({m.label for m in q.matchers}))
        want = {}
        for m in q.matchers:
            if want.setdefault(m.label, m.value) != m.value:
                return unmatched, source, fine_only, at, labels, None
        return unmatched, source, fine_only, at, labels, tuple(want[b] for b in labels)

    def _by_value(self, table: Table, by: tuple[str, ...], fine_only: bool,
                  labels: tuple[str, ...], at: dict[str, int],
                  ) -> dict[tuple[str, ...], list[GroupKey]]:
        """The group keys of the grouping by ``by`` (no matchers) by their values of
        ``labels``, each list in group order (the order of a result); kept with the
        grouping, until a series or rollup of the metric comes or goes."""
        key = ("by-value", by, fine_only, labels)
        hit = table.selections.get(key)
        if hit is not None and hit[0] == table.rows_version(fine_only):
            return hit[1]
        _, _, keys = self._selection(table, (), by, fine_only)
        index: dict[tuple[str, ...], list[GroupKey]] = {}
        for k in keys:
            index.setdefault(tuple(k[at[b]][1] for b in labels), []).append(k)
        table.selections[key] = (table.rows_version(fine_only), index)
        return index

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
                       fine_only: bool) -> RowWindow:
        key = ("series", table.metric.name, window_s, fine_only)
        sw = self._memo.get(key)
        if sw is not None:
            return sw
        tl = self._tl
        ri, a, b = tl.span(window_s, end, fine_only)
        rows = len((table.series if fine_only else table.rollups).labels)
        # a per-series gauge window slides from the last round's (row_windows.SlidingGauge)
        version = self._stamp[1] if fine_only and table.kind == "gauge" and ri == 0 \
            and self._stamp is not None else None
        slide = ("gauge",) + key[1:]
        sl = self._slides.get(slide) if version is not None else None
        sw = sl.move(tl, table, a, b, rows, version) if sl is not None else None
        sib = self._memo.get(("gauge-of", table.metric.name)) if version is not None else None
        if sw is None and sib is not None and sib.a >= a:  # longer, ending alike (docstring)
            sl = self._slides[slide] = sib.copy()
            sw = sl.move(tl, table, a, b, rows, version)
        if sw is None:
            sw = read_rows(tl, table, ri, a, b, fine_only, rows, tl.max_time < end)
            if version is not None:
                sl = self._slides[slide] = SlidingGauge(sw, tl, table, version)
        if version is not None:
            self._slides_used.add(slide)
            self._memo[("gauge-of", table.metric.name)] = sl
        sw.make_dense = lambda: self._dense(table, sw, ("slide", key[1:]))
        sw.finish(table)
        self._memo[key] = sw
        return sw

    def _dense(self, table: Table, sw: RowWindow, key: tuple) -> tuple[np.ndarray, np.ndarray]:
        """``sw.dense()``: per-row histogram counts over the window. A rollup window over
        the finest ring slides from the last round's (see
        :class:`~ray_monitor.aggregator.window_counts.SlidingCounts`): two buckets decoded a
        round instead of the window's every bucket."""
        rows = len(sw.present)
        version = self._stamp[1] if self._stamp is not None else None
        slides = not sw.fine_only and sw.ri == 0 and version is not None
        sl = self._slides.get(key) if slides else None
        if sl is not None:
            self._slides_used.add(key)
            if sl.move(self._tl, table, sw.a, sw.b, rows, version):
                return used_columns(sl.d, sl.lo)
            del self._slides[key]
        # a longer window ending alike is read afresh (see SlidingCounts)
        d, lo, cols = bucket_counts(rows, [r for ring, c in sw.pair_src for r in ring.runs(c)])
        if cols is not None:
            return d, cols
        if slides:
            held = len(self._tl.columns(0, sw.a, sw.b)[0])
            sl = self._slides[key] = SlidingCounts(sw.a, sw.b, held, table.rollups.edits,
                                                   version, d, lo)
            self._slides_used.add(key)
        return used_columns(d, lo)

    @staticmethod
    def _selection(table: Table, matchers: tuple[Matcher, ...],
                   by: Optional[tuple[str, ...]], fine_only: bool,
                   ) -> tuple[np.ndarray, np.ndarray, list[GroupKey]]:
        """Rows (of series or of rollups) matching ``matchers``, sorted by group id, their
        group ids and the group keys; kept until a series or rollup of the metric comes or
        goes."""
        key = (matchers, by, fine_only)
        hit = table.selections.get(key)
        if hit is not None and hit[0] == table.rows_version(fine_only):
            return hit[1]
        space = table.series if fine_only else table.rollups
        rows, keys, gids = space.select(matchers, sorted(by) if by else [])
        order = np.argsort(gids, kind="stable")
        sel = (rows[order], gids[order], keys)
        if len(table.selections) > 4096:  # rules change: forget selections nobody asks for
            table.selections.clear()
        table.selections[key] = (table.rows_version(fine_only), sel)
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
        starts = run_starts(gids)
        g = self._memo[key] = _Groups([keys[i] for i in gids[starts]], rows, starts, sw)
        g.key = key[1:]
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
        has = (n > 0).tolist()
        if all(has):
            return dict(zip(g.keys, values.tolist()))
        return dict(zip(compress(g.keys, has), compress(values.tolist(), has)))

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
        # over the finest ring, the steps slide from the last round's (SlidingSteps)
        version = self._stamp[1] if self._stamp is not None and sw.ri == 0 else None
        key = ("steps",) + g.key
        sib_key = ("steps-of",) + g.key[:1] + g.key[2:]  # the grouping, any window
        sl = self._slides.get(key) if version is not None else None
        got = sl.move(self._tl, table, ring, ks, cols, rows, pos, len(g.keys), version) \
            if sl is not None else None
        sib = self._memo.get(sib_key) if version is not None else None
        if got is None and sib is not None:  # longer, ending alike (docstring)
            sl = self._slides[key] = sib.copy()
            got = sl.move(self._tl, table, ring, ks, cols, rows, pos, len(g.keys), version)
        if got is None:
            got = step_sums(table.kind, ring, rows, pos, cols, len(g.keys))
            if version is not None:
                sl = self._slides[key] = SlidingSteps(table.rows_version(sw.fine_only),
                                                      sw.fine_only, ring.single, rows, pos, ks,
                                                      *got, version)
        if version is not None:
            self._slides_used.add(key)
            self._memo[sib_key] = sl
        memo = g._memo["steps"] = (ks,) + got
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
        x = ks * self._tl.res[g.sw.ri][0]
        if len(ok) == len(count) and has.all():  # every step has data: the same sums, fewer passes
            return dict(zip(g.keys, deriv_dense(x, total / count).tolist()))
        y = np.where(has, total[ok] / np.where(has, count[ok], 1.0), 0.0)
        if (has == has[0]).all():  # data in the same steps for every group
            slope = deriv_same_steps(x, has[0], int(m[0]), y)
            return dict(zip([g.keys[i] for i in ok.tolist()], slope.tolist()))
        x = np.broadcast_to(x, has.shape)
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

