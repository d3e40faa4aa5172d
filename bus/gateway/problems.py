"""Errors as ``application/problem+json`` (RFC 9457), everywhere."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

log = logging.getLogger("darkroom.gateway")
PROBLEM_JSON = "application/problem+json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Problem(web.HTTPException):
    """Raise from a handler: becomes a problem+json response."""

    def __init__(self, status: int, title: str, detail: str = "", **extra: Any) -> None:
        self.status_code = status
        super().__init__()
        self.body_doc: dict[str, Any] = {
            "type": "about:blank",
            "title": title,
            "status": status,
            **({"detail": detail} if detail else {}),
            **extra,
        }


def problem_response(status: int, title: str, detail: str = "", **extra: Any) -> web.Response:
    doc = {"type": "about:blank", "title": title, "status": status}
    if detail:
        doc["detail"] = detail
    doc.update(extra)
    return web.Response(status=status, body=orjson.dumps(doc), content_type=PROBLEM_JSON)


def json_response(doc: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as exc:
        return problem_response(**_args(exc.body_doc))
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
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem_response(500, "Internal Server Error", "the gateway failed; see its log")


def _args(doc: dict[str, Any]) -> dict[str, Any]:
    extra = {k: v for k, v in doc.items() if k not in ("type", "title", "status", "detail")}
    return {
        "status": doc["status"],
        "title": doc["title"],
        "detail": doc.get("detail", ""),
        **extra,
    }
