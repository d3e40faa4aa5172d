"""A per-process budget for decoded pixels, so concurrent decodes cannot exhaust memory.

A decode first asks for the bytes it will hold at its peak (estimated from the header) and
gives them back when done. Requests are served in arrival order: a large one waiting is
not overtaken by small ones, so it cannot starve. A request for more than the whole budget
is granted all of it, once nothing else holds any: it runs alone instead of never.

Memory belongs to the process: its Context holds one budget (``ingest.decode_budget_mb``),
shared by every function in it; it works from any event loop and any thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Waiter:
    grant: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None] = field(repr=False)
    granted: bool = False


class DecodeBudget:
    """A fair, weighted semaphore counted in bytes.

    ``peak`` (the most ever held at once) and ``waited`` (how many requests had to queue)
    say what it did.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a decode budget needs at least 1 byte, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self.peak = 0
        self.waited = 0
        self._queue: deque[_Waiter] = deque()
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        """Requests queued now."""
        return len(self._queue)

    @asynccontextmanager
    async def hold(self, cost: int) -> AsyncIterator[None]:
        """Hold ``cost`` bytes (at most the whole budget) for the body of the block."""
        grant = max(0, min(cost, self.capacity))
        await self._acquire(grant)
        try:
            yield
        finally:
            self._release(grant)

    async def _acquire(self, grant: int) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._queue and self.in_use + grant <= self.capacity:
                self._take(grant)
                return
            waiter = _Waiter(grant, loop, loop.create_future())
            self._queue.append(waiter)
            self.waited += 1
        try:
            await waiter.future
        except BaseException:  # cancelled while queued, or just as its turn came
            with self._lock:
                if waiter.granted:
                    self._give_back(grant)
                else:
                    self._queue.remove(waiter)
                    self._wake()  # it may have been the head holding others back
            raise

    def _release(self, grant: int) -> None:
        with self._lock:
            self._give_back(grant)

    def _take(self, grant: int) -> None:
        self.in_use += grant
        self.peak = max(self.peak, self.in_use)

    def _give_back(self, grant: int) -> None:
        self.in_use -= grant
        self._wake()

    def _wake(self) -> None:
        """Grant queued requests in order while the head fits (called with the lock)."""
        while self._queue and self.in_use + self._queue[0].grant <= self.capacity:
            waiter = self._queue.popleft()
            self._take(waiter.grant)
            waiter.granted = True
            try:
                waiter.loop.call_soon_threadsafe(_resolve, waiter.future)
            except RuntimeError:  # its loop is closed: nobody waits there any more
                self.in_use -= waiter.grant


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # cancelled meanwhile: its task gives the grant back
        future.set_result(None)
