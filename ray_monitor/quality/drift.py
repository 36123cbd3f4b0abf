"""Runs in the aggregator: drift of a model's inputs and outputs against a reference
(PSI, Jensen-Shannon and KS), which decides the values of the ``psi``, ``js`` and ``ks``
rule functions.

A :class:`Reference` describes one feature (or the prediction itself) as it was: numbers
are cut at the reference's own quantiles, categories counted one by one. Current
observations are counted into the same bins as :class:`FeatureCounts`, which merge by
adding, so the aggregator keeps them in time buckets and merges a rule's window; the
statistics then compare the two count vectors.

Bins. Numbers: ``ks_bins`` (default 100) fine bins cut at the reference's ``j / ks_bins``
quantiles (observed values; ties collapse, so a feature with few values gets few bins).
PSI and Jensen-Shannon read them grouped into the ``bins`` (default 10) coarse bins at
the ``k / bins`` quantiles (deciles: the usual PSI practice), which are unions of fine
bins because every coarse cut is also a fine cut. A value equal
to a cut goes to the bin above it; values beyond the reference's range fall into the end
bins. Categories: the ``max_categories`` most frequent reference categories, plus one
bucket for every other category (unseen ones included).

Metric names, as rules use them: ``feature_<name>`` for an input feature and
``prediction`` for the output (its class label, or its regression value).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from ray_monitor.common.catalog import FEATURE_PREFIX, PREDICTION
from ray_monitor.quality.prediction import MAX_FEATURES, Prediction

__all__ = ["MAX_REFERENCE_VALUES", "Reference", "FeatureCounts", "DriftMonitor", "psi", "jensen_shannon",
           "ks_statistic", "ks_from_counts", "ks_bound", "PSI_EPSILON", "PREDICTION",
           "FEATURE_PREFIX"]

#: Floor of each bin's share in PSI, so an empty bin gives a large but finite term
#: instead of infinity (the common practice, as in Evidently and NannyML).
PSI_EPSILON = 1e-4
UNSEEN = "<unseen>"
DRIFT_FUNCTIONS = ("psi", "js", "ks")


def _shares(counts: Any, what: str) -> np.ndarray:
    a = np.asarray(counts, dtype=float)
    if a.ndim != 1 or not len(a) or (a < 0).any():
        raise ValueError(f"{what} must be a non-empty 1-D sequence of counts >= 0")
    total = a.sum()
    if total <= 0:
        raise ValueError(f"{what} must hold at least one observation")
    return a / total


def _pair(ref_counts: Any, cur_counts: Any) -> tuple[np.ndarray, np.ndarray]:
    p, q = _shares(ref_counts, "ref_counts"), _shares(cur_counts, "cur_counts")
    if p.shape != q.shape:
        raise ValueError(f"ref_counts and cur_counts must have the same bins, got {len(p)} "
                         f"and {len(q)}")
    return p, q


def psi(ref_counts: Any, cur_counts: Any, *, epsilon: float = PSI_EPSILON) -> float:
    """Population stability index ``sum((q - p) * ln(q / p))`` over bin shares, with each
    share floored at ``epsilon``. Rule of thumb: < 0.1 stable, 0.1-0.25 moderate, > 0.25 large."""
    p, q = _pair(ref_counts, cur_counts)
    p, q = np.maximum(p, epsilon), np.maximum(q, epsilon)
    return float(((q - p) * np.log(q / p)).sum())


def jensen_shannon(ref_counts: Any, cur_counts: Any) -> float:
    """Jensen-Shannon *distance* (the square root of the divergence), base 2, in [0, 1];
    the same as ``scipy.spatial.distance.jensenshannon(ref, cur, base=2)``."""
    p, q = _pair(ref_counts, cur_counts)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return math.sqrt(min(1.0, max(0.0, (kl(p) + kl(q)) / 2)))


def ks_statistic(ref_sample: Any, cur_sample: Any) -> float:
    """Exact two-sample Kolmogorov-Smirnov D, ``max |F_ref(x) - F_cur(x)|`` (as
    ``scipy.stats.ks_2samp(...).statistic``)."""
    a, b = np.sort(np.asarray(ref_sample, dtype=float)), np.sort(np.asarray(cur_sample, dtype=float))
    if not len(a) or not len(b):
        raise ValueError("ks_statistic needs at least one value in each sample")
    x = np.concatenate((a, b))
    fa = np.searchsorted(a, x, side="right") / len(a)
    fb = np.searchsorted(b, x, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def ks_from_counts(ref_counts: Any, cur_counts: Any) -> float:
    """KS D from counts over the same ordered bins: the largest gap of the two
    cumulative shares at the bin edges. It never exceeds the exact D of the samples,
    and the exact D is at most this plus :func:`ks_bound`."""
    p, q = _pair(ref_counts, cur_counts)
    return float(np.abs(np.cumsum(p) - np.cumsum(q))[:-1].max(initial=0.0))


def ks_bound(ref_counts: Any, cur_counts: Any) -> float:
    """How far the exact KS D may lie above :func:`ks_from_counts`: the largest share
    either sample has in one bin (inside a bin the two CDFs can move apart by that much)."""
    p, q = _pair(ref_counts, cur_counts)
    return float(np.maximum(p, q).max())


def _check_bins(bins: Any, ks_bins: Any, max_categories: Any) -> None:
    if not (isinstance(bins, int) and bins >= 2 and isinstance(ks_bins, int)
            and ks_bins >= bins and ks_bins % bins == 0):
        raise ValueError(f"bins must be an int >= 2 and ks_bins a multiple of it, got "
                         f"bins={bins!r}, ks_bins={ks_bins!r}")
    if not (isinstance(max_categories, int) and max_categories >= 1):
        raise ValueError(f"max_categories must be an int >= 1, got {max_categories!r}")


def _cuts(x: np.ndarray, bins: int) -> np.ndarray:
    """Cut points of sorted ``x`` at the ``j / bins`` quantiles: the observed value with
    ``floor(q * n)`` values before it, so with distinct values a bin holds exactly its
    share. Ties collapse; a cut at the minimum is left out (nothing lies below it), unless
    the reference is one constant: then values below and above it get bins of their own.
    ``k / bins`` and ``(k * m) / (bins * m)`` are the same double, so coarse cuts are fine cuts."""
    q = np.arange(1, bins) / bins
    cuts = np.unique(x[np.floor(q * len(x)).astype(np.int64)])
    cuts = cuts[cuts > x[0]]
    return cuts if len(cuts) or x[0] != x[-1] else np.array([x[0], np.nextafter(x[0], np.inf)])


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


@dataclass(frozen=True)
class Reference:
    """One feature's reference distribution: its bins and the reference counts in them.

    ``kind`` is ``"numeric"`` (``edges``: the fine cuts, ascending; ``coarse``: the
    coarse bin of each fine bin) or ``"categorical"`` (``categories``, then one bucket
    for every other category). ``key`` identifies the bins, so counts made against an
    older reference are never compared with a newer one.
    """

    kind: str
    counts: tuple[int, ...]
    edges: tuple[float, ...] = ()
    coarse: tuple[int, ...] = ()
    categories: tuple[str, ...] = ()
    key: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind == "numeric":
            ok = (len(self.counts) == len(self.edges) + 1 == len(self.coarse)
                  and all(a < b for a, b in zip(self.edges, self.edges[1:]))
                  and all(0 <= a <= b <= a + 1 for a, b in zip(self.coarse, self.coarse[1:]))
                  and (not self.coarse or self.coarse[0] == 0))
        elif self.kind == "categorical":
            ok = (len(self.counts) == len(self.categories) + 1
                  and len(set(self.categories)) == len(self.categories))
        else:
            ok = False
        if not ok or any(c < 0 for c in self.counts) or sum(self.counts) <= 0:
            raise ValueError("a reference needs kind 'numeric' (counts = one per bin, "
                             "len(edges) + 1 of them; ascending edges; coarse bin per fine bin) "
                             "or 'categorical' (counts = one per category, then one for the "
                             "others), with at least one observation; build it with "
                             "Reference.from_values(values)")
        digest = hashlib.sha1(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()
        object.__setattr__(self, "key", digest[:12])

    @classmethod
    def from_values(cls, values: Iterable[Any], *, bins: int = 10, ks_bins: int = 100,
                    max_categories: int = 50) -> "Reference":
        """A reference from observed values: all numbers, or all strings (categories)."""
        _check_bins(bins, ks_bins, max_categories)
        values = list(values)
        if not values:
            raise ValueError("a reference needs at least one value")
        if all(isinstance(v, str) for v in values):
            seen: dict[str, int] = {}
            for v in values:
                seen[v] = seen.get(v, 0) + 1
            top = sorted(seen, key=lambda c: (-seen[c], c))[:max_categories]
            counts = [seen[c] for c in top]
            return cls("categorical", tuple(counts + [len(values) - sum(counts)]),
                       categories=tuple(top))
        if not all(_is_number(v) for v in values):
            raise ValueError("reference values must be all numbers or all strings "
                             "(categories), not a mix")
        x = np.asarray(values, dtype=float)
        if not np.isfinite(x).all():
            raise ValueError("reference values must be finite numbers")
        x.sort()
        fine, cuts = _cuts(x, ks_bins), _cuts(x, bins)
        lower = np.concatenate(([-np.inf], fine))
        coarse = np.searchsorted(cuts, lower, side="right")
        counts = np.bincount(np.searchsorted(fine, x, side="right"), minlength=len(fine) + 1)
        return cls("numeric", tuple(int(c) for c in counts), edges=tuple(float(e) for e in fine),
                   coarse=tuple(int(c) for c in coarse))

    @classmethod
    def from_json(cls, obj: Any, **options: Any) -> "Reference":
        """From :meth:`to_json`'s form, or from a plain list of values (``from_values``)."""
        if isinstance(obj, list):
            return cls.from_values(obj, **options)
        if not isinstance(obj, Mapping) or obj.get("kind") not in ("numeric", "categorical"):
            raise ValueError("a reference is a list of values, or an object with 'kind' "
                             "('numeric' or 'categorical') and 'counts' as to_json() writes it")
        try:
            return cls(obj["kind"], tuple(int(c) for c in obj["counts"]),
                       edges=tuple(float(e) for e in obj.get("edges", ())),
                       coarse=tuple(int(c) for c in obj.get("coarse", ())),
                       categories=tuple(str(c) for c in obj.get("categories", ())))
        except (KeyError, TypeError) as e:
            raise ValueError(f"reference object is malformed ({e}); write it with to_json()") from None

    def to_json(self) -> dict:
        if self.kind == "numeric":
            return {"kind": "numeric", "counts": list(self.counts), "edges": list(self.edges),
                    "coarse": list(self.coarse)}
        return {"kind": "categorical", "counts": list(self.counts),
                "categories": list(self.categories)}

    @property
    def size(self) -> int:
        return len(self.counts)

    def bin(self, v: Any) -> Optional[int]:
        """The bin of one observation; ``None`` when it is not of the reference's kind."""
        if self.kind == "numeric":
            if not _is_number(v) or not math.isfinite(v):
                return None
            return int(np.searchsorted(self.edges, float(v), side="right"))
        if not isinstance(v, str):
            return None
        try:
            return self.categories.index(v)
        except ValueError:
            return len(self.categories)

    def count(self, values: list) -> tuple[np.ndarray, int]:
        """Counts per bin of many observations, and how many were not of this kind."""
        if self.kind == "numeric":
            x = np.array([v for v in values if _is_number(v)], dtype=float)
            x = x[np.isfinite(x)]
            idx = np.searchsorted(np.asarray(self.edges), x, side="right")
        else:
            pos = {c: i for i, c in enumerate(self.categories)}
            other = len(self.categories)
            idx = np.array([pos.get(v, other) for v in values if isinstance(v, str)], dtype=np.int64)
        return np.bincount(idx, minlength=self.size).astype(np.int64), len(values) - len(idx)

    def _coarse(self, counts: np.ndarray) -> np.ndarray:
        if self.kind != "numeric":
            return counts
        return np.bincount(self.coarse, weights=counts, minlength=self.coarse[-1] + 1)

    def compare(self, function: str, counts: np.ndarray) -> Optional[float]:
        """``psi``, ``js`` or ``ks`` of current ``counts`` (in this reference's bins)
        against the reference; ``None`` for ``ks`` of categories."""
        ref = np.asarray(self.counts, dtype=float)
        if function == "psi":
            return psi(self._coarse(ref), self._coarse(counts))
        if function == "js":
            return jensen_shannon(self._coarse(ref), self._coarse(counts))
        if function == "ks":
            return ks_from_counts(ref, counts) if self.kind == "numeric" else None
        raise ValueError(f"unknown drift function {function!r}; one of {DRIFT_FUNCTIONS}")


class FeatureCounts:
    """Counts per bin of each metric's current reference; merge by adding.

    Keyed by ``(metric, reference key)``: counts made against an older reference stay
    apart and are simply not read once the reference changes.
    """

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], np.ndarray] = {}

    def add(self, metric: str, ref: Reference, counts: np.ndarray) -> None:
        """Adds per-bin ``counts`` (from :meth:`Reference.count`) of ``metric``."""
        key = (metric, ref.key)
        mine = self.counts.get(key)
        self.counts[key] = counts.copy() if mine is None else mine + counts

    def merge(self, other: "FeatureCounts") -> "FeatureCounts":
        """Adds ``other`` into this one and returns it."""
        for key, a in other.counts.items():
            mine = self.counts.get(key)
            self.counts[key] = a.copy() if mine is None else mine + a
        return self

    def get(self, metric: str, ref: Reference) -> Optional[np.ndarray]:
        return self.counts.get((metric, ref.key))

    def __bool__(self) -> bool:
        return bool(self.counts)


#: Values a reference is built from, per metric: a sample this large already pins every
#: bin edge; more would only hold up the aggregator.
MAX_REFERENCE_VALUES = 200_000


class DriftMonitor:
    """Drift of one model (one deployment and version): references and current counts.

    A metric without a reference set by the user takes the first ``reference_size``
    observations it gets as its reference; until then it has no drift values and its
    observations are not counted. :meth:`observe` returns the counts of a batch for the
    caller's time buckets; :meth:`value` compares a window's merged counts with the
    references. Values are absent (``None``) for windows with fewer than
    ``min_observations`` observations, where PSI is noise that would page people.
    Not thread-safe.
    """

    def __init__(self, *, reference_size: int = 1000, bins: int = 10, ks_bins: int = 100,
                 max_categories: int = 50, min_observations: int = 30,
                 max_metrics: int = MAX_FEATURES + 1) -> None:
        for name, v, lo in (("reference_size", reference_size, 1), ("min_observations",
                            min_observations, 1), ("max_metrics", max_metrics, 1)):
            if not (isinstance(v, int) and v >= lo):
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        self._options = {"bins": bins, "ks_bins": ks_bins, "max_categories": max_categories}
        _check_bins(bins, ks_bins, max_categories)
        self._size, self._min, self._max = reference_size, min_observations, max_metrics
        self._refs: dict[str, Reference] = {}
        self._building: dict[str, list] = {}
        self._counts = {"observations": 0, "mismatched": 0, "metrics_over_cap": 0}

    def references(self) -> dict[str, Reference]:
        return dict(self._refs)

    def export(self) -> dict[str, dict]:
        """The references as JSON (for persistence, or to upload to another monitor)."""
        return {m: r.to_json() for m, r in self._refs.items()}

    def set_reference(self, metric: str, reference: Any) -> Reference:
        """Sets a metric's reference: a :class:`Reference`, a list of values, or
        :meth:`Reference.to_json`'s form (an uploaded JSON document)."""
        ref = self._checked(metric, reference)
        self._refs[metric] = ref
        self._building.pop(metric, None)
        return ref

    def build_references(self, obj: Mapping[str, Any]) -> dict[str, Reference]:
        """``{metric: reference}`` built and checked, all or nothing, changing nothing
        here (so it may run on another thread); a bad one raises naming
        ``references.<metric>``. At most MAX_REFERENCE_VALUES values per metric."""
        if not isinstance(obj, Mapping):
            raise TypeError("references must be an object of metric -> reference, e.g. "
                            '{"feature_age": [31, 45, 27], "prediction": ["spam", "ham"]}')
        if len(obj) > self._max:
            raise ValueError(f"references: {len(obj)} metrics; a model has at most {self._max} "
                             "(its features and its prediction)")
        return {metric: self._checked(metric, ref) for metric, ref in obj.items()}

    def set_references(self, obj: Mapping[str, Any]) -> None:
        """Sets several references at once: ``{metric: reference}`` as :meth:`set_reference`,
        all or nothing."""
        for metric, ref in self.build_references(obj).items():
            self.set_reference(metric, ref)

    def _checked(self, metric: Any, reference: Any) -> Reference:
        if not isinstance(metric, str) or (metric != PREDICTION and not (
                metric.startswith(FEATURE_PREFIX) and len(metric) > len(FEATURE_PREFIX))):
            raise ValueError(f"drift metric {str(metric)[:80]!r} must be {PREDICTION!r} or "
                             f"{FEATURE_PREFIX}<feature name>")
        if isinstance(reference, Reference):
            return reference
        if isinstance(reference, (list, tuple)) and len(reference) > MAX_REFERENCE_VALUES:
            raise ValueError(f"references.{metric}: {len(reference)} values; a reference is "
                             f"built from at most {MAX_REFERENCE_VALUES} (sample them)")
        try:
            return Reference.from_json(reference, **self._options)
        except (TypeError, ValueError) as e:
            raise type(e)(f"references.{metric}: {e}") from None

    def observe(self, preds: Iterable[Prediction]) -> FeatureCounts:
        """Counts a batch of predictions (features and output) against the references;
        observations of metrics still building their reference go into it instead."""
        by_metric: dict[str, list] = {}
        n = 0
        for p in preds:
            n += 1
            out_value = p.label if p.label is not None else p.value
            if out_value is not None:
                by_metric.setdefault(PREDICTION, []).append(out_value)
            if p.features:
                for name, v in p.features.items():
                    by_metric.setdefault(FEATURE_PREFIX + name, []).append(v)
        self._counts["observations"] += n
        out = FeatureCounts()
        for metric, values in by_metric.items():
            ref = self._refs.get(metric)
            if ref is None:
                values = self._build(metric, values)
                ref = self._refs.get(metric)
                if ref is None or not values:
                    continue
            counts, mismatched = ref.count(values)
            self._counts["mismatched"] += mismatched
            out.add(metric, ref, counts)
        return out

    def _build(self, metric: str, values: list) -> list:
        """Feeds a metric's reference sample; returns the values left once it is complete."""
        sample = self._building.get(metric)
        if sample is None:
            if len(self._refs) + len(self._building) >= self._max:
                self._counts["metrics_over_cap"] += len(values)
                return []
            sample = self._building[metric] = []
        for i, v in enumerate(values):
            if sample and isinstance(sample[0], str) != isinstance(v, str):
                self._counts["mismatched"] += 1
                continue
            sample.append(v)
            if len(sample) >= self._size:
                self._refs[metric] = Reference.from_values(sample, **self._options)
                del self._building[metric]
                return values[i + 1:]
        return []

    def value(self, function: str, metric: str, counts: FeatureCounts) -> Optional[float]:
        """``psi``, ``js`` or ``ks`` of ``metric`` over a window's merged ``counts``."""
        if function not in DRIFT_FUNCTIONS:
            raise ValueError(f"unknown drift function {function!r}; one of {DRIFT_FUNCTIONS}")
        ref = self._refs.get(metric)
        cur = counts.get(metric, ref) if ref is not None else None
        if cur is None or cur.sum() < self._min:
            return None
        return ref.compare(function, cur)

    def statistics(self, counts: FeatureCounts) -> dict[str, dict[str, Optional[float]]]:
        """Every metric's ``psi``, ``js``, ``ks`` and observation count ``n`` (for the API)."""
        out = {}
        for metric, ref in self._refs.items():
            cur = counts.get(metric, ref)
            n = int(cur.sum()) if cur is not None else 0
            out[metric] = {"n": n, **{f: self.value(f, metric, counts) for f in DRIFT_FUNCTIONS}}
        return out

    def stats(self) -> dict[str, int]:
        """Counters: predictions observed, values not of their reference's kind, metrics
        refused past ``max_metrics``; and how many references are ready or building."""
        return {**self._counts, "references": len(self._refs), "building": len(self._building)}
