"""Dead letters: list them, send them back to their function, and re-run a stage for one image.

The runner writes a record per event a function rejected or gave up on to the dead-letter
stream, on ``<ns>-dlq.<stage>`` (see ``FunctionRunner._dead_letter``). Listing reads them
through one ordered consumer filtered on the stage's subject: the server pushes them, with
no round trip per record.

A retry publishes the record's event again on its original subject, unchanged: the same
event id, so what the handler emits has the same derived ids as on the first try, and an
idempotent handler (a caption request, a job) knows it. Its Nats-Msg-Id is new, derived from
the record's sequence (``dlq-retry-<seq>``), since the stream would drop the original id as a
duplicate within its window; two retries of one record therefore store it once. The record
is then deleted, so it is not retried twice; if the event fails again, a new record is
written. Every consumer of that subject sees the event again, not only the stage that
dead-lettered it: handlers take redeliveries in their stride already.

A re-run starts a stage afresh for one image: ``caption`` asks for a new caption (a
``recaption`` event, mode model, as ``POST /api/images/{id}/caption`` does); ``ingest``
deletes ``images/<id>/ingest.json`` (ingest only announces an image again while it exists)
and publishes the image's ``uploaded`` (or ``generated``) event again under a new id, rebuilt
from the read model as a restore after a rejection does. The renditions are then derived
anew, and the image captioned again after them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import deque
from typing import Any, Literal

import nats.errors
import nats.js.errors
import orjson
from aiohttp import web
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy, RawStreamMsg
from pydantic import BaseModel, ConfigDict, Field

from bus.core import subjects
from bus.core.envelope import EnvelopeError, Event, decode, new_id, now_iso
from bus.gateway.images import get_image, image_doc
from bus.gateway.problems import Problem, json_response
from bus.gateway.rejections import available, check_restorable, publish, restore_event
from bus.gateway.routes import Link, Reply, Route
from bus.gateway.state import CTX
from bus.runtime.context import Context

log = logging.getLogger("darkroom.gateway")

MAX_DEAD_LETTERS = 200
MAX_RETRY_BATCH = 500
READ_TIMEOUT_S = 5.0  # the longest wait for the next record the server said it holds


class DeadLetter(BaseModel):
    model_config = ConfigDict(extra="allow")
    stage: str = Field(description="the function that gave up")
    reason: str
    dlq_seq: int = Field(description="its id: POST /api/dead-letters/{dlq_seq}/retry")


class DeadLetters(BaseModel):
    items: list[DeadLetter]


class DeadLettersQuery(BaseModel):
    stage: str | None = Field(None, pattern=subjects.SAFE_ID_PATTERN, description="only this one's")
    limit: int = Field(50, ge=1, le=MAX_DEAD_LETTERS)


class Retried(BaseModel):
    dlq_seq: int = Field(description="the dead letter, now deleted")
    stage: str
    event_id: str = Field(description="the event's id, the same as when it failed")
    subject: str = Field(description="where it was published again")
    stream_seq: int = Field(description="its new place in the event stream")


class BulkRetryQuery(BaseModel):
    stage: str = Field(pattern=subjects.SAFE_ID_PATTERN, description="the function's name")
    limit: int = Field(100, ge=1, le=MAX_RETRY_BATCH, description="the most to retry, oldest first")


class Skipped(BaseModel):
    dlq_seq: int
    reason: str = Field(description="why it cannot be retried (it stays a dead letter)")


class BulkRetried(BaseModel):
    stage: str
    retried: int = Field(description="published again, and their dead letters deleted")
    skipped: list[Skipped] = Field(description="records with no event to publish again")
    remaining: int = Field(description="this stage's dead letters left after this batch")


class RerunQuery(BaseModel):
    stage: Literal["ingest", "caption"] = Field(description="the stage to run again")


class Rerun(BaseModel):
    image_id: str
    stage: str
    event_id: str = Field(description="the event published for it")


class _Unretryable(Exception):
    """A record holds no event that can be published again."""


# --- reading ------------------------------------------------------------------------------
async def _scan(
    ctx: Context, stage: str | None, limit: int, *, newest: bool
) -> tuple[list[Msg], int]:
    """``limit`` records of ``stage`` (every stage's if None), the newest or the oldest, and
    how many it has in all, read through one ordered consumer filtered on its subject."""
    names = ctx.names
    subject = names.dead_letter(stage) if stage else names.all_dead_letters
    sub = await ctx.js.subscribe(
        subject,
        stream=names.dlq_stream,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    kept: deque[Msg] = deque(maxlen=limit if newest else None)
    try:
        # Stored when we asked: delivered to us already, or still to come.
        info = await sub.consumer_info()
        delivered = info.delivered.consumer_seq if info.delivered else None
        total = (info.num_pending or 0) + (delivered or 0)
        while total and (newest or len(kept) < limit):
            try:
                msg = await sub.next_msg(timeout=READ_TIMEOUT_S)
            except nats.errors.TimeoutError:  # the last ones were deleted while we read
                break
            kept.append(msg)
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return list(kept), total


def _record(data: bytes | None, subject: str | None, seq: int) -> dict[str, Any]:
    """A stored dead letter, with its sequence as ``dlq_seq`` (its id in the API)."""
    try:
        record = orjson.loads(data or b"{}")
    except orjson.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        record = {"stage": (subject or "").rsplit(".", 1)[-1], "reason": "unreadable record"}
    record["dlq_seq"] = seq
    return record


def _delivered(msg: Msg) -> dict[str, Any]:
    return _record(msg.data, msg.subject, msg.metadata.sequence.stream)


async def dead_letters(request: web.Request, query: DeadLettersQuery) -> web.Response:
    ctx = request.app[CTX]
    msgs, _ = await available(_scan(ctx, query.stage, query.limit, newest=True), "NATS")
    items = [_delivered(m) for m in reversed(msgs)]
    return json_response({"items": items})


# --- retrying -----------------------------------------------------------------------------
async def _retry(ctx: Context, record: dict[str, Any]) -> Retried:
    """Publish ``record``'s event again on its subject, then delete the record."""
    seq = int(record["dlq_seq"])
    event, subject = record.get("event"), record.get("subject")
    if not isinstance(event, dict):
        raise _Unretryable("the record holds no readable event (its payload was malformed)")
    if not isinstance(subject, str) or not subject.startswith(f"{ctx.names.namespace}."):
        raise _Unretryable(f"the record's subject {str(subject)[:80]!r} is not an event subject")
    try:
        decoded = decode(orjson.dumps(event))
    except EnvelopeError as exc:
        raise _Unretryable(f"the record's event is not valid: {exc}") from None
    ack = await ctx.js.publish(
        subject, decoded.encode(), headers={"Nats-Msg-Id": f"dlq-retry-{seq}"}
    )
    with contextlib.suppress(nats.js.errors.NotFoundError):  # another retry deleted it first
        await ctx.js.delete_msg(ctx.names.dlq_stream, seq)
    log.info("dead letter %d (%s) published again as %s", seq, record.get("stage"), decoded.id)
    return Retried(
        dlq_seq=seq,
        stage=str(record.get("stage", "")),
        event_id=decoded.id,
        subject=subject,
        stream_seq=ack.seq,
    )


async def _stored(ctx: Context, seq: int) -> RawStreamMsg | None:
    try:
        return await ctx.js.get_msg(ctx.names.dlq_stream, seq)
    except nats.js.errors.NotFoundError:
        return None


async def retry_one(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    given = request.match_info["seq"]
    seq = int(given) if given.isascii() and given.isdigit() and len(given) <= 19 else 0
    if seq < 1:
        raise Problem(404, "Not Found", f"no dead letter {given[:40]!r}: ids are numbers (dlq_seq)")
    msg = await available(_stored(ctx, seq), "NATS")
    if msg is None:
        raise Problem(
            404, "Not Found", f"no dead letter {seq}: retried already, expired, or never written"
        )
    record = _record(msg.data, msg.subject, seq)
    try:
        retried = await available(_retry(ctx, record), "NATS")
    except _Unretryable as exc:
        raise Problem(409, "Conflict", f"dead letter {seq} cannot be retried: {exc}") from None
    return json_response(retried)


async def retry_stage(request: web.Request, query: BulkRetryQuery) -> web.Response:
    ctx = request.app[CTX]
    msgs, total = await available(_scan(ctx, query.stage, query.limit, newest=False), "NATS")
    retried, skipped = 0, []
    for msg in msgs:
        record = _delivered(msg)
        try:
            await available(_retry(ctx, record), "NATS")
        except _Unretryable as exc:
            skipped.append(Skipped(dlq_seq=record["dlq_seq"], reason=str(exc)))
            continue
        retried += 1
    answer = BulkRetried(
        stage=query.stage, retried=retried, skipped=skipped, remaining=max(0, total - retried)
    )
    return json_response(answer)


# --- re-running a stage -------------------------------------------------------------------
async def rerun(request: web.Request, query: RerunQuery) -> web.Response:
    ctx = request.app[CTX]
    doc = await image_doc(request)  # 404 for an unknown image
    image_id = str(doc["id"])
    if doc.get("approval") == "rejected":
        raise Problem(409, "Conflict", f"image {image_id} is rejected: approve it to restore it")
    if query.stage == "ingest":
        event_id = await _rerun_ingest(ctx, doc)
    else:
        if doc.get("ingest") is None:
            raise Problem(409, "Conflict", f"image {image_id} is not ingested yet: rerun ingest")
        event = Event(
            id=f"recaption-{new_id()}",
            type=subjects.RECAPTION,
            source="darkroom/gateway",
            time=now_iso(),
            subject=image_id,
            image_id=image_id,
            data={"mode": "model", "prompt": None, "model": None},
        )
        await available(publish(ctx, event), "NATS")
        event_id = event.id
    answer = Rerun(image_id=image_id, stage=query.stage, event_id=event_id)
    return json_response(answer, status=202)


async def _rerun_ingest(ctx: Context, doc: dict[str, Any]) -> str:
    """Delete the image's ingest document, then announce its original again, new id."""
    await check_restorable(ctx, doc)  # 409 once the original is gone
    image_id = str(doc["id"])
    key = subjects.image_key(image_id, subjects.INGEST_DOC)
    await available(ctx.store.interactive.delete(key), "the store")
    cause = f"rerun-ingest-{new_id()}"
    restored = restore_event(doc, cause)
    data = {k: v for k, v in restored.data.items() if k != "restored"}
    event = dataclasses.replace(restored, data={**data, "rerun": cause})
    await available(publish(ctx, event), "NATS")
    return event.id


# --- routes -------------------------------------------------------------------------------
def routes() -> list[Route]:
    bus_down = "NATS did not answer in time"
    return [
        Route(
            "GET",
            "/api/dead-letters",
            dead_letters,
            "read",
            "Dead-letter records, newest first: what failed where, and why",
            "system",
            responses={200: Reply("dead letters, newest first", DeadLetters), 503: bus_down},
        ),
        Route(
            "POST",
            "/api/dead-letters/retry",
            retry_stage,
            "admin",
            "Publish a stage's dead-lettered events again, oldest first, up to limit; each "
            "retried record is deleted",
            "system",
            responses={
                200: Reply("what was retried, and what could not be", BulkRetried),
                400: "a query parameter is invalid",
                503: bus_down,
            },
        ),
        Route(
            "POST",
            "/api/dead-letters/{seq}/retry",
            retry_one,
            "admin",
            "Publish one dead-lettered event again on its subject (same event id), then "
            "delete its record",
            "system",
            responses={
                200: Reply("published again", Retried),
                404: "no such dead letter (retried already, or expired)",
                409: "the record holds no event to publish (its payload was malformed)",
                503: bus_down,
            },
        ),
        Route(
            "POST",
            "/api/images/{image_id}/rerun",
            rerun,
            "admin",
            "Run a stage again for one image: ingest (renditions derived anew, then a new "
            "caption) or caption",
            "images",
            responses={
                202: Reply(
                    "asked: the stage's function takes it",
                    Rerun,
                    links={"image": Link(get_image, {"image_id": "$response.body#/image_id"})},
                ),
                400: "a query parameter is invalid",
                404: "no such image",
                409: "the image is rejected, not ingested yet (caption), or its original is "
                "gone (ingest)",
                503: "the database, the store or NATS did not answer in time",
            },
        ),
    ]
