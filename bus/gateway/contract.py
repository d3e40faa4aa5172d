"""Requests checked against the route's models before its handler runs.

A query string that does not fit its model is a 400; a JSON body that is not JSON is a 400,
one that is JSON but does not fit its model a 422, and a body that is not JSON at all a 415.
Each answer is problem+json naming the field, what it must be and what came (shortened, with
passwords in URLs hidden), never pydantic's own dump.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

import annotated_types
import orjson
from aiohttp import web
from pydantic import (
    BaseModel,
    BeforeValidator,
    GetCoreSchemaHandler,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import CoreSchema, ErrorDetails, core_schema

from bus.core.redact import redact_text
from bus.gateway.problems import Problem
from bus.gateway.routes import Handler, Route

M = TypeVar("M", bound=BaseModel)
SHOWN = 80  # characters of a refused value quoted back
# pydantic's error types -> what the value must be, in this API's words.
_EXPECTED = {
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "datetime_parsing": "an ISO 8601 time",
    "datetime_from_date_parsing": "an ISO 8601 time",
    "datetime_type": "an ISO 8601 time",
}
_BOUNDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
# A field's schema key naming the setting that is its maximum (a dotted path in Settings):
# the limit is this deployment's, so the document says it (see bus.gateway.openapi).
SETTING_MAXIMUM = "x-setting-maximum"


def _whole(value: Any) -> Any:
    """A JSON number with no fraction as an int (JSON Schema's integer: 5.0 is one)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


NOT_BLANK = r"\S"  # a text field's pattern: something besides spaces

# An integer in a JSON body, checked strictly otherwise ("5" is not one).
Integer = Annotated[int, BeforeValidator(_whole)]
# A time in an answer, passed on as the store wrote it (ISO 8601, UTC, ms).
Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]


class OneOf:
    """``Annotated[str, OneOf(*names)]``: a string that must be one of ``names``, checked as
    one and documented as an enum (the names are not written twice)."""

    def __init__(self, *choices: str) -> None:
        self.choices = choices

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.literal_schema(list(self.choices))


def endpoint(route: Route) -> Handler:
    """The aiohttp handler for ``route``: its handler, given the checked query and body."""
    query_model, body_model = route.query_model, route.body_model
    if query_model is None and body_model is None:
        return route.handler

    async def checked(request: web.Request) -> web.StreamResponse:
        given: dict[str, BaseModel] = {}
        if query_model is not None:
            given["query"] = parse_query(request, query_model)
        if body_model is not None:
            given["body"] = await parse_json(request, body_model)
        return await route.handler(request, **given)

    checked.__name__ = route.handler.__name__
    return checked


def parse_query(request: web.Request, model: type[M]) -> M:
    """The query string as ``model`` (400 naming the parameter when it does not fit)."""
    values: dict[str, str] = {}
    for name, value in request.query.items():
        if name in values:
            raise Problem(400, "Bad query parameter", f"{name[:80]} is given more than once")
        values[name] = value
    return validate(model, values, 400, "Bad query parameter")


async def parse_json(request: web.Request, model: type[M]) -> M:
    """The JSON body as ``model``: 415 if it is not JSON, 400 if it does not parse, 422 if it
    does not fit."""
    if not is_json(request.content_type):
        given = request.content_type if request.headers.get("Content-Type") else "no content type"
        raise Problem(
            415, "Unsupported Media Type", f"send the body as application/json, got {given}"
        )
    raw = await request.read()
    try:  # strict: JSON's types as they are ("1" is no integer), as the document says
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors[0]["type"] == "json_invalid":
            raise Problem(400, "Malformed JSON", errors[0]["msg"]) from None
        detail = "; ".join(describe(model, e) for e in errors)
        raise Problem(422, "Invalid request body", detail) from None


def is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def validate(model: type[M], data: Any, status: int, title: str, strict: bool = False) -> M:
    """``data`` as ``model``, else a :class:`Problem` with ``status`` saying what is wrong."""
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise Problem(status, title, "; ".join(describe(model, e) for e in errors)) from None


def describe(model: type[BaseModel], error: ErrorDetails) -> str:
    """One validation error as 'name must be what, got value'."""
    loc, kind = error["loc"], error["type"]
    name = _name(loc)
    if kind == "missing":
        return f"{name} is required"
    if kind == "extra_forbidden":
        return f"{name} is not a field of this request"
    if kind == "value_error" and not loc:  # a model validator's own words
        return str((error.get("ctx") or {}).get("error", error["msg"]))
    return f"{name} {_rule(model, error)}, got {_shown(error['input'])}"


def _rule(model: type[BaseModel], error: ErrorDetails) -> str:
    """What the value must be, in this API's words where pydantic's are its own."""
    loc, kind, ctx = error["loc"], error["type"], error.get("ctx") or {}
    if kind == "value_error":  # a field validator's own words
        return str(ctx.get("error", error["msg"]))
    if kind in _EXPECTED:
        return f"must be {_EXPECTED[kind]}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}"
    if kind == "string_pattern_mismatch":
        if ctx.get("pattern") == NOT_BLANK:
            return "must not be blank"
        return f"must match the pattern {ctx.get('pattern', '')}"
    if kind in ("too_short", "string_too_short"):
        least = ctx.get("min_length")
        return f"must have at least {least} {'item' if kind == 'too_short' else 'character'}" + (
            "s" if least != 1 else ""
        )
    if kind in ("too_long", "string_too_long"):
        most = ctx.get("max_length")
        return f"must have at most {most} {'items' if kind == 'too_long' else 'characters'}"
    if kind in _BOUNDS and len(loc) == 1 and (bounds := _range(model, str(loc[0]))):
        return f"must be {bounds}"
    msg = error["msg"]  # pydantic's: "Input should be ...", mostly
    if msg.startswith("Input should be "):
        return "must be " + msg.removeprefix("Input should be ")
    return f"is invalid ({msg[:1].lower()}{msg[1:]})"


def _name(loc: Sequence[int | str]) -> str:
    if not loc:
        return "the body"
    name = str(loc[0])
    for part in loc[1:]:
        name += f"[{part}]" if isinstance(part, int) else f".{part}"
    return name


def _range(model: type[BaseModel], name: str) -> str | None:
    """'1-500' for a field bounded on both sides, else None (pydantic's words then)."""
    field = model.model_fields.get(name)
    if field is None:
        return None
    low = high = None
    for rule in field.metadata:
        if isinstance(rule, annotated_types.Ge):
            low = rule.ge
        elif isinstance(rule, annotated_types.Le):
            high = rule.le
    return f"{low}-{high}" if low is not None and high is not None else None


def _shown(value: Any) -> str:
    """The refused value, shortened, with any password in a URL hidden."""
    if isinstance(value, str):
        text = repr(value[:SHOWN]) + ("..." if len(value) > SHOWN else "")
    else:
        try:
            text = orjson.dumps(value, default=str).decode(errors="replace")
        except TypeError:  # an integer past 64 bits
            text = repr(value)
        if len(text) > SHOWN:
            text = text[:SHOWN] + "..."
    return redact_text(text)
