"""The read model is a projection: dropped, it is rebuilt from the store and the stream with
the same answers; notify waits out a database outage; `darkroom db` and `darkroom reindex`
from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

from bus.core.envelope import Event, new_id, now_iso
from bus.core.settings import Settings
from bus.ops.pgserver import PostgresServer
from bus.ops.reindex import reindex
from bus.runtime.context import Context, open_context
from bus.runtime.registry import load
from bus.runtime.runner import FunctionRunner
from tests.support import procs
from tests.support.http import auth, form
from tests.support.images import jpeg
from tests.support.streams import dead_letters, eventually, settled
from tests.test_gateway import wait_status

pytestmark = [pytest.mark.nats, pytest.mark.s3]


async def catalogue(client: TestClient[Any, Any], token: str) -> dict[str, Any]:
    """Everything the API says about the images: the list, each document, the counts."""
    listed = await (await client.get("/api/images?limit=500", headers=auth(token))).json()
    docs = {}
    for item in listed["items"]:
        response = await client.get(f"/api/images/{item['id']}", headers=auth(token))
        docs[item["id"]] = await response.json()
    counts = await (await client.get("/api/images/counts", headers=auth(token))).json()
    by_tag = await (await client.get("/api/images?tag=color:green", headers=auth(token))).json()
    return {"list": listed, "docs": docs, "counts": counts, "by_tag": by_tag}


async def test_a_dropped_read_model_is_rebuilt_with_identical_answers(
    ctx: Context, client: TestClient[Any, Any], admin: str, settings: Settings
) -> None:
    photos = [jpeg(320, 240, colour) for colour in ((30, 200, 60), (200, 40, 40), (40, 40, 220))]
    response = await client.post(
        "/api/uploads",
        data=form(*((f"p{n}.jpg", data) for n, data in enumerate(photos))),
        headers=auth(admin),
    )
    ids = [r["id"] for r in (await response.json())["results"]]
    for image_id in ids:
        await wait_status(client, admin, image_id, "ready")
    await settled(ctx, "ingest", "caption", "notify")
    before = await catalogue(client, admin)
    assert before["counts"]["total"] == 3 and len(before["by_tag"]["items"]) >= 1

    assert ctx.db is not None
    async with ctx.db.pool.acquire() as conn:
        await conn.execute(f'DROP SCHEMA "{settings.db_schema}" CASCADE')
    async with open_context(settings, [], "reindex", declare=False, database=True) as fresh:
        summary = await reindex(fresh, progress=False)
    assert summary.images_in_store == 3 and summary.events >= 9
    assert await catalogue(client, admin) == before


async def test_the_store_alone_rebuilds_images_whose_events_are_gone(
    ctx: Context, client: TestClient[Any, Any], admin: str, settings: Settings
) -> None:
    response = await client.post(
        "/api/uploads", data=form(("old.jpg", jpeg(300, 200))), headers=auth(admin)
    )
    [result] = (await response.json())["results"]
    await wait_status(client, admin, result["id"], "ready")
    await settled(ctx, "ingest", "caption", "notify")
    before = await (await client.get(f"/api/images/{result['id']}", headers=auth(admin))).json()
    await ctx.js.purge_stream(ctx.names.stream)  # the history aged out
    async with open_context(settings, [], "reindex", declare=False, database=True) as fresh:
        summary = await reindex(fresh, progress=False)
    assert summary.events == 0 and summary.images_in_store == 1
    after = await (await client.get(f"/api/images/{result['id']}", headers=auth(admin))).json()
    assert after["status"] == "ready" and after["name"] == "old.jpg"
    assert after["ingest"] == before["ingest"] and after["caption"] == before["caption"]
    assert after["tags"] == before["tags"]


async def test_an_approval_decision_survives_its_events_aging_out(
    ctx: Context, client: TestClient[Any, Any], admin: str, settings: Settings
) -> None:
    response = await client.post(
        "/api/uploads", data=form(("kept.jpg", jpeg(300, 200))), headers=auth(admin)
    )
    [result] = (await response.json())["results"]
    image_id = result["id"]
    await wait_status(client, admin, image_id, "ready")
    decided = await client.post(
        f"/api/images/{image_id}/reject", json={"reason": "off topic"}, headers=auth(admin)
    )
    assert decided.status == 200, await decided.text()
    await settled(ctx, "ingest", "caption", "notify")
    before = await (await client.get(f"/api/images/{image_id}", headers=auth(admin))).json()
    assert before["approval"] == "rejected"
    await ctx.js.purge_stream(ctx.names.stream)  # the history aged out
    async with open_context(settings, [], "reindex", declare=False, database=True) as fresh:
        await reindex(fresh, progress=False)
    after = await (await client.get(f"/api/images/{image_id}", headers=auth(admin))).json()
    assert after["approval"] == "rejected"
    assert after["decision"] == before["decision"]


async def test_notify_waits_out_a_database_outage_and_loses_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    server = PostgresServer(tmp_path / "pg", port=0)
    await server.start()
    own = settings.model_copy(
        update={"postgres": settings.postgres.model_copy(update={"url": SecretStr(server.url)})}
    )
    notify = load("notify")
    try:
        async with open_context(own, [notify.spec], "test", database=True) as ctx:
            assert ctx.db is not None
            runner = FunctionRunner(notify, ctx)
            await runner.start()
            try:

                async def uploaded(image_id: str) -> None:
                    event = Event(
                        id=f"uploaded-{image_id}",
                        type="uploaded",
                        source="test",
                        time=now_iso(),
                        image_id=image_id,
                        data={"name": f"{image_id}.jpg"},
                    )
                    await ctx.js.publish(
                        ctx.names.subject("uploaded"),
                        event.encode(),
                        headers={"Nats-Msg-Id": event.id},
                    )

                first = new_id()
                await uploaded(first)
                await settled(ctx, "notify")
                assert await ctx.db.get(first) is not None
                await server.stop()
                later = [new_id() for _ in range(3)]
                for image_id in later:
                    await uploaded(image_id)

                async def held() -> bool:  # notify holds them, waiting for the database
                    info = await ctx.js.consumer_info(ctx.names.stream, ctx.names.durable("notify"))
                    return info.num_pending == 0 and info.num_ack_pending == 3

                await eventually(held, what="notify holding the events while the database is down")
                await server.start()
                await settled(ctx, "notify", timeout=60)
                for image_id in later:
                    doc = await ctx.db.get(image_id)
                    assert doc is not None and doc["name"] == f"{image_id}.jpg"
                assert await dead_letters(ctx, "notify") == []
            finally:
                await runner.drain(timeout=10)
    finally:
        await server.stop()


async def test_db_and_reindex_from_the_command_line(
    ctx: Context, subprocess_env: dict[str, str], settings: Settings
) -> None:
    shown = await procs.start(["db"], subprocess_env)
    assert await shown.wait(timeout=30) == 0, shown.output
    assert settings.postgres.url is not None
    assert settings.postgres.url.get_secret_value() in shown.output
    assert f"search_path%3D{settings.db_schema}" in shown.output and "psql" in shown.output
    rebuilt = await procs.start(["reindex", "--quiet"], subprocess_env)
    assert await rebuilt.wait(timeout=60) == 0, rebuilt.output
    assert "reindexed 0 image(s)" in rebuilt.output


async def test_reindex_without_a_database_says_where_it_looked(
    ctx: Context, subprocess_env: dict[str, str]
) -> None:
    env = {**subprocess_env, "DARKROOM_POSTGRES__URL": "postgresql://u:hidden@127.0.0.1:1/x"}
    proc = await procs.start(["reindex"], env)
    assert await proc.wait(timeout=30) == 1
    assert "PostgreSQL at postgresql://u:***@127.0.0.1:1/x is unreachable" in proc.output
    assert "hidden" not in proc.output
