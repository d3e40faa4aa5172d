"""`darkroom worker` processes on the real bus: sharing a backlog, draining on SIGTERM,
redelivery after a crash, and dead-lettering a message that kills every worker."""

from __future__ import annotations

import re
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bus.core.envelope import Event, new_id, now_iso
from bus.runtime.context import Context
from bus.runtime.registry import load
from bus.runtime.streams import declare_consumer
from tests.support import procs
from tests.support.clock import past
from tests.support.streams import dead_letters, events, eventually, settled

pytestmark = [pytest.mark.nats, pytest.mark.s3, pytest.mark.slow]


async def publish_work(ctx: Context, topic: str, count: int, **data: Any) -> list[Event]:
    sent = []
    for n in range(count):
        event = Event(
            id=f"w-{new_id()}",
            type=topic,
            source="test",
            time=now_iso(),
            image_id=new_id(),
            data={"n": n, **data},
        )
        await ctx.js.publish(
            ctx.names.subject(topic), event.encode(), headers={"Nats-Msg-Id": event.id}
        )
        sent.append(event)
    return sent


async def prepare(ctx: Context, module: str) -> None:
    fn = load(module)
    await declare_consumer(ctx.js, ctx.names, fn.spec, ctx.settings.function(fn.spec.name))


DONE_RE = re.compile(r"darkroom\.runner: (\w+): done (\S+)")


def done_ids(proc: procs.Proc) -> list[str]:
    return [m.group(2) for line in proc.lines if (m := DONE_RE.search(line))]


async def exhausted_settled(ctx: Context, function: str) -> bool:
    """The function's consumer of max-deliveries advisories has nothing left to handle."""
    info = await ctx.js.consumer_info(
        ctx.names.advisory_stream, ctx.names.exhausted_durable(function)
    )
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


async def test_two_workers_split_a_backlog_none_lost_none_twice(
    ctx: Context, subprocess_env: dict[str, str]
) -> None:
    await prepare(ctx, "tests.support.fn_slow")
    sent = await publish_work(ctx, "work", 80, sleep=0.05)
    args = ["worker", "tests.support.fn_slow", "--log-level", "debug"]
    async with procs.running(args, subprocess_env) as a, procs.running(args, subprocess_env) as b:
        await events(ctx, "done", at_least=80, timeout=60)
        # Nothing pending and nothing un-acked: no delivery is left that could complete an
        # event a second time, so the workers' logs below are the whole story.
        await settled(ctx, "slow")
        a.signal(signal.SIGTERM)
        b.signal(signal.SIGTERM)
        assert await a.wait() == 0 and await b.wait() == 0
    done = await events(ctx, "done", at_least=80)  # and whatever else is stored
    assert len(done) == 80
    assert sorted(e.causation_id for e in done) == sorted(e.id for e in sent)
    # "done" events are de-duplicated by id on the stream, so a second completion shows only
    # in the logs: count every completion, by either worker.
    by_a, by_b = done_ids(a), done_ids(b)
    assert by_a and by_b, "both workers should have taken part"
    twice = [i for i, n in Counter(by_a + by_b).items() if n > 1]
    assert not twice, f"completed more than once: {twice}"
    assert set(by_a + by_b) == {e.id for e in sent}
    pids = {e.data["pid"] for e in done}
    assert pids == {a.proc.pid, b.proc.pid}


async def test_sigterm_drains_in_flight_work_and_leaves_the_rest(
    ctx: Context, subprocess_env: dict[str, str]
) -> None:
    await prepare(ctx, "tests.support.fn_slow")
    sent = await publish_work(ctx, "work", 6, sleep=2.0)
    worker = await procs.start(
        ["worker", "tests.support.fn_slow", "--concurrency", "2", "--log-level", "debug"],
        subprocess_env,
    )
    durable = ctx.names.durable("slow")

    async def busy() -> bool:
        return (await ctx.js.consumer_info(ctx.names.stream, durable)).num_ack_pending == 2

    await eventually(busy, timeout=20, what="two events in flight")
    worker.signal(signal.SIGTERM)
    assert await worker.wait(timeout=20) == 0
    assert "drained and stopped" in worker.output
    finished = await events(ctx, "done", at_least=2, timeout=5)
    assert len(finished) == 2, "exactly the in-flight events finish during the drain"
    info = await ctx.js.consumer_info(ctx.names.stream, durable)
    assert info.num_ack_pending == 0 and info.num_pending == 4, "the rest wait, un-delivered"
    async with procs.running(
        ["worker", "tests.support.fn_slow", "--concurrency", "4"], subprocess_env
    ):
        done = await events(ctx, "done", at_least=6, timeout=30)
    assert sorted(e.causation_id for e in done) == sorted(e.id for e in sent)


async def test_a_crashed_worker_s_message_is_redelivered_and_completed(
    ctx: Context, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    await prepare(ctx, "tests.support.fn_crash_once")
    marker = tmp_path / "crashed"
    [event] = await publish_work(ctx, "work", 1, marker=str(marker))
    durable = ctx.names.durable("crashonce")
    first = await procs.start(["worker", "tests.support.fn_crash_once"], subprocess_env)
    assert await first.wait(timeout=30) == 17
    assert marker.exists()
    # Read while the crashed delivery is still un-acked: delivered once, never acked.
    info = await ctx.js.consumer_info(ctx.names.stream, durable)
    assert info.delivered.consumer_seq == 1 and info.num_ack_pending == 1
    async with procs.running(["worker", "tests.support.fn_crash_once"], subprocess_env) as second:
        await events(ctx, "done", at_least=1, timeout=20)
        await settled(ctx, "crashonce")  # acked: it will not come back a third time
    [done] = await events(ctx, "done", at_least=1)  # read to the stream's end
    assert done.causation_id == event.id and done.data["pid"] == second.proc.pid
    # The consumer sequence counts every delivery, acked or not: the crashed one and the
    # redelivery that completed, and no other.
    info = await ctx.js.consumer_info(ctx.names.stream, durable)
    assert info.delivered.consumer_seq == 2 and info.ack_floor.consumer_seq == 2


async def test_a_message_that_kills_every_worker_is_dead_lettered(
    ctx: Context, subprocess_env: dict[str, str]
) -> None:
    await prepare(ctx, "tests.support.fn_crash_always")
    [event] = await publish_work(ctx, "poison", 1)
    args = ["worker", "tests.support.fn_crash_always"]
    for _ in range(2):  # max_deliver
        crashed = await procs.start(args, subprocess_env)
        assert await crashed.wait(timeout=30) == 17
    info = await ctx.js.consumer_info(ctx.names.stream, ctx.names.durable("crashalways"))
    assert info.delivered.consumer_seq == 2 and info.num_ack_pending == 1
    # No worker is running when the last delivery's ack_wait runs out (the server's own
    # time of that delivery plus the consumer's ack_wait); the next worker to start is
    # told of the exhausted event by the advisory.
    assert info.delivered.last_active is not None
    await past(info.delivered.last_active.timestamp() + info.config.ack_wait)
    async with procs.running(args, subprocess_env):
        await dead_letters(ctx, "crashalways", at_least=1, timeout=20)
        # The advisory is acked once its dead letter and failed event are stored; both
        # consumers settled means no second record is on its way.
        await eventually(
            lambda: exhausted_settled(ctx, "crashalways"), timeout=20, what="advisory handled"
        )
        await settled(ctx, "crashalways")
    [record] = await dead_letters(ctx, "crashalways", at_least=1)  # read to the end
    assert record["kind"] == "timeout" and record["event_id"] == event.id
    assert "crashed or hung" in record["reason"]
    [failed] = await events(ctx, "failed.crashalways", at_least=1)
    assert failed.image_id == event.image_id
