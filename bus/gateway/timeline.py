"""``GET /api/images/timeline``: the months of the gallery's list with their counts, so
that a client lays out (and scrolls) 100,000 images before it loads any, then loads the
pages in view by their cursors and the answer's ``as_of`` (:mod:`bus.state.timeline`)."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import partial

from aiohttp import web
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema

from bus.gateway.access import shown_only
from bus.gateway.contract import Timestamp
from bus.gateway.images import (
    MAX_LIMIT,
    ImagesQuery,
    catalogue,
    image_query,
    query_db,
)
from bus.gateway.problems import json_response
from bus.gateway.routes import Reply, Route
from bus.state.readmodel import has_words
from bus.state.timeline import read_time, timeline


class TimelineQuery(ImagesQuery):
    """GET /api/images's filters and sort; ``limit`` is the page size the cursors start;
    without ``as_of``, the images there are now."""

    limit: int = Field(
        200,
        ge=1,
        le=MAX_LIMIT,
        description="the page size: each month's cursors start its pages of this many",
    )
    cursor: SkipJsonSchema[None] = None


class Bucket(BaseModel):
    month: str = Field(description="YYYY-MM (UTC) of the sort key")
    count: int
    since: str = Field(description="GET /api/images?since= for this month's pages")
    until: str = Field(
        description="GET /api/images?until= for this month's pages: just after its newest "
        "image counted"
    )
    cursors: list[str] = Field(
        description="cursors[k] starts page k + 1 (of limit images) of this month; page 0 "
        "is since/until without a cursor"
    )


class Timeline(BaseModel):
    total: int
    as_of: Timestamp = Field(
        description="the as_of it counted (the one given, else the database's time of the "
        "read): GET /api/images?as_of= with it lists exactly the images counted, where an "
        "image added since would otherwise shift a month's pages (sorted by the date taken, "
        "it can fall in any month)"
    )
    limit: int = Field(description="the page size the cursors are spaced by")
    buckets: list[Bucket] = Field(description="the months, in the list's order")


def routes() -> list[Route]:
    return [
        Route(
            "GET",
            "/api/images/timeline",
            get_timeline,
            "read",
            "The months of GET /api/images's list (same filters), with counts, the "
            "cursors that start each page and the as_of to load them with",
            "images",
            responses={
                200: Reply("every month with images", Timeline),
                400: "a query parameter is invalid, or the parameters disagree",
                503: "the database is down",
            },
        )
    ]


async def get_timeline(request: web.Request, query: TimelineQuery) -> web.Response:
    db = catalogue(request)
    now = await query_db(partial(read_time, db))
    # A later as_of would count images still to come, and leave them out of "New".
    as_of = now if query.as_of is None else min(query.as_of, now)
    nothing = query.since and query.until and query.since >= query.until  # as GET /api/images
    if nothing or (query.q and not has_words(query.q)):
        return json_response(
            {"total": 0, "as_of": _exact(as_of), "limit": query.limit, "buckets": []}
        )
    bounded = query.model_copy(update={"as_of": as_of})
    checked = image_query(bounded, await shown_only(request, query.approval))
    buckets = await query_db(lambda: timeline(db, checked, query.limit))
    return json_response(
        {
            "total": sum(b.count for b in buckets),
            "as_of": _exact(as_of),
            "limit": query.limit,
            "buckets": [
                {
                    "month": b.month,
                    "count": b.count,
                    "since": _exact(b.since),
                    "until": _exact(b.until),
                    "cursors": b.cursors,
                }
                for b in buckets
            ],
        }
    )


def _exact(moment: datetime) -> str:
    """To the microsecond: a millisecond would cut the newest image off its own month."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
