"""Property tests: hostile bytes never crash the checks or ingest, and never leave objects."""

from __future__ import annotations

import io
import os
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.payload import AsyncIterablePayload
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus.core.settings import IngestSettings
from bus.gateway.app import build_app
from bus.images.check import Limits, UploadRejectedError, check_file
from bus.intake.accept import accept_upload
from bus.runtime.context import Context
from functions.ingest.imaging import BadImageError, Options, derive
from tests.support import corpus
from tests.support.http import auth
from tests.support.images import jpeg, png

LIMITS = Limits.from_settings(IngestSettings())
OPTIONS = Options.from_settings(IngestSettings())
MAGIC = [
    b"",
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"RIFF\0\0\0\0WEBP",
    b"II*\0",
    b"MM\0*",
    b"\0\0\0\x18ftypheic",
    b"\0\0\0\x1cftypavif",
]
VALID = [jpeg(64, 48), png(40, 30), corpus.animated_gif(2), corpus.png16_grey(), corpus.heic()]

hostile = st.builds(
    lambda magic, rest: magic + rest, st.sampled_from(MAGIC), st.binary(max_size=600)
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid image with bytes flipped, cut short, or spliced with junk."""
    data = bytearray(draw(st.sampled_from(VALID)))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    for _ in range(draw(st.integers(1, 8))):
        data[rng.randrange(len(data))] = rng.randrange(256)
    if draw(st.booleans()):
        data = data[: rng.randrange(1, len(data))]
    return bytes(data)


def check_or_reject(data: bytes) -> None:
    try:
        check_file(io.BytesIO(data), LIMITS)
    except UploadRejectedError as exc:
        assert exc.status in (413, 415, 422) and exc.reason


@settings(max_examples=300, deadline=None)
@given(hostile)
def test_random_bytes_never_crash_the_checks(data: bytes) -> None:
    check_or_reject(data)


@settings(max_examples=300, deadline=None)
@given(mutated())
def test_damaged_images_are_refused_cleanly_or_fully_processed(data: bytes) -> None:
    check_or_reject(data)
    try:
        derived = derive(data, OPTIONS)
    except BadImageError as exc:
        assert str(exc)
    else:
        assert derived.renditions and all(r.data for r in derived.renditions)


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.nats
@pytest.mark.s3
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.one_of(hostile, mutated()), chunk=st.integers(1, 97))
async def test_rejected_uploads_leave_nothing_in_the_store(
    ctx: Context, data: bytes, chunk: int
) -> None:
    before = set(await ctx.store.list_keys("uploads/"))
    try:
        accepted = await accept_upload(ctx, _chunks(data, chunk), "x.bin", "test")
    except UploadRejectedError:
        assert set(await ctx.store.list_keys("uploads/")) == before
        return
    after = set(await ctx.store.list_keys("uploads/")) - before
    if accepted.duplicate:
        assert not after
    else:
        assert [k.split("/")[1] for k in after] == [accepted.image_id]


@pytest.mark.nats
@pytest.mark.s3
@pytest.mark.slow
async def test_memory_stays_flat_for_a_huge_multipart_upload(
    ctx: Context, aiohttp_client: Any, admin: str
) -> None:
    """A 1 GB file part (it sniffs as JPEG, then fails the decode) sent over HTTP to the
    gateway in this process grows RSS by under 50 MB, client and server together."""
    size = 1024**3
    block = os.urandom(1024 * 1024)

    def rss() -> int:
        with open("/proc/self/status") as fh:
            line = next(line for line in fh if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    peak = baseline = rss()

    async def body() -> AsyncIterator[bytes]:
        nonlocal peak
        yield b"\xff\xd8\xff\xe0" + block[4:]
        for _ in range(size // len(block) - 1):
            peak = max(peak, rss())
            yield block

    limits = ctx.settings.ingest.model_copy(update={"max_upload_mb": 2048})
    ctx.settings = ctx.settings.model_copy(update={"ingest": limits})
    client = await aiohttp_client(build_app(ctx))
    form = aiohttp.FormData()
    form.add_field(
        "file", AsyncIterablePayload(body()), filename="huge.jpg", content_type="image/jpeg"
    )
    response = await client.post("/api/uploads", data=form, headers=auth(admin))
    assert response.status == 422, await response.text()
    assert "corrupt or truncated JPEG" in (await response.json())["detail"]
    assert peak - baseline < 50 * 1024**2, f"RSS grew by {(peak - baseline) / 1024**2:.0f} MB"
    assert await ctx.store.list_keys("uploads/") == []
