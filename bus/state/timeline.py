"""The gallery's timeline: how many images each month holds, for the same filters as a page
of the catalogue, so that a client can lay out the whole list before it loads a row of it.

Each month also carries the keyset cursors that start its pages (every ``page_size``-th
image's key), so a client can load any page of a huge month directly, without reading the
pages before it; and bounds (``since``/``until`` on the sort key) that hold exactly the
images counted now, so that images added later do not shift the pages counted here. A
month's newest image bounds it only in the list's own order: sorted by the date taken, an
image uploaded later can fall in any month, so the count is also bounded by the upload time
(``as_of``, on ``created``), which a client passes to every page it loads of this timeline.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from bus.state.readmodel import SORTS, ImageQuery, ReadModel, encode_cursor, page_sql

EVERY_ROW = 2**62  # the LIMIT of the page query the timeline counts over: no limit
_TICK = timedelta(microseconds=1)  # PostgreSQL's resolution: "just after" a key


@dataclass(frozen=True, slots=True)
class Bucket:
    """One month of the list (UTC), in the list's order."""

    month: str  # YYYY-MM
    count: int
    since: datetime  # inclusive, on the sort key
    until: datetime  # exclusive
    cursors: list[str]  # cursors[k] starts page k + 1 (page 0 starts at ``since``/``until``)


async def read_time(db: ReadModel) -> datetime:
    """The database's time, to the millisecond: the ``as_of`` of a timeline read now. Its
    clock, not a client's, and as coarse as an event's time (the ``created`` it bounds), so
    that a client that sees an image's ``created`` knows exactly whether it was counted."""
    async with db.pool.acquire() as conn:
        moment: datetime = await conn.fetchval("SELECT date_trunc('milliseconds', now())")
    return moment


async def timeline(db: ReadModel, query: ImageQuery, page_size: int) -> list[Bucket]:
    """The months of the images ``query`` lists (its cursor and limit aside), each with its
    count, bounds and page cursors for pages of ``page_size``."""
    # The list query itself (its filters, visibility and sort), counted rather than paged:
    # PostgreSQL drops the document columns nobody reads from the subquery.
    listed, args = page_sql(replace(query, cursor=None, limit=EVERY_ROW))
    key = SORTS[query.sort]
    direction = "DESC" if query.order == "desc" else "ASC"
    args.append(page_size)
    month = f"date_trunc('month', {key} AT TIME ZONE 'UTC')"  # timestamp arithmetic: cheap
    sql = (
        f"WITH listed AS ({listed}), numbered AS ("
        f"SELECT month, k, id, row_number() OVER (PARTITION BY month "
        f"ORDER BY k {direction}, id {direction}) AS n "
        f"FROM (SELECT {month} AS month, {key} AS k, id FROM listed) AS keyed) "
        "SELECT month, count(*) AS count, max(k) AS newest, "
        f"array_agg(k ORDER BY n) FILTER (WHERE n % ${len(args)} = 0) AS keys, "
        f"array_agg(id ORDER BY n) FILTER (WHERE n % ${len(args)} = 0) AS ids "
        f"FROM numbered GROUP BY month ORDER BY month {direction}"
    )
    async with db.pool.acquire() as conn:
        rows = await conn.fetch(sql, *args)
    buckets = []
    for row in rows:
        start: datetime = row["month"].replace(tzinfo=UTC)  # a UTC timestamp without zone
        end = _next_month(start)
        since = max(start, query.since) if query.since else start
        newest: datetime = row["newest"]
        after = newest + _TICK if newest < datetime.max.replace(tzinfo=UTC) else newest
        until = min(end, after, *([query.until] if query.until else []))
        ends = zip(row["keys"] or [], row["ids"] or [], strict=True)
        # The last page's end starts no page.
        cursors = [encode_cursor(query.sort, query.order, k, i) for k, i in ends]
        del cursors[(row["count"] - 1) // page_size :]
        buckets.append(Bucket(start.strftime("%Y-%m"), row["count"], since, until, cursors))
    return buckets


def _next_month(start: datetime) -> datetime:
    if (start.year, start.month) == (9999, 12):  # Python's last month
        return datetime.max.replace(tzinfo=UTC)
    return (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
