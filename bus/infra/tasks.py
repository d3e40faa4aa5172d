"""Stopping background tasks, and saying where one that will not stop is waiting.

Two traps make a plain ``task.cancel(); await task`` hang a shutdown:

- ``with suppress(CancelledError): await task`` suppresses the *caller's* cancellation
  too, should the caller be cancelled during that await, and a stop meant to end goes on.
- Python 3.11's ``asyncio.wait_for`` (under every nats-py request, flush and KV read)
  returns the result instead of raising when a cancellation meets a reply landing: the
  cancellation is lost, and a background loop goes round again as if never cancelled.

:func:`cancel_and_wait` waits with :func:`asyncio.wait`, which raises the caller's own
cancellation and never what the tasks raised, and cancels again every
:data:`RECANCEL_S` until the tasks have ended.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import types
from typing import Any

log = logging.getLogger("darkroom.tasks")
RECANCEL_S = 0.5  # how often a task that has not ended is cancelled again
SAY_STUCK_S = 10.0  # a wait without a timeout says where each task waits after this long
MAX_CHAIN = 64  # frames where_waiting follows at most


async def cancel_and_wait(
    *tasks: asyncio.Future[Any] | None,
    timeout: float | None = None,
    recancel: bool = True,
) -> set[asyncio.Future[Any]]:
    """Cancel ``tasks`` (None entries are skipped) and wait until every one has ended, or
    ``timeout`` has passed; return those still running then (see :func:`where_waiting`).

    With ``recancel`` (for loops), a task still running is cancelled again every
    :data:`RECANCEL_S`; without it (for work that cleans up after its cancellation, such
    as a handler waiting for its device), once only: with ``recancel``, a clean-up that
    awaits longer than that is cut short.

    Without a timeout, tasks still running after :data:`SAY_STUCK_S` are logged, once,
    with where they wait.

    A task that ends with an error, rather than its cancellation, is logged; nothing the
    tasks raise is raised here.
    """
    running = {task for task in tasks if task is not None and not task.done()}
    _log_errors(task for task in tasks if task is not None and task.done())
    started = time.monotonic()
    say_at = None if timeout is not None else started + SAY_STUCK_S
    for task in running:
        task.cancel()
    while running:
        now = time.monotonic()
        if timeout is not None and now - started >= timeout:
            break
        if say_at is not None and now >= say_at:
            say_at = None
            say_still_running(running, SAY_STUCK_S, logging.WARNING)
        waits = [RECANCEL_S if recancel else None]
        waits.append(None if timeout is None else started + timeout - now)
        waits.append(None if say_at is None else say_at - now)
        bounds = [w for w in waits if w is not None]
        done, running = await asyncio.wait(running, timeout=min(bounds) if bounds else None)
        _log_errors(done)
        if recancel:
            for task in running:
                task.cancel()
    return running


def say_still_running(
    tasks: set[asyncio.Future[Any]], after_s: float, level: int = logging.ERROR, then: str = ""
) -> None:
    """Log, for each of ``tasks``, that it still runs ``after_s`` after its cancellation,
    and where it waits (``then``: what the caller does about it)."""
    for task in tasks:
        log.log(
            level,
            "%s still runs %g s after it was cancelled%s; it waits at:\n  %s",
            task.get_name() if isinstance(task, asyncio.Task) else repr(task),
            after_s,
            then,
            "\n  ".join(where_waiting(task)),
        )


def _log_errors(tasks: Any) -> None:
    for task in tasks:
        if task.cancelled():
            continue
        error = task.exception()  # retrieved: asyncio does not report it again
        if error is not None:
            name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
            log.error("%s had failed: %s", name, error, exc_info=error)


def where_waiting(waiting: object) -> list[str]:
    """Where a suspended task (or coroutine, or async generator) waits, outermost first:
    each frame of its chain of awaits, into the tasks it awaits, down to the future at the
    bottom (``Task.get_stack`` gives a suspended task's outermost frame only)."""
    lines: list[str] = []
    awaitable: Any = waiting
    while awaitable is not None and len(lines) < MAX_CHAIN:
        if isinstance(awaitable, asyncio.Task):
            lines.append(f"task {awaitable.get_name()!r}")
            awaitable = awaitable.get_coro()
            continue
        if isinstance(awaitable, asyncio.Future):
            lines.append(repr(awaitable)[:300])
            return lines
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
        else:
            inner = _awaited_by(awaitable)
            if inner is None:
                lines.append(repr(awaitable)[:300])
                return lines
            awaitable = inner
    return lines


def _awaited_by(wrapper: object) -> object | None:
    """What an opaque await wrapper stands for: the future behind a future's iterator,
    the async generator behind ``__anext__``/``asend``/``athrow``."""
    for referent in gc.get_referents(wrapper):
        if isinstance(referent, (asyncio.Future, types.AsyncGeneratorType)):
            return referent
    return None
