"""GET /api/images/timeline: the gallery's months with counts, and the cursors that load any
page of a month directly, for the same filters and visibility as GET /api/images."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from bus.core import subjects
from bus.core.envelope import new_id
from bus.core.settings import ApprovalSettings, HoldPolicy, Settings
from bus.gateway.app import build_app
from bus.runtime.context import Context
from bus.state.readmodel import ReadModel
from tests.support.http import auth
from tests.test_readmodel import apply, event, life

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
    # The month's bounds take the place of the list's own (they lie within them).
    filters = "".join(
        f"&{p}" for p in query.split("&") if p and not p.startswith(("since", "until"))
    )
    seen: list[str] = []
    for bucket in timeline["buckets"]:
        bounds = f"since={bucket['since']}&until={bucket['until']}".replace("+", "%2B")
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
