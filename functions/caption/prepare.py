"""The caption function's preparation: every model on disk before the first event.

The runner calls :func:`prepare` in the background after ``setup``, and fetches no event
until it returns (they wait in the stream; nothing times out). It downloads the models
that are not cached yet, with their progress in ``/api/status`` and in the log (see
:mod:`bus.models.progress`); a failed download raises, and the runner tries again with
backoff. Loading goes through ``ResolvedModel.on_disk()`` afterwards, so nothing is
downloaded while a VRAM lease is held.
"""

from __future__ import annotations

import asyncio

from bus import Context
from bus.gpu.leases import host_id
from bus.models.progress import ModelReadiness
from functions.caption.state import CaptionState

FUNCTION_NAME = "caption"


async def prepare(ctx: Context, state: CaptionState) -> None:
    if state.readiness is None:  # a retry keeps the entries it made
        settings = ctx.settings
        host = await asyncio.to_thread(host_id, settings.data_dir, settings.gpu.host_id)
        state.readiness = await ModelReadiness.open(
            ctx.js, ctx.names.models_kv, FUNCTION_NAME, host, ctx.client_name
        )
    await state.readiness.prepare(state.models.resolved.values())


async def teardown(ctx: Context, state: CaptionState) -> None:
    """Stop reporting: this worker's entries leave ``/api/status`` at once."""
    if state.readiness is not None:
        await state.readiness.close()
        state.readiness = None
