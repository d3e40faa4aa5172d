"""Approvals: the pending queue, and an admin's decisions on one image or many.

A decision is stored as ``images/<id>/approval.json`` (who: the key id; when; why; what it
replaced) and announced as an ``approved`` or ``rejected`` event, which notify projects
into the image's row, and which webhooks and the UI see (the audit trail is the stream).
The answer comes once the event is stored; the image's document shows the decision as soon
as notify has projected it. What a rejection does to the store, and how approving a
rejected image restores it, is in :mod:`bus.gateway.rejections`.

Decisions on one image take turns, whichever gateway takes them (an advisory lock per
image in PostgreSQL, :meth:`bus.state.approvals.Approvals.deciding`): each reads what it
replaces from the stored document and has its document and its event out before the next
starts, so the stored decision, the newest event and the projection (the newest event
wins) name the same one. A decision whose event the bus does not take is taken back from
the store before the 503, so that no reindex from the store revives it.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

import asyncpg
import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bus.core import subjects
from bus.core.envelope import Event, new_id, now_iso
from bus.gateway.access import caller
from bus.gateway.contract import NOT_BLANK, OneOf, Timestamp
from bus.gateway.images import ImageDoc, catalogue, get_image, image_doc, query_db
from bus.gateway.problems import Problem, json_response
from bus.gateway.rejections import (
    UNAVAILABLE,
    available,
    check_restorable,
    drop_renditions,
    publish,
    restore_event,
)
from bus.gateway.routes import Link, Reply, Route
from bus.gateway.state import CTX
from bus.infra.postgres import CONNECTION_ERRORS
from bus.infra.store import ObjectMissingError
from bus.runtime.context import Context
from bus.state.approvals import DECISIONS, MAX_REASON_CHARS
from bus.state.readmodel import ReadModelError

MAX_LIMIT = 500
MAX_BULK = 500
TOPICS = {decision: topic for topic, decision in DECISIONS.items()}  # approved -> its topic
ImageId = Annotated[str, Field(pattern=subjects.SAFE_ID_PATTERN)]
Reason = Annotated[str, Field(min_length=1, max_length=MAX_REASON_CHARS, pattern=NOT_BLANK)]


class QueueQuery(BaseModel):
    limit: int = Field(50, ge=1, le=MAX_LIMIT)
    cursor: str | None = Field(None, description="next_cursor from the previous page")


class ApprovalQueue(BaseModel):
    items: list[ImageDoc] = Field(description="pending images, the oldest upload first")
    next_cursor: str | None = Field(description="the next page's cursor; null on the last page")


class ApproveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Reason | None = Field(None, description="why: kept with the decision")


class RejectBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Reason = Field(description="why: kept with the decision")


class BulkBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    approve: list[ImageId] = Field(default_factory=list, max_length=MAX_BULK)
    reject: list[ImageId] = Field(default_factory=list, max_length=MAX_BULK)
    reason: Reason = Field(description="why, for every image named: kept with each decision")

    @model_validator(mode="after")
    def _check(self) -> BulkBody:
        both = sorted(set(self.approve) & set(self.reject))
        if both:
            raise ValueError(f"an image cannot be approved and rejected at once: {both[:10]}")
        return self


class DecisionResult(BaseModel):
    """A decision on one image, as recorded."""

    image_id: str
    decision: Annotated[str, OneOf("approved", "rejected")]
    previous: str = Field(description="the image's approval before it")
    changed: bool = Field(
        description="false: the image already had this decision (nothing was recorded; the "
        "earlier decision is shown)"
    )
    by: str | None = Field(description="the id of the API key that decided")
    reason: str | None
    time: Timestamp
    event: str = Field(description="the id of the decision's event")
    restored: bool = Field(
        description="approving a rejected image: its renditions are being made again"
    )


class BulkRefused(BaseModel):
    """An image a bulk decision could not decide, and why."""

    image_id: str
    status: int = Field(description="the status deciding it alone would have had")
    error: str


class BulkResults(BaseModel):
    results: list[DecisionResult | BulkRefused] = Field(
        description="one per image, approvals first, in the order given"
    )


async def approval_queue(request: web.Request, query: QueueQuery) -> web.Response:
    db = catalogue(request)
    try:
        page = await query_db(lambda: db.approvals.queue(query.cursor or None, query.limit))
    except ReadModelError as exc:
        raise Problem(400, "Bad query parameter", str(exc)) from None
    return json_response({"items": page.items, "next_cursor": page.next_cursor})


async def approve(request: web.Request, body: ApproveBody) -> web.Response:
    doc = await image_doc(request)
    key = await caller(request)
    return json_response(await decide(request.app[CTX], doc, "approved", body.reason, key.id))


async def reject(request: web.Request, body: RejectBody) -> web.Response:
    doc = await image_doc(request)
    key = await caller(request)
    return json_response(await decide(request.app[CTX], doc, "rejected", body.reason, key.id))


async def decide_many(request: web.Request, body: BulkBody) -> web.Response:
    ctx, db = request.app[CTX], catalogue(request)
    key = await caller(request)
    results: list[DecisionResult | BulkRefused] = []
    wanted = [(i, "approved") for i in dict.fromkeys(body.approve)]
    wanted += [(i, "rejected") for i in dict.fromkeys(body.reject)]
    for image_id, decision in wanted:
        try:
            doc = await query_db(partial(db.get, image_id))
            if doc is None:
                raise Problem(404, "Not Found", f"no image with id {image_id!r}")
            results.append(await decide(ctx, doc, decision, body.reason, key.id))
        except Problem as exc:
            results.append(BulkRefused(image_id=image_id, status=exc.status, error=exc.detail))
    status = 200 if all(isinstance(r, DecisionResult) for r in results) else 207
    return json_response(BulkResults(results=results), status=status)


async def decide(
    ctx: Context, doc: dict[str, Any], decision: str, reason: str | None, by: str
) -> DecisionResult:
    """Record ``decision`` on the image of ``doc`` (see the module): one decision on an
    image at a time, across gateways. Deciding what the image has already is not recorded
    again."""
    assert ctx.db is not None  # the handlers' catalogue() made sure
    image_id = str(doc["id"])
    try:
        async with ctx.db.approvals.deciding(image_id):
            return await _decide(ctx, doc, decision, reason, by)
    except asyncpg.LockNotAvailableError:
        raise Problem(
            503,
            "Service Unavailable",
            f"another decision on image {image_id} is still being recorded; try again",
        ) from None
    except CONNECTION_ERRORS as exc:
        raise Problem(
            503,
            "Service Unavailable",
            f"the catalogue database did not answer ({type(exc).__name__})",
        ) from None


async def _decide(
    ctx: Context, doc: dict[str, Any], decision: str, reason: str | None, by: str
) -> DecisionResult:
    """:func:`decide`, under the image's lock: the decision document (what it replaces is
    read from the stored one, which the read model may not show yet), then its event; then,
    rejecting, its renditions go, or, approving a rejected image, it is restored."""
    image_id = str(doc["id"])
    key = subjects.image_key(image_id, subjects.APPROVAL_DOC)
    store = ctx.store.interactive
    stored = await available(_stored(ctx, key))
    held = orjson.loads(stored) if stored is not None else None
    held = held if isinstance(held, dict) and held.get("decision") in TOPICS else None
    previous = str(held["decision"]) if held else str(doc["approval"])
    if previous == decision and held:
        if decision == "rejected":  # a retry after a failed drop: dropping is idempotent
            await available(drop_renditions(ctx, image_id))
        return DecisionResult(
            image_id=image_id,
            decision=decision,
            previous=previous,
            changed=False,
            by=held["by"],
            reason=held["reason"],
            time=held["time"],
            event=held["event"],
            restored=False,
        )
    restoring = previous == "rejected" and decision == "approved"
    if restoring:
        await check_restorable(ctx, doc)
    event_id = f"{decision}-{new_id()}"
    moment = now_iso()
    record = {
        "image_id": image_id,
        "decision": decision,
        "previous": previous,
        "by": by,
        "reason": reason,
        "time": moment,
        "event": event_id,
    }
    ref = await available(store.put_json(key, record))
    event = Event(
        id=event_id,
        type=TOPICS[decision],
        source="darkroom/gateway",
        time=moment,
        subject=image_id,
        object=ref,
        image_id=image_id,
        data={k: record[k] for k in ("decision", "previous", "by", "reason")},
    )
    await _announce(ctx, event, key, stored)
    if decision == "rejected":
        await available(drop_renditions(ctx, image_id))
    if restoring:
        await available(publish(ctx, restore_event(doc, event_id)))
    return DecisionResult(
        image_id=image_id,
        decision=decision,
        previous=previous,
        changed=True,
        by=by,
        reason=reason,
        time=moment,
        event=event_id,
        restored=restoring,
    )


async def _stored(ctx: Context, key: str) -> bytes | None:
    """The stored decision document's bytes; None when the image has none."""
    try:
        return await ctx.store.interactive.get_bytes(key)
    except ObjectMissingError:
        return None


async def _announce(ctx: Context, event: Event, key: str, replaced: bytes | None) -> None:
    """Publish the decision's event, a second time if the first failed (its id makes it
    stored once). If that fails too, the decision document goes back to what it replaced
    (``replaced``; None: it is deleted), so that nothing, not even a reindex from the store,
    acts on a decision the stream never got; then 503."""
    for attempt in (1, 2):
        try:
            await publish(ctx, event)
            return
        except UNAVAILABLE as exc:
            failure = exc
            if attempt == 1:
                ctx.log.warning("publishing %s failed (%r); trying once more", event.id, exc)
    store = ctx.store.interactive
    try:
        if replaced is None:
            await store.delete(key)
        else:
            await store.put_bytes(key, replaced, "application/json")
    except UNAVAILABLE:
        ctx.log.error(
            "the decision %s was not published, and the store did not take %s back: the "
            "store holds a decision the stream never got",
            event.id,
            key,
            exc_info=True,
        )
    raise Problem(
        503,
        "Service Unavailable",
        f"the event bus did not take the decision ({type(failure).__name__}): nothing was "
        "recorded; try again",
    )


def routes() -> list[Route]:
    follow = {"image": Link(get_image, {"image_id": "$response.body#/image_id"})}
    decided: dict[int, Reply | str] = {
        200: Reply(
            "recorded (the image's document shows it once notify has projected it), or "
            "the image had this decision already (changed: false)",
            DecisionResult,
            links=follow,
        ),
        404: "no such image",
        409: "approving a rejected image whose original is gone: nothing to restore",
        503: "the store or the event bus did not answer in time",
    }
    return [
        Route(
            "GET",
            "/api/approvals",
            approval_queue,
            "admin",
            "The pending images (waiting for a decision), the oldest upload first",
            "approvals",
            responses={
                200: Reply("one page", ApprovalQueue),
                400: "a query parameter is invalid",
                503: "the database is down",
            },
        ),
        Route(
            "POST",
            "/api/approvals",
            decide_many,
            "admin",
            "Approve and reject many images at once, for one reason",
            "approvals",
            responses={
                200: Reply("every image decided", BulkResults),
                207: Reply("some images decided (see results)", BulkResults),
                503: "the database is down",
            },
        ),
        Route(
            "POST",
            "/api/images/{image_id}/approve",
            approve,
            "admin",
            "Approve an image (send {} without a reason): shown to every key and in the "
            "carousel; a rejected one is restored",
            "approvals",
            responses=decided,
        ),
        Route(
            "POST",
            "/api/images/{image_id}/reject",
            reject,
            "admin",
            "Reject an image, with a reason: its renditions are deleted, its original kept "
            "for approval.reject_keep_days (approving it restores the image), then deleted",
            "approvals",
            responses=decided,
        ),
    ]
