"""Reading images: the paged, filtered list, one document, and its stored bytes."""

from __future__ import annotations

from aiohttp import web

from bus.gateway.problems import Problem, int_query, json_response
from bus.gateway.state import CTX, INDEX
from bus.infra.store import ObjectMissingError
from bus.state.readmodel import STATUSES, cursor_of

MAX_LIMIT = 500


async def list_images(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise Problem(
            400,
            "Bad query parameter",
            f"status must be one of {', '.join(STATUSES)}, got {status!r}",
        )
    limit = int_query(request, "limit", 50, 1, MAX_LIMIT)
    items = request.app[INDEX].query(
        status=status,
        tag=request.query.get("tag") or None,
        text=request.query.get("q") or None,
        before=request.query.get("cursor") or None,
        limit=limit,
    )
    next_cursor = cursor_of(items[-1]) if len(items) == limit else None
    return json_response({"items": items, "next_cursor": next_cursor})


def _doc(request: web.Request) -> dict[str, object]:
    image_id = request.match_info["image_id"]
    doc = request.app[INDEX].docs.get(image_id)
    if doc is None:
        raise Problem(404, "Not Found", f"no image with id {image_id!r}")
    return doc


async def get_image(request: web.Request) -> web.Response:
    return json_response(_doc(request))


async def _stream_object(
    request: web.Request, key: str, content_type: str, filename: str | None = None
) -> web.StreamResponse:
    store = request.app[CTX].store
    chunks = store.iter_chunks(key)
    try:
        first = await anext(chunks, b"")
    except ObjectMissingError:
        raise Problem(404, "Not Found", f"the stored object {key} is missing") from None
    response = web.StreamResponse(
        headers={
            "Content-Type": content_type,
            "Cache-Control": "private, max-age=31536000, immutable",
        }
    )
    if filename:
        response.headers["Content-Disposition"] = f'inline; filename="{filename}"'
    await response.prepare(request)
    await response.write(first)
    async for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response


async def get_original(request: web.Request) -> web.StreamResponse:
    doc = _doc(request)
    original = doc.get("original")
    if not isinstance(original, dict):
        raise Problem(404, "Not Found", "this image has no stored original")
    return await _stream_object(
        request,
        original["key"],
        original.get("content_type", "application/octet-stream"),
        str(doc.get("name") or "") or None,
    )


async def get_rendition(request: web.Request) -> web.StreamResponse:
    """``display``, or ``thumbnail`` (the smallest; ``?px=`` picks another thumb size)."""
    doc = _doc(request)
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
    return await _stream_object(request, found["key"], "image/webp")
