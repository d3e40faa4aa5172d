"""GPU smoke check: an SDXL-architecture pipeline at 1024x1024, timed through the product's run.

Run with ``python -m tests.gpu.smoke_generate [--device cuda:0] [--side 1024] [--steps 4]
[--batches 1 4 8] [--repeats 3] [--no-compile]``, or ``--cpu-dry-run`` anywhere: the same
flow on the CPU with a tiny configuration, to show the script does not crash. Without torch
or CUDA (and without ``--cpu-dry-run``) it checks the architecture on the meta device,
prints ``skipped: no CUDA`` and exits 0. The last line printed is JSON.

The pipeline is architecture-true with random weights, built offline from the published
configurations of ``stabilityai/stable-diffusion-xl-base-1.0`` (nothing is downloaded): its
UNet (``UNet2DConditionModel``, 2.567B parameters: 320/640/1280 channels, 1/2/10
transformer layers, cross-attention 2048, size and crop conditioning), its VAE
(``AutoencoderKL``, 83.7M), CLIP ViT-L/14's text encoder (``CLIPTextModel``, 123.1M) and
OpenCLIP ViT-bigG/14's (``CLIPTextModelWithProjection``, 694.7M), with the byte-level CLIP
tokenizer of the demo models (:func:`bus.models.demo.clip_tokenizer`) and the Euler
scheduler with trailing timesteps that SDXL-Lightning-class models sample with. The VAE
decodes in float16 (``force_upcast`` off), as it does with the fp16-fixed SDXL VAE.

It is put on the device in float16 and run through the product's path for a call:
:class:`functions.generate.pipelines.Pipelines` and :func:`functions.generate.pipelines.run`
(one call per batch, a CPU generator per image, guidance 0 as for Lightning models). For
each batch size, after a warm-up call, it times ``--repeats`` calls: s/image at batch 1,
images/s at the others; then the same with the UNet under ``torch.compile`` (the warm-up
compiles). It prints the peak VRAM, and the model FLOP utilisation: the UNet's FLOPs for
one step (counted with ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass)
times the steps, plus the VAE decode's, per image, against the device's dense fp16 peak
(a small table by device name; unknown devices get no MFU).

Anchors (from the issue): SDXL-Lightning at 4 steps took 0.73 s on an A800 with plain
diffusers and 0.47 s with OneDiff; the goals on an H100 are <= 0.3 s/image at batch 1 and
>= 6 images/s at batch 8. The script reports; it fails (exit 1) only when a call returns
the wrong number or size of images.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from typing import Any

import pytest

from tests.gpu.smoke_leases import cuda_torch, off_by

MIB = 1024 * 1024
PARAMETER_TOLERANCE = 0.005
# Parameter counts of stable-diffusion-xl-base-1.0's components.
SDXL_PARAMETERS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}
# Dense float16/bfloat16 tensor-core peaks (no sparsity), by device name: the first match.
PEAK_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
]
VOCAB = 49408  # CLIP's; the byte-level tokenizer uses the first 514 ids


def unet_config(tiny: bool = False) -> dict[str, Any]:
    """SDXL base's UNet (its unet/config.json); ``tiny``: the same shape, a few channels."""
    config: dict[str, Any] = {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "attention_head_dim": (5, 10, 20),
        "transformer_layers_per_block": (1, 2, 10),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,  # 6 x 256 + 1280
        "norm_num_groups": 32,
        "upcast_attention": False,
    }
    if tiny:
        config |= {
            "sample_size": 8,
            "block_out_channels": (32, 64, 64),
            "attention_head_dim": (2, 4, 4),
            "transformer_layers_per_block": (1, 1, 1),
            "cross_attention_dim": 64,
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
            "norm_num_groups": 8,
        }
    return config


def vae_config(tiny: bool = False) -> dict[str, Any]:
    """SDXL's VAE, decoding in float16 (``force_upcast`` off, as the fp16-fixed one)."""
    config: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "force_upcast": False,
    }
    if tiny:
        config |= {
            "block_out_channels": (8, 16, 16, 16),
            "layers_per_block": 1,
            "norm_num_groups": 8,
        }
    return config


def text_configs(tiny: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """CLIP ViT-L/14's text encoder, and OpenCLIP ViT-bigG/14's (with its projection)."""
    common = {"vocab_size": VOCAB, "max_position_embeddings": 77, "bos_token_id": 512,
              "eos_token_id": 513, "pad_token_id": 513}  # fmt: skip
    first = {**common, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "projection_dim": 768,
             "hidden_act": "quick_gelu"}  # fmt: skip
    second = {**common, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
              "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu"}  # fmt: skip
    if tiny:
        small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "projection_dim": 32}  # fmt: skip
        first, second = first | small, second | small
    return first, second


SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}


def build(torch: Any, device: str, dtype: Any, tiny: bool = False) -> Any:
    """The random-weight pipeline, built on ``device`` and cast to ``dtype``."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from bus.models.demo import clip_tokenizer

    torch.manual_seed(0)
    first, second = text_configs(tiny)
    with torch.device(device):
        parts = {
            "unet": UNet2DConditionModel(**unet_config(tiny)),
            "vae": AutoencoderKL(**vae_config(tiny)),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**first)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**second)),
        }
    for module in parts.values():
        module.to(dtype).eval()
    tokenizer = clip_tokenizer()
    return StableDiffusionXLPipeline(
        **parts,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )


def parameter_counts() -> dict[str, int]:
    """Each component's parameters, built on the meta device (no memory, no init)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    first, second = text_configs()
    with torch.device("meta"):
        parts = {
            "unet": UNet2DConditionModel(**unet_config()),
            "vae": AutoencoderKL(**vae_config()),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**first)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**second)),
        }
    return {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}


def architecture_report() -> list[str]:
    problems = []
    for name, count in parameter_counts().items():
        expected = SDXL_PARAMETERS[name]
        print(f"{name}: {count:,} parameters (SDXL base: {expected:,})")
        if off_by(count, expected) > PARAMETER_TOLERANCE:
            problems.append(f"{name} has {count:,} parameters, not about {expected:,}")
    return problems


def peak_flops(device_name: str) -> float | None:
    for key, flops in PEAK_FLOPS:
        if key in device_name:
            return flops
    return None


def count_flops(torch: Any, pipe: Any, side: int, device: str, dtype: Any) -> tuple[int, int]:
    """FLOPs of one UNet step and of one VAE decode, for one image at ``side``."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae = pipe.unet, pipe.vae
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    latent = torch.randn(1, 4, side // 8, side // 8, device=device, dtype=dtype)
    context = torch.randn(1, 77, config.cross_attention_dim, device=device, dtype=dtype)
    added = {
        "text_embeds": torch.randn(1, pooled, device=device, dtype=dtype),
        "time_ids": torch.tensor([[side, side, 0, 0, side, side]], device=device, dtype=dtype),
    }
    step = torch.tensor([999], device=device)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            unet(latent, step, encoder_hidden_states=context, added_cond_kwargs=added)
        unet_flops = int(counter.get_total_flops())
        with FlopCounterMode(display=False) as counter:
            vae.decode(latent / vae.config.scaling_factor)
        vae_flops = int(counter.get_total_flops())
    return unet_flops, vae_flops


def measure(
    torch: Any, pipes: Any, side: int, steps: int, batch: int, repeats: int, cuda: bool
) -> tuple[float, list[str]]:
    """Seconds per call at ``batch`` (after one warm-up call), and what went wrong."""
    from bus.core.generation import Job
    from functions.generate.pipelines import Item, run

    job = Job(id="smoke", created="", prompt="a photo of a lighthouse at dusk",
              negative_prompt="", model="sdxl-smoke", width=side, height=side, steps=steps,
              guidance=0.0, seed=0, n=batch, mode="txt2img")  # fmt: skip
    items = [Item(job.prompt, "", seed, None) for seed in job.seeds]
    problems: list[str] = []

    def call() -> list[Any]:
        images = run(pipes, job, items)
        if cuda:
            torch.cuda.synchronize()
        return images

    images = call()  # warm-up (and, compiled, the compilation)
    if len(images) != batch or any(image.size != (side, side) for image in images):
        problems.append(f"batch {batch} gave {[image.size for image in images]}")
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats, problems


def check(torch: Any, args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    from functions.generate.pipelines import Pipelines

    cuda = not args.cpu_dry_run
    device = args.device if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    started = time.perf_counter()
    pipe = build(torch, device, dtype, tiny=args.cpu_dry_run)
    pipe.set_progress_bar_config(disable=True)
    name = torch.cuda.get_device_name(device) if cuda else "cpu (dry run)"
    print(f"built the pipeline on {device} ({name}) in {time.perf_counter() - started:.1f} s")
    # Large images decode tiled; a 1024px one does not (the settings' default threshold).
    pipes = Pipelines("sdxl-smoke", pipe, device, vae_tiling_pixels=1536 * 1536, offload=False)
    unet_flops, vae_flops = count_flops(torch, pipe, args.side, device, dtype)
    image_flops = unet_flops * args.steps + vae_flops
    peak = peak_flops(name) if cuda else None
    print(
        f"FLOPs per image: UNet {unet_flops / 1e12:.2f} T per step x {args.steps} steps, VAE "
        f"decode {vae_flops / 1e12:.2f} T; device peak "
        + (f"{peak / 1e12:.0f} TFLOPs" if peak else "unknown")
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    result: dict[str, Any] = {
        "device": name,
        "dtype": str(dtype).removeprefix("torch."),
        "side": args.side,
        "steps": args.steps,
        "unet_tflop_per_step": round(unet_flops / 1e12, 4),
        "vae_tflop_per_image": round(vae_flops / 1e12, 4),
        "peak_tflops": peak / 1e12 if peak else None,
    }
    problems: list[str] = []
    variants = ["eager"] if args.no_compile else ["eager", "compiled"]
    for variant in variants:
        if variant == "compiled":
            pipe.unet = torch.compile(pipe.unet, mode=args.compile_mode)
        for batch in args.batches:
            seconds, found = measure(torch, pipes, args.side, args.steps, batch, args.repeats, cuda)
            problems += found
            rate = batch / seconds
            mfu = image_flops * rate / peak if peak else None
            key = f"{variant}_b{batch}"
            result[f"{key}_s_per_image"] = round(seconds / batch, 4)
            result[f"{key}_images_per_s"] = round(rate, 3)
            result[f"{key}_mfu"] = round(mfu, 4) if mfu is not None else None
            print(
                f"{variant:<9} batch {batch}: {seconds:.3f} s per call, {seconds / batch:.3f} "
                f"s/image, {rate:.2f} images/s" + (f", MFU {mfu:.1%}" if mfu is not None else "")
            )
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated(device) / MIB
        result["peak_vram_mb"] = round(peak_mb)
        print(f"peak VRAM: {peak_mb:,.0f} MB")
    return result, problems


# --- pytest ------------------------------------------------------------------------------------
def test_the_configs_are_sdxl_base() -> None:
    pytest.importorskip("diffusers")
    assert architecture_report() == []


@pytest.mark.timeout(900)
@pytest.mark.skipif(cuda_torch() is None, reason="needs torch with a CUDA device")
def test_sdxl_runs_at_1024_on_the_gpu() -> None:
    torch = cuda_torch()
    args = parse([])
    result, problems = check(torch, args)
    assert problems == [] and result["eager_b1_s_per_image"] > 0


# --- the script --------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--device", default="cuda:0", help="the GPU, e.g. cuda:1")
    parser.add_argument("--side", type=int, default=1024, help="image width and height")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8], help="batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch size")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile run")
    parser.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode for the UNet, e.g. max-autotune",
    )
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="the same flow on the CPU with a tiny configuration (64px, 2 steps, batches 1 2)",
    )
    args = parser.parse_args(argv)
    if args.cpu_dry_run:
        args.side, args.steps, args.batches, args.repeats = 64, 2, [1, 2], 1
    if args.side % 8 or args.side < 64 or args.steps < 1 or args.repeats < 1:
        parser.error("--side must be a multiple of 8 from 64, --steps and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if importlib.util.find_spec("diffusers") is None:
        print("skipped: no diffusers (make install-ml)")
        print(json.dumps({"skipped": "no diffusers"}))
        return 0
    problems = architecture_report()
    torch = cuda_torch()
    if args.cpu_dry_run:
        import torch as cpu_torch

        torch = cpu_torch
    if torch is None:
        print("skipped: no CUDA")
        print(json.dumps({"skipped": "no CUDA", "problems": problems}))
        return 0
    result, found = check(torch, args)
    problems += found
    for problem in problems:
        print(f"FAIL {problem}")
    print("SDXL generation checks out" if not problems else f"{len(problems)} problem(s)")
    print(json.dumps({**result, "problems": problems}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
