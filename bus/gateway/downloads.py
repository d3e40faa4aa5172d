"""``POST /api/images/zip``: many originals as one zip, streamed as it is written.

The zip is written entry by entry straight into the response: each original is read from
the store a chunk at a time and its chunk goes out as soon as :mod:`zipfile` has framed it,
so memory stays at a chunk whatever the number and size of the images. Entries are stored,
not deflated (images are compressed already), and carry data descriptors, the way a zip
written to a stream must; zip64 extensions let any entry pass 4 GiB.

The ids come as JSON (``{"ids": [...]}``) or as an HTML form (``ids=a&ids=b``): a page posts
the form and the browser saves the answer to disk as it streams, where a script's fetch
would hold the whole zip in memory first.
"""

from __future__ import annotations

import zipfile
from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from bus.core import subjects
from bus.gateway.access import check_visible
from bus.gateway.contract import is_json, parse_json, validate
from bus.gateway.images import catalogue, query_db
from bus.gateway.problems import Problem
from bus.gateway.routes import Reply, Route
from bus.gateway.state import CTX
from bus.images.media import safe_name
from bus.infra.store import ObjectMissingError

MAX_IMAGES = 500
ImageId = Annotated[str, Field(pattern=subjects.SAFE_ID_PATTERN)]
FORM = "application/x-www-form-urlencoded"
_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif"}


class ZipBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[ImageId] = Field(
        min_length=1, max_length=MAX_IMAGES, description="the images, in the zip's order"
    )


_FORM_SCHEMA = {
    "type": "object",
    "required": ["ids"],
    "additionalProperties": False,
    "properties": {
        "ids": {
            "type": "array",
            "items": {"type": "string", "pattern": subjects.SAFE_ID_PATTERN},
            "minItems": 1,
            "maxItems": MAX_IMAGES,
        }
    },
}


def routes() -> list[Route]:
    return [
        Route(
            "POST",
            "/api/images/zip",
            download_zip,
            "read",
            f"The originals of up to {MAX_IMAGES} images as one zip, streamed as it is "
            "written (an original missing from the store becomes a note in its place)",
            "images",
            body={"application/json": ZipBody, FORM: {"schema": _FORM_SCHEMA}},
            responses={
                200: Reply(
                    "the zip",
                    content={"application/zip": {"schema": {"type": "string", "format": "binary"}}},
                ),
                400: "the body is not JSON",
                404: "an image does not exist, or has no stored original",
                413: "the body is too large",
                415: f"the body is neither application/json nor {FORM}",
                422: f"ids is not a list of 1-{MAX_IMAGES} image ids",
                503: "the database is down",
            },
        )
    ]


class _Sink:
    """What :class:`zipfile.ZipFile` writes into: bytes kept until the response takes them.
    It cannot seek, so zipfile writes data descriptors after each entry."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


async def _zip_body(request: web.Request) -> ZipBody:
    """The ids, from a JSON body or a form (415 for anything else, 422 if they do not fit)."""
    if request.content_type == FORM:
        fields = await request.post()
        extra = sorted(set(fields) - {"ids"})
        if extra:
            raise Problem(
                422, "Invalid request body", f"{extra[0][:80]} is not a field of this form"
            )
        return validate(ZipBody, {"ids": fields.getall("ids", [])}, 422, "Invalid request body")
    if not is_json(request.content_type):
        given = request.content_type if request.headers.get("Content-Type") else "no content type"
        raise Problem(
            415,
            "Unsupported Media Type",
            f"send the ids as application/json or {FORM}, got {given}",
        )
    return await parse_json(request, ZipBody)


async def download_zip(request: web.Request) -> web.StreamResponse:
    body = await _zip_body(request)
    ids = list(dict.fromkeys(body.ids))  # once each
    db = catalogue(request)
    entries: list[tuple[str, str, dict[str, Any]]] = []
    names: set[str] = set()
    for image_id in ids:
        doc = await query_db(partial(db.get, image_id))
        if doc is None:
            raise Problem(404, "Not Found", f"no image with id {image_id!r}")
        await check_visible(request, doc)
        original = doc.get("original")
        if not isinstance(original, dict) or not isinstance(original.get("key"), str):
            raise Problem(404, "Not Found", f"image {image_id} has no stored original")
        extension = _EXTENSIONS.get(str(original.get("content_type")), "bin")
        name = safe_name(str(doc.get("name") or ""), extension)
        if name in names:  # two images of one name: both kept, told apart by id
            name = f"{image_id}-{name}"
        names.add(name)
        entries.append((name, original["key"], doc))

    response = web.StreamResponse(
        headers={
            "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="darkroom-{len(entries)}-images.zip"',
        }
    )
    await response.prepare(request)
    store = request.app[CTX].store
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as archive:
        for name, key, doc in entries:
            chunks = store.iter_chunks(key)
            try:
                first = await anext(chunks)
            except (ObjectMissingError, StopAsyncIteration):
                note = f"the original of image {doc['id']} ({key}) is missing from the store\n"
                archive.writestr(f"{name}.missing.txt", note)
                await response.write(sink.take())
                continue
            info = zipfile.ZipInfo(name, _zip_time(doc))
            with archive.open(info, "w", force_zip64=True) as entry:
                entry.write(first)
                await response.write(sink.take())
                async for chunk in chunks:
                    entry.write(chunk)
                    await response.write(sink.take())
    await response.write(sink.take())  # the central directory
    await response.write_eof()
    return response


def _zip_time(doc: dict[str, Any]) -> tuple[int, int, int, int, int, int]:
    """When the photo was taken (else uploaded), as zip's DOS time (from 1980)."""
    moment = datetime.fromisoformat(str(doc.get("taken") or doc["created"])).astimezone(UTC)
    moment = max(moment, datetime(1980, 1, 1, tzinfo=UTC))
    return (moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second)
