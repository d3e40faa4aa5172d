"""The generate function's pipelines: a catalogue model loaded once, run one call per batch.

- :func:`model_for`: a :class:`bus.Model` per catalogue model, so the handler loads it under
  a VRAM lease (``ctx.gpu.use``); loading yields :class:`Pipelines`.
- :class:`Pipelines`: the text-to-image pipeline from ``AutoPipelineForText2Image``, and
  the others a call needs (image-to-image, another scheduler) made from it with
  ``from_pipe``: the same components, no second load, each with a scheduler of its own.
- :func:`run`: one pipeline call for a batch of images, each with its own seeded
  generator, reporting every step (and stopping when asked).
- :func:`preview`: a small JPEG from the latents of a step, by a linear approximation.

Everything here blocks: call it through ``ctx.run_gpu`` (the device's thread). torch and
diffusers are imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from bus import Model, Placement
from bus.core.generation import NEEDS_IMAGE, GenerationError, Job
from bus.core.settings import SCHEDULERS, Settings
from bus.models.catalogue import (
    GENERATE,
    PIPELINE_INDEX,
    ModelUnavailableError,
    ResolvedModel,
    no_cuda,
    pipeline_components,
)
from bus.models.demo import ensure_demo, import_diffusers
from bus.models.switching import lease_model

if TYPE_CHECKING:
    import torch

OnStep = Callable[[int, int, Any], bool]
"""``on_step(steps_done, total_steps, latents) -> stop``: called after each denoising step
with the batch's latents; True stops the whole call at once."""

DEMO_ESTIMATE_MB = 64  # the tiny demo pipeline, before its footprint is measured

# Linear maps from a 4-channel latent to RGB in [-1, 1] (least-squares fits published with
# ComfyUI's latent formats): a preview at no cost, no VAE pass.
_LATENT_RGB: dict[str, tuple[list[list[float]], list[float]]] = {
    "sd": (
        [
            [0.3512, 0.2297, 0.3227],
            [0.3250, 0.4974, 0.2350],
            [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177],
        ],
        [0.0, 0.0, 0.0],
    ),
    "sdxl": (
        [
            [0.3920, 0.4054, 0.4549],
            [-0.2634, -0.0196, 0.0653],
            [0.0568, 0.1687, -0.0755],
            [-0.3112, -0.2359, -0.2076],
        ],
        [0.0, 0.0, 0.0],
    ),
}


@dataclass(frozen=True, slots=True)
class Item:
    """One image of a call: its prompts, its seed and (image modes) the picture it starts
    from, already at the job's size."""

    prompt: str
    negative_prompt: str
    seed: int
    init: Image.Image | None = None


class Pipelines:
    """A loaded catalogue model: :attr:`text2image`, and the pipelines :meth:`for_call`
    derives from it, sharing its components."""

    def __init__(
        self, name: str, text2image: Any, device: str, vae_tiling_pixels: int, offload: bool
    ) -> None:
        self.name = name  # the catalogue name, for messages
        self.text2image = text2image
        self.device = device
        self.vae_tiling_pixels = vae_tiling_pixels
        self.offload = offload
        self.family = family_of(type(text2image).__name__)
        vae = getattr(text2image, "vae", None)
        if vae is not None:
            self.latent_channels = int(vae.config.latent_channels)
        else:
            denoiser = getattr(text2image, "unet", None) or text2image.transformer
            self.latent_channels = int(denoiser.config.in_channels)
        self._calls: dict[tuple[bool, str | None], Any] = {(False, None): text2image}
        self._lock = threading.Lock()

    @property
    def components(self) -> dict[str, Any]:
        """The shared components (what a lease measures off CUDA)."""
        components: dict[str, Any] = self.text2image.components
        return components

    @property
    def schedulers(self) -> list[str]:
        """The scheduler names (:data:`SCHEDULERS`) this model's pipeline accepts."""
        fits = {c.__name__ for c in self.text2image.scheduler.compatibles}
        return [name for name, (cls, _) in SCHEDULERS.items() if cls in fits]

    def for_call(self, image: bool, scheduler: str | None) -> Any:
        """The pipeline for a call: image-to-image or not, with the scheduler named (None:
        the model's own). Made once per combination with ``from_pipe`` (no reload), each
        with a scheduler object of its own, so a call never changes what another uses.

        Raises:
            GenerationError: the scheduler does not fit this model.
        """
        key = (image, scheduler)
        with self._lock:
            pipe = self._calls.get(key)
            if pipe is None:
                pipe = self._derive(image, scheduler)
                self._calls[key] = pipe
            return pipe

    def _derive(self, image: bool, scheduler: str | None) -> Any:
        diffusers = import_diffusers()
        auto = (
            diffusers.AutoPipelineForImage2Image if image else diffusers.AutoPipelineForText2Image
        )
        pipe = auto.from_pipe(self.text2image, scheduler=self._scheduler(scheduler))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _scheduler(self, name: str | None) -> Any:
        diffusers = import_diffusers()
        own = self.text2image.scheduler
        if name is None:
            return type(own).from_config(own.config)
        if name not in SCHEDULERS:
            raise GenerationError(
                [f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}"]
            )
        class_name, overrides = SCHEDULERS[name]
        if name not in self.schedulers:
            raise GenerationError(
                [
                    f"scheduler {name} does not fit model {self.name} (a {self.family} pipeline, "
                    f"{type(own).__name__}): use one of {', '.join(self.schedulers)}"
                ]
            )
        return getattr(diffusers, class_name).from_config(own.config, **overrides)

    def bound_vae_memory(self, width: int, height: int, count: int) -> None:
        """Decode in tiles above ``vae_tiling_pixels`` per image, and one image at a time
        above it for the batch: bounded VRAM for large images and batches. Set per call
        (the VAE is shared, and calls on a device run one at a time)."""
        vae = getattr(self.text2image, "vae", None)
        pixels = width * height
        for wanted, on, off in (
            (pixels > self.vae_tiling_pixels, "enable_tiling", "disable_tiling"),
            (pixels * count > self.vae_tiling_pixels, "enable_slicing", "disable_slicing"),
        ):
            switch = getattr(vae, on if wanted else off, None)
            if switch is not None:
                with contextlib.suppress(NotImplementedError):  # a VAE without them
                    switch()

    @classmethod
    def load(
        cls, name: str, model: ResolvedModel, placement: Placement, vae_tiling_pixels: int
    ) -> Pipelines:
        """Load ``model`` (on disk: see ``ResolvedModel.on_disk``) onto ``placement``."""
        diffusers = import_diffusers()
        device = placement.device
        cuda = device.startswith("cuda")
        flow = _is_flow(model.location)
        dtype = _dtype(model, cuda, flow)
        kwargs: dict[str, Any] = {"dtype": dtype}
        variant = model.variant
        if variant is not None and not model.demo and _has_variant(model.location, variant):
            kwargs["variant"] = variant
        quantization = _quantization(name, model, device, flow, dtype)
        if quantization is not None:
            kwargs["quantization_config"] = quantization
        pipe = diffusers.AutoPipelineForText2Image.from_pretrained(model.location, **kwargs)
        offload = placement.offload and cuda
        if offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls(name, pipe, device, vae_tiling_pixels, offload)


def model_for(name: str, resolved: ResolvedModel, settings: Settings) -> Model:
    """A leased model for the catalogue model ``name``, resolved as ``resolved``; loading it
    (on the device's thread) yields :class:`Pipelines`.

    Raises:
        ModelUnavailableError: the entry asks for 4/8-bit quantisation on a host without
            CUDA (bitsandbytes quantisation in diffusers is GPU-only).
    """
    entry = resolved.entry
    if entry.quantization != "none" and not resolved.demo:
        why = no_cuda(settings)
        if why is not None:
            raise ModelUnavailableError(_quantization_needs_cuda(name, entry.quantization, why))
    tiling = settings.generate.vae_tiling_pixels

    def load(placement: Placement) -> Pipelines:
        if resolved.demo:
            ensure_demo(GENERATE, Path(resolved.location))
        local = resolved.on_disk()  # its files: never the hub while the lease is held
        return Pipelines.load(name, local, placement, tiling)

    estimate = DEMO_ESTIMATE_MB if resolved.demo else entry.vram_mb
    return Model(lease_model(name), max(1, estimate), load)


def total_steps(job: Job) -> int:
    """The denoising steps a resolved job runs (what progress counts to): ``steps``, or
    for image modes ``int(steps * strength)`` as diffusers' SD img2img computes it (SDXL's
    can run one more: :func:`run` reports the pipeline's own count)."""
    steps = job.steps or 1
    if job.mode in NEEDS_IMAGE and job.strength is not None:
        return max(1, min(int(steps * job.strength), steps))
    return steps


def run(
    pipes: Pipelines, job: Job, items: Sequence[Item], on_step: OnStep | None = None
) -> list[Image.Image]:
    """One pipeline call making ``items`` (in order) for a resolved ``job``.

    Each item has a CPU ``torch.Generator`` seeded with its seed: its noise does not
    depend on the device or on the rest of the batch, so an item gives the same pixels
    alone or batched. Negative prompts go in where the pipeline takes them and guidance
    is on (> 1). Image modes pass the items' ``init`` and ``job.strength``.

    Raises:
        GenerationError: the job's scheduler does not fit the model.
        ValueError: the job is not resolved, or an image mode item has no init image.
    """
    import torch

    if not items:
        return []
    if job.steps is None or job.guidance is None or job.width is None or job.height is None:
        raise ValueError("run needs a resolved job (Job.resolved fills the model's defaults)")
    image = job.mode in NEEDS_IMAGE
    if image and any(item.init is None for item in items):
        raise ValueError(f"mode {job.mode} needs an init image for every item")
    pipe = pipes.for_call(image, job.scheduler)
    takes = _parameters(pipe)
    kwargs: dict[str, Any] = {
        "prompt": [item.prompt for item in items],
        "num_inference_steps": job.steps,
        "guidance_scale": job.guidance,
        "generator": [torch.Generator("cpu").manual_seed(item.seed) for item in items],
    }
    negatives = [item.negative_prompt for item in items]
    if job.guidance > 1 and "negative_prompt" in takes and any(negatives):
        kwargs["negative_prompt"] = negatives
    if image:
        kwargs["image"] = [item.init for item in items]
        kwargs["strength"] = job.strength
    else:
        kwargs["width"], kwargs["height"] = job.width, job.height
    if on_step is not None:
        fallback = total_steps(job)

        def step_end(p: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            total = getattr(p, "num_timesteps", None) or fallback
            if on_step(step + 1, total, tensors["latents"]):
                p._interrupt = True  # diffusers' own flag: the loop skips the steps left
            return tensors

        kwargs["callback_on_step_end"] = step_end
        kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
    pipes.bound_vae_memory(job.width, job.height, len(items))
    try:
        with torch.inference_mode():
            out = pipe(**kwargs)
    finally:
        if pipes.offload and pipe is not pipes.text2image:
            # A derived pipeline holds no offload hooks of its own: the one that does puts
            # the shared components back in CPU memory.
            pipes.text2image.maybe_free_model_hooks()
    images: list[Image.Image] = list(out.images)
    return images


def preview(latents: Any, index: int, family: str, px: int = 128) -> bytes | None:
    """A small JPEG (at most ``px`` on its long side) of image ``index`` of a step's
    ``latents`` ((batch, 4, h, w): SD and SDXL), by a linear latent-to-RGB map; None for
    other families or shapes. Cheap: no VAE pass."""
    import torch

    factors = _LATENT_RGB.get(family)
    if factors is None or getattr(latents, "ndim", 0) != 4 or latents.shape[1] != 4:
        return None
    if not 0 <= index < latents.shape[0]:
        return None
    weights, bias = factors
    with torch.no_grad():
        latent = latents[index].detach().float().cpu()
        rgb = torch.einsum("chw,cr->hwr", latent, torch.tensor(weights)) + torch.tensor(bias)
        pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    picture = Image.fromarray(pixels, "RGB")
    picture.thumbnail((px, px))
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=70)
    return out.getvalue()


def family_of(class_name: str) -> str:
    """A pipeline class's family: ``sd``, ``sdxl``, ``sd3``, ``flux``, ``zimage``... (the
    class name without ``Pipeline``, lowercased, for others)."""
    for prefix, family in (
        ("StableDiffusionXL", "sdxl"),
        ("StableDiffusion3", "sd3"),
        ("StableDiffusion", "sd"),
        ("Flux", "flux"),
        ("ZImage", "zimage"),
    ):
        if class_name.startswith(prefix):
            return family
    return class_name.removesuffix("Pipeline").lower()


# --- loading helpers ----------------------------------------------------------------------


def _components(location: str) -> list[str]:
    try:
        index = json.loads((Path(location) / PIPELINE_INDEX).read_text())
    except (OSError, ValueError):
        return []
    return pipeline_components(index) if isinstance(index, dict) else []


def _is_flow(location: str) -> bool:
    """A transformer-denoiser pipeline (Flux, SD3, Z-Image: flow matching), not a UNet."""
    components = _components(location)
    return "transformer" in components and "unet" not in components


def _dtype(model: ResolvedModel, cuda: bool, flow: bool) -> torch.dtype:
    """The entry's dtype; ``auto``: float16 on CUDA (bfloat16 for flow models, trained in
    it), float32 on the CPU. The demo's random weights stay float32."""
    import torch

    if model.demo:
        return torch.float32
    if model.entry.dtype != "auto":
        dtype: torch.dtype = getattr(torch, model.entry.dtype)
        return dtype
    if not cuda:
        return torch.float32
    return torch.bfloat16 if flow else torch.float16


def _has_variant(location: str, variant: str) -> bool:
    """Whether a pipeline directory holds weights of ``variant`` (``*.fp16.safetensors``):
    one saved without variants loads its plain weights."""
    root = Path(location)
    return any(any(root.glob(f"{component}/*.{variant}*")) for component in _components(location))


def _quantization(name: str, model: ResolvedModel, device: str, flow: bool, dtype: Any) -> Any:
    """The diffusers quantisation config for the entry's bitsandbytes setting (the
    denoiser only), or None."""
    setting = model.entry.quantization
    if setting == "none" or model.demo:
        return None
    if not device.startswith("cuda"):
        raise ModelUnavailableError(_quantization_needs_cuda(name, setting, f"it runs on {device}"))
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelUnavailableError(
            f"generate.models.{name}.quantization = {setting!r} needs bitsandbytes: "
            "pip install bitsandbytes (or set it to 'none')"
        )
    diffusers = import_diffusers()
    options: dict[str, Any]
    if setting == "8bit":
        backend, options = "bitsandbytes_8bit", {"load_in_8bit": True}
    else:
        backend = "bitsandbytes_4bit"
        options = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": dtype,
        }
    return diffusers.PipelineQuantizationConfig(
        quant_backend=backend,
        quant_kwargs=options,
        components_to_quantize=["transformer" if flow else "unet"],
    )


def _quantization_needs_cuda(name: str, setting: str, why: str) -> str:
    return (
        f"generate.models.{name}.quantization = {setting!r} needs a CUDA device "
        f"(diffusers quantises with bitsandbytes on the GPU only), and {why}: set "
        f"generate.models.{name}.quantization = 'none', or run the model on a GPU worker"
    )


def _parameters(pipe: Any) -> frozenset[str]:
    """The keyword arguments a pipeline's call takes."""
    return frozenset(inspect.signature(pipe.__call__).parameters)
