"""An image's lineage (job, parent, children, siblings) and its neighbours in a list, through
the API on the real servers, with notify projecting the events."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from bus.core import subjects
from bus.core.envelope import Event, ObjectRef, new_id
from bus.core.settings import ApprovalSettings, HoldPolicy, Settings
from bus.gateway.app import build_app
from bus.runtime.context import Context
from bus.runtime.registry import load
from bus.state.readmodel import ReadModel
from tests.support.http import auth
from tests.support.streams import eventually

pytestmark = [pytest.mark.nats, pytest.mark.s3]

HELD_KEY = "heldkey00001"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    policy = HoldPolicy(keys=(HELD_KEY,))
    return settings.model_copy(update={"approval": ApprovalSettings(hold=policy)})


@pytest.fixture
async def api(ctx: Context, aiohttp_client: Any, run_function: Any) -> TestClient[Any, Any]:
    await run_function(load("notify"))
    client: TestClient[Any, Any] = await aiohttp_client(build_app(ctx))
    return client


async def announce(ctx: Context, topic: str, image_id: str, time: str, **data: Any) -> None:
    ref = ObjectRef(ctx.settings.s3.bucket, f"uploads/{image_id}/a.png", 3, "e", "image/png")
    event = Event(
        id=f"{topic}-{image_id}",
        type=topic,
        source="darkroom/test",
        time=time,
        image_id=image_id,
        object=ref,
        data={"name": f"{image_id}.png", **data},
    )
    await ctx.js.publish(ctx.names.subject(topic), event.encode())


async def projected(db: ReadModel, *image_ids: str) -> None:
    async def all_there() -> bool:
        return all([await db.get(i) is not None for i in image_ids])

    await eventually(all_there, timeout=30, what=f"{len(image_ids)} images projected")


async def get(client: TestClient[Any, Any], token: str, path: str) -> dict[str, Any]:
    response = await client.get(path, headers=auth(token))
    assert response.status == 200, await response.text()
    answer: dict[str, Any] = await response.json()
    return answer


def ids(docs: list[dict[str, Any]]) -> list[str]:
    return [d["id"] for d in docs]


async def test_lineage_names_the_parent_children_and_siblings_a_key_may_see(
    api: TestClient[Any, Any], ctx: Context, admin: str, make_key: Any
) -> None:
    assert ctx.db is not None
    reader = await make_key("read")
    source, job, other_job = new_id(), new_id(), new_id()
    first, second, held = (subjects.generated_image_id(job, i) for i in range(3))
    remix = subjects.generated_image_id(other_job, 0)
    await announce(ctx, subjects.UPLOADED, source, "2026-01-01T00:00:00.000Z", source="gateway")
    for index, (image_id, key) in enumerate(((first, None), (second, None), (held, HELD_KEY))):
        lineage = {"job_id": job, "parent": source, "mode": "img2img", "prompt": "a fox"}
        extra = {"key": key} if key else {}
        moment = f"2026-01-02T00:00:0{index}.000Z"
        await announce(ctx, subjects.GENERATED, image_id, moment, lineage=lineage, **extra)
    lineage = {"job_id": other_job, "parent": first, "mode": "remix", "prompt": None}
    await announce(ctx, subjects.GENERATED, remix, "2026-01-03T00:00:00.000Z", lineage=lineage)
    await projected(ctx.db, source, first, second, held, remix)

    of_source = await get(api, admin, f"/api/images/{source}/lineage")
    assert (of_source["job_id"], of_source["parent_id"], of_source["parent"]) == (None,) * 3
    assert ids(of_source["children"]) == [held, second, first]  # the newest first
    assert of_source["siblings"] == []
    shown = await get(api, reader, f"/api/images/{source}/lineage")
    assert ids(shown["children"]) == [second, first]  # the held one is an admin's only

    of_first = await get(api, reader, f"/api/images/{first}/lineage")
    assert of_first["job_id"] == job and of_first["mode"] == "img2img"
    assert of_first["parent_id"] == source and of_first["parent"]["id"] == source
    assert ids(of_first["children"]) == [remix]
    assert ids(of_first["siblings"]) == [second]
    of_remix = await get(api, admin, f"/api/images/{remix}/lineage")
    assert of_remix["parent"]["id"] == first and of_remix["siblings"] == []

    hidden = await api.get(f"/api/images/{held}/lineage", headers=auth(reader))
    assert hidden.status == 404


async def test_neighbours_follow_the_lists_filters_and_order_through_equal_times(
    api: TestClient[Any, Any], ctx: Context, admin: str, make_key: Any
) -> None:
    assert ctx.db is not None
    reader = await make_key("read")
    same = "2026-02-01T10:00:00.000Z"
    a, b, c, d = sorted(new_id() for _ in range(4))  # b and c share a time: ids break the tie
    held = new_id()
    times = {a: "2026-02-01T09:00:00.000Z", b: same, c: same, d: "2026-02-01T11:00:00.000Z"}
    for image_id, moment in times.items():
        await announce(ctx, subjects.UPLOADED, image_id, moment, source="gateway")
    await announce(
        ctx, subjects.UPLOADED, held, "2026-02-01T10:30:00.000Z", source="gateway", key=HELD_KEY
    )
    await projected(ctx.db, a, b, c, d, held)

    listed = ids((await get(api, reader, "/api/images?limit=10"))["items"])
    assert listed == [d, c, b, a]  # newest first; at equal times the higher id first

    async def around(token: str, image_id: str, query: str = "") -> tuple[Any, Any]:
        found = await get(api, token, f"/api/images/{image_id}/neighbours{query}")
        previous, following = found["previous"], found["next"]
        return (previous and previous["id"], following and following["id"])

    assert await around(reader, d) == (None, c)
    assert await around(reader, c) == (d, b)
    assert await around(reader, b) == (c, a)
    assert await around(reader, a) == (b, None)
    assert await around(reader, b, "?order=asc") == (a, c)
    assert await around(admin, c) == (held, b)  # the admin's list has the held image
    assert await around(reader, b, f"?until={same}") == (None, a)
    assert await around(reader, b, "?q=%21%21") == (None, None)  # no word: an empty list

    bad = await api.get(f"/api/images/{b}/neighbours?order=sideways", headers=auth(reader))
    assert bad.status == 400
    forbidden = await api.get(f"/api/images/{b}/neighbours?approval=pending", headers=auth(reader))
    assert forbidden.status == 403
