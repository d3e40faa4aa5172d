"""The caption model as a chat service: what answers the gateway's ``/v1/chat/completions``.

The gateway checks the OpenAI request, fetches and shrinks its images, and asks this
service (``<ns>-rpc.chat``) with one JSON request:

- ``{"op": "models"}`` -> ``{"models": [{"id", "owned_by", "demo"}], "max_tokens": 512}``:
  the model this worker answers with (a demo model is ``darkroom-demo-caption``) and the
  most tokens one answer may have.
- ``{"op": "complete", "model", "messages", "images", "max_tokens", "temperature",
  "top_p", "seed", "stream"}``: ``messages`` are ``{"role": "system"|"user"|"assistant",
  "content": [{"type": "text", "text"} | {"type": "image"}]}``, the images base64 JPEG or
  WebP in the order their parts come. Answered with ``{"text", "finish_reason",
  "prompt_tokens", "completion_tokens"}``; streamed, as chunks ``{"prompt_tokens"}`` (once
  the prompt is ready: a refusal comes before it), ``{"text"}`` deltas, and
  ``{"finish_reason", "completion_tokens"}``, then the end.

The model is used under its VRAM lease; the prompt is prepared on the CPU pool, and
generation runs on the device's own thread, streaming text back to the loop as it decodes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from nats.aio.msg import Msg
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bus import Context
from bus.gpu.leases import LeaseTimeoutError, LedgerUnavailableError
from bus.models.catalogue import ResolvedModel
from bus.runtime import services
from bus.runtime.services import ServiceError
from functions.caption.models import Captioner, rgb
from functions.caption.state import CaptionState

DEMO_MODEL_ID = "darkroom-demo-caption"
MAX_TOKENS = 512  # the longest answer: generation holds the device, captions wait behind it
MAX_IMAGE_EDGE = 2048  # the gateway sends at most 1024; anything larger is not its doing
Emit = Callable[[dict[str, Any]], None]


# --- the request ---------------------------------------------------------------------------


class _Text(BaseModel):
    type: Literal["text"]
    text: str


class _Image(BaseModel):
    type: Literal["image"]


class _Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: list[Annotated[_Text | _Image, Field(discriminator="type")]]


class _Completion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    op: Literal["complete"]
    model: str
    messages: list[_Message] = Field(min_length=1)
    images: list[str] = Field(default_factory=list)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stream: bool = False


@dataclass(frozen=True, slots=True)
class _Prompt:
    inputs: Any  # the processor's output (CPU tensors)
    prompt_tokens: int
    max_new_tokens: int


def model_id(resolved: ResolvedModel) -> str:
    """The id clients name the caption model by (``/v1/models``)."""
    return DEMO_MODEL_ID if resolved.demo else resolved.source


def _card(resolved: ResolvedModel) -> dict[str, Any]:
    owner = "darkroom-demo" if resolved.demo else "darkroom"
    return {"id": model_id(resolved), "owned_by": owner, "demo": resolved.demo}


# --- the service ---------------------------------------------------------------------------


async def serve_chat(msg: Msg, ctx: Context, state: CaptionState) -> None:
    request = services.parse_request(msg)
    resolved = state.models.resolved["caption"]
    if request.get("op") == "models":
        await services.reply(ctx.nc, msg, {"models": [_card(resolved)], "max_tokens": MAX_TOKENS})
        return
    try:
        job = _Completion.model_validate(request)
    except ValidationError as exc:
        reason = exc.errors(include_url=False)[0]["msg"]
        raise ServiceError(f"not a chat request: {reason}", 400, "invalid_request") from None
    if job.model != model_id(resolved):
        raise ServiceError(
            f"the model {job.model!r} does not exist here; this worker serves "
            f"{model_id(resolved)!r}",
            404,
            "model_not_found",
        )
    if ctx.gpu is None:
        raise ServiceError("this worker has no device to run the model on", 503, "no_device")
    images = await ctx.run_cpu(_decode_images, job.images)
    try:
        async with ctx.gpu.use(state.models.caption) as captioner:
            if not captioner.chat:
                raise ServiceError(
                    f"the caption model {model_id(resolved)!r} answers task prompts, not chat "
                    "messages: configure a chat model (SmolVLM2, Qwen3-VL) for /v1",
                    400,
                    "model_not_chat",
                )
            # On the device's thread, as the caption batches are: a fast tokenizer keeps its
            # padding settings on itself, so two threads must never use it at once.
            prompt = await ctx.run_gpu(_prepare, captioner, job, images)
            if job.stream:
                await _stream(msg, ctx, captioner, job, prompt)
            else:
                result = await _generating(ctx, captioner, job, prompt, None)
                await services.reply(ctx.nc, msg, result)
    except (LeaseTimeoutError, LedgerUnavailableError) as exc:
        reason = f"the device has no room for the caption model now ({exc})"
        raise ServiceError(reason, 503, "no_vram") from None


async def _stream(
    msg: Msg, ctx: Context, captioner: Captioner, job: _Completion, prompt: _Prompt
) -> None:
    """Generate, forwarding each piece of text to the requester as the device decodes it."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def emit(chunk: dict[str, Any]) -> None:  # on the device's thread
        loop.call_soon_threadsafe(pieces.put_nowait, chunk)

    await services.reply_chunk(ctx.nc, msg, {"prompt_tokens": prompt.prompt_tokens})
    generating = asyncio.ensure_future(_generating(ctx, captioner, job, prompt, emit))
    # Text the device thread emitted is queued before the generation's end reaches the loop.
    generating.add_done_callback(lambda _: pieces.put_nowait(None))
    try:
        while (piece := await pieces.get()) is not None:
            await services.reply_chunk(ctx.nc, msg, piece)
        result = await generating
    finally:
        if not generating.done():  # cancelled (the worker stops): _generating winds down
            generating.cancel()
            await asyncio.wait({generating})
    await services.reply_chunk(
        ctx.nc,
        msg,
        {
            "finish_reason": result["finish_reason"],
            "completion_tokens": result["completion_tokens"],
        },
    )
    await services.reply_end(ctx.nc, msg)


async def _generating(
    ctx: Context, captioner: Captioner, job: _Completion, prompt: _Prompt, emit: Emit | None
) -> dict[str, Any]:
    """Run the generation on the device's thread. Cancelled, it tells the thread to stop
    and waits until it has: the model stays leased and loaded while it is in use."""
    stop = threading.Event()
    running = asyncio.ensure_future(ctx.run_gpu(_generate, captioner, job, prompt, emit, stop))
    try:
        return await asyncio.shield(running)
    finally:
        if not running.done():
            stop.set()
            await asyncio.wait({running})


# --- blocking parts (CPU pool and device thread) --------------------------------------------


def _decode_images(encoded: list[str]) -> list[Image.Image]:
    images = []
    for i, data in enumerate(encoded):
        try:
            with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as img:
                if max(img.size) > MAX_IMAGE_EDGE:
                    raise ServiceError(
                        f"image {i} is {img.width}x{img.height}; at most {MAX_IMAGE_EDGE} px "
                        "a side",
                        400,
                        "invalid_image",
                    )
                img.load()
                images.append(rgb(img))
        except (OSError, ValueError, binascii.Error, Image.DecompressionBombError) as exc:
            reason = f"image {i} is not a readable image ({exc})"
            raise ServiceError(reason, 400, "invalid_image") from None
    return images


def _prepare(captioner: Captioner, job: _Completion, images: list[Image.Image]) -> _Prompt:
    """The prompt as the model's inputs, checked against its context length."""
    messages = [
        {"role": m.role, "content": [part.model_dump() for part in m.content]} for m in job.messages
    ]
    wanted = sum(part.type == "image" for m in job.messages for part in m.content)
    if wanted != len(images):
        raise ServiceError(
            f"the messages hold {wanted} image parts but {len(images)} images came",
            400,
            "invalid_request",
        )
    processor = captioner.processor
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[images] if images else None, return_tensors="pt")
    prompt_tokens = int(inputs["input_ids"].shape[1])
    config = captioner.model.config
    context = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
    room = MAX_TOKENS if context is None else min(MAX_TOKENS, int(context) - prompt_tokens)
    asked = job.max_tokens
    if room < 1 or (asked is not None and asked > room):
        raise ServiceError(
            f"this model's context is {context} tokens; the messages take {prompt_tokens}"
            + (f" and max_tokens asks for {asked} more" if asked is not None else ""),
            400,
            "context_length_exceeded",
        )
    return _Prompt(inputs, prompt_tokens, asked or room)


def _generate(
    captioner: Captioner,
    job: _Completion,
    prompt: _Prompt,
    emit: Emit | None,
    stop: threading.Event,
) -> dict[str, Any]:
    """Generate on the device's thread; ``emit`` gets each piece of text as it decodes."""
    import torch
    from transformers import StoppingCriteriaList

    options: dict[str, Any] = {"max_new_tokens": prompt.max_new_tokens}
    if job.temperature > 0:
        # OpenAI's sampling: temperature and nucleus only (no top-k).
        options.update(do_sample=True, temperature=job.temperature, top_p=job.top_p, top_k=0)
        if job.seed is not None:
            torch.manual_seed(job.seed)
    else:
        options["do_sample"] = False
    if emit is not None:
        options["streamer"] = _streamer(captioner.processor.tokenizer, emit)
    inputs = prompt.inputs.to(captioner.device)
    with torch.inference_mode():
        out = captioner.model.generate(
            **inputs, **options, stopping_criteria=StoppingCriteriaList([_until(stop)])
        )
    new = out[0, prompt.prompt_tokens :]
    eos = captioner.model.generation_config.eos_token_id
    ends = {eos} if isinstance(eos, int) else set(eos or ())
    stopped = len(new) > 0 and int(new[-1]) in ends
    full = len(new) >= prompt.max_new_tokens and not stopped
    return {
        "text": captioner.processor.tokenizer.decode(new, skip_special_tokens=True),
        "finish_reason": "length" if full else "stop",
        "prompt_tokens": prompt.prompt_tokens,
        "completion_tokens": len(new),
    }


def _streamer(tokenizer: Any, emit: Emit) -> Any:
    """A transformers streamer that hands each finished piece of text to ``emit``."""
    from transformers import TextStreamer

    class Forward(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                emit({"text": text})

    return Forward(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _until(stop: threading.Event) -> Any:
    """A stopping criterion that ends generation once ``stop`` is set."""
    import torch
    from transformers import StoppingCriteria

    class Until(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

    return Until()
