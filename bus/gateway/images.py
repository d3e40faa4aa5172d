"""Reading images: the paged, filtered list, counts, one document, and its stored bytes.

Everything comes from the PostgreSQL read model; the gateway keeps no copy of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from bus.gateway.access import check_visible, shown_only
from bus.gateway.contract import OneOf, Timestamp
from bus.gateway.problems import Problem, json_response
from bus.gateway.state import CTX
from bus.images.media import SNIFF_BYTES, safe_name, sniff
from bus.infra.postgres import CONNECTION_ERRORS, STALE_CONNECTION
from bus.infra.store import ObjectMissingError
from bus.state.readmodel import (
    APPROVALS,
    SORTS,
    STATUSES,
    ImageQuery,
    ReadModel,
    ReadModelError,
    has_words,
)

MAX_LIMIT = 500
T = TypeVar("T")


def catalogue(request: web.Request) -> ReadModel:
    db = request.app[CTX].db
    if db is None:
        raise Problem(503, "Service Unavailable", "this gateway has no read model configured")
    return db


async def query_db(query: Callable[[], Awaitable[T]]) -> T:
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


def _iso(value: Any) -> Any:
    """A string as an ISO 8601 time, nothing else (no Unix seconds); without a zone, UTC."""
    if not isinstance(value, str):
        return value
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("must be an ISO 8601 time") from None
    zoned = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    try:  # in UTC, as stored: a time near year 1 or 9999 may have no UTC equivalent
        return zoned.astimezone(UTC)
    except OverflowError:
        raise ValueError("must be a time between the years 1 and 9999 in UTC") from None


Moment = Annotated[datetime, BeforeValidator(_iso)]


class Decision(BaseModel):
    """An admin's decision on an image: who (the key id), when and why."""

    decision: Annotated[str, OneOf("approved", "rejected")]
    by: str | None = Field(description="the id of the API key that decided")
    reason: str | None
    time: Timestamp
    event: str = Field(description="the id of the decision's event")


class ImageDoc(BaseModel):
    """One image as the catalogue has it. Each stage adds its members (``ingest``,
    ``caption``, ``failure``...) as it finishes; an upload adds what the intake found."""

    model_config = ConfigDict(extra="allow")
    id: str
    status: Annotated[str, OneOf(*STATUSES)]
    kind: str = Field(description="upload or generated")
    name: str | None
    created: Timestamp
    updated: Timestamp
    taken: Timestamp | None = Field(description="when the photo was taken, if it says")
    stages: dict[str, Timestamp] = Field(description="when each stage finished")
    tags: list[str]
    approval: Annotated[str, OneOf(*APPROVALS)] = Field(
        description="none: nothing to decide (shown); pending: waits for an admin's decision; "
        "approved; rejected (its renditions deleted, its original kept for a while)"
    )
    hold: list[str] = Field(description="why the approval policy holds it, if it does")
    decision: Decision | None = Field(description="the newest approval decision")
    ingest: dict[str, Any] | None = Field(None, description="sizes, renditions, EXIF...")
    caption: dict[str, Any] | None = None
    failure: dict[str, Any] | None = Field(None, description="the stage that failed, and why")


class ImageFilters(BaseModel):
    """What the list keeps and how it sorts (its paging aside)."""

    status: Annotated[str, OneOf(*STATUSES)] | None = None
    tag: str | None = Field(None, description="only images with this tag")
    approval: Annotated[str, OneOf(*APPROVALS)] | None = Field(
        None,
        description="only images of this approval; pending and rejected ones are listed to "
        "admin keys only (the default for other keys: none and approved)",
    )
    since: Moment | None = Field(None, description="only images at or after this (sort key)")
    until: Moment | None = Field(None, description="only images before this (sort key)")
    as_of: Moment | None = Field(
        None,
        description="only images created (uploaded or generated) at or before this, whatever "
        "the sort: GET /api/images/timeline's as_of, so that images added since do not shift "
        "the pages it counted",
    )
    has_caption: bool | None = Field(None, description="only images with (true) or without")
    q: str | None = Field(
        None, description="words (or word prefixes, in any script) in name, caption or tags"
    )
    sort: Annotated[str, OneOf(*SORTS)] = Field(
        "created", description="created, or taken (the date taken, else created)"
    )
    order: Annotated[str, OneOf("desc", "asc")] = Field("desc", description="desc: newest first")


class ImagesQuery(ImageFilters):
    limit: int = Field(50, ge=1, le=MAX_LIMIT)
    cursor: str | None = Field(None, description="next_cursor from the previous page")


class ImagePage(BaseModel):
    items: list[ImageDoc]
    next_cursor: str | None = Field(description="the next page's cursor; null on the last page")


class ImageCounts(BaseModel):
    total: int
    status: dict[str, int] = Field(description="images by status")
    approval: dict[str, int] = Field(description="images by approval")


class OriginalQuery(BaseModel):
    inline: bool = Field(False, description="true: show it in the browser, not download it")


class ThumbnailQuery(BaseModel):
    px: int | None = Field(None, description="a size of ingest.thumb_px; default the smallest")


def image_query(query: ImagesQuery, shown: bool = False) -> ImageQuery:
    """The read model's query for the list endpoint's parameters (400 if they disagree);
    ``shown``: only the images every key sees."""
    try:
        return ImageQuery(
            status=query.status,
            tag=query.tag or None,
            approval=query.approval,
            since=query.since,
            until=query.until,
            as_of=query.as_of,
            has_caption=query.has_caption,
            text=query.q or None,
            sort=query.sort,
            order=query.order,
            cursor=query.cursor or None,
            limit=query.limit,
            shown_only=shown,
        )
    except ReadModelError as exc:
        raise Problem(400, "Bad query parameter", str(exc)) from None


async def list_images(request: web.Request, query: ImagesQuery) -> web.Response:
    nothing = query.since and query.until and query.since >= query.until  # no time
    if nothing or (query.q and not has_words(query.q)):  # or no word: nothing matches
        return json_response({"items": [], "next_cursor": None})
    checked = image_query(query, await shown_only(request, query.approval))
    db = catalogue(request)
    page = await query_db(lambda: db.page(checked))
    return json_response({"items": page.items, "next_cursor": page.next_cursor})


async def image_counts(request: web.Request) -> web.Response:
    db = catalogue(request)
    shown = await shown_only(request, None)  # held images are counted for admin keys only
    return json_response(ImageCounts.model_validate(await query_db(lambda: db.counts(shown))))


async def image_doc(request: web.Request) -> dict[str, Any]:
    """The read model's document of the path's image: 404 if there is none, or if the caller
    may not see it (:func:`bus.gateway.access.check_visible`)."""
    image_id = request.match_info["image_id"]
    db = catalogue(request)
    doc = await query_db(lambda: db.get(image_id))
    if doc is None:
        raise Problem(404, "Not Found", f"no image with id {image_id!r}")
    await check_visible(request, doc)
    return doc


async def get_image(request: web.Request) -> web.Response:
    return json_response(await image_doc(request))


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


async def get_original(request: web.Request, query: OriginalQuery) -> web.StreamResponse:
    """The original, downloaded unless ``?inline=true``, so that following a link never
    shows someone's upload as a page of this origin."""
    doc = await image_doc(request)
    original = doc.get("original")
    if not isinstance(original, dict) or not isinstance(original.get("key"), str):
        raise Problem(404, "Not Found", "this image has no stored original")
    how = "inline" if query.inline else "attachment"
    return await _stream_object(request, original["key"], (how, str(doc.get("name") or "")))


async def get_display(request: web.Request) -> web.StreamResponse:
    return await _rendition(request, "display")


async def get_thumbnail(request: web.Request, query: ThumbnailQuery) -> web.StreamResponse:
    """The smallest thumbnail, or the ``?px=`` one."""
    return await _rendition(request, "thumbnail", query.px)


async def _rendition(request: web.Request, which: str, px: int | None = None) -> web.StreamResponse:
    doc = await image_doc(request)
    if doc["approval"] == "rejected":
        raise Problem(
            404, "Not Found", f"image {doc['id']} was rejected: its renditions are deleted"
        )
    ingest = doc.get("ingest")
    renditions = ingest.get("renditions") if isinstance(ingest, dict) else None
    if not isinstance(renditions, dict) or not renditions:
        raise Problem(
            404, "Not Found", f"image {doc['id']} is not ingested yet (status {doc.get('status')})"
        )
    if which == "thumbnail":
        thumbs = sorted(n for n in renditions if n.startswith("thumb-"))
        which = f"thumb-{px}" if px is not None else min(thumbs, key=_px)
        if which not in renditions:
            sizes = ", ".join(n.split("-")[1] for n in thumbs)
            raise Problem(404, "Not Found", f"no {px} px thumbnail; sizes are {sizes}")
    found = renditions.get(which)
    if not isinstance(found, dict) or not isinstance(found.get("key"), str):
        raise Problem(404, "Not Found", f"image {doc['id']} has no {which} rendition")
    return await _stream_object(request, found["key"])


def _px(name: str) -> int:
    return int(name.split("-")[1])
