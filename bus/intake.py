"""Accepting an upload, whatever the entry point: sniff, stream to the store, announce.

The object is complete in the store before its ``uploaded`` event is published, and the
upload counts as accepted only after the event's PubAck: a crash before that leaves the
client with an error to retry, never an accepted upload that nothing will process.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote

from bus import subjects
from bus.context import Context
from bus.envelope import Event, new_id, now_iso
from bus.media import accepted_names, sniff
from bus.s3events import uploaded_event_id
from bus.store import TooLargeError

MAX_NAME_CHARS = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


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


def safe_name(name: str | None, extension: str) -> str:
    """A storage-safe file name: no directories, control characters or odd bytes."""
    base = unquote(name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    base = _UNSAFE.sub("_", base).strip("._")
    stem = base.rsplit(".", 1)[0] if "." in base else base
    stem = stem[: MAX_NAME_CHARS - len(extension) - 1] or "image"
    return f"{stem}.{extension}"


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
    await ctx.js.publish(
        ctx.names.subject(subjects.UPLOADED), event.encode(), headers={"Nats-Msg-Id": event.id}
    )
    return Accepted(image_id, name, stored.ref.size, kind.mime, stored.sha256)
