"""``POST /api/uploads``: multipart, many files, each streamed straight to the store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from bus.gateway.problems import Problem, json_response, problem_response
from bus.gateway.state import CTX
from bus.intake import Accepted, UploadRejectedError, accept_upload

CHUNK = 256 * 1024
MAX_FILES = 1000


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


def _accepted(name: str, accepted: Accepted) -> dict[str, Any]:
    return {
        "name": name,
        "status": 201,
        "id": accepted.image_id,
        "stored_name": accepted.name,
        "size": accepted.size,
        "content_type": accepted.content_type,
        "sha256": accepted.sha256,
        "url": f"/api/images/{accepted.image_id}",
    }


async def upload(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    if not request.content_type.startswith("multipart/"):
        raise Problem(
            415,
            "Unsupported Media Type",
            "send multipart/form-data with one or more 'file' parts, "
            f"got {request.content_type or 'no content type'}",
        )
    max_bytes = ctx.settings.gateway.max_upload_mb * 1024 * 1024
    results: list[dict[str, Any]] = []
    try:
        reader = await request.multipart()
        parts = _file_parts(reader)
        async for part in parts:
            if len(results) >= MAX_FILES:
                raise Problem(413, "Too many files", f"at most {MAX_FILES} files per request")
            name = part.filename or ""
            try:
                accepted = await accept_upload(ctx, _chunks(part), name, max_bytes, "gateway")
            except UploadRejectedError as exc:
                results.append({"name": name, "status": exc.status, "error": exc.reason})
                continue
            results.append(_accepted(name, accepted))
    except (ValueError, AssertionError, HttpProcessingError) as exc:
        # A broken body: report what was accepted before it, and why the rest was not.
        if not results:
            raise Problem(400, "Malformed multipart body", str(exc) or type(exc).__name__) from None
        results.append({"name": "", "status": 400, "error": f"malformed multipart body: {exc}"})
    if not results:
        raise Problem(400, "No files", "the form held no file parts (field name 'file')")
    ok = sum(1 for r in results if r["status"] == 201)
    if ok == 0:
        first = results[0]
        statuses = {r["status"] for r in results}
        return problem_response(
            first["status"] if len(statuses) == 1 else 422,
            "Upload rejected",
            first["error"] if len(results) == 1 else "no file was accepted",
            results=results,
        )
    return json_response({"results": results}, status=201 if ok == len(results) else 207)
