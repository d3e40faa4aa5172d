"""A test function that takes ``data.sleep`` seconds per event and reports its pid."""

from __future__ import annotations

import asyncio
import os

from bus.context import Context
from bus.envelope import Event
from bus.function import Emit, Spec

SPEC = Spec(
    name="slow", listens=("work",), emits=("done",), concurrency=2, ack_wait=5.0, max_deliver=5
)


async def handle(event: Event, ctx: Context) -> list[Emit]:
    await asyncio.sleep(float(event.data.get("sleep", 0.1)))
    return [Emit("done", data={"pid": os.getpid(), "n": event.data.get("n")})]
