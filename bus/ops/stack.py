"""``darkroom up`` (everything on one machine) and ``darkroom worker`` (one function)."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import SecretStr

from bus.core.redact import redact_url
from bus.core.settings import Settings
from bus.gateway.app import build_app, make_app_runner
from bus.infra.nats_auth import Role
from bus.infra.nats_conn import where
from bus.infra.tasks import cancel_and_wait
from bus.intake.sweep import run_sweeper
from bus.ops.embedded import (
    Child,
    NatsCredentials,
    NatsServer,
    S3Credentials,
    SeaweedFS,
    Supervisor,
)
from bus.ops.local import (
    ADMIN_KEY_FILE,
    InstanceLock,
    read_run_info,
    remove_run_info,
    write_private,
    write_run_info,
)
from bus.ops.pgserver import PostgresServer, embedded_postgres_url
from bus.ops.signals import Stopper
from bus.runtime.context import Context, open_context
from bus.runtime.registry import Function, enabled_names, load
from bus.runtime.runner import FunctionRunner
from bus.state.keys import create_key, key_state, record_for_token, store_key

log = logging.getLogger("darkroom")

DRAIN_TIMEOUT_S = 60.0
GIVE_UP_DRAIN_S = 5.0
S3_CREDENTIALS_FILE = "s3.json"
NATS_CREDENTIALS_FILE = "nats-auth.json"  # the embedded server's nkey seeds, one per role


class StartupError(Exception):
    """Something the user must fix before darkroom can start; the message says what."""


def with_endpoints(
    settings: Settings,
    nats_url: str | None = None,
    s3: dict[str, Any] | None = None,
    postgres_url: str | None = None,
    nats_seed: str | None = None,
) -> Settings:
    """``settings`` pointed at the given servers (``s3``: endpoint, access_key, secret_key;
    ``nats_seed``: the embedded NATS server's nkey seed for this process's role)."""
    update: dict[str, Any] = {}
    if nats_url is not None:
        nats: dict[str, Any] = {"url": nats_url}
        if nats_seed is not None:
            nats["nkey_seed"] = SecretStr(nats_seed)
        update["nats"] = settings.nats.model_copy(update=nats)
    if s3 is not None:
        update["s3"] = settings.s3.model_copy(
            update={**s3, "secret_key": SecretStr(s3["secret_key"])}
        )
    if postgres_url is not None:
        update["postgres"] = settings.postgres.model_copy(update={"url": SecretStr(postgres_url)})
    return settings.model_copy(update=update)


def resolve_endpoints(
    settings: Settings, database: bool = False, role: Role = Role.GATEWAY
) -> Settings:
    """For commands beside a running ``darkroom up``: fill in its embedded endpoints
    (PostgreSQL's only when ``database``: most workers never touch it), and the embedded
    NATS server's credential for ``role``."""
    embedded = {
        "NATS": settings.embedded_nats,
        "S3": settings.embedded_s3,
        "PostgreSQL": database and settings.embedded_postgres,
    }
    if not any(embedded.values()):
        return settings
    info = read_run_info(settings.data_dir)
    if info is None:
        missing = [name for name, wanted in embedded.items() if wanted]
        raise StartupError(
            f"no {' or '.join(missing)} endpoint: pass --nats/--s3/--postgres (or "
            "DARKROOM_NATS__URL, DARKROOM_S3__ENDPOINT, DARKROOM_POSTGRES__URL), or start "
            f"`darkroom up --data-dir {settings.data_dir}` first"
        )
    s3 = None
    if settings.embedded_s3:
        creds = S3Credentials.load_or_create(settings.data_dir / S3_CREDENTIALS_FILE)
        s3 = {
            "endpoint": info["s3_url"],
            "access_key": creds.access_key,
            "secret_key": creds.secret_key,
        }
    postgres_url = None
    if database and settings.embedded_postgres:
        if not info.get("postgres_port"):
            raise StartupError(
                "the running `darkroom up` uses an external PostgreSQL: pass --postgres (or "
                "DARKROOM_POSTGRES__URL) here too"
            )
        postgres_url = embedded_postgres_url(settings.data_dir, int(info["postgres_port"]))
    nats_url = nats_seed = None
    if settings.embedded_nats:
        nats_url = info["nats_url"]
        nats_seed = NatsCredentials.load_or_create(settings.data_dir / NATS_CREDENTIALS_FILE).seed(
            role
        )
    return with_endpoints(settings, nats_url, s3, postgres_url, nats_seed)


def postgres_where(settings: Settings) -> str:
    """Where the read model is, without the password."""
    if settings.postgres.url is None:
        return "(embedded)"
    return redact_url(settings.postgres.url.get_secret_value())


def enabled_functions(settings: Settings) -> list[Function]:
    return [load(name) for name in enabled_names(settings)]


async def ensure_admin_key(ctx: Context, data_dir: Path) -> tuple[str, bool]:
    """The admin key from ``<data-dir>/admin.key``, minted (and registered) on first start."""
    path = data_dir / ADMIN_KEY_FILE
    if path.exists():
        token = path.read_text().strip()
        record = record_for_token(token, "admin", ("admin",))
        state = await key_state(ctx.api_keys, record.id)
        if state == "present":
            return token, False
        if state == "absent":  # e.g. an external NATS that was reset: register it again
            await store_key(ctx.api_keys, record)
            return token, False
        log.warning("the admin key in %s was revoked; minting a new one", path)
    token, _ = await create_key(ctx.api_keys, "admin", ("admin",))
    write_private(path, token + "\n")
    return token, True


async def _start_runners(
    ctx: Context, functions: list[Function], concurrency: int | None = None
) -> list[FunctionRunner]:
    """Start each function's runner; if one fails to start, drain those already running."""
    started: list[FunctionRunner] = []
    try:
        for fn in functions:
            runner = FunctionRunner(fn, ctx, concurrency)
            await runner.start()  # a failed start has stopped itself
            started.append(runner)
    except BaseException:
        await _drain(started)
        raise
    return started


async def _drain(runners: list[FunctionRunner], timeout: float = DRAIN_TIMEOUT_S) -> None:
    results = await asyncio.gather(*(r.drain(timeout) for r in runners), return_exceptions=True)
    for runner, result in zip(runners, results, strict=True):
        if isinstance(result, BaseException):
            log.error("%s did not stop cleanly", runner.stage, exc_info=result)


async def run_up(settings: Settings, announce: Callable[[str], None] = print) -> int:
    """Start the embedded servers (unless external ones are given), every function and the
    gateway; run until SIGINT/SIGTERM or a child that keeps dying. Returns the exit code."""
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = InstanceLock(data_dir)
    if not lock.acquire():
        running = read_run_info(data_dir) or {}
        raise StartupError(
            f"darkroom is already running on {data_dir} (pid {running.get('pid', '?')}, "
            f"{running.get('gateway_url', '')}); stop it or pass another --data-dir"
        )
    try:
        return await _run_up_locked(settings, announce)
    finally:
        lock.release()


async def _run_up_locked(settings: Settings, announce: Callable[[str], None]) -> int:
    data_dir = settings.data_dir
    stopper = Stopper()
    stopper.install()
    children: list[Child] = []
    supervisor: Supervisor | None = None
    try:
        nats_url = nats_seed = s3 = None
        if settings.embedded_nats:
            nats_credentials = NatsCredentials.load_or_create(data_dir / NATS_CREDENTIALS_FILE)
            nats = NatsServer(
                data_dir, settings.nats.embedded_port, nats_credentials, settings.namespace
            )
            await nats.start()
            children.append(nats)
            nats_url, nats_seed = nats.url, nats_credentials.seed(Role.GATEWAY)
        if settings.embedded_s3:
            creds = S3Credentials.load_or_create(data_dir / S3_CREDENTIALS_FILE)
            weed = SeaweedFS(data_dir, creds, settings.s3.embedded_port)
            await weed.start()
            children.append(weed)
            s3 = {
                "endpoint": weed.url,
                "access_key": creds.access_key,
                "secret_key": creds.secret_key,
            }
        postgres: PostgresServer | None = None
        if settings.embedded_postgres:
            postgres = PostgresServer(data_dir, settings.postgres.embedded_port)
            await postgres.start()
            children.append(postgres)
        resolved = with_endpoints(
            settings, nats_url, s3, postgres.url if postgres else None, nats_seed
        )
        functions = enabled_functions(resolved)
        supervisor = Supervisor(children, lambda why: stopper.stop(why, exit_code=3))
        supervisor.start()
        async with open_context(resolved, [f.spec for f in functions], "up", database=True) as ctx:
            admin_key, minted = await ensure_admin_key(ctx, data_dir)
            app_runner = make_app_runner(build_app(ctx))
            await app_runner.setup()
            try:
                gateway_url = await _start_site(
                    app_runner, resolved.gateway.host, resolved.gateway.port
                )
            except StartupError:
                await app_runner.cleanup()
                raise
            runners = await _start_runners(ctx, functions)
            write_run_info(
                data_dir,
                {
                    "nats_url": resolved.nats.url,
                    "s3_url": resolved.s3.endpoint,
                    "postgres_port": postgres.port if postgres else None,
                    "gateway_url": gateway_url,
                    "namespace": resolved.namespace,
                },
            )
            announce(
                _banner(resolved, gateway_url, functions, admin_key, minted, data_dir, children)
            )
            sweeper = asyncio.create_task(run_sweeper(ctx), name="sweeper")
            try:
                await stopper.event.wait()
            finally:
                log.info("stopping: %s", stopper.reason or "shutting down")
                await cancel_and_wait(sweeper)
                await app_runner.cleanup()
                log.debug("gateway stopped")
                # A server that died for good cannot take acks: don't wait long for them.
                await _drain(runners, GIVE_UP_DRAIN_S if stopper.exit_code else DRAIN_TIMEOUT_S)
                log.debug("functions drained")
    finally:
        log.debug("disconnected; stopping servers")
        if supervisor is not None:
            await supervisor.stop()
        else:
            for child in reversed(children):
                await child.stop()
        remove_run_info(data_dir)
        log.debug("servers stopped")
    if stopper.exit_code:
        log.error("darkroom stopped: %s", stopper.reason)
    return stopper.exit_code


async def _start_site(app_runner: web.AppRunner, host: str, port: int) -> str:
    site = web.TCPSite(app_runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"port {port} on {host} is in use; pick another with --port"
            ) from None
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    actual = sockets[0].getsockname()[1] if sockets else port
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{shown}:{actual}"


def _banner(
    settings: Settings,
    gateway_url: str,
    functions: list[Function],
    admin_key: str,
    minted: bool,
    data_dir: Path,
    children: list[Child],
) -> str:
    embedded = {c.name for c in children}
    lines = [
        "",
        "darkroom is up",
        f"  UI and API   {gateway_url}   (OpenAPI: {gateway_url}/api/openapi.json)",
        f"  NATS         {where(settings.nats.servers)}"
        + ("   embedded nats-server (nkeys per role)" if "nats-server" in embedded else ""),
        f"  S3           {redact_url(settings.s3.endpoint or '')}   bucket {settings.s3.bucket}"
        + ("   embedded SeaweedFS" if "seaweedfs" in embedded else ""),
        f"  PostgreSQL   {postgres_where(settings)}   schema {settings.db_schema}"
        + ("   embedded (`darkroom db` for psql)" if "postgres" in embedded else ""),
        "  functions    "
        + ", ".join(
            f"{f.spec.name}x{settings.function(f.spec.name).concurrency or f.spec.concurrency}"
            for f in functions
        ),
        f"  data         {data_dir}   (logs in {data_dir / 'logs'})",
        f"  profile      {settings.profile}",
    ]
    if minted:
        lines += [
            f"  admin key    {admin_key}",
            f"               (new; saved to {data_dir / ADMIN_KEY_FILE}, mode 0600. "
            "Keep it secret.)",
        ]
    else:
        lines.append(f"  admin key    in {data_dir / ADMIN_KEY_FILE}")
    lines += ["", "Press Ctrl-C to stop (in-flight work is finished first).", ""]
    return "\n".join(lines)


async def run_gateway(settings: Settings) -> int:
    """Only the HTTP gateway, against external (or this machine's running) NATS and S3.

    Stateless: run as many as you like behind a load balancer. It never mints keys; create
    them with ``darkroom keys create``.
    """
    resolved = resolve_endpoints(settings, database=True)
    stopper = Stopper()
    stopper.install()
    async with open_context(resolved, [], "gateway", database=True) as ctx:
        app_runner = make_app_runner(build_app(ctx))
        await app_runner.setup()
        url = await _start_site(app_runner, resolved.gateway.host, resolved.gateway.port)
        log.info(
            "gateway listening on %s (NATS %s, S3 %s)",
            url,
            where(resolved.nats.servers),
            redact_url(resolved.s3.endpoint or ""),
        )
        # Every gateway sweeps abandoned uploads: each step is idempotent, so several agree.
        sweeper = asyncio.create_task(run_sweeper(ctx), name="sweeper")
        try:
            await stopper.event.wait()
        finally:
            await cancel_and_wait(sweeper)
            await app_runner.cleanup()
    return 0


async def run_worker(settings: Settings, function_name: str, concurrency: int | None) -> int:
    """Run one function against external (or this machine's running) NATS and S3."""
    fn = load(function_name)
    role = Role.GATEWAY if fn.intake else Role.WORKER
    resolved = resolve_endpoints(settings, database=fn.spec.needs_db, role=role)
    stopper = Stopper()
    stopper.install()
    async with open_context(resolved, [fn.spec], f"worker-{function_name}", role=role) as ctx:
        runners = await _start_runners(ctx, [fn], concurrency)
        log.info(
            "worker %s started: consumer %s on %s, concurrency %d",
            function_name,
            ctx.names.durable(function_name),
            where(resolved.nats.servers),
            runners[0].concurrency,
        )
        try:
            await stopper.event.wait()
        finally:
            await _drain(runners)
            log.info("worker %s drained and stopped", function_name)
    return 0
