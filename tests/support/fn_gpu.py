"""A test GPU function: even-numbered events use a 40 MB "model" (a bytearray) under a VRAM
lease; odd ones need no model and finish at once."""

from __future__ import annotations

from bus.context import Context
from bus.envelope import Event
from bus.function import Emit, Reject, Spec
from bus.resident import MB

SPEC = Spec(
    name="gpuwork",
    listens=("gwork",),
    emits=("gdone",),
    concurrency=4,
    ack_wait=10.0,
    max_deliver=3,
    needs_gpu=True,
)


async def handle(event: Event, ctx: Context) -> list[Emit]:
    if ctx.gpu is None:
        raise Reject("no VRAM leases in this context")
    n = int(event.data.get("n", 0))
    if n % 2:
        return [Emit("gdone", data={"n": n, "mb": 0})]
    async with ctx.gpu.use("model", lambda: bytearray(40 * MB), 40) as model:
        return [Emit("gdone", data={"n": event.data.get("n"), "mb": len(model) // MB})]
