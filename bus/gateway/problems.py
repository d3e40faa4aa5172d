"""Errors as ``application/problem+json`` (RFC 9457), everywhere."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

log = logging.getLogger("darkroom.gateway")
PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_S = 5  # what a 503 (a dependency unavailable) tells clients to wait
# Browsers must take every answer as the type it declares, never guess another.
NOSNIFF = {"X-Content-Type-Options": "nosniff"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Problem(web.HTTPException):
    """Raise from a handler: becomes a problem+json response."""

    def __init__(self, status: int, title: str, detail: str = "", **extra: Any) -> None:
        self.status_code = status
        super().__init__()
        self.title, self.detail, self.extra = title, detail, extra


def problem_response(status: int, title: str, detail: str = "", **extra: Any) -> web.Response:
    """A problem+json response; a 503 says when to try again (``Retry-After``)."""
    doc = {"type": "about:blank", "title": title, "status": status}
    if detail:
        doc["detail"] = detail
    doc.update(extra)
    response = web.Response(status=status, body=orjson.dumps(doc), content_type=PROBLEM_JSON)
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def json_response(doc: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as exc:
        return problem_response(exc.status, exc.title, exc.detail, **exc.extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        text = exc.text or ""
        response = problem_response(
            exc.status, exc.reason, text if text != f"{exc.status}: {exc.reason}" else ""
        )
        for name in ("Allow", "WWW-Authenticate"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except Exception as exc:
        if client_gone(request, exc):
            # Nobody is left to answer, and nothing is wrong with the gateway: a handler
            # reading the body sees the hang-up as an error, and cleans up as it unwinds.
            log.info("%s %s: the client hung up (%s)", request.method, request.path, exc)
            return problem_response(400, "Client hung up", "the connection closed mid-request")
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem_response(500, "Internal Server Error", "the gateway failed; see its log")


def client_gone(request: web.BaseRequest, exc: BaseException) -> bool:
    """Whether ``exc`` comes from the client closing the connection mid-request."""
    transport = request.transport
    closed = transport is None or transport.is_closing()
    return closed and isinstance(exc, ConnectionError | web.RequestPayloadError)


def int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Problem(
            400, "Bad query parameter", f"{name} must be an integer, got {raw!r}"
        ) from None
    if not low <= value <= high:
        raise Problem(400, "Bad query parameter", f"{name} must be {low}-{high}, got {value}")
    return value
