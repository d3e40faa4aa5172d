"""The route table: one place that says path, handler, required scope and documentation."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The scope of a route anyone may call without a key (health checks, the frontend). A route
# must say so: one the gateway finds no scope for is refused (401), never served.
PUBLIC = "public"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    scope: str  # the key scope it needs (bus.state.keys.SCOPES), or PUBLIC
    summary: str
    tag: str
    query: tuple[tuple[str, str, str], ...] = ()  # (name, type, description)
    body: dict[str, Any] | None = None  # OpenAPI requestBody
    responses: dict[str, str] = field(default_factory=dict)  # status -> description


def json_body(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI requestBody for a JSON object."""
    schema = {"type": "object", "required": required, "properties": properties}
    return {"required": True, "content": {"application/json": {"schema": schema}}}
