"""Which aggregator shard owns an application, and how every process learns the count.

Imported by every process: replicas and node mergers route snapshots with
:func:`shard_of`, the aggregator's shards know themselves by :func:`shard_name`, and the
driver writes the count (:func:`save_count`) that replicas and mergers read back
(:func:`load_count`) from Ray's GCS key-value store. It decides one thing: an
application belongs to exactly one shard, the same in every process and every run, so
all of a deployment's series, ledger, rules, SLOs, quality, hints and tenants live on
one aggregator (a stable crc32, not Python's salted ``hash``).
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Iterable, Optional, TypeVar

from ray_monitor.common.names import AGGREGATOR_NAME, KV_NAMESPACE

__all__ = ["MAX_SHARDS", "SHARDS_KEY", "load_count", "save_count", "shard_name", "shard_of",
           "split_by_shard"]

#: At most this many aggregator shards (a bound, not a target: see the README).
MAX_SHARDS = 64
#: The shard count of the running monitor (absent: one aggregator).
SHARDS_KEY = b"ray_monitor/aggregator/shards"

T = TypeVar("T")


def shard_of(application: Optional[str], shards: int) -> int:
    """The shard that owns ``application`` among ``shards`` (0 when there is one)."""
    if shards <= 1:
        return 0
    return zlib.crc32((application or "").encode("utf-8", "surrogatepass")) % shards


def shard_name(index: int) -> str:
    """Shard 0 keeps the aggregator's own name (one aggregator is shard 0 of 1)."""
    return AGGREGATOR_NAME if index == 0 else f"{AGGREGATOR_NAME}_{index}"


def split_by_shard(items: Iterable[T], application: Callable[[T], Optional[str]],
                   shards: int) -> dict[int, list[T]]:
    """``items`` grouped by their application's shard, each group in the items' order."""
    out: dict[int, list[T]] = {}
    for item in items:
        out.setdefault(shard_of(application(item), shards), []).append(item)
    return out


def save_count(shards: int) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(SHARDS_KEY, str(int(shards)).encode(), overwrite=True,
                                 namespace=KV_NAMESPACE)


def load_count(default: int = 1) -> int:
    """The running monitor's shard count (a GCS call: never on an event loop); ``default``
    when none was saved or it cannot be read."""
    try:
        from ray.experimental import internal_kv

        raw: Any = internal_kv._internal_kv_get(SHARDS_KEY, namespace=KV_NAMESPACE)
        n = int(raw) if raw else default
    except Exception:
        return default
    return n if 1 <= n <= MAX_SHARDS else default
