"""A test function whose process dies on every delivery (a poison message)."""

from __future__ import annotations

import os

from bus import Call, Context, Emit, Event, Function, Spec

SPEC = Spec(name="crashalways", listens=("poison",), ack_wait=2.0, max_deliver=2, concurrency=1)


async def handle(event: Event, ctx: Context, call: Call) -> list[Emit]:
    os._exit(17)


FUNCTION = Function(SPEC, handle=handle)
