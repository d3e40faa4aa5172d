"""Reads the image viewer needs besides the list's: an image's relatives by lineage, and its
exact place in a sorted list (for the images either side of it).

A generated image's ``lineage`` (kept from its ``generated`` event) names its job and, for
the image modes, its ``parent``: the image it started from. Its children are the images
whose lineage names it; its siblings, the other outputs of its job.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from bus.state.readmodel import DOC_COLUMNS, SHOWN_ONLY, SORTS, document

MAX_RELATIVES = 100  # children (and siblings) listed, the newest first


@dataclass(frozen=True, slots=True)
class Relatives:
    children: list[dict[str, Any]]
    siblings: list[dict[str, Any]]


async def relatives(
    pool: asyncpg.Pool, image_id: str, job_id: str | None, shown_only: bool
) -> Relatives:
    """The images made from ``image_id``, and the other outputs of its job ``job_id``;
    ``shown_only``: only those every key sees."""
    visible = f" AND {SHOWN_ONLY}" if shown_only else ""
    sql = (
        f"SELECT {DOC_COLUMNS} FROM images i WHERE i.kind = 'generated' AND {{which}}{visible} "
        f"ORDER BY i.created DESC, i.id DESC LIMIT {MAX_RELATIVES}"
    )
    async with pool.acquire() as conn:
        children = await conn.fetch(
            sql.format(which="i.upload->'lineage'->>'parent' = $1"), image_id
        )
        siblings = []
        if job_id is not None:
            siblings = await conn.fetch(
                sql.format(which="i.upload->'lineage'->>'job_id' = $1 AND i.id <> $2"),
                job_id,
                image_id,
            )
    return Relatives([document(r) for r in children], [document(r) for r in siblings])


async def sort_key(pool: asyncpg.Pool, image_id: str, sort: str) -> datetime | None:
    """The image's exact key (to the microsecond) for ``sort`` (see
    :data:`bus.state.readmodel.SORTS`); None if there is no such image."""
    column = SORTS[sort]
    async with pool.acquire() as conn:
        moment: datetime | None = await conn.fetchval(
            f"SELECT {column} FROM images WHERE id = $1", image_id
        )
    return moment
