"""What a rejection does to the store, what approving it again undoes, and the sweep that
ends it.

- **Rejecting** deletes the image's derived objects under ``images/<id>/`` (the display
  rendition, the thumbnails and ``ingest.json``), and keeps its original, its caption
  document and the decision (``approval.json``). The gateway refuses the original to every
  key but an admin's (:mod:`bus.gateway.access`).
- **Approving a rejected image** restores it: its ``uploaded`` (or ``generated``) event is
  published again, as it was (time, original, what the upload said) under a new id, so
  ingest makes the renditions again and caption announces its kept caption again.
- **The sweep** deletes what is left of images rejected more than
  ``approval.reject_keep_days`` ago: its digest claim first (so the same bytes can be
  uploaded afresh), then its original and every object under ``images/<id>/``, then it
  publishes ``deleted``, on which notify drops the image from the read model. It runs in
  every gateway, every ``approval.sweep_interval_s``; each step is idempotent (the claim is
  released by compare-and-set, ``deleted`` has one id per image), so several gateways agree.
  One sweep takes at most :data:`SWEEP_BATCH` images; the next takes the rest.

A rejection that lands while ingest is still working on the image may see renditions
written after it; they are shown to nobody (the image is rejected) and the sweep deletes
them with the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
import orjson
import urllib3
from aiohttp import web
from minio.error import MinioException

from bus.core import subjects
from bus.core.envelope import Event, ObjectRef, derive_id, now_iso
from bus.gateway.problems import Problem
from bus.gateway.state import CTX
from bus.infra.kv import CasConflictError
from bus.infra.store import ObjectMissingError, StoreError
from bus.infra.tasks import cancel_and_wait
from bus.intake.accept import release_claim
from bus.runtime.context import Context
from bus.state.approvals import Expired
from bus.state.readmodel import UPLOAD_KEYS

T = TypeVar("T")
SWEEP_BATCH = 1000
KEPT = frozenset({subjects.CAPTION_DOC, subjects.APPROVAL_DOC})  # what a rejection keeps
UNAVAILABLE = (
    nats.errors.Error,
    CasConflictError,
    StoreError,
    MinioException,
    OSError,
    urllib3.exceptions.HTTPError,
)


async def available(call: Awaitable[T], what: str = "the store or the event bus") -> T:
    """Await ``call``; an unreachable store or NATS becomes a 503 the client retries."""
    try:
        return await call
    except UNAVAILABLE as exc:
        raise Problem(
            503, "Service Unavailable", f"{what} did not answer ({type(exc).__name__}); try again"
        ) from None


async def publish(ctx: Context, event: Event) -> None:
    """Publish ``event`` on its topic (its id is its Nats-Msg-Id: a retry stores it once)."""
    subject = ctx.names.subject(event.type)
    await ctx.js.publish(subject, event.encode(), headers={"Nats-Msg-Id": event.id})


async def drop_renditions(ctx: Context, image_id: str) -> list[str]:
    """Delete what ingest derived from a rejected image; the keys deleted."""
    store = ctx.store.interactive
    keys = await store.list_keys(subjects.image_key(image_id, ""))
    dropped = [k for k in keys if k.rsplit("/", 1)[-1] not in KEPT]
    for key in dropped:
        await store.delete(key)
    return dropped


async def check_restorable(ctx: Context, doc: dict[str, Any]) -> None:
    """409 unless the original of the image of ``doc`` is still stored."""
    original = doc.get("original")
    key = original.get("key") if isinstance(original, dict) else None
    if not isinstance(key, str) or await available(ctx.store.interactive.stat(key)) is None:
        raise Problem(409, "Conflict", f"image {doc['id']}'s original is gone: nothing to restore")


def restore_event(doc: dict[str, Any], cause: str) -> Event:
    """The event that brings a rejected image back through ingest (see
    :func:`check_restorable`): its ``uploaded`` (or ``generated``) event as the read model
    keeps it, under a new id derived from the decision (``cause``)."""
    topic = subjects.GENERATED if doc["kind"] == "generated" else subjects.UPLOADED
    return Event(
        id=derive_id(cause, "restore", topic),
        type=topic,
        source="darkroom/gateway",
        time=doc["stages"].get(topic) or doc["created"],
        subject=doc["id"],
        object=ObjectRef.from_dict(doc["original"]),
        image_id=doc["id"],
        causation_id=cause,
        data={
            "name": doc["name"],
            **{k: doc[k] for k in UPLOAD_KEYS if k in doc},
            "restored": cause,
        },
    )


# --- the sweep ----------------------------------------------------------------------------


@dataclass(slots=True)
class RejectionSweep:
    """What one sweep did."""

    deleted: int = 0  # images whose objects are gone and whose ``deleted`` event is out
    claims_released: int = 0  # digest claims dropped: those bytes may be uploaded again

    def __bool__(self) -> bool:
        return bool(self.deleted or self.claims_released)


async def sweep_rejections(ctx: Context, now: float) -> RejectionSweep:
    """Delete the images rejected more than ``approval.reject_keep_days`` before ``now``
    (epoch seconds), at most :data:`SWEEP_BATCH` of them, the oldest first."""
    report = RejectionSweep()
    if ctx.db is None:
        return report
    keep_s = ctx.settings.approval.reject_keep_days * 86_400
    expired = await ctx.db.approvals.expired_rejections(
        datetime.fromtimestamp(now - keep_s, UTC), SWEEP_BATCH
    )
    for image in expired:
        if not await _still_rejected(ctx, image.image_id, now - keep_s):
            continue  # decided again since (the read model may not show it yet)
        if await release_image_claim(ctx, image):
            report.claims_released += 1
        await delete_image_objects(ctx, image)
        event = Event(
            id=f"{subjects.DELETED}-{image.image_id}",
            type=subjects.DELETED,
            source="darkroom/gateway",
            time=now_iso(),
            subject=image.image_id,
            image_id=image.image_id,
            data={
                "reason": f"rejected more than {ctx.settings.approval.reject_keep_days:g} "
                "day(s) ago",
                "by": "sweep",
            },
        )
        await publish(ctx, event)
        report.deleted += 1
    return report


async def _still_rejected(ctx: Context, image_id: str, cutoff: float) -> bool:
    """Whether the image's stored decision (written before its event, so newer than the
    read model) is still a rejection older than ``cutoff`` (epoch seconds)."""
    try:
        doc = await ctx.store.get_json(subjects.image_key(image_id, subjects.APPROVAL_DOC))
    except (ObjectMissingError, ValueError):
        return False
    if not isinstance(doc, dict) or doc.get("decision") != "rejected":
        return False
    try:
        decided = datetime.fromisoformat(str(doc.get("time")).replace("Z", "+00:00"))
    except ValueError:
        return False
    return decided.timestamp() < cutoff


async def release_image_claim(ctx: Context, image: Expired) -> bool:
    """Drop the digest claim of the image's bytes if it still names this image."""
    if not image.sha256:
        return False
    try:
        entry = await ctx.digests.get(image.sha256)
    except nats.js.errors.KeyNotFoundError:
        return False
    claim = orjson.loads(entry.value or b"{}")
    if not isinstance(claim, dict) or claim.get("image_id") != image.image_id:
        return False  # the bytes were uploaded again since, as another image
    return await release_claim(ctx, image.sha256, entry.value or b"")


async def delete_image_objects(ctx: Context, image: Expired) -> None:
    keys = set(await ctx.store.list_keys(subjects.image_key(image.image_id, "")))
    keys.update(await ctx.store.list_keys(f"{subjects.UPLOADS_PREFIX}{image.image_id}/"))
    if image.original:
        keys.add(image.original)
    for key in sorted(keys):
        await ctx.store.delete(key)


async def run_rejection_sweeper(ctx: Context) -> None:
    """Sweep now and every ``approval.sweep_interval_s`` until cancelled. A sweep that
    fails is logged and tried again at the next interval."""
    while True:
        try:
            report = await sweep_rejections(ctx, time.time())
        except asyncio.CancelledError:
            raise
        except Exception:
            ctx.log.warning("sweeping rejected images failed; trying again later", exc_info=True)
        else:
            if report:
                ctx.log.info("swept rejected images: %s", report)
        await asyncio.sleep(ctx.settings.approval.sweep_interval_s)


async def sweeper(app: web.Application) -> AsyncIterator[None]:
    """The gateway's rejection sweeper, for the app's lifetime (``cleanup_ctx``)."""
    task = asyncio.create_task(run_rejection_sweeper(app[CTX]), name="rejection-sweeper")
    yield
    await cancel_and_wait(task)
