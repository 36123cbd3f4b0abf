"""The prediction extractor's layer around a monitored method (``prediction=``).

Runs in every replica of a deployment monitored with an extractor: decides what of a
method's result is a prediction (an ok result the extractor answers for; never an HTTP
error response) and keeps it. A bad extractor is counted as a self error, never raised.
"""

from __future__ import annotations

import functools
import inspect
import time
from typing import Any, Callable

from ray_monitor.quality.prediction import Prediction, validate_extractor_result
from ray_monitor.replica.propagation import _current_request
from ray_monitor.replica.runtime import Runtime

__all__ = ["HttpResponse", "capturing", "keep_prediction"]

try:  # Starlette ships with Ray Serve; the class is looked up once, not per request
    from starlette.responses import Response as HttpResponse
except ImportError:  # pragma: no cover - without Starlette nothing is an HTTP object
    class HttpResponse:  # type: ignore[no-redef]
        pass



def keep_prediction(runtime: Runtime, result: Any, args: tuple, kwargs: dict) -> None:
    """Runs the extractor on an ok result and keeps the prediction; never raises."""
    opts = runtime.options
    try:
        if isinstance(result, HttpResponse) and result.status_code >= 500:
            return  # an HTTP error response is not a prediction
        raw = opts.prediction(result, args, kwargs) if opts.prediction_input else \
            opts.prediction(result)
        if raw is None:
            return
        fields = validate_extractor_result(raw)
        st = runtime.state or runtime.start()
        ident = st.identity
        st.recorder.record_prediction(Prediction(
            getattr(_current_request(), "request_id", ""), time.time(), ident.application, ident.deployment,
            ident.model_version, positive_label=opts.positive_label, **fields))
    except Exception as e:  # a bad extractor must never fail the request
        runtime.self_error(f"prediction_extractor:{type(e).__name__}", e)


def capturing(fn: Callable, runtime: Runtime, bound: bool) -> Callable:
    """``fn`` with the prediction extractor after it, of the same kind. Only methods
    with an extractor get this layer: the others pay nothing for the feature."""
    skip = 1 if bound else 0  # the extractor sees the call's arguments without `self`
    if inspect.iscoroutinefunction(fn):
        async def capture(*args, **kwargs):
            result = await fn(*args, **kwargs)
            keep_prediction(runtime, result, args[skip:], kwargs)
            return result
    else:
        def capture(*args, **kwargs):
            result = fn(*args, **kwargs)
            keep_prediction(runtime, result, args[skip:], kwargs)
            return result
    functools.update_wrapper(capture, fn)
    return capture
