"""The read model at 10^5 and 10^6 images: projection rate, page latency, vector search.

Run with ``python -m tests.bench.bench_readmodel [--rows 100000 1000000] [--quick]
[--drivers]``; it needs numpy (``make install-ml`` brings it) and about 10 GB of disk for
10^6 rows. The last line printed is JSON.

Method
------
One run starts the embedded PostgreSQL 18 + pgvector (``PostgresServer``), nats-server and
SeaweedFS in a temporary directory, migrates a schema ``bench``, and starts a real
``darkroom gateway`` process on it (namespace ``bench``). Then, for each size in ``--rows``:

* **Seed** the tables to that many images with binary COPY: realistic rows (90% ready, 5%
  ingested, 3% uploaded, 2% failed; one creation second apart; an EXIF date on 70%; three
  tags each from a Zipf-like vocabulary of 1,000; a caption) and one 384-dimensional image
  embedding each. Embeddings are drawn around 1,000 random cluster centres with a wide
  isotropic spread, then normalised: within a cluster the true neighbours are only slightly
  nearer than the rest, a hard case for an approximate index. The HNSW index is built once
  the rows are in, with the product's parameters (``HNSW_M``, ``HNSW_EF_CONSTRUCTION``;
  ``--m``, ``--ef-construction`` to try others), then the tables are analysed.
* **Project** ``--project-images`` new images through ``ReadModel.project`` (uploaded,
  ingested and captioned events, each with its embedding), 16 at a time like notify:
  events per second through the real code path, on top of the seeded table.
* **Pages**: after 50 unmeasured ones of each kind, ``--pages`` keyset pages of 50 from
  random positions through ``ReadModel.page``: unfiltered; filtered (status ``failed``,
  no caption, between two dates); by a common tag; by a rare tag; by text. p50 and p99.
* **Vectors**: after 50 unmeasured queries that page the index in, ``--vector-queries``
  top-20 searches through ``ReadModel.similar`` for vectors drawn like the data, once per
  HNSW ``ef_search`` in 40, 100, 200, 400, 800 and the product's own (``EF_SEARCH``); recall
  against the exact top-20 computed with numpy over every embedding.
* **Gateway RSS**: the gateway's resident memory after 200 HTTP page requests at this size
  (and once before anything was seeded): it must not grow with the catalogue.

``--drivers`` first compares asyncpg with psycopg 3 (if installed) on the same 50-row
keyset page from 100k rows, which is how the driver was chosen.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import struct
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from bus.core.envelope import Event, ObjectRef
from bus.infra.postgres import open_pool
from bus.ops.embedded import NatsServer, S3Credentials, SeaweedFS
from bus.ops.pgserver import PostgresServer
from bus.state.readmodel import (
    EF_SEARCH,
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    ImageQuery,
    ReadModel,
    encode_cursor,
    format_time,
    migrations,
)
from tests.bench.report import load_average, percentile, rounded, run_and_report
from tests.bench.stack import Gateway, start_gateway

SCHEMA = "bench"
DIM = 384
MODEL = "bench-siglip"
CENTRES = 1000
TAGS = 1000
T0 = datetime(2020, 1, 1, tzinfo=UTC)
CHUNK = 20_000
EF_SEARCHES = (40, 100, 200, 400, 800)  # HNSW candidate lists tried, besides the product's
WARMUP_QUERIES = 50
IMAGE_COLUMNS = [
    "id",
    "created",
    "name",
    "upload",
    "upload_seq",
    "uploaded_at",
    "ingest",
    "ingest_seq",
    "ingested_at",
    "width",
    "height",
    "taken",
    "caption",
    "caption_seq",
    "captioned_at",
    "caption_text",
    "tags",
    "failure",
    "failure_seq",
    "failed_at",
]
STATUS_MIX = (("ready", 0.90), ("ingested", 0.05), ("uploaded", 0.03), ("failed", 0.02))


def _need_numpy() -> Any:
    try:
        import numpy
    except ImportError:
        raise SystemExit("bench_readmodel needs numpy: run `make install-ml` first") from None
    return numpy


class Vectors:
    """Clustered, normalised embeddings: a fixed set of centres, Gaussian spread around them."""

    def __init__(self, seed: int = 7) -> None:
        np = _need_numpy()
        self.np = np
        self.rng = np.random.default_rng(seed)
        self.centres = self.rng.normal(size=(CENTRES, DIM)).astype(np.float32)

    def draw(self, count: int) -> Any:
        np = self.np
        which = self.rng.integers(0, CENTRES, size=count)
        points = self.centres[which] + 0.6 * self.rng.normal(size=(count, DIM)).astype(np.float32)
        points /= np.linalg.norm(points, axis=1, keepdims=True)
        return points.astype(np.float32)


def _vector_bytes(vector: Any) -> bytes:
    """pgvector's binary format: dimensions, a reserved 0, then big-endian float32s."""
    return struct.pack(">HH", len(vector), 0) + vector.astype(">f4").tobytes()


async def _with_vector_codec(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "vector",
        schema="public",
        encoder=_vector_bytes,
        decoder=lambda data: data,
        format="binary",
    )


def _tag(rng: random.Random) -> str:
    # Zipf-like: tag k is drawn with weight 1/(k+1).
    return f"tag{int(TAGS ** rng.random()) - 1:04d}"


def _status(n: int) -> str:
    point = (n * 7919 % 1000) / 1000
    for status, share in STATUS_MIX:
        if point < share:
            return status
        point -= share
    return "ready"


async def seed(pool: asyncpg.Pool, start: int, stop: int, vectors: Vectors) -> Any:
    """Images ``start``..``stop``-1 into the tables; returns their embeddings."""
    rng = random.Random(start)
    kept = []
    async with pool.acquire() as conn:
        await _with_vector_codec(conn)
        for low in range(start, stop, CHUNK):
            high = min(stop, low + CHUNK)
            embeddings = vectors.draw(high - low)
            kept.append(embeddings)
            images, tags, rows = [], [], []
            for offset, n in enumerate(range(low, high)):
                image_id = f"img{n:010d}"
                created = T0 + timedelta(seconds=n)
                status = _status(n)
                taken = created - timedelta(days=rng.randint(1, 900)) if n % 10 < 7 else None
                names = sorted({_tag(rng) for _ in range(3)})
                captioned = created + timedelta(seconds=2) if status == "ready" else None
                ingested = created + timedelta(seconds=1) if status != "uploaded" else None
                failure = (
                    orjson.dumps(
                        {"stage": "caption", "reason": "bench", "kind": "rejected"}
                    ).decode()
                    if status == "failed"
                    else None
                )
                caption = f"a photo of {' and '.join(names)} number {n}"
                images.append(
                    (
                        image_id,
                        created,
                        f"photo-{n}.jpg",
                        orjson.dumps({"original": {"key": f"uploads/{image_id}/p.jpg"}}).decode(),
                        1,
                        created,
                        '{"width": 4000, "height": 3000}' if ingested else None,
                        2 if ingested else None,
                        ingested,
                        4000,
                        3000,
                        taken,
                        orjson.dumps({"caption": caption, "tags": names}).decode()
                        if captioned
                        else None,
                        3 if captioned else None,
                        captioned,
                        caption if captioned else None,
                        names if captioned else [],
                        failure,
                        4 if failure else None,
                        ingested if failure else None,
                    )
                )
                if captioned:
                    tags += [(image_id, t, 0.9, created, taken or created) for t in names]
                    rows.append((image_id, "image", MODEL, DIM, embeddings[offset], 3))
            await conn.copy_records_to_table(
                "images",
                schema_name=SCHEMA,
                columns=IMAGE_COLUMNS,
                records=images,
            )
            await conn.copy_records_to_table(
                "image_tags",
                schema_name=SCHEMA,
                columns=["image_id", "tag", "score", "created", "taken_or_created"],
                records=tags,
            )
            await conn.copy_records_to_table(
                "image_embeddings",
                schema_name=SCHEMA,
                columns=["image_id", "kind", "model", "dim", "embedding", "seq"],
                records=rows,
            )
            print(f"  seeded {high:,} images", file=sys.stderr, end="\r")
    print(file=sys.stderr)
    return vectors.np.concatenate(kept) if kept else None


async def build_index(url: str, m: int, ef_construction: int) -> float:
    started = time.perf_counter()
    # A connection of its own: the pool's command timeout (60 s) is shorter than a build.
    conn = await asyncpg.connect(url, server_settings={"search_path": f"{SCHEMA}, public"})
    try:
        await conn.execute("SET maintenance_work_mem = '6GB'")
        await conn.execute("SET max_parallel_maintenance_workers = 2")
        # The same index ReadModel.ensure_vector_index makes, with the chosen ef_construction.
        name = "image_embeddings_bench"
        await conn.execute(
            f"CREATE INDEX IF NOT EXISTS {name} ON image_embeddings USING hnsw "
            f"((embedding::vector({DIM})) vector_cosine_ops) "
            f"WITH (m = {m}, ef_construction = {ef_construction}) "
            f"WHERE kind = 'image' AND model = '{MODEL}'"
        )
        await conn.execute(
            "INSERT INTO embedding_indexes VALUES ('image', $1, $2, $3) ON CONFLICT DO NOTHING",
            MODEL,
            DIM,
            name,
        )
        # What an operator does after a bulk load: sets the visibility map and statistics,
        # so autovacuum does not start on a million new rows in the middle of the timing,
        # and writes the loaded pages out now rather than during the reads timed next.
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return time.perf_counter() - started


async def project_rate(db: ReadModel, start: int, count: int, vectors: Vectors) -> float:
    """Events per second through ReadModel.project, 16 images at a time (like notify)."""
    embeddings = vectors.draw(count)
    gate = asyncio.Semaphore(16)
    seq = 10**12 + start * 3

    async def one(k: int) -> None:
        n = start + k
        image_id = f"new{n:010d}"
        moment = format_time(datetime.now(UTC)) or ""
        ref = ObjectRef(SCHEMA, f"uploads/{image_id}/p.jpg", 1000, "e", "image/jpeg")
        events = [
            Event(
                f"u{n}",
                "uploaded",
                "bench",
                moment,
                image_id=image_id,
                object=ref,
                data={"name": f"new-{n}.jpg"},
            ),
            Event(
                f"i{n}",
                "ingested",
                "bench",
                moment,
                image_id=image_id,
                data={"width": 4000, "height": 3000, "exif": {}},
            ),
            Event(
                f"c{n}",
                "captioned",
                "bench",
                moment,
                image_id=image_id,
                data={
                    "caption": f"a new photo {n}",
                    "tags": ["tag0001", "tag0002"],
                    "embeddings": [
                        {"kind": "image", "model": MODEL, "vector": embeddings[k].tolist()}
                    ],
                },
            ),
        ]
        async with gate:
            for offset, event in enumerate(events):
                await db.project(event, seq + k * 3 + offset)

    started = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(count)))
    rate = count * 3 / (time.perf_counter() - started)
    async with db.pool.acquire() as conn:  # keep the seeded data the only data
        await conn.execute("DELETE FROM images WHERE id LIKE 'new%'")
    return rate


async def page_latencies(db: ReadModel, rows: int, pages: int) -> dict[str, list[float]]:
    rng = random.Random(rows)
    common, rare = "tag0000", "tag0900"
    kinds: dict[str, Any] = {
        "page": lambda c: ImageQuery(cursor=c),
        "filtered_page": lambda c: ImageQuery(
            status="failed",
            has_caption=False,
            since=T0,
            until=T0 + timedelta(seconds=rows),
            cursor=c,
        ),
        "tag_page": lambda c: ImageQuery(tag=common, cursor=c),
        "rare_tag_page": lambda c: ImageQuery(tag=rare, cursor=c),
        "text_page": lambda c: ImageQuery(text="photo tag0003", cursor=c),
    }
    out: dict[str, list[float]] = {}
    for n in range(WARMUP_QUERIES):  # unmeasured: the indexes' upper levels into memory
        position = T0 + timedelta(seconds=(n * 7919) % rows)
        for make in kinds.values():
            await db.page(make(encode_cursor("created", "desc", position, "img9999999999")))
    positions = [T0 + timedelta(seconds=rng.randrange(rows)) for _ in range(pages)]
    # First touch of each random spot (its rows may come from disk), then the same again.
    for suffix in ("", "_warm"):
        for position in positions:
            cursor = encode_cursor("created", "desc", position, "img9999999999")
            for kind, make in kinds.items():
                query = make(cursor)
                started = time.perf_counter()
                page = await db.page(query)
                out.setdefault(kind + suffix, []).append((time.perf_counter() - started) * 1000)
                assert len(page.items) <= query.limit
    return out


async def vector_search(
    db: ReadModel, stored: Any, numbers: Any, vectors: Vectors, queries: int
) -> dict[int, tuple[list[float], float]]:
    """Top-20 latency and recall for each ef_search in EF_SEARCHES (the product's included);
    ``stored[i]`` is the embedding of image ``numbers[i]``."""
    np = vectors.np
    probes = vectors.draw(queries)
    exact = np.argsort(-(stored @ probes.T), axis=0)[:20].T  # cosine: vectors are normalised
    for _ in range(min(WARMUP_QUERIES, queries)):  # page the index in: measure steady state
        await db.nearest(vectors.draw(1)[0].tolist(), "image", MODEL, limit=20)
    out = {}
    for ef in sorted({*EF_SEARCHES, EF_SEARCH}):
        latencies, recalls = [], []
        for k in range(queries):
            started = time.perf_counter()
            found = await db.nearest(probes[k].tolist(), "image", MODEL, limit=20, ef_search=ef)
            latencies.append((time.perf_counter() - started) * 1000)
            truth = {f"img{numbers[i]:010d}" for i in exact[k]}
            recalls.append(len(truth & {image_id for image_id, _ in found}) / 20)
        out[ef] = (latencies, statistics.fmean(recalls))
    return out


# --- the gateway process -----------------------------------------------------------------------


# --- drivers --------------------------------------------------------------------------------


async def compare_drivers(url: str) -> dict[str, Any]:
    """asyncpg against psycopg 3 on one 50-row keyset page from 100k rows."""
    conn = await asyncpg.connect(url)
    await conn.execute(
        "DROP TABLE IF EXISTS driver_bench; CREATE TABLE driver_bench (id text PRIMARY KEY, "
        "created timestamptz NOT NULL, status text NOT NULL, name text, doc jsonb); "
        "INSERT INTO driver_bench SELECT md5(i::text), now() - (i || ' seconds')::interval, "
        "(array['ready','ingested','uploaded'])[1 + i % 3], 'photo' || i, "
        "jsonb_build_object('w', i, 'caption', repeat('x', 200)) "
        "FROM generate_series(1, 100000) i; "
        "CREATE INDEX ON driver_bench (created DESC, id DESC); ANALYZE driver_bench;"
    )
    cursors = [
        (r[0], r[1])
        for r in await conn.fetch(
            "SELECT created, id FROM driver_bench ORDER BY random() LIMIT 1000"
        )
    ]
    await conn.close()
    sql = (
        "SELECT id, created, status, name, doc FROM driver_bench WHERE (created, id) < ($1, $2) "
        "ORDER BY created DESC, id DESC LIMIT 50"
    )
    out: dict[str, Any] = {}
    pool = await asyncpg.create_pool(url, min_size=10, max_size=10)

    async def with_asyncpg(cursor: tuple[Any, Any]) -> None:
        async with pool.acquire() as c:
            await c.fetch(sql, *cursor)

    out["asyncpg"] = await _driver_figures(with_asyncpg, cursors)
    await pool.close()
    try:
        from psycopg_pool import AsyncConnectionPool
    except ImportError:
        out["psycopg"] = "not installed (pip install 'psycopg[binary]' psycopg-pool)"
        return out
    ppool = AsyncConnectionPool(url, min_size=10, max_size=10, open=False)
    await ppool.open()
    psql = sql.replace("$1", "%s").replace("$2", "%s")

    async def with_psycopg(cursor: tuple[Any, Any]) -> None:
        async with ppool.connection() as c:
            await (await c.execute(psql, cursor, prepare=True)).fetchall()

    out["psycopg"] = await _driver_figures(with_psycopg, cursors)
    await ppool.close()
    return out


async def _driver_figures(run_one: Any, cursors: list[tuple[Any, Any]]) -> dict[str, Any]:
    for cursor in cursors[:100]:
        await run_one(cursor)  # warm the statement caches
    latencies = []
    for cursor in cursors:
        started = time.perf_counter()
        await run_one(cursor)
        latencies.append((time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    await asyncio.gather(*(run_one(c) for c in cursors))
    return {
        "p50_ms": rounded(percentile(latencies, 50)),
        "p99_ms": rounded(percentile(latencies, 99)),
        "pages_per_s_10_connections": rounded(len(cursors) / (time.perf_counter() - started), 0),
    }


# --- the run ------------------------------------------------------------------------------------


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    vectors = Vectors()
    summary: dict[str, Any] = {"runs": []}
    root = Path(tempfile.mkdtemp(prefix="bench-readmodel-"))
    try:
        pg = PostgresServer(root / "pg", port=0)
        nats = NatsServer(root / "nats", port=0)
        s3_dir = root / "s3"
        weed = SeaweedFS(s3_dir, S3Credentials.load_or_create(s3_dir / "s3.json"), port=0)
        await asyncio.gather(pg.start(), nats.start(), weed.start())
        gateway: Gateway | None = None
        try:
            if opts.drivers:
                summary["drivers"] = await compare_drivers(pg.url)
                print(f"drivers: {summary['drivers']}", file=sys.stderr)
            pool = await open_pool(pg.url, SCHEMA, migrations(), size=10)
            db = ReadModel(pool)
            gateway, key = await start_gateway(root, pg, nats, weed, SCHEMA)
            await browse(gateway, key, 0, 200)
            summary["gateway_rss_mb_empty"] = rounded(gateway.rss_mb(), 1)
            seeded, stored = 0, None
            for rows in sorted(opts.rows):
                async with pool.acquire() as conn:  # bulk loads go faster without it
                    await conn.execute(f"DROP INDEX IF EXISTS {SCHEMA}.image_embeddings_bench")
                part = await seed(pool, seeded, rows, vectors)
                stored = part if stored is None else vectors.np.concatenate([stored, part])
                seeded = rows
                index_s = await build_index(pg.url, opts.m, opts.ef_construction)
                # Only captioned images have embeddings: keep the rows that are in the table.
                ready = vectors.np.array([_status(n) == "ready" for n in range(rows)])
                run = await _measure(db, rows, stored, ready, vectors, opts)
                await browse(gateway, key, rows, 200)
                run.update({"rows": rows, "hnsw_build_s": rounded(index_s, 1)})
                run["gateway_rss_mb"] = rounded(gateway.rss_mb(), 1)
                summary["runs"].append(run)
                _print_run(run)
            await pool.close()
        finally:
            if gateway is not None:
                await gateway.stop()
            for child in (weed, nats, pg):
                await child.stop()
    finally:
        if opts.keep:
            print(f"kept the data in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    last = summary["runs"][-1]
    summary.update(
        {
            k: last[k]
            for k in (
                "rows",
                "project_events_per_s",
                "page_p99_ms",
                "filtered_page_p99_ms",
                "tag_page_p99_ms",
                "vector_p50_ms",
                "vector_p99_ms",
                "vector_recall",
                "gateway_rss_mb",
            )
        }
    )
    summary["machine"] = {"cpu_count": os.cpu_count(), "load_avg_1m": load_average()}
    summary["elapsed_s"] = rounded(time.perf_counter() - started, 1)
    return summary


async def _measure(
    db: ReadModel, rows: int, stored: Any, ready: Any, vectors: Vectors, opts: argparse.Namespace
) -> dict[str, Any]:
    pages = await page_latencies(db, rows, opts.pages)
    numbers = vectors.np.nonzero(ready)[0]
    searches = await vector_search(db, stored[ready], numbers, vectors, opts.vector_queries)
    rate = await project_rate(db, rows, opts.project_images, vectors)
    out: dict[str, Any] = {"project_events_per_s": rounded(rate, 0)}
    for kind, values in pages.items():
        out[f"{kind}_p50_ms"] = rounded(percentile(values, 50))
        out[f"{kind}_p99_ms"] = rounded(percentile(values, 99))
    latencies, recall = searches[EF_SEARCH]
    out["vector_ef_search"] = EF_SEARCH
    out["vector_p50_ms"] = rounded(percentile(latencies, 50))
    out["vector_p99_ms"] = rounded(percentile(latencies, 99))
    out["vector_recall"] = rounded(recall, 4)
    out["vector_by_ef_search"] = {
        str(ef): {
            "p50_ms": rounded(percentile(lat, 50)),
            "p99_ms": rounded(percentile(lat, 99)),
            "recall": rounded(rec, 4),
        }
        for ef, (lat, rec) in searches.items()
    }
    return out


async def browse(gateway: Gateway, key: str, rows: int, requests: int) -> None:
    """Page through the list at random places, as clients do (for the gateway's RSS)."""
    import aiohttp

    rng = random.Random(5)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        for _ in range(requests):
            position = T0 + timedelta(seconds=rng.randrange(max(rows, 1)))
            cursor = encode_cursor("created", "desc", position, "img9999999999")
            async with http.get(
                f"{gateway.url}/api/images", params={"cursor": cursor, "limit": "100"}
            ) as response:
                response.raise_for_status()
                await response.read()


def _print_run(run: dict[str, Any]) -> None:
    print(
        f"{run['rows']:>9,} rows: project {run['project_events_per_s']} events/s; "
        f"page p50/p99 {run['page_p50_ms']}/{run['page_p99_ms']} ms, "
        f"filtered {run['filtered_page_p50_ms']}/{run['filtered_page_p99_ms']} ms "
        f"(again, warm: {run['filtered_page_warm_p50_ms']}/{run['filtered_page_warm_p99_ms']}), "
        f"tag {run['tag_page_p50_ms']}/{run['tag_page_p99_ms']} ms, "
        f"rare tag {run['rare_tag_page_p50_ms']}/{run['rare_tag_page_p99_ms']} ms, "
        f"text {run['text_page_p50_ms']}/{run['text_page_p99_ms']} ms; "
        f"vector top-20 {run['vector_p50_ms']}/{run['vector_p99_ms']} ms at recall "
        f"{run['vector_recall']} with ef_search {run['vector_ef_search']} "
        f"(HNSW built in {run['hnsw_build_s']} s; by ef_search: {run['vector_by_ef_search']}); "
        f"gateway RSS {run['gateway_rss_mb']} MB",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--pages", type=int, default=300, help="pages per kind and size")
    parser.add_argument("--vector-queries", type=int, default=200)
    parser.add_argument("--project-images", type=int, default=1000)
    parser.add_argument("--ef-construction", type=int, default=HNSW_EF_CONSTRUCTION)
    parser.add_argument("--m", type=int, default=HNSW_M, help="HNSW graph degree")
    parser.add_argument("--drivers", action="store_true", help="compare asyncpg and psycopg")
    parser.add_argument(
        "--keep", action="store_true", help="leave the servers' data behind (to look at plans)"
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.rows, opts.pages, opts.vector_queries, opts.project_images = [20_000], 30, 20, 100
    return run_and_report(lambda: asyncio.run(run(opts)))


if __name__ == "__main__":
    sys.exit(main())
