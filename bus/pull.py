"""A continuous pull consumer that asks JetStream for exactly the work it can start.

``fetch()`` in nats-py waits out its whole timeout for a batch to fill, which adds the
timeout to every hop when traffic is light. Instead this keeps pull requests outstanding
for the capacity that is free (``in_flight + requested <= capacity``) and hands each
message over the moment it arrives. Because a worker never asks for more than it can
start, idle capacity elsewhere gets the rest: N workers share a backlog fairly, and a
worker that pauses (draining, or waiting for VRAM) simply stops asking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger("darkroom.pull")

STATUS = "Status"
PENDING_MESSAGES = "Nats-Pending-Messages"


class PullConsumer:
    """Pull-request bookkeeping for one durable consumer (see module docstring)."""

    def __init__(
        self,
        nc: NATS,
        stream: str,
        durable: str,
        capacity: int,
        on_message: Callable[[Msg], None],
        expires: float = 30.0,
        heartbeat: float = 5.0,
        api_prefix: str = "$JS.API",
    ) -> None:
        self._nc = nc
        self._next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.capacity = capacity
        self._on_message = on_message
        self._expires = expires
        self._heartbeat = heartbeat
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.in_flight = 0  # delivered, not yet released
        self.requested = 0  # asked for, not yet delivered
        self.paused = False
        self._last_seen = time.monotonic()
        self._pull_scheduled = False
        self._reconnects = self._reconnect_count()

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._receive)
        self._watchdog = asyncio.create_task(
            self._watch(), name=f"pull-watchdog:{self._next_subject}"
        )
        self._maybe_pull()

    async def stop(self) -> None:
        self.paused = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    def pause(self) -> None:
        """Stop asking for work; messages still arriving for old requests are refused."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._maybe_pull()

    def release(self, count: int = 1) -> None:
        """``count`` messages are finished (acked, nakked or termed)."""
        self.in_flight = max(0, self.in_flight - count)
        self._maybe_pull()

    # --- pulling ---------------------------------------------------------------------------
    @property
    def free(self) -> int:
        return self.capacity - self.in_flight - self.requested

    def _maybe_pull(self) -> None:
        # Top up once half the capacity is free, so a request is always outstanding
        # without sending one request per message.
        if self._pull_scheduled or self.paused or self._sub is None:
            return
        if self.free >= max(1, self.capacity // 2) or (self.requested == 0 and self.free > 0):
            self._pull_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_pull)

    def _send_pull(self) -> None:
        self._pull_scheduled = False
        if self.paused or self._sub is None or self.free <= 0:
            return
        batch = self.free
        self.requested += batch
        request = orjson.dumps(
            {
                "batch": batch,
                "expires": int(self._expires * 1e9),
                "idle_heartbeat": int(self._heartbeat * 1e9),
            }
        )
        task = asyncio.ensure_future(
            self._nc.publish(self._next_subject, request, reply=self._inbox)
        )
        task.add_done_callback(self._pull_sent)

    def _pull_sent(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("pull request failed: %s", task.exception())
            self.requested = 0  # the watchdog tries again

    # --- receiving -------------------------------------------------------------------------
    async def _receive(self, msg: Msg) -> None:
        self._last_seen = time.monotonic()
        status = msg.headers.get(STATUS) if msg.headers else None
        if status is None:
            self.requested = max(0, self.requested - 1)
            if self.paused:
                # Left over from a request made before pausing: give it straight back.
                await msg.nak()
                return
            self.in_flight += 1
            self._on_message(msg)
            return
        if status == "100":  # idle heartbeat: the request is alive
            return
        # 404/408: the request ended; 409: it was cut short (max waiting, leadership...).
        # The server says how many of its messages were never delivered.
        assert msg.headers is not None
        unfilled = msg.headers.get(PENDING_MESSAGES)
        if unfilled is not None and unfilled.isdigit():
            self.requested = max(0, self.requested - int(unfilled))
        elif status in ("404", "408"):
            self.requested = 0
        if status == "409":
            log.debug("pull request ended early: %s", msg.headers.get("Description", ""))
        self._maybe_pull()

    def _reconnect_count(self) -> int:
        return int(self._nc.stats.get("reconnects", 0))

    async def _watch(self) -> None:
        # Requests vanish when the connection or the server restarts. Renew them at once
        # after a reconnect, and whenever nothing, not even a heartbeat, came for two
        # heartbeat intervals.
        while True:
            await asyncio.sleep(1.0)
            reconnects = self._reconnect_count()
            silent = time.monotonic() - self._last_seen
            if reconnects != self._reconnects or (
                self.requested > 0 and silent > 2 * self._heartbeat
            ):
                log.info(
                    "renewing pull requests (%s)",
                    "reconnected"
                    if reconnects != self._reconnects
                    else f"silent for {silent:.0f} s",
                )
                self._reconnects = reconnects
                self.requested = 0
                self._last_seen = time.monotonic()
            self._maybe_pull()
