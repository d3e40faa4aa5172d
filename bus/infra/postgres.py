"""Connecting to PostgreSQL: bounded start-up, version and pgvector checks, migrations, the
pool.

asyncpg was chosen over psycopg 3 by measurement (tests/bench/bench_readmodel.py
``--drivers``): a 50-row keyset page from 100k rows took 0.43 ms at the median against
0.78 ms, and a pool of 10 served 3,800 pages/s against 1,300.

Migrations are plain SQL files, applied in order at start under an advisory lock (so
several gateways and workers starting at once apply each exactly once) and recorded with a
checksum in ``<schema>.schema_migrations``; a file changed after it was applied is an error.
A tool such as Alembic would bring SQLAlchemy and a synchronous driver for what is a
forty-line loop here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bus.core.redact import redact_url

log = logging.getLogger("darkroom.postgres")

MIN_SERVER_VERSION = 150000  # PostgreSQL 15
MIGRATION_LOCK = 0x6461726B  # "dark": one migrator at a time in a database
MIGRATION_LOCK_WAIT_S = 60.0


CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # 08xxx: the connection was lost or refused
    asyncpg.exceptions.OperatorInterventionError,  # 57xxx: shutting down, starting up
    asyncpg.InterfaceError,
)
"""What a query raises while the server is unreachable (as opposed to a bad query)."""

STALE_CONNECTION = (asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)
"""What a pooled connection the server dropped raises on its next use: worth one retry."""


class DatabaseUnavailableError(Exception):
    """PostgreSQL cannot be reached, is too old, or lacks pgvector; the message says which."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]

    @classmethod
    def load_all(cls, folder: Path) -> list[Migration]:
        """``0001_name.sql``, ``0002_other.sql``, ... in version order."""
        found = []
        for path in sorted(folder.glob("*.sql")):
            number, _, name = path.stem.partition("_")
            found.append(cls(int(number), name, path.read_text()))
        versions = [m.version for m in found]
        if versions != list(range(1, len(found) + 1)):
            raise ValueError(f"migrations in {folder} must be numbered 1..n, found {versions}")
        return found


async def _connect(url: str, timeout: float) -> asyncpg.Connection:
    try:
        return await asyncio.wait_for(asyncpg.connect(url, timeout=timeout), timeout + 1)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailableError(
            f"PostgreSQL at {redact_url(url)} is unreachable within {timeout:g} s: "
            f"{type(exc).__name__}: {exc}"
        ) from None


async def check_server(conn: asyncpg.Connection, url: str) -> None:
    """Refuse a server older than 15, or one without the pgvector extension."""
    version = int(await conn.fetchval("SHOW server_version_num"))
    shown = await conn.fetchval("SHOW server_version")
    if version < MIN_SERVER_VERSION:
        raise DatabaseUnavailableError(
            f"PostgreSQL at {redact_url(url)} is version {shown}; darkroom needs 15 or newer"
        )
    vector = await conn.fetchval(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
    )
    if vector is None:
        raise DatabaseUnavailableError(
            f"PostgreSQL {shown} at {redact_url(url)} lacks the pgvector extension "
            "('vector' is not "
            "among pg_available_extensions): install pgvector on the server, or use an image "
            "that has it (pgvector/pgvector)"
        )


async def _lock(conn: asyncpg.Connection, schema: str, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK):
        if time.monotonic() >= deadline:
            raise DatabaseUnavailableError(
                f"another process has been migrating this database for {wait_s:g} s "
                f"(waiting to migrate schema {schema!r}); is a migration stuck?"
            )
        await asyncio.sleep(0.2)


async def vector_schema(conn: asyncpg.Connection) -> str:
    """Create pgvector if it is missing (in ``public``); the schema it lives in."""
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA public")
    except asyncpg.InsufficientPrivilegeError:
        raise DatabaseUnavailableError(
            "pgvector is installed on the server but this user may not create it: run "
            "`CREATE EXTENSION vector;` once as a superuser in the database"
        ) from None
    return str(
        await conn.fetchval(
            "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'vector'"
        )
    )


async def migrate(
    conn: asyncpg.Connection,
    schema: str,
    migrations: Sequence[Migration],
    lock_wait_s: float = MIGRATION_LOCK_WAIT_S,
) -> list[int]:
    """Apply what is missing of ``migrations`` to ``schema``; the versions applied now.

    Raises:
        DatabaseUnavailableError: the lock could not be had in ``lock_wait_s``, pgvector
            could not be created, or a migration failed (the message says which).
    """
    applied_now: list[int] = []
    await _lock(conn, schema, lock_wait_s)
    try:
        extensions = await vector_schema(conn)
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations ('
            "version int PRIMARY KEY, name text NOT NULL, checksum text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {
            r["version"]: r["checksum"]
            for r in await conn.fetch(f'SELECT version, checksum FROM "{schema}".schema_migrations')
        }
        for m in migrations:
            if m.version in done:
                if done[m.version] != m.checksum:
                    raise DatabaseUnavailableError(
                        f"migration {m.version:04d}_{m.name} changed after it was applied to "
                        f"schema {schema!r}; add a new migration instead"
                    )
                continue
            try:
                async with conn.transaction():
                    await conn.execute(f'SET LOCAL search_path TO "{schema}", "{extensions}"')
                    await conn.execute(m.sql)
                    await conn.execute(
                        f'INSERT INTO "{schema}".schema_migrations (version, name, checksum) '
                        "VALUES ($1, $2, $3)",
                        m.version,
                        m.name,
                        m.checksum,
                    )
            except asyncpg.PostgresError as exc:
                raise DatabaseUnavailableError(
                    f"migration {m.version:04d}_{m.name} failed on schema {schema!r}: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            applied_now.append(m.version)
            log.info("applied migration %04d_%s to schema %s", m.version, m.name, schema)
    except asyncpg.PostgresError as exc:
        raise DatabaseUnavailableError(
            f"could not prepare schema {schema!r}: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        with contextlib.suppress(Exception):  # a dead connection drops the lock anyway
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied_now


async def open_pool(
    url: str,
    schema: str,
    migrations: Sequence[Migration],
    *,
    size: int = 10,
    timeout: float = 5.0,
    application_name: str = "darkroom",
) -> asyncpg.Pool:
    """Check the server, migrate ``schema``, and open a pool whose connections use it.

    Raises:
        DatabaseUnavailableError: unreachable within ``timeout``, too old, or no pgvector.
    """
    conn = await _connect(url, timeout)
    try:
        await check_server(conn, url)
        await migrate(conn, schema, migrations)
        extensions = await vector_schema(conn)
    finally:
        await conn.close()
    try:
        pool = await asyncio.wait_for(
            asyncpg.create_pool(
                url,
                min_size=1,
                max_size=size,
                timeout=timeout,
                command_timeout=60,
                server_settings={
                    "search_path": f'"{schema}", "{extensions}"',
                    "application_name": application_name,
                },
            ),
            timeout + 1,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailableError(
            f"PostgreSQL at {redact_url(url)}: could not open a pool: {type(exc).__name__}: {exc}"
        ) from None
    assert pool is not None
    return pool
