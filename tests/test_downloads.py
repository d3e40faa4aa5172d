"""POST /api/images/zip: the originals of many images as one zip, streamed."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from bus.runtime.context import Context
from tests.support.http import auth, form
from tests.support.images import jpeg
from tests.support.streams import eventually

pytestmark = [pytest.mark.nats, pytest.mark.s3]


async def uploaded(client: TestClient[Any, Any], ctx: Context, token: str, body: bytes) -> str:
    """The id of an upload of ``body`` (named photo.jpg), once the catalogue has it."""
    response = await client.post(
        "/api/uploads", data=form(("photo.jpg", body)), headers=auth(token)
    )
    assert response.status == 201, await response.text()
    image_id: str = (await response.json())["results"][0]["id"]
    assert ctx.db is not None
    db = ctx.db
    await eventually(lambda: db.get(image_id), timeout=30, what=f"{image_id} in the catalogue")
    return image_id


async def test_a_zip_holds_each_original_once_under_its_own_name(
    client: TestClient[Any, Any], ctx: Context, make_key: Callable[..., Awaitable[str]]
) -> None:
    uploader, reader = await make_key("upload"), await make_key("read")
    first, second = jpeg(color=(200, 10, 10)), jpeg(color=(10, 200, 10))
    ids = [await uploaded(client, ctx, uploader, body) for body in (first, second)]

    response = await client.post(
        "/api/images/zip", json={"ids": [*ids, ids[0]]}, headers=auth(reader)
    )
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "application/zip"
    assert response.headers["Content-Disposition"] == 'attachment; filename="darkroom-2-images.zip"'
    assert "Content-Length" not in response.headers  # streamed as it is written
    archive = zipfile.ZipFile(io.BytesIO(await response.read()))
    assert archive.testzip() is None
    # Both are photo.jpg: the second is told apart by its id.
    assert archive.namelist() == ["photo.jpg", f"{ids[1]}-photo.jpg"]
    assert archive.read("photo.jpg") == first
    assert archive.read(f"{ids[1]}-photo.jpg") == second

    # An original gone from the store becomes a note; the others still come.
    doc = await ctx.db.get(ids[1]) if ctx.db else None
    assert doc is not None
    await ctx.store.delete(doc["original"]["key"])
    response = await client.post("/api/images/zip", json={"ids": ids}, headers=auth(reader))
    archive = zipfile.ZipFile(io.BytesIO(await response.read()))
    assert archive.read("photo.jpg") == first
    note = archive.read(f"{ids[1]}-photo.jpg.missing.txt").decode()
    assert f"the original of image {ids[1]}" in note and "missing" in note


async def test_unknown_ids_and_empty_lists_are_refused_before_anything_is_sent(
    client: TestClient[Any, Any], make_key: Callable[..., Awaitable[str]]
) -> None:
    reader = await make_key("read")
    missing = await client.post("/api/images/zip", json={"ids": ["nope"]}, headers=auth(reader))
    assert missing.status == 404
    assert "no image with id 'nope'" in (await missing.json())["detail"]
    empty = await client.post("/api/images/zip", json={"ids": []}, headers=auth(reader))
    assert empty.status == 422


async def test_a_form_post_of_ids_streams_the_same_zip_as_json(
    client: TestClient[Any, Any], ctx: Context, make_key: Callable[..., Awaitable[str]]
) -> None:
    """The gallery posts an HTML form, so the browser saves the zip as it streams."""
    uploader, reader = await make_key("upload"), await make_key("read")
    body = jpeg(color=(90, 90, 200))
    image_id = await uploaded(client, ctx, uploader, body)

    response = await client.post("/api/images/zip", data=[("ids", image_id)], headers=auth(reader))
    assert response.status == 200, await response.text()
    assert response.headers["Content-Disposition"] == 'attachment; filename="darkroom-1-images.zip"'
    assert zipfile.ZipFile(io.BytesIO(await response.read())).read("photo.jpg") == body

    # The form is checked as the JSON is: at most 500 ids, no other fields, nothing else.
    many = [("ids", image_id)] * 501
    too_many = await client.post("/api/images/zip", data=many, headers=auth(reader))
    assert too_many.status == 422
    assert "at most 500 items" in (await too_many.json())["detail"]
    other = await client.post(
        "/api/images/zip", data=[("ids", image_id), ("all", "1")], headers=auth(reader)
    )
    assert other.status == 422
    assert "all is not a field" in (await other.json())["detail"]
    text = await client.post(
        "/api/images/zip", data=b"ids", headers={**auth(reader), "Content-Type": "text/plain"}
    )
    assert text.status == 415
