"""The generate function's preparation: its default model on disk before the first event.

Like the caption function's (:mod:`functions.caption.prepare`): the runner calls
:func:`prepare` in the background after ``setup`` and fetches no event until it returns;
the download's progress shows in ``/api/status``. Other catalogue models download when a
job first asks for one.
"""

from __future__ import annotations

import asyncio

from bus import Context
from bus.gpu.leases import host_id
from bus.models.progress import ModelReadiness
from functions.generate.state import GenerateState

FUNCTION_NAME = "generate"


async def prepare(ctx: Context, state: GenerateState) -> None:
    if state.readiness is None:  # a retry keeps the entries it made
        settings = ctx.settings
        host = await asyncio.to_thread(host_id, settings.data_dir, settings.gpu.host_id)
        state.readiness = await ModelReadiness.open(
            ctx.js, ctx.names.models_kv, FUNCTION_NAME, host, ctx.client_name
        )
    _, resolved = await asyncio.to_thread(state.model, state.default_model)
    await state.readiness.prepare([resolved])


async def teardown(ctx: Context, state: GenerateState) -> None:
    """Stop reporting (this worker's entries leave ``/api/status`` at once) and stop
    answering unload requests."""
    if state.unload is not None:
        await state.unload.close()
        state.unload = None
    if state.readiness is not None:
        await state.readiness.close()
        state.readiness = None
