"""The generation models over HTTP: the catalogue with who holds what (``GET /api/models``),
and loading and unloading a model on the workers (admin), with the real generate function
on tiny pipelines, the real lease ledger and the real bus.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

from bus import Context, Model, Placement
from bus.core import subjects
from bus.core.settings import SCHEDULERS, NatsSettings, Settings
from bus.gateway import app as gateway_app
from bus.gateway import models_api
from bus.gpu.leases import read_devices
from bus.infra.nats_auth import Role
from bus.models.catalogue import ResolvedModel
from bus.models.switching import lease_model
from bus.ops.embedded import NatsCredentials, NatsServer
from bus.ops.stack import NATS_CREDENTIALS_FILE
from bus.runtime.context import open_context
from bus.runtime.registry import load
from bus.runtime.runner import FunctionRunner
from bus.state.keys import create_key
from functions.generate.admin import UnloadSubject
from functions.generate.pipelines import model_for
from tests import test_generate
from tests.support.http import auth
from tests.support.streams import events, eventually

pytestmark = [pytest.mark.nats, pytest.mark.s3]

Api = TestClient[Any, Any]
# The catalogue of two tiny pipelines, tiny-sd (the default) and tiny-sdxl, as test_generate's.
tiny_pipelines = test_generate.tiny_pipelines
settings = test_generate.settings


async def start_generate(run_function: Any) -> Any:
    """The generate function, once prepared: serving its services, its model on disk."""
    runner = await run_function(load("generate"))
    await asyncio.wait_for(runner.ready.wait(), 60)
    return runner


@pytest.fixture
def with_routes() -> None:
    """The gateway's route table has these routes (kept as a fixture name for the tests)."""


@pytest.fixture
async def api(ctx: Context, aiohttp_client: Any, with_routes: None) -> Api:
    client: Api = await aiohttp_client(gateway_app.build_app(ctx))
    return client


@pytest.fixture
async def reader(make_key: Callable[..., Awaitable[str]]) -> str:
    return await make_key("read", "generate")


async def leased(ctx: Context, name: str) -> list[dict[str, Any]]:
    """The ledger's leases of catalogue model ``name``, each with its device."""
    devices = await read_devices(ctx.js, ctx.names.leases_kv)
    return [
        {**lease, "device": d["device"]}
        for d in devices
        for lease in d["leases"]
        if lease["model"] == lease_model(name)
    ]


async def catalogue(api: Api, key: str) -> dict[str, Any]:
    got = await api.get("/api/models", headers=auth(key))
    assert got.status == 200, await got.text()
    doc: dict[str, Any] = await got.json()
    return {m["name"]: m for m in doc["models"]} | {"": doc}


async def test_the_catalogue_shows_every_model_and_the_worker_holding_one_after_a_job(
    ctx: Context, api: Api, run_function: Any, reader: str
) -> None:
    await start_generate(run_function)
    models = await catalogue(api, reader)
    doc = models.pop("")
    assert doc["schedulers"] == list(SCHEDULERS)
    assert doc["default_model"] == "tiny-sd"
    assert set(models) == set(ctx.settings.generate.catalogue)
    sd = models["tiny-sd"]
    assert sd["default"] and not models["tiny-sdxl"]["default"]
    assert sd["added"] and not models["sd-turbo"]["added"]
    assert sd["defaults"] == {
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance": 0.0,
        "scheduler": None,
    }
    assert models["sd-turbo"]["licence"] and models["sd-turbo"]["description"]
    assert sd["demo"] is False  # added in the settings: never replaced by a demo
    assert sd["holders"] == []
    # The worker prepared its default model: on its disk, reported as cached.
    [disk] = sd["workers"]
    assert (disk["state"], disk["demo"], disk["worker"]) == ("cached", False, "test")

    submitted = await api.post("/api/generations", json={"prompt": "a fox"}, headers=auth(reader))
    assert submitted.status == 202, await submitted.text()
    await events(ctx, subjects.GENERATED, at_least=1, timeout=120)
    [holder] = (await catalogue(api, reader))["tiny-sd"]["holders"]
    [lease] = await leased(ctx, "tiny-sd")
    assert holder["worker"] == "test" and holder["device"] == "cpu"
    assert (holder["host"], holder["pid"], holder["mb"]) == (
        lease["holder"]["host"],
        lease["holder"]["pid"],
        lease["mb"],
    )
    assert holder["since"].endswith("Z")


async def test_load_makes_a_worker_hold_the_model_and_unload_frees_it(
    ctx: Context, api: Api, run_function: Any, admin: str, reader: str
) -> None:
    await start_generate(run_function)
    assert await leased(ctx, "tiny-sdxl") == []

    loaded = await api.post("/api/models/tiny-sdxl/load", headers=auth(admin))
    assert loaded.status == 200, await loaded.text()
    answer = await loaded.json()
    [lease] = await leased(ctx, "tiny-sdxl")
    [worker] = answer["workers"]
    assert (answer["model"], answer["action"], worker["outcome"]) == (
        "tiny-sdxl",
        "loaded",
        "loaded",
    )
    assert (worker["host"], worker["pid"], worker["mb"]) == (
        lease["holder"]["host"],
        lease["holder"]["pid"],
        lease["mb"],
    )
    sdxl = (await catalogue(api, reader))["tiny-sdxl"]
    assert [h["pid"] for h in sdxl["holders"]] == [worker["pid"]]
    assert [w["state"] for w in sdxl["workers"]] == ["cached"]  # reported when it loaded
    # Loading what is held already changes nothing.
    again = await api.post("/api/models/tiny-sdxl/load", headers=auth(admin))
    assert (again.status, (await again.json())["action"]) == (200, "held")
    assert [x["id"] for x in await leased(ctx, "tiny-sdxl")] == [lease["id"]]

    unloaded = await api.post("/api/models/tiny-sdxl/unload", headers=auth(admin))
    assert unloaded.status == 200, await unloaded.text()
    answer = await unloaded.json()
    assert answer["action"] == "unloaded"
    assert [w["outcome"] for w in answer["workers"]] == ["unloaded"]
    assert await leased(ctx, "tiny-sdxl") == []
    assert ctx.gpu is not None and lease_model("tiny-sdxl") not in ctx.gpu.loaded
    # Nobody holds it now: nothing to do.
    again = await api.post("/api/models/tiny-sdxl/unload", headers=auth(admin))
    assert (again.status, await again.json()) == (
        200,
        {"model": "tiny-sdxl", "action": "not_loaded", "workers": []},
    )


async def test_unload_leaves_a_model_a_job_is_using_and_says_so(
    ctx: Context, api: Api, run_function: Any, admin: str
) -> None:
    runner = await start_generate(run_function)
    model, _ = await asyncio.to_thread(runner.state.model, "tiny-sd")
    assert ctx.gpu is not None
    async with ctx.gpu.use(model):  # as a running job does
        busy = await api.post("/api/models/tiny-sd/unload", headers=auth(admin))
        assert busy.status == 409, await busy.text()
        problem = await busy.json()
        assert "in use" in problem["detail"]
        [worker] = problem["workers"]
        assert worker["outcome"] == "busy"
        assert "in use by a running job" in worker["detail"]
        assert len(await leased(ctx, "tiny-sd")) == 1
    done = await api.post("/api/models/tiny-sd/unload", headers=auth(admin))
    assert done.status == 200
    assert await leased(ctx, "tiny-sd") == []


async def test_a_load_that_outlasts_the_wait_answers_202_and_goes_on(
    ctx: Context,
    api: Api,
    run_function: Any,
    admin: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()

    def held_back(name: str, resolved: ResolvedModel, settings: Settings) -> Model:
        model = model_for(name, resolved, settings)

        def load(placement: Placement) -> Any:
            release.wait(60)
            return model.load(placement)

        return Model(model.name, model.estimate_mb, load)

    monkeypatch.setattr("functions.generate.state.model_for", held_back)
    monkeypatch.setattr(models_api, "LOAD_WAIT_S", 0.2)
    await start_generate(run_function)
    try:
        loading = await api.post("/api/models/tiny-sdxl/load", headers=auth(admin))
        assert loading.status == 202, await loading.text()
        answer = await loading.json()
        assert answer["action"] == "loading"
        assert [w["outcome"] for w in answer["workers"]] == ["loading"]
    finally:
        release.set()
    assert ctx.gpu is not None
    await eventually(lambda: lease_model("tiny-sdxl") in ctx.gpu.loaded, 60, "the load ends")  # type: ignore[union-attr]
    assert len(await leased(ctx, "tiny-sdxl")) == 1


async def test_unknown_models_are_404_and_the_embedding_routes_are_not_model_names(
    api: Api, admin: str
) -> None:
    for path in ("nope/load", "nope/unload", "reembed/load", "embeddings/unload"):
        got = await api.post(f"/api/models/{path}", headers=auth(admin))
        assert got.status == 404, path
        assert got.content_type == "application/problem+json"
        assert "no model" in (await got.json())["detail"]
    coverage = await api.get("/api/models/embeddings", headers=auth(admin))
    assert coverage.status == 200
    assert "captioned" in await coverage.json()


async def test_without_a_generate_worker_load_is_503_and_so_is_unloading_from_a_silent_holder(
    ctx: Context, api: Api, admin: str
) -> None:
    got = await api.post("/api/models/tiny-sd/load", headers=auth(admin))
    assert got.status == 503
    assert got.headers["Retry-After"]
    assert "no generate worker" in (await got.json())["detail"]
    # A lease held by a process that answers no unload request (no generate function).
    assert ctx.gpu is not None
    await ctx.gpu.preload(Model(lease_model("tiny-sd"), 8, lambda placement: b"weights"))
    got = await api.post("/api/models/tiny-sd/unload", headers=auth(admin))
    assert got.status == 503
    assert got.headers["Retry-After"]
    [worker] = (await got.json())["workers"]
    assert worker["outcome"] == "unreachable" and worker["pid"] > 0
    assert len(await leased(ctx, "tiny-sd")) == 1  # nothing was dropped


async def test_switching_needs_the_admin_scope_and_listing_the_read_scope(
    api: Api, reader: str, make_key: Callable[..., Awaitable[str]]
) -> None:
    for action in ("load", "unload"):
        got = await api.post(f"/api/models/tiny-sd/{action}", headers=auth(reader))
        assert got.status == 403
        assert "'admin' scope" in (await got.json())["detail"]
    uploader = await make_key("upload")
    assert (await api.get("/api/models", headers=auth(uploader))).status == 403
    assert (await api.get("/api/models", headers=auth(reader))).status == 200


def test_the_models_routes_keep_the_gateway_free_of_torch() -> None:
    code = (
        "import sys\n"
        "from bus.gateway import app, models_api\n"
        "app.route_table(); models_api.routes()\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


# --- with the deployment's NATS roles: a worker may serve its own unload subject ----------


@pytest.fixture
async def auth_server(settings: Settings) -> AsyncIterator[NatsServer]:
    """A NATS server with darkroom's roles, for this test's namespace."""
    data = settings.data_dir
    data.mkdir(parents=True, exist_ok=True)
    creds = NatsCredentials.load_or_create(data / NATS_CREDENTIALS_FILE)
    server = NatsServer(data, port=0, credentials=creds, namespace=settings.namespace)
    await server.start()
    yield server
    await server.stop()


def as_role(settings: Settings, server: NatsServer, role: Role) -> Settings:
    assert server.credentials is not None
    seed = SecretStr(server.credentials.seed(role))
    return settings.model_copy(update={"nats": NatsSettings(url=server.url, nkey_seed=seed)})


async def test_a_worker_with_the_worker_role_loads_and_unloads_on_request(
    settings: Settings,
    auth_server: NatsServer,
    aiohttp_client: Any,
    with_routes: None,
) -> None:
    fn = load("generate")
    gateway_settings = as_role(settings, auth_server, Role.GATEWAY)
    worker_settings = as_role(settings, auth_server, Role.WORKER)
    async with open_context(gateway_settings, [], "gateway", database=True) as gateway:
        token, _ = await create_key(gateway.api_keys, "admin", ("admin",))
        async with open_context(
            worker_settings, [fn.spec], "worker-generate", role=Role.WORKER
        ) as worker:
            runner = FunctionRunner(fn, worker)
            await runner.start()
            try:
                await asyncio.wait_for(runner.ready.wait(), 60)
                api: Api = await aiohttp_client(gateway_app.build_app(gateway))
                loaded = await api.post("/api/models/tiny-sdxl/load", headers=auth(token))
                assert loaded.status == 200, await loaded.text()
                [lease] = await leased(gateway, "tiny-sdxl")
                assert lease["holder"]["worker"] == "worker-generate"
                unloaded = await api.post("/api/models/tiny-sdxl/unload", headers=auth(token))
                assert unloaded.status == 200, await unloaded.text()
                assert [w["outcome"] for w in (await unloaded.json())["workers"]] == ["unloaded"]
                assert await leased(gateway, "tiny-sdxl") == []
            finally:
                await runner.drain(10)


async def test_unload_reaches_each_holder_even_when_host_id_and_pid_repeat(
    ctx: Context, api: Api, admin: str
) -> None:
    """Compose replicas share a host id and often a pid (init: true): each holder still
    has its own unload subject, so an unload never answers for the wrong worker."""
    async with open_context(ctx.settings, [], "worker-b", gpu=True) as other:
        assert ctx.gpu is not None and other.gpu is not None
        a, b = ctx.gpu.ledger.holder, other.gpu.ledger.holder
        assert (a.host, a.pid) == (b.host, b.pid) and a.instance != b.instance
        subs = [await UnloadSubject.open(ctx), await UnloadSubject.open(other)]
        try:
            for holder in (ctx.gpu, other.gpu, ctx.gpu, other.gpu):
                await holder.preload(Model(lease_model("tiny-sd"), 8, lambda _: b"weights"))
                got = await api.post("/api/models/tiny-sd/unload", headers=auth(admin))
                assert got.status == 200, await got.text()
                assert [w["outcome"] for w in (await got.json())["workers"]] == ["unloaded"]
                assert await leased(ctx, "tiny-sd") == []
        finally:
            for sub in subs:
                await sub.close()
