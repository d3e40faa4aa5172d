"""Reading what landed on a subject, for assertions."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from bus.context import Context
from bus.envelope import Event


async def read_subject(
    js: JetStreamContext, subject: str, *, at_least: int = 0, timeout: float = 10.0
) -> list[Any]:
    """All stored messages on ``subject`` (waits for ``at_least`` of them, then a short lull)."""
    sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    found: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            wait = remaining if len(found) < at_least else 0.3
            if wait <= 0:
                break
            try:
                found.append(await sub.next_msg(timeout=wait))
            except TimeoutError:
                if len(found) >= at_least:
                    break
                if time.monotonic() >= deadline:
                    break
    finally:
        await sub.unsubscribe()
    return found


async def events(
    ctx: Context, topic: str, *, at_least: int = 0, timeout: float = 10.0
) -> list[Event]:
    from bus.envelope import decode

    msgs = await read_subject(ctx.js, ctx.names.subject(topic), at_least=at_least, timeout=timeout)
    return [decode(m.data) for m in msgs]


async def dead_letters(
    ctx: Context, stage: str, *, at_least: int = 0, timeout: float = 10.0
) -> list[dict[str, Any]]:
    msgs = await read_subject(
        ctx.js, ctx.names.dead_letter(stage), at_least=at_least, timeout=timeout
    )
    return [orjson.loads(m.data) for m in msgs]


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Wait until ``check()`` (plain or async) is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
