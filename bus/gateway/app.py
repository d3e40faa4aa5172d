"""Builds the gateway application: routes, auth, problem+json errors, static frontend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from bus.core.settings import Settings
from bus.gateway import (
    access,
    approvals,
    captions,
    carousel,
    deadletters,
    deletions,
    downloads,
    events,
    generate_limits,
    generations,
    hooks,
    images,
    keys_api,
    lineage,
    live,
    models_api,
    openai_api,
    openai_images,
    rejections,
    search,
    sessions,
    system,
    timeline,
    uploads,
    webhooks_api,
)
from bus.gateway.contract import endpoint
from bus.gateway.openapi import build_openapi
from bus.gateway.problems import (
    NOSNIFF,
    Handler,
    json_response,
    problem_middleware,
    problem_response,
)
from bus.gateway.routes import PUBLIC, Link, Reply, Route
from bus.gateway.server import GatewayRunner
from bus.gateway.state import CTX, FUNCTIONS, KEYS, OPENAPI, STATIC_DIR
from bus.runtime.context import Context
from bus.runtime.registry import enabled_names
from bus.state.keys import KeyCache

_SCOPE = web.AppKey("route_scopes", dict)
_CSP = web.AppKey("frontend_csp", str)
# Every path the frontend may serve: all but the APIs' (darkroom's, and the OpenAI-compatible
# one under /v1) and the probes'.
FRONTEND_PATHS = r"/{path:(?!(?:api|v1|healthz|readyz|metrics)(?:/|$)).*}"
# The built app's scripts and styles, named by their content's hash: cached for good.
IMMUTABLE_ASSETS = "_app/immutable/"
# The frontend's pages load only their own scripts, styles and images (thumbnails arrive as
# blob: URLs), run no inline code, and may not be framed.
FRONTEND_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)


def frontend_csp(settings: Settings) -> str:
    """:data:`FRONTEND_CSP`, letting the pages post a big upload straight to the store
    (the presigned form) at the address browsers reach it at."""
    store = urlsplit(settings.s3.public_url or settings.s3.endpoint or "")
    if not store.hostname:
        return FRONTEND_CSP
    origin = f"{store.scheme}://{store.netloc.rsplit('@', 1)[-1]}"
    return f"{FRONTEND_CSP}; connect-src 'self' {origin}"


def route_table() -> list[Route]:
    return [
        Route(
            "GET",
            "/healthz",
            system.healthz,
            PUBLIC,
            "Liveness: the process is up",
            "system",
            responses={200: Reply("alive", system.Health)},
        ),
        Route(
            "GET",
            "/readyz",
            system.readyz,
            PUBLIC,
            "Readiness: NATS, S3 and PostgreSQL reachable",
            "system",
            responses={
                200: Reply("ready", system.Ready),
                503: "a dependency is unavailable (see checks)",
            },
        ),
        Route(
            "GET",
            "/metrics",
            system.metrics,
            "read",
            "Prometheus metrics",
            "system",
            responses={200: Reply("the text exposition format", content=_TEXT)},
        ),
        Route(
            "GET",
            "/api/openapi.json",
            openapi,
            "read",
            "This document",
            "system",
            responses={200: Reply("OpenAPI 3.1", content={"application/json": {"schema": {}}})},
        ),
        Route(
            "GET",
            "/api/status",
            system.status,
            "read",
            "Consumer lag per function, stream and dead-letter counts",
            "system",
            responses={200: Reply("the bus now", system.SystemStatus)},
        ),
        Route(
            "GET",
            "/api/status/gpus",
            system.gpus,
            "read",
            "Devices in the VRAM lease ledger: capacity, live leases with models, sizes and "
            "holders, queued requests",
            "system",
            responses={
                200: Reply("every device", system.Devices),
                503: "the lease ledger cannot be read",
            },
        ),
        *deadletters.routes(),
        Route(
            "POST",
            "/api/uploads",
            uploads.upload,
            "upload",
            "Upload one or more images (multipart/form-data, field 'file')",
            "images",
            body={
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        # Other fields are ignored, but their names must fit in a header.
                        "propertyNames": {"pattern": r"^[^\x00-\x08\x0a-\x1f\x7f]*$"},
                        "properties": {
                            "file": {
                                "type": "array",
                                "minItems": 1,
                                "items": {"type": "string", "format": "binary"},
                            }
                        },
                    },
                    "encoding": {"file": {"contentType": "image/*"}},
                }
            },
            responses={
                200: Reply(
                    "every file was a duplicate of an earlier upload (see results)",
                    uploads.UploadResults,
                    links=_image_links("$response.body#/results/0/id"),
                ),
                201: Reply(
                    "all files accepted",
                    uploads.UploadResults,
                    links=_image_links("$response.body#/results/0/id"),
                ),
                207: Reply("some files accepted (see results)", uploads.UploadResults),
                400: "no file part, or a malformed body (its results: the files before the "
                "break, accepted all the same)",
                413: "a file is over the size limit, or too many files",
                415: "not multipart/form-data, or not a supported image",
                422: "no file accepted (see results)",
                503: "the store or the bus did not answer in time",
            },
        ),
        Route(
            "POST",
            "/api/uploads/presign",
            uploads.presign,
            "upload",
            "A presigned POST form to upload one big image straight to the store",
            "images",
            responses={
                201: Reply(
                    "POST 'fields', then the file (field 'file'), to 'url'; then POST "
                    "'complete_url'. The store refuses other keys, types and sizes",
                    uploads.Presigned,
                    links={"complete": Link(uploads.complete, {"image_id": "$response.body#/id"})},
                ),
                413: "over the size limit",
                415: "not a supported image type",
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
                200: Reply(
                    "done before: identical bytes were uploaded before (their image id), or "
                    "this id was completed and announced already (what was POSTed for it "
                    "since is deleted)",
                    uploads.UploadResult,
                    links=_image_links("$response.body#/id"),
                ),
                201: Reply(
                    "accepted", uploads.UploadResult, links=_image_links("$response.body#/id")
                ),
                404: "not an upload id",
                409: "nothing was POSTed for this id yet, or the object was replaced or "
                "removed while it was being checked: POST it again, then complete again",
                413: "over the size limit (the object is deleted)",
                415: "not a supported image (the object is deleted)",
                422: "corrupt, truncated or over a limit (the object is deleted)",
                503: "the store or NATS did not answer in time, or another call is completing "
                "this id right now: retry after Retry-After (answers 200 once that call "
                "announced it)",
            },
        ),
        Route(
            "POST",
            "/api/hooks/ingest",
            hooks.ingest_hook,
            "upload",
            "Webhook for integrations: one image as raw bytes (its name in ?filename= or "
            "Content-Disposition), base64 JSON, or a URL to fetch",
            "images",
            body=hooks.BODY,
            responses={
                200: Reply(
                    "identical bytes were uploaded before: their image id",
                    uploads.UploadResult,
                    links=_image_links("$response.body#/id"),
                ),
                201: Reply(
                    "accepted", uploads.UploadResult, links=_image_links("$response.body#/id")
                ),
                400: "malformed JSON or body, or a query parameter is invalid",
                403: "the key lacks the 'upload' scope, fetching is off, "
                "or the URL's host or address is not allowed",
                413: "over a size limit: the image, the JSON body, or its fields besides 'data'",
                415: "not a supported image",
                422: "corrupt or over a limit, invalid base64 or URL, or the URL redirects",
                502: "the URL's server failed or answered an error",
                503: "the store or the bus did not answer in time",
                504: "fetching the URL took longer than ingest.fetch.timeout_s",
            },
        ),
        Route(
            "GET",
            "/api/images",
            images.list_images,
            "read",
            "Images, newest first",
            "images",
            responses={
                200: Reply("one page", images.ImagePage),
                400: "a query parameter is invalid, or the parameters disagree",
                503: "the database is down",
            },
        ),
        Route(
            "GET",
            "/api/images/counts",
            images.image_counts,
            "read",
            "How many images there are, by status and by approval",
            "images",
            responses={200: Reply("counts", images.ImageCounts), 503: "the database is down"},
        ),
        Route(
            "GET",
            "/api/images/{image_id}",
            images.get_image,
            "read",
            "One image: status, stages, caption, tags",
            "images",
            responses={
                200: Reply("the image", images.ImageDoc),
                404: "no such image",
                503: "the database is down",
            },
        ),
        Route(
            "GET",
            "/api/images/{image_id}/original",
            images.get_original,
            "read",
            "The uploaded bytes, as the type darkroom sniffed from them; downloaded "
            "(Content-Disposition: attachment) unless ?inline=true",
            "images",
            responses={
                200: Reply("the original", content=_ORIGINAL),
                404: "no such image",
                503: "the database is down",
            },
        ),
        Route(
            "GET",
            "/api/images/{image_id}/display",
            images.get_display,
            "read",
            "The display rendition: WebP, sRGB, upright, long edge up to 2048 px",
            "images",
            responses={
                200: Reply("the display rendition", content=_WEBP),
                404: "no such image, or not ingested yet",
                503: "the database is down",
            },
        ),
        Route(
            "GET",
            "/api/images/{image_id}/thumbnail",
            images.get_thumbnail,
            "read",
            "A WebP thumbnail: the smallest size, or ?px= one of ingest.thumb_px",
            "images",
            responses={
                200: Reply("the thumbnail", content=_WEBP),
                404: "no such image, not ingested yet, or no such size",
                503: "the database is down",
            },
        ),
        Route(
            "GET",
            "/api/keys",
            keys_api.list_api_keys,
            "admin",
            "API keys (never their secrets)",
            "keys",
            responses={200: Reply("every key", keys_api.KeyList)},
        ),
        Route(
            "POST",
            "/api/keys",
            keys_api.create_api_key,
            "admin",
            "Create a key; the response holds the secret once",
            "keys",
            responses={
                201: Reply(
                    "created",
                    keys_api.CreatedKey,
                    links={
                        "revoke": Link(keys_api.revoke_api_key, {"key_id": "$response.body#/id"})
                    },
                )
            },
        ),
        Route(
            "DELETE",
            "/api/keys/{key_id}",
            keys_api.revoke_api_key,
            "admin",
            "Revoke a key",
            "keys",
            responses={204: "revoked", 404: "no such key"},
        ),
        *captions.routes(),
        *models_api.routes(),
        *generations.routes(),
        *generate_limits.routes(),
        *search.routes(),
        *openai_api.routes(),
        *openai_images.routes(),
        *events.routes(),
        *sessions.routes(),
        *approvals.routes(),
        *carousel.routes(),
        *deletions.routes(),
        *lineage.routes(),
        *webhooks_api.routes(),
        *timeline.routes(),
        *downloads.routes(),
    ]


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_TEXT = {"text/plain": {"schema": {"type": "string"}}}
_WEBP = {"image/webp": _BINARY}
_ORIGINAL = {"image/*": _BINARY, "application/octet-stream": _BINARY}


def _image_links(image_id: str) -> dict[str, Link]:
    """Where an image id leads: the image, its original and its renditions."""
    return {
        name: Link(handler, {"image_id": image_id})
        for name, handler in (
            ("image", images.get_image),
            ("original", images.get_original),
            ("display", images.get_display),
            ("thumbnail", images.get_thumbnail),
        )
    }


async def openapi(request: web.Request) -> web.Response:
    return json_response(request.app[OPENAPI])


def _own_methods(request: web.Request, exc: web.HTTPException) -> web.HTTPException:
    """A 405 whose Allow names the methods of the path's own routes: aiohttp adds those of
    every route the path matches, and a fixed path (/api/images/counts) also matches the
    {image_id} route beside it (DELETE /api/images/{image_id} is no method of /counts)."""
    if not isinstance(exc, web.HTTPMethodNotAllowed):
        return exc
    own = {method for method, path in request.app[_SCOPE] if path == request.path}
    return web.HTTPMethodNotAllowed(request.method, own) if own else exc


def _unauthorized(detail: str, challenge: str) -> web.Response:
    response = problem_response(401, "Unauthorized", detail)
    response.headers["WWW-Authenticate"] = challenge
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Deny by default: a route runs without a key only if the scope table says PUBLIC. A
    browser's session cookie, or a ticket where the route takes one, stands for its key
    (bus.gateway.sessions)."""
    match = request.match_info
    if match.http_exception is not None:  # no such path or method: nothing is served
        raise _own_methods(request, match.http_exception)
    resource = match.route.resource
    canonical = resource.canonical if resource is not None else ""
    scopes: dict[tuple[str, str], str] = request.app[_SCOPE]
    needed = scopes.get((request.method, canonical))
    if needed == PUBLIC:
        return await handler(request)
    token = sessions.bearer(request)
    if token is None:
        try:
            record = await request.app[sessions.BROWSERS].authenticate(request, canonical)
        except sessions.Refused as exc:
            if exc.status != 401:
                return problem_response(exc.status, "Forbidden", exc.detail)
            return _unauthorized(exc.detail, 'Bearer realm="darkroom", error="invalid_token"')
        if record is None:
            return _unauthorized(
                "send an API key as 'Authorization: Bearer <key>' (a browser: sign in with "
                "POST /api/session)",
                'Bearer realm="darkroom"',
            )
    else:
        record = await request.app[KEYS].authenticate(token)
        if record is None:
            return _unauthorized(
                "this API key is unknown or revoked",
                'Bearer realm="darkroom", error="invalid_token"',
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
    request[access.CALLER] = record
    return await handler(request)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    ctx = request.app[CTX]
    ctx.metrics.http_requests.labels(request.method, route, str(response.status)).inc()
    return response


def default_static_dir() -> Path:
    """The built browser app (``make frontend`` builds it)."""
    return Path(__file__).resolve().parents[2] / "frontend" / "build"


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
    root: Path = request.app[STATIC_DIR]
    target = await asyncio.to_thread(_static_file, root, rel)
    if target is None and not await asyncio.to_thread((root / "index.html").is_file):
        return problem_response(
            503,
            "Service Unavailable",
            f"the browser app is not built in {root}: run `make frontend` (the API works "
            "without it)",
        )
    if target is None:
        return problem_response(404, "Not Found", f"no frontend file for {request.path}")
    headers = {"Content-Security-Policy": request.app[_CSP]}
    if rel.startswith(IMMUTABLE_ASSETS) and target.name != "index.html":
        headers["Cache-Control"] = "public, max-age=31536000, immutable"  # named by their hash
    return web.FileResponse(target, headers=headers)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(NOSNIFF)  # every answer is exactly the type it says


def build_app(ctx: Context, static_dir: Path | None = None) -> web.Application:
    app = web.Application(
        middlewares=[
            metrics_middleware,
            openai_api.openai_errors,  # under /v1, problems in OpenAI's own shape
            problem_middleware,
            auth_middleware,
        ]
    )
    app[CTX] = ctx
    app[STATIC_DIR] = static_dir or ctx.settings.gateway.static_dir or default_static_dir()
    app[openai_api.CHAT_TIMEOUTS] = openai_api.ChatTimeouts()
    scopes: dict[tuple[str, str], str] = {}
    routes = route_table()
    app[OPENAPI] = build_openapi(routes, ctx.settings)
    for route in routes:
        _add_route(app, scopes, route.method, route.path, endpoint(route), route.scope)
    # Last, and never under /api/, /v1/ or on the probes: those answer 404 or 405 themselves.
    _add_route(app, scopes, "GET", FRONTEND_PATHS, static, PUBLIC)
    app[_SCOPE] = scopes
    app[_CSP] = frontend_csp(ctx.settings)
    app[FUNCTIONS] = enabled_names(ctx.settings)
    app.on_response_prepare.append(_security_headers)
    app.cleanup_ctx.append(_read_side)
    app.cleanup_ctx.append(captions.background_tasks)
    app.cleanup_ctx.append(live.lifespan)
    app.cleanup_ctx.append(sessions.lifespan)
    app.cleanup_ctx.append(events.lifespan)  # after live: it hears progress from it
    app.on_shutdown.append(events.shutdown)
    app.cleanup_ctx.append(rejections.sweeper)
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
