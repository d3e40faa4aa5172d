"""GPU smoke check: the caption models at their real size, leased and measured on the device.

Run with ``python -m tests.gpu.smoke_caption [--device cuda:0] [--images 8]
[--max-new-tokens 32] [--dtype auto] [--tolerance 0.05]``, or with pytest:
``python -m pytest tests/gpu/smoke_caption.py -q`` (the GPU test skips without CUDA). Without
torch or CUDA the script checks the architectures (below), prints ``skipped: no CUDA`` and
exits 0.

The models are architecture-true, with random weights: the configurations of the defaults,
``HuggingFaceTB/SmolVLM2-500M-Video-Instruct`` and ``google/siglip2-base-patch16-256``, built
offline (nothing is downloaded):

* the VLM is ``SmolVLMForConditionalGeneration`` (the Idefics3 family): a SigLIP-base vision
  tower (hidden 768, 12 layers, 12 heads, MLP 3072, 512 px images in 16 px patches), a pixel
  shuffle of scale factor 4 (64 image tokens per 512 px tile), and a Llama text model the
  size of SmolLM2-360M (hidden 960, 32 layers, 15 heads, 5 key/value heads, MLP 2560, vocab
  49280 with the image tokens at their real ids, untied output head, rope theta 100000):
  507.5M parameters, the model card's 507M. Its images are preprocessed as the model's
  own processor does: resized to 2048 px on the longest edge and split into 512 px tiles
  plus a global view, so a 512 px display becomes 17 tiles, 1088 image tokens. The product
  turns the splitting off by default (``caption.image_splitting``): one 512 px view, 64
  image tokens.
* the SigLIP2 model is ``SiglipModel``: the fixed-resolution SigLIP2 checkpoints are
  ``model_type: siglip`` (the NaFlex ones are ``siglip2``); base sizes in both towers
  (hidden 768, 12 layers, 12 heads, MLP 3072), 256 px images in 16 px patches, 64 text
  positions, Gemma's 256000-token vocabulary, projection 768: 375.2M parameters, the
  model card's 375M.

Tokenizers are built from scratch (word-level; the VLM's with all 49280 entries, so every
id the model can generate decodes). The VLM's processor is saved as ``Idefics3Processor``
with SmolVLM2's settings: ``SmolVLMProcessor`` lays out the same tokens but cannot be built
without torchvision (its video processor needs it); the product loads the saved one as it
loads SmolVLM2's (:func:`functions.caption.models.load_vlm_processor`).

On the GPU the models are saved (``save_pretrained``, float32 like the published
checkpoints) and loaded through the product's own path: settings that name the directories
as sources, :class:`functions.caption.models.CaptionModels`, the real ``from_pretrained``
(with the settings' dtype, ``auto`` by default) in ``Captioner``/``Siglip``, each under a VRAM
lease from a :class:`bus.gpu.resident.ResidentModels` on a real ledger (its own nats-server).
Per model it prints the estimate from the settings, the lease after the load (resized to
the measured footprint), the growth of ``torch.cuda.memory_allocated`` and the parameter
bytes. Then it captions ``--images`` 512 px images in one ``generate`` (``--max-new-tokens``)
and tags them in one SigLIP pass, after one warm-up call each, and prints captions/s,
images/s and the peak VRAM (``torch.cuda.max_memory_allocated``).

It exits 1 when a lease is more than ``--tolerance`` off torch's allocation or the parameter
bytes, when an estimate is off the measured footprint by more than ``--estimate-tolerance``
(50%: a rough estimate is expected, a wrong dtype is not), or when a model returns the wrong
number of results.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
from PIL import Image

from bus.core.settings import Settings
from bus.gpu.leases import MIB, Holder, Ledger, discover_devices
from bus.gpu.resident import ResidentModels
from bus.ops.embedded import NatsServer
from bus.runtime.streams import key_value
from functions.caption.models import SHORT_PROMPT, CaptionModels, default_vocabulary
from tests.gpu.smoke_leases import cuda_torch, off_by, parameter_mb

# --- the real configurations -------------------------------------------------------------------
VLM_PARAMETERS = 507e6  # SmolVLM2-500M-Video-Instruct, from its model card
SIGLIP_PARAMETERS = 375e6  # siglip2-base-patch16-256, from its model card
PARAMETER_TOLERANCE = 0.005

VLM_VOCAB = 49280
TEXT_VOCAB = 49152  # SmolLM2's; the image and chat tokens follow it
IMAGE_TOKEN_ID = 49190
IMAGE_SEQ_LEN = 64  # (512 / 16) ** 2 patches / scale factor 4 ** 2
VLM_SPECIAL = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
# Added after the text vocabulary, at the ids the real tokenizer gives them.
VLM_ADDED = [
    "<global-img>",  # 49152
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
    "<fake_token_around_image>",
    "<image>",  # 49190
    *(f"<|reserved_special_token_{i}|>" for i in range(88)),
    "<end_of_utterance>",  # 49279
]
# SmolVLM2's chat template.
VLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SIGLIP_VOCAB = 256000  # Gemma's
SIGLIP_WORDS = ["<pad>", "</s>", "<s>", "<unk>", "this", "is", "a", "photo", "of"]  # pad/eos/bos

DISPLAY_PX = 512
BUCKET = "smoke_caption"


def vlm_config() -> Any:
    """SmolVLM2-500M's configuration (its model card's config.json, defaults filled in)."""
    from transformers import SmolVLMConfig

    return SmolVLMConfig(
        image_token_id=IMAGE_TOKEN_ID,
        scale_factor=4,
        tie_word_embeddings=False,
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": DISPLAY_PX,
            "patch_size": 16,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": VLM_VOCAB,
            "hidden_size": 960,
            "intermediate_size": 2560,
            "num_hidden_layers": 32,
            "num_attention_heads": 15,
            "num_key_value_heads": 5,
            "head_dim": 64,
            "max_position_embeddings": 8192,
            "rope_theta": 100000.0,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "pad_token_id": VLM_SPECIAL["<|im_end|>"],
            "bos_token_id": VLM_SPECIAL["<|im_start|>"],
            "eos_token_id": VLM_VOCAB - 1,
        },
    )


def siglip_config() -> Any:
    """siglip2-base-patch16-256's configuration: SigLIP's base defaults, Gemma's vocabulary."""
    from transformers import SiglipConfig

    return SiglipConfig(
        text_config={"vocab_size": SIGLIP_VOCAB, "pad_token_id": 0, "eos_token_id": 1,
                     "bos_token_id": 2},
        vision_config={"image_size": 256},
    )  # fmt: skip


def word_tokenizer(words: list[str], specials: list[str], **kwargs: Any) -> Any:
    """A word-level tokenizer whose ids are the positions in ``words``; ``specials`` (which
    must be in ``words``) are matched before splitting on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(words)}
    inner = Tokenizer(models.WordLevel(vocab=vocab, unk_token=kwargs["unk_token"]))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=inner, additional_special_tokens=specials, **kwargs
    )


def vlm_processor() -> Any:
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    words = [*VLM_SPECIAL, "User:", "Assistant:"]
    words += [f"<unused_{i}>" for i in range(len(words), TEXT_VOCAB)]
    tokenizer = word_tokenizer(
        [*words, *VLM_ADDED],
        VLM_ADDED,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        padding_side="left",
        model_max_length=8192,
    )
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=True,
        size={"longest_edge": 4 * DISPLAY_PX},
        max_image_size={"longest_edge": DISPLAY_PX},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=VLM_CHAT_TEMPLATE,
    )


def siglip_processor() -> Any:
    from transformers import SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = word_tokenizer(
        SIGLIP_WORDS, [], unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
        model_max_length=64,
    )  # fmt: skip
    image_processor = SiglipImageProcessorPil(size={"height": 256, "width": 256})
    return SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)  # type: ignore[no-untyped-call]


def build_vlm(path: Path, device: str = "cpu") -> None:
    """Save the random-weight VLM and its processor to ``path`` (float32, as published)."""
    import torch
    from transformers import SmolVLMForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = SmolVLMForConditionalGeneration(vlm_config())
    model.generation_config.pad_token_id = VLM_SPECIAL["<|im_end|>"]
    model.generation_config.eos_token_id = VLM_VOCAB - 1
    model.save_pretrained(path)
    vlm_processor().save_pretrained(path)


def build_siglip(path: Path, device: str = "cpu") -> None:
    """Save the random-weight SigLIP2 model and its processor to ``path`` (float32)."""
    import torch
    from transformers import SiglipModel

    torch.manual_seed(0)
    with torch.device(device):
        model = SiglipModel(siglip_config())
    model.save_pretrained(path)
    siglip_processor().save_pretrained(path)


def parameters(model_class: Any, config: Any) -> int:
    """A model's parameter count, built on the meta device (no memory, no init)."""
    import torch

    with torch.device("meta"):
        model = model_class(config)
    return sum(p.numel() for p in model.parameters())


def photo(index: int, width: int = DISPLAY_PX, height: int = DISPLAY_PX) -> Image.Image:
    """A distinct photo-like picture: soft stripes of colour over grain, seeded by ``index``."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    angle = rng.uniform(0, math.pi)
    along = x * math.cos(angle) + y * math.sin(angle)
    base, freq, phase = rng.uniform(50, 205, 3), rng.uniform(1, 8, 3), rng.uniform(0, 6.3, 3)
    channels = [base[c] + 45 * np.sin(2 * math.pi * freq[c] * along + phase[c]) for c in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 10, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# --- on the GPU --------------------------------------------------------------------------------
@dataclass
class Row:
    model: str
    estimate_mb: int
    lease_mb: int
    allocated_mb: float  # growth of torch.cuda.memory_allocated across the load
    parameter_mb: float


async def check(
    torch: Any,
    device_id: str,
    count: int,
    max_new_tokens: int,
    dtype: str,
    tolerance: float,
    estimate_tolerance: float,
) -> list[str]:
    """Build, load under leases, run, measure; the problems found (none: all is well)."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="smoke-caption-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        build_vlm(root / "vlm", device_id)
        build_siglip(root / "siglip", device_id)
        torch.cuda.empty_cache()
        print(f"built and saved both models in {time.perf_counter() - started:.1f} s")
        entry = {"dtype": dtype}
        settings = Settings(
            data_dir=root / "data",
            gpu={"device": device_id, "mode": "balanced"},
            models={
                "caption": {**entry, "source": str(root / "vlm")},
                "tags": {**entry, "source": str(root / "siglip")},
                "embed": {**entry, "source": str(root / "siglip")},
            },
            caption={"max_new_tokens": max_new_tokens},
        )
        models = CaptionModels.from_settings(settings)
        (device,) = discover_devices(settings)
        print(
            f"{device.id} ({torch.cuda.get_device_name(device_id)}): {device.capacity_mb} MB, "
            f"{device.free_mb} MB free, reserve {device.reserve_mb} MB"
        )
        server = NatsServer(root / "nats", port=0)
        await server.start()
        nc = await nats.connect(server.url)
        try:
            kv = await key_value(nc.jetstream(timeout=10), BUCKET)
            async with Ledger(kv, device, Holder.here("smoke", "gpu-smoke")) as ledger:
                resident = ResidentModels(ledger, mode="balanced", idle_ttl_s=3600)
                try:
                    rows = []
                    for model in (models.caption, models.tags):
                        before = torch.cuda.memory_allocated(device_id)
                        await resident.preload(model)
                        allocated = (torch.cuda.memory_allocated(device_id) - before) / MIB
                        async with resident.use(model) as loaded:
                            params = parameter_mb(loaded.model)
                        [lease] = [
                            x for x in (await ledger.snapshot()).leases if x.model == model.name
                        ]
                        rows.append(Row(model.name, model.estimate_mb, lease.mb, allocated, params))
                    print_rows(rows)
                    problems += lease_problems(rows, tolerance, estimate_tolerance)

                    images = [photo(i) for i in range(count)]
                    torch.cuda.reset_peak_memory_stats(device_id)
                    async with resident.use(models.caption) as captioner:
                        await resident.run(captioner.caption, images[:1], SHORT_PROMPT)  # warm-up
                        started = time.perf_counter()
                        texts = await resident.run(captioner.caption, images, SHORT_PROMPT)
                        caption_s = time.perf_counter() - started
                    vocabulary = default_vocabulary()
                    async with resident.use(models.tags) as siglip:
                        await resident.run(siglip.analyse, images[:1], vocabulary)  # warm-up
                        started = time.perf_counter()
                        analyses = await resident.run(siglip.analyse, images, vocabulary)
                        tags_s = time.perf_counter() - started
                    peak_mb = torch.cuda.max_memory_allocated(device_id) / MIB
                    print(
                        f"captions: {count} at {DISPLAY_PX}px in one generate "
                        f"({max_new_tokens} new tokens at most): {caption_s:.2f} s, "
                        f"{count / caption_s:.1f} captions/s"
                    )
                    print(
                        f"tags and embeddings: {count} images in one SigLIP pass over "
                        f"{len(vocabulary)} tags: {tags_s:.3f} s, {count / tags_s:.1f} images/s"
                    )
                    print(f"peak VRAM while running: {peak_mb:,.0f} MB")
                    if len(texts) != count or not all(isinstance(t, str) for t in texts):
                        problems.append(f"captioning {count} images gave {len(texts)} captions")
                    dims = {len(a.embedding) for a in analyses}
                    if len(analyses) != count or dims != {768}:
                        problems.append(
                            f"SigLIP gave {len(analyses)} results of {dims} dimensions for "
                            f"{count} images (expected 768)"
                        )
                finally:
                    await resident.close()
        finally:
            await nc.close()
            await server.stop()
    return problems


def lease_problems(rows: list[Row], tolerance: float, estimate_tolerance: float) -> list[str]:
    problems = []
    for row in rows:
        for label, theirs in (("allocated", row.allocated_mb), ("parameter", row.parameter_mb)):
            if off_by(row.lease_mb, theirs) > tolerance:
                problems.append(
                    f"{row.model}: lease {row.lease_mb} MB is off the {label} {theirs:,.0f} MB "
                    f"by more than {tolerance:.0%}"
                )
        if off_by(row.estimate_mb, row.lease_mb) > estimate_tolerance:
            problems.append(
                f"{row.model}: the estimate {row.estimate_mb} MB is off the measured "
                f"{row.lease_mb} MB by more than {estimate_tolerance:.0%}"
            )
    return problems


def print_rows(rows: list[Row]) -> None:
    print(
        f"{'model':<58}{'estimate MB':>12}{'lease MB':>10}{'allocated +MB':>15}"
        f"{'parameter MB':>14}{'estimate/lease':>16}"
    )
    for r in rows:
        name = r.model if len(r.model) <= 56 else "..." + r.model[-53:]
        print(
            f"{name:<58}{r.estimate_mb:>12,}{r.lease_mb:>10,}{r.allocated_mb:>15,.0f}"
            f"{r.parameter_mb:>14,.0f}{r.estimate_mb / r.lease_mb:>16.2f}"
        )


def architecture_report() -> list[str]:
    """The parameter counts against the model cards' (quick, on the meta device)."""
    from transformers import SiglipModel, SmolVLMForConditionalGeneration

    problems = []
    for name, model_class, config, expected in (
        ("SmolVLM2-500M", SmolVLMForConditionalGeneration, vlm_config(), VLM_PARAMETERS),
        ("SigLIP2-base-256", SiglipModel, siglip_config(), SIGLIP_PARAMETERS),
    ):
        count = parameters(model_class, config)
        print(f"{name}: {count:,} parameters (model card: {expected / 1e6:.0f}M)")
        if off_by(count, expected) > PARAMETER_TOLERANCE:
            problems.append(f"{name} has {count:,} parameters, not about {expected:,.0f}")
    return problems


# --- pytest ------------------------------------------------------------------------------------
def test_the_models_have_the_real_architectures() -> None:
    pytest.importorskip("transformers")
    assert architecture_report() == []
    config = vlm_config()
    vision = config.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2 == IMAGE_SEQ_LEN


def test_the_vlm_processor_lays_out_a_display_as_smolvlm2_does() -> None:
    pytest.importorskip("transformers")
    processor = vlm_processor()
    tokenizer = processor.tokenizer
    assert len(tokenizer) == VLM_VOCAB == vlm_config().text_config.vocab_size
    ids = tokenizer.convert_tokens_to_ids
    assert ids("<image>") == IMAGE_TOKEN_ID and ids("<end_of_utterance>") == VLM_VOCAB - 1
    assert ids("<global-img>") == TEXT_VOCAB and ids("<fake_token_around_image>") == 49189
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi."}]}],
        add_generation_prompt=True,
    )
    assert prompt == "<|im_start|>User:<image>Hi.<end_of_utterance>\nAssistant:"
    inputs = processor(text=[prompt], images=[[photo(0)]], return_tensors="pt")
    # 2048 px split into 4x4 tiles of 512 px, plus the global view.
    assert tuple(inputs["pixel_values"].shape) == (1, 17, 3, DISPLAY_PX, DISPLAY_PX)
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == 17 * IMAGE_SEQ_LEN


@pytest.mark.timeout(900)
@pytest.mark.skipif(cuda_torch() is None, reason="needs torch with a CUDA device")
def test_the_models_are_leased_and_run_on_the_gpu() -> None:
    torch = cuda_torch()
    assert asyncio.run(check(torch, "cuda:0", 8, 32, "auto", 0.05, 0.5)) == []


# --- the script --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--device", default="cuda:0", help="the GPU to check, e.g. cuda:1")
    parser.add_argument("--images", type=int, default=8, help="images in the batch")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="cap on each caption")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="the settings' dtype for both models (auto: as saved, float32)",
    )
    parser.add_argument("--tolerance", type=float, default=0.05, help="lease vs torch, relative")
    parser.add_argument(
        "--estimate-tolerance", type=float, default=0.5, help="estimate vs measured, relative"
    )
    args = parser.parse_args(argv)
    if args.images < 1 or args.max_new_tokens < 4 or args.tolerance < 0:
        parser.error("--images must be >= 1, --max-new-tokens >= 4 and --tolerance >= 0")
    if importlib.util.find_spec("transformers") is None:
        print("skipped: no transformers (make install-ml)")
        return 0
    problems = architecture_report()
    torch = cuda_torch()
    if torch is None:
        print("skipped: no CUDA")
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only
        problems += asyncio.run(
            check(
                torch,
                args.device,
                args.images,
                args.max_new_tokens,
                args.dtype,
                args.tolerance,
                args.estimate_tolerance,
            )
        )
    for problem in problems:
        print(f"FAIL {problem}")
    print("caption models check out" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
