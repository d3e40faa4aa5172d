"""The generate function's models: tiny random SD and SDXL pipelines, built offline at test
time and loaded through the real ``from_pretrained`` (``model_for(...).load``), the catalogue's
resolution of generation models, their downloads, and ``darkroom models`` for them.

Everything runs at 64x64 with 2 steps (a few hundredths of a second a call); the hub is
never reached (``HF_HUB_OFFLINE=1``, an empty cache, or a stand-in hub on localhost).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from aiohttp import web
from PIL import Image

from bus import Placement
from bus.core.generation import GenerationError, Job
from bus.core.settings import Settings, load_settings
from bus.models import catalogue
from bus.models.catalogue import (
    ModelUnavailableError,
    cached_snapshot,
    default_generation_model,
    demo_dir,
    has_pipeline,
    pipeline_files,
    resolve_generation,
)
from bus.models.demo import build_tiny_sdxl, ensure_demo
from bus.models.progress import ModelReadiness
from bus.ops.cli import main
from functions.generate import pipelines
from functions.generate.pipelines import Item, Pipelines, model_for, preview, run, total_steps
from tests.support.hfcache import offline_cache
from tests.test_model_readiness import CHUNK, FakeHub

SIDE = 64
STEPS = 2
COMMIT = "0" * 40
SD_TURBO = "stabilityai/sd-turbo"


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No hub access ever, and an empty Hugging Face cache of the test's own."""
    return offline_cache(tmp_path, monkeypatch)


def settings(tmp_path: Path, **values: Any) -> Settings:
    return load_settings(None, {"data_dir": tmp_path / "data", **values})


def tiny(source: Path, **entry: Any) -> dict[str, Any]:
    """A catalogue entry for a tiny pipeline directory, sized for the tests."""
    return {
        "source": str(source),
        "width": SIDE,
        "height": SIDE,
        "steps": STEPS,
        "guidance": 0.0,
        "vram_mb": 50,
        **entry,
    }


def cpu_host(
    monkeypatch: pytest.MonkeyPatch, why: str | None = "torch finds no CUDA device"
) -> None:
    monkeypatch.setattr(catalogue, "no_cuda", lambda settings: why)
    monkeypatch.setattr(pipelines, "no_cuda", lambda settings: why)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo SD pipeline (as profile demo builds it) and a tiny SDXL one, built once."""
    root = tmp_path_factory.mktemp("pipelines")
    sd = ensure_demo("generate", demo_dir(root / "data", "generate"))
    build_tiny_sdxl(root / "sdxl")
    return {"sd": sd, "sdxl": root / "sdxl"}


def load(tmp_path: Path, source: Path, name: str = "tiny", **entry: Any) -> Pipelines:
    """Resolve a catalogue entry naming ``source`` and load it on the CPU, as a worker does."""
    s = settings(tmp_path, generate={"models": {name: tiny(source, **entry)}})
    resolved = resolve_generation(s, name)
    assert (resolved.demo, resolved.cached, resolved.format) == (False, True, "diffusers")
    loaded = model_for(name, resolved, s).load(Placement("cpu"))
    assert isinstance(loaded, Pipelines)
    return loaded


@pytest.fixture(scope="module")
def sd(built: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Pipelines:
    return load(tmp_path_factory.mktemp("sd"), built["sd"], "tiny-sd")


@pytest.fixture(scope="module")
def sdxl(built: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Pipelines:
    return load(tmp_path_factory.mktemp("sdxl"), built["sdxl"], "tiny-sdxl")


def job(**values: Any) -> Job:
    """A resolved job for the tiny pipelines."""
    fields: dict[str, Any] = {
        "id": "job1",
        "created": "2026-01-01T00:00:00Z",
        "prompt": "a red cat",
        "negative_prompt": "",
        "model": "tiny",
        "width": SIDE,
        "height": SIDE,
        "steps": STEPS,
        "guidance": 0.0,
        "seed": 1,
        "n": 1,
        "mode": "txt2img",
        **values,
    }
    return Job(**fields)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def photo(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8))


# --- pipelines ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_txt2img_through_the_real_from_pretrained(
    family: str, request: pytest.FixtureRequest
) -> None:
    pipes: Pipelines = request.getfixturevalue(family)
    assert pipes.family == family and pipes.latent_channels == 4
    expected = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    assert type(pipes.text2image).__name__ == expected
    images = run(pipes, job(), [Item("a red cat", "", 1), Item("a blue dog", "", 2)])
    assert [image.size for image in images] == [(SIDE, SIDE)] * 2
    assert all(image.mode == "RGB" for image in images)
    # A non-square size within the bounds works too (latents are 1/8 of it).
    [wide] = run(pipes, job(width=96, height=SIDE), [Item("a red cat", "", 1)])
    assert wide.size == (96, SIDE)


def test_the_leased_model_is_named_by_its_catalogue_name(
    tmp_path: Path, built: dict[str, Path]
) -> None:
    s = settings(tmp_path, generate={"models": {"tiny": tiny(built["sd"], vram_mb=1234)}})
    model = model_for("tiny", resolve_generation(s, "tiny"), s)
    assert (model.name, model.estimate_mb) == ("generate:tiny", 1234)
    demo = settings(tmp_path, profile="demo")
    model = model_for("sd-turbo", resolve_generation(demo, "sd-turbo"), demo)
    assert model.name == "generate:sd-turbo" and model.estimate_mb < 100  # the tiny demo


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_img2img_shares_the_components_and_loads_nothing(
    family: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import DiffusionPipeline, ModelMixin

    pipes: Pipelines = request.getfixturevalue(family)
    loads: list[str] = []
    for owner in (DiffusionPipeline, ModelMixin):
        real = owner.from_pretrained.__func__  # type: ignore[attr-defined]

        def counted(cls: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            loads.append(cls.__name__)
            return _real(cls, *args, **kwargs)

        monkeypatch.setattr(owner, "from_pretrained", classmethod(counted))
    image_job = job(mode="img2img", strength=0.5, steps=4)
    images = run(pipes, image_job, [Item("a red cat", "", 1, photo())])
    assert loads == [] and images[0].size == (SIDE, SIDE)
    i2i = pipes.for_call(True, None)
    assert "Img2Img" in type(i2i).__name__ and pipes.for_call(True, None) is i2i
    shared = {
        k: v for k, v in pipes.text2image.components.items() if isinstance(v, torch.nn.Module)
    }
    assert shared and all(i2i.components[k] is module for k, module in shared.items())
    assert i2i.scheduler is not pipes.text2image.scheduler  # its own: no state shared


def test_the_same_seeds_give_the_same_pixels_and_another_seed_others(sd: Pipelines) -> None:
    first = run(sd, job(), [Item("a red cat", "", 7)])[0]
    again = run(sd, job(), [Item("a red cat", "", 7)])[0]
    other = run(sd, job(), [Item("a red cat", "", 8)])[0]
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_batch_gives_each_image_what_it_gives_alone(
    family: str, request: pytest.FixtureRequest
) -> None:
    """Per-image generators: an image's noise is its seed's, whatever it is batched with
    (with guidance on and negative prompts too)."""
    pipes: Pipelines = request.getfixturevalue(family)
    guided = job(guidance=3.0)
    items = [Item("a red cat", "blurry", 3), Item("a blue dog", "dark", 4)]
    together = run(pipes, guided, items)
    alone = [run(pipes, guided, [item])[0] for item in items]
    for batched, single in zip(together, alone, strict=True):
        assert np.array_equal(pixels(batched), pixels(single))
    assert not np.array_equal(pixels(together[0]), pixels(together[1]))


def test_a_scheduler_by_name_leaves_the_cached_pipelines_alone(sd: Pipelines) -> None:
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    own = sd.text2image.scheduler
    before = dict(own.config)
    images = run(sd, job(scheduler="dpmpp-2m-karras"), [Item("a red cat", "", 1)])
    assert images[0].size == (SIDE, SIDE)
    switched = sd.for_call(False, "dpmpp-2m-karras")
    assert isinstance(switched.scheduler, DPMSolverMultistepScheduler)
    assert switched.scheduler.config.use_karras_sigmas is True
    assert switched.unet is sd.text2image.unet  # the same weights
    # The model's own pipeline and scheduler are untouched, and a plain call is as before.
    assert sd.text2image.scheduler is own and isinstance(own, EulerDiscreteScheduler)
    assert dict(own.config) == before
    assert sd.for_call(False, None) is sd.text2image
    plain = run(sd, job(), [Item("a red cat", "", 1)])[0]
    assert np.array_equal(pixels(plain), pixels(run(sd, job(), [Item("a red cat", "", 1)])[0]))
    assert not np.array_equal(pixels(plain), pixels(images[0]))
    # Image-to-image with a scheduler: one more pipeline, its own scheduler object.
    run(
        sd,
        job(mode="img2img", strength=0.5, steps=4, scheduler="euler-a"),
        [Item("x", "", 1, photo())],
    )
    assert (
        type(sd.for_call(True, "euler-a").scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    )
    assert "euler-a" in sd.schedulers and "flow-euler" not in sd.schedulers


def test_a_scheduler_that_does_not_fit_is_refused_by_name(sd: Pipelines) -> None:
    for name in ("flow-euler", "lcm"):
        with pytest.raises(GenerationError) as raised:
            run(sd, job(scheduler=name), [Item("a red cat", "", 1)])
        [problem] = raised.value.problems
        assert problem.startswith(f"scheduler {name} does not fit model tiny-sd (a sd pipeline")
        assert "use one of euler, euler-trailing, euler-a" in problem


def test_quantisation_on_a_cpu_is_a_clear_error(
    tmp_path: Path, built: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    for bits in ("4bit", "8bit"):
        s = settings(tmp_path, generate={"models": {"q": tiny(built["sd"], quantization=bits)}})
        resolved = resolve_generation(s, "q")
        cpu_host(monkeypatch)
        with pytest.raises(ModelUnavailableError) as raised:
            model_for("q", resolved, s)
        message = str(raised.value)
        assert f"generate.models.q.quantization = '{bits}' needs a CUDA device" in message
        assert "torch finds no CUDA device" in message and "'none'" in message
        # A host with CUDA whose worker was placed on the CPU: the load says the same.
        cpu_host(monkeypatch, None)
        with pytest.raises(ModelUnavailableError, match=r"needs a CUDA device .* it runs on cpu"):
            model_for("q", resolved, s).load(Placement("cpu"))


def test_each_step_is_reported_and_true_stops_the_call(sd: Pipelines) -> None:
    seen: list[tuple[int, int, tuple[int, ...]]] = []

    def on_step(step: int, total: int, latents: Any) -> bool:
        seen.append((step, total, tuple(latents.shape)))
        return step == 2

    images = run(sd, job(steps=5), [Item("a", "", 1), Item("b", "", 2)], on_step)
    latent = (2, 4, SIDE // 8, SIDE // 8)
    assert seen == [(1, 5, latent), (2, 5, latent)] and len(images) == 2
    seen.clear()
    run(sd, job(steps=3), [Item("a", "", 1)], lambda s, t, latents: bool(seen.append((s, t, ()))))
    assert [(s, t) for s, t, _ in seen] == [(1, 3), (2, 3), (3, 3)]  # the stop did not linger


@pytest.mark.parametrize(
    ("family", "steps", "strength"), [("sd", 4, 0.5), ("sd", 5, 0.6), ("sdxl", 4, 0.5)]
)
def test_image_modes_report_the_steps_the_pipeline_runs(
    family: str, steps: int, strength: float, request: pytest.FixtureRequest
) -> None:
    pipes: Pipelines = request.getfixturevalue(family)
    image_job = job(mode="img2img", steps=steps, strength=strength)
    seen: list[tuple[int, int]] = []
    run(pipes, image_job, [Item("a", "", 1, photo())], lambda s, t, x: bool(seen.append((s, t))))
    assert seen == [(i, total_steps(image_job)) for i in range(1, int(steps * strength) + 1)]


def test_a_preview_is_a_small_jpeg_of_the_latents(sd: Pipelines) -> None:
    shots: list[bytes | None] = []

    def on_step(step: int, total: int, latents: Any) -> bool:
        shots.append(preview(latents, 1, sd.family))
        return False

    run(sd, job(width=128, height=96), [Item("a", "", 1), Item("b", "", 2)], on_step)
    assert len(shots) == STEPS
    for shot in shots:
        assert shot is not None and shot[:2] == b"\xff\xd8"
        with Image.open(io.BytesIO(shot)) as decoded:
            assert decoded.format == "JPEG" and decoded.size == (16, 12)  # the latents' size
    big = torch.zeros(1, 4, 256, 128)
    with Image.open(io.BytesIO(preview(big, 0, "sdxl") or b"")) as decoded:
        assert decoded.size == (64, 128)  # at most px on the long side
    assert preview(big, 0, "flux") is None  # no linear map for it
    assert preview(torch.zeros(1, 16, 8, 8), 0, "sd") is None
    assert preview(big, 1, "sd") is None  # no such image


# --- the catalogue -----------------------------------------------------------------------------


def test_profile_demo_serves_every_catalogue_name_with_the_demo_pipeline(
    tmp_path: Path, offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu_host(monkeypatch, None)
    s = settings(tmp_path, profile="demo")
    m = resolve_generation(s, "animagine-xl")
    assert (m.name, m.demo, m.source, m.format) == ("animagine-xl", True, "demo", "diffusers")
    assert (
        m.location == str(demo_dir(s.data_dir, "generate")) and m.label == "generate/animagine-xl"
    )
    assert m.identity() == {
        "task": "generate", "source": "demo", "revision": None, "demo": True, "name": "animagine-xl"
    }  # fmt: skip
    assert resolve_generation(s).name == "dreamshaper-xl-lightning"  # the default, with CUDA
    pipes = model_for("animagine-xl", m, s).load(Placement("cpu"))  # built on first use
    assert pipes.family == "sd" and has_pipeline(Path(m.location))


def test_offline_a_built_in_model_falls_back_to_the_demo_loudly(
    tmp_path: Path, offline: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cpu_host(monkeypatch, None)
    caplog.set_level(logging.WARNING, "darkroom.models")
    m = resolve_generation(settings(tmp_path), "sd-turbo")
    assert m.demo and m.name == "sd-turbo" and "hub cannot be reached" in m.reason
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        w.startswith("!!! generate.models.sd-turbo: stabilityai/sd-turbo is not available")
        and "darkroom models pull sd-turbo" in w
        for w in warned
    ), warned


def test_a_model_the_user_added_that_cannot_be_had_says_how_to_fix_it(
    tmp_path: Path, offline: Path
) -> None:
    s = settings(tmp_path, generate={"models": {"mine": {"source": "someone/my-sdxl"}}})
    with pytest.raises(ModelUnavailableError) as raised:
        resolve_generation(s, "mine")
    message = str(raised.value)
    assert message.startswith("generate.models.mine: 'someone/my-sdxl' is not available: ")
    assert "darkroom models pull mine" in message and "[generate.models.mine]" in message
    half = tmp_path / "half-copied"
    (half / "unet").mkdir(parents=True)
    (half / "model_index.json").write_text(
        json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]})
    )
    (half / "unet" / "config.json").write_text("{}")
    s = settings(tmp_path, generate={"models": {"mine": {"source": str(half)}}})
    with pytest.raises(ModelUnavailableError, match="not a directory holding a saved diffusers"):
        resolve_generation(s, "mine")
    with pytest.raises(ModelUnavailableError, match="no model 'nope' in the catalogue"):
        resolve_generation(s, "nope")


def cache_pipeline(cache: Path, repo: str, weights: bool = True) -> Path:
    """A pipeline in the Hugging Face cache's layout (refs/main -> a snapshot)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snapshot = root / "snapshots" / COMMIT
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "safety_checker": [None, None],
    }
    for folder in ("unet", "tokenizer"):
        (snapshot / folder).mkdir(parents=True)
    (snapshot / "model_index.json").write_text(json.dumps(index))
    (snapshot / "unet" / "config.json").write_text("{}")
    (snapshot / "tokenizer" / "tokenizer.json").write_text("{}")
    if weights:
        (snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_text("w")
    return snapshot


def test_a_pipeline_in_the_cache_counts_only_with_every_component_s_weights(
    tmp_path: Path, offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu_host(monkeypatch, None)
    snapshot = cache_pipeline(offline, SD_TURBO, weights=False)
    assert cached_snapshot(SD_TURBO, "main", pipeline=True) is None
    assert resolve_generation(settings(tmp_path), "sd-turbo").demo
    (snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_text("w")
    m = resolve_generation(settings(tmp_path), "sd-turbo")
    assert (m.demo, m.cached, m.location, m.revision) == (False, True, str(snapshot), "main")
    # A model resolved before it was downloaded finds it in the cache when it loads.
    early = resolve_generation(settings(tmp_path, profile="auto"), "sd-turbo", lambda r, v: True)
    assert early.on_disk().location == str(snapshot)


def test_without_cuda_the_default_is_the_cpu_model_unless_one_was_chosen(
    tmp_path: Path, offline: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "darkroom.models")

    def yes(repo: str, revision: str) -> bool:
        return True

    cpu_host(monkeypatch)
    m = resolve_generation(settings(tmp_path), None, yes)
    assert (m.name, m.source, m.demo, m.cached) == ("sd-turbo", SD_TURBO, False, False)
    assert (
        "generate: torch finds no CUDA device, so the default model is sd-turbo, sized for a "
        "CPU, instead of dreamshaper-xl-lightning (set generate.default_model to choose)"
    ) in [r.getMessage() for r in caplog.records]
    chosen = settings(tmp_path, generate={"default_model": "dreamshaper-xl-lightning"})
    assert default_generation_model(chosen, yes) == "dreamshaper-xl-lightning"
    assert resolve_generation(settings(tmp_path), "animagine-xl", yes).name == "animagine-xl"
    cpu_host(monkeypatch, None)  # a CUDA host
    assert default_generation_model(settings(tmp_path), yes) == "dreamshaper-xl-lightning"
    # Offline without CUDA: a cached default still serves when the CPU model is not there.
    cpu_host(monkeypatch)
    cache_pipeline(offline, "Lykon/dreamshaper-xl-lightning")
    assert default_generation_model(settings(tmp_path)) == "dreamshaper-xl-lightning"
    assert "the CPU-sized model is not available" in caplog.text


def test_pipeline_files_take_what_loading_needs() -> None:
    files = [
        "model_index.json",
        "README.md",
        "sd_xl_turbo.safetensors",  # a single-file checkpoint
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors.index.fp16.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.bin",  # no safetensors: the .bin it is
        "text_encoder/flax_model.msgpack",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
        "vae_decoder/model.onnx",  # not a component
    ]
    components = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    plain = pipeline_files(files, components, None)
    assert sorted(plain) == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.bin",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    fp16 = set(pipeline_files(files, components, "fp16")) - set(plain)
    assert fp16 == {
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors.index.fp16.json",
    }
    assert "text_encoder/model.bin" in pipeline_files(files, components, "fp16")  # no fp16 there


# --- darkroom models ---------------------------------------------------------------------------


def test_models_pull_knows_generation_models_by_name(
    tmp_path: Path, offline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "pull", "sd-turbo", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "generate.models.sd-turbo: cannot download 'stabilityai/sd-turbo'" in err
    assert "HF_HUB_OFFLINE=1" in err and "Traceback" not in err
    assert main(["models", "pull", "sd-turbo2", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no model task 'sd-turbo2'; the tasks are caption, tags, embed, nsfw" in err
    assert "the generation models are animagine-xl, dreamshaper-xl-lightning" in err


def test_models_list_shows_the_generation_models(
    tmp_path: Path, offline: Path, built: dict[str, Path], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    cpu_host(monkeypatch)
    monkeypatch.setenv("DARKROOM_GENERATE__MODELS", json.dumps({
        "tiny": tiny(built["sd"]), "mine": {"source": "someone/missing"}
    }))  # fmt: skip
    assert main(["models", "list", "--data-dir", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line and line[0] != " "}
    assert rows["tiny"].split()[1:3] == ["real", "yes"] and str(built["sd"]) in rows["tiny"]
    assert rows["sd-turbo"].split()[1:4] == ["DEMO", "no", "default"]  # without CUDA
    assert "UNAVAILABLE" in rows["mine"] and "darkroom models pull mine" in out


# --- downloads ---------------------------------------------------------------------------------


class FolderHub(FakeHub):
    """The stand-in hub (see tests/test_model_readiness.py), with files in folders
    (``unet/config.json``), as pipelines have them."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self._info)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}", self._tree)
        app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{file:.+}", self._file)
        return app


@pytest.fixture
async def pipeline_hub(
    aiohttp_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> FolderHub:
    """The stand-in hub, with huggingface_hub pointed at it and a cache of the test's own."""
    import huggingface_hub.constants as hf

    fake = FolderHub()
    server = await aiohttp_server(fake.app())
    fake.endpoint = str(server.make_url("")).rstrip("/")
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "ENDPOINT", fake.endpoint)
    template = fake.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(hf, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    return fake


async def test_prepare_downloads_only_the_pipeline_files_with_progress_then_it_loads(
    tmp_path: Path, built: dict[str, Path], pipeline_hub: FolderHub
) -> None:

    repo = "darkroom-test/tiny-sd"
    files = {
        str(p.relative_to(built["sd"])): p.read_bytes()
        for p in built["sd"].rglob("*")
        if p.is_file() and p.name != "darkroom-demo.json"
    }
    wanted = set(files)
    files["unet/diffusion_pytorch_model.fp16.safetensors"] = b"a variant nobody asked for"
    files["tiny-sd.safetensors"] = b"a single-file checkpoint"
    pipeline_hub.repos[repo] = files
    s = settings(tmp_path, generate={"models": {"tiny": {**tiny(Path("x")), "source": repo}}})
    resolved = resolve_generation(s, "tiny", lambda r, v: True)
    assert (resolved.cached, resolved.location) == (False, repo)
    readiness = ModelReadiness(None, "generate", "host", "worker-generate")
    await readiness.prepare([resolved])
    entry = readiness.entries["generate/tiny"]
    # The bytes the snapshot fetched: all but model_index.json, read first to pick the files.
    total = sum(len(files[name]) for name in wanted - {"model_index.json"})
    assert (entry.state, entry.bytes_done, entry.bytes_total) == ("ready", total, total)
    snapshot = cached_snapshot(repo, "main", pipeline=True)
    assert snapshot is not None
    got = {str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()}
    assert got == wanted
    pipes = await asyncio.to_thread(lambda: model_for("tiny", resolved, s).load(Placement("cpu")))
    assert pipes.family == "sd"
    await readiness.prepare([resolved])  # on disk now: nothing asked of the hub again
    assert readiness.entries["generate/tiny"].state == "cached"
