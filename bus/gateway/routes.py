"""The route table's types: one place that says path, handler, required scope, the typed
request and the documented answers of every route.

A handler takes the request, and, when the route has them, a query-string model (a parameter
named ``query``) and a JSON-body model (``body``), pydantic models both::

    async def list_images(request: web.Request, query: ImagesQuery) -> web.Response

The gateway validates the query string and the body with those models before the handler
runs (:mod:`bus.gateway.contract`), and the OpenAPI document describes them
(:mod:`bus.gateway.openapi`): the handler's signature is the one source of both.
"""

from __future__ import annotations

import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from aiohttp import web
from pydantic import BaseModel

Handler = Callable[..., Awaitable[web.StreamResponse]]
# The scope of a route anyone may call without a key (health checks, the frontend). A route
# must say so: one the gateway finds no scope for is refused (401), never served.
PUBLIC = "public"
# A request body's media type -> a model (JSON), several models (exactly one must match), or
# an OpenAPI media type object (bytes the handler streams itself).
Content = Mapping[str, type[BaseModel] | tuple[type[BaseModel], ...] | Mapping[str, Any]]


@dataclass(frozen=True)
class Link:
    """Where a value of an answer leads (an OpenAPI link): clients and stateful tests follow
    it, e.g. from an upload's result to the image it made."""

    operation: Handler  # the target route's handler (its operationId)
    parameters: Mapping[str, str]  # target parameter -> runtime expression ($response.body#/id)
    description: str = ""


@dataclass(frozen=True)
class Reply:
    """One documented answer. An error status needs only a description: it is
    problem+json (see :data:`bus.gateway.openapi.PROBLEM`)."""

    description: str
    model: type[BaseModel] | None = None  # an application/json body
    content: Mapping[str, Mapping[str, Any]] | None = None  # other bodies: media type -> schema
    links: Mapping[str, Link] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorBody:
    """How a route's errors are written, for its document: problem+json everywhere in the
    API (None). The OpenAI-compatible /v1 routes will answer OpenAI's own error object."""

    media_type: str
    model: type[BaseModel]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    scope: str  # the key scope it needs (bus.state.keys.SCOPES), or PUBLIC
    summary: str
    tag: str
    responses: Mapping[int, Reply | str] = field(default_factory=dict)
    body: Content | None = None  # a body the handler reads itself (multipart, raw bytes)
    errors: ErrorBody | None = None  # None: problem+json

    @cached_property
    def query_model(self) -> type[BaseModel] | None:
        return _model(self.handler, "query")

    @cached_property
    def body_model(self) -> type[BaseModel] | None:
        return _model(self.handler, "body")

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


def _model(handler: Handler, name: str) -> type[BaseModel] | None:
    """The pydantic model ``handler`` takes as its parameter ``name``, if it takes one."""
    hint = typing.get_type_hints(handler).get(name)
    if hint is None:
        return None
    if not (isinstance(hint, type) and issubclass(hint, BaseModel)):
        raise TypeError(f"{handler.__qualname__}: '{name}' must be a pydantic model, not {hint}")
    return hint
