"""The one place that turns errors into RFC 9457 problem+json responses.

Routes hold no try/except; whatever escapes them lands here. The last-resort handler leaks
nothing: no stack trace, no submitted value.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, g, json
from werkzeug.exceptions import HTTPException

from authsvc.domain.errors import IllegalTransition, NotFound, StateConflict

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"

TITLES = {
    400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
    405: "Method not allowed", 409: "Conflict", 413: "Request body too large",
    415: "Unsupported media type", 422: "Validation failed", 429: "Too many requests",
    500: "Internal error", 503: "Service unavailable",
}


class ApiProblem(Exception):
    """Raise to answer with a problem document."""

    def __init__(self, status: int, detail: str, *, errors: list[dict] | None = None,
                 headers: dict[str, str] | None = None, type_: str | None = None,
                 extra: dict | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}
        self.type = type_
        self.extra = extra or {}


def problem(status: int, detail: str, *, errors: list[dict] | None = None,
            headers: dict[str, str] | None = None, type_: str | None = None,
            extra: dict | None = None) -> Response:
    body: dict = {
        "type": type_ or f"https://authsvc.dev/problems/{status}",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    request_id = getattr(g, "request_id", None)
    if request_id:
        body["request_id"] = request_id
    body.update(extra or {})
    resp = Response(json.dumps(body), status=status, mimetype=PROBLEM)
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    if status == 401 and "WWW-Authenticate" not in resp.headers:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="authsvc"'
    return resp


def register(app: Flask) -> None:
    @app.errorhandler(ApiProblem)
    def _api_problem(exc: ApiProblem) -> Response:
        return problem(exc.status, exc.detail, errors=exc.errors, headers=exc.headers,
                       type_=exc.type, extra=exc.extra)

    @app.errorhandler(NotFound)
    def _not_found(exc: NotFound) -> Response:
        return problem(404, f"No such {exc.args[0] if exc.args else 'object'}.")

    @app.errorhandler(StateConflict)
    def _conflict(exc: StateConflict) -> Response:
        return problem(409, str(exc), extra={"current_state": exc.current_state})

    @app.errorhandler(IllegalTransition)
    def _illegal(exc: IllegalTransition) -> Response:
        return problem(409, "The action does not fit the current state.",
                       extra={"current_state": exc.current})

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        detail = {
            404: "No such resource.",
            405: "Method not allowed on this resource.",
            413: "The request body is larger than this endpoint accepts.",
            415: "Send the body as application/json.",
        }.get(status, TITLES.get(status, "Error"))
        resp = problem(status, detail)
        if status == 405 and exc.get_response().headers.get("Allow"):
            resp.headers["Allow"] = exc.get_response().headers["Allow"]
        return resp

    @app.errorhandler(Exception)
    def _last_resort(exc: Exception) -> Response:
        from sqlalchemy.exc import DBAPIError, OperationalError

        if isinstance(exc, OperationalError | DBAPIError) and getattr(
                exc, "connection_invalidated", False) or isinstance(exc, OperationalError):
            log.warning("database unavailable: %s", type(exc).__name__)
            return problem(503, "A dependency is unavailable; retry shortly.",
                           headers={"Retry-After": "5"})
        # Log the type only: argument values may carry PHI.
        log.error("unhandled error %s in %s", type(exc).__name__, getattr(g, "endpoint", "?"))
        return problem(500, "Something went wrong on our side; it has been logged.")


def bad_cursor(field: str = "cursor") -> ApiProblem:
    """400 for a paging cursor this service did not issue (or one altered since)."""
    return ApiProblem(400, "The cursor is not readable; use one a previous page returned.",
                      errors=[{"field": field, "code": "invalid_format",
                               "message": "not a cursor this service issued"}])
