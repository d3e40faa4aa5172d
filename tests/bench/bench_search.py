"""Search and similar images at 10^5 (and, with ``--large``, 10^6) images: latency through
the product's code, against an exact scan of the same data.

Run with ``python -m tests.bench.bench_search [--large] [--queries 200] [--quick]``; it
needs numpy (``make install-ml`` brings it) and about 3 GB of disk at 10^5 (about 25 GB and
a long index build at 10^6). The last line printed is JSON.

Method
------
One run starts the embedded PostgreSQL 18 + pgvector (``PostgresServer``) in a temporary
directory and migrates a schema ``bench``. Then:

* **Seed** 10^5 captioned images with binary COPY straight into the tables: a 768-d image
  embedding (model ``bench-siglip``) and a 384-d caption embedding (``bench-minilm``) each,
  random unit vectors drawn as bench_readmodel draws them (around 1,000 random centres with
  a wide spread, so the true neighbours are only slightly nearer than the rest of their
  cluster; ``--uniform``: uniform on the sphere, where every point is about as far as any
  other and an approximate index can hardly do better than chance); a tag ``common`` on
  10% of the images, ``rare`` on 1%; an NSFW score. The HNSW indexes are built after the
  load through ``ReadModel.ensure_vector_index`` (the product's index, with its ``m`` and
  ``ef_construction``), then ``VACUUM ANALYZE`` and a checkpoint.
* **Measure** (after ``--warmup`` unmeasured queries of each kind) ``--queries`` calls of
  each kind through ``ReadModel``: ``search`` with both signals (query vectors drawn as the
  data), without a filter and with ``tag=common`` and ``tag=rare``; ``similar`` for random
  images. Each asks for the first page of 20. p50 and p99 in ms, timed in this process (so they
  include the driver and the fusion in Python). The server runs with the embedded
  PostgreSQL's settings (``shared_buffers`` 128 MB, smaller than the indexes).
* **Plans**: EXPLAIN of the search statement, unforced, says whether the planner took each
  signal's HNSW index (without a filter and with ``tag=common``).
* **Exact baseline** at 10^5: the HNSW indexes are dropped and the same queries run again
  through the same code, now answered by a sequential scan (exact). ``recall_at_10`` is the
  share of the exact top 10 (fused, both signals) that the indexed search found, over the
  unfiltered queries; ``similar_recall_at_10`` the same for ``similar``.
* **10^6** (``--large``): seeding continues to 10^6 without indexes, they are built again
  (the build time is reported), and search and similar are measured as at 10^5; recall at
  10^6 (and the exact scan's p50) from 20 exact searches. Without ``--large`` the 10^6
  figures are null.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from bus.infra.postgres import open_pool
from bus.ops.pgserver import PostgresServer
from bus.state.readmodel import (
    QueryVector,
    ReadModel,
    SearchFilters,
    SearchResult,
    migrations,
    search_sql,
)
from tests.bench.bench_readmodel import _need_numpy, _with_vector_codec
from tests.bench.report import load_average, percentile, rounded, run_and_report

SCHEMA = "bench"
IMAGE_MODEL, IMAGE_DIM = "bench-siglip", 768
TEXT_MODEL, TEXT_DIM = "bench-minilm", 384
CHUNK = 10_000
PAGE = 20
RECALL_AT = 10
# Clustered like bench_readmodel's data: around 1,000 centres with a wide spread, so the
# true neighbours are only slightly nearer than the rest of their cluster.
CENTRES = 1000
SPREAD = 0.6
T0 = datetime(2020, 1, 1, tzinfo=UTC)


class Data:
    """Random unit vectors around fixed random centres (per dimension count), reproducibly;
    ``uniform``: uniform on the sphere instead."""

    def __init__(self, seed: int = 7, uniform: bool = False) -> None:
        self.np = _need_numpy()
        self.rng = self.np.random.default_rng(seed)
        self.uniform = uniform
        self.centres: dict[int, Any] = {}

    def unit(self, count: int, dim: int) -> Any:
        np = self.np
        points = self.rng.standard_normal((count, dim), dtype=np.float32)
        if not self.uniform:
            if dim not in self.centres:
                self.centres[dim] = self.rng.standard_normal((CENTRES, dim), dtype=np.float32)
            which = self.rng.integers(0, CENTRES, size=count)
            points = self.centres[dim][which] + SPREAD * points
        points /= np.linalg.norm(points, axis=1, keepdims=True)
        return points


async def seed(pool: asyncpg.Pool, start: int, stop: int, data: Data) -> None:
    """Captioned images ``start``..``stop``-1, with both embeddings, tags and NSFW scores."""
    rng = random.Random(start)
    async with pool.acquire() as conn:
        await _with_vector_codec(conn)
        for low in range(start, stop, CHUNK):
            high = min(stop, low + CHUNK)
            images_v, texts_v = data.unit(high - low, IMAGE_DIM), data.unit(high - low, TEXT_DIM)
            images, tags, embeddings = [], [], []
            for offset, n in enumerate(range(low, high)):
                image_id = f"img{n:010d}"
                created = T0 + timedelta(seconds=n)
                names = [
                    t for t, share in (("common", 0.10), ("rare", 0.01)) if rng.random() < share
                ]
                images.append(
                    (
                        image_id,
                        created,
                        created,
                        3,
                        f"photo {n}",
                        names,
                        rng.random(),
                        '{"caption": "x"}',
                    )
                )
                tags += [(image_id, t, 0.5, created, created) for t in names]
                embeddings.append((image_id, "image", IMAGE_MODEL, IMAGE_DIM, images_v[offset], 3))
                embeddings.append((image_id, "text", TEXT_MODEL, TEXT_DIM, texts_v[offset], 3))
            await conn.copy_records_to_table(
                "images",
                schema_name=SCHEMA,
                columns=[
                    "id",
                    "created",
                    "captioned_at",
                    "caption_seq",
                    "caption_text",
                    "tags",
                    "nsfw",
                    "caption",
                ],
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
                records=embeddings,
            )
            print(f"  seeded {high:,} images", file=sys.stderr, end="\r")
    print(file=sys.stderr)


async def _connect(url: str) -> asyncpg.Connection:
    """A connection of its own: the pool's 60 s command timeout is shorter than a build."""
    return await asyncpg.connect(url, server_settings={"search_path": f"{SCHEMA}, public"})


async def build_indexes(url: str) -> float:
    """The product's two HNSW indexes, made after the load; seconds taken."""
    started = time.perf_counter()
    conn = await _connect(url)
    try:
        await conn.execute("SET maintenance_work_mem = '6GB'")  # the 10^6 graph fits
        await conn.execute("SET max_parallel_maintenance_workers = 2")
        await ReadModel.ensure_vector_index(conn, "image", IMAGE_MODEL, IMAGE_DIM)
        await ReadModel.ensure_vector_index(conn, "text", TEXT_MODEL, TEXT_DIM)
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return time.perf_counter() - started


async def drop_indexes(url: str) -> None:
    """Drop the HNSW indexes, so that searches scan (the ReadModel remembers the models'
    dimensions; build_indexes makes them again)."""
    conn = await _connect(url)
    try:
        for name in await conn.fetch("SELECT name FROM embedding_indexes"):
            await conn.execute(f"DROP INDEX IF EXISTS {SCHEMA}.{name[0]}")
        await conn.execute("DELETE FROM embedding_indexes")
    finally:
        await conn.close()


def queries(data: Data, count: int) -> list[list[QueryVector]]:
    images, texts = data.unit(count, IMAGE_DIM), data.unit(count, TEXT_DIM)
    return [
        [
            QueryVector("image", IMAGE_MODEL, images[n].tolist()),
            QueryVector("text", TEXT_MODEL, texts[n].tolist()),
        ]
        for n in range(count)
    ]


async def timed(
    calls: list[Callable[[], Awaitable[SearchResult | None]]], warmup: int
) -> tuple[list[float], list[list[str]]]:
    """Latencies (ms) of ``calls`` after ``warmup`` of them unmeasured, and their result ids."""
    for call in calls[:warmup]:
        await call()
    latencies, found = [], []
    for call in calls:
        started = time.perf_counter()
        result = await call()
        latencies.append((time.perf_counter() - started) * 1000)
        found.append([item["id"] for item in result.items] if result else [])
    return latencies, found


def _search(db: ReadModel, signals: list[QueryVector], tag: str | None) -> Any:
    return lambda: db.search(signals, SearchFilters(tag=tag), limit=PAGE)


def _similar(db: ReadModel, image_id: str) -> Any:
    return lambda: db.similar(image_id, limit=PAGE)


async def measure(
    db: ReadModel, rows: int, asked: list[list[QueryVector]], warmup: int
) -> dict[str, Any]:
    """p50/p99 of each kind of query, and what each returned (for recall)."""
    rng = random.Random(rows)
    picks = [f"img{rng.randrange(rows):010d}" for _ in asked]
    kinds = {
        "search": [_search(db, q, None) for q in asked],
        "search_common_tag": [_search(db, q, "common") for q in asked],
        "search_rare_tag": [_search(db, q, "rare") for q in asked],
        "similar": [_similar(db, image_id) for image_id in picks],
    }
    out: dict[str, Any] = {"found": {}}
    for kind, calls in kinds.items():
        latencies, found = await timed(calls, warmup)
        out[f"{kind}_p50_ms"] = rounded(percentile(latencies, 50))
        out[f"{kind}_p99_ms"] = rounded(percentile(latencies, 99))
        out["found"][kind] = found
    return out


def recall(approximate: list[list[str]], exact: list[list[str]]) -> float | None:
    shares = [
        len(set(a[:RECALL_AT]) & set(e[:RECALL_AT])) / len(e[:RECALL_AT])
        for a, e in zip(approximate, exact, strict=True)
        if e
    ]
    return rounded(statistics.fmean(shares), 4) if shares else None


async def plans(db: ReadModel, signals: list[QueryVector]) -> dict[str, bool]:
    """Whether the planner, unforced, takes both HNSW indexes for the search statement."""
    async with db.pool.acquire() as conn:
        names = [r[0] for r in await conn.fetch("SELECT name FROM embedding_indexes")]
    out = {}
    for label, filters in (("plain", SearchFilters()), ("common_tag", SearchFilters(tag="common"))):
        sql, args = search_sql(signals, filters)
        async with db.pool.acquire() as conn, conn.transaction():
            await conn.execute(await db.search_settings(conn, filters.narrows))
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}", *args))
        out[f"plan_uses_hnsw_{label}"] = all(name in plan for name in names)
    return out


async def coverage_ms(db: ReadModel) -> float | None:
    started = time.perf_counter()
    await db.embedding_coverage()
    return rounded((time.perf_counter() - started) * 1000)


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    data = Data(uniform=opts.uniform)
    small = opts.rows
    summary: dict[str, Any] = {"rows": small}
    root = Path(tempfile.mkdtemp(prefix="bench-search-"))
    try:
        pg = PostgresServer(root / "pg", port=0)
        await pg.start()
        try:
            pool = await open_pool(pg.url, SCHEMA, migrations(), size=4)
            db = ReadModel(pool)
            clock = time.perf_counter()
            await seed(pool, 0, small, data)
            summary["seed_s_100k"] = rounded(time.perf_counter() - clock, 1)
            summary["hnsw_build_s_100k"] = rounded(await build_indexes(pg.url), 1)
            asked = queries(data, opts.queries)
            summary.update(await plans(db, asked[0]))
            summary["coverage_ms_100k"] = await coverage_ms(db)
            fast = await measure(db, small, asked, opts.warmup)
            _report(summary, fast, "100k")
            await drop_indexes(pg.url)
            exact_n = min(opts.exact_queries, len(asked))
            exact = await measure(db, small, asked[:exact_n], min(opts.warmup, 5))
            summary["exact_scan_p50_ms_100k"] = exact["search_p50_ms"]
            summary["exact_scan_p99_ms_100k"] = exact["search_p99_ms"]
            summary["exact_scan_common_tag_p99_ms_100k"] = exact["search_common_tag_p99_ms"]
            summary["exact_similar_p99_ms_100k"] = exact["similar_p99_ms"]
            summary["recall_at_10"] = recall(
                fast["found"]["search"][:exact_n], exact["found"]["search"]
            )
            summary["recall_at_10_common_tag"] = recall(
                fast["found"]["search_common_tag"][:exact_n], exact["found"]["search_common_tag"]
            )
            summary["similar_recall_at_10"] = recall(
                fast["found"]["similar"][:exact_n], exact["found"]["similar"]
            )
            print(f"10^5: {summary}", file=sys.stderr)
            summary["search_p99_ms_1m"] = None
            if opts.large:
                await _large(summary, db, pool, pg.url, data, asked, opts)
            await pool.close()
        finally:
            await pg.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary["machine"] = {"cpu_count": os.cpu_count(), "load_avg_1m": load_average()}
    summary["elapsed_s"] = rounded(time.perf_counter() - started, 1)
    return summary


async def _large(
    summary: dict[str, Any],
    db: ReadModel,
    pool: asyncpg.Pool,
    url: str,
    data: Data,
    asked: list[list[QueryVector]],
    opts: argparse.Namespace,
) -> None:
    large = 10 * opts.rows
    clock = time.perf_counter()
    await seed(pool, opts.rows, large, data)
    summary["seed_s_1m"] = rounded(time.perf_counter() - clock, 1)
    summary["hnsw_build_s_1m"] = rounded(await build_indexes(url), 1)
    summary["coverage_ms_1m"] = await coverage_ms(db)
    fast = await measure(db, large, asked, opts.warmup)
    _report(summary, fast, "1m")
    await drop_indexes(url)
    exact_latencies, exact = await timed([_search(db, q, None) for q in asked[:20]], 0)
    summary["exact_scan_p50_ms_1m"] = rounded(percentile(exact_latencies, 50))
    summary["recall_at_10_1m"] = recall(fast["found"]["search"][:20], exact)


def _report(summary: dict[str, Any], figures: dict[str, Any], size: str) -> None:
    for key, value in figures.items():
        if key != "found":
            summary[f"{key}_{size}"] = value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=100_000, help="the small size (10^5)")
    parser.add_argument("--large", action="store_true", help="also 10x --rows (10^6)")
    parser.add_argument("--queries", type=int, default=200, help="per kind and size")
    parser.add_argument("--exact-queries", type=int, default=100, help="exact-scan queries")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--uniform", action="store_true", help="vectors uniform on the sphere")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.rows, opts.queries, opts.exact_queries, opts.warmup = 5_000, 20, 10, 5
    return run_and_report(lambda: asyncio.run(run(opts)))


if __name__ == "__main__":
    sys.exit(main())
