"""The resident-model cache over a real lease ledger: LRU eviction, idle unloading, modes,
measured footprints, and backpressure while a load waits for memory held elsewhere.

Models here are bytearrays of a known size (the footprint of a bytes-like model is its
length), so the tests need no torch; tests/gpu/ loads real weights on a GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from bus import Call, Context, Emit, Function, Spec
from bus.core.contract import Model, Placement
from bus.core.envelope import Event, now_iso
from bus.core.settings import GpuSettings, Settings
from bus.gpu.leases import Device, Holder, LeaseError, LeaseTimeoutError, Ledger, host_id
from bus.gpu.resident import MB, LoadAbandonedError, ResidentModels
from bus.ops.embedded import NatsServer
from bus.runtime.context import open_context
from bus.runtime.registry import load
from bus.runtime.runner import FunctionRunner
from tests.conftest import unique
from tests.support import procs
from tests.support.streams import eventually, read_subject

pytestmark = [pytest.mark.nats]

CAPACITY = 100  # MB, no reserve
Factory = Callable[..., tuple[ResidentModels, Ledger]]


def model_of(
    name: str, mb: int, estimate: int | None = None, calls: list[str] | None = None
) -> Model:
    """A model of ``mb`` MB (a bytearray) whose lease first asks for ``estimate`` MB."""

    def load(placement: Placement) -> bytearray:
        assert placement.device == "cpu"
        if calls is not None:
            calls.append(name)
        return bytearray(mb * MB)

    return Model(name, estimate or mb, load)


async def queued(ledger: Ledger, model: str) -> bool:
    """The ledger shows a request for ``model`` waiting in the queue (a positive signal that
    a load is blocked, instead of a lull)."""
    return any(x.model == model for x in (await ledger.snapshot()).queue)


@pytest.fixture
async def kv(nats_server: NatsServer) -> AsyncIterator[KeyValue]:
    conn: NATS = await nats.connect(nats_server.url, **nats_server.client_options())
    yield await conn.jetstream(timeout=2).create_key_value(KeyValueConfig(bucket=unique("leases")))
    await conn.close()


@pytest.fixture
async def caches(kv: KeyValue) -> AsyncIterator[Factory]:
    """Factory: a cache for one worker on a shared CPU device of CAPACITY MB."""
    host = unique("h")
    made: list[tuple[ResidentModels, Ledger]] = []

    def make(worker: str = "w", **options: Any) -> tuple[ResidentModels, Ledger]:
        ledger = Ledger(kv, Device("cpu", CAPACITY, 0), Holder.here(host, worker), ttl_s=2)
        ledger.start()
        cache = ResidentModels(ledger, **{"acquire_timeout_s": 5.0, **options})
        made.append((cache, ledger))
        return cache, ledger

    yield make
    for cache, ledger in made:
        with contextlib.suppress(LeaseError):
            await cache.close()
            await ledger.close()


async def leased(ledger: Ledger) -> dict[str, int]:
    return {x.model: x.mb for x in (await ledger.snapshot()).leases}


async def nothing_leased(ledger: Ledger) -> bool:
    return not await leased(ledger)


async def test_idle_models_are_evicted_least_recently_used_first(caches: Factory) -> None:
    cache, ledger = caches()
    calls: list[str] = []
    for name in ("a", "b"):
        async with cache.use(model_of(name, 40, calls=calls)):
            pass
    async with cache.use(model_of("a", 40, calls=calls)):
        pass  # a is now the most recently used
    async with cache.use(model_of("c", 40, calls=calls)) as model:
        assert len(model) == 40 * MB
    assert cache.loaded == ["a", "c"] and calls == ["a", "b", "c"]
    assert await leased(ledger) == {"a": 40, "c": 40}


async def test_a_model_in_use_is_never_evicted(caches: Factory) -> None:
    cache, ledger = caches(acquire_timeout_s=0.5)
    async with cache.use(model_of("a", 70)):
        with pytest.raises(LeaseTimeoutError, match="a 70 MB"):
            async with cache.use(model_of("b", 70)):
                pass
    assert cache.loaded == ["a"] and await leased(ledger) == {"a": 70}


async def test_balanced_unloads_after_the_idle_ttl(caches: Factory) -> None:
    cache, ledger = caches(mode="balanced", idle_ttl_s=0.3)
    async with cache.use(model_of("a", 10)):
        pass
    last_used = time.monotonic()
    assert cache.loaded == ["a"]
    await eventually(lambda: not cache.loaded, what="the idle model unloaded")
    assert time.monotonic() - last_used >= 0.3, "unloaded before its idle TTL"
    await eventually(lambda: nothing_leased(ledger), what="its lease released")


async def test_low_unloads_at_once_and_high_stays(caches: Factory) -> None:
    low, low_ledger = caches("low", mode="low")
    async with low.use(model_of("a", 10)):
        assert await leased(low_ledger) == {"a": 10}
    assert low.loaded == [] and await leased(low_ledger) == {}
    high, high_ledger = caches("high", mode="high", idle_ttl_s=0.1)
    await high.preload(model_of("b", 10))
    # Sentinel: a balanced cache with the same idle TTL, used after the preload. Once its
    # model is unloaded for idleness, the high one has been idle longer than that.
    balanced, _ = caches("balanced", mode="balanced", idle_ttl_s=0.1)
    async with balanced.use(model_of("s", 10)):
        pass
    await eventually(lambda: not balanced.loaded, what="the balanced sentinel unloaded")

    async def only_the_high_model_leased() -> bool:  # the sentinel's release is async
        return await leased(high_ledger) == {"b": 10}

    # The ledgers share the device: the sentinel's lease goes once it is released.
    await eventually(only_the_high_model_leased, what="the sentinel's lease released")
    assert high.loaded == ["b"]


async def test_the_measured_footprint_replaces_the_estimate(caches: Factory) -> None:
    cache, ledger = caches()
    async with cache.use(model_of("a", 30, estimate=5)):
        assert await leased(ledger) == {"a": 30}


async def test_an_underestimate_that_no_longer_fits_queues_for_its_real_size(
    caches: Factory,
) -> None:
    cache, ledger = caches("w1")
    other, other_ledger = caches("w2")
    await other.preload(model_of("big", 60))

    async def free_later() -> None:
        await eventually(lambda: queued(ledger, "a"), what="a queued for its measured size")
        await other.unload("big")

    freeing = asyncio.create_task(free_later())
    async with cache.use(model_of("a", 50, estimate=10)):  # 60 + 50 > 100: must wait for "big"
        assert await leased(ledger) == {"a": 50}
    await freeing
    assert await leased(other_ledger) == {"a": 50}  # the same device document


async def test_waiting_for_memory_held_elsewhere_signals_backpressure(caches: Factory) -> None:
    cache, ledger = caches("w1")
    other, _ = caches("w2")
    signals: list[bool] = []
    cache.add_pressure_listener(signals.append)
    await other.preload(model_of("big", 80))
    async with cache.use(model_of("small", 10)):
        assert signals == [True, False], "a prompt grant is a brief pause"
    loading = asyncio.create_task(cache.preload(model_of("mid", 40)))
    await eventually(lambda: queued(ledger, "mid"), what="mid queued behind big")
    assert signals == [True, False, True] and cache.waiting and not loading.done()
    await other.unload("big")
    await loading
    assert signals == [True, False, True, False] and not cache.waiting


@pytest.mark.s3
async def test_a_gpu_worker_waiting_for_vram_stops_fetching(settings: Settings) -> None:
    gpu = {"cpu_capacity_mb": CAPACITY, "reserve_mb": 0, "lease_ttl_s": 2}
    settings = settings.model_copy(update={"gpu": GpuSettings(**gpu)})
    fn = load("tests.support.fn_gpu")
    async with open_context(settings, [fn.spec], "gpu-worker") as ctx:
        assert ctx.gpu is not None
        kv = await ctx.js.key_value(ctx.names.leases_kv)
        host = host_id(settings.data_dir)
        other = Ledger(kv, Device("cpu", CAPACITY, 0), Holder.here(host, "other"), ttl_s=2)
        hog = await other.acquire("hog", 90, timeout=2)
        for n in range(10):
            event = Event(id=f"g{n}", type="gwork", source="test", time=now_iso(), data={"n": n})
            await ctx.js.publish(ctx.names.subject("gwork"), event.encode())
        runner = FunctionRunner(fn, ctx)  # concurrency 4: it first asks for events 0-3
        await runner.start()
        try:
            # Events 1 and 3 need no model and finish; 0 and 2 wait for the model, whose
            # load waits in the ledger's queue behind the hog.
            await eventually(lambda: queued(other, "model"), what="the model load queued")
            assert ctx.gpu.waiting
            done = await read_subject(ctx.js, ctx.names.subject("gdone"), at_least=2)
            assert sorted(orjson.loads(m.data)["data"]["n"] for m in done) == [1, 3]

            async def settled() -> Any:
                info = await ctx.js.consumer_info(ctx.names.stream, ctx.names.durable("gpuwork"))
                return info if info.num_ack_pending == 2 else None

            await eventually(settled, what="events 1 and 3 acked")
            await ctx.nc.flush()  # a pull sent after those acks has reached the server now
            info = await settled()
            # Two slots are free, yet a worker waiting for VRAM asks for nothing more.
            assert info is not None and info.num_pending == 6, "kept fetching while waiting"
            await other.release(hog)
            done = await read_subject(ctx.js, ctx.names.subject("gdone"), at_least=10)
            results = [orjson.loads(m.data)["data"] for m in done]
            assert sorted(r["n"] for r in results) == list(range(10))
            assert {r["device"] for r in results if r["n"] % 2 == 0} == {"cpu"}
            assert not ctx.gpu.waiting and ctx.gpu.loaded == ["model"]
        finally:
            await runner.drain(timeout=5)
            await other.close()


@pytest.mark.s3
async def test_high_mode_preloads_the_models_a_spec_names_before_fetching(
    settings: Settings,
) -> None:
    gpu = {"cpu_capacity_mb": CAPACITY, "reserve_mb": 0, "mode": "high"}
    settings = settings.model_copy(update={"gpu": GpuSettings(**gpu)})
    fn = load("tests.support.fn_gpu")
    async with open_context(settings, [fn.spec], "gpu-worker") as ctx:
        assert ctx.gpu is not None and ctx.gpu.loaded == []
        runner = FunctionRunner(fn, ctx)
        await runner.start()
        try:
            assert ctx.gpu.loaded == ["model"]
            [lease] = (await ctx.gpu.ledger.snapshot()).leases
            assert lease.model == "model" and lease.mb == 40
            assert lease.holder.worker == "gpu-worker"  # status shows who holds what
        finally:
            await runner.drain(timeout=5)


async def test_gpu_work_runs_on_the_devices_own_thread(caches: Factory) -> None:
    cache, _ = caches()
    name = await cache.run(lambda: threading.current_thread().name)
    assert name.startswith("gpu-cpu")
    loaded_on: list[str] = []

    def load_here(placement: Placement) -> bytearray:
        loaded_on.append(f"{threading.current_thread().name} {placement.device}")
        return bytearray(MB)

    await cache.preload(Model("m", 1, load_here))
    assert loaded_on[0].startswith("gpu-cpu") and loaded_on[0].endswith(" cpu")


@pytest.mark.s3
async def test_a_worker_pinned_to_a_missing_gpu_says_so(subprocess_env: dict[str, str]) -> None:
    proc = await procs.start(
        ["worker", "tests.support.fn_gpu", "--device", "cuda:1"], subprocess_env
    )
    assert await proc.wait(timeout=60) == 2
    assert "gpu.device is 'cuda:1', but this host has" in proc.output


async def test_a_load_waiting_on_this_workers_busy_model_gets_its_room_when_it_is_done(
    caches: Factory,
) -> None:
    cache, ledger = caches(mode="high")  # high: idleness alone would never unload "a"
    using = asyncio.Event()
    done = asyncio.Event()

    async def hold_a() -> None:
        async with cache.use(model_of("a", 70)):
            using.set()
            await done.wait()

    holder = asyncio.create_task(hold_a())
    await using.wait()
    loading = asyncio.create_task(cache.preload(model_of("b", 70)))
    await eventually(lambda: queued(ledger, "b"), what="b queued behind a, which is in use")
    assert not loading.done() and cache.waiting
    done.set()
    await holder
    await asyncio.wait_for(loading, 3)
    assert cache.loaded == ["b"] and await leased(ledger) == {"b": 70}


async def test_a_cancelled_load_gives_its_lease_back(caches: Factory) -> None:
    cache, ledger = caches()
    started = threading.Event()

    def slow_load(placement: Placement) -> bytearray:
        started.set()
        time.sleep(0.5)
        return bytearray(10 * MB)

    task = asyncio.create_task(cache.preload(Model("slow", 10, slow_load)))
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cache.loaded == [] and await leased(ledger) == {}


async def test_a_load_nobody_wants_by_its_turn_on_the_device_loads_nothing(
    caches: Factory,
) -> None:
    cache, ledger = caches()
    busy, free = threading.Event(), threading.Event()

    def inference() -> None:
        busy.set()
        assert free.wait(10), "never freed"

    running = asyncio.create_task(cache.run(inference))
    await asyncio.to_thread(busy.wait, 5)
    wanted = [True]
    calls: list[str] = []

    async def use_b() -> None:
        async with cache.use(model_of("b", 10, calls=calls), lambda: wanted[0]):
            raise AssertionError("b was loaded though nobody wanted it")

    loading = asyncio.create_task(use_b())
    await eventually(lambda: leased(ledger), what="b's lease, its load queued behind inference")
    wanted[0] = False  # the job that needed b was cancelled while the thread was busy
    free.set()
    await running
    with pytest.raises(LoadAbandonedError, match="the load of b was abandoned"):
        await loading
    assert calls == [] and cache.loaded == [] and await leased(ledger) == {}


async def test_a_load_nobody_wants_by_its_turn_to_make_room_evicts_nothing(
    caches: Factory,
) -> None:
    cache, ledger = caches("w1")
    other, _ = caches("w2")
    await other.preload(model_of("big", 60))
    using_a, done_with_a = asyncio.Event(), asyncio.Event()

    async def keep_a() -> None:
        async with cache.use(model_of("a", 30)):
            using_a.set()
            await done_with_a.wait()

    holder = asyncio.create_task(keep_a())
    await using_a.wait()
    # c waits for big's memory, holding this worker's turn to make room.
    loading_c = asyncio.create_task(cache.preload(model_of("c", 20)))
    await eventually(lambda: queued(ledger, "c"), what="c queued behind big")
    wanted, calls = [True], []

    async def use_b() -> None:
        async with cache.use(model_of("b", 60, calls=calls), lambda: wanted[0]):
            raise AssertionError("b was loaded though nobody wanted it")

    loading_b = asyncio.create_task(use_b())
    await eventually(lambda: cache._waiting == 2, what="b waiting for its turn behind c")
    wanted[0] = False  # b's jobs were cancelled while it waited
    await other.unload("big")
    await loading_c
    with pytest.raises(LoadAbandonedError):  # not waiting for a's room, a's users gone
        await loading_b
    done_with_a.set()
    await holder
    assert calls == [] and sorted(cache.loaded) == ["a", "c"]
    assert await leased(ledger) == {"a": 30, "c": 20}


@pytest.mark.s3
async def test_a_failed_start_tears_down_what_it_set_up(settings: Settings) -> None:
    gpu = {"cpu_capacity_mb": CAPACITY, "reserve_mb": 0, "mode": "high"}
    settings = settings.model_copy(update={"gpu": GpuSettings(**gpu)})
    log: list[str] = []

    async def setup(ctx: Context) -> None:
        log.append("setup")

    async def teardown(ctx: Context, state: Any) -> None:
        log.append("teardown")

    async def handle(event: Event, ctx: Context, call: Call) -> list[Emit]:
        return []

    huge = Model("huge", CAPACITY * 10, lambda placement: bytearray(MB))
    spec = Spec("toobig", listens=("x",), needs_gpu=True)
    fn = Function(spec, handle=handle, setup=setup, teardown=teardown, models=lambda _: [huge])
    async with open_context(settings, [spec], "gpu-worker") as ctx:
        runner = FunctionRunner(fn, ctx)
        with pytest.raises(LeaseError, match="huge needs 1000 MB"):
            await runner.start()  # high mode preloads: the model can never fit
    assert log == ["setup", "teardown"]
