"""Dead letters through the gateway: listing them by stage through one filtered consumer,
retrying one or a stage's worth, and re-running a stage (ingest, caption) for one image."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from nats.aio.msg import Msg

from bus import Call, Context, Emit, Event, Function, Reject, Spec
from bus.core import subjects
from bus.core.envelope import new_id, now_iso
from tests.support.http import auth, form
from tests.support.images import jpeg
from tests.support.streams import dead_letters, events, eventually, settled

pytestmark = [pytest.mark.nats, pytest.mark.s3]


def make_event(topic: str, **data: Any) -> Event:
    image_id = new_id()
    return Event(
        id=f"{topic}-{image_id}",
        type=topic,
        source="test",
        time=now_iso(),
        image_id=image_id,
        data=data,
    )


async def publish(ctx: Context, event: Event) -> None:
    await ctx.js.publish(
        ctx.names.subject(event.type), event.encode(), headers={"Nats-Msg-Id": event.id}
    )


def picky(name: str, listens: str, refusing: set[str], seen: list[str]) -> Function:
    """A function that rejects the events whose ``n`` is in ``refusing`` (while it is) and
    otherwise emits ``<listens>-done``, noting every event id it is given."""

    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        seen.append(event.id)
        if str(event.data.get("n")) in refusing:
            raise Reject(f"refusing {event.data['n']}")
        return [Emit(f"{listens}-done", data={"n": event.data.get("n")})]

    spec = Spec(name, listens=(listens,), emits=(f"{listens}-done",))
    return Function(spec, handle=handle)


async def test_listing_is_by_stage_newest_first_through_one_consumer(
    client: TestClient[Any, Any], admin: str, ctx: Context, run_function: Any
) -> None:
    await run_function(picky("picky", "a", {"0", "1", "2"}, []))
    await run_function(picky("other", "o", {"0"}, []))
    for n in range(3):
        await publish(ctx, make_event("a", n=n))
    await publish(ctx, make_event("o", n=0))
    await settled(ctx, "picky", "other")
    await dead_letters(ctx, "picky", at_least=3)
    # Every JetStream API request the gateway makes, up to a sentinel sent after the GETs.
    requests: list[str] = []
    sentinel = f"$JS.API.SENTINEL.{new_id()}"
    done = asyncio.Event()

    async def note(msg: Msg) -> None:
        requests.append(msg.subject)
        if msg.subject == sentinel:
            done.set()

    watch = await ctx.nc.subscribe("$JS.API.>", cb=note)
    try:
        await ctx.nc.flush()
        listed = await client.get("/api/dead-letters?stage=picky", headers=auth(admin))
        limited = await client.get("/api/dead-letters?stage=picky&limit=2", headers=auth(admin))
        every = await client.get("/api/dead-letters", headers=auth(admin))
        await ctx.nc.publish(sentinel)
        await asyncio.wait_for(done.wait(), 10)
    finally:
        await watch.unsubscribe()
    assert listed.status == 200
    items = (await listed.json())["items"]
    assert [i["reason"] for i in items] == ["refusing 2", "refusing 1", "refusing 0"]
    assert all(i["stage"] == "picky" and i["kind"] == "rejected" for i in items)
    assert [i["dlq_seq"] for i in items] == sorted((i["dlq_seq"] for i in items), reverse=True)
    assert [i["reason"] for i in (await limited.json())["items"]] == ["refusing 2", "refusing 1"]
    assert sorted(i["stage"] for i in (await every.json())["items"]) == ["other", *["picky"] * 3]
    # Read through a consumer: no request per record.
    assert not [r for r in requests if r.startswith("$JS.API.STREAM.MSG.GET.")]
    assert [r for r in requests if r.startswith("$JS.API.CONSUMER.CREATE.")]
    bad = await client.get("/api/dead-letters?stage=a.>", headers=auth(admin))
    assert bad.status == 400 and bad.content_type == "application/problem+json"


async def test_retrying_one_publishes_the_same_event_again_and_deletes_its_record(
    client: TestClient[Any, Any], admin: str, make_key: Any, ctx: Context, run_function: Any
) -> None:
    refusing, seen = {"7"}, []
    await run_function(picky("picky", "a", refusing, seen))
    event = make_event("a", n=7)
    await publish(ctx, event)
    await settled(ctx, "picky")
    [record] = (await (await client.get("/api/dead-letters", headers=auth(admin))).json())["items"]
    refusing.clear()  # fixed: it takes the event this time
    path = f"/api/dead-letters/{record['dlq_seq']}/retry"
    reader = await make_key("read")
    denied = await client.post(path, headers=auth(reader))
    assert denied.status == 403 and denied.content_type == "application/problem+json"
    retried = await client.post(path, headers=auth(admin))
    assert retried.status == 200, await retried.text()
    answer = await retried.json()
    assert answer["event_id"] == event.id and answer["stage"] == "picky"
    assert answer["subject"] == ctx.names.subject("a")
    [done] = await events(ctx, "a-done", at_least=1)
    assert done.causation_id == event.id and done.data == {"n": 7}
    assert seen == [event.id, event.id]  # the same event, identity kept
    await settled(ctx, "picky")
    assert (await (await client.get("/api/dead-letters", headers=auth(admin))).json())[
        "items"
    ] == []
    again = await client.post(path, headers=auth(admin))
    assert again.status == 404 and again.content_type == "application/problem+json"
    odd = await client.post("/api/dead-letters/x1/retry", headers=auth(admin))
    assert odd.status == 404 and odd.content_type == "application/problem+json"


async def test_a_record_without_an_event_cannot_be_retried(
    client: TestClient[Any, Any], admin: str, ctx: Context, run_function: Any
) -> None:
    await run_function(picky("picky", "a", set(), []))
    await ctx.js.publish(ctx.names.subject("a"), b"not an event", headers={"Nats-Msg-Id": new_id()})
    await settled(ctx, "picky")
    [record] = await dead_letters(ctx, "picky", at_least=1)
    assert "payload_b64" in record
    [listed] = (await (await client.get("/api/dead-letters", headers=auth(admin))).json())["items"]
    refused = await client.post(f"/api/dead-letters/{listed['dlq_seq']}/retry", headers=auth(admin))
    assert refused.status == 409 and refused.content_type == "application/problem+json"
    assert "no readable event" in (await refused.json())["detail"]


async def test_retrying_a_stage_goes_oldest_first_in_bounded_batches(
    client: TestClient[Any, Any], admin: str, ctx: Context, run_function: Any
) -> None:
    refusing, seen = {"0", "1", "2"}, []
    await run_function(picky("picky", "a", refusing, seen))
    await run_function(picky("other", "o", {"0"}, []))
    sent = [make_event("a", n=n) for n in range(3)]
    for event in sent:
        await publish(ctx, event)
    await publish(ctx, make_event("o", n=0))
    await settled(ctx, "picky", "other")
    await dead_letters(ctx, "picky", at_least=3)
    refusing.clear()
    first = await client.post("/api/dead-letters/retry?stage=picky&limit=2", headers=auth(admin))
    assert first.status == 200, await first.text()
    assert await first.json() == {"stage": "picky", "retried": 2, "skipped": [], "remaining": 1}
    done = await events(ctx, "a-done", at_least=2)
    assert sorted(e.causation_id or "" for e in done) == sorted(e.id for e in sent[:2])
    second = await client.post("/api/dead-letters/retry?stage=picky", headers=auth(admin))
    assert await second.json() == {"stage": "picky", "retried": 1, "skipped": [], "remaining": 0}
    done = await events(ctx, "a-done", at_least=3)
    assert sorted(e.causation_id or "" for e in done) == sorted(e.id for e in sent)
    await settled(ctx, "picky")
    left = (await (await client.get("/api/dead-letters", headers=auth(admin))).json())["items"]
    assert [i["stage"] for i in left] == ["other"]
    missing = await client.post("/api/dead-letters/retry", headers=auth(admin))
    assert missing.status == 400 and missing.content_type == "application/problem+json"


async def _ready_image(client: TestClient[Any, Any], admin: str) -> str:
    uploaded = await client.post(
        "/api/uploads", data=form(("a.jpg", jpeg(64, 48))), headers=auth(admin)
    )
    [result] = (await uploaded.json())["results"]
    image_id: str = result["id"]
    await _image(client, admin, image_id, lambda d: d["status"] == "ready")
    return image_id


async def _image(client: TestClient[Any, Any], admin: str, image_id: str, where: Any) -> Any:
    async def check() -> dict[str, Any] | None:
        doc: dict[str, Any] = await (
            await client.get(f"/api/images/{image_id}", headers=auth(admin))
        ).json()
        return doc if where(doc) else None

    return await eventually(check, timeout=60, what="the image document")


async def test_rerunning_caption_asks_for_a_new_model_caption(
    client: TestClient[Any, Any], admin: str
) -> None:
    image_id = await _ready_image(client, admin)
    path = f"/api/images/{image_id}/rerun?stage=caption"
    asked = await client.post(path, headers=auth(admin))
    assert asked.status == 202, await asked.text()
    answer = await asked.json()
    assert answer["image_id"] == image_id and answer["stage"] == "caption"
    doc = await _image(
        client,
        admin,
        image_id,
        lambda d: (d.get("caption") or {}).get("request") == answer["event_id"],
    )
    assert doc["caption"]["source"] == "model"
    for query, status in (("stage=notify", 400), ("", 400)):
        bad = await client.post(f"/api/images/{image_id}/rerun?{query}", headers=auth(admin))
        assert bad.status == status and bad.content_type == "application/problem+json"
    missing = await client.post("/api/images/nope/rerun?stage=caption", headers=auth(admin))
    assert missing.status == 404 and missing.content_type == "application/problem+json"


async def test_rerunning_ingest_derives_the_renditions_again(
    client: TestClient[Any, Any], admin: str, ctx: Context
) -> None:
    image_id = await _ready_image(client, admin)
    display = subjects.image_key(image_id, "display.webp")
    await ctx.store.delete(display)  # a re-announcement would not bring it back
    asked = await client.post(f"/api/images/{image_id}/rerun?stage=ingest", headers=auth(admin))
    assert asked.status == 202, await asked.text()
    event_id = (await asked.json())["event_id"]

    async def ingested_again() -> list[Event]:
        found = await events(ctx, subjects.INGESTED, at_least=1)
        return [e for e in found if e.causation_id == event_id]

    [again] = await eventually(ingested_again, timeout=30, what="ingest of the rerun")
    assert again.image_id == image_id
    assert await ctx.store.stat(display) is not None
    doc = await _image(client, admin, image_id, lambda d: d["status"] == "ready")
    assert doc["name"] == "a.jpg"
