"""The gateway's hardening, on the real bus, store and database: deny-by-default auth, how
stored objects and the frontend are served, memory on base64 webhooks, the unknown-key
cache, and the gateway served the way ``darkroom up`` serves it (client hang-ups, requests
aiohttp's parser refuses), plus no credentials in /api/status."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import random
import re
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from aiohttp.typedefs import Handler
from nats.js.errors import KeyNotFoundError
from PIL import Image

from bus.core import subjects
from bus.core.envelope import new_id
from bus.core.settings import Settings
from bus.gateway.app import FRONTEND_CSP, build_app, frontend_csp, route_table
from bus.gateway.routes import PUBLIC
from bus.gateway.state import CTX, KEYS
from bus.runtime.context import Context, open_context
from bus.state.keys import UNKNOWN_TTL_S, mint, store_key
from tests.support.http import auth, form
from tests.support.images import jpeg, png
from tests.support.streams import announce_stored, eventually
from tests.test_gateway import wait_status

pytestmark = [pytest.mark.nats, pytest.mark.s3]

HOOK = "/api/hooks/ingest"
GARBAGE = "zq-echo-me-zq"  # sent in malformed requests: it must never come back


# --- deny by default ------------------------------------------------------------------------


async def _sneaky(request: web.Request) -> web.Response:
    return web.Response(text="served without a key")


async def test_every_route_needs_a_key_unless_marked_public(
    ctx: Context, aiohttp_client: Any, admin: str
) -> None:
    app = build_app(ctx)
    app.router.add_get("/api/sneaky", _sneaky)  # registered outside the route table
    client = await aiohttp_client(app)
    public = {r.path for r in route_table() if r.scope == PUBLIC}
    assert public == {"/healthz", "/readyz"}, "public routes are few, and marked"
    public.add("/{path}")  # the frontend
    walked = 0
    for route in app.router.routes():
        assert route.resource is not None
        canonical = route.resource.canonical
        response = await client.request(route.method, re.sub(r"{\w+}", "x1", canonical))
        if canonical in public:
            assert response.status != 401, (route.method, canonical)
            continue
        walked += 1
        assert response.status == 401, (route.method, canonical, response.status)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        # The OpenAI-compatible routes answer OpenAI's error object, the API problem+json.
        openai = canonical.startswith("/v1/")
        assert response.content_type == (
            "application/json" if openai else "application/problem+json"
        )
    protected = [r for r in route_table() if r.scope != PUBLIC]
    gets = sum(r.method == "GET" for r in protected)
    assert walked == len(protected) + gets + 2, "every route, HEADs and /api/sneaky included"
    # Even a good key may not call a route that declares no scope.
    refused = await client.get("/api/sneaky", headers=auth(admin))
    assert refused.status == 403 and "declares no scope" in (await refused.json())["detail"]
    for method, path in (("POST", "/api/nothing"), ("PUT", "/healthz"), ("DELETE", "/")):
        response = await client.request(method, path)
        assert response.status in (404, 405), (method, path)
        assert response.content_type == "application/problem+json"


# --- serving stored objects and the frontend ------------------------------------------------


async def test_originals_are_served_as_sniffed_and_downloaded_unless_inline(
    client: TestClient[Any, Any], admin: str
) -> None:
    picture = png(48, 48)
    data = form(("holiday.png", picture))  # the part claims application/octet-stream
    response = await client.post("/api/uploads", data=data, headers=auth(admin))
    [result] = (await response.json())["results"]
    await wait_status(client, admin, result["id"], "ready")
    url = f"/api/images/{result['id']}/original"
    got = await client.get(url, headers=auth(admin))
    assert got.status == 200 and await got.read() == picture
    assert got.headers["Content-Type"] == "image/png"
    assert got.headers["X-Content-Type-Options"] == "nosniff"
    assert got.headers["Content-Disposition"] == 'attachment; filename="holiday.png"'
    for query in ("?inline=1", "?inline=true"):
        shown = await client.get(url + query, headers=auth(admin))
        assert shown.headers["Content-Disposition"] == 'inline; filename="holiday.png"'
    bad = await client.get(url + "?inline=maybe", headers=auth(admin))
    assert bad.status == 400 and "inline must be true or false" in (await bad.json())["detail"]
    thumb = await client.get(f"/api/images/{result['id']}/thumbnail", headers=auth(admin))
    assert thumb.headers["Content-Type"] == "image/webp"
    assert thumb.headers["X-Content-Type-Options"] == "nosniff"
    assert "Content-Disposition" not in thumb.headers
    listed = await client.get("/api/images", headers=auth(admin))
    assert listed.headers["X-Content-Type-Options"] == "nosniff"


async def test_a_stored_object_declared_as_html_is_not_served_as_html(
    client: TestClient[Any, Any], admin: str, ctx: Context
) -> None:
    """An event that bypassed the intake names an HTML page with a type of its choosing:
    the gateway goes by the bytes, so even asked to show it inline, no browser renders it."""
    image_id = new_id()
    page = b"<html><script>alert(document.cookie)</script></html>"
    key = f"uploads/{image_id}/page.html"
    await announce_stored(ctx, subjects.UPLOADED, image_id, key, page, "text/html")
    await wait_status(client, admin, image_id, "failed")  # ingest refuses it, as it must
    got = await client.get(f"/api/images/{image_id}/original?inline=1", headers=auth(admin))
    assert got.status == 200 and await got.read() == page
    assert got.headers["Content-Type"] == "application/octet-stream"
    assert got.headers["X-Content-Type-Options"] == "nosniff"
    assert got.headers["Content-Disposition"] == 'inline; filename="page.bin"'


async def test_the_frontend_gets_a_strict_content_security_policy(
    client: TestClient[Any, Any],
) -> None:
    policy = frontend_csp(client.app[CTX].settings)
    store = client.app[CTX].settings.s3.endpoint
    assert policy == f"{FRONTEND_CSP}; connect-src 'self' {store}"  # presigned posts go there
    for path in ("/", "/gallery/anything"):
        page = await client.get(path)
        assert page.status == 200
        assert page.headers["Content-Security-Policy"] == policy
        assert page.headers["X-Content-Type-Options"] == "nosniff"
    html = await (await client.get("/")).text()
    # The policy allows no inline code or style: the page must need none.
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "an inline script"
    assert "<style" not in html and not re.search(r"\s(style|on\w+)=", html)
    for asset in re.findall(r'(?:src|href)="(/[^"]+)"', html):
        response = await client.get(asset)
        assert response.status == 200, asset
        assert response.content_type in ("text/javascript", "application/javascript", "text/css")
        if asset.startswith("/_app/immutable/"):  # named by their hash: cached for good
            assert "immutable" in response.headers["Cache-Control"], asset
    assert "immutable" not in (await client.get("/")).headers.get("Cache-Control", "")
    assert "script-src" not in FRONTEND_CSP and "unsafe" not in FRONTEND_CSP
    assert "default-src 'self'" in FRONTEND_CSP and "frame-ancestors 'none'" in FRONTEND_CSP


async def test_without_a_built_app_the_pages_say_how_to_build_it(
    ctx: Context, aiohttp_client: Any, tmp_path: Any, admin: str
) -> None:
    api = await aiohttp_client(build_app(ctx, static_dir=tmp_path / "nothing-built"))
    page = await api.get("/gallery")
    assert page.status == 503
    assert page.content_type == "application/problem+json"
    assert "make frontend" in (await page.json())["detail"]
    assert (await api.get("/api/images", headers=auth(admin))).status == 200  # the API works


# --- memory on base64 webhooks --------------------------------------------------------------


def noisy_png(seed: int, width: int = 800, height: int = 800) -> bytes:
    """A PNG that does not compress: about 3 bytes a pixel."""
    pixels = random.Random(seed).randbytes(width * height * 3)
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(out, "PNG", compress_level=1)
    return out.getvalue()


async def peak_memory(client: TestClient[Any, Any], body: bytes, headers: dict[str, str]) -> int:
    """The most memory Python held while the hook took ``body``, streamed to it."""

    async def sent() -> AsyncIterator[bytes]:  # in pieces, so the client holds no copy
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    tracemalloc.start()
    try:
        response = await client.post(HOOK, data=sent(), headers=headers)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status == 201, await response.text()
    return peak


async def test_a_base64_hook_holds_the_image_about_once(
    ctx: Context, aiohttp_client: Any, make_key: Callable[..., Awaitable[str]]
) -> None:
    """Measured against the same size of image sent as raw bytes, which the gateway streams:
    what is left is what the JSON form costs."""
    client = await aiohttp_client(build_app(ctx))
    headers = auth(await make_key("upload"))
    picture = noisy_png(2)
    as_png = {**headers, "Content-Type": "image/png"}
    await peak_memory(client, noisy_png(0), as_png)  # the first upload sets things up
    baseline = await peak_memory(client, noisy_png(1), as_png)
    body = b'{"filename": "noise.png", "data": "' + base64.b64encode(picture) + b'"}'
    peak = await peak_memory(client, body, {**headers, "Content-Type": "application/json"})
    # Reading the body whole, parsing it, then decoding held about 4 images more than that.
    assert peak - baseline < len(picture) / 2, f"{peak:,} vs {baseline:,} bytes"


# --- the unknown-key cache ------------------------------------------------------------------


async def test_an_unknown_key_costs_one_lookup_not_one_per_request(
    client: TestClient[Any, Any], ctx: Context
) -> None:
    token, record = mint("never stored", ("read",))
    lookups: list[str] = []

    async def seen(msg: Any) -> None:  # every KV read goes to JetStream's API, over NATS
        lookups.append(msg.subject + msg.data.decode(errors="replace"))

    sub = await ctx.nc.subscribe("$JS.API.>", cb=seen)
    await ctx.nc.flush()
    try:
        for _ in range(5):
            response = await client.get("/api/images", headers=auth(token))
            assert response.status == 401
        sentinel = "sentinel" + new_id()[:8]
        with pytest.raises(KeyNotFoundError):
            await ctx.api_keys.get(sentinel)
        await eventually(lambda: any(sentinel in s for s in lookups), what="the sentinel")
    finally:
        await sub.unsubscribe()
    assert sum(record.id in s for s in lookups) == 1, lookups


async def test_a_key_stored_after_it_was_unknown_works(
    client: TestClient[Any, Any], ctx: Context
) -> None:
    keys = client.app[KEYS]
    token, record = mint("later", ("read",))
    assert await keys.authenticate(token) is None  # now remembered as unknown
    await store_key(ctx.api_keys, record)
    keys.forget_unknown(record.id)  # what creating a key through this gateway does
    assert await keys.authenticate(token) == record
    # Stored by another process: this gateway learns of it within UNKNOWN_TTL_S at most.
    token, record = mint("elsewhere", ("read",))
    assert await keys.authenticate(token) is None
    await store_key(ctx.api_keys, record)
    await eventually(lambda: keys.authenticate(token), timeout=UNKNOWN_TTL_S + 5)


# --- served as darkroom up serves it --------------------------------------------------------

Serve = Callable[[web.Application], Awaitable[tuple[str, int]]]


@pytest.fixture
def serve(aiohttp_server: Any) -> Serve:
    """Factory: serve an app on 127.0.0.1 as ``darkroom up`` does (the conftest's
    aiohttp_server); its host and port."""

    async def start(app: web.Application) -> tuple[str, int]:
        server = await aiohttp_server(app)
        return server.host, server.port

    return start


async def exchange(address: tuple[str, int], raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` as it is; the status, headers and body of the answer, read to the end
    (the server closes the connection after an error, or when asked)."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(raw)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def errors_and_tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR or r.exc_info
    ]


async def test_a_client_that_hangs_up_mid_upload_leaves_nothing_and_no_error(
    ctx: Context, serve: Serve, admin: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = build_app(ctx)
    started, finished = asyncio.Event(), asyncio.Event()

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Outermost, so it only watches: when the upload's handling begins and ends."""
        if request.path != "/api/uploads":
            return await handler(request)
        started.set()
        try:
            return await handler(request)
        finally:
            finished.set()

    app.middlewares.insert(0, observe)
    address = await serve(app)
    caplog.set_level(logging.INFO, logger="darkroom")
    photo = jpeg(1600, 1200)
    boundary = "xyzzy"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + photo[: len(photo) // 2]
    head = (
        f"POST /api/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body) + len(photo)}\r\n\r\n"
    )
    _, writer = await asyncio.open_connection(*address)
    writer.write(head.encode() + body)
    await writer.drain()
    await started.wait()  # the upload is being handled; its body cannot be complete
    writer.close()  # gone, half-way through the file
    await finished.wait()  # the handler is done, clean-up and logging included
    healthz = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, _, _ = await exchange(address, healthz)
    assert status == 200, "the server carries on"
    assert await ctx.store.list_keys("uploads/") == []
    assert (await ctx.js.stream_info(ctx.names.stream)).state.messages == 0, "announced"
    assert not errors_and_tracebacks(caplog)
    assert any("hung up" in r.getMessage() for r in caplog.records), "the hang-up is noted"


@pytest.mark.parametrize(
    ("case", "raw"),
    [
        ("oversize header", f"GET / HTTP/1.1\r\nHost: x\r\nX-{GARBAGE}: {'A' * 9000}\r\n\r\n"),
        ("oversize path", f"GET /{GARBAGE}{'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n"),
        (
            "too many headers",
            "GET / HTTP/1.1\r\nHost: x\r\n" + f"X-{GARBAGE}: 1\r\n" * 200 + "\r\n",
        ),
        ("bad Content-Length", f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1{GARBAGE}\r\n\r\n"),
        ("raw UTF-8 in the path", f"GET /café-{GARBAGE}<script> HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("missing Host", f"GET /{GARBAGE} HTTP/1.1\r\n\r\n"),
        ("bad request line", f"GET /{GARBAGE} HTTP/1.1 {GARBAGE}\r\nHost: x\r\n\r\n"),
        ("bad header", f"GET / HTTP/1.1\r\nHost: x\r\n{GARBAGE}\r\n\r\n"),
    ],
)
async def test_requests_the_parser_refuses_get_a_problem_that_quotes_nothing(
    ctx: Context, serve: Serve, caplog: pytest.LogCaptureFixture, case: str, raw: str
) -> None:
    address = await serve(build_app(ctx))
    caplog.set_level(logging.DEBUG, logger="darkroom")
    status, headers, body = await exchange(address, raw.encode())
    assert status == 400, case
    assert headers["Content-Type"] == "application/problem+json", case
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert GARBAGE.encode() not in body and b"9000" not in body, body
    assert b'"detail"' in body
    assert not errors_and_tracebacks(caplog), case
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) <= 1 and GARBAGE not in "".join(r.getMessage() for r in warnings)


# --- no credentials in /api/status ----------------------------------------------------------


async def test_status_shows_no_password_of_the_store_url(
    settings: Settings, aiohttp_client: Any
) -> None:
    assert settings.s3.endpoint is not None
    scheme, rest = settings.s3.endpoint.split("://", 1)
    with_password = settings.model_copy(
        update={"s3": settings.s3.model_copy(update={"endpoint": f"{scheme}://ops:hunter2@{rest}"})}
    )
    async with open_context(with_password, [], "test", database=True) as ctx:
        token, record = mint("viewer", ("read",))
        await store_key(ctx.api_keys, record)
        client = await aiohttp_client(build_app(ctx))
        response = await client.get("/api/status", headers=auth(token))
        assert response.status == 200
        text = await response.text()
        assert "hunter2" not in text
        assert (await response.json())["store"]["url"] == f"{scheme}://ops:***@{rest}"
