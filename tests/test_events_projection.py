"""The live stream hands on an event notify projects only once the read model has it, so a
page that fetches an image on hearing its event finds the event there; and it never waits
long when notify cannot write (real NATS, PostgreSQL and notify)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from bus.core import subjects
from bus.gateway.projection import subject_matches
from bus.runtime.context import Context
from bus.runtime.registry import load
from bus.runtime.streams import declare_consumer
from tests.support.http import auth
from tests.support.streams import eventually
from tests.test_events import (
    WAIT_S,
    Api,
    MakeApi,
    event,
    hub,
    live_stream,
    make_api,
    publish,
)

pytestmark = [pytest.mark.nats, pytest.mark.s3]
__all__ = ["make_api"]  # the fixture, shared with test_events

RunFunction = Callable[..., Awaitable[object]]


@contextlib.asynccontextmanager
async def row_locked(ctx: Context, image_id: str) -> AsyncIterator[None]:
    """Hold ``image_id``'s catalogue row locked, so notify's next write to it waits."""
    assert ctx.db is not None
    async with ctx.db.pool.acquire() as conn, conn.transaction():
        locked = await conn.fetchval("SELECT id FROM images WHERE id = $1 FOR UPDATE", image_id)
        assert locked == image_id
        yield


async def uploaded(ctx: Context, api: Api, admin: str, image_id: str) -> None:
    """``image_id`` uploaded, projected, and heard on the stream."""
    stream = await live_stream(api, **auth(admin))
    [seq] = await publish(ctx, event(subjects.UPLOADED, image=image_id, name="a.jpg"))
    assert await stream.ids(seq) == [seq]
    stream.close()


def test_subjects_match_as_nats_matches_them() -> None:
    assert subject_matches("dr.captioned", "dr.captioned")
    assert not subject_matches("dr.captioned", "dr.captioned.x")
    assert subject_matches("dr.failed.>", "dr.failed.caption")
    assert not subject_matches("dr.failed.>", "dr.failed")
    assert subject_matches("dr.*.generate", "dr.cancelled.generate")
    assert not subject_matches("dr.*.generate", "dr.cancelled.caption")
    assert subject_matches(">", "dr.anything.at.all")


async def test_an_event_goes_out_once_notify_has_written_it(
    ctx: Context, make_api: MakeApi, admin: str, run_function: RunFunction
) -> None:
    assert ctx.db is not None
    await run_function(load("notify"))
    api = await make_api(projection_wait_s=600.0)  # it never gives up here
    await uploaded(ctx, api, admin, "slow")
    stream = await live_stream(api, **auth(admin))
    async with row_locked(ctx, "slow"):
        [seq] = await publish(ctx, event(subjects.INGESTED, image="slow", width=640, height=480))
        # The hub holds it: notify has it in hand, blocked on the row.
        await eventually(lambda: hub(api).projection.waiting_for == seq, what="the hub to wait")
    assert await stream.ids(seq) == [seq]
    doc = await ctx.db.get("slow")  # at once: the event was written before it went out
    assert doc is not None and doc["ingest"]["width"] == 640


async def test_an_event_notify_cannot_write_goes_out_after_the_wait_and_waiting_resumes(
    ctx: Context,
    make_api: MakeApi,
    admin: str,
    run_function: RunFunction,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert ctx.db is not None
    await run_function(load("notify"))
    api = await make_api(projection_wait_s=600.0)
    gate = hub(api).projection
    await uploaded(ctx, api, admin, "stuck")
    stream = await live_stream(api, **auth(admin))
    assert not gate.stalled
    gate.wait_s = 0.5
    async with row_locked(ctx, "stuck"):
        [seq] = await publish(ctx, event(subjects.INGESTED, image="stuck", width=640, height=480))
        assert await stream.ids(seq) == [seq]  # while notify still cannot write it
        doc = await ctx.db.get("stuck")
        assert doc is not None and "ingest" not in doc
        assert f"notify has not projected event {seq} after 0.5 s" in caplog.text
        assert gate.stalled  # the events after it do not wait, until notify gets past it
    await eventually(lambda: width_is(ctx, "stuck", 640), timeout=WAIT_S, what="the write")
    await eventually(lambda: not gate.stalled, timeout=WAIT_S, what="the gate to wait again")
    gate.wait_s = 600.0
    async with row_locked(ctx, "stuck"):
        [again] = await publish(ctx, event(subjects.INGESTED, image="stuck", width=800, height=600))
        await eventually(lambda: gate.waiting_for == again, what="the hub to wait again")
    assert await stream.ids(again) == [again]
    assert await width_is(ctx, "stuck", 800)


async def width_is(ctx: Context, image_id: str, width: int) -> bool:
    assert ctx.db is not None
    doc = await ctx.db.get(image_id)
    return doc is not None and doc.get("ingest", {}).get("width") == width


async def test_without_notify_running_nothing_waits(
    ctx: Context, make_api: MakeApi, admin: str
) -> None:
    """notify's consumer is there (the gateway or a past worker made it); nobody pulls."""
    notify = load("notify")
    await declare_consumer(ctx.js, ctx.names, notify.spec, ctx.settings.function("notify"))
    api = await make_api(projection_wait_s=3600.0)  # a wait would outlast the test
    stream = await live_stream(api, **auth(admin))
    [seq] = await publish(ctx, event(subjects.UPLOADED, image="alone", name="a.jpg"))
    assert await stream.ids(seq) == [seq]
    assert ctx.db is not None and await ctx.db.get("alone") is None  # nobody projected it


async def test_a_notify_that_died_holding_an_event_is_not_waited_for(
    ctx: Context, make_api: MakeApi, admin: str
) -> None:
    """Its event stays un-acknowledged (nobody pulls to take the redelivery), as after a
    kill -9 mid-write: that alone does not make notify look alive."""
    notify = load("notify")
    await declare_consumer(ctx.js, ctx.names, notify.spec, ctx.settings.function("notify"))
    await publish(ctx, event(subjects.UPLOADED, image="in-hand", name="a.jpg"))
    dead = await ctx.js.pull_subscribe_bind(ctx.names.durable("notify"), ctx.names.stream)
    [held] = await dead.fetch(1, timeout=WAIT_S)  # taken, never acknowledged
    await dead.unsubscribe()
    info = await ctx.js.consumer_info(ctx.names.stream, ctx.names.durable("notify"))
    assert info.num_ack_pending == 1 and held.metadata.num_delivered == 1
    api = await make_api(projection_wait_s=3600.0)
    stream = await live_stream(api, **auth(admin))
    [seq] = await publish(ctx, event(subjects.UPLOADED, image="after", name="b.jpg"))
    assert await stream.ids(seq) == [seq]
