"""Authenticated NATS: the embedded server's generated nkeys, and each role refused where
it must be (a real nats-server with the configuration ``darkroom up`` writes)."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import RePublish, StreamConfig, StreamSource
from pydantic import SecretStr

from bus.core.settings import ConfigError, NatsSettings, Settings, load_settings
from bus.gpu.leases import read_devices
from bus.infra.nats_auth import Role
from bus.infra.nats_conn import NatsUnavailableError, connect
from bus.intake.accept import accept_upload
from bus.models.catalogue import resolve
from bus.models.progress import ModelReadiness, read_readiness
from bus.ops.cli import main as cli_main
from bus.ops.embedded import NatsCredentials, NatsServer
from bus.ops.local import InstanceLock, write_run_info
from bus.ops.stack import NATS_CREDENTIALS_FILE, _banner, resolve_endpoints
from bus.runtime import services
from bus.runtime.context import open_context
from bus.runtime.registry import load
from bus.runtime.runner import FunctionRunner
from bus.state.keys import create_key
from tests.support.images import jpeg
from tests.support.streams import eventually

pytestmark = [pytest.mark.nats, pytest.mark.s3]


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[NatsServer]:
    """A server of our own, for this test's namespace (the permissions name it)."""
    data = settings.data_dir
    data.mkdir(parents=True, exist_ok=True)
    creds = NatsCredentials.load_or_create(data / NATS_CREDENTIALS_FILE)
    srv = NatsServer(data, port=0, credentials=creds, namespace=settings.namespace)
    await srv.start()
    yield srv
    await srv.stop()


def as_role(settings: Settings, server: NatsServer, role: Role) -> Settings:
    assert server.credentials is not None
    nats_settings = NatsSettings(url=server.url, nkey_seed=SecretStr(server.credentials.seed(role)))
    return settings.model_copy(update={"nats": nats_settings})


class Refusals:
    """The server's permission refusals, as this connection's error callback hears them."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.arrived = asyncio.Event()

    async def record(self, exc: Exception) -> None:
        self.seen.append(str(exc))
        self.arrived.set()

    async def wait_for(self, subject: str) -> None:
        await self._wait(f'permissions violation for publish to "{subject.lower()}"')

    async def wait_for_subscription(self, subject: str) -> None:
        await self._wait(f'permissions violation for subscription to "{subject.lower()}"')

    async def _wait(self, wanted: str) -> None:
        while not any(wanted in s.lower() for s in self.seen):
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 10)


async def raw(server: NatsServer, role: Role, refusals: Refusals | None = None) -> NATS:
    kwargs: dict[str, Any] = {"error_cb": refusals.record} if refusals else {}
    return await nats.connect(server.url, **server.client_options(role), **kwargs)


async def test_credentials_are_private_and_the_server_config_holds_no_secret(
    settings: Settings, server: NatsServer
) -> None:
    path = settings.data_dir / NATS_CREDENTIALS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    seeds = json.loads(path.read_text())
    assert set(seeds) == {r.value for r in Role}
    config = server.config_path.read_text()
    assert all(seed not in config for seed in seeds.values())
    assert stat.S_IMODE(server.config_path.stat().st_mode) == 0o600
    # Kept across restarts: the same seeds come back.
    assert NatsCredentials.load_or_create(path).seeds == {Role(k): v for k, v in seeds.items()}


async def test_without_credentials_the_connection_is_refused_at_once(
    server: NatsServer,
) -> None:
    with pytest.raises(NatsUnavailableError) as caught:
        await connect(NatsSettings(url=server.url), "anonymous", timeout=30)
    assert "refused darkroom's credentials" in str(caught.value)
    assert "Authorization Violation" in str(caught.value)
    wrong = server.url.replace("nats://", "nats://someone:hunter2@")
    with pytest.raises(NatsUnavailableError) as caught:
        await connect(NatsSettings(url=wrong), "guessing", timeout=30)
    assert "hunter2" not in str(caught.value) and "someone:***@" in str(caught.value)


async def test_a_worker_cannot_write_api_keys_nor_announce_uploads(
    settings: Settings, server: NatsServer
) -> None:
    ns = settings.namespace
    gateway = await raw(server, Role.GATEWAY)
    refusals = Refusals()
    worker = await raw(server, Role.WORKER, refusals)
    try:
        keys = await gateway.jetstream().create_key_value(bucket=f"{ns}_keys")
        # The worker cannot even open the bucket (its info is refused) ...
        with pytest.raises(nats.errors.TimeoutError):
            await worker.jetstream(timeout=1).key_value(f"{ns}_keys")
        await refusals.wait_for(f"$JS.API.STREAM.INFO.KV_{ns}_keys")
        # ... nor write to it directly: an admin key minted by a worker never lands.
        await worker.publish(f"$KV.{ns}_keys.k_forged", b'{"scopes":["admin"]}')
        await refusals.wait_for(f"$KV.{ns}_keys.k_forged")
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await keys.get("k_forged")
        # Forged uploads and S3 notifications are refused too.
        await worker.publish(f"{ns}.uploaded", b"{}")
        await refusals.wait_for(f"{ns}.uploaded")
        await worker.publish(f"{ns}.s3", b"{}")
        await refusals.wait_for(f"{ns}.s3")
        # So are approval decisions: an admin's, through the gateway, and no worker's.
        for decision in ("approved", "rejected", "deleted"):
            await worker.publish(f"{ns}.{decision}", b"{}")
            await refusals.wait_for(f"{ns}.{decision}")
        # No stream configuration at all: a mirror, a source or a RePublish would read or
        # write any subject (the server does not check them against the user).
        wjs = worker.jetstream(timeout=1)
        events = ns.upper()
        await gateway.jetstream().add_stream(name=events, subjects=[f"{ns}.>"])
        for config in (
            StreamConfig(name="STEAL", mirror=StreamSource(name=f"KV_{ns}_keys")),
            StreamConfig(
                name="FORGE",
                subjects=[f"{ns}-live.x"],
                republish=RePublish(src=f"{ns}-live.x", dest=f"$KV.{ns}_keys.k_forged"),
            ),
        ):
            with pytest.raises(nats.errors.TimeoutError):
                await wjs.add_stream(config)
            await refusals.wait_for(f"$JS.API.STREAM.CREATE.{config.name}")
        with pytest.raises(nats.errors.TimeoutError):
            await wjs.update_stream(StreamConfig(name=events, subjects=[f"{ns}.>"], max_msgs=1))
        await refusals.wait_for(f"$JS.API.STREAM.UPDATE.{events}")
        await worker.publish(f"$JS.API.STREAM.DELETE.KV_{ns}_keys", b"")
        await refusals.wait_for(f"$JS.API.STREAM.DELETE.KV_{ns}_keys")
        await worker.publish(f"$JS.API.CONSUMER.DELETE.{events}.{ns}_notify", b"")
        await refusals.wait_for(f"$JS.API.CONSUMER.DELETE.{events}.{ns}_notify")
        assert (await keys.status()).bucket == f"{ns}_keys"
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await keys.get("k_forged")
        # Nor can it overhear another role's replies (a key read, an ack subject).
        await worker.subscribe("_INBOX.>")
        await refusals.wait_for_subscription("_INBOX.>")
    finally:
        await worker.close()
        await gateway.close()


async def test_workers_run_the_whole_chain_with_only_their_role(
    settings: Settings, server: NatsServer
) -> None:
    """The worker role is enough for ingest, caption and notify: an upload accepted by the
    gateway role becomes ready in the read model."""
    functions = [load(name) for name in ("ingest", "caption", "notify")]
    gateway_settings = as_role(settings, server, Role.GATEWAY)
    worker_settings = as_role(settings, server, Role.WORKER)
    async with (
        open_context(gateway_settings, [], "gateway", database=True) as gateway,
        open_context(
            worker_settings, [f.spec for f in functions], "worker", role=Role.WORKER
        ) as worker,
    ):
        with pytest.raises(RuntimeError, match="did not open the API keys"):
            _ = worker.api_keys
        runners = [FunctionRunner(fn, worker) for fn in functions]
        for runner in runners:
            await runner.start()
        try:
            accepted = await accept_upload(gateway, _one(jpeg(64, 48)), "a.jpg", "test")
            assert gateway.db is not None
            db = gateway.db

            async def ready() -> bool:
                doc = await db.get(accepted.image_id)
                return doc is not None and doc["status"] == "ready"

            await eventually(ready, timeout=60, what="the image is ready")
        finally:
            for runner in runners:
                await runner.drain(10)


async def test_the_status_role_reads_but_cannot_write(
    settings: Settings, server: NatsServer
) -> None:
    ns = settings.namespace
    gateway_settings = as_role(settings, server, Role.GATEWAY)
    async with open_context(gateway_settings, [load("ingest").spec], "gateway") as gateway:
        await create_key(gateway.api_keys, "someone", ("read",))
    refusals = Refusals()
    status = await raw(server, Role.STATUS, refusals)
    try:
        js = status.jetstream(timeout=5)
        info = await js.consumer_info(ns.upper(), f"{ns}_ingest")
        assert info.num_pending == 0
        assert await read_devices(js, f"{ns}_leases") == []
        await status.publish(f"{ns}.ingested", b"{}")
        await refusals.wait_for(f"{ns}.ingested")
        await status.publish(f"$KV.{ns}_leases.forged", b"{}")
        await refusals.wait_for(f"$KV.{ns}_leases.forged")
        # It cannot settle anyone's messages, nor hear other roles' replies.
        await status.publish(f"$JS.ACK.{ns.upper()}.{ns}_ingest.1.1.1.1.0", b"+TERM")
        await refusals.wait_for(f"$JS.ACK.{ns.upper()}.{ns}_ingest.1.1.1.1.0")
        await status.subscribe("_INBOX_worker.>")
        await refusals.wait_for_subscription("_INBOX_worker.>")
    finally:
        await status.close()


async def test_s3_notifications_publish_only_their_subject(
    settings: Settings, server: NatsServer
) -> None:
    ns = settings.namespace
    refusals = Refusals()
    minio = await raw(server, Role.S3_NOTIFY, refusals)
    try:
        await minio.publish(f"{ns}.s3", b"{}")  # allowed: no refusal for it follows
        await minio.publish(f"{ns}.uploaded", b"{}")
        await refusals.wait_for(f"{ns}.uploaded")
        assert not any(f'"{ns}.s3"' in s for s in refusals.seen)
    finally:
        await minio.close()


async def test_commands_beside_darkroom_up_get_their_role_s_seed(settings: Settings) -> None:
    """`darkroom worker` beside a running `darkroom up` connects as a worker, the admin
    commands as the gateway, `darkroom gpus` with the read-only role."""
    embedded = settings.model_copy(
        update={"nats": NatsSettings(), "s3": settings.s3.model_copy(update={"endpoint": None})}
    )
    data = settings.data_dir
    data.mkdir(parents=True, exist_ok=True)
    lock = InstanceLock(data)  # as a running `darkroom up` holds it
    assert lock.acquire()
    try:
        write_run_info(data, {"nats_url": "nats://127.0.0.1:4999", "s3_url": "http://127.0.0.1:1"})
        creds = NatsCredentials.load_or_create(data / NATS_CREDENTIALS_FILE)
        for role in Role:
            seed = resolve_endpoints(embedded, role=role).nats.nkey_seed
            assert seed is not None and seed.get_secret_value() == creds.seed(role)
    finally:
        lock.release()


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


def test_settings_take_one_way_to_authenticate(tmp_path: Path) -> None:
    seed = SecretStr("SUAEXAMPLE")
    with pytest.raises(
        ValueError, match="one way to authenticate to NATS, got token and nkey_seed"
    ):
        NatsSettings(token=SecretStr("t"), nkey_seed=seed)
    with pytest.raises(ValueError, match=r"nats\.user and nats\.password go together"):
        NatsSettings(user="u")
    with pytest.raises(ValueError, match=r"tls_cert and nats\.tls_key go together"):
        NatsSettings(tls_cert=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="no such file"):
        NatsSettings(creds_file=tmp_path / "missing.creds")
    with pytest.raises(ConfigError) as caught:
        load_settings(overrides={"nats": {"url": "http://admin:s3cret@example:4222"}})
    assert "s3cret" not in str(caught.value) and "admin:***@example" in str(caught.value)
    assert NatsSettings(url="tls://h:4222").uses_tls


def test_the_banner_and_logs_never_show_a_password(settings: Settings) -> None:
    secret = settings.model_copy(
        update={
            "nats": NatsSettings(
                url="nats://ops:hunter2@10.0.0.1:4222,nats://ops:hunter2@10.0.0.2:4222"
            )
        }
    )
    text = _banner(secret, "http://127.0.0.1:8080", [], "key", False, settings.data_dir, [])
    assert "hunter2" not in text and "nats://ops:***@10.0.0.1:4222" in text


def test_nats_config_prints_the_deployed_users(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["nats-config"]) == 0
    deployed = Path(__file__).parents[1] / "deploy" / "nats" / "darkroom-auth.conf"
    assert capsys.readouterr().out == deployed.read_text()


async def test_a_worker_started_first_waits_for_a_gateway_to_declare_the_streams(
    settings: Settings, server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    ingest = load("ingest")
    opened = asyncio.Event()

    async def worker() -> None:
        worker_settings = as_role(settings, server, Role.WORKER)
        async with open_context(worker_settings, [ingest.spec], "worker", role=Role.WORKER):
            opened.set()

    with caplog.at_level(logging.INFO, logger="darkroom.streams"):
        waiting = asyncio.create_task(worker())
        await eventually(
            lambda: any("waiting for a gateway" in r.getMessage() for r in caplog.records),
            timeout=30,
            what="the worker waits",
        )
        assert not opened.is_set()
        async with open_context(as_role(settings, server, Role.GATEWAY), [], "gateway"):
            await asyncio.wait_for(waiting, 30)
    assert opened.is_set()


async def test_a_worker_answers_service_requests_only_to_the_requester(
    settings: Settings, server: NatsServer
) -> None:
    """Workers subscribe to their services and may reply (a stream of chunks, too) to a
    request's reply subject, but not publish into another role's inbox on their own."""
    ns = settings.namespace
    gateway = await raw(server, Role.GATEWAY)
    refusals = Refusals()
    worker = await raw(server, Role.WORKER, refusals)
    try:

        async def answer(msg: Any) -> None:
            for i in range(3):
                await services.reply_chunk(worker, msg, i)
            await services.reply_end(worker, msg)

        await worker.subscribe(f"{ns}-rpc.count", queue=f"{ns}.caption", cb=answer)
        await worker.flush()

        async def counted() -> list[Any] | None:
            # The worker's interest crosses into the gateway's account a moment after its
            # own flush: until then a request finds no responder.
            try:
                return [c async for c in services.stream(gateway, f"{ns}-rpc.count", {}, 10, 10)]
            except services.NoResponderError:
                return None

        chunks = await eventually(counted, what="the worker's service to be reachable")
        assert chunks == [0, 1, 2]
        await worker.publish("_INBOX_gateway.forged", b"{}")
        await refusals.wait_for("_INBOX_gateway.forged")
        # Only in a queue group: a plain subscription would read every request.
        await worker.subscribe(f"{ns}-rpc.count")
        await refusals.wait_for_subscription(f"{ns}-rpc.count")
    finally:
        await worker.close()
        await gateway.close()


async def test_a_worker_reports_its_models_readiness_but_still_cannot_write_keys(
    settings: Settings, server: NatsServer
) -> None:
    """The readiness bucket (declared by the gateway) is the one KV bucket besides the
    lease ledger a worker may write: what it reports there reaches /api/status."""
    ns = settings.namespace
    gateway_settings = as_role(settings, server, Role.GATEWAY)
    worker_settings = as_role(settings, server, Role.WORKER)
    async with (
        open_context(gateway_settings, [], "gateway") as gateway,
        open_context(worker_settings, [], "worker", role=Role.WORKER) as worker,
    ):
        readiness = await ModelReadiness.open(
            worker.js, worker.names.models_kv, "caption", "host-a", "worker-caption"
        )
        try:
            await readiness.prepare([resolve(settings, "nsfw")])  # packaged weights: cached
            [entry] = await read_readiness(gateway.js, gateway.names.models_kv)
            assert (entry["task"], entry["state"], entry["host"]) == ("nsfw", "cached", "host-a")
        finally:
            await readiness.close()
        assert await read_readiness(gateway.js, gateway.names.models_kv) == []
    refusals = Refusals()
    raw_worker = await raw(server, Role.WORKER, refusals)
    try:
        await raw_worker.publish(f"$KV.{ns}_keys.k_forged", b'{"scopes":["admin"]}')
        await refusals.wait_for(f"$KV.{ns}_keys.k_forged")
    finally:
        await raw_worker.close()
