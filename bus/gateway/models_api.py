"""The generation models: the catalogue and where each model is held
(``GET /api/models``), and loading or unloading one on the workers (admin).

What a worker holds comes from the VRAM lease ledger (each lease names its model,
``generate:<name>``, and its holder), what it has on disk from the model readiness
entries; nothing here imports torch or diffusers. Loading asks one generate worker
(``generate-load``); unloading asks every holder on its own subject (see
:mod:`bus.models.switching`).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field

from bus.core.settings import SCHEDULERS, Settings
from bus.gateway.problems import Problem, json_response
from bus.gateway.routes import Reply, Route
from bus.gateway.state import CTX
from bus.gpu.leases import LedgerUnavailableError, read_devices
from bus.models.catalogue import GENERATE
from bus.models.progress import read_readiness
from bus.models.switching import (
    LOAD_SERVICE,
    UNLOAD_SERVICE,
    leased_name,
    unload_subject,
)
from bus.runtime import services
from bus.runtime.context import Context
from bus.runtime.services import NoResponderError, ServiceError

LOAD_ACK_S = 10.0  # a worker says it is loading at once (it may be busy with a batch)
LOAD_WAIT_S = 60.0  # then the gateway waits this long for the load before answering 202
UNLOAD_TIMEOUT_S = 10.0
PASSED_ON = (409, 503, 504)
UNLOAD_OUTCOMES = (
    "unloaded",
    "busy",
    "not_held",
)  # what a worker's unload answers  # a worker's refusals that mean the same here; others are 502


class ModelDefaults(BaseModel):
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str | None = Field(description="null: the pipeline's own")


class ModelHolder(BaseModel):
    """A worker that holds the model under a VRAM lease."""

    host: str
    pid: int
    worker: str = Field(description="the process, e.g. worker-generate")
    instance: str = Field(description="the process's random id (unload addresses it)")
    device: str = Field(description="cuda:<n> or cpu")
    mb: int = Field(description="the lease: the measured footprint once loaded")
    since: str | None = Field(description="when the lease was granted (date-time)")


class ModelOnDisk(BaseModel):
    """The model on one worker's disk, as that worker last reported it."""

    host: str
    pid: int
    worker: str
    source: str = Field(description="what it resolved to: a hub id, a directory, or demo")
    revision: str | None
    demo: bool
    state: Literal["cached", "downloading", "ready", "failed"]
    bytes_done: int
    bytes_total: int | None
    progress: float | None = Field(description="downloading: 0 to 1 (null: total unknown)")
    error: str | None
    updated: str


class CatalogueModel(BaseModel):
    name: str
    source: str = Field(description="a Hugging Face id or a local directory")
    revision: str
    variant: str | None
    quantization: str
    vram_mb: int = Field(description="what a lease asks for before the load is measured")
    description: str
    licence: str
    added: bool = Field(description="added (or replaced) in the settings' generate.models")
    defaults: ModelDefaults = Field(description="what a request leaving them out gets")
    default: bool = Field(description="a request naming no model uses it (generate.default_model)")
    cpu_default: bool = Field(
        description="a request naming no model uses it on a worker without CUDA (there "
        "generate.cpu_model, when generate.default_model is left unset and it is available)"
    )
    demo: bool | None = Field(
        description="true: a tiny random stand-in, its images mean nothing (profile demo, or "
        "what the workers report); false: the real model; null: not known until a worker "
        "resolves it"
    )
    holders: list[ModelHolder] = Field(
        description="workers holding a VRAM lease for it: loaded, or loading now"
    )
    workers: list[ModelOnDisk] = Field(
        description="workers that reported it on their disk (or downloading)"
    )


class ModelCatalogue(BaseModel):
    profile: str
    default_model: str
    cpu_model: str
    schedulers: list[str] = Field(description="the names a request's 'scheduler' may take")
    models: list[CatalogueModel]


class WorkerOutcome(BaseModel):
    """What one worker did."""

    host: str
    pid: int
    worker: str
    instance: str = ""
    device: str | None
    outcome: Literal[
        "loaded", "loading", "held", "unloaded", "not_held", "busy", "unreachable", "failed"
    ]
    mb: int | None = None
    detail: str = ""


class ModelChange(BaseModel):
    model: str
    action: Literal["loaded", "loading", "held", "unloaded", "not_loaded"] = Field(
        description="loaded: a worker loaded it now; loading: a worker is still loading it "
        "(GET /api/models shows it once held); held: some worker held it already; "
        "unloaded: every holder dropped it; not_loaded: no worker held it"
    )
    workers: list[WorkerOutcome]


# --- reading -------------------------------------------------------------------------------


async def list_generation_models(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    settings = ctx.settings
    holders = await _holders(ctx)
    on_disk: dict[str, list[ModelOnDisk]] = {}
    for entry in await read_readiness(ctx.js, ctx.names.models_kv):
        kind, _, name = str(entry.get("task", "")).partition("/")
        if kind != GENERATE or not name:
            continue
        done, total = entry.get("bytes_done"), entry.get("bytes_total")
        progress = min(1.0, done / total) if isinstance(done, int) and total else None
        on_disk.setdefault(name, []).append(
            ModelOnDisk.model_validate({**entry, "progress": progress})
        )
    generate = settings.generate
    cpu_default = (
        generate.default_model
        if "default_model" in generate.model_fields_set
        else generate.cpu_model
    )
    models = [
        CatalogueModel(
            name=name,
            source=entry.source,
            revision=entry.revision,
            variant=entry.variant,
            quantization=entry.quantization,
            vram_mb=entry.vram_mb,
            description=entry.description,
            licence=entry.licence,
            added=name in generate.models,
            defaults=ModelDefaults(
                width=entry.width,
                height=entry.height,
                steps=entry.steps,
                guidance=entry.guidance,
                scheduler=entry.scheduler,
            ),
            default=name == generate.default_model,
            cpu_default=name == cpu_default,
            demo=_demo(settings, name, on_disk.get(name, [])),
            holders=holders.get(name, []),
            workers=on_disk.get(name, []),
        )
        for name, entry in generate.catalogue.items()
    ]
    return json_response(
        ModelCatalogue(
            profile=settings.profile,
            default_model=generate.default_model,
            cpu_model=generate.cpu_model,
            schedulers=list(SCHEDULERS),
            models=models,
        )
    )


def _demo(settings: Settings, name: str, found: list[ModelOnDisk]) -> bool | None:
    """Whether the workers use a demo stand-in for ``name``, as far as can be told here
    (the gateway may not share the workers' disks, so it resolves nothing itself)."""
    if settings.profile == "demo":
        return True
    if name in settings.generate.models:
        return False  # under profile auto a model the user added is never replaced
    if found:
        return any(x.demo for x in found)
    return None


async def _holders(ctx: Context) -> dict[str, list[ModelHolder]]:
    """Generation models in the lease ledger by catalogue name, with their holders."""
    try:
        devices = await read_devices(ctx.js, ctx.names.leases_kv)
    except LedgerUnavailableError as exc:
        raise Problem(503, "Service Unavailable", str(exc)) from None
    now = datetime.now(UTC).timestamp()
    found: dict[str, list[ModelHolder]] = {}
    for device in devices:
        for lease in device["leases"]:
            name = leased_name(str(lease["model"]))
            if name is None:
                continue
            age = lease.get("age_s")
            since = None
            if isinstance(age, int | float):
                moment = datetime.fromtimestamp(now - age, UTC)
                since = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            holder = lease["holder"]
            found.setdefault(name, []).append(
                ModelHolder(
                    host=holder["host"],
                    pid=holder["pid"],
                    instance=holder.get("instance", ""),
                    worker=holder["worker"],
                    device=device["device"],
                    mb=lease["mb"],
                    since=since,
                )
            )
    return found


# --- switching -----------------------------------------------------------------------------


def _known(request: web.Request) -> str:
    name = request.match_info["model_name"]
    catalogue = request.app[CTX].settings.generate.catalogue
    if name not in catalogue:
        raise Problem(
            404,
            "Not Found",
            f"no model {name[:80]!r} in the catalogue; it has {', '.join(sorted(catalogue))}",
        )
    return name


def _refused(exc: ServiceError, service: str) -> Problem:
    status = exc.status if exc.status in PASSED_ON else 502
    detail = exc.message if status != 502 else f"the {service} service failed: {exc.message}"
    return Problem(status, HTTPStatus(status).phrase, detail)


async def load_generation_model(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    name = _known(request)
    held = (await _holders(ctx)).get(name, [])
    if held:
        workers = [WorkerOutcome(**h.model_dump(exclude={"since"}), outcome="held") for h in held]
        return json_response(ModelChange(model=name, action="held", workers=workers))
    last: dict[str, Any] | None = None
    try:
        async for chunk in services.stream(
            ctx.nc,
            ctx.names.service(LOAD_SERVICE),
            {"model": name},
            LOAD_ACK_S,
            LOAD_WAIT_S,
            name=LOAD_SERVICE,
        ):
            last = chunk
    except NoResponderError:
        raise Problem(
            503,
            "Service Unavailable",
            "no generate worker is serving right now: start one (darkroom worker generate), "
            "or wait until it has prepared its default model",
        ) from None
    except ServiceError as exc:
        if exc.status == 504 and last is not None:  # it acknowledged: the load goes on
            return json_response(
                ModelChange(model=name, action="loading", workers=[_outcome(last, "loading")]),
                status=202,
            )
        raise _refused(exc, LOAD_SERVICE) from None
    if last is None or last.get("state") not in ("loaded", "held"):
        raise Problem(502, "Bad Gateway", f"the {LOAD_SERVICE} service ended without loading")
    state = str(last["state"])
    action: Literal["loaded", "held"] = "held" if state == "held" else "loaded"
    return json_response(ModelChange(model=name, action=action, workers=[_outcome(last, action)]))


def _outcome(answer: dict[str, Any], outcome: str, detail: str = "") -> WorkerOutcome:
    return WorkerOutcome.model_validate(
        {
            "host": answer.get("host"),
            "pid": answer.get("pid"),
            "worker": answer.get("worker"),
            "instance": answer.get("instance", ""),
            "device": answer.get("device"),
            "mb": answer.get("mb"),
            "outcome": outcome,
            "detail": detail or answer.get("detail", ""),
        }
    )


async def unload_generation_model(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    name = _known(request)
    holders = {h.instance: h for h in (await _holders(ctx)).get(name, [])}
    if not holders:
        return json_response(ModelChange(model=name, action="not_loaded", workers=[]))
    workers = await asyncio.gather(*(_unload(ctx, name, h) for h in holders.values()))
    outcomes = {w.outcome for w in workers}
    each = [w.model_dump(mode="json") for w in workers]
    for outcome, status, detail in (
        ("busy", 409, f"{name} is in use (a running job, or loading): try again once done"),
        (
            "unreachable",
            503,
            f"a worker holding {name} did not answer: if it is gone, its lease lapses",
        ),
        ("failed", 502, f"a worker holding {name} failed to unload it"),
    ):
        if outcome in outcomes:
            raise Problem(status, HTTPStatus(status).phrase, detail, workers=each)
    return json_response(ModelChange(model=name, action="unloaded", workers=list(workers)))


async def _unload(ctx: Context, name: str, holder: ModelHolder) -> WorkerOutcome:
    """Ask one holder to drop ``name``."""
    where = holder.model_dump(exclude={"since"})
    try:
        answer = await services.request(
            ctx.nc,
            unload_subject(ctx.names, holder.instance),
            {"model": name},
            UNLOAD_TIMEOUT_S,
            name=UNLOAD_SERVICE,
        )
    except ServiceError as exc:  # nobody listens there (503), or no answer in time (504)
        gone = exc.status in (503, 504)
        return _outcome(where, "unreachable" if gone else "failed", exc.message)
    if not isinstance(answer, dict) or answer.get("outcome") not in UNLOAD_OUTCOMES:
        return _outcome(where, "failed", f"{UNLOAD_SERVICE} answered {str(answer)[:200]}")
    return _outcome(where, str(answer["outcome"]), str(answer.get("detail", "")))


def routes() -> list[Route]:
    return [
        Route(
            "GET",
            "/api/models",
            list_generation_models,
            "read",
            "The generation models: catalogue entries with their defaults, which is the "
            "default, and which workers hold each (VRAM leases) or have it on disk",
            "models",
            responses={
                200: Reply("the catalogue", ModelCatalogue),
                503: "the lease ledger cannot be read",
            },
        ),
        Route(
            "POST",
            "/api/models/{model_name}/load",
            load_generation_model,
            "admin",
            "Load a generation model on a generate worker now, so the next request for it "
            "does not wait (a no-op when some worker holds it)",
            "models",
            responses={
                200: Reply("held now: loaded by a worker, or held already", ModelChange),
                202: Reply(
                    "a worker is loading it and has not finished within the wait: "
                    "GET /api/models shows it once held",
                    ModelChange,
                ),
                404: "no such model in the catalogue",
                409: "the model is not on the worker's disk (run darkroom models pull <name>), "
                "or cannot be used there (e.g. quantisation without CUDA), or can never fit "
                "its device",
                502: "the worker failed, or answered something unexpected",
                503: "no generate worker serves right now, no VRAM came free in time, or the "
                "lease ledger cannot be read",
                504: "no generate worker answered in time",
            },
        ),
        Route(
            "POST",
            "/api/models/{model_name}/unload",
            unload_generation_model,
            "admin",
            "Unload a generation model from every worker that holds it, freeing its VRAM",
            "models",
            responses={
                200: Reply("every holder dropped it (or none held it)", ModelChange),
                404: "no such model in the catalogue",
                409: "a holder is using it for a running job (or loading it): that holder "
                "keeps it ('workers' says what each did)",
                502: "a holder failed to unload it ('workers' says which)",
                503: "a holder did not answer ('workers' says which), or the lease ledger "
                "cannot be read",
            },
        ),
    ]
