"""A big catalogue in one statement: rows written straight into the read model's ``images``
table with COPY (as tests/bench/bench_readmodel.py loads its tables), for the gallery's
browser test and benchmark. The rows are ready images with a BlurHash and no renditions:
the gallery lays out and paints placeholders without any object in the store.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import orjson

T0 = datetime(2026, 1, 1, tzinfo=UTC)
STEP = timedelta(seconds=40)  # 100,000 rows: 67,000 in January (a huge month), 33,000 in February
# Published BlurHash examples: a few colours, so that the grid shows movement as it scrolls.
BLURHASHES = (
    "LEHV6nWB2yk8pyo0adR*.7kCMdnj",
    "LGF5]+Yk^6#M@-5c,1J5@[or[Q6.",
    "L6PZfSi_.AyE_3t7t7R**0o#DgR4",
    "LKN]Rv%2Tw=w]~RBVZRi};RPxuwH",
)
CHUNK = 10_000
COPY_TIMEOUT_S = 120.0
COLUMNS = [
    "id",
    "created",
    "name",
    "upload",
    "upload_seq",
    "uploaded_at",
    "ingest",
    "ingest_seq",
    "ingested_at",
    "caption",
    "caption_seq",
    "captioned_at",
    "caption_text",
]


def seeded_id(n: int) -> str:
    """The id of row ``n`` (0 is the oldest)."""
    return f"seed{n:010d}"


async def seed_images(pool: asyncpg.Pool, schema: str, count: int) -> list[str]:
    """``count`` ready images, ``STEP`` apart from ``T0``; their ids, oldest first."""
    records = []
    for n in range(count):
        image_id = seeded_id(n)
        created = T0 + n * STEP
        caption = f"seeded photo number {n}"
        records.append(
            (
                image_id,
                created,
                f"seed-{n}.jpg",
                orjson.dumps({"original": {"key": f"uploads/{image_id}/seed.jpg"}}).decode(),
                1,
                created,
                orjson.dumps(
                    {"width": 640, "height": 480, "blurhash": BLURHASHES[n % len(BLURHASHES)]}
                ).decode(),
                2,
                created,
                orjson.dumps({"caption": caption, "demo": False}).decode(),
                3,
                created,
                caption,
            )
        )
    async with pool.acquire() as conn:
        for low in range(0, count, CHUNK):  # the pool's command timeout is per statement
            await conn.copy_records_to_table(
                "images",
                schema_name=schema,
                columns=COLUMNS,
                records=records[low : low + CHUNK],
                timeout=COPY_TIMEOUT_S,
            )
        await conn.execute("ANALYZE images")
    return [seeded_id(n) for n in range(count)]
