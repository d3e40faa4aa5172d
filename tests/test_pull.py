"""Pull-request bookkeeping: unit tests with hand-made status messages, then the same
consumer against a real nats-server (request expiry, a server restart and reconnect)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from pydantic import SecretStr

from bus.core.settings import NatsSettings
from bus.infra.nats_conn import connect, reconnect_count
from bus.ops.embedded import NatsServer
from bus.runtime.pull import PullConsumer, _Request
from tests.conftest import gateway_seed, unique
from tests.support.streams import eventually


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


async def test_a_refusal_holds_the_next_pull_but_an_expiry_does_not() -> None:
    pc, _ = consumer()
    pc._requests = {"1": _Request(4, time.monotonic())}
    await pc._receive(status("1", "408", Description="Request Timeout"))
    assert pc._hold_until == 0.0
    pc._requests = {"2": _Request(4, time.monotonic())}
    await pc._receive(status("2", "409", Description="Consumer Deleted"))
    assert pc._hold_until > time.monotonic(), "a refused pull would be re-sent in a tight loop"


async def test_heartbeats_keep_only_their_own_request_alive() -> None:
    pc, _ = consumer()
    old = time.monotonic() - 100
    pc._requests = {"1": _Request(2, old), "2": _Request(2, old)}
    await pc._receive(status("2", "100", Description="Idle Heartbeat"))
    assert pc._requests["1"].last_seen == old and pc._requests["2"].last_seen > old


# --- against a real nats-server ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def pulling(
    server: NatsServer, stream: str, *, expires: float = 30.0, heartbeat: float = 5.0
) -> AsyncIterator[tuple[NATS, PullConsumer, asyncio.Queue[Msg]]]:
    """Stream ``stream`` (subjects ``<stream>.>``), a durable consumer "d", and a started
    PullConsumer whose messages are acked and released as they arrive."""
    seed = SecretStr(gateway_seed(server)) if server.credentials else None
    nc = await connect(NatsSettings(url=server.url, nkey_seed=seed), name="test-pull", timeout=5)
    js = nc.jetstream()
    with contextlib.suppress(Exception):
        await js.delete_stream(stream)
    config = StreamConfig(name=stream, subjects=[f"{stream}.>"], storage=StorageType.FILE)
    await js.add_stream(config)
    await js.add_consumer(stream, ConsumerConfig(durable_name="d", ack_policy=AckPolicy.EXPLICIT))
    received: asyncio.Queue[Msg] = asyncio.Queue()
    pc: PullConsumer

    def take(msg: Msg) -> None:
        async def ack() -> None:
            await msg.ack()
            pc.release()
            received.put_nowait(msg)

        asyncio.get_running_loop().create_task(ack())

    pc = PullConsumer(
        nc, stream, "d", capacity=4, on_message=take, expires=expires, heartbeat=heartbeat
    )
    await pc.start()
    try:
        yield nc, pc, received
    finally:
        await pc.stop()
        await nc.close()


async def requests_seen(server: NatsServer, stream: str) -> tuple[NATS, list[dict[str, Any]]]:
    """Watch the pull requests sent for ``stream``/d on the wire (a second connection)."""
    watcher = await nats.connect(server.url, **server.client_options())
    seen: list[dict[str, Any]] = []

    async def record(msg: Msg) -> None:
        seen.append(orjson.loads(msg.data))

    await watcher.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.d", cb=record)
    await watcher.flush()
    return watcher, seen


@pytest.mark.nats
async def test_an_expired_request_is_renewed_and_the_next_message_still_arrives(
    nats_server: NatsServer,
) -> None:
    stream = unique("S")
    watcher, seen = await requests_seen(nats_server, stream)
    try:
        async with pulling(nats_server, stream, expires=1.0, heartbeat=0.4) as (
            nc,
            _,
            received,
        ):
            # Idle: the server ends the first request with 408 after 1 s; a new one follows.
            await eventually(lambda: len(seen) >= 2, what="a pull request renewed after expiry")
            assert all(r["expires"] == 1_000_000_000 for r in seen)
            await nc.jetstream().publish(f"{stream}.x", b"after the expiry")
            msg = await asyncio.wait_for(received.get(), 10)
            assert msg.data == b"after the expiry"
    finally:
        await watcher.close()


@pytest.mark.nats
async def test_a_restarted_server_gets_new_requests_and_delivers_again(tmp_path: Path) -> None:
    server = NatsServer(tmp_path, port=0)
    await server.start()
    try:
        async with pulling(server, "S", heartbeat=0.5) as (nc, pc, received):
            js = nc.jetstream()
            await js.publish("S.x", b"before")
            assert (await asyncio.wait_for(received.get(), 10)).data == b"before"
            reconnects = reconnect_count(nc)
            await server.stop()
            await server.start()  # same port, same store: the stream and consumer survive
            await eventually(
                lambda: reconnect_count(nc) > reconnects, timeout=20, what="reconnected"
            )
            await js.publish("S.x", b"after")
            msg = await asyncio.wait_for(received.get(), 20)
            assert msg.data == b"after" and pc.in_flight == 0
    finally:
        await server.stop()


@pytest.mark.nats
async def test_a_renewal_under_way_when_the_consumer_stops_leaves_no_subscription(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A priority change renews the requests on a new inbox; a stop while that renewal
    waits (a worker draining) must not find it subscribed again afterwards."""
    stream = unique("S")
    async with pulling(nats_server, stream) as (nc, pc, _):
        await eventually(lambda: pc.requested > 0, what="a request open")
        real_subscribe, renewing, go_on = nc.subscribe, asyncio.Event(), asyncio.Event()

        async def slow_subscribe(*args: Any, **kwargs: Any) -> Any:
            renewing.set()
            await go_on.wait()
            return await real_subscribe(*args, **kwargs)

        monkeypatch.setattr(nc, "subscribe", slow_subscribe)
        pc._priority = lambda: 3  # asked at another priority than now
        pc.reconsider()
        await renewing.wait()
        await pc.stop()
        go_on.set()
        leftovers = [t for t in asyncio.all_tasks() if t.get_coro().__name__ == "_renew"]
        await asyncio.gather(*leftovers, return_exceptions=True)
        assert pc._sub is None
        mine = [s.subject for s in nc._subs.values() if s.subject.startswith(pc._inbox)]
        assert mine == [], mine
