"""Model affinity across `darkroom worker` processes: two workers, two tiny models, and
a device per worker with room for one model at a time, so that every switch is a load.

A job naming a model is published on ``requested.<model>`` (as the gateway does); a worker
holding the model wins it, and one that does not takes it when nobody holds the model (a
dead holder's leases lapse). Loads are counted from each worker's own log line for a load
(``loaded generate:<model> on cpu``, one per load by bus/gpu/resident.py).
"""

from __future__ import annotations

import random
import re
import signal
from collections import Counter
from pathlib import Path

import pytest

from bus import Context
from bus.core import subjects
from bus.core.generation import Job
from bus.core.settings import GenerateModel, GenerateSettings, GpuSettings, Settings
from bus.gateway.system import consumer_stats
from bus.models.demo import build_tiny_sd
from bus.runtime.registry import load
from bus.runtime.streams import declare_consumer, declare_keyed_consumer
from tests.support import procs
from tests.support.streams import events, eventually
from tests.test_generate import submit as submit_job

pytestmark = [pytest.mark.nats, pytest.mark.s3, pytest.mark.slow]
MODELS = ("m1", "m2")
SIZE = 64
DEVICE_MB = 256  # a worker's device; each model asks for all of it, so one fits at a time
LEASE_TTL_S = 2.0  # a killed holder's leases lapse this soon
READY = "generate: prepared; fetching events"
LOADED_RE = re.compile(r"loaded generate:(\S+) on cpu")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("affinity") / "sd"
    build_tiny_sd(path)
    return path


@pytest.fixture
def settings(settings: Settings, tiny_sd: Path) -> Settings:
    """Two catalogue models (the same tiny pipeline under two names)."""
    model = GenerateModel(
        source=str(tiny_sd), width=SIZE, height=SIZE, steps=2, guidance=0.0, vram_mb=DEVICE_MB
    )
    generate = GenerateSettings(
        default_model=MODELS[0], cpu_model=MODELS[0], models=dict.fromkeys(MODELS, model)
    )
    gpu = GpuSettings(
        device="cpu", cpu_capacity_mb=DEVICE_MB, reserve_mb=0, lease_ttl_s=LEASE_TTL_S
    )
    return settings.model_copy(update={"generate": generate, "gpu": gpu})


def worker_env(
    settings: Settings, env: dict[str, str], tmp_path: Path, name: str
) -> dict[str, str]:
    """A worker's environment: the catalogue and the device in a settings file, and a
    host id of its own, so that each worker has a device (a ledger document) to itself."""
    config = tmp_path / "darkroom.toml"
    if not config.exists():
        lines = [
            "[generate]",
            f'default_model = "{MODELS[0]}"',
            f'cpu_model = "{MODELS[0]}"',
        ]
        for model in MODELS:
            entry = settings.generate.catalogue[model]
            lines += [
                f"[generate.models.{model}]",
                f'source = "{entry.source}"',
                f"width = {SIZE}",
                f"height = {SIZE}",
                "steps = 2",
                "guidance = 0.0",
                f"vram_mb = {DEVICE_MB}",
            ]
        lines += [
            "[gpu]",
            'device = "cpu"',
            f"cpu_capacity_mb = {DEVICE_MB}",
            "reserve_mb = 0",
            f"lease_ttl_s = {LEASE_TTL_S}",
        ]
        config.write_text("\n".join(lines) + "\n")
    return {**env, "DARKROOM_CONFIG": str(config), "DARKROOM_GPU__HOST_ID": name}


async def submit(ctx: Context, model: str, seed: int) -> Job:
    """A job naming ``model``, stored and announced the way the gateway does."""
    return await submit_job(ctx, seed=seed, prompt=f"a fox, {model}", model=model)


async def generated_jobs(ctx: Context, count: int, *workers: procs.Proc) -> set[str]:
    """The jobs with outputs, once ``count`` outputs arrived (one image per job)."""
    try:
        found = await events(ctx, subjects.GENERATED, at_least=count, timeout=90)
    except TimeoutError as exc:
        logs = "\n\n".join("\n".join(w.lines[-60:]) for w in workers)
        raise AssertionError(f"{exc}; the workers said:\n{logs}") from None
    return {e.job_id or "" for e in found}


def loads(proc: procs.Proc) -> Counter[str]:
    """The models this worker loaded, with how many times."""
    return Counter(m.group(1) for line in proc.lines if (m := LOADED_RE.search(line)))


@pytest.mark.timeout(600)
async def test_two_workers_keep_their_models_and_finish_every_job(
    ctx: Context, settings: Settings, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    args = ["worker", "generate"]
    env_a = worker_env(settings, subprocess_env, tmp_path, "worker-a")
    env_b = worker_env(settings, subprocess_env, tmp_path, "worker-b")
    async with procs.running(args, env_a) as a, procs.running(args, env_b) as b:
        await a.wait_for_line(READY, timeout=180)
        await b.wait_for_line(READY, timeout=180)
        sent: set[str] = set()
        rounds = 8
        for r in range(rounds):  # interleaved: each round asks for both models at once,
            # in an order drawn per round (with one shared consumer, the order would decide
            # which worker gets which model)
            for model in random.Random(r).sample(MODELS, len(MODELS)):
                sent.add((await submit(ctx, model, seed=r)).id)
            done = await generated_jobs(ctx, len(sent), a, b)
            assert done == sent
        by_worker = {"a": loads(a), "b": loads(b)}
    # Without affinity each round would send each worker either model at random (a load
    # every other job); with it, the models settle on one worker each.
    assert all(count <= 2 for found in by_worker.values() for count in found.values()), by_worker
    assert sum(sum(found.values()) for found in by_worker.values()) <= 4, by_worker


@pytest.mark.timeout(600)
async def test_a_model_whose_holder_died_goes_to_another_worker(
    ctx: Context, settings: Settings, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    args = ["worker", "generate"]
    env_a = worker_env(settings, subprocess_env, tmp_path, "worker-a")
    env_b = worker_env(settings, subprocess_env, tmp_path, "worker-b")
    async with procs.running(args, env_a) as a:
        await a.wait_for_line(READY, timeout=180)
        first = await submit(ctx, "m1", seed=1)
        assert await generated_jobs(ctx, 1, a) == {first.id}
        assert loads(a) == {"m1": 1}
        async with procs.running(args, env_b) as b:
            await b.wait_for_line(READY, timeout=180)
            a.signal(signal.SIGKILL)  # its lease on m1 stays in the ledger until it lapses
            assert await a.wait() != 0
            second = await submit(ctx, "m1", seed=2)
            # b's request on m1 is at the lowest priority while a's lease is live, but it is
            # the only request waiting: a model whose holder is gone is never stuck.
            assert await generated_jobs(ctx, 2, a, b) == {first.id, second.id}
            assert loads(b) == {"m1": 1}


async def test_status_counts_the_backlog_of_every_model(ctx: Context) -> None:
    """/api/status's figures (and the metrics') sum the keyed consumers with the plain one."""
    fn = load("generate")
    await declare_consumer(ctx.js, ctx.names, fn.spec, ctx.settings.function("generate"))
    for model in MODELS:
        await declare_keyed_consumer(ctx.nc, ctx.js, ctx.names, fn.spec, subjects.REQUESTED, model)
    await submit(ctx, "m1", seed=1)
    await submit(ctx, "m2", seed=2)
    await submit(ctx, "m2", seed=3)

    async def counted() -> dict[str, int] | None:
        # The server tells a consumer of a new message on a goroutine of its own, after the
        # publish is acknowledged: a consumer's pending count may lag the stream briefly.
        (stats,) = await consumer_stats(ctx, ["generate"])
        return stats if stats["pending"] == 3 else None

    stats = await eventually(counted, what="three requests pending")
    assert stats["ack_pending"] == 0 and stats["waiting_pulls"] == 0
