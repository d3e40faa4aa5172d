"""The route table: one place that says path, handler, required scope and documentation."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    scope: str | None  # None: public (health checks)
    summary: str
    tag: str
    query: tuple[tuple[str, str, str], ...] = ()  # (name, type, description)
    body: dict[str, Any] | None = None  # OpenAPI requestBody
    responses: dict[str, str] = field(default_factory=dict)  # status -> description


def json_body(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI requestBody for a JSON object."""
    schema = {"type": "object", "required": required, "properties": properties}
    return {"required": True, "content": {"application/json": {"schema": schema}}}
