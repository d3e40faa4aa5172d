"""``darkroom reindex``: rebuild the read model from the store and the event stream.

The read model is a projection, so it can always be thrown away and made again:

1. It is emptied.
2. **The store** is read first, for images and jobs whose events have aged out of the
   stream (``stream.max_age_days``): each original under ``uploads/`` becomes an
   ``uploaded`` event (with the source, API key and SHA-256 its user metadata keeps),
   each ``images/<id>/ingest.json`` an ``ingested`` one (and, for a generated image, a
   ``generated`` one naming its original, lineage and job), each
   ``caption.json`` a ``captioned`` one, each ``requests/<job>.json`` a ``requested`` one.
   They are projected with stream sequence 0, older than any real event.
3. **The stream** is replayed from its first event, each one projected with its own
   sequence, so what the stream still holds overrides what the store suggested.

Notify may keep running meanwhile: the projection keeps the newest state per stage
whatever the order, and anything it writes after the truncation is either replayed here or
newer than the replay.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.js.api import DeliverPolicy
from tqdm import tqdm  # type: ignore[import-untyped]

from bus.core import subjects
from bus.core.envelope import EnvelopeError, Event, ObjectRef, decode
from bus.intake.accept import upload_facts
from bus.runtime.context import Context
from bus.state.readmodel import ReadModel, ReadModelError, format_time

STORE_CONCURRENCY = 16
PROJECTED_TOPICS = (
    subjects.UPLOADED,
    subjects.REQUESTED,
    subjects.GENERATED,
    subjects.INGESTED,
    subjects.CAPTIONED,
    f"{subjects.CANCELLED}.generate",  # a job's cancellation
    subjects.APPROVED,  # approval decisions, and images the rejection sweep deleted
    subjects.REJECTED,
    subjects.DELETED,
)
DECISION_TOPICS = {"approved": subjects.APPROVED, "rejected": subjects.REJECTED}
NOTIFY_FAILED = f"{subjects.FAILED}.notify"  # notify's own failures are not the image's


@dataclass
class ReindexSummary:
    images_in_store: int = 0
    store_objects: int = 0
    events: int = 0
    skipped: int = 0  # events that could not be projected (shown, not fatal)
    elapsed_s: float = 0.0

    def describe(self) -> str:
        return (
            f"reindexed {self.images_in_store} image(s): {self.store_objects} object(s) read "
            f"from the store, {self.events} event(s) replayed from the stream"
            + (f" ({self.skipped} skipped as unreadable)" if self.skipped else "")
            + f", in {self.elapsed_s:.1f} s"
        )


async def reindex(ctx: Context, progress: bool = True) -> ReindexSummary:
    """Empty the read model and rebuild it (see the module docstring)."""
    if ctx.db is None:
        raise RuntimeError("reindex needs a context opened with database=True")
    started = time.monotonic()
    summary = ReindexSummary()
    await ctx.db.truncate()
    await _from_store(ctx, ctx.db, summary, progress)
    await _from_stream(ctx, ctx.db, summary, progress)
    await ctx.db.approvals.record_policy(ctx.db.policy)  # every row judged by it now
    summary.elapsed_s = time.monotonic() - started
    return summary


def _bar(total: int, what: str, show: bool) -> tqdm:
    return tqdm(total=total, desc=what, unit=" obj", disable=not show, file=sys.stderr)


async def _from_store(ctx: Context, db: ReadModel, summary: ReindexSummary, show: bool) -> None:
    uploads = await ctx.store.list_modified(subjects.UPLOADS_PREFIX)
    derived = await ctx.store.list_modified(subjects.IMAGES_PREFIX)
    requests = {
        key: moment
        for key, moment in (await ctx.store.list_modified(subjects.REQUESTS_PREFIX)).items()
        if _request_job(key) is not None
    }
    docs = {
        key: moment
        for key, moment in derived.items()
        if key.rsplit("/", 1)[-1]
        in (subjects.INGEST_DOC, subjects.CAPTION_DOC, subjects.APPROVAL_DOC)
    }
    ids = {subjects.image_id_from_key(k, subjects.UPLOADS_PREFIX) for k in uploads}
    ids |= {subjects.image_id_from_key(k, subjects.IMAGES_PREFIX) for k in docs}
    ids.discard(None)
    summary.images_in_store = len(ids)
    with _bar(len(uploads) + len(docs) + len(requests), "store", show) as bar:

        async def original(key: str, moment: datetime) -> None:
            image_id = subjects.image_id_from_key(key, subjects.UPLOADS_PREFIX)
            ref, metadata = await asyncio.gather(ctx.store.stat(key), ctx.store.metadata(key))
            if image_id is not None and ref is not None:
                # What the upload said (the policy holds by source and key; the rejection
                # sweep releases the digest claim by the SHA-256), kept with the original.
                data = {**upload_facts(metadata or {}), "name": key.rsplit("/", 1)[-1]}
                await _project(db, _event(subjects.UPLOADED, image_id, moment, data, ref), 0)
            bar.update()

        async def document(key: str, moment: datetime) -> None:
            image_id = subjects.image_id_from_key(key, subjects.IMAGES_PREFIX)
            if image_id is not None:
                doc = await ctx.store.get_json(key)
                if isinstance(doc, dict):
                    for event in _events_for(key, image_id, moment, doc):
                        await _project(db, event, 0)
            bar.update()

        async def request(key: str, moment: datetime) -> None:
            job_id = _request_job(key)
            doc = await ctx.store.get_json(key)
            if job_id is not None and isinstance(doc, dict):
                event = _event(subjects.REQUESTED, None, moment, doc, job_id=job_id)
                await _project(db, event, 0)
            bar.update()

        jobs: list[Callable[[], Awaitable[None]]] = [
            *(_bind(original, k, m) for k, m in uploads.items()),
            *(_bind(document, k, m) for k, m in docs.items()),
            *(_bind(request, k, m) for k, m in requests.items()),
        ]
        await _run_bounded(jobs, STORE_CONCURRENCY)
    summary.store_objects = len(uploads) + len(docs) + len(requests)


def _request_job(key: str) -> str | None:
    """``requests/<job>.json`` gives ``<job>``; an init image beside it gives None."""
    name = key.removeprefix(subjects.REQUESTS_PREFIX).removesuffix(".json")
    if key != f"{subjects.REQUESTS_PREFIX}{name}.json" or not subjects.is_safe_id(name):
        return None
    return name


def _events_for(key: str, image_id: str, moment: datetime, doc: dict[str, Any]) -> list[Event]:
    if key.endswith("/" + subjects.CAPTION_DOC):
        return [_event(subjects.CAPTIONED, image_id, moment, doc)]
    if key.endswith("/" + subjects.APPROVAL_DOC):  # the newest decision, kept with the image
        topic = DECISION_TOPICS.get(str(doc.get("decision")))
        if topic is None:
            return []
        decided = {k: doc.get(k) for k in ("decision", "previous", "by", "reason")}
        event = _event(topic, image_id, moment, decided)
        if isinstance(doc.get("event"), str) and isinstance(doc.get("time"), str):
            event = dataclasses.replace(event, id=doc["event"], time=doc["time"])
        return [event]
    events = [_event(subjects.INGESTED, image_id, moment, doc)]
    original = doc.get("original")
    if isinstance(original, dict) and str(original.get("key", "")).startswith(
        subjects.GENERATED_PREFIX
    ):
        ref = ObjectRef(bucket="", key=str(original["key"]), size=int(original.get("bytes", 0)))
        data: dict[str, Any] = {"name": ref.key.rsplit("/", 1)[-1]}
        lineage = doc.get("lineage")
        job_id = None
        if isinstance(lineage, dict):
            data["lineage"] = lineage
            if isinstance(lineage.get("job_id"), str) and subjects.is_safe_id(lineage["job_id"]):
                job_id = lineage["job_id"]  # its output index is the end of its image id
        events.append(_event(subjects.GENERATED, image_id, moment, data, ref, job_id=job_id))
    return events


def _event(
    topic: str,
    image_id: str | None,
    moment: datetime,
    data: dict[str, Any],
    ref: ObjectRef | None = None,
    job_id: str | None = None,
) -> Event:
    about = image_id or job_id or ""
    return Event(
        id=f"reindex-{topic}-{about}",
        type=topic,
        source="darkroom/reindex",
        time=format_time(moment) or "",
        subject=about,
        object=ref,
        image_id=image_id,
        job_id=job_id,
        data=data,
    )


async def _from_stream(ctx: Context, db: ReadModel, summary: ReindexSummary, show: bool) -> None:
    sub = await ctx.js.subscribe(
        ctx.names.all_events, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        info = await sub.consumer_info()
        delivered = info.delivered.consumer_seq if info.delivered else 0
        total = (info.num_pending or 0) + (delivered or 0)
        with tqdm(total=total, desc="stream", unit=" ev", disable=not show, file=sys.stderr) as bar:
            seen = 0
            while seen < total:
                try:
                    msg = await sub.next_msg(timeout=30)
                except TimeoutError:
                    if (await sub.consumer_info()).num_pending == 0:
                        break  # the rest aged out of the stream while we replayed
                    continue
                seen += 1
                bar.update()
                try:
                    event = decode(msg.data)
                except EnvelopeError:
                    summary.skipped += 1
                    continue
                failure = event.type.startswith(subjects.FAILED + ".")
                if event.type in PROJECTED_TOPICS or (failure and event.type != NOTIFY_FAILED):
                    summary.events += 1
                    if not await _project(db, event, msg.metadata.sequence.stream):
                        summary.skipped += 1
    finally:
        await sub.unsubscribe()


async def _project(db: ReadModel, event: Event, seq: int) -> bool:
    """Project one event; an unreadable one is counted, not fatal (notify dead-lettered it)."""
    try:
        await db.project(event, seq)
    except ReadModelError:
        return False
    return True


def _bind(
    fn: Callable[[str, datetime], Awaitable[None]], key: str, moment: datetime
) -> Callable[[], Awaitable[None]]:
    return lambda: fn(key, moment)


async def _run_bounded(jobs: Iterable[Callable[[], Awaitable[None]]], limit: int) -> None:
    gate = asyncio.Semaphore(limit)

    async def run(job: Callable[[], Awaitable[None]]) -> None:
        async with gate:
            await job()

    await asyncio.gather(*(run(job) for job in jobs))
