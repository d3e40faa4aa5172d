"""The image read model: a PostgreSQL (+ pgvector) projection of the lifecycle events.

notify projects every event into the ``images`` row of its image (:meth:`ReadModel.project`),
and a generation job's events into the ``generations`` row of its job
(:mod:`bus.state.generations`); the gateway pages, filters and reads those rows. The store
and the event stream stay the source of truth: ``darkroom reindex`` rebuilds everything here
from them.

**Order.** Each stage writes its own columns and records the stream sequence of the event
that wrote them; an upsert only replaces a stage's columns with a newer sequence's. Events
can therefore arrive in any order, twice, or be replayed, and the row ends the same. Each
event is one transaction on one row, so concurrent notify workers need no locking of their
own (and no compare-and-set loop).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from bus.core import subjects
from bus.core.envelope import Event
from bus.core.settings import HoldPolicy, Settings
from bus.infra.postgres import Migration, open_pool

log = logging.getLogger("darkroom.readmodel")
COUNTS_TTL_S = 30.0  # how stale the per-model embedding counts may be

MIGRATIONS = Path(__file__).with_name("migrations")
STATUSES = ("uploaded", "ingested", "ready", "failed")
APPROVALS = ("none", "pending", "approved", "rejected")
# What every key sees (nothing to decide, or approved); pending and rejected only admin keys.
SHOWN = ("none", "approved")
SHOWN_ONLY = "i.approval IN ('none', 'approved')"
SORTS = {"created": "created", "taken": "taken_or_created"}
UPLOAD_KEYS = (
    "sha256",
    "source",
    "original_name",
    "hook",
    "key",  # the API key it came through (its id)
    "gps_removed",
    "lineage",
    "format",
)
MAX_EMBEDDING_DIM = 2000  # pgvector's HNSW limit for the vector type
# HNSW: the graph's degree and build effort, and the candidates a query looks at. Chosen
# with tests/bench/bench_readmodel.py (recall of the top 20 at 10^6 images).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 128
EF_SEARCH = 200
# A search takes this many candidates from each signal's HNSW index (with ef_search the
# same: less would cut the list short, more buys recall the fused top results do not need),
# and pages through at most this many results. Chosen on tests/bench/bench_search.py's
# 10^5 images: the fused top 10 matched an exact scan's as well with 100 as with 200
# (recall 1.0 against 0.997 over 30 queries) in half the time (p50 18 against 35 ms).
SEARCH_CANDIDATES = 100
MAX_SEARCH_RESULTS = SEARCH_CANDIDATES
RRF_K = 60  # Reciprocal Rank Fusion's constant (Cormack et al. 2009; Elasticsearch's default)
_WORD = re.compile(r"[\w-]+")
# What the database refuses about an event's data (as opposed to being unreachable).
BAD_DATA = (
    asyncpg.exceptions.DataError,  # 22xxx: out of range, bad characters...
    asyncpg.exceptions._base.DataError,  # the client could not encode a value
    asyncpg.IntegrityConstraintViolationError,  # 23xxx
)


class ReadModelError(ValueError):
    """An event or a query the read model cannot take; the message says why."""


def migrations() -> list[Migration]:
    return Migration.load_all(MIGRATIONS)


async def open_read_model(settings: Settings, client_name: str) -> ReadModel:
    """Connect to the configured PostgreSQL, migrate the namespace's schema, open a pool;
    warn if the approval policy is not the one the rows were judged with."""
    pg = settings.postgres
    if pg.url is None:
        raise ValueError("the read model needs a resolved PostgreSQL URL")
    pool = await open_pool(
        pg.url.get_secret_value(),
        settings.db_schema,
        migrations(),
        size=pg.pool_size,
        timeout=pg.connect_timeout_s,
        application_name=f"darkroom-{client_name}",
    )
    model = ReadModel(pool, settings.approval.hold)
    await model.approvals.check_policy(model.policy)  # warns when the rows had another
    return model


def parse_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise ReadModelError(f"{text!r} is not an ISO 8601 time") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def format_time(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class ImageQuery:
    """One page of the catalogue: filters, a sort, and where the last page ended."""

    status: str | None = None
    tag: str | None = None
    approval: str | None = None
    since: datetime | None = None  # on the sort key, inclusive
    until: datetime | None = None  # on the sort key, exclusive
    as_of: datetime | None = None  # on created (whatever the sort), inclusive
    has_caption: bool | None = None
    text: str | None = None
    sort: str = "created"  # or "taken" (falls back to created)
    order: str = "desc"
    cursor: str | None = None
    limit: int = 50
    shown_only: bool = False  # only what every key sees (approval none or approved)

    def __post_init__(self) -> None:
        _check_status_and_approval(self.status, self.approval)
        if self.sort not in SORTS:
            raise ReadModelError(f"sort must be one of {', '.join(SORTS)}, got {self.sort!r}")
        if self.order not in ("desc", "asc"):
            raise ReadModelError(f"order must be desc or asc, got {self.order!r}")
        if self.since and self.until and self.since >= self.until:
            raise ReadModelError("since must be before until")
        if self.cursor is not None:
            decode_cursor(self.cursor, self.sort, self.order)
        if self.text is not None and _text_query(self.text) is None:
            raise ReadModelError(f"q has no words to search for: {self.text[:80]!r}")


def _check_status_and_approval(status: str | None, approval: str | None) -> None:
    if status is not None and status not in STATUSES:
        raise ReadModelError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    if approval is not None and approval not in APPROVALS:
        raise ReadModelError(f"approval must be one of {', '.join(APPROVALS)}, got {approval!r}")


@dataclass(frozen=True, slots=True)
class SearchFilters:
    """What a search or a similar-images query keeps: a tag, a status, an approval, an
    NSFW score below a threshold (images without a score are left out then), and only what
    every key sees (approval none or approved)."""

    tag: str | None = None
    status: str | None = None
    approval: str | None = None
    nsfw_below: float | None = None
    shown_only: bool = False

    def __post_init__(self) -> None:
        _check_status_and_approval(self.status, self.approval)
        if self.nsfw_below is not None and not 0 <= self.nsfw_below <= 1:
            raise ReadModelError(f"nsfw_below must be 0-1, got {self.nsfw_below!r}")

    @property
    def narrows(self) -> bool:
        return self.shown_only or any(
            v is not None for v in (self.tag, self.status, self.approval, self.nsfw_below)
        )


@dataclass(frozen=True, slots=True)
class QueryVector:
    """One signal of a search: ``vector``, compared with the stored ``kind`` embeddings
    (``image`` or ``text``) that ``model`` made."""

    kind: str
    model: str
    vector: Sequence[float]


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One page of a search: image documents with ``score`` and ``similarity`` added, the
    next page's offset (None on the last), and the (kind, model) of each signal asked."""

    items: list[dict[str, Any]]
    next_offset: int | None
    signals: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


def encode_cursor(sort: str, order: str, moment: datetime, image_id: str) -> str:
    """Where a page ended: the sort, its direction, the last row's key (to the microsecond)
    and id."""
    exact = moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return f"{sort}.{order}|{exact}|{image_id}"


def decode_cursor(cursor: str, sort: str = "created", order: str = "desc") -> tuple[datetime, str]:
    """The sort key and id a cursor of the same sort and order names."""
    parts = cursor.split("|")
    if len(parts) != 3 or not subjects.is_safe_id(parts[2]):
        raise ReadModelError(f"cursor {cursor[:80]!r} is not one this API handed out")
    if parts[0] != f"{sort}.{order}":
        raise ReadModelError(
            f"this cursor is for sort/order {parts[0].replace('.', '/')}, "
            f"not {sort}/{order}: ask again without it"
        )
    return parse_time(parts[1]), parts[2]


def has_words(text: str) -> bool:
    """Whether ``text`` holds a word (in any script) to search for."""
    return _text_query(text) is not None


def _text_query(text: str) -> str | None:
    """Words of ``text`` as a prefix-matching tsquery (every word must match)."""
    words = _WORD.findall(text.lower())[:16]
    return " & ".join(f"{w}:*" for w in words) or None


# --- projection -----------------------------------------------------------------------------


class ReadModel:
    """The catalogue in PostgreSQL, over a pool whose connections use the namespace's schema."""

    def __init__(self, pool: asyncpg.Pool, policy: HoldPolicy | None = None) -> None:
        from bus.state.approvals import Approvals  # they build on this module
        from bus.state.generations import Generations

        self.pool = pool
        self.generations = Generations(pool)  # generation jobs (their own table)
        self.approvals = Approvals(pool)  # decisions, the pending queue, the carousel
        self.policy = policy or HoldPolicy()  # what waits for a decision (approval.hold)
        self._vector_indexes: dict[tuple[str, str], int] = {}  # (kind, model) -> dimensions
        # Images each (kind, model) has embedded, counted at most every COUNTS_TTL_S: which
        # model serves while another re-embeds, without counting on every query.
        self._counts: tuple[float, dict[tuple[str, str], int]] | None = None
        self._iterative_scan: bool | None = None  # pgvector 0.8+ (known after first use)

    async def project(self, event: Event, seq: int) -> bool:
        """Fold ``event`` (stream sequence ``seq``) into its image's row, and a generation
        job's events into the job's (a ``generated`` event into both), and a decision on an
        image into its row (:mod:`bus.state.approvals`); False when it was older than what
        the rows hold (or about neither)."""
        from bus.state import approvals
        from bus.state.generations import is_job_event

        if event.type in approvals.TOPICS:
            return await self.approvals.project(event, seq)
        job = await self.generations.project(event, seq) if is_job_event(event) else False
        if event.image_id:
            return await self._project_image(event, seq) or job
        return job

    async def _project_image(self, event: Event, seq: int) -> bool:
        image_id = str(event.image_id)
        if not subjects.is_safe_id(image_id):
            raise ReadModelError(f"image_id {image_id[:80]!r} is not a valid id")
        moment = parse_time(event.time)
        topic = event.type
        embeddings: list[_Embedding] = []
        if topic == subjects.CAPTIONED:
            embeddings = _embeddings(event.data.get("embeddings"))
            for embedding in embeddings:  # before the row's transaction: see _vector_index
                await self._vector_index(embedding)
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if topic in (subjects.UPLOADED, subjects.GENERATED):
                    changed = await self._uploaded(conn, event, moment, seq)
                elif topic == subjects.INGESTED:
                    changed = await self._ingested(conn, event, moment, seq)
                elif topic == subjects.CAPTIONED:
                    changed = await self._captioned(conn, event, moment, seq, embeddings)
                elif topic.startswith(subjects.FAILED + "."):
                    changed = await self._failed(conn, event, moment, seq)
                else:
                    return False
                if changed is not None and topic != subjects.CAPTIONED:
                    # The sort keys copied to the tags move with the upload's time and the
                    # date taken (a caption writes its tags with the current keys).
                    await conn.execute(
                        "UPDATE image_tags t SET created = i.created, "
                        "taken_or_created = i.taken_or_created FROM images i "
                        "WHERE t.image_id = $1 AND i.id = $1 AND "
                        "(t.created, t.taken_or_created) IS DISTINCT FROM "
                        "(i.created, i.taken_or_created)",
                        image_id,
                    )
                return changed is not None
        except BAD_DATA as exc:
            raise ReadModelError(
                f"the database refused this {topic} event: {type(exc).__name__}: {exc}"
            ) from None

    async def _uploaded(
        self, conn: asyncpg.Connection, event: Event, moment: datetime, seq: int
    ) -> asyncpg.Record | None:
        from bus.state.approvals import upload_hold

        upload: dict[str, Any] = {k: event.data[k] for k in UPLOAD_KEYS if k in event.data}
        if event.object is not None:
            upload["original"] = event.object.to_dict()
        kind = "generated" if event.type == subjects.GENERATED else "upload"
        return await upsert_stage(
            conn,
            event,
            moment,
            seq,
            "upload",
            {
                "kind": kind,
                "created": moment,  # an image is as old as its upload, whatever came first
                "name": str(event.data.get("name", "")),
                "upload": _json(upload),
                "uploaded_at": moment,
                **upload_hold(self.policy, event),
            },
        )

    async def _ingested(
        self, conn: asyncpg.Connection, event: Event, moment: datetime, seq: int
    ) -> asyncpg.Record | None:
        info = event.data
        exif = info.get("exif")
        taken = None
        if isinstance(exif, dict) and isinstance(exif.get("taken_at"), str):
            try:
                taken = parse_time(exif["taken_at"])
            except ReadModelError:
                taken = None  # a camera's odd date is no reason to refuse the event
        return await upsert_stage(
            conn,
            event,
            moment,
            seq,
            "ingest",
            {
                "ingest": _json(info),
                "ingested_at": moment,
                "width": _int_or_none(info.get("width")),
                "height": _int_or_none(info.get("height")),
                "taken": taken,
            },
        )

    async def _captioned(
        self,
        conn: asyncpg.Connection,
        event: Event,
        moment: datetime,
        seq: int,
        embeddings: list[_Embedding],
    ) -> asyncpg.Record | None:
        from bus.state.approvals import caption_hold

        data = event.data
        tags = _tags(data.get("tags"))
        caption = data.get("caption")
        nsfw = nsfw_score(data.get("nsfw"))
        row = await upsert_stage(
            conn,
            event,
            moment,
            seq,
            "caption",
            {
                "caption": _json({k: v for k, v in data.items() if k != "embeddings"}),
                "captioned_at": moment,
                "caption_text": caption if isinstance(caption, str) else None,
                "tags": [name for name, _ in tags],
                "nsfw": nsfw,
                "caption_hold": caption_hold(self.policy, nsfw),
                "caption_request_seq": _int_or_none(data.get("request_seq")),
            },
            rank="caption_request_seq",
        )
        if row is None:
            # An older caption still brings its image vectors (each model's newest wins,
            # so events in any order end in the same rows) and the text vectors of a model
            # the image has none of; it never replaces the text vectors of the caption shown.
            for embedding in embeddings:
                replace = embedding.kind == "image"
                await self._embed(conn, str(event.image_id), embedding, seq, replace=replace)
            return None
        await conn.execute("DELETE FROM image_tags WHERE image_id = $1", event.image_id)
        await conn.executemany(
            "INSERT INTO image_tags (image_id, tag, score, created, taken_or_created) "
            "VALUES ($1, $2, $3, $4, $5)",
            [(event.image_id, name, score, row[0], row[1]) for name, score in tags],
        )
        for embedding in embeddings:
            await self._embed(conn, str(event.image_id), embedding, seq)
        return row

    async def _failed(
        self, conn: asyncpg.Connection, event: Event, moment: datetime, seq: int
    ) -> asyncpg.Record | None:
        failure = {
            "stage": str(event.data.get("stage", event.type.split(".", 1)[1])),
            "reason": str(event.data.get("reason", "")),
            "kind": str(event.data.get("kind", "")),
            "time": event.time,
        }
        return await upsert_stage(conn, event, moment, seq, "failure", {"failure": _json(failure)})

    async def _embed(
        self,
        conn: asyncpg.Connection,
        image_id: str,
        embedding: _Embedding,
        seq: int,
        replace: bool = True,
    ) -> None:
        """Upsert the image's ``kind`` embedding from ``embedding.model`` (a newer sequence
        wins; with ``replace`` off, only a missing one is added). Other models' vectors of
        the image stay: after the embed model changes, search serves the old ones until
        the new model covers every image."""
        conflict = (
            "DO UPDATE SET dim = EXCLUDED.dim, embedding = EXCLUDED.embedding, "
            "seq = EXCLUDED.seq WHERE e.seq < EXCLUDED.seq"
            if replace
            else "DO NOTHING"
        )
        await conn.execute(
            f"""
            INSERT INTO image_embeddings AS e (image_id, kind, model, dim, embedding, seq)
            VALUES ($1, $2, $3, $4, $5::text::vector, $6)
            ON CONFLICT (image_id, kind, model) {conflict}
            """,
            image_id,
            embedding.kind,
            embedding.model,
            embedding.dim,
            embedding.text,
            seq,
        )

    async def _vector_index(self, embedding: _Embedding) -> None:
        """Make sure the embedding's model has its index, and that the sizes agree.

        Runs on a connection and in a transaction of its own, before the row's: building
        the index waits for transactions writing embeddings, so building it inside one of
        them would deadlock with the others.
        """
        key = (embedding.kind, embedding.model)
        dim = self._vector_indexes.get(key)
        if dim is None:
            async with self.pool.acquire() as conn:
                dim = await self.ensure_vector_index(conn, *key, embedding.dim)
            self._vector_indexes[key] = dim
        if dim != embedding.dim:
            raise ReadModelError(
                f"{embedding.model} made a {embedding.dim}-dimensional {embedding.kind} "
                f"embedding, but its earlier ones had {dim}: name a new model for new sizes"
            )

    @staticmethod
    async def ensure_vector_index(conn: asyncpg.Connection, kind: str, model: str, dim: int) -> int:
        """Make the HNSW index for ``model``'s ``kind`` embeddings on first use; returns the
        dimensions it was made for (a model's embeddings must all have them)."""
        known = await conn.fetchval(
            "SELECT dim FROM embedding_indexes WHERE kind = $1 AND model = $2", kind, model
        )
        if known is not None:
            return int(known)
        name = "image_embeddings_" + hashlib.sha1(f"{kind}\x1f{model}".encode()).hexdigest()[:16]
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", name)
            await conn.execute(
                f"CREATE INDEX IF NOT EXISTS {name} ON image_embeddings USING hnsw "
                f"((embedding::vector({dim:d})) vector_cosine_ops) "
                f"WITH (m = {HNSW_M:d}, ef_construction = {HNSW_EF_CONSTRUCTION:d}) "
                f"WHERE kind = {_literal(kind)} AND model = {_literal(model)}"
            )
            await conn.execute(
                "INSERT INTO embedding_indexes (kind, model, dim, name) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT DO NOTHING",
                kind,
                model,
                dim,
                name,
            )
            known = await conn.fetchval(
                "SELECT dim FROM embedding_indexes WHERE kind = $1 AND model = $2", kind, model
            )
        log.info("made vector index %s for %s embeddings of %s (%d dims)", name, kind, model, dim)
        return int(known)

    async def truncate(self) -> None:
        """Empty the projection (``darkroom reindex`` refills it)."""
        async with self.pool.acquire() as conn:
            await conn.execute("TRUNCATE images, image_tags, image_embeddings, generations CASCADE")

    # --- reading ------------------------------------------------------------------------------

    async def get(self, image_id: str) -> dict[str, Any] | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(f"SELECT {DOC_COLUMNS} FROM images i WHERE id = $1", image_id)
        return None if row is None else document(row)

    async def page(self, query: ImageQuery) -> Page:
        sql, args = page_sql(query)
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(sql, *args)
        items = [document(row) for row in rows]
        next_cursor = None
        if len(rows) == query.limit:
            last = rows[-1]
            next_cursor = encode_cursor(
                query.sort, query.order, last[SORTS[query.sort]], last["id"]
            )
        return Page(items, next_cursor)

    async def counts(self, shown_only: bool = False) -> dict[str, Any]:
        """Images by status and by approval; ``shown_only``: of the images every key sees."""
        shown = ", ".join(f"'{approval}'" for approval in SHOWN)
        where = f"WHERE approval IN ({shown}) " if shown_only else ""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT status, approval, count(*) FROM images {where}"
                "GROUP BY GROUPING SETS ((status), (approval))"
            )
        statuses = {s: 0 for s in STATUSES} | {r[0]: r[2] for r in rows if r[0] is not None}
        approvals = {a: 0 for a in APPROVALS} | {r[1]: r[2] for r in rows if r[1] is not None}
        return {"total": sum(statuses.values()), "status": statuses, "approval": approvals}

    async def nearest(
        self,
        vector: Sequence[float],
        kind: str,
        model: str,
        limit: int = 20,
        ef_search: int = EF_SEARCH,
    ) -> list[tuple[str, float]]:
        """The ``limit`` images whose ``kind`` embedding from ``model`` is nearest (cosine
        distance), straight from its HNSW index; ``ef_search`` trades speed for recall (see
        the read-model benchmark)."""
        dim = len(vector)
        where = f"e.kind = {_literal(kind)} AND e.model = {_literal(model)}"
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL hnsw.ef_search = {max(limit, ef_search):d}")
            rows = await conn.fetch(
                f"SELECT e.image_id, {_distance('e', dim, '$1')} AS distance "
                f"FROM image_embeddings e WHERE {where} ORDER BY distance LIMIT $2",
                _vector_text(vector),
                limit,
            )
        return [(r[0], float(r[1])) for r in rows]

    async def search(
        self,
        signals: Sequence[QueryVector],
        filters: SearchFilters | None = None,
        limit: int = 20,
        offset: int = 0,
        exclude: str | None = None,
    ) -> SearchResult:
        """Images ranked by one or more query vectors (see :func:`fuse` for how).

        Each signal takes its :data:`SEARCH_CANDIDATES` nearest images that pass
        ``filters`` from its model's HNSW index (with pgvector's iterative scan under
        filters, so they do not starve it), then every candidate's exact similarity to
        each signal is computed from the stored vectors, and the signals are fused.
        Paging is by ``offset`` over those candidates: at most :data:`MAX_SEARCH_RESULTS`
        results in all (keyset paging does not fit scores that are relative to the query).

        A signal whose model has no stored embeddings yet contributes nothing. Raises
        :class:`ReadModelError` when a vector's size differs from its model's stored ones.
        """
        filters = filters or SearchFilters()
        if not signals:
            raise ReadModelError("a search needs at least one query vector")
        if len({s.kind for s in signals}) != len(signals):
            raise ReadModelError("one query vector per kind of embedding")
        if not 1 <= limit <= MAX_SEARCH_RESULTS or offset < 0:
            raise ReadModelError(
                f"limit must be 1-{MAX_SEARCH_RESULTS} and offset at least 0, "
                f"got {limit} and {offset}"
            )
        stored = []
        for signal in signals:
            dim = await self._stored_dim(signal.kind, signal.model)
            if dim is None:
                continue
            if dim != len(signal.vector):
                raise ReadModelError(
                    f"the query's {signal.kind} vector from {signal.model} has "
                    f"{len(signal.vector)} dimensions, but that model's stored ones have {dim}"
                )
            stored.append(signal)
        used = [(s.kind, s.model) for s in signals]
        if not stored or offset >= MAX_SEARCH_RESULTS:
            return SearchResult([], None, used)
        sql, args = search_sql(stored, filters, exclude)
        narrowed = filters.narrows or exclude is not None
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(await self.search_settings(conn, narrowed))
            rows = await conn.fetch(sql, *args)
            hits = fuse([(r[0], list(r[1:])) for r in rows])[:MAX_SEARCH_RESULTS]
            page = hits[offset : offset + limit]
            docs = await conn.fetch(
                f"SELECT {DOC_COLUMNS} FROM images i WHERE i.id = ANY($1::text[])",
                [hit.image_id for hit in page],
            )
        by_id = {row["id"]: document(row) for row in docs}
        kinds = [s.kind for s in stored]
        items = []
        for hit in page:
            doc = by_id.get(hit.image_id)
            if doc is None:  # deleted between the two reads
                continue
            similarity: dict[str, float | None] = {s.kind: None for s in signals}
            similarity.update(zip(kinds, hit.similarities, strict=True))
            items.append({**doc, "score": hit.score, "similarity": similarity})
        more = offset + limit < len(hits)
        return SearchResult(items, offset + limit if more else None, used)

    async def similar(
        self,
        image_id: str,
        filters: SearchFilters | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> SearchResult | None:
        """Images nearest to ``image_id`` by image embedding (itself left out); None when
        the image is unknown or has no image embedding yet.

        Of the image's models, the one that covers the most images is used (ties: its
        newest): while a new embed model is re-embedding in the background, its vectors
        cover fewer images than the old model's, so the old ones keep serving until the new
        model has caught up.
        """
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT model, embedding::text, seq FROM image_embeddings "
                "WHERE image_id = $1 AND kind = 'image'",
                image_id,
            )
            if not rows:
                return None
        chosen = rows[0]
        if len(rows) > 1:
            covered = await self.model_counts()
            chosen = max(
                rows, key=lambda row: (covered.get(("image", row["model"]), 0), row["seq"])
            )
        vector = QueryVector("image", chosen["model"], orjson.loads(chosen["embedding"]))
        return await self.search([vector], filters, limit, offset, exclude=image_id)

    async def model_counts(self) -> dict[tuple[str, str], int]:
        """Images embedded per (kind, model), counted at most every COUNTS_TTL_S seconds (a
        count reads a whole index: not once per query)."""
        now = time.monotonic()
        if self._counts is None or now - self._counts[0] > COUNTS_TTL_S:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(
                    "SELECT kind, model, count(*) FROM image_embeddings GROUP BY kind, model"
                )
            self._counts = (now, {(r[0], r[1]): r[2] for r in rows})
        return self._counts[1]

    async def catching_up(self, kind: str, model: str) -> tuple[int, int] | None:
        """``(images it has, images another model of ``kind`` has)`` while ``model`` covers
        fewer images than another model of that kind (it is re-embedding); else None."""
        counts = await self.model_counts()
        mine = counts.get((kind, model), 0)
        most = max((n for (k, m), n in counts.items() if k == kind and m != model), default=0)
        return (mine, most) if mine < most else None

    async def captioned_without(
        self, kind: str, model: str, after: str = "", limit: int = 1000
    ) -> list[str]:
        """Ids of captioned images with no ``kind`` embedding from ``model``, in id order
        after ``after`` (keyset pages): what a re-embedding still has to do."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT i.id FROM images i WHERE i.captioned_at IS NOT NULL AND i.id > $3 "
                "AND NOT EXISTS (SELECT 1 FROM image_embeddings e "
                "WHERE e.image_id = i.id AND e.kind = $1 AND e.model = $2) "
                "ORDER BY i.id LIMIT $4",
                kind,
                model,
                after,
                limit,
            )
        return [str(row[0]) for row in rows]

    async def embedding_coverage(self) -> dict[str, Any]:
        """How many captioned images there are, and how many of them each model has
        embedded (``complete`` once it covers them all): the progress of a re-embedding."""
        async with self.pool.acquire() as conn:
            captioned = await conn.fetchval(
                "SELECT count(*) FROM images WHERE captioned_at IS NOT NULL"
            )
            counts = {
                (r[0], r[1]): r[2]
                for r in await conn.fetch(
                    "SELECT kind, model, count(*) FROM image_embeddings GROUP BY kind, model"
                )
            }
            models = await conn.fetch(
                "SELECT kind, model, dim FROM embedding_indexes ORDER BY kind, model"
            )
        return {
            "captioned": captioned,
            "models": [
                {
                    "kind": kind,
                    "model": model,
                    "dim": dim,
                    "images": counts.get((kind, model), 0),
                    "complete": counts.get((kind, model), 0) >= captioned,
                }
                for kind, model, dim in models
            ],
        }

    async def _stored_dim(self, kind: str, model: str) -> int | None:
        """The dimensions of ``model``'s ``kind`` embeddings; None before its first one."""
        dim = self._vector_indexes.get((kind, model))
        if dim is None:
            async with self.pool.acquire() as conn:
                dim = await conn.fetchval(
                    "SELECT dim FROM embedding_indexes WHERE kind = $1 AND model = $2",
                    kind,
                    model,
                )
            if dim is not None:
                self._vector_indexes[(kind, model)] = dim
        return dim

    async def search_settings(self, conn: asyncpg.Connection, narrowed: bool) -> str:
        """The SET LOCALs of a search: HNSW keeps the candidates asked for; a custom plan for
        every query (its filters' values decide between the index and an exact scan);
        under filters, pgvector's iterative scan (0.8+) goes on past ``ef_search`` until
        the LIMIT is met (or ``hnsw.max_scan_tuples``, 20,000 by default)."""
        settings = [
            f"SET LOCAL hnsw.ef_search = {SEARCH_CANDIDATES:d}",
            "SET LOCAL plan_cache_mode = force_custom_plan",
        ]
        if narrowed:
            if self._iterative_scan is None:
                version = await conn.fetchval(
                    "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
                )
                self._iterative_scan = _version(version) >= (0, 8)
            if self._iterative_scan:
                settings.append("SET LOCAL hnsw.iterative_scan = relaxed_order")
        return "; ".join(settings)


JSONB_COLUMNS = frozenset({"upload", "ingest", "caption", "failure"})
# What a document is made of (not the search vector, which is only for filtering).
DOC_COLUMNS = ", ".join(
    f"i.{c}"
    for c in [
        "id",
        "kind",
        "name",
        "created",
        "updated",
        "taken",
        "taken_or_created",
        "status",
        "approval",
        "tags",
        "upload",
        "ingest",
        "caption",
        "failure",
        "uploaded_at",
        "ingested_at",
        "captioned_at",
        "upload_hold",
        "screen",
        "caption_hold",
        "decision",
        "decided_at",
        "decision_by",
        "decision_reason",
        "decision_id",
    ]
)


async def upsert_stage(
    conn: asyncpg.Connection,
    event: Event,
    moment: datetime,
    seq: int,
    stage: str,
    values: dict[str, Any],
    rank: str | None = None,
) -> asyncpg.Record | None:
    """Write one stage's columns (``values``) of the event's image, unless the row already
    holds that stage from a newer event (``<stage>_seq``); the row is created if needed.
    With ``rank`` (one of ``values``' columns), newer means a higher ``rank`` first (NULL
    lowest), then a higher sequence.

    Returns the row's sort keys when it was written, None when the event was older.
    """
    values = dict(values)
    # A new row is as old as its first event; only the upload stage moves ``created``.
    updates = ["created"] if values.pop("created", None) is not None else []
    columns = [*values, f"{stage}_seq"]
    updates += columns
    args: list[Any] = [event.image_id, moment, *values.values(), seq]
    placeholders = [
        f"${n}::jsonb" if column in JSONB_COLUMNS else f"${n}"
        for n, column in enumerate(columns, start=3)
    ]
    sql = (
        f"INSERT INTO images AS i (id, created, {', '.join(columns)}) "
        f"VALUES ($1, $2, {', '.join(placeholders)}) "
        "ON CONFLICT (id) DO UPDATE SET " + ", ".join(f"{c} = EXCLUDED.{c}" for c in updates) + " "
        f"WHERE i.{stage}_seq IS NULL OR {_newer(stage, rank)} "
        "RETURNING created, taken_or_created"
    )
    row: asyncpg.Record | None = await conn.fetchrow(sql, *args)
    return row


def _newer(stage: str, rank: str | None) -> str:
    if rank is None:
        return f"i.{stage}_seq < EXCLUDED.{stage}_seq"
    return (
        f"(coalesce(i.{rank}, -1), i.{stage}_seq) "
        f"< (coalesce(EXCLUDED.{rank}, -1), EXCLUDED.{stage}_seq)"
    )


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def page_sql(q: ImageQuery) -> tuple[str, list[Any]]:
    """The SQL and arguments of one page of ``q`` (filters, order, keyset); the timeline
    (bus/state/timeline.py) counts over the same query."""
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    key = SORTS[q.sort]
    if q.tag is not None:
        source = "image_tags t JOIN images i ON i.id = t.image_id"
        sort_col, id_col = f"t.{key}", "t.image_id"
        where = [f"t.tag = {arg(q.tag)}"]
    else:
        source = "images i"
        sort_col, id_col = f"i.{key}", "i.id"
        where = []
    if q.status is not None:
        where.append(f"i.status = {arg(q.status)}")
    if q.approval is not None:
        where.append(f"i.approval = {arg(q.approval)}")
    if q.shown_only:
        where.append(SHOWN_ONLY)
    if q.since is not None:
        where.append(f"{sort_col} >= {arg(q.since)}")
    if q.until is not None:
        where.append(f"{sort_col} < {arg(q.until)}")
    if q.as_of is not None:  # on the rows the sort reads (a tag's rows carry created too)
        where.append(f"{'t' if q.tag is not None else 'i'}.created <= {arg(q.as_of)}")
    if q.has_caption is not None:
        where.append(f"i.captioned_at IS {'NOT ' if q.has_caption else ''}NULL")
    if q.text:
        where.append(f"i.search @@ to_tsquery('simple', {arg(_text_query(q.text))})")
    direction, before = ("DESC", "<") if q.order == "desc" else ("ASC", ">")
    if q.cursor is not None:
        moment, image_id = decode_cursor(q.cursor, q.sort, q.order)
        where.append(f"({sort_col}, {id_col}) {before} ({arg(moment)}, {arg(image_id)})")
    sql = (
        f"SELECT {DOC_COLUMNS} FROM {source}"
        + (f" WHERE {' AND '.join(where)}" if where else "")
        + f" ORDER BY {sort_col} {direction}, {id_col} {direction} LIMIT {arg(q.limit)}"
    )
    return sql, args


def _distance(alias: str, dim: int, vector: str) -> str:
    """Cosine distance of ``alias``'s embedding to ``vector``, written as the HNSW indexes
    are defined (on ``embedding::vector(dim)``), so the planner can use them."""
    return f"{alias}.embedding::vector({dim:d}) <=> {vector}::text::vector({dim:d})"


def search_sql(
    signals: Sequence[QueryVector], filters: SearchFilters, exclude: str | None = None
) -> tuple[str, list[Any]]:
    """One statement: each signal's candidates from its index (a CTE each), then every
    candidate's exact cosine similarity to each signal (NULL where the image has no vector
    of that model). Rows: image_id, then one similarity per signal."""
    args: list[Any] = [_vector_text(s.vector) for s in signals]

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    narrowing = []
    if filters.status is not None:
        narrowing.append(f"i.status = {arg(filters.status)}")
    if filters.approval is not None:
        narrowing.append(f"i.approval = {arg(filters.approval)}")
    if filters.nsfw_below is not None:
        narrowing.append(f"i.nsfw < {arg(filters.nsfw_below)}")
    if filters.shown_only:
        narrowing.append(SHOWN_ONLY)
    if filters.tag is not None:
        narrowing.append(
            "EXISTS (SELECT 1 FROM image_tags t WHERE t.image_id = e.image_id "
            f"AND t.tag = {arg(filters.tag)})"
        )
    if exclude is not None:
        narrowing.append(f"e.image_id <> {arg(exclude)}")
    joined = any(n.startswith("i.") for n in narrowing)
    ctes, columns, joins = [], [], []
    for n, s in enumerate(signals):
        dim = len(s.vector)
        # Kind and model are literals so that the planner can match the partial index
        # (a parameter would not prove its WHERE clause).
        where = " AND ".join(
            [f"e.kind = {_literal(s.kind)}", f"e.model = {_literal(s.model)}", *narrowing]
        )
        ctes.append(
            f"c{n} AS MATERIALIZED (SELECT e.image_id FROM image_embeddings e"
            + (" JOIN images i ON i.id = e.image_id" if joined else "")
            + f" WHERE {where} ORDER BY {_distance('e', dim, f'${n + 1}')}"
            + f" LIMIT {SEARCH_CANDIDATES:d})"
        )
        columns.append(f"1 - ({_distance(f's{n}', dim, f'${n + 1}')})")
        joins.append(
            f"LEFT JOIN image_embeddings s{n} ON s{n}.image_id = c.image_id "
            f"AND s{n}.kind = {_literal(s.kind)} AND s{n}.model = {_literal(s.model)}"
        )
    union = " UNION ".join(f"SELECT image_id FROM c{n}" for n in range(len(signals)))
    sql = (
        f"WITH {', '.join(ctes)}, candidates AS ({union}) "
        f"SELECT c.image_id, {', '.join(columns)} FROM candidates c {' '.join(joins)}"
    )
    return sql, args


@dataclass(frozen=True, slots=True)
class Hit:
    image_id: str
    score: float
    similarities: list[float | None]  # per signal; None: no vector of that model


def fuse(candidates: Sequence[tuple[str, Sequence[float | None]]]) -> list[Hit]:
    """Reciprocal Rank Fusion of the signals' similarities, best first.

    Each signal ranks the candidates that have its vector by exact similarity (1 = best);
    an image's score is the sum over signals of ``1 / (RRF_K + rank)``. RRF needs no
    calibration: SigLIP's text-to-image cosines sit around 0.0-0.2 while MiniLM's
    text-to-text ones spread over 0-0.8, so a weighted sum of raw similarities would mostly
    follow MiniLM, and calibrating them needs labelled queries we do not have. With one
    signal the order is simply its similarity's. An image outside one signal's candidates
    still gets a rank there, from its exact similarity, below that signal's candidates.
    Ties go to the smaller id, so that pages are stable.
    """
    scores = {image_id: 0.0 for image_id, _ in candidates}
    for n in range(len(candidates[0][1]) if candidates else 0):
        having = sorted(
            (-similarity, image_id)
            for image_id, sims in candidates
            if (similarity := sims[n]) is not None
        )
        for rank, (_, image_id) in enumerate(having, start=1):
            scores[image_id] += 1.0 / (RRF_K + rank)
    hits = [
        Hit(image_id, scores[image_id], [None if x is None else float(x) for x in sims])
        for image_id, sims in candidates
    ]
    hits.sort(key=lambda hit: (-hit.score, hit.image_id))
    return hits


def hold_reasons(row: asyncpg.Record) -> list[str]:
    """Why the approval policy holds the image of ``row`` (whatever was decided since)."""
    reasons = [r for r in (row["upload_hold"], row["caption_hold"]) if r]
    if row["screen"] and row["captioned_at"] is None:
        reasons.append("waiting for its NSFW score")
    return reasons


def document(row: asyncpg.Record) -> dict[str, Any]:
    """The API's image document for a row."""
    stages: dict[str, str | None] = {}
    if row["uploaded_at"] is not None:
        topic = subjects.GENERATED if row["kind"] == "generated" else subjects.UPLOADED
        stages[topic] = format_time(row["uploaded_at"])
    if row["ingested_at"] is not None:
        stages[subjects.INGESTED] = format_time(row["ingested_at"])
    if row["captioned_at"] is not None:
        stages[subjects.CAPTIONED] = format_time(row["captioned_at"])
    doc: dict[str, Any] = {
        "id": row["id"],
        "status": row["status"],
        "kind": row["kind"],
        "name": row["name"],
        "created": format_time(row["created"]),
        "updated": format_time(row["updated"]),
        "taken": format_time(row["taken"]),
        "stages": stages,
        "tags": list(row["tags"]),
        "approval": row["approval"],
        "hold": hold_reasons(row),
        "decision": None,
    }
    if row["decision"] is not None:
        doc["decision"] = {
            "decision": row["decision"],
            "by": row["decision_by"],
            "reason": row["decision_reason"],
            "time": format_time(row["decided_at"]),
            "event": row["decision_id"],
        }
    if row["upload"] is not None:
        doc.update(orjson.loads(row["upload"]))
    for key in ("ingest", "caption", "failure"):
        if row[key] is not None:
            doc[key] = orjson.loads(row[key])
    return doc


# --- event data ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Embedding:
    kind: str
    model: str
    dim: int
    text: str


def _embeddings(raw: Any) -> list[_Embedding]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ReadModelError("'embeddings' must be a list")
    found = []
    for item in raw:
        if not isinstance(item, dict):
            raise ReadModelError("each embedding must be an object")
        kind, model, vector = item.get("kind"), item.get("model"), item.get("vector")
        if not isinstance(kind, str) or not kind or not isinstance(model, str) or not model:
            raise ReadModelError("an embedding needs a 'kind' and a 'model'")
        if not isinstance(vector, list) or not 1 <= len(vector) <= MAX_EMBEDDING_DIM:
            raise ReadModelError(
                f"an embedding's 'vector' must be a list of 1-{MAX_EMBEDDING_DIM} numbers"
            )
        found.append(_Embedding(kind, model, len(vector), _vector_text(vector)))
    return found


def _vector_text(vector: Sequence[float]) -> str:
    try:
        return "[" + ",".join(repr(float(x)) for x in vector) + "]"
    except (TypeError, ValueError):
        raise ReadModelError("a vector must hold numbers only") from None


def _tags(raw: Any) -> list[tuple[str, float | None]]:
    """Tag names with their scores: ``["a", ...]`` or ``[{"tag": "a", "score": 0.9}, ...]``."""
    out: dict[str, float | None] = {}
    for item in raw if isinstance(raw, list) else []:
        name: Any
        if isinstance(item, str):
            name, score = item, None
        elif isinstance(item, dict):
            name = item.get("tag") or item.get("name")
            score = item.get("score")
        else:
            continue
        if isinstance(name, str) and name:
            out[name[:200]] = float(score) if isinstance(score, (int, float)) else None
    return list(out.items())


def nsfw_score(raw: Any) -> float | None:
    if isinstance(raw, dict):
        raw = raw.get("score")
    return float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _version(text: str | None) -> tuple[int, ...]:
    """'0.8.1' as (0, 8, 1); () when unknown."""
    return tuple(int(p) for p in re.findall(r"\d+", text or "")[:3])


def _literal(text: str) -> str:
    """A SQL string literal (for DDL, which takes no parameters)."""
    return "'" + text.replace("'", "''") + "'"
