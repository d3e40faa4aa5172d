"""caption: describe an ingested image (colour tags now; the vision model plugs in here)."""

from __future__ import annotations

from bus import Call, Context, Emit, Event, Function, ObjectMissingError, Reject, Spec, subjects
from functions.caption.palette import colour_tags

SPEC = Spec(
    name="caption",
    listens=(subjects.INGESTED,),
    emits=(subjects.CAPTIONED,),
    concurrency=4,
    ack_wait=15.0,
    max_deliver=4,
)


async def handle(event: Event, ctx: Context, call: Call) -> list[Emit]:
    if not event.image_id or not subjects.is_safe_id(event.image_id):
        raise Reject("an ingested event needs a valid 'image_id'")
    doc_key = subjects.image_key(event.image_id, subjects.CAPTION_DOC)
    stored = await ctx.store.stat(doc_key)
    if stored is not None:
        return [Emit(subjects.CAPTIONED, stored, data=await ctx.store.get_json(doc_key))]
    thumb_key = (event.data.get("thumbnail") or {}).get("key")
    if not isinstance(thumb_key, str):
        raise Reject("the ingested event names no thumbnail")
    try:
        thumb = await ctx.store.get_bytes(thumb_key)
    except ObjectMissingError as exc:
        raise Reject(str(exc)) from None
    tags = await ctx.run_cpu(colour_tags, thumb)
    doc = {"caption": None, "tags": [f"color:{t}" for t in tags], "models": {"tags": "palette"}}
    stored = await ctx.store.put_json(doc_key, doc)
    return [Emit(subjects.CAPTIONED, stored, data=doc)]


FUNCTION = Function(SPEC, handle=handle)
