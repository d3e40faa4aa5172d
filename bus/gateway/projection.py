"""Whether notify has projected an event into the read model yet, for the live stream.

A page that hears ``captioned`` over ``/api/events`` fetches the image's document; if the
event reached the page before notify had written it, the page would show the old one. So
the hub hands on an event notify listens to only once notify's durable consumer has
acknowledged it (notify acknowledges after its write commits): its ack floor, read with one
CONSUMER.INFO request per poll while an event waits (10 ms, backing off to 100 ms).

Waiting never stalls the stream for long: an event is let go after ``wait_s`` (notify may be
down, or retrying a write), and while notify makes no progress the gate stops waiting
altogether, until a read shows its floor past the event that waited in vain. With no notify
running (no consumer, or nobody pulling from it and its floor still), nothing waits. Step
progress is never held, so a job's first step report may come before its ``requested``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from bus.infra.tasks import cancel_and_wait

log = logging.getLogger("darkroom.events")

POLL_S = (0.01, 0.02, 0.05, 0.1)  # between reads of the floor while an event waits (then 0.1)
CHECK_S = 1.0  # how often the gate reads notify's consumer in the background
READ_TIMEOUT_S = 2.0
NOTIFY = "notify"


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


class ProjectionGate:
    """Waits, per event, until notify's consumer has acknowledged it (see the module).

    A background read every :data:`CHECK_S` says whether notify runs (someone is pulling
    from its consumer, or its floor moved since the last such read: a worker that died
    with a message in hand leaves it un-acknowledged, but pulls no more) and what it
    listens to; an event never waits for a read unless it is one notify will project.
    """

    def __init__(self, js: JetStreamContext, stream: str, durable: str, wait_s: float) -> None:
        self._js = js
        self._stream = stream
        self._durable = durable
        self.wait_s = wait_s
        self._filters: list[str] | None = None  # None: no notify consumer (as last read)
        self._running = False  # as the last background read found
        self._floor = 0  # every event notify listens to up to here is projected
        self._floor_at_check = 0  # the floor at the last background read
        self._stalled_at: int | None = None  # the event that waited in vain, while stalled
        self._checker: asyncio.Task[None] | None = None
        self.waiting_for: int | None = None  # the event waiting now (tests watch it)

    @property
    def stalled(self) -> bool:
        """An event waited in vain, and notify has not got past it since."""
        return self._stalled_at is not None

    async def start(self) -> None:
        if self.wait_s <= 0:
            return
        await self._check()
        self._checker = asyncio.create_task(self._keep_checking(), name="projection-gate")

    async def stop(self) -> None:
        await cancel_and_wait(self._checker)
        self._checker = None

    async def wait(self, seq: int, subject: str) -> None:
        """Return once event ``seq`` (on ``subject``) is projected, or needs no waiting."""
        if not self._running or self._filters is None or self._stalled_at is not None:
            return
        if seq <= self._floor or not any(subject_matches(f, subject) for f in self._filters):
            return
        deadline = time.monotonic() + self.wait_s
        self.waiting_for = seq
        try:
            for poll in itertools.count():
                left = deadline - time.monotonic()
                if left <= 0:
                    self._stalled_at = seq
                    log.warning(
                        "notify has not projected event %d after %.1f s: live events go out "
                        "without waiting for it until it catches up",
                        seq,
                        self.wait_s,
                    )
                    return
                await self._read(min(READ_TIMEOUT_S, max(0.05, left)))
                if self._filters is None or seq <= self._floor:
                    return
                await asyncio.sleep(POLL_S[min(poll, len(POLL_S) - 1)])
        finally:
            self.waiting_for = None

    async def _keep_checking(self) -> None:
        while True:
            await asyncio.sleep(CHECK_S)
            await self._check()

    async def _check(self) -> None:
        info = await self._read(READ_TIMEOUT_S)
        if info is None:
            return
        self._running = bool(info.num_waiting) or self._floor > self._floor_at_check
        self._floor_at_check = self._floor

    async def _read(self, timeout: float) -> ConsumerInfo | None:
        """Notify's consumer now (None: not there, or no answer), its floor and filters
        taken in."""
        try:
            info: ConsumerInfo = await self._js.consumer_info(
                self._stream, self._durable, timeout=timeout
            )
        except nats.js.errors.NotFoundError:
            self._filters = None
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            log.debug("could not read notify's consumer: %s", exc)
            return None  # as it was; the deadline still bounds a wait
        self._filters = _filters(info)
        self._floor = max(self._floor, _floor(info))
        if self._stalled_at is not None and self._floor >= self._stalled_at:
            log.info("notify caught up: live events wait for its projection again")
            self._stalled_at = None
        return info


def _filters(info: ConsumerInfo) -> list[str]:
    config = info.config
    return list(config.filter_subjects or []) or [config.filter_subject or ">"]


def _floor(info: ConsumerInfo) -> int:
    """The newest stream sequence up to which notify has acknowledged every event."""
    floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
    if not info.num_pending and not info.num_ack_pending and info.delivered is not None:
        floor = max(floor, info.delivered.stream_seq)  # nothing outstanding at all
    return floor
