"""The carousel: the images a display shows, with the settings it shows them by.

``GET /api/carousel`` lists the images every key sees (nothing to decide, or approved) that
have a display rendition, with what a photo frame or kiosk needs for each (the display and
thumbnail URLs, size, blurhash, date, caption, and the overlay text), and echoes the display
settings asked for (interval, shuffle, seed, sort, order, overlay), so a display page can be
configured by its URL alone. Shuffled, the order follows the seed: the same seed pages
through the same order, so a kiosk pages stably; change the seed to reshuffle.

Polling is cheap with the ETag: it changes when the set of shown images (or a shown image's
renditions, caption or decision) changes, and ``If-None-Match`` with the current one is
answered 304 without the page.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, Field

from bus.gateway.contract import OneOf, Timestamp
from bus.gateway.images import Moment, catalogue, query_db
from bus.gateway.problems import Problem, json_response
from bus.gateway.routes import Reply, Route
from bus.state.approvals import CarouselQuery
from bus.state.readmodel import SORTS, ReadModelError

MAX_LIMIT = 500
MAX_SEED = 2**31 - 1


class CarouselParams(BaseModel):
    interval: int = Field(10, ge=1, le=86_400, description="seconds each image stays up")
    shuffle: bool = Field(False, description="a shuffled order (by seed) instead of a sorted one")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="the shuffle's seed: the same seed, the same order"
    )
    sort: Annotated[str, OneOf(*SORTS)] = Field(
        "taken", description="taken (the date taken, else the upload's), or created"
    )
    order: Annotated[str, OneOf("desc", "asc")] = Field("desc", description="desc: newest first")
    overlay: Annotated[str, OneOf("date", "caption", "none")] = Field(
        "date", description="what to lay over each image"
    )
    since: Moment | None = Field(None, description="only images at or after this (sort key)")
    limit: int = Field(50, ge=1, le=MAX_LIMIT)
    cursor: str | None = Field(None, description="next_cursor from the previous page")


class CarouselSettings(BaseModel):
    """The display settings asked for, echoed back."""

    interval: int
    shuffle: bool
    seed: int
    sort: str
    order: str
    overlay: str


class Slide(BaseModel):
    id: str
    display: str = Field(description="the display rendition's URL (WebP)")
    thumbnail: str = Field(description="the smallest thumbnail's URL (WebP)")
    width: int | None = Field(description="the display rendition's width")
    height: int | None
    blurhash: str | None = Field(description="a placeholder to show while it loads")
    date: Timestamp = Field(description="when it was taken, else uploaded")
    caption: str | None
    overlay: str | None = Field(description="the text to lay over it (the date or the caption)")


class Carousel(BaseModel):
    settings: CarouselSettings
    items: list[Slide]
    total: int = Field(description="images the carousel shows in all")
    next_cursor: str | None = Field(description="the next page's cursor; null on the last page")


async def carousel(request: web.Request, query: CarouselParams) -> web.Response:
    db = catalogue(request)
    try:
        wanted = CarouselQuery(
            sort=query.sort,
            order=query.order,
            shuffle=query.shuffle,
            seed=query.seed,
            since=query.since,
            cursor=query.cursor or None,
            limit=query.limit,
        )
    except ReadModelError as exc:
        raise Problem(400, "Bad query parameter", str(exc)) from None
    # The version is read before the page: should the set change in between, this page is
    # tagged with the older version, and the next request fetches it again.
    total, checksum = await query_db(db.approvals.carousel_version)
    settings = CarouselSettings(**query.model_dump(include=set(CarouselSettings.model_fields)))
    asked = query.model_dump_json()
    etag = '"' + hashlib.sha256(f"{total}:{checksum}:{asked}".encode()).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _matches(request.headers.get("If-None-Match", ""), etag):
        return web.Response(status=304, headers=headers)
    page = await query_db(lambda: db.approvals.carousel(wanted))
    answer = Carousel(
        settings=settings,
        items=[_slide(doc, query.overlay) for doc in page.items],
        total=total,
        next_cursor=page.next_cursor,
    )
    response = json_response(answer)
    response.headers.update(headers)
    return response


def _matches(header: str, etag: str) -> bool:
    """Whether an If-None-Match header names ``etag`` (weak comparison, as RFC 9110 asks)."""
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def _slide(doc: dict[str, Any], overlay: str) -> Slide:
    ingest = doc.get("ingest") or {}
    display = (ingest.get("renditions") or {}).get("display") or {}
    caption = (doc.get("caption") or {}).get("caption")
    caption = caption if isinstance(caption, str) else None
    date = doc["taken"] or doc["created"]
    return Slide(
        id=doc["id"],
        display=f"/api/images/{doc['id']}/display",
        thumbnail=f"/api/images/{doc['id']}/thumbnail",
        width=display.get("width"),
        height=display.get("height"),
        blurhash=ingest.get("blurhash"),
        date=date,
        caption=caption,
        overlay={"date": date, "caption": caption}.get(overlay),
    )


def routes() -> list[Route]:
    return [
        Route(
            "GET",
            "/api/carousel",
            carousel,
            "read",
            "The images a display shows (approved, or nothing to decide), with its settings; "
            "send If-None-Match with the last ETag to poll",
            "approvals",
            responses={
                200: Reply("one page; its ETag changes when the shown images change", Carousel),
                304: "nothing changed since the ETag given in If-None-Match",
                400: "a query parameter is invalid, or the cursor is of another order",
                503: "the database is down",
            },
        ),
    ]
