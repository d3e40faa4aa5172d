"""Deleting an image for good (an admin's ``DELETE /api/images/{id}``).

It goes the way the rejection sweep ends an expired rejection
(:mod:`bus.gateway.rejections`), so the digest claim, the store and the read model agree:
the claim on its bytes is released first (the same bytes may then be uploaded afresh), then
its original and every object under ``images/<id>/`` and ``uploads/<id>/`` are deleted,
then ``deleted`` is published (one id per image, whoever deletes it), on which notify drops
its row. Each step is idempotent: a retry after a failure finishes the job.

An image still being processed (waiting for ingest, or for its caption) is refused with a
409: a stage finishing after the deletion would write its objects and row back.
"""

from __future__ import annotations

from collections.abc import Collection

from aiohttp import web
from pydantic import BaseModel, Field

from bus.core import subjects
from bus.core.envelope import Event, now_iso
from bus.gateway.access import caller
from bus.gateway.images import image_doc
from bus.gateway.problems import Problem, json_response
from bus.gateway.rejections import available, delete_image_objects, publish, release_image_claim
from bus.gateway.routes import Reply, Route
from bus.gateway.state import CTX, FUNCTIONS
from bus.state.approvals import Expired


class Deleted(BaseModel):
    image_id: str
    event: str = Field(description="the id of the 'deleted' event")
    claim_released: bool = Field(
        description="its bytes' digest claim was dropped: uploading them again makes a new image"
    )


def _processing(doc: dict[str, object], functions: Collection[str]) -> str | None:
    """The stage the image waits for, if a running function will still write to it."""
    status = doc.get("status")
    if status == "uploaded" and "ingest" in functions:
        return "ingest"
    if status == "ingested" and "caption" in functions:
        return "caption"
    return None


async def delete_image(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    doc = await image_doc(request)
    image_id = str(doc["id"])
    functions: list[str] = request.app[FUNCTIONS]
    waiting = _processing(doc, functions)
    if waiting is not None:
        raise Problem(
            409,
            "Conflict",
            f"image {image_id} is still being processed (waiting for {waiting}): delete it "
            "once it is ready or has failed",
        )
    original = doc.get("original")
    key = original.get("key") if isinstance(original, dict) else None
    sha256 = doc.get("sha256")
    image = Expired(
        image_id, key if isinstance(key, str) else None, sha256 if isinstance(sha256, str) else None
    )
    released = await available(release_image_claim(ctx, image))
    await available(delete_image_objects(ctx, image))
    who = await caller(request)
    event = Event(
        id=f"{subjects.DELETED}-{image_id}",
        type=subjects.DELETED,
        source="darkroom/gateway",
        time=now_iso(),
        subject=image_id,
        image_id=image_id,
        data={"reason": "deleted by request", "by": who.id},
    )
    await available(publish(ctx, event))
    answer = Deleted(image_id=image_id, event=event.id, claim_released=released)
    return json_response(answer, status=202)


def routes() -> list[Route]:
    return [
        Route(
            "DELETE",
            "/api/images/{image_id}",
            delete_image,
            "admin",
            "Delete an image for good: its original, renditions, caption and decision, and "
            "its catalogue entry (once notify has projected the 'deleted' event)",
            "images",
            responses={
                202: Reply(
                    "its objects are deleted and 'deleted' is published; the catalogue drops "
                    "it once notify has projected that",
                    Deleted,
                ),
                404: "no such image",
                409: "the image is still being processed",
                503: "the store, the event bus or the database did not answer in time",
            },
        ),
    ]
