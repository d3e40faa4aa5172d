"""ingest: check an uploaded original and write its derived objects."""

from __future__ import annotations

from bus import subjects
from bus.context import Context
from bus.envelope import Event
from bus.function import Emit, Reject, Spec
from bus.store import ObjectMissingError, TooLargeError
from functions.ingest.imaging import THUMB_PX, BadImageError, probe

SPEC = Spec(
    name="ingest",
    listens=(subjects.UPLOADED,),
    emits=(subjects.INGESTED,),
    concurrency=4,
    ack_wait=60.0,
    max_deliver=5,
)

THUMB_NAME = f"thumb-{THUMB_PX}.webp"


async def handle(event: Event, ctx: Context) -> list[Emit]:
    if event.object is None or not event.image_id:
        raise Reject("an uploaded event needs 'object' and 'image_id'")
    if not subjects.is_safe_id(event.image_id):
        raise Reject(f"image_id {event.image_id[:80]!r} is not a valid id")
    doc_key = subjects.image_key(event.image_id, subjects.INGEST_DOC)
    stored = await ctx.store.stat(doc_key)
    if stored is not None:  # a replay: the work is done, only announce it again
        return [Emit(subjects.INGESTED, stored, data=await ctx.store.get_json(doc_key))]
    limit = ctx.settings.ingest.max_bytes
    try:
        original = await ctx.store.get_bytes(event.object.key, max_bytes=limit)
    except ObjectMissingError as exc:
        raise Reject(str(exc)) from None
    except TooLargeError as exc:
        raise Reject(f"the original is {exc}") from None
    try:
        probed = await ctx.run_cpu(probe, original)
    except BadImageError as exc:
        raise Reject(str(exc)) from None
    thumb = await ctx.store.put_bytes(
        subjects.image_key(event.image_id, THUMB_NAME), probed.thumbnail, "image/webp"
    )
    info = {**probed.info, "thumbnail": {**probed.info["thumbnail"], "key": thumb.key}}
    # The document goes last: its presence means every derived object is complete.
    stored = await ctx.store.put_json(doc_key, info)
    return [Emit(subjects.INGESTED, stored, data=info)]
