"""A test function whose process dies (no ack, no cleanup) the first time it sees an event."""

from __future__ import annotations

import os
from pathlib import Path

from bus import Call, Context, Emit, Event, Function, Spec

SPEC = Spec(name="crashonce", listens=("work",), emits=("done",), ack_wait=1.0, max_deliver=3)


async def handle(event: Event, ctx: Context, call: Call) -> list[Emit]:
    marker = Path(event.data["marker"])
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(17)  # a crash mid-handler: the message stays un-acked
    return [Emit("done", data={"pid": os.getpid()})]


FUNCTION = Function(SPEC, handle=handle)
