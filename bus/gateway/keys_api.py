"""Managing API keys over HTTP (admin scope)."""

from __future__ import annotations

from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, Field

from bus.gateway.contract import NOT_BLANK, OneOf, Timestamp
from bus.gateway.problems import Problem, json_response
from bus.gateway.state import CTX, KEYS
from bus.state.keys import KEY_ID_RE, SCOPES, create_key, list_keys, revoke_key

MAX_NAME = 100


class NewKey(BaseModel):
    name: str = Field(
        min_length=1, max_length=MAX_NAME, pattern=NOT_BLANK, description="what the key is for"
    )
    scopes: list[Annotated[str, OneOf(*SCOPES)]] = Field(min_length=1)


class KeyInfo(BaseModel):
    id: str
    name: str
    scopes: list[str]
    created: Timestamp


class CreatedKey(KeyInfo):
    key: str = Field(description="the secret: shown this once, never again")


class KeyList(BaseModel):
    items: list[KeyInfo]


async def list_api_keys(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    records = await list_keys(ctx.js, ctx.api_keys)
    return json_response(KeyList.model_validate({"items": [r.public() for r in records]}))


async def create_api_key(request: web.Request, body: NewKey) -> web.Response:
    scopes = tuple(dict.fromkeys(body.scopes))
    token, record = await create_key(request.app[CTX].api_keys, body.name.strip(), scopes)
    request.app[KEYS].forget_unknown(record.id)  # usable here at once, before the watch
    return json_response(CreatedKey.model_validate({**record.public(), "key": token}), 201)


async def revoke_api_key(request: web.Request) -> web.Response:
    key_id = request.match_info["key_id"]
    if not KEY_ID_RE.match(key_id) or not await revoke_key(request.app[CTX].api_keys, key_id):
        raise Problem(404, "Not Found", f"no API key with id {key_id[:80]!r}")
    return web.Response(status=204)
