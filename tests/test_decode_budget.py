"""Decode memory per worker: the process's decode budget (fair, weighted, never deadlocked),
large PNGs sent at once through the real ingest handler, and Pillow's own bomb guard left
as Pillow sets it while ``ingest.max_pixels`` decides."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import io
from typing import Any

import pytest
from PIL import Image

from bus.core import subjects
from bus.core.envelope import new_id
from bus.core.settings import IngestSettings
from bus.images.budget import DecodeBudget
from bus.images.check import Limits, check_file
from bus.runtime.context import Context
from bus.runtime.registry import load
from functions.ingest.imaging import Options, decode_cost, derive
from tests.support import corpus
from tests.support.streams import announce_stored, dead_letters, eventually

PILLOW_DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3  # Pillow's default


async def holding(budget: DecodeBudget, cost: int, held: asyncio.Event, go: asyncio.Event) -> None:
    async with budget.hold(cost):
        held.set()
        await go.wait()


async def test_requests_are_served_in_order_and_never_past_the_budget() -> None:
    budget = DecodeBudget(100)
    events = {name: (asyncio.Event(), asyncio.Event()) for name in "abc"}
    a = asyncio.create_task(holding(budget, 60, *events["a"]))
    await events["a"][0].wait()
    b = asyncio.create_task(holding(budget, 50, *events["b"]))
    c = asyncio.create_task(holding(budget, 10, *events["c"]))
    await eventually(lambda: budget.waiting == 2, what="b and c queued")
    # c would fit beside a, but b asked first: nobody overtakes a queued request.
    assert not events["c"][0].is_set()
    events["a"][1].set()
    await a
    await events["b"][0].wait()
    await events["c"][0].wait()
    assert budget.in_use == 60 and budget.peak == 60
    events["b"][1].set()
    events["c"][1].set()
    await asyncio.gather(b, c)
    assert budget.in_use == 0 and budget.waited == 2


async def test_a_request_larger_than_the_budget_runs_alone() -> None:
    budget = DecodeBudget(100)
    small, huge, later = [(asyncio.Event(), asyncio.Event()) for _ in range(3)]
    first = asyncio.create_task(holding(budget, 30, *small))
    await small[0].wait()
    big = asyncio.create_task(holding(budget, 500, *huge))
    after = asyncio.create_task(holding(budget, 10, *later))
    await eventually(lambda: budget.waiting == 2, what="both queued")
    small[1].set()
    await huge[0].wait()
    assert budget.in_use == budget.capacity == budget.peak and budget.waiting == 1
    huge[1].set()
    await later[0].wait()
    later[1].set()
    await asyncio.gather(first, big, after)
    assert budget.in_use == 0


async def test_cancelled_requests_give_their_place_and_their_grant_back() -> None:
    budget = DecodeBudget(100)
    held, go = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(holding(budget, 80, held, go))
    await held.wait()
    blocked = asyncio.create_task(holding(budget, 50, asyncio.Event(), asyncio.Event()))
    behind_held, behind_go = asyncio.Event(), asyncio.Event()
    behind = asyncio.create_task(holding(budget, 10, behind_held, behind_go))
    await eventually(lambda: budget.waiting == 2, what="two queued")
    blocked.cancel()  # the head leaves the queue: the one behind it fits beside the first
    await behind_held.wait()
    assert budget.in_use == 90
    behind_go.set()
    await behind
    # Cancelled in the same step as its turn came: the grant it never used comes back.
    late = asyncio.create_task(holding(budget, 50, asyncio.Event(), asyncio.Event()))
    await eventually(lambda: budget.waiting == 1, what="late queued")
    go.set()
    await first  # its release granted late's 50 and scheduled the wake-up...
    late.cancel()  # ...which the cancellation beats
    for task in (blocked, late):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert budget.in_use == 0 and budget.waiting == 0


def solid_png(width: int, height: int, mode: str = "RGB") -> bytes:
    """A large PNG made fast: flat colour, the quickest compression."""
    out = io.BytesIO()
    Image.new(mode, (width, height), 90).save(out, "PNG", compress_level=1)
    return out.getvalue()


async def publish_generated(ctx: Context, key: str, data: bytes) -> str:
    image_id = f"gen-{new_id()}"
    await announce_stored(ctx, subjects.GENERATED, image_id, key, data, "image/png")
    return image_id


async def ingested(ctx: Context, image_id: str) -> dict[str, Any]:
    key = subjects.image_key(image_id, subjects.INGEST_DOC)
    await eventually(lambda: ctx.store.stat(key), timeout=60, what=f"{image_id} ingested")
    doc: dict[str, Any] = await ctx.store.get_json(key)
    return doc


@pytest.mark.nats
@pytest.mark.s3
async def test_large_pngs_sent_at_once_are_decoded_within_the_budget(
    ctx: Context, run_function: Any
) -> None:
    big = solid_png(6000, 4000)  # 24 MP: ~96 MB decoded
    cost = decode_cost(big, Options.from_settings(ctx.settings.ingest))
    budget = DecodeBudget(cost * 5 // 2)  # room for two decodes at a time
    ctx.decode_budget = budget
    await run_function(load("ingest"), concurrency=4)
    # Hold all but less than one decode's share, so all four reach the budget together.
    async with budget.hold(budget.capacity - cost + 1):
        ids = [await publish_generated(ctx, f"generated/big/{i}.png", big) for i in range(4)]
        await eventually(lambda: budget.waiting == 4, timeout=60, what="4 decodes queued")
    docs = [await ingested(ctx, image_id) for image_id in ids]
    assert [d["width"] for d in docs] == [6000] * 4
    # Two were granted at once when the test let go, never a third: peak is their share.
    assert budget.peak == 2 * cost <= budget.capacity
    assert budget.in_use == 0 and budget.waiting == 0 and budget.waited == 4


def test_pillows_bomb_guard_is_left_as_pillow_sets_it() -> None:
    for module in ("bus.images.check", "functions.ingest.imaging", "functions.ingest.handler"):
        importlib.import_module(module)
    assert Image.MAX_IMAGE_PIXELS == PILLOW_DEFAULT_MAX_PIXELS


def test_max_pixels_may_allow_more_than_pillows_guard_without_touching_it() -> None:
    """13,500 x 13,400 is past twice Pillow's limit, where Image.open refuses outright."""
    data = solid_png(13_500, 13_400, "L")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    roomy = IngestSettings(max_pixels=200_000_000)
    assert check_file(io.BytesIO(data), Limits.from_settings(roomy)).width == 13_500
    derived = derive(data, Options.from_settings(roomy))
    assert derived.info["width"] == 13_500 and derived.renditions[0].width == 2048
    assert Image.MAX_IMAGE_PIXELS == PILLOW_DEFAULT_MAX_PIXELS


@pytest.mark.nats
@pytest.mark.s3
async def test_an_image_at_max_pixels_ingests_and_one_past_it_is_refused_saying_why(
    ctx: Context, run_function: Any
) -> None:
    assert ctx.settings.ingest.max_pixels == 150_000_000
    await run_function(load("ingest"))
    at_limit = await publish_generated(ctx, "generated/at/0.png", solid_png(12_500, 12_000, "L"))
    over = await publish_generated(
        ctx, "generated/over/0.png", corpus.png_header_only(12_500, 12_001)
    )
    doc = await ingested(ctx, at_limit)
    assert (doc["width"], doc["height"]) == (12_500, 12_000)
    [record] = await dead_letters(ctx, "ingest", at_least=1, timeout=30)
    assert record["image_id"] == over and record["kind"] == "rejected"
    assert "12500x12001 is 150,012,500 pixels, over the limit of 150,000,000" in record["reason"]
    assert Image.MAX_IMAGE_PIXELS == PILLOW_DEFAULT_MAX_PIXELS


def test_the_cost_counts_the_full_size_decode_and_jpegs_at_their_reduced_scale() -> None:
    options = Options.from_settings(IngestSettings())
    rgb = solid_png(4000, 3000)
    assert decode_cost(rgb, options) >= 4000 * 3000 * 4  # Pillow keeps RGB in 4 bytes a pixel
    # A JPEG decodes at a reduced DCT scale: its cost is far below the full size.
    jpeg = io.BytesIO()
    Image.new("RGB", (8000, 6000), (1, 2, 3)).save(jpeg, "JPEG")
    assert decode_cost(jpeg.getvalue(), options) < 8000 * 6000 * 4 // 2
    small = dataclasses.replace(options, display_px=256)
    assert decode_cost(rgb, small) < decode_cost(rgb, options)
