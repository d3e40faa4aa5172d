"""GET /api/images/timeline: the gallery's months with counts, and the cursors that load any
page of a month directly, for the same filters and visibility as GET /api/images."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient

from bus.core import subjects
from bus.core.envelope import new_id
from bus.core.settings import ApprovalSettings, HoldPolicy, Settings
from bus.gateway.app import build_app
from bus.runtime.context import Context
from bus.state.readmodel import ReadModel
from bus.state.timeline import read_time
from tests.support.http import auth
from tests.support.streams import eventually
from tests.test_readmodel import T0, apply, event, life

pytestmark = [pytest.mark.nats, pytest.mark.s3]
DAY = 86_400
# Seconds after 2026-01-01 of each image: five in January, three in February, one in March.
STARTS = [0, DAY, 2 * DAY, 3 * DAY, 4 * DAY, 40 * DAY, 41 * DAY, 42 * DAY, 70 * DAY]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Generated images wait for an admin's decision."""
    return settings.model_copy(
        update={"approval": ApprovalSettings(hold=HoldPolicy(generated=True))}
    )


@pytest.fixture
def db(ctx: Context) -> ReadModel:
    assert ctx.db is not None
    return ctx.db


@pytest.fixture
async def gateway(ctx: Context, aiohttp_client: Any) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await aiohttp_client(build_app(ctx))
    return client


async def get(gateway: TestClient[Any, Any], token: str, path: str) -> Any:
    response = await gateway.get(path, headers=auth(token))
    assert response.status == 200, await response.text()
    return await response.json()


async def through_the_timeline(
    gateway: TestClient[Any, Any], token: str, query: str = ""
) -> tuple[list[str], list[tuple[str, int]]]:
    """Every id, loading each page of each month the way the gallery does: page 0 by the
    month's bounds, page k by its cursor, never by the pages before it."""
    timeline = await get(gateway, token, f"/api/images/timeline?limit=2{query}")
    return await pages_of(gateway, token, timeline, query)


async def pages_of(
    gateway: TestClient[Any, Any], token: str, timeline: dict[str, Any], query: str = ""
) -> tuple[list[str], list[tuple[str, int]]]:
    """Every id of ``timeline`` (read with ``query`` and limit=2), each page loaded alone with
    its month's bounds and cursor, and the timeline's as_of."""
    # The month's bounds take the place of the list's own (they lie within them).
    filters = "".join(
        f"&{p}" for p in query.split("&") if p and not p.startswith(("since", "until", "as_of"))
    )
    filters += f"&as_of={quote(timeline['as_of'])}"
    seen: list[str] = []
    for bucket in timeline["buckets"]:
        bounds = f"since={quote(bucket['since'])}&until={quote(bucket['until'])}"
        starts = [None, *bucket["cursors"]]
        assert len(starts) == -(-bucket["count"] // 2)  # one cursor per page after the first
        month: list[str] = []
        for cursor in reversed(starts):  # any order: each page stands alone
            path = f"/api/images?limit=2&{bounds}{filters}" + (
                f"&cursor={cursor}" if cursor else ""
            )
            page = await get(gateway, token, path)
            month[0:0] = [d["id"] for d in page["items"]]
        seen += month
    assert timeline["total"] == len(seen)
    return seen, [(b["month"], b["count"]) for b in timeline["buckets"]]


async def test_months_count_the_list_and_their_cursors_load_each_page_alone(
    db: ReadModel, gateway: TestClient[Any, Any], make_key: Callable[..., Awaitable[str]]
) -> None:
    reader = await make_key("read")
    ids = [new_id() for _ in STARTS]
    for n, (image_id, start) in enumerate(zip(ids, STARTS, strict=True)):
        await apply(db, life(image_id, start=start), first_seq=n * 10 + 1)
    listed = [d["id"] for d in (await get(gateway, reader, "/api/images?limit=100"))["items"]]
    assert listed == list(reversed(ids))

    seen, months = await through_the_timeline(gateway, reader)
    assert seen == listed
    assert months == [("2026-03", 1), ("2026-02", 3), ("2026-01", 5)]
    seen, months = await through_the_timeline(gateway, reader, "&order=asc")
    assert seen == ids and months == [("2026-01", 5), ("2026-02", 3), ("2026-03", 1)]
    # Filters are the list's: a window of dates, and words.
    window = "&since=2026-01-03T00:00:00Z&until=2026-02-11T00:00:00Z"
    seen, months = await through_the_timeline(gateway, reader, window)
    assert seen == [ids[5], ids[4], ids[3], ids[2]]
    assert months == [("2026-02", 1), ("2026-01", 3)]
    assert (await through_the_timeline(gateway, reader, "&q=zebra")) == ([], [])

    # A month's bounds hold the images counted: a newer one does not shift its pages.
    before = await get(gateway, reader, "/api/images/timeline?limit=2")
    await apply(db, life(new_id(), start=71 * DAY), first_seq=500)
    newest = before["buckets"][0]
    page = await get(
        gateway, reader, f"/api/images?since={newest['since']}&until={newest['until']}"
    )
    assert [d["id"] for d in page["items"]] == [ids[-1]]


async def test_held_images_are_counted_for_admin_keys_only(
    db: ReadModel, gateway: TestClient[Any, Any], make_key: Callable[..., Awaitable[str]]
) -> None:
    reader, admin = await make_key("read"), await make_key("admin")
    shown, held = new_id(), new_id()
    await apply(db, life(shown, start=0), first_seq=1)
    await apply(db, [event(subjects.GENERATED, held, 5, name="made.png")], first_seq=20)
    assert (await db.get(held) or {})["approval"] == "pending"

    assert (await through_the_timeline(gateway, reader))[0] == [shown]
    assert (await through_the_timeline(gateway, admin))[0] == [held, shown]
    assert (await through_the_timeline(gateway, admin, "&approval=pending"))[0] == [held]
    refused = await gateway.get("/api/images/timeline?approval=pending", headers=auth(reader))
    assert refused.status == 403
    assert "only an admin key" in (await refused.json())["detail"]
    bad = await gateway.get("/api/images/timeline?cursor=abc", headers=auth(reader))
    assert bad.status == 400


async def test_an_image_added_later_shifts_no_page_of_a_timeline_sorted_by_date_taken(
    db: ReadModel, gateway: TestClient[Any, Any], make_key: Callable[..., Awaitable[str]]
) -> None:
    """Sorted by the date taken, an image uploaded after the timeline was read can fall in
    any month: the timeline's as_of (the upload time it counted up to) keeps it out of the
    pages and counts of that timeline, and nothing else does."""
    reader = await make_key("read")
    old = sorted((new_id() for _ in range(3)), reverse=True)  # the list's order: the same
    for n, image_id in enumerate(old):  # date taken (July 2025), then the id, newest first
        await apply(db, life(image_id, start=n * DAY), first_seq=n * 10 + 1)
    taken = "&sort=taken&tag=dog"  # the tag's rows are listed by their own columns
    for query in ("&sort=taken", taken):
        timeline = await get(gateway, reader, f"/api/images/timeline?limit=2{query}")
        assert await pages_of(gateway, reader, timeline, query) == (
            old,
            [("2025-07", 3)],
        )
    as_of = datetime.fromisoformat(timeline["as_of"])  # the database's time of the read

    # Uploaded a millisecond after the read, taken on the same day: July's first by its id.
    later = new_id()
    created = as_of + timedelta(milliseconds=1)
    await apply(db, life(later, start=(created - T0).total_seconds() - 1), first_seq=100)
    # (life() uploads at start + 1 s.) A timeline read from now on counts it.
    await eventually(lambda: _after(db, created), what="the database's clock past its upload")

    for query in ("&sort=taken", taken):
        assert await pages_of(gateway, reader, timeline, query) == (old, [("2025-07", 3)])
        again = f"/api/images/timeline?limit=2{query}&as_of={quote(timeline['as_of'])}"
        counted = await get(gateway, reader, again)
        assert counted["as_of"] == timeline["as_of"]
        assert [(b["month"], b["count"]) for b in counted["buckets"]] == [("2025-07", 3)]
        # Without as_of, the list and a new timeline have it: the month's pages moved.
        month = timeline["buckets"][0]
        bounds = f"since={quote(month['since'])}&until={quote(month['until'])}"
        page = await get(gateway, reader, f"/api/images?limit=2&{bounds}{query}")
        assert [d["id"] for d in page["items"]] == [later, old[0]]
        now = await get(gateway, reader, f"/api/images/timeline?limit=2{query}")
        assert now["as_of"] > timeline["as_of"]
        assert await pages_of(gateway, reader, now, query) == (
            [later, *old],
            [("2025-07", 4)],
        )

    # The viewer's neighbours take the list's filters, as_of with them.
    path = f"/api/images/{old[0]}/neighbours?sort=taken"
    assert (await get(gateway, reader, path))["previous"]["id"] == later
    bounded = await get(gateway, reader, f"{path}&as_of={quote(timeline['as_of'])}")
    assert bounded["previous"] is None and bounded["next"]["id"] == old[1]


async def _after(db: ReadModel, moment: datetime) -> bool:
    return await read_time(db) >= moment


@pytest.mark.parametrize(
    "as_of",
    [
        "yesterday",
        "1700000000",
        "2026-13-01T00:00:00Z",
        "",
        quote("0001-01-01T00:00:00+01:00"),  # before year 1 in UTC
        quote("9999-12-31T23:59:59-01:00"),  # after 9999 in UTC
    ],
)
async def test_a_bad_as_of_is_refused_with_what_was_expected(
    gateway: TestClient[Any, Any], make_key: Callable[..., Awaitable[str]], as_of: str
) -> None:
    reader = await make_key("read")
    for path in ("/api/images", "/api/images/timeline"):
        response = await gateway.get(f"{path}?as_of={as_of}", headers=auth(reader))
        assert response.status == 400, await response.text()
        assert response.content_type == "application/problem+json"
        detail = (await response.json())["detail"]
        assert "as_of" in detail, detail


async def test_an_as_of_still_to_come_counts_up_to_now(
    gateway: TestClient[Any, Any], make_key: Callable[..., Awaitable[str]]
) -> None:
    """Later than the read, it would count images still to come (and keep them out of the
    gallery's "New"): the timeline answers with its own time instead."""
    reader = await make_key("read")
    response = await gateway.get(
        "/api/images/timeline?as_of=2999-01-01T00:00:00Z", headers=auth(reader)
    )
    assert response.status == 200, await response.text()
    answered = datetime.fromisoformat((await response.json())["as_of"])
    assert answered < datetime(2999, 1, 1, tzinfo=UTC)
