"""Builds the gateway application: routes, auth, problem+json errors, static frontend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from bus.gateway import hooks, images, keys_api, system, uploads
from bus.gateway.openapi import build_openapi
from bus.gateway.problems import (
    NOSNIFF,
    Handler,
    json_response,
    problem_middleware,
    problem_response,
)
from bus.gateway.routes import PUBLIC, Route, json_body
from bus.gateway.server import GatewayRunner
from bus.gateway.state import CTX, FUNCTIONS, KEYS, STATIC_DIR
from bus.runtime.context import Context
from bus.runtime.registry import enabled_names
from bus.state.keys import KeyCache

_SCOPE = web.AppKey("route_scopes", dict)
# The frontend's pages load only their own scripts, styles and images (thumbnails arrive as
# blob: URLs), run no inline code, and may not be framed.
FRONTEND_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)


def route_table() -> list[Route]:
    return [
        Route("GET", "/healthz", system.healthz, PUBLIC, "Liveness: the process is up", "system"),
        Route(
            "GET",
            "/readyz",
            system.readyz,
            PUBLIC,
            "Readiness: NATS and S3 reachable",
            "system",
            responses={"503": "a dependency is unavailable"},
        ),
        Route("GET", "/metrics", system.metrics, "read", "Prometheus metrics", "system"),
        Route("GET", "/api/openapi.json", openapi, "read", "This document", "system"),
        Route(
            "GET",
            "/api/status",
            system.status,
            "read",
            "Consumer lag per function, stream and dead-letter counts",
            "system",
        ),
        Route(
            "GET",
            "/api/status/gpus",
            system.gpus,
            "read",
            "Devices in the VRAM lease ledger: capacity, live leases with models, sizes and "
            "holders, queued requests",
            "system",
            responses={"503": "the lease ledger cannot be read"},
        ),
        Route(
            "GET",
            "/api/dead-letters",
            system.dead_letters,
            "read",
            "Newest dead-letter records first",
            "system",
            query=(
                ("stage", "string", "only this function"),
                ("limit", "integer", "1-200, default 50"),
            ),
        ),
        Route(
            "POST",
            "/api/uploads",
            uploads.upload,
            "upload",
            "Upload one or more images (multipart/form-data, field 'file')",
            "images",
            body={
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "file": {
                                    "type": "array",
                                    "items": {"type": "string", "format": "binary"},
                                }
                            },
                        }
                    }
                },
            },
            responses={
                "200": "every file was a duplicate of an earlier upload (see results)",
                "201": "all files accepted",
                "207": "some files accepted (see results)",
                "413": "a file is over the size limit",
                "415": "not a supported image",
                "422": "no file accepted",
                "503": "the store did not answer in time (Retry-After)",
            },
        ),
        Route(
            "POST",
            "/api/uploads/presign",
            uploads.presign,
            "upload",
            "A presigned POST form to upload one big image straight to the store",
            "images",
            body=json_body(
                ["content_type", "size"],
                {
                    "filename": {"type": "string"},
                    "content_type": {"type": "string", "example": "image/jpeg"},
                    "size": {"type": "integer", "description": "bytes"},
                },
            ),
            responses={
                "201": "POST 'fields', then the file (field 'file'), to 'url'; then POST "
                "'complete_url'. The store refuses other keys, types and sizes",
                "413": "over the size limit",
                "415": "not a supported image type",
            },
        ),
        Route(
            "POST",
            "/api/uploads/{image_id}/complete",
            uploads.complete,
            "upload",
            "Check a presigned upload and start processing it",
            "images",
            responses={
                "200": "done before: identical bytes were uploaded before (their image id), "
                "or this id was completed and announced already (what was POSTed for it "
                "since is deleted)",
                "201": "accepted",
                "409": "nothing was POSTed for this id yet, or the object was replaced or "
                "removed while it was being checked: POST it again, then complete again",
                "503": "the store or NATS did not answer in time, or another call is "
                "completing this id right now: retry after Retry-After (answers 200 once "
                "that call announced it)",
                "413": "over the size limit (the object is deleted)",
                "415": "not a supported image (the object is deleted)",
                "422": "corrupt, truncated or over a limit (the object is deleted)",
            },
        ),
        Route(
            "POST",
            "/api/hooks/ingest",
            hooks.ingest_hook,
            "upload",
            "Webhook for integrations: one image as raw bytes, base64 JSON, or a URL to fetch",
            "images",
            query=(("filename", "string", "raw bytes: the file's name"),),
            body=hooks.OPENAPI_BODY,
            responses={
                "200": "identical bytes were uploaded before: their image id",
                "201": "accepted",
                "403": "the key lacks the 'upload' scope, fetching is off, "
                "or the URL's host or address is not allowed",
                "413": "over a size limit: the image, the JSON body, or its fields besides 'data'",
                "415": "not a supported image",
                "422": "corrupt or over a limit, invalid base64 or URL, or the URL redirects",
                "502": "the URL's server failed or answered an error",
                "504": "fetching the URL took longer than ingest.fetch.timeout_s",
            },
        ),
        Route(
            "GET",
            "/api/images",
            images.list_images,
            "read",
            "Images, newest first",
            "images",
            query=(
                ("status", "string", "uploaded, ingested, ready or failed"),
                ("tag", "string", "only images with this tag"),
                ("approval", "string", "none, pending, approved or rejected"),
                ("since", "string", "ISO 8601 time: only images at or after it (sort key)"),
                ("until", "string", "ISO 8601 time: only images before it (sort key)"),
                ("has_caption", "boolean", "only images with (true) or without a caption"),
                ("q", "string", "words (or word prefixes) in the name, caption or tags"),
                ("sort", "string", "created (default) or taken (date taken, else created)"),
                ("order", "string", "desc (default, newest first) or asc"),
                ("limit", "integer", "1-500, default 50"),
                ("cursor", "string", "next_cursor from the previous page"),
            ),
            responses={"400": "a query parameter is invalid", "503": "the database is down"},
        ),
        Route(
            "GET",
            "/api/images/counts",
            images.image_counts,
            "read",
            "How many images there are, by status and by approval",
            "images",
            responses={"503": "the database is down"},
        ),
        Route(
            "GET",
            "/api/images/{image_id}",
            images.get_image,
            "read",
            "One image: status, stages, caption, tags",
            "images",
            responses={"404": "no such image"},
        ),
        Route(
            "GET",
            "/api/images/{image_id}/original",
            images.get_original,
            "read",
            "The uploaded bytes, as the type darkroom sniffed from them; downloaded "
            "(Content-Disposition: attachment) unless ?inline=true",
            "images",
            query=(("inline", "boolean", "true: show it in the browser instead of downloading"),),
            responses={"400": "inline is not true or false", "404": "no such image"},
        ),
        Route(
            "GET",
            "/api/images/{image_id}/display",
            images.get_rendition,
            "read",
            "The display rendition: WebP, sRGB, upright, long edge up to 2048 px",
            "images",
            responses={"404": "not ingested yet"},
        ),
        Route(
            "GET",
            "/api/images/{image_id}/thumbnail",
            images.get_rendition,
            "read",
            "A WebP thumbnail: the smallest size, or ?px= one of ingest.thumb_px",
            "images",
            query=(("px", "integer", "thumbnail size, e.g. 1024"),),
            responses={"404": "not ingested yet, or no such size"},
        ),
        Route(
            "GET",
            "/api/keys",
            keys_api.list_api_keys,
            "admin",
            "API keys (never their secrets)",
            "keys",
        ),
        Route(
            "POST",
            "/api/keys",
            keys_api.create_api_key,
            "admin",
            "Create a key; the response holds the secret once",
            "keys",
            body=json_body(
                ["name", "scopes"],
                {
                    "name": {"type": "string"},
                    "scopes": {
                        "type": "array",
                        "items": {
                            "type": "string",
                            "enum": ["read", "upload", "generate", "admin"],
                        },
                    },
                },
            ),
        ),
        Route(
            "DELETE",
            "/api/keys/{key_id}",
            keys_api.revoke_api_key,
            "admin",
            "Revoke a key",
            "keys",
            responses={"204": "revoked", "404": "no such key"},
        ),
    ]


async def openapi(request: web.Request) -> web.Response:
    return json_response(build_openapi(route_table()))


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return None


def _unauthorized(detail: str, challenge: str) -> web.Response:
    response = problem_response(401, "Unauthorized", detail)
    response.headers["WWW-Authenticate"] = challenge
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Deny by default: a route runs without a key only if the scope table says PUBLIC."""
    match = request.match_info
    if match.http_exception is not None:  # no such path or method: nothing is served
        raise match.http_exception
    resource = match.route.resource
    canonical = resource.canonical if resource is not None else ""
    scopes: dict[tuple[str, str], str] = request.app[_SCOPE]
    needed = scopes.get((request.method, canonical))
    if needed == PUBLIC:
        return await handler(request)
    token = _bearer(request)
    if token is None:
        return _unauthorized(
            "send an API key as 'Authorization: Bearer <key>'", 'Bearer realm="darkroom"'
        )
    record = await request.app[KEYS].authenticate(token)
    if record is None:
        return _unauthorized(
            "this API key is unknown or revoked", 'Bearer realm="darkroom", error="invalid_token"'
        )
    if needed is None:  # registered outside the route table: no key may call it
        return problem_response(
            403, "Forbidden", f"{request.method} {canonical} declares no scope, so no key may"
        )
    if not record.allows(needed):
        return problem_response(
            403,
            "Forbidden",
            f"this API key lacks the '{needed}' scope (it has: {', '.join(record.scopes)})",
        )
    return await handler(request)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "static"
    ctx = request.app[CTX]
    ctx.metrics.http_requests.labels(request.method, route, str(response.status)).inc()
    return response


def default_static_dir() -> Path:
    """The built frontend if there is one, else the simple page shipped in frontend/."""
    frontend = Path(__file__).resolve().parents[2] / "frontend"
    build = frontend / "build"
    if (build / "index.html").is_file():
        return build
    return frontend / "simple"


def _static_file(root: Path, rel: str) -> Path | None:
    """The file to serve for ``rel`` under ``root`` (index.html for client-side routes)."""
    if "\0" in rel or len(rel) > 1024:
        return None
    try:
        return _existing_file(root, rel)
    except OSError:  # a name too long for the filesystem, and the like
        return None


def _existing_file(root: Path, rel: str) -> Path | None:
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        return None
    if target.is_dir():
        target = target / "index.html"
    if target.is_file():
        return target
    fallback = root / "index.html"  # single-page app: the client routes it
    return fallback if fallback.is_file() else None


async def static(request: web.Request) -> web.StreamResponse:
    rel = request.match_info.get("path", "")
    if rel.startswith("api/"):
        return problem_response(404, "Not Found", f"no API route {request.path}")
    root: Path = request.app[STATIC_DIR]
    target = await asyncio.to_thread(_static_file, root, rel)
    if target is None:
        return problem_response(404, "Not Found", f"no frontend file for {request.path}")
    return web.FileResponse(target, headers={"Content-Security-Policy": FRONTEND_CSP})


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(NOSNIFF)  # every answer is exactly the type it says


def build_app(ctx: Context, static_dir: Path | None = None) -> web.Application:
    app = web.Application(middlewares=[metrics_middleware, problem_middleware, auth_middleware])
    app[CTX] = ctx
    app[STATIC_DIR] = static_dir or ctx.settings.gateway.static_dir or default_static_dir()
    scopes: dict[tuple[str, str], str] = {}
    for route in route_table():
        _add_route(app, scopes, route.method, route.path, route.handler, route.scope)
    _add_route(app, scopes, "GET", "/{path:.*}", static, PUBLIC)  # last: it matches any path
    app[_SCOPE] = scopes
    app[FUNCTIONS] = enabled_names(ctx.settings)
    app.on_response_prepare.append(_security_headers)
    app.cleanup_ctx.append(_read_side)
    return app


def _add_route(
    app: web.Application,
    scopes: dict[tuple[str, str], str],
    method: str,
    path: str,
    handler: Handler,
    scope: str,
) -> None:
    if method == "GET":  # add_get also answers HEAD, with the same scope
        added = app.router.add_get(path, handler)
        methods: tuple[str, ...] = ("GET", "HEAD")
    else:
        added = app.router.add_route(method, path, handler)
        methods = (method,)
    assert added.resource is not None
    for each in methods:
        scopes[(each, added.resource.canonical)] = scope


def make_app_runner(app: web.Application) -> web.AppRunner:
    """The runner for ``app``, with the settings production and the tests share: no access
    log, 5 s to finish requests on shutdown, handlers not cancelled when a client hangs up
    (they see the hang-up as an error and clean up), and parser errors answered as
    problem+json."""
    return GatewayRunner(app, access_log=None, shutdown_timeout=5.0)


async def _read_side(app: web.Application) -> AsyncIterator[None]:
    ctx = app[CTX]
    keys = KeyCache(ctx.nc, ctx.api_keys)
    await keys.start()
    app[KEYS] = keys
    yield
    await keys.stop()
