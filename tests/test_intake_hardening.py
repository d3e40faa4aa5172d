"""The intake under trouble, on the real bus and store: presigned forms the S3 server holds
to their size, type and key; a form used again after completion; the sweeper; a dedupe
claim left pending by a NATS blip; and a stalled S3 server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
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
from bus.intake.accept import (
    IN_FLIGHT_WAIT_S,
    STAGED_PREFIX,
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

    # Used again and never completed: the sweeper deletes it, whatever its age.
    assert (await post_form(ticket, jpeg(60, 40, (9, 9, 9))))[0] == 204
    report = await sweep_once(ctx, time.time())
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
        store.close()
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
