"""VRAM leases: a ledger per device in NATS KV, shared by every process on every host.

A GPU function takes a lease before it loads a model and gives it back when it unloads, so
processes that share a GPU never load more than fits. The CPU counts as a device too (with a
configured capacity) so the same code runs in tests and on CPU-only hosts.

**Document.** One KV key per device, ``<host id>.<device>`` (``cuda:0`` → ``cuda_0``), holds
one JSON document::

    {"device": "cuda:0", "mode": "balanced", "capacity_mb": 24564, "reserve_mb": 1024,
     "leases": [{"id", "holder": {"host", "pid", "worker"}, "model", "mb", "expires"}],
     "queue":  [same shape: a waiting request, its ``expires`` renewed like a lease's]}

Every write is compare-and-set on the key's revision (:func:`bus.infra.kv.compare_and_set`);
a writer that lost the race backs off a random moment, re-reads and re-decides.
Because the whole device is one document, "the live leases plus this one fit" is checked and
written atomically: the ledger never over-commits. (One key per lease with a per-message TTL
cannot give that: nothing makes a sum over several keys atomic.) Capacity and reserve are
stamped by each writer from its own :class:`Device`; processes of one host share settings.

**Lapse rule.** ``expires`` is wall-clock time (epoch seconds) of the last renewal plus the
lease TTL. An entry is *live* while ``now <= expires + grace``; readers ignore lapsed entries
and the next write drops them. Holders renew their leases and queued requests every TTL/3,
so a crashed holder's memory is free again at most TTL + grace after its last renewal.
This assumes the hosts' clocks agree to well within the grace (NTP-synced); the grace
(0.5 s by default) absorbs ordinary skew. A holder whose lease lapsed anyway (it could not
renew for a whole TTL) finds it gone at its next renewal: :meth:`Ledger.is_held` turns false
and it must unload.

**FIFO rule.** A request that cannot be granted at once joins the tail of the queue (the
order of successful CAS writes is the arrival order). Only the live head of the queue may be
granted, and only when the live leases plus its size fit within capacity minus reserve; a
smaller request behind it waits too (no overtaking, so large models are never starved). A
request is granted by its own waiter, which watches the key (``kv.watch``) and re-checks when
the next entry is due to lapse, so a dead waiter at the head lapses like a dead holder. A
request larger than capacity minus reserve fails at once; one that waits longer than its
timeout leaves the queue and raises :class:`LeaseTimeoutError`.

**Resize rule.** :meth:`Ledger.resize` replaces the estimate with the measured footprint.
Shrinking always succeeds. Growing succeeds only if the other live leases plus the new size
fit; it does not queue (the memory is already in use). Otherwise :class:`LeaseResizeError`
is raised and the lease keeps its old size: the caller must unload and acquire again with the
measured size, so the ledger still never shows more than the device can hold.

**Modes** (``gpu.mode``; the reserve is headroom never leased: CUDA context, activations,
allocator fragmentation, other programs on the GPU):

======== ========== =====================================================================
mode     reserve    residency
======== ========== =====================================================================
low      2048 MB    unload right after each call; CPU-offload model parts where possible
balanced 1024 MB    stay resident while there is room; unload after ``gpu.idle_ttl_s``
                    idle, or sooner (least recently used first) when another model needs
                    the room
high      512 MB    stay resident; preload the configured models at start; never unload
                    for idleness
======== ========== =====================================================================

``gpu.reserve_mb`` overrides the mode's reserve.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import nats.errors
import nats.js.errors
import orjson
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from bus.core.settings import Settings
from bus.core.subjects import check_id
from bus.infra.kv import CasConflictError, compare_and_set
from bus.infra.kvkeys import stored_keys
from bus.infra.tasks import cancel_and_wait

log = logging.getLogger("darkroom.leases")
T = TypeVar("T")

Mode = Literal["low", "balanced", "high"]
MIB = 1024 * 1024
DEFAULT_GRACE_S = 0.5
HOST_ID_FILE = "host-id"


@dataclass(frozen=True, slots=True)
class Residency:
    """What a mode means for the resident-model cache."""

    reserve_mb: int
    resident: bool  # keep a model loaded after the call that needed it
    idle_unload: bool  # unload a resident model after gpu.idle_ttl_s without use
    preload: bool  # load the configured models at start
    offload: bool  # CPU-offload model parts where the pipeline supports it


MODES: dict[Mode, Residency] = {
    "low": Residency(
        reserve_mb=2048, resident=False, idle_unload=False, preload=False, offload=True
    ),
    "balanced": Residency(
        reserve_mb=1024, resident=True, idle_unload=True, preload=False, offload=False
    ),
    "high": Residency(
        reserve_mb=512, resident=True, idle_unload=False, preload=True, offload=False
    ),
}


class LeaseError(Exception):
    """A lease could not be granted, changed or kept; the message is meant for the user."""


class LeaseTooLargeError(LeaseError, ValueError):
    """The request can never fit on the device."""


class LeaseTimeoutError(LeaseError, TimeoutError):
    """The request waited its whole timeout without being granted."""


class LeaseResizeError(LeaseError):
    """A lease could not grow to its measured size (see the module's resize rule)."""


class LedgerUnavailableError(LeaseError):
    """The ledger's KV bucket cannot be read or written."""


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a lease: a worker in a process on a host. ``instance`` tells holders
    apart where host id and pid do not (containers sharing a host id, each with pid 7)."""

    host: str
    pid: int
    worker: str
    instance: str = ""  # a random id per holder ("" in entries of older versions)

    @classmethod
    def here(cls, host: str, worker: str) -> Holder:
        return cls(host=host, pid=os.getpid(), worker=worker, instance=uuid.uuid4().hex[:12])

    def __str__(self) -> str:
        return f"{self.host}/{self.pid}/{self.worker}"


@dataclass(frozen=True, slots=True)
class Device:
    """A GPU (``cuda:<n>``) or the CPU, with the memory leases may take on it."""

    id: str
    capacity_mb: int
    reserve_mb: int
    mode: Mode = "balanced"
    free_mb: int | None = None  # free when discovered (CUDA only), for display

    @property
    def usable_mb(self) -> int:
        return max(0, self.capacity_mb - self.reserve_mb)

    @property
    def token(self) -> str:
        """The device as a KV key token."""
        return self.id.replace(":", "_")


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lease, or (in the queue) a request waiting for one.

    ``expires`` is the wall-clock time of the last renewal plus the TTL; the heartbeat moves
    it forward in the ledger, not in this object.
    """

    id: str
    holder: Holder
    model: str
    mb: int
    expires: float
    since: float = 0.0  # wall-clock time it was granted (a lease) or queued (a request)

    def to_json(self) -> dict[str, Any]:
        h = self.holder
        return {
            "id": self.id,
            "holder": {"host": h.host, "pid": h.pid, "worker": h.worker, "instance": h.instance},
            "model": self.model,
            "mb": self.mb,
            "expires": self.expires,
            "since": self.since,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Lease:
        h = doc["holder"]
        return cls(
            id=str(doc["id"]),
            holder=Holder(
                host=str(h["host"]),
                pid=int(h["pid"]),
                worker=str(h["worker"]),
                instance=str(h.get("instance", "")),
            ),
            model=str(doc["model"]),
            mb=int(doc["mb"]),
            expires=float(doc["expires"]),
            since=float(doc.get("since", 0.0)),
        )

    def describe(self) -> str:
        return f"{self.model} {self.mb} MB ({self.holder})"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One revision of a device's ledger document (revision 0: never written)."""

    device: Device  # as stamped by the last writer
    leases: tuple[Lease, ...] = ()
    queue: tuple[Lease, ...] = ()
    revision: int = 0

    @property
    def usable_mb(self) -> int:
        return self.device.usable_mb

    @property
    def used_mb(self) -> int:
        return sum(lease.mb for lease in self.leases)

    @property
    def free_mb(self) -> int:
        return self.usable_mb - self.used_mb

    def lease(self, lease_id: str) -> Lease | None:
        return next((x for x in self.leases if x.id == lease_id), None)

    def live(self, now: float, grace: float) -> Snapshot:
        """The same document without lapsed leases and requests."""
        return replace(
            self,
            leases=tuple(x for x in self.leases if now <= x.expires + grace),
            queue=tuple(x for x in self.queue if now <= x.expires + grace),
        )

    def encode(self) -> bytes:
        d = self.device
        return orjson.dumps(
            {
                "device": d.id,
                "mode": d.mode,
                "capacity_mb": d.capacity_mb,
                "reserve_mb": d.reserve_mb,
                "leases": [x.to_json() for x in self.leases],
                "queue": [x.to_json() for x in self.queue],
            }
        )

    @classmethod
    def decode(cls, data: bytes, revision: int) -> Snapshot:
        doc = orjson.loads(data)
        device = Device(
            str(doc["device"]), int(doc["capacity_mb"]), int(doc["reserve_mb"]), doc["mode"]
        )
        return cls(
            device=device,
            leases=tuple(Lease.from_json(x) for x in doc["leases"]),
            queue=tuple(Lease.from_json(x) for x in doc["queue"]),
            revision=revision,
        )

    def describe_use(self) -> str:
        """Used and free memory and by whom, for error messages."""
        holders = ", ".join(x.describe() for x in self.leases) or "nobody"
        return (
            f"{self.used_mb} MB of {self.usable_mb} MB leasable in use by {holders}; "
            f"{self.free_mb} MB free; {len(self.queue)} request(s) queued"
        )


# --- host and devices -----------------------------------------------------------------------


def host_id(data_dir: Path, configured: str | None = None) -> str:
    """This host's stable id: ``configured`` (``gpu.host_id``), else ``<data_dir>/host-id``.

    The file is created on first use as ``<hostname>-<8 hex>``; it is written aside and
    hard-linked into place, so processes starting together all read the same id.
    """
    if configured:
        return check_id(configured, "gpu.host_id")
    path = data_dir / HOST_ID_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40].strip("-") or "host"
        aside = data_dir / f".{HOST_ID_FILE}.{uuid.uuid4().hex}"
        aside.write_text(f"{name}-{uuid.uuid4().hex[:8]}\n")
        try:
            os.link(aside, path)
        except FileExistsError:
            pass  # another process won; use its id
        finally:
            aside.unlink()
    return check_id(path.read_text().strip(), f"host id in {path}")


def discover_devices(settings: Settings) -> list[Device]:
    """Every CUDA device (total memory via ``torch.cuda.mem_get_info``), else the CPU.

    torch is imported here and only if installed, so light processes never pay for it.
    ``gpu.device`` pins one device; a pinned GPU that is not there is an error.
    """
    gpu = settings.gpu
    residency = MODES[gpu.mode]
    reserve = residency.reserve_mb if gpu.reserve_mb is None else gpu.reserve_mb
    devices: list[Device] = []
    if gpu.device != "cpu" and importlib.util.find_spec("torch") is not None:
        torch: Any = importlib.import_module("torch")
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(index)
                devices.append(
                    Device(f"cuda:{index}", total // MIB, reserve, gpu.mode, free_mb=free // MIB)
                )
    if gpu.device is not None and gpu.device != "cpu":
        pinned = [d for d in devices if d.id == gpu.device]
        if not pinned:
            found = ", ".join(d.id for d in devices) or "no CUDA device"
            raise LeaseError(f"gpu.device is {gpu.device!r}, but this host has {found}")
        devices = pinned
    if not devices:
        devices = [Device("cpu", gpu.cpu_capacity_mb, reserve, gpu.mode)]
    for device in devices:
        if device.usable_mb <= 0:
            raise LeaseError(
                f"{device.id} has {device.capacity_mb} MB and mode {gpu.mode!r} reserves "
                f"{reserve} MB: nothing is left to lease (set gpu.reserve_mb or the capacity)"
            )
    return devices


def ledger_key(host: str, device: Device) -> str:
    return f"{check_id(host, 'host id')}.{device.token}"


# --- the ledger -----------------------------------------------------------------------------

Change = Callable[[Snapshot, float], Snapshot | None]


class Ledger:
    """Leases on one device for one holder; renews what it holds while started.

    Use as ``async with Ledger(kv, device, holder, ttl_s=...) as ledger:``; leaving releases
    whatever is still held.
    """

    def __init__(
        self,
        kv: KeyValue,
        device: Device,
        holder: Holder,
        *,
        ttl_s: float = 10.0,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        if ttl_s < 1:
            raise ValueError(f"lease TTL must be at least 1 s, got {ttl_s}")
        self.kv = kv
        self.device = device
        self.holder = holder
        self.ttl_s = ttl_s
        self.grace_s = grace_s
        self.key = ledger_key(holder.host, device)
        self._held: dict[str, Lease] = {}
        self._waiting: set[str] = set()
        self._heartbeat: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Ledger:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._beat(), name=f"lease-heartbeat:{self.key}")

    async def close(self, release: bool = True) -> None:
        """Stop renewing; with ``release``, give back every lease still held (best effort)."""
        await cancel_and_wait(self._heartbeat)
        self._heartbeat = None
        if release and self._held:
            held = set(self._held)
            self._held.clear()
            try:
                await self._change(lambda state, now: _without(state, held))
            except LeaseError as exc:
                log.warning("could not release %d lease(s) on %s: %s", len(held), self.key, exc)

    @property
    def waiting(self) -> int:
        """Requests of this holder waiting for memory (a worker fetches no work meanwhile)."""
        return len(self._waiting)

    @property
    def held(self) -> list[Lease]:
        return list(self._held.values())

    def is_held(self, lease: Lease) -> bool:
        """False once the lease was released, or lapsed because it could not be renewed."""
        return lease.id in self._held

    async def snapshot(self) -> Snapshot:
        """The live part of the device's document now."""
        return (await self._read()).live(time.time(), self.grace_s)

    async def acquire(self, model: str, mb: int, timeout: float) -> Lease:
        """Wait up to ``timeout`` seconds for ``mb`` MB, first come first served.

        Raises:
            LeaseTooLargeError: ``mb`` exceeds the device's capacity minus reserve.
            LeaseTimeoutError: not granted in time; the request has left the queue.
            LedgerUnavailableError: the KV bucket cannot be read or written. A KV request
                that gets no answer fails after the JetStream timeout, which may extend past
                ``timeout`` once.
        """
        if mb <= 0:
            raise ValueError(f"a lease needs a positive size in MB, got {mb}")
        d = self.device
        if mb > d.usable_mb:
            raise LeaseTooLargeError(
                f"{model} needs {mb} MB, but {d.id} of host {self.holder.host} can lease at most "
                f"{d.usable_mb} MB (capacity {d.capacity_mb} MB - reserve {d.reserve_mb} MB "
                f"in mode {d.mode!r})"
            )
        self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        request = Lease(uuid.uuid4().hex, self.holder, model, mb, 0.0)
        self._waiting.add(request.id)
        watcher: KeyValue.KeyWatcher | None = None
        try:
            state = await self._change(lambda s, now: self._step(request, s, now))
            while (lease := state.lease(request.id)) is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise await self._timed_out(request, timeout)
                if watcher is None:
                    watcher = await self._guard(self.kv.watch(self.key))
                await self._wait_for_change(watcher, min(remaining, self._recheck_in(state)))
                state = await self._change(lambda s, now: self._step(request, s, now))
            self._held[lease.id] = lease
            return lease
        except BaseException as exc:
            if not isinstance(exc, LeaseTimeoutError):
                await self._abandon(request)
            raise
        finally:
            self._waiting.discard(request.id)
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.stop()  # type: ignore[no-untyped-call]

    async def release(self, lease: Lease) -> None:
        """Give the memory back; releasing a lease that already lapsed is not an error."""
        self._held.pop(lease.id, None)
        await self._change(lambda state, now: _without(state, {lease.id}))

    async def resize(self, lease: Lease, mb: int) -> Lease:
        """Record the measured footprint ``mb`` instead of the estimate (see resize rule)."""
        if mb <= 0:
            raise ValueError(f"a lease needs a positive size in MB, got {mb}")

        def change(state: Snapshot, now: float) -> Snapshot | None:
            current = state.lease(lease.id)
            if current is None:
                raise LeaseResizeError(
                    f"lease {lease.id} for {lease.model} on {self.device.id} is no longer held"
                )
            others = state.used_mb - current.mb
            if mb > current.mb and others + mb > self.device.usable_mb:
                raise LeaseResizeError(
                    f"{lease.model} measured {mb} MB but holds {current.mb} MB, and "
                    f"{self.device.id} has room for {self.device.usable_mb - others} MB: "
                    f"{state.describe_use()}; "
                    "unload it and acquire again with the measured size"
                )
            grown = replace(current, mb=mb, expires=now + self.ttl_s)
            return replace(
                state, leases=tuple(grown if x.id == lease.id else x for x in state.leases)
            )

        state = await self._change(change)
        resized = state.lease(lease.id)
        assert resized is not None
        self._held[lease.id] = resized
        return resized

    # --- decisions (pure: given the live document and the time, the next document) ----------

    def _step(self, request: Lease, state: Snapshot, now: float) -> Snapshot | None:
        """Join the queue, or take the lease if the request is first in line and fits."""
        if state.lease(request.id) is not None:
            return None
        fits = state.used_mb + request.mb <= self.device.usable_mb
        queued = [x.id for x in state.queue]
        granted = replace(request, expires=now + self.ttl_s, since=now)
        if request.id not in queued:  # first try, or the request lapsed: (re)join
            if not queued and fits:
                return replace(state, leases=(*state.leases, granted))
            return replace(state, queue=(*state.queue, granted))
        if queued[0] == request.id and fits:
            return replace(state, leases=(*state.leases, granted), queue=state.queue[1:])
        return None

    def _recheck_in(self, state: Snapshot) -> float:
        """Seconds until the next entry lapses (a lapse is not a write: nothing wakes us)."""
        due = [x.expires + self.grace_s for x in (*state.leases, *state.queue)]
        until = min(due, default=time.time() + self.ttl_s) - time.time()
        return min(max(until + 0.02, 0.02), self.ttl_s / 3)

    # --- plumbing ------------------------------------------------------------------------------

    async def _timed_out(self, request: Lease, timeout: float) -> LeaseTimeoutError:
        state = await self._change(lambda s, now: _without(s, {request.id}))
        d = self.device
        return LeaseTimeoutError(
            f"no room for {request.model} ({request.mb} MB) on {d.id} of host "
            f"{self.holder.host} within {timeout:g} s: {state.describe_use()}"
        )

    async def _abandon(self, request: Lease) -> None:
        """Leave the queue (and drop a lease granted meanwhile) after a failure or cancel."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._change(lambda s, now: _without(s, {request.id})), 2.0)

    async def _wait_for_change(self, watcher: KeyValue.KeyWatcher, timeout: float) -> None:
        with contextlib.suppress(nats.errors.TimeoutError):
            await watcher.updates(timeout)  # type: ignore[no-untyped-call]
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # nats-py waits with asyncio.wait_for, which on Python 3.11 can swallow a cancel
            # that lands together with an update: honour it here.
            raise asyncio.CancelledError

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            if not self._held and not self._waiting:
                continue
            try:
                await self._renew()
            except LeaseError as exc:
                log.warning("could not renew leases on %s: %s", self.key, exc)

    async def _renew(self) -> None:
        def change(state: Snapshot, now: float) -> Snapshot | None:
            mine = set(self._held) | set(self._waiting)
            if not any(x.id in mine for x in (*state.leases, *state.queue)):
                return None
            return replace(
                state,
                leases=_renewed(state.leases, mine, now + self.ttl_s),
                queue=_renewed(state.queue, mine, now + self.ttl_s),
            )

        held = dict(self._held)  # granted before the read below, so in the document unless lost
        state = await self._change(change)
        for lease_id, lease in held.items():
            if state.lease(lease_id) is None and self._held.pop(lease_id, None) is not None:
                log.error(
                    "lease for %s (%d MB) on %s lapsed before it was renewed; unload it",
                    lease.model,
                    lease.mb,
                    self.key,
                )

    def _empty(self) -> Snapshot:
        return Snapshot(self.device)

    async def _read(self) -> Snapshot:
        try:
            entry = await self.kv.get(self.key)
        except nats.js.errors.KeyNotFoundError:
            return self._empty()
        except nats.errors.Error as exc:
            raise self._unavailable(exc) from exc
        if entry.value is None or entry.revision is None:
            return self._empty()
        return Snapshot.decode(entry.value, entry.revision)

    async def _change(self, change: Change) -> Snapshot:
        """Apply ``change`` to the live document with compare-and-set (see bus/infra/kv.py).

        Returns the document as written (or as read, when ``change`` wanted no write).
        """
        decided: list[Snapshot] = []

        def apply(data: bytes | None) -> bytes | None:
            decided.clear()
            current = self._empty() if not data else Snapshot.decode(data, 0)
            now = time.time()
            live = current.live(now, self.grace_s)
            wanted = change(live, now)
            if wanted is None:
                decided.append(live)
                return None
            wanted = replace(wanted, device=self.device)
            decided.append(wanted)
            return wanted.encode()

        try:
            result = await compare_and_set(self.kv, self.key, apply)
        except (nats.errors.Error, CasConflictError) as exc:
            raise self._unavailable(exc) from exc
        return replace(decided[0], revision=result.revision)

    async def _guard(self, op: Awaitable[T]) -> T:
        try:
            return await op
        except nats.errors.Error as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: Exception) -> LedgerUnavailableError:
        return LedgerUnavailableError(
            f"VRAM ledger for {self.device.id} (key {self.key!r}) is unavailable: "
            f"{type(exc).__name__}: {exc}"
        )


def _without(state: Snapshot, ids: set[str]) -> Snapshot | None:
    if not any(x.id in ids for x in (*state.leases, *state.queue)):
        return None
    return replace(
        state,
        leases=tuple(x for x in state.leases if x.id not in ids),
        queue=tuple(x for x in state.queue if x.id not in ids),
    )


def _renewed(entries: Iterable[Lease], ids: set[str], expires: float) -> tuple[Lease, ...]:
    return tuple(replace(x, expires=expires) if x.id in ids else x for x in entries)


# --- reading every device (status, CLI, metrics) --------------------------------------------


def describe_device(key: str, state: Snapshot, now: float) -> dict[str, Any]:
    """One device's live document as JSON for display (``state`` already without lapses)."""
    d = state.device

    def entry(x: Lease) -> dict[str, Any]:
        shown = x.to_json()
        del shown["expires"], shown["since"]
        age = round(now - x.since, 3) if x.since else None
        return {**shown, "age_s": age, "expires_in_s": round(x.expires - now, 3)}

    return {
        "key": key,
        "host": key.split(".", 1)[0],
        "device": d.id,
        "mode": d.mode,
        "capacity_mb": d.capacity_mb,
        "reserve_mb": d.reserve_mb,
        "used_mb": state.used_mb,
        "free_mb": state.free_mb,
        "leases": [entry(x) for x in state.leases],
        "queue": [entry(x) for x in state.queue],
    }


async def read_devices(
    js: JetStreamContext, bucket: str, grace_s: float = DEFAULT_GRACE_S
) -> list[dict[str, Any]]:
    """Every device in the ledger bucket, live entries only (see the lapse rule), by key.

    A bucket that does not exist yet or holds no device gives ``[]``.

    Raises:
        LedgerUnavailableError: the bucket cannot be read.
    """
    devices = []
    try:
        kv = await js.key_value(bucket)
        keys = await stored_keys(js, kv)
        for key in keys:
            try:
                entry = await kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                continue  # deleted since it was listed
            if entry.value is None or entry.revision is None:
                continue
            now = time.time()
            state = Snapshot.decode(entry.value, entry.revision).live(now, grace_s)
            devices.append(describe_device(key, state, now))
    except nats.js.errors.BucketNotFoundError:
        return []
    except nats.errors.Error as exc:
        raise LedgerUnavailableError(
            f"VRAM ledger bucket {bucket!r} is unavailable: {type(exc).__name__}: {exc}"
        ) from exc
    return devices
