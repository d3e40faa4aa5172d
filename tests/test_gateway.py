"""The gateway over HTTP on the real bus and store: auth, uploads through the whole chain,
reads, keys, status, dead letters and the OpenAPI document."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from bus.core import subjects
from bus.core.envelope import new_id
from bus.gateway.app import build_app, route_table
from bus.runtime.context import Context
from tests.support.http import auth, form
from tests.support.images import jpeg, png
from tests.support.streams import announce_stored, settled

pytestmark = [pytest.mark.nats, pytest.mark.s3]


async def wait_status(
    client: TestClient[Any, Any], token: str, image_id: str, *statuses: str
) -> dict[str, Any]:
    for _ in range(600):  # 30 s: a loaded machine takes a while to build the demo models
        response = await client.get(f"/api/images/{image_id}", headers=auth(token))
        if response.status == 200:
            doc: dict[str, Any] = await response.json()
            if doc["status"] in statuses:
                return doc
        await asyncio.sleep(0.05)
    raise AssertionError(f"image {image_id} never reached {statuses}")


async def test_health_checks_are_public_everything_else_needs_a_key(
    client: TestClient[Any, Any], admin: str
) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    checks = (await ready.json())["checks"]
    assert ready.status == 200 and checks == {"nats": "ok", "s3": "ok", "postgres": "ok"}
    for path in ("/api/images", "/metrics", "/api/status", "/api/openapi.json"):
        response = await client.get(path)
        assert response.status == 401, path
        assert response.content_type == "application/problem+json"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    bad = await client.get("/api/images", headers=auth("drk_aaaaaaaaaaaa_" + "x" * 40))
    assert bad.status == 401 and "unknown or revoked" in (await bad.json())["detail"]
    assert (await client.get("/api/images", headers=auth(admin))).status == 200


async def test_scopes_are_enforced_and_revocation_is_immediate(
    client: TestClient[Any, Any], admin: str
) -> None:
    response = await client.post(
        "/api/keys", json={"name": "viewer", "scopes": ["read"]}, headers=auth(admin)
    )
    assert response.status == 201
    created = await response.json()
    viewer = created["key"]
    assert (await client.get("/api/images", headers=auth(viewer))).status == 200
    denied = await client.post("/api/uploads", data=form(("a.jpg", jpeg())), headers=auth(viewer))
    assert denied.status == 403 and "lacks the 'upload' scope" in (await denied.json())["detail"]
    assert (await client.get("/api/keys", headers=auth(viewer))).status == 403
    listed = await (await client.get("/api/keys", headers=auth(admin))).json()
    assert created["id"] in [k["id"] for k in listed["items"]]
    assert all("digest" not in k and "key" not in k for k in listed["items"])
    assert (await client.delete(f"/api/keys/{created['id']}", headers=auth(admin))).status == 204
    for _ in range(50):
        if (await client.get("/api/images", headers=auth(viewer))).status == 401:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("a revoked key still works")
    bad = await client.post(
        "/api/keys", json={"name": "x", "scopes": ["root"]}, headers=auth(admin)
    )
    assert bad.status == 422 and "scopes[0] must be one of 'read'" in (await bad.json())["detail"]


async def test_upload_travels_the_whole_chain(client: TestClient[Any, Any], admin: str) -> None:
    original = jpeg(640, 480, (200, 20, 20))
    response = await client.post(
        "/api/uploads", data=form(("../../etc/red photo.jpg", original)), headers=auth(admin)
    )
    assert response.status == 201
    [result] = (await response.json())["results"]
    assert result["stored_name"] == "red_photo.jpg" and result["content_type"] == "image/jpeg"
    doc = await wait_status(client, admin, result["id"], "ready")
    assert doc["ingest"]["width"] == 640 and doc["ingest"]["format"] == "JPEG"
    assert "color:red" in doc["tags"]  # the demo SigLIP adds random tags of its own
    assert list(doc["stages"]) == ["uploaded", "ingested", "captioned"]
    got = await client.get(f"/api/images/{result['id']}/original", headers=auth(admin))
    assert got.status == 200 and await got.read() == original
    thumb = await client.get(f"/api/images/{result['id']}/thumbnail", headers=auth(admin))
    assert thumb.status == 200 and thumb.content_type == "image/webp"
    assert (await thumb.read())[8:12] == b"WEBP"


async def test_mixed_uploads_report_per_file_and_store_only_the_good(
    client: TestClient[Any, Any], admin: str, ctx: Context
) -> None:
    files = [("ok.png", png()), ("notes.jpg", b"just some text, not a picture"), ("empty.jpg", b"")]
    response = await client.post("/api/uploads", data=form(*files), headers=auth(admin))
    assert response.status == 207
    results = (await response.json())["results"]
    assert [r["status"] for r in results] == [201, 415, 422]
    assert "sniffed from its bytes" in results[1]["error"] and "empty" in results[2]["error"]
    keys = await ctx.store.list_keys("uploads/")
    assert keys == [f"uploads/{results[0]['id']}/ok.png"]


async def test_all_rejected_is_a_problem_and_oversize_is_refused_while_streaming(
    client: TestClient[Any, Any], admin: str, ctx: Context
) -> None:
    response = await client.post(
        "/api/uploads", data=form(("a.gif", b"GIF8 nope")), headers=auth(admin)
    )
    assert response.status == 415 and response.content_type == "application/problem+json"
    limit = ctx.settings.ingest.max_bytes
    big = b"\xff\xd8\xff\xe0" + b"\0" * (limit + 1)
    response = await client.post("/api/uploads", data=form(("big.jpg", big)), headers=auth(admin))
    assert response.status == 413
    assert "larger than the limit" in (await response.json())["detail"]
    assert await ctx.store.list_keys("uploads/") == []
    no_files = await client.post("/api/uploads", data={"x": "1"}, headers=auth(admin))
    assert no_files.status == 415


async def test_a_corrupt_image_is_refused_and_nothing_is_stored(
    client: TestClient[Any, Any], admin: str, ctx: Context
) -> None:
    truncated = jpeg(800, 600)[:-300]
    response = await client.post(
        "/api/uploads", data=form(("broken.jpg", truncated)), headers=auth(admin)
    )
    assert response.status == 422 and response.content_type == "application/problem+json"
    [result] = (await response.json())["results"]
    assert "corrupt or truncated JPEG" in result["error"]
    assert await ctx.store.list_keys("uploads/") == []


async def test_a_corrupt_original_that_bypassed_the_gateway_fails_visibly(
    client: TestClient[Any, Any], admin: str, ctx: Context
) -> None:
    """A bucket wired straight to NATS skips the gateway's checks: ingest still refuses."""
    image_id = new_id()
    broken = jpeg(800, 600)[:-300]
    key = f"uploads/{image_id}/broken.jpg"
    await announce_stored(ctx, subjects.UPLOADED, image_id, key, broken, "image/jpeg")
    doc = await wait_status(client, admin, image_id, "failed")
    assert doc["failure"]["stage"] == "ingest" and doc["failure"]["kind"] == "rejected"
    assert "corrupt or truncated" in doc["failure"]["reason"]
    await settled(ctx, "ingest")  # every dead letter ingest will write is stored by now
    dead = await (await client.get("/api/dead-letters?stage=ingest", headers=auth(admin))).json()
    assert [d["image_id"] for d in dead["items"]] == [image_id]
    failed = await (await client.get("/api/images?status=failed", headers=auth(admin))).json()
    assert [d["id"] for d in failed["items"]] == [image_id]


async def test_listing_filters_and_pages(client: TestClient[Any, Any], admin: str) -> None:
    ids = []
    for color in ((0, 200, 0), (0, 0, 220), (0, 210, 0)):
        response = await client.post(
            "/api/uploads", data=form(("c.jpg", jpeg(color=color))), headers=auth(admin)
        )
        ids.append((await response.json())["results"][0]["id"])
    for image_id in ids:
        await wait_status(client, admin, image_id, "ready")
    greens = await (await client.get("/api/images?tag=color:green", headers=auth(admin))).json()
    assert sorted(d["id"] for d in greens["items"]) == sorted([ids[0], ids[2]])
    page1 = await (await client.get("/api/images?limit=2", headers=auth(admin))).json()
    assert [d["id"] for d in page1["items"]] == [ids[2], ids[1]]
    page2 = await (
        await client.get(f"/api/images?limit=2&cursor={page1['next_cursor']}", headers=auth(admin))
    ).json()
    assert [d["id"] for d in page2["items"]] == [ids[0]] and page2["next_cursor"] is None
    bad = await client.get("/api/images?limit=0", headers=auth(admin))
    assert bad.status == 400 and "limit must be 1-500" in (await bad.json())["detail"]
    missing = await client.get("/api/images/nope", headers=auth(admin))
    assert missing.status == 404 and missing.content_type == "application/problem+json"


async def test_status_and_metrics_report_every_function(
    client: TestClient[Any, Any], admin: str
) -> None:
    before = await (await client.get("/api/status", headers=auth(admin))).json()
    acked = {f["function"]: f["acked"] for f in before["functions"] if f["deployed"]}
    response = await client.post("/api/uploads", data=form(("a.jpg", jpeg())), headers=auth(admin))
    [uploaded] = (await response.json())["results"]
    await wait_status(client, admin, uploaded["id"], "ready")
    status = await (await client.get("/api/status", headers=auth(admin))).json()
    deployed = {f["function"]: f for f in status["functions"]}
    for name in ("ingest", "caption", "notify"):
        assert deployed[name]["deployed"] is True and deployed[name]["pending"] == 0
        # the counter a dashboard takes each function's rate from (notify emits nothing)
        assert deployed[name]["acked"] > acked[name], name
    metrics = await (await client.get("/metrics", headers=auth(admin))).text()
    assert 'darkroom_consumer_pending{function="ingest"} 0.0' in metrics


async def test_openapi_documents_every_route_and_only_those(
    client: TestClient[Any, Any], admin: str
) -> None:
    doc = await (await client.get("/api/openapi.json", headers=auth(admin))).json()
    assert doc["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == {(r.method, r.path) for r in route_table()}
    app = client.app
    assert isinstance(app, web.Application)
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.method != "HEAD"
        and not route.resource.canonical.startswith("/{path")
    }
    assert served == documented


async def test_the_app_is_served_without_a_key(client: TestClient[Any, Any]) -> None:
    page = await client.get("/")
    shell = await page.text()
    assert page.status == 200 and "<title>darkroom</title>" in shell
    assert "/_app/immutable/boot." in shell  # it starts the app from a file of its own
    deep = await client.get("/images/anything")  # a page the app routes itself
    assert deep.status == 200 and await deep.text() == shell
    api_typo = await client.get("/api/nothing-here")
    assert api_typo.status == 404 and api_typo.content_type == "application/problem+json"


async def test_odd_requests_get_clear_problems_not_errors(
    client: TestClient[Any, Any], admin: str
) -> None:
    head = await client.head("/metrics")
    assert head.status == 401, "HEAD must not slip past auth"
    broken = await client.post(
        "/api/uploads",
        data=b"--xyz\r\nContent-Disposition: form-data; name=file; filename=a.jpg\r\n\r\n\xff\xd8",
        headers={**auth(admin), "Content-Type": "multipart/form-data"},
    )
    assert broken.status == 400 and broken.content_type == "application/problem+json"
    for path in ("/" + "a" * 300, "/%00"):
        response = await client.get(path)
        assert response.status in (200, 404), path
        if response.status == 200:
            assert "darkroom" in await response.text()
    bad_key = await client.delete("/api/keys/a%20b", headers=auth(admin))
    assert bad_key.status == 404 and bad_key.content_type == "application/problem+json"
    odd_limit = await client.get("/api/dead-letters?limit=%C2%B2", headers=auth(admin))
    assert odd_limit.status == 400


async def test_a_wrong_method_on_an_api_path_is_405_with_a_true_allow(
    client: TestClient[Any, Any], admin: str
) -> None:
    """The frontend's catch-all never answers under /api/ or on the probes, so it never adds
    its GET to what an API path allows."""
    for method, path, allowed in (
        ("OPTIONS", "/api/uploads", "POST"),
        ("GET", "/api/uploads", "POST"),
        ("OPTIONS", "/api/keys/abc", "DELETE"),
        ("PUT", "/api/hooks/ingest", "POST"),
        ("DELETE", "/api/images/abc/display", "GET,HEAD"),
        ("POST", "/metrics", "GET,HEAD"),
        ("OPTIONS", "/healthz", "GET,HEAD"),
        # a fixed path beside a {image_id} route: its own methods, not that route's too
        ("OPTIONS", "/api/images/counts", "GET,HEAD"),
        ("OPTIONS", "/api/images/zip", "POST"),
        ("PUT", "/api/images/abc", "DELETE,GET,HEAD"),
    ):
        for headers in ({}, auth(admin)):  # the same, with a key or without
            response = await client.request(method, path, headers=headers)
            assert response.status == 405, (method, path)
            assert response.headers["Allow"] == allowed, (method, path)
            assert response.content_type == "application/problem+json"
            assert f"allowed: {allowed}" in (await response.json())["detail"]
    for method in ("GET", "POST", "OPTIONS"):
        response = await client.request(method, "/api/nothing-here", headers=auth(admin))
        assert response.status == 404, method
        assert "no route /api/nothing-here" in (await response.json())["detail"]
    assert (await client.get("/apiary")).status == 200, "only /api/ itself is the API's"


async def test_an_empty_time_range_or_a_search_with_no_word_is_an_empty_page(
    client: TestClient[Any, Any], admin: str
) -> None:
    response = await client.post("/api/uploads", data=form(("a.jpg", jpeg())), headers=auth(admin))
    [result] = (await response.json())["results"]
    await wait_status(client, admin, result["id"], "ready")
    at = "2026-01-01T00:00:00Z"
    for since, until in ((at, at), ("2026-02-01T00:00:00Z", at)):
        empty = await client.get(f"/api/images?since={since}&until={until}", headers=auth(admin))
        assert empty.status == 200 and await empty.json() == {"items": [], "next_cursor": None}
    assert (await (await client.get("/api/images", headers=auth(admin))).json())["items"]
    wordless = await client.get("/api/images?q=%21%21%21", headers=auth(admin))
    assert wordless.status == 200 and await wordless.json() == {"items": [], "next_cursor": None}


async def test_a_body_that_breaks_after_a_file_is_a_400_listing_what_was_kept(
    client: TestClient[Any, Any], admin: str, ctx: Context
) -> None:
    photo = jpeg()
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        + photo
        + b'\r\n--xyz\r\nContent-Disposition: form-data; name="a\x15b"\r\n\r\nv\r\n--xyz--\r\n'
    )
    response = await client.post(
        "/api/uploads",
        data=body,
        headers={**auth(admin), "Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert response.status == 400 and response.content_type == "application/problem+json"
    problem = await response.json()
    kept, broken = problem["results"]
    assert kept["status"] == 201 and broken["status"] == 400
    assert await ctx.store.list_keys("uploads/") == [f"uploads/{kept['id']}/a.jpg"]


async def raw_get(client: TestClient[Any, Any], target: str) -> tuple[int, bytes]:
    """GET ``target`` exactly as written: aiohttp's client would resolve its dots first."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        answer = await reader.read()  # to the end: the server hangs up after one answer
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_paths_that_climb_out_of_the_frontend_are_refused(
    ctx: Context, aiohttp_client: Any, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<title>darkroom</title>")
    (site / "app.js").write_text("console.log('darkroom')")
    secret = tmp_path / "secret.txt"  # right next to the frontend's folder
    secret.write_text("the secret next door")
    client = await aiohttp_client(build_app(ctx, static_dir=site))
    # The server resolves dots itself: a climb that stays inside the frontend is served.
    status, body = await raw_get(client, "/gallery/../app.js")
    assert status == 200 and b"console.log" in body
    up = "/.." * 32  # more levels than any real path has: past the root, whatever the depth
    for target in (
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E%2fsecret.txt",
        "/gallery/../../secret.txt",
        "/" + str(secret),  # "//tmp/...": an absolute path must not replace the root
        up + "/etc/passwd",
        "/%2e%2e" * 32 + "/etc/passwd",
        "/static" + up + "/etc/passwd",
    ):
        status, body = await raw_get(client, target)
        assert status in (400, 404), (target, status, body[:200])
        assert b"the secret next door" not in body and b"root:" not in body, target


async def test_an_upload_that_cannot_be_announced_is_refused_and_not_kept(
    ctx: Context, aiohttp_client: Any, admin: str
) -> None:
    client = await aiohttp_client(build_app(ctx))
    await ctx.js.delete_stream(ctx.names.stream)  # the bus lost its stream
    response = await client.post("/api/uploads", data=form(("a.jpg", jpeg())), headers=auth(admin))
    assert response.status == 503
    assert "could not be announced" in (await response.json())["detail"]
    assert await ctx.store.list_keys("uploads/") == []
