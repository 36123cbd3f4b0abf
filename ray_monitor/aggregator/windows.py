"""The aggregator's time-window store: every series at several resolutions, queried by rules.

Runs in the aggregator actor. The aggregator hands each
:class:`~ray_monitor.common.snapshot.ReplicaSnapshot` and
:class:`~ray_monitor.common.snapshot.GpuSnapshot` to :meth:`WindowStore.ingest` /
:meth:`WindowStore.ingest_gpu`; alert rules call :meth:`WindowStore.evaluate` with a parsed
:class:`~ray_monitor.common.catalog.Query`; ``/metrics`` reads :meth:`WindowStore.cumulative`
(copied on the aggregator's loop, built on a worker thread: ``cumulative_reader``).
This module decides what a snapshot becomes and when; how it is held (rings, rollups, the
cap on series) is :mod:`~ray_monitor.aggregator.rings`, and what a query means (windows,
functions, sharing within a round) is :mod:`~ray_monitor.aggregator.window_query`.

Series. One series per metric of :data:`~ray_monitor.common.catalog.METRICS` and full label set
(the metric's ``labels``, in that order). From a replica snapshot: ``requests`` (+= the
delta's count), ``errors`` (+= the count of deltas whose ``error`` is set), the histograms
``latency_seconds`` and ``first_item_seconds``, the stream and token series of
:mod:`~ray_monitor.aggregator.tenants` (and its per-tenant ones from the snapshot's
``usage``), the gauge ``inflight`` per method, and the
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

Time. A replica delta covers ``(start, end]`` and lands in the second of its midpoint;
its gauges (in flight, health) are read at ``end`` and travel with it. Replicas flush on
whole seconds (the recorder's grid), so each second holds exactly one delta of each
replica, whatever the jitter of the flush thread (up to half a second). A GPU sample
stands for the interval since the node's previous one and lands at its midpoint too.
Both are clamped to the store's clock (a replica clock running ahead cannot write the
future). A snapshot delivered late (buffered while the aggregator was away) still lands
at its own time in every resolution that keeps that time; one older than the coarsest
resolution is dropped and counted (``too_old_snapshots``). ``late_snapshots`` counts
those that land in a second a round has already read as complete.

Complete windows. :meth:`WindowStore.window_end` is where every query's window ends: the
first second whose data may still be on its way. A replica has delivered everything up
to where its next delta's midpoint will fall (its last ``end`` plus half its interval);
the end is the earliest of these over the replicas that report, rounded down to the
second, and never later than now. A replica whose next delta is more than
:data:`COMPLETE_WAIT_S` overdue is not waited for (it stopped, or lags): its second is
read without it, and the delta counts as late when it lands. So a window of ``W``
seconds holds ``W`` complete seconds: at steady traffic ``rate`` is exact every round.

Zero is a value. A request series (``requests``, ``errors``, the latency histograms)
stays alive while its replica reports, and ``series_ttl_s`` after its last report, data
or not; an alive counter or histogram reads 0 over a window without data (see
:mod:`~ray_monitor.aggregator.window_query`). Each method in a report's ``inflight`` has
``requests`` and ``errors`` series with outcome ``ok`` from that report on, at 0 until a
request ends that way. :meth:`WindowStore.cumulative` (for ``/metrics``) shows counters
and histograms while they are alive, gauges only while their source reports
(:data:`GAUGE_FRESH_S`), as Prometheus drops the series of a target that stopped.
Series expire by arrival time, so a replica catching up on old snapshots is alive.

Gaps. ``seq`` jumps of a replica are counted as ``snapshots_missed``; the sum of the
replicas' own ``dropped`` counters (the usual reason) is ``replica_dropped``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ray_monitor.aggregator.rings import GroupKey, Table
from ray_monitor.aggregator.gpu_cost import feed_gpu_seconds
from ray_monitor.aggregator.tenants import TenantBook, feed_series
from ray_monitor.aggregator.timeline import EMPTY, Timeline, check_resolutions
from ray_monitor.aggregator.window_query import WindowQuery
from ray_monitor.common.catalog import GENAI_METRICS, METRICS, Query
from ray_monitor.common.histogram import Histogram
from ray_monitor.common.snapshot import OK, Exemplar, GpuSnapshot, ReplicaSnapshot

__all__ = ["CumulativeSeries", "DEFAULT_RESOLUTIONS", "GroupKey", "WindowStore"]

DEFAULT_RESOLUTIONS = ((1.0, 600), (10.0, 360), (60.0, 360))
#: How long past its expected time a replica's next snapshot is waited for before windows
#: read its second without it (see Complete windows).
COMPLETE_WAIT_S = 2.0
#: A gauge is on /metrics while its source reported within this long (or three of its
#: report intervals, if longer), as Prometheus drops the series of a target that is down.
GAUGE_FRESH_S = 3.0
#: How far window ends trail the clock at most, for replicas flushing every second: the
#: wait above, half a flush interval (deltas land at their midpoint) and the rounding
#: down to the fine step. Rings hold that much more than their span (Timeline: Held slots).
_END_LAG_S = COMPLETE_WAIT_S + 0.5
#: Request series a replica's report keeps alive (see Zero is a value).
_REPLICA_FED = ("requests", "errors", "latency_seconds", "first_item_seconds", *GENAI_METRICS)

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


class WindowStore:
    """Replica and GPU series at several resolutions, for rules, /metrics and the API.

    Not thread-safe: the aggregator actor calls it from one thread.
    """

    def __init__(self, *, resolutions: tuple[tuple[float, int], ...] = DEFAULT_RESOLUTIONS,
                 series_ttl_s: float = 300.0, max_series_per_metric: int = 10_000,
                 clock: Callable[[], float] = time.time) -> None:
        res = check_resolutions(resolutions)
        self._tl = Timeline(res, lag_s=_END_LAG_S + res[0][0])
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
        self._tables = {name: Table(m, self._tl.held) for name, m in METRICS.items()}
        self._table_list = list(self._tables.values())
        self._query = WindowQuery(self._tl, self._tables)
        self.tenants = TenantBook()  # top tenants per deployment, and token prices (issue 14)
        # (application, deployment, replica) -> [last seq, dropped, seen, data end, interval,
        # slot]; per slot, when the replica's data is complete through and when its next
        # delta is overdue (see window_end: one array operation, not a loop per replica)
        self._replicas: dict[tuple[str, str, str], list] = {}
        self._through = np.zeros(0)
        self._due = np.zeros(0)
        self._free_slots: list[int] = []
        self._gpu_nodes: dict[str, tuple[float, float, float]] = {}  # node -> (seen, time, interval)
        self._ends: Optional[tuple[float, int, float]] = None  # (now, version) -> window end
        self._read_through = -math.inf  # newest window end a round has read
        #: (application, deployment) -> replicas Ray Serve runs, from its controller; None
        #: until the aggregator has asked (see absent_over_time in window_query).
        self.serve_deployments: Optional[dict[tuple[str, str], int]] = None
        self._xid: dict[tuple[str, str], tuple[dict[int, int], float]] = {}
        self._version = 0  # bumps on every change of data: the round memo depends on it
        self._round_now: Optional[float] = None
        self._counts = dict.fromkeys(("snapshots_ingested", "gpu_snapshots_ingested",
                                      "snapshots_missed", "late_snapshots",
                                      "too_old_snapshots"), 0)

    @property
    def max_window_s(self) -> float:
        """The longest window a query can see; longer windows are cut to it."""
        return self._tl.max_window_s

    # ------------------------------------------------------------------ ingest

    def _begin_write(self, t: float, now: float) -> Optional[list[tuple[int, int, int]]]:
        """(ring, bucket, slot) for each resolution that still keeps time ``t``."""
        tl = self._tl
        tl.advance(now, self._table_list)
        where = tl.keeping(t)
        if not where:
            self._counts["too_old_snapshots"] += 1
            return None
        if t < self._read_through:  # a round already read this second as complete
            self._counts["late_snapshots"] += 1
        self._version += 1
        if where[0][0] == 0:  # the finest ring keeps it: its slot changed (see Timeline)
            tl.written[where[0][2]] = self._version
        if t > tl.max_time:
            tl.max_time = t
        return where

    def ingest(self, snap: ReplicaSnapshot) -> None:
        """Adds one replica delta snapshot (see the module docstring for what it becomes)."""
        now = self._clock()
        self._counts["snapshots_ingested"] += 1
        ident = snap.identity
        rkey = (ident.application, ident.deployment, ident.replica)
        # A delta covers (start, end]: it lands in the second of its midpoint, so flushes on
        # whole seconds fill one bucket each (see Time).
        if snap.end > snap.start:
            interval = min(snap.end - snap.start, 3600.0)
            mid = snap.end - interval / 2
        else:  # no interval given: the delta is a point in time
            interval, mid = 1.0, snap.end
        end = min(snap.end, now)
        seen = self._replicas.get(rkey)
        if seen is None:
            self._replicas[rkey] = [snap.seq, snap.dropped, now, end, interval, self._slot()]
            self._set_due(self._replicas[rkey][5], end, interval)
        else:
            if snap.seq > seen[0] + 1:
                self._counts["snapshots_missed"] += snap.seq - seen[0] - 1
            seen[0] = max(seen[0], snap.seq)
            seen[1] = snap.dropped
            seen[2] = now
            if end >= seen[3]:
                seen[3], seen[4] = end, interval
                self._set_due(seen[5], end, interval)
        t = min(mid, now)
        where = self._begin_write(t, now)
        if where is None:
            return
        app, dep, rep, mv = ident.application, ident.deployment, ident.replica, ident.model_version
        tables, cap = self._tables, self._cap
        requests, errors = tables["requests"], tables["errors"]
        for method in snap.inflight:  # a known method has its outcome series from the start
            if method in snap.routed:
                continue
            labels = (app, dep, rep, method, mv, OK)
            for table in (requests, errors):
                if labels not in table.series.index:
                    table.touch(table.row_for(labels, cap), now)
        latency, first_item = tables["latency_seconds"], tables["first_item_seconds"]
        for d in snap.series:
            labels = (app, dep, rep, d.method, mv, d.outcome)
            n = d.latency.count
            requests.add_counter(requests.row_for(labels, cap), where, n, now)
            if d.error:
                errors.add_counter(errors.row_for(labels, cap), where, n, now)
            if n:
                latency.add_hist(latency.row_for(labels, cap), where, d.latency, now, d.exemplars)
            if d.first_item is not None and d.first_item.count:
                first_item.add_hist(first_item.row_for(labels, cap), where, d.first_item,
                                    now, None)
            if d.genai is not None:
                feed_series(tables, labels, d.genai, where, now, cap)
        if snap.usage:
            self.tenants.feed(tables, app, dep, snap.usage, where, now, cap)
        inflight = tables["inflight"]
        for method, value in snap.inflight.items():  # gauges: read at the end of the delta
            row = inflight.row_for((app, dep, rep, method, mv), cap)
            inflight.add_gauge(row, where, float(value), end, now)
        h = snap.health
        if h is not None:
            labels = (app, dep, rep, mv, ident.node_id)
            for name, value in (("cpu_percent", h.cpu_percent), ("rss_bytes", h.rss_bytes),
                                ("loop_lag_seconds", h.loop_lag_s),
                                ("longest_request_seconds", h.longest_request_s),
                                ("hung_requests", len(h.hung))):
                if value is not None:
                    table = tables[name]
                    table.add_gauge(table.row_for(labels, cap), where, float(value), end, now)

    def _slot(self) -> int:
        """A free slot of the per-replica arrays that window_end reads."""
        if self._free_slots:
            return self._free_slots.pop()
        n = len(self._through)
        grow = max(16, n // 4)
        self._through = np.concatenate((self._through, np.full(grow, np.inf)))
        self._due = np.concatenate((self._due, np.full(grow, -np.inf)))
        self._free_slots = list(range(n + grow - 1, n, -1))
        return n

    def _set_due(self, slot: int, end: float, interval: float) -> None:
        # complete up to where its next delta's midpoint will fall, unless that delta is
        # overdue: a replica that stopped (or lags) holds no window back for long
        self._through[slot] = end + interval / 2
        self._due[slot] = end + interval + COMPLETE_WAIT_S

    def ingest_gpu(self, snap: GpuSnapshot, since: Optional[float] = None) -> None:
        """Adds one GPU sample of a node (see the module docstring for what it becomes);
        ``since``: the time of the node's previous sample where the caller knows it better
        than this store (a shard passed only some of a node's samples)."""
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
        last = self._gpu_nodes.get(node)
        prev = since if since is not None else last[1] if last else None
        interval = min(t - prev, 60.0) if prev is not None and t > prev else 1.0
        self._gpu_nodes[node] = (now, t, interval)
        # a sample stands for the interval it ends, like a replica's delta (see Time)
        where = self._begin_write(t - interval / 2, now)
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
                xid.add_counter(xid.row_for(labels, cap), where, increases[dev.uuid], now)
                for table, value in gauges:
                    table.add_gauge(table.row_for(labels, cap), where, float(value), t, now)
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
                    table.add_gauge(table.row_for(labels, cap), where, float(value), t, now)
        feed_gpu_seconds(tables, self.tenants, snap, interval, where, now, cap)  # issue 14

    # ------------------------------------------------------------------ queries

    def begin_round(self, now: Optional[float] = None) -> float:
        """Pins ``now`` for the evaluations that follow (``evaluate(q)`` without ``now``),
        so one round of rules sees one instant and shares work. Returns that instant."""
        self._round_now = self._clock() if now is None else float(now)
        return self._round_now

    def prepare(self, queries) -> None:
        """Checks and plans queries when rules are loaded, so the first round after a
        (re)load does not (see :meth:`~ray_monitor.aggregator.window_query.WindowQuery.prepare`)."""
        self._query.prepare(queries)

    def end_round(self) -> None:
        """Unpins ``now`` and frees the round's memo."""
        self._round_now = None
        self._query.forget()

    def _now(self, now: Optional[float]) -> float:
        if now is not None:
            return float(now)
        return self._round_now if self._round_now is not None else self._clock()

    def evaluate(self, query: Query, now: Optional[float] = None) -> dict[GroupKey, float]:
        """The query's value per group at ``now``, over the window that ends at
        :meth:`window_end` (see :mod:`~ray_monitor.aggregator.window_query` for what each
        function means, and when a group is absent)."""
        end = self.window_end(now)
        if self._round_now is not None and end > self._read_through:
            self._read_through = end
        return self._query.evaluate(query, end, self._version)

    def window_end(self, now: Optional[float] = None) -> float:
        """Where windows end at ``now``: the start of the first second whose data may still
        be on its way (see Complete windows in the module docstring)."""
        now = self._now(now)
        hit = self._ends
        if hit is not None and hit[0] == now and hit[1] == self._version:
            return hit[2]
        # the earliest "complete through" of the replicas whose next delta is not
        # overdue (see _set_due); free slots are never waited for
        waited = self._through[self._due > now]
        end = min(now, float(waited.min())) if len(waited) else now
        step = self._tl.res[0][0]
        end = math.floor(end / step + 1e-9) * step
        self._ends = (now, self._version, end)
        return end

    def complete(self, now: Optional[float] = None) -> bool:
        """Whether windows can end at the last whole second before ``now``: every live
        replica's delta of it has arrived (or is overdue and not waited for)."""
        now = self._now(now)
        step = self._tl.res[0][0]
        return self.window_end(now) >= math.floor(now / step + 1e-9) * step

    def set_serve_deployments(self, running: Optional[dict[tuple[str, str], int]]) -> None:
        """What Ray Serve runs: ``(application, deployment) -> replicas running``, from its
        controller (None: unknown). ``absent_over_time(...) by (...)`` reads it."""
        if running != self.serve_deployments:
            self.serve_deployments = None if running is None else dict(running)
            self._query.running = self.serve_deployments
            self._version += 1

    # ------------------------------------------------------------------ upkeep and reads

    def expire(self, now: Optional[float] = None) -> int:
        """Drops series (and replica / GPU trackers) not updated for ``series_ttl_s``, and
        rollups not updated for the coarsest span; returns how many series went.

        Cost: one array comparison per metric, plus the rows that go."""
        now = self._now(now)
        cutoff = now - self._ttl
        roll_cutoff = now - max(self._ttl, self.max_window_s)
        gone = 0
        for name, table in self._tables.items():
            sp = table.series
            n = len(sp.labels)
            stale = np.flatnonzero(sp.live[:n] & (sp.updated[:n] < cutoff)).tolist()
            if stale and name in _REPLICA_FED:  # alive while its replica reports
                kept = []
                for row in stale:
                    seen = self._replicas.get(sp.labels[row][:3])
                    if seen is not None and seen[2] >= cutoff:
                        table.touch(row, seen[2])
                        kept.append(row)
                if kept:
                    stale = sorted(set(stale) - set(kept))
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
            for v in self._replicas.values():
                if v[2] < cutoff:
                    self._through[v[5]], self._due[v[5]] = np.inf, -np.inf
                    self._free_slots.append(v[5])
            self._replicas = {k: v for k, v in self._replicas.items() if v[2] >= cutoff}
        if any(v[1] < cutoff for v in self._xid.values()):
            self._xid = {k: v for k, v in self._xid.items() if v[1] >= cutoff}
        if any(v[0] < cutoff for v in self._gpu_nodes.values()):
            self._gpu_nodes = {k: v for k, v in self._gpu_nodes.items() if v[0] >= cutoff}
        if gone:
            self._version += 1
        return gone

    def cumulative(self, now: Optional[float] = None) -> list[CumulativeSeries]:
        """Every live series since the store started (totals, latest values, histograms),
        for ``/metrics``. A gauge is left out once its source (replica, or GPU node) has
        not reported for :data:`GAUGE_FRESH_S` (or three of its intervals), as Prometheus
        drops the series of a target that stopped answering; counters and histograms stay
        while the series is alive, so ``rate()`` over them reads 0, not nothing."""
        return self.cumulative_reader(now)()

    def cumulative_reader(self, now: Optional[float] = None) -> Callable[[], list[CumulativeSeries]]:
        """:meth:`cumulative` in two steps: this call copies what it reads (each table's
        label index and the rows' totals, the sources' report intervals: arrays, a few ms
        at thousands of replicas), and the function it returns builds the series from the
        copies alone, so ``/metrics`` calls it on a worker thread while ingest goes on
        (issue 15: built here, it held the aggregator's loop for hundreds of ms)."""
        now = self._clock() if now is None else now
        parts = []
        for name, table in self._tables.items():
            index = table.series.index
            if not index:
                continue
            rows = np.fromiter(index.values(), dtype=np.intp, count=len(index))
            parts.append((name, table.metric.labels, table.kind, list(index),
                          table.series.updated[rows], table.totals.take(rows)))
        intervals = ({k: v[4] for k, v in self._replicas.items()},
                     {k: v[2] for k, v in self._gpu_nodes.items()})
        return lambda: _cumulative(parts, intervals, now)

    def series_count(self) -> int:
        """How many series the store holds (what ``stats()["series_total"]`` says, without
        reading the rings)."""
        return sum(len(t.series.index) for t in self._table_list)

    def stats(self) -> dict:
        """Sizes and counters for the monitor's own metrics and status page.

        ``buckets`` counts the finest buckets of series plus the coarser buckets of rollups
        (the rollups' own finest ring, which serves queries that need no per-series data,
        is in ``approx_bytes`` but not counted here)."""
        series = {name: len(t.series.index) for name, t in self._tables.items()}
        buckets = 0
        for ri in range(len(self._tl.res)):
            _, cols = self._tl.columns(ri, EMPTY + 1, self._tl.cur[ri])
            for t in self._tables.values():
                for ring in [t.series_ring if ri == 0 else t.rings[ri]]:
                    buckets += int(ring.has((slice(None), cols)).sum())
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


def _cumulative(parts: list, intervals: tuple[dict, dict], now: float) -> list[CumulativeSeries]:
    """The series of :meth:`WindowStore.cumulative` from the copies its reader took."""
    out = []
    for name, names, kind, labels, updated, totals in parts:
        if kind == "gauge":  # fresh while its source reports (see cumulative)
            by_node = names[0] == "node"
            seen = intervals[1] if by_node else intervals[0]
            limit = [seen.get(v[0] if by_node else v[:3]) for v in labels]
            keep = [i for i, x in enumerate(limit)
                    if x is None or now - updated[i] <= max(GAUGE_FRESH_S, 3 * x)]
        else:
            keep = range(len(labels))
        for i in keep:
            s = CumulativeSeries(metric=name, kind=kind, labels=dict(zip(names, labels[i])),
                                 updated=float(updated[i]))
            if kind == "histogram":
                s.histogram, s.exemplars = totals.histogram(i)
            else:
                s.value = totals.value(i)
            out.append(s)
    return out
