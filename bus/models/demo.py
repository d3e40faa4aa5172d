"""Tiny demo models, built offline with random weights and loaded like real ones.

Each task gets a model of the same family as its real default, small enough to build in a
second and to run anywhere, saved with ``save_pretrained`` so it goes through the real
``from_pretrained`` (and ``generate``) code:

- ``caption``: an Idefics3 VLM (the SmolVLM family) with its processor and chat template;
- ``tags`` and ``embed``: a SigLIP2 dual encoder with its processor (``EMBED_DIM``-d);
- ``nsfw``: a ViT image classifier with the labels ``sfw`` and ``nsfw``;
- ``generate``: a Stable Diffusion pipeline (UNet, VAE, CLIP text encoder, Euler scheduler)
  that every generation model of the catalogue falls back to. :func:`build_tiny_sdxl` builds a
  tiny SDXL one for tests.

Tokenizers are built from scratch (a word-level vocabulary; for the pipelines a byte-level
CLIP BPE with no merges: every byte is a token), so nothing is downloaded.
Their output is random: results made with them are marked ``demo``.

Building is idempotent: a finished model has :data:`MARKER`, and it is built in a
temporary sibling directory and renamed into place, so a reader never sees half a model.
Builders take a file lock (``.<task>.lock`` beside it) first, so processes that start at
once build it once, and one replacing an older build never deletes another's new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bus.models.catalogue import Task

MARKER = "darkroom-demo.json"
# transformers imports its classes lazily, and two threads importing at once can fail
# ("cannot import name 'ViTConfig' from 'transformers'"): caption and generate build
# their demo models side by side on `darkroom up`. The builds are small; one at a time.
_ONE_BUILD_AT_A_TIME = threading.Lock()
BUILDER_VERSION = 1  # bump when a config below changes: older builds are rebuilt
EMBED_DIM = 32
SEED = 0

_VOCABULARY = (
    "a an the of in on at with and photo picture image cat dog person people car tree sky "
    "sea water beach mountain city street building house room sofa table food flower bird "
    "User: Assistant: red green blue yellow black white dark bright old small large night day "
    "sunset"
)

_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %} {{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %} {{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def is_built(path: Path) -> bool:
    """Whether ``path`` holds a finished demo model of this builder's version."""
    try:
        meta = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("version") == BUILDER_VERSION


def ensure_demo(task: Task, path: Path) -> Path:
    """Build ``task``'s demo model into ``path`` unless it is there already; return ``path``.

    Blocking (a second or two, mostly importing torch): run it off the event loop.
    """
    if is_built(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent / f".{path.name}.lock"):
        if is_built(path):  # another process built it while this one waited
            return path
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            with _ONE_BUILD_AT_A_TIME:
                _BUILDERS[task](staging)
            meta = {"version": BUILDER_VERSION, "task": task, "demo": True, "seed": SEED}
            (staging / MARKER).write_text(json.dumps(meta))
            if path.exists():
                shutil.rmtree(path)  # an older builder's output (or a broken one)
            os.rename(staging, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(staging)
    return path


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock`` (created if need be); the kernel drops it
    if the process dies."""
    with lock.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _tokenizer(specials: list[str], **kwargs: Any) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate([*specials, *_VOCABULARY.split()])}
    inner = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=inner, unk_token="<unk>", **kwargs
    )


def _seed() -> None:
    import torch

    torch.manual_seed(SEED)


def build_caption(path: Path) -> None:
    """A tiny Idefics3 (SmolVLM family) VLM: 32x32 images, 4 image tokens per image."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    specials = ["<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>"]
    image_specials = ["<fake_token_around_image>", "<image>", "<global-img>"]
    tokenizer = _tokenizer(
        specials + image_specials,
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        extra_special_tokens=specials[2:] + image_specials,
        padding_side="left",  # decoder-only batched generation pads on the left
        model_max_length=256,
    )
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32}
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=4,  # (32 / 8) ** 2 patches / scale_factor ** 2
        chat_template=_CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Idefics3Config(
        image_token_id=ids("<image>"),
        scale_factor=2,
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 256,
            "pad_token_id": ids("<pad>"),
            "bos_token_id": ids("<|im_start|>"),
            "eos_token_id": ids("<end_of_utterance>"),
        },
    )
    _seed()
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config.pad_token_id = ids("<pad>")
    model.generation_config.eos_token_id = ids("<end_of_utterance>")
    model.save_pretrained(path)
    processor.save_pretrained(path)


def build_siglip(path: Path) -> None:
    """A tiny SigLIP2: ``EMBED_DIM``-d image and text embeddings.

    The patch size (16), patch count (256) and text length (64) are the real
    ``siglip2-base-patch16-256`` ones, because ``Siglip2Processor`` applies them by default.
    """
    from transformers import Siglip2Config, Siglip2Model, Siglip2Processor
    from transformers.models.siglip2.image_processing_pil_siglip2 import (
        Siglip2ImageProcessorPil,
    )

    tokenizer = _tokenizer(
        ["<pad>", "<unk>", "</s>"], pad_token="<pad>", eos_token="</s>", model_max_length=64
    )
    processor = Siglip2Processor(  # type: ignore[no-untyped-call]
        image_processor=Siglip2ImageProcessorPil(patch_size=16, max_num_patches=256),
        tokenizer=tokenizer,
    )
    layers = {
        "hidden_size": EMBED_DIM,
        "intermediate_size": 2 * EMBED_DIM,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    config = Siglip2Config(
        text_config={
            **layers,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 64,
            "projection_size": EMBED_DIM,
            "pad_token_id": 0,
            "bos_token_id": None,
            "eos_token_id": 2,
        },
        vision_config={**layers, "patch_size": 16, "num_patches": 256},
    )
    _seed()
    Siglip2Model(config).save_pretrained(path)
    processor.save_pretrained(path)


def build_nsfw(path: Path) -> None:
    """A tiny ViT classifier with the labels ``sfw`` (0) and ``nsfw`` (1)."""
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    config = ViTConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        id2label={0: "sfw", 1: "nsfw"},
        label2id={"sfw": 0, "nsfw": 1},
    )
    _seed()
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)


# --- pipelines ----------------------------------------------------------------------------

# Latents are 1/8 of the image, as in every real pipeline (four VAE levels); the UNet is as
# small as diffusers' own tests make it.
_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (8, 16, 16, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "timestep_spacing": "trailing",  # few-step models (SD-Turbo, Lightning) sample this way
    "steps_offset": 1,
}
_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
}


def clip_tokenizer() -> Any:
    """A byte-level CLIP tokenizer with no merges: 256 byte tokens, the same ending a word
    (``</w>``), and the two specials (514 in all), so any text tokenizes, offline."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = [*alphabet, *(f"{c}</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=[], model_max_length=77)


def _text_encoder(tokenizer: Any, projection: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        **_TEXT_CONFIG,
        vocab_size=len(tokenizer),
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def import_diffusers() -> Any:
    """diffusers, imported when first needed (it takes seconds), as an untyped module."""
    import diffusers

    return diffusers


def build_tiny_sd(path: Path) -> None:
    """A tiny Stable Diffusion (1.x/2.x family) pipeline: 64x64 by default, any multiple
    of 8 works."""
    d = import_diffusers()
    _seed()
    tokenizer = clip_tokenizer()
    unet = d.UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    pipe = d.StableDiffusionPipeline(
        vae=d.AutoencoderKL(**_VAE_CONFIG, scaling_factor=0.18215),
        text_encoder=_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=d.EulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)


def build_tiny_sdxl(path: Path) -> None:
    """A tiny SDXL pipeline (two text encoders, size and crop conditioning): what tests
    load to check the SDXL code paths; no profile serves it."""
    d = import_diffusers()
    _seed()
    tokenizer = clip_tokenizer()
    time_dim = 8
    unet = d.UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 2),
        # six size/crop numbers, each embedded, and the second encoder's pooled projection
        projection_class_embeddings_input_dim=6 * time_dim + 32,
        cross_attention_dim=2 * _TEXT_CONFIG["hidden_size"],  # both encoders, concatenated
    )
    pipe = d.StableDiffusionXLPipeline(
        vae=d.AutoencoderKL(**_VAE_CONFIG, scaling_factor=0.13025),
        text_encoder=_text_encoder(tokenizer),
        text_encoder_2=_text_encoder(tokenizer, projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=d.EulerDiscreteScheduler(**_SCHEDULER_CONFIG),
    )
    pipe.save_pretrained(path)


_BUILDERS: dict[Task, Callable[[Path], None]] = {
    "caption": build_caption,
    "tags": build_siglip,
    "embed": build_siglip,
    "nsfw": build_nsfw,
    "generate": build_tiny_sd,
}
