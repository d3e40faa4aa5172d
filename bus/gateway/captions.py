"""Asking for a new caption, or setting one by hand.

Both publish a ``recaption`` event for the caption function and answer 202 at once: the
new document arrives as the image's next ``captioned`` event (the image document shows it;
its ``caption.request`` names the request id returned here). A manual caption still goes
through the caption function, which embeds it for search and keeps it marked as manual.
"""

from __future__ import annotations

import nats.errors
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from bus.core import subjects
from bus.core.envelope import Event, new_id, now_iso
from bus.gateway.images import get_image, image_doc
from bus.gateway.problems import Problem, json_response
from bus.gateway.routes import Link, Reply, Route
from bus.gateway.state import CTX

MAX_PROMPT_CHARS = 500
MAX_CAPTION_CHARS = 2000


class RecaptionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        pattern=r"\S",
        description="what to ask about the image instead of the detailed description, "
        "e.g. 'describe the lighting'",
    )
    model: str | None = Field(
        None,
        min_length=1,
        max_length=300,
        pattern=r"\S",
        description="another caption model for this once, one of the deployment's "
        "caption.alternatives; unset = the configured one",
    )


class ManualCaptionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    caption: str = Field(
        min_length=1, max_length=MAX_CAPTION_CHARS, pattern=r"\S", description="the caption"
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
    ctx = request.app[CTX]
    event = Event(
        id=f"recaption-{new_id()}",
        type=subjects.RECAPTION,
        source="gateway",
        time=now_iso(),
        image_id=image_id,
        data=data,
    )
    try:
        await ctx.js.publish(
            ctx.names.subject(subjects.RECAPTION), event.encode(), headers={"Nats-Msg-Id": event.id}
        )
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        raise Problem(503, "Service Unavailable", "the event bus did not answer in time") from None
    answer = CaptionRequested(request=event.id, image_id=image_id)
    return json_response(answer, status=202)


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
    ]
