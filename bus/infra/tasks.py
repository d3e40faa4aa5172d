"""Stopping background tasks, and saying where one that will not stop is waiting.

``task.cancel()`` then ``with suppress(CancelledError): await task`` has a trap: should
the caller itself be cancelled during that await, its own cancellation is the one
suppressed, and a stop that was meant to end goes on (a loop around it never ends).
:func:`cancel_and_wait` waits with :func:`asyncio.wait` instead, which never raises what
the tasks raised and always raises the caller's own cancellation.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(
    *tasks: asyncio.Future[Any] | None, timeout: float | None = None
) -> set[asyncio.Future[Any]]:
    """Cancel ``tasks`` (None entries are skipped) and wait until every one has ended, or
    ``timeout`` has passed; return those still running then (see :func:`where_waiting`).

    What they end with (their cancellation, or an error on the way out) is theirs: it is
    retrieved, so asyncio never reports it as unhandled, and not raised here.
    """
    running = {task for task in tasks if task is not None}
    for task in running:
        task.cancel()
    if not running:
        return set()
    done, still = await asyncio.wait(running, timeout=timeout)
    for task in done:
        if not task.cancelled():
            task.exception()
    return still


def where_waiting(waiting: object) -> list[str]:
    """Where a suspended task (or coroutine, or async generator) waits, outermost first:
    each frame of its chain of awaits (``Task.get_stack`` gives a suspended task's
    outermost frame only)."""
    lines: list[str] = []
    awaitable: Any = waiting.get_coro() if isinstance(waiting, asyncio.Task) else waiting
    while awaitable is not None:
        for frame_attr, next_attr in (
            ("cr_frame", "cr_await"),
            ("ag_frame", "ag_await"),
            ("gi_frame", "gi_yieldfrom"),
        ):
            if hasattr(awaitable, frame_attr):
                frame = getattr(awaitable, frame_attr)
                if frame is None:  # finished
                    return lines
                code = frame.f_code
                lines.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_name}")
                awaitable = getattr(awaitable, next_attr)
                break
        else:  # a future, or an awaitable object that is not a coroutine
            lines.append(repr(awaitable)[:300])
            return lines
    return lines
