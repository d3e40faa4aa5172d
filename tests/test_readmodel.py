"""The read model on a real PostgreSQL (+ pgvector): migrations, the projection's ordering
rules, filters, keyset pages, counts, vector search, and the server down at start."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from bus.core.envelope import Event, ObjectRef, new_id
from bus.infra.postgres import (
    DatabaseUnavailableError,
    Migration,
    check_server,
    migrate,
    open_pool,
)
from bus.ops.pgserver import PostgresServer
from bus.runtime.context import Context
from bus.state.readmodel import (
    ImageQuery,
    ReadModel,
    ReadModelError,
    decode_cursor,
    format_time,
    migrations,
)
from tests.conftest import unique

pytestmark = [pytest.mark.nats, pytest.mark.s3]

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> str:
    return format_time(T0 + timedelta(seconds=seconds)) or ""


def event(topic: str, image_id: str, seconds: float, **data: Any) -> Event:
    ref = ObjectRef("b", f"uploads/{image_id}/a.jpg", 3, "e", "image/jpeg")
    return Event(
        id=f"{topic}-{image_id}-{seconds}",
        type=topic,
        source="test",
        time=at(seconds),
        image_id=image_id,
        object=ref if topic == "uploaded" else None,
        data=data,
    )


def life(image_id: str, start: float = 0.0, tags: list[Any] | None = None) -> list[Event]:
    return [
        event("uploaded", image_id, start + 1, name="beach day.jpg", sha256="ab" * 32),
        event(
            "ingested",
            image_id,
            start + 2,
            width=640,
            height=480,
            exif={"taken_at": "2025-07-14T18:30:00+02:00"},
        ),
        event(
            "captioned",
            image_id,
            start + 3,
            caption="a dog on a sunny beach",
            tags=tags if tags is not None else [{"tag": "dog", "score": 0.9}, "color:yellow"],
        ),
    ]


async def apply(db: ReadModel, events: list[Event], first_seq: int = 1) -> None:
    for seq, ev in enumerate(events, first_seq):
        await db.project(ev, seq)


@pytest.fixture
def db(ctx: Context) -> ReadModel:
    assert ctx.db is not None
    return ctx.db


# --- migrations --------------------------------------------------------------------------------


async def test_migrations_apply_once_and_twice_is_a_no_op(postgres_server: PostgresServer) -> None:
    schema = unique("m")
    conn = await asyncpg.connect(postgres_server.url)
    try:
        assert await migrate(conn, schema, migrations()) == [m.version for m in migrations()]
        assert await migrate(conn, schema, migrations()) == []
        recorded = await conn.fetchval(f'SELECT count(*) FROM "{schema}".schema_migrations')
        assert recorded == len(migrations())
    finally:
        await conn.close()


async def test_concurrent_starts_apply_each_migration_once(
    postgres_server: PostgresServer,
) -> None:
    schema = unique("m")

    async def start() -> list[int]:
        conn = await asyncpg.connect(postgres_server.url)
        try:
            return await migrate(conn, schema, migrations())
        finally:
            await conn.close()

    applied = await asyncio.gather(*(start() for _ in range(6)))
    assert sorted(itertools.chain.from_iterable(applied)) == [m.version for m in migrations()]


async def test_a_migration_changed_after_it_ran_is_refused(
    postgres_server: PostgresServer,
) -> None:
    schema = unique("m")
    conn = await asyncpg.connect(postgres_server.url)
    try:
        await migrate(conn, schema, [Migration(1, "one", "CREATE TABLE a (x int);")])
        with pytest.raises(DatabaseUnavailableError, match="0001_one changed after it was applied"):
            await migrate(conn, schema, [Migration(1, "one", "CREATE TABLE a (y int);")])
    finally:
        await conn.close()


async def test_an_unreachable_server_is_a_clear_error_naming_it() -> None:
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError) as caught:
        await open_pool(
            "postgresql://darkroom:s3cret@127.0.0.1:1/darkroom", "x", migrations(), timeout=2.0
        )
    message = str(caught.value)
    assert "127.0.0.1:1" in message and "unreachable within 2 s" in message
    assert "s3cret" not in message
    assert time.monotonic() - started < 10  # the bound: a clear error within 10 s


# --- the projection --------------------------------------------------------------------------


async def test_any_arrival_order_gives_the_same_row(db: ReadModel) -> None:
    docs = []
    for order in itertools.permutations(range(3)):
        image_id = new_id()
        events = life(image_id)
        for position in order:  # each event keeps its own stream sequence
            await db.project(events[position], 10 + position)
        doc = await db.get(image_id)
        assert doc is not None
        docs.append({k: v for k, v in doc.items() if k not in ("id", "original")})
    assert all(d == docs[0] for d in docs)
    doc = docs[0]
    assert doc["status"] == "ready" and doc["name"] == "beach day.jpg"
    assert doc["tags"] == ["dog", "color:yellow"] and doc["created"] == at(1)
    assert doc["updated"] == at(3) and doc["taken"] == "2025-07-14T16:30:00.000Z"
    assert doc["stages"] == {"uploaded": at(1), "ingested": at(2), "captioned": at(3)}
    assert doc["sha256"] == "ab" * 32


async def test_an_older_event_never_overwrites_a_newer_one(db: ReadModel) -> None:
    image_id = new_id()
    await apply(db, life(image_id))
    newer = event("captioned", image_id, 10, caption="a dog and a cat", tags=["cat"])
    await db.project(newer, 20)
    replayed = life(image_id)[2]  # the first caption, delivered again with its old sequence
    assert await db.project(replayed, 3) is False
    doc = await db.get(image_id)
    assert doc is not None and doc["caption"]["caption"] == "a dog and a cat"
    assert doc["tags"] == ["cat"]
    page = await db.page(ImageQuery(tag="dog"))
    assert image_id not in [d["id"] for d in page.items], "stale tag rows left behind"


async def test_a_failure_shows_until_the_stage_succeeds(db: ReadModel) -> None:
    image_id = new_id()
    uploaded, ingested, captioned = life(image_id)
    await apply(db, [uploaded, ingested])
    failed = event("failed.caption", image_id, 4, stage="caption", reason="model exploded")
    await db.project(failed, 5)
    doc = await db.get(image_id)
    assert doc is not None and doc["status"] == "failed"
    assert doc["failure"]["reason"] == "model exploded"
    await db.project(captioned, 6)  # a retry succeeded
    doc = await db.get(image_id)
    assert doc is not None and doc["status"] == "ready"


async def test_bad_event_data_is_refused_with_a_reason(db: ReadModel) -> None:
    image_id = new_id()
    with pytest.raises(ReadModelError, match="is not an ISO 8601 time"):
        await db.project(Event("x", "uploaded", "t", "yesterday", image_id=image_id), 1)
    bad = event("captioned", image_id, 1, embeddings=[{"kind": "image", "vector": [1.0]}])
    with pytest.raises(ReadModelError, match="needs a 'kind' and a 'model'"):
        await db.project(bad, 2)
    model = unique("model")
    first = event(
        "captioned",
        image_id,
        2,
        embeddings=[{"kind": "image", "model": model, "vector": [1.0, 0.0, 0.0]}],
    )
    await db.project(first, 3)
    other = event(
        "captioned",
        new_id(),
        2,
        embeddings=[{"kind": "image", "model": model, "vector": [1.0, 0.0]}],
    )
    with pytest.raises(ReadModelError, match="2-dimensional image embedding, but its earlier"):
        await db.project(other, 4)


# --- queries ------------------------------------------------------------------------------------


async def seed(db: ReadModel, count: int, **kwargs: Any) -> list[str]:
    ids = []
    for n in range(count):
        image_id = new_id()
        await apply(db, life(image_id, start=n * 10, **kwargs), first_seq=n * 10 + 1)
        ids.append(image_id)
    return ids


async def all_pages(db: ReadModel, query: ImageQuery) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        page = await db.page(ImageQuery(**{**_fields(query), "cursor": cursor}))
        seen += [d["id"] for d in page.items]
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor


def _fields(query: ImageQuery) -> dict[str, Any]:
    return {name: getattr(query, name) for name in query.__dataclass_fields__}


async def test_filters_sorts_and_counts(db: ReadModel) -> None:
    ids = await seed(db, 6)
    extra = new_id()
    await apply(db, life(extra, start=100, tags=["cat"])[:2], first_seq=200)  # not captioned
    newest_first = list(reversed(ids))
    assert [d["id"] for d in (await db.page(ImageQuery(limit=7))).items] == [extra, *newest_first]
    assert await all_pages(db, ImageQuery(status="ready", limit=2)) == newest_first
    assert await all_pages(db, ImageQuery(status="ingested")) == [extra]
    assert await all_pages(db, ImageQuery(tag="dog", limit=4)) == newest_first
    assert await all_pages(db, ImageQuery(has_caption=False)) == [extra]
    assert await all_pages(db, ImageQuery(text="sunny bea", limit=5)) == newest_first
    assert await all_pages(db, ImageQuery(text="zebra")) == []
    window = ImageQuery(since=T0 + timedelta(seconds=21), until=T0 + timedelta(seconds=41))
    assert await all_pages(db, window) == [ids[3], ids[2]]
    assert await all_pages(db, ImageQuery(order="asc")) == [*ids, extra]
    assert await all_pages(db, ImageQuery(approval="approved")) == []
    by_taken = await all_pages(db, ImageQuery(sort="taken", limit=3))
    assert set(by_taken) == {extra, *ids} and len(by_taken) == 7
    counts = await db.counts()
    assert counts["total"] == 7 and counts["status"]["ready"] == 6
    assert counts["status"]["ingested"] == 1 and counts["approval"]["none"] == 7


async def test_queries_refuse_what_they_cannot_answer() -> None:
    with pytest.raises(ReadModelError, match="status must be one of"):
        ImageQuery(status="sleepy")
    with pytest.raises(ReadModelError, match="cursor 'garbage' is not one this API handed out"):
        ImageQuery(cursor="garbage")
    with pytest.raises(ReadModelError, match="sort must be one of created, taken"):
        ImageQuery(sort="size")
    moment, image_id = decode_cursor("created.desc|2026-01-01T00:00:01.000000Z|abc")
    assert moment == T0 + timedelta(seconds=1) and image_id == "abc"


async def test_pages_have_no_duplicates_or_gaps_while_images_arrive(db: ReadModel) -> None:
    before = await seed(db, 25)
    arriving = asyncio.create_task(seed(db, 15))  # newer images land while we page
    seen = await all_pages(db, ImageQuery(limit=4))
    await arriving
    assert len(seen) == len(set(seen)), "an image appeared on two pages"
    present = [i for i in seen if i in before]
    assert present == list(reversed(before)), "an image that was there all along was skipped"


async def test_similar_images_by_vector(db: ReadModel) -> None:
    rng = random.Random(7)
    vectors = {}
    for _ in range(30):
        image_id = new_id()
        vector = [rng.gauss(0, 1) for _ in range(16)]
        vectors[image_id] = vector
        captioned = event(
            "captioned",
            image_id,
            5,
            tags=[],
            embeddings=[{"kind": "image", "model": "tiny-siglip", "vector": vector}],
        )
        await apply(db, [life(image_id)[0], captioned])
    target, vector = next(iter(vectors.items()))
    nearest = await db.similar(vector, "image", "tiny-siglip", limit=5)
    assert nearest[0][0] == target and nearest[0][1] == pytest.approx(0.0, abs=1e-6)
    assert [d for _, d in nearest] == sorted(d for _, d in nearest)
    assert await db.similar(vector, "image", "another-model") == []


async def test_concurrent_writers_on_one_image_end_in_the_newest_state(db: ReadModel) -> None:
    image_id = new_id()
    uploaded, ingested, captioned = life(image_id)
    recaptioned = event("captioned", image_id, 9, caption="a cat", tags=["cat"])
    deliveries = [(uploaded, 1), (ingested, 2), (captioned, 3), (recaptioned, 4)] * 5
    random.Random(3).shuffle(deliveries)
    await asyncio.gather(*(db.project(ev, seq) for ev, seq in deliveries))
    doc = await db.get(image_id)
    assert doc is not None and doc["caption"]["caption"] == "a cat" and doc["tags"] == ["cat"]
    assert doc["status"] == "ready" and doc["updated"] == at(9)
    assert await all_pages(db, ImageQuery(tag="cat")) == [image_id]
    assert await all_pages(db, ImageQuery(tag="dog")) == []


async def test_a_new_model_arriving_under_load_does_not_deadlock(db: ReadModel) -> None:
    known, fresh = unique("known"), unique("fresh")

    def captioned(image_id: str) -> Event:
        return event(
            "captioned",
            image_id,
            3,
            tags=[],
            embeddings=[
                {"kind": "image", "model": known, "vector": [1.0, 0.5, 0.25]},
                {"kind": "text", "model": fresh, "vector": [0.5, 0.5]},
            ],
        )

    first = new_id()
    earlier = [{"kind": "image", "model": known, "vector": [1.0, 0.0, 0.0]}]
    await db.project(event("captioned", first, 3, embeddings=earlier), 1)
    ids = [new_id() for _ in range(16)]
    results = await asyncio.gather(
        *(db.project(captioned(i), 2) for i in ids), return_exceptions=True
    )
    assert results == [True] * 16
    assert len(await db.similar([0.5, 0.5], "text", fresh, limit=20)) == 16


async def test_pages_in_either_order_with_ties_and_by_date_taken(db: ReadModel) -> None:
    same = 50.0
    ids = []
    for n in range(7):  # seven images uploaded in the same millisecond
        image_id = new_id()
        taken = f"2024-0{n % 3 + 1}-01T00:00:00Z"
        await apply(
            db,
            [
                event("uploaded", image_id, same, name=f"{n}.jpg"),
                event("ingested", image_id, same + 1, exif={"taken_at": taken}),
            ],
            first_seq=n * 2 + 1,
        )
        ids.append(image_id)
    desc = await all_pages(db, ImageQuery(limit=2))
    asc = await all_pages(db, ImageQuery(order="asc", limit=3))
    assert len(desc) == 7 and asc == list(reversed(desc))
    assert desc == sorted(ids, reverse=True)  # ties broken by id
    by_taken = await all_pages(db, ImageQuery(sort="taken", limit=2))
    taken = [(await db.get(i) or {})["taken"] for i in by_taken]
    assert taken == sorted(taken, reverse=True)
    assert await all_pages(db, ImageQuery(sort="taken", order="asc", limit=4)) == list(
        reversed(by_taken)
    )


async def test_cursors_keep_microseconds_and_their_sort(db: ReadModel) -> None:
    base = T0 + timedelta(days=400)
    ids = []
    for micro in (123456, 123400, 123300):  # within one millisecond
        image_id = new_id()
        moment = base + timedelta(microseconds=micro)
        ev = event("uploaded", image_id, 0)
        await db.project(
            Event(ev.id, ev.type, ev.source, moment.isoformat(), image_id=image_id, data={}), 1
        )
        ids.append(image_id)
    window = {"since": base, "until": base + timedelta(seconds=1)}
    assert await all_pages(db, ImageQuery(limit=1, **window)) == ids
    assert await all_pages(db, ImageQuery(limit=1, order="asc", **window)) == ids[::-1]
    page = await db.page(ImageQuery(limit=1, **window))
    assert page.next_cursor is not None
    with pytest.raises(ReadModelError, match="this cursor is for sort/order created/desc"):
        ImageQuery(cursor=page.next_cursor, sort="taken")
    with pytest.raises(ReadModelError, match="q has no words"):
        ImageQuery(text="?!")


async def test_data_the_database_refuses_is_a_reason_not_a_retry(db: ReadModel) -> None:
    bad_name = event("uploaded", new_id(), 1, name="nul\x00byte.jpg")
    with pytest.raises(ReadModelError, match="the database refused this uploaded event"):
        await db.project(bad_name, 1)


class _FakeServer:
    """Answers the two questions check_server asks (a pure unit test of the refusals)."""

    def __init__(self, version: int, shown: str, vector: str | None) -> None:
        self.answers = {
            "SHOW server_version_num": str(version),
            "SHOW server_version": shown,
        }
        self.vector = vector

    async def fetchval(self, sql: str) -> str | None:
        return self.answers.get(sql, self.vector)


async def test_an_old_server_or_one_without_pgvector_is_refused_by_name() -> None:
    url = "postgresql://u:hidden@db:5432/x"
    with pytest.raises(DatabaseUnavailableError, match=r"is version 14\.9; darkroom needs 15"):
        await check_server(_FakeServer(140009, "14.9", "0.8.0"), url)  # type: ignore[arg-type]
    with pytest.raises(DatabaseUnavailableError, match="lacks the pgvector extension") as err:
        await check_server(_FakeServer(170002, "17.2", None), url)  # type: ignore[arg-type]
    assert "u:***@db:5432" in str(err.value) and "hidden" not in str(err.value)
    await check_server(_FakeServer(150000, "15.0", "0.8.0"), url)  # type: ignore[arg-type]
