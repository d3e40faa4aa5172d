"""VRAM leases: what a lease costs alone and contended, and what it adds to a model swap.

Run with ``python -m tests.bench.bench_leases [--cycles 300] [--procs 8] [--proc-cycles 100]
[--hold-ms 5] [--model-mb 1024] [--rounds 12] [--payload bytes|torch]
[--only leases|swap] [--quick]``. ``--quick`` is a smoke run: 50 uncontended cycles, 15 per
worker, 3 swap rounds of 512 MB models (small models make the fixed part of the swap
overhead weigh more).

Method
------
One invocation starts a real nats-server (JetStream, file storage) in a temporary directory
and stops it at the end. The ledger lives in one KV bucket opened with
``bus.runtime.streams.key_value``, as ``darkroom up`` opens it; every case writes a device key of
its own (a fresh host id), so each starts from an empty document.

Part 1: lease latency
---------------------
A cycle is ``Ledger.acquire`` (read the device document, compare-and-set it with the lease
added), a hold of ``--hold-ms``, then ``Ledger.release`` (read, compare-and-set it without
the lease). ``acquire`` and ``release`` are timed apart, in the process that calls them;
the hold is not timed.

* ``uncontended``: this process, one ledger, ``--cycles`` cycles of 100 MB on a CPU device
  with room for many more (after 10 untimed cycles).
* ``contended``: ``--procs`` worker processes (this module with ``--worker``, started once
  and fed one plan per case) each run ``--proc-cycles`` cycles of 100 MB on the same device
  key, whose capacity is ``procs`` x 100 MB: every request fits, so what is measured is the
  compare-and-set race on one key (a writer that lost re-reads and writes again). Each
  worker runs 3 untimed cycles, then waits until every worker is warm; the parent releases
  them together.
* ``queued``: the same with room for half of them (``procs`` / 2 x 100 MB): requests that do
  not fit join the queue and wait (watching the key) until the head fits, so the acquire
  latency includes waiting for other holders' ``--hold-ms``.

``cas_retries_per_cycle`` counts the compare-and-set writes that lost the race (the KV
answered "wrong last sequence") per cycle, acquire and release together, from a counting
wrapper around each worker's KV handle. On a 2-core machine eight workers plus the
nats-server contend for the CPUs as much as for the key: the contended percentiles include
time spent waiting to be scheduled.

Part 2: model swap
------------------
Two models, A and B, of ``--model-mb`` each on a CPU device of ``model-mb / 0.6``: each
takes 60% of the device, so they never fit together and every switch unloads one to load
the other. A model is a ``bytearray`` filled by ``bytearray(b"\\xNN") * size`` (a memset:
every page is touched, so the kernel really maps it, and dropping it really unmaps it);
with ``--payload torch`` (torch installed) it is a ``torch.nn.Sequential`` of 4096x4096
``Linear`` layers with random weights, on the CPU. ``--model-mb`` is scaled down to a fifth
of ``MemAvailable`` if the machine has less room. Both variants load on the same
one-thread executor, off the event loop, as a worker would.

* ``raw``: holds one model; to switch, it drops it (the memory is freed at once, see
  :class:`Slot`), loads the other in the executor and touches it (``raw_swap_ms``).
* ``darkroom``: :class:`bus.gpu.resident.ResidentModels` in ``balanced`` mode on a
  :class:`bus.gpu.leases.Ledger`, with the same loaders; a switch is one ``async with
  use(other)`` block whose body touches the model, timed whole (``darkroom_swap_ms``). The
  cache reads the ledger, finds no room, evicts its idle model (drops it, ``gc.collect()``,
  releases the lease), acquires a lease, loads, measures the footprint and resizes the
  lease to it: the estimate given is 10% high, as a rough estimate would be, so every load
  pays the resize too. After each switch the bench checks that exactly the new model is
  loaded and leased.

Each loader times itself in the executor thread (``raw_load_ms``, and darkroom's own), so a
switch splits into the load and what goes on around it (``*_outside_load_ms``: for raw the
drop, for darkroom the drop, the collection and the ledger's round trips).

Each round switches both variants to the other model, one right after the other (raw
first in odd rounds, darkroom first in even ones), after an untimed first load: the two
switches of a round share the machine's mood, which matters on a host where the same load
takes 0.6 s or 1.4 s from one minute to the next. A round's overhead ratio is
``(darkroom swap - raw swap) / raw load``; ``swap_overhead_ratio`` is the median over
rounds (the issue's goal: <= 0.10), ``swap_overhead_ratio_best`` the same formula on each
figure's best (lowest) value. Even paired, two loads of the same model differ by tens of
percent on a busy host, so ``swap_overhead_ratio_net`` also takes each switch's own load
out: ``(darkroom outside load - raw outside load) / raw load``, median over rounds; it is
the steadier estimate of what darkroom adds. Both variants hold a model between rounds, so
the resident set (``rss_max_mb``, read after every switch) should stay near
``rss_base_mb`` plus two models; a third would mean a dropped model was not freed.

The last line printed is one JSON object with the headline figures and the machine's facts
(CPU count, ``MemAvailable`` and the 1-minute load average before and after the run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from bus.core.contract import Model as BusModel
from bus.gpu.leases import MIB, Device, Holder, Ledger
from bus.gpu.resident import ResidentModels
from bus.ops.embedded import NatsServer
from bus.runtime.streams import key_value
from tests.bench.report import load_average, percentile, rounded, run_and_report, shown

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "bench_leases"
LEASE_MB = 100
UNCONTENDED_CAPACITY_MB = 1_000_000
SOLO_WARMUP = 10
WORKER_WARMUP = 3
ACQUIRE_TIMEOUT_S = 60.0
WORKER_TIMEOUT_S = 300.0
MODEL_SHARE = 0.6  # of the device, per model: two never fit together
ESTIMATE_FACTOR = 1.1
LAYER = 4096  # torch payload: square Linear layers of this width


# --- timing one lease cycle --------------------------------------------------------------------
@dataclass
class Cycles:
    """Acquire and release latencies (ms) of a run of lease cycles, and CAS races lost."""

    acquire_ms: list[float] = field(default_factory=list)
    release_ms: list[float] = field(default_factory=list)
    conflicts: int = 0

    def extend(self, other: Cycles) -> None:
        self.acquire_ms += other.acquire_ms
        self.release_ms += other.release_ms
        self.conflicts += other.conflicts

    def summary(self, prefix: str) -> dict[str, Any]:
        n = len(self.acquire_ms)
        return {
            f"{prefix}acquire_p50_ms": rounded(percentile(self.acquire_ms, 50)),
            f"{prefix}acquire_p99_ms": rounded(percentile(self.acquire_ms, 99)),
            f"{prefix}release_p50_ms": rounded(percentile(self.release_ms, 50)),
            f"{prefix}release_p99_ms": rounded(percentile(self.release_ms, 99)),
            f"{prefix}cycles": n,
        }

    def line(self, case: str) -> str:
        a, r = self.acquire_ms, self.release_ms
        return (
            f"  {case:<11} n={len(a):<5} acquire p50 {percentile(a, 50):7.2f}  "
            f"p99 {percentile(a, 99):7.2f}  max {max(a, default=math.nan):7.2f} ms;  "
            f"release p50 {percentile(r, 50):6.2f}  p99 {percentile(r, 99):6.2f} ms;  "
            f"CAS retries {self.conflicts}"
        )


class CountingKV:
    """A KV handle that counts the compare-and-set writes which lost the race."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self.conflicts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)

    async def create(self, key: str, value: bytes) -> int:
        return await self._counted(self._kv.create(key, value))

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        return await self._counted(self._kv.update(key, value, last=last))

    async def _counted(self, write: Any) -> int:
        try:
            revision: int = await write
        except nats.js.errors.KeyWrongLastSequenceError:
            self.conflicts += 1
            raise
        return revision


async def run_cycles(ledger: Ledger, count: int, hold_s: float) -> Cycles:
    kv = ledger.kv
    before = kv.conflicts if isinstance(kv, CountingKV) else 0
    cycles = Cycles()
    for _ in range(count):
        started = time.perf_counter()
        lease = await ledger.acquire("bench-model", LEASE_MB, timeout=ACQUIRE_TIMEOUT_S)
        cycles.acquire_ms.append((time.perf_counter() - started) * 1000)
        if hold_s:
            await asyncio.sleep(hold_s)
        started = time.perf_counter()
        await ledger.release(lease)
        cycles.release_ms.append((time.perf_counter() - started) * 1000)
    if isinstance(kv, CountingKV):
        cycles.conflicts = kv.conflicts - before
    return cycles


def cpu_device(capacity_mb: int) -> Device:
    return Device("cpu", capacity_mb, reserve_mb=0, mode="balanced")


def fresh_host() -> str:
    return f"bench-{uuid.uuid4().hex[:8]}"


# --- the worker processes ----------------------------------------------------------------------
async def worker(spec: dict[str, Any]) -> None:
    """One contending process: per stdin plan, warm up, say ``warm``, wait for ``go``, run.

    Prints ``ready`` once connected and one JSON line of :class:`Cycles` per plan.
    """
    loop = asyncio.get_running_loop()
    nc = await nats.connect(spec["url"])
    try:
        kv = CountingKV(await nc.jetstream(timeout=10).key_value(spec["bucket"]))
        print("ready", flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            plan = orjson.loads(line)
            holder = Holder.here(plan["host"], spec["worker"])
            ledger = Ledger(kv, cpu_device(plan["capacity_mb"]), holder)
            async with ledger:
                hold_s = plan["hold_ms"] / 1000
                await run_cycles(ledger, WORKER_WARMUP, hold_s)
                print("warm", flush=True)
                await loop.run_in_executor(None, sys.stdin.readline)
                cycles = await run_cycles(ledger, plan["cycles"], hold_s)
            print(orjson.dumps(cycles.__dict__).decode(), flush=True)
    finally:
        await nc.close()


class Workers:
    """Worker processes, started once and fed one plan per contended case."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, url: str, count: int) -> None:
        for n in range(count):
            spec = orjson.dumps({"url": url, "bucket": BUCKET, "worker": f"w{n}"}).decode()
            self.procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "tests.bench.bench_leases",
                    "--worker",
                    spec,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=ROOT,
                )
            )
        await self._all_say(b"ready")

    async def _send(self, line: bytes) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(line + b"\n")
        await asyncio.gather(*(p.stdin.drain() for p in self.procs if p.stdin is not None))

    async def _read(self, proc: asyncio.subprocess.Process) -> bytes:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), WORKER_TIMEOUT_S)
        if not line:
            raise RuntimeError(f"lease worker {proc.pid} exited with code {await proc.wait()}")
        return line.rstrip(b"\n")

    async def _all_say(self, word: bytes) -> None:
        for line in await asyncio.gather(*(self._read(p) for p in self.procs)):
            if line != word:
                raise RuntimeError(f"lease worker said {line!r}, not {word!r}")

    async def run(self, capacity_mb: int, cycles: int, hold_ms: float) -> Cycles:
        plan = {
            "host": fresh_host(),
            "capacity_mb": capacity_mb,
            "cycles": cycles,
            "hold_ms": hold_ms,
        }
        await self._send(orjson.dumps(plan))
        await self._all_say(b"warm")
        await self._send(b"go")
        total = Cycles()
        for line in await asyncio.gather(*(self._read(p) for p in self.procs)):
            total.extend(Cycles(**orjson.loads(line)))
        return total

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


async def measure_leases(url: str, kv: KeyValue, opts: Options) -> dict[str, Any]:
    hold_s = opts.hold_ms / 1000
    holder = Holder.here(fresh_host(), "solo")
    async with Ledger(kv, cpu_device(UNCONTENDED_CAPACITY_MB), holder) as ledger:
        await run_cycles(ledger, SOLO_WARMUP, hold_s)
        solo = await run_cycles(ledger, opts.cycles, hold_s)
    print(solo.line("uncontended"), flush=True)
    workers = Workers()
    try:
        await workers.start(url, opts.procs)
        fits = await workers.run(opts.procs * LEASE_MB, opts.proc_cycles, opts.hold_ms)
        print(fits.line("contended"), flush=True)
        half = max(1, opts.procs // 2) * LEASE_MB
        queued = await workers.run(half, opts.proc_cycles, opts.hold_ms)
        print(queued.line("queued"), flush=True)
    finally:
        await workers.stop()
    return {
        **solo.summary(""),
        **fits.summary("contended_"),
        "contended_cas_retries_per_cycle": rounded(fits.conflicts / len(fits.acquire_ms)),
        **queued.summary("queued_"),
        "queued_cas_retries_per_cycle": rounded(queued.conflicts / len(queued.acquire_ms)),
    }


# --- the model swap ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    name: str
    mb: int  # what it really takes
    load: Callable[[], Any]

    @property
    def estimate_mb(self) -> int:
        """The estimate given to ResidentModels: 10% high, so the lease is resized."""
        return math.ceil(self.mb * ESTIMATE_FACTOR)


def bytes_model(name: str, mb: int, fill: int) -> Model:
    def load() -> bytearray:
        return bytearray((fill,)) * (mb * MIB)  # a memset: every page is touched

    return Model(name, mb, load)


def torch_model(name: str, mb: int) -> Model:
    torch: Any = importlib.import_module("torch")
    layer_bytes = (LAYER * LAYER + LAYER) * 4  # float32 weight and bias
    layers = max(1, round(mb * MIB / layer_bytes))

    def load() -> Any:
        with torch.no_grad():
            return torch.nn.Sequential(*(torch.nn.Linear(LAYER, LAYER) for _ in range(layers)))

    return Model(name, math.ceil(layers * layer_bytes / MIB), load)


def touch(model: Any) -> None:
    """Use the model a little, so neither variant could skip it."""
    if isinstance(model, bytearray):
        _ = model[0] + model[-1]
    else:
        next(model.parameters()).sum()


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def mem_available_mb() -> int | None:
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return None


def timed(load: Callable[[], Any], times: list[float]) -> Callable[[], Any]:
    """``load``, appending how long each call took (ms, in the thread that ran it) to ``times``."""

    def run() -> Any:
        started = time.perf_counter()
        loaded = load()
        times.append((time.perf_counter() - started) * 1000)
        return loaded

    return run


@dataclass
class Slot:
    """Where the raw variant keeps its one model.

    The loader stores the model here rather than returning it. A result returned through
    ``run_in_executor`` is also held by the executor's future and the asyncio future
    chained to it, which reference each other: it lives on until the garbage collector's
    next pass, so clearing the caller's variable frees nothing at once (darkroom's unload
    runs ``gc.collect()`` for that reason). Clearing the slot frees the model at once,
    before the next load starts, as a GPU needs.
    """

    model: Any = None

    def fill(self, load: Callable[[], Any]) -> None:
        self.model = load()


class RawSwapper:
    """Holds one model; a swap drops it and loads the other."""

    variant = "raw"

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        self._executor = executor
        self._slot = Slot()
        self.loads_ms: list[float] = []

    async def swap(self, model: Model) -> float:
        """Switch to ``model``; the time it took, in ms."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        self._slot.model = None  # the two do not fit: the other one goes first
        await loop.run_in_executor(
            self._executor, self._slot.fill, timed(model.load, self.loads_ms)
        )
        touch(self._slot.model)
        return (time.perf_counter() - started) * 1000

    async def close(self) -> None:
        self._slot.model = None


class DarkroomSwapper:
    """ResidentModels on a ledger; a swap is one ``use`` of the other model."""

    variant = "darkroom"

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._resident = ResidentModels(ledger, mode="balanced", idle_ttl_s=3600)
        self.loads_ms: list[float] = []

    async def _use(self, model: Model) -> None:  # keeps no reference past the block
        load = timed(model.load, self.loads_ms)
        declared = BusModel(model.name, model.estimate_mb, lambda placement: load())
        async with self._resident.use(declared) as loaded:
            touch(loaded)

    async def swap(self, model: Model) -> float:
        started = time.perf_counter()
        await self._use(model)
        took = (time.perf_counter() - started) * 1000
        loaded = self._resident.loaded
        leases = [x.model for x in (await self._ledger.snapshot()).leases]
        if loaded != [model.name] or leases != [model.name]:
            raise RuntimeError(f"after use({model.name}): loaded {loaded}, leases {leases}")
        return took

    async def close(self) -> None:
        await self._resident.close()


@dataclass
class Swaps:
    """Every timed switch of both variants and the load inside it (ms), paired by round."""

    raw_swap_ms: list[float] = field(default_factory=list)
    raw_load_ms: list[float] = field(default_factory=list)
    darkroom_swap_ms: list[float] = field(default_factory=list)
    darkroom_load_ms: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)

    def add(self, variant: str, swap_ms: float, load_ms: float) -> None:
        getattr(self, f"{variant}_swap_ms").append(swap_ms)
        getattr(self, f"{variant}_load_ms").append(load_ms)
        self.rss_mb.append(rss_mb())

    def ratio(self, i: int) -> float:
        """Round ``i``'s overhead: darkroom's switch over raw's, per ms of raw load."""
        return (self.darkroom_swap_ms[i] - self.raw_swap_ms[i]) / self.raw_load_ms[i]

    def net_ratio(self, i: int) -> float:
        """The same with each switch's own load taken out: what each adds around a load."""
        dark = self.darkroom_swap_ms[i] - self.darkroom_load_ms[i]
        raw = self.raw_swap_ms[i] - self.raw_load_ms[i]
        return (dark - raw) / self.raw_load_ms[i]

    def summary(self) -> dict[str, Any]:
        raw, load, dark = self.raw_swap_ms, self.raw_load_ms, self.darkroom_swap_ms
        rounds = range(len(dark))
        ratios = [self.ratio(i) for i in rounds]

        def median(values: Iterable[float], digits: int = 1) -> float | None:
            return rounded(statistics.median(values), digits)

        return {
            "swap_overhead_ratio": median(ratios, 4),
            "swap_overhead_ratio_best": rounded((min(dark) - min(raw)) / min(load), 4),
            "swap_overhead_ratio_net": median((self.net_ratio(i) for i in rounds), 4),
            "swap_round_ratios": [round(x, 4) for x in ratios],
            "swap_overhead_ms": median((dark[i] - raw[i] for i in rounds), 2),
            "raw_load_ms": median(load),
            "raw_load_best_ms": rounded(min(load), 1),
            "raw_swap_ms": median(raw),
            "raw_swap_best_ms": rounded(min(raw), 1),
            "darkroom_swap_ms": median(dark),
            "darkroom_swap_best_ms": rounded(min(dark), 1),
            "darkroom_load_ms": median(self.darkroom_load_ms),
            "raw_outside_load_ms": median((raw[i] - load[i] for i in rounds), 2),
            "darkroom_outside_load_ms": median(
                (dark[i] - self.darkroom_load_ms[i] for i in rounds), 2
            ),
            "rss_max_mb": round(max(self.rss_mb)),
        }


async def measure_swaps(kv: KeyValue, opts: Options) -> dict[str, Any]:
    if opts.payload == "torch":
        models = (torch_model("model-a", opts.model_mb), torch_model("model-b", opts.model_mb))
    else:
        models = (
            bytes_model("model-a", opts.model_mb, 0xA),
            bytes_model("model-b", opts.model_mb, 0xB),
        )
    model_mb = max(m.mb for m in models)
    capacity = math.ceil(model_mb / MODEL_SHARE)
    base_rss = rss_mb()
    print(f"swap: 2 models of {model_mb} MB ({opts.payload}) on a {capacity} MB device", flush=True)
    swaps = Swaps()
    holder = Holder.here(fresh_host(), "resident")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader") as executor:
        async with Ledger(kv, cpu_device(capacity), holder) as ledger:
            raw, dark = RawSwapper(executor), DarkroomSwapper(ledger)
            try:
                for swapper in (raw, dark):
                    await swapper.swap(models[0])  # the first load is no swap
                for r in range(opts.rounds):
                    model = models[(r + 1) % 2]
                    for swapper in (raw, dark) if r % 2 == 0 else (dark, raw):
                        loads = len(swapper.loads_ms)
                        took = await swapper.swap(model)
                        swaps.add(swapper.variant, took, sum(swapper.loads_ms[loads:]))
                    print(
                        f"  round {r + 1:>2} to {model.name}: raw swap "
                        f"{swaps.raw_swap_ms[-1]:7.1f} ms (load {swaps.raw_load_ms[-1]:7.1f}), "
                        f"darkroom swap {swaps.darkroom_swap_ms[-1]:7.1f} ms "
                        f"(load {swaps.darkroom_load_ms[-1]:7.1f}); overhead ratio "
                        f"{swaps.ratio(r):+.4f}, net {swaps.net_ratio(r):+.4f}",
                        flush=True,
                    )
            finally:
                await dark.close()
                await raw.close()
    return {
        **swaps.summary(),
        "rss_base_mb": round(base_rss),
        "model_mb": model_mb,
        "device_capacity_mb": capacity,
        "payload": opts.payload,
    }


# --- the benchmark -----------------------------------------------------------------------------
@dataclass
class Options:
    cycles: int
    procs: int
    proc_cycles: int
    hold_ms: float
    model_mb: int
    rounds: int
    payload: str
    parts: tuple[str, ...]


def print_summary(s: dict[str, Any]) -> None:
    print()
    print(f"Summary ({s['machine']['cpu_count']} CPUs):")
    if "acquire_p50_ms" in s:
        for case, prefix in (
            ("uncontended", ""),
            ("contended", "contended_"),
            ("queued", "queued_"),
        ):
            print(
                f"  {case:<11} acquire p50 {shown(s[prefix + 'acquire_p50_ms'], ' ms')}, "
                f"p99 {shown(s[prefix + 'acquire_p99_ms'], ' ms')}; "
                f"release p50 {shown(s[prefix + 'release_p50_ms'], ' ms')}, "
                f"p99 {shown(s[prefix + 'release_p99_ms'], ' ms')}"
            )
    if "swap_overhead_ratio" in s:
        print(
            f"  swap        {s['model_mb']} MB models: raw load {shown(s['raw_load_ms'], ' ms')}, "
            f"raw swap {shown(s['raw_swap_ms'], ' ms')}, darkroom swap "
            f"{shown(s['darkroom_swap_ms'], ' ms')} (medians); around the load: raw "
            f"{shown(s['raw_outside_load_ms'], ' ms')}, darkroom "
            f"{shown(s['darkroom_outside_load_ms'], ' ms')}"
        )
        print(
            f"              overhead ratio {shown(s['swap_overhead_ratio'])} (goal <= 0.10); "
            f"best against best {shown(s['swap_overhead_ratio_best'])}; "
            f"net of load noise {shown(s['swap_overhead_ratio_net'])}"
        )
    print(f"  whole run   {s['elapsed_s']:.1f} s")


async def run(opts: Options) -> dict[str, Any]:
    started, load_before, mem_before = time.perf_counter(), load_average(), mem_available_mb()
    if "swap" in opts.parts and mem_before is not None and opts.model_mb > mem_before // 5:
        scaled = max(64, mem_before // 5)
        print(f"only {mem_before} MB available: models of {scaled} MB, not {opts.model_mb}")
        opts.model_mb = scaled
    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-leases-") as tmp:
        server = NatsServer(Path(tmp) / "nats-data", port=0)
        await server.start()
        try:
            nc: NATS = await nats.connect(server.url, name="bench-leases")
            try:
                kv = await key_value(nc.jetstream(timeout=10), BUCKET)
                print(f"nats-server {server.url}", flush=True)
                if "leases" in opts.parts:
                    summary.update(await measure_leases(server.url, kv, opts))
                if "swap" in opts.parts:
                    summary.update(await measure_swaps(kv, opts))
            finally:
                await nc.close()
        finally:
            await server.stop()
    summary.update(
        {
            "hold_ms": opts.hold_ms,
            "procs": opts.procs,
            "rounds": opts.rounds,
            "machine": {
                "cpu_count": os.cpu_count(),
                "mem_available_mb": mem_before,
                "load_avg_1m": [load_before, load_average()],
            },
            "elapsed_s": round(time.perf_counter() - started, 1),
        }
    )
    print_summary(summary)
    return summary


def parse_args(argv: list[str] | None = None) -> Options | dict[str, Any]:
    """The options, or (with ``--worker``) the spec of a worker process."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--cycles", type=int, default=300, help="uncontended lease cycles")
    parser.add_argument("--procs", type=int, default=8, help="contending worker processes")
    parser.add_argument("--proc-cycles", type=int, default=100, help="cycles per worker")
    parser.add_argument("--hold-ms", type=float, default=5.0, help="hold between acquire/release")
    parser.add_argument("--model-mb", type=int, default=1024, help="size of each swapped model")
    parser.add_argument("--rounds", type=int, default=12, help="swaps of each variant")
    parser.add_argument("--payload", choices=("bytes", "torch"), default="bytes")
    parser.add_argument("--only", choices=("leases", "swap"), help="run one part")
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec: dict[str, Any] = orjson.loads(args.worker)
        return spec
    if args.quick:
        args.cycles, args.proc_cycles, args.model_mb, args.rounds = 50, 15, 512, 3
    if min(args.cycles, args.procs, args.proc_cycles, args.rounds, args.model_mb) < 1:
        parser.error("counts and sizes must be >= 1")
    if args.hold_ms < 0:
        parser.error("--hold-ms must be >= 0")
    if args.payload == "torch" and importlib.util.find_spec("torch") is None:
        parser.error("--payload torch needs torch installed")
    given = {f.name: getattr(args, f.name) for f in fields(Options) if f.name != "parts"}
    return Options(**given, parts=(args.only,) if args.only else ("leases", "swap"))


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if isinstance(opts, dict):
        asyncio.run(worker(opts))
        return 0
    return run_and_report(lambda: asyncio.run(run(opts)))


if __name__ == "__main__":
    sys.exit(main())
