"""The VRAM lease ledger on a real nats-server: capacity, FIFO, timeouts, lapses, races."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from bus.core.settings import Settings
from bus.gpu.leases import (
    MODES,
    Device,
    Holder,
    Lease,
    LeaseError,
    LeaseResizeError,
    LeaseTimeoutError,
    LeaseTooLargeError,
    Ledger,
    LedgerUnavailableError,
    Snapshot,
    discover_devices,
    host_id,
)
from bus.ops.embedded import NatsServer
from bus.runtime.context import Context
from tests.conftest import unique
from tests.support.clock import past

pytestmark = pytest.mark.nats

ROOT = Path(__file__).resolve().parents[1]
CAPACITY, RESERVE = 1000, 200  # 800 MB leasable
TTL = 1.0
GRACE = 0.5
# Every KV request of the test buckets is answered within this, or it fails (and a ledger
# call then raises LedgerUnavailableError): the unit of the upper bounds below.
KV_TIMEOUT = 2.0


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_server.url, **nats_server.client_options())
    yield conn
    await conn.close()


async def bucket(nc: NATS, history: int = 1) -> KeyValue:
    return await nc.jetstream(timeout=KV_TIMEOUT).create_key_value(
        KeyValueConfig(bucket=unique("leases"), history=history)
    )


@pytest.fixture
async def kv(nc: NATS) -> KeyValue:
    return await bucket(nc)


@pytest.fixture
async def ledgers(kv: KeyValue) -> AsyncIterator[Any]:
    """Factory: a started Ledger for a worker of one host, closed after the test."""
    host = unique("h")
    made: list[Ledger] = []

    def make(worker: str, ttl_s: float = TTL) -> Ledger:
        ledger = Ledger(
            kv, Device("cpu", CAPACITY, RESERVE), Holder.here(host, worker), ttl_s=ttl_s
        )
        ledger.start()
        made.append(ledger)
        return ledger

    yield make
    for ledger in made:
        with contextlib.suppress(LeaseError):
            await ledger.close()


async def spawn(spec: dict[str, Any]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.lease_client",
        orjson.dumps(spec).decode(),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )


async def soon(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait until ``check()`` is true (polling: the ledger has no event for these)."""
    for _ in range(int(timeout / 0.01)):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not true within {timeout} s")


async def test_grants_within_capacity_and_releases(ledgers: Any) -> None:
    a, b = ledgers("a"), ledgers("b")
    first = await a.acquire("caption", 300, timeout=1)
    second = await b.acquire("generate", 500, timeout=1)
    seen = await a.snapshot()
    assert (seen.used_mb, seen.free_mb, seen.usable_mb) == (800, 0, 800)
    assert seen.device == Device("cpu", CAPACITY, RESERVE)
    assert {x.id for x in seen.leases} == {first.id, second.id} and not seen.queue
    assert seen.lease(first.id) is not None
    assert seen.lease(first.id).holder == a.holder  # type: ignore[union-attr]
    raw = orjson.loads((await a.kv.get(a.key)).value)
    assert raw["capacity_mb"] == CAPACITY and raw["reserve_mb"] == RESERVE
    assert set(raw["leases"][0]) == {"id", "holder", "model", "mb", "expires", "since"}
    await a.release(first)
    assert (await b.snapshot()).used_mb == 500
    assert not a.is_held(first) and b.is_held(second)


async def test_an_impossible_request_fails_at_once(ledgers: Any) -> None:
    ledger = ledgers("a")
    wait = 30.0
    started = time.monotonic()
    with pytest.raises(LeaseTooLargeError) as caught:
        await ledger.acquire("huge", 801, timeout=wait)
    assert time.monotonic() - started < wait, "it waited out its timeout instead"
    assert "801 MB" in str(caught.value) and "at most 800 MB" in str(caught.value)
    assert (await ledger.snapshot()).revision == 0  # nothing was written: it never queued


async def test_waiters_are_served_first_come_first_served(ledgers: Any) -> None:
    """600, 300, 100 wait behind a full device; 100 would fit first but must not overtake.

    The 100 MB request's own timeout is the proof: it waits it out in a ledger with room for
    it, and says so, instead of being granted ahead of 300 MB.
    """
    # A long TTL: on a starved machine a late heartbeat must not lapse a ticket, which would
    # send it to the back of the queue.
    owner = ledgers("owner", ttl_s=10)
    full = await owner.acquire("big", 800, timeout=1)
    waiters = {mb: ledgers(f"w{mb}", ttl_s=10) for mb in (600, 300, 100)}
    patience = {600: 10.0, 300: 10.0, 100: 2.0}
    loop = asyncio.get_running_loop()
    asked: dict[int, float] = {}
    tasks: dict[int, asyncio.Task[Lease]] = {}

    async def queued(n: int) -> bool:
        return len((await owner.snapshot()).queue) == n

    for n, mb in enumerate(waiters, start=1):
        asked[mb] = loop.time()
        tasks[mb] = asyncio.create_task(waiters[mb].acquire(f"m{mb}", mb, patience[mb]))
        await soon(lambda n=n: queued(n))  # arrival order is fixed
    await owner.release(full)
    first = await tasks[600]
    # From here 100 MB fits (600 of 800 MB leased) while 300 MB, ahead of it, does not.
    gives_up = asked[100] + patience[100]  # no later than the request's own deadline
    assert loop.time() < gives_up, "600 MB was granted only after the 100 MB request gave up"
    with pytest.raises(LeaseTimeoutError) as caught:
        await tasks[100]
    message = str(caught.value)
    assert "200 MB free" in message and "1 request(s) queued" in message, message
    assert not tasks[300].done()  # 600 + 300 MB do not fit: nothing can have granted it
    await waiters[600].release(first)
    second = await tasks[300]
    assert (first.mb, second.mb) == (600, 300)
    assert not (await owner.snapshot()).queue


async def test_a_waiter_times_out_with_a_clear_error_and_leaves_no_ticket(ledgers: Any) -> None:
    owner, waiter = ledgers("owner"), ledgers("waiter")
    await owner.acquire("big", 750, timeout=1)
    wait = 0.5
    started = time.monotonic()
    with pytest.raises(LeaseTimeoutError) as caught:
        await waiter.acquire("small", 100, timeout=wait)
    took = time.monotonic() - started
    # Not before its timeout. After it, at most two ledger changes (a last look, then taking
    # its ticket out), each a read and a write answered within KV_TIMEOUT.
    assert wait <= took < wait + 4 * KV_TIMEOUT, f"gave up after {took:.2f} s"
    message = str(caught.value)
    for part in (
        "small (100 MB)",
        "cpu",
        "0.5 s",
        "750 MB of 800 MB",
        str(owner.holder),
        "50 MB free",
    ):
        assert part in message, message
    seen = await owner.snapshot()
    assert not seen.queue and waiter.waiting == 0


async def test_a_cancelled_waiter_leaves_no_ticket(ledgers: Any) -> None:
    # A long TTL: on a starved machine a late heartbeat must not lapse the ticket under test.
    owner, waiter = ledgers("owner", ttl_s=10), ledgers("waiter", ttl_s=10)
    await owner.acquire("big", 800, timeout=1)
    task = asyncio.create_task(waiter.acquire("small", 100, timeout=10))

    async def queued() -> bool:
        return bool((await owner.snapshot()).queue)

    await soon(queued)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not (await owner.snapshot()).queue


async def test_the_heartbeat_keeps_a_lease_alive_past_its_ttl(ledgers: Any) -> None:
    holder, other = ledgers("holder"), ledgers("other")
    lease = await holder.acquire("m", 800, timeout=1)
    # Unrenewed, the grant alone lapses at lease.expires + grace; go a TTL past that.
    await past(lease.expires + other.grace_s + TTL)
    renewed = (await other.snapshot()).lease(lease.id)
    assert renewed is not None and renewed.expires > lease.expires
    assert holder.is_held(lease)


async def test_a_holder_that_stops_renewing_loses_its_lease(ledgers: Any) -> None:
    holder, other = ledgers("holder"), ledgers("other")
    lease = await holder.acquire("m", 800, timeout=1)
    await holder.close(release=False)  # a stalled process: no more renewals
    # It lapses TTL + grace after its last renewal, before now; the waiter looks again at
    # least every TTL/3, and a look is a read and a write.
    taken = await other.acquire("n", 800, timeout=TTL + GRACE + TTL / 3 + 2 * KV_TIMEOUT)
    holder.start()  # it wakes up, renews, and finds its lease gone

    async def dropped() -> bool:
        return not holder.is_held(lease)

    # Its first renewal comes TTL/3 after the start: a read, and no write (nothing of its own).
    await soon(dropped, timeout=TTL / 3 + KV_TIMEOUT)
    assert [x.id for x in (await other.snapshot()).leases] == [taken.id]


async def test_a_killed_holder_lapses_within_ttl_plus_one_heartbeat(
    kv: KeyValue, nats_server: NatsServer
) -> None:
    """SIGKILL a real process holding the whole device; a waiter gets it once the lease lapses."""
    ttl = 2.0
    host = unique("h")
    spec = {
        "url": nats_server.url,
        "connect": nats_server.client_options(),
        "bucket": (await kv.status()).bucket,
        "host": host,
        "worker": "holder",
        "capacity_mb": CAPACITY,
        "reserve_mb": RESERVE,
        "ttl_s": ttl,
        "hold": 800,
    }
    proc = await spawn(spec)
    device = Device("cpu", CAPACITY, RESERVE)
    key = f"{host}.{device.token}"

    async def held() -> Lease:
        entry = await kv.get(key)
        assert entry.value is not None and entry.revision is not None
        [lease] = Snapshot.decode(entry.value, entry.revision).leases
        return lease

    async def renewed(granted: Lease) -> bool:
        return (await held()).expires > granted.expires

    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.startswith(b"granted "), line
        granted = await held()
        await soon(lambda: renewed(granted), timeout=2 * ttl)  # it renews before the kill
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        last = await held()  # dead: this renewal is its last
        async with Ledger(kv, device, Holder.here(host, "waiter"), ttl_s=ttl) as waiter:
            asked = time.time()
            taken = await waiter.acquire("next", 500, timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    # The ledger's own times: the dead holder's lease lapses `grace` after the expiry of its
    # last renewal, and the waiter is granted (taken.since) not before that, and within one
    # re-check (at most ttl/3 apart) of it or of asking, whichever came later.
    lapsed = last.expires + waiter.grace_s
    assert lapsed <= taken.since, f"granted {lapsed - taken.since:.2f} s before the lapse"
    late = taken.since - max(lapsed, asked)
    assert late <= ttl / 3, f"granted {late:.2f} s after it could have been"


async def test_resize_replaces_the_estimate_with_the_measured_size(ledgers: Any) -> None:
    a, b = ledgers("a"), ledgers("b")
    lease = await a.acquire("m", 300, timeout=1)
    await b.acquire("n", 400, timeout=1)
    grown = await a.resize(lease, 400)
    assert grown.mb == 400 and (await a.snapshot()).used_mb == 800
    with pytest.raises(LeaseResizeError, match="measured 401 MB but holds 400 MB"):
        await a.resize(lease, 401)
    assert (await a.snapshot()).lease(lease.id).mb == 400  # type: ignore[union-attr]
    assert (await a.resize(lease, 100)).mb == 100
    await a.release(lease)
    with pytest.raises(LeaseResizeError, match="no longer held"):
        await a.resize(lease, 50)


async def test_an_unavailable_ledger_fails_clearly_instead_of_hanging(
    nats_server: NatsServer,
) -> None:
    conn = await nats.connect(nats_server.url, **nats_server.client_options())
    kv = await bucket(conn)
    device = Device("cpu", CAPACITY, RESERVE)
    ledger = Ledger(kv, device, Holder.here(unique("h"), "w"), ttl_s=TTL)
    await conn.jetstream().delete_key_value((await kv.status()).bucket)
    # Each call gives up at its first failed KV request, then clears up with one more: two
    # requests, each answered (or failed) within KV_TIMEOUT, never its own 30 s.
    started = time.monotonic()
    with pytest.raises(LedgerUnavailableError, match=r"VRAM ledger for cpu .* unavailable"):
        await ledger.acquire("m", 100, timeout=30)
    assert time.monotonic() - started < 2 * KV_TIMEOUT
    await conn.close()
    started = time.monotonic()
    with pytest.raises(LedgerUnavailableError, match="ConnectionClosedError"):
        await ledger.acquire("m", 100, timeout=30)
    assert time.monotonic() - started < 2 * KV_TIMEOUT
    await ledger.close()


def revisions_are_sound(revisions: list[tuple[float, Snapshot]], usable: int) -> None:
    """Every revision's live leases fit, and each grant went to the head of the queue."""
    for (_, before), (at, after) in itertools.pairwise(revisions):
        assert after.revision == before.revision + 1, "the monitor missed a revision"
        live = after.live(at, GRACE)
        assert live.used_mb <= usable, f"over-committed at revision {after.revision}: {live}"
        waiting = [x.id for x in before.live(at, GRACE).queue]
        new = {x.id for x in after.leases} - {x.id for x in before.leases}
        assert len(new) <= 1, "one write grants at most one request"
        if new and waiting:
            assert new == {waiting[0]}, "a request overtook the queue"


@pytest.fixture
async def clients(nats_server: NatsServer) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Four ledger client processes, started once and fed one plan per example."""
    base = {
        "url": nats_server.url,
        "connect": nats_server.client_options(),
        "capacity_mb": CAPACITY,
        "reserve_mb": RESERVE,
        "ttl_s": 2.0,
    }
    procs = [await spawn({**base, "worker": f"w{n}"}) for n in range(4)]
    try:
        for p in procs:
            assert p.stdout is not None
            assert await asyncio.wait_for(p.stdout.readline(), 30) == b"ready\n"
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()


async def run_plan(proc: asyncio.subprocess.Process, plan: dict[str, Any]) -> list[dict[str, Any]]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(orjson.dumps(plan) + b"\n")
    await proc.stdin.drain()
    grants = []
    while (line := await proc.stdout.readline()) != b"done\n":
        assert line, f"client exited ({proc.returncode}) mid-plan"
        grants.append(orjson.loads(line))
    return grants


ops = st.lists(st.tuples(st.integers(1, 800), st.integers(0, 30)), min_size=1, max_size=6)


@examples(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plans=st.lists(ops, min_size=4, max_size=4))
async def test_processes_racing_never_over_commit(
    nc: NATS, clients: list[asyncio.subprocess.Process], plans: list[list[Any]]
) -> None:
    """Four processes acquire and release random sizes; every revision of the ledger is checked."""
    kv = await bucket(nc, history=64)  # keeps every revision until the monitor has read it
    name = (await kv.status()).bucket
    host = unique("h")
    revisions: list[tuple[float, Snapshot]] = []

    watcher = await kv.watch(f"{host}.cpu")  # subscribed before the first write

    async def monitor() -> None:
        async for entry in watcher:
            if entry is not None and entry.value and entry.revision and entry.created:
                snap = Snapshot.decode(entry.value, entry.revision)
                revisions.append((entry.created.timestamp(), snap))

    async def caught_up() -> bool:
        last = (await kv.get(f"{host}.cpu")).revision
        return bool(revisions) and revisions[-1][1].revision == last

    watching = asyncio.create_task(monitor())
    try:
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    run_plan(proc, {"bucket": name, "host": host, "ops": plan})
                    for proc, plan in zip(clients, plans, strict=True)
                )
            ),
            60,
        )
        await soon(caught_up)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        await nc.jetstream().delete_key_value(name)

    for plan, grants in zip(plans, results, strict=True):
        assert [g["mb"] for g in grants] == [mb for mb, _ in plan]
        for g in grants:
            assert g["present"] and g["used_mb"] <= g["usable_mb"] == CAPACITY - RESERVE
    assert len(revisions) >= 2 * sum(len(plan) for plan in plans)  # a grant and a release each
    revisions_are_sound(revisions, CAPACITY - RESERVE)
    assert not revisions[-1][1].leases and not revisions[-1][1].queue


async def test_declare_creates_the_leases_bucket(ctx: Context) -> None:
    assert ctx.names.leases_kv == f"{ctx.names.namespace}_leases"
    kv = await ctx.js.key_value(ctx.names.leases_kv)
    assert (await kv.status()).bucket == ctx.names.leases_kv


def test_the_host_id_is_stable_and_can_be_configured(tmp_path: Path) -> None:
    first = host_id(tmp_path / "data")
    assert host_id(tmp_path / "data") == first
    assert (tmp_path / "data" / "host-id").read_text().strip() == first
    assert host_id(tmp_path / "other", configured="gpu-node-7") == "gpu-node-7"


def test_devices_fall_back_to_the_configured_cpu(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, gpu={"device": "cpu", "cpu_capacity_mb": 4096, "mode": "high"}
    )
    assert discover_devices(settings) == [Device("cpu", 4096, MODES["high"].reserve_mb, "high")]
    pinned = Settings(data_dir=tmp_path, gpu={"device": "cuda:63"})
    with pytest.raises(LeaseError, match=r"gpu\.device is 'cuda:63', but this host has"):
        discover_devices(pinned)
    tiny = Settings(data_dir=tmp_path, gpu={"device": "cpu", "cpu_capacity_mb": 512, "mode": "low"})
    with pytest.raises(LeaseError, match="nothing is left to lease"):
        discover_devices(tiny)
