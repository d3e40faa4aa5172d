"""Outgoing webhooks' state: the endpoints, the messages sent to them and every attempt, in the
read model (migration 0005), and the JetStream work queue the deliveries wait in.

A *message* is one event for one endpoint. Its id (:func:`webhook_id`, the ``webhook-id``
header) is derived from both, so an event the fan-out sees twice is queued once (it is the
message's ``Nats-Msg-Id``), and it stays the same on every attempt and on a replay: receivers
dedupe by it. A delivery waits in the work-queue stream (:class:`HookNames`) until it is
delivered or given up; nothing about it is held in memory (bus/intake/webhooks.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import nats.js.errors
import orjson
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from bus.core import subjects
from bus.core.settings import Settings, WebhookSettings
from bus.core.subjects import Names
from bus.infra.postgres import CONNECTION_ERRORS

log = logging.getLogger("darkroom.webhooks")

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 24  # Standard Webhooks: 24-64 bytes, base64
MAX_TYPES = 50
DUPLICATE_WINDOW_S = 3600.0  # the fan-out's redeliveries of one event fall well within it
STATES = ("pending", "delivered", "failed")
QUEUE_WAIT_S = 60.0  # a worker waits this long for a gateway to declare the work queue
ENDPOINT_ID_PATTERN = r"^wh_[0-9a-f]{16}$"
MESSAGE_ID_PATTERN = r"^msg_[0-9a-f]{32}$"  # a webhook-id
# The events an endpoint may ask for: these topics, and failed.<stage> or cancelled.<stage>
# (``.*``: every stage). The webhooks function listens to exactly these.
EVENT_TOPICS = (
    subjects.UPLOADED,
    subjects.INGESTED,
    subjects.CAPTIONED,
    subjects.REQUESTED,
    subjects.GENERATED,
    subjects.APPROVED,
    subjects.REJECTED,
    subjects.DELETED,
    subjects.WEBHOOK_DISABLED,
)
STAGED_TOPICS = (subjects.FAILED, subjects.CANCELLED)
_EVENT_TYPE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_-]+|\.\*)?$")


class WebhookError(ValueError):
    """A webhook request the state cannot take; the message says why."""


@dataclass(frozen=True, slots=True)
class HookNames:
    """The work queue's names, under a deployment's namespace (outside ``<ns>.>``, so the
    event stream and its live listeners never see a delivery)."""

    names: Names

    @property
    def stream(self) -> str:
        return self.names.hooks_stream

    def subject(self, endpoint_id: str) -> str:
        return self.names.hook_delivery(endpoint_id)

    @property
    def all_subjects(self) -> str:
        return self.names.all_hook_deliveries

    @property
    def durable(self) -> str:
        return self.names.durable("webhooks_deliver")


# --- ids and secrets ----------------------------------------------------------------------
def webhook_id(endpoint_id: str, event_id: str) -> str:
    """The message id of ``event_id`` for ``endpoint_id``: the same however often asked."""
    digest = hashlib.blake2b(f"{endpoint_id}\x1f{event_id}".encode(), digest_size=16)
    return f"msg_{digest.hexdigest()}"


def new_endpoint_id() -> str:
    return f"wh_{secrets.token_hex(8)}"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def check_secret(secret: str) -> str:
    """Return ``secret`` if it is ``whsec_`` and 24-64 bytes of base64."""
    if not secret.startswith(SECRET_PREFIX):
        raise WebhookError(f"a secret starts with {SECRET_PREFIX!r} (then base64)")
    try:
        raw = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except ValueError:
        raise WebhookError("a secret is whsec_ followed by standard base64") from None
    if not 24 <= len(raw) <= 64:
        raise WebhookError(f"a secret holds 24-64 bytes (before base64), got {len(raw)}")
    return secret


def check_types(types: Sequence[str] | None) -> list[str] | None:
    """An event-type filter: None (every event), or types such as ``captioned``, or
    ``failed.*`` for every ``failed.<stage>``."""
    if types is None:
        return None
    if not 1 <= len(types) <= MAX_TYPES:
        raise WebhookError(f"event_types lists 1-{MAX_TYPES} types (or is null for all)")
    for kind in types:
        topic, dot, _ = kind.partition(".")
        known = STAGED_TOPICS if dot else EVENT_TOPICS
        if not _EVENT_TYPE.match(kind) or topic not in known:
            raise WebhookError(
                f"an event type is one of {', '.join(EVENT_TOPICS)}, or "
                f"{' or '.join(f'{t}.<stage>' for t in STAGED_TOPICS)} (<stage> may be *: "
                f"every stage), got {kind[:80]!r}"
            )
    return sorted(set(types))


def matches(types: Sequence[str] | None, event_type: str) -> bool:
    if types is None:
        return True
    return any(
        event_type == kind or (kind.endswith(".*") and event_type.startswith(kind[:-1]))
        for kind in types
    )


# --- endpoints ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Endpoint:
    id: str
    url: str
    secret: str
    old_secrets: tuple[tuple[str, datetime], ...]  # (secret, until)
    event_types: tuple[str, ...] | None
    description: str
    active: bool
    disabled_reason: str | None
    created: datetime
    updated: datetime
    failing_since: datetime | None

    def signing_secrets(self, now: datetime) -> list[str]:
        """The current secret, then the rotated ones still in their grace period."""
        return [self.secret, *(s for s, until in self.old_secrets if until > now)]

    def public(self) -> dict[str, Any]:
        """What the API shows (never a secret)."""
        return {
            "id": self.id,
            "url": self.url,
            "event_types": list(self.event_types) if self.event_types is not None else None,
            "description": self.description,
            "active": self.active,
            "disabled_reason": self.disabled_reason,
            "created": _iso(self.created),
            "updated": _iso(self.updated),
            "failing_since": _iso(self.failing_since),
            "old_secrets_until": [_iso(until) for _, until in self.old_secrets],
        }


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _endpoint(row: asyncpg.Record) -> Endpoint:
    olds = orjson.loads(row["old_secrets"])
    return Endpoint(
        id=row["id"],
        url=row["url"],
        secret=row["secret"],
        old_secrets=tuple((o["secret"], datetime.fromisoformat(o["until"])) for o in olds),
        event_types=tuple(row["event_types"]) if row["event_types"] is not None else None,
        description=row["description"],
        active=row["active"],
        disabled_reason=row["disabled_reason"],
        created=row["created"],
        updated=row["updated"],
        failing_since=row["failing_since"],
    )


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at sending a message, as logged."""

    webhook_id: str
    endpoint_id: str
    event_id: str
    event_type: str
    body: str
    attempt: int
    status_code: int | None
    latency_ms: float | None
    error: str | None  # None: delivered
    final: bool  # no attempt follows this one (delivered, or given up)


class Webhooks:
    """The webhook tables of one namespace's schema."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create(
        self, url: str, secret: str, event_types: Sequence[str] | None, description: str
    ) -> Endpoint:
        row = await self.pool.fetchrow(
            "INSERT INTO webhook_endpoints (id, url, secret, event_types, description) "
            "VALUES ($1, $2, $3, $4, $5) RETURNING *",
            new_endpoint_id(),
            url,
            check_secret(secret),
            check_types(event_types),
            description,
        )
        return _endpoint(row)

    async def get(self, endpoint_id: str) -> Endpoint | None:
        row = await self.pool.fetchrow("SELECT * FROM webhook_endpoints WHERE id = $1", endpoint_id)
        return None if row is None else _endpoint(row)

    async def all(self, active_only: bool = False) -> list[Endpoint]:
        where = "WHERE active" if active_only else ""
        rows = await self.pool.fetch(f"SELECT * FROM webhook_endpoints {where} ORDER BY created")
        return [_endpoint(r) for r in rows]

    async def update(
        self,
        endpoint_id: str,
        *,
        url: str | None = None,
        event_types: Sequence[str] | None = None,
        set_types: bool = False,  # event_types is the new filter (None: every event)
        description: str | None = None,
        active: bool | None = None,
        new_secret: str | None = None,
        grace_s: float = 0.0,
    ) -> Endpoint | None:
        """Change what is given; ``new_secret`` rotates: the old one signs too for
        ``grace_s``. Re-activating clears the reason it was disabled and its failures."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM webhook_endpoints WHERE id = $1 FOR UPDATE", endpoint_id
            )
            if row is None:
                return None
            current = _endpoint(row)
            now = datetime.now(UTC)
            olds = [(s, u) for s, u in current.old_secrets if u > now]
            secret = current.secret
            if new_secret is not None:
                check_secret(new_secret)
                if grace_s > 0:
                    olds.insert(0, (current.secret, now + timedelta(seconds=grace_s)))
                secret = new_secret
            types = event_types if set_types else current.event_types
            reactivated = active is True and not current.active
            row = await conn.fetchrow(
                "UPDATE webhook_endpoints SET url = $2, secret = $3, old_secrets = $4, "
                "event_types = $5, description = $6, active = $7, "
                "disabled_reason = CASE WHEN $7 THEN NULL ELSE disabled_reason END, "
                "disabled_unannounced = CASE WHEN $7 THEN NULL ELSE disabled_unannounced END, "
                "failing_since = CASE WHEN $8 THEN NULL ELSE failing_since END, "
                "updated = now() WHERE id = $1 RETURNING *",
                endpoint_id,
                url or current.url,
                secret,
                orjson.dumps([{"secret": s, "until": u.isoformat()} for s, u in olds]).decode(),
                check_types(types),
                description if description is not None else current.description,
                current.active if active is None else active,
                reactivated,
            )
            return _endpoint(row)

    async def delete(self, endpoint_id: str) -> bool:
        status = await self.pool.execute("DELETE FROM webhook_endpoints WHERE id = $1", endpoint_id)
        return bool(status.endswith(" 1"))

    async def disable(self, endpoint_id: str, reason: str) -> datetime | None:
        """Turn an active endpoint off, to be announced (:meth:`unannounced`); the moment
        it was turned off, or None when it was off (or gone) already."""
        turned_off: datetime | None = await self.pool.fetchval(
            "UPDATE webhook_endpoints SET active = false, disabled_reason = $2, "
            "updated = now(), disabled_unannounced = now() WHERE id = $1 AND active "
            "RETURNING disabled_unannounced",
            endpoint_id,
            reason,
        )
        return turned_off

    async def unannounced(self) -> list[tuple[str, str, datetime]]:
        """(endpoint id, reason, when) of each endpoint turned off whose webhook_disabled
        event has not been published yet."""
        rows = await self.pool.fetch(
            "SELECT id, disabled_reason, disabled_unannounced FROM webhook_endpoints "
            "WHERE disabled_unannounced IS NOT NULL AND NOT active"
        )
        return [(r["id"], r["disabled_reason"] or "", r["disabled_unannounced"]) for r in rows]

    async def announced(self, endpoint_id: str, turned_off: datetime) -> None:
        await self.pool.execute(
            "UPDATE webhook_endpoints SET disabled_unannounced = NULL "
            "WHERE id = $1 AND disabled_unannounced = $2",
            endpoint_id,
            turned_off,
        )

    # --- messages and attempts -------------------------------------------------------------
    async def record_many(self, attempts: Sequence[Attempt]) -> dict[str, datetime | None]:
        """Log attempts, and what they say of their messages and endpoints, in one statement
        (one commit). Attempts at an endpoint deleted meanwhile are left out (its messages
        went with it). Returns, by endpoint, since when it has been failing (None: it is not:
        an attempt of the batch succeeded)."""
        rows = [
            (
                a.webhook_id,
                a.endpoint_id,
                a.event_id,
                a.event_type,
                a.body,
                _state(a),
                a.attempt,
                a.status_code,
                a.latency_ms,
                a.error,
            )
            for a in attempts
        ]
        columns = list(zip(*rows, strict=True))
        found = await self.pool.fetch(_RECORD_SQL, *columns)
        return {r["endpoint_id"]: r["failing_since"] for r in found}

    async def progress(self, wid: str) -> tuple[str, int] | None:
        """A message's state and the number of its latest logged attempt; None: never
        logged."""
        row = await self.pool.fetchrow(
            "SELECT state, attempts FROM webhook_messages WHERE webhook_id = $1", wid
        )
        return None if row is None else (row["state"], row["attempts"])

    async def message(self, endpoint_id: str, wid: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            "SELECT * FROM webhook_messages WHERE endpoint_id = $1 AND webhook_id = $2",
            endpoint_id,
            wid,
        )

    async def failed_since(
        self, endpoint_id: str, since: datetime, limit: int
    ) -> list[asyncpg.Record]:
        """Messages given up on (or never sent: the endpoint was off), oldest first."""
        return list(
            await self.pool.fetch(
                "SELECT * FROM webhook_messages WHERE endpoint_id = $1 AND state = 'failed' "
                "AND created >= $2 ORDER BY created, webhook_id LIMIT $3",
                endpoint_id,
                since,
                limit,
            )
        )

    async def prune(self, before: datetime) -> int:
        """Forget the messages settled (delivered or given up) before ``before``, with their
        attempts; how many."""
        status = await self.pool.execute(
            "DELETE FROM webhook_messages WHERE state <> 'pending' AND last_at < $1", before
        )
        return int(status.rsplit(" ", 1)[-1])

    async def set_state(self, wid: str, was: str, state: str) -> bool:
        """Move a message from state ``was`` to ``state``; False when it was not in ``was``
        (another request moved it first)."""
        status = await self.pool.execute(
            "UPDATE webhook_messages SET state = $3 WHERE webhook_id = $1 AND state = $2",
            wid,
            was,
            state,
        )
        return bool(status.endswith(" 1"))

    async def attempts(
        self, endpoint_id: str, before: int | None, limit: int, wid: str | None = None
    ) -> list[dict[str, Any]]:
        """Attempts at ``endpoint_id``, newest first, with ids below ``before``."""
        rows = await self.pool.fetch(
            "SELECT a.*, m.event_id, m.event_type, m.state FROM webhook_attempts a "
            "JOIN webhook_messages m USING (webhook_id) WHERE a.endpoint_id = $1 "
            "AND ($2::bigint IS NULL OR a.id < $2) AND ($4::text IS NULL OR a.webhook_id = $4) "
            "ORDER BY a.id DESC LIMIT $3",
            endpoint_id,
            before,
            limit,
            wid,
        )
        return [
            {
                "id": r["id"],
                "webhook_id": r["webhook_id"],
                "event_id": r["event_id"],
                "event_type": r["event_type"],
                "attempt": r["attempt"],
                "status_code": r["status_code"],
                "latency_ms": r["latency_ms"],
                "error": r["error"],
                "delivered": r["error"] is None,
                "message_state": r["state"],
                "at": _iso(r["at"]),
            }
            for r in rows
        ]


def _state(attempt: Attempt) -> str:
    if attempt.error is None:
        return "delivered"
    return "failed" if attempt.final else "pending"


# One batch of attempts: the messages (the newest attempt of each), the log, and each
# endpoint's failing_since: cleared by a success, set by a failure if unset. Attempts at an
# endpoint that is gone are skipped (a delete that commits during the statement still fails
# it: the Recorder then writes the batch row by row). An endpoint row
# is written only when that changes. (The final SELECT sees the rows as they were before the
# statement, and the UPDATE's own RETURNING for those it changed.)
_RECORD_SQL = """
WITH a AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
        $6::text[], $7::int[], $8::int[], $9::float8[], $10::text[])
    AS t(webhook_id, endpoint_id, event_id, event_type, body, state, attempt, status_code,
         latency_ms, error)
    WHERE EXISTS (SELECT 1 FROM webhook_endpoints e WHERE e.id = t.endpoint_id)
), message AS (
    INSERT INTO webhook_messages
        (webhook_id, endpoint_id, event_id, event_type, body, state, attempts)
    SELECT DISTINCT ON (webhook_id) webhook_id, endpoint_id, event_id, event_type, body, state,
        attempt
    FROM a ORDER BY webhook_id, attempt DESC
    ON CONFLICT (webhook_id) DO UPDATE SET state = excluded.state,
        attempts = greatest(webhook_messages.attempts, excluded.attempts), last_at = now()
), logged AS (
    INSERT INTO webhook_attempts (webhook_id, endpoint_id, attempt, status_code, latency_ms, error)
    SELECT webhook_id, endpoint_id, attempt, status_code, latency_ms, error FROM a
), by_endpoint AS (
    SELECT endpoint_id, bool_or(error IS NULL) AS ok FROM a GROUP BY endpoint_id
), changed AS (
    UPDATE webhook_endpoints e
    SET failing_since = CASE WHEN b.ok THEN NULL ELSE now() END
    FROM by_endpoint b
    WHERE e.id = b.endpoint_id AND (b.ok = (e.failing_since IS NOT NULL))
    RETURNING e.id, e.failing_since
)
SELECT b.endpoint_id,
    CASE WHEN b.ok THEN NULL ELSE coalesce(c.failing_since, e.failing_since) END
        AS failing_since
FROM by_endpoint b
LEFT JOIN changed c ON c.id = b.endpoint_id
LEFT JOIN webhook_endpoints e ON e.id = b.endpoint_id
"""


class Recorder:
    """Logs attempts in batches: those that arrive while a batch is being written form the
    next one, so under load a commit carries many attempts (no timer, no delay when idle).
    Each caller waits for its own attempt to be written. A batch that fails other than for
    want of a connection is written again row by row, so one bad row fails only itself."""

    def __init__(self, store: Webhooks, max_batch: int = 1000) -> None:
        self.store = store
        self.max_batch = max_batch
        self._waiting: list[tuple[Attempt, asyncio.Future[datetime | None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def record(self, attempt: Attempt) -> datetime | None:
        """Log ``attempt``; since when its endpoint has been failing (None: it is not)."""
        future: asyncio.Future[datetime | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((attempt, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        return await future

    async def _write(self) -> None:
        while self._waiting:
            batch = self._waiting[: self.max_batch]
            del self._waiting[: self.max_batch]
            try:
                failing = await self.store.record_many([a for a, _ in batch])
            except CONNECTION_ERRORS as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            except Exception:
                if len(batch) == 1:
                    await self._write_one(*batch[0])
                else:
                    log.exception("a batch of webhook attempts failed; writing them one by one")
                    for attempt, future in batch:
                        await self._write_one(attempt, future)
                continue
            for attempt, future in batch:
                if not future.done():
                    future.set_result(failing.get(attempt.endpoint_id))

    async def _write_one(self, attempt: Attempt, future: asyncio.Future[datetime | None]) -> None:
        try:
            failing = await self.store.record_many([attempt])
        except asyncpg.ForeignKeyViolationError:
            failing = {}  # its endpoint was deleted while the statement ran: nothing to log
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(failing.get(attempt.endpoint_id))


# --- the work queue -----------------------------------------------------------------------
def delivery(
    endpoint_id: str, wid: str, event_id: str, event_type: str, body: bytes
) -> dict[str, Any]:
    """What a queued delivery holds: the CloudEvent as it will be sent, on every attempt."""
    return {
        "webhook_id": wid,
        "endpoint_id": endpoint_id,
        "event_id": event_id,
        "event_type": event_type,
        "body": body.decode(),
    }


async def declare_stream(js: JetStreamContext, settings: Settings) -> HookNames:
    """The work-queue stream (idempotent; it takes the gateway role's NATS permissions:
    the gateway declares it with the deployment's other streams)."""
    hooks = HookNames(Names(settings.namespace))
    config = StreamConfig(
        name=hooks.stream,
        subjects=[hooks.all_subjects],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=settings.stream.replicas,
        duplicate_window=DUPLICATE_WINDOW_S,
        description="darkroom webhook deliveries, until delivered or given up",
    )
    try:
        await js.stream_info(hooks.stream)
    except nats.js.errors.NotFoundError:
        with contextlib.suppress(nats.js.errors.BadRequestError):  # created concurrently
            await js.add_stream(config)
    return hooks


async def declare_consumer(
    js: JetStreamContext, settings: Settings, timeout: float = QUEUE_WAIT_S
) -> HookNames:
    """The delivery's one durable consumer, once a gateway has declared the work queue
    (waiting up to ``timeout`` seconds for it: workers and the gateway start in any
    order; a worker's NATS role may not create streams)."""
    hooks = HookNames(Names(settings.namespace))
    deadline = time.monotonic() + timeout
    while True:
        try:
            await js.stream_info(hooks.stream)
            break
        except nats.js.errors.NotFoundError:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(1.0)
    await js.add_consumer(hooks.stream, delivery_consumer(hooks, settings.webhooks))
    return hooks


def delivery_consumer(hooks: HookNames, settings: WebhookSettings) -> ConsumerConfig:
    """An attempt holds its message for at most the timeout, then says it is in progress
    while it logs; an un-acked one (a killed worker) comes back after ack_wait.

    No limits: a retry waits as a delayed nak, which counts as ack-pending, so any cap on
    those would let one dead endpoint's waiting retries stop every endpoint's deliveries
    (the deliverer's own concurrency bounds what it takes at once). And the schedule is
    counted from the attempts logged, not from deliveries: a delivery nakked because the
    database was down is no attempt, so no delivery count may end a message."""
    return ConsumerConfig(
        name=hooks.durable,
        durable_name=hooks.durable,
        description="darkroom webhook deliveries",
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.timeout_s + 15.0,
        max_deliver=-1,
        max_ack_pending=-1,
        filter_subject=hooks.all_subjects,
    )


async def enqueue(
    js: JetStreamContext, hooks: HookNames, item: dict[str, Any], msg_id: str
) -> None:
    """Queue one delivery; a second with the same ``msg_id`` within the window is dropped."""
    await js.publish(
        hooks.subject(item["endpoint_id"]), orjson.dumps(item), headers={"Nats-Msg-Id": msg_id}
    )
