"""Approvals, hardened, on the real servers: held images stay out of every read by id and
their generations' previews out of other keys' sight; decisions on one image are taken one
at a time, and one whose event could not be published is not kept; the carousel's ETag is
cheap and still right; a reindex from the store alone keeps what the upload said; the read
model remembers the policy it was judged with."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from bus.core import subjects
from bus.core.envelope import Event, decode, new_id, now_iso
from bus.core.settings import ApprovalSettings, HoldPolicy, Settings
from bus.gateway.app import build_app
from bus.gateway.approvals import decide
from bus.gateway.problems import Problem
from bus.infra.nats_conn import connect
from bus.ops.reindex import reindex
from bus.runtime.context import Context
from bus.runtime.registry import load
from bus.state.readmodel import ReadModel, open_read_model
from tests.support.http import auth
from tests.support.images import png
from tests.support.streams import eventually, read_subject
from tests.test_approvals import publish

pytestmark = [pytest.mark.nats, pytest.mark.s3]

Api = TestClient[Any, Any]
POLICY = HoldPolicy(generated=True)
WAIT_S = 20.0  # a safety net for reads that must succeed; never what a test asserts


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"approval": ApprovalSettings(hold=POLICY)})


@pytest.fixture
def db(ctx: Context) -> ReadModel:
    assert ctx.db is not None
    return ctx.db


@pytest.fixture
async def api(ctx: Context, aiohttp_client: Any, run_function: Any) -> Api:
    """The gateway in-process with notify behind it (no ingest: nothing here needs pixels
    made)."""
    await run_function(load("notify"))
    client: Api = await aiohttp_client(build_app(ctx))
    return client


async def until(db: ReadModel, image_id: str, what: str, **expected: Any) -> dict[str, Any]:
    """The image's document once its fields have the ``expected`` values."""

    async def check() -> dict[str, Any] | None:
        doc = await db.get(image_id)
        if doc is not None and all(doc.get(k) == v for k, v in expected.items()):
            return doc
        return None

    doc: dict[str, Any] = await eventually(check, timeout=WAIT_S, what=f"{image_id}: {what}")
    return doc


async def generated_image(ctx: Context, db: ReadModel) -> str:
    """A generated image, stored and announced as the generate function does: the policy
    holds it (pending)."""
    image_id = new_id()
    ref = await ctx.store.put_bytes(subjects.generated_key(new_id(), 0), png(), "image/png")
    event = Event(
        id=f"generated-{image_id}",
        type=subjects.GENERATED,
        source="darkroom/test",
        time=now_iso(),
        subject=image_id,
        object=ref,
        image_id=image_id,
        data={"name": f"{image_id}.png", "source": "generate"},
    )
    await ctx.js.publish(ctx.names.subject(subjects.GENERATED), event.encode())
    await until(db, image_id, "held", approval="pending")
    return image_id


# --- 1. held images stay out of reads by id -----------------------------------------------


async def test_a_held_images_document_and_pixels_are_not_found_for_other_keys(
    ctx: Context, api: Api, db: ReadModel, admin: str, make_key: Any
) -> None:
    viewer = await make_key("read")
    image_id = await generated_image(ctx, db)
    unknown = await api.get("/api/images/nosuchimage01", headers=auth(viewer))
    for path in ("", "/display", "/thumbnail", "/original"):
        hidden = await api.get(f"/api/images/{image_id}{path}", headers=auth(viewer))
        assert hidden.status == 404, (path, await hidden.text())
        detail = (await hidden.json())["detail"]
        # Worded as for an id that does not exist: that the image waits does not leak.
        assert detail == (await unknown.json())["detail"].replace("nosuchimage01", image_id)
    seen = await api.get(f"/api/images/{image_id}", headers=auth(admin))
    assert seen.status == 200 and (await seen.json())["approval"] == "pending"

    approved = await api.post(f"/api/images/{image_id}/approve", json={}, headers=auth(admin))
    assert approved.status == 200, await approved.text()
    await until(db, image_id, "approved", approval="approved")
    shown = await api.get(f"/api/images/{image_id}", headers=auth(viewer))
    assert shown.status == 200 and (await shown.json())["approval"] == "approved"


def progress_report(job_id: str) -> dict[str, Any]:
    """A generate step report with a preview, as the runner's progress throttle sends it."""
    return {
        "stage": "generate",
        "event_id": f"requested-{job_id}",
        "job_id": job_id,
        "image_id": None,
        "step": 2,
        "total": 4,
        "message": "denoising",
        "time": now_iso(),
        "preview_type": "image/jpeg",
        "preview_b64": base64.b64encode(b"\xff\xd8 a tiny jpeg").decode(),
    }


async def progress_frame(api: Api, token: str, job_id: str, ready: asyncio.Event) -> dict[str, Any]:
    """The first ``progress`` frame of the job's event stream (``ready`` is set once the
    stream is live)."""
    async with (
        asyncio.timeout(WAIT_S),
        api.get(f"/api/events?job={job_id}", headers=auth(token)) as response,
    ):
        assert response.status == 200
        event = None
        async for raw in response.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
                if event == "ready":
                    ready.set()
            elif line.startswith("data: ") and event == "progress":
                frame: dict[str, Any] = orjson.loads(line.removeprefix("data: "))
                return frame
    raise AssertionError("the stream ended before a progress frame")


async def test_previews_of_generations_the_policy_holds_go_to_admin_keys_only(
    ctx: Context, api: Api, admin: str, make_key: Any
) -> None:
    viewer = await make_key("read")
    job_id = new_id()
    ready = [asyncio.Event(), asyncio.Event()]
    frames = [
        asyncio.create_task(progress_frame(api, token, job_id, flag))
        for token, flag in zip((viewer, admin), ready, strict=True)
    ]
    for flag in ready:
        await asyncio.wait_for(flag.wait(), WAIT_S)
    await ctx.nc.publish(ctx.names.progress(job_id), orjson.dumps(progress_report(job_id)))
    seen_by_viewer, seen_by_admin = await asyncio.gather(*frames)
    assert seen_by_admin["preview"].startswith("data:image/jpeg;base64,")
    assert "preview" not in seen_by_viewer
    assert seen_by_viewer == {k: v for k, v in seen_by_admin.items() if k != "preview"}


async def test_a_job_documents_preview_is_an_admin_keys_only_under_the_policy(
    ctx: Context, api: Api, admin: str, make_key: Any
) -> None:
    viewer = await make_key("read")
    submitted = await api.post(
        "/api/generations", json={"prompt": "a red fox", "n": 1}, headers=auth(admin)
    )
    assert submitted.status == 202, await submitted.text()
    job_id = (await submitted.json())["id"]
    await ctx.nc.publish(ctx.names.progress(job_id), orjson.dumps(progress_report(job_id)))

    async def running(token: str) -> dict[str, Any] | None:
        response = await api.get(f"/api/generations/{job_id}?preview=true", headers=auth(token))
        doc: dict[str, Any] = await response.json()
        return doc if doc["status"] == "running" else None

    admins = await eventually(lambda: running(admin), timeout=WAIT_S, what="running")
    assert admins["progress"]["preview"].startswith("data:image/jpeg;base64,")
    viewers = await running(viewer)
    assert viewers is not None and "preview" not in viewers["progress"]


# --- 2. decisions on one image take turns -------------------------------------------------


async def decision_events(ctx: Context, image_id: str) -> list[Event]:
    """The image's decision events, in stream order."""
    msgs = []
    for topic in (subjects.APPROVED, subjects.REJECTED):
        msgs += await read_subject(ctx.js, ctx.names.subject(topic))
    msgs.sort(key=lambda m: m.metadata.sequence.stream)
    return [e for e in (decode(m.data) for m in msgs) if e.image_id == image_id]


async def test_concurrent_opposing_decisions_agree_in_store_stream_and_projection(
    ctx: Context, api: Api, db: ReadModel, admin: str
) -> None:
    image_id = await generated_image(ctx, db)

    async def decide(n: int) -> dict[str, Any]:
        verb, body = ("approve", {}) if n % 2 else ("reject", {"reason": f"no {n}"})
        response = await api.post(f"/api/images/{image_id}/{verb}", json=body, headers=auth(admin))
        assert response.status == 200, await response.text()
        result: dict[str, Any] = await response.json()
        return result

    results = await asyncio.gather(*(decide(n) for n in range(16)))
    recorded = [r for r in results if r["changed"]]
    found = await decision_events(ctx, image_id)
    assert sorted(e.id for e in found) == sorted(r["event"] for r in recorded)
    # Each decision replaced the one before it in the stream: none read a stale one.
    chain = ["pending"] + [e.data["decision"] for e in found]
    assert [e.data["previous"] for e in found] == chain[:-1]
    last = found[-1]
    stored = await ctx.store.get_json(subjects.image_key(image_id, subjects.APPROVAL_DOC))
    assert (stored["event"], stored["decision"]) == (last.id, last.data["decision"])
    doc = await eventually(
        lambda: _decided(db, image_id, last.id), timeout=WAIT_S, what="the last decision projected"
    )
    assert doc["approval"] == last.data["decision"]


async def _decided(db: ReadModel, image_id: str, event_id: str) -> dict[str, Any] | None:
    doc = await db.get(image_id)
    return doc if doc and (doc.get("decision") or {}).get("event") == event_id else None


# --- 3. a decision the bus did not take is not kept ---------------------------------------


@pytest.fixture
async def unpublishable(ctx: Context) -> Context:
    """``ctx``, but its JetStream publishes go through a connection that is closed."""
    nc = await connect(ctx.settings.nats, "test-closed")
    js = nc.jetstream()
    await nc.close()
    return dataclasses.replace(ctx, nc=nc, js=js)


async def test_a_decision_whose_event_was_not_published_is_taken_back_from_the_store(
    ctx: Context, api: Api, db: ReadModel, admin: str, unpublishable: Context
) -> None:
    first, second = await generated_image(ctx, db), await generated_image(ctx, db)
    approved = await api.post(f"/api/images/{second}/approve", json={}, headers=auth(admin))
    assert approved.status == 200, await approved.text()
    await until(db, second, "approved", approval="approved")
    key = subjects.image_key(second, subjects.APPROVAL_DOC)
    kept = await ctx.store.get_bytes(key)

    refusals = []
    for image_id in (first, second):
        doc = await db.get(image_id)
        assert doc is not None
        with pytest.raises(Problem) as refused:
            await decide(unpublishable, doc, "rejected", "no", "k1")
        refusals.append(refused.value)
    assert await ctx.store.stat(subjects.image_key(first, subjects.APPROVAL_DOC)) is None
    assert await ctx.store.get_bytes(key) == kept  # the approval it would have replaced

    await reindex(ctx, progress=False)  # what the store and the stream say, and only that
    assert (await db.get(first) or {})["approval"] == "pending"
    assert (await db.get(second) or {})["approval"] == "approved"
    for problem in refusals:
        assert problem.status == 503 and "nothing was recorded" in problem.detail


# --- 4. the carousel's ETag costs no scan ---------------------------------------------------


async def poll(api: Api, token: str, etag: str = "") -> tuple[int, str, int | None]:
    """The carousel's answer to a poll: status, ETag, and total (None for a 304)."""
    headers = auth(token) | ({"If-None-Match": etag} if etag else {})
    response = await api.get("/api/carousel?overlay=caption", headers=headers)
    assert response.status in (200, 304), await response.text()
    total = (await response.json())["total"] if response.status == 200 else None
    return response.status, response.headers["ETag"], total


async def test_the_carousel_etag_changes_with_an_approval_and_a_poll_scans_no_image(
    ctx: Context, api: Api, db: ReadModel, admin: str, make_key: Any
) -> None:
    viewer = await make_key("read")
    shown, held = new_id(), new_id()
    await publish(ctx, subjects.UPLOADED, shown, name="a.jpg", source="gateway")
    await publish(ctx, subjects.GENERATED, held, name="b.png", source="generate")
    for image_id in (shown, held):
        await publish(ctx, subjects.INGESTED, image_id, width=8, height=6)
    await until(db, shown, "ingested", status="ingested", approval="none")
    await until(db, held, "ingested", status="ingested", approval="pending")
    status, etag, total = await poll(api, viewer)
    assert (status, total) == (200, 1)

    # What the carousel does not show changes: the held image's caption.
    await publish(ctx, subjects.CAPTIONED, held, caption="a secret", nsfw=0.1)
    await until(db, held, "captioned", status="ready")
    assert (await poll(api, viewer, etag))[:2] == (304, etag)

    # A poll that finds nothing new reads no image row: it is answered while another
    # transaction holds the images table locked against every read.
    async with db.pool.acquire() as conn, conn.transaction():
        await conn.execute("LOCK TABLE images IN ACCESS EXCLUSIVE MODE")
        async with asyncio.timeout(WAIT_S):
            assert (await poll(api, viewer, etag))[:2] == (304, etag)

    approved = await api.post(f"/api/images/{held}/approve", json={}, headers=auth(admin))
    assert approved.status == 200, await approved.text()
    await until(db, held, "approved", approval="approved")
    status, changed, total = await poll(api, viewer, etag)
    assert (status, total) == (200, 2) and changed != etag

    await reindex(ctx, progress=False)  # emptied and filled again: the same two images
    status, _, total = await poll(api, viewer, changed)
    assert (status, total) == (200, 2)


# --- 6. a changed policy is noticed at start ----------------------------------------------


async def test_a_process_started_with_another_policy_warns_until_a_reindex(
    ctx: Context, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """``ctx`` started first, with POLICY: its policy is the one recorded."""
    stricter = HoldPolicy(generated=True, nsfw_above=0.5)
    changed = settings.model_copy(update={"approval": ApprovalSettings(hold=stricter)})

    async def start(with_settings: Settings) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, "darkroom.approvals"):
            model = await open_read_model(with_settings, "test")
        await model.pool.close()
        return [r.getMessage() for r in caplog.records if r.name == "darkroom.approvals"]

    assert await start(settings) == []
    [warning] = await start(changed)
    assert '"nsfw_above":0.5' in warning and "darkroom reindex" in warning
    assert await start(changed) != []  # until a reindex judges every row by it

    model = await open_read_model(changed, "test")
    try:
        await reindex(dataclasses.replace(ctx, db=model), progress=False)
    finally:
        await model.pool.close()
    assert await start(changed) == []
    assert await start(settings) != []
