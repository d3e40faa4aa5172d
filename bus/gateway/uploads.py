"""Uploads: multipart (many files, each streamed), and presigned direct POSTs for big files.

A 503 (the store or NATS unavailable, every upload stream busy) carries ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import orjson
from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from bus.core import subjects
from bus.core.envelope import new_id
from bus.gateway.problems import Problem, json_response, problem_response
from bus.gateway.state import CTX
from bus.images.media import BY_MIME, accepted_names, safe_name
from bus.intake.accept import Accepted, UploadRejectedError, accept_upload, complete_presigned

CHUNK = 256 * 1024
MAX_FILES = 1000
# The form must be used (the POST begun) within this; completing has no deadline, but the
# sweeper deletes what was never completed (``ingest.incoming_max_age_s``).
PRESIGN_EXPIRES = timedelta(minutes=10)


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
    return {
        "name": name,
        "status": 200 if accepted.duplicate else 201,
        "duplicate": accepted.duplicate,
        "id": accepted.image_id,
        "stored_name": accepted.name,
        "size": accepted.size,
        "content_type": accepted.content_type,
        "sha256": accepted.sha256,
        "url": f"/api/images/{accepted.image_id}",
    }


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
    try:
        reader = await request.multipart()
        parts = _file_parts(reader)
        async for part in parts:
            if len(results) >= MAX_FILES:
                raise Problem(413, "Too many files", f"at most {MAX_FILES} files per request")
            name = part.filename or ""
            try:
                accepted = await accept_upload(ctx, _chunks(part), name, "gateway")
            except UploadRejectedError as exc:
                results.append({"name": name, "status": exc.status, "error": exc.reason})
                continue
            results.append(accepted_result(name, accepted))
    except (ValueError, AssertionError, HttpProcessingError) as exc:
        # A broken body: report what was accepted before it, and why the rest was not.
        if not results:
            raise Problem(400, "Malformed multipart body", str(exc) or type(exc).__name__) from None
        results.append({"name": "", "status": 400, "error": f"malformed multipart body: {exc}"})
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


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise Problem(400, "Malformed JSON", str(exc)) from None
    if not isinstance(body, dict):
        raise Problem(400, "Malformed JSON", "the body must be a JSON object")
    return body


async def presign(request: web.Request) -> web.Response:
    """Hand out a form the client POSTs one image with, straight into the store.

    The form's policy pins the key, the content type and the size (up to the declared
    one), and expires in minutes: the S3 server refuses anything else.
    """
    ctx = request.app[CTX]
    body = await _json_body(request)
    content_type = body.get("content_type")
    kind = BY_MIME.get(content_type) if isinstance(content_type, str) else None
    if kind is None:
        raise Problem(
            415,
            "Unsupported Media Type",
            f"content_type must be one of {', '.join(BY_MIME)} ({accepted_names()}), "
            f"got {content_type!r}",
        )
    size = body.get("size")
    limit = ctx.settings.ingest.max_bytes
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise Problem(422, "Invalid size", "size must be the file's length in bytes (> 0)")
    if size > limit:
        raise Problem(
            413, "Payload Too Large", f"{size:,} bytes is over the limit of {limit:,} bytes"
        )
    filename = body.get("filename")
    if filename is not None and not isinstance(filename, str):
        raise Problem(422, "Invalid filename", "filename must be a string")
    image_id = new_id()
    key = subjects.incoming_key(image_id, safe_name(filename, kind.extension))
    url, fields = ctx.store.presigned_post(key, kind.mime, size, PRESIGN_EXPIRES)
    return json_response(
        {
            "id": image_id,
            "method": "POST",
            "url": url,
            "fields": fields,
            "file_field": "file",
            "max_size": size,
            "expires_in": int(PRESIGN_EXPIRES.total_seconds()),
            "complete_url": f"/api/uploads/{image_id}/complete",
        },
        status=201,
    )


async def complete(request: web.Request) -> web.Response:
    """Check the object a presigned POST stored, and start its processing."""
    ctx = request.app[CTX]
    image_id = request.match_info["image_id"]
    if not subjects.is_safe_id(image_id):
        raise Problem(404, "Not Found", f"{image_id[:80]!r} is not an upload id")
    try:
        accepted = await complete_presigned(ctx, image_id)
    except UploadRejectedError as exc:
        return rejected(exc.status, exc.reason)
    result = accepted_result(accepted.name, accepted)
    return json_response(result, status=result["status"])
