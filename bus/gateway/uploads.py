"""``POST /api/uploads``: multipart, many files, each streamed straight to the store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import BodyPartReader, web

from bus.gateway.problems import Problem, json_response, problem_response
from bus.gateway.state import CTX
from bus.intake import UploadRejectedError, accept_upload

CHUNK = 256 * 1024
MAX_FILES = 1000


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while True:
        chunk = await part.read_chunk(CHUNK)
        if not chunk:
            return
        yield chunk


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
    reader = await request.multipart()
    results: list[dict[str, Any]] = []
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader) or part.filename is None:
            continue  # form fields other than files are ignored
        if len(results) >= MAX_FILES:
            raise Problem(413, "Too many files", f"at most {MAX_FILES} files per request")
        try:
            accepted = await accept_upload(ctx, _chunks(part), part.filename, max_bytes, "gateway")
        except UploadRejectedError as exc:
            results.append({"name": part.filename, "status": exc.status, "error": exc.reason})
            continue
        results.append(
            {
                "name": part.filename,
                "status": 201,
                "id": accepted.image_id,
                "stored_name": accepted.name,
                "size": accepted.size,
                "content_type": accepted.content_type,
                "sha256": accepted.sha256,
                "url": f"/api/images/{accepted.image_id}",
            }
        )
    if not results:
        raise Problem(400, "No files", "the form held no file parts (field name 'file')")
    ok = sum(1 for r in results if r["status"] == 201)
    if ok == 0:
        first = results[0]
        return problem_response(
            first["status"] if len(results) == 1 else 422,
            "Upload rejected",
            first["error"] if len(results) == 1 else "no file was accepted",
            results=results,
        )
    return json_response({"results": results}, status=201 if ok == len(results) else 207)
