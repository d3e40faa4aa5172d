"""A test GPU function: even-numbered events use a 40 MB "model" (a bytearray) under a VRAM
lease; odd ones need no model and finish at once."""

from __future__ import annotations

from bus import Call, Context, Emit, Event, Function, Model, Placement, Reject, Spec
from bus.gpu.resident import MB


def load_model(placement: Placement) -> bytearray:
    return bytearray(40 * MB)


MODEL = Model("model", estimate_mb=40, load=load_model)

SPEC = Spec(
    name="gpuwork",
    listens=("gwork",),
    emits=("gdone",),
    concurrency=4,
    ack_wait=10.0,
    max_deliver=3,
    needs_gpu=True,
)


async def handle(event: Event, ctx: Context, call: Call) -> list[Emit]:
    if ctx.gpu is None:
        raise Reject("no VRAM leases in this context")
    n = int(event.data.get("n", 0))
    if n % 2:
        return [Emit("gdone", data={"n": n, "mb": 0})]
    async with ctx.gpu.use(MODEL) as model:
        size = await ctx.run_gpu(len, model)
        return [Emit("gdone", data={"n": n, "mb": size // MB, "device": ctx.gpu.device})]


FUNCTION = Function(SPEC, handle=handle, models=lambda _state: [MODEL])
