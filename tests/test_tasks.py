"""Stopping background tasks (bus/infra/tasks.py): pure asyncio, no servers."""

from __future__ import annotations

import asyncio

import pytest

from bus.infra.tasks import cancel_and_wait, where_waiting


async def _ends_slowly(release: asyncio.Event) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await release.wait()  # its cleanup takes a while


async def test_a_stop_that_is_cancelled_itself_ends_instead_of_going_on() -> None:
    release = asyncio.Event()
    child = asyncio.create_task(_ends_slowly(release))
    await asyncio.sleep(0)
    went_on: list[str] = []

    async def stop() -> None:
        await cancel_and_wait(child)
        went_on.append("after the stop")  # with suppress(CancelledError) this ran

    stopping = asyncio.create_task(stop())
    await asyncio.sleep(0)
    assert child.cancelling() == 1  # the stop is waiting for the child now
    stopping.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert went_on == []
    await asyncio.wait({child})
    assert child.cancelled()


async def test_what_the_tasks_raise_stays_theirs_and_a_timeout_returns_the_stragglers() -> None:
    async def fails_on_the_way_out() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("cleanup failed")

    failing = asyncio.create_task(fails_on_the_way_out())
    release = asyncio.Event()
    slow = asyncio.create_task(_ends_slowly(release))
    await asyncio.sleep(0)
    still = await cancel_and_wait(failing, None, slow, timeout=0.05)
    assert still == {slow}
    assert isinstance(failing.exception(), RuntimeError)
    release.set()
    assert await cancel_and_wait(slow) == set()


async def test_where_waiting_names_every_frame_down_to_the_future() -> None:
    release = asyncio.Event()

    async def outer() -> None:
        await _ends_slowly(release)

    task = asyncio.create_task(outer())
    await asyncio.sleep(0)
    chain = where_waiting(task)
    assert [line.rsplit(" in ", 1)[-1] for line in chain[:3]] == ["outer", "_ends_slowly", "wait"]
    assert "Future" in chain[-1]
    release.set()
    await cancel_and_wait(task)
