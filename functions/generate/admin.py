"""Loading and unloading generation models on request (``POST /api/models/<name>/load``,
``/unload``; :mod:`bus.models.switching` says how each request finds its worker).

- **load** (the ``generate-load`` service, any one worker): answers a ``loading`` chunk at
  once, then resolves the model (no download: a model not on disk yet is a 409 saying to
  run ``darkroom models pull <name>``), reports it in the readiness entries like the
  default model, loads it under a VRAM lease and answers where it is. In ``balanced`` mode
  it stays until idle for ``gpu.idle_ttl_s`` or evicted, as if a job had used it.
- **unload** (this worker's own subject, :class:`UnloadSubject`): drops the model if this
  worker holds it and no job is using it right now; the answer says which happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import TYPE_CHECKING, Any, Literal

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus import Context
from bus.core.settings import GENERATE_MODEL_NAME
from bus.gpu.leases import LeaseError, LeaseTimeoutError, LeaseTooLargeError
from bus.gpu.resident import ResidentModels
from bus.models.catalogue import ModelUnavailableError
from bus.models.switching import lease_model, unload_group, unload_subject
from bus.runtime import services
from bus.runtime.services import ServiceError

if TYPE_CHECKING:
    from functions.generate.state import GenerateState

log = logging.getLogger("darkroom.generate")
Outcome = Literal["unloaded", "busy", "not_held"]


def _name(request: dict[str, Any]) -> str:
    name = request.get("model")
    if not isinstance(name, str) or not re.match(GENERATE_MODEL_NAME, name):
        raise ServiceError(
            f"'model' must be a catalogue model name, got {str(name)[:80]!r}",
            400,
            "invalid_request",
        )
    return name


def _gpu(ctx: Context) -> ResidentModels:
    if ctx.gpu is None:  # a generate worker always has one (its Spec needs_gpu)
        raise ServiceError("this worker has no VRAM leases", 503, "no_gpu")
    return ctx.gpu


def _where(ctx: Context, name: str) -> dict[str, Any]:
    gpu = _gpu(ctx)
    holder = gpu.ledger.holder
    return {
        "model": name,
        "host": holder.host,
        "pid": holder.pid,
        "instance": holder.instance,
        "worker": holder.worker,
        "device": gpu.device,
    }


async def serve_load(msg: Msg, ctx: Context, state: GenerateState) -> None:
    name = _name(services.parse_request(msg))
    catalogue = state.settings.generate.catalogue
    if name not in catalogue:
        raise ServiceError(  # the gateway knows it: the settings differ between the two
            f"this worker's catalogue has no model {name!r} (it has "
            f"{', '.join(sorted(catalogue))}): give the workers the gateway's settings",
            409,
            "unknown_model",
        )
    gpu = _gpu(ctx)
    where = _where(ctx, name)
    await services.reply_chunk(ctx.nc, msg, {**where, "state": "loading"})
    try:
        model, resolved = await asyncio.to_thread(state.model, name)
        await asyncio.to_thread(resolved.on_disk)  # never a download here: see the docstring
    except ModelUnavailableError as exc:
        raise ServiceError(str(exc), 409, "model_unavailable") from None
    if state.readiness is not None:  # on disk (or a demo built now): reported "cached"
        await state.readiness.prepare([resolved])
    held = model.name in gpu.loaded
    try:
        await gpu.preload(model)
    except ModelUnavailableError as exc:  # e.g. 4/8-bit quantisation on a host without CUDA
        raise ServiceError(str(exc), 409, "model_unavailable") from None
    except LeaseTooLargeError as exc:
        raise ServiceError(str(exc), 409, "too_large") from None
    except LeaseTimeoutError as exc:
        raise ServiceError(str(exc), 503, "no_room") from None
    except LeaseError as exc:
        raise ServiceError(str(exc), 503, "ledger_unavailable") from None
    lease = next((x for x in gpu.ledger.held if x.model == model.name), None)
    log.info("%s %s on request (%s)", "kept" if held else "loaded", name, gpu.device)
    await services.reply_chunk(
        ctx.nc,
        msg,
        {
            **where,
            "state": "held" if held else "loaded",
            "mb": lease.mb if lease else None,
            "since": lease.since if lease else None,
            "demo": resolved.demo,
        },
    )
    await services.reply_end(ctx.nc, msg)


async def unload_here(ctx: Context, name: str) -> tuple[Outcome, str]:
    """Drop catalogue model ``name`` from this worker if it holds it and no job uses it."""
    gpu = _gpu(ctx)
    leased = lease_model(name)
    if leased in gpu.loaded:
        await gpu.unload(leased)  # does nothing while a job uses it
        if leased in gpu.loaded:
            return "busy", f"{name} is in use by a running job: try again once it is done"
        return "unloaded", f"{name} unloaded; its VRAM lease is released"
    if any(lease.model == leased for lease in gpu.ledger.held):
        return "busy", f"{name} is loading: try again once it has loaded"
    return "not_held", f"this worker does not hold {name}"


class UnloadSubject:
    """This worker's own unload subject (see :mod:`bus.models.switching`), from the
    function's setup to its teardown."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._sub: Subscription | None = None

    @classmethod
    async def open(cls, ctx: Context) -> UnloadSubject:
        if ctx.gpu is None:
            raise RuntimeError("the generate function needs VRAM leases: a context with gpu")
        holder = ctx.gpu.ledger.holder
        opened = cls(ctx)
        opened._sub = await ctx.nc.subscribe(
            unload_subject(ctx.names, holder.instance),
            queue=unload_group(ctx.names, holder.instance),
            cb=opened._answer,
        )
        await ctx.nc.flush()  # the server knows it before the ledger names us as a holder
        return opened

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):  # the connection may be going away too
                await sub.unsubscribe()

    async def _answer(self, msg: Msg) -> None:
        ctx = self._ctx
        try:
            name = _name(services.parse_request(msg))
            outcome, detail = await unload_here(ctx, name)
            await services.reply(
                ctx.nc, msg, {**_where(ctx, name), "outcome": outcome, "detail": detail}
            )
        except ServiceError as exc:
            await services.reply_error(ctx.nc, msg, exc)
        except Exception as exc:
            log.exception("unloading on request failed")
            await services.reply_error(ctx.nc, msg, ServiceError(f"{type(exc).__name__}: {exc}"))
