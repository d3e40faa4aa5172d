"""Generation jobs in the read model: the ``generations`` table.

notify folds each job's events in (through :meth:`bus.state.readmodel.ReadModel.project`):

- ``requested`` carries the checked job (:meth:`bus.core.generation.Job.to_doc`): queued;
- ``generated`` is one output, by its index: the job is done once all ``n`` are in;
- ``failed.generate`` and ``cancelled.generate`` end it, with the reason.

Each part of a row (the request, each output, the end) keeps the stream sequence of the
event that wrote it, and only a newer event replaces it, so events in any order, twice or
replayed, end in the same row. Status, model and finishing time are derived from the parts
(:class:`JobState`), so they follow the same rule. An event is folded in under the row's
lock (``SELECT ... FOR UPDATE``): notify workers take turns on one job, never across jobs.

``running`` with step progress is live state in the gateway (:mod:`bus.gateway.live`);
stored, ``running`` only says that some outputs are in and not all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from bus.core import subjects
from bus.core.envelope import Event
from bus.state.readmodel import (
    BAD_DATA,
    ReadModelError,
    decode_cursor,
    encode_cursor,
    format_time,
    parse_time,
)

STAGE = "generate"
FAILED_TOPIC = f"{subjects.FAILED}.{STAGE}"
CANCELLED_TOPIC = f"{subjects.CANCELLED}.{STAGE}"
TOPICS = frozenset({subjects.REQUESTED, subjects.GENERATED, FAILED_TOPIC, CANCELLED_TOPIC})
GENERATION_STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = frozenset({"done", "failed", "cancelled"})
MAX_OUTPUTS = 1024  # no job asks for more images than this (generate.max_n is at most 64)
MAX_ERROR_CHARS = 2000
CURSOR_SORT = "jobs"  # a job list's cursor says so: an image list's is refused here
COLUMNS = (
    "id",
    "created",
    "updated",
    "request",
    "request_seq",
    "model",
    "n",
    "outputs",
    "ended",
    "error",
    "ended_seq",
    "ended_at",
    "status",
    "finished_at",
)


def is_job_event(event: Event) -> bool:
    """Whether ``event`` belongs in the generations table."""
    return bool(event.job_id) and event.type in TOPICS


@dataclass(slots=True)
class JobState:
    """One row as the projection folds events into it (no database here)."""

    id: str
    created: datetime
    updated: datetime
    request: dict[str, Any] | None = None
    request_seq: int | None = None
    n: int | None = None
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # by str(index)
    ended: str | None = None  # failed | cancelled
    error: str | None = None
    ended_seq: int | None = None
    ended_at: datetime | None = None

    def apply(self, event: Event, seq: int, moment: datetime) -> bool:
        """Fold ``event`` (stream sequence ``seq``) in; False when what it would write is
        held already from the same or a newer event. Raises :class:`ReadModelError` for
        an event that cannot be a job's."""
        if event.type == subjects.REQUESTED:
            changed = self.requested(event.data, seq, moment)
        elif event.type == subjects.GENERATED:
            changed = self._generated(event, seq)
        elif event.type in (FAILED_TOPIC, CANCELLED_TOPIC):
            changed = self._ended(event, seq, moment)
        else:
            raise ReadModelError(f"a {event.type} event is not a generation job's")
        if changed:
            self.updated = max(self.updated, moment)
        return changed

    def requested(self, doc: dict[str, Any], seq: int, moment: datetime) -> bool:
        if self.request_seq is not None and self.request_seq >= seq:
            return False
        self.n = _count(doc.get("n"), "the request's n")
        self.request, self.request_seq = doc, seq
        created = doc.get("created")
        try:
            self.created = parse_time(created) if isinstance(created, str) else moment
        except ReadModelError:
            self.created = moment
        return True

    def _generated(self, event: Event, seq: int) -> bool:
        data = event.data
        index = _output_index(event)
        held = self.outputs.get(str(index))
        if held is not None and held["seq"] >= seq:
            return False
        lineage, model, timings = (_object(data.get(k)) for k in ("lineage", "model", "timings"))
        self.outputs[str(index)] = {
            "index": index,
            "image_id": event.image_id,
            "key": event.object.key if event.object is not None else None,
            "seed": lineage.get("seed"),
            "model": model.get("name") or lineage.get("model"),
            "demo": bool(model.get("demo", False)),
            "timings": timings or None,
            "params": _object(data.get("params")) or None,  # the job as it ran: defaults filled
            "time": event.time,
            "seq": seq,
        }
        if self.n is None and data.get("n") is not None:
            self.n = _count(data.get("n"), "a generated event's n")
        return True

    def _ended(self, event: Event, seq: int, moment: datetime) -> bool:
        if self.ended_seq is not None and self.ended_seq >= seq:
            return False
        self.ended = "cancelled" if event.type == CANCELLED_TOPIC else "failed"
        reason = event.data.get("reason")
        self.error = (str(reason) if reason else self.ended)[:MAX_ERROR_CHARS]
        self.ended_seq, self.ended_at = seq, moment
        return True

    @property
    def status(self) -> str:
        """done once every output is in (even after a failure: they are there), else how
        it ended, else running once some outputs are in, else queued."""
        if self.n is not None and sum(int(i) < self.n for i in self.outputs) >= self.n:
            return "done"
        if self.ended is not None:
            return self.ended
        return "running" if self.outputs else "queued"

    @property
    def model(self) -> str | None:
        """The catalogue model that made the outputs, else the one the request named
        (None: the worker's default, not known before it runs)."""
        for _, output in sorted(self.outputs.items(), key=lambda item: int(item[0])):
            if isinstance(output.get("model"), str):
                return str(output["model"])
        model = (self.request or {}).get("model")
        return model if isinstance(model, str) else None

    @property
    def finished_at(self) -> datetime | None:
        status = self.status
        if status == "done":
            return max(parse_time(str(o["time"])) for o in self.outputs.values())
        return self.ended_at if status in FINISHED else None

    def document(self) -> dict[str, Any]:
        """The API's job document."""
        outputs = [
            {k: v for k, v in output.items() if k not in ("seq", "params")}
            for _, output in sorted(self.outputs.items(), key=lambda item: int(item[0]))
        ]
        ran = next((o["params"] for _, o in sorted(self.outputs.items()) if o.get("params")), None)
        return {
            "id": self.id,
            "status": self.status,
            "created": format_time(self.created),
            "updated": format_time(self.updated),
            "finished_at": format_time(self.finished_at),
            "model": self.model,
            "n": self.n,
            "request": self.request,
            # What ran, every default filled in (the request leaves them out), once known.
            "parameters": ran,
            "outputs": outputs,
            "error": self.error if self.status in ("failed", "cancelled") else None,
            # One pipeline call makes all of a job's outputs: the first one's timings are
            # the job's (queue wait, model load, inference).
            "timings": outputs[0]["timings"] if outputs else None,
        }

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> JobState:
        return cls(
            id=row["id"],
            created=row["created"],
            updated=row["updated"],
            request=_loads(row["request"]),
            request_seq=row["request_seq"],
            n=row["n"],
            outputs=_loads(row["outputs"]) or {},
            ended=row["ended"],
            error=row["error"],
            ended_seq=row["ended_seq"],
            ended_at=row["ended_at"],
        )

    def values(self) -> tuple[Any, ...]:
        """The row's columns, in :data:`COLUMNS` order."""
        return (
            self.id,
            self.created,
            self.updated,
            _dumps(self.request),
            self.request_seq,
            self.model,
            self.n,
            _dumps(self.outputs),
            self.ended,
            self.error,
            self.ended_seq,
            self.ended_at,
            self.status,
            self.finished_at,
        )


def request_document(doc: dict[str, Any]) -> dict[str, Any]:
    """The job document of a stored request no event has brought to the table yet."""
    job_id = doc.get("id")
    if not isinstance(job_id, str) or not subjects.is_safe_id(job_id):
        raise ReadModelError(f"a stored request needs a job id, got {job_id!r}")
    created = parse_time(str(doc.get("created", "")))
    state = JobState(job_id, created, created)
    state.requested(doc, 0, created)
    return state.document()


@dataclass(frozen=True, slots=True)
class JobPage:
    items: list[dict[str, Any]]
    next_cursor: str | None


class Generations:
    """The generations table, over the read model's pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def project(self, event: Event, seq: int) -> bool:
        """Fold ``event`` into its job's row; False when the row held it (or newer)."""
        job_id = event.job_id
        if not job_id or not subjects.is_safe_id(job_id):
            raise ReadModelError(f"job_id {str(job_id)[:80]!r} is not a valid id")
        moment = parse_time(event.time)
        placeholders = ", ".join(f"{c} = ${n}" for n, c in enumerate(COLUMNS[1:], start=2))
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO generations (id, created, updated) VALUES ($1, $2, $2) "
                    "ON CONFLICT (id) DO NOTHING",
                    job_id,
                    moment,
                )
                row = await conn.fetchrow(
                    f"SELECT {', '.join(COLUMNS)} FROM generations WHERE id = $1 FOR UPDATE",
                    job_id,
                )
                state = JobState.from_row(row)
                if not state.apply(event, seq, moment):
                    return False
                await conn.execute(
                    f"UPDATE generations SET {placeholders} WHERE id = $1", *state.values()
                )
                return True
        except BAD_DATA as exc:
            raise ReadModelError(
                f"the database refused this {event.type} event: {type(exc).__name__}: {exc}"
            ) from None

    async def get(self, job_id: str) -> dict[str, Any] | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {', '.join(COLUMNS)} FROM generations WHERE id = $1", job_id
            )
        return None if row is None else JobState.from_row(row).document()

    async def page(
        self, status: str | None = None, cursor: str | None = None, limit: int = 50
    ) -> JobPage:
        """Jobs newest first (by request time), optionally of one status; ``cursor`` is
        the previous page's ``next_cursor``."""
        if status is not None and status not in GENERATION_STATUSES:
            raise ReadModelError(
                f"status must be one of {', '.join(GENERATION_STATUSES)}, got {status!r}"
            )
        args: list[Any] = []
        where = []
        if status is not None:
            args.append(status)
            where.append(f"status = ${len(args)}")
        if cursor is not None:
            moment, job_id = decode_cursor(cursor, CURSOR_SORT, "desc")
            args += [moment, job_id]
            where.append(f"(created, id) < (${len(args) - 1}, ${len(args)})")
        args.append(limit)
        sql = (
            f"SELECT {', '.join(COLUMNS)} FROM generations"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + f" ORDER BY created DESC, id DESC LIMIT ${len(args)}"
        )
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(sql, *args)
        next_cursor = None
        if len(rows) == limit:
            last = rows[-1]
            next_cursor = encode_cursor(CURSOR_SORT, "desc", last["created"], last["id"])
        return JobPage([JobState.from_row(row).document() for row in rows], next_cursor)


def _output_index(event: Event) -> int:
    """The output's index: the event's ``index``, else the end of its image id
    (``<job>-<index>``, :func:`bus.core.subjects.generated_image_id`)."""
    index = event.data.get("index")
    if index is None and event.image_id and event.job_id:
        tail = event.image_id.removeprefix(f"{event.job_id}-")
        index = int(tail) if tail != event.image_id and tail.isdigit() else None
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_OUTPUTS:
        raise ReadModelError(
            f"a generated event needs an output index 0-{MAX_OUTPUTS - 1}, got {index!r}"
        )
    return index


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_OUTPUTS:
        raise ReadModelError(f"{what} must be 1-{MAX_OUTPUTS}, got {value!r}")
    return value


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dumps(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)
