"""HTTP server semantics of an ingress span, after OpenTelemetry's HTTP conventions.

Runs in every replica, on the request path of HTTP ingress deployments (a plain class or
a function taking a Starlette ``Request``, and FastAPI/ASGI ingress classes).

What a request brings is read once from its ASGI scope, without building Starlette's
header object: the method, the path, and the W3C ``traceparent``/``tracestate`` headers.
The span then carries ``http.request.method`` (one of the standard methods, else
``_OTHER`` with ``http.request.method_original``), ``url.path``, ``http.route`` when the
route is known (FastAPI's template; Ray Serve's route prefix for a plain ingress) and
``http.response.status_code``: the response's status, 200 for a plain return value, 500
for an exception. A 5xx sets the span's status to ERROR with ``error.type`` the status
code (or the exception's type); a 4xx is the client's error and leaves it unset, as the
conventions ask of server spans.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["HTTP_TYPES", "HttpRequest", "KNOWN_METHODS", "carry_traceparent", "from_scope",
           "is_http_type", "method_label", "status_of"]

try:  # Starlette ships with Ray Serve; the class is looked up once, not per request
    from starlette.requests import Request as _HttpRequest
except ImportError:  # pragma: no cover - without Starlette nothing is an HTTP request
    class _HttpRequest:  # type: ignore[no-redef]
        pass

#: OpenTelemetry's known HTTP methods; others are reported as ``_OTHER``.
KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS",
                           "TRACE", "PATCH"))


#: Whether an argument's type is a Starlette request, by type (see :func:`is_http_type`).
HTTP_TYPES: dict[type, bool] = {}


def is_http_type(kind: type) -> bool:
    """Whether ``kind`` is a Starlette request, kept in :data:`HTTP_TYPES`: Starlette's
    Request is a ``Mapping``, so ``isinstance`` would run ABCMeta's Python-level check on
    every request (a call, about 1 us inside a replica); a dictionary lookup does not."""
    http = issubclass(kind, _HttpRequest)
    if len(HTTP_TYPES) < 1024:  # argument types are few; a bound all the same
        HTTP_TYPES[kind] = http
    return http


class HttpRequest:
    """What the span needs of one HTTP request."""

    __slots__ = ("method", "path", "route", "traceparent", "tracestate")

    def __init__(self, method: str, path: str, route: Optional[str] = None,
                 traceparent: Optional[str] = None, tracestate: Optional[str] = None) -> None:
        self.method = method
        self.path = path
        self.route = route
        self.traceparent = traceparent
        self.tracestate = tracestate

    def attributes(self) -> dict:
        """The request's span attributes (empty values left out)."""
        out: dict[str, Any] = {}
        if self.method:
            out["http.request.method"] = method_label(self.method)
            if out["http.request.method"] == "_OTHER":
                out["http.request.method_original"] = self.method[:64]
        if self.path:
            out["url.path"] = self.path
        if self.route:
            out["http.route"] = self.route
        return out


def method_label(method: str) -> str:
    """The method as OpenTelemetry's HTTP conventions name it: one of the standard nine,
    else ``_OTHER`` (so clients cannot grow a label set or an attribute's values)."""
    return method if method in KNOWN_METHODS else "_OTHER"


def carry_traceparent(scope: dict, trace_id: int, span_id: int, sampled: bool) -> None:
    """Makes ``scope``'s ``traceparent`` header the given span: an ASGI app's own
    telemetry (FastAPI's) that reads its parent from the headers then continues it."""
    tp = f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"
    headers = [h for h in scope.get("headers", ()) if h[0] != b"traceparent"]
    headers.append((b"traceparent", tp.encode("latin-1")))
    scope["headers"] = headers


def from_scope(scope: Any, route: Optional[str] = None) -> Optional[HttpRequest]:
    """The request of an ASGI HTTP ``scope`` (None for anything else)."""
    if not isinstance(scope, dict) or scope.get("type") != "http":
        return None
    traceparent = tracestate = None
    for k, v in scope.get("headers", ()):
        if k == b"traceparent":
            traceparent = v.decode("latin-1")
        elif k == b"tracestate":
            tracestate = v.decode("latin-1")
    return HttpRequest(scope.get("method") or "", scope.get("path") or "", route or None,
                       traceparent, tracestate)


def status_of(outcome: str, is_error: bool) -> Optional[int]:
    """The HTTP status a request's outcome label stands for: the code itself for HTTP
    responses, 500 for an exception, 200 for an ok return, None when the client went
    away (no response was sent)."""
    if outcome.isdigit():
        return int(outcome)
    if is_error:
        return 500
    return 200 if outcome == "ok" else None
