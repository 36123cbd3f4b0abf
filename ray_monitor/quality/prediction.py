"""Runs in every replica: what a monitored request keeps for model quality, and the check
of what a user's prediction extractor returned.

The middleware runs the extractor on a method's result, checks it with
:func:`validate_extractor_result` (counting, never raising, at request time) and ships a
:class:`Prediction` to the aggregator, which joins it with ground truth
(:mod:`ray_monitor.quality.feedback`) and measures it (:mod:`ray_monitor.quality.metrics`).
This module decides what a valid prediction is and nothing more; it imports nothing of
the aggregator and no NumPy, so a replica pays for neither.

Labels are strings. ``int`` and ``bool`` labels (NumPy's too) become their integer's
decimal form, so ``1``, ``True``, ``np.int64(1)`` and ``"1"`` are one class in both
predictions and feedback.
"""

from __future__ import annotations

import math
import numbers
import re
import sys
from typing import Any, Mapping, NamedTuple, Optional

__all__ = ["Prediction", "validate_extractor_result", "check_label", "check_number",
           "MAX_FEATURES", "MAX_STRING"]

#: Bounds that keep one captured prediction small.
MAX_FEATURES = 64
MAX_STRING = 256
_FEATURE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_EXTRACTOR_KEYS = frozenset({"label", "score", "value", "features"})


class Prediction(NamedTuple):
    """What the middleware keeps of one request: the extracted prediction, not the payload.

    ``label`` is set for classification and ``value`` for regression, never both. ``score``
    is the probability of the positive class (binary ROC AUC), ``positive_label`` that
    class as the deployment configured it (``None``: scikit-learn's default, the larger of
    two labels). ``time`` is wall-clock seconds at the end of the request.
    """

    request_id: str
    time: float
    application: str
    deployment: str
    model_version: str
    label: Optional[str] = None
    score: Optional[float] = None
    value: Optional[float] = None
    features: Optional[dict[str, Any]] = None  # name -> float or str
    positive_label: Optional[str] = None


def _is_numpy_bool(v: Any) -> bool:
    # A NumPy bool can only exist once NumPy is loaded, so there is no need to load it here.
    np = sys.modules.get("numpy")
    return np is not None and isinstance(v, np.bool_)


def check_label(v: Any, field_name: str) -> str:
    """A class label as the string it is counted under; ``TypeError`` or ``ValueError``
    naming ``field_name`` and the fix."""
    if isinstance(v, str):
        if not v or len(v) > MAX_STRING:
            raise ValueError(f"{field_name} must be a non-empty string of at most {MAX_STRING} "
                             f"characters, got {len(v)} characters")
        return v
    if isinstance(v, numbers.Integral) or _is_numpy_bool(v):
        return str(int(v))
    raise TypeError(f"{field_name} must be a class label (str, int or bool), got "
                    f"{type(v).__name__} {v!r:.60}; map scores to a class before returning it")


def check_number(v: Any, field_name: str) -> float:
    """A finite real number (not a bool) as a float; ``TypeError`` or ``ValueError``
    naming ``field_name``."""
    if isinstance(v, bool) or _is_numpy_bool(v) or not isinstance(v, numbers.Real):
        raise TypeError(f"{field_name} must be a real number, got {type(v).__name__} {v!r:.60}")
    x = float(v)
    if not math.isfinite(x):
        raise ValueError(f"{field_name} must be finite, got {x!r}")
    return x


def validate_extractor_result(obj: Any) -> dict[str, Any]:
    """Checks what a user's extractor returned; returns the :class:`Prediction` fields
    ``label``, ``score``, ``value`` and ``features`` (absent ones ``None``).

    Accepted: ``{"label": L}`` or ``{"label": L, "score": p}`` (classification, ``p`` in
    [0, 1] the probability of the positive class), ``{"value": x}`` (regression), each
    with optional ``"features": {name: number or str}``. Raises ``TypeError`` or
    ``ValueError`` naming the field and the fix.
    """
    if not isinstance(obj, Mapping):
        raise TypeError("the prediction extractor must return a dict such as "
                        '{"label": "spam", "score": 0.93} or {"value": 3.2}, '
                        f"got {type(obj).__name__}")
    unknown = set(obj) - _EXTRACTOR_KEYS
    if unknown:
        raise ValueError(f"the prediction extractor returned unknown keys {sorted(map(str, unknown))}; "
                         f"use only {sorted(_EXTRACTOR_KEYS)}")
    has_label, has_value = obj.get("label") is not None, obj.get("value") is not None
    if has_label == has_value:
        raise ValueError('the prediction extractor must return exactly one of "label" '
                         '(classification) and "value" (regression)')
    out: dict[str, Any] = {"label": None, "score": None, "value": None, "features": None}
    if has_label:
        out["label"] = check_label(obj["label"], "prediction label")
        if obj.get("score") is not None:
            score = check_number(obj["score"], "prediction score")
            if not 0.0 <= score <= 1.0:
                raise ValueError(f"prediction score must be in [0, 1] (the probability of the "
                                 f"positive class), got {score!r}")
            out["score"] = score
    else:
        if obj.get("score") is not None:
            raise ValueError('prediction "score" goes with a class "label", not with a '
                             'regression "value"')
        out["value"] = check_number(obj["value"], "prediction value")
    features = obj.get("features")
    if features is not None:
        out["features"] = _features(features)
    return out


def _features(features: Any) -> dict[str, Any]:
    if not isinstance(features, Mapping):
        raise TypeError(f'prediction "features" must be a dict of name -> number or str, '
                        f"got {type(features).__name__}")
    if len(features) > MAX_FEATURES:
        raise ValueError(f'prediction "features" has {len(features)} entries; keep at most '
                         f"{MAX_FEATURES} (the ones worth watching for drift)")
    out = {}
    for name, v in features.items():
        if not isinstance(name, str) or not _FEATURE_NAME.fullmatch(name):
            raise ValueError(f"feature name {name!r} must be an identifier of at most 64 "
                             "characters ([A-Za-z_][A-Za-z0-9_]*), so rules can name it as "
                             "feature_<name>")
        if isinstance(v, str):
            if len(v) > MAX_STRING:
                raise ValueError(f"feature {name!r} is a string of {len(v)} characters; "
                                 f"categories may have at most {MAX_STRING}")
            out[name] = v
        else:
            out[name] = check_number(v, f"feature {name!r}")
    return out
