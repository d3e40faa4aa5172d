"""A continuous pull consumer that asks JetStream for exactly the work it can start.

``fetch()`` in nats-py waits out its whole timeout for a batch to fill, which adds the
timeout to every hop when traffic is light. Instead this keeps pull requests outstanding
for the capacity that is free (``in_flight + requested <= capacity``) and hands each
message over the moment it arrives. Because a worker never asks for more than it can
start, idle capacity elsewhere gets the rest: N workers share a backlog fairly, and a
worker that pauses (waiting for VRAM, say) simply stops asking.

The bookkeeping is per request. Each request has its own reply subject, which status
messages carry: a status (request expired, cut short, consumer gone) ends that request
outright, whatever it says about the rest. Messages arrive under their own subjects, and
the server serves a consumer's waiting requests oldest first, so each message fills a slot
of the oldest open request.

A consumer with a JetStream priority group (the ``prioritized`` policy, NATS 2.12+) names it
in every request, with a priority (0-9, asked again for each request): the server serves
the waiting requests of the lowest number first. When the priority changes
(:meth:`PullConsumer.reconsider`), the open requests are dropped (a new inbox: the server
forgets requests nobody listens to) and asked again at the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.infra.nats_conn import reconnect_count
from bus.infra.tasks import cancel_and_wait

log = logging.getLogger("darkroom.pull")

STATUS = "Status"
REFUSED_BACKOFF_S = 1.0  # after a refusal (consumer gone, too many waiting), ask again later


@dataclass(slots=True)
class _Request:
    remaining: int
    last_seen: float


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
        group: str | None = None,
        priority: Callable[[], int] | None = None,
        budget: Callable[[], int] | None = None,
    ) -> None:
        """``group``: the consumer's priority group, and ``priority``: the priority of the
        next request; ``budget``: room left in a limit shared with other consumers, which
        caps what a request asks for."""
        self._nc = nc
        self._next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.capacity = capacity
        self._on_message = on_message
        self._expires = expires
        self._heartbeat = heartbeat
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._requests: dict[str, _Request] = {}
        self._counter = 0
        self.in_flight = 0  # delivered, not yet released
        self.paused = False
        self._pull_scheduled = False
        self._hold_until = 0.0  # no pulls before this (monotonic), after a refusal
        self._reconnects = reconnect_count(nc)
        self._group = group
        self._priority = priority
        self._budget = budget
        self._asked_at: int | None = None  # the priority of the open requests
        self._renewal: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self.paused = False  # a consumer stopped before (a failed start) starts afresh
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox + ".*", cb=self._receive)
        self._watchdog = asyncio.create_task(self._watch(), name=f"pull:{self._next_subject}")
        self._maybe_pull()

    async def stop(self) -> None:
        """Stop receiving. The server drops requests whose reply subject lost interest,
        so nothing more is delivered here; anything already on the wire is redelivered
        elsewhere after ack_wait."""
        self.paused = True
        await cancel_and_wait(self._watchdog, self._renewal)  # a renewal must not subscribe anew
        self._watchdog = self._renewal = None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        self._requests.clear()

    def pause(self) -> None:
        """Stop asking for work (backpressure). Requests already made are still served:
        their capacity was reserved."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._maybe_pull()

    def release(self, count: int = 1) -> None:
        """``count`` messages are finished (acked, nakked or termed)."""
        self.in_flight = max(0, self.in_flight - count)
        self._maybe_pull()

    def wake(self) -> None:
        """Ask for work if there is room now (the shared budget grew)."""
        self._maybe_pull()

    def reconsider(self) -> None:
        """The priority may have changed: if the open requests were made at another, drop
        them and ask again at the new one."""
        if self._priority is None or self._sub is None or self._renewal is not None:
            return
        if not self._requests or self._priority() == self._asked_at:
            return
        self._renewal = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        try:
            old, inbox = self._sub, self._nc.new_inbox()
            new = await self._nc.subscribe(inbox + ".*", cb=self._receive)
            self._inbox, self._sub = inbox, new
        except nats.errors.Error as exc:  # closing, or gone: the watchdog asks again
            log.debug("could not renew the pulls on %s: %s", self._next_subject, exc)
            return
        finally:
            self._renewal = None
        self._requests.clear()
        if old is not None:
            # A message already on its way to the old inbox is lost here and comes back
            # after ack_wait; the server serves nothing more to requests nobody listens to.
            with contextlib.suppress(Exception):
                await old.unsubscribe()
        self._maybe_pull()

    # --- pulling ---------------------------------------------------------------------------
    @property
    def requested(self) -> int:
        return sum(r.remaining for r in self._requests.values())

    @property
    def free(self) -> int:
        free = self.capacity - self.in_flight - self.requested
        return free if self._budget is None else min(free, self._budget())

    def _maybe_pull(self) -> None:
        # Top up once half the capacity is free, so a request is always outstanding
        # without sending one request per message.
        if self._pull_scheduled or self.paused or self._sub is None:
            return
        if time.monotonic() < self._hold_until:
            return  # the watchdog asks again once the hold is over
        free = self.free
        if free >= max(1, self.capacity // 2) or (not self._requests and free > 0):
            self._pull_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_pull)

    def _send_pull(self) -> None:
        self._pull_scheduled = False
        batch = self.free
        if self.paused or self._sub is None or batch <= 0:
            return
        self._counter += 1
        token = str(self._counter)
        self._requests[token] = _Request(batch, time.monotonic())
        fields: dict[str, object] = {
            "batch": batch,
            "expires": int(self._expires * 1e9),
            "idle_heartbeat": int(self._heartbeat * 1e9),
        }
        if self._group is not None:
            fields["group"] = self._group
            if self._priority is not None:
                self._asked_at = fields["priority"] = self._priority()
        request = orjson.dumps(fields)
        reply = f"{self._inbox}.{token}"
        task = asyncio.ensure_future(self._nc.publish(self._next_subject, request, reply=reply))
        task.add_done_callback(lambda done: self._pull_sent(done, token))

    def _pull_sent(self, task: asyncio.Future[None], token: str) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("pull request failed: %s", task.exception())
            self._requests.pop(token, None)  # the watchdog asks again

    # --- receiving -------------------------------------------------------------------------
    async def _receive(self, msg: Msg) -> None:
        status = msg.headers.get(STATUS) if msg.headers else None
        if status is None:
            for token, oldest in self._requests.items():
                oldest.remaining -= 1
                oldest.last_seen = time.monotonic()
                if oldest.remaining <= 0:
                    del self._requests[token]
                break
            self.in_flight += 1
            self._on_message(msg)
            return
        token = msg.subject.rsplit(".", 1)[-1]
        request = self._requests.get(token)
        if status == "100":  # idle heartbeat: the request is alive
            if request is not None:
                request.last_seen = time.monotonic()
            return
        # 408: the request expired. 404/409: it was refused or cut short (consumer deleted,
        # too many waiting, leadership change...). Either way it delivers nothing more;
        # after a refusal, wait a moment instead of asking again in a tight loop.
        if status != "408":
            description = msg.headers.get("Description", "") if msg.headers else ""
            log.debug("pull request ended early: %s %s", status, description)
            self._hold_until = time.monotonic() + REFUSED_BACKOFF_S
        self._requests.pop(token, None)
        self._maybe_pull()

    async def _watch(self) -> None:
        # Requests vanish when the connection or the server restarts. Forget them all after
        # a reconnect, and any one that has been silent (not even a heartbeat) for two
        # heartbeat intervals; then ask again.
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            reconnects = reconnect_count(self._nc)
            if reconnects != self._reconnects:
                log.info("reconnected: renewing pull requests")
                self._reconnects = reconnects
                self._requests.clear()
            for token, request in list(self._requests.items()):
                if now - request.last_seen > 2 * self._heartbeat:
                    log.info("pull request %s went silent; renewing it", token)
                    del self._requests[token]
            self._maybe_pull()
