"""What an upload said (its source, the API key it came through, the SHA-256 of its bytes)
survives its events aging out of the stream: the original keeps it as S3 user metadata, and
a store-only ``darkroom reindex`` reads it back, so the policy's holds by source and key
stand, and the rejection sweep can still release the digest claim."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import nats.js.errors
import pytest
from aiohttp.test_utils import TestClient

from bus.core.settings import ApprovalSettings, HoldPolicy, Settings
from bus.gateway.rejections import sweep_rejections
from bus.ops.reindex import reindex
from bus.runtime.context import Context, open_context
from bus.state.keys import record_for_token, store_key
from bus.state.readmodel import ReadModel
from tests.support.http import auth, form
from tests.support.images import jpeg, png
from tests.support.streams import eventually, settled
from tests.test_ingest import post_form, presign

pytestmark = [pytest.mark.nats, pytest.mark.s3]

HELD_KEY = "heldfacts001"  # the policy holds this key's uploads
HELD_TOKEN = f"drk_{HELD_KEY}_{'s' * 40}"
POLICY = HoldPolicy(sources=("hook",), keys=(HELD_KEY,))
FACTS = ("source", "key", "sha256", "approval", "hold")


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"approval": ApprovalSettings(hold=POLICY)})


@pytest.fixture
def db(ctx: Context) -> ReadModel:
    assert ctx.db is not None
    return ctx.db


async def until(db: ReadModel, image_id: str, **expected: Any) -> dict[str, Any]:
    """The image's document once its fields have the ``expected`` values."""

    async def check() -> dict[str, Any] | None:
        doc = await db.get(image_id)
        if doc is not None and all(doc.get(k) == v for k, v in expected.items()):
            return doc
        return None

    doc: dict[str, Any] = await eventually(check, timeout=30, what=f"{image_id}: {expected}")
    return doc


async def uploaded(client: TestClient[Any, Any], token: str, body: bytes) -> dict[str, Any]:
    response = await client.post("/api/uploads", data=form(("a.jpg", body)), headers=auth(token))
    assert response.status == 201, await response.text()
    result: dict[str, Any] = (await response.json())["results"][0]
    return result


async def reindex_from_the_store(ctx: Context, settings: Settings) -> None:
    """The history aged out of the stream; the read model is rebuilt from the store alone."""
    await ctx.js.purge_stream(ctx.names.stream)
    async with open_context(settings, [], "reindex", declare=False, database=True) as fresh:
        summary = await reindex(fresh, progress=False)
    assert summary.events == 0


async def test_a_store_only_reindex_keeps_how_each_upload_came_in(
    ctx: Context, client: TestClient[Any, Any], db: ReadModel, admin: str, settings: Settings
) -> None:
    await store_key(ctx.api_keys, record_for_token(HELD_TOKEN, "held", ("upload",)))
    admin_id = admin.split("_")[1]
    keyed = (await uploaded(client, HELD_TOKEN, jpeg(60, 40, (200, 30, 30))))["id"]
    plain = (await uploaded(client, admin, jpeg(60, 40, (30, 200, 30))))["id"]
    hooked = await client.post(
        "/api/hooks/ingest?filename=b.png", data=png(30, 20), headers=auth(admin)
    )
    assert hooked.status == 201, await hooked.text()
    photo = jpeg(64, 48, (30, 30, 200))
    ticket = await presign(client, HELD_TOKEN, photo)  # a server-side copy makes the original
    await post_form(ticket, photo)
    done = await client.post(ticket["complete_url"], headers=auth(HELD_TOKEN))
    assert done.status == 201, await done.text()
    expected = {
        keyed: ("gateway", HELD_KEY, "pending"),
        plain: ("gateway", admin_id, "none"),
        (await hooked.json())["id"]: ("hook", admin_id, "pending"),
        ticket["id"]: ("presigned", HELD_KEY, "pending"),
    }
    for image_id in expected:
        await until(db, image_id, status="ready")
    await settled(ctx, "ingest", "caption", "notify")
    before = {}
    for image_id, (source, key, approval) in expected.items():
        doc = await until(db, image_id, status="ready")
        assert (doc["source"], doc["key"], doc["approval"]) == (source, key, approval), doc
        before[image_id] = {k: doc.get(k) for k in FACTS}
    assert before[ticket["id"]]["sha256"] == hashlib.sha256(photo).hexdigest()
    [copied] = await ctx.store.list_keys(f"uploads/{ticket['id']}/")
    stored = await ctx.store.stat(copied)  # its metadata replaced, its content type kept
    assert stored is not None and stored.content_type == "image/jpeg"

    await reindex_from_the_store(ctx, settings)
    for image_id in expected:
        doc = await db.get(image_id)
        assert doc is not None and doc["status"] == "ready"
        assert {k: doc.get(k) for k in FACTS} == before[image_id], image_id


async def test_the_sweep_releases_the_claim_of_a_rejected_image_rebuilt_from_the_store(
    ctx: Context, client: TestClient[Any, Any], db: ReadModel, admin: str, settings: Settings
) -> None:
    body = jpeg(60, 40, (120, 120, 20))
    result = await uploaded(client, admin, body)
    image_id = result["id"]
    await until(db, image_id, status="ready")
    response = await client.post(
        f"/api/images/{image_id}/reject", json={"reason": "no"}, headers=auth(admin)
    )
    assert response.status == 200, await response.text()
    await until(db, image_id, approval="rejected")
    await settled(ctx, "ingest", "caption", "notify")

    await reindex_from_the_store(ctx, settings)
    doc = await db.get(image_id)
    assert doc is not None and doc["approval"] == "rejected"
    assert doc.get("sha256") == result["sha256"]
    keep_s = ctx.settings.approval.reject_keep_days * 86_400
    report = await sweep_rejections(ctx, time.time() + keep_s + 60)
    assert (report.deleted, report.claims_released) == (1, 1)
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await ctx.digests.get(result["sha256"])
    again = await uploaded(client, admin, body)  # the same bytes are a new image again
    assert again["id"] != image_id and again["duplicate"] is False
