"""Two model versions of a deployment side by side, and whether each difference is real.

Runs in the aggregator (``Monitor.compare``, ``GET /api/v1/compare``); the CLI reads
:data:`ALPHA` to say what "significant" means. It gathers each version's figures from the
window store (requests, errors, latency quantiles) and the quality store (accuracy, ...)
and decides, from them, whether each difference between the two versions is larger than
noise: a two-proportion z-test for the error ratio and the accuracy, and for latency
quantiles binomial order-statistic intervals read through the histogram and widened by
its relative error (significant when the two intervals do not overlap).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Mapping, Optional

from ray_monitor.common.catalog import Query
from ray_monitor.common.histogram import RELATIVE_ERROR
from ray_monitor.common.matchers import Matcher

__all__ = ["ALPHA", "COMPARE_QUANTILES", "COMPARE_WINDOW_S", "Z_INTERVAL", "compare",
           "compare_versions", "quantile_levels", "two_proportion_p"]

#: Significance level of the comparison's tests, and the z of its quantile intervals (99%).
ALPHA = 0.01
Z_INTERVAL = NormalDist().inv_cdf(1 - ALPHA / 2)
#: Quantiles the comparison reports.
COMPARE_QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
#: Default window of a comparison.
COMPARE_WINDOW_S = 600.0


def compare(windows, quality, deployment: str, versions: tuple[str, str], *, now: float,
            application: Optional[str] = None, window_s: float = COMPARE_WINDOW_S) -> dict:
    """Two model versions of a deployment side by side over a window, each difference
    with its test (see :func:`compare_versions`). ``windows`` is the window store (or
    anything with its ``evaluate`` and ``max_window_s``), ``quality`` the quality store.
    Raises ``ValueError`` naming a bad argument."""
    if not (isinstance(deployment, str) and deployment):
        raise ValueError("deployment must name a deployment")
    if len(versions) != 2 or not all(isinstance(v, str) for v in versions):
        raise ValueError(f"versions must be two model versions, got {versions!r}")
    if not window_s > 0:
        raise ValueError(f"window_s must be above 0, got {window_s!r}")
    window_s = min(float(window_s), windows.max_window_s)

    def figures(version: str) -> dict:
        ms = [Matcher("deployment", "=", deployment), Matcher("model_version", "=", version)]
        if application is not None:
            ms.append(Matcher("application", "=", application))

        def one(function: str, metric: str, param=None) -> Optional[float]:
            res = windows.evaluate(Query(function, metric, window_s, None, tuple(ms), param), now)
            return res.get(())

        n_lat = int(one("count", "latency_seconds") or 0)
        quantiles = {}
        for name, q in COMPARE_QUANTILES:
            levels = quantile_levels(q, n_lat)
            if levels is None:
                continue
            quantiles[name] = {"value": one("quantile", "latency_seconds", q),
                               "low": one("quantile", "latency_seconds", levels[0]),
                               "high": one("quantile", "latency_seconds", levels[1])}
        return {"model_version": version, "window_s": window_s,
                "requests": int(one("count", "requests") or 0),
                "errors": int(one("count", "errors") or 0), "latency_count": n_lat,
                "quantiles": quantiles,
                "quality": quality.figures(deployment=deployment, model_version=version,
                                           window_s=window_s, application=application, now=now)}

    a, b = figures(versions[0]), figures(versions[1])
    return {"deployment": deployment, "application": application, "window_s": window_s,
            "versions": list(versions), "figures": [a, b], "rows": compare_versions(a, b)}


def two_proportion_p(x1: int, n1: int, x2: int, n2: int) -> Optional[float]:
    """Two-sided p-value of the pooled two-proportion z-test that ``x1/n1`` and ``x2/n2``
    come from one proportion; None without observations on either side."""
    if n1 <= 0 or n2 <= 0:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0  # both all-or-nothing alike: no evidence of a difference
    z = (x1 / n1 - x2 / n2) / se
    return math.erfc(abs(z) / math.sqrt(2))


def quantile_levels(q: float, n: int, alpha: float = ALPHA) -> Optional[tuple[float, float]]:
    """Quantile levels whose values bound the ``q``-quantile of ``n`` observations with
    confidence ``1 - alpha``: the distribution-free order-statistic interval. The number
    of observations below the true quantile is Binomial(n, q); the lower bound is the
    ``l``-th smallest with ``P(X <= l - 1) <= alpha / 2``, the upper the ``u``-th with
    ``P(X <= u - 1) >= 1 - alpha / 2``. Returned as levels ``(l - 1) / n`` and ``u / n``
    (0 and 1 where the bound is the minimum or maximum, or beyond it). None without
    observations."""
    if n <= 0:
        return None
    half = alpha / 2
    # Sum the pmf only where it is not negligible: 12 standard deviations around n q.
    sd = math.sqrt(n * q * (1 - q))
    k0, k1 = max(0, math.floor(n * q - 12 * sd - 1)), min(n, math.ceil(n * q + 12 * sd + 1))
    log_q, log_p = math.log(q), math.log1p(-q)
    base = math.lgamma(n + 1)
    cdf, lower, upper = 0.0, 0, n + 1
    for k in range(k0, k1 + 1):
        cdf += math.exp(base - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                        + k * log_q + (n - k) * log_p)
        if cdf <= half:
            lower = k + 1  # P(X <= lower - 1) <= alpha / 2
        if cdf >= 1 - half:
            upper = k + 1
            break
    return max(0.0, (lower - 1) / n), min(1.0, upper / n)


def _row(metric: str, a: Optional[float], b: Optional[float], **extra: Any) -> dict:
    diff = None if a is None or b is None else b - a
    return {"metric": metric, "a": a, "b": b, "difference": diff, "test": None,
            "p_value": None, "significant": None, **extra}


def compare_versions(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[dict]:
    """Rows comparing version ``a`` with ``b``, from the figures the aggregator gathers:
    ``requests``, ``errors``, ``window_s``, ``quantiles`` (``{"p50": {"value", "low",
    "high"}}``, low/high read at :func:`quantile_levels`) and ``quality`` (as
    :meth:`~ray_monitor.quality.store.QualityStore.figures`). Each row says its test, p-value (proportions) or
    intervals (quantiles), and ``significant``: True or False where a test applies and
    both sides have data, else None. Level: :data:`ALPHA` (the intervals are at
    ``1 - ALPHA`` each, so disjoint intervals are a stricter test than ``p < ALPHA``)."""
    alpha = ALPHA
    rows = []
    w = float(a["window_s"])
    na, nb = a["requests"], b["requests"]
    rows.append(_row("rate_per_s", na / w, nb / w))
    era = a["errors"] / na if na else None
    erb = b["errors"] / nb if nb else None
    rows.append(_proportion_row("error_ratio", a["errors"], na, b["errors"], nb, era, erb, alpha))
    for name, _ in COMPARE_QUANTILES:
        qa, qb = a["quantiles"].get(name), b["quantiles"].get(name)
        row = _row(f"{name}_s", qa and qa["value"], qb and qb["value"])
        if qa and qb and None not in (qa["low"], qa["high"], qb["low"], qb["high"]):
            ia = (qa["low"] * (1 - RELATIVE_ERROR), qa["high"] * (1 + RELATIVE_ERROR))
            ib = (qb["low"] * (1 - RELATIVE_ERROR), qb["high"] * (1 + RELATIVE_ERROR))
            row.update(test=f"{1 - alpha:.0%} order-statistic intervals, widened by the "
                            f"histogram's {RELATIVE_ERROR:.2%} error; significant when disjoint",
                       a_interval=list(ia), b_interval=list(ib),
                       significant=ia[1] < ib[0] or ib[1] < ia[0])
        rows.append(row)
    qa, qb = a["quality"], b["quality"]
    rows.append(_proportion_row("accuracy", qa["correct"], qa["labeled_classes"], qb["correct"],
                                qb["labeled_classes"], qa["accuracy"], qb["accuracy"], alpha))
    for name in ("label_coverage", "f1", "roc_auc", "mae", "rmse"):
        if qa.get(name) is not None or qb.get(name) is not None:
            rows.append(_row(name, qa.get(name), qb.get(name)))
    return rows


def _proportion_row(metric: str, xa: int, na: int, xb: int, nb: int, va: Optional[float],
                    vb: Optional[float], alpha: float) -> dict:
    row = _row(metric, va, vb, a_n=na, b_n=nb)
    p = two_proportion_p(xa, na, xb, nb)
    if p is not None:
        row.update(test=f"two-proportion z-test, two-sided, significant when p < {alpha:g}",
                   p_value=p, significant=p < alpha)
    return row
