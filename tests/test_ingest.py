"""Uploads through every HTTP entry point on the real bus and store, down to ingest's
renditions: the bad-file corpus, duplicates, presigned uploads, generated images."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import nats.js.errors
import orjson
import pytest
from aiohttp.test_utils import TestClient
from PIL import Image
from pydantic import SecretStr

from bus.core import subjects
from bus.core.envelope import Event, new_id, now_iso
from bus.infra.store import ObjectStore
from bus.intake.accept import UploadRejectedError, accept_upload
from bus.runtime.context import Context
from tests.support import corpus
from tests.support.http import auth, form
from tests.support.images import jpeg, png

pytestmark = [pytest.mark.nats, pytest.mark.s3]


async def wait_ready(client: TestClient[Any, Any], token: str, image_id: str) -> dict[str, Any]:
    for _ in range(300):
        response = await client.get(f"/api/images/{image_id}", headers=auth(token))
        if response.status == 200:
            doc: dict[str, Any] = await response.json()
            if doc["status"] in ("ready", "failed"):
                assert doc["status"] == "ready", doc
                return doc
        await asyncio.sleep(0.05)
    raise AssertionError(f"image {image_id} never became ready")


CORPUS = [
    # name, bytes, expected status, text in the reason (rejections) or upright size (accepted)
    ("truncated.jpg", corpus.truncated_jpeg(), 422, "corrupt or truncated JPEG"),
    ("bomb.png", corpus.png_header_only(100_000, 100_000), 422, "absurd dimensions"),
    ("empty.jpg", b"", 422, "empty"),
    ("notes.jpg", corpus.text_as_jpeg(), 415, "sniffed from its bytes"),
    ("cmyk.jpg", corpus.cmyk_jpeg(), 201, (320, 240)),
    ("deep.png", corpus.png16_grey(), 201, (300, 200)),
    ("rotated.jpg", corpus.exif_rotated_jpeg(6), 201, (600, 800)),
    ("animated.gif", corpus.animated_gif(3), 201, (120, 80)),
    ("phone.heic", corpus.heic(), 201, (320, 240)),
    ("modern.avif", corpus.avif(), 201, (320, 240)),
]


async def test_the_bad_file_corpus_gets_the_expected_outcome_each(
    client: TestClient[Any, Any], admin: str, ctx: Context
) -> None:
    files = [(name, data) for name, data, _, _ in CORPUS]
    response = await client.post("/api/uploads", data=form(*files), headers=auth(admin))
    assert response.status == 207
    results = (await response.json())["results"]
    assert [r["status"] for r in results] == [status for _, _, status, _ in CORPUS]
    accepted = {}
    for (name, _, status, expected), result in zip(CORPUS, results, strict=True):
        if status == 201:
            accepted[result["id"]] = (name, expected)
        else:
            assert expected in result["error"], (name, result)
    stored = await ctx.store.list_keys("uploads/")
    assert sorted(k.split("/")[1] for k in stored) == sorted(accepted)
    for image_id, (name, size) in accepted.items():
        doc = await wait_ready(client, admin, image_id)
        ingest = doc["ingest"]
        assert (ingest["width"], ingest["height"]) == size, name
        assert set(ingest["renditions"]) == {"display", "thumb-1024", "thumb-256"}
        thumb = await client.get(f"/api/images/{image_id}/thumbnail", headers=auth(admin))
        assert thumb.status == 200 and thumb.content_type == "image/webp"
        shown = Image.open(io.BytesIO(await thumb.read()))
        assert shown.size[0] / shown.size[1] == pytest.approx(size[0] / size[1], rel=0.02), name
    image_id = next(iter(accepted))
    for path, status in (("display", 200), ("thumbnail?px=1024", 200), ("thumbnail?px=99", 404)):
        response = await client.get(f"/api/images/{image_id}/{path}", headers=auth(admin))
        assert response.status == status, path
    missing = await client.get(f"/api/images/{image_id}/thumbnail?px=99", headers=auth(admin))
    assert "sizes are 1024, 256" in (await missing.json())["detail"]


async def test_identical_bytes_answer_the_first_id_and_are_stored_once(
    client: TestClient[Any, Any], admin: str, ctx: Context
) -> None:
    photo = jpeg(640, 480, (200, 100, 0))
    first = await client.post("/api/uploads", data=form(("a.jpg", photo)), headers=auth(admin))
    assert first.status == 201
    image_id = (await first.json())["results"][0]["id"]
    again = await asyncio.gather(
        *(
            client.post("/api/uploads", data=form((f"copy{i}.jpg", photo)), headers=auth(admin))
            for i in range(4)
        )
    )
    for response in again:
        assert response.status == 200
        [result] = (await response.json())["results"]
        assert result["duplicate"] is True and result["id"] == image_id
    assert await ctx.store.list_keys("uploads/") == [f"uploads/{image_id}/a.jpg"]
    mixed = await client.post(
        "/api/uploads", data=form(("same.jpg", photo), ("new.png", png())), headers=auth(admin)
    )
    assert mixed.status == 201
    assert [r["status"] for r in (await mixed.json())["results"]] == [200, 201]


async def test_concurrent_identical_uploads_make_one_image(
    client: TestClient[Any, Any], admin: str, ctx: Context
) -> None:
    photo = jpeg(500, 400, (10, 120, 240))
    responses = await asyncio.gather(
        *(
            client.post("/api/uploads", data=form((f"{i}.jpg", photo)), headers=auth(admin))
            for i in range(6)
        )
    )
    ids = {(await r.json())["results"][0]["id"] for r in responses}
    assert len(ids) == 1
    assert len(await ctx.store.list_keys("uploads/")) == 1


async def presign(
    client: TestClient[Any, Any], token: str, data: bytes, mime: str = "image/jpeg"
) -> dict[str, Any]:
    body = {"filename": "big photo.jpg", "content_type": mime, "size": len(data)}
    response = await client.post("/api/uploads/presign", json=body, headers=auth(token))
    assert response.status == 201, await response.text()
    ticket: dict[str, Any] = await response.json()
    return ticket


async def post_form(ticket: dict[str, Any], data: bytes) -> None:
    """POST ``data`` with the ticket's form, straight to the store."""
    body = aiohttp.FormData()
    for name, value in ticket["fields"].items():
        body.add_field(name, value)
    content_type = ticket["fields"]["Content-Type"]
    body.add_field(ticket["file_field"], data, filename="photo", content_type=content_type)
    async with aiohttp.ClientSession() as http, http.post(ticket["url"], data=body) as response:
        assert response.status == 204, await response.text()


async def test_presigned_upload_then_complete_runs_the_chain(
    client: TestClient[Any, Any], admin: str, ctx: Context
) -> None:
    photo = jpeg(1200, 800, (120, 30, 160))
    ticket = await presign(client, admin, photo)
    assert ticket["method"] == "POST" and ticket["fields"]["Content-Type"] == "image/jpeg"
    early = await client.post(ticket["complete_url"], headers=auth(admin))
    assert early.status == 409 and "POST the file" in (await early.json())["detail"]
    await post_form(ticket, photo)
    done = await client.post(ticket["complete_url"], headers=auth(admin))
    assert done.status == 201
    result = await done.json()
    assert result["id"] == ticket["id"] and result["stored_name"] == "big_photo.jpg"
    assert result["sha256"] == hashlib.sha256(photo).hexdigest()
    doc = await wait_ready(client, admin, ticket["id"])
    assert doc["ingest"]["width"] == 1200
    # The checked bytes were copied to uploads/; the client-writable incoming/ key is gone.
    assert await ctx.store.list_keys(f"incoming/{ticket['id']}/") == []
    assert doc["original"]["key"] == f"uploads/{ticket['id']}/big_photo.jpg"
    twice = await client.post(ticket["complete_url"], headers=auth(admin))
    assert twice.status == 200 and (await twice.json())["id"] == ticket["id"]
    # POSTing again with the same form cannot replace the original that was checked.
    await post_form(ticket, jpeg(10, 10))
    again = await client.post(ticket["complete_url"], headers=auth(admin))
    assert again.status == 200 and (await again.json())["id"] == ticket["id"]
    assert await ctx.store.get_bytes(doc["original"]["key"]) == photo
    # The same bytes through a second ticket: the first id, and the second object is gone.
    second = await presign(client, admin, photo)
    await post_form(second, photo)
    dup = await client.post(second["complete_url"], headers=auth(admin))
    assert dup.status == 200 and (await dup.json())["id"] == ticket["id"]
    assert await ctx.store.list_keys(f"uploads/{second['id']}/") == []
    assert await ctx.store.list_keys(f"incoming/{second['id']}/") == []


async def test_a_copy_is_refused_if_the_object_changed_after_it_was_checked(
    ctx: Context,
) -> None:
    first = await ctx.store.put_bytes("incoming/x1/a.jpg", jpeg(), "image/jpeg")
    await ctx.store.put_bytes("incoming/x1/a.jpg", png(), "image/png")  # replaced meanwhile
    stale = await ctx.store.copy_if_unchanged(
        "incoming/x1/a.jpg", "uploads/x1/a.jpg", first.etag, first.size, "image/jpeg"
    )
    assert stale is None and await ctx.store.list_keys("uploads/") == []


async def test_presigned_garbage_is_refused_and_deleted(
    client: TestClient[Any, Any], admin: str, ctx: Context
) -> None:
    ticket = await presign(client, admin, corpus.truncated_jpeg())
    await post_form(ticket, corpus.truncated_jpeg())
    response = await client.post(ticket["complete_url"], headers=auth(admin))
    assert response.status == 422 and response.content_type == "application/problem+json"
    assert "truncated" in (await response.json())["detail"]
    assert await ctx.store.list_keys("uploads/") == []
    assert await ctx.store.list_keys("incoming/") == []


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"content_type": "text/plain", "size": 10}, 415, "content_type must be one of"),
        ({"content_type": "image/png", "size": 0}, 422, "size must be"),
        ({"content_type": "image/png", "size": 10**12}, 413, "over the limit"),
        ({"content_type": "image/png", "size": 5, "filename": 7}, 422, "filename"),
    ],
)
async def test_presign_validates_its_request(
    client: TestClient[Any, Any], admin: str, body: dict[str, Any], status: int, detail: str
) -> None:
    response = await client.post("/api/uploads/presign", json=body, headers=auth(admin))
    assert response.status == status and detail in (await response.json())["detail"]


async def test_generated_images_are_ingested_with_their_lineage(
    client: TestClient[Any, Any], admin: str, ctx: Context
) -> None:
    image_id = "gen-job1-0"
    ref = await ctx.store.put_bytes("generated/job1/0.png", png(512, 512), "image/png")
    lineage = {"job_id": "job1", "prompt": "a red square", "parent_id": None, "seed": 7}
    event = Event(
        id="generated-job1-0",
        type=subjects.GENERATED,
        source="darkroom/generate",
        time=now_iso(),
        subject=image_id,
        object=ref,
        image_id=image_id,
        data={"name": "0.png", "lineage": lineage},
    )
    await ctx.js.publish(ctx.names.subject(subjects.GENERATED), event.encode())
    for _ in range(200):
        if await ctx.store.stat(subjects.image_key(image_id, subjects.INGEST_DOC)):
            break
        await asyncio.sleep(0.05)
    info = await ctx.store.get_json(subjects.image_key(image_id, subjects.INGEST_DOC))
    assert info["lineage"] == lineage and info["original"]["key"] == "generated/job1/0.png"
    assert info["renditions"]["display"]["width"] == 512
    doc = await wait_ready(client, admin, image_id)  # in the gallery like an upload
    assert doc["lineage"] == lineage and doc["original"]["key"] == "generated/job1/0.png"
    assert doc["created"] == event.time and "generated" in doc["stages"]


async def test_originals_can_be_stored_without_their_location(ctx: Context) -> None:
    ingest = ctx.settings.ingest.model_copy(update={"original_gps": "strip"})
    stripping = dataclasses.replace(
        ctx, settings=ctx.settings.model_copy(update={"ingest": ingest})
    )
    photo = corpus.camera_jpeg()
    accepted = await accept_upload(stripping, _chunks(photo), "trip.jpg", "test")
    stored = await ctx.store.get_bytes(f"uploads/{accepted.image_id}/trip.jpg")
    assert len(stored) < len(photo) and accepted.sha256 == hashlib.sha256(photo).hexdigest()
    exif = Image.open(io.BytesIO(stored)).getexif()
    assert not exif.get_ifd(0x8825) and exif[0x0110] == "Canon EOS R5"
    again = await accept_upload(stripping, _chunks(photo), "again.jpg", "test")
    assert again.duplicate and again.image_id == accepted.image_id
    kept = await accept_upload(ctx, _chunks(corpus.camera_jpeg(quality=80)), "kept.jpg", "test")
    original = await ctx.store.get_bytes(f"uploads/{kept.image_id}/kept.jpg")
    assert Image.open(io.BytesIO(original)).getexif().get_ifd(0x8825)


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_an_original_stored_by_an_upload_that_died_is_announced_by_the_next(
    client: TestClient[Any, Any], admin: str, ctx: Context
) -> None:
    """The gateway died between storing an original and announcing it: its claim is still
    "pending" and old. The same bytes uploaded again make that image, stored once."""
    photo = jpeg(300, 200, (90, 10, 200))
    orphan_id = new_id()
    key = f"uploads/{orphan_id}/lost.jpg"
    await ctx.store.put_bytes(key, photo, "image/jpeg")
    claim = {"image_id": orphan_id, "key": key, "state": "pending", "at": time.time() - 3600}
    await ctx.digests.create(hashlib.sha256(photo).hexdigest(), orjson.dumps(claim))
    response = await client.post(
        "/api/uploads", data=form(("again.jpg", photo)), headers=auth(admin)
    )
    assert response.status == 200
    [result] = (await response.json())["results"]
    assert result["id"] == orphan_id and result["duplicate"] is True
    doc = await wait_ready(client, admin, orphan_id)
    assert doc["ingest"]["width"] == 300
    assert await ctx.store.list_keys("uploads/") == [key]


async def test_a_store_that_fails_mid_upload_gets_a_503_and_keeps_no_claim(ctx: Context) -> None:
    """The S3 server refuses the put (here: a wrong secret): a 503, and the digest claim is
    taken back so the next try is not answered as a duplicate of nothing."""
    wrong = ctx.settings.s3.model_copy(update={"secret_key": SecretStr("not-the-secret")})
    refusing = ObjectStore.connect(wrong)
    photo = jpeg(120, 90, (5, 200, 90))
    try:
        with pytest.raises(UploadRejectedError) as caught:
            await accept_upload(
                dataclasses.replace(ctx, store=refusing), _chunks(photo), "x.jpg", "test"
            )
    finally:
        await refusing.close()
    assert caught.value.status == 503 and "store is unavailable" in caught.value.reason
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await ctx.digests.get(hashlib.sha256(photo).hexdigest())


async def test_a_duplicate_of_an_upload_that_fails_in_flight_takes_its_place(
    ctx: Context,
) -> None:
    """Identical bytes arrive while a first upload holds a fresh claim; that upload then
    fails and takes its claim back: the second is stored as an image of its own."""
    photo = jpeg(140, 100, (250, 120, 0))
    sha = hashlib.sha256(photo).hexdigest()
    phantom = {"image_id": new_id(), "key": "uploads/x/y.jpg", "state": "pending"}
    revision = await ctx.digests.create(sha, orjson.dumps({**phantom, "at": time.time()}))

    async def first_upload_fails() -> None:
        await asyncio.sleep(0.4)
        await ctx.digests.delete(sha, last=revision)

    failing = asyncio.create_task(first_upload_fails())
    accepted = await accept_upload(ctx, _chunks(photo), "second.jpg", "test")
    await failing
    assert not accepted.duplicate and accepted.image_id != phantom["image_id"]
    assert await ctx.store.list_keys("uploads/") == [f"uploads/{accepted.image_id}/second.jpg"]
