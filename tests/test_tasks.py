"""Stopping background tasks (bus/infra/tasks.py): pure asyncio, no servers."""

from __future__ import annotations

import asyncio

import pytest

from bus.infra import tasks
from bus.infra.tasks import cancel_and_wait, where_waiting
from tests.support.streams import eventually


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
    try:
        still = await cancel_and_wait(failing, None, slow, timeout=0.05)
        assert still == {slow}
        assert isinstance(failing.exception(), RuntimeError)
    finally:
        release.set()
        assert await cancel_and_wait(slow) == set()


async def test_a_loop_that_lost_its_cancellation_is_cancelled_again() -> None:
    """Python 3.11's wait_for returns a result that lands with the cancellation, and the
    loop around it goes on: the stop cancels again until it ends."""
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if rounds == 1:
                    continue  # lost, the way wait_for loses it
                raise

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    try:
        assert await cancel_and_wait(task, timeout=30) == set()
        assert task.cancelled() and rounds == 2
    finally:
        task.cancel()


async def test_where_waiting_names_every_frame_down_to_the_future() -> None:
    release = asyncio.Event()

    async def outer() -> None:
        # Awaiting another task: the chain goes on into it.
        await asyncio.create_task(_ends_slowly(release), name="inner-task")

    task = asyncio.create_task(outer(), name="outer-task")
    for _ in range(2):  # the outer task starts the inner one, which then starts
        await asyncio.sleep(0)
    try:
        chain = where_waiting(task)
        assert chain[0] == "task 'outer-task'"
        assert chain[1].endswith(" in outer") and "test_tasks.py" in chain[1]
        assert chain[2] == "task 'inner-task'"
        assert [line.rsplit(" in ", 1)[-1] for line in chain[3:5]] == ["_ends_slowly", "wait"]
        assert chain[5].startswith("<Future pending")
    finally:
        release.set()
        await cancel_and_wait(task)
        assert task.done()


async def test_a_wait_without_a_timeout_says_where_a_stuck_task_waits(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks, "SAY_STUCK_S", 0.05)
    release = asyncio.Event()
    slow = asyncio.create_task(_ends_slowly(release))
    await asyncio.sleep(0)
    stopping = asyncio.create_task(cancel_and_wait(slow, recancel=False))
    try:
        await eventually(
            lambda: "still runs 0.05 s after it was cancelled" in caplog.text,
            what="the stuck task said",
        )
        assert "in _ends_slowly" in caplog.text
    finally:
        release.set()
    assert await stopping == set()
