"""The OpenAI-compatible image routes: ``POST /v1/images/generations`` and ``/v1/images/edits``.

Each request becomes a darkroom generation job (:func:`bus.gateway.generations.submit`, the
same checks and queue as ``POST /api/generations``), and the answer waits for it, as
OpenAI's does: the job's images, as base64 PNG (``response_format: b64_json``, the default)
or as presigned URLs of ``generated/<job>/<i>.png`` valid for an hour (``url``).

- ``model`` is a name of darkroom's catalogue (``generate.catalogue``); OpenAI's own names
  (``dall-e-*``, ``gpt-image-*``, ``chatgpt-image-*``) and no model mean the default model.
- ``size`` is ``WIDTHxHEIGHT`` (multiples of 8, within ``generate``'s bounds) or ``auto``,
  the model's own size (for an edit: the image's aspect at the model's area).
- An edit is an img2img job from the uploaded image, checked as every upload is, at
  darkroom's img2img strength. A ``mask`` is refused: darkroom does not inpaint.
- ``quality``, ``style`` and ``moderation`` are accepted and ignored (the steps are the
  model's; the approval policy judges outputs); outputs are opaque PNG.

A job that fails or is cancelled answers an error saying why; a job that takes longer than
the wait bound answers 504 naming it, to be followed at ``/api/generations/<id>``; a client
that hangs up cancels its job. Errors are OpenAI's error object (see
:mod:`bus.gateway.openai_api`), and the routes need the ``generate`` scope.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
import time
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from bus.core import subjects
from bus.core.envelope import new_id
from bus.core.generation import InitImage
from bus.gateway.access import sees_held
from bus.gateway.contract import NOT_BLANK, SETTING_MAXIMUM, describe, is_json
from bus.gateway.generations import InvalidGeneration, submit
from bus.gateway.live import LIVE
from bus.gateway.openai_api import ErrorDetail, OpenAIError, OpenAIErrorBody, _limits, _measured
from bus.gateway.problems import Problem, json_response
from bus.gateway.routes import ErrorBody, Reply, Route
from bus.gateway.state import CTX
from bus.images.check import UploadRejectedError, check_file
from bus.runtime.context import Context
from bus.state.cancels import request_cancel
from bus.state.generations import FINISHED
from bus.state.readmodel import SHOWN

log = logging.getLogger("darkroom.gateway")

# Model names of OpenAI's image API: they mean "darkroom's default model".
OPENAI_MODELS = ("dall-e-", "gpt-image-", "chatgpt-image-")
URL_EXPIRES = timedelta(hours=1)
HELD_POLL_S = 0.5  # how often an answer waiting on NSFW screening looks again
WAIT_S = 300.0  # the longest a request waits for its job; then 504, the job goes on
WAIT = web.AppKey("images_wait_s", float)  # tests set a shorter bound
HANGUP_POLL_S = 0.5  # how often a waiting request looks whether its client is still there
MAX_FIELD_BYTES = 256 * 1024  # one text field of an edit's form (the prompt, mostly)
MAX_PARTS = 64
CHUNK = 256 * 1024
SIZE = re.compile(r"^(auto|[0-9]{1,5}x[0-9]{1,5})$")


# --- the requests ----------------------------------------------------------------------------


def _no_stream(value: bool) -> bool:
    if value:
        raise ValueError("must be false: darkroom answers once the images are made, unstreamed")
    return value


# false, or left out (a form field "false" is one too)
NoStream = Annotated[
    bool, AfterValidator(_no_stream), WithJsonSchema({"type": "boolean", "const": False})
]


class _Options(BaseModel):
    """What generations and edits share."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(pattern=NOT_BLANK, description="what to draw (generate.max_prompt_chars)")
    model: str | None = Field(
        None,
        description="a model of darkroom's catalogue (GET /api/models); OpenAI's names "
        "(dall-e-*, gpt-image-*, chatgpt-image-*) and none mean the default model",
    )
    n: int | None = Field(
        None,
        ge=1,
        description="how many images",
        json_schema_extra={SETTING_MAXIMUM: "generate.max_n"},
    )
    size: str | None = Field(
        None,
        description="WIDTHxHEIGHT, each a multiple of 8 within generate.max_side and "
        "generate.max_pixels; auto (the default): the model's own size (an edit: the "
        "image's aspect at the model's area)",
        json_schema_extra={"pattern": SIZE.pattern},
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        None,
        description="b64_json (the default): base64 PNG in the answer; url: a presigned URL "
        "of the PNG, valid for an hour",
    )
    quality: Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"] | None = (
        Field(None, description="accepted and ignored: the steps are the model's")
    )
    background: Literal["auto", "opaque"] | None = Field(
        None, description="darkroom's images are opaque (no transparent backgrounds)"
    )
    output_format: Literal["png"] | None = Field(None, description="darkroom answers PNG")
    moderation: Literal["auto", "low"] | None = Field(
        None, description="accepted and ignored: darkroom's approval policy judges outputs"
    )
    stream: NoStream | None = Field(None, description="streaming is not offered")
    user: str | None = Field(None, max_length=256, description="who asks, kept with the job")
    safety_identifier: str | None = Field(
        None, max_length=256, description="who asks, kept with the job"
    )

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: str | None) -> str | None:
        if value is not None and not SIZE.fullmatch(value):
            raise ValueError("must be WIDTHxHEIGHT (e.g. 1024x1024) or auto")
        return value


class ImageGenerateRequest(_Options):
    """OpenAI's image generation request, as far as a diffusers pipeline answers it."""

    style: Literal["vivid", "natural"] | None = Field(None, description="accepted and ignored")


class ImageEditFields(_Options):
    """The text fields of an edit's form (besides the image)."""


def _form_field(prop: dict[str, Any]) -> dict[str, Any]:
    """A field's JSON schema as a form field's: a form has no null, so none is offered."""
    field = {k: v for k, v in prop.items() if k not in ("title", "default")}
    for branch in field.pop("anyOf", []):
        if branch.get("type") != "null":
            field.update(branch)
    return field


EDIT_FORM = {
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "required": ["prompt"],
            "oneOf": [{"required": ["image"]}, {"required": ["image[]"]}],
            "additionalProperties": False,
            "properties": {
                "image": {
                    "type": "string",
                    "format": "binary",
                    "description": "the picture to start from, checked as every upload is",
                },
                "image[]": {
                    "type": "array",
                    "items": {"type": "string", "format": "binary"},
                    "maxItems": 1,
                    "description": "or the same as the openai client sends a list: one image",
                },
                **{
                    name: _form_field(prop)
                    for name, prop in ImageEditFields.model_json_schema()["properties"].items()
                },
            },
        },
        "encoding": {
            "image": {"contentType": "image/*"},
            "image[]": {"contentType": "image/*"},
        },
    }
}


# --- the answer ------------------------------------------------------------------------------


class GeneratedImage(BaseModel):
    b64_json: str | None = Field(
        default=None, description="the PNG, base64 (response_format b64_json)"
    )
    url: str | None = Field(default=None, description="the PNG's presigned URL, valid for an hour")


class ImagesResponse(BaseModel):
    created: int = Field(description="when the job finished (Unix time)")
    data: list[GeneratedImage]
    output_format: Literal["png"]
    background: Literal["opaque"]


# --- the routes ------------------------------------------------------------------------------

ANSWERS: dict[int, Reply | str] = {
    200: Reply("the job's images, once it is done", ImagesResponse),
    400: "a field that does not fit (size, n, prompt...), a mask, or an image that cannot be used",
    404: "no such model (see GET /api/models)",
    409: "the job was cancelled (DELETE /api/generations/{id})",
    413: "the body or the image is too large",
    415: "the body is not of the type the route takes",
    503: "the store or the bus did not answer in time",
    500: "the job failed: the message says why",
    504: "the job did not finish within the wait: follow it at /api/generations/{id}",
}


def routes() -> list[Route]:
    errors = ErrorBody("application/json", OpenAIErrorBody)
    return [
        Route(
            "POST",
            "/v1/images/generations",
            create_images,
            "generate",
            "OpenAI-compatible: generate images from a prompt, answered when the job is done",
            "openai",
            body={"application/json": ImageGenerateRequest},
            responses=ANSWERS,
            errors=errors,
        ),
        Route(
            "POST",
            "/v1/images/edits",
            edit_images,
            "generate",
            "OpenAI-compatible: images from an uploaded image and a prompt (img2img), "
            "answered when the job is done; masks (inpainting) are refused",
            "openai",
            body=EDIT_FORM,
            responses=ANSWERS,
            errors=errors,
        ),
    ]


# --- the handlers ----------------------------------------------------------------------------


async def create_images(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    if not is_json(request.content_type):
        given = request.content_type if request.headers.get("Content-Type") else "no content type"
        raise OpenAIError(415, f"send the body as application/json, got {given}")
    try:  # strict: JSON's own types, as the document says
        asked = ImageGenerateRequest.model_validate_json(await request.read(), strict=True)
    except ValidationError as exc:
        raise _refusal(ImageGenerateRequest, exc) from None
    await _check_policy(request)
    job_id = new_id()
    await _submit(ctx, asked, job_id, None)
    return await _answer(request, asked, job_id)


async def edit_images(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    if request.content_type != "multipart/form-data":
        given = request.content_type if request.headers.get("Content-Type") else "no content type"
        raise OpenAIError(415, f"send the body as multipart/form-data, got {given}")
    fields, image = await _form(request, _limits(ctx).max_bytes)
    try:
        asked = ImageEditFields.model_validate(fields)
    except ValidationError as exc:
        raise _refusal(ImageEditFields, exc) from None
    if image is None:
        raise OpenAIError(
            400, "image is required: the picture to start from, as the file field 'image'", "image"
        )
    await _check_policy(request)
    data, extension, mime = await _checked(ctx, image)
    job_id = new_id()
    key = subjects.request_image_key(job_id, extension)
    await ctx.store.interactive.put_bytes(key, data, mime)
    try:
        await _submit(ctx, asked, job_id, InitImage(key, None))
    except Exception:  # not queued: nothing will read it
        await ctx.store.interactive.delete(key)
        raise
    return await _answer(request, asked, job_id)


def _refusal(model: type[BaseModel], exc: ValidationError) -> OpenAIError:
    errors = exc.errors(include_url=False)
    if errors[0]["type"] == "json_invalid":
        return OpenAIError(400, f"the body is not JSON: {errors[0]['msg']}", code="invalid_json")
    detail = "; ".join(describe(model, e) for e in errors)
    loc = errors[0]["loc"]
    return OpenAIError(400, detail, str(loc[0]) if loc else None, "invalid_value")


async def _check_policy(request: web.Request) -> None:
    """Where every generated image waits for an admin's approval, these routes (which hand
    the pixels back at once) are an admin's; others queue with POST /api/generations."""
    if request.app[CTX].settings.approval.hold.generated and not await sees_held(request):
        raise OpenAIError(
            403,
            "this deployment holds generated images until an admin approves them: queue the "
            "job with POST /api/generations and follow it there",
            None,
            "content_policy_violation",
        )


async def _submit(ctx: Context, asked: _Options, job_id: str, init: InitImage | None) -> None:
    """Check the request as a darkroom job and queue it (400/404 when it cannot run)."""
    settings = ctx.settings.generate
    model = asked.model
    if model is not None and model not in settings.catalogue:
        if not model.startswith(OPENAI_MODELS):
            names = ", ".join(sorted(settings.catalogue))
            raise OpenAIError(
                404,
                f"the model {model!r} does not exist; darkroom's models are {names} (OpenAI's "
                "names mean the default model)",
                "model",
                "model_not_found",
            )
        model = None
    width = height = None
    if asked.size is not None and asked.size != "auto":
        width, height = (int(side) for side in asked.size.split("x"))
    values: dict[str, Any] = {
        "prompt": asked.prompt,
        "model": model,
        "n": asked.n,
        "width": width,
        "height": height,
        "mode": "txt2img" if init is None else "img2img",
    }
    extra = {
        name: value
        for name in ("response_format", "user", "safety_identifier")
        if (value := getattr(asked, name)) is not None
    }
    try:
        await submit(ctx, values, job_id=job_id, init=init, source="openai", extra=extra)
    except InvalidGeneration as exc:
        raise OpenAIError(
            400, "; ".join(exc.problems), _param(exc.problems[0]), "invalid_value"
        ) from None


# A job's fields, as the OpenAI request names them.
_PARAMS = {"width": "size", "height": "size", "width x height": "size"}


def _param(problem: str) -> str | None:
    for name in ("width x height", "width", "height", "prompt", "n", "model"):
        if problem.startswith(name + " "):
            return _PARAMS.get(name, name)
    return None


async def _answer(request: web.Request, asked: _Options, job_id: str) -> web.Response:
    """The finished job's images, or why there are none. The job is queued by now: any
    error says not to ask again (the openai client would queue the job once more), and
    names the job to follow; only a client that hung up gets no answer."""
    try:
        return await _answer_queued(request, asked, job_id)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as exc:
        status = exc.status if isinstance(exc, Problem) else 500
        log.warning("the answer to generation %s failed: %s", job_id, exc)
        return _final(
            status if status >= 500 else 500,
            f"generation {job_id} was queued, but its answer failed ({type(exc).__name__}): "
            f"follow it at /api/generations/{job_id}",
            "answer_failed",
        )


async def _answer_queued(request: web.Request, asked: _Options, job_id: str) -> web.Response:
    ctx = request.app[CTX]
    timeout = request.app.get(WAIT, WAIT_S)
    doc = await _finished(request, job_id, timeout)
    status = None if doc is None else doc["status"]
    if doc is None or status not in FINISHED:
        return _final(
            504,
            f"generation {job_id} did not finish within {timeout:g} s; it goes on: follow it "
            f"at /api/generations/{job_id}",
            "timeout",
        )
    reason = doc.get("error") or "no reason given"
    if status == "failed":
        return _final(500, f"generation {job_id} failed: {reason}", "generation_failed")
    if status == "cancelled":
        return _final(409, f"generation {job_id} was cancelled: {reason}", "cancelled")
    held = await _held_outputs(request, doc, timeout)
    if held:
        return _final(
            403,
            f"generation {job_id} made images the approval policy holds ({', '.join(held)}): "
            f"an admin decides; follow it at /api/generations/{job_id}",
            "content_policy_violation",
        )
    keys = [subjects.generated_key(job_id, i) for i in range(int(doc["n"]))]
    if asked.response_format == "url":
        data = [GeneratedImage(url=ctx.store.presigned_get(key, URL_EXPIRES)) for key in keys]
    else:
        encoded = await asyncio.gather(*(_base64(ctx, key) for key in keys))
        data = [GeneratedImage(b64_json=b64) for b64 in encoded]
    finished = datetime.fromisoformat(doc["finished_at"]).timestamp()
    answer = ImagesResponse(
        created=int(finished), data=data, output_format="png", background="opaque"
    )
    return json_response(answer)


async def _held_outputs(request: web.Request, doc: dict[str, Any], timeout: float) -> list[str]:
    """The job's outputs the caller may not see. Where the policy screens NSFW scores, an
    output is pending until its caption brings the score: wait for it (within
    ``timeout``) before answering a key that is not admin."""
    ctx = request.app[CTX]
    if ctx.settings.approval.hold.nsfw_above is None or ctx.db is None:
        return []
    if await sees_held(request):
        return []
    db = ctx.db
    ids = [str(o.get("image_id")) for o in doc.get("outputs") or []]
    deadline = time.monotonic() + timeout
    while True:
        rows = [await db.get(image_id) for image_id in ids]
        approvals = [row.get("approval") if row else "pending" for row in rows]
        if "pending" not in approvals or time.monotonic() >= deadline:
            return [i for i, a in zip(ids, approvals, strict=True) if a not in SHOWN]
        await asyncio.sleep(HELD_POLL_S)


def _final(status: int, message: str, code: str) -> web.Response:
    """An error that asking again would not mend, or would repeat (the job goes on): the
    openai client obeys ``x-should-retry: false`` instead of retrying a 409 or a 5xx."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    error = ErrorDetail(message=message, type=kind, param=None, code=code)
    response = json_response(OpenAIErrorBody(error=error), status=status)
    response.headers["x-should-retry"] = "false"
    return response


async def _base64(ctx: Context, key: str) -> str:
    png = await ctx.store.interactive.get_bytes(key)
    return await ctx.run_interactive(lambda: base64.b64encode(png).decode())


async def _finished(request: web.Request, job_id: str, timeout: float) -> dict[str, Any] | None:
    """The job's document once it is done, failed or cancelled, or as it stands after
    ``timeout`` (None: not known yet); a client that hangs up meanwhile cancels it."""
    waiting = asyncio.ensure_future(request.app[LIVE].wait(job_id, timeout))
    try:
        while not waiting.done():
            if _gone(request):  # the gateway's server lets handlers run on: look
                await _hung_up(request, job_id)
                raise ConnectionResetError("the client hung up")
            await asyncio.wait({waiting}, timeout=HANGUP_POLL_S)
        return waiting.result()
    except asyncio.CancelledError:
        if _gone(request):  # a server that cancels handlers when their client goes
            await asyncio.shield(_hung_up(request, job_id))
        raise
    finally:
        waiting.cancel()


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _hung_up(request: web.Request, job_id: str) -> None:
    await request_cancel(request.app[CTX].cancels_kv, job_id, "the OpenAI client hung up")
    log.info("%s: the client hung up: cancelled generation %s", request.path, job_id)


# --- an edit's form --------------------------------------------------------------------------


async def _form(request: web.Request, max_image: int) -> tuple[dict[str, str], bytes | None]:
    """The text fields and the one image of an edit's form."""
    fields: dict[str, str] = {}
    image: bytes | None = None
    try:
        reader = await request.multipart()
        for _ in range(MAX_PARTS):
            part = await reader.next()
            if part is None:
                return fields, image
            if not isinstance(part, BodyPartReader):
                raise OpenAIError(400, "a nested multipart body is not a field of this request")
            name = part.name or ""
            if name == "mask":
                raise OpenAIError(
                    400,
                    "mask is not supported: darkroom does not inpaint; send the image alone "
                    "and it is redrawn whole from the prompt (img2img)",
                    "mask",
                    "unsupported_value",
                )
            if name in ("image", "image[]"):
                if image is not None:
                    raise OpenAIError(
                        400, "darkroom edits one image a request, got several", "image",
                        "unsupported_value",
                    )  # fmt: skip
                image = await _read(part, max_image, "image")
                continue
            if name in fields:
                raise OpenAIError(400, f"{name[:80]} is given more than once", name[:80])
            try:
                fields[name] = (await _read(part, MAX_FIELD_BYTES, name)).decode()
            except UnicodeDecodeError:
                raise OpenAIError(400, f"{name[:80]} is not UTF-8 text", name[:80]) from None
    except (ValueError, AssertionError, HttpProcessingError) as exc:
        detail = str(exc) or type(exc).__name__
        raise OpenAIError(400, f"malformed multipart body: {detail}") from None
    raise OpenAIError(400, f"the form has more than {MAX_PARTS} parts")


async def _read(part: BodyPartReader, limit: int, name: str) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK):
        data += chunk
        if len(data) > limit:
            what = "the image" if name == "image" else name[:80]
            code = "image_too_large" if name == "image" else "request_too_large"
            raise OpenAIError(413, f"{what} is over {limit:,} bytes", name[:80], code)
    return bytes(data)


async def _checked(ctx: Context, image: bytes) -> tuple[bytes, str, str]:
    """The image, checked as every upload is; with its extension and type as sniffed."""
    limits = _limits(ctx)
    try:
        raw, cost = await ctx.run_interactive(_measured, image, limits)
        async with ctx.decode_budget.hold(cost):
            checked = await ctx.run_interactive(check_file, io.BytesIO(raw), limits)
    except UploadRejectedError as exc:
        status, code = (413, "image_too_large") if exc.status == 413 else (400, "invalid_image")
        raise OpenAIError(status, f"image: {exc.reason}", "image", code) from None
    return raw, checked.kind.extension, checked.kind.mime
