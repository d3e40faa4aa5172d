"""Shared fixtures: a real nats-server and a real SeaweedFS S3 server for the session,
and a fresh namespace and bucket for every test so tests never see each other's data."""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr

from bus.core.settings import Settings
from bus.gateway.app import build_app, make_app_runner
from bus.infra.nats_auth import Role
from bus.ops.embedded import NatsCredentials, NatsServer, S3Credentials, SeaweedFS
from bus.ops.pgserver import PostgresServer
from bus.runtime.context import Context, open_context
from bus.runtime.registry import Function, load
from bus.runtime.runner import FunctionRunner
from bus.state.keys import create_key
from tests.support.disk import low_disk_warning

# No hub downloads in tests, and no developer's cache either: profile auto resolves the
# real models it can have offline (the packaged open_nsfw and MiniLM weights) and builds
# tiny demo ones for the rest, as it does on a machine without internet.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="darkroom-test-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], ignore_errors=True)

pytest_plugins = ["tests.support.hangs"]

# Buckets one pytest worker may write into: 50 to 115 per worker in a full run (2 workers).
MAX_TEST_BUCKETS = 5000


@pytest.fixture(scope="session")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsServer]:
    """nats-server with JetStream on a free port (``--port -1``, read back from its log),
    authenticated as ``darkroom up`` runs it: tests connect with the gateway role's nkey."""
    data = tmp_path_factory.mktemp("nats")
    server = NatsServer(data, port=0, credentials=NatsCredentials.load_or_create(data / "auth"))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="session")
async def s3_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SeaweedFS]:
    """SeaweedFS ``weed mini`` with SigV4 credentials, every port free.

    Each test's bucket takes a volume of its own. Left to itself SeaweedFS allows one volume
    per 64 MiB of free disk, counting each as full, so on a host with under ~7 GB free the
    later tests' buckets had none left and every write answered 500. Volumes grow with their
    data, so room for many costs nothing. Its other limit, no writes at all with under 1% of
    the disk free, has no flag in ``weed mini``: a low disk is said up front instead.
    """
    data = tmp_path_factory.mktemp("s3")
    if (low := low_disk_warning(data)) is not None:
        warnings.warn(low, stacklevel=1)
    creds = S3Credentials.load_or_create(data / "s3.json")
    server = SeaweedFS(data, creds, port=0, max_volumes=MAX_TEST_BUCKETS)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="session")
async def postgres_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[PostgresServer]:
    """The embedded PostgreSQL (with pgvector) on a free port; each test gets a schema."""
    server = PostgresServer(tmp_path_factory.mktemp("pg"), port=0)
    await server.start()
    yield server
    await server.stop()


def gateway_seed(server: NatsServer) -> str:
    """The nkey seed of the test server's gateway role (unrestricted)."""
    assert server.credentials is not None
    return server.credentials.seed(Role.GATEWAY)


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(
    nats_server: NatsServer, s3_server: SeaweedFS, postgres_server: PostgresServer, tmp_path: Path
) -> Settings:
    """Settings pointing at the session servers, with a namespace (and so a database
    schema) and a bucket of its own."""
    return Settings(
        data_dir=tmp_path / "data",
        namespace=unique("t"),
        nats={"url": nats_server.url, "nkey_seed": SecretStr(gateway_seed(nats_server))},
        postgres={"url": SecretStr(postgres_server.url)},
        s3={
            "endpoint": s3_server.url,
            "access_key": s3_server.credentials.access_key,
            "secret_key": SecretStr(s3_server.credentials.secret_key),
            "bucket": unique("b"),
        },
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The same settings as environment variables, for darkroom subprocesses."""
    assert settings.s3.secret_key is not None
    return {
        **os.environ,
        "DARKROOM_NAMESPACE": settings.namespace,
        "DARKROOM_NATS__URL": settings.nats.url or "",
        "DARKROOM_NATS__NKEY_SEED": settings.nats.nkey_seed.get_secret_value()
        if settings.nats.nkey_seed
        else "",
        "DARKROOM_S3__ENDPOINT": settings.s3.endpoint or "",
        "DARKROOM_S3__ACCESS_KEY": settings.s3.access_key or "",
        "DARKROOM_S3__SECRET_KEY": settings.s3.secret_key.get_secret_value(),
        "DARKROOM_S3__BUCKET": settings.s3.bucket,
        "DARKROOM_POSTGRES__URL": settings.postgres.url.get_secret_value()
        if settings.postgres.url
        else "",
        "DARKROOM_DATA_DIR": str(settings.data_dir),
    }


@pytest.fixture
def subprocess_env(settings: Settings) -> dict[str, str]:
    return settings_env(settings)


@pytest.fixture
async def ctx(settings: Settings) -> AsyncIterator[Context]:
    # With VRAM leases (on the CPU "device"), for the GPU functions tests start.
    async with open_context(settings, [], "test", database=True, gpu=True) as context:
        yield context


@pytest.fixture
def make_key(ctx: Context) -> Callable[..., Awaitable[str]]:
    """Factory: a real API key with the given scopes, in this test's namespace."""

    async def make(*scopes: str) -> str:
        token, _ = await create_key(ctx.api_keys, "-".join(scopes), scopes)
        return token

    return make


@pytest.fixture
async def admin(make_key: Callable[..., Awaitable[str]]) -> str:
    return await make_key("admin")


@pytest.fixture
async def client(ctx: Context, aiohttp_client: Any, run_function: Any) -> Any:
    """The gateway in-process, with ingest, caption and notify running behind it."""
    for name in ("ingest", "caption", "notify"):
        await run_function(load(name))
    return await aiohttp_client(build_app(ctx))


@pytest.fixture
async def run_function(ctx: Context) -> AsyncIterator[object]:
    """Factory: start a FunctionRunner for a Function in this test's context; stopped after."""
    runners: list[FunctionRunner] = []

    async def start(fn: Function, concurrency: int | None = None) -> FunctionRunner:
        from bus.runtime.streams import declare_consumer

        await declare_consumer(ctx.js, ctx.names, fn.spec, ctx.settings.function(fn.spec.name))
        runner = FunctionRunner(fn, ctx, concurrency)
        await runner.start()
        runners.append(runner)
        return runner

    yield start
    # Each is drained even if another's drain fails: one left running holds the database
    # and NATS the context is about to close.
    drained = await asyncio.gather(*(r.drain(timeout=5) for r in runners), return_exceptions=True)
    for outcome in drained:
        if isinstance(outcome, BaseException):
            raise outcome


class GatewayTestServer(TestServer):
    """An app on a free port, run as ``darkroom gateway`` runs it (make_app_runner: its
    shutdown timeout, handlers not cancelled when a client hangs up), not with aiohttp's
    test settings (a 60 s shutdown timeout, handler cancellation)."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return make_app_runner(self.app)


@pytest.fixture
async def aiohttp_server() -> AsyncIterator[Callable[[web.Application], Awaitable[TestServer]]]:
    """Factory: serve an app on a free port (see :class:`GatewayTestServer`); closed after."""
    servers: list[TestServer] = []

    async def serve(app: web.Application) -> TestServer:
        server = GatewayTestServer(app)
        await server.start_server()
        servers.append(server)
        return server

    yield serve
    while servers:
        await servers.pop().close()


@pytest.fixture
def aiohttp_client(aiohttp_client: Any) -> Callable[..., Awaitable[TestClient[Any, Any]]]:
    """pytest-aiohttp's client factory, an app given to it served by GatewayTestServer."""

    async def connect(app_or_server: Any, **kwargs: Any) -> TestClient[Any, Any]:
        if isinstance(app_or_server, web.Application):
            app_or_server = GatewayTestServer(app_or_server)
        client: TestClient[Any, Any] = await aiohttp_client(app_or_server, **kwargs)
        return client

    return connect
