"""Asking for a new caption, setting one by hand, and re-embedding after a model change.

Both publish a ``recaption`` event for the caption function and answer 202 at once: the
new document arrives as the image's next ``captioned`` event (the image document shows it;
its ``caption.request`` names the request id returned here). A manual caption still goes
through the caption function, which embeds it for search and keeps it marked as manual.

After the embed model changes, ``POST /api/models/reembed`` asks the caption workers for
their current model and queues a ``reembed`` request for every captioned image without a
vector from it; ``GET /api/models/embeddings`` shows how far each model has got. Search
keeps to the old vectors until the new model has caught up.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator

import nats.errors
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from bus.core import subjects
from bus.core.envelope import Event, new_id, now_iso
from bus.gateway.contract import NOT_BLANK
from bus.gateway.images import catalogue, get_image, image_doc, query_db
from bus.gateway.problems import Problem, json_response
from bus.gateway.routes import Link, Reply, Route
from bus.gateway.search import EmbeddingCoverage, query_embedding_model
from bus.gateway.state import CTX
from bus.infra.tasks import cancel_and_wait
from bus.runtime.context import Context
from bus.state.readmodel import ReadModel

log = logging.getLogger("darkroom.gateway")
_QUEUEING = web.AppKey("reembed_tasks", set)


async def background_tasks(app: web.Application) -> AsyncIterator[None]:
    """The app's background queueing; whatever still runs at shutdown is cancelled (the
    next POST resumes it)."""
    tasks: set[asyncio.Task[None]] = set()
    app[_QUEUEING] = tasks
    yield
    await cancel_and_wait(*tasks)


MAX_PROMPT_CHARS = 500
MAX_CAPTION_CHARS = 2000


class RecaptionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        pattern=NOT_BLANK,
        description="what to ask about the image instead of the detailed description, "
        "e.g. 'describe the lighting'",
    )
    model: str | None = Field(
        None,
        min_length=1,
        max_length=300,
        pattern=NOT_BLANK,
        description="another caption model for this once, one of the deployment's "
        "caption.alternatives; unset = the configured one",
    )


class ManualCaptionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    caption: str = Field(
        min_length=1, max_length=MAX_CAPTION_CHARS, pattern=NOT_BLANK, description="the caption"
    )


class CaptionRequested(BaseModel):
    request: str = Field(description="the request's id: the new caption document names it")
    image_id: str


async def recaption(request: web.Request, body: RecaptionBody) -> web.Response:
    settings = request.app[CTX].settings
    allowed = (settings.models.caption.source, *settings.caption.alternatives)
    if body.model is not None and body.model not in allowed:
        raise Problem(
            422,
            "Invalid request body",
            f"model: {body.model[:200]!r} is not a caption model of this deployment; use one "
            f"of: {', '.join(allowed)} (caption.alternatives lists the others)",
        )
    data: dict[str, object] = {"mode": "model", "prompt": body.prompt, "model": body.model}
    return await _request(request, data)


async def set_caption(request: web.Request, body: ManualCaptionBody) -> web.Response:
    return await _request(request, {"mode": "manual", "caption": body.caption.strip()})


async def _request(request: web.Request, data: dict[str, object]) -> web.Response:
    doc = await image_doc(request)  # 404 for an unknown image
    image_id = str(doc["id"])
    if doc.get("ingest") is None:
        raise Problem(409, "Conflict", f"image {image_id} is not ingested yet: nothing to caption")
    try:
        event_id = await _publish(request.app[CTX], image_id, data, f"recaption-{new_id()}")
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        raise Problem(503, "Service Unavailable", "the event bus did not answer in time") from None
    answer = CaptionRequested(request=event_id, image_id=image_id)
    return json_response(answer, status=202)


class ReembedQueued(BaseModel):
    model: str = Field(description="the caption workers' image embedding model now")
    queued: bool = Field(
        description="true: requests are being queued in the background for every captioned "
        "image without its vector (GET /api/models/embeddings shows the progress); false: "
        "a queueing for this model is running already"
    )


async def reembed(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    db = catalogue(request)
    model = await query_embedding_model(ctx)
    tasks = request.app[_QUEUEING]
    if any(task.get_name() == f"reembed:{model}" and not task.done() for task in tasks):
        return json_response(ReembedQueued(model=model, queued=False), status=202)
    task = asyncio.create_task(_queue_reembeds(ctx, db, model), name=f"reembed:{model}")
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return json_response(ReembedQueued(model=model, queued=True), status=202)


async def _queue_reembeds(ctx: Context, db: ReadModel, model: str) -> None:
    """Publish a ``reembed`` request per captioned image still without ``model``'s vector,
    a page at a time. Ids derive from the image and the model, so asking again while the
    last requests are in flight adds no duplicates (within the stream's duplicate window),
    and a stopped gateway's work resumes with the next POST."""
    digest = hashlib.sha256(model.encode()).hexdigest()[:16]
    after, queued = "", 0
    try:
        while True:
            page = await db.captioned_without("image", model, after)
            if not page:
                break
            for image_id in page:
                await _publish(ctx, image_id, {"mode": "reembed"}, f"reembed-{image_id}-{digest}")
            queued += len(page)
            after = page[-1]
        log.info("re-embedding with %s: %d image(s) queued", model, queued)
    except Exception:
        log.exception("queueing re-embeddings with %s stopped after %d image(s)", model, queued)


async def _publish(ctx: Context, image_id: str, data: dict[str, object], event_id: str) -> str:
    """Publish a ``recaption`` request (its id is also its Nats-Msg-Id); returns the id."""
    event = Event(
        id=event_id,
        type=subjects.RECAPTION,
        source="gateway",
        time=now_iso(),
        image_id=image_id,
        data=data,
    )
    subject = ctx.names.subject(subjects.RECAPTION)
    await ctx.js.publish(subject, event.encode(), headers={"Nats-Msg-Id": event.id})
    return event.id


async def embeddings(request: web.Request) -> web.Response:
    db = catalogue(request)
    coverage = await query_db(db.embedding_coverage)
    return json_response(EmbeddingCoverage.model_validate(coverage))


def routes() -> list[Route]:
    follow = {"image": Link(get_image, {"image_id": "$response.body#/image_id"})}
    answers: dict[int, Reply | str] = {
        202: Reply(
            "asked: the caption function writes the new caption; the image's caption.request "
            "names this request once it has",
            CaptionRequested,
            links=follow,
        ),
        404: "no such image",
        409: "the image is not ingested yet",
        503: "the event bus did not answer in time",
    }
    return [
        Route(
            "POST",
            "/api/images/{image_id}/caption",
            recaption,
            "upload",
            "Caption an image again (send {} for the defaults), optionally with a prompt or "
            "another caption model",
            "images",
            responses=answers,
        ),
        Route(
            "PUT",
            "/api/images/{image_id}/caption",
            set_caption,
            "upload",
            "Set an image's caption by hand: kept, marked as manual, and embedded for search",
            "images",
            responses=answers,
        ),
        Route(
            "POST",
            "/api/models/reembed",
            reembed,
            "admin",
            "After the embed model changed: re-embed every captioned image without its vector",
            "models",
            responses={
                202: Reply("queueing in the background", ReembedQueued),
                502: "the caption workers answered something unexpected",
                503: "no caption worker serves embeddings right now, or the database is down",
                504: "no caption worker answered in time",
            },
        ),
        Route(
            "GET",
            "/api/models/embeddings",
            embeddings,
            "read",
            "How many captioned images each embedding model has reached",
            "models",
            responses={
                200: Reply("per kind and model", EmbeddingCoverage),
                503: "the database is down",
            },
        ),
    ]
