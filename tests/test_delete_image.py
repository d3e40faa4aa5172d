"""Deleting an image through the API, on the real servers with ingest, caption and notify:
its objects, its digest claim and its catalogue row go, ``deleted`` is announced, and the
same bytes make a new image when uploaded again."""

from __future__ import annotations

from typing import Any

import nats.js.errors
import pytest
from aiohttp.test_utils import TestClient

from bus.core import subjects
from bus.core.envelope import new_id
from bus.gateway.app import build_app
from bus.runtime.context import Context
from bus.runtime.registry import load
from bus.state.readmodel import ReadModel
from tests.support.http import auth, form
from tests.support.images import jpeg
from tests.support.streams import announce_stored, events, eventually

pytestmark = [pytest.mark.nats, pytest.mark.s3]


@pytest.fixture
def db(ctx: Context) -> ReadModel:
    assert ctx.db is not None
    return ctx.db


async def upload_ready(
    client: TestClient[Any, Any], db: ReadModel, token: str, body: bytes
) -> dict[str, Any]:
    response = await client.post("/api/uploads", data=form(("a.jpg", body)), headers=auth(token))
    assert response.status == 201, await response.text()
    result: dict[str, Any] = (await response.json())["results"][0]

    async def ready() -> bool:
        doc = await db.get(result["id"])
        return doc is not None and doc["status"] == "ready"

    await eventually(ready, timeout=60, what=f"{result['id']} ready")
    return result


async def test_deleting_an_image_removes_its_objects_claim_and_row(
    client: TestClient[Any, Any], ctx: Context, db: ReadModel, admin: str
) -> None:
    body = jpeg(color=(30, 160, 90))
    result = await upload_ready(client, db, admin, body)
    image_id = result["id"]
    doc = await db.get(image_id)
    assert doc is not None
    original = doc["original"]["key"]
    assert await ctx.store.list_keys(f"images/{image_id}/")  # renditions, caption...

    response = await client.delete(f"/api/images/{image_id}", headers=auth(admin))
    assert response.status == 202, await response.text()
    answer = await response.json()
    assert answer == {
        "image_id": image_id,
        "event": f"deleted-{image_id}",
        "claim_released": True,
    }
    assert await ctx.store.list_keys(f"images/{image_id}/") == []
    assert await ctx.store.list_keys(f"uploads/{image_id}/") == []
    assert await ctx.store.stat(original) is None
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await ctx.digests.get(result["sha256"])
    announced = [e for e in await events(ctx, subjects.DELETED, at_least=1) if e.image_id]
    assert [(e.id, e.image_id) for e in announced] == [(f"deleted-{image_id}", image_id)]

    async def gone() -> bool:
        return await db.get(image_id) is None

    await eventually(gone, timeout=60, what="the row deleted")
    missing = await client.get(f"/api/images/{image_id}", headers=auth(admin))
    assert missing.status == 404
    again = await client.delete(f"/api/images/{image_id}", headers=auth(admin))
    assert again.status == 404

    fresh = await upload_ready(client, db, admin, body)  # the same bytes are new again
    assert fresh["id"] != image_id and fresh["duplicate"] is False


async def test_only_an_admin_deletes_and_never_an_image_still_in_work(
    client: TestClient[Any, Any], ctx: Context, db: ReadModel, admin: str, make_key: Any
) -> None:
    result = await upload_ready(client, db, admin, jpeg(color=(10, 10, 240)))
    uploader = await make_key("upload", "read")
    refused = await client.delete(f"/api/images/{result['id']}", headers=auth(uploader))
    assert refused.status == 403
    assert await db.get(result["id"]) is not None

    unknown = await client.delete(f"/api/images/{new_id()}", headers=auth(admin))
    assert unknown.status == 404
    assert unknown.content_type == "application/problem+json"


async def test_an_image_still_in_work_is_not_deleted(
    ctx: Context, db: ReadModel, aiohttp_client: Any, run_function: Any, admin: str
) -> None:
    """Ingest is enabled but has not run: a deletion now would be undone when it does."""
    await run_function(load("notify"))
    client = await aiohttp_client(build_app(ctx))
    image_id = new_id()
    await announce_stored(
        ctx, subjects.UPLOADED, image_id, f"uploads/{image_id}/a.jpg", jpeg(), "image/jpeg"
    )

    async def listed() -> bool:
        doc = await db.get(image_id)
        return doc is not None and doc["status"] == "uploaded"

    await eventually(listed, timeout=30, what="the upload projected")
    response = await client.delete(f"/api/images/{image_id}", headers=auth(admin))
    assert response.status == 409
    assert "waiting for ingest" in (await response.json())["detail"]
    assert await ctx.store.list_keys(f"uploads/{image_id}/") == [f"uploads/{image_id}/a.jpg"]
