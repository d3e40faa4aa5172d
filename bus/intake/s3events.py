"""MinIO bucket notifications (``Records`` payloads): a direct PUT into the bucket goes
through the same checks as any other upload.

Wire a MinIO bucket to NATS JetStream with subject ``<namespace>.s3`` (or set
``[functions.s3events] listens``) for objects created under ``incoming/``, the prefix the
presigned forms of ``POST /api/uploads/presign`` point at. Each created
``incoming/<id>/<name>`` is then completed exactly as ``POST /api/uploads/<id>/complete``
would: sniffed, checked, deduplicated, copied to ``uploads/`` and announced, so a browser
that POSTs straight to the bucket need not call ``complete`` at all (calling it as well is
harmless, and an id completed before is never announced again: what was POSTed for it
since is deleted). Nothing under ``uploads/`` is announced from a notification: only the
intake writes there.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_plus

import orjson

from bus.core import subjects
from bus.core.contract import Emit, Reject, Retry, Spec
from bus.core.envelope import Event, now_iso
from bus.intake.accept import UploadRejectedError, complete_presigned
from bus.runtime.call import Call
from bus.runtime.context import Context
from bus.runtime.registry import Function

SPEC = Spec(
    name="s3events",
    listens=(subjects.S3_EVENTS,),
    concurrency=8,
    ack_wait=10.0,
    max_deliver=5,
)


def created_uploads(records: Any, bucket: str) -> list[str]:
    """Image ids of the objects created under ``incoming/`` in ``bucket``, in order."""
    if not isinstance(records, list):
        raise Reject("'Records' must be a list")
    found: list[str] = []
    for record in records:
        if not isinstance(record, dict):
            continue
        s3, name = record.get("s3"), str(record.get("eventName", ""))
        if not isinstance(s3, dict) or not name.startswith("s3:ObjectCreated:"):
            continue
        obj, where = s3.get("object"), s3.get("bucket")
        if not isinstance(obj, dict) or not isinstance(where, dict):
            continue
        key = unquote_plus(str(obj.get("key", "")))
        image_id = subjects.image_id_from_key(key, subjects.INCOMING_PREFIX)
        if where.get("name") == bucket and image_id is not None and image_id not in found:
            found.append(image_id)
    return found


async def handle(event: Event, ctx: Context, call: Call) -> list[Emit]:
    refused: list[str] = []
    for image_id in created_uploads(event.data.get("Records"), ctx.store.bucket):
        try:
            accepted = await complete_presigned(ctx, image_id, source="s3-notification")
        except UploadRejectedError as exc:
            if exc.status >= 500:  # the store or NATS is unavailable: later, then
                raise Retry(f"{image_id}: {exc.reason}") from None
            if exc.status == 409:
                # Settled by someone else meanwhile (a `complete` call), or replaced by a
                # newer PUT, whose own notification follows.
                call.log.info("skipped %s: %s", image_id, exc.reason)
            else:
                refused.append(f"{image_id}: {exc.reason}")
            continue
        call.log.info(
            "accepted %s (%s)", accepted.image_id, "duplicate" if accepted.duplicate else "new"
        )
    if refused:
        # The refused objects are deleted; the dead letter keeps why, for the operator.
        raise Reject("refused direct upload(s): " + "; ".join(refused))
    return []


def decode_event(payload: bytes) -> Event | None:
    """Wrap a raw MinIO notification as an :class:`Event`; None if it is not one."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or "Records" not in doc:
        return None
    key = str(doc.get("Key", ""))
    return Event(
        id=f"s3-{key}-{doc.get('EventName', '')}"[:200],
        type=subjects.S3_EVENTS,
        source="minio",
        time=now_iso(),
        data={"Records": doc["Records"]},
    )


FUNCTION = Function(SPEC, handle=handle, decode_event=decode_event, intake=True)
