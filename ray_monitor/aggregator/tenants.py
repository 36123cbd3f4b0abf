"""Stream, token, tenant and cost series of a replica snapshot, with bounded tenant labels.

Runs in the aggregator actor: :class:`~ray_monitor.aggregator.windows.WindowStore` hands
each series delta's :class:`~ray_monitor.common.snapshot.GenAIDelta` to
:func:`feed_series` and each snapshot's usage to :meth:`TenantBook.feed`.

Top tenants. Each deployment keeps a space-saving sketch (Metwally, Agrawal, El Abbadi,
ICDT 2005) of its tenants weighted by requests, with ``4 * top_k`` counters, and a label
set of at most ``top_k`` tenants. A tenant's requests go to its own series while it is
labelled and to ``other`` otherwise, decided when they arrive: so every series only
grows, and the labelled series plus ``other`` add up to the deployment's totals exactly.
The set fills first come, first served; past that, a tenant whose guaranteed count
(count - error) exceeds :data:`PROMOTE` times the weakest labelled tenant's count takes
its place (its history stays in ``other``; the demoted one's later traffic goes there).
The sketch's error is at most N / counters (N the deployment's requests).

Cost: each usage delta's exact tokens times the price of its model
(:mod:`ray_monitor.alerting.prices`), added to ``cost`` (``part="tokens"``) under the same
tenant label, and each request's own cost to ``request_cost`` (from the delta's
(input, output) pairs; requests past the replica's bound at the delta's mean). The model a
deployment's responses named last is kept for the GPU part (:mod:`.gpu_cost`).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

from ray_monitor.alerting.prices import Price, price_for
from ray_monitor.common.histogram import Histogram
from ray_monitor.common.snapshot import GenAIDelta, UsageDelta

__all__ = ["DEFAULT_TOP_K", "OTHER", "PROMOTE", "SpaceSaving", "TenantBook", "feed_series",
           "request_costs"]

DEFAULT_TOP_K = 10
OTHER = "other"
#: A tenant outside the labels replaces the weakest labelled one when its guaranteed count
#: exceeds this many times the weakest's: hysteresis, so two close tenants do not swap.
PROMOTE = 1.5

_HISTOGRAMS = (("time_per_output_token_seconds", "time_per_token"), ("inter_item_seconds", "gaps"),
               ("stream_items", "items"), ("stream_items_per_second", "items_per_s"),
               ("queue_seconds", "queue"), ("first_item_with_queue_seconds", "first_with_queue"))
_TOKENS = (("input_tokens", "input_tokens"), ("output_tokens", "output_tokens"))


def feed_series(tables: Mapping, labels: tuple, g: GenAIDelta, where, now: float,
                cap: int) -> None:
    """Adds one series delta's stream and token figures (request labels ``labels``)."""
    for metric, attr in _HISTOGRAMS:
        h = getattr(g, attr)
        if h is not None and h.count:
            t = tables[metric]
            t.add_hist(t.row_for(labels, cap), where, h, now, None)
    for metric, attr in _TOKENS:
        h = getattr(g, attr)
        if h is not None and h.count:
            t = tables[metric]
            t.add_counter(t.row_for(labels, cap), where, h.sum, now)


class SpaceSaving:
    """The space-saving sketch: ``capacity`` counters of (item, count, error)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.counts: dict[str, float] = {}
        self.errors: dict[str, float] = {}

    def add(self, item: str, weight: float = 1.0) -> None:
        counts = self.counts
        if item in counts:
            counts[item] += weight
        elif len(counts) < self.capacity:
            counts[item] = weight
            self.errors[item] = 0.0
        else:
            victim = min(counts, key=counts.__getitem__)
            floor = counts.pop(victim)
            self.errors.pop(victim, None)
            counts[item] = floor + weight
            self.errors[item] = floor

    def upper(self, item: str) -> float:
        """At least the item's true count."""
        c = self.counts.get(item)
        if c is not None:
            return c
        return min(self.counts.values()) if len(self.counts) >= self.capacity else 0.0

    def lower(self, item: str) -> float:
        """At most the item's true count."""
        return self.counts.get(item, 0.0) - self.errors.get(item, 0.0)


class TenantBook:
    """The labelled tenants of each deployment, and the prices cost is counted at."""

    def __init__(self, top_k: int = DEFAULT_TOP_K,
                 prices: Optional[Mapping[str, Price]] = None) -> None:
        self.top_k = top_k
        self.prices: Mapping[str, Price] = dict(prices or {})
        # (application, deployment) -> (sketch, labelled tenants)
        self._books: dict[tuple[str, str], tuple[SpaceSaving, set[str]]] = {}
        #: (application, deployment) -> the model its responses named last (GPU cost).
        self.models: dict[tuple[str, str], str] = {}
        #: Whether GPU time of an application is counted here (a shard: its own
        #: applications; the others' replicas still take their share of a GPU). None: all.
        self.gpu_owner: Optional[Callable[[str], bool]] = None

    def label(self, app: str, dep: str, tenant: str, weight: float) -> str:
        """The label ``tenant``'s requests arriving now are counted under."""
        if tenant == "" or tenant == OTHER:  # no tenant named, or a replica's overflow
            return tenant
        book = self._books.get((app, dep))
        if book is None:
            book = self._books[(app, dep)] = (SpaceSaving(max(4 * self.top_k, 16)), set())
        sketch, labelled = book
        sketch.add(tenant, weight)
        if tenant in labelled:
            return tenant
        if len(labelled) < self.top_k:
            labelled.add(tenant)
            return tenant
        if not labelled:
            return OTHER
        weakest = min(labelled, key=sketch.upper)
        if sketch.lower(tenant) > PROMOTE * sketch.upper(weakest):
            labelled.discard(weakest)
            labelled.add(tenant)
            return tenant
        return OTHER

    def top(self, app: str, dep: str) -> list[tuple[str, float]]:
        """The labelled tenants of a deployment and their estimated requests, heaviest first."""
        book = self._books.get((app, dep))
        if book is None:
            return []
        sketch, labelled = book
        return sorted(((t, sketch.upper(t)) for t in labelled), key=lambda x: -x[1])

    def feed(self, tables: Mapping, app: str, dep: str, usage: list[UsageDelta], where,
             now: float, cap: int) -> None:
        """Adds a snapshot's usage deltas to the tenant series and ``cost``."""
        for u in usage:
            labels = (app, dep, u.model, self.label(app, dep, u.tenant, float(u.requests)))
            for metric, value in (("tenant_requests", u.requests), ("tenant_errors", u.errors),
                                  ("tenant_input_tokens", u.input_tokens),
                                  ("tenant_output_tokens", u.output_tokens)):
                if value or metric == "tenant_requests":
                    t = tables[metric]
                    t.add_counter(t.row_for(labels, cap), where, float(value), now)
            if u.latency.count:
                t = tables["tenant_latency_seconds"]
                t.add_hist(t.row_for(labels, cap), where, u.latency, now, None)
            if u.model:
                self.models[(app, dep)] = u.model
            price = price_for(self.prices, u.model)
            if price is None:
                continue
            if u.input_tokens or u.output_tokens:
                t = tables["cost"]
                t.add_counter(t.row_for(labels + ("tokens",), cap), where,
                              price.cost(u.input_tokens, u.output_tokens), now)
            h = request_costs(u, price)
            if h.count:
                t = tables["request_cost"]
                t.add_hist(t.row_for(labels, cap), where, h, now, None)


def request_costs(u: UsageDelta, price: Price) -> Histogram:
    """The cost of each token-counted request of ``u``: one observation per request."""
    h = Histogram()
    n_in = n_out = 0
    for (i, o), n in u.pairs.items():
        v = price.cost(i, o)
        n_in += i * n
        n_out += o * n
        for _ in range(n):
            h.record(v)
    if u.rest > 0:  # past the replica's bound: the rest's mean, so count and sum stay exact
        mean = price.cost(u.input_tokens - n_in, u.output_tokens - n_out) / u.rest
        for _ in range(u.rest):
            h.record(mean)
    return h
