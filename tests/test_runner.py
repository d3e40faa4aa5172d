"""The runner on a real nats-server: ack, retry, reject, max_deliver, malformed input,
idempotent replays, heartbeats and batches."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from bus.context import Context
from bus.envelope import Event, new_id, now_iso
from bus.function import Emit, Function, Reject, Retry, Spec
from tests.support.streams import dead_letters, events, eventually

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


async def publish(ctx: Context, event: Event, msg_id: str | None = None) -> None:
    await ctx.js.publish(
        ctx.names.subject(event.type), event.encode(), headers={"Nats-Msg-Id": msg_id or event.id}
    )


async def consumer(ctx: Context, name: str) -> Any:
    return await ctx.js.consumer_info(ctx.names.stream, ctx.names.durable(name))


async def settled(ctx: Context, name: str) -> bool:
    info = await consumer(ctx, name)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_success_publishes_next_event_then_acks(ctx: Context, run_function: Any) -> None:
    async def handle(event: Event, _: Context) -> list[Emit]:
        return [Emit("b", data={"seen": event.data["n"]})]

    await run_function(Function(Spec("pass", listens=("a",), emits=("b",)), handle, "test"))
    sent = [make_event("a", n=i) for i in range(20)]
    for event in sent:
        await publish(ctx, event)
    out = await events(ctx, "b", at_least=20)
    assert sorted(e.data["seen"] for e in out) == list(range(20))
    by_parent = {e.causation_id: e for e in out}
    for event in sent:
        child = by_parent[event.id]
        assert child.image_id == event.image_id and child.source == "darkroom/pass"
    await eventually(lambda: settled(ctx, "pass"), what="all acked")


async def test_retry_naks_with_delay_then_succeeds(ctx: Context, run_function: Any) -> None:
    attempts: Counter[str] = Counter()

    async def handle(event: Event, _: Context) -> list[Emit]:
        attempts[event.id] += 1
        if attempts[event.id] < 3:
            raise Retry("not yet", delay=0.1)
        return [Emit("b")]

    await run_function(
        Function(Spec("flaky", listens=("a",), emits=("b",), max_deliver=5), handle, "test")
    )
    event = make_event("a")
    await publish(ctx, event)
    out = await events(ctx, "b", at_least=1)
    assert len(out) == 1 and attempts[event.id] == 3
    assert await dead_letters(ctx, "flaky", timeout=0.5) == []


async def test_reject_dead_letters_with_reason_and_emits_failed(
    ctx: Context, run_function: Any
) -> None:
    async def handle(event: Event, _: Context) -> list[Emit]:
        raise Reject("this picture is a potato")

    await run_function(Function(Spec("picky", listens=("a",)), handle, "test"))
    event = make_event("a")
    await publish(ctx, event)
    [record] = await dead_letters(ctx, "picky", at_least=1)
    assert record["reason"] == "this picture is a potato"
    assert record["kind"] == "rejected" and record["deliveries"] == 1
    assert record["event"]["id"] == event.id and record["image_id"] == event.image_id
    [failed] = await events(ctx, "failed.picky", at_least=1)
    assert failed.image_id == event.image_id and failed.data["reason"] == "this picture is a potato"
    await eventually(lambda: settled(ctx, "picky"), what="message termed")


async def test_unexpected_errors_retry_until_max_deliver_then_dead_letter(
    ctx: Context, run_function: Any
) -> None:
    calls = 0

    async def handle(event: Event, _: Context) -> list[Emit]:
        nonlocal calls
        calls += 1
        raise RuntimeError("boom")

    spec = Spec("broken", listens=("a",), max_deliver=3, backoff=(0.05, 0.1))
    await run_function(Function(spec, handle, "test"))
    await publish(ctx, make_event("a"))
    [record] = await dead_letters(ctx, "broken", at_least=1)
    assert calls == 3
    assert record["kind"] == "exhausted" and record["deliveries"] == 3
    assert "gave up after 3 attempts: RuntimeError: boom" in record["reason"]
    await eventually(lambda: settled(ctx, "broken"), what="message termed")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\x00 not json", "payload is not JSON"),
        (b"[1, 2]", "event must be a JSON object"),
        (b'{"id": "x", "type": "a"}', "lacks string attribute(s): source, time"),
        (
            b'{"id": "x", "type": "a", "source": "s", "time": "t", "object": {"key": 3}}',
            "'object' needs",
        ),
    ],
)
async def test_malformed_events_are_dead_lettered_and_do_not_block(
    ctx: Context, run_function: Any, payload: bytes, reason: str
) -> None:
    async def handle(event: Event, _: Context) -> list[Emit]:
        return [Emit("b")]

    await run_function(Function(Spec("strict", listens=("a",), emits=("b",)), handle, "test"))
    await ctx.js.publish(ctx.names.subject("a"), payload)
    good = make_event("a")
    await publish(ctx, good)
    [record] = await dead_letters(ctx, "strict", at_least=1)
    assert record["kind"] == "malformed" and reason in record["reason"]
    assert record["event_id"] is None and record["payload_b64"]
    out = await events(ctx, "b", at_least=1)
    assert [e.causation_id for e in out] == [good.id]


async def test_replayed_input_gives_one_output_and_one_next_event(
    ctx: Context, run_function: Any
) -> None:
    runs = 0

    async def handle(event: Event, c: Context) -> list[Emit]:
        nonlocal runs
        runs += 1
        key = f"out/{event.image_id}.json"
        stored = await c.store.stat(key)
        if stored is None:
            stored = await c.store.put_json(key, {"from": event.id})
        return [Emit("b", stored)]

    await run_function(Function(Spec("once", listens=("a",), emits=("b",)), handle, "test"))
    event = make_event("a")
    # The same input delivered twice (e.g. redelivered after its dedupe window closed).
    await publish(ctx, event, msg_id=event.id)
    await publish(ctx, event, msg_id=event.id + "-again")
    await eventually(lambda: runs == 2, what="both deliveries handled")
    out = await events(ctx, "b", at_least=1)
    assert len(out) == 1
    assert await ctx.store.list_keys("out/") == [f"out/{event.image_id}.json"]


async def test_long_handlers_send_heartbeats_instead_of_being_redelivered(
    ctx: Context, run_function: Any
) -> None:
    deliveries = 0

    async def handle(event: Event, _: Context) -> list[Emit]:
        nonlocal deliveries
        deliveries += 1
        await asyncio.sleep(3.0)  # three times ack_wait
        return [Emit("b")]

    await run_function(
        Function(Spec("slow", listens=("a",), emits=("b",), ack_wait=1.0), handle, "test")
    )
    await publish(ctx, make_event("a"))
    assert len(await events(ctx, "b", at_least=1, timeout=15)) == 1
    assert deliveries == 1
    assert (await consumer(ctx, "slow")).num_redelivered == 0


async def test_batch_handler_gets_lists_and_settles_each_event(
    ctx: Context, run_function: Any
) -> None:
    sizes: list[int] = []

    async def handle(batch: list[Event], _: Context) -> list[Any]:
        sizes.append(len(batch))
        return [
            Reject("odd one out") if e.data["n"] == 7 else [Emit("b", data={"n": e.data["n"]})]
            for e in batch
        ]

    await run_function(
        Function(
            Spec("batcher", listens=("a",), emits=("b",), batch=4, concurrency=2), handle, "test"
        )
    )
    for i in range(12):
        await publish(ctx, make_event("a", n=i))
    out = await events(ctx, "b", at_least=11)
    assert sorted(e.data["n"] for e in out) == [n for n in range(12) if n != 7]
    assert max(sizes) <= 4 and sum(sizes) == 12
    [record] = await dead_letters(ctx, "batcher", at_least=1)
    assert record["reason"] == "odd one out"


async def test_emitting_an_undeclared_topic_is_an_error_not_a_silent_publish(
    ctx: Context, run_function: Any
) -> None:
    async def handle(event: Event, _: Context) -> list[Emit]:
        return [Emit("somewhere-else")]

    spec = Spec("sloppy", listens=("a",), emits=("b",), max_deliver=2, backoff=(0.05,))
    await run_function(Function(spec, handle, "test"))
    await publish(ctx, make_event("a"))
    [record] = await dead_letters(ctx, "sloppy", at_least=1)
    assert "not in its Spec.emits" in record["reason"]


async def test_a_handler_past_its_timeout_is_retried_then_dead_lettered(
    ctx: Context, run_function: Any
) -> None:
    async def handle(event: Event, _: Context) -> list[Emit]:
        await asyncio.sleep(3600)  # hung: heartbeats alone would keep it forever
        return []

    spec = Spec("hung", listens=("a",), timeout=0.5, max_deliver=2, backoff=(0.05,))
    await run_function(Function(spec, handle, "test"))
    await publish(ctx, make_event("a"))
    [record] = await dead_letters(ctx, "hung", at_least=1, timeout=15)
    assert record["kind"] == "exhausted" and "ran past its 0.5 s timeout" in record["reason"]


async def test_draining_loses_nothing_that_arrives_meanwhile(
    ctx: Context, run_function: Any
) -> None:
    done: list[int] = []

    async def handle(event: Event, _: Context) -> list[Emit]:
        await asyncio.sleep(0.5)
        done.append(event.data["n"])
        return [Emit("b", data={"n": event.data["n"]})]

    fn = Function(
        Spec("drainy", listens=("a",), emits=("b",), concurrency=2, max_deliver=3), handle, "test"
    )
    first = await run_function(fn)
    for n in range(2):
        await publish(ctx, make_event("a", n=n))

    async def two_in_flight() -> bool:
        return (await consumer(ctx, "drainy")).num_ack_pending == 2

    await eventually(two_in_flight, what="two in flight")
    draining = asyncio.create_task(first.drain(timeout=10))
    for n in range(2, 6):  # arrive while the first runner drains
        await publish(ctx, make_event("a", n=n))
    await draining
    assert sorted(done) == [0, 1]
    await asyncio.sleep(1.5)
    assert await dead_letters(ctx, "drainy", timeout=0.3) == []
    await run_function(fn)
    out = await events(ctx, "b", at_least=6, timeout=20)
    assert sorted(e.data["n"] for e in out) == list(range(6))
    assert await dead_letters(ctx, "drainy", timeout=0.3) == []
