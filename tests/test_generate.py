"""The generate function on real NATS and S3 with tiny SD and SDXL pipelines, built offline
and loaded through diffusers' own ``from_pretrained``.

Each test stores and announces its jobs itself (as the gateway does), so it controls which
jobs are fetched together.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bus import Context, Event
from bus.core import subjects
from bus.core.envelope import new_id, now_iso
from bus.core.generation import InitImage, Job, check_request
from bus.core.settings import GenerateModel, GenerateSettings, Settings
from bus.models.demo import build_tiny_sd, build_tiny_sdxl
from bus.runtime.registry import load
from bus.runtime.streams import keyed_subject
from bus.state.cancels import request_cancel
from functions.generate import handler as generate_handler
from tests.support.streams import dead_letters, events, eventually, settled

pytestmark = [pytest.mark.nats, pytest.mark.s3]
SIZE = 64


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    built = {"tiny-sd": root / "sd", "tiny-sdxl": root / "sdxl"}
    build_tiny_sd(built["tiny-sd"])
    build_tiny_sdxl(built["tiny-sdxl"])
    return built


@pytest.fixture
def settings(settings: Settings, tiny_pipelines: dict[str, Path]) -> Settings:
    """The suite's settings with a catalogue of the two tiny pipelines."""
    models = {
        name: GenerateModel(
            source=str(path), width=SIZE, height=SIZE, steps=2, guidance=0.0, vram_mb=64
        )
        for name, path in tiny_pipelines.items()
    }
    generate = GenerateSettings(default_model="tiny-sd", cpu_model="tiny-sd", models=models)
    return settings.model_copy(update={"generate": generate})


async def submit(ctx: Context, init: InitImage | None = None, seed: int = 7, **values: Any) -> Job:
    """Check, store and announce a job the way the gateway does."""
    values.setdefault("prompt", "a red fox in the snow")
    job = check_request(
        values,
        ctx.settings.generate,
        job_id=new_id(),
        created=now_iso(),
        seed=seed,
        init=init,
    )
    ref = await ctx.store.put_json(subjects.request_key(job.id), job.to_doc())
    event = Event(
        id=f"requested-{job.id}",
        type=subjects.REQUESTED,
        source="test",
        time=now_iso(),
        job_id=job.id,
        object=ref,
        data=job.to_doc(),
    )
    # a job naming a model goes on that model's subject (model affinity), as the gateway's
    subject = (
        ctx.names.subject(event.type)
        if job.model is None
        else keyed_subject(ctx.names, subjects.REQUESTED, job.model)
    )
    await ctx.js.publish(subject, event.encode(), headers={"Nats-Msg-Id": event.id})
    return job


async def an_image(ctx: Context, size: tuple[int, int] = (96, 64)) -> InitImage:
    """An ingested image's display rendition, as an init image."""
    image_id = new_id()
    out = io.BytesIO()
    Image.new("RGB", size, (30, 90, 200)).save(out, "WEBP")
    key = subjects.image_key(image_id, "display.webp")
    await ctx.store.put_bytes(key, out.getvalue(), "image/webp")
    return InitImage(key, image_id)


async def outputs(ctx: Context, count: int) -> dict[str, list[Event]]:
    """The ``generated`` events by job, once ``count`` arrived."""
    found = await events(ctx, subjects.GENERATED, at_least=count, timeout=120)
    by_job: dict[str, list[Event]] = {}
    for event in sorted(found, key=lambda e: int(e.data["index"])):
        by_job.setdefault(event.job_id or "", []).append(event)
    return by_job


async def pixels(ctx: Context, event: Event) -> np.ndarray:
    assert event.object is not None
    data = await ctx.store.get_bytes(event.object.key)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def counting_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count pipeline calls (the real one still runs); each records its number of images."""
    calls: list[int] = []
    real: Callable[..., Any] = generate_handler.run

    def wrapper(pipes: Any, job: Any, items: list[Any], on_step: Any) -> Any:
        calls.append(len(items))
        return real(pipes, job, items, on_step)

    monkeypatch.setattr(generate_handler, "run", wrapper)
    return calls


def paused_at_first_step(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[threading.Event, threading.Event]:
    """Each pipeline call stops after its first step until ``release`` is set; ``reached``
    says it got there."""
    reached, release = threading.Event(), threading.Event()
    real: Callable[..., Any] = generate_handler.run

    def run(pipes: Any, job: Any, items: list[Any], on_step: Any) -> Any:
        def step(step: int, total: int, latents: Any) -> bool:
            if step == 1:
                reached.set()
                assert release.wait(30), "never released"
            return bool(on_step(step, total, latents))

        return real(pipes, job, items, step)

    monkeypatch.setattr(generate_handler, "run", run)
    return reached, release


async def cancelled_here(ctx: Context, job_id: str, reason: str = "stop") -> None:
    """Cancel ``job_id`` and wait until this process's mirror of the flags has it (the
    runner is told at that moment)."""
    await request_cancel(ctx.cancels_kv, job_id, reason)
    probe = Event(id="p", type=subjects.REQUESTED, source="t", time=now_iso(), job_id=job_id)
    await eventually(lambda: ctx.cancels.reason(probe), what="the cancel flag")


async def test_txt2img_writes_pngs_with_parameters_and_fires_generated_with_lineage(
    ctx: Context, run_function: Any
) -> None:
    job = await submit(ctx, n=2, negative_prompt="blurry")
    await run_function(load("generate"))
    [made] = (await outputs(ctx, 2)).values()
    assert [e.image_id for e in made] == [f"{job.id}-0", f"{job.id}-1"]
    first = made[0]
    assert first.object is not None
    assert first.object.key == subjects.generated_key(job.id, 0)
    assert first.object.content_type == "image/png"
    lineage = first.data["lineage"]
    assert lineage["prompt"] == "a red fox in the snow"
    assert lineage["negative_prompt"] == "blurry"
    assert lineage["seed"] == 7 and made[1].data["lineage"]["seed"] == 8
    assert lineage["model"] == "tiny-sd" and lineage["mode"] == "txt2img"
    assert (lineage["width"], lineage["height"], lineage["steps"]) == (SIZE, SIZE, 2)
    assert first.data["model"]["name"] == "tiny-sd"
    assert set(first.data["timings"]) == {"queue_s", "load_s", "inference_s"}
    data = await ctx.store.get_bytes(first.object.key)
    with Image.open(io.BytesIO(data)) as png:
        assert png.size == (SIZE, SIZE)
        assert json.loads(png.text["parameters"])["seed"] == 7  # type: ignore[attr-defined]
    assert not np.array_equal(await pixels(ctx, made[0]), await pixels(ctx, made[1]))


async def test_outputs_are_ingested_like_uploads_with_their_lineage(
    ctx: Context, run_function: Any
) -> None:
    job = await submit(ctx)
    await run_function(load("generate"))
    await run_function(load("ingest"))
    [ingested] = await events(ctx, subjects.INGESTED, at_least=1, timeout=120)
    assert ingested.image_id == f"{job.id}-0"
    assert ingested.data["lineage"]["job_id"] == job.id
    assert ingested.data["lineage"]["prompt"] == "a red fox in the snow"


async def test_the_same_job_and_seed_give_the_same_pixels_batched_or_alone(
    ctx: Context, run_function: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting_calls(monkeypatch)
    alone = await submit(ctx, seed=11)
    runner = await run_function(load("generate"))
    await outputs(ctx, 1)
    await settled(ctx, "generate")
    await runner.stop()
    # Three compatible jobs and one of another size, queued before a worker fetches them.
    batched = await submit(ctx, seed=11)
    others = [await submit(ctx, seed=12), await submit(ctx, seed=13)]
    wider = await submit(ctx, seed=11, width=SIZE * 2)
    await run_function(load("generate"))
    made = await outputs(ctx, 5)
    assert calls == [1, 3, 1]  # alone; the three compatible ones together; the wider one
    same = await pixels(ctx, made[alone.id][0])
    assert np.array_equal(same, await pixels(ctx, made[batched.id][0]))
    assert not np.array_equal(same, await pixels(ctx, made[others[0].id][0]))
    assert (await pixels(ctx, made[wider.id][0])).shape == (SIZE, SIZE * 2, 3)


async def test_sdxl_pipelines_generate_too(ctx: Context, run_function: Any) -> None:
    job = await submit(ctx, model="tiny-sdxl")
    await run_function(load("generate"))
    [made] = (await outputs(ctx, 1))[job.id]
    assert made.data["model"]["name"] == "tiny-sdxl"
    assert (await pixels(ctx, made)).shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("mode", ["img2img", "remix", "sketch", "enhance"])
async def test_image_modes_start_from_the_image(ctx: Context, run_function: Any, mode: str) -> None:
    init = await an_image(ctx, (96, 64))
    job = await submit(ctx, init=init, mode=mode, steps=4)
    await run_function(load("generate"))
    [made] = (await outputs(ctx, 1))[job.id]
    lineage = made.data["lineage"]
    assert lineage["parent"] == init.image_id and lineage["mode"] == mode
    assert 0 < lineage["strength"] <= 1
    height, width, _ = (await pixels(ctx, made)).shape
    if mode == "enhance":  # upscaled by generate.enhance_scale (2)
        assert (width, height) == (192, 128)
    else:  # the image's aspect at the model's area, in multiples of 8
        assert width > height and width % 8 == 0 and height % 8 == 0


async def test_a_bad_job_fails_alone_with_its_reason(ctx: Context, run_function: Any) -> None:
    good = await submit(ctx)
    missing = await submit(ctx, init=InitImage("images/gone/display.webp", "gone"), mode="img2img")
    await run_function(load("generate"))
    made = await outputs(ctx, 1)
    assert list(made) == [good.id]
    [failed] = await events(ctx, f"{subjects.FAILED}.generate", at_least=1, timeout=60)
    assert failed.job_id == missing.id
    assert "gone" in failed.data["reason"]
    [letter] = await dead_letters(ctx, "generate", at_least=1)
    assert missing.id in json.dumps(letter)


async def test_a_replayed_job_announces_its_outputs_again_without_running(
    ctx: Context, run_function: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting_calls(monkeypatch)
    job = await submit(ctx)
    await run_function(load("generate"))
    [first] = (await outputs(ctx, 1))[job.id]
    # The same job delivered again (a worker died before its ack), under another event id.
    doc = await ctx.store.get_json(subjects.request_key(job.id))
    again = Event(
        id=f"requested-{job.id}-again",
        type=subjects.REQUESTED,
        source="test",
        time=now_iso(),
        job_id=job.id,
        data=doc,
    )
    await ctx.js.publish(
        ctx.names.subject(again.type), again.encode(), headers={"Nats-Msg-Id": again.id}
    )
    made = await events(ctx, subjects.GENERATED, at_least=2, timeout=60)
    assert {e.object.key for e in made if e.object} == {first.object.key if first.object else ""}
    assert calls == [1]


async def test_a_cancelled_queued_job_never_runs(
    ctx: Context, run_function: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting_calls(monkeypatch)
    cancelled = await submit(ctx, seed=1)
    await request_cancel(ctx.cancels_kv, cancelled.id, "changed my mind")
    kept = await submit(ctx, seed=2, width=SIZE * 2)  # another batch: its own call
    await run_function(load("generate"))
    made = await outputs(ctx, 1)
    assert list(made) == [kept.id]
    [event] = await events(ctx, f"{subjects.CANCELLED}.generate", at_least=1, timeout=60)
    assert event.job_id == cancelled.id and event.data["reason"] == "changed my mind"
    await settled(ctx, "generate")
    assert calls == [1]


async def test_cancelling_a_running_job_leaves_its_batch_neighbour_alone(
    ctx: Context, run_function: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first step waits until the cancel flag reached this process: the cancel lands
    mid-run, by the mechanism rather than by timing."""
    reached, release = paused_at_first_step(monkeypatch)
    doomed = await submit(ctx, seed=1, steps=6)
    neighbour = await submit(ctx, seed=2, steps=6)
    await run_function(load("generate"))
    assert await asyncio.to_thread(reached.wait, 60)
    await cancelled_here(ctx, doomed.id)
    release.set()
    made = await outputs(ctx, 1)
    assert list(made) == [neighbour.id]
    [event] = await events(ctx, f"{subjects.CANCELLED}.generate", at_least=1, timeout=60)
    assert event.job_id == doomed.id
    await settled(ctx, "generate")
    assert list(await outputs(ctx, 1)) == [neighbour.id]  # still only the neighbour's
    assert await ctx.store.stat(subjects.generated_key(doomed.id, 0)) is None


async def test_a_job_alone_stops_at_the_next_step_when_cancelled(
    ctx: Context, run_function: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps_run: list[int] = []
    real: Callable[..., Any] = generate_handler.run

    def run(pipes: Any, job: Any, items: list[Any], on_step: Any) -> Any:
        def step(step: int, total: int, latents: Any) -> bool:
            steps_run.append(step)
            return bool(on_step(step, total, latents))

        return real(pipes, job, items, step)

    monkeypatch.setattr(generate_handler, "run", run)
    reached, release = paused_at_first_step(monkeypatch)  # wraps the counting run above
    job = await submit(ctx, steps=20)
    await run_function(load("generate"))
    assert await asyncio.to_thread(reached.wait, 60)
    await cancelled_here(ctx, job.id)
    release.set()
    [event] = await events(ctx, f"{subjects.CANCELLED}.generate", at_least=1, timeout=60)
    assert event.job_id == job.id
    assert steps_run == [1]  # it stopped after the step during which it was cancelled


async def test_progress_reports_steps_with_a_preview(ctx: Context, run_function: Any) -> None:
    updates: list[dict[str, Any]] = []
    job_id_box: list[str] = []

    async def on_progress(msg: Any) -> None:
        updates.append(json.loads(msg.data))

    sub = await ctx.nc.subscribe(ctx.names.all_progress, cb=on_progress)
    try:
        job = await submit(ctx, steps=3)
        job_id_box.append(job.id)
        await run_function(load("generate"))
        await outputs(ctx, 1)
        await settled(ctx, "generate")
        await ctx.nc.flush()
    finally:
        await sub.unsubscribe()
    mine = [u for u in updates if u["job_id"] == job.id]
    assert mine[0]["message"].startswith("loading") and mine[0]["step"] == 0
    assert mine[-1]["step"] == mine[-1]["total"] == 3
    assert any(u.get("preview_type") == "image/jpeg" for u in mine)
