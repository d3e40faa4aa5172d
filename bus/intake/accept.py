"""Accepting an upload, whatever the entry point: check, dedupe, store, announce.

Every entry point (multipart, presigned PUT + complete, webhook, CLI) ends here:

1. the first bytes are sniffed, so a wrong type is refused before the body is read;
2. the body is spooled locally and hashed (memory stays flat), then checked completely
   (header limits, then a reduced decode that catches truncation and corruption);
3. the SHA-256 is claimed in the digests KV bucket: identical bytes get the image id they
   were first accepted as, and are not stored twice;
4. the original is stored under ``uploads/<id>/<safe-name>``, and only then is the
   ``uploaded`` event published. The upload is accepted once the event's PubAck is back.

A rejected upload stores nothing. A failure after the claim takes the claim and the object
back (a presigned upload keeps the client's object, so completing again can work), and the
client can simply retry. If the process dies between storing and announcing,
the claim stays "pending": the next upload of the same bytes (after PENDING_CLAIM_S)
announces the stored original instead of storing the bytes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import nats.js.errors
import orjson
import urllib3
from minio.error import MinioException

from bus.core import subjects
from bus.core.envelope import Event, ObjectRef, new_id, now_iso
from bus.images.check import (
    Checked,
    Limits,
    UploadRejectedError,
    check_file,
    check_head,
)
from bus.images.media import JPEG, SNIFF_BYTES, safe_name
from bus.infra.kv import CasConflictError, compare_and_set
from bus.infra.spool import HashingWriter, Spool, new_spool_file, receive
from bus.infra.store import ObjectMissingError, StoreBusyError, StoreError, TooLargeError
from bus.intake.gpsstrip import NotAJpegError, strip_jpeg_gps
from bus.runtime.context import Context

# A claim still "pending" this long after it was made belongs to an upload that crashed
# between claiming and announcing; a later upload of the same bytes may take it over.
PENDING_CLAIM_S = 600.0
ORIGINAL_NAME_CHARS = 500
PUBLISH_ATTEMPTS = 3
IN_FLIGHT_WAIT_S = 30.0  # how long a duplicate waits to see the first upload end
IN_FLIGHT_POLL_S = 0.05
MAX_TAKEOVERS = 5  # a stale claim changed under us this often: give up with a 503
T = TypeVar("T")

__all__ = ["Accepted", "UploadRejectedError", "accept_upload", "complete_presigned"]


@dataclass(frozen=True, slots=True)
class Accepted:
    image_id: str
    name: str
    size: int
    content_type: str
    sha256: str
    duplicate: bool = False


async def accept_upload(
    ctx: Context,
    chunks: AsyncIterator[bytes],
    filename: str | None,
    source: str,
    extra: dict[str, Any] | None = None,
) -> Accepted:
    """Check, store and announce one upload; raise :class:`UploadRejectedError`.

    ``extra`` is merged into the ``uploaded`` event's data (a webhook's origin, say).
    """
    limits = Limits.from_settings(ctx.settings.ingest)
    head = b""
    async for chunk in chunks:
        head += chunk
        if len(head) >= SNIFF_BYTES:
            break
    kind = check_head(head)
    try:
        spool = await receive(ctx.store, head, chunks, limits.max_bytes)
    except TooLargeError:
        raise UploadRejectedError(
            413, f"the file is larger than the limit of {limits.max_bytes:,} bytes"
        ) from None
    except StoreBusyError as exc:
        raise UploadRejectedError(503, str(exc)) from None
    try:
        checked = await ctx.run_interactive(check_file, spool.file, limits)
        extra = {**(extra or {}), **await _apply_gps_policy(ctx, spool, checked)}
        image_id = new_id()
        name = safe_name(filename, kind.extension)
        key = subjects.upload_key(image_id, name)
        held = await _claim(ctx, spool.sha256, image_id, key)
        if held is not None:
            if held.orphan is not None:
                await _announce(
                    ctx, held.image_id, held.orphan, checked, spool.sha256, filename, source, extra
                )
            return Accepted(
                held.image_id, name, spool.size, kind.mime, spool.sha256, duplicate=True
            )
        try:
            ref = await _store(ctx, key, spool, kind.mime)
            await _announce(ctx, image_id, ref, checked, spool.sha256, filename, source, extra)
        except BaseException:
            # Not accepted (or cancelled): nothing of it may stay, claim or object.
            await asyncio.shield(_take_back(ctx, spool.sha256, key, delete=True))
            raise
        return Accepted(image_id, name, spool.size, kind.mime, spool.sha256)
    finally:
        spool.close()


async def complete_presigned(ctx: Context, image_id: str, source: str = "presigned") -> Accepted:
    """Check an original a client PUT to ``incoming/<id>/``, then make it the image.

    The checked bytes are copied server-side to ``uploads/<id>/`` only if the incoming
    object still has the ETag that was checked, so a client that PUTs again meanwhile
    cannot swap in unchecked bytes; the incoming object is then deleted. Completing again
    answers the same id (200). A refused or duplicate object is deleted.
    """
    limits = Limits.from_settings(ctx.settings.ingest)
    incoming = await _store_call(ctx.store.list_keys(f"{subjects.INCOMING_PREFIX}{image_id}/"))
    if not incoming:
        return await _completed_before(ctx, image_id)
    source_key = incoming[0]
    name = source_key.rsplit("/", 1)[-1]
    key = subjects.upload_key(image_id, name)
    spool = Spool(new_spool_file(), 0, "")
    try:
        try:
            writer = HashingWriter(spool.file)
            spool.size, etag = await ctx.store.download_to(
                source_key, writer.write, limits.max_bytes
            )
        except TooLargeError:
            await _store_call(ctx.store.delete(source_key))
            raise UploadRejectedError(
                413, f"the file is larger than the limit of {limits.max_bytes:,} bytes"
            ) from None
        except ObjectMissingError:
            raise UploadRejectedError(409, f"the upload for {image_id} vanished") from None
        except _STORE_ERRORS as exc:
            raise _store_unavailable(exc) from None
        try:
            checked = await ctx.run_interactive(check_file, spool.file, limits)
        except UploadRejectedError:
            await _store_call(ctx.store.delete(source_key))
            raise
        spool.sha256 = writer.hexdigest()
        held = await _claim(ctx, spool.sha256, image_id, key)
        if held is not None and held.image_id != image_id:
            await _store_call(ctx.store.delete(source_key))
            if held.orphan is not None:
                await _announce(
                    ctx, held.image_id, held.orphan, checked, spool.sha256, name, source, None
                )
            return Accepted(
                held.image_id, name, spool.size, checked.kind.mime, spool.sha256, duplicate=True
            )
        try:
            extra = await _apply_gps_policy(ctx, spool, checked)
            if extra:  # the incoming original still has its location: store the stripped one
                ref = await _store(ctx, key, spool, checked.kind.mime)
            else:
                copied = await _store_call(
                    ctx.store.copy_if_unchanged(
                        source_key, key, etag, spool.size, checked.kind.mime
                    )
                )
                if copied is None:
                    raise UploadRejectedError(
                        409, "the file was replaced while it was being checked; complete again"
                    )
                ref = copied
            await _announce(ctx, image_id, ref, checked, spool.sha256, name, source, extra)
        except BaseException:
            # Our copy goes; the client's incoming object stays, so completing again works.
            await asyncio.shield(_take_back(ctx, spool.sha256, key, delete=True))
            raise
        with contextlib.suppress(Exception):  # done with it; a leftover is only garbage
            await ctx.store.delete(source_key)
        return Accepted(image_id, name, spool.size, checked.kind.mime, spool.sha256)
    finally:
        spool.close()


async def _completed_before(ctx: Context, image_id: str) -> Accepted:
    """``complete`` for an id whose incoming object is gone: done before, or never PUT."""
    done = await _store_call(ctx.store.list_keys(f"{subjects.UPLOADS_PREFIX}{image_id}/"))
    ref = await _store_call(ctx.store.stat(done[0])) if done else None
    if ref is None:
        raise UploadRejectedError(
            409, f"nothing was uploaded for {image_id} yet: PUT the file to the presigned URL first"
        )
    name = ref.key.rsplit("/", 1)[-1]
    return Accepted(image_id, name, ref.size, ref.content_type, "", duplicate=True)


async def _apply_gps_policy(ctx: Context, spool: Spool, checked: Checked) -> dict[str, Any]:
    """With ``original_gps = "strip"``, swap the spooled JPEG for one without its location.

    The SHA-256 stays that of the bytes the client sent, so a re-upload still dedupes.
    """
    if ctx.settings.ingest.original_gps != "strip" or checked.kind is not JPEG:
        return {}
    stripped = new_spool_file()

    def strip() -> bool:
        try:
            return strip_jpeg_gps(spool.file, stripped)
        except NotAJpegError:
            return False

    try:
        removed = await _store_call(ctx.store.run_transfer(strip))
    except BaseException:
        stripped.close()
        raise
    if not removed:
        stripped.close()
        return {}
    spool.file.close()
    spool.file, spool.size = stripped, stripped.tell()
    return {"gps_removed": True}


async def _store(ctx: Context, key: str, spool: Spool, mime: str) -> ObjectRef:
    return await _store_call(ctx.store.put_file(key, spool.file, spool.size, mime))


_STORE_ERRORS = (StoreError, MinioException, OSError, urllib3.exceptions.HTTPError)


def _store_unavailable(exc: BaseException) -> UploadRejectedError:
    if isinstance(exc, StoreBusyError):
        return UploadRejectedError(503, str(exc))
    return UploadRejectedError(503, f"the store is unavailable ({type(exc).__name__}); try again")


async def _store_call(call: Awaitable[T]) -> T:
    try:
        return await call
    except _STORE_ERRORS as exc:
        raise _store_unavailable(exc) from None


async def _announce(
    ctx: Context,
    image_id: str,
    ref: ObjectRef,
    checked: Checked,
    sha256: str,
    filename: str | None,
    source: str,
    extra: dict[str, Any] | None,
) -> None:
    event = Event(
        id=subjects.uploaded_event_id(image_id),
        type=subjects.UPLOADED,
        source=f"darkroom/{source}",
        time=now_iso(),
        subject=image_id,
        object=ref,
        image_id=image_id,
        data={
            **(extra or {}),
            "name": ref.key.rsplit("/", 1)[-1],
            "original_name": (filename or "")[:ORIGINAL_NAME_CHARS],
            "sha256": sha256,
            "source": source,
            "format": checked.kind.name,
            "width": checked.width,
            "height": checked.height,
            "frames": checked.frames,
        },
    )
    for attempt in range(1, PUBLISH_ATTEMPTS + 1):
        try:
            await ctx.js.publish(
                ctx.names.subject(subjects.UPLOADED),
                event.encode(),
                headers={"Nats-Msg-Id": event.id},
            )
            break
        except nats.errors.TimeoutError:
            # The event may have been stored all the same: asking again with the same id
            # is safe (JetStream drops the duplicate) and tells us for sure.
            if attempt == PUBLISH_ATTEMPTS:
                raise UploadRejectedError(
                    503, "the upload could not be announced (no answer from NATS); try again"
                ) from None
        except Exception as exc:
            raise UploadRejectedError(
                503, f"the upload could not be announced ({type(exc).__name__}); try again"
            ) from None
    with contextlib.suppress(Exception):  # the claim then reads "published"; harmless if not
        await ctx.digests.put(sha256, _claim_value(image_id, ref.key, "published"))


def _claim_value(image_id: str, key: str, state: str) -> bytes:
    return orjson.dumps({"image_id": image_id, "key": key, "state": state, "at": time.time()})


@dataclass(frozen=True, slots=True)
class _Held:
    """Who holds a digest already; ``orphan`` is set when its upload died after storing the
    original and before announcing it (the original is there, no event ever was)."""

    image_id: str
    orphan: ObjectRef | None = None


async def _claim(ctx: Context, sha256: str, image_id: str, key: str) -> _Held | None:
    """Claim ``sha256`` for ``image_id``; say who already holds it, if anyone.

    If another upload of the same bytes is still in flight, wait (up to IN_FLIGHT_WAIT_S)
    to see it end: announced, its id is the answer; failed, this upload takes its place.
    """
    mine = _claim_value(image_id, key, "pending")
    deadline = time.monotonic() + IN_FLIGHT_WAIT_S
    takeovers = 0
    try:
        while takeovers < MAX_TAKEOVERS:
            found = await compare_and_set(
                ctx.digests, sha256, lambda current: mine if current is None else None
            )
            if found.written:
                return None
            held = orjson.loads(found.value or b"{}")
            holder = str(held.get("image_id", ""))
            if holder == image_id or held.get("state") == "published":
                return _Held(holder)
            if time.time() - float(held.get("at", 0)) < PENDING_CLAIM_S:
                if time.monotonic() < deadline:
                    await asyncio.sleep(IN_FLIGHT_POLL_S)
                    continue
                return _Held(holder)  # still in flight: most likely it will succeed
            # A pending claim from an upload that died. If its original made it to the
            # store, these bytes are that image: announce it instead of storing them again.
            stored = await _store_call(ctx.store.stat(str(held.get("key", ""))))
            if stored is not None and subjects.is_safe_id(holder):
                return _Held(holder, orphan=stored)
            # Nothing was stored: take the claim over, if it is still that stale one.
            takeovers += 1
            taken = await compare_and_set(
                ctx.digests, sha256, partial(_take_over, stale=found.value, mine=mine)
            )
            if taken.written:
                return None
            # Someone else changed the stale claim first: decide again on what they wrote.
    except (nats.errors.Error, OSError) as exc:
        raise UploadRejectedError(
            503, f"the duplicate check is unavailable ({type(exc).__name__}); try again"
        ) from None
    except CasConflictError:
        pass
    raise UploadRejectedError(503, "the duplicate check kept conflicting; try again")


def _take_over(current: bytes | None, stale: bytes | None, mine: bytes) -> bytes | None:
    return mine if current is None or current == stale else None


async def _take_back(ctx: Context, sha256: str, key: str, delete: bool) -> None:
    """After a failed upload: drop our claim on ``sha256`` (only if it is still ours) and,
    with ``delete``, the object we stored (best effort: the caller is already failing)."""
    if delete:
        with contextlib.suppress(Exception):
            await ctx.store.delete(key)
    with contextlib.suppress(Exception):
        entry = await ctx.digests.get(sha256)
        if orjson.loads(entry.value or b"{}").get("key") == key:
            await ctx.digests.delete(sha256, last=entry.revision)
