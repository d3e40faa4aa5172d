"""Generation jobs over HTTP: submit, list, read (with live progress), cancel.

``POST /api/generations`` (and the webhook ``POST /api/hooks/generate``, and the
OpenAI-compatible routes) end in :func:`submit`: it checks the request with
:func:`bus.core.generation.check_request`, so a refusal lists every problem, each saying
what was expected and what came, and a refused request never reaches the queue. An image
mode's ``image`` must be a catalogue image with a display rendition (404 / 409); ``remix``
without a prompt takes the image's caption. A checked job is stored as
``requests/<job>.json``, announced as ``requested`` (the generate function's input), and
answered 202 with where to follow it.

The job documents come from the read model (:mod:`bus.state.generations`), with the live
progress this gateway hears merged in (:mod:`bus.gateway.live`).
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

import nats.errors
import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from bus.core import subjects
from bus.core.envelope import Event, new_id, now_iso
from bus.core.generation import (
    MAX_SEED,
    MIN_SIDE,
    SIDE_MULTIPLE,
    GenerationError,
    InitImage,
    Job,
    check_request,
)
from bus.core.settings import GENERATE_MODEL_NAME, GENERATE_MODES, SCHEDULERS
from bus.gateway.access import sees_held, sees_previews
from bus.gateway.contract import NOT_BLANK, SETTING_MAXIMUM, OneOf, Timestamp, is_json
from bus.gateway.images import MAX_LIMIT, catalogue, query_db
from bus.gateway.live import LIVE
from bus.gateway.problems import Problem, json_response
from bus.gateway.routes import Link, Reply, Route
from bus.gateway.state import CTX
from bus.infra.store import StoreError
from bus.runtime.context import Context
from bus.runtime.streams import keyed_subject
from bus.state.cancels import request_cancel
from bus.state.generations import FINISHED, GENERATION_STATUSES
from bus.state.readmodel import SHOWN as SHOWN_APPROVALS
from bus.state.readmodel import ReadModelError

SEED_RANGE = 2**32  # a seed drawn for a request that gives none
CANCEL_REASON = "cancelled by request"
SHOWN = 80  # characters of a refused name or value quoted back


class GenerationBody(BaseModel):
    """A generation request. A field left out (or null) takes the model's default."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(
        None,
        pattern=NOT_BLANK,
        description="what to draw (at most generate.max_prompt_chars); remix: the image's "
        "caption when left out",
    )
    negative_prompt: str | None = Field(
        None, description="what to keep out (models that use guidance)"
    )
    mode: Annotated[str, OneOf(*GENERATE_MODES)] | None = Field(
        None,
        description="txt2img (the default); img2img, remix, sketch and enhance start from 'image'",
    )
    image: str | None = Field(
        None,
        pattern=subjects.SAFE_ID_PATTERN,
        description="image modes: the catalogue image to start from (ingested)",
    )
    strength: float | None = Field(
        None, gt=0, le=1, description="image modes: how far from the image to go (0-1]"
    )
    model: str | None = Field(
        None,
        pattern=GENERATE_MODEL_NAME,
        description="a catalogue model (GET /api/models); unset: the default",
    )
    width: int | None = Field(
        None,
        ge=MIN_SIDE,
        multiple_of=SIDE_MULTIPLE,
        json_schema_extra={SETTING_MAXIMUM: "generate.max_side"},
        description="pixels (width x height at most generate.max_pixels)",
    )
    height: int | None = Field(
        None,
        ge=MIN_SIDE,
        multiple_of=SIDE_MULTIPLE,
        json_schema_extra={SETTING_MAXIMUM: "generate.max_side"},
    )
    steps: int | None = Field(None, ge=1, json_schema_extra={SETTING_MAXIMUM: "generate.max_steps"})
    guidance: float | None = Field(None, ge=0, le=30, description="classifier-free guidance")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="unset: drawn at random (the job records it)"
    )
    n: int | None = Field(
        None, ge=1, json_schema_extra={SETTING_MAXIMUM: "generate.max_n"}, description="images"
    )
    scheduler: Annotated[str, OneOf(*SCHEDULERS)] | None = Field(
        None, description="unset: the model's own"
    )


# What submit takes; "image" is its own argument (the routes read it from the body).
FIELDS = frozenset(GenerationBody.model_fields) - {"image"}


class GenerationAccepted(BaseModel):
    id: str = Field(description="the job id")
    status: Annotated[str, OneOf(*GENERATION_STATUSES)]
    links: dict[str, str] = Field(description="self: the job; events: its events")


class GenerationQueued(GenerationAccepted):
    request: dict[str, Any] = Field(description="the job as checked: every field, seed included")


class GenerationProgress(BaseModel):
    step: int
    total: int
    message: str
    time: Timestamp | None = None
    preview: str | None = Field(None, description="with ?preview=true: a small data: URL")


class GenerationOutput(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: int
    image_id: str | None = Field(description="the output in the catalogue (GET /api/images/...)")
    key: str | None = Field(description="the PNG in the store: generated/<job>/<index>.png")
    seed: int | None
    model: str | None
    timings: dict[str, Any] | None


class GenerationDoc(BaseModel):
    """One job: what was asked, where it stands, and what it made."""

    model_config = ConfigDict(extra="allow")
    id: str
    status: Annotated[str, OneOf(*GENERATION_STATUSES)]
    created: Timestamp
    updated: Timestamp
    finished_at: Timestamp | None
    model: str | None = Field(description="the catalogue model that ran (or was asked for)")
    n: int | None
    request: dict[str, Any] | None = Field(description="the checked job")
    parameters: dict[str, Any] | None = Field(
        None, description="the job as it ran, each default filled in from its model (once known)"
    )
    outputs: list[GenerationOutput] = Field(description="by index")
    error: str | None = Field(description="why it failed or was cancelled")
    timings: dict[str, Any] | None = Field(description="queue_s, load_s, inference_s")
    progress: GenerationProgress | None = Field(None, description="running: the newest step")


class GenerationPage(BaseModel):
    items: list[GenerationDoc]
    next_cursor: str | None = Field(description="the next page's cursor; null on the last page")


class GenerationsQuery(BaseModel):
    status: Annotated[str, OneOf(*GENERATION_STATUSES)] | None = Field(
        None, description="only jobs stored with this status (queued includes started ones)"
    )
    limit: int = Field(50, ge=1, le=MAX_LIMIT)
    cursor: str | None = Field(None, description="next_cursor from the previous page")


class GenerationQuery(BaseModel):
    preview: bool = Field(False, description="true: a running job's progress has its preview")


class InvalidGeneration(Problem):
    """A request :func:`submit` refuses (422): ``problems`` lists each one, in words."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(422, "Invalid generation request", "; ".join(problems), errors=problems)
        self.problems = problems


# --- submitting ------------------------------------------------------------------------------


async def submit(
    ctx: Context,
    values: dict[str, Any],
    *,
    image_id: str | None = None,
    init: InitImage | None = None,
    source: str = "api",
    extra: dict[str, Any] | None = None,
    job_id: str | None = None,
    sees_held: bool = False,
) -> Job:
    """Check a request, store it and queue it; the job as queued.

    ``values`` are the request's fields (:data:`FIELDS`; anything else is refused), absent
    or None for the model's defaults. An image mode starts from ``image_id`` (a catalogue
    image, looked up here) or ``init`` (an image the caller stored, e.g. under
    :func:`bus.core.subjects.request_image_key` of ``job_id``, which is then given).

    Raises :class:`InvalidGeneration` (422) listing every problem, :class:`Problem` 404
    for an unknown image, 409 for one not ingested yet (or, for a remix without a prompt,
    without a caption), and 503 when the store or the bus does not answer.
    """
    if image_id is not None and init is not None:
        raise ValueError("give an image id or an init image, not both")
    problems = [
        f"{str(name)[:SHOWN]} is not a field of this request"
        for name in values
        if name not in FIELDS
    ]
    values = {name: value for name, value in values.items() if name in FIELDS}
    if image_id is not None:
        if not isinstance(image_id, str) or not subjects.is_safe_id(image_id):
            problems.append(
                "image must be an image id (1-64 characters of A-Z, a-z, 0-9, _ and -), got "
                f"{_shown(image_id)}"
            )
        if problems:  # said already: the rest is checked as if the image were fine
            init = InitImage("", None)
        else:
            init = await _start_from(ctx, image_id, values, sees_held)
    job_id = job_id or new_id()
    try:
        job = check_request(
            values,
            ctx.settings.generate,
            job_id=job_id,
            created=now_iso(),
            seed=secrets.randbelow(SEED_RANGE),
            init=init,
            source=source,
            extra=extra,
        )
    except GenerationError as exc:
        problems += exc.problems
    if problems:
        raise InvalidGeneration(problems)
    await _queue(ctx, job)
    return job


async def _start_from(
    ctx: Context, image_id: str, values: dict[str, Any], sees_held: bool
) -> InitImage:
    """The init image of a catalogue image (404 unknown, 409 not ingested); a remix
    without a prompt gets the image's caption as its prompt (409 when it has none)."""
    db = ctx.db
    if db is None:
        raise Problem(503, "Service Unavailable", "this gateway has no read model configured")
    doc = await query_db(lambda: db.get(image_id))
    if doc is None:
        raise Problem(404, "Not Found", f"image: no image with id {image_id!r}")
    approval = doc.get("approval")
    if approval == "rejected":
        raise Problem(409, "Conflict", f"image {image_id} was rejected: nothing to start from")
    # Its pixels (and its caption, for a remix) are an admin's until it is approved.
    if approval not in SHOWN_APPROVALS and not sees_held:
        raise Problem(
            403,
            "Forbidden",
            f"image {image_id} is {approval}: only an admin key may generate from it until it "
            "is approved",
        )
    ingest = doc.get("ingest")
    renditions = ingest.get("renditions") if isinstance(ingest, dict) else None
    display = renditions.get("display") if isinstance(renditions, dict) else None
    if not isinstance(display, dict) or not isinstance(display.get("key"), str):
        raise Problem(
            409,
            "Conflict",
            f"image {image_id} is not ingested yet (status {doc.get('status')}): generate from "
            "it once it is",
        )
    prompt = values.get("prompt")
    if values.get("mode") == "remix" and (
        prompt is None or (isinstance(prompt, str) and not prompt.strip())
    ):
        caption = doc.get("caption")
        text = caption.get("caption") if isinstance(caption, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise Problem(409, "Conflict", f"image {image_id} has no caption yet: give a prompt")
        values["prompt"] = text
    return InitImage(display["key"], image_id)


async def _queue(ctx: Context, job: Job) -> None:
    """Store the job as ``requests/<job>.json`` and announce it as ``requested``."""
    doc = job.to_doc()
    try:
        ref = await ctx.store.put_json(subjects.request_key(job.id), doc)
    except StoreError as exc:
        raise Problem(
            503, "Service Unavailable", f"the store did not take the job: {exc}"
        ) from None
    event = Event(
        id=f"{subjects.REQUESTED}-{job.id}",
        type=subjects.REQUESTED,
        source="gateway",
        time=now_iso(),
        subject=job.id,
        object=ref,
        job_id=job.id,
        data=doc,
    )
    # A job naming a model goes on that model's subject, so that a worker holding the model
    # wins it (model affinity, functions/generate); one naming none runs on any worker's
    # default and goes on the plain subject.
    if job.model is None:
        subject = ctx.names.subject(subjects.REQUESTED)
    else:
        subject = keyed_subject(ctx.names, subjects.REQUESTED, job.model)
    try:
        await ctx.js.publish(subject, event.encode(), headers={"Nats-Msg-Id": event.id})
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        raise Problem(503, "Service Unavailable", "the event bus did not answer in time") from None


def links(job_id: str) -> dict[str, str]:
    return {"self": f"/api/generations/{job_id}", "events": f"/api/events?job={job_id}"}


# --- the handlers ----------------------------------------------------------------------------


async def create_generation(request: web.Request) -> web.Response:
    return await _create(request, "api")


async def generate_hook(request: web.Request) -> web.Response:
    return await _create(request, "hook")


async def _create(request: web.Request, source: str) -> web.Response:
    body = await _json_object(request)
    image = body.pop("image", None)
    held = await sees_held(request)
    job = await submit(request.app[CTX], body, image_id=image, source=source, sees_held=held)
    answer = GenerationQueued(id=job.id, status="queued", links=links(job.id), request=job.to_doc())
    response = json_response(answer, status=202)
    response.headers["Location"] = answer.links["self"]
    return response


async def _json_object(request: web.Request) -> dict[str, Any]:
    """The body, a JSON object (415 not JSON, 400 malformed, 413 over the app's limit,
    422 not an object)."""
    if not is_json(request.content_type):
        given = request.content_type if request.headers.get("Content-Type") else "no content type"
        raise Problem(
            415, "Unsupported Media Type", f"send the body as application/json, got {given}"
        )
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Problem(400, "Malformed JSON", f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidGeneration([f"the body must be a JSON object, got {_shown(body)}"])
    return body


async def list_generations(request: web.Request, query: GenerationsQuery) -> web.Response:
    db = catalogue(request)
    try:
        page = await query_db(
            lambda: db.generations.page(query.status, query.cursor or None, query.limit)
        )
    except ReadModelError as exc:
        raise Problem(400, "Bad query parameter", str(exc)) from None
    live = request.app[LIVE]
    items = [live.merge(doc) for doc in page.items]
    return json_response({"items": items, "next_cursor": page.next_cursor})


async def get_generation(request: web.Request, query: GenerationQuery) -> web.Response:
    preview = query.preview and await sees_previews(request)  # held outputs: admin keys only
    return json_response(await _job(request, preview))


async def cancel_generation(request: web.Request) -> web.Response:
    doc = await _job(request)
    job_id, status = doc["id"], doc["status"]
    if status in FINISHED:
        raise Problem(409, "Conflict", f"job {job_id} is {status} already: nothing to cancel")
    await request_cancel(request.app[CTX].cancels_kv, job_id, CANCEL_REASON)
    answer = GenerationAccepted(id=job_id, status=status, links=links(job_id))
    return json_response(answer, status=202)


async def _job(request: web.Request, preview: bool = False) -> dict[str, Any]:
    job_id = request.match_info["job_id"]
    doc = await request.app[LIVE].document(job_id, preview=preview)
    if doc is None:
        raise Problem(404, "Not Found", f"no generation job with id {job_id[:SHOWN]!r}")
    return doc


def _shown(value: Any) -> str:
    text = (
        orjson.dumps(value, default=str).decode(errors="replace") if value is not None else "null"
    )
    return text[:SHOWN] + ("..." if len(text) > SHOWN else "")


# --- the routes ------------------------------------------------------------------------------


def routes() -> list[Route]:
    follow = {
        "job": Link(get_generation, {"job_id": "$response.body#/id"}),
        "cancel": Link(cancel_generation, {"job_id": "$response.body#/id"}),
    }
    submitted: dict[int, Reply | str] = {
        202: Reply(
            "queued: follow it at links.self (also the Location header)",
            GenerationQueued,
            links=follow,
        ),
        400: "the body is not JSON",
        404: "image: no such image",
        409: "image: not ingested yet, or a remix without a prompt of an image without a "
        "caption yet",
        413: "the body is too large",
        415: "the body is not application/json",
        422: "the request cannot run: 'detail' says each problem (what was expected, what "
        "came), and 'errors' lists them",
        503: "the store or the event bus did not answer in time, or the database is down",
    }
    body = {"application/json": GenerationBody}
    return [
        Route(
            "POST",
            "/api/generations",
            create_generation,
            "generate",
            "Generate images from a prompt (txt2img), or from an image (img2img, remix, "
            "sketch, enhance)",
            "generations",
            body=body,
            responses=submitted,
        ),
        Route(
            "GET",
            "/api/generations",
            list_generations,
            "read",
            "Generation jobs, newest first",
            "generations",
            responses={
                200: Reply("one page", GenerationPage),
                400: "a query parameter is invalid (a cursor this API did not hand out)",
                503: "the database is down",
            },
        ),
        Route(
            "GET",
            "/api/generations/{job_id}",
            get_generation,
            "read",
            "One generation job: status (running with its step), outputs, timings, model",
            "generations",
            responses={
                200: Reply("the job", GenerationDoc),
                404: "no such job",
                503: "the database is down",
            },
        ),
        Route(
            "DELETE",
            "/api/generations/{job_id}",
            cancel_generation,
            "generate",
            "Cancel a job: a queued one never runs, a running one stops at its next step",
            "generations",
            responses={
                202: Reply("cancelling: the job ends as cancelled", GenerationAccepted),
                404: "no such job",
                409: "the job is done, failed or cancelled already",
                503: "the database is down",
            },
        ),
        Route(
            "POST",
            "/api/hooks/generate",
            generate_hook,
            "generate",
            "Webhook for integrations: a generation request, as POST /api/generations takes it",
            "generations",
            body=body,
            responses=submitted,
        ),
    ]
