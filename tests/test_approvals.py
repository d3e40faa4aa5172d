"""Approvals and the carousel on the real servers, with notify (and, where images must be
real, ingest and caption) running: the policy's holds, decisions one at a time and in bulk,
rejection and its sweep, restoring, the carousel's ETag, and who may do what."""

from __future__ import annotations

import time
from typing import Any

import nats.js.errors
import pytest
from aiohttp.test_utils import TestClient

from bus.core import subjects
from bus.core.envelope import Event, ObjectRef, new_id, now_iso
from bus.core.settings import ApprovalSettings, HoldPolicy, Settings
from bus.gateway.rejections import sweep_rejections
from bus.runtime.context import Context
from bus.runtime.registry import load
from bus.state.readmodel import ImageQuery, QueryVector, ReadModel, SearchFilters
from tests.support.http import auth, form
from tests.support.images import jpeg, png
from tests.support.streams import announce_stored, events, eventually

pytestmark = [pytest.mark.nats, pytest.mark.s3]

HELD_KEY = "heldkey00001"  # a key id the policy holds uploads of
POLICY = HoldPolicy(nsfw_above=0.7, generated=True, sources=("hook",), keys=(HELD_KEY,))


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"approval": ApprovalSettings(hold=POLICY)})


@pytest.fixture
def db(ctx: Context) -> ReadModel:
    assert ctx.db is not None
    return ctx.db


async def until(db: ReadModel, image_id: str, what: str, **expected: Any) -> dict[str, Any]:
    """The image's document once its fields have the ``expected`` values."""

    async def check() -> dict[str, Any] | None:
        doc = await db.get(image_id)
        if doc is not None and all(doc.get(k) == v for k, v in expected.items()):
            return doc
        return None

    doc: dict[str, Any] = await eventually(check, timeout=30, what=f"{image_id}: {what}")
    return doc


async def publish(ctx: Context, topic: str, image_id: str, **data: Any) -> None:
    ref = ObjectRef(ctx.settings.s3.bucket, f"uploads/{image_id}/a.jpg", 3, "e", "image/jpeg")
    event = Event(
        id=f"{topic}-{new_id()}",
        type=topic,
        source="darkroom/test",
        time=now_iso(),
        image_id=image_id,
        object=ref if topic in (subjects.UPLOADED, subjects.GENERATED) else None,
        data=data,
    )
    await ctx.js.publish(ctx.names.subject(topic), event.encode())


async def upload(client: TestClient[Any, Any], token: str, body: bytes) -> dict[str, Any]:
    response = await client.post("/api/uploads", data=form(("a.jpg", body)), headers=auth(token))
    assert response.status == 201, await response.text()
    result: dict[str, Any] = (await response.json())["results"][0]
    return result


async def shown(client: TestClient[Any, Any], token: str, path: str) -> list[str]:
    response = await client.get(path, headers=auth(token))
    assert response.status == 200, await response.text()
    return [item["id"] for item in (await response.json())["items"]]


# --- the policy --------------------------------------------------------------------------


async def test_the_policy_holds_by_nsfw_score_once_the_score_comes(
    ctx: Context, run_function: Any, db: ReadModel
) -> None:
    await run_function(load("notify"))
    risky, safe = new_id(), new_id()
    for image_id in (risky, safe):
        await publish(ctx, subjects.UPLOADED, image_id, name="a.jpg", source="gateway")
    for image_id in (risky, safe):
        doc = await until(db, image_id, "uploaded", approval="pending")
        assert doc["hold"] == ["waiting for its NSFW score"]
    await publish(ctx, subjects.CAPTIONED, risky, caption="a", nsfw=0.93)
    await publish(ctx, subjects.CAPTIONED, safe, caption="b", nsfw=0.02)
    held = await until(db, risky, "captioned", status="ready")
    assert held["approval"] == "pending"
    assert held["hold"] == ["NSFW score 0.93 is above 0.7"]
    ok = await until(db, safe, "captioned", status="ready")
    assert ok["approval"] == "none" and ok["hold"] == []


async def test_the_policy_holds_generated_images_and_uploads_by_source_and_key(
    ctx: Context, run_function: Any, db: ReadModel
) -> None:
    await run_function(load("notify"))
    generated, hooked, keyed, plain = new_id(), new_id(), new_id(), new_id()
    await publish(ctx, subjects.GENERATED, generated, name="0.png")
    await publish(ctx, subjects.UPLOADED, hooked, name="a.jpg", source="hook")
    await publish(ctx, subjects.UPLOADED, keyed, name="a.jpg", source="gateway", key=HELD_KEY)
    await publish(ctx, subjects.UPLOADED, plain, name="a.jpg", source="gateway", key="other0000001")
    for image_id, reason in (
        (generated, "generated"),
        (hooked, "uploaded through hook"),
        (keyed, f"uploaded with key {HELD_KEY}"),
        (plain, None),
    ):
        await publish(ctx, subjects.CAPTIONED, image_id, caption="c", nsfw=0.01)
        doc = await until(db, image_id, "captioned", status="ready")
        assert doc["hold"] == ([reason] if reason else []), image_id
        assert doc["approval"] == ("pending" if reason else "none"), image_id


async def test_every_way_in_records_the_key_an_upload_came_through(
    ctx: Context, client: TestClient[Any, Any], make_key: Any
) -> None:
    """The keys rule needs it: an upload through the API or the webhook names its key in
    the uploaded event (a presigned one does too, from the key that completes it)."""
    token = await make_key("upload")
    key_id = token.split("_")[1]
    await upload(client, token, jpeg(40, 30))
    hooked = await client.post(
        "/api/hooks/ingest?filename=b.png", data=png(30, 20), headers=auth(token)
    )
    assert hooked.status == 201, await hooked.text()
    found = await events(ctx, subjects.UPLOADED, at_least=2)
    assert [e.data.get("key") for e in found] == [key_id, key_id]


async def test_a_held_image_is_neither_counted_nor_generated_from_by_other_keys(
    ctx: Context, client: TestClient[Any, Any], db: ReadModel, admin: str, make_key: Any
) -> None:
    hooked = await client.post(
        "/api/hooks/ingest?filename=h.png", data=png(30, 20), headers=auth(admin)
    )
    assert hooked.status == 201, await hooked.text()
    image_id = (await hooked.json())["id"]
    await until(db, image_id, "held", approval="pending")  # the policy holds hook uploads
    user = await make_key("read", "generate")
    counts = await (await client.get("/api/images/counts", headers=auth(user))).json()
    assert counts["total"] == 0 and counts["approval"]["pending"] == 0
    counts = await (await client.get("/api/images/counts", headers=auth(admin))).json()
    assert counts["total"] == 1 and counts["approval"]["pending"] == 1
    ask = {"prompt": "the same, in blue", "mode": "img2img", "image": image_id}
    refused = await client.post("/api/generations", json=ask, headers=auth(user))
    assert refused.status == 403, await refused.text()
    assert "only an admin key may generate from it" in (await refused.json())["detail"]
    assert await events(ctx, subjects.REQUESTED) == []


async def test_an_uploader_reads_its_own_held_upload_by_id_and_nobody_else_does(
    client: TestClient[Any, Any], db: ReadModel, make_key: Any
) -> None:
    uploader = await make_key("upload", "read")
    hooked = await client.post(
        "/api/hooks/ingest?filename=h.png", data=png(30, 20), headers=auth(uploader)
    )
    assert hooked.status == 201, await hooked.text()
    image_id = (await hooked.json())["id"]
    await until(db, image_id, "held", approval="pending")  # the policy holds hook uploads
    own = await client.get(f"/api/images/{image_id}", headers=auth(uploader))
    assert own.status == 200, await own.text()
    assert "uploaded through hook" in (await own.json())["hold"]
    other = await make_key("upload", "read")
    assert (await client.get(f"/api/images/{image_id}", headers=auth(other))).status == 404
    await until(db, image_id, "captioned", status="ready")  # it has an image embedding
    similar = f"/api/images/{image_id}/similar"
    assert (await client.get(similar, headers=auth(uploader))).status == 200
    assert (await client.get(similar, headers=auth(other))).status == 404
    listed = await (await client.get("/api/images", headers=auth(uploader))).json()
    assert listed["items"] == []  # lists keep to the shown images, for every key


async def test_decisions_win_by_stream_order_and_a_deletion_drops_the_row(
    db: ReadModel,
) -> None:
    image_id = new_id()

    def event(topic: str, **data: Any) -> Event:
        return Event(
            id=new_id(),
            type=topic,
            source="darkroom/test",
            time=now_iso(),
            image_id=image_id,
            data=data,
        )

    await db.project(event(subjects.GENERATED, name="0.png"), 1)
    assert (await db.get(image_id) or {})["approval"] == "pending"
    assert await db.project(event(subjects.REJECTED, by="k1", reason="no"), 5)
    assert not await db.project(event(subjects.APPROVED, by="k2", reason="late"), 4)
    doc = await db.get(image_id) or {}
    assert doc["approval"] == "rejected"
    assert doc["decision"]["by"] == "k1" and doc["decision"]["reason"] == "no"
    assert await db.project(event(subjects.APPROVED, by="k2", reason="yes"), 6)
    assert (await db.get(image_id) or {})["approval"] == "approved"
    assert await db.project(event(subjects.DELETED), 7)
    assert await db.get(image_id) is None


async def test_lists_and_searches_for_other_keys_keep_to_the_shown_images(
    db: ReadModel,
) -> None:
    held, plain = new_id(), new_id()
    vector = {"kind": "image", "model": "m", "vector": [1.0, 0.0, 0.0, 0.0]}
    for seq, image_id in enumerate((held, plain)):
        topic = subjects.GENERATED if image_id == held else subjects.UPLOADED
        for n, (kind, data) in enumerate(
            ((topic, {"name": "a"}), (subjects.CAPTIONED, {"nsfw": 0.0, "embeddings": [vector]}))
        ):
            event = Event(
                id=new_id(), type=kind, source="t", time=now_iso(), image_id=image_id, data=data
            )
            await db.project(event, 10 * seq + n + 1)
    assert (await db.get(held) or {})["approval"] == "pending"
    everything = await db.page(ImageQuery())
    assert sorted(d["id"] for d in everything.items) == sorted([held, plain])
    assert [d["id"] for d in (await db.page(ImageQuery(shown_only=True))).items] == [plain]
    query = [QueryVector("image", "m", [1.0, 0.0, 0.0, 0.0])]
    assert len((await db.search(query)).items) == 2
    found = await db.search(query, SearchFilters(shown_only=True))
    assert [d["id"] for d in found.items] == [plain]


# --- decisions, the queue and the carousel -----------------------------------------------


async def test_a_held_image_waits_in_the_queue_until_approved_then_shows_in_the_carousel(
    client: TestClient[Any, Any], ctx: Context, db: ReadModel, admin: str, make_key: Any
) -> None:
    viewer = await make_key("read")
    generated = new_id()
    key = subjects.generated_key(new_id(), 0)
    await announce_stored(ctx, subjects.GENERATED, generated, key, png(), "image/png")
    uploaded = (await upload(client, admin, jpeg(color=(30, 160, 40))))["id"]
    await until(db, generated, "generated, held", status="ready", approval="pending")
    await until(db, uploaded, "uploaded, shown", status="ready", approval="none")

    assert await shown(client, admin, "/api/approvals") == [generated]
    assert await shown(client, viewer, "/api/carousel") == [uploaded]
    assert await shown(client, viewer, "/api/images") == [uploaded]
    assert sorted(await shown(client, admin, "/api/images")) == sorted([generated, uploaded])
    refused = await client.get("/api/images?approval=pending", headers=auth(viewer))
    assert refused.status == 403 and "only an admin key" in (await refused.json())["detail"]
    pixels = await client.get(f"/api/images/{generated}/display", headers=auth(viewer))
    assert pixels.status == 404  # a held image is not found by other keys

    response = await client.post(
        f"/api/images/{generated}/approve", json={"reason": "fine"}, headers=auth(admin)
    )
    assert response.status == 200
    decided = await response.json()
    admin_id = admin.split("_")[1]
    assert decided["decision"] == "approved" and decided["previous"] == "pending"
    assert decided["by"] == admin_id and decided["changed"] is True
    doc = await until(db, generated, "approved", approval="approved")
    assert doc["decision"]["reason"] == "fine" and doc["decision"]["event"] == decided["event"]
    assert sorted(await shown(client, viewer, "/api/carousel")) == sorted([generated, uploaded])
    assert await shown(client, admin, "/api/approvals") == []
    [audit] = [
        e for e in await events(ctx, subjects.APPROVED, at_least=1) if e.image_id == generated
    ]
    assert audit.data == {
        "decision": "approved",
        "previous": "pending",
        "by": admin_id,
        "reason": "fine",
    }
    assert audit.object is not None
    assert (await ctx.store.get_json(audit.object.key))["event"] == audit.id
    again = await client.post(f"/api/images/{generated}/approve", json={}, headers=auth(admin))
    assert (await again.json())["changed"] is False


async def test_the_sweep_spares_an_image_decided_again_since_the_catalogue_said_rejected(
    client: TestClient[Any, Any], ctx: Context, db: ReadModel, admin: str
) -> None:
    """The sweep lists rejections from the catalogue, which may lag: it acts only on what
    the stored decision (written before its event) still says."""
    result = await upload(client, admin, jpeg(color=(20, 90, 90)))
    image_id = result["id"]
    await until(db, image_id, "ready", status="ready")
    response = await client.post(
        f"/api/images/{image_id}/reject", json={"reason": "no"}, headers=auth(admin)
    )
    assert response.status == 200
    await until(db, image_id, "rejected", approval="rejected")
    # An approval stored, its event not projected yet (notify is behind).
    key = subjects.image_key(image_id, subjects.APPROVAL_DOC)
    record = {**await ctx.store.get_json(key), "decision": "approved", "time": now_iso()}
    await ctx.store.put_json(key, record)
    keep_s = ctx.settings.approval.reject_keep_days * 86_400
    report = await sweep_rejections(ctx, time.time() + keep_s + 60)
    assert report.deleted == 0
    assert await ctx.store.list_keys(f"uploads/{image_id}/") != []


async def test_rejecting_drops_the_renditions_and_hides_the_original_until_the_sweep(
    client: TestClient[Any, Any], ctx: Context, db: ReadModel, admin: str, make_key: Any
) -> None:
    viewer = await make_key("read")
    body = jpeg(color=(200, 40, 40))
    result = await upload(client, admin, body)
    image_id = result["id"]
    await until(db, image_id, "ready", status="ready")
    assert await shown(client, viewer, "/api/carousel") == [image_id]

    response = await client.post(
        f"/api/images/{image_id}/reject", json={"reason": "blurry"}, headers=auth(admin)
    )
    assert response.status == 200 and (await response.json())["decision"] == "rejected"
    kept = await ctx.store.list_keys(f"images/{image_id}/")
    assert sorted(k.rsplit("/", 1)[1] for k in kept) == ["approval.json", "caption.json"]
    await until(db, image_id, "rejected", approval="rejected")
    for path in ("display", "thumbnail"):
        gone = await client.get(f"/api/images/{image_id}/{path}", headers=auth(admin))
        assert gone.status == 404 and "rejected" in (await gone.json())["detail"]
    hidden = await client.get(f"/api/images/{image_id}/original", headers=auth(viewer))
    assert hidden.status == 404
    original = await client.get(f"/api/images/{image_id}/original", headers=auth(admin))
    assert original.status == 200 and await original.read() == body
    assert await shown(client, viewer, "/api/images") == []
    assert await shown(client, viewer, "/api/carousel") == []
    assert await shown(client, admin, "/api/images?approval=rejected") == [image_id]

    keep_s = ctx.settings.approval.reject_keep_days * 86_400
    assert not await sweep_rejections(ctx, time.time())  # kept until its time is up
    report = await sweep_rejections(ctx, time.time() + keep_s + 60)
    assert (report.deleted, report.claims_released) == (1, 1)
    assert await ctx.store.list_keys(f"images/{image_id}/") == []
    assert await ctx.store.list_keys(f"uploads/{image_id}/") == []
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await ctx.digests.get(result["sha256"])
    await eventually(lambda: _gone(db, image_id), timeout=30, what="the row deleted")
    again = await upload(client, admin, body)  # the same bytes are new again
    assert again["id"] != image_id and again["duplicate"] is False


async def test_approving_a_rejected_image_restores_its_renditions(
    client: TestClient[Any, Any], ctx: Context, db: ReadModel, admin: str
) -> None:
    image_id = (await upload(client, admin, jpeg(color=(20, 20, 180))))["id"]
    await until(db, image_id, "ready", status="ready")
    response = await client.post(
        f"/api/images/{image_id}/reject", json={"reason": "oops"}, headers=auth(admin)
    )
    assert response.status == 200
    await until(db, image_id, "rejected", approval="rejected")
    response = await client.post(f"/api/images/{image_id}/approve", json={}, headers=auth(admin))
    assert response.status == 200 and (await response.json())["restored"] is True
    await until(db, image_id, "approved", approval="approved")

    async def displayed() -> bool:
        got = await client.get(f"/api/images/{image_id}/display", headers=auth(admin))
        return got.status == 200

    await eventually(displayed, timeout=30, what="the display rendition made again")
    assert await shown(client, admin, "/api/carousel") == [image_id]


async def test_bulk_decisions_report_each_image(
    client: TestClient[Any, Any], ctx: Context, db: ReadModel, admin: str
) -> None:
    ids = []
    for n in range(3):
        ids.append(new_id())
        await announce_stored(
            ctx,
            subjects.GENERATED,
            ids[-1],
            subjects.generated_key(new_id(), 0),
            png(color=(n * 60, 10, 10, 255)),
            "image/png",
        )
    for image_id in ids:
        await until(db, image_id, "held", status="ready", approval="pending")
    body = {"approve": ids[:2], "reject": [ids[2], "nosuchimage"], "reason": "triage"}
    response = await client.post("/api/approvals", json=body, headers=auth(admin))
    assert response.status == 207
    results = (await response.json())["results"]
    assert [(r["image_id"], r.get("decision"), r.get("status")) for r in results] == [
        (ids[0], "approved", None),
        (ids[1], "approved", None),
        (ids[2], "rejected", None),
        ("nosuchimage", None, 404),
    ]
    for image_id, approval in zip(ids, ("approved", "approved", "rejected"), strict=True):
        doc = await until(db, image_id, approval, approval=approval)
        assert doc["decision"]["reason"] == "triage"
    for wrong, says in (
        ({"approve": [ids[0]], "reject": [ids[0]], "reason": "x"}, "approved and rejected"),
        ({"reject": [ids[0]]}, "reason is required"),
    ):
        refused = await client.post("/api/approvals", json=wrong, headers=auth(admin))
        assert refused.status == 422 and says in (await refused.json())["detail"]


async def test_only_admin_keys_see_the_queue_and_decide(
    client: TestClient[Any, Any], make_key: Any
) -> None:
    for scopes in (("read",), ("read", "upload", "generate")):
        key = await make_key(*scopes)
        for method, path, body in (
            ("GET", "/api/approvals", None),
            ("POST", "/api/approvals", {"approve": ["x"]}),
            ("POST", "/api/images/x/approve", {}),
            ("POST", "/api/images/x/reject", {"reason": "no"}),
        ):
            response = await client.request(method, path, json=body, headers=auth(key))
            assert response.status == 403, (scopes, path)
            assert "lacks the 'admin' scope" in (await response.json())["detail"]


async def test_the_carousel_etag_changes_with_the_shown_images_and_answers_304(
    client: TestClient[Any, Any], db: ReadModel, admin: str, make_key: Any
) -> None:
    viewer = await make_key("read")
    ids = [(await upload(client, admin, jpeg(color=(40 * n, 90, 90))))["id"] for n in range(3)]
    for image_id in ids:
        await until(db, image_id, "ready", status="ready")
    path = "/api/carousel?shuffle=true&seed=7&interval=30&overlay=caption"
    first = await client.get(path, headers=auth(viewer))
    assert first.status == 200
    page = await first.json()
    assert page["settings"] == {
        "interval": 30,
        "shuffle": True,
        "seed": 7,
        "sort": "taken",
        "order": "desc",
        "overlay": "caption",
    }
    assert page["total"] == 3 and sorted(i["id"] for i in page["items"]) == sorted(ids)
    slide = page["items"][0]
    assert slide["display"] == f"/api/images/{slide['id']}/display"
    assert slide["overlay"] == slide["caption"] and slide["caption"]
    etag = first.headers["ETag"]
    same = await client.get(path, headers=auth(viewer) | {"If-None-Match": etag})
    assert same.status == 304 and same.headers["ETag"] == etag

    order, cursor = [], ""
    for _ in range(3):  # one at a time, the same shuffled order
        got = await (await client.get(f"{path}&limit=1{cursor}", headers=auth(viewer))).json()
        order += [i["id"] for i in got["items"]]
        cursor = f"&cursor={got['next_cursor']}" if got["next_cursor"] else ""
    assert order == [i["id"] for i in page["items"]]

    response = await client.post(
        f"/api/images/{ids[0]}/reject", json={"reason": "no"}, headers=auth(admin)
    )
    assert response.status == 200
    await until(db, ids[0], "rejected", approval="rejected")
    changed = await client.get(path, headers=auth(viewer) | {"If-None-Match": etag})
    assert changed.status == 200 and changed.headers["ETag"] != etag
    assert (await changed.json())["total"] == 2


async def _gone(db: ReadModel, image_id: str) -> bool:
    return await db.get(image_id) is None
