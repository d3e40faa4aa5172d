"""A local, always-current copy of a NATS KV bucket, fed by a watch.

The watch is rebuilt from scratch whenever the connection reconnects: a restarted server
may have dropped the watch's ephemeral consumer, and a full re-read is the only way to be
sure nothing was missed while disconnected. ``on_change(key, value)`` hears of every entry
the watch delivers, the re-read included (``value`` None: deleted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from bus.infra.nats_conn import reconnect_count
from bus.infra.tasks import cancel_and_wait

log = logging.getLogger("darkroom.kvmirror")
T = TypeVar("T")
CHECK_INTERVAL_S = 1.0


class KvMirror(Generic[T]):
    def __init__(
        self,
        nc: NATS,
        kv: KeyValue,
        decode: Callable[[bytes], T],
        name: str,
        on_change: Callable[[str, T | None], None] | None = None,
    ) -> None:
        self._nc = nc
        self._kv = kv
        self._decode = decode
        self.name = name
        self.items: dict[str, T] = {}
        self._on_change = on_change
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 30.0) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kv-mirror:{self.name}")
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self) -> None:
        # The follower too: _run's own wait for it is cut short by the cancellations of _run.
        await cancel_and_wait(self._task, self._follower)
        self._task = self._follower = None

    async def _run(self) -> None:
        while True:
            seen = reconnect_count(self._nc)
            follower = self._follower = asyncio.create_task(self._follow())
            try:
                while not follower.done() and reconnect_count(self._nc) == seen:
                    await asyncio.wait({follower}, timeout=CHECK_INTERVAL_S)
            finally:
                if not follower.done():  # a failed watch is said below, once
                    await cancel_and_wait(follower)
            if follower.done() and not follower.cancelled() and follower.exception() is not None:
                log.warning("%s watch failed (%s); restarting", self.name, follower.exception())
            await asyncio.sleep(0.2)

    async def _follow(self) -> None:
        watcher = await self._kv.watchall()
        fresh: dict[str, T] = {}
        target = fresh
        try:
            async for entry in watcher:
                if entry is None:  # initial values delivered: swap in the fresh copy
                    self.items = target = fresh
                    self._ready.set()
                elif entry.operation in ("DEL", "PURGE") or not entry.value:
                    target.pop(entry.key, None)
                    self._changed(entry.key, None)
                else:
                    try:
                        value = self._decode(entry.value)
                    except Exception:
                        log.warning("%s: ignoring unreadable entry %s", self.name, entry.key)
                        continue
                    target[entry.key] = value
                    self._changed(entry.key, value)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _changed(self, key: str, value: T | None) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(key, value)
        except Exception:
            log.exception("%s: change listener failed on %s", self.name, key)
