"""Accepting an upload, whatever the entry point: check, dedupe, store, announce.

Every entry point (multipart, presigned POST + complete, webhook, CLI) ends here:

1. the first bytes are sniffed, so a wrong type is refused before the body is read;
2. the body is spooled locally and hashed (memory stays flat), then checked completely
   (header limits, then a reduced decode that catches truncation and corruption);
3. the SHA-256 is claimed in the digests KV bucket: identical bytes get the image id they
   were first accepted as, and are not stored twice;
4. a *staged* marker (``staged.<id>`` in the same bucket) records the original about to be
   stored under ``uploads/<id>/<safe-name>``; only then is it stored (with its source, API
   key and SHA-256 as user metadata, which a reindex reads once the event has aged out of
   the stream), and the ``uploaded`` event published. The upload is accepted once the
   event's PubAck is back; the claim then reads "published" and the marker goes.

A rejected upload stores nothing. A failure after the claim takes back exactly what that
call made, at once: its own pending claim, and the object it stored (a presigned upload
keeps the client's object, so completing again can work); the client can simply retry (503
answers say when). Whatever a crash, a NATS blip or a slow or stalled store leaves
half-way (a write that got no answer may still land) keeps its staged marker, and the
sweeper (:mod:`bus.intake.sweep`) settles it once it is older than ``pending_claim_s``:
announced after all, the claim is marked "published"; never announced, the original and
the claim go. Re-uploading the same bytes meanwhile resolves a pending claim the same way
instead of waiting for it, and completing an id again resolves its marker (only an
announced original is answered as done); announcing is never repeated for an image whose
event or outputs exist, whatever JetStream's duplicate window. A claim only ever changes
by compare-and-set from the value its writer read, so a sweeper, uploads of the same bytes
and completes of the same id never undo each other's work.

Every S3 call here goes through the store's interactive client (short timeouts), so a
stalled store makes an upload fail with a 503 within a bound instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator, Awaitable, Collection, Mapping
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
UPLOAD_FACTS = ("source", "key", "sha256")  # kept with the original as S3 user metadata
FACT_PREFIX = "darkroom-"  # their metadata names: darkroom-source, darkroom-key, ...
T = TypeVar("T")

__all__ = [
    "Accepted",
    "Outcome",
    "Staged",
    "UploadRejectedError",
    "accept_upload",
    "announced",
    "complete_presigned",
    "release_claim",
    "resolve_staged",
    "settle_claim",
    "staged_originals",
    "unstage",
    "upload_facts",
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
        upload = _Upload(checked, spool.sha256, filename, source, extra)
        image_id = new_id()
        name = safe_name(filename, kind.extension)
        key = subjects.upload_key(image_id, name)
        claim = await _claim(ctx, spool.sha256, image_id, key)
        if isinstance(claim, _Held):
            await _adopt_orphan(ctx, claim, upload)
            return Accepted(
                claim.image_id, name, spool.size, kind.mime, spool.sha256, duplicate=True
            )
        attempt = _Attempt(ctx, spool.sha256, image_id, key, claim)
        try:
            await _stage(ctx, image_id, key, spool.sha256)
            ref = await attempt.write(
                ctx.store.interactive.put_file(
                    key, spool.file, spool.size, kind.mime, metadata=upload.metadata()
                )
            )
            await _announce(ctx, upload, image_id, ref, claim)
        except BaseException:
            # Not accepted (or cancelled): nothing of it may stay, claim or object.
            await asyncio.shield(attempt.take_back())
            raise
        return Accepted(image_id, name, spool.size, kind.mime, spool.sha256)
    finally:
        spool.close()


async def complete_presigned(
    ctx: Context, image_id: str, source: str = "presigned", extra: dict[str, Any] | None = None
) -> Accepted:
    """Check an original a client POSTed to ``incoming/<id>/``, then make it the image.

    The checked bytes are copied server-side to ``uploads/<id>/`` only if the incoming
    object still has the ETag that was checked, so a client that POSTs again meanwhile
    cannot swap in unchecked bytes; the incoming object is then deleted. Completing again
    answers the same id (200) once it was announced, and deletes whatever was POSTed for
    the id since: the presigned form stays valid until it expires, but it never makes a
    second image. While another call is completing the id (or one that died doing so is
    not stale yet), the answer is a 503 to retry. A refused or duplicate object is deleted.
    """
    store = ctx.store.interactive
    limits = Limits.from_settings(ctx.settings.ingest)
    incoming = await _store_call(store.list_keys(f"{subjects.INCOMING_PREFIX}{image_id}/"))
    done = await _store_call(store.list_keys(f"{subjects.UPLOADS_PREFIX}{image_id}/"))
    before, late_writes = await _look_back(ctx, image_id, done, incoming)
    if before is not None:
        return before
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
        mime = checked.kind.mime
        claim = await _claim(ctx, spool.sha256, image_id, key)
        if isinstance(claim, _Held):
            if claim.in_flight and claim.image_id == image_id:
                raise _in_flight(image_id)  # and its incoming object is what that call copies
            await _store_call(store.delete(source_key))
            await _adopt_orphan(ctx, claim, _Upload(checked, spool.sha256, name, source, {}))
            return Accepted(claim.image_id, name, spool.size, mime, spool.sha256, duplicate=True)
        attempt = _Attempt(ctx, spool.sha256, image_id, key, claim, late_writes=late_writes)
        try:
            await _stage(ctx, image_id, key, spool.sha256)
            stripped = await _apply_gps_policy(ctx, spool, checked)
            upload = _Upload(checked, spool.sha256, name, source, {**(extra or {}), **stripped})
            facts = upload.metadata()
            if stripped:  # the incoming original still has its location: store the stripped one
                ref = await attempt.write(
                    store.put_file(key, spool.file, spool.size, mime, metadata=facts)
                )
            else:
                copied = await attempt.write(
                    store.copy_if_unchanged(source_key, key, etag, spool.size, mime, facts)
                )
                if copied is None:
                    raise UploadRejectedError(
                        409,
                        "the file was replaced or removed while it was being checked; "
                        "complete again",
                    )
                ref = copied
            await _announce(ctx, upload, image_id, ref, claim)
        except BaseException:
            # Our copy goes; the client's incoming object stays, so completing again works.
            await asyncio.shield(attempt.take_back())
            raise
        with contextlib.suppress(Exception):  # done with it; a leftover is only garbage
            await store.delete(source_key)
        return Accepted(image_id, name, spool.size, mime, spool.sha256)
    finally:
        spool.close()


def _in_flight(image_id: str) -> UploadRejectedError:
    return UploadRejectedError(
        503, f"the upload {image_id} is being completed by another call; try again"
    )


async def _look_back(
    ctx: Context, image_id: str, done: list[str], incoming: list[str]
) -> tuple[Accepted | None, bool]:
    """What earlier completes of ``image_id`` left (``done``: what ``uploads/<id>/`` held).

    Returns the answer if one announced the original (done before: 200), else whether a
    write of one that failed may still land at the key. A staged marker means the original
    under ``uploads/`` may not be announced: it is settled first, as the sweeper would
    (whatever its age), and while its call may still announce it this raises a 503.
    """
    # Read after the listing: an original listed whose marker is gone was announced.
    staged = await _available(_staged(ctx, image_id))
    if staged is not None:
        was_announced = await _available(announced(ctx, [image_id], staged.at))
        outcome = await _available(
            resolve_staged(ctx, staged, image_id in was_announced, time.time())
        )
        if outcome is Outcome.HELD:
            raise _in_flight(image_id)
        if outcome is not Outcome.SETTLED:  # dropped, or left by a call that failed
            return None, outcome is Outcome.YOUNG
        done = [staged.key]
    if not done:
        return None, False
    return await _completed_before(ctx, done[0], incoming), False


async def _completed_before(ctx: Context, key: str, leftovers: list[str]) -> Accepted | None:
    """``complete`` for an id whose original was announced: done before; what was POSTed
    for it since goes. None if the original vanished meanwhile (a failed call took it
    back): complete afresh."""
    ref = await _store_call(ctx.store.interactive.stat(key))
    if ref is None:
        return None
    for leftover in leftovers:
        await _store_call(ctx.store.interactive.delete(leftover))
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


async def _available(call: Awaitable[T]) -> T:
    """Await ``call``: an unavailable store or NATS becomes a 503 the client retries."""
    try:
        return await _store_call(call)
    except (nats.errors.Error, CasConflictError) as exc:
        raise UploadRejectedError(
            503, f"the upload's state cannot be read ({type(exc).__name__}); try again"
        ) from None


@dataclass(frozen=True, slots=True)
class _Upload:
    """What the ``uploaded`` event says of the bytes being accepted, whatever their id."""

    checked: Checked
    sha256: str
    filename: str | None
    source: str
    extra: dict[str, Any]

    def event(self, image_id: str, ref: ObjectRef) -> Event:
        return Event(
            id=subjects.uploaded_event_id(image_id),
            type=subjects.UPLOADED,
            source=f"darkroom/{self.source}",
            time=now_iso(),
            subject=image_id,
            object=ref,
            image_id=image_id,
            data={
                **self.extra,
                "name": ref.key.rsplit("/", 1)[-1],
                "original_name": (self.filename or "")[:ORIGINAL_NAME_CHARS],
                "sha256": self.sha256,
                "source": self.source,
                "format": self.checked.kind.name,
                "width": self.checked.width,
                "height": self.checked.height,
                "frames": self.checked.frames,
            },
        )

    def metadata(self) -> dict[str, str]:
        """What the original keeps of this upload as its S3 user metadata, so a reindex
        that finds the event gone still knows it (see :func:`upload_facts`)."""
        facts = {"source": self.source, "key": self.extra.get("key"), "sha256": self.sha256}
        return {
            f"{FACT_PREFIX}{name}": value
            for name, value in facts.items()
            # S3 metadata is US-ASCII header text; a key id and a source always are.
            if isinstance(value, str) and value and value.isascii() and value.isprintable()
        }


def upload_facts(metadata: Mapping[str, str]) -> dict[str, str]:
    """The ``uploaded`` event's data an original's user metadata keeps (``source``,
    ``key``, ``sha256``), as the event carries them."""
    found = {name: metadata.get(f"{FACT_PREFIX}{name}") for name in UPLOAD_FACTS}
    return {name: value for name, value in found.items() if value}


async def _announce(
    ctx: Context, upload: _Upload, image_id: str, ref: ObjectRef, pending: bytes
) -> None:
    """Publish the ``uploaded`` event; then mark the claim, still ``pending`` as this call
    wrote it, "published", and only then drop the original's marker. The mark may fail
    after the event is out: the marker then stays, and the sweeper settles it."""
    event = upload.event(image_id, ref)
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
    try:
        published = await settle_claim(ctx, upload.sha256, pending, image_id, ref.key)
    except Exception:
        return
    if published:
        await unstage(ctx, image_id)


def _claim_value(image_id: str, key: str, state: str) -> bytes:
    return orjson.dumps({"image_id": image_id, "key": key, "state": state, "at": time.time()})


@dataclass(frozen=True, slots=True)
class _Claim:
    """A digest's claim as stored: which image holds the bytes, where, in what state, since
    when (epoch seconds). Empty when there is none."""

    image_id: str = ""
    key: str = ""
    state: str = ""
    at: float = 0.0

    @classmethod
    def parse(cls, value: bytes | None) -> _Claim:
        doc = orjson.loads(value or b"{}")
        return cls(
            str(doc.get("image_id", "")),
            str(doc.get("key", "")),
            str(doc.get("state", "")),
            float(doc.get("at", 0)),
        )


@dataclass(frozen=True, slots=True)
class _Held:
    """Who holds a digest already. ``in_flight``: its upload is still under way (and may
    yet fail). ``orphan``: its upload died after storing the original and before
    announcing it; this call renewed the claim (to ``claim``) to announce that original."""

    image_id: str
    in_flight: bool = False
    orphan: ObjectRef | None = None
    claim: bytes = b""


async def _claim(ctx: Context, sha256: str, image_id: str, key: str) -> bytes | _Held:
    """Claim ``sha256`` for ``image_id``: the pending claim written, or who holds it.

    A claim still pending is looked at first: announced after all (only its "published"
    mark was lost), it is settled and its id is the answer at once. Otherwise its upload is
    in flight: wait (up to IN_FLIGHT_WAIT_S) to see it end: announced, its id is the
    answer; failed, this upload takes its place. Another call completing this very id is
    not waited on. A claim pending for longer than ``pending_claim_s`` is abandoned: its
    stored original is adopted (the claim renewed, then the original announced, once), or,
    stored nothing, the claim is taken over; either only if the claim is still exactly the
    stale one (a sweeper may be dropping it and its original).
    """
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
                return mine
            held = _Claim.parse(found.value)
            if held.state == "published":
                return _Held(held.image_id)
            fresh = time.time() - held.at < stale_after
            if held.image_id == image_id and fresh:
                return _Held(image_id, in_flight=True)
            if found.value != looked_at:
                looked_at = found.value
                stored = await _stored_original(ctx, held)
                if stored is not None and await _was_announced(ctx, held):
                    await settle_claim(ctx, sha256, found.value, held.image_id, stored.key)
                    return _Held(held.image_id)
            if fresh:
                if time.monotonic() < deadline:
                    await asyncio.sleep(IN_FLIGHT_POLL_S)
                    continue
                return _Held(held.image_id, in_flight=True)  # most likely it will succeed
            takeovers += 1
            new = mine if stored is None else _claim_value(held.image_id, stored.key, "pending")
            taken = await compare_and_set(
                ctx.digests, sha256, partial(_replace, old=found.value, new=new)
            )
            if not taken.written:
                continue  # changed first (dropped by a sweeper, taken over): decide again
            return mine if stored is None else _Held(held.image_id, orphan=stored, claim=new)
    except (nats.errors.Error, OSError) as exc:
        raise UploadRejectedError(
            503, f"the duplicate check is unavailable ({type(exc).__name__}); try again"
        ) from None
    except CasConflictError:
        pass
    raise UploadRejectedError(503, "the duplicate check kept conflicting; try again")


def _replace(current: bytes | None, old: bytes | None, new: bytes) -> bytes | None:
    return new if current == old else None


async def _was_announced(ctx: Context, held: _Claim) -> bool:
    return bool(await _store_call(announced(ctx, [held.image_id], held.at)))


async def _stored_original(ctx: Context, held: _Claim) -> ObjectRef | None:
    """The original a pending claim names, if it was stored."""
    if not held.key or not subjects.is_safe_id(held.image_id):
        return None
    return await _store_call(ctx.store.interactive.stat(held.key))


async def _adopt_orphan(ctx: Context, held: _Held, upload: _Upload) -> None:
    """Announce the original of an upload that died before announcing it, if ``held``
    names one. Its marker is staged afresh first, so a sweeper leaves it alone."""
    if held.orphan is None:
        return
    await _stage(ctx, held.image_id, held.orphan.key, upload.sha256)
    await _announce(ctx, upload, held.image_id, held.orphan, held.claim)


async def settle_claim(
    ctx: Context, sha256: str, pending: bytes | None, image_id: str, key: str
) -> bool:
    """Mark a claim whose upload was announced "published", if it still reads exactly
    ``pending`` (a newer state is never overwritten); say whether it now reads
    "published" for ``image_id``."""
    published = _claim_value(image_id, key, "published")
    result = await compare_and_set(
        ctx.digests, sha256, lambda current: published if current == pending else None
    )
    now = _Claim.parse(result.value)
    return now.state == "published" and (now.image_id, now.key) == (image_id, key)


async def release_claim(ctx: Context, sha256: str, pending: bytes) -> bool:
    """Drop the claim on ``sha256`` if it still reads exactly ``pending`` (compare-and-set
    on the revision read); say whether it was dropped."""
    try:
        entry = await ctx.digests.get(sha256)
    except nats.js.errors.KeyNotFoundError:
        return False
    if entry.value != pending:
        return False
    try:
        await ctx.digests.delete(sha256, last=entry.revision)
    except nats.js.errors.KeyWrongLastSequenceError:
        return False
    return True


@dataclass(slots=True)
class _Attempt:
    """This call's hold on a digest while it stores and announces an original: what it
    made, so that a failure takes back exactly that and nothing of anyone else's."""

    ctx: Context
    sha256: str
    image_id: str
    key: str
    claim: bytes  # the pending claim this call wrote
    late_writes: bool = False  # a store write that got no answer may still land at key
    stored: bool = False  # this call stored the original at key

    async def write(self, call: Awaitable[T]) -> T:
        """Store the original (a None result: the store declined to). A write that got no
        answer (a timeout, a cut connection, a cancel) may still land: that is remembered."""
        try:
            ref = await call
        except (MinioException, StoreBusyError) as exc:  # answered, or never sent
            raise _store_unavailable(exc) from None
        except BaseException as exc:
            self.late_writes = True
            if isinstance(exc, _STORE_ERRORS):
                raise _store_unavailable(exc) from None
            raise
        self.stored = ref is not None
        return ref

    async def take_back(self) -> None:
        """After a failure: drop this call's claim at once (a retry is not held up), then
        the original it stored. The staged marker stays while something may still be or
        land at the key (a delete that failed, a write with no answer): the sweeper deletes
        it after ``pending_claim_s``. Best effort throughout: the caller is failing."""
        with contextlib.suppress(Exception):
            await release_claim(self.ctx, self.sha256, self.claim)
        if self.stored or self.late_writes:
            try:
                await self.ctx.store.interactive.delete(self.key)
            except Exception:
                return
        if not self.late_writes:
            await unstage(self.ctx, self.image_id)


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


async def _staged(ctx: Context, image_id: str) -> Staged | None:
    """The staged marker of ``image_id``, if it has one."""
    try:
        entry = await ctx.digests.get(STAGED_PREFIX + image_id)
    except nats.js.errors.KeyNotFoundError:
        return None
    return Staged.parse(entry.value or b"")


class Outcome(enum.Enum):
    """What :func:`resolve_staged` made of a staged original."""

    SETTLED = "settled"  # announced: its claim reads "published", its marker is gone
    ABANDONED = "abandoned"  # never announced, its upload dead: original, claim, marker gone
    HELD = "held"  # its claim is pending and not stale: its upload may announce it yet
    YOUNG = "young"  # its upload failed and let go of the claim; a write may still land


async def resolve_staged(ctx: Context, staged: Staged, was_announced: bool, now: float) -> Outcome:
    """Settle a staged original as of ``now`` (epoch seconds).

    Announced after all, its claim is marked "published" and the marker goes. Otherwise
    its claim decides: still this original's and pending, it goes only once both it and the
    marker are older than ``pending_claim_s``, and only if unchanged since read (a
    re-upload adopting the original renews it first); let go of, the marker's age alone
    decides. Gone, the original and its marker go too.
    """
    try:
        value: bytes | None = (await ctx.digests.get(staged.sha256)).value
    except nats.js.errors.KeyNotFoundError:
        value = None
    claim = _Claim.parse(value)
    ours = (claim.image_id, claim.key) == (staged.image_id, staged.key)
    if was_announced or (ours and claim.state == "published"):
        if ours and claim.state != "published":
            await settle_claim(ctx, staged.sha256, value, staged.image_id, staged.key)
        await unstage(ctx, staged.image_id)
        return Outcome.SETTLED
    stale_after = ctx.settings.ingest.pending_claim_s
    if ours and value is not None:
        if min(now - claim.at, now - staged.at) <= stale_after:
            return Outcome.HELD
        if not await release_claim(ctx, staged.sha256, value):
            return Outcome.HELD  # renewed meanwhile
    elif now - staged.at <= stale_after:
        return Outcome.YOUNG
    await ctx.store.interactive.delete(staged.key)
    await unstage(ctx, staged.image_id)
    return Outcome.ABANDONED


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
