"""Turns MinIO bucket notifications (``Records`` payloads) into ``uploaded`` events.

Wire a MinIO bucket to NATS JetStream with subject ``<namespace>.s3`` (or set
``[functions.s3events] listens``), and a browser PUT straight to the bucket under
``uploads/<id>/<name>`` fires the chain like a gateway upload. The event id is the same one
the gateway would use, so an upload reported both ways is processed once.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_plus

import orjson

from bus import subjects
from bus.context import Context
from bus.envelope import Event, ObjectRef, now_iso
from bus.function import Emit, Reject, Spec
from bus.media import safe_name

SPEC = Spec(
    name="s3events",
    listens=(subjects.S3_EVENTS,),
    emits=(subjects.UPLOADED,),
    concurrency=8,
    ack_wait=30.0,
    max_deliver=5,
)


def uploaded_event_id(image_id: str) -> str:
    return f"uploaded-{image_id}"


def records_to_emits(records: Any, bucket: str) -> list[Emit]:
    """``uploaded`` emits for the created objects under ``uploads/`` in ``bucket``."""
    if not isinstance(records, list):
        raise Reject("'Records' must be a list")
    emits = []
    for record in records:
        if not isinstance(record, dict):
            continue
        s3, name = record.get("s3"), str(record.get("eventName", ""))
        if not isinstance(s3, dict) or not name.startswith("s3:ObjectCreated:"):
            continue
        obj, where = s3.get("object"), s3.get("bucket")
        if not isinstance(obj, dict) or not isinstance(where, dict):
            continue
        record_bucket = where.get("name")
        key = unquote_plus(str(obj.get("key", "")))
        image_id = subjects.image_id_from_upload_key(key)
        if record_bucket != bucket or image_id is None:
            continue  # our own derived objects, or another bucket: not an upload
        size = obj.get("size", 0)
        ext = key.rsplit(".", 1)[-1].lower() if "." in key.rsplit("/", 1)[-1] else "bin"
        ref = ObjectRef(
            bucket=bucket,
            key=key,
            size=size if isinstance(size, int) and size >= 0 else 0,
            etag=str(obj.get("eTag", "")),
            content_type=str(obj.get("contentType") or "application/octet-stream"),
        )
        emits.append(
            Emit(
                subjects.UPLOADED,
                ref,
                data={"name": safe_name(key.rsplit("/", 1)[-1], ext), "source": "s3-notification"},
                image_id=image_id,
                event_id=uploaded_event_id(image_id),
            )
        )
    return emits


async def handle(event: Event, ctx: Context) -> list[Emit]:
    return records_to_emits(event.data.get("Records"), ctx.store.bucket)


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
