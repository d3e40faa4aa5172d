"""Before pytest-timeout ends a test, print the stack of every asyncio task.

pytest-timeout shows the threads only, and a test whose teardown hangs on an idle event
loop shows nothing but ``selector.poll``: what it waits for is in some task. All tests
share the session's loop (pyproject's loop scope), so a timer thread started with each
test asks that loop to print its tasks 15 s before the test's timeout.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import types
from collections.abc import AsyncIterator, Iterator

import pytest

from bus.infra.tasks import where_waiting

LEAD_S = 15.0  # how long before the timeout the tasks are printed

_loop: asyncio.AbstractEventLoop | None = None


@pytest.fixture(scope="session", autouse=True)
async def session_loop_known() -> AsyncIterator[None]:
    """Remember the session's event loop, for the timer thread."""
    global _loop
    _loop = asyncio.get_running_loop()
    yield
    _loop = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    timeout = _timeout_of(item)
    timer = None
    if timeout > LEAD_S:
        timer = threading.Timer(timeout - LEAD_S, _ask_for_tasks, args=(timeout - LEAD_S,))
        timer.daemon = True
        timer.start()
    yield
    if timer is not None:
        timer.cancel()


def _timeout_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    return float(item.config.getoption("timeout", None) or 0)


def _ask_for_tasks(after_s: float) -> None:
    loop = _loop
    if loop is not None and loop.is_running():
        loop.call_soon_threadsafe(_print_tasks, after_s)


def _print_tasks(after_s: float) -> None:
    tasks = asyncio.all_tasks()
    print(f"--- {len(tasks)} asyncio tasks, {after_s:.0f} s into the test ---", file=sys.stderr)
    for task in tasks:
        print(f"{task.get_name()}: waiting on", file=sys.stderr)
        for line in where_waiting(task):
            print(f"    {line}", file=sys.stderr)
    # An async generator (a fixture's teardown) awaited through ``__anext__`` hides its
    # frame from the chain above: print those suspended in an await on their own.
    for agen in gc.get_objects():
        if isinstance(agen, types.AsyncGeneratorType) and agen.ag_await is not None:
            print(f"async generator {agen.ag_code.co_name}: waiting on", file=sys.stderr)
            for line in where_waiting(agen):
                print(f"    {line}", file=sys.stderr)
