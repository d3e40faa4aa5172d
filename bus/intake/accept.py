"""Accepting an upload, whatever the entry point: check, dedupe, store, announce.

Every entry point (multipart, presigned POST + complete, webhook, CLI) ends here:

1. the first bytes are sniffed, so a wrong type is refused before the body is read;
2. the body is spooled locally and hashed (memory stays flat), then checked completely
   (header limits, then a reduced decode that catches truncation and corruption);
3. the SHA-256 is claimed in the digests KV bucket: identical bytes get the image id they
   were first accepted as, and are not stored twice;
4. a *staged* marker (``staged.<id>`` in the same bucket) records the original about to be
   stored under ``uploads/<id>/<safe-name>``; only then is it stored, and the ``uploaded``
   event published. The upload is accepted once the event's PubAck is back; the claim then
   reads "published" and the marker goes.

A rejected upload stores nothing. A failure after the claim takes the claim and the object
back at once (a presigned upload keeps the client's object, so completing again can work),
and the client can simply retry (503 answers say when). Whatever a crash, a NATS blip or a
stalled store leaves half-way keeps its staged marker, and the sweeper
(:mod:`bus.intake.sweep`) settles it once it is older than ``pending_claim_s``: announced
after all, the claim is marked "published"; never announced, the original and the claim
go. Re-uploading the same bytes meanwhile resolves a pending claim the same way instead of
waiting for it; announcing is never repeated for an image whose event or outputs exist,
whatever JetStream's duplicate window.

Every S3 call here goes through the store's interactive client (short timeouts), so a
stalled store makes an upload fail with a 503 within a bound instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import nats.js.errors
import orjson
import urllib3
from minio.error import MinioException
from nats.js.api import ConsumerConfig, DeliverPolicy

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

ORIGINAL_NAME_CHARS = 500
PUBLISH_ATTEMPTS = 3
IN_FLIGHT_WAIT_S = 30.0  # how long a duplicate waits to see the first upload end
IN_FLIGHT_POLL_S = 0.05
MAX_TAKEOVERS = 5  # a stale claim changed under us this often: give up with a 503
STAGED_PREFIX = "staged."  # digests-bucket keys of originals stored but not yet announced
CLOCK_SKEW_S = 60.0  # looking for an event, start this much before the claim was made
SCAN_IDLE_S = 5.0  # reading the stream, give up when no message comes for this long
T = TypeVar("T")

__all__ = [
    "Accepted",
    "Staged",
    "UploadRejectedError",
    "accept_upload",
    "announced",
    "complete_presigned",
    "release_claim",
    "settle_claim",
    "staged_originals",
    "unstage",
]


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
                await unstage(ctx, held.image_id)
            return Accepted(
                held.image_id, name, spool.size, kind.mime, spool.sha256, duplicate=True
            )
        try:
            await _stage(ctx, image_id, key, spool.sha256)
            ref = await _store(ctx, key, spool, kind.mime)
            await _announce(ctx, image_id, ref, checked, spool.sha256, filename, source, extra)
        except BaseException:
            # Not accepted (or cancelled): nothing of it may stay, claim or object.
            await asyncio.shield(_take_back(ctx, spool.sha256, image_id, key))
            raise
        await unstage(ctx, image_id)
        return Accepted(image_id, name, spool.size, kind.mime, spool.sha256)
    finally:
        spool.close()


async def complete_presigned(ctx: Context, image_id: str, source: str = "presigned") -> Accepted:
    """Check an original a client POSTed to ``incoming/<id>/``, then make it the image.

    The checked bytes are copied server-side to ``uploads/<id>/`` only if the incoming
    object still has the ETag that was checked, so a client that POSTs again meanwhile
    cannot swap in unchecked bytes; the incoming object is then deleted. Completing again
    answers the same id (200), and deletes whatever was POSTed for the id since: the
    presigned form stays valid until it expires, but it never makes a second image. A
    refused or duplicate object is deleted.
    """
    store = ctx.store.interactive
    limits = Limits.from_settings(ctx.settings.ingest)
    incoming = await _store_call(store.list_keys(f"{subjects.INCOMING_PREFIX}{image_id}/"))
    done = await _store_call(store.list_keys(f"{subjects.UPLOADS_PREFIX}{image_id}/"))
    if done:
        for leftover in incoming:
            await _store_call(store.delete(leftover))
        return await _completed_before(ctx, done[0])
    if not incoming:
        raise UploadRejectedError(
            409, f"nothing was uploaded for {image_id} yet: POST the file with the form first"
        )
    source_key = incoming[0]
    name = source_key.rsplit("/", 1)[-1]
    key = subjects.upload_key(image_id, name)
    spool = Spool(new_spool_file(), 0, "")
    try:
        try:
            writer = HashingWriter(spool.file)
            spool.size, etag = await store.download_to(source_key, writer.write, limits.max_bytes)
        except TooLargeError:
            await _store_call(store.delete(source_key))
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
            await _store_call(store.delete(source_key))
            raise
        spool.sha256 = writer.hexdigest()
        held = await _claim(ctx, spool.sha256, image_id, key)
        if held is not None and held.image_id != image_id:
            await _store_call(store.delete(source_key))
            if held.orphan is not None:
                await _announce(
                    ctx, held.image_id, held.orphan, checked, spool.sha256, name, source, None
                )
                await unstage(ctx, held.image_id)
            return Accepted(
                held.image_id, name, spool.size, checked.kind.mime, spool.sha256, duplicate=True
            )
        try:
            await _stage(ctx, image_id, key, spool.sha256)
            extra = await _apply_gps_policy(ctx, spool, checked)
            if extra:  # the incoming original still has its location: store the stripped one
                ref = await _store(ctx, key, spool, checked.kind.mime)
            else:
                copied = await _store_call(
                    store.copy_if_unchanged(source_key, key, etag, spool.size, checked.kind.mime)
                )
                if copied is None:
                    raise UploadRejectedError(
                        409, "the file was replaced while it was being checked; complete again"
                    )
                ref = copied
            await _announce(ctx, image_id, ref, checked, spool.sha256, name, source, extra)
        except BaseException:
            # Our copy goes; the client's incoming object stays, so completing again works.
            await asyncio.shield(_take_back(ctx, spool.sha256, image_id, key))
            raise
        await unstage(ctx, image_id)
        with contextlib.suppress(Exception):  # done with it; a leftover is only garbage
            await store.delete(source_key)
        return Accepted(image_id, name, spool.size, checked.kind.mime, spool.sha256)
    finally:
        spool.close()


async def _completed_before(ctx: Context, key: str) -> Accepted:
    """``complete`` for an id whose original is stored already: done before."""
    ref = await _store_call(ctx.store.interactive.stat(key))
    if ref is None:
        raise UploadRejectedError(409, f"the original {key} vanished; upload it again")
    image_id = key.split("/")[1]
    name = key.rsplit("/", 1)[-1]
    return Accepted(image_id, name, ref.size, ref.content_type, "", duplicate=True)


async def _apply_gps_policy(ctx: Context, spool: Spool, checked: Checked) -> dict[str, Any]:
    """With ``original_gps = "strip"``, swap the spooled JPEG for one without its location.

    The SHA-256 stays that of the bytes the client sent, so a re-upload still dedupes.
    """
    if ctx.settings.ingest.original_gps != "strip" or checked.kind is not JPEG:
        return {}
    stripped = new_spool_file()

    def strip() -> bool:
        return strip_jpeg_gps(spool.file, stripped)

    try:
        removed = await _store_call(ctx.store.interactive.run_transfer(strip))
    except NotAJpegError as exc:
        # Refused rather than stored with the location it was configured to drop.
        stripped.close()
        raise UploadRejectedError(
            422, f"the location cannot be removed from this JPEG: {exc}"
        ) from None
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
    return await _store_call(ctx.store.interactive.put_file(key, spool.file, spool.size, mime))


_STORE_ERRORS = (StoreError, MinioException, OSError, urllib3.exceptions.HTTPError)


def _store_unavailable(exc: BaseException) -> UploadRejectedError:
    if isinstance(exc, StoreBusyError):
        return UploadRejectedError(503, str(exc))
    reason = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc
    if isinstance(reason, urllib3.exceptions.TimeoutError):
        return UploadRejectedError(503, "the store did not answer in time; try again")
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

    A claim still pending is looked at first: announced after all (only its "published"
    mark was lost), it is settled and its id is the answer at once. Otherwise its upload is
    in flight: wait (up to IN_FLIGHT_WAIT_S) to see it end: announced, its id is the
    answer; failed, this upload takes its place. A claim pending for longer than
    ``pending_claim_s`` is abandoned: its stored original is announced as the image (once),
    or, stored nothing, the claim is taken over.
    """
    store = ctx.store.interactive
    mine = _claim_value(image_id, key, "pending")
    deadline = time.monotonic() + IN_FLIGHT_WAIT_S
    stale_after = ctx.settings.ingest.pending_claim_s
    looked_at: bytes | None = None
    stored: ObjectRef | None = None
    takeovers = 0
    try:
        while takeovers < MAX_TAKEOVERS:
            found = await compare_and_set(
                ctx.digests, sha256, lambda current: mine if current is None else None
            )
            if found.written:
                return None
            held = orjson.loads(found.value or b"{}")
            holder, at = str(held.get("image_id", "")), float(held.get("at", 0))
            if holder == image_id or held.get("state") == "published":
                return _Held(holder)
            if found.value != looked_at:
                looked_at = found.value
                held_key = str(held.get("key", ""))
                stored = await _store_call(store.stat(held_key)) if held_key else None
                if stored is not None and subjects.is_safe_id(holder):
                    if await _store_call(announced(ctx, [holder], at)):
                        await settle_claim(ctx, sha256, found.value, holder, stored.key)
                        return _Held(holder)
                else:
                    stored = None
            if time.time() - at < stale_after:
                if time.monotonic() < deadline:
                    await asyncio.sleep(IN_FLIGHT_POLL_S)
                    continue
                return _Held(holder)  # still in flight: most likely it will succeed
            takeovers += 1
            if stored is not None:
                # Died after storing, before announcing: these bytes are that image. Renew
                # the claim first (the sweeper leaves a renewed one alone), then announce.
                renewed = _claim_value(holder, stored.key, "pending")
                taken = await compare_and_set(
                    ctx.digests, sha256, partial(_take_over, stale=found.value, mine=renewed)
                )
                if taken.written:
                    return _Held(holder, orphan=stored)
                continue
            # Nothing was stored: take the claim over, if it is still that stale one.
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


async def settle_claim(
    ctx: Context, sha256: str, pending: bytes | None, image_id: str, key: str
) -> bool:
    """Mark a pending claim whose upload was announced "published", if it is still
    ``pending``; say whether it was."""
    published = _claim_value(image_id, key, "published")
    result = await compare_and_set(
        ctx.digests, sha256, lambda current: published if current == pending else None
    )
    return result.written


async def release_claim(ctx: Context, sha256: str, key: str, pending: bytes | None = None) -> bool:
    """Drop the claim on ``sha256`` if it is still the one for ``key`` (and still exactly
    ``pending``, when given); say whether it was dropped."""
    try:
        entry = await ctx.digests.get(sha256)
    except nats.js.errors.KeyNotFoundError:
        return False
    if pending is not None and entry.value != pending:
        return False
    if orjson.loads(entry.value or b"{}").get("key") != key:
        return False
    try:
        await ctx.digests.delete(sha256, last=entry.revision)
    except nats.js.errors.KeyWrongLastSequenceError:
        return False
    return True


async def _take_back(ctx: Context, sha256: str, image_id: str, key: str) -> None:
    """After a failed upload: drop our claim on ``sha256`` (only if it is still ours) at
    once, so a retry is not held up, then delete the object we may have stored. The staged
    marker goes only once the object is known gone: in an S3 stall the sweeper deletes it
    later (best effort throughout: the caller is already failing)."""
    with contextlib.suppress(Exception):
        await release_claim(ctx, sha256, key)
    try:
        await ctx.store.interactive.delete(key)
    except Exception:
        return
    await unstage(ctx, image_id)


# --- staged originals ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Staged:
    """An original stored (or about to be) and not announced yet, as its marker says."""

    image_id: str
    key: str
    sha256: str
    at: float  # when it was staged (epoch seconds)

    @classmethod
    def parse(cls, value: bytes) -> Staged | None:
        try:
            doc = orjson.loads(value)
            return cls(str(doc["image_id"]), str(doc["key"]), str(doc["sha256"]), float(doc["at"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


async def _stage(ctx: Context, image_id: str, key: str, sha256: str) -> None:
    doc = {"image_id": image_id, "key": key, "sha256": sha256, "at": time.time()}
    try:
        await ctx.digests.put(STAGED_PREFIX + image_id, orjson.dumps(doc))
    except Exception as exc:
        raise UploadRejectedError(
            503, f"the upload could not be recorded ({type(exc).__name__}); try again"
        ) from None


async def unstage(ctx: Context, image_id: str) -> None:
    """Drop an original's staged marker (best effort). The key is purged from the bucket's
    stream rather than deleted: a delete would leave a marker behind for every upload."""
    bucket = ctx.names.digests_kv
    with contextlib.suppress(Exception):
        await ctx.js.purge_stream(f"KV_{bucket}", subject=f"$KV.{bucket}.{STAGED_PREFIX}{image_id}")


async def staged_originals(ctx: Context) -> list[Staged]:
    """Every staged marker in the digests bucket (one per upload in flight or abandoned)."""
    watcher = await ctx.digests.watch(f"{STAGED_PREFIX}>", ignore_deletes=True)
    found: list[Staged] = []
    try:
        async for entry in watcher:
            if entry is None:  # the initial values are all read
                break
            staged = Staged.parse(entry.value or b"")
            if staged is not None:
                found.append(staged)
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return found


async def announced(ctx: Context, image_ids: Collection[str], since: float) -> set[str]:
    """Those of ``image_ids`` that were announced: their ``uploaded`` event is in the stream
    (looked for from ``since``, a time before any of them could be published), or ingest's
    outputs exist (the event may have aged out of the stream since).

    Raises:
        nats.errors.Error: the stream cannot be read.
    """
    by_event = {subjects.uploaded_event_id(i): i for i in image_ids}
    found = await _in_stream(ctx, by_event, since)
    for image_id in sorted(set(image_ids) - found):
        if await ctx.store.interactive.list_keys(f"{subjects.IMAGES_PREFIX}{image_id}/"):
            found.add(image_id)
    return found


async def _in_stream(ctx: Context, by_event: dict[str, str], since: float) -> set[str]:
    """Which ``uploaded`` events (by event id, which is their Nats-Msg-Id) were stored
    since ``since``: their headers are read in one pass, up to the stream's end."""
    start = datetime.fromtimestamp(since - CLOCK_SKEW_S, UTC)
    sub = await ctx.js.subscribe(
        ctx.names.subject(subjects.UPLOADED),
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.BY_START_TIME,
        headers_only=True,
        config=ConsumerConfig(opt_start_time=start),
    )
    found: set[str] = set()
    try:
        info = await sub.consumer_info()
        delivered = info.delivered.consumer_seq if info.delivered else 0
        if not (info.num_pending or 0) + (delivered or 0):
            return found
        while len(found) < len(by_event):
            msg = await sub.next_msg(timeout=SCAN_IDLE_S)
            image_id = by_event.get((msg.headers or {}).get("Nats-Msg-Id", ""))
            if image_id is not None:
                found.add(image_id)
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return found
