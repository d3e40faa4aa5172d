"""The intake under trouble, on the real bus and store: presigned forms the S3 server holds
to their size, type and key; a form used again after completion; the sweeper; a dedupe
claim left pending by a NATS blip; and a stalled S3 server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import threading
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import nats.js.errors
import orjson
import pytest
from aiohttp.test_utils import TestClient

from bus.core import subjects
from bus.core.envelope import new_id
from bus.core.settings import IngestSettings
from bus.gateway.app import build_app
from bus.infra.store import ObjectStore
from bus.intake import accept
from bus.intake.accept import (
    IN_FLIGHT_WAIT_S,
    STAGED_PREFIX,
    UploadRejectedError,
    accept_upload,
    staged_originals,
)
from bus.intake.sweep import sweep_once
from bus.runtime.context import Context
from tests.support.http import auth, form
from tests.support.images import jpeg
from tests.support.streams import events

pytestmark = [pytest.mark.nats, pytest.mark.s3]

STALL_TIMEOUT_S = 1.0  # the interactive S3 timeout in the stall test
# Failing an upload in a stall costs two S3 calls (the put, then deleting what it may have
# stored), each bounded by the timeout; the rest is slack for a busy machine.
STALL_BOUND_S = 2 * STALL_TIMEOUT_S + 6.0
DUPLICATE_WINDOW_S = 0.2


@pytest.fixture
async def gateway(ctx: Context, aiohttp_client: Any) -> TestClient[Any, Any]:
    """The gateway alone: presign and complete need no function behind them."""
    client: TestClient[Any, Any] = await aiohttp_client(build_app(ctx))
    return client


async def presign(client: TestClient[Any, Any], token: str, size: int) -> dict[str, Any]:
    body = {"filename": "big photo.jpg", "content_type": "image/jpeg", "size": size}
    response = await client.post("/api/uploads/presign", json=body, headers=auth(token))
    assert response.status == 201, await response.text()
    ticket: dict[str, Any] = await response.json()
    return ticket


async def post_form(ticket: dict[str, Any], data: bytes, **changed: str) -> tuple[int, str]:
    """POST ``data`` with the ticket's form, some fields ``changed``; the S3 answer."""
    fields = {**ticket["fields"], **changed}
    body = aiohttp.FormData()
    for name, value in fields.items():
        body.add_field(name, value)
    body.add_field(
        ticket["file_field"], data, filename="photo.jpg", content_type=fields["Content-Type"]
    )
    async with aiohttp.ClientSession() as http, http.post(ticket["url"], data=body) as response:
        return response.status, await response.text()


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


def claim(image_id: str, key: str, state: str, at: float) -> bytes:
    """A digest claim as the intake writes it."""
    return orjson.dumps({"image_id": image_id, "key": key, "state": state, "at": at})


async def stage(ctx: Context, image_id: str, key: str, sha256: str, at: float) -> None:
    """The staged marker the intake writes before storing an original."""
    doc = {"image_id": image_id, "key": key, "sha256": sha256, "at": at}
    await ctx.digests.put(STAGED_PREFIX + image_id, orjson.dumps(doc))


async def claim_state(ctx: Context, sha256: str) -> str | None:
    try:
        entry = await ctx.digests.get(sha256)
    except nats.js.errors.KeyNotFoundError:
        return None
    return str(orjson.loads(entry.value or b"{}")["state"])


# --- presigned forms -----------------------------------------------------------------------


async def test_the_s3_server_holds_a_form_to_its_key_type_and_size(
    gateway: TestClient[Any, Any], admin: str, ctx: Context
) -> None:
    photo = jpeg(600, 400, (30, 90, 150))
    ticket = await presign(gateway, admin, len(photo))
    assert ticket["method"] == "POST" and ticket["max_size"] == len(photo)
    assert ticket["fields"]["key"] == f"incoming/{ticket['id']}/big_photo.jpg"
    assert ticket["fields"]["Content-Type"] == "image/jpeg"

    status, text = await post_form(ticket, photo + b"\0" * 1000)  # over the declared size
    assert status == 400 and "EntityTooLarge" in text
    status, text = await post_form(ticket, photo, key=f"incoming/{new_id()}/big_photo.jpg")
    assert status == 403 and "Policy Condition failed" in text
    status, text = await post_form(ticket, photo, **{"Content-Type": "text/html"})
    assert status == 403 and "Policy Condition failed" in text
    assert await ctx.store.list_keys("incoming/") == []

    status, _ = await post_form(ticket, photo)
    assert status == 204
    done = await gateway.post(ticket["complete_url"], headers=auth(admin))
    assert done.status == 201 and (await done.json())["id"] == ticket["id"]


async def test_a_form_used_again_after_completion_makes_no_second_image(
    gateway: TestClient[Any, Any], admin: str, ctx: Context
) -> None:
    photo = jpeg(600, 400, (200, 90, 10))
    ticket = await presign(gateway, admin, len(photo))
    assert (await post_form(ticket, photo))[0] == 204
    first = await gateway.post(ticket["complete_url"], headers=auth(admin))
    assert first.status == 201
    original = f"uploads/{ticket['id']}/big_photo.jpg"

    # The form is still valid: other bytes land under incoming/ again...
    assert (await post_form(ticket, jpeg(60, 40, (0, 0, 0))))[0] == 204
    again = await gateway.post(ticket["complete_url"], headers=auth(admin))
    # ...but completing answers the first result, and deletes them.
    assert again.status == 200
    result = await again.json()
    assert result["id"] == ticket["id"] and result["duplicate"] is True
    assert await ctx.store.list_keys("incoming/") == []
    assert await ctx.store.get_bytes(original) == photo
    [uploaded] = await events(ctx, subjects.UPLOADED, at_least=1)
    assert uploaded.image_id == ticket["id"]

    # Used again and never completed: the sweeper deletes it once old, like any other.
    assert (await post_form(ticket, jpeg(60, 40, (9, 9, 9))))[0] == 204
    report = await sweep_once(ctx, time.time() + ctx.settings.ingest.incoming_max_age_s + 60)
    assert report.incoming_deleted == 1
    assert await ctx.store.list_keys("incoming/") == []
    assert await ctx.store.list_keys("uploads/") == [original]


async def test_the_sweeper_deletes_incoming_objects_never_completed_once_old(
    ctx: Context,
) -> None:
    key = f"incoming/{new_id()}/never.jpg"
    await ctx.store.put_bytes(key, jpeg(), "image/jpeg")
    young = await sweep_once(ctx, time.time())
    assert young.incoming_deleted == 0 and await ctx.store.list_keys("incoming/") == [key]
    old = await sweep_once(ctx, time.time() + ctx.settings.ingest.incoming_max_age_s + 60)
    assert old.incoming_deleted == 1 and await ctx.store.list_keys("incoming/") == []


async def test_a_sweep_lists_the_store_once_whatever_incoming_holds(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every gateway sweeps: one listing of incoming/, not one more per object in it (even
    one whose id was completed: completing again is what deletes those)."""
    completed = new_id()
    await ctx.store.put_bytes(f"uploads/{completed}/done.jpg", jpeg(), "image/jpeg")
    keys = [f"incoming/{completed}/again.jpg"] + [f"incoming/{new_id()}/x.jpg" for _ in range(3)]
    for key in keys:
        await ctx.store.put_bytes(key, jpeg(), "image/jpeg")
    listings: list[str] = []
    for name in ("list_keys", "list_modified"):
        real = getattr(ObjectStore, name)

        async def counted(store: ObjectStore, prefix: str, real: Any = real) -> Any:
            listings.append(prefix)
            return await real(store, prefix)

        monkeypatch.setattr(ObjectStore, name, counted)
    report = await sweep_once(ctx, time.time())
    assert listings == ["incoming/"]
    assert not report and sorted(await ctx.store.list_keys("incoming/")) == sorted(keys)


# --- completing one id more than once -------------------------------------------------------

GATE_S = 30.0  # how long a held thread waits for its gate before failing the test


async def one_image_made(ctx: Context, ticket: dict[str, Any], sha: str) -> None:
    """The presigned upload became exactly one image: one original, nothing left in
    incoming/, its claim published, one uploaded event."""
    assert await ctx.store.list_keys("uploads/") == [f"uploads/{ticket['id']}/big_photo.jpg"]
    assert await ctx.store.list_keys("incoming/") == []
    assert await claim_state(ctx, sha) == "published"
    [uploaded] = await events(ctx, subjects.UPLOADED, at_least=1)
    assert uploaded.image_id == ticket["id"]


async def test_a_complete_that_lost_the_race_to_a_finished_one_answers_its_result(
    gateway: TestClient[Any, Any], admin: str, ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second complete of an id has read and is checking the object while the first
    finishes: it answers the first's result, and the image (its original, its claim)
    stays. It used to run the pipeline again, fail to copy the object the first deleted,
    and take back the first's published claim and original."""
    photo = jpeg(600, 400, (30, 90, 150))
    sha = hashlib.sha256(photo).hexdigest()
    ticket = await presign(gateway, admin, len(photo))
    assert (await post_form(ticket, photo))[0] == 204
    loop = asyncio.get_running_loop()
    first_checking = asyncio.Event()
    second_checking, first_answered = threading.Event(), threading.Event()
    calls = itertools.count(1)
    real_check = accept.check_file

    def check(file: Any, limits: Any) -> Any:  # runs on an interactive thread
        if next(calls) == 1:  # the first goes on once the second is checking too
            loop.call_soon_threadsafe(first_checking.set)
            assert second_checking.wait(GATE_S)
        else:  # the second ends its check once the first has answered
            second_checking.set()
            assert first_answered.wait(GATE_S)
        return real_check(file, limits)

    monkeypatch.setattr(accept, "check_file", check)
    first = asyncio.create_task(gateway.post(ticket["complete_url"], headers=auth(admin)))
    await first_checking.wait()
    second = asyncio.create_task(gateway.post(ticket["complete_url"], headers=auth(admin)))
    assert (await first).status == 201
    first_answered.set()
    again = await second
    assert again.status == 200, await again.text()
    assert (await again.json())["id"] == ticket["id"]
    await one_image_made(ctx, ticket, sha)


async def test_two_completes_of_one_id_at_once_make_one_image(
    gateway: TestClient[Any, Any], admin: str, ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both check the object at once. The one that claims second answers 503 with
    Retry-After while the first is still copying, and leaves it the object: one image."""
    photo = jpeg(600, 400, (90, 30, 150))
    sha = hashlib.sha256(photo).hexdigest()
    ticket = await presign(gateway, admin, len(photo))
    assert (await post_form(ticket, photo))[0] == 204
    both_checking = threading.Barrier(2, timeout=GATE_S)
    real_check = accept.check_file

    def check(file: Any, limits: Any) -> Any:
        both_checking.wait()
        return real_check(file, limits)

    answered = asyncio.Event()
    real_copy = ObjectStore.copy_if_unchanged
    copies = itertools.count(1)

    async def copy(store: ObjectStore, *args: Any) -> Any:
        if next(copies) == 1:  # the first copy waits until the other call has answered
            await answered.wait()
        return await real_copy(store, *args)

    monkeypatch.setattr(accept, "check_file", check)
    monkeypatch.setattr(ObjectStore, "copy_if_unchanged", copy)
    calls = {
        asyncio.create_task(gateway.post(ticket["complete_url"], headers=auth(admin)))
        for _ in range(2)
    }
    [done], [pending] = await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
    second = done.result()
    assert second.status == 503, await second.text()
    assert second.headers["Retry-After"] == "5"
    assert "being completed by another call" in (await second.json())["detail"]
    answered.set()
    first = await pending
    assert first.status == 201, await first.text()
    await one_image_made(ctx, ticket, sha)


async def test_an_object_removed_while_it_was_checked_answers_409(
    gateway: TestClient[Any, Any], admin: str, ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The incoming object goes while it is checked (the sweeper, another complete): the
    copy finds nothing, which is a conflict to complete again, not an unavailable store."""
    photo = jpeg(600, 400, (90, 150, 30))
    ticket = await presign(gateway, admin, len(photo))
    assert (await post_form(ticket, photo))[0] == 204
    loop = asyncio.get_running_loop()
    real_check = accept.check_file

    def check(file: Any, limits: Any) -> Any:  # runs on an interactive thread
        gone = ctx.store.delete(ticket["fields"]["key"])
        asyncio.run_coroutine_threadsafe(gone, loop).result(GATE_S)
        return real_check(file, limits)

    monkeypatch.setattr(accept, "check_file", check)
    response = await gateway.post(ticket["complete_url"], headers=auth(admin))
    assert response.status == 409, await response.text()
    assert "removed while it was being checked" in (await response.json())["detail"]
    assert await ctx.store.list_keys("uploads/") == []
    assert await staged_originals(ctx) == []
    assert await claim_state(ctx, hashlib.sha256(photo).hexdigest()) is None


async def crashed_before_announcing(
    ctx: Context, gateway: TestClient[Any, Any], admin: str, photo: bytes, age_s: float
) -> dict[str, Any]:
    """What a gateway that died between copying a completed original and announcing it
    leaves behind, ``age_s`` ago: the claim pending, the marker, the copy, the incoming
    object."""
    ticket = await presign(gateway, admin, len(photo))
    assert (await post_form(ticket, photo))[0] == 204
    key = f"uploads/{ticket['id']}/big_photo.jpg"
    at = time.time() - age_s
    sha = hashlib.sha256(photo).hexdigest()
    await ctx.digests.create(sha, claim(ticket["id"], key, "pending", at))
    await stage(ctx, ticket["id"], key, sha, at)
    await ctx.store.put_bytes(key, photo, "image/jpeg")
    return ticket


async def test_completing_again_while_an_unannounced_copy_is_fresh_answers_503(
    gateway: TestClient[Any, Any], admin: str, ctx: Context
) -> None:
    """Its call may still announce it: not "done" (200), and nothing of it is touched."""
    photo = jpeg(600, 400, (200, 9, 150))
    ticket = await crashed_before_announcing(ctx, gateway, admin, photo, 0.0)
    again = await gateway.post(ticket["complete_url"], headers=auth(admin))
    assert again.status == 503 and again.headers["Retry-After"] == "5"
    assert await events(ctx, subjects.UPLOADED) == []  # the call has answered: none is coming
    assert await ctx.store.list_keys("incoming/") == [ticket["fields"]["key"]]
    assert await claim_state(ctx, hashlib.sha256(photo).hexdigest()) == "pending"
    assert len(await staged_originals(ctx)) == 1


@pytest.mark.parametrize("left", ["stale", "announced"])
async def test_completing_again_after_a_crash_before_the_claim_was_published_makes_the_image(
    gateway: TestClient[Any, Any], admin: str, ctx: Context, left: str
) -> None:
    """Never announced and stale: the copy and the claim go, and the completion is done
    afresh from incoming/ (201). Announced, only the "published" mark lost: settled (200).
    Either way one image, announced, and nothing left over. It used to answer 200 for a
    copy never announced, which the sweeper then deleted."""
    photo = jpeg(600, 400, (20, 9, 250))
    sha = hashlib.sha256(photo).hexdigest()
    if left == "stale":
        ticket = await crashed_before_announcing(
            ctx, gateway, admin, photo, ctx.settings.ingest.pending_claim_s + 100
        )
    else:
        ticket = await presign(gateway, admin, len(photo))
        assert (await post_form(ticket, photo))[0] == 204
        assert (await gateway.post(ticket["complete_url"], headers=auth(admin))).status == 201
        key = f"uploads/{ticket['id']}/big_photo.jpg"
        await ctx.digests.put(sha, claim(ticket["id"], key, "pending", time.time()))  # the blip
        await stage(ctx, ticket["id"], key, sha, time.time())
        assert (await post_form(ticket, photo))[0] == 204  # and the form used again
    again = await gateway.post(ticket["complete_url"], headers=auth(admin))
    assert again.status == (201 if left == "stale" else 200), await again.text()
    [uploaded] = await events(ctx, subjects.UPLOADED, at_least=1)
    assert uploaded.image_id == ticket["id"] == (await again.json())["id"]
    assert await claim_state(ctx, sha) == "published"
    assert await staged_originals(ctx) == []
    assert await ctx.store.list_keys("incoming/") == []
    original = f"uploads/{ticket['id']}/big_photo.jpg"
    assert await ctx.store.list_keys("uploads/") == [original]
    assert await ctx.store.get_bytes(original) == photo


# --- claims left pending --------------------------------------------------------------------


async def shrink_duplicate_window(ctx: Context) -> None:
    """Make JetStream forget event ids after DUPLICATE_WINDOW_S, and let that pass: a
    repeated ``uploaded`` event is then stored again, as it is minutes later for real."""
    info = await ctx.js.stream_info(ctx.names.stream)
    config = dataclasses.replace(info.config, duplicate_window=DUPLICATE_WINDOW_S)
    await ctx.js.update_stream(config)
    await asyncio.sleep(3 * DUPLICATE_WINDOW_S)  # the window itself, not a guess


@pytest.mark.parametrize(
    "age_s", [5.0, IngestSettings().pending_claim_s + 100], ids=["fresh", "stale"]
)
async def test_a_claim_left_pending_by_a_blip_is_resolved_not_waited_on_or_announced_again(
    ctx: Context, age_s: float
) -> None:
    """The first upload was announced, but a NATS blip lost its claim's "published" mark
    (and its marker's removal). The same bytes again: the first id at once, the claim
    settled, and no second ``uploaded`` event, fresh claim or stale, in the duplicate
    window or out of it."""
    photo = jpeg(200, 150, (10, 200, 30))
    sha = hashlib.sha256(photo).hexdigest()
    first = await accept_upload(ctx, _chunks(photo), "first.jpg", "test")
    key = f"uploads/{first.image_id}/first.jpg"
    at = time.time() - age_s
    await ctx.digests.put(sha, claim(first.image_id, key, "pending", at))
    await stage(ctx, first.image_id, key, sha, at)
    await shrink_duplicate_window(ctx)

    # Well inside the wait for an upload in flight, which it used to sit out.
    again = await asyncio.wait_for(
        accept_upload(ctx, _chunks(photo), "again.jpg", "test"), IN_FLIGHT_WAIT_S / 2
    )
    assert again.duplicate and again.image_id == first.image_id
    assert await claim_state(ctx, sha) == "published"
    [uploaded] = await events(ctx, subjects.UPLOADED, at_least=1)
    assert uploaded.image_id == first.image_id
    assert await ctx.store.list_keys("uploads/") == [key]


async def test_the_sweeper_settles_a_claim_whose_upload_was_announced(ctx: Context) -> None:
    photo = jpeg(220, 150, (120, 0, 90))
    sha = hashlib.sha256(photo).hexdigest()
    first = await accept_upload(ctx, _chunks(photo), "first.jpg", "test")
    key = f"uploads/{first.image_id}/first.jpg"
    at = time.time()
    await ctx.digests.put(sha, claim(first.image_id, key, "pending", at))  # the blip
    await stage(ctx, first.image_id, key, sha, at)

    young = await sweep_once(ctx, time.time())
    assert not young and await claim_state(ctx, sha) == "pending"
    report = await sweep_once(ctx, at + ctx.settings.ingest.pending_claim_s + 1)
    assert report.settled == 1 and report.abandoned == 0
    assert await claim_state(ctx, sha) == "published"
    assert await staged_originals(ctx) == []
    assert await ctx.store.list_keys("uploads/") == [key]
    assert len(await events(ctx, subjects.UPLOADED, at_least=1)) == 1


async def test_the_sweeper_removes_an_original_that_was_never_announced(
    ctx: Context,
) -> None:
    """The gateway died between storing an original and announcing it. Once the claim is
    stale the original and the claim go, and the same bytes make a new image."""
    photo = jpeg(240, 160, (0, 60, 60))
    sha = hashlib.sha256(photo).hexdigest()
    lost_id = new_id()
    key = f"uploads/{lost_id}/lost.jpg"
    at = time.time()
    await ctx.digests.create(sha, claim(lost_id, key, "pending", at))
    await stage(ctx, lost_id, key, sha, at)
    await ctx.store.put_bytes(key, photo, "image/jpeg")

    report = await sweep_once(ctx, at + ctx.settings.ingest.pending_claim_s + 1)
    assert report.abandoned == 1 and report.settled == 0
    assert await ctx.store.list_keys("uploads/") == []
    assert await claim_state(ctx, sha) is None
    assert await staged_originals(ctx) == []
    again = await accept_upload(ctx, _chunks(photo), "again.jpg", "test")
    assert not again.duplicate and again.image_id != lost_id
    [uploaded] = await events(ctx, subjects.UPLOADED, at_least=1)
    assert uploaded.image_id == again.image_id
    assert await claim_state(ctx, sha) == "published"
    assert await staged_originals(ctx) == []  # announced: its marker is gone


async def lost_original(ctx: Context, photo: bytes, age_s: float) -> str:
    """What an upload that died after storing its original, ``age_s`` ago, leaves: the
    original, its marker, its claim pending. Returns the original's key."""
    sha = hashlib.sha256(photo).hexdigest()
    lost_id = new_id()
    key = f"uploads/{lost_id}/lost.jpg"
    at = time.time() - age_s
    await ctx.digests.create(sha, claim(lost_id, key, "pending", at))
    await stage(ctx, lost_id, key, sha, at)
    await ctx.store.put_bytes(key, photo, "image/jpeg")
    return key


async def test_the_sweeper_leaves_an_original_a_re_upload_is_announcing(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-upload adopts a lost original (renews its claim) and is about to announce it
    when a sweep runs: the sweep leaves it, and the image is announced with its original.
    The sweep used to delete the original the event then named."""
    photo = jpeg(240, 160, (0, 60, 61))
    key = await lost_original(ctx, photo, ctx.settings.ingest.pending_claim_s + 100)
    announcing, go = asyncio.Event(), asyncio.Event()
    real_announce = accept._announce

    async def held_announce(*args: Any) -> None:
        announcing.set()
        await go.wait()
        await real_announce(*args)

    monkeypatch.setattr(accept, "_announce", held_announce)
    upload = asyncio.create_task(accept_upload(ctx, _chunks(photo), "again.jpg", "test"))
    await announcing.wait()
    report = await sweep_once(ctx, time.time())
    assert report.abandoned == 0
    go.set()
    again = await upload
    assert again.duplicate and key == f"uploads/{again.image_id}/lost.jpg"
    [uploaded] = await events(ctx, subjects.UPLOADED, at_least=1)
    assert uploaded.image_id == again.image_id
    assert await ctx.store.list_keys("uploads/") == [key]
    assert await claim_state(ctx, hashlib.sha256(photo).hexdigest()) == "published"
    assert await staged_originals(ctx) == []


async def test_the_sweeper_leaves_a_stale_original_whose_claim_was_renewed(
    ctx: Context,
) -> None:
    """The marker is stale but the claim was renewed since (a re-upload adopting the
    original renews the claim, then the marker): the sweep skips it."""
    photo = jpeg(240, 160, (0, 61, 60))
    sha = hashlib.sha256(photo).hexdigest()
    key = await lost_original(ctx, photo, ctx.settings.ingest.pending_claim_s + 100)
    lost_id = key.split("/")[1]
    await ctx.digests.put(sha, claim(lost_id, key, "pending", time.time()))  # renewed
    report = await sweep_once(ctx, time.time())
    assert report.skipped == 1 and report.abandoned == 0
    assert await ctx.store.list_keys("uploads/") == [key]
    assert await claim_state(ctx, sha) == "pending"


async def test_a_re_upload_never_adopts_an_original_the_sweeper_is_dropping(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-upload finds a stale claim and its original; before it adopts them, a sweep
    drops both. It must not renew the claim it found gone and announce a deleted
    original: it makes a new image of its own."""
    photo = jpeg(240, 160, (1, 60, 60))
    key = await lost_original(ctx, photo, ctx.settings.ingest.pending_claim_s + 100)
    looking, go = asyncio.Event(), asyncio.Event()
    real_announced = accept.announced

    async def held_announced(*args: Any) -> set[str]:
        looking.set()  # the re-upload has read the stale claim and found the original
        await go.wait()
        return await real_announced(*args)

    monkeypatch.setattr(accept, "announced", held_announced)
    upload = asyncio.create_task(accept_upload(ctx, _chunks(photo), "again.jpg", "test"))
    await looking.wait()
    report = await sweep_once(ctx, time.time())  # its own look at the stream is not held
    assert report.abandoned == 1
    go.set()
    again = await upload
    assert not again.duplicate and key.split("/")[1] != again.image_id
    [uploaded] = await events(ctx, subjects.UPLOADED, at_least=1)
    assert uploaded.image_id == again.image_id
    assert uploaded.object is not None
    assert await ctx.store.list_keys("uploads/") == [uploaded.object.key]


async def test_an_unrecorded_published_mark_keeps_the_marker_for_the_sweeper(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload is announced but marking its claim "published" fails: the marker must
    stay (it used to go), or no sweep ever settles the claim left pending."""
    photo = jpeg(260, 150, (9, 9, 200))
    sha = hashlib.sha256(photo).hexdigest()

    def failing(write: Any) -> Any:
        async def call(key: str, value: bytes, *args: Any, **kwargs: Any) -> Any:
            if key == sha and b'"published"' in value:
                raise nats.errors.TimeoutError
            return await write(key, value, *args, **kwargs)

        return call

    for name in ("put", "update"):
        monkeypatch.setattr(ctx.digests, name, failing(getattr(ctx.digests, name)))
    accepted = await accept_upload(ctx, _chunks(photo), "blip.jpg", "test")
    assert not accepted.duplicate
    assert await claim_state(ctx, sha) == "pending"
    [staged] = await staged_originals(ctx)
    assert staged.image_id == accepted.image_id
    monkeypatch.undo()
    report = await sweep_once(ctx, staged.at + ctx.settings.ingest.pending_claim_s + 1)
    assert report.settled == 1 and report.abandoned == 0
    assert await claim_state(ctx, sha) == "published"
    assert await staged_originals(ctx) == []
    assert await ctx.store.list_keys("uploads/") == [staged.key]


# --- a stalled store -------------------------------------------------------------------------


class StallingProxy:
    """A TCP proxy to the S3 server that, while ``stalled``, takes every byte and passes
    none on, in either direction: the server never sees a request, the client never gets
    an answer, as when S3 hangs."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.stalled = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
            try:
                await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
            finally:
                up_writer.close()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while chunk := await source.read(65536):
            if not self.stalled:
                sink.write(chunk)
                await sink.drain()
        with contextlib.suppress(OSError):
            sink.write_eof()


async def test_a_stalled_store_answers_503_with_retry_after_and_keeps_nothing(
    ctx: Context, admin: str, aiohttp_client: Any
) -> None:
    proxy = StallingProxy(ctx.settings.s3.endpoint or "")
    await proxy.start()
    s3 = ctx.settings.s3.model_copy(
        update={"endpoint": proxy.url, "interactive_timeout_s": STALL_TIMEOUT_S}
    )
    store = ObjectStore.connect(s3)
    photo = jpeg(300, 200, (70, 70, 200))
    sha = hashlib.sha256(photo).hexdigest()
    try:
        client = await aiohttp_client(build_app(dataclasses.replace(ctx, store=store)))
        proxy.stalled = True
        response = await asyncio.wait_for(
            client.post("/api/uploads", data=form(("stalled.jpg", photo)), headers=auth(admin)),
            STALL_BOUND_S,
        )
        assert response.status == 503
        assert response.content_type == "application/problem+json"
        assert response.headers["Retry-After"] == "5"
        [result] = (await response.json())["results"]
        assert "did not answer in time" in result["error"]
        assert await claim_state(ctx, sha) is None  # released at once: a retry can go ahead
        proxy.stalled = False
    finally:
        await store.close()
        await proxy.stop()

    # Nothing reached the store. Deleting what the put might have stored stalled too, so
    # the original's marker stayed for the sweeper, which finds nothing to keep.
    assert await ctx.store.list_keys("uploads/") == []
    assert await ctx.store.list_keys("incoming/") == []
    [staged] = await staged_originals(ctx)
    report = await sweep_once(ctx, staged.at + ctx.settings.ingest.pending_claim_s + 1)
    assert report.abandoned == 1 and await staged_originals(ctx) == []
    again = await accept_upload(ctx, _chunks(photo), "again.jpg", "test")
    assert not again.duplicate


class HeldPuts(StallingProxy):
    """A TCP proxy to the S3 server that holds every PUT request back, its bytes kept, until
    :meth:`release`, then sends it on: the store takes the write long after its client gave
    up, as a slow (not dead) S3 server does. Other requests pass. A connection's first
    request decides (a fresh store's PUT opens a connection of its own)."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.landed = asyncio.Event()  # the server has answered a released PUT
        self._released = asyncio.Event()

    def release(self) -> None:
        self._released.set()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        try:
            first = await reader.read(65536)
            if first.startswith(b"PUT "):
                await self._hold(first, reader, up_reader, up_writer)
            else:
                up_writer.write(first)
                await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            up_writer.close()
            writer.close()
            self._tasks.discard(task)

    async def _hold(
        self,
        first: bytes,
        reader: asyncio.StreamReader,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        request = [first]
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):  # until the client hangs up on us
                request.append(chunk)
        await self._released.wait()
        up_writer.write(b"".join(request))
        await up_writer.drain()
        await up_reader.readuntil(b"\r\n\r\n")  # the answer's head: the object is stored
        self.landed.set()


async def test_an_original_a_slow_store_writes_after_the_upload_failed_is_swept(
    ctx: Context,
) -> None:
    """The store takes the original's PUT only after the intake gave up on it (and
    deleted what it might have stored): the claim is released at once, but the marker
    stays, so the sweeper deletes the original that landed late. The marker used to go
    with the delete, leaving the late original to nobody."""
    proxy = HeldPuts(ctx.settings.s3.endpoint or "")
    await proxy.start()
    s3 = ctx.settings.s3.model_copy(
        update={"endpoint": proxy.url, "interactive_timeout_s": STALL_TIMEOUT_S}
    )
    store = ObjectStore.connect(s3)
    photo = jpeg(300, 200, (70, 70, 201))
    sha = hashlib.sha256(photo).hexdigest()
    try:
        slow = dataclasses.replace(ctx, store=store)
        with pytest.raises(UploadRejectedError) as refused:
            await accept_upload(slow, _chunks(photo), "slow.jpg", "test")
        assert refused.value.status == 503
        assert await claim_state(ctx, sha) is None  # a retry can go ahead at once
        [staged] = await staged_originals(ctx)
        proxy.release()
        await proxy.landed.wait()
    finally:
        await store.close()
        await proxy.stop()
    assert await ctx.store.list_keys("uploads/") == [staged.key]  # landed after all
    report = await sweep_once(ctx, staged.at + ctx.settings.ingest.pending_claim_s + 1)
    assert report.abandoned == 1
    assert await ctx.store.list_keys("uploads/") == []
    assert await staged_originals(ctx) == []
