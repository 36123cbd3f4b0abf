"""Per (model, tenant) usage of one deployment in a replica: who asked, and what it cost.

Runs in every replica: the request path resolves a request's tenant at its start
(:func:`tenant_of`) and records the finished request (:meth:`UsageTable.record`, one lock
and a few additions); the flush thread drains the table into the snapshot.

Bounded cardinality: the table holds at most ``max_entries`` (model, tenant) entries per
snapshot; a tenant first seen once it is full is counted under ``other`` for that
snapshot, so a million API keys cost the same as a few hundred. The heavy tenants are
seen early in every second (that is what heavy means), and the aggregator chooses the
top K across replicas (``aggregator.tenants``). Totals stay exact: every request lands in
exactly one entry.

Per-request cost: each entry also counts its token-counted requests by their (input,
output) tokens, at most ``max_pairs`` distinct pairs per snapshot over all entries; the
requests past that are counted in ``rest`` (the aggregator prices them at their entry's
mean, so the count and the sum of ``request_cost`` stay exact).
"""

from __future__ import annotations

import threading
from typing import Any, Optional

from ray_monitor.common.snapshot import UsageDelta

__all__ = ["MAX_ENTRIES", "MAX_PAIRS", "MAX_TENANT_CHARS", "OTHER", "UsageTable", "tenant_of"]

#: (model, tenant) entries per replica snapshot; the rest go to ``other``.
MAX_ENTRIES = 256
#: Tenant names are cut to this many characters (a label value, not a payload).
MAX_TENANT_CHARS = 64
OTHER = "other"
#: Distinct (input, output) token pairs per replica snapshot, over all entries.
MAX_PAIRS = 1024


def _header(scope: Any, name: str) -> Optional[str]:
    if not isinstance(scope, dict):
        return None
    key = name.encode("latin-1")
    for k, v in scope.get("headers") or ():
        if k.lower() == key:
            return v.decode("latin-1")
    return None


def tenant_of(options: Any, scope: Any, args: tuple, kwargs: Optional[dict]) -> Optional[str]:
    """The request's tenant: ``tenant(*args, **kwargs)`` (the call's arguments without
    ``self``), else the ``tenant_header`` of an HTTP request; None when the deployment names
    no tenant. An empty answer is ``""``. Raises what the user's function raised."""
    t = None
    if options.tenant is not None:
        t = options.tenant(*args, **(kwargs or {}))
    elif options.tenant_header is not None:
        t = _header(scope, options.tenant_header) or ""
    else:
        return None
    if t is None:
        return ""
    if not isinstance(t, str):
        t = str(t)
    return t[:MAX_TENANT_CHARS]


class UsageTable:
    """The (model, tenant) entries of the current snapshot."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_pairs: int = MAX_PAIRS) -> None:
        self.max_entries = max_entries
        self.max_pairs = max_pairs
        self._pairs = 0  # distinct pairs in this snapshot's entries
        self._entries: dict[tuple[str, str], UsageDelta] = {}
        self._lock = threading.Lock()
        self.overflowed = 0  # requests counted under other because the table was full

    def record(self, model: str, tenant: str, error: bool, latency: float,
               input_tokens: int, output_tokens: int, counted: bool = True) -> None:
        """One finished request; ``counted``: its token usage is known."""
        key = (model, tenant)
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                if len(self._entries) >= self.max_entries:
                    self.overflowed += 1
                    key = (model, OTHER)
                    e = self._entries.get(key)
                if e is None:
                    e = self._entries[key] = UsageDelta(key[0], key[1])
            e.requests += 1
            if error:
                e.errors += 1
            e.input_tokens += input_tokens
            e.output_tokens += output_tokens
            e.latency.record(latency)
            if counted:
                pair, pairs = (input_tokens, output_tokens), e.pairs
                n = pairs.get(pair)
                if n is not None:
                    pairs[pair] = n + 1
                elif self._pairs < self.max_pairs:
                    pairs[pair] = 1
                    self._pairs += 1
                else:
                    e.rest += 1

    def drain(self) -> list[UsageDelta]:
        with self._lock:
            out, self._entries, self._pairs = list(self._entries.values()), {}, 0
        return out
