"""Accepting an upload, whatever the entry point: sniff, stream to the store, announce.

The object is complete in the store before its ``uploaded`` event is published, and the
upload counts as accepted only after the event's PubAck: a crash before that leaves the
client with an error to retry, never an accepted upload that nothing will process.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import urllib3

from bus import subjects
from bus.context import Context
from bus.envelope import Event, new_id, now_iso
from bus.media import accepted_names, safe_name, sniff
from bus.s3events import uploaded_event_id
from bus.store import StoreBusyError, StoreError, TooLargeError


class UploadRejectedError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Accepted:
    image_id: str
    name: str
    size: int
    content_type: str
    sha256: str


async def accept_upload(
    ctx: Context,
    chunks: AsyncIterator[bytes],
    filename: str | None,
    max_bytes: int,
    source: str,
) -> Accepted:
    """Store one upload and publish its ``uploaded`` event; raise UploadRejectedError."""
    head = b""
    async for chunk in chunks:
        head += chunk
        if len(head) >= 32:
            break
    if not head:
        raise UploadRejectedError(422, "the file is empty")
    kind = sniff(head)
    if kind is None:
        raise UploadRejectedError(
            415,
            f"not a supported image (content sniffed from its bytes); accepted: {accepted_names()}",
        )
    image_id = new_id()
    name = safe_name(filename, kind.extension)
    key = subjects.upload_key(image_id, name)

    async def everything() -> AsyncIterator[bytes]:
        yield head
        async for rest in chunks:
            yield rest

    try:
        stored = await ctx.store.put_stream(key, everything(), kind.mime, max_bytes)
    except TooLargeError:
        raise UploadRejectedError(
            413, f"the file is larger than the limit of {max_bytes:,} bytes"
        ) from None
    except StoreBusyError as exc:
        raise UploadRejectedError(503, str(exc)) from None
    except (StoreError, OSError, urllib3.exceptions.HTTPError) as exc:
        raise UploadRejectedError(
            503, f"the store is unavailable ({type(exc).__name__}); try again"
        ) from None
    event = Event(
        id=uploaded_event_id(image_id),
        type=subjects.UPLOADED,
        source=f"darkroom/{source}",
        time=now_iso(),
        subject=image_id,
        object=stored.ref,
        image_id=image_id,
        data={
            "name": name,
            "original_name": (filename or "")[:500],
            "sha256": stored.sha256,
            "source": source,
        },
    )
    try:
        await ctx.js.publish(
            ctx.names.subject(subjects.UPLOADED), event.encode(), headers={"Nats-Msg-Id": event.id}
        )
    except Exception as exc:
        # Not accepted: take the object back so nothing is stored for a failed upload.
        with contextlib.suppress(Exception):
            await ctx.store.delete(key)
        raise UploadRejectedError(
            503, f"the upload could not be announced ({type(exc).__name__}); try again"
        ) from None
    return Accepted(image_id, name, stored.ref.size, kind.mime, stored.sha256)
