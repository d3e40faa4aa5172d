"""The runner on a real nats-server: ack, retry, reject, max_deliver, malformed input,
idempotent replays, heartbeats, batches that form, the per-invocation call (attempt,
deadline, progress, cancellation), lifespan hooks and draining."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Sequence
from typing import Any

import nats.errors
import orjson
import pytest
from nats.aio.msg import Msg

from bus import Call, Cancelled, Context, Emit, Event, Function, Reject, Retry, Spec
from bus.core.envelope import new_id, now_iso
from bus.runtime import runner as runner_module
from bus.runtime.call import Progress, ProgressUpdate
from bus.state.cancels import request_cancel
from tests.support.streams import dead_letters, events, eventually, settled

pytestmark = [pytest.mark.nats, pytest.mark.s3]


def make_event(topic: str, job_id: str | None = None, **data: Any) -> Event:
    image_id = new_id()
    return Event(
        id=f"{topic}-{image_id}",
        type=topic,
        source="test",
        time=now_iso(),
        image_id=image_id,
        job_id=job_id,
        data=data,
    )


async def publish(ctx: Context, event: Event, msg_id: str | None = None) -> None:
    await ctx.js.publish(
        ctx.names.subject(event.type), event.encode(), headers={"Nats-Msg-Id": msg_id or event.id}
    )


async def consumer(ctx: Context, name: str) -> Any:
    return await ctx.js.consumer_info(ctx.names.stream, ctx.names.durable(name))


async def test_success_publishes_next_event_then_acks(ctx: Context, run_function: Any) -> None:
    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        return [Emit("b", data={"seen": event.data["n"]})]

    await run_function(Function(Spec("pass", listens=("a",), emits=("b",)), handle=handle))
    sent = [make_event("a", n=i) for i in range(20)]
    for event in sent:
        await publish(ctx, event)
    await settled(ctx, "pass")
    out = await events(ctx, "b", at_least=20)
    assert sorted(e.data["seen"] for e in out) == list(range(20))
    by_parent = {e.causation_id: e for e in out}
    for event in sent:
        child = by_parent[event.id]
        assert child.image_id == event.image_id and child.source == "darkroom/pass"


async def test_retry_naks_with_delay_then_succeeds(ctx: Context, run_function: Any) -> None:
    attempts: list[int] = []

    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        attempts.append(call.attempt)
        if call.attempt < 3:
            raise Retry("not yet", delay=0.1)
        assert call.last_attempt is False and call.max_attempts == 5
        return [Emit("b")]

    await run_function(
        Function(Spec("flaky", listens=("a",), emits=("b",), max_deliver=5), handle=handle)
    )
    await publish(ctx, make_event("a"))
    await settled(ctx, "flaky")
    assert len(await events(ctx, "b", at_least=1)) == 1
    assert attempts == [1, 2, 3]
    assert await dead_letters(ctx, "flaky") == []


async def test_reject_dead_letters_with_reason_and_emits_failed(
    ctx: Context, run_function: Any
) -> None:
    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        raise Reject("this picture is a potato")

    await run_function(Function(Spec("picky", listens=("a",)), handle=handle))
    event = make_event("a")
    await publish(ctx, event)
    await settled(ctx, "picky")
    [record] = await dead_letters(ctx, "picky", at_least=1)
    assert record["reason"] == "this picture is a potato"
    assert record["kind"] == "rejected" and record["deliveries"] == 1
    assert record["event"]["id"] == event.id and record["image_id"] == event.image_id
    [failed] = await events(ctx, "failed.picky", at_least=1)
    assert failed.image_id == event.image_id and failed.data["reason"] == "this picture is a potato"


async def test_unexpected_errors_retry_until_max_deliver_then_dead_letter(
    ctx: Context, run_function: Any
) -> None:
    attempts: list[tuple[int, bool]] = []

    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        attempts.append((call.attempt, call.last_attempt))
        raise RuntimeError("boom")

    spec = Spec("broken", listens=("a",), max_deliver=3, backoff=(0.05, 0.1))
    await run_function(Function(spec, handle=handle))
    await publish(ctx, make_event("a"))
    await settled(ctx, "broken")
    [record] = await dead_letters(ctx, "broken", at_least=1)
    assert attempts == [(1, False), (2, False), (3, True)]
    assert record["kind"] == "exhausted" and record["deliveries"] == 3
    assert "gave up after 3 attempts: RuntimeError: boom" in record["reason"]


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
    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        return [Emit("b")]

    await run_function(Function(Spec("strict", listens=("a",), emits=("b",)), handle=handle))
    await ctx.js.publish(ctx.names.subject("a"), payload)
    good = make_event("a")
    await publish(ctx, good)
    await settled(ctx, "strict")
    [record] = await dead_letters(ctx, "strict", at_least=1)
    assert record["kind"] == "malformed" and reason in record["reason"]
    assert record["event_id"] is None and record["payload_b64"]
    out = await events(ctx, "b", at_least=1)
    assert [e.causation_id for e in out] == [good.id]


async def test_replayed_input_gives_one_output_and_one_next_event(
    ctx: Context, run_function: Any
) -> None:
    runs = 0

    async def handle(event: Event, c: Context, call: Call) -> list[Emit]:
        nonlocal runs
        runs += 1
        key = f"out/{event.image_id}.json"
        stored = await c.store.stat(key)
        if stored is None:
            stored = await c.store.put_json(key, {"from": event.id})
        return [Emit("b", stored)]

    await run_function(Function(Spec("once", listens=("a",), emits=("b",)), handle=handle))
    event = make_event("a")
    # The same input delivered twice (e.g. redelivered after its dedupe window closed).
    await publish(ctx, event, msg_id=event.id)
    await publish(ctx, event, msg_id=event.id + "-again")
    await settled(ctx, "once")
    assert runs == 2
    assert len(await events(ctx, "b", at_least=1)) == 1
    assert await ctx.store.list_keys("out/") == [f"out/{event.image_id}.json"]


async def test_long_handlers_send_heartbeats_instead_of_being_redelivered(
    ctx: Context, run_function: Any
) -> None:
    attempts: list[int] = []

    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        attempts.append(call.attempt)
        await asyncio.sleep(3.0)  # three times ack_wait
        return [Emit("b")]

    await run_function(
        Function(Spec("slow", listens=("a",), emits=("b",), ack_wait=1.0), handle=handle)
    )
    await publish(ctx, make_event("a"))
    await settled(ctx, "slow")
    assert len(await events(ctx, "b", at_least=1)) == 1
    # A redelivery would have started a second invocation (concurrency 8) with attempt 2.
    assert attempts == [1]


async def test_batches_fill_up_to_their_size_from_a_backlog(
    ctx: Context, run_function: Any
) -> None:
    sizes: list[int] = []

    async def handle_batch(
        batch: list[Event], _: Context, calls: list[Call]
    ) -> Sequence[Sequence[Emit] | BaseException]:
        sizes.append(len(batch))
        assert [c.event for c in calls] == batch
        return [
            Reject("odd one out") if e.data["n"] == 7 else [Emit("b", data={"n": e.data["n"]})]
            for e in batch
        ]

    # Published before the runner starts: the backlog is there at once, and the linger
    # (never reached: full batches go at once) lets each batch fill completely.
    for i in range(12):
        await publish(ctx, make_event("a", n=i))
    spec = Spec("batcher", listens=("a",), emits=("b",), batch=4, batch_wait_s=5.0, concurrency=2)
    await run_function(Function(spec, handle_batch=handle_batch))
    await settled(ctx, "batcher")
    out = await events(ctx, "b", at_least=11)
    assert sorted(e.data["n"] for e in out) == [n for n in range(12) if n != 7]
    assert sizes == [4, 4, 4]
    [record] = await dead_letters(ctx, "batcher", at_least=1)
    assert record["reason"] == "odd one out"


async def test_a_batch_of_8_forms_under_a_trickle(ctx: Context, run_function: Any) -> None:
    """One event per 10 ms, batch_wait_s 0.05: while a batch runs, the next one fills."""
    sizes: list[int] = []
    first_running = asyncio.Event()
    go_on = asyncio.Event()

    async def handle_batch(batch: list[Event], _: Context, calls: list[Call]) -> list[list[Emit]]:
        sizes.append(len(batch))
        first_running.set()
        await go_on.wait()  # the first batch holds the only slot, like a GPU call
        return [[Emit("b", data={"n": e.data["n"]})] for e in batch]

    spec = Spec("trickle", listens=("a",), emits=("b",), batch=8, batch_wait_s=0.05, concurrency=1)
    await run_function(Function(spec, handle_batch=handle_batch))
    sent = 16  # the runner holds (concurrency + 1) x batch = 16 events at most
    for n in range(sent):
        await publish(ctx, make_event("a", n=n))
        await asyncio.sleep(0.01)
    await asyncio.wait_for(first_running.wait(), 10)

    async def all_delivered() -> bool:  # the runner holds every event: queued or running
        info = await consumer(ctx, "trickle")
        return info.num_pending == 0 and info.num_ack_pending == sent

    await eventually(all_delivered, what="every event delivered")
    go_on.set()
    await settled(ctx, "trickle")
    assert sum(sizes) == sent and max(sizes) <= 8
    assert 8 in sizes[1:], f"batches {sizes}: none filled while the first ran"
    out = await events(ctx, "b", at_least=sent)
    assert sorted(e.data["n"] for e in out) == list(range(sent))


async def test_emitting_an_undeclared_topic_is_an_error_not_a_silent_publish(
    ctx: Context, run_function: Any
) -> None:
    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        return [Emit("somewhere-else")]

    spec = Spec("sloppy", listens=("a",), emits=("b",), max_deliver=2, backoff=(0.05,))
    await run_function(Function(spec, handle=handle))
    await publish(ctx, make_event("a"))
    [record] = await dead_letters(ctx, "sloppy", at_least=1)
    assert "not in its Spec.emits" in record["reason"]


async def test_a_handler_past_its_timeout_is_retried_then_dead_lettered(
    ctx: Context, run_function: Any
) -> None:
    remaining: list[float] = []

    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        remaining.append(call.remaining_s())
        await asyncio.sleep(3600)  # hung: heartbeats alone would keep it forever
        return []

    spec = Spec("hung", listens=("a",), timeout=0.5, max_deliver=2, backoff=(0.05,))
    await run_function(Function(spec, handle=handle))
    await publish(ctx, make_event("a"))
    [record] = await dead_letters(ctx, "hung", at_least=1, timeout=15)
    assert record["kind"] == "exhausted" and "ran past its 0.5 s timeout" in record["reason"]
    assert len(remaining) == 2 and all(0 < r <= 0.5 for r in remaining)


async def silent_subject(ctx: Context) -> str:
    """A subject with a subscriber that never replies: requests to it time out."""

    async def ignore(msg: Msg) -> None:
        return None

    subject = f"{ctx.names.namespace}-test.silent"
    await ctx.nc.subscribe(subject, cb=ignore)
    return subject


@pytest.mark.parametrize("how", ["raised", "request", "batch"])
async def test_a_nats_timeout_inside_the_handler_is_retried_and_named_as_such(
    ctx: Context, run_function: Any, how: str
) -> None:
    """nats-py's TimeoutError subclasses the builtin one the runner's own deadline raises:
    a dependency that timed out is a retry with backoff, and the dead letter says NATS."""
    silent = await silent_subject(ctx)
    attempts: list[int] = []

    async def wait_on_nats(call: Call) -> None:
        attempts.append(call.attempt)
        if how == "request":
            await ctx.nc.request(silent, b"", timeout=0.2)  # a real request, never answered
        else:
            raise nats.errors.TimeoutError  # what a timed-out JetStream publish or KV call raises

    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        await wait_on_nats(call)
        return []

    async def handle_batch(batch: list[Event], _: Context, calls: list[Call]) -> list[list[Emit]]:
        await wait_on_nats(calls[0])
        return [[]]

    spec = Spec(
        "waits", listens=("a",), max_deliver=2, backoff=(0.05,), batch=2 if how == "batch" else 1
    )
    fn = (
        Function(spec, handle_batch=handle_batch)
        if how == "batch"
        else Function(spec, handle=handle)
    )
    await run_function(fn)
    await publish(ctx, make_event("a"))
    [record] = await dead_letters(ctx, "waits", at_least=1, timeout=15)
    assert attempts == [1, 2]
    assert record["kind"] == "exhausted" and "ran past" not in record["reason"]
    assert record["reason"] == "gave up after 2 attempts: NATS TimeoutError: nats: timeout"


async def test_a_handler_past_its_timeout_while_waiting_on_nats_is_late(
    ctx: Context, run_function: Any
) -> None:
    silent = await silent_subject(ctx)

    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        await ctx.nc.request(silent, b"", timeout=3600)  # the runner's deadline comes first
        return []

    await run_function(
        Function(Spec("stuck", listens=("a",), timeout=0.5, max_deliver=1), handle=handle)
    )
    await publish(ctx, make_event("a"))
    [record] = await dead_letters(ctx, "stuck", at_least=1, timeout=15)
    assert record["reason"] == "gave up after 1 attempts: the handler ran past its 0.5 s timeout"


# --- cancellation -----------------------------------------------------------------------------


async def test_a_queued_event_of_a_cancelled_job_is_skipped(
    ctx: Context, run_function: Any
) -> None:
    ran: list[str] = []

    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        ran.append(event.data["name"])
        return [Emit("b", data={"name": event.data["name"]})]

    job = new_id()
    await request_cancel(ctx.cancels_kv, job, "changed my mind")
    await publish(ctx, make_event("a", job_id=job, name="cancelled"))
    await publish(ctx, make_event("a", job_id=new_id(), name="kept"))
    await run_function(Function(Spec("skipper", listens=("a",), emits=("b",)), handle=handle))
    await settled(ctx, "skipper")
    assert ran == ["kept"]
    [cancelled] = await events(ctx, "cancelled.skipper", at_least=1)
    assert cancelled.job_id == job and cancelled.data == {
        "stage": "skipper",
        "reason": "changed my mind",
    }
    assert [e.data["name"] for e in await events(ctx, "b", at_least=1)] == ["kept"]
    assert await dead_letters(ctx, "skipper") == []
    assert await events(ctx, "failed.skipper") == []


async def test_a_function_that_is_not_cancellable_runs_a_cancelled_jobs_events(
    ctx: Context, run_function: Any
) -> None:
    """notify must record a cancelled job (and ingest process its outputs): the flag
    names the job, but only stops the functions whose work it is."""
    ran: list[str] = []

    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        ran.append(event.data["name"])
        assert not call.cancelled
        return [Emit("b", data={"name": event.data["name"]})]

    job = new_id()
    await request_cancel(ctx.cancels_kv, job, "changed my mind")
    await publish(ctx, make_event("a", job_id=job, name="recorded"))
    spec = Spec("recorder", listens=("a",), emits=("b",), cancellable=False)
    await run_function(Function(spec, handle=handle))
    await settled(ctx, "recorder")
    assert ran == ["recorded"]
    assert [e.data["name"] for e in await events(ctx, "b", at_least=1)] == ["recorded"]
    assert await events(ctx, "cancelled.recorder") == []


async def test_a_running_handler_sees_the_cancel_at_its_next_poll(
    ctx: Context, run_function: Any
) -> None:
    started = threading.Event()
    polls = 0

    def steps(call: Call) -> None:  # a worker thread, like a diffusers step loop
        nonlocal polls
        started.set()
        for _ in range(3000):  # gives up after about 30 s, so a failing test ends
            polls += 1
            call.raise_if_cancelled()
            threading.Event().wait(0.01)

    async def handle(event: Event, c: Context, call: Call) -> list[Emit]:
        await c.run_cpu(steps, call)
        return [Emit("b")]

    await run_function(Function(Spec("stoppable", listens=("a",), emits=("b",)), handle=handle))
    event = make_event("a", job_id=new_id())
    await publish(ctx, event)
    await asyncio.to_thread(started.wait, 10)
    assert event.job_id is not None
    await request_cancel(ctx.cancels_kv, event.job_id, "user pressed stop")
    await settled(ctx, "stoppable")
    [cancelled] = await events(ctx, "cancelled.stoppable", at_least=1)
    assert cancelled.causation_id == event.id and cancelled.data["reason"] == "user pressed stop"
    assert polls > 1
    assert await events(ctx, "b") == []
    assert await dead_letters(ctx, "stoppable") == []


async def test_cancelling_an_image_stops_its_work_too(ctx: Context, run_function: Any) -> None:
    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        raise AssertionError("a cancelled image's event ran")

    event = make_event("a")
    assert event.image_id is not None
    await request_cancel(ctx.cancels_kv, event.image_id, "image deleted")
    await publish(ctx, event)
    await run_function(Function(Spec("imagestop", listens=("a",)), handle=handle))
    await settled(ctx, "imagestop")
    [cancelled] = await events(ctx, "cancelled.imagestop", at_least=1)
    assert cancelled.image_id == event.image_id


async def test_a_handler_may_raise_cancelled_itself(ctx: Context, run_function: Any) -> None:
    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        raise Cancelled("nothing left to do")

    await run_function(Function(Spec("quitter", listens=("a",)), handle=handle))
    await publish(ctx, make_event("a"))
    await settled(ctx, "quitter")
    [cancelled] = await events(ctx, "cancelled.quitter", at_least=1)
    assert cancelled.data["reason"] == "nothing left to do"
    assert await dead_letters(ctx, "quitter") == []


# --- progress ---------------------------------------------------------------------------------


async def test_progress_from_a_worker_thread_is_throttled_and_ends_with_the_last_step(
    ctx: Context, run_function: Any
) -> None:
    job = new_id()
    received: list[dict[str, Any]] = []
    last = asyncio.Event()

    async def on_progress(msg: Any) -> None:
        update = orjson.loads(msg.data)
        received.append(update)
        if update["step"] == update["total"]:
            last.set()

    sub = await ctx.nc.subscribe(ctx.names.progress(job), cb=on_progress)
    preview = b"\xff\xd8\xff" + b"\x00" * 100

    def steps(call: Call) -> None:
        for step in range(1, 201):
            call.progress(step, 200, f"step {step}", preview=preview if step == 200 else None)

    async def handle(event: Event, c: Context, call: Call) -> list[Emit]:
        await c.run_cpu(steps, call)
        return [Emit("b")]

    try:
        await run_function(Function(Spec("stepper", listens=("a",), emits=("b",)), handle=handle))
        await publish(ctx, make_event("a", job_id=job))
        await asyncio.wait_for(last.wait(), 10)
    finally:
        await sub.unsubscribe()
    steps_seen = [u["step"] for u in received]
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] == 200
    assert len(received) < 20, f"{len(received)} messages for 200 steps: not throttled"
    final = received[-1]
    assert final["job_id"] == job and final["stage"] == "stepper" and final["total"] == 200
    assert final["message"] == "step 200" and final["preview_type"] == "image/jpeg"


def test_progress_refuses_impossible_steps() -> None:
    call = Call(make_event("a"), "s", attempt=1, max_attempts=1, deadline=0.0)
    with pytest.raises(ValueError, match="0 <= step <= total"):
        call.progress(3, 2)


def test_an_event_id_with_percent_signs_logs_as_it_is(caplog: pytest.LogCaptureFixture) -> None:
    """An S3 notification's event id holds URL escapes (%2F): the line must still format."""
    event = Event(id="s3-incoming%2Fx%2Fa.jpg", type="s3", source="minio", time=now_iso())
    call = Call(event, "s3events", attempt=1, max_attempts=1, deadline=0.0)
    with caplog.at_level(logging.INFO, logger="darkroom.s3events"):
        call.log.info("accepted %s (%s)", "x", "new")
        call.log.warning("no arguments")
    assert [r.getMessage() for r in caplog.records] == [
        "s3events [s3-incoming%2Fx%2Fa.jpg]: accepted x (new)",
        "s3events [s3-incoming%2Fx%2Fa.jpg]: no arguments",
    ]


# --- lifespan and draining --------------------------------------------------------------------


async def test_setup_runs_before_the_first_event_and_teardown_after_the_last(
    ctx: Context, run_function: Any
) -> None:
    log: list[str] = []

    async def setup(c: Context) -> None:
        log.append("setup")

    async def teardown(c: Context, state: Any) -> None:
        log.append("teardown")

    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        log.append(f"event {event.data['n']}")
        return []

    fn = Function(Spec("lives", listens=("a",)), handle=handle, setup=setup, teardown=teardown)
    await publish(ctx, make_event("a", n=1))
    runner = await run_function(fn)
    await settled(ctx, "lives")
    await runner.drain(timeout=5)
    assert log == ["setup", "event 1", "teardown"]


async def test_draining_loses_nothing_that_arrives_meanwhile(
    ctx: Context, run_function: Any
) -> None:
    done: list[int] = []

    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        await asyncio.sleep(0.5)
        done.append(event.data["n"])
        return [Emit("b", data={"n": event.data["n"]})]

    fn = Function(
        Spec("drainy", listens=("a",), emits=("b",), concurrency=2, max_deliver=3), handle=handle
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

    async def acked() -> Any:  # the server takes acks on a queue of their own: wait for them
        info = await consumer(ctx, "drainy")
        return info if info.num_ack_pending == 0 else None

    info = await eventually(acked, what="the drained runner's acks")
    assert info.num_pending == 4, "the drained runner fetched events it never ran"
    await run_function(fn)
    await settled(ctx, "drainy")
    out = await events(ctx, "b", at_least=6)
    assert sorted(e.data["n"] for e in out) == list(range(6))
    assert await dead_letters(ctx, "drainy") == []


async def test_a_draining_batch_runner_flushes_its_queue_without_lingering(
    ctx: Context, run_function: Any
) -> None:
    sizes: list[int] = []

    async def handle_batch(batch: list[Event], _: Context, calls: list[Call]) -> list[list[Emit]]:
        sizes.append(len(batch))
        return [[] for _ in batch]

    spec = Spec("lingerer", listens=("a",), batch=8, batch_wait_s=3600.0)
    runner = await run_function(Function(spec, handle_batch=handle_batch))
    for n in range(3):
        await publish(ctx, make_event("a", n=n))

    async def held() -> bool:
        return (await consumer(ctx, "lingerer")).num_ack_pending == 3

    await eventually(held, what="three events held for the linger")
    assert sizes == []
    await runner.drain(timeout=10)
    assert sizes == [3]
    await settled(ctx, "lingerer")


def test_a_function_needs_exactly_one_handler_matching_its_batch() -> None:
    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        return []

    with pytest.raises(TypeError, match="exactly one of handle and handle_batch"):
        Function(Spec("none", listens=("a",)))
    with pytest.raises(TypeError, match="give it handle_batch"):
        Function(Spec("wrong", listens=("a",), batch=4), handle=handle)
    with pytest.raises(ValueError, match="batch_wait_s must be >= 0 and needs batch > 1"):
        Spec("linger", listens=("a",), batch_wait_s=0.1)


async def test_a_drain_timeout_starts_nothing_new_and_tears_down_last(
    ctx: Context, run_function: Any
) -> None:
    log: list[str] = []

    async def handle_batch(batch: list[Event], _: Context, calls: list[Call]) -> list[list[Emit]]:
        log.append(f"start {[e.data['n'] for e in batch]}")
        try:
            await asyncio.sleep(3600)
        finally:
            log.append("end")
        return []

    async def teardown(c: Context, state: Any) -> None:
        log.append("teardown")

    spec = Spec("stuck", listens=("a",), batch=2, batch_wait_s=5.0, concurrency=1)
    runner = await run_function(Function(spec, handle_batch=handle_batch, teardown=teardown))
    for n in range(4):
        await publish(ctx, make_event("a", n=n))

    async def all_held() -> bool:
        return (await consumer(ctx, "stuck")).num_ack_pending == 4

    await eventually(all_held, what="every event delivered")
    assert log == ["start [0, 1]"]
    await runner.drain(timeout=0.3)
    # The queued batch [2, 3] must not start once the running one was cut short.
    assert log == ["start [0, 1]", "end", "teardown"]


async def test_a_handler_that_ignores_its_cancellation_does_not_hold_up_the_stop(
    ctx: Context, run_function: Any, caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    """The stop goes on without it after CANCEL_WAIT_S, the log says where it waits, and
    what it finishes later goes back to the stream: another worker runs the event."""
    monkeypatch.setattr(runner_module, "CANCEL_WAIT_S", 0.2)
    started, release, rerun = asyncio.Event(), asyncio.Event(), asyncio.Event()
    calls = 0

    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        nonlocal calls
        calls += 1
        if calls > 1:
            rerun.set()
            return []
        started.set()
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # wrong, on purpose: it
                await release.wait()  # ignores every cancellation
        return []

    # Only a nak brings the event back this side of ack_wait.
    function = Function(Spec("deaf", listens=("a",), ack_wait=3600), handle=handle)
    runner = await run_function(function)
    await publish(ctx, make_event("a"))
    await asyncio.wait_for(started.wait(), 30)
    try:
        with caplog.at_level(logging.ERROR):
            await runner.drain(timeout=0.1)
        assert "still runs 0.2 s after it was cancelled" in caplog.text
        assert "test_runner.py" in caplog.text and "in handle" in caplog.text
        assert caplog.text.count("still runs") == 1  # drain's stop does not wait for it again
    finally:
        release.set()
    await run_function(function)
    await asyncio.wait_for(rerun.wait(), 30)
    await runner.drain()  # stopped already: at once
    await settled(ctx, "deaf")


async def test_a_cancelled_job_that_times_out_on_its_last_attempt_is_not_dead_lettered(
    ctx: Context, run_function: Any
) -> None:
    started = asyncio.Event()

    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        started.set()
        await asyncio.sleep(3600)  # never polls the cancel flag
        return []

    spec = Spec("deaf", listens=("a",), max_deliver=1, timeout=1.0)
    await run_function(Function(spec, handle=handle))
    event = make_event("a", job_id=new_id())
    await publish(ctx, event)
    await asyncio.wait_for(started.wait(), 10)
    assert event.job_id is not None
    await request_cancel(ctx.cancels_kv, event.job_id, "stop it")
    await settled(ctx, "deaf")
    [cancelled] = await events(ctx, "cancelled.deaf", at_least=1)
    assert cancelled.data["reason"] == "stop it"
    assert await dead_letters(ctx, "deaf") == []
    assert await events(ctx, "failed.deaf") == []


async def test_progress_after_the_invocation_ended_is_dropped() -> None:
    sent: list[bytes] = []

    async def send(subject: str, payload: bytes) -> None:
        sent.append(payload)

    progress = Progress(asyncio.get_running_loop(), send, "p", {}, interval=60.0)
    progress.report(ProgressUpdate(1, 10))  # the first goes at once
    progress.report(ProgressUpdate(2, 10))  # held back by the throttle
    progress.close()  # sends the held one
    progress.report(ProgressUpdate(3, 10))  # a straggling thread: dropped
    await asyncio.sleep(0)
    assert [orjson.loads(p)["step"] for p in sent] == [1, 2]


def test_progress_needs_an_id_that_can_name_a_subject() -> None:
    made: list[Event] = []

    def factory(event: Event) -> None:
        made.append(event)
        return None

    event = Event(id="e", type="a", source="t", time=now_iso(), job_id="has.dots")
    call = Call(event, "s", attempt=1, max_attempts=1, deadline=0.0, progress=factory)
    call.progress(1, 2)
    call.progress(2, 2)
    assert len(made) == 1  # asked once, then progress is off for this call


# --- state, background preparation and services ----------------------------------------------


async def test_setup_state_reaches_each_call_and_nothing_is_fetched_until_prepared(
    ctx: Context, run_function: Any
) -> None:
    gate = asyncio.Event()
    seen: list[Any] = []

    async def setup(c: Context) -> dict[str, str]:
        return {"model": "m1"}

    async def prepare(c: Context, state: dict[str, str]) -> None:
        assert state == {"model": "m1"}
        await gate.wait()  # a download in progress

    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        seen.append(call.state)
        return []

    fn = Function(Spec("prepared", listens=("p",)), handle=handle, setup=setup, prepare=prepare)
    await publish(ctx, make_event("p"))
    runner = await run_function(fn)  # returns at once: preparing runs in the background
    info = await consumer(ctx, "prepared")
    # Nothing fetched while preparing: the event waits in the stream, not in this process.
    assert not runner.ready.is_set()
    assert (info.num_pending, info.num_ack_pending) == (1, 0)
    gate.set()
    await asyncio.wait_for(runner.ready.wait(), 10)
    await settled(ctx, "prepared")
    assert seen == [{"model": "m1"}]


async def test_a_failed_preparation_is_tried_again(
    ctx: Context, run_function: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bus.runtime.runner.PREPARE_RETRY_S", (0.05,))
    attempts: list[int] = []

    async def prepare(c: Context, state: None) -> None:
        attempts.append(len(attempts) + 1)
        if len(attempts) < 3:
            raise OSError("the hub is unreachable")

    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        return [Emit("q-done")]

    fn = Function(
        Spec("reprepared", listens=("q",), emits=("q-done",)), handle=handle, prepare=prepare
    )
    await publish(ctx, make_event("q"))
    runner = await run_function(fn)
    await asyncio.wait_for(runner.ready.wait(), 10)
    assert attempts == [1, 2, 3]
    assert len(await events(ctx, "q-done", at_least=1)) == 1


async def test_services_answer_once_in_chunks_or_with_an_error(
    ctx: Context, run_function: Any
) -> None:
    from bus.runtime import services

    async def setup(c: Context) -> str:
        return "state!"

    async def echo(msg: Msg, c: Context, state: str) -> None:
        doc = services.parse_request(msg)
        if doc.get("bad"):
            raise services.ServiceError("'bad' is not allowed", 400, "invalid_request")
        if doc.get("crash"):
            raise ZeroDivisionError("boom")
        await services.reply(c.nc, msg, {"echo": doc["say"], "state": state})

    async def count(msg: Msg, c: Context, state: str) -> None:
        n = services.parse_request(msg)["n"]
        for i in range(n):
            await services.reply_chunk(c.nc, msg, i)
        await services.reply_end(c.nc, msg)

    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        return []

    fn = Function(
        Spec("serving", listens=("s",)),
        handle=handle,
        setup=setup,
        services={"echo": echo, "count": count},
    )
    subject = ctx.names.service
    with pytest.raises(services.NoResponderError, match="no worker is serving"):
        await services.request(ctx.nc, subject("echo"), {"say": "hi"}, timeout=5)
    await run_function(fn)
    answer = await services.request(ctx.nc, subject("echo"), {"say": "hi"}, timeout=5)
    assert answer == {"echo": "hi", "state": "state!"}
    with pytest.raises(services.ServiceError, match="'bad' is not allowed") as refused:
        await services.request(ctx.nc, subject("echo"), {"bad": True}, timeout=5)
    assert refused.value.status == 400
    with pytest.raises(services.ServiceError, match="ZeroDivisionError: boom") as crashed:
        await services.request(ctx.nc, subject("echo"), {"crash": True}, timeout=5)
    assert crashed.value.status == 500
    chunks = [c async for c in services.stream(ctx.nc, subject("count"), {"n": 5}, 5, 5)]
    assert chunks == [0, 1, 2, 3, 4]
    with pytest.raises(services.NoResponderError):
        async for _ in services.stream(ctx.nc, subject("nobody"), {}, 5, 5):
            pass


async def test_a_service_is_not_answered_before_the_function_is_prepared(
    ctx: Context, run_function: Any
) -> None:
    from bus.runtime import services

    gate = asyncio.Event()

    async def prepare(c: Context, state: None) -> None:
        await gate.wait()

    async def ping(msg: Msg, c: Context, state: None) -> None:
        await services.reply(c.nc, msg, "pong")

    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        return []

    fn = Function(
        Spec("warming", listens=("w",)), handle=handle, prepare=prepare, services={"ping": ping}
    )
    runner = await run_function(fn)
    with pytest.raises(services.NoResponderError):
        await services.request(ctx.nc, ctx.names.service("ping"), {}, timeout=5)
    gate.set()
    await asyncio.wait_for(runner.ready.wait(), 10)
    assert await services.request(ctx.nc, ctx.names.service("ping"), {}, timeout=5) == "pong"


def test_a_function_with_models_needs_a_gpu_and_services_need_safe_names() -> None:
    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        return []

    with pytest.raises(TypeError, match="needs_gpu"):
        Function(Spec("m", listens=("a",)), handle=handle, models=lambda state: [])
    with pytest.raises(TypeError, match="not a safe id"):
        Function(Spec("m", listens=("a",)), handle=handle, services={"a.b": handle})  # type: ignore[dict-item]


async def test_a_failed_start_of_fetching_after_preparing_is_tried_again(
    ctx: Context, run_function: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bus.runtime import services

    monkeypatch.setattr("bus.runtime.runner.PREPARE_RETRY_S", (0.05,))
    prepared: list[int] = []
    real_subscribe = ctx.nc.subscribe
    refused: list[str] = []

    async def subscribe(subject: str, *args: Any, **kwargs: Any) -> Any:
        if subject == ctx.names.service("ping") and not refused:
            refused.append(subject)
            raise nats.errors.TimeoutError  # the server did not answer in time, once
        return await real_subscribe(subject, *args, **kwargs)

    monkeypatch.setattr(ctx.nc, "subscribe", subscribe)

    async def prepare(c: Context, state: None) -> None:
        prepared.append(1)

    async def ping(msg: Msg, c: Context, state: None) -> None:
        await services.reply(c.nc, msg, "pong")

    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        return [Emit("r-done")]

    fn = Function(
        Spec("refetched", listens=("r",), emits=("r-done",)),
        handle=handle,
        prepare=prepare,
        services={"ping": ping},
    )
    await publish(ctx, make_event("r"))
    runner = await run_function(fn)
    await asyncio.wait_for(runner.ready.wait(), 10)
    assert refused and prepared == [1]  # prepared once; fetching started again
    assert await services.request(ctx.nc, ctx.names.service("ping"), {}, timeout=5) == "pong"
    await settled(ctx, "refetched")
    assert len(await events(ctx, "r-done", at_least=1)) == 1
