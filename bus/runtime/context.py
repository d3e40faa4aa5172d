"""The Context handed to every handler: connections, the store, the read model, executors.

Built once per process by :func:`open_context` (an async context manager) and passed in;
nothing lives in module globals. What belongs to one invocation (its attempt, deadline,
progress and cancellation) is in :class:`bus.runtime.call.Call` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from bus.core.contract import Spec
from bus.core.settings import Settings
from bus.core.subjects import Names
from bus.gpu.leases import discover_devices
from bus.gpu.resident import ResidentModels, open_resident_models
from bus.images.budget import DecodeBudget
from bus.infra.metrics import Metrics
from bus.infra.nats_auth import Role
from bus.infra.nats_conn import check_jetstream, connect
from bus.infra.store import ObjectStore
from bus.runtime import streams
from bus.state.cancels import CancelFlags
from bus.state.readmodel import ReadModel, open_read_model

T = TypeVar("T")
START_TIMEOUT_S = 6.0
POOL_CLOSE_S = 10.0  # closing waits this long for database connections still lent out
log = logging.getLogger("darkroom.context")


@dataclass
class Context:
    settings: Settings
    names: Names
    nc: NATS
    js: JetStreamContext
    store: ObjectStore
    cancels_kv: KeyValue  # cancellation flags by job or image id
    cancels: CancelFlags  # this process's mirror of them (started by the first runner)
    cpu: ThreadPoolExecutor
    interactive: ThreadPoolExecutor
    decode_budget: DecodeBudget  # decoded pixels this process may hold at once
    metrics: Metrics
    log: logging.Logger
    gpu: ResidentModels | None = None  # GPU functions' models, loaded under VRAM leases
    db: ReadModel | None = None  # the catalogue in PostgreSQL (gateway, notify, admin)
    # API keys, and sha256 of an original → its image id (duplicate uploads): only for
    # processes that authenticate or accept uploads; a worker's NATS role cannot read them.
    keys_kv: KeyValue | None = None
    digests_kv: KeyValue | None = None

    @property
    def client_name(self) -> str:
        """The process's name as it connected to NATS (``worker-caption``, ``up``)."""
        return self.log.name.removeprefix("darkroom.")

    @property
    def api_keys(self) -> KeyValue:
        if self.keys_kv is None:
            raise RuntimeError("this process did not open the API keys (its role has none)")
        return self.keys_kv

    @property
    def digests(self) -> KeyValue:
        if self.digests_kv is None:
            raise RuntimeError("this process did not open the digests (its role has none)")
        return self.digests_kv

    async def run_cpu(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking CPU work off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.cpu, fn, *args)

    async def run_interactive(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU work someone is waiting on (checking an upload) on threads of its own, so
        it never queues behind a burst of function work in the same process."""
        return await asyncio.get_running_loop().run_in_executor(self.interactive, fn, *args)

    async def run_gpu(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking GPU work on the leased device's own thread, never the CPU pool."""
        if self.gpu is None:
            raise RuntimeError("this process has no GPU context: only Specs with needs_gpu get one")
        return await self.gpu.run(fn, *args)


@asynccontextmanager
async def open_context(
    settings: Settings,
    specs: list[Spec],
    client_name: str,
    metrics: Metrics | None = None,
    declare: bool = True,
    database: bool = False,
    role: Role = Role.GATEWAY,
    gpu: bool = False,
) -> AsyncIterator[Context]:
    """Connect to NATS and S3, check versions, declare streams and ``specs``' consumers.

    Both servers must be reachable within a few seconds; otherwise the error names the
    URL. With ``declare=False`` (admin commands) nothing is created or reconfigured: the
    deployment must exist already. ``database`` (or a Spec with ``needs_db``) also opens
    the PostgreSQL read model, migrating its schema first. ``role`` is the process's NATS
    role: only the gateway's declares streams and buckets and opens the API keys and
    digests; a worker declares its consumers once a gateway has declared the rest.
    ``gpu`` (or a Spec with ``needs_gpu``) opens the VRAM leases (``ctx.gpu``), for GPU
    functions started on this context later.
    """
    if settings.nats.url is None or settings.s3.endpoint is None:
        raise ValueError("open_context needs resolved NATS and S3 endpoints")
    servers = settings.nats.servers
    nc = await connect(settings.nats, name=client_name, timeout=START_TIMEOUT_S, role=role)
    gateway = role is Role.GATEWAY
    store: ObjectStore | None = None
    ctx: Context | None = None
    cpu = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="cpu")
    interactive = ThreadPoolExecutor(max_workers=2, thread_name_prefix="interactive")
    try:
        js = nc.jetstream(timeout=10.0)
        await check_jetstream(js, servers)
        # What this process can check alone comes first: a worker may then wait a while
        # for a gateway to declare the streams.
        store = ObjectStore.connect(settings.s3)
        await store.ensure_bucket(timeout=START_TIMEOUT_S)
        gpu = declare and (gpu or any(spec.needs_gpu for spec in specs))
        devices = await asyncio.to_thread(discover_devices, settings) if gpu else []
        if declare:
            names = await streams.declare(js, settings, specs, streams=gateway)
        else:
            names = await streams.check_deployed(js, settings, keys=gateway)
        ctx = Context(
            settings=settings,
            names=names,
            nc=nc,
            js=js,
            store=store,
            keys_kv=await js.key_value(names.keys_kv) if gateway else None,
            digests_kv=await js.key_value(names.digests_kv) if gateway else None,
            cancels_kv=(cancels_kv := await js.key_value(names.cancels_kv)),
            cancels=CancelFlags(nc, cancels_kv),
            cpu=cpu,
            interactive=interactive,
            decode_budget=DecodeBudget(settings.ingest.decode_budget_mb * 1024 * 1024),
            metrics=metrics or Metrics(),
            log=logging.getLogger(f"darkroom.{client_name}"),
        )
        if database or any(spec.needs_db for spec in specs):
            ctx.db = await open_read_model(settings, client_name)
        if gpu:
            ctx.gpu = await open_resident_models(js, names, settings, client_name, devices)
        yield ctx
    finally:
        if ctx is not None:
            await ctx.cancels.stop()
            if ctx.gpu is not None:
                await ctx.gpu.close()
            if ctx.db is not None:
                try:  # it waits for every connection lent out to come back
                    await asyncio.wait_for(ctx.db.pool.close(), POOL_CLOSE_S)
                except Exception as exc:  # still lent out, or a server gone: the rest goes on
                    log.warning("closing the database connections at once: %r", exc)
                    ctx.db.pool.terminate()
        # A connection whose server died can fail even to close (its transport is gone):
        # nothing is left to flush then, and the shutdown must go on.
        with contextlib.suppress(Exception):
            if nc.is_connected:
                try:
                    await asyncio.wait_for(nc.drain(), 10.0)
                except Exception:
                    await asyncio.wait_for(nc.close(), 5.0)
            else:
                await asyncio.wait_for(nc.close(), 5.0)
        try:
            if store is not None:
                await store.close()
        finally:
            cpu.shutdown(wait=False, cancel_futures=True)
            interactive.shutdown(wait=False, cancel_futures=True)
