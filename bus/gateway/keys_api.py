"""Managing API keys over HTTP (admin scope)."""

from __future__ import annotations

import orjson
from aiohttp import web

from bus.gateway.problems import Problem, json_response
from bus.gateway.state import CTX, KEYS
from bus.state.keys import KEY_ID_RE, KeyError_, create_key, list_keys, parse_scopes, revoke_key


async def list_api_keys(request: web.Request) -> web.Response:
    records = await list_keys(request.app[CTX].api_keys)
    return json_response({"items": [r.public() for r in records]})


async def create_api_key(request: web.Request) -> web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise Problem(
            400, "Bad request body", 'expected JSON like {"name": "ci", "scopes": ["read"]}'
        ) from None
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("name"), str)
        or not body["name"].strip()
    ):
        raise Problem(400, "Bad request body", "'name' must be a non-empty string")
    scopes_in = body.get("scopes")
    if not isinstance(scopes_in, list) or not all(isinstance(s, str) for s in scopes_in):
        raise Problem(400, "Bad request body", "'scopes' must be a list of strings")
    try:
        scopes = parse_scopes(scopes_in)
    except KeyError_ as exc:
        raise Problem(400, "Bad request body", str(exc)) from None
    token, record = await create_key(request.app[CTX].api_keys, body["name"].strip()[:100], scopes)
    request.app[KEYS].forget_unknown(record.id)  # usable here at once, before the watch
    return json_response({**record.public(), "key": token}, status=201)


async def revoke_api_key(request: web.Request) -> web.Response:
    key_id = request.match_info["key_id"]
    if not KEY_ID_RE.match(key_id) or not await revoke_key(request.app[CTX].api_keys, key_id):
        raise Problem(404, "Not Found", f"no API key with id {key_id!r}")
    return web.Response(status=204)
