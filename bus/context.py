"""The Context handed to every handler: connections, the store, the read model, executors.

Built once per process by :func:`open_context` (an async context manager) and passed in;
nothing lives in module globals.
"""

from __future__ import annotations

import asyncio
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

from bus import streams
from bus.function import Spec
from bus.metrics import Metrics
from bus.nats_conn import check_jetstream, connect
from bus.resident import ResidentModels, open_resident_models
from bus.settings import Settings
from bus.store import ObjectStore
from bus.subjects import Names

T = TypeVar("T")
START_TIMEOUT_S = 6.0


@dataclass
class Context:
    settings: Settings
    names: Names
    nc: NATS
    js: JetStreamContext
    store: ObjectStore
    images: KeyValue  # read model: one document per image
    api_keys: KeyValue
    digests: KeyValue  # sha256 of an original → its image id (duplicate uploads)
    cpu: ThreadPoolExecutor
    interactive: ThreadPoolExecutor
    metrics: Metrics
    log: logging.Logger
    gpu: ResidentModels | None = None  # GPU functions' models, loaded under VRAM leases

    async def run_cpu(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking CPU work off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.cpu, fn, *args)

    async def run_interactive(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU work someone is waiting on (checking an upload) on threads of its own, so
        it never queues behind a burst of function work in the same process."""
        return await asyncio.get_running_loop().run_in_executor(self.interactive, fn, *args)


@asynccontextmanager
async def open_context(
    settings: Settings,
    specs: list[Spec],
    client_name: str,
    metrics: Metrics | None = None,
    declare: bool = True,
) -> AsyncIterator[Context]:
    """Connect to NATS and S3, check versions, declare streams and ``specs``' consumers.

    Both servers must be reachable within a few seconds; otherwise the error names the
    URL. With ``declare=False`` (admin commands) nothing is created or reconfigured: the
    deployment must exist already.
    """
    if settings.nats.url is None or settings.s3.endpoint is None:
        raise ValueError("open_context needs resolved NATS and S3 endpoints")
    servers = settings.nats.servers
    nc = await connect(servers, name=client_name, timeout=START_TIMEOUT_S)
    store: ObjectStore | None = None
    ctx: Context | None = None
    model_loads: ThreadPoolExecutor | None = None
    cpu = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="cpu")
    interactive = ThreadPoolExecutor(max_workers=2, thread_name_prefix="interactive")
    try:
        js = nc.jetstream(timeout=10.0)
        await check_jetstream(js, servers)
        if declare:
            names = await streams.declare(js, settings, specs)
        else:
            names = await streams.check_deployed(js, settings)
        store = ObjectStore.connect(settings.s3)
        await store.ensure_bucket(timeout=START_TIMEOUT_S)
        ctx = Context(
            settings=settings,
            names=names,
            nc=nc,
            js=js,
            store=store,
            images=await js.key_value(names.images_kv),
            api_keys=await js.key_value(names.keys_kv),
            digests=await js.key_value(names.digests_kv),
            cpu=cpu,
            interactive=interactive,
            metrics=metrics or Metrics(),
            log=logging.getLogger(f"darkroom.{client_name}"),
        )
        if declare and any(spec.needs_gpu for spec in specs):
            model_loads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
            ctx.gpu = await open_resident_models(js, names, settings, client_name, model_loads)
        yield ctx
    finally:
        if ctx is not None and ctx.gpu is not None:
            await ctx.gpu.close()
            await ctx.gpu.ledger.close()
            if model_loads is not None:
                model_loads.shutdown(wait=False, cancel_futures=True)
        if nc.is_connected:
            try:
                await asyncio.wait_for(nc.drain(), 10.0)
            except Exception:
                await nc.close()
        else:
            await nc.close()
        if store is not None:
            store.close()
        cpu.shutdown(wait=False, cancel_futures=True)
        interactive.shutdown(wait=False, cancel_futures=True)
