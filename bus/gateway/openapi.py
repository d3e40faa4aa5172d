"""The OpenAPI 3.1 document, generated from the route table so it cannot drift."""

from __future__ import annotations

import re
from typing import Any

from bus.gateway.routes import PUBLIC, Route

PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}


def build_openapi(routes: list[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        params: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", route.path)
        ]
        params += [
            {
                "name": name,
                "in": "query",
                "required": False,
                "schema": {"type": kind},
                "description": desc,
            }
            for name, kind, desc in route.query
        ]
        responses: dict[str, Any] = (
            {"200": {"description": "OK"}}
            if not any(code.startswith("2") for code in route.responses)
            else {}
        )
        for code, desc in route.responses.items():
            responses[code] = {"description": desc}
            if not code.startswith("2"):
                responses[code]["content"] = PROBLEM
        if route.scope != PUBLIC:
            responses.setdefault(
                "401", {"description": "missing or unknown API key", "content": PROBLEM}
            )
            responses.setdefault(
                "403",
                {"description": f"the key lacks the '{route.scope}' scope", "content": PROBLEM},
            )
        operation: dict[str, Any] = {
            "summary": route.summary,
            "tags": [route.tag],
            "operationId": route.handler.__name__,
            "responses": responses,
            "security": [] if route.scope == PUBLIC else [{"apiKey": [route.scope]}],
        }
        if params:
            operation["parameters"] = params
        if route.body:
            operation["requestBody"] = route.body
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "darkroom",
            "version": "0.1.0",
            "description": "Uploads, images, keys and status. "
            "Every error is application/problem+json.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "darkroom API key (drk_...)",
                }
            },
            "schemas": {
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                    },
                }
            },
        },
    }
