"""A test function for recovery after a kill: asked to, it holds an event's first delivery
until its process dies; it can also run longer than its ack_wait."""

from __future__ import annotations

import asyncio
import os

from bus import Call, Context, Emit, Event, Function, Spec

SPEC = Spec(
    name="recover", listens=("work",), emits=("done",), concurrency=2, ack_wait=3.0, max_deliver=3
)


async def handle(event: Event, ctx: Context, call: Call) -> list[Emit]:
    if event.data.get("hold_first") and call.attempt == 1:
        await asyncio.Event().wait()  # held, heartbeats and all, until the process dies
    await asyncio.sleep(float(event.data.get("sleep", 0)))
    return [Emit("done", data={"pid": os.getpid(), "attempt": call.attempt})]


FUNCTION = Function(SPEC, handle=handle)
