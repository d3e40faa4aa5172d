"""The ingest webhook for integrations: one image per request, in one of three forms.

- raw image bytes (any content type but application/json), streamed as they arrive;
  the name from ``?filename=`` or a Content-Disposition header;
- JSON ``{"filename": ..., "data": "<base64>"}``, for senders that can only post JSON,
  decoded as it arrives (:mod:`bus.gateway.jsonbody`), so the image is held once;
- JSON ``{"url": ..., "filename": ...}``: the gateway fetches the image itself, under the
  rules of :mod:`bus.intake.fetch`, and only when ``ingest.fetch.enabled`` is set.

Each ends in :func:`bus.intake.accept.accept_upload`, like every other way in, with the origin
recorded under ``hook`` in the ``uploaded`` event.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, ConfigDict, Field

from bus.gateway.access import caller
from bus.gateway.contract import validate
from bus.gateway.jsonbody import HookJson
from bus.gateway.problems import Problem, json_response
from bus.gateway.routes import Content
from bus.gateway.state import CTX
from bus.gateway.uploads import CHUNK, accepted_result
from bus.intake.accept import Accepted, UploadRejectedError, accept_upload
from bus.intake.fetch import FetchError, disposition_filename, fetch_image
from bus.runtime.context import Context

SOURCE = "hook"
JSON_SLACK = 64 * 1024  # room for the filename, the keys and whitespace around the data


class HookQuery(BaseModel):
    filename: str | None = Field(None, description="raw bytes: the file's name")


class HookBase64(BaseModel):
    """The image in base64, for senders that can only post JSON."""

    model_config = ConfigDict(json_schema_extra={"not": {"required": ["url"]}})

    filename: str | None = None
    data: str = Field(
        description="the image: standard or URL-safe base64, padding optional",
        json_schema_extra={"contentEncoding": "base64", "contentMediaType": "image/*"},
    )


class HookUrl(BaseModel):
    """A URL for the gateway to fetch the image from: only when ingest.fetch.enabled, from
    ingest.fetch.allow_hosts, never an internal address."""

    model_config = ConfigDict(json_schema_extra={"not": {"required": ["data"]}})

    filename: str | None = None
    url: str = Field(json_schema_extra={"format": "uri", "example": "https://example.com/a.jpg"})


BODY: Content = {
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/json": (HookBase64, HookUrl),
}


async def ingest_hook(request: web.Request, query: HookQuery) -> web.Response:
    """Accept one image from an integration; answer like one entry of a multipart upload."""
    ctx = request.app[CTX]
    key = (await caller(request)).id  # whose upload it is: an approval rule may hold it
    if request.content_type == "application/json":
        accepted, name = await _from_json(ctx, request, key)
    else:
        name = query.filename or disposition_filename(request.headers.get(hdrs.CONTENT_DISPOSITION))
        chunks = request.content.iter_chunked(CHUNK)
        accepted = await _accept(ctx, chunks, name, {"kind": "bytes"}, key)
    result = accepted_result(name or "", accepted)
    return json_response(result, status=result["status"])


def json_limit(max_bytes: int) -> int:
    """The largest JSON body taken: a base64 image at the size limit, plus some slack."""
    return math.ceil(max_bytes * 4 / 3) + JSON_SLACK


async def _accept(
    ctx: Context,
    chunks: AsyncIterator[bytes],
    filename: str | None,
    origin: dict[str, str],
    key: str,
) -> Accepted:
    try:
        extra = {"hook": origin, "key": key}
        return await accept_upload(ctx, chunks, filename, SOURCE, extra=extra)
    except UploadRejectedError as exc:
        raise Problem(exc.status, "Upload rejected", exc.reason) from None
    except HttpProcessingError as exc:  # a broken request body (bad chunked encoding, say)
        raise Problem(400, "Malformed body", str(exc) or type(exc).__name__) from None


async def _json_body(request: web.Request, limit: int) -> HookJson:
    """The body read through :class:`HookJson`, refused (413) as soon as it is known to be
    over ``limit``."""
    too_large = Problem(
        413,
        "Payload Too Large",
        f"a JSON body may be at most {limit:,} bytes (the size limit in base64); "
        "send bigger images as raw bytes",
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = HookJson(JSON_SLACK)
    size = 0
    async for chunk in request.content.iter_chunked(CHUNK):
        size += len(chunk)
        if size > limit:
            raise too_large
        body.feed(chunk)
    return body


def _invalid(detail: str) -> Problem:
    return Problem(422, "Invalid hook body", detail)


async def _from_json(ctx: Context, request: web.Request, key: str) -> tuple[Accepted, str | None]:
    body = await _json_body(request, json_limit(ctx.settings.ingest.max_bytes))
    fields = body.finish()
    if ("data" in fields) == ("url" in fields):
        raise _invalid("send exactly one of 'data' (the image in base64) and 'url'")
    if "url" in fields:
        by_url = validate(HookUrl, fields, 422, "Invalid hook body", strict=True)
        return await _from_url(ctx, by_url.url, by_url.filename, key)
    # The data string was decoded on the way in (body.image); what stands in its place is
    # only checked for being a string.
    stand_in = "" if body.image is not None else fields["data"]
    by_data = validate(
        HookBase64, {**fields, "data": stand_in}, 422, "Invalid hook body", strict=True
    )
    assert body.image is not None
    origin = {"kind": "base64"}
    return await _accept(ctx, _drain(body.image), by_data.filename, origin, key), by_data.filename


async def _drain(pieces: deque[bytes]) -> AsyncIterator[bytes]:
    """The pieces in order, each let go as it is taken."""
    while pieces:
        yield pieces.popleft()


async def _from_url(
    ctx: Context, url: str, filename: str | None, key: str
) -> tuple[Accepted, str | None]:
    settings = ctx.settings.ingest.fetch
    if not settings.enabled:
        raise Problem(
            403,
            "Fetching is off",
            "this gateway does not fetch URLs: send the image itself (raw bytes, or base64 in "
            "'data'), or enable fetching in the settings with [ingest.fetch] enabled = true "
            "and the hosts to fetch from in allow_hosts "
            "(or DARKROOM_INGEST__FETCH__ENABLED=true and DARKROOM_INGEST__FETCH__ALLOW_HOSTS)",
        )
    try:
        async with fetch_image(url, settings, ctx.settings.ingest.max_bytes) as fetched:
            name = filename or fetched.filename
            origin = {"kind": "url", "url": url}
            return await _accept(ctx, fetched.chunks, name, origin, key), name
    except FetchError as exc:
        raise Problem(exc.status, exc.title, exc.detail) from None
