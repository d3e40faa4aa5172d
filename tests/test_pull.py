"""Pull-request bookkeeping, driven with hand-made status messages (pure unit tests)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from bus.runtime.pull import PullConsumer, _Request


def consumer(capacity: int = 4) -> tuple[PullConsumer, list[Any]]:
    received: list[Any] = []
    nc = SimpleNamespace(new_inbox=lambda: "_INBOX.test", stats={"reconnects": 0})
    pc = PullConsumer(nc, "S", "d", capacity=capacity, on_message=received.append)  # type: ignore[arg-type]
    pc._sub = None  # not started: no pulls are sent
    return pc, received


def status(token: str, code: str, **headers: str) -> Any:
    return SimpleNamespace(
        subject=f"_INBOX.test.{token}", headers={"Status": code, **headers}, data=b""
    )


def data() -> Any:
    return SimpleNamespace(subject="ns.uploaded", headers=None, data=b"{}")


async def test_messages_fill_the_oldest_request_first() -> None:
    pc, received = consumer()
    pc._requests = {"1": _Request(2, time.monotonic()), "2": _Request(2, time.monotonic())}
    for _ in range(3):
        await pc._receive(data())
    assert list(pc._requests) == ["2"] and pc._requests["2"].remaining == 1
    assert pc.in_flight == 3 and len(received) == 3 and pc.free == 0


async def test_a_status_ends_its_request_even_without_a_pending_count() -> None:
    pc, _ = consumer()
    pc._requests = {"1": _Request(3, time.monotonic()), "2": _Request(1, time.monotonic())}
    await pc._receive(status("1", "409", Description="Exceeded MaxWaiting"))
    assert list(pc._requests) == ["2"] and pc.free == 3
    await pc._receive(status("2", "408", **{"Nats-Pending-Messages": "1"}))
    assert pc._requests == {} and pc.free == 4


async def test_heartbeats_keep_only_their_own_request_alive() -> None:
    pc, _ = consumer()
    old = time.monotonic() - 100
    pc._requests = {"1": _Request(2, old), "2": _Request(2, old)}
    await pc._receive(status("2", "100", Description="Idle Heartbeat"))
    assert pc._requests["1"].last_seen == old and pc._requests["2"].last_seen > old
