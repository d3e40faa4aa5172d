"""aiohttp's server under the gateway, answering what never reaches the application.

A request aiohttp's HTTP parser refuses (oversize headers, a bad Content-Length, raw
UTF-8 in the path, no Host) is answered by the connection itself: out of the box as
``text/plain`` quoting part of the request, with an ERROR traceback in the log. Here it gets
a problem+json answer that quotes none of it, and one WARNING line.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)

from bus.gateway.problems import NOSNIFF, problem_response

log = logging.getLogger("darkroom.gateway")


class _Protocol(web.RequestHandler):
    """One connection; errors aiohttp answers itself become problems."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:  # an error past every middleware, or a handler's timeout
            log.error("error handling %s %s", request.method, request.path, exc_info=exc)
            detail = "the gateway failed; see its log"
        else:
            # Plain TLS or other non-HTTP traffic on this port is noise, not news.
            level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.WARNING
            name = type(exc).__name__ if exc is not None else "unknown"
            log.log(level, "refused a malformed request from %s (%s)", request.remote, name)
            detail = self._refusal(exc)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already under way: the connection is broken")
        response = problem_response(status, HTTPStatus(status).phrase, detail)
        response.headers.update(NOSNIFF)
        response.force_close()
        return response

    def _refusal(self, exc: BaseException | None) -> str:
        """What is wrong with the request, in words that quote none of it."""
        if isinstance(exc, LineTooLong):
            return f"the request line or a header is longer than {self.max_field_size:,} bytes"
        if isinstance(exc, InvalidURLError):
            return "the path holds characters that must be percent-encoded"
        if isinstance(exc, BadStatusLine):
            return "the request line is not 'METHOD /path HTTP/1.1'"
        if isinstance(exc, InvalidHeader):
            return "a header is malformed"
        if isinstance(exc, PayloadEncodingError):
            return "the body does not match its Content-Length or chunked encoding"
        return (
            "the request is malformed: HTTP/1.1 needs a Host header, Content-Length must be "
            f"a number, and at most {self.max_headers} headers are taken"
        )


class _Server(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)

    @classmethod
    def like(cls, server: web.Server) -> _Server:
        kwargs: dict[str, Any] = server._kwargs
        return cls(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            **kwargs,
        )


class GatewayRunner(web.AppRunner):
    """aiohttp's :class:`~aiohttp.web.AppRunner`, its connections handled by ``_Protocol``."""

    async def _make_server(self) -> web.Server:
        return _Server.like(await super()._make_server())  # the app starts in super()
