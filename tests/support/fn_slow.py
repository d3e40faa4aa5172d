"""A test function that takes ``data.sleep`` seconds per event and reports its pid."""

from __future__ import annotations

import asyncio
import os

from bus import Call, Context, Emit, Event, Function, Spec

SPEC = Spec(
    name="slow", listens=("work",), emits=("done",), concurrency=2, ack_wait=5.0, max_deliver=5
)


async def handle(event: Event, ctx: Context, call: Call) -> list[Emit]:
    await asyncio.sleep(float(event.data.get("sleep", 0.1)))
    return [Emit("done", data={"pid": os.getpid(), "n": event.data.get("n")})]


FUNCTION = Function(SPEC, handle=handle)
