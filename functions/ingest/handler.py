"""ingest: normalise an original (an upload, or a generated image) and write its renditions.

Outputs, all under ``images/<id>/``: ``display.webp`` and ``thumb-<px>.webp`` (sRGB, upright,
no EXIF so no GPS), then ``ingest.json`` (dimensions, blurhash, perceptual hash, EXIF
summary, lineage). The document is written last: its presence means every rendition is
complete, so a replay that finds it only announces the result again.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from bus import (
    Call,
    Context,
    Emit,
    Event,
    Function,
    ObjectMissingError,
    Reject,
    Spec,
    TooLargeError,
    subjects,
)
from functions.ingest.imaging import BadImageError, Options, decode_cost, derive

SPEC = Spec(
    name="ingest",
    listens=(subjects.UPLOADED, subjects.GENERATED),
    emits=(subjects.INGESTED,),
    concurrency=4,
    ack_wait=10.0,
    max_deliver=5,
    cancellable=False,  # a cancelled job's outputs are processed like any image
)
# A generated image's prompts travel in its lineage: room for two of generate.max_prompt_chars
# (at most 4000 characters of up to 4 bytes each) and the rest.
MAX_LINEAGE_BYTES = 64 * 1024


async def handle(event: Event, ctx: Context, call: Call) -> list[Emit]:
    if event.object is None or not event.image_id:
        raise Reject(f"a {event.type} event needs 'object' and 'image_id'")
    if not subjects.is_safe_id(event.image_id):
        raise Reject(f"image_id {event.image_id[:80]!r} is not a valid id")
    doc_key = subjects.image_key(event.image_id, subjects.INGEST_DOC)
    stored = await ctx.store.stat(doc_key)
    if stored is not None:  # a replay: the work is done, only announce it again
        return [Emit(subjects.INGESTED, stored, data=await ctx.store.get_json(doc_key))]
    lineage = _lineage(event)
    options = Options.from_settings(ctx.settings.ingest)
    try:
        original = await ctx.store.get_bytes(event.object.key, max_bytes=options.limits.max_bytes)
    except ObjectMissingError as exc:
        raise Reject(str(exc)) from None
    except TooLargeError as exc:
        raise Reject(f"the original is {exc}") from None
    try:
        # Concurrent decodes share the process's memory: each waits for its share.
        cost = await ctx.run_cpu(decode_cost, original, options)
        async with ctx.decode_budget.hold(cost):
            derived = await ctx.run_cpu(derive, original, options)
    except BadImageError as exc:
        raise Reject(str(exc)) from None
    refs = await asyncio.gather(
        *(
            ctx.store.put_bytes(
                subjects.image_key(event.image_id, r.filename), r.data, "image/webp"
            )
            for r in derived.renditions
        )
    )
    renditions = {
        r.name: {"key": ref.key, "width": r.width, "height": r.height, "bytes": ref.size}
        for r, ref in zip(derived.renditions, refs, strict=True)
    }
    smallest = derived.renditions[-1]
    info = {
        **derived.info,
        "image_id": event.image_id,
        "original": {"key": event.object.key, "bytes": len(original)},
        "renditions": renditions,
        "thumbnail": renditions[smallest.name],  # the one the gallery and caption use
        **({"lineage": lineage} if lineage else {}),
    }
    stored = await ctx.store.put_json(doc_key, info)
    return [Emit(subjects.INGESTED, stored, data=info)]


FUNCTION = Function(SPEC, handle=handle)


def _lineage(event: Event) -> dict[str, Any] | None:
    """Where a generated image came from (job, parent image, prompt...), kept verbatim."""
    lineage = event.data.get("lineage")
    if lineage is None:
        return None
    if not isinstance(lineage, dict):
        raise Reject("'lineage' must be an object")
    if len(orjson.dumps(lineage)) > MAX_LINEAGE_BYTES:
        raise Reject(f"'lineage' is over {MAX_LINEAGE_BYTES:,} bytes")
    return lineage
