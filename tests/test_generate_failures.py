"""The generate function when things go wrong: a model that cannot load, cancels at awkward
moments, and a job whose images span several pipeline calls (real NATS and S3, tiny
pipelines)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bus import Context
from bus.core import subjects
from bus.core.settings import GenerateModel, GenerateSettings, Settings
from bus.gpu.resident import ResidentModels
from bus.runtime.registry import load
from functions.generate import handler as generate_handler
from functions.generate import pipelines
from tests.support.streams import dead_letters, events, eventually, settled
from tests.test_generate import (
    SIZE,
    cancelled_here,
    outputs,
    paused_at_first_step,
    submit,
    tiny_pipelines,
)

pytestmark = [pytest.mark.nats, pytest.mark.s3]
__all__ = ["tiny_pipelines"]  # the session fixture, shared with test_generate


@pytest.fixture
def settings(settings: Settings, tiny_pipelines: dict[str, Path]) -> Settings:
    """The two tiny pipelines, one model no device can lease, and calls of 2 images."""
    common: dict[str, Any] = {"width": SIZE, "height": SIZE, "steps": 2, "guidance": 0.0}
    models = {
        name: GenerateModel(source=str(path), vram_mb=64, **common)
        for name, path in tiny_pipelines.items()
    }
    models["huge"] = GenerateModel(
        source=str(tiny_pipelines["tiny-sd"]), vram_mb=10_000_000, **common
    )
    generate = GenerateSettings(
        default_model="tiny-sd", cpu_model="tiny-sd", models=models, batch=2
    )
    return settings.model_copy(update={"generate": generate})


def counting_loads(
    monkeypatch: pytest.MonkeyPatch, hold: threading.Event | None = None
) -> list[str]:
    """The names of the pipelines loaded (the real load still runs); with ``hold``, each
    load waits for it first."""
    loaded: list[str] = []
    real = pipelines.Pipelines.load.__func__  # type: ignore[attr-defined]

    def load_(cls: Any, name: str, *args: Any) -> Any:
        loaded.append(name)
        if hold is not None:
            assert hold.wait(30), "never released"
        return real(cls, name, *args)

    monkeypatch.setattr(pipelines.Pipelines, "load", classmethod(load_))
    return loaded


async def test_a_model_that_can_never_load_fails_only_its_own_jobs(
    ctx: Context, run_function: Any
) -> None:
    huge = await submit(ctx, model="huge", seed=1)
    good = await submit(ctx, model="tiny-sd", seed=2)  # fetched in the same batch
    await run_function(load("generate"))
    made = await outputs(ctx, 1)
    assert list(made) == [good.id]
    await settled(ctx, "generate")
    [failed] = await events(ctx, f"{subjects.FAILED}.generate", at_least=1)
    assert failed.job_id == huge.id
    assert "needs 10000000 MB" in failed.data["reason"]
    [letter] = await dead_letters(ctx, "generate", at_least=1)
    assert letter["kind"] == "rejected" and letter["deliveries"] == 1  # never retried


async def test_a_group_whose_jobs_were_all_cancelled_loads_nothing(
    ctx: Context, run_function: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = counting_loads(monkeypatch)
    reached, release = paused_at_first_step(monkeypatch)
    jobs = {model: await submit(ctx, model=model, seed=1) for model in ("tiny-sd", "tiny-sdxl")}
    # Each model's jobs come from its own consumer, in no set order; a batch of exactly two
    # makes them one batch of two groups, whichever comes first.
    function = load("generate")
    spec = dataclasses.replace(function.spec, batch=2, batch_wait_s=600.0)
    await run_function(dataclasses.replace(function, spec=spec))
    assert await asyncio.to_thread(reached.wait, 60)
    [first] = loaded
    [doomed] = [job for model, job in jobs.items() if model != first]
    await cancelled_here(ctx, doomed.id)
    release.set()
    [event] = await events(ctx, f"{subjects.CANCELLED}.generate", at_least=1, timeout=60)
    assert event.job_id == doomed.id
    await settled(ctx, "generate")
    assert loaded == [first]


async def test_a_job_cancelled_while_its_load_waits_for_the_device_loads_nothing(
    ctx: Context, run_function: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = counting_loads(monkeypatch)
    reached, release = paused_at_first_step(monkeypatch)
    entered: list[str] = []
    real_use = ResidentModels.use

    def use(self: ResidentModels, model: Any, *args: Any) -> Any:
        entered.append(model.name)
        return real_use(self, model, *args)

    monkeypatch.setattr(ResidentModels, "use", use)
    await submit(ctx, model="tiny-sd", seed=1)
    await run_function(load("generate"))
    assert await asyncio.to_thread(reached.wait, 60)  # the device's thread is busy now
    doomed = await submit(ctx, model="tiny-sdxl", seed=2)
    await eventually(
        lambda: any("tiny-sdxl" in name for name in entered), what="tiny-sdxl's load to queue"
    )
    await cancelled_here(ctx, doomed.id)
    release.set()
    [event] = await events(ctx, f"{subjects.CANCELLED}.generate", at_least=1, timeout=60)
    assert event.job_id == doomed.id
    await settled(ctx, "generate")
    assert loaded == ["tiny-sd"]


async def test_a_cancel_during_the_load_takes_effect_right_after_it(
    ctx: Context, run_function: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    loaded = counting_loads(monkeypatch, hold=release)
    calls: list[int] = []
    real: Callable[..., Any] = generate_handler.run

    def run(pipes: Any, job: Any, items: list[Any], on_step: Any) -> Any:
        calls.append(len(items))
        return real(pipes, job, items, on_step)

    monkeypatch.setattr(generate_handler, "run", run)
    doomed = await submit(ctx, seed=1)
    kept = await submit(ctx, seed=2)
    await run_function(load("generate"))
    await eventually(lambda: loaded, what="the load to start")
    await cancelled_here(ctx, doomed.id)
    release.set()
    made = await outputs(ctx, 1)
    assert list(made) == [kept.id]
    [event] = await events(ctx, f"{subjects.CANCELLED}.generate", at_least=1, timeout=60)
    assert event.job_id == doomed.id
    await settled(ctx, "generate")
    assert calls == [1]  # the kept job's image only


async def test_progress_of_a_job_spanning_calls_only_goes_forward(
    ctx: Context, run_function: Any
) -> None:
    updates: list[dict[str, Any]] = []

    async def on_progress(msg: Any) -> None:
        updates.append(json.loads(msg.data))

    sub = await ctx.nc.subscribe(ctx.names.all_progress, cb=on_progress)
    try:
        job = await submit(ctx, n=4, steps=3)  # two calls of two images
        await run_function(load("generate"))
        await outputs(ctx, 4)
        await settled(ctx, "generate")
        await ctx.nc.flush()
    finally:
        await sub.unsubscribe()
    stepping = [(u["step"], u["total"]) for u in updates if u["job_id"] == job.id][1:]
    assert stepping, "no step was reported"
    assert {total for _, total in stepping} == {6}  # both calls' steps
    assert [step for step, _ in stepping] == sorted(step for step, _ in stepping)
    assert stepping[-1] == (6, 6)
