"""Reading what landed on a subject, and knowing when a function is done, for assertions.

Nothing here waits for a lull. "Nothing more arrived" is shown by a positive signal: the
function that would have sent it is settled (its consumer has nothing pending and nothing
un-acked, so every event it was going to publish is stored), then everything stored is
read up to the stream's end.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.js.errors
import orjson
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from bus.core.envelope import Event, decode, now_iso
from bus.runtime.context import Context


async def read_subject(
    js: JetStreamContext, subject: str, *, at_least: int = 0, timeout: float = 10.0
) -> list[Msg]:
    """Every message stored on ``subject``, once there are at least ``at_least``.

    Reads to the end of what the stream holds for the subject when the last one is read
    (its ``num_pending`` is 0). Raises TimeoutError if ``at_least`` never arrive.
    """
    sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    found: list[Msg] = []
    deadline = time.monotonic() + timeout
    try:
        # Stored when we asked: pushed to us already (delivered) or still to come (pending).
        info = await sub.consumer_info()
        stored = (info.num_pending or 0) + (info.delivered.consumer_seq or 0)
        if stored == 0 and at_least == 0:
            return found
        at_least = max(at_least, 1)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(found)} of {at_least} message(s) on {subject}")
            try:
                msg = await sub.next_msg(timeout=remaining)
            except TimeoutError:
                continue
            found.append(msg)
            if len(found) >= at_least and msg.metadata.num_pending == 0:
                return found
    finally:
        await sub.unsubscribe()


async def events(
    ctx: Context, topic: str, *, at_least: int = 0, timeout: float = 10.0
) -> list[Event]:
    """The events of ``topic``, and of its keyed subjects (a job naming a model is
    ``requested.<model>``), in stream order."""
    subject = ctx.names.subject(topic)
    deadline = time.monotonic() + timeout
    while True:
        msgs = [
            *await read_subject(ctx.js, subject),
            *await read_subject(ctx.js, f"{subject}.>"),
        ]
        if len(msgs) >= at_least:
            msgs.sort(key=lambda m: m.metadata.sequence.stream)
            return [decode(m.data) for m in msgs]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(msgs)} of {at_least} message(s) on {subject}[.>]")
        await asyncio.sleep(0.05)


async def dead_letters(
    ctx: Context, stage: str, *, at_least: int = 0, timeout: float = 10.0
) -> list[dict[str, Any]]:
    msgs = await read_subject(
        ctx.js, ctx.names.dead_letter(stage), at_least=at_least, timeout=timeout
    )
    return [orjson.loads(m.data) for m in msgs]


async def is_settled(ctx: Context, function: str) -> bool:
    """The function's consumer was handed the newest message on its subjects, and has
    nothing pending and nothing delivered but un-acked.

    The pending count alone is not enough: the server counts a new message into it a
    moment after acknowledging the publish, so right after one it may still say 0.
    """
    stream = ctx.names.stream
    info = await ctx.js.consumer_info(stream, ctx.names.durable(function))
    if info.num_pending or info.num_ack_pending:
        return False
    filters = info.config.filter_subjects or [info.config.filter_subject or ">"]
    newest = 0
    for subject in filters:
        try:
            newest = max(newest, (await ctx.js.get_last_msg(stream, subject)).seq or 0)
        except nats.js.errors.NotFoundError:
            continue  # nothing on it yet
    delivered = info.delivered.stream_seq if info.delivered else 0
    return (delivered or 0) >= newest


async def settled(ctx: Context, *functions: str, timeout: float = 20.0) -> None:
    """Wait until each function, in order, is settled (see :func:`is_settled`)."""
    for function in functions:
        await eventually(
            lambda f=function: is_settled(ctx, f),  # type: ignore[misc]
            timeout=timeout,
            what=f"{function} settled",
        )


async def eventually(
    check: Callable[[], Any | Awaitable[Any]], timeout: float = 10.0, what: str = "condition"
) -> Any:
    """Wait until ``check()`` (plain or async) is truthy; return what it gave."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


async def announce_stored(
    ctx: Context, topic: str, image_id: str, key: str, data: bytes, content_type: str
) -> Event:
    """Store ``data`` at ``key`` and publish ``topic`` for it, the way a path that skips
    the intake does (a bucket wired straight to NATS, the generate function)."""
    ref = await ctx.store.put_bytes(key, data, content_type)
    event = Event(
        id=f"{topic}-{image_id}",
        type=topic,
        source="darkroom/test",
        time=now_iso(),
        subject=image_id,
        object=ref,
        image_id=image_id,
        data={"name": key.rsplit("/", 1)[-1]},
    )
    await ctx.js.publish(ctx.names.subject(topic), event.encode())
    return event
