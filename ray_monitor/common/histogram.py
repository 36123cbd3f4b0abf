"""A mergeable latency histogram with a bounded relative error.

Imported everywhere: replicas record into it, the aggregator merges and queries it.

Buckets are OpenTelemetry's exponential buckets at scale 6: bucket ``i`` holds the
values in ``(base**i, base**(i+1)]`` with ``base = 2 ** (2 ** -6)``. Reporting the
value ``2 * base**(i+1) / (base + 1)`` for a bucket is off by at most
``(base - 1) / (base + 1)``, about 0.54%, relative to any value in it (the DDSketch
argument), so every quantile is within 1% of the exact sample quantile. Histograms
with the same scale merge by adding counts, which is what lets the aggregator merge
replicas and time windows, and they map one to one onto OTLP exponential histograms.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

__all__ = ["BASE", "DEFAULT_CLASSIC_BOUNDS", "Histogram", "RELATIVE_ERROR", "SCALE",
           "bucket_index", "bucket_value", "quantile_rank"]

SCALE = 6
BASE = 2.0 ** (2.0 ** -SCALE)
_SCALE_FACTOR = (2.0 ** SCALE) / math.log(2.0)
_LOG_BASE = math.log(BASE)
#: Worst relative error of :meth:`Histogram.quantile` against the exact sample quantile.
RELATIVE_ERROR = (BASE - 1.0) / (BASE + 1.0)

#: Prometheus' default classic buckets, in seconds; classic counts are derived from
#: the exponential buckets at scrape time (each bucket counted under the first ``le``
#: at or above its representative value, so a boundary is honoured to within 0.54%).
DEFAULT_CLASSIC_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def bucket_index(value: float) -> int:
    """The OTLP exponential-bucket index of a positive value at :data:`SCALE`."""
    return math.ceil(math.log(value) * _SCALE_FACTOR) - 1


def bucket_value(index: int) -> float:
    """The value reported for a bucket: the point of least relative error in it."""
    return 2.0 * math.exp((index + 1) * _LOG_BASE) / (BASE + 1.0)


def quantile_rank(q: float, count: int) -> int:
    """The 0-based rank of the ``q`` quantile among ``count`` observations:
    ``ceil(q * count) - 1``, at least 0, with ``q * count`` computed in floating point as
    Prometheus computes its rank (the window store's vectorised form does the same)."""
    return max(math.ceil(q * count) - 1, 0)


def bucket_upper(index: int) -> float:
    return math.exp((index + 1) * _LOG_BASE)


class Histogram:
    """Counts per exponential bucket, plus count, sum, min and max.

    Not thread-safe by itself: the recorder holds its lock for the one ``record``.
    Values ``<= 0`` go to the zero bucket (a latency can be 0.0 on a coarse clock).
    """

    __slots__ = ("buckets", "zero_count", "count", "sum", "min", "max")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.zero_count = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def record(self, value: float) -> None:
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        if value > 0.0:
            i = math.ceil(math.log(value) * _SCALE_FACTOR) - 1
            b = self.buckets
            b[i] = b.get(i, 0) + 1
        else:
            self.zero_count += 1

    def merge(self, other: "Histogram") -> "Histogram":
        """Adds ``other`` into this histogram and returns it."""
        if not other.count:
            return self
        b = self.buckets
        for i, c in other.buckets.items():
            b[i] = b.get(i, 0) + c
        self.zero_count += other.zero_count
        self.count += other.count
        self.sum += other.sum
        if other.min < self.min:
            self.min = other.min
        if other.max > self.max:
            self.max = other.max
        return self

    def copy(self) -> "Histogram":
        h = Histogram()
        h.buckets = dict(self.buckets)
        h.zero_count, h.count, h.sum, h.min, h.max = (
            self.zero_count, self.count, self.sum, self.min, self.max)
        return h

    @classmethod
    def merged(cls, histograms: Iterable["Histogram"]) -> "Histogram":
        out = cls()
        for h in histograms:
            out.merge(h)
        return out

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the recorded values, NaN when empty.

        The value is the ``ceil(q * count)``-th smallest (1-based; the smallest for
        ``q == 0``): the smallest value with at least a share ``q`` of the observations at
        or below it, i.e. ``numpy.quantile(values, q, method="inverted_cdf")``. That is the
        rank Prometheus' ``histogram_quantile`` uses (``q * count``), so "p99 > T" is the
        same decision on both sides when ``T`` is a classic bucket bound. The result is
        within :data:`RELATIVE_ERROR` of the exact value, and clamped to the observed min
        and max.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be between 0 and 1, got {q!r}")
        if self.count == 0:
            return math.nan
        rank = quantile_rank(q, self.count)
        if rank == self.count - 1:
            return self.max  # the extremes are known exactly
        if rank == 0:
            return self.min
        if rank < self.zero_count:
            return max(self.min, 0.0) if self.min <= 0.0 else 0.0
        seen = self.zero_count
        for i in sorted(self.buckets):
            seen += self.buckets[i]
            if seen > rank:
                return min(max(bucket_value(i), self.min), self.max)
        return self.max  # pragma: no cover - counts always add up

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan

    def classic(self, bounds: Iterable[float] = DEFAULT_CLASSIC_BOUNDS) -> list[tuple[float, int]]:
        """Cumulative ``(le, count)`` pairs for Prometheus classic buckets, ending at +Inf."""
        bounds = sorted(bounds)
        out = [0] * (len(bounds) + 1)
        for i, c in self.buckets.items():
            v = bucket_value(i)
            for j, le in enumerate(bounds):
                if v <= le:
                    out[j] += c
                    break
            else:
                out[-1] += c
        if self.zero_count:
            out[0] += self.zero_count
        cum, result = 0, []
        for le, c in zip(list(bounds) + [math.inf], out):
            cum += c
            result.append((le, cum))
        return result

    def dense(self) -> tuple[int, list[int]]:
        """``(offset, counts)`` as an OTLP exponential histogram's positive buckets."""
        if not self.buckets:
            return 0, []
        lo, hi = min(self.buckets), max(self.buckets)
        counts = [0] * (hi - lo + 1)
        for i, c in self.buckets.items():
            counts[i - lo] = c
        return lo, counts

    def items(self) -> Iterator[tuple[int, int]]:
        return iter(self.buckets.items())

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Histogram) and self.buckets == other.buckets
                and self.zero_count == other.zero_count and self.count == other.count
                and math.isclose(self.sum, other.sum, rel_tol=1e-9, abs_tol=1e-12))

    def __repr__(self) -> str:
        return f"Histogram(count={self.count}, sum={self.sum:.6g}, buckets={len(self.buckets)})"

    # Plain-data form for pickling across Ray and for JSON in the GCS store.
    def to_dict(self) -> dict:
        return {"b": self.buckets, "z": self.zero_count, "n": self.count, "s": self.sum,
                "lo": self.min if self.count else None, "hi": self.max if self.count else None}

    @classmethod
    def from_dict(cls, d: dict) -> "Histogram":
        h = cls()
        h.buckets = {int(k): int(v) for k, v in d["b"].items()}
        h.zero_count, h.count, h.sum = int(d["z"]), int(d["n"]), float(d["s"])
        if h.count:
            h.min, h.max = float(d["lo"]), float(d["hi"])
        return h
