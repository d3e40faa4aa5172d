"""Models a worker keeps loaded, each under a VRAM lease (see :mod:`bus.gpu.leases`).

Every load goes through a lease on the worker's device. Before asking the ledger, the cache
makes room from its own idle models, least recently used first, so a worker that switches
between two models that do not both fit swaps them instead of waiting on itself. The
footprint measured after a load (the CUDA allocation delta on the leased device, or
parameter bytes on the CPU) replaces the estimate in the ledger. Unloading drops the model,
empties the CUDA cache and releases the lease.

What stays loaded follows the mode (:data:`bus.gpu.leases.MODES`):

- ``low``: unload as soon as the last user is done; loaders are asked to offload;
- ``balanced``: stay loaded until idle for ``idle_ttl_s`` (or evicted to make room);
- ``high``: stay loaded; the runner preloads each function's models at start.

One thread of its own serves the device: it loads models and runs inference
(:meth:`ResidentModels.run`, ``ctx.run_gpu``), so GPU work never queues behind the CPU
pool, work on one device runs in order, and a load's footprint is measured with nothing
else of this process running on the device.

While a load asks for memory (and above all while it waits for memory held by others),
pressure listeners are told, so the runner stops fetching new work (backpressure) instead
of piling it up in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from nats.js import JetStreamContext

from bus.core.contract import Model, Placement
from bus.core.settings import Settings
from bus.core.subjects import Names
from bus.gpu.leases import (
    MODES,
    Device,
    Holder,
    Lease,
    LeaseResizeError,
    Ledger,
    Mode,
    discover_devices,
    host_id,
)
from bus.infra.tasks import cancel_and_wait

log = logging.getLogger("darkroom.resident")
T = TypeVar("T")
MB = 1024 * 1024
Measure = Callable[[Any, int | None, str], int | None]
Wanted = Callable[[], bool]
"""Whether a load is still needed; called on the loop and on the device's thread."""


def _always() -> bool:
    return True


class LoadAbandonedError(Exception):
    """Nobody wanted the model any more by the time its load could start: nothing loaded."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the load of {name} was abandoned: no job needs it any more")
        self.name = name


def measure_mb(model: Any, cuda_before: int | None = None, device: str = "cpu") -> int | None:
    """A loaded model's footprint in MB, or None when it cannot be told.

    On CUDA (``cuda_before`` given) it is the growth of ``torch.cuda.memory_allocated`` on
    ``device``; otherwise the bytes of a torch module's parameters and buffers (a diffusers
    pipeline's components summed), or the length of a bytes-like model.
    """
    if isinstance(model, (bytes, bytearray, memoryview)):
        return math.ceil(len(model) / MB)
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if cuda_before is not None and device.startswith("cuda"):
        allocated = int(torch.cuda.memory_allocated(device))
        return math.ceil(max(0, allocated - cuda_before) / MB)
    modules = [model] if isinstance(model, torch.nn.Module) else []
    components = getattr(model, "components", None)
    if isinstance(components, dict):
        modules += [m for m in components.values() if isinstance(m, torch.nn.Module)]
    if not modules:
        return None
    total: int = sum(
        t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers())
    )
    return math.ceil(total / MB)


def _cuda_allocated(device: str) -> int | None:
    """Bytes torch has allocated on ``device`` (not the current device: a worker pinned to
    cuda:1 must not read cuda:0), or None off CUDA."""
    if not device.startswith("cuda"):
        return None
    torch = sys.modules.get("torch")
    if torch is None:
        return 0  # torch not imported yet: nothing of ours is on the GPU
    return int(torch.cuda.memory_allocated(device))


def _collect() -> None:
    """Free a dropped model now. Plain objects go with their last reference; torch models
    can hold reference cycles, so collect those, then hand cached CUDA blocks back."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(slots=True)
class _Resident:
    name: str
    model: Any  # None once unloaded, so a caller's lingering reference frees nothing
    lease: Lease
    last_used: float
    users: int = 0


class ResidentModels:
    """The models one worker holds on one device, loaded through leases."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        mode: Mode = "balanced",
        idle_ttl_s: float = 300.0,
        acquire_timeout_s: float = 600.0,
        measure: Measure = measure_mb,
    ) -> None:
        self.ledger = ledger
        self.mode = mode
        self.residency = MODES[mode]
        self.idle_ttl_s = idle_ttl_s
        self.acquire_timeout_s = acquire_timeout_s
        self._measure = measure
        self._thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"gpu-{ledger.device.token}"
        )
        self._models: dict[str, _Resident] = {}
        self._loading: dict[str, asyncio.Lock] = {}
        self._room = asyncio.Lock()  # one load at a time decides what to evict
        self._listeners: list[Callable[[bool], None]] = []
        self._waiting = 0
        self._reaper: asyncio.Task[None] | None = None

    # --- public ----------------------------------------------------------------------------
    @property
    def device(self) -> str:
        """The device this worker's models live on, e.g. ``cuda:1``."""
        return self.ledger.device.id

    @property
    def loaded(self) -> list[str]:
        """Loaded model names, least recently used first."""
        return [r.name for r in sorted(self._models.values(), key=lambda r: r.last_used)]

    @property
    def waiting(self) -> bool:
        """A load is making room or waiting for its lease."""
        return self._waiting > 0

    def add_pressure_listener(self, listener: Callable[[bool], None]) -> None:
        """``listener(True)`` when a load starts asking for memory, ``(False)`` when no load is
        (a prompt grant gives a brief True/False pair)."""
        self._listeners.append(listener)

    def remove_pressure_listener(self, listener: Callable[[bool], None]) -> None:
        self._listeners.remove(listener)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking GPU work on this device's own thread, in order with other GPU work."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    @contextlib.asynccontextmanager
    async def use(self, model: Model, wanted: Wanted = _always) -> AsyncIterator[Any]:
        """``model``, loaded on this device (under a lease) if it is not already.

        A load that has to wait (for the lock, the lease, or the device's thread, busy with
        another job's inference) first asks ``wanted()``; when it says no (every job that
        needed the model was cancelled meanwhile), nothing is loaded and
        :class:`LoadAbandonedError` is raised. Raises what :meth:`Ledger.acquire` raises
        when the memory cannot be had in time.
        """
        resident = await self._get(model, wanted)
        resident.users += 1
        try:
            yield resident.model
        finally:
            resident.users -= 1
            resident.last_used = time.monotonic()
            # Modes that keep nothing unload at once; so does any mode while one of our own
            # loads waits for memory (it may be waiting for exactly this model's room).
            if resident.users == 0 and (not self.residency.resident or self._waiting):
                await self.unload(model.name)

    async def preload(self, model: Model) -> None:
        """Load now so the first request does not wait (``high`` mode does this at start)."""
        resident = await self._get(model)
        resident.last_used = time.monotonic()

    async def unload(self, name: str) -> None:
        """Drop ``name`` (if loaded and unused), empty the CUDA cache, release its lease."""
        resident = self._models.get(name)
        if resident is None or resident.users > 0:
            return
        del self._models[name]
        lease = resident.lease
        resident.model = None
        await asyncio.to_thread(_collect)  # a full collection can take 100 ms: not on the loop
        with contextlib.suppress(Exception):  # a lapsed or unreachable ledger: nothing to free
            await self.ledger.release(lease)
        log.info("unloaded %s (%d MB)", name, lease.mb)

    async def close(self) -> None:
        await cancel_and_wait(self._reaper)
        self._reaper = None
        for name in list(self._models):
            self._models[name].users = 0
            await self.unload(name)
        await self.ledger.close()
        self._thread.shutdown(wait=False, cancel_futures=True)

    # --- loading ---------------------------------------------------------------------------
    async def _get(self, model: Model, wanted: Wanted = _always) -> _Resident:
        lock = self._loading.setdefault(model.name, asyncio.Lock())
        async with lock:  # one load per model; later callers find it loaded
            resident = self._models.get(model.name)
            if resident is not None and not self.ledger.is_held(resident.lease):
                log.warning("the lease for %s lapsed; loading it again under a new one", model.name)
                resident.users = 0
                await self.unload(model.name)
                resident = None
            if resident is None:
                if not wanted():
                    raise LoadAbandonedError(model.name)
                resident = await self._load(model, model.estimate_mb, wanted)
                self._models[model.name] = resident
                self._start_reaper()
            resident.last_used = time.monotonic()
            return resident

    async def _load(self, model: Model, mb: int, wanted: Wanted = _always) -> _Resident:
        name = model.name
        lease = await self._acquire(name, mb, wanted)
        loop = asyncio.get_running_loop()
        placement = Placement(self.device, offload=self.residency.offload)
        box: list[tuple[Any, int | None]] = []  # the futures then hold None, never the model

        def load_and_measure() -> None:  # on the device's thread: nothing else runs there
            if not wanted():  # asked when the thread is free, which may be minutes later
                return
            before = _cuda_allocated(self.device)
            loaded = model.load(placement)
            box.append((loaded, self._measure(loaded, before, self.device)))

        loading = loop.run_in_executor(self._thread, load_and_measure)
        try:
            await asyncio.shield(loading)
            if not box:
                raise LoadAbandonedError(name)
            loaded, measured = box.pop()
        except BaseException:
            # A thread cannot be stopped: let the load end, free what it took, then give the
            # lease back, so the memory is never in use without one.
            with contextlib.suppress(BaseException):
                await loading
            box.clear()
            await asyncio.shield(asyncio.to_thread(_collect))
            await asyncio.shield(self.ledger.release(lease))
            raise
        if measured is not None and measured > 0 and measured != lease.mb:
            try:
                lease = await self.ledger.resize(lease, measured)
            except LeaseResizeError:
                # It needs more than was free: give it all back and queue for the real size.
                del loaded
                await asyncio.to_thread(_collect)
                await self.ledger.release(lease)
                log.warning("%s needs %d MB, not the %d MB estimated", name, measured, mb)
                return await self._load(model, measured, wanted)
        log.info(
            "loaded %s on %s: %d MB (estimated %d MB)",
            name,
            self.device,
            lease.mb,
            model.estimate_mb,
        )
        return _Resident(name, loaded, lease, time.monotonic())

    async def _make_room(self, mb: int) -> None:
        """Evict this worker's idle models, least recently used first, until ``mb`` fits."""
        snapshot = await self.ledger.snapshot()
        short = mb - snapshot.free_mb
        for resident in sorted(self._models.values(), key=lambda r: r.last_used):
            if short <= 0:
                return
            if resident.users == 0:
                short -= resident.lease.mb
                await self.unload(resident.name)

    async def _acquire(self, name: str, mb: int, wanted: Wanted = _always) -> Lease:
        """Make room and take the lease, with pressure listeners told for the whole time.

        Pressure starts before the first ledger round trip, so a worker fetches nothing
        more from the moment it knows it needs memory; a prompt grant ends it at once.
        ``wanted()`` is asked again before evicting anything, and once the lease is had.
        """
        self._waiting += 1
        if self._waiting == 1:
            self._notify(True)
        try:
            async with self._room:
                if not wanted():
                    raise LoadAbandonedError(name)
                await self._make_room(mb)
                lease = await self.ledger.acquire(name, mb, self.acquire_timeout_s)
            if not wanted():
                await self.ledger.release(lease)
                raise LoadAbandonedError(name)
            return lease
        finally:
            self._waiting -= 1
            if self._waiting == 0:
                self._notify(False)

    def _notify(self, waiting: bool) -> None:
        for listener in self._listeners:
            listener(waiting)

    # --- idle unloading --------------------------------------------------------------------
    def _start_reaper(self) -> None:
        if not self.residency.idle_unload or (self._reaper is not None and not self._reaper.done()):
            return
        self._reaper = asyncio.create_task(self._reap(), name="resident-models-idle")

    async def _reap(self) -> None:
        interval = max(0.05, min(5.0, self.idle_ttl_s / 4))
        while self._models:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for resident in list(self._models.values()):
                if resident.users == 0 and now - resident.last_used >= self.idle_ttl_s:
                    await self.unload(resident.name)


async def open_resident_models(
    js: JetStreamContext,
    names: Names,
    settings: Settings,
    worker: str,
    devices: list[Device] | None = None,
) -> ResidentModels:
    """The cache for a GPU worker: its device (pinned, else the one with the most room in
    the ledger now; ``devices``: those found already), a started ledger on it, and the
    mode's residency settings."""
    if devices is None:
        devices = await asyncio.to_thread(discover_devices, settings)
    host = await asyncio.to_thread(host_id, settings.data_dir, settings.gpu.host_id)
    kv = await js.key_value(names.leases_kv)
    holder = Holder.here(host, worker)
    ledgers = [Ledger(kv, d, holder, ttl_s=settings.gpu.lease_ttl_s) for d in devices]
    room = [(await ledger.snapshot()).free_mb for ledger in ledgers]
    ledger = ledgers[room.index(max(room))]
    ledger.start()
    log.info("VRAM leases on %s of host %s (mode %s)", ledger.device.id, host, settings.gpu.mode)
    return ResidentModels(ledger, mode=settings.gpu.mode, idle_ttl_s=settings.gpu.idle_ttl_s)
