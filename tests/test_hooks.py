"""The ingest webhook on the real bus and store: raw bytes, base64 JSON and URL fetches.

The upstream of a fetch is a real aiohttp server on 127.0.0.1. It is only reachable
because these tests allow the loopback network; without that the fetcher refuses it, as it
must refuse every internal address.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bus.core.settings import FetchSettings, IngestSettings, Settings
from bus.gateway.app import build_app
from bus.gateway.hooks import json_limit
from bus.gateway.jsonbody import HookJson, decode_base64
from bus.gateway.problems import Problem
from bus.intake.fetch import (
    FetchError,
    PinnedResolver,
    address_refusal,
    check_url,
    host_allowed,
    resolve_vetted,
)
from bus.runtime.context import Context
from bus.runtime.registry import load
from tests.support.http import auth
from tests.support.images import jpeg, png
from tests.test_gateway import wait_status

pytestmark = [pytest.mark.nats, pytest.mark.s3]

HOOK = "/api/hooks/ingest"
PHOTO = jpeg(96, 64, (30, 160, 40))
# How long the slow upstream dawdles, and the fetch limit in those tests. Both run on the
# test's event loop, so the fetch's deadline (earlier) always fires before the upstream's.
SLOW_S, LIMIT_S = 2.0, 0.4
LOOPBACK = ("127.0.0.0/8", "::1/128")  # localhost may resolve to either
Gateway = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings with a 1 MiB size limit, so over-limit bodies stay small."""
    return settings.model_copy(update={"ingest": IngestSettings(max_upload_mb=1)})


@pytest.fixture
async def uploader(make_key: Callable[..., Awaitable[str]]) -> str:
    return await make_key("upload")


@pytest.fixture
async def reader(make_key: Callable[..., Awaitable[str]]) -> str:
    return await make_key("read")


@pytest.fixture
def gateway(ctx: Context, aiohttp_client: Any) -> Gateway:
    """Factory: a gateway client whose ``ingest.fetch`` settings are the given ones."""

    async def make(**fetch: Any) -> TestClient[Any, Any]:
        ingest = ctx.settings.ingest.model_copy(update={"fetch": FetchSettings(**fetch)})
        settings = ctx.settings.model_copy(update={"ingest": ingest})
        client: TestClient[Any, Any] = await aiohttp_client(
            build_app(dataclasses.replace(ctx, settings=settings))
        )
        return client

    return make


async def _photo(request: web.Request) -> web.Response:
    return web.Response(body=PHOTO, content_type="image/jpeg")


async def _moved(request: web.Request) -> web.Response:
    raise web.HTTPFound("/photo.jpg")


async def _slow_headers(request: web.Request) -> web.Response:
    await asyncio.sleep(SLOW_S)
    return await _photo(request)


async def _stream(request: web.Request, pieces: list[bytes], pause: float = 0.0) -> None:
    response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):  # the fetcher may hang up early, rightly
        for piece in pieces:
            await response.write(piece)
            await asyncio.sleep(pause)
        await response.write_eof()


async def _stalled_body(request: web.Request) -> web.StreamResponse:
    await _stream(request, [PHOTO[:1000], PHOTO[1000:]], pause=SLOW_S)
    return web.Response()  # not sent: the stream above is the response


async def _endless(request: web.Request) -> web.StreamResponse:
    """A JPEG-looking body with no Content-Length that runs past the 1 MiB limit."""
    await _stream(request, [PHOTO[:64]] + [b"\0" * 65536] * 24)
    return web.Response()


async def _declared_big(request: web.Request) -> web.Response:
    return web.Response(body=PHOTO[:64] + b"\0" * (1 << 20), content_type="image/jpeg")


@pytest.fixture
async def upstream(aiohttp_server: Any) -> TestServer:
    app = web.Application()
    app.router.add_get("/photo.jpg", _photo)
    app.router.add_get("/moved", _moved)
    app.router.add_get("/slow.jpg", _slow_headers)
    app.router.add_get("/stalled.jpg", _stalled_body)
    app.router.add_get("/endless.jpg", _endless)
    app.router.add_get("/big.jpg", _declared_big)
    server: TestServer = await aiohttp_server(app)
    return server


def at(server: TestServer, path: str) -> str:
    return f"http://localhost:{server.port}{path}"


async def fetch(client: TestClient[Any, Any], key: str, url: str) -> tuple[int, dict[str, Any]]:
    response = await client.post(HOOK, json={"url": url}, headers=auth(key))
    return response.status, await response.json(content_type=None)


async def last_hook_origin(ctx: Context) -> Any:
    msg = await ctx.js.get_last_msg(ctx.names.stream, ctx.names.subject("uploaded"))
    return orjson.loads(msg.data or b"{}")["data"]["hook"]


# --- raw bytes and base64 ------------------------------------------------------------------


async def test_raw_bytes_travel_the_whole_chain(
    gateway: Gateway, run_function: Any, uploader: str, reader: str
) -> None:
    for name in ("ingest", "caption", "notify"):
        await run_function(load(name))
    client = await gateway()
    original = jpeg(200, 150, (20, 20, 200))

    async def body() -> AsyncIterator[bytes]:  # sent chunked, so streamed on both sides
        for start in range(0, len(original), 1000):
            yield original[start : start + 1000]

    response = await client.post(
        f"{HOOK}?filename=hook%20shot.jpg",
        data=body(),
        headers={**auth(uploader), "Content-Type": "image/jpeg"},
    )
    assert response.status == 201, await response.text()
    result = await response.json()
    assert result["name"] == "hook shot.jpg" and result["stored_name"] == "hook_shot.jpg"
    doc = await wait_status(client, reader, result["id"], "ready")
    assert doc["source"] == "hook" and doc["ingest"]["width"] == 200
    got = await client.get(f"/api/images/{result['id']}/original", headers=auth(reader))
    assert await got.read() == original

    again = await client.post(
        HOOK,
        data=original,
        headers={**auth(uploader), "Content-Disposition": 'attachment; filename="copy.jpg"'},
    )
    assert again.status == 200
    duplicate = await again.json()
    assert duplicate["duplicate"] is True and duplicate["id"] == result["id"]
    assert duplicate["name"] == "copy.jpg"


async def test_the_hook_needs_the_upload_scope(gateway: Gateway, reader: str) -> None:
    client = await gateway()
    response = await client.post(HOOK, data=PHOTO, headers=auth(reader))
    assert response.status == 403
    assert "lacks the 'upload' scope" in (await response.json())["detail"]
    assert (await client.post(HOOK, data=PHOTO)).status == 401


async def test_base64_json_is_accepted_standard_or_urlsafe(
    gateway: Gateway, uploader: str, ctx: Context
) -> None:
    client = await gateway()
    picture = png(48, 48, (10, 200, 10, 255))
    response = await client.post(
        HOOK,
        json={"filename": "b64.png", "data": base64.b64encode(picture).decode()},
        headers=auth(uploader),
    )
    assert response.status == 201, await response.text()
    result = await response.json()
    assert result["stored_name"] == "b64.png" and result["content_type"] == "image/png"
    assert await last_hook_origin(ctx) == {"kind": "base64"}
    assert await ctx.store.get_bytes(f"uploads/{result['id']}/b64.png") == picture

    unpadded = base64.urlsafe_b64encode(PHOTO).decode().rstrip("=")
    response = await client.post(HOOK, json={"data": unpadded}, headers=auth(uploader))
    assert response.status == 201
    assert (await response.json())["sha256"] != result["sha256"]


async def test_bad_json_bodies_get_clear_problems(gateway: Gateway, uploader: str) -> None:
    client = await gateway()
    cases: list[tuple[Any, int, str]] = [
        ({"data": "not*base64!"}, 422, "not valid base64"),
        ({"data": "QUJDRA=x"}, 422, "not valid base64"),
        ({"data": "QUJD\U0001f600"}, 422, "not valid base64"),  # sent as a surrogate pair
        ({"data": 12}, 422, "data must be a string, got 12"),
        ({"filename": "a.jpg"}, 422, "exactly one of 'data'"),
        ({"data": "QUJD", "url": "https://x.example/a.jpg"}, 422, "exactly one of 'data'"),
        ({"data": "QUJD", "url": 5}, 422, "exactly one of 'data'"),
        ({"url": "https://x.example/a.jpg", "data": None}, 422, "exactly one of 'data'"),
        ({"data": "QUJD", "filename": 7}, 422, "filename must be a string, got 7"),
        (["data"], 400, "must be a JSON object"),
    ]
    for body, status, detail in cases:
        response = await client.post(HOOK, json=body, headers=auth(uploader))
        assert response.status == status, body
        assert response.content_type == "application/problem+json"
        assert detail in (await response.json())["detail"], body
    broken = await client.post(
        HOOK, data=b'{"data": ', headers={**auth(uploader), "Content-Type": "application/json"}
    )
    assert broken.status == 400


async def _raw_exchange(client: TestClient[Any, Any], head: str, body: bytes) -> tuple[int, str]:
    """Send a request by hand (to control what is sent); the status and body of the answer."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        header = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = header.decode().split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        answer = await reader.readexactly(int(fields["Content-Length"]))
        return int(lines[0].split()[1]), answer.decode()
    finally:
        writer.close()


async def test_an_oversize_json_body_is_refused_before_it_is_read(
    gateway: Gateway, uploader: str, ctx: Context
) -> None:
    client = await gateway()
    limit = json_limit(ctx.settings.ingest.max_bytes)
    start = (
        f"POST {HOOK} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {uploader}\r\n"
        "Content-Type: application/json\r\n"
    )
    # 10 GB announced, 20 bytes sent: the answer can only come from the announcement.
    status, answer = await _raw_exchange(
        client, start + "Content-Length: 10000000000\r\n\r\n", b'{"data": "QUJDRA==",'
    )
    assert status == 413 and "at most" in answer
    # No length announced: refused once the bytes read pass the limit, before the end.
    opening = b'{"data": "'
    chunks = b"%x\r\n%s\r\n" % (len(opening), opening) + b"".join(
        b"%x\r\n%s\r\n" % (65536, b"A" * 65536) for _ in range(limit // 65536 + 2)
    )
    status, answer = await _raw_exchange(
        client, start + "Transfer-Encoding: chunked\r\n\r\n", chunks
    )
    assert status == 413 and "raw bytes" in answer
    assert await ctx.store.list_keys("uploads/") == []


async def test_text_is_refused_and_nothing_is_stored(
    gateway: Gateway, uploader: str, ctx: Context
) -> None:
    client = await gateway()
    response = await client.post(
        HOOK,
        data=b"just some notes, not a picture at all",
        headers={**auth(uploader), "Content-Type": "text/plain"},
    )
    assert response.status == 415 and response.content_type == "application/problem+json"
    assert "not a supported image" in (await response.json())["detail"]
    empty = await client.post(HOOK, data=b"", headers=auth(uploader))
    assert empty.status == 422
    assert await ctx.store.list_keys("uploads/") == []


# --- URLs -----------------------------------------------------------------------------------


async def test_the_url_form_is_off_by_default(
    gateway: Gateway, uploader: str, upstream: TestServer
) -> None:
    client = await gateway()
    status, problem = await fetch(client, uploader, at(upstream, "/photo.jpg"))
    assert status == 403 and problem["title"] == "Fetching is off"
    assert "[ingest.fetch] enabled = true" in problem["detail"]


async def test_only_allowed_hosts_and_schemes_are_fetched(
    gateway: Gateway, uploader: str, upstream: TestServer
) -> None:
    client = await gateway(enabled=True, allow_hosts=("images.example.com",))
    status, problem = await fetch(client, uploader, at(upstream, "/photo.jpg"))
    assert status == 403 and "localhost is not an allowed host" in problem["detail"]
    status, problem = await fetch(client, uploader, "ftp://images.example.com/a.jpg")
    assert status == 403 and "only http and https" in problem["detail"]
    status, problem = await fetch(client, uploader, "https://u:p@images.example.com/a.jpg")
    assert status == 422 and "credentials" in problem["detail"]
    status, problem = await fetch(client, uploader, "images.example.com/a.jpg")
    assert status == 403  # no scheme is no http


async def test_loopback_is_refused_even_for_an_allowed_host(
    gateway: Gateway, uploader: str, upstream: TestServer, ctx: Context
) -> None:
    client = await gateway(enabled=True, allow_hosts=("LocalHost",))
    status, problem = await fetch(client, uploader, at(upstream, "/photo.jpg"))
    assert status == 403, problem
    assert "127.0.0.1 (loopback)" in problem["detail"] and "allow_networks" in problem["detail"]
    assert await ctx.store.list_keys("uploads/") == []


async def test_a_fetch_from_an_allowed_network_is_stored(
    gateway: Gateway, uploader: str, upstream: TestServer, ctx: Context
) -> None:
    client = await gateway(enabled=True, allow_hosts=("localhost",), allow_networks=LOOPBACK)
    url = at(upstream, "/photo.jpg")
    status, result = await fetch(client, uploader, url)
    assert status == 201, result
    assert result["stored_name"] == "photo.jpg" and result["size"] == len(PHOTO)
    key = f"uploads/{result['id']}/photo.jpg"
    assert await ctx.store.list_keys("uploads/") == [key]
    assert await ctx.store.get_bytes(key) == PHOTO
    assert await last_hook_origin(ctx) == {"kind": "url", "url": url}
    response = await client.post(
        HOOK, json={"url": url, "filename": "again.jpg"}, headers=auth(uploader)
    )
    assert response.status == 200
    assert (await response.json())["id"] == result["id"]


async def test_redirects_and_upstream_errors_are_reported_not_followed(
    gateway: Gateway, uploader: str, upstream: TestServer, ctx: Context
) -> None:
    client = await gateway(enabled=True, allow_hosts=("localhost",), allow_networks=LOOPBACK)
    status, problem = await fetch(client, uploader, at(upstream, "/moved"))
    assert status == 422
    assert problem["detail"] == (
        f"the URL redirects to {at(upstream, '/photo.jpg')}; fetch the final URL"
    )
    status, problem = await fetch(client, uploader, at(upstream, "/missing.jpg"))
    assert status == 502 and "answered 404 Not Found" in problem["detail"]
    assert await ctx.store.list_keys("uploads/") == []


async def test_a_slow_upstream_times_out(
    gateway: Gateway, uploader: str, upstream: TestServer, ctx: Context
) -> None:
    client = await gateway(
        enabled=True, allow_hosts=("localhost",), allow_networks=LOOPBACK, timeout_s=LIMIT_S
    )
    for path in ("/slow.jpg", "/stalled.jpg"):  # before the headers, then mid-body
        started = time.monotonic()
        status, problem = await fetch(client, uploader, at(upstream, path))
        # Given SLOW_S the upstream sends the whole photo: a 504 rather than a stored photo
        # shows the fetch gave up before then, by its own limit.
        assert status == 504, (path, problem)
        assert f"longer than {LIMIT_S:g} s" in problem["detail"]
        assert time.monotonic() - started >= LIMIT_S, "gave up before its limit"
    assert await ctx.store.list_keys("uploads/") == []


async def test_an_oversize_upstream_body_is_refused(
    gateway: Gateway, uploader: str, upstream: TestServer, ctx: Context
) -> None:
    client = await gateway(enabled=True, allow_hosts=("localhost",), allow_networks=LOOPBACK)
    for path in ("/endless.jpg", "/big.jpg"):  # streamed without a length, then announced
        status, problem = await fetch(client, uploader, at(upstream, path))
        assert status == 413, (path, problem)
        assert f"limit of {ctx.settings.ingest.max_bytes:,} bytes" in problem["detail"]
    assert await ctx.store.list_keys("uploads/") == []


# --- the pure parts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("::ffff:127.0.0.1", "IPv4-mapped 127.0.0.1, loopback"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "CGNAT"),
        ("10.0.0.1", "private"),
        ("192.168.1.20", "private"),
        ("127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fc00::1", "private"),
        ("fe80::1", "link-local"),
        ("fec0::1", "site-local"),
        ("ff02::1", "multicast"),
        ("2002:a00:1::1", "leads to 10.0.0.1, private"),  # 6to4
        ("::ffff:10.1.2.3", "IPv4-mapped 10.1.2.3, private"),
        ("93.184.216.34", None),
        ("::ffff:93.184.216.34", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_checks(address: str, reason: str | None) -> None:
    found = address_refusal(ipaddress.ip_address(address))
    if reason is None:
        assert found is None
    else:
        assert found is not None and reason in found


def test_allowed_networks_open_exactly_themselves() -> None:
    lan = (ipaddress.ip_network("192.168.1.0/24"), ipaddress.ip_network("127.0.0.0/8"))
    assert address_refusal(ipaddress.ip_address("192.168.1.20"), lan) is None
    assert address_refusal(ipaddress.ip_address("::ffff:127.0.0.1"), lan) is None
    assert address_refusal(ipaddress.ip_address("192.168.2.20"), lan) is not None
    assert address_refusal(ipaddress.ip_address("::1"), lan) is not None
    assert address_refusal(ipaddress.ip_address("169.254.169.254"), lan) is not None


def test_host_allow_list() -> None:
    allowed = ("images.example.com", "*.cdn.example.com")
    assert host_allowed("IMAGES.example.com.", allowed)
    assert host_allowed("eu.cdn.example.com", allowed)
    assert host_allowed("a.b.cdn.example.com", allowed)
    assert not host_allowed("cdn.example.com", allowed)
    assert not host_allowed("evilcdn.example.com", allowed)
    assert not host_allowed("images.example.com.evil.net", allowed)
    assert not host_allowed("example.com", allowed)
    assert not host_allowed("anything", ())
    with pytest.raises(FetchError) as refused:
        check_url("http://" + "a" * 3000, allowed)
    assert refused.value.status == 422


async def test_resolution_is_vetted_once_and_pinned() -> None:
    with pytest.raises(FetchError) as refused:
        await resolve_vetted("localhost", 80)
    assert refused.value.status == 403 and "loopback" in refused.value.detail
    vetted = await resolve_vetted("localhost", 80, [ipaddress.ip_network(n) for n in LOOPBACK])
    assert vetted and all(ipaddress.ip_address(r["host"]).is_loopback for r in vetted)
    resolver = PinnedResolver("localhost", vetted)
    answered = await resolver.resolve("localhost", 8080, socket.AF_UNSPEC)
    assert [r["host"] for r in answered] == [r["host"] for r in vetted]
    assert {r["port"] for r in answered} == {8080}
    with pytest.raises(OSError, match="not vetted"):
        await resolver.resolve("elsewhere.example", 80)


def test_base64_decoding() -> None:
    raw = bytes(range(256)) * 3 + b"\xfb\xff"
    assert decode_base64(base64.b64encode(raw).decode()) == raw
    assert decode_base64(base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw
    wrapped = base64.encodebytes(raw).decode()  # MIME style, with newlines
    assert decode_base64(wrapped) == raw
    for bad in ("A", "abc$", "é123"):
        with pytest.raises(ValueError, match="not valid base64"):
            decode_base64(bad)


RAW = bytes(range(256)) * 4 + b"\xfb\xff"
B64 = base64.b64encode(RAW).decode()
SLASHES_ESCAPED = B64.replace("/", "\\/")  # as PHP writes it
LINES_ESCAPED = base64.encodebytes(RAW).decode().replace("\n", "\\n")  # MIME line breaks
URLSAFE = base64.urlsafe_b64encode(RAW).decode().rstrip("=")


def split_hook_json(body: str, size: int) -> tuple[dict[str, Any], bytes | None]:
    """``body`` fed to HookJson in pieces of ``size`` bytes: its fields and its image."""
    reader = HookJson(4096)
    raw = body.encode()
    for start in range(0, len(raw), size):
        reader.feed(raw[start : start + size])
    fields = reader.finish()
    return fields, None if reader.image is None else b"".join(reader.image)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1 << 20])
@pytest.mark.parametrize(
    ("body", "fields"),
    [
        (f'{{"filename": "a.png", "data": "{B64}"}}', {"filename": "a.png", "data": True}),
        # Escaped slashes, escaped line breaks, an escaped key.
        (f'{{"data": "{SLASHES_ESCAPED}", "x": 1}}', {"data": True, "x": 1}),
        (f'{{"d\\u0061ta" : "{LINES_ESCAPED}"}}', {"data": True}),
        # "data" as a value, or deeper down, is just a field.
        (
            f'{{"filename": "data", "meta": {{"data": "x", "l": ["data"]}}, "data":"{B64}"}}',
            {"filename": "data", "meta": {"data": "x", "l": ["data"]}, "data": True},
        ),
        (f'{{"data": "{URLSAFE}"}}', {"data": True}),
    ],
)
def test_hook_json_decodes_data_the_same_in_any_pieces(
    body: str, fields: dict[str, Any], size: int
) -> None:
    assert split_hook_json(body, size) == (fields, RAW)


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ('{"data": "QUJD", "data": "QUJD"}', 422, "given twice"),
        ('{"data": "QU\tJD"}', 400, "raw control character"),
        ('{"data": "QUJD', 400, "ends inside"),
        ('{"data": "QU\\xJD"}', 400, "invalid escape"),
        ('{"data": "QUJD" "x"}', 400, "unexpected"),
        ('{"data": "QUJD=A"}', 422, "after its padding"),
        ('{"url": "' + "u" * 5000 + '"}', 413, "at most 4,096 bytes"),
        ('[{"data": "QUJD"}]', 400, "must be a JSON object"),
    ],
)
def test_hook_json_refusals(body: str, status: int, detail: str) -> None:
    with pytest.raises(Problem) as refused:
        split_hook_json(body, 3)
    assert refused.value.status == status and detail in refused.value.detail
