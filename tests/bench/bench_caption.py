"""Caption throughput: micro-batches against one image at a time, through the real bus.

Run with ``python -m tests.bench.bench_caption [--n 64] [--rounds 2] [--concurrency 2]
[--quick]`` anywhere, or ``python -m tests.bench.bench_caption --gpu [--device cuda:0]
[--n 96] [--dtype auto]`` on a machine with CUDA.

What runs
---------
The real caption function (``functions.caption.handler.FUNCTION``) in a
:class:`FunctionRunner`, over a real nats-server and a real SeaweedFS started in a temporary
directory, exactly as a worker runs it, with one change per variant: its Spec's ``batch``.
Every variant keeps the Spec's linger (``batch_wait_s``, 0.05 s; a batch of 1 has none,
which the Spec insists on, and would never wait anyway) and its ``concurrency`` (2: the
next batch is fetched and decoded while one runs).

* CPU (default): ``--n`` 640x480 displays at batch 1 and at batch 8, with the models a
  machine without internet gets under profile ``auto``: ``HF_HUB_OFFLINE=1`` and an empty
  ``HF_HUB_CACHE``, so the VLM and SigLIP are the tiny demo models, while open_nsfw and
  MiniLM are the real weights from their packages. What it shows is the batching
  machinery: the per-call costs a batch shares (the runner's fetch and settle, a
  ``generate`` and a vision pass per model, the NSFW session run, the MiniLM pass), not
  model speed.
* GPU (``--gpu``): 512x512 displays at batch 1, 8 and 32 with the architecture-true
  SmolVLM2-500M and SigLIP2-base of :mod:`tests.gpu.smoke_caption` (random weights, built
  and saved first, then named as local sources in the settings, so they load through the
  product's own path), on ``--device`` under VRAM leases. open_nsfw and MiniLM still run on
  the CPU, alongside.

In both, captions are capped at ``--max-new-tokens`` (32). Each image gets two captions, a
short and a detailed one, in one ``generate`` over the batch, so captions/s is twice
images/s when every image is captioned.

Method
------
Each run opens a fresh namespace (its own streams and consumer, declared with the run's
Spec), so runs never see each other's events. The function's state (resolved models, the
NSFW scorer, MiniLM) is built once for the whole benchmark and handed to every run's
runner by its ``setup``; the VLM and SigLIP are loaded into each run's context under leases
and warmed up by calling the batch handler directly on 1 and on ``batch`` extra images, so
no run pays for a load or a first call.

Then ``--n`` display renditions and their ingest documents are stored, as ingest stores
them, and their ``ingested`` events are published: a backlog. The clock starts, the runner
starts, and the run ends when the last ``captioned`` event reaches a core subscription:
``images_per_s = n / (last captioned - runner start)``. A dead-lettered image fails the run.

While a run goes, wrappers time each model's batch call (the real call runs): the VLM
(``Captioner.caption``, preprocessing included, and its ``generate`` alone), SigLIP
(``Siglip.analyse``), open_nsfw (``score``) and MiniLM (``embed``). NSFW scoring runs on the
CPU pool while the VLM and SigLIP run on the device's thread, so the stages overlap and
their times do not add up to the wall time. ``ctx.gpu.use`` is wrapped too: the lease
overhead is the time spent entering and leaving it (the models are resident, so it is the
cache's own bookkeeping), per use and as a share of the run's wall time. On CUDA the peak
of ``torch.cuda.max_memory_allocated`` over each run is reported.

Variants alternate (1, 8[, 32], 1, 8, ...) for ``--rounds`` rounds; a batch size's figure is
its best run, and ``median_round_speedup`` is the median of each round's batch 8 / batch 1.

The last line printed is one JSON object: ``batch1_images_per_s``, ``batch8_images_per_s``,
``speedup``, ``search_p99_ms_1m`` (null here: search latency at 10^5 and 10^6 images is
``tests/bench/bench_search.py``'s), the device, the models (and whether any is a demo),
per-batch captions/s, stage times and lease overhead, with ``--gpu`` the batch-32 figures
and peak VRAM, and the machine's CPU count and load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import logging
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from bus.core import subjects
from bus.core.contract import Model
from bus.core.envelope import Event, now_iso
from bus.core.settings import NatsSettings, S3Settings, Settings
from bus.gpu.leases import MIB
from bus.gpu.resident import ResidentModels
from bus.ops.embedded import NatsServer, S3Credentials, SeaweedFS
from bus.runtime.context import Context, open_context
from bus.runtime.runner import FunctionRunner
from functions.caption.handler import FUNCTION, SPEC, handle_batch
from functions.caption.models import Captioner, DemoNsfwScorer, NsfwScorer, Siglip
from functions.caption.state import CaptionState
from functions.caption.textembed import TextEmbedder
from tests.bench.harness import Observer, calls, publish, raise_failures
from tests.bench.report import load_average, rounded, run_and_report
from tests.gpu.smoke_caption import build_siglip, build_vlm, photo
from tests.gpu.smoke_leases import cuda_torch

STOP_TIMEOUT_S = 30.0
STAGE_PARALLEL = 16  # S3 writes in flight while staging the backlog
SEARCH_NOTE = "search latency at 1e5/1e6 images is measured by tests/bench/bench_search.py"


# --- where the time goes -----------------------------------------------------------------------
@dataclass
class Stage:
    calls: int = 0
    rows: int = 0
    seconds: float = 0.0


class Probes:
    """Wrappers that time each model's batch call; the real call runs inside."""

    def __init__(self) -> None:
        self.stages: dict[str, Stage] = {}
        self._lock = threading.Lock()  # the calls run on several threads
        self._undo: list[Callable[[], None]] = []

    def timed(
        self, name: str, real: Callable[..., Any], rows: Callable[[tuple[Any, ...], Any], int]
    ) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                with self._lock:
                    stage = self.stages.setdefault(name, Stage())
                    stage.calls += 1
                    stage.rows += rows(args, kwargs)
                    stage.seconds += elapsed

        return wrapper

    def patch(self, cls: type, method: str, name: str) -> None:
        """Time ``cls.method(self, batch, ...)``; its rows are ``len(batch)``."""
        real = cls.__dict__[method]
        setattr(cls, method, self.timed(name, real, lambda args, _: len(args[1])))
        self._undo.append(lambda: setattr(cls, method, real))

    def take(self) -> dict[str, Stage]:
        """What was timed since the last take, and start afresh."""
        with self._lock:
            taken, self.stages = self.stages, {}
        return taken

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


class LeaseTimer:
    """Times entering and leaving ``ctx.gpu.use`` (not the work done inside)."""

    def __init__(self, gpu: ResidentModels) -> None:
        self.uses = 0
        self.loads = 0  # uses that found their model not loaded (none, after the warm-up)
        self.seconds = 0.0
        real = gpu.use

        @contextlib.asynccontextmanager
        async def use(model: Model) -> AsyncIterator[Any]:
            started = time.perf_counter()
            resident = model.name in gpu.loaded
            async with real(model) as loaded:
                entered = time.perf_counter()
                try:
                    yield loaded
                finally:
                    leaving = time.perf_counter()
            self.seconds += (entered - started) + (time.perf_counter() - leaving)
            self.uses += 1
            self.loads += not resident

        setattr(gpu, "use", use)  # noqa: B010 (shadows the method on this instance only)


# --- results -----------------------------------------------------------------------------------
@dataclass
class Run:
    batch: int
    round: int
    n: int
    elapsed_s: float
    first_s: float  # from the runner's start to the first captioned event
    stages: dict[str, Stage]
    lease_uses: int
    lease_loads: int
    lease_s: float
    peak_vram_mb: float | None

    @property
    def images_per_s(self) -> float:
        return self.n / self.elapsed_s if self.elapsed_s > 0 else math.nan

    @property
    def captions_per_s(self) -> float:
        rows = self.stages.get("caption", Stage()).rows
        return rows / self.elapsed_s if self.elapsed_s > 0 else math.nan

    def split(self) -> dict[str, Any]:
        return {
            name: {"calls": s.calls, "rows": s.rows, "seconds": round(s.seconds, 3)}
            for name, s in sorted(self.stages.items())
        }

    def line(self) -> str:
        parts = [
            f"{name} {s.seconds:.2f} s/{s.calls} calls" for name, s in sorted(self.stages.items())
        ]
        vram = f"; peak VRAM {self.peak_vram_mb:,.0f} MB" if self.peak_vram_mb else ""
        per_use = 1000 * self.lease_s / self.lease_uses if self.lease_uses else math.nan
        return (
            f"  batch {self.batch:>2} round {self.round + 1}: {self.n} images in "
            f"{self.elapsed_s:.2f} s = {self.images_per_s:.2f} images/s "
            f"({self.captions_per_s:.2f} captions/s), first after {self.first_s:.2f} s\n"
            f"      {', '.join(parts)}; leases {self.lease_uses} uses, "
            f"{per_use:.3f} ms each{vram}"
        )


# --- the bus -----------------------------------------------------------------------------------
@dataclass
class Servers:
    nats: NatsServer
    s3: SeaweedFS
    data_dir: Path
    overrides: dict[str, Any]  # model and GPU settings of the mode
    bucket: str = field(default_factory=lambda: f"bench{uuid.uuid4().hex[:10]}")

    def settings(self, namespace: str) -> Settings:
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
            **self.overrides,
        )


async def stage(ctx: Context, displays: list[bytes], first: int, count: int) -> list[Event]:
    """Store ``count`` displays and ingest documents as ingest does; their events (not sent)."""
    limit = asyncio.Semaphore(STAGE_PARALLEL)
    run = uuid.uuid4().hex[:8]

    async def one(index: int) -> Event:
        image_id = f"b{run}{index:05d}"
        async with limit:
            ref = await ctx.store.put_bytes(
                subjects.image_key(image_id, "display.webp"),
                displays[index % len(displays)],
                "image/webp",
            )
            info = {"image_id": image_id, "renditions": {"display": {"key": ref.key}}}
            await ctx.store.put_json(subjects.image_key(image_id, subjects.INGEST_DOC), info)
        return Event(
            id=f"ingested-{image_id}",
            type=subjects.INGESTED,
            source="bench/caption",
            time=now_iso(),
            image_id=image_id,
            data=info,
        )

    return list(await asyncio.gather(*(one(first + i) for i in range(count))))


async def warm_up(ctx: Context, state: CaptionState, events: list[Event], batch: int) -> None:
    """Load the models under leases and run the handler on 1, then ``batch`` events."""
    for size in sorted({1, batch}):
        group, events = events[:size], events[size:]
        raise_failures(await handle_batch(group, ctx, calls(group, SPEC, state)))


# --- one run -----------------------------------------------------------------------------------
@dataclass
class Options:
    n: int
    batches: tuple[int, ...]
    rounds: int
    width: int
    height: int
    concurrency: int
    max_new_tokens: int
    gpu: bool
    device: str
    dtype: str


async def measure(
    servers: Servers,
    state: CaptionState,
    probes: Probes,
    displays: list[bytes],
    opts: Options,
    batch: int,
    round_: int,
) -> Run:
    # A batch of one never lingers (the Spec refuses a linger without batching).
    linger = SPEC.batch_wait_s if batch > 1 else 0.0
    spec = dataclasses.replace(SPEC, batch=batch, batch_wait_s=linger, concurrency=opts.concurrency)

    async def prepared(_: Context) -> CaptionState:
        return state

    fn = dataclasses.replace(FUNCTION, spec=spec, setup=prepared)
    settings = servers.settings(f"bench{uuid.uuid4().hex[:10]}")
    torch = cuda_torch() if opts.gpu else None
    async with open_context(settings, [spec], "bench-caption") as ctx:
        assert ctx.gpu is not None
        warm = await stage(ctx, displays, opts.n, 1 + batch)
        await warm_up(ctx, state, warm, batch)
        async with ctx.gpu.use(state.models.caption) as loaded:
            captioner: Captioner = loaded
            captioner.model.generate = probes.timed(
                "generate", captioner.model.generate, lambda _, kw: int(kw["input_ids"].shape[0])
            )
        events = await stage(ctx, displays, 0, opts.n)
        observer = Observer({e.image_id or "" for e in events}, "image_id")
        subs = [
            await ctx.nc.subscribe(ctx.names.subject(subjects.CAPTIONED), cb=observer.on_result),
            await ctx.nc.subscribe(ctx.names.dead_letter(SPEC.name), cb=observer.on_dead_letter),
        ]
        await ctx.nc.flush()
        await publish(ctx, subjects.INGESTED, events)
        leases = LeaseTimer(ctx.gpu)
        probes.take()  # the warm-up's
        if torch is not None:
            torch.cuda.synchronize(opts.device)
            torch.cuda.reset_peak_memory_stats(opts.device)
        started = time.perf_counter()
        runner = FunctionRunner(fn, ctx)
        await runner.start()
        try:
            await asyncio.wait_for(observer.complete.wait(), 120 + 10 * opts.n)
        except TimeoutError:
            raise RuntimeError(
                f"batch {batch}: only {len(observer.done)} of {opts.n} images were captioned"
            ) from None
        finally:
            await runner.drain(timeout=STOP_TIMEOUT_S)
            for sub in subs:
                await sub.unsubscribe()
        stages = probes.take()
        if observer.failure:
            raise RuntimeError(f"batch {batch}: {observer.failure}")
        peak = torch.cuda.max_memory_allocated(opts.device) / MIB if torch is not None else None
    run = Run(
        batch=batch,
        round=round_,
        n=opts.n,
        elapsed_s=observer.last - started,
        first_s=observer.first - started,
        stages=stages,
        lease_uses=leases.uses,
        lease_loads=leases.loads,
        lease_s=leases.seconds,
        peak_vram_mb=peak,
    )
    print(run.line(), flush=True)
    if run.lease_loads:
        print(f"  (a model was loaded during the run {run.lease_loads} time(s))", flush=True)
    return run


# --- the benchmark -----------------------------------------------------------------------------
def encoded(opts: Options) -> list[bytes]:
    """The displays as ingest stores them (WebP), all distinct, warm-up ones included."""
    out = []
    for index in range(opts.n + 1 + max(opts.batches)):
        buffer = io.BytesIO()
        photo(index, opts.width, opts.height).save(buffer, "WEBP")
        out.append(buffer.getvalue())
    return out


def overrides(opts: Options, root: Path) -> dict[str, Any]:
    """The settings of the mode: on a GPU, the architecture-true models as local sources."""
    caption: dict[str, Any] = {"max_new_tokens": opts.max_new_tokens}
    if not opts.gpu:
        return {"caption": caption, "gpu": {"device": "cpu"}}
    started = time.perf_counter()
    build_vlm(root / "vlm", opts.device)
    build_siglip(root / "siglip", opts.device)
    torch = cuda_torch()
    assert torch is not None
    torch.cuda.empty_cache()
    print(f"built the architecture-true models in {time.perf_counter() - started:.1f} s")
    entry = {"dtype": opts.dtype}
    return {
        "caption": caption,
        "gpu": {"device": opts.device},
        "models": {
            "caption": {**entry, "source": str(root / "vlm")},
            "tags": {**entry, "source": str(root / "siglip")},
            "embed": {**entry, "source": str(root / "siglip")},
        },
    }


def patch_models(probes: Probes) -> None:
    probes.patch(Captioner, "caption", "caption")
    probes.patch(Siglip, "analyse", "siglip")
    probes.patch(NsfwScorer, "score", "nsfw")
    probes.patch(DemoNsfwScorer, "score", "nsfw")
    probes.patch(TextEmbedder, "embed", "text")


async def run(opts: Options) -> dict[str, Any]:
    load_before = load_average()
    started = time.perf_counter()
    probes = Probes()
    with tempfile.TemporaryDirectory(prefix="bench-caption-") as tmp:
        root = Path(tmp)
        # What a machine without internet resolves (set before huggingface_hub is imported:
        # it reads the cache location once).
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_HUB_CACHE"] = str(root / "hf-cache")
        nats_server = NatsServer(root / "nats-data", port=0)
        s3_server = SeaweedFS(
            root / "s3-data", S3Credentials.load_or_create(root / "s3.json"), port=0
        )
        await nats_server.start()
        try:
            await s3_server.start()
            try:
                servers = Servers(nats_server, s3_server, root / "darkroom", overrides(opts, root))
                state = await asyncio.to_thread(
                    CaptionState.from_settings, servers.settings("bench")
                )
                displays = await asyncio.to_thread(encoded, opts)
                patch_models(probes)
                runs = [
                    await measure(servers, state, probes, displays, opts, batch, round_)
                    for round_ in range(opts.rounds)
                    for batch in opts.batches
                ]
            finally:
                probes.restore()
                await s3_server.stop()
        finally:
            await nats_server.stop()
    summary = summarize(runs, state, opts)
    summary["elapsed_s"] = round(time.perf_counter() - started, 1)
    summary["machine"] = {
        "cpu_count": os.cpu_count(),
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": load_average(),
    }
    print_summary(summary, opts)
    return summary


def summarize(runs: list[Run], state: CaptionState, opts: Options) -> dict[str, Any]:
    best = {
        b: max((r for r in runs if r.batch == b), key=lambda r: r.images_per_s)
        for b in opts.batches
    }
    rate = {b: run.images_per_s for b, run in best.items()}
    ratios = [
        b8.images_per_s / b1.images_per_s
        for b1, b8 in zip(
            (r for r in runs if r.batch == 1), (r for r in runs if r.batch == 8), strict=True
        )
        if b1.images_per_s
    ]
    summary: dict[str, Any] = {
        "batch1_images_per_s": rounded(rate[1]),
        "batch8_images_per_s": rounded(rate[8]),
        "speedup": rounded(rate[8] / rate[1]) if rate[1] else None,
        "median_round_speedup": rounded(statistics.median(ratios)) if ratios else None,
        "search_p99_ms_1m": None,
        "search_note": SEARCH_NOTE,
        "device": opts.device if opts.gpu else "cpu",
        "models": state.identities(),
        "demo": state.demo,
    }
    for b, r in best.items():
        summary[f"batch{b}_images_per_s"] = rounded(r.images_per_s)
        summary[f"batch{b}_captions_per_s"] = rounded(r.captions_per_s)
        summary[f"batch{b}_first_caption_s"] = rounded(r.first_s)
        summary[f"batch{b}_stages"] = r.split()
        summary[f"batch{b}_lease_overhead_ms_per_use"] = (
            rounded(1000 * r.lease_s / r.lease_uses) if r.lease_uses else None
        )
        summary[f"batch{b}_lease_overhead_share"] = rounded(r.lease_s / r.elapsed_s, 5)
        if r.peak_vram_mb is not None:
            summary[f"batch{b}_peak_vram_mb"] = round(r.peak_vram_mb)
    if opts.gpu:
        summary["peak_vram_mb"] = round(max(r.peak_vram_mb or 0.0 for r in runs))
        top = max(opts.batches)
        summary[f"speedup_batch{top}"] = rounded(rate[top] / rate[1]) if rate[1] else None
    summary["rounds_images_per_s"] = {
        str(b): [round(r.images_per_s, 2) for r in runs if r.batch == b] for b in opts.batches
    }
    summary.update(
        n=opts.n,
        display=f"{opts.width}x{opts.height}",
        linger_s=SPEC.batch_wait_s,
        concurrency=opts.concurrency,
        max_new_tokens=opts.max_new_tokens,
        rounds=opts.rounds,
    )
    return summary


def print_summary(summary: dict[str, Any], opts: Options) -> None:
    print()
    print(
        f"Summary ({summary['device']}, {opts.n} images of {summary['display']}, "
        f"{opts.rounds} round(s), linger {SPEC.batch_wait_s} s, concurrency {opts.concurrency}):"
    )
    for b in opts.batches:
        print(
            f"  batch {b:>2}: {summary[f'batch{b}_images_per_s']} images/s, "
            f"{summary[f'batch{b}_captions_per_s']} captions/s"
        )
    print(
        f"  batch 8 / batch 1: {summary['speedup']}x "
        f"(median of rounds {summary['median_round_speedup']}x)"
    )
    if opts.gpu:
        print(
            f"  goal on an H100: >= 40 captions/s at batch 32 and >= 8x batch 1; "
            f"here {summary.get('batch32_captions_per_s')} captions/s, "
            f"{summary.get('speedup_batch32')}x"
        )
    if summary["demo"]:
        print("  (the VLM and SigLIP are tiny demo models: this measures the batching machinery)")


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--n", type=int, help="images per run (64; 96 with --gpu)")
    parser.add_argument("--rounds", type=int, help="alternating runs per batch size (2; 1 --gpu)")
    parser.add_argument(
        "--concurrency", type=int, default=SPEC.concurrency, help="batches in flight"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="cap on each caption")
    parser.add_argument("--gpu", action="store_true", help="architecture-true models on CUDA")
    parser.add_argument("--device", default="cuda:0", help="with --gpu: the device")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="with --gpu: the models' dtype setting (auto: as saved, float32)",
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args(argv)
    gpu = bool(args.gpu)
    n = args.n or (96 if gpu else 64)
    rounds = args.rounds or (1 if gpu else 2)
    if args.quick:
        n, rounds = 16, 1
    if min(n, rounds, args.concurrency) < 1 or args.max_new_tokens < 4:
        parser.error("--n, --rounds and --concurrency must be >= 1, --max-new-tokens >= 4")
    if gpu and cuda_torch() is None:
        parser.error("--gpu needs torch with a CUDA device")
    side = 512 if gpu else None
    return Options(
        n=n,
        batches=(1, 8, 32) if gpu else (1, 8),
        rounds=rounds,
        width=side or 640,
        height=side or 480,
        concurrency=args.concurrency,
        max_new_tokens=args.max_new_tokens,
        gpu=gpu,
        device=args.device,
        dtype=args.dtype,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    opts = parse_args(argv)
    return run_and_report(lambda: asyncio.run(run(opts)))


if __name__ == "__main__":
    sys.exit(main())
