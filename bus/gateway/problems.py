"""Errors as ``application/problem+json`` (RFC 9457), everywhere."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("darkroom.gateway")
PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_S = 5  # what a 503 (a dependency unavailable) tells clients to wait
# Browsers must take every answer as the type it declares, never guess another.
NOSNIFF = {"X-Content-Type-Options": "nosniff"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ProblemDetails(BaseModel):
    """What every error answer holds (RFC 9457); some add members, such as an upload's
    per-file ``results`` or readiness ``checks``."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(description="about:blank: the status code says it all")
    title: str
    status: int = Field(ge=400, le=599)
    detail: str = Field("", description="what went wrong, and what was expected")


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
    """``doc`` as JSON: a model (its fields left unset are left out), or plain data."""
    data = doc.model_dump(mode="json", exclude_unset=True) if isinstance(doc, BaseModel) else doc
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


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
        if text == f"{exc.status}: {exc.reason}":  # aiohttp's placeholder: say something useful
            text = _router_detail(request, exc)
        response = problem_response(exc.status, exc.reason, text)
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


def _router_detail(request: web.Request, exc: web.HTTPException) -> str:
    if isinstance(exc, web.HTTPNotFound):
        return f"no route {request.path[:200]}"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return f"{request.method[:20]} is not allowed here; allowed: {exc.headers.get('Allow', '')}"
    return ""


def client_gone(request: web.BaseRequest, exc: BaseException) -> bool:
    """Whether ``exc`` comes from the client closing the connection mid-request."""
    transport = request.transport
    closed = transport is None or transport.is_closing()
    return closed and isinstance(exc, ConnectionError | web.RequestPayloadError)
