"""generate: text-to-image and image-to-image jobs, batched on leased VRAM.

Consumes ``requested`` (a checked job stored as ``requests/<job>.json``, see
:mod:`bus.core.generation`), writes each output as ``generated/<job>/<i>.png`` (the job's
parameters in a PNG text chunk) and fires ``generated`` for it: ingest and caption then
treat it like an upload, with its lineage.

- **Batching.** Jobs fetched together that agree on model, size, steps, guidance, mode,
  scheduler and strength run as one pipeline call (at most ``generate.batch`` images),
  each image with its own seeded generator: a job gives the same pixels alone or batched.
- **Progress.** Every step is reported on the job's live subject (throttled), with a small
  preview decoded from the latents; step 0 says the model is loading.
- **Cancel.** A job cancelled while queued never runs (the runner skips it). One cancelled
  while its model loads stops right after the load. One cancelled mid-run stops at the
  next step when it runs alone; batched with others, they go on and its images are
  dropped: a cancel never touches another job.
- **Affinity.** A job naming a model comes on ``requested.<model>``, and a worker that holds
  the model wins it while it has room; others take it when nobody holds the model, or once
  the holders are full (:data:`AFFINITY`).
- **Replays.** The outputs and ``generated/<job>/result.json`` are written before the
  events are fired: a redelivered job finds them and only announces them again.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from PIL import Image, PngImagePlugin

from bus import (
    Call,
    Cancelled,
    Context,
    Emit,
    Event,
    Function,
    ObjectMissingError,
    Reject,
    Spec,
    subjects,
)
from bus.core.envelope import ObjectRef
from bus.core.generation import MIN_SIDE, GenerationError, Job
from bus.core.settings import GenerateSettings
from bus.gpu.leases import LeaseTooLargeError
from bus.gpu.resident import LoadAbandonedError
from bus.models.catalogue import ModelUnavailableError
from bus.models.switching import LOAD_SERVICE, lease_model
from bus.runtime.registry import Affinity
from functions.generate.admin import serve_load
from functions.generate.pipelines import Item, Pipelines, preview, run
from functions.generate.prepare import prepare, teardown
from functions.generate.state import GenerateState, gpu_models, setup

SPEC = Spec(
    name="generate",
    listens=(subjects.REQUESTED,),
    emits=(subjects.GENERATED,),
    batch=8,
    batch_wait_s=0.05,
    concurrency=2,  # the next batch is fetched and its init images decoded meanwhile
    ack_wait=15.0,  # a killed worker's jobs are back this soon; heartbeats keep live ones
    max_deliver=3,
    timeout=1800.0,  # a first use may download its model (its progress is the job's)
    needs_gpu=True,
)
RESULT_DOC = "result.json"
PREVIEW_INTERVAL_S = 0.25  # as often as progress is sent at most (bus/runtime/call.py)
MAX_INIT_BYTES = 256 * 1024 * 1024


@dataclass(slots=True)
class _Work:
    """One job of the batch, and what happened to it."""

    index: int  # in the batch
    event: Event
    call: Call
    job: Job  # resolved: every default filled in
    started: float  # time.monotonic() when this batch took it
    queue_s: float
    init: Image.Image | None = None
    images: list[Image.Image] = field(default_factory=list)
    load_s: float = 0.0
    inference_s: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)
    calls: int = 1  # the pipeline calls its images span (progress counts all their steps)
    calls_done: int = 0


async def handle_batch(
    events: list[Event], ctx: Context, calls: list[Call]
) -> list[Sequence[Emit] | BaseException]:
    state: GenerateState = calls[0].state
    results: list[Sequence[Emit] | BaseException | None] = [None] * len(events)
    works: list[_Work] = []
    replays = await asyncio.gather(*(_announced(ctx, e) for e in events), return_exceptions=True)
    for i, (event, call, replay) in enumerate(zip(events, calls, replays, strict=True)):
        if replay is not None:
            results[i] = replay
            continue
        try:
            works.append(await _work(ctx, state, i, event, call))
        except (Reject, GenerationError) as exc:
            results[i] = exc if isinstance(exc, Reject) else Reject(str(exc))
        except Exception as exc:  # the store, say: this job alone is retried
            results[i] = exc
    groups: dict[tuple[Any, ...], list[_Work]] = {}
    for work in works:
        groups.setdefault(work.job.batch_key, []).append(work)
    for group in groups.values():
        # One group's failure (its model cannot load, say) is its own jobs' only.
        outcomes: Sequence[Sequence[Emit] | BaseException]
        try:
            outcomes = await _run_group(ctx, state, group)
        except LeaseTooLargeError as exc:  # the model can never fit this device
            outcomes = [Reject(str(exc)) for _ in group]
        except Exception as exc:
            outcomes = [exc for _ in group]
        for work, outcome in zip(group, outcomes, strict=True):
            results[work.index] = outcome
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


async def _announced(ctx: Context, event: Event) -> list[Emit] | None:
    """The events a finished job fired, when this is a replay of it; else None."""
    job_id = event.job_id
    if not job_id or not subjects.is_safe_id(job_id):
        return None  # _work refuses it
    key = _result_key(job_id)
    if await ctx.store.stat(key) is None:
        return None
    try:
        stored = await ctx.store.get_json(key)
    except (ObjectMissingError, ValueError):
        return None
    emits = []
    for out in stored.get("outputs", []):
        ref = ObjectRef.from_dict(out["object"])
        emits.append(
            Emit(
                subjects.GENERATED,
                ref,
                data=out["data"],
                image_id=out["data"]["image_id"],
                job_id=job_id,
            )
        )
    return emits


async def _work(ctx: Context, state: GenerateState, index: int, event: Event, call: Call) -> _Work:
    settings = state.settings.generate
    job = Job.from_doc(event.data, settings)
    if event.job_id != job.id:
        raise Reject(f"the event's job id {event.job_id!r} is not its document's {job.id!r}")
    init: Image.Image | None = None
    if job.init is not None:
        init = await _init_image(ctx, job)
        job = _sized_for(job, init, settings, state)
    job = job.resolved(settings, state.default_model)
    if init is not None:
        assert job.width is not None and job.height is not None
        init = await ctx.run_cpu(_fit, init, job.width, job.height)
    queue_s = max(0.0, time.time() - _epoch(event.time))
    return _Work(index, event, call, job, time.monotonic(), queue_s, init)


async def _init_image(ctx: Context, job: Job) -> Image.Image:
    assert job.init is not None
    try:
        data = await ctx.store.get_bytes(job.init.key, max_bytes=MAX_INIT_BYTES)
    except ObjectMissingError:
        what = f"image {job.init.image_id}" if job.init.image_id else "the request's image"
        raise Reject(f"{what} is gone ({job.init.key}): nothing to start from") from None
    try:
        return await ctx.run_cpu(_decode, data)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise Reject(f"the init image {job.init.key} cannot be read: {exc}") from None


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def _sized_for(
    job: Job, init: Image.Image, settings: GenerateSettings, state: GenerateState
) -> Job:
    """An image job's size, where the request gave none: the init image's aspect, at the
    side that was given, else at the model's area (``enhance``: the image's own size times
    ``generate.enhance_scale``); in multiples of the model's ``side_multiple`` and within
    the bounds."""
    if job.width is not None and job.height is not None:
        return job
    entry = settings.catalogue[job.model or state.default_model]
    w, h = init.size
    if job.width is not None:
        scale = job.width / w
    elif job.height is not None:
        scale = job.height / h
    elif job.mode == "enhance":
        scale = settings.enhance_scale
    else:
        scale = math.sqrt(entry.width * entry.height / (w * h))
    scale = min(scale, settings.max_side / max(w, h), math.sqrt(settings.max_pixels / (w * h)))
    multiple = entry.side_multiple

    def side(x: float) -> int:
        return max(MIN_SIDE, int(x * scale) // multiple * multiple)

    return replace(job, width=job.width or side(w), height=job.height or side(h))


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Cover ``width`` x ``height``: scale (Lanczos), then crop the middle."""
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return resized.crop((left, top, left + width, top + height))


async def _run_group(
    ctx: Context, state: GenerateState, group: list[_Work]
) -> list[Sequence[Emit] | BaseException]:
    """One model load for the group, then one pipeline call per ``generate.batch`` images.

    A model not on this machine yet is downloaded first (its progress in /api/status; the
    job says so). Nothing loads for a group whose jobs were all cancelled meanwhile, even
    while its load waited for the device's thread behind another group's inference.
    """
    job = group[0].job
    assert job.model is not None and ctx.gpu is not None
    if all(work.call.cancelled for work in group):
        return [_cancelled(work) for work in group]
    try:
        model, resolved = await asyncio.to_thread(state.model, job.model)
        if not resolved.cached and state.readiness is not None:
            for work in group:
                _report(work, 0, 1, f"downloading {job.model}")
            await state.readiness.prepare([resolved])
            state.forget(job.model)
            model, resolved = await asyncio.to_thread(state.model, job.model)
    except ModelUnavailableError as exc:
        return [Reject(str(exc)) for _ in group]
    identity = {"name": job.model, **resolved.identity()}
    resident = model.name in ctx.gpu.loaded
    for work in group:
        work.model = identity
        _report(work, 0, 1, "starting" if resident else f"loading {job.model}")
    loading = time.monotonic()

    def wanted() -> bool:
        return not all(work.call.cancelled for work in group)

    try:
        async with ctx.gpu.use(model, wanted) as loaded:
            pipes: Pipelines = loaded
            load_s = time.monotonic() - loading
            for work in group:
                work.load_s = load_s
            for chunk in _chunks(group, state.settings.generate.batch):
                # A job cancelled during the load, or during an earlier call, makes nothing.
                chunk = [(work, i) for work, i in chunk if not work.call.cancelled]
                if chunk:
                    await _generate(ctx, state, pipes, chunk)
    except (GenerationError, ModelUnavailableError) as exc:  # a scheduler or setting misfit
        return [Reject(str(exc)) for _ in group]
    except LoadAbandonedError:  # every job was cancelled while the load waited its turn
        return [_cancelled(work) for work in group]
    outcomes: list[Sequence[Emit] | BaseException] = []
    for work in group:
        if work.call.cancelled:
            outcomes.append(_cancelled(work))
            continue
        try:
            outcomes.append(await _store(ctx, work))
        except Exception as exc:  # this job's outputs could not be stored: it alone retries
            outcomes.append(exc)
    return outcomes


def _cancelled(work: _Work) -> Cancelled:
    return Cancelled(work.call.cancel_reason or "cancelled")


def _chunks(works: list[_Work], batch: int) -> list[list[tuple[_Work, int]]]:
    """(job, output index) pairs, ``batch`` to a call; a job may span calls."""
    items = [(work, i) for work in works for i in range(work.job.n)]
    chunks = [items[i : i + batch] for i in range(0, len(items), batch)]
    for work in works:
        work.calls = sum(any(w is work for w, _ in chunk) for chunk in chunks)
    return chunks


async def _generate(
    ctx: Context, state: GenerateState, pipes: Pipelines, chunk: list[tuple[_Work, int]]
) -> None:
    job = chunk[0][0].job
    items = [
        Item(work.job.prompt, work.job.negative_prompt, work.job.seeds[i], work.init)
        for work, i in chunk
    ]
    first: dict[int, tuple[_Work, int]] = {}  # each job once, with its first image's place
    for position, (work, _) in enumerate(chunk):
        first.setdefault(id(work), (work, position))
    want_preview = state.settings.generate.preview == "latent"
    shots: dict[int, tuple[float, bytes | None]] = {}  # a job's newest preview, and when

    def on_step(step: int, total: int, latents: Any) -> bool:
        """On the device thread, after each step: report, and stop when every job of the
        call was cancelled. A job whose images span several calls counts all their steps."""
        now = time.monotonic()
        for key, (work, position) in first.items():
            taken, shot = shots.get(key, (-PREVIEW_INTERVAL_S, None))
            if want_preview and now - taken >= PREVIEW_INTERVAL_S:
                # A preview copies latents off the device: no more often than progress is
                # sent, and each update in between carries the newest one.
                shot = preview(latents, position, pipes.family)
                shots[key] = (now, shot)
            calls, done = work.calls, work.calls_done
            _report(work, done * total + step, calls * total, "", shot)
        return all(work.call.cancelled for work, _ in first.values())

    started = time.monotonic()
    images = await ctx.run_gpu(run, pipes, job, items, on_step)
    took = time.monotonic() - started
    for (work, _), image in zip(chunk, images, strict=True):
        work.images.append(image)
        work.inference_s += took / len(chunk)
    for work, _ in first.values():
        work.calls_done += 1


def _report(
    work: _Work, step: int, total: int, message: str = "", shot: bytes | None = None
) -> None:
    if not work.call.cancelled:
        work.call.progress(min(step, total), max(total, 1), message, shot)


async def _store(ctx: Context, work: _Work) -> list[Emit]:
    """Write the outputs and the record of the events, then return the events."""
    job = work.job
    params = job.to_doc()
    timings = {
        "queue_s": round(work.queue_s, 3),
        "load_s": round(work.load_s, 3),
        "inference_s": round(work.inference_s, 3),
    }
    outputs = []
    for i, image in enumerate(work.images):
        image_id = subjects.generated_image_id(job.id, i)
        lineage = {
            "job_id": job.id,
            "parent": job.parent,
            "mode": job.mode,
            "prompt": job.prompt,
            "negative_prompt": job.negative_prompt,
            "seed": job.seeds[i],
            "model": job.model,
            "steps": job.steps,
            "guidance": job.guidance,
            "width": job.width,
            "height": job.height,
            "scheduler": job.scheduler,
            "strength": job.strength,
        }
        png = await ctx.run_cpu(_png, image, {**lineage, "model_source": work.model})
        ref = await ctx.store.put_bytes(subjects.generated_key(job.id, i), png, "image/png")
        data = {
            "image_id": image_id,
            "job_id": job.id,
            "index": i,
            "n": job.n,
            "name": f"{image_id}.png",
            "source": "generate",
            "lineage": lineage,
            "model": work.model,
            "timings": timings,
            "params": params,
        }
        outputs.append({"object": ref.to_dict(), "data": data})
    await ctx.store.put_json(_result_key(job.id), {"job_id": job.id, "outputs": outputs})
    return [
        Emit(
            subjects.GENERATED,
            ObjectRef.from_dict(out["object"]),
            data=out["data"],
            image_id=out["data"]["image_id"],
            job_id=job.id,
        )
        for out in outputs
    ]


def _png(image: Image.Image, parameters: dict[str, Any]) -> bytes:
    """The image as PNG, with the parameters that made it in a ``parameters`` text chunk
    (JSON), where image tools look for them."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(parameters, sort_keys=True))
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info, compress_level=4)
    return out.getvalue()


def _result_key(job_id: str) -> str:
    return f"{subjects.GENERATED_PREFIX}{subjects.check_id(job_id, 'job id')}/{RESULT_DOC}"


def _epoch(moment: str) -> float:
    try:
        return datetime.fromisoformat(moment.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


AFFINITY = Affinity(
    topic=subjects.REQUESTED,
    keys=lambda settings: sorted(settings.generate.catalogue),
    model=lease_model,
)
"""Jobs naming a model go to a worker holding it (see :class:`bus.runtime.registry.Affinity`)."""

FUNCTION = Function(
    SPEC,
    handle_batch=handle_batch,
    setup=setup,
    prepare=prepare,
    teardown=teardown,
    models=gpu_models,
    services={LOAD_SERVICE: serve_load},
    affinity=AFFINITY,
)
