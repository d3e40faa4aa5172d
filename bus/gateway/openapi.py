"""The OpenAPI 3.1 document, generated from the route table and its models so it cannot
drift: the models that check a request (:mod:`bus.gateway.contract`) are the schemas here."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from bus.core.settings import GENERATE_MODEL_NAME, Settings
from bus.core.subjects import SAFE_ID_PATTERN
from bus.gateway.contract import SETTING_MAXIMUM
from bus.gateway.problems import PROBLEM_JSON, RETRY_AFTER_S, ProblemDetails
from bus.gateway.routes import PUBLIC, ErrorBody, Reply, Route
from bus.state.keys import KEY_ID_RE
from bus.state.webhooks import ENDPOINT_ID_PATTERN, MESSAGE_ID_PATTERN

REF = "#/components/schemas/{model}"
PROBLEM = ErrorBody(PROBLEM_JSON, ProblemDetails)
Mode = Literal["validation", "serialization"]
DESCRIPTION = (
    "Uploads, images, keys and status. Every error is application/problem+json "
    "(ProblemDetails), except under /v1/, the OpenAI-compatible vision API, which answers "
    "OpenAI's error object (OpenAIErrorBody). A path answers the methods it documents; any "
    "other method (OPTIONS included) gets 405 with an Allow header listing them. Paths under "
    "/api/ and /v1/ never reach the frontend."
)


def build_openapi(routes: list[Route], settings: Settings) -> dict[str, Any]:
    """The document for ``routes``, with this deployment's limits (``settings``)."""
    schemas = _Schemas(routes)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, schemas)
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "darkroom", "version": "0.1.0", "description": DESCRIPTION},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "darkroom API key (drk_...)",
                }
            },
            "schemas": schemas.components,
        },
    }
    _settle_limits(doc, settings)
    return doc


class _Schemas:
    """Every model the routes name, as one set of components (pydantic's JSON schemas)."""

    def __init__(self, routes: list[Route]) -> None:
        wanted: set[tuple[type[BaseModel], Mode]] = {(ProblemDetails, "serialization")}
        wanted.update(_models(routes))
        ordered = sorted(wanted, key=lambda pair: (pair[0].__name__, pair[1]))
        refs, defs = models_json_schema(ordered, ref_template=REF)
        self._refs = {(model, mode): ref for (model, mode), ref in refs.items()}
        self.components: dict[str, Any] = dict(sorted(defs.get("$defs", {}).items()))

    def ref(self, model: type[BaseModel], mode: Mode) -> dict[str, Any]:
        return dict(self._refs[(model, mode)])

    def parameters(self, model: type[BaseModel]) -> list[dict[str, Any]]:
        """A query model's fields as query parameters."""
        schema = model.model_json_schema(ref_template=REF)
        self.components.update(schema.get("$defs", {}))
        required = set(schema.get("required", []))
        out = []
        for name, prop in schema["properties"].items():
            param: dict[str, Any] = {"name": name, "in": "query", "required": name in required}
            if "description" in prop:
                param["description"] = prop["description"]
            param["schema"] = _scalar(prop)
            out.append(param)
        return out


def _settle_limits(schema: Any, settings: Settings) -> None:
    """Each ``SETTING_MAXIMUM`` in ``schema`` replaced by the setting's value, a ``maximum``."""
    if isinstance(schema, dict):
        setting = schema.pop(SETTING_MAXIMUM, None)
        if setting is not None:
            value: Any = settings
            for name in setting.split("."):
                value = getattr(value, name)
            schema["maximum"] = value
        for each in schema.values():
            _settle_limits(each, settings)
    elif isinstance(schema, list):
        for each in schema:
            _settle_limits(each, settings)


def _models(routes: list[Route]) -> Iterator[tuple[type[BaseModel], Mode]]:
    for route in routes:
        if route.errors is not None:
            yield route.errors.model, "serialization"
        if route.body_model is not None:
            yield route.body_model, "validation"
        for content in (route.body or {}).values():
            if isinstance(content, type):
                yield content, "validation"
            elif isinstance(content, tuple):
                yield from ((model, "validation") for model in content)
        for reply in route.responses.values():
            if isinstance(reply, Reply) and reply.model is not None:
                yield reply.model, "serialization"


def _scalar(prop: dict[str, Any]) -> dict[str, Any]:
    """A query parameter's schema: absent rather than null, no title."""
    schema = {k: v for k, v in prop.items() if k not in ("title", "description")}
    branches = [b for b in schema.pop("anyOf", []) if b.get("type") != "null"]
    if len(branches) == 1:
        schema.update(branches[0])
    elif branches:
        schema["anyOf"] = branches
    if schema.get("default", 0) is None:
        del schema["default"]
    return schema


# What each path parameter may be, so clients (and schemathesis) send ids that can exist.
PATH_PATTERNS = {
    "image_id": SAFE_ID_PATTERN,
    "job_id": SAFE_ID_PATTERN,
    "key_id": KEY_ID_RE.pattern,
    "model_name": GENERATE_MODEL_NAME,
    "seq": r"^[0-9]{1,19}$",  # a stream sequence
    "endpoint_id": ENDPOINT_ID_PATTERN,  # a webhook endpoint
    "delivery_id": MESSAGE_ID_PATTERN,  # a webhook message (its webhook-id)
}


def _path_schema(name: str) -> dict[str, Any]:
    pattern = PATH_PATTERNS.get(name)
    return {"type": "string", **({"pattern": pattern} if pattern else {})}


def _operation(route: Route, schemas: _Schemas) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": _path_schema(name)}
        for name in re.findall(r"{(\w+)}", route.path)
    ]
    if route.query_model is not None:
        params += schemas.parameters(route.query_model)
    operation: dict[str, Any] = {
        "summary": route.summary,
        "tags": [route.tag],
        "operationId": route.operation_id,
        "security": [] if route.scope == PUBLIC else [{"apiKey": [route.scope]}],
    }
    if params:
        operation["parameters"] = params
    body = _request_body(route, schemas)
    if body is not None:
        operation["requestBody"] = body
    operation["responses"] = {
        str(status): _response(status, reply, route.errors or PROBLEM, schemas)
        for status, reply in sorted(_replies(route).items())
    }
    return operation


def _request_body(route: Route, schemas: _Schemas) -> dict[str, Any] | None:
    if route.body_model is not None:
        content = {"application/json": {"schema": schemas.ref(route.body_model, "validation")}}
        return {"required": True, "content": content}
    if route.body is None:
        return None
    content = {}
    for media, given in route.body.items():
        if isinstance(given, type):
            content[media] = {"schema": schemas.ref(given, "validation")}
        elif isinstance(given, tuple):  # exactly one of these
            content[media] = {"schema": {"oneOf": [schemas.ref(m, "validation") for m in given]}}
        else:
            content[media] = dict(given)
    return {"required": True, "content": content}


def _replies(route: Route) -> dict[int, Reply | str]:
    """The route's answers, with those the gateway gives on its behalf: auth, and the
    checks of its query and body."""
    replies: dict[int, Reply | str] = {}
    if route.scope != PUBLIC:
        replies[401] = "no API key, or an unknown or revoked one"
        replies[403] = f"the key lacks the '{route.scope}' scope"
    if route.query_model is not None:
        replies[400] = "a query parameter is invalid"
    if route.body_model is not None:
        replies[400] = "the body is not JSON"
        replies[413] = "the body is too large"
        replies[415] = "the body is not application/json"
        replies[422] = "the body does not fit the schema"
    for status, reply in route.responses.items():
        given = replies.get(status)
        both_words = isinstance(given, str) and isinstance(reply, str)
        replies[status] = f"{given}; or {reply}" if both_words else reply
    if not any(200 <= status < 300 for status in replies):
        replies[200] = "OK"
    return replies


def _response(
    status: int, reply: Reply | str, errors: ErrorBody, schemas: _Schemas
) -> dict[str, Any]:
    if isinstance(reply, str):
        reply = Reply(reply)
    out: dict[str, Any] = {"description": reply.description}
    if status >= 400:
        out["content"] = {errors.media_type: {"schema": schemas.ref(errors.model, "serialization")}}
    else:  # a JSON model, other media types, or both (JSON, or a stream of events)
        content = {media: dict(obj) for media, obj in (reply.content or {}).items()}
        if reply.model is not None:
            ref = schemas.ref(reply.model, "serialization")
            content = {"application/json": {"schema": ref}, **content}
        if content:
            out["content"] = content
    headers = _headers(status)
    if headers:
        out["headers"] = headers
    if reply.links:
        out["links"] = {
            name: {
                "operationId": link.operation.__name__,
                "parameters": dict(link.parameters),
                **({"description": link.description} if link.description else {}),
            }
            for name, link in reply.links.items()
        }
    return out


def _headers(status: int) -> dict[str, Any]:
    if status == 503:
        return {
            "Retry-After": {
                "description": f"seconds to wait before trying again ({RETRY_AFTER_S})",
                "required": True,
                "schema": {"type": "integer"},
            }
        }
    if status == 401:
        return {
            "WWW-Authenticate": {
                "description": "Bearer, with error=invalid_token for an unknown key",
                "required": True,
                "schema": {"type": "string"},
            }
        }
    return {}
