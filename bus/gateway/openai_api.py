"""The OpenAI-compatible vision endpoint: ``POST /v1/chat/completions`` and ``GET /v1/models``.

The caption model answers, in the caption function's worker, through its ``chat`` service
(``functions/caption/chat.py`` describes the protocol). The gateway's part:

- it checks the request (OpenAI's chat completion object, less what the model cannot do:
  tools, response formats, several choices), and wants at least one image;
- it resolves each image: a ``data:`` URL (base64), an ``http(s)`` URL, fetched under the
  ingest webhook's rules (:mod:`bus.intake.fetch`: only when ``ingest.fetch.enabled``,
  from ``allow_hosts``, never an internal address), or ``darkroom://images/<id>``, an
  image of this catalogue (its display rendition). Each passes the checks every upload
  passes (:func:`bus.images.check.check_file`), then is shrunk (long edge 1024 px, 512 for
  ``detail: low``; smaller when many images must share one request) and sent as JPEG;
- it asks the worker, and answers as OpenAI does: a ``chat.completion``, or with
  ``stream: true`` server-sent ``chat.completion.chunk`` events ending with ``[DONE]``.

Errors under ``/v1`` are OpenAI's error object, ``{"error": {"message", "type", "param",
"code"}}``, with the HTTP status darkroom gives elsewhere (:func:`openai_errors` rewrites
the gateway's problem+json there), so the official ``openai`` client raises its usual
exceptions. The API keys are the same (Bearer); the routes need the ``read`` scope.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated, Any, Literal, cast

import orjson
from aiohttp import web
from PIL import ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from bus.core import subjects
from bus.gateway.access import sees_held
from bus.gateway.contract import describe, is_json
from bus.gateway.problems import PROBLEM_JSON, Handler, Problem, client_gone, json_response
from bus.gateway.routes import ErrorBody, Reply, Route
from bus.gateway.state import CTX
from bus.images.check import Limits, UploadRejectedError, check_file, check_head, open_image
from bus.images.media import SNIFF_BYTES
from bus.infra.store import ObjectMissingError, TooLargeError
from bus.intake.fetch import FetchError, fetch_image
from bus.runtime import services
from bus.runtime.context import Context
from bus.runtime.services import ServiceError
from bus.state.readmodel import SHOWN

log = logging.getLogger("darkroom.gateway")

PREFIX = "/v1"
CHAT_SERVICE = "chat"  # the caption function's service (functions/caption/chat.py)
MAX_BODY_BYTES = 32 * 1024 * 1024  # a 20 MiB image in base64, and the conversation
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # one image, as sent or fetched (OpenAI's own limit)
MAX_IMAGES = 8
EDGES = {"low": 512, "auto": 1024, "high": 1024}  # the long edge the model sees
SHRINK_STEPS = (1024, 768, 512, 384, 256)  # smaller, while the images do not fit
JPEG_QUALITY = 85
# What the request holds besides its images: the keys, numbers and text, counted apart.
PAYLOAD_SLACK = 16 * 1024
DARKROOM_IMAGES = "darkroom://images/"
DISPLAY_RENDITION = "display.webp"  # images/<id>/display.webp, written by ingest
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass(frozen=True, slots=True)
class ChatTimeouts:
    """How long the gateway waits for the worker."""

    models_s: float = 10.0  # which model it serves (answered on its loop, at once)
    first_s: float = 120.0  # a completion's start: VRAM lease, model load, the prompt
    gap_s: float = 60.0  # between pieces of text


CHAT_TIMEOUTS = web.AppKey("chat_timeouts", ChatTimeouts)


# --- OpenAI's error object -------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx)")
    param: str | None = Field(description="the request field at fault, if one is")
    code: str | None = Field(description="e.g. model_not_found, invalid_image, no_responder")


class OpenAIErrorBody(BaseModel):
    """OpenAI's error object: what every error under /v1 answers."""

    error: ErrorDetail


class OpenAIError(Problem):
    """Raise from a /v1 handler: answered as OpenAI's error object (see :func:`openai_errors`)."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        title = HTTPStatus(status).phrase
        super().__init__(status, title, message, openai={"param": param, "code": code})


def is_openai_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Under /v1, every problem+json answer (router, auth, handlers) as OpenAI's error
    object, with the same status and headers (Retry-After, WWW-Authenticate, Allow)."""
    response = await handler(request)
    if (
        not is_openai_path(request.path)
        or not isinstance(response, web.Response)
        or response.content_type != PROBLEM_JSON
        or not isinstance(response.body, bytes)
    ):
        return response
    problem = orjson.loads(response.body)
    extra = problem.get("openai") or {}
    code = extra.get("code")
    if response.status == 401 and "invalid_token" in response.headers.get("WWW-Authenticate", ""):
        code = "invalid_api_key"
    error = ErrorDetail(
        message=problem.get("detail") or problem.get("title") or HTTPStatus(response.status).phrase,
        type="server_error" if response.status >= 500 else "invalid_request_error",
        param=extra.get("param"),
        code=code,
    )
    answer = json_response(OpenAIErrorBody(error=error), status=response.status)
    for name in ("Retry-After", "WWW-Authenticate", "Allow"):
        if name in response.headers:
            answer.headers[name] = response.headers[name]
    return answer


# --- the request -----------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageUrl(_Strict):
    url: str = Field(
        description="a data: URL (base64), an http(s) URL the gateway may fetch "
        "(ingest.fetch), or darkroom://images/<id>"
    )
    detail: Literal["auto", "low", "high"] = Field(
        "auto", description="low: the model sees at most 512 px, else 1024"
    )


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: str | list[TextPart]


class UserMessage(_Strict):
    role: Literal["user"]
    content: str | list[Part]


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="a last chunk with the token counts")


class ChatRequest(_Strict):
    """OpenAI's chat completion request, as far as a vision model answers it."""

    model: str = Field(description="an id GET /v1/models lists")
    messages: list[Message] = Field(
        min_length=1,
        description="the conversation; the user's messages carry the images (at least one, "
        f"at most {MAX_IMAGES})",
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, description="the longest answer; at most what the worker allows (512)"
    )
    max_tokens: int | None = Field(None, ge=1, description="the older name of the same")
    temperature: float | None = Field(
        None, ge=0, le=2, description="0: greedy (deterministic); default 1"
    )
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling; default 1")
    n: int | None = Field(
        None, ge=1, description="choices: only 1", json_schema_extra={"maximum": 1}
    )
    stream: bool | None = Field(None, description="server-sent chat.completion.chunk events")
    stream_options: StreamOptions | None = None
    seed: int | None = Field(
        None, ge=-(2**63), le=2**63 - 1, description="with sampling: the same seed, the same answer"
    )
    user: str | None = Field(None, description="who asks, for the caller's records (unused)")


# --- the answers -----------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int = Field(description="unknown: 0")
    owned_by: str = Field(description="darkroom, or darkroom-demo for a tiny random demo model")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class AnswerMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    refusal: None


class Choice(BaseModel):
    index: int
    message: AnswerMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


STREAM_REPLY = {
    "text/event-stream": {
        "schema": {
            "type": "string",
            "description": "data: <chat.completion.chunk JSON> events, the first with the "
            "role, then content deltas, then one with finish_reason (and with "
            "stream_options.include_usage one with usage), then data: [DONE]",
        }
    }
}


# --- the routes ------------------------------------------------------------------------------

UNSERVED = "no caption worker is serving right now (none runs, or it is still loading its models)"


def routes() -> list[Route]:
    errors = ErrorBody("application/json", OpenAIErrorBody)
    return [
        Route(
            "GET",
            "/v1/models",
            list_models,
            "read",
            "OpenAI-compatible: the vision model the caption worker answers with (a tiny "
            "random demo model is darkroom-demo-caption, owned by darkroom-demo)",
            "openai",
            responses={
                200: Reply("the models", ModelList),
                503: UNSERVED,
                504: "the caption worker did not answer in time",
            },
            errors=errors,
        ),
        Route(
            "POST",
            "/v1/chat/completions",
            chat_completions,
            "read",
            "OpenAI-compatible: the caption model answers a conversation about images "
            "(data: URLs, http(s) URLs fetched under ingest.fetch, darkroom://images/<id>)",
            "openai",
            body={"application/json": ChatRequest},
            responses={
                200: Reply(
                    "the answer: a chat.completion, or with stream: true server-sent "
                    "chat.completion.chunk events",
                    ChatCompletion,
                    content=STREAM_REPLY,
                ),
                400: "malformed JSON, a field that does not fit, no image, n over 1, "
                "max_tokens over the model's limit, an image or image URL that cannot be "
                "used, or a conversation longer than the model's context",
                403: "fetching URLs is off, or the URL's host or address is not allowed",
                404: "no such model (see GET /v1/models), or no such darkroom image",
                413: "the body, an image or the conversation is too large",
                415: "the body is not application/json",
                502: "an image URL's server failed, or the worker broke off",
                503: UNSERVED,
                504: "fetching an image URL, or the caption worker, took too long",
            },
            errors=errors,
        ),
    ]


# --- the handlers ----------------------------------------------------------------------------


async def list_models(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    served = await _served(ctx, request.app[CHAT_TIMEOUTS])
    cards = [
        ModelCard(id=m["id"], object="model", created=0, owned_by=m["owned_by"])
        for m in served["models"]
    ]
    return json_response(ModelList(object="list", data=cards))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    timeouts = request.app[CHAT_TIMEOUTS]
    chat = await ctx.run_interactive(_parse, await _body(request))
    wanted = _image_urls(chat)
    max_tokens = _max_tokens(chat)
    served = await _served(ctx, timeouts)
    if chat.model not in {m["id"] for m in served["models"]}:
        ids = ", ".join(repr(m["id"]) for m in served["models"])
        raise OpenAIError(
            404,
            f"the model {chat.model!r} does not exist; GET /v1/models lists {ids}",
            "model",
            "model_not_found",
        )
    if max_tokens is not None and max_tokens > served["max_tokens"]:
        raise OpenAIError(
            400,
            f"max_tokens is {max_tokens}; this model answers at most {served['max_tokens']} tokens",
            "max_completion_tokens" if chat.max_completion_tokens else "max_tokens",
            "invalid_value",
        )
    messages = _worker_messages(chat)
    budget = _image_budget(messages, len(wanted))
    held = await sees_held(request)  # darkroom://images of pending ones: an admin's only
    images = [await _image(ctx, url, where, budget, held) for url, where in wanted]
    payload = {
        "op": "complete",
        "model": chat.model,
        "messages": messages,
        "images": images,
        "max_tokens": max_tokens,
        "temperature": 1.0 if chat.temperature is None else chat.temperature,  # OpenAI's default
        "top_p": 1.0 if chat.top_p is None else chat.top_p,
        "seed": chat.seed,
        "stream": True,  # both ways: the wait is bounded per piece, not per answer
    }
    # (an async generator: closing it unsubscribes, so the worker's later pieces go nowhere)
    pieces = cast(
        AsyncGenerator[Any, None],
        services.stream(
            ctx.nc,
            ctx.names.service(CHAT_SERVICE),
            payload,
            timeouts.first_s,
            timeouts.gap_s,
            name=CHAT_SERVICE,
        ),
    )
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": chat.model}
    async with aclosing(pieces):
        try:  # the worker refuses before it starts: a status of its own, not an event
            start = await anext(pieces)
        except StopAsyncIteration:
            raise OpenAIError(502, "the worker ended the answer before it began") from None
        except ServiceError as exc:
            raise _from_service(exc) from None
        prompt_tokens = int(start["prompt_tokens"])
        if chat.stream:
            usage = chat.stream_options is not None and chat.stream_options.include_usage
            return await _stream(request, head, prompt_tokens, pieces, usage)
        return await _complete(head, prompt_tokens, pieces)


async def _complete(
    head: dict[str, Any], prompt_tokens: int, pieces: AsyncIterator[Any]
) -> web.Response:
    text: list[str] = []
    finish: dict[str, Any] | None = None
    try:
        async for piece in pieces:
            if "text" in piece:
                text.append(piece["text"])
            elif "finish_reason" in piece:
                finish = piece
    except ServiceError as exc:
        raise _from_service(exc) from None
    if finish is None:
        raise OpenAIError(502, "the worker ended the answer without finishing it")
    answer = ChatCompletion(
        **head,
        object="chat.completion",
        choices=[
            Choice(
                index=0,
                message=AnswerMessage(role="assistant", content="".join(text), refusal=None),
                finish_reason=finish["finish_reason"],
                logprobs=None,
            )
        ],
        usage=_usage(prompt_tokens, finish),
    )
    return json_response(answer)


async def _stream(
    request: web.Request,
    head: dict[str, Any],
    prompt_tokens: int,
    pieces: AsyncIterator[Any],
    include_usage: bool,
) -> web.StreamResponse:
    """The answer as server-sent events; a failure once they began is an error event (the
    openai client raises it), with no [DONE]."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)

    async def send(doc: Any) -> None:
        await response.write(b"data: " + orjson.dumps(doc) + b"\n\n")

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        doc = {**head, "object": "chat.completion.chunk", "choices": [choice]}
        return {**doc, "usage": None} if include_usage else doc

    try:
        await send(chunk({"role": "assistant", "content": ""}))
        finish: dict[str, Any] | None = None
        try:
            async for piece in pieces:
                if "text" in piece:
                    await send(chunk({"content": piece["text"]}))
                elif "finish_reason" in piece:
                    finish = piece
            if finish is None:
                raise ServiceError("the worker ended the answer without finishing it", 502)
        except ServiceError as exc:
            await send({"error": _error_detail(exc).model_dump()})
            return response
        await send(chunk({}, finish["finish_reason"]))
        if include_usage:
            usage = _usage(prompt_tokens, finish).model_dump()
            await send({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionError as exc:
        if not client_gone(request, exc):
            raise
        log.info("%s: the client hung up mid-stream", request.path)
    return response


def _usage(prompt_tokens: int, finish: dict[str, Any]) -> Usage:
    completion = int(finish["completion_tokens"])
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
    )


# --- checking the request --------------------------------------------------------------------


async def _body(request: web.Request) -> bytes:
    if not is_json(request.content_type):
        given = request.content_type if request.headers.get("Content-Type") else "no content type"
        raise OpenAIError(415, f"send the body as application/json, got {given}")
    too_large = OpenAIError(
        413, f"the body is over {MAX_BODY_BYTES:,} bytes", code="request_too_large"
    )
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_chunked(256 * 1024):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    return bytes(body)


def _parse(body: bytes) -> ChatRequest:
    """The body as a :class:`ChatRequest` (blocking: a body may be tens of megabytes)."""
    try:  # strict: JSON's own types, as the document says
        return ChatRequest.model_validate_json(body, strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors[0]["type"] == "json_invalid":
            detail = f"the body is not JSON: {errors[0]['msg']}"
            raise OpenAIError(400, detail, code="invalid_json") from None
        readable = _readable(errors)
        detail = "; ".join(describe(ChatRequest, e) for e in readable)
        raise OpenAIError(400, detail, _param(readable[0]["loc"]) or None) from None


_BRANCHES = {"string_type", "list_type", "none_required"}  # content: a string, a list, null


def _readable(errors: list[ErrorDetails]) -> list[ErrorDetails]:
    """The errors at the request's own paths, in its own terms: a content that took no
    branch must be a string or a list (one error, not one per branch); one that was a list
    says what is wrong inside it; a message or part of an unknown kind names its field."""
    out: list[ErrorDetails] = []
    cleaned = [(e, _clean(e["loc"])) for e in errors]
    for error, loc in cleaned:
        if error["type"] in _BRANCHES and loc[-1:] == ("content",):
            if any(len(other) > len(loc) and other[: len(loc)] == loc for _, other in cleaned):
                continue  # a list, wrong inside: those errors say how
            rule = "must be a string or a list of content parts"
            error = ErrorDetails(
                type="value_error", loc=loc, msg=rule, input=error["input"], ctx={"error": rule}
            )
            if error not in out:
                out.append(error)
            continue
        if error["type"] == "union_tag_invalid":
            ctx = error.get("ctx") or {}
            field = str(ctx.get("discriminator", "type")).strip("'")
            error = ErrorDetails(
                type="literal_error",
                loc=(*loc, field),
                msg=error["msg"],
                input=ctx.get("tag"),
                ctx={"expected": ctx.get("expected_tags", "")},
            )
        else:
            error = ErrorDetails(**{**error, "loc": loc})
        out.append(error)
    return out


def _clean(loc: Sequence[int | str]) -> tuple[int | str, ...]:
    """An error location as the request's own path, without the labels pydantic adds for
    union members: a message's role or a part's type after the index, and the branch
    content took ("str", "list[...]")."""
    kept: list[int | str] = []
    tagged = parts = False
    for part in loc:
        if isinstance(part, int):
            tagged = kept[-1:] == ["messages"] or (kept[-1:] == ["content"] and parts)
            kept.append(part)
        elif tagged:
            tagged = False
        elif kept[-1:] == ["content"]:
            parts = "tagged-union" in part  # a user's parts: text or image_url
        else:
            kept.append(part)
    return tuple(kept)


def _param(loc: Sequence[int | str]) -> str:
    """A (cleaned) location as OpenAI names a parameter: ``messages[0].content``."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def _max_tokens(chat: ChatRequest) -> int | None:
    given = {chat.max_completion_tokens, chat.max_tokens} - {None}
    if len(given) > 1:
        raise OpenAIError(
            400,
            "max_completion_tokens and max_tokens disagree: send one of them",
            "max_tokens",
            "invalid_value",
        )
    return chat.max_completion_tokens or chat.max_tokens


def _image_urls(chat: ChatRequest) -> list[tuple[ImageUrl, str]]:
    """Every image of the conversation, in order, with where it is; refuses what the model
    cannot do (several choices, no image, too many)."""
    if chat.n is not None and chat.n > 1:
        raise OpenAIError(
            400, f"darkroom answers one choice a request: n must be 1, got {chat.n}", "n",
            "unsupported_value",
        )  # fmt: skip
    found = [
        (part.image_url, f"messages[{i}].content[{j}].image_url")
        for i, message in enumerate(chat.messages)
        if isinstance(message, UserMessage) and isinstance(message.content, list)
        for j, part in enumerate(message.content)
        if isinstance(part, ImagePart)
    ]
    if not found:
        raise OpenAIError(
            400,
            "the messages hold no image: this is a vision model; add a user content part "
            '{"type": "image_url", "image_url": {"url": ...}}',
            "messages",
            "image_required",
        )
    if len(found) > MAX_IMAGES:
        raise OpenAIError(
            400,
            f"the messages hold {len(found)} images; at most {MAX_IMAGES}",
            "messages",
            "too_many_images",
        )
    return found


def _worker_messages(chat: ChatRequest) -> list[dict[str, Any]]:
    """The conversation as the worker takes it: roles, and content as text and image parts."""
    out = []
    for message in chat.messages:
        content = message.content
        if content is None:
            content = ""
        parts: list[dict[str, Any]] = []
        for part in [TextPart(type="text", text=content)] if isinstance(content, str) else content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            else:
                parts.append({"type": "image"})
        role = "system" if message.role == "developer" else message.role
        out.append({"role": role, "content": parts})
    return out


def _image_budget(messages: list[dict[str, Any]], count: int) -> int:
    """The bytes each image may take, so the request fits in one NATS message."""
    room = services.MAX_REQUEST_BYTES - PAYLOAD_SLACK - len(orjson.dumps(messages))
    budget = room * 3 // 4 // count  # base64
    if budget < 8 * 1024:
        raise OpenAIError(
            413,
            "the conversation is too long to send with its images: shorten it, or send fewer",
            "messages",
            "request_too_large",
        )
    return budget


# --- images ----------------------------------------------------------------------------------


async def _image(
    ctx: Context, image: ImageUrl, where: str, budget: int, sees_held: bool = False
) -> str:
    """One image, resolved and shrunk for the model: base64 JPEG."""
    url = image.url
    param = f"{where}.url"
    scheme = url[:8].lower()  # URL schemes are case-insensitive
    if scheme.startswith("data:"):
        data: bytes | str = _data_url("data:" + url[5:], param)
    elif scheme.startswith(("http://", "https://")):
        data = await _fetched(ctx, url, param)
    elif url.startswith(DARKROOM_IMAGES):
        data = await _catalogued(ctx, url.removeprefix(DARKROOM_IMAGES), param, sees_held)
    else:
        raise OpenAIError(
            400,
            f"{url[:60]!r} is no image URL: send a data: URL (base64), an http(s) URL, or "
            "darkroom://images/<id>",
            param,
            "invalid_image_url",
        )
    limits = _limits(ctx)
    try:
        raw, cost = await ctx.run_interactive(_measured, data, limits)
        async with ctx.decode_budget.hold(cost):
            jpeg = await ctx.run_interactive(_shrunk, raw, limits, EDGES[image.detail], budget)
    except UploadRejectedError as exc:
        status, code = (413, "image_too_large") if exc.status == 413 else (400, "invalid_image")
        raise OpenAIError(status, f"{where}: {exc.reason}", param, code) from None
    return base64.b64encode(jpeg).decode()


def _limits(ctx: Context) -> Limits:
    ingest = ctx.settings.ingest
    return Limits(min(MAX_IMAGE_BYTES, ingest.max_bytes), ingest.max_pixels, ingest.max_frames)


def _data_url(url: str, param: str) -> str:
    """The base64 of a ``data:`` URL (decoded off the loop, with the image)."""
    header, comma, data = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise OpenAIError(
            400, "a data: URL must be data:<type>;base64,<data>", param, "invalid_image_url"
        )
    return data


async def _fetched(ctx: Context, url: str, param: str) -> bytes:
    fetch = ctx.settings.ingest.fetch
    if not fetch.enabled:
        raise OpenAIError(
            403,
            "this gateway does not fetch URLs: send the image as a data: URL or "
            "darkroom://images/<id>, or enable fetching ([ingest.fetch] enabled = true, "
            "with the hosts in allow_hosts)",
            param,
            "image_fetch_disabled",
        )
    limit = _limits(ctx).max_bytes
    try:
        async with fetch_image(url, fetch, limit) as fetched:
            return b"".join([chunk async for chunk in fetched.chunks])
    except FetchError as exc:
        status = 400 if exc.status == 422 else exc.status
        codes = {413: "image_too_large", 400: "invalid_image_url", 403: "invalid_image_url"}
        code = codes.get(status, "image_fetch_failed")  # the server failed, or too slow
        raise OpenAIError(status, exc.detail, param, code) from None


async def _catalogued(ctx: Context, image_id: str, param: str, sees_held: bool) -> bytes:
    """A catalogue image's display rendition, if the caller may see it: a pending image's
    only with an admin key, a rejected one's not at all."""
    if not subjects.is_safe_id(image_id):
        raise OpenAIError(
            400,
            f"{image_id[:80]!r} is no image id (1-64 characters of A-Z, a-z, 0-9, _ and -)",
            param,
            "invalid_image_url",
        )
    if ctx.db is not None:
        try:
            doc = await ctx.db.get(image_id)
        except Exception as exc:  # the catalogue is down: no way to tell what may be seen
            raise OpenAIError(503, f"the catalogue cannot be read: {exc}", param) from None
        approval = doc.get("approval") if doc is not None else None
        if doc is None or approval == "rejected":
            raise OpenAIError(404, f"no image {image_id}", param, "image_not_found")
        if approval not in SHOWN and not sees_held:
            raise OpenAIError(
                403,
                f"image {image_id} is {approval}: only an admin key may use it until it is "
                "approved",
                param,
                "image_not_allowed",
            )
    key = subjects.image_key(image_id, DISPLAY_RENDITION)
    try:
        return await ctx.store.get_bytes(key, max_bytes=_limits(ctx).max_bytes)
    except ObjectMissingError:
        raise OpenAIError(
            404, f"no image {image_id}, or it is not ingested yet", param, "image_not_found"
        ) from None
    except TooLargeError as exc:
        raise OpenAIError(
            413, f"the display rendition is {exc}", param, "image_too_large"
        ) from None


def _measured(data: bytes | str, limits: Limits) -> tuple[bytes, int]:
    """The image's bytes (base64 decoded), and what decoding it holds in memory at most;
    refuses what is too large (from the header) before any pixel is decoded."""
    if isinstance(data, str):
        if len(data) > math.ceil(limits.max_bytes / 3) * 4:
            raise UploadRejectedError(413, f"the image is over {limits.max_bytes:,} bytes")
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise UploadRejectedError(422, f"the data: URL is not valid base64 ({exc})") from None
    if len(data) > limits.max_bytes:
        raise UploadRejectedError(413, f"the image is over {limits.max_bytes:,} bytes")
    kind = check_head(data[:SNIFF_BYTES])
    try:
        with open_image(io.BytesIO(data), limits) as img:
            width, height = img.size
    except UploadRejectedError:
        raise
    except Exception:  # what check_file would say of it
        raise UploadRejectedError(
            422, f"corrupt or truncated {kind.name}: its header cannot be read"
        ) from None
    return data, width * height * 4


def _shrunk(data: bytes, limits: Limits, edge: int, budget: int) -> bytes:
    """The checked image, upright, RGB, at most ``edge`` px a side, as a JPEG of at most
    ``budget`` bytes (smaller sizes are tried until one fits)."""
    check_file(io.BytesIO(data), limits)
    with open_image(io.BytesIO(data), limits) as img:
        # Shrink first (a JPEG decodes at a reduced scale): every copy after this one is
        # small, so the decode holds about what the budget reserved for it.
        img.thumbnail((edge, edge))
        upright = ImageOps.exif_transpose(img) or img
        frame = upright.convert("RGB")
    for px in (step for step in SHRINK_STEPS if step <= edge):
        copy = frame.copy()
        copy.thumbnail((px, px))
        out = io.BytesIO()
        copy.save(out, "JPEG", quality=JPEG_QUALITY)
        if out.tell() <= budget:
            return out.getvalue()
    raise UploadRejectedError(
        413, f"even at {SHRINK_STEPS[-1]} px the image is over its share of the request"
    )


# --- the worker ------------------------------------------------------------------------------


async def _served(ctx: Context, timeouts: ChatTimeouts) -> dict[str, Any]:
    """What the caption worker serves: ``{"models": [...], "max_tokens": int}``."""
    try:
        served: dict[str, Any] = await services.request(
            ctx.nc,
            ctx.names.service(CHAT_SERVICE),
            {"op": "models"},
            timeouts.models_s,
            name=CHAT_SERVICE,
        )
    except ServiceError as exc:
        raise _from_service(exc) from None
    return served


# The request field a worker's refusal is about, by its code.
_PARAMS = {
    "model_not_found": "model",
    "context_length_exceeded": "messages",
    "invalid_image": "messages",
    "request_too_large": "messages",
}


def _error_detail(exc: ServiceError) -> ErrorDetail:
    return ErrorDetail(
        message=exc.message,
        type="server_error" if exc.status >= 500 else "invalid_request_error",
        param=_PARAMS.get(exc.code),
        code=exc.code,
    )


def _from_service(exc: ServiceError) -> OpenAIError:
    status = exc.status if 400 <= exc.status <= 599 else 502
    return OpenAIError(status, exc.message, _PARAMS.get(exc.code), exc.code)
