"""The caption function's models, each run on a whole batch of images at once.

- :class:`NsfwScorer`: Yahoo's open_nsfw (ONNX, through onnxruntime); the demo profile's
  tiny ViT classifier stands in through :class:`DemoNsfwScorer`.
- :class:`Siglip`: one vision pass per batch gives unit-norm image embeddings and
  per-label sigmoid tag scores against the vocabulary's text embeddings (computed once
  per loaded model); :meth:`Siglip.embed_texts` embeds captions and search queries.
- :class:`Captioner`: a VLM (SmolVLM2 / Idefics3, Qwen3-VL) generating for the whole batch
  in one ``generate`` call, left-padded, with ``max_new_tokens`` capped.
- :class:`CaptionModels`: a :class:`bus.Model` per GPU task, so the handler loads each
  under a VRAM lease (``ctx.gpu.use``) and runs it on the device's thread (``ctx.run_gpu``).

Everything here blocks: call it through ``ctx.run_gpu`` (or a thread), never on the loop.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from bus import Model, Placement
from bus.core.settings import CaptionSettings, ModelTask, Settings
from bus.models.catalogue import ResolvedModel, resolve_all
from bus.models.demo import ensure_demo

if TYPE_CHECKING:
    import torch

Images = Sequence[Image.Image]
TAGS_FILE = Path(__file__).with_name("tags.txt")
SHORT_PROMPT = "Describe this image in one short sentence."
DETAILED_PROMPT = "Describe this image in detail: the subject, the setting, the light."


@cache
def default_vocabulary() -> tuple[str, ...]:
    """The tags in ``tags.txt``: one a line; blank lines and ``#`` comments skipped."""
    lines = (line.strip() for line in TAGS_FILE.read_text().splitlines())
    return tuple(dict.fromkeys(t for t in lines if t and not t.startswith("#")))


# --- NSFW ---------------------------------------------------------------------------------

# open_nsfw was trained in Caffe on JPEG files: squash to 256x256, JPEG round trip, centre
# crop 224, channels as BGR minus the training set's per-channel mean. Its scores move by a
# few percent without the JPEG step, so it is kept.
_NSFW_RESIZE = 256
_NSFW_CROP = 224
_NSFW_BGR_MEAN = np.array([104.0, 117.0, 123.0], dtype=np.float32)


def open_nsfw_input(image: Image.Image) -> np.ndarray:
    """One image as open_nsfw's (224, 224, 3) float32 BGR, mean-subtracted input."""
    squashed = image.convert("RGB").resize((_NSFW_RESIZE, _NSFW_RESIZE), Image.Resampling.BILINEAR)
    encoded = io.BytesIO()
    squashed.save(encoded, format="JPEG")
    encoded.seek(0)
    with Image.open(encoded) as decoded:
        pixels = np.asarray(decoded.convert("RGB"), dtype=np.float32)
    edge = (_NSFW_RESIZE - _NSFW_CROP) // 2
    crop = pixels[edge : edge + _NSFW_CROP, edge : edge + _NSFW_CROP]
    return np.ascontiguousarray(crop[:, :, ::-1]) - _NSFW_BGR_MEAN


class NsfwModel(Protocol):
    def score(self, images: Images) -> list[float]:
        """P(nsfw) per image, in order."""
        ...


class NsfwScorer:
    """open_nsfw through onnxruntime: one session run per batch."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        import onnxruntime as ort  # type: ignore[import-untyped]

        providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            index = int(device.partition(":")[2] or 0)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        self._session = ort.InferenceSession(str(path), providers=providers)
        self._input = self._session.get_inputs()[0].name

    def score(self, images: Images) -> list[float]:
        if not images:
            return []
        batch = np.stack([open_nsfw_input(image) for image in images])
        probs = self._session.run(None, {self._input: batch})[0]
        return [float(p) for p in probs[:, 1]]  # columns: P(sfw), P(nsfw)


class DemoNsfwScorer:
    """The demo profile's tiny random ViT classifier (labels ``sfw``, ``nsfw``)."""

    def __init__(self, location: str, device: str = "cpu", **pretrained: Any) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.device = device
        self.processor = AutoImageProcessor.from_pretrained(  # type: ignore[no-untyped-call]
            location, revision=pretrained.get("revision")
        )
        self.model = AutoModelForImageClassification.from_pretrained(
            location, **_placed(pretrained, device)
        ).eval()
        self._nsfw = int(self.model.config.label2id["nsfw"])

    def score(self, images: Images) -> list[float]:
        import torch

        if not images:
            return []
        inputs = self.processor(images=[rgb(i) for i in images], return_tensors="pt")
        with torch.inference_mode():
            logits = self.model(**inputs.to(self.device)).logits
        return [float(p) for p in logits.softmax(-1)[:, self._nsfw].cpu()]


def load_nsfw(resolved: ResolvedModel, device: str = "cpu") -> NsfwModel:
    """The NSFW scorer ``resolved`` names: ONNX weights, or a transformers classifier."""
    if resolved.format == "onnx":
        return NsfwScorer(resolved.location, device)
    return DemoNsfwScorer(resolved.location, device, **resolved.pretrained_kwargs())


# --- tags and embeddings (SigLIP) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Analysis:
    """What one vision pass gives an image: its embedding and its tags above threshold."""

    embedding: list[float]  # unit norm
    tags: list[tuple[str, float]]  # best first


class Siglip:
    """A SigLIP / SigLIP2 dual encoder for tags (sigmoid per label) and search embeddings."""

    TEMPLATE = "This is a photo of {}."  # SigLIP's zero-shot prompt
    TEXT_LENGTH = 64  # SigLIP was trained on text padded to 64 tokens
    TEXT_CHUNK = 256  # vocabulary texts per forward pass

    def __init__(self, location: str, device: str = "cpu", **pretrained: Any) -> None:
        from transformers import AutoModel, AutoProcessor

        self.device = device
        self.processor = AutoProcessor.from_pretrained(  # type: ignore[no-untyped-call]
            location, revision=pretrained.get("revision")
        )
        self.model = AutoModel.from_pretrained(location, **_placed(pretrained, device)).eval()
        self.components = {"model": self.model}  # what a lease measures off CUDA
        self.dim = int(self.model.config.text_config.projection_size)
        self._labels: dict[tuple[str, ...], torch.Tensor] = {}
        self._lock = threading.Lock()  # one vocabulary computation, whichever thread asks

    def embed_images(self, images: Images) -> torch.Tensor:
        """Unit-norm image embeddings, (N, dim), from one vision forward pass."""
        import torch

        inputs = self.processor(images=[rgb(i) for i in images], return_tensors="pt")
        with torch.inference_mode():
            out = self.model.get_image_features(**inputs.to(self.device))
        return _unit(out.pooler_output)

    def embed_texts(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit-norm text embeddings (captions, search queries), one forward pass."""
        vectors: list[list[float]] = _unit(self._texts(list(texts))).tolist()
        return vectors

    def label_embeddings(self, vocabulary: Sequence[str]) -> torch.Tensor:
        """The vocabulary's unit-norm text embeddings, computed once per vocabulary."""
        import torch

        key = tuple(vocabulary)
        with self._lock:
            if key not in self._labels:
                prompts = [self.TEMPLATE.format(label) for label in key]
                chunks = range(0, len(prompts), self.TEXT_CHUNK)
                parts = [self._texts(prompts[i : i + self.TEXT_CHUNK]) for i in chunks]
                self._labels[key] = _unit(torch.cat(parts))
            return self._labels[key]

    def analyse(
        self,
        images: Images,
        vocabulary: Sequence[str],
        threshold: float = 0.1,
        top_k: int = 10,
    ) -> list[Analysis]:
        """Embeddings and tags for a batch: one vision forward pass for all of it.

        A tag's score is SigLIP's sigmoid of the scaled, biased cosine: an independent
        probability per label, so several tags (or none) can apply to one image.
        """
        import torch

        if not images:
            return []
        labels = self.label_embeddings(vocabulary)
        embeddings = self.embed_images(images)
        with torch.inference_mode():
            logits = embeddings @ labels.T * self.model.logit_scale.exp() + self.model.logit_bias
            scores = torch.sigmoid(logits).float().cpu()
        top = scores.topk(min(top_k, len(vocabulary)), dim=-1)
        results = []
        for row, values, indices in zip(
            embeddings.float().cpu(), top.values, top.indices, strict=True
        ):
            tags = [
                (vocabulary[int(i)], float(v))
                for v, i in zip(values, indices, strict=True)
                if float(v) >= threshold
            ]
            results.append(Analysis(row.tolist(), tags))
        return results

    def _texts(self, texts: list[str]) -> torch.Tensor:
        import torch

        inputs = self.processor(
            text=[text.lower() for text in texts],  # SigLIP 2 was trained on lowercased text
            padding="max_length",
            max_length=self.TEXT_LENGTH,
            truncation=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            return self.model.get_text_features(**inputs.to(self.device)).pooler_output  # type: ignore[no-any-return]


# --- captions (VLM) ------------------------------------------------------------------------


# Florence-2 answers task prompts, not free text: a user's prompt gets its most detailed
# description.
FLORENCE_TASKS = {SHORT_PROMPT: "<CAPTION>", DETAILED_PROMPT: "<DETAILED_CAPTION>"}
FLORENCE_OTHER = "<MORE_DETAILED_CAPTION>"


class Captioner:
    """A VLM that captions a batch in one ``generate`` call: a chat model (SmolVLM2,
    Idefics3, Qwen3-VL), or Florence-2 (an encoder-decoder answering task prompts)."""

    def __init__(
        self,
        location: str,
        device: str = "cpu",
        max_new_tokens: int = 48,
        image_splitting: bool = False,
        **pretrained: Any,
    ) -> None:
        from transformers import AutoModelForImageTextToText

        self.device = device
        self.max_new_tokens = max_new_tokens
        self.processor = load_vlm_processor(location, pretrained.get("revision"))
        image_processor: Any = getattr(self.processor, "image_processor", None)
        if hasattr(image_processor, "do_image_splitting"):
            # SmolVLM / Idefics3 cut a large image into up to 16 tiles plus the whole: up
            # to 17x the vision and prefill work of one tile, for finer detail.
            image_processor.do_image_splitting = image_splitting
        # Decoder-only generation over a batch must pad on the left, so every row's prompt
        # ends where generation starts.
        self.processor.tokenizer.padding_side = "left"
        model: Any = AutoModelForImageTextToText.from_pretrained(
            location, **_placed(pretrained, device)
        )
        self.model = model.eval()
        self.components = {"model": self.model}  # what a lease measures off CUDA
        self.chat = self.model.config.model_type != "florence2"  # takes chat messages

    def caption(
        self,
        images: Images,
        prompt: str | Sequence[str] = SHORT_PROMPT,
        max_new_tokens: int | None = None,
    ) -> list[str]:
        """One caption per image, in order, greedy and capped at ``max_new_tokens``.

        ``prompt`` is one for all images, or one per image (re-captions that each carry
        their user's prompt still share the batch).
        """
        import torch

        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"one prompt per image: got {len(prompts)} for {len(images)} images")
        if not images:
            return []
        cap = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if cap < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {cap}")
        if self.chat:
            texts = [self._chat(p) for p in prompts]
            pictures: list[Any] = [[rgb(i)] for i in images]
        else:
            texts = [FLORENCE_TASKS.get(p, FLORENCE_OTHER) for p in prompts]
            pictures = [rgb(i) for i in images]
        inputs = self.processor(text=texts, images=pictures, padding=True, return_tensors="pt").to(
            self.device
        )
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=cap, do_sample=False)
        # A decoder-only model's output starts with the prompt; an encoder-decoder's does not.
        new = out[:, inputs["input_ids"].shape[1] :] if self.chat else out
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    def _chat(self, prompt: str) -> str:
        content = [{"type": "image"}, {"type": "text", "text": prompt}]
        text: str = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        return text


def load_vlm_processor(location: str, revision: str | None = None) -> Any:
    """The VLM's processor; for SmolVLM / SmolVLM2 and Qwen3-VL without torchvision, an
    images-only one.

    Their processors also hold a video processor, and that one needs torchvision, whose PyPI
    builds do not import beside the CPU build of torch. Captions need images only, so
    without torchvision the same processor is built without its video part.
    """
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(location, revision=revision)
    image_only = _IMAGE_ONLY.get(config.model_type)
    if image_only is not None and not _has_torchvision():
        return image_only().from_pretrained(location, revision=revision)
    return AutoProcessor.from_pretrained(location, revision=revision)  # type: ignore[no-untyped-call]


def _has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


@cache
def _image_only_smolvlm() -> Any:
    from transformers import SmolVLMProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
        """SmolVLM's processor with its image processor and tokenizer only."""

        def __init__(
            self,
            image_processor: Any,
            tokenizer: Any,
            image_seq_len: int = 169,
            chat_template: str | None = None,
            **kwargs: Any,
        ) -> None:
            # What SmolVLMProcessor.__init__ sets, without its video processor.
            self.fake_image_token = getattr(
                tokenizer, "fake_image_token", "<fake_token_around_image>"
            )
            self.image_token = getattr(tokenizer, "image_token", "<image>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.end_of_utterance_token = getattr(
                tokenizer, "end_of_utterance_token", "<end_of_utterance>"
            )
            self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
            self.image_seq_len = image_seq_len
            self.video_token = getattr(tokenizer, "video_token", "<video>")
            ProcessorMixin.__init__(  # type: ignore[no-untyped-call]
                self, image_processor, tokenizer, chat_template=chat_template, **kwargs
            )

        def apply_chat_template(  # type: ignore[override]
            self, conversation: Any, chat_template: Any = None, **kwargs: Any
        ) -> Any:
            # SmolVLM's own reads the video processor's frame settings: images need none.
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    return ImageOnlySmolVLMProcessor


@cache
def _image_only_qwen3_vl() -> Any:
    from transformers import Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        """Qwen3-VL's processor with its image processor and tokenizer only."""

        def __init__(
            self,
            image_processor: Any,
            tokenizer: Any,
            chat_template: str | None = None,
            **kwargs: Any,
        ) -> None:
            # ProcessorMixin takes the sub-processors this signature names (image processor
            # and tokenizer, in order), so the video processor after them, None, is dropped.
            super().__init__(  # type: ignore[no-untyped-call]
                image_processor, tokenizer, None, chat_template=chat_template, **kwargs
            )

    return ImageOnlyQwen3VLProcessor


_IMAGE_ONLY = {"smolvlm": _image_only_smolvlm, "qwen3_vl": _image_only_qwen3_vl}


# --- helpers -------------------------------------------------------------------------------


def rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB (processors expect three channels; PNGs may carry alpha or a palette)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def _placed(pretrained: dict[str, Any], device: str) -> dict[str, Any]:
    # Loading straight onto the device avoids a second copy in CPU memory, and is the only
    # way bitsandbytes-quantized weights can be placed.
    return {**pretrained, "device_map": device}


def _unit(x: torch.Tensor) -> torch.Tensor:
    unit: torch.Tensor = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit


# --- the facade ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CaptionModels:
    """A :class:`bus.Model` per GPU task; ``tags`` and ``embed`` share one when their source
    does. ``async with ctx.gpu.use(models.tags) as siglip`` yields a :class:`Siglip`,
    ``caption`` a :class:`Captioner`. The NSFW scorer is small and runs on the CPU
    (:func:`load_nsfw`). ``resolved`` says which model (and whether a demo) each task uses.
    """

    caption: Model
    tags: Model
    embed: Model
    resolved: dict[ModelTask, ResolvedModel]

    @classmethod
    def from_settings(cls, settings: Settings) -> CaptionModels:
        """Resolve each task (blocking: it may ask the hub, bounded) into loadable Models."""
        return cls.from_resolved(resolve_all(settings), settings.caption)

    @classmethod
    def from_resolved(
        cls, resolved: dict[ModelTask, ResolvedModel], options: CaptionSettings | None = None
    ) -> CaptionModels:
        options = options or CaptionSettings()
        tags = model_for(resolved["tags"], options)
        embed = model_for(resolved["embed"], options)
        if embed.name == tags.name:
            embed = tags
        return cls(
            caption=model_for(resolved["caption"], options),
            tags=tags,
            embed=embed,
            resolved=resolved,
        )

    @property
    def all(self) -> tuple[Model, ...]:
        """Each distinct model once (what ``high`` mode preloads)."""
        return tuple({m.name: m for m in (self.caption, self.tags, self.embed)}.values())


def model_name(resolved: ResolvedModel) -> str:
    """A name that is the same exactly when the same weights load the same way."""
    kind = {"caption": "vlm", "tags": "siglip", "embed": "siglip", "nsfw": "nsfw"}[resolved.task]
    if resolved.demo:
        return f"caption-{kind}:demo"
    entry = resolved.entry
    how = f"{entry.dtype},{entry.quantization}"
    return f"caption-{kind}:{resolved.source}@{resolved.revision or 'local'}[{how}]"


def embedding_model(resolved: ResolvedModel) -> str:
    """The name an embedding records as its model: the same exactly when the vectors are
    comparable (the weights; not how they were loaded)."""
    if resolved.demo:
        return f"demo:{resolved.task}"
    return resolved.source + (f"@{resolved.revision}" if resolved.revision else "")


def model_for(resolved: ResolvedModel, options: CaptionSettings) -> Model:
    """A leased GPU model for a caption, tags or embed task."""
    if resolved.task == "nsfw":
        raise ValueError("the NSFW scorer runs on the CPU: use load_nsfw")

    def load(placement: Placement) -> Any:
        if resolved.demo:
            ensure_demo(resolved.task, Path(resolved.location))
        local = resolved.on_disk()  # its files: never the hub while the lease is held
        kwargs = local.pretrained_kwargs()
        if local.task == "caption":
            return Captioner(
                local.location,
                placement.device,
                options.max_new_tokens,
                options.image_splitting,
                **kwargs,
            )
        return Siglip(local.location, placement.device, **kwargs)

    return Model(model_name(resolved), max(1, resolved.entry.vram_mb), load)
