"""Uploads: multipart (many files, each streamed), and presigned direct POSTs for big files.

A 503 (the store or NATS unavailable, every upload stream busy) carries ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, Field

from bus.core import subjects
from bus.core.envelope import new_id
from bus.gateway.access import caller
from bus.gateway.contract import SETTING_MAXIMUM, Integer
from bus.gateway.problems import Problem, json_response, problem_response
from bus.gateway.state import CTX
from bus.images.media import BY_MIME, accepted_names, safe_name
from bus.intake.accept import Accepted, UploadRejectedError, accept_upload, complete_presigned

CHUNK = 256 * 1024
MAX_FILES = 1000
# The form must be used (the POST begun) within this; completing has no deadline, but the
# sweeper deletes what was never completed (``ingest.incoming_max_age_s``).
PRESIGN_EXPIRES = timedelta(minutes=10)


class UploadResult(BaseModel):
    """One accepted file."""

    name: str = Field(description="the name it was sent with")
    status: int = Field(description="201 accepted, 200 a duplicate of an earlier upload")
    duplicate: bool
    id: str = Field(description="the image id (a duplicate's: the earlier image's)")
    stored_name: str
    size: int
    content_type: str = Field(description="as sniffed from the bytes")
    sha256: str
    url: str = Field(description="the image's document")


class FileRefused(BaseModel):
    """One refused file, and why."""

    name: str
    status: int = Field(description="the status this file alone would have had")
    error: str


class UploadResults(BaseModel):
    results: list[UploadResult | FileRefused] = Field(description="one per file, in order")


class PresignRequest(BaseModel):
    content_type: str = Field(
        description=f"one of {accepted_names()}", json_schema_extra={"enum": list(BY_MIME)}
    )
    size: Integer = Field(
        gt=0,
        description="the file's length in bytes, at most ingest.max_upload_mb",
        json_schema_extra={SETTING_MAXIMUM: "ingest.max_bytes"},
    )
    filename: str | None = None


class Presigned(BaseModel):
    id: str = Field(description="the image id, once completed")
    method: str = Field(description="POST")
    url: str
    fields: dict[str, str] = Field(description="form fields to send before the file")
    file_field: str = Field(description="the form field of the file")
    max_size: int
    expires_in: int = Field(description="seconds the form stays valid")
    complete_url: str


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while True:
        chunk = await part.read_chunk(CHUNK)
        if not chunk:
            return
        yield chunk


async def _file_parts(reader: MultipartReader) -> AsyncIterator[BodyPartReader]:
    while (part := await reader.next()) is not None:
        if isinstance(part, BodyPartReader) and part.filename is not None:
            yield part  # form fields other than files are ignored


def accepted_result(name: str, accepted: Accepted) -> dict[str, Any]:
    """One file's entry in an upload response (200 for a duplicate, else 201)."""
    return UploadResult(
        name=name,
        status=200 if accepted.duplicate else 201,
        duplicate=accepted.duplicate,
        id=accepted.image_id,
        stored_name=accepted.name,
        size=accepted.size,
        content_type=accepted.content_type,
        sha256=accepted.sha256,
        url=f"/api/images/{accepted.image_id}",
    ).model_dump()


def rejected(status: int, detail: str, **extra: Any) -> web.Response:
    """The problem response for a refused upload (a 503 says when to try again)."""
    return problem_response(status, "Upload rejected", detail, **extra)


async def upload(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    if not request.content_type.startswith("multipart/"):
        raise Problem(
            415,
            "Unsupported Media Type",
            "send multipart/form-data with one or more 'file' parts, "
            f"got {request.content_type or 'no content type'}",
        )
    results: list[dict[str, Any]] = []
    whose = {"key": (await caller(request)).id}  # an approval rule may hold a key's uploads
    try:
        reader = await request.multipart()
        parts = _file_parts(reader)
        async for part in parts:
            if len(results) >= MAX_FILES:
                raise Problem(413, "Too many files", f"at most {MAX_FILES} files per request")
            name = part.filename or ""
            try:
                accepted = await accept_upload(ctx, _chunks(part), name, "gateway", extra=whose)
            except UploadRejectedError as exc:
                results.append(
                    FileRefused(name=name, status=exc.status, error=exc.reason).model_dump()
                )
                continue
            results.append(accepted_result(name, accepted))
    except (ValueError, AssertionError, HttpProcessingError) as exc:
        # A broken body is a broken request (400), whatever came before the break: the
        # results say which files before it were accepted all the same.
        detail = str(exc) or type(exc).__name__
        if results:
            broken = FileRefused(name="", status=400, error=f"malformed multipart body: {detail}")
            results.append(broken.model_dump())
            return problem_response(400, "Malformed multipart body", detail, results=results)
        raise Problem(400, "Malformed multipart body", detail) from None
    if not results:
        raise Problem(400, "No files", "the form held no file parts (field name 'file')")
    ok = sum(1 for r in results if r["status"] in (200, 201))
    if ok == 0:
        first = results[0]
        statuses = {r["status"] for r in results}
        return rejected(
            first["status"] if len(statuses) == 1 else 422,
            first["error"] if len(results) == 1 else "no file was accepted",
            results=results,
        )
    if ok < len(results):
        return json_response({"results": results}, status=207)
    created = any(r["status"] == 201 for r in results)
    return json_response({"results": results}, status=201 if created else 200)


async def presign(request: web.Request, body: PresignRequest) -> web.Response:
    """Hand out a form the client POSTs one image with, straight into the store.

    The form's policy pins the key, the content type and the size (up to the declared
    one), and expires in minutes: the S3 server refuses anything else.
    """
    ctx = request.app[CTX]
    kind = BY_MIME.get(body.content_type)
    if kind is None:
        raise Problem(
            415,
            "Unsupported Media Type",
            f"content_type must be one of {', '.join(BY_MIME)} ({accepted_names()}), "
            f"got {body.content_type[:80]!r}",
        )
    limit = ctx.settings.ingest.max_bytes
    if body.size > limit:
        raise Problem(
            413, "Payload Too Large", f"{body.size:,} bytes is over the limit of {limit:,} bytes"
        )
    image_id = new_id()
    key = subjects.incoming_key(image_id, safe_name(body.filename, kind.extension))
    url, fields = ctx.store.presigned_post(key, kind.mime, body.size, PRESIGN_EXPIRES)
    presigned = Presigned(
        id=image_id,
        method="POST",
        url=url,
        fields=fields,
        file_field="file",
        max_size=body.size,
        expires_in=int(PRESIGN_EXPIRES.total_seconds()),
        complete_url=f"/api/uploads/{image_id}/complete",
    )
    return json_response(presigned, status=201)


async def complete(request: web.Request) -> web.Response:
    """Check the object a presigned POST stored, and start its processing."""
    ctx = request.app[CTX]
    image_id = request.match_info["image_id"]
    if not subjects.is_safe_id(image_id):
        raise Problem(404, "Not Found", f"{image_id[:80]!r} is not an upload id")
    try:
        whose = {"key": (await caller(request)).id}
        accepted = await complete_presigned(ctx, image_id, extra=whose)
    except UploadRejectedError as exc:
        return rejected(exc.status, exc.reason)
    result = accepted_result(accepted.name, accepted)
    return json_response(result, status=result["status"])
