"""Approvals in the read model: what the policy holds, the decisions, the pending queue, the
carousel, and the rejections the sweep deletes.

An image's ``approval`` is derived by the database from its parts (migration 0004):

- the **policy** (``approval.hold`` in the settings) is judged where its facts arrive: how
  an image came in with its ``uploaded``/``generated`` event, its NSFW score with its
  ``captioned`` event. Each verdict is written with the columns of the stage that brought
  it, so the stage's ordering rule (newest event wins) keeps it right;
- a **decision** (an ``approved`` or ``rejected`` event, published by the gateway with who,
  when and why) is a stage of its own: the newest by stream sequence wins, whatever order
  the events arrive in;
- ``deleted`` (the sweep removed an expired rejection) drops the row.

``approved``/``rejected`` is the newest decision; else ``pending`` while a rule holds the
image, or while the policy screens NSFW scores and the caption has not come; else ``none``:
nothing to decide, shown like an approved image (:data:`bus.state.readmodel.SHOWN`). The
verdicts follow the policy of the process that projected the event: a changed policy
applies to events projected after the change (``darkroom reindex`` applies it to all), and
a decision always outranks it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from bus.core import subjects
from bus.core.envelope import Event
from bus.core.settings import HoldPolicy
from bus.state.readmodel import (
    BAD_DATA,
    DOC_COLUMNS,
    SHOWN_ONLY,
    SORTS,
    Page,
    ReadModelError,
    decode_cursor,
    document,
    encode_cursor,
    parse_time,
    upsert_stage,
)

log = logging.getLogger("darkroom.approvals")
DECISIONS = {subjects.APPROVED: "approved", subjects.REJECTED: "rejected"}
TOPICS = frozenset({*DECISIONS, subjects.DELETED})
MAX_REASON_CHARS = 500
DECISION_WAIT_S = 10  # the longest a decision waits for the one before it on its image
QUEUE_CURSOR = "approvals"  # a queue page's cursor says so: an image list's is refused here
_SHUFFLE_CURSOR = re.compile(r"^shuffle\.(\d{1,10})\|([0-9a-f]{32})\|([A-Za-z0-9_-]{1,64})$")
# Shown in the carousel: what every key sees, with a display rendition (migration 0006 keeps the
# carousel's version by the same rule).
_CAROUSEL = f"{SHOWN_ONLY} AND i.ingested_at IS NOT NULL"


def upload_hold(policy: HoldPolicy, event: Event) -> dict[str, Any]:
    """The upload stage's approval columns for an ``uploaded`` or ``generated`` event: why
    the policy holds the image (None: it does not), and whether it waits for its NSFW
    score."""
    reasons = []
    if policy.generated and event.type == subjects.GENERATED:
        reasons.append("generated")
    source, key = event.data.get("source"), event.data.get("key")
    if isinstance(source, str) and source in policy.sources:
        reasons.append(f"uploaded through {source}")
    if isinstance(key, str) and key in policy.keys:
        reasons.append(f"uploaded with key {key}")
    return {
        "upload_hold": "; ".join(reasons) or None,
        "screen": policy.nsfw_above is not None,
    }


def holds_generations(policy: HoldPolicy) -> bool:
    """Whether the policy holds what a generation makes, or may (it screens NSFW scores,
    which come only once the image is made): a generation's step previews are then shown
    to admin keys only."""
    return policy.generated or policy.nsfw_above is not None or "generate" in policy.sources


def caption_hold(policy: HoldPolicy, nsfw: float | None) -> str | None:
    """Why the policy holds an image for its caption's NSFW score (None: it does not). No
    score while the policy screens for one holds it too: it fails closed."""
    if policy.nsfw_above is None:
        return None
    if nsfw is None:
        return "no NSFW score"
    if nsfw > policy.nsfw_above:
        return f"NSFW score {nsfw:.2f} is above {policy.nsfw_above:g}"
    return None


def policy_fingerprint(policy: HoldPolicy) -> tuple[str, str]:
    """A fingerprint of ``policy`` (the same for the same rules), and the policy as JSON."""
    shown = orjson.dumps(policy.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS).decode()
    return hashlib.sha256(shown.encode()).hexdigest()[:16], shown


@dataclass(frozen=True, slots=True)
class CarouselQuery:
    """One page of the carousel: its order (by a sort key, or shuffled by a seed), the
    images from ``since`` on (the sort key), and where the last page ended."""

    sort: str = "taken"
    order: str = "desc"
    shuffle: bool = False
    seed: int = 0
    since: datetime | None = None
    cursor: str | None = None
    limit: int = 50

    def __post_init__(self) -> None:
        if self.sort not in SORTS:
            raise ReadModelError(f"sort must be one of {', '.join(SORTS)}, got {self.sort!r}")
        if self.cursor is not None:
            self.position()  # raises for a cursor of another order

    def position(self) -> tuple[Any, str] | None:
        """Where the previous page ended: (its sort key or shuffle hash, its id)."""
        if self.cursor is None:
            return None
        if self.shuffle:
            match = _SHUFFLE_CURSOR.match(self.cursor)
            if match is None or int(match.group(1)) != self.seed:
                raise ReadModelError(
                    f"cursor {self.cursor[:80]!r} is not one this API handed out for "
                    f"shuffle seed {self.seed}: ask again without it"
                )
            return match.group(2), match.group(3)
        return decode_cursor(self.cursor, self.sort, self.order)


@dataclass(frozen=True, slots=True)
class Expired:
    """A rejection the sweep deletes: the image, its original and the digest it claimed."""

    image_id: str
    original: str | None  # the original's key
    sha256: str | None


class Approvals:
    """Decisions on the images table, and the reads approvals need, over the read model's
    pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def project(self, event: Event, seq: int) -> bool:
        """Fold a decision or a deletion into its image's row; False when the row held a
        newer decision (or, deleting, there was no row)."""
        image_id = str(event.image_id)
        if not subjects.is_safe_id(image_id):
            raise ReadModelError(f"image_id {image_id[:80]!r} is not a valid id")
        try:
            async with self.pool.acquire() as conn:
                if event.type == subjects.DELETED:
                    done = await conn.execute("DELETE FROM images WHERE id = $1", image_id)
                    return bool(done != "DELETE 0")
                by, reason = event.data.get("by"), event.data.get("reason")
                row = await upsert_stage(
                    conn,
                    event,
                    parse_time(event.time),
                    seq,
                    "decision",
                    {
                        "decision": DECISIONS[event.type],
                        "decided_at": parse_time(event.time),
                        "decision_by": str(by)[:100] if by is not None else None,
                        "decision_reason": str(reason)[:MAX_REASON_CHARS] if reason else None,
                        "decision_id": event.id,
                    },
                )
                return row is not None
        except BAD_DATA as exc:
            raise ReadModelError(
                f"the database refused this {event.type} event: {type(exc).__name__}: {exc}"
            ) from None

    @contextlib.asynccontextmanager
    async def deciding(self, image_id: str) -> AsyncIterator[None]:
        """Decide on ``image_id`` alone while the block runs: a transaction-scoped advisory
        lock on the image in this schema, so decisions on one image, from any gateway on
        the database, take turns (one's stored decision and its event are both out before
        the next reads what it replaces). The lock goes with the transaction, or with the
        connection if the process dies. Raises ``asyncpg.LockNotAvailableError`` after
        :data:`DECISION_WAIT_S` behind another decision."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{DECISION_WAIT_S}s'")
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended("
                "current_schema() || ':decision:' || $1::text, 0))",
                image_id,
            )
            yield

    async def check_policy(self, policy: HoldPolicy) -> str | None:
        """Compare ``policy`` with the one the rows were judged with (recorded by the first
        process to start, and by ``darkroom reindex``): a warning, logged and returned,
        when they differ, since rows projected before keep their verdicts until a reindex
        judges them again; None when they agree (or nothing was recorded: now it is)."""
        fingerprint, shown = policy_fingerprint(policy)
        async with self.pool.acquire() as conn:
            recorded = await conn.fetchval(
                "INSERT INTO approval_policy (fingerprint, policy) VALUES ($1, $2::jsonb) "
                "ON CONFLICT (one) DO NOTHING RETURNING true",
                fingerprint,
                shown,
            )
            if recorded:
                return None
            row = await conn.fetchrow(
                "SELECT fingerprint, policy::text, judged_at FROM approval_policy"
            )
        if row is None or row["fingerprint"] == fingerprint:
            return None
        warning = (
            f"the approval policy (approval.hold) is {shown}, but the catalogue's images were "
            f"judged with {row['policy']} (as of {row['judged_at']:%Y-%m-%d %H:%M} UTC): "
            "new events follow the new policy, older images keep their verdicts until "
            "`darkroom reindex` judges them all again"
        )
        log.warning("%s", warning)
        return warning

    async def record_policy(self, policy: HoldPolicy) -> None:
        """Record that every row was judged with ``policy`` (after a reindex)."""
        fingerprint, shown = policy_fingerprint(policy)
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO approval_policy (fingerprint, policy) VALUES ($1, $2::jsonb) "
                "ON CONFLICT (one) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, "
                "policy = EXCLUDED.policy, judged_at = now()",
                fingerprint,
                shown,
            )

    async def queue(self, cursor: str | None = None, limit: int = 50) -> Page:
        """The pending images, oldest first (by upload time); ``cursor`` is the previous
        page's ``next_cursor``."""
        args: list[Any] = []
        where = ["i.approval = 'pending'"]
        if cursor is not None:
            moment, image_id = decode_cursor(cursor, QUEUE_CURSOR, "asc")
            args += [moment, image_id]
            where.append("(i.created, i.id) > ($1, $2)")
        args.append(limit)
        sql = (
            f"SELECT {DOC_COLUMNS} FROM images i WHERE {' AND '.join(where)} "
            f"ORDER BY i.created, i.id LIMIT ${len(args)}"
        )
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(sql, *args)
        next_cursor = None
        if len(rows) == limit:
            last = rows[-1]
            next_cursor = encode_cursor(QUEUE_CURSOR, "asc", last["created"], last["id"])
        return Page([document(row) for row in rows], next_cursor)

    async def carousel(self, query: CarouselQuery) -> Page:
        """One page of the images a display shows: nothing to decide or approved, and
        ingested. Shuffled, the order is by ``md5(seed || id)``: random-looking, and the
        same for the same seed, so a display pages through it stably (and keyset pages
        work as for a sort key)."""
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        key = f"i.{SORTS[query.sort]}"
        where = [_CAROUSEL]
        if query.since is not None:
            where.append(f"{key} >= {arg(query.since)}")
        if query.shuffle:
            order_key = f"md5({arg(str(query.seed))} || ':' || i.id)"
            direction, after = "ASC", ">"
        else:
            order_key = key
            direction, after = ("DESC", "<") if query.order == "desc" else ("ASC", ">")
        position = query.position()
        if position is not None:
            where.append(f"({order_key}, i.id) {after} ({arg(position[0])}, {arg(position[1])})")
        sql = (
            f"SELECT {DOC_COLUMNS}, {order_key} AS position FROM images i "
            f"WHERE {' AND '.join(where)} "
            f"ORDER BY {order_key} {direction}, i.id {direction} LIMIT {arg(query.limit)}"
        )
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(sql, *args)
        next_cursor = None
        if len(rows) == query.limit:
            last = rows[-1]
            if query.shuffle:
                next_cursor = f"shuffle.{query.seed}|{last['position']}|{last['id']}"
            else:
                next_cursor = encode_cursor(query.sort, query.order, last["position"], last["id"])
        return Page([document(row) for row in rows], next_cursor)

    async def carousel_version(self) -> tuple[int, str]:
        """How many images the carousel shows, and its version, which changes when one
        comes or goes, or gets a newer event of a stage the carousel shows (its renditions,
        its caption, a decision). The database keeps both as rows change (migration 0006),
        so this reads 16 small rows, however many images there are."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT sum(total), sum(version) FROM carousel_version")
        return int(row[0]), str(row[1])

    async def expired_rejections(self, before: datetime, limit: int = 100) -> list[Expired]:
        """Rejected images decided before ``before``, the oldest first."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, upload->'original'->>'key' AS original, upload->>'sha256' AS sha256 "
                "FROM images WHERE decision = 'rejected' AND decided_at < $1 "
                "ORDER BY decided_at LIMIT $2",
                before,
                limit,
            )
        return [Expired(row["id"], row["original"], row["sha256"]) for row in rows]
