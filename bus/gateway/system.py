"""Health, readiness, metrics and system status (dead letters: bus.gateway.deadletters)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

import nats.js.errors
from aiohttp import web
from nats.js.api import ConsumerInfo
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bus.core.redact import redact_url
from bus.core.settings import MODEL_TASKS, Settings
from bus.gateway.problems import Problem, json_response, problem_response
from bus.gateway.state import CTX, FUNCTIONS
from bus.gpu.leases import LedgerUnavailableError, read_devices
from bus.models.progress import read_readiness
from bus.runtime.context import Context
from bus.runtime.streams import keyed_stage

log = logging.getLogger("darkroom.gateway")
CONSUMER_PAGE = 256  # consumers a JetStream listing gives per request


class Health(BaseModel):
    status: str = Field(description="ok")


class Ready(BaseModel):
    status: str = Field(description="ready")
    checks: dict[str, str] = Field(description="each dependency: ok, or what is wrong")


class FunctionLag(BaseModel):
    function: str
    deployed: bool = Field(description="false: no consumer yet (no worker has started)")
    pending: int | None = None
    ack_pending: int | None = None
    redelivered: int | None = None
    waiting_pulls: int | None = None
    acked: int | None = Field(
        None,
        description="deliveries acknowledged so far (its consumers' ack floors): a counter, "
        "whose rate is the function's throughput",
    )


class StreamState(BaseModel):
    name: str
    messages: int
    bytes: int


class StoreInfo(BaseModel):
    url: str = Field(description="the S3 endpoint, any password hidden")
    bucket: str


class ModelOnWorker(BaseModel):
    """A task's model on one worker process, as that worker last reported it."""

    host: str
    pid: int
    worker: str = Field(description="the process, e.g. worker-caption, or up")
    function: str
    source: str = Field(description="the model it uses: a hub id, a directory, pip:..., or demo")
    revision: str | None
    demo: bool = Field(description="a tiny random stand-in: its output means nothing")
    state: Literal["cached", "downloading", "ready", "failed"] = Field(
        description="cached: on disk at start; ready: downloaded since; downloading: the "
        "function takes no events until its models are ready; failed: tried again soon"
    )
    bytes_done: int
    bytes_total: int | None = Field(description="what this download fetches, once known")
    progress: float | None = Field(
        description="bytes_done / bytes_total, 0 to 1 (null while the total is unknown)"
    )
    error: str | None
    updated: str = Field(description="when the state or progress last changed")


class TaskModels(BaseModel):
    task: str
    configured: str = Field(
        description="the source these settings name (demo under profile demo); a worker "
        "may use another: a CPU-sized one without CUDA, or a demo model when it is "
        "unavailable (see workers)"
    )
    ready: bool = Field(description="some worker has the model on disk")
    workers: list[ModelOnWorker] = Field(description="each worker's model and readiness")


class SystemStatus(BaseModel):
    namespace: str
    profile: str
    functions: list[FunctionLag]
    stream: StreamState
    dead_letters: int
    store: StoreInfo
    models: list[TaskModels] = Field(description="each model task, and where it is ready")


class Device(BaseModel):
    model_config = ConfigDict(extra="allow")
    key: str
    host: str
    device: str
    mode: str
    capacity_mb: int
    reserve_mb: int
    used_mb: int
    free_mb: int
    leases: list[dict[str, Any]]
    queue: list[dict[str, Any]]


class Devices(BaseModel):
    devices: list[Device]


async def healthz(request: web.Request) -> web.Response:
    return json_response(Health(status="ok"))


async def readyz(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    checks: dict[str, str] = {}
    checks["nats"] = "ok" if ctx.nc.is_connected else "disconnected"
    try:
        await asyncio.wait_for(ctx.store.stat("readyz-probe"), 3.0)
        checks["s3"] = "ok"
    except Exception as exc:
        checks["s3"] = f"unreachable: {type(exc).__name__}"
    if ctx.db is not None:
        try:
            async with asyncio.timeout(3.0), ctx.db.pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
            checks["postgres"] = "ok"
        except Exception as exc:
            checks["postgres"] = f"unreachable: {type(exc).__name__}"
    if all(v == "ok" for v in checks.values()):
        return json_response(Ready(status="ready", checks=checks))
    return problem_response(503, "Not ready", "a dependency is unavailable", checks=checks)


async def consumer_stats(ctx: Context, functions: list[str]) -> list[dict[str, Any]]:
    """Each function's backlog: its own consumer's, plus its keyed consumers' (one per
    model, with model affinity: ``<durable>-<key>``, see bus/runtime/streams.py)."""
    keyed = await _keyed_consumers(ctx, functions)
    out = []
    for name in functions:
        try:
            info = await ctx.js.consumer_info(ctx.names.stream, ctx.names.durable(name))
        except nats.js.errors.NotFoundError:
            out.append({"function": name, "deployed": False})
            continue
        infos = [info, *keyed.get(name, [])]
        pending = sum(i.num_pending or 0 for i in infos)
        ack_pending = sum(i.num_ack_pending or 0 for i in infos)
        ctx.metrics.consumer_pending.labels(function=name).set(pending)
        ctx.metrics.consumer_ack_pending.labels(function=name).set(ack_pending)
        out.append(
            {
                "function": name,
                "deployed": True,
                "pending": pending,
                "ack_pending": ack_pending,
                "redelivered": sum(i.num_redelivered or 0 for i in infos),
                "waiting_pulls": sum(i.num_waiting or 0 for i in infos),
                "acked": sum(i.ack_floor.consumer_seq or 0 for i in infos if i.ack_floor),
            }
        )
    return out


async def _keyed_consumers(ctx: Context, functions: list[str]) -> dict[str, list[ConsumerInfo]]:
    """The keyed consumers of ``functions`` on the events stream, by function."""
    prefixes = {ctx.names.durable(keyed_stage(name, "")): name for name in functions}
    found: dict[str, list[ConsumerInfo]] = {}
    offset = 0
    while True:
        page = await ctx.js.consumers_info(ctx.names.stream, offset=offset)
        for info in page:
            for prefix, name in prefixes.items():
                if info.name.startswith(prefix):
                    found.setdefault(name, []).append(info)
        offset += len(page)
        if len(page) < CONSUMER_PAGE:
            return found


async def model_status(ctx: Context) -> list[TaskModels]:
    """Each model task: what the settings name, and every live worker's readiness."""
    workers: dict[str, list[ModelOnWorker]] = {task: [] for task in MODEL_TASKS}
    for entry in await read_readiness(ctx.js, ctx.names.models_kv):
        done, total = entry.get("bytes_done"), entry.get("bytes_total")
        progress = min(1.0, done / total) if isinstance(done, int) and total else None
        try:
            task = str(entry["task"])
            found = ModelOnWorker.model_validate({**entry, "progress": progress})
        except (KeyError, ValidationError):
            log.warning("ignoring a model readiness entry of another shape: %s", entry)
            continue
        workers.setdefault(task, []).append(found)
    return [
        TaskModels(
            task=task,
            configured=_configured(ctx.settings, task),
            ready=any(w.state in ("cached", "ready") for w in found),
            workers=found,
        )
        for task, found in workers.items()
    ]


def _configured(settings: Settings, task: str) -> str:
    if settings.profile == "demo":
        return "demo"
    for known in MODEL_TASKS:
        if known == task:
            return settings.models.entry(known).source
    kind, _, name = task.partition("/")
    entry = settings.generate.catalogue.get(name) if kind == "generate" else None
    return entry.source if entry is not None else "-"  # a task another function reports


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    await consumer_stats(ctx, request.app[FUNCTIONS])
    try:
        ctx.metrics.set_gpus(await read_devices(ctx.js, ctx.names.leases_kv))
    except LedgerUnavailableError as exc:  # keep serving the other metrics
        log.warning("GPU gauges not refreshed: %s", exc)
    return web.Response(
        body=generate_latest(ctx.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def status(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    stream = await ctx.js.stream_info(ctx.names.stream)
    dlq = await ctx.js.stream_info(ctx.names.dlq_stream)
    doc = SystemStatus.model_validate(
        {
            "namespace": ctx.names.namespace,
            "profile": ctx.settings.profile,
            "functions": await consumer_stats(ctx, request.app[FUNCTIONS]),
            "stream": {
                "name": stream.config.name,
                "messages": stream.state.messages,
                "bytes": stream.state.bytes,
            },
            "dead_letters": dlq.state.messages,
            # Read keys see this: a password in the endpoint's URL stays hidden.
            "store": {"url": redact_url(ctx.store.url), "bucket": ctx.store.bucket},
            "models": await model_status(ctx),
        }
    )
    return json_response(doc)


async def gpus(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    try:
        devices = await read_devices(ctx.js, ctx.names.leases_kv)
    except LedgerUnavailableError as exc:
        raise Problem(503, "Service Unavailable", str(exc)) from exc
    ctx.metrics.set_gpus(devices)
    return json_response({"devices": devices})
