"""How fast work comes back when a worker goes away, and that held work stays held.

JetStream redelivers an un-acked message once ``ack_wait`` passes without an ack or a
heartbeat. So a SIGKILLed worker's messages return one ``ack_wait`` after its last heartbeat,
a live worker keeps everything it holds (running, or queued for a slot) with heartbeats, and
a drain that gives up hands what it still holds back at once with a nak.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

from bus import Call, Context, Emit, Event, Function, Spec
from bus.core.envelope import new_id, now_iso
from bus.runtime.registry import discover, load
from bus.runtime.runner import heartbeat_interval
from bus.runtime.streams import declare_consumer
from tests.support import procs
from tests.support.streams import events, eventually, settled

RECOVERY_TARGET_S = 15.0  # a killed worker's work should be back within this
SLACK_S = 2.0  # the server's redelivery timer and a worker's pull, on a busy machine
RECOVER = "tests.support.fn_recover"


def test_shipped_functions_get_a_killed_worker_s_work_back_within_seconds() -> None:
    for name, fn in discover().items():
        spec = fn.spec
        assert spec.ack_wait <= RECOVERY_TARGET_S, f"{name}: ack_wait {spec.ack_wait:g} s"
        # A beat goes out up to half an interval late: at worst half an ack_wait of silence.
        assert heartbeat_interval(spec.ack_wait) <= spec.ack_wait / 3, name


async def publish_work(ctx: Context, count: int, **data: Any) -> list[Event]:
    sent = []
    for n in range(count):
        event = Event(
            id=f"r-{new_id()}",
            type="work",
            source="test",
            time=now_iso(),
            image_id=new_id(),
            data={"n": n, **data},
        )
        await ctx.js.publish(
            ctx.names.subject("work"), event.encode(), headers={"Nats-Msg-Id": event.id}
        )
        sent.append(event)
    return sent


async def consumer_info(ctx: Context, name: str) -> Any:
    return await ctx.js.consumer_info(ctx.names.stream, ctx.names.durable(name))


@pytest.mark.nats
@pytest.mark.s3
@pytest.mark.slow
async def test_a_killed_worker_s_messages_return_within_ack_wait(
    ctx: Context, subprocess_env: dict[str, str]
) -> None:
    fn = load(RECOVER)
    await declare_consumer(ctx.js, ctx.names, fn.spec, ctx.settings.function(fn.spec.name))
    ack_wait = fn.spec.ack_wait
    sent = await publish_work(ctx, 2, hold_first=True)
    args = ["worker", RECOVER, "--log-level", "debug"]
    holder = await procs.start(args, subprocess_env)
    try:

        async def both_held() -> bool:
            info = await consumer_info(ctx, "recover")
            return bool(info.num_pending == 0 and info.num_ack_pending == 2)

        await eventually(both_held, timeout=30, what="the holder holding both events")
        async with procs.running(args, subprocess_env) as rescuer:
            await rescuer.wait_for_line(f"worker {RECOVER} started")
            holder.signal(signal.SIGKILL)
            killed_at = time.time()
            assert await holder.wait(timeout=10) == -signal.SIGKILL
            # Its last heartbeat was before the kill: the server redelivers within ack_wait.
            done = await events(ctx, "done", at_least=2, timeout=ack_wait + 3 * SLACK_S)
            await settled(ctx, "recover")
    finally:
        if holder.proc.returncode is None:
            holder.signal(signal.SIGKILL)
            await holder.wait(timeout=10)
    assert sorted(e.causation_id or "" for e in done) == sorted(e.id for e in sent)
    assert {(e.data["attempt"], e.data["pid"]) for e in done} == {(2, rescuer.proc.pid)}
    info = await consumer_info(ctx, "recover")
    # Two deliveries to the holder, one redelivery each to the rescuer, and nothing else.
    assert info.delivered.consumer_seq == 4 and info.ack_floor.consumer_seq == 4
    assert info.delivered.last_active is not None
    returned_after = info.delivered.last_active.timestamp() - killed_at
    assert returned_after <= ack_wait + SLACK_S, f"redelivered {returned_after:.1f} s after"


@pytest.mark.nats
@pytest.mark.s3
@pytest.mark.slow
async def test_a_live_worker_keeps_a_handler_that_outlasts_ack_wait(
    ctx: Context, subprocess_env: dict[str, str]
) -> None:
    fn = load(RECOVER)
    await declare_consumer(ctx.js, ctx.names, fn.spec, ctx.settings.function(fn.spec.name))
    sleep = 2.5 * fn.spec.ack_wait
    [event] = await publish_work(ctx, 1, sleep=sleep)
    async with procs.running(["worker", RECOVER], subprocess_env):
        [done] = await events(ctx, "done", at_least=1, timeout=sleep + 30)
        await settled(ctx, "recover")
    assert done.causation_id == event.id and done.data["attempt"] == 1
    info = await consumer_info(ctx, "recover")
    # Acked after one delivery: a redelivery, even one acked since, would count here.
    assert info.delivered.consumer_seq == 1 and info.num_redelivered == 0


@pytest.mark.nats
@pytest.mark.s3
async def test_a_batch_waiting_for_a_slot_is_kept_alive(ctx: Context, run_function: Any) -> None:
    attempts: list[int] = []
    ack_wait = 2.0

    async def handle_batch(batch: list[Event], _: Context, calls: list[Call]) -> list[list[Emit]]:
        attempts.extend(c.attempt for c in calls)
        if batch[0].data["n"] == 0:
            await asyncio.sleep(2.5 * ack_wait)  # the only slot is busy; the next batch waits
        return [[Emit("b", data={"n": e.data["n"]})] for e in batch]

    for n in range(4):
        event = Event(id=f"q-{new_id()}", type="a", source="t", time=now_iso(), data={"n": n})
        await ctx.js.publish(
            ctx.names.subject("a"), event.encode(), headers={"Nats-Msg-Id": event.id}
        )
    spec = Spec("queued", listens=("a",), emits=("b",), batch=2, concurrency=1, ack_wait=ack_wait)
    await run_function(Function(spec, handle_batch=handle_batch))
    await settled(ctx, "queued")
    out = await events(ctx, "b", at_least=4)
    assert sorted(e.data["n"] for e in out) == [0, 1, 2, 3]
    assert attempts == [1, 1, 1, 1]
    info = await consumer_info(ctx, "queued")
    assert info.delivered.consumer_seq == 4, "a queued event was redelivered"


@pytest.mark.nats
@pytest.mark.s3
async def test_a_drain_that_gives_up_hands_back_what_it_held_at_once(
    ctx: Context, run_function: Any
) -> None:
    ack_wait = 60.0
    started = asyncio.Event()

    async def handle_batch(batch: list[Event], _: Context, calls: list[Call]) -> list[list[Emit]]:
        if calls[0].attempt == 1:
            started.set()
            await asyncio.sleep(3600)  # outlasts the drain
        return [[Emit("b", data={"attempt": c.attempt})] for c in calls]

    for n in range(4):
        event = Event(id=f"h-{new_id()}", type="a", source="t", time=now_iso(), data={"n": n})
        await ctx.js.publish(
            ctx.names.subject("a"), event.encode(), headers={"Nats-Msg-Id": event.id}
        )
    spec = Spec("handback", listens=("a",), emits=("b",), batch=2, concurrency=1, ack_wait=ack_wait)
    fn = Function(spec, handle_batch=handle_batch)
    first = await run_function(fn)
    await asyncio.wait_for(started.wait(), 10)

    async def all_held() -> bool:  # one batch running, one queued for the slot
        info = await consumer_info(ctx, "handback")
        return bool(info.num_pending == 0 and info.num_ack_pending == 4)

    await eventually(all_held, what="every event held by the first runner")
    await first.drain(timeout=0.2)
    await run_function(fn)
    # Left un-acked, they would return only ack_wait after their last heartbeat, which
    # came at most half an ack_wait before the drain.
    out = await events(ctx, "b", at_least=4, timeout=ack_wait / 2)
    assert [e.data["attempt"] for e in out] == [2, 2, 2, 2]
