"""What the function benchmarks share: a backlog published at full speed, warm-up calls of
a batch handler, and an observer that times a run's results as they land."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import orjson
from nats.aio.msg import Msg

from bus import Call, Context, Event, Spec


async def publish(ctx: Context, topic: str, events: Sequence[Event]) -> None:
    """Publish ``events`` on ``topic``'s subject without waiting between them, then wait
    for every acknowledgement (each with its event id for dedupe)."""
    subject = ctx.names.subject(topic)
    acks = [
        await ctx.js.publish_async(subject, e.encode(), headers={"Nats-Msg-Id": e.id})
        for e in events
    ]
    await asyncio.gather(*acks)


def calls(events: Sequence[Event], spec: Spec, state: Any) -> list[Call]:
    """One first-attempt Call per event, as the runner makes them, for calling a batch
    handler directly (a warm-up)."""
    return [
        Call(
            e,
            spec.name,
            attempt=1,
            max_attempts=spec.max_deliver,
            deadline=time.monotonic() + spec.timeout,
            state=state,
        )
        for e in events
    ]


def raise_failures(results: Sequence[Any]) -> None:
    for result in results:
        if isinstance(result, BaseException):
            raise RuntimeError(f"the warm-up failed: {result}") from result


class Observer:
    """Times a run's results as they land: each result event names its work by ``field``
    (``image_id``, ``job_id``); a dead letter of that work fails the run."""

    def __init__(self, ids: set[str], field: str) -> None:
        self.ids = ids
        self.field = field
        self.done: set[str] = set()
        self.first = 0.0
        self.last = 0.0
        self.failure: str | None = None
        self.complete = asyncio.Event()

    async def on_result(self, msg: Msg) -> None:
        work = orjson.loads(msg.data).get(self.field)
        if work in self.ids and work not in self.done:
            now = time.perf_counter()
            self.first = self.first or now
            self.last = now
            self.done.add(work)
            if self.done == self.ids:
                self.complete.set()

    async def on_dead_letter(self, msg: Msg) -> None:
        letter = orjson.loads(msg.data)
        if (letter.get("event") or {}).get(self.field) in self.ids:
            self.failure = f"{self.field} was dead-lettered: {letter.get('reason')}"
            self.complete.set()
