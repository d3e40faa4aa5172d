"""Reading images: the paged, filtered list, counts, one document, and its stored bytes.

Everything comes from the PostgreSQL read model; the gateway keeps no copy of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from bus.gateway.problems import Problem, int_query, json_response
from bus.gateway.state import CTX
from bus.images.media import SNIFF_BYTES, safe_name, sniff
from bus.infra.postgres import CONNECTION_ERRORS, STALE_CONNECTION
from bus.infra.store import ObjectMissingError
from bus.state.readmodel import ImageQuery, ReadModel, ReadModelError, parse_time

MAX_LIMIT = 500
T = TypeVar("T")


def _read_model(request: web.Request) -> ReadModel:
    db = request.app[CTX].db
    if db is None:
        raise Problem(503, "Service Unavailable", "this gateway has no read model configured")
    return db


async def _db(query: Callable[[], Awaitable[T]]) -> T:
    """Run a read; once more on a fresh connection if the pooled one was dropped (a database
    restart leaves every idle pooled connection broken), then 503."""
    for attempt in (1, 2):
        try:
            return await query()
        except CONNECTION_ERRORS as exc:
            if attempt == 1 and isinstance(exc, STALE_CONNECTION):
                continue
            reason = f"the catalogue database is unavailable ({type(exc).__name__})"
            raise Problem(503, "Service Unavailable", reason) from None
    raise AssertionError("unreachable")


def _bool_query(request: web.Request, name: str) -> bool | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise Problem(400, "Bad query parameter", f"{name} must be true or false, got {raw!r}")


def image_query(request: web.Request) -> ImageQuery:
    """The list endpoint's query parameters, checked."""
    q = request.query
    try:
        return ImageQuery(
            status=q.get("status") or None,
            tag=q.get("tag") or None,
            approval=q.get("approval") or None,
            since=parse_time(q["since"]) if q.get("since") else None,
            until=parse_time(q["until"]) if q.get("until") else None,
            has_caption=_bool_query(request, "has_caption"),
            text=q.get("q") or None,
            sort=q.get("sort") or "created",
            order=q.get("order") or "desc",
            cursor=q.get("cursor") or None,
            limit=int_query(request, "limit", 50, 1, MAX_LIMIT),
        )
    except ReadModelError as exc:
        raise Problem(400, "Bad query parameter", str(exc)) from None


async def list_images(request: web.Request) -> web.Response:
    query = image_query(request)
    db = _read_model(request)
    page = await _db(lambda: db.page(query))
    return json_response({"items": page.items, "next_cursor": page.next_cursor})


async def image_counts(request: web.Request) -> web.Response:
    db = _read_model(request)
    return json_response(await _db(db.counts))


async def _doc(request: web.Request) -> dict[str, Any]:
    image_id = request.match_info["image_id"]
    db = _read_model(request)
    doc = await _db(lambda: db.get(image_id))
    if doc is None:
        raise Problem(404, "Not Found", f"no image with id {image_id!r}")
    return doc


async def get_image(request: web.Request) -> web.Response:
    return json_response(await _doc(request))


async def _stream_object(
    request: web.Request, key: str, disposition: tuple[str, str] | None = None
) -> web.StreamResponse:
    """Stream a stored object as the type its first bytes show, whatever anyone declared
    for it (an upload's headers, an event that bypassed the intake).

    ``disposition``: (``inline`` or ``attachment``, the file name to offer).
    """
    chunks = request.app[CTX].store.iter_chunks(key)
    head = b""
    try:
        async for chunk in chunks:
            head += chunk
            if len(head) >= SNIFF_BYTES:
                break
    except ObjectMissingError:
        raise Problem(404, "Not Found", f"the stored object {key} is missing") from None
    kind = sniff(head)
    response = web.StreamResponse(
        headers={
            "Content-Type": kind.mime if kind else "application/octet-stream",
            "Cache-Control": "private, max-age=31536000, immutable",
        }
    )
    if disposition is not None:
        how, name = disposition
        filename = safe_name(name, kind.extension if kind else "bin")
        response.headers["Content-Disposition"] = f'{how}; filename="{filename}"'
    await response.prepare(request)
    await response.write(head)
    async for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response


async def get_original(request: web.Request) -> web.StreamResponse:
    """The original, downloaded unless ``?inline=true``, so that following a link never
    shows someone's upload as a page of this origin."""
    inline = _bool_query(request, "inline")
    doc = await _doc(request)
    original = doc.get("original")
    if not isinstance(original, dict) or not isinstance(original.get("key"), str):
        raise Problem(404, "Not Found", "this image has no stored original")
    how = "inline" if inline else "attachment"
    return await _stream_object(request, original["key"], (how, str(doc.get("name") or "")))


async def get_rendition(request: web.Request) -> web.StreamResponse:
    """``display``, or ``thumbnail`` (the smallest; ``?px=`` picks another thumb size)."""
    doc = await _doc(request)
    ingest = doc.get("ingest")
    renditions = ingest.get("renditions") if isinstance(ingest, dict) else None
    if not isinstance(renditions, dict) or not renditions:
        raise Problem(
            404, "Not Found", f"image {doc['id']} is not ingested yet (status {doc.get('status')})"
        )
    which = request.path.rsplit("/", 1)[-1]
    if which == "thumbnail":
        px = request.query.get("px")
        thumbs = sorted(n for n in renditions if n.startswith("thumb-"))
        which = f"thumb-{px}" if px else min(thumbs, key=lambda n: int(n.split("-")[1]))
        if which not in renditions:
            sizes = ", ".join(n.split("-")[1] for n in thumbs)
            raise Problem(404, "Not Found", f"no {px} px thumbnail; sizes are {sizes}")
    found = renditions.get(which)
    if not isinstance(found, dict) or not isinstance(found.get("key"), str):
        raise Problem(404, "Not Found", f"image {doc['id']} has no {which} rendition")
    return await _stream_object(request, found["key"])
