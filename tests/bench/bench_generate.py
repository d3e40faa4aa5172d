"""Generation throughput: batched against unbatched, and what a model switch costs.

Run with ``python -m tests.bench.bench_generate [--n 32] [--rounds 2] [--torch-threads 1]
[--affinity-rounds 16] [--quick]`` anywhere, or with ``--gpu [--device cuda:0]`` on a
machine with CUDA: the same runs on that device (the SDXL-architecture figures at 1024x1024 are
``tests/gpu/smoke_generate.py``'s).

What runs
---------
The real generate function (``functions.generate.handler.FUNCTION``) in a
:class:`FunctionRunner`, over a real nats-server and a real SeaweedFS started in a temporary
directory, with a catalogue of two tiny Stable Diffusion pipelines, ``a`` and ``b``
(:func:`bus.models.demo.build_tiny_sd`, random weights, built offline into the temporary
directory and named as local sources, so they load through diffusers' own
``from_pretrained``), each making 128x128 images in 4 steps with guidance off. Every job
is a txt2img job of one image (n=1), all of them compatible (same model, size and steps;
prompts and seeds differ).

On the CPU, torch runs on one intra-op thread (``--torch-threads``; 0 is torch's default,
a thread per core): the pipeline shares the cores with the worker's own I/O, nats-server
and SeaweedFS, and with a thread per core its calls slowed 5-20 times whenever anything
else ran on a 2-core machine, so the figures swung between rounds by as much.

Each run opens a fresh namespace (its streams and consumer declared with the run's Spec)
and a fresh context, so runs never see each other's events or models. The function's own
``setup`` builds its state from the run's settings; the run's models are then loaded under
leases and warmed up by calling the batch handler directly, so a run's figure pays for no
first call. Then ``--n`` jobs are stored and announced as the gateway does (a backlog),
the clock starts, the runner starts, and the run ends when the last ``generated`` event
reaches a core subscription: ``rps = n / (last generated - runner start)``. A
dead-lettered job fails the run. Wrappers count the model loads (``Pipelines.load``: the
real one runs inside, timed) and the pipeline calls (the handler's ``run``: images per call,
and their share of the run's wall time).

Variants (one function each; a section's variants alternate for ``--rounds`` rounds; a
variant's figure is its best run):

* **batching** (model ``a`` only): ``generate.batch`` = 1 with a Spec batch of 1 (no linger),
  against 4 and 8 (``generate.batch`` and the Spec's batch both set to it, the Spec's linger
  kept). ``batched_rps`` is the best batched figure; ``speedup`` is it over ``unbatched_rps``.
* **model switch** (``a`` and ``b``): the device has room for one of them (the lease size
  each asks for is the device's whole usable memory), so loading one unloads the other.
  The backlog alternates a, b, a, b... or is the same jobs sorted a...a, b...b; both start
  with neither model loaded, on one worker fetching one job at a time (batch 1, as in
  ``unbatched``), so every job that names the other model is a switch: the worst case, the
  one affinity across workers is meant to spare a worker. (With the shipped Spec the
  handler groups a fetched batch by model: alternating jobs then cost about two loads per
  fetch, not one per job.) ``switch_load_s`` is the mean time of a load, ``switch_cost_s``
  the wall time each extra load added (alternating against sorted: the unload, the lease
  round trips and the load).
* **affinity** (two ``darkroom worker generate`` processes, two models, each worker's
  device with room for one model: a ledger document of its own, by host id): ``--affinity-
  rounds`` rounds (16), each announcing a job for ``a`` and one for ``b`` at once (in an
  order drawn per round, seeded) and waiting for both. With affinity the jobs go on
  ``requested.<model>`` as the gateway sends them (the keyed consumers, with priorities:
  see ``bus.runtime.registry.Affinity``);
  without, on the plain ``requested`` subject, which every worker pulls from alike (a plain
  shared consumer). Each variant starts two fresh workers in a fresh namespace, and counts
  the loads from the workers' own log lines (one per load): ``affinity_loads`` and
  ``shared_loads``.

The last line printed is one JSON object: ``unbatched_rps``, ``batched_rps``, ``speedup``,
per batch size its requests/s, images per call and pipeline share, ``switch_load_s``,
``alternating_loads``, ``sorted_loads``, ``alternating_rps``, ``sorted_rps``,
``switch_cost_s``, ``affinity_loads``/``shared_loads``, ``gpu`` (null off CUDA), and
the machine's CPU count, load average before and after, and torch's thread count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from bus.core import subjects
from bus.core.envelope import Event, new_id, now_iso
from bus.core.generation import check_request
from bus.core.settings import (
    GenerateModel,
    GenerateSettings,
    GpuSettings,
    NatsSettings,
    S3Settings,
    Settings,
)
from bus.gpu.leases import MIB
from bus.models.demo import build_tiny_sd, import_diffusers
from bus.ops.embedded import NatsServer, S3Credentials, SeaweedFS
from bus.runtime.context import Context, open_context
from bus.runtime.runner import FunctionRunner
from functions.generate import handler
from functions.generate.handler import FUNCTION, SPEC, handle_batch
from functions.generate.pipelines import Pipelines
from functions.generate.pipelines import run as pipeline_run
from functions.generate.state import GenerateState, setup
from tests.bench.harness import Observer, calls, publish, raise_failures
from tests.bench.report import load_average, rounded, run_and_report, shown
from tests.gpu.smoke_leases import cuda_torch

MODELS = ("a", "b")
SIDE = 128
STEPS = 4
DEVICE_MB = 256  # the device's usable memory, and what each model's lease asks for first
STOP_TIMEOUT_S = 30.0
STAGE_PARALLEL = 16  # S3 writes in flight while staging the backlog
AFFINITY_ROUNDS = 16
WORKER_READY = "generate: prepared; fetching events"
LOADED_RE = re.compile(r"loaded generate:(\S+) on ")
GPU_NOTE = "SDXL-architecture figures at 1024x1024: python -m tests.gpu.smoke_generate"


# --- what a run measures -----------------------------------------------------------------------
class Probes:
    """Time the model loads (``Pipelines.load``) and the pipeline calls (the handler's
    ``run``); the real ones run inside, on the device's thread."""

    def __init__(self) -> None:
        self.loads: list[float] = []  # seconds per load
        self.calls: list[tuple[int, float]] = []  # (images, seconds) per pipeline call
        self._lock = threading.Lock()
        self._undo: list[Callable[[], None]] = []

    def install(self) -> None:
        real_load = Pipelines.load  # bound to the class: what the model's load calls
        real_run = pipeline_run  # what the handler calls

        def load(*args: Any) -> Pipelines:
            started = time.perf_counter()
            try:
                return real_load(*args)
            finally:
                with self._lock:
                    self.loads.append(time.perf_counter() - started)

        def run(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return real_run(*args)
            finally:
                with self._lock:
                    self.calls.append((len(args[2]), time.perf_counter() - started))

        original = Pipelines.__dict__["load"]
        setattr(Pipelines, "load", staticmethod(load))  # noqa: B010 (restored by restore())
        setattr(handler, "run", run)  # noqa: B010 (the handler looks it up per call)
        self._undo += [
            lambda: setattr(Pipelines, "load", original),
            lambda: setattr(handler, "run", real_run),
        ]

    def take(self) -> tuple[list[float], list[tuple[int, float]]]:
        """What was timed since the last take, and start afresh."""
        with self._lock:
            taken = self.loads, self.calls
            self.loads, self.calls = [], []
        return taken

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


@dataclass
class Run:
    label: str
    round: int
    n: int
    elapsed_s: float
    first_s: float  # from the runner's start to the first generated event
    loads: list[float]
    calls: list[tuple[int, float]]

    @property
    def rps(self) -> float:
        return self.n / self.elapsed_s if self.elapsed_s > 0 else math.nan

    @property
    def images_per_call(self) -> float:
        return sum(i for i, _ in self.calls) / len(self.calls) if self.calls else math.nan

    @property
    def pipeline_share(self) -> float:
        """The share of the wall time spent inside pipeline calls."""
        return sum(s for _, s in self.calls) / self.elapsed_s if self.elapsed_s > 0 else math.nan

    def line(self) -> str:
        load = f", {statistics.mean(self.loads):.3f} s each" if self.loads else ""
        return (
            f"  {self.label:<11} round {self.round + 1}: {self.n} jobs in {self.elapsed_s:.2f} s "
            f"= {self.rps:.2f} requests/s, first after {self.first_s:.2f} s; "
            f"{len(self.calls)} pipeline calls of {self.images_per_call:.1f} images "
            f"({100 * self.pipeline_share:.0f}% of the time), {len(self.loads)} loads{load}"
        )


# --- the variants ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One way to run the backlog on one worker."""

    label: str
    models: tuple[str, ...]  # each job's model, in the order they are announced
    batch: int  # images per pipeline call: generate.batch, and the Spec's batch
    cold: bool = False  # start with no model loaded


def unbatched(n: int) -> Variant:
    return Variant("batch 1", (MODELS[0],) * n, batch=1)


def batched(n: int, batch: int) -> Variant:
    return Variant(f"batch {batch}", (MODELS[0],) * n, batch=batch)


def alternating(n: int) -> Variant:
    return Variant("alternating", tuple(MODELS[i % 2] for i in range(n)), batch=1, cold=True)


def sorted_by_model(n: int) -> Variant:
    models = tuple(sorted(MODELS[i % 2] for i in range(n)))
    return Variant("sorted", models, batch=1, cold=True)


# --- the bus -----------------------------------------------------------------------------------
@dataclass
class Servers:
    nats: NatsServer
    s3: SeaweedFS
    data_dir: Path
    generate: GenerateSettings
    gpu: GpuSettings
    bucket: str = field(default_factory=lambda: f"bench{uuid.uuid4().hex[:10]}")

    def settings(self, namespace: str, batch: int) -> Settings:
        generate = self.generate.model_copy(update={"batch": batch})
        return Settings(
            data_dir=self.data_dir,
            namespace=namespace,
            log_level="warning",
            nats=NatsSettings(url=self.nats.url),
            s3=S3Settings(
                endpoint=self.s3.url,
                access_key=self.s3.credentials.access_key,
                secret_key=SecretStr(self.s3.credentials.secret_key),
                bucket=self.bucket,
            ),
            generate=generate,
            gpu=self.gpu,
        )


@contextlib.asynccontextmanager
async def servers(
    root: Path, generate: GenerateSettings, gpu: GpuSettings
) -> AsyncIterator[Servers]:
    nats_server = NatsServer(root / "nats-data", port=0)
    s3_server = SeaweedFS(root / "s3-data", S3Credentials.load_or_create(root / "s3.json"), port=0)
    await nats_server.start()
    try:
        await s3_server.start()
        try:
            yield Servers(nats_server, s3_server, root / "darkroom", generate, gpu)
        finally:
            await s3_server.stop()
    finally:
        await nats_server.stop()


def job_event(settings: Settings, model: str, index: int) -> Event:
    """A checked txt2img job of one image, as the ``requested`` event the gateway fires."""
    job = check_request(
        {"prompt": f"a lighthouse on a cliff at dusk, study {index}", "model": model},
        settings.generate,
        job_id=new_id(),
        created=now_iso(),
        seed=1000 + index,
        source="bench",
    )
    return Event(
        id=f"requested-{job.id}",
        type=subjects.REQUESTED,
        source="bench/generate",
        time=now_iso(),
        job_id=job.id,
        data=job.to_doc(),
    )


async def stage(ctx: Context, models: Sequence[str]) -> list[Event]:
    """Store the jobs' request documents as the gateway does; their events (not sent)."""
    limit = asyncio.Semaphore(STAGE_PARALLEL)

    async def one(index: int, model: str) -> Event:
        event = job_event(ctx.settings, model, index)
        async with limit:
            ref = await ctx.store.put_json(subjects.request_key(event.job_id or ""), event.data)
        return dataclasses.replace(event, object=ref)

    return list(await asyncio.gather(*(one(i, m) for i, m in enumerate(models))))


async def warm_up(ctx: Context, state: GenerateState, groups: list[list[str]]) -> None:
    """Run the handler directly on each group of jobs (loading their models under leases)."""
    for models in groups:
        events = [job_event(ctx.settings, m, -1 - i) for i, m in enumerate(models)]
        raise_failures(await handle_batch(events, ctx, calls(events, SPEC, state)))


# --- one run -----------------------------------------------------------------------------------
async def one_worker(servers: Servers, probes: Probes, variant: Variant, round_: int) -> Run:
    """The variant's backlog through one worker in this process."""
    # A batch of one never lingers (the Spec refuses a linger without batching).
    linger = SPEC.batch_wait_s if variant.batch > 1 else 0.0
    spec = dataclasses.replace(SPEC, batch=variant.batch, batch_wait_s=linger)
    settings = servers.settings(f"bench{uuid.uuid4().hex[:10]}", variant.batch)
    async with open_context(settings, [spec], "bench-generate") as ctx:
        assert ctx.gpu is not None
        state = await setup(ctx)
        used = sorted(set(variant.models))
        await warm_up(ctx, state, [[m] for m in used] + [[used[0]] * variant.batch])
        if variant.cold:
            for name in ctx.gpu.loaded:
                await ctx.gpu.unload(name)

        async def prepared(_: Context) -> GenerateState:
            return state

        fn = dataclasses.replace(FUNCTION, spec=spec, setup=prepared)
        events = await stage(ctx, variant.models)
        observer = Observer({e.job_id or "" for e in events}, "job_id")
        subs = [
            await ctx.nc.subscribe(ctx.names.subject(subjects.GENERATED), cb=observer.on_result),
            await ctx.nc.subscribe(ctx.names.dead_letter(SPEC.name), cb=observer.on_dead_letter),
        ]
        await ctx.nc.flush()
        await publish(ctx, subjects.REQUESTED, events)
        probes.take()  # the warm-up's
        started = time.perf_counter()
        runner = FunctionRunner(fn, ctx)
        await runner.start()
        try:
            await asyncio.wait_for(observer.complete.wait(), 120 + 5 * len(events))
        except TimeoutError:
            raise RuntimeError(
                f"{variant.label}: only {len(observer.done)} of {len(events)} jobs generated"
            ) from None
        finally:
            await runner.drain(timeout=STOP_TIMEOUT_S)
            for sub in subs:
                await sub.unsubscribe()
        loads, calls = probes.take()
        if observer.failure:
            raise RuntimeError(f"{variant.label}: {observer.failure}")
    run = Run(
        label=variant.label,
        round=round_,
        n=len(events),
        elapsed_s=observer.last - started,
        first_s=observer.first - started,
        loads=loads,
        calls=calls,
    )
    print(run.line(), flush=True)
    return run


# --- two worker processes: model affinity --------------------------------------------------------
def worker_env(settings: Settings, config: Path, host: str) -> dict[str, str]:
    """A ``darkroom worker``'s environment: the run's servers, the catalogue and device
    in ``config``, and a host id of its own (a device, a ledger document, to itself)."""
    assert settings.s3.secret_key is not None
    return {
        **os.environ,
        "DARKROOM_CONFIG": str(config),
        "DARKROOM_NAMESPACE": settings.namespace,
        "DARKROOM_NATS__URL": settings.nats.url or "",
        "DARKROOM_S3__ENDPOINT": settings.s3.endpoint or "",
        "DARKROOM_S3__ACCESS_KEY": settings.s3.access_key or "",
        "DARKROOM_S3__SECRET_KEY": settings.s3.secret_key.get_secret_value(),
        "DARKROOM_S3__BUCKET": settings.s3.bucket,
        "DARKROOM_DATA_DIR": str(settings.data_dir),
        "DARKROOM_GPU__HOST_ID": host,
        "DARKROOM_LOG_LEVEL": "info",
        "PYTHONUNBUFFERED": "1",
    }


def worker_config(servers: Servers, path: Path) -> Path:
    """The catalogue and the device as a settings file for the worker processes."""
    lines = ["[generate]", f'default_model = "{MODELS[0]}"', f'cpu_model = "{MODELS[0]}"']
    for name, entry in servers.generate.models.items():
        lines += [
            f"[generate.models.{name}]",
            f'source = "{entry.source}"',
            f"width = {entry.width}",
            f"height = {entry.height}",
            f"steps = {entry.steps}",
            f"guidance = {entry.guidance}",
            f"vram_mb = {entry.vram_mb}",
        ]
    gpu = servers.gpu
    lines += ["[gpu]", f'device = "{gpu.device}"', f"cpu_capacity_mb = {gpu.cpu_capacity_mb}"]
    if gpu.reserve_mb is not None:
        lines.append(f"reserve_mb = {gpu.reserve_mb}")
    path.write_text("\n".join(lines) + "\n")
    return path


async def wait_for_line(proc: asyncio.subprocess.Process, lines: list[str], needle: str) -> None:
    deadline = time.monotonic() + 300
    while not any(needle in line for line in lines):
        if proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"a worker never said {needle!r}:\n" + "\n".join(lines[-40:]))
        await asyncio.sleep(0.1)


async def two_workers(servers: Servers, keyed: bool, rounds: int) -> int:
    """``rounds`` rounds of a job for each model at once on two worker processes; the
    loads they made. ``keyed``: jobs on their model's subject (affinity), else plain."""
    settings = servers.settings(f"bench{uuid.uuid4().hex[:10]}", servers.generate.batch)
    config = worker_config(servers, servers.data_dir.parent / f"{settings.namespace}.toml")
    async with open_context(settings, [SPEC], "bench-generate-affinity") as ctx:
        procs: list[tuple[asyncio.subprocess.Process, list[str], asyncio.Task[None]]] = []
        try:
            for host in ("worker-a", "worker-b"):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bus.ops.cli",
                    "worker",
                    "generate",
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    env=worker_env(settings, config, host),
                )
                lines: list[str] = []

                async def read(
                    p: asyncio.subprocess.Process = proc, out: list[str] = lines
                ) -> None:
                    assert p.stdout is not None
                    while line := await p.stdout.readline():
                        out.append(line.decode(errors="replace").rstrip())

                procs.append((proc, lines, asyncio.create_task(read())))
            for proc, lines, _ in procs:
                await wait_for_line(proc, lines, WORKER_READY)
            for r in range(rounds):
                # Which model comes first changes from round to round (seeded): with a
                # shared consumer the order decides which worker gets which model.
                events = await stage(ctx, random.Random(r).sample(MODELS, len(MODELS)))
                observer = Observer({e.job_id or "" for e in events}, "job_id")
                sub = await ctx.nc.subscribe(
                    ctx.names.subject(subjects.GENERATED), cb=observer.on_result
                )
                try:
                    for event in events:
                        model = event.data["model"]
                        topic = f"{subjects.REQUESTED}.{model}" if keyed else subjects.REQUESTED
                        await publish(ctx, topic, [event])
                    await asyncio.wait_for(observer.complete.wait(), 300)
                finally:
                    await sub.unsubscribe()
        finally:
            for proc, _, _ in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            for proc, _, reader in procs:
                await asyncio.wait_for(proc.wait(), 60)
                await reader
    per_worker = [
        Counter(m.group(1) for line in lines if (m := LOADED_RE.search(line)))
        for _, lines, _ in procs
    ]
    loads = sum(sum(found.values()) for found in per_worker)
    print(
        f"  {'affinity' if keyed else 'shared':<11} {rounds} rounds of ({', '.join(MODELS)}) "
        f"on 2 workers: {loads} loads, by worker {[dict(w) for w in per_worker]}",
        flush=True,
    )
    return loads


Measure = Callable[[Variant, int], Awaitable[Run]]


async def section(measure: Measure, variants: list[Variant], rounds: int) -> list[Run]:
    """The variants alternating, ``rounds`` times."""
    return [await measure(v, round_) for round_ in range(rounds) for v in variants]


# --- the benchmark -----------------------------------------------------------------------------
@dataclass
class Options:
    n: int
    rounds: int
    batches: tuple[int, ...]
    torch_threads: int
    gpu: bool
    device: str
    affinity_rounds: int = AFFINITY_ROUNDS


def catalogue(root: Path) -> GenerateSettings:
    """Two tiny SD pipelines as local catalogue models (built offline, here)."""
    models = {}
    for name in MODELS:
        build_tiny_sd(root / name)
        models[name] = GenerateModel(
            source=str(root / name),
            width=SIDE,
            height=SIDE,
            steps=STEPS,
            guidance=0.0,
            vram_mb=DEVICE_MB,
        )
    return GenerateSettings(default_model=MODELS[0], cpu_model=MODELS[0], models=models)


def device_settings(opts: Options) -> GpuSettings:
    """A device with room for one model: on CUDA, all but ``DEVICE_MB`` is reserved."""
    if not opts.gpu:
        return GpuSettings(device="cpu", cpu_capacity_mb=DEVICE_MB, reserve_mb=0)
    torch = cuda_torch()
    assert torch is not None
    _, total = torch.cuda.mem_get_info(opts.device)
    return GpuSettings(device=opts.device, reserve_mb=total // MIB - DEVICE_MB)


def prepare_torch(threads: int) -> int:
    """Set torch's intra-op threads (0: leave its default, one per core) and turn off the
    progress bar of every model load (a switch run loads dozens of times); returns the
    thread count."""
    import torch
    import transformers

    if threads > 0:
        torch.set_num_threads(threads)
    loggers: list[Any] = [import_diffusers().utils.logging, transformers.utils.logging]
    for logger in loggers:
        logger.disable_progress_bar()
    return int(torch.get_num_threads())


async def run(opts: Options) -> dict[str, Any]:
    load_before = load_average()
    started = time.perf_counter()
    probes = Probes()
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        root = Path(tmp)
        os.environ["HF_HUB_OFFLINE"] = "1"  # local sources only: never ask the hub
        generate = await asyncio.to_thread(catalogue, root / "pipelines")
        threads = await asyncio.to_thread(prepare_torch, opts.torch_threads)
        async with servers(root, generate, device_settings(opts)) as bus:

            async def measure(variant: Variant, round_: int) -> Run:
                return await one_worker(bus, probes, variant, round_)

            probes.install()
            try:
                batching = await section(
                    measure,
                    [unbatched(opts.n), *(batched(opts.n, b) for b in opts.batches)],
                    opts.rounds,
                )
                switching = await section(
                    measure, [alternating(opts.n), sorted_by_model(opts.n)], opts.rounds
                )
            finally:
                probes.restore()
            affinity = {
                "affinity_loads": await two_workers(bus, True, opts.affinity_rounds),
                "shared_loads": await two_workers(bus, False, opts.affinity_rounds),
            }
    summary = summarize(batching, switching, opts)
    summary.update(affinity, affinity_rounds=opts.affinity_rounds)
    summary["elapsed_s"] = round(time.perf_counter() - started, 1)
    summary["machine"] = {
        "cpu_count": os.cpu_count(),
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": load_average(),
        "torch_threads": threads,
    }
    print_summary(summary, opts)
    return summary


def best(runs: list[Run], label: str) -> Run:
    return max((r for r in runs if r.label == label), key=lambda r: r.rps)


def summarize(batching: list[Run], switching: list[Run], opts: Options) -> dict[str, Any]:
    one = best(batching, "batch 1")
    by_batch = {b: best(batching, f"batch {b}") for b in opts.batches}
    top = max(by_batch.values(), key=lambda r: r.rps)
    ratios = [
        max(r.rps for r in batching if r.round == i and r.label != "batch 1")
        / next(r.rps for r in batching if r.round == i and r.label == "batch 1")
        for i in range(opts.rounds)
    ]
    alt, srt = best(switching, "alternating"), best(switching, "sorted")
    loads = [s for r in switching for s in r.loads]
    extra = len(alt.loads) - len(srt.loads)
    summary: dict[str, Any] = {
        "unbatched_rps": rounded(one.rps),
        "batched_rps": rounded(top.rps),
        "speedup": rounded(top.rps / one.rps) if one.rps else None,
        "best_batch": int(top.label.split()[-1]),
        "median_round_speedup": rounded(statistics.median(ratios)),
        "switch_load_s": rounded(statistics.mean(loads)) if loads else None,
        "alternating_loads": len(alt.loads),
        "sorted_loads": len(srt.loads),
        "alternating_rps": rounded(alt.rps),
        "sorted_rps": rounded(srt.rps),
        "switch_cost_s": rounded((alt.elapsed_s - srt.elapsed_s) / extra) if extra > 0 else None,
        "gpu": gpu_fields(opts),
        "device": opts.device if opts.gpu else "cpu",
    }
    for r in [one, *by_batch.values()]:
        b = r.label.split()[-1]
        summary[f"batch{b}_rps"] = rounded(r.rps)
        summary[f"batch{b}_images_per_call"] = rounded(r.images_per_call, 2)
        summary[f"batch{b}_pipeline_share"] = rounded(r.pipeline_share)
        summary[f"batch{b}_first_s"] = rounded(r.first_s)
    for r in (alt, srt):
        summary[f"{r.label}_images_per_call"] = rounded(r.images_per_call, 2)
    summary["rounds_rps"] = {
        label: [round(r.rps, 2) for r in batching + switching if r.label == label]
        for label in dict.fromkeys(r.label for r in batching + switching)
    }
    summary.update(
        n=opts.n,
        rounds=opts.rounds,
        size=f"{SIDE}x{SIDE}",
        steps=STEPS,
        models="tiny Stable Diffusion (random weights, built offline)",
        linger_s=SPEC.batch_wait_s,
        concurrency=SPEC.concurrency,
        switch_batch=1,
    )
    return summary


def gpu_fields(opts: Options) -> dict[str, Any] | None:
    torch = cuda_torch() if opts.gpu else None
    if torch is None:
        return None
    return {
        "device": opts.device,
        "name": torch.cuda.get_device_name(opts.device),
        "sdxl": GPU_NOTE,
    }


def print_summary(summary: dict[str, Any], opts: Options) -> None:
    print()
    print(
        f"Summary ({summary['device']}, {opts.n} txt2img jobs of one {summary['size']} image "
        f"at {STEPS} steps, {opts.rounds} round(s)):"
    )
    for b in (1, *opts.batches):
        print(
            f"  batch {b}: {shown(summary[f'batch{b}_rps'])} requests/s, "
            f"{shown(summary[f'batch{b}_images_per_call'])} images per call, "
            f"pipeline {shown(summary[f'batch{b}_pipeline_share'])} of the time"
        )
    print(
        f"  batched / unbatched: {shown(summary['speedup'], 'x')} at batch "
        f"{summary['best_batch']} (median of rounds {shown(summary['median_round_speedup'], 'x')})"
    )
    print(
        f"  model switch: a load takes {shown(summary['switch_load_s'], ' s')}; alternating "
        f"{summary['alternating_loads']} loads, {shown(summary['alternating_rps'])} requests/s; "
        f"sorted {summary['sorted_loads']} loads, {shown(summary['sorted_rps'])} requests/s; "
        f"{shown(summary['switch_cost_s'], ' s')} of wall time per extra load"
    )
    print(
        f"  two workers, {summary['affinity_rounds']} rounds of one job per model: "
        f"{summary['affinity_loads']} loads with affinity, {summary['shared_loads']} from a "
        "plain shared consumer"
    )
    if opts.gpu:
        print(f"  {GPU_NOTE}")


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=32, help="jobs per run (32)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per variant (2)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="torch's intra-op threads (1; with --gpu 0); 0: torch's default, one per core",
    )
    parser.add_argument("--gpu", action="store_true", help="run on CUDA (tiny models still)")
    parser.add_argument("--device", default="cuda:0", help="with --gpu: the device")
    parser.add_argument(
        "--affinity-rounds", type=int, help=f"affinity rounds ({AFFINITY_ROUNDS}; --quick 4)"
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args(argv)
    n, rounds = (8, 1) if args.quick else (args.n, args.rounds)
    threads = args.torch_threads if args.torch_threads is not None else (0 if args.gpu else 1)
    if n < 2 or rounds < 1 or threads < 0:
        parser.error("--n must be >= 2, --rounds >= 1 and --torch-threads >= 0")
    if args.gpu and cuda_torch() is None:
        parser.error("--gpu needs torch with a CUDA device")
    return Options(
        n=n,
        rounds=rounds,
        batches=(4, 8),
        torch_threads=threads,
        gpu=bool(args.gpu),
        device=args.device,
        affinity_rounds=args.affinity_rounds or (4 if args.quick else AFFINITY_ROUNDS),
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    opts = parse_args(argv)
    if opts.gpu:
        print(GPU_NOTE, flush=True)
    return run_and_report(lambda: asyncio.run(run(opts)))


if __name__ == "__main__":
    sys.exit(main())
