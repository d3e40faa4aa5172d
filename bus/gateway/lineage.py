"""Where an image comes from and what was made from it, and the images either side of it in
a list: what the viewer links to.

``GET /api/images/{id}/lineage``: a generated image's job and parent (the image an image
mode started from), the images generated from this one, and its job's other outputs.

``GET /api/images/{id}/neighbours``: with the list's own filters and sort
(``GET /api/images``), the image before this one and the one after it, found by keyset
from this image's exact sort key, so images with equal times are neither skipped nor
repeated. The image itself need not match the filters.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field

from bus.gateway.access import check_visible, shown_only
from bus.gateway.images import (
    ImageDoc,
    ImageFilters,
    ImagesQuery,
    catalogue,
    image_doc,
    image_query,
    query_db,
)
from bus.gateway.problems import Problem, json_response
from bus.gateway.routes import Reply, Route
from bus.state.lineage import MAX_RELATIVES, relatives, sort_key
from bus.state.readmodel import encode_cursor, has_words


class Lineage(BaseModel):
    image_id: str
    job_id: str | None = Field(description="the generation job that made it (generated only)")
    mode: str | None = Field(description="the job's mode (txt2img, img2img, remix...)")
    parent_id: str | None = Field(
        description="the image it was generated from, if any (even one since deleted)"
    )
    parent: ImageDoc | None = Field(
        description="the parent's document; null when there is none, or it was deleted, or "
        "this key may not see it"
    )
    children: list[ImageDoc] = Field(
        description=f"images generated from this one, the newest first (at most {MAX_RELATIVES})"
    )
    siblings: list[ImageDoc] = Field(
        description=f"the job's other outputs, the newest first (at most {MAX_RELATIVES})"
    )


class Neighbours(BaseModel):
    previous: ImageDoc | None = Field(description="the image before it in the list; null: first")
    next: ImageDoc | None = Field(description="the image after it in the list; null: last")


def _lineage_of(doc: dict[str, Any]) -> dict[str, Any]:
    lineage = doc.get("lineage")
    return lineage if isinstance(lineage, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


async def get_lineage(request: web.Request) -> web.Response:
    doc = await image_doc(request)
    db = catalogue(request)
    lineage = _lineage_of(doc)
    job_id, parent_id = _text(lineage.get("job_id")), _text(lineage.get("parent"))
    parent = None
    if parent_id is not None:
        parent = await query_db(lambda: db.get(parent_id))
        if parent is not None:
            try:
                await check_visible(request, parent)
            except Problem:
                parent = None
    shown = await shown_only(request, None)
    found = await query_db(lambda: relatives(db.pool, doc["id"], job_id, shown))
    answer = {
        "image_id": doc["id"],
        "job_id": job_id,
        "mode": _text(lineage.get("mode")),
        "parent_id": parent_id,
        "parent": parent,
        "children": found.children,
        "siblings": found.siblings,
    }
    return json_response(answer)


async def get_neighbours(request: web.Request, query: ImageFilters) -> web.Response:
    doc = await image_doc(request)
    db = catalogue(request)
    listing = ImagesQuery.model_validate(query.model_dump())
    nothing = listing.since and listing.until and listing.since >= listing.until
    if nothing or (listing.q and not has_words(listing.q)):
        return json_response({"previous": None, "next": None})
    shown = await shown_only(request, listing.approval)
    moment = await query_db(lambda: sort_key(db.pool, doc["id"], listing.sort))
    if moment is None:  # deleted since it was read
        raise Problem(404, "Not Found", f"no image with id {doc['id']!r}")
    reverse = "asc" if listing.order == "desc" else "desc"
    found: dict[str, dict[str, Any] | None] = {}
    for name, order in (("next", listing.order), ("previous", reverse)):
        cursor = encode_cursor(listing.sort, order, moment, doc["id"])
        one = listing.model_copy(update={"order": order, "cursor": cursor, "limit": 1})
        checked = image_query(one, shown)
        page = await query_db(partial(db.page, checked))
        found[name] = page.items[0] if page.items else None
    return json_response(found)


def routes() -> list[Route]:
    return [
        Route(
            "GET",
            "/api/images/{image_id}/lineage",
            get_lineage,
            "read",
            "Where an image comes from (its job and parent image) and what was generated from it",
            "images",
            responses={
                200: Reply("the image's relatives", Lineage),
                404: "no such image",
                503: "the database is down",
            },
        ),
        Route(
            "GET",
            "/api/images/{image_id}/neighbours",
            get_neighbours,
            "read",
            "The images before and after this one in a list with these filters and sort",
            "images",
            responses={
                200: Reply("either side of it", Neighbours),
                400: "a query parameter is invalid, or the parameters disagree",
                403: "only an admin key may list pending or rejected images",
                404: "no such image",
                503: "the database is down",
            },
        ),
    ]
