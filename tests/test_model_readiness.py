"""Model downloads never block start-up: a model function's prepare downloads what is not
cached, with per-model progress in the ``<ns>_models`` KV bucket and ``/api/status``, and
the function fetches no event until its models are on disk.

The downloads are real huggingface_hub downloads (``snapshot_download``, its HTTP client,
its cache) from a stand-in for the hub: a small aiohttp server in the hub's URL layout on
localhost. Nothing reaches the real hub.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiohttp import web
from openapi_spec_validator import OpenAPIV31SpecValidator

from bus import Call, Context, Emit, Event, Function, Spec
from bus.core.envelope import new_id, now_iso
from bus.gateway.app import build_app
from bus.models import progress
from bus.models.catalogue import PullError, ResolvedModel, cached_snapshot, resolve
from bus.models.progress import READINESS_TTL_S, ModelReadiness, read_readiness
from functions.caption.prepare import prepare
from tests.support.http import auth
from tests.support.streams import eventually, settled

pytestmark = [pytest.mark.nats, pytest.mark.s3]

COMMIT = "c0ffee" + "0" * 34
CHUNK = 64 * 1024  # huggingface_hub reports progress once per chunk read


@dataclass
class FakeHub:
    """The part of the Hugging Face hub ``snapshot_download`` talks to: a repository's
    info at a revision, its file tree, and each file (HEAD for metadata, GET for bytes).

    ``gate``: a file whose GET sends half its bytes, then waits for the event.
    """

    endpoint: str = ""
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    gate: tuple[str, asyncio.Event] | None = None
    aborted: asyncio.Event = field(default_factory=asyncio.Event)  # a client hung up
    requests: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self._info)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}", self._tree)
        app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{file}", self._file)
        return app

    def _files(self, request: web.Request) -> dict[str, bytes]:
        self.requests += 1
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if repo not in self.repos:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"})
        return self.repos[repo]

    async def _info(self, request: web.Request) -> web.Response:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        files = self._files(request)
        siblings = [{"rfilename": name} for name in files]
        return web.json_response({"id": repo, "sha": COMMIT, "siblings": siblings})

    async def _tree(self, request: web.Request) -> web.Response:
        files = self._files(request)
        return web.json_response(
            [
                {"type": "file", "path": name, "size": len(data), "oid": _sha1(data)}
                for name, data in files.items()
            ]
        )

    async def _file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["file"]
        data = self._files(request).get(name)
        if data is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"})
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_sha1(data)}"'}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(data))})
        start = request.http_range.start or 0
        response = web.StreamResponse(status=206 if start else 200, headers=headers)
        response.content_length = len(data) - start
        await response.prepare(request)
        try:
            if self.gate is not None and self.gate[0] == name:
                half = len(data) // 2
                if start < half:
                    await response.write(data[start:half])
                    start = half
                await self.gate[1].wait()
            for at in range(start, len(data), CHUNK):
                await response.write(data[at : at + CHUNK])
                await asyncio.sleep(0)  # the client reads (or hangs up) between chunks
        except (ConnectionError, asyncio.CancelledError):  # how aiohttp says "hung up"
            self.aborted.set()
            raise
        await response.write_eof()
        return response


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@pytest.fixture
async def hub(
    aiohttp_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[FakeHub]:
    """The stand-in hub, with huggingface_hub pointed at it and a cache of the test's own."""
    import huggingface_hub.constants as hf

    fake = FakeHub()
    server = await aiohttp_server(fake.app())
    fake.endpoint = str(server.make_url("")).rstrip("/")
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "ENDPOINT", fake.endpoint)
    monkeypatch.setattr(
        hf,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        fake.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    yield fake
    if fake.gate is not None:
        fake.gate[1].set()  # a failed test must not leave a download hanging


def tiny_repo() -> dict[str, bytes]:
    """A model repository's shape: a config, a tokenizer file and 1 MiB of weights."""
    return {
        "config.json": b'{"model_type": "vit"}',
        "tokenizer.json": b'{"version": "1.0"}',
        "model.safetensors": os.urandom(1 << 20),
    }


def hub_model(ctx: Context, repo: str) -> ResolvedModel:
    """What the catalogue resolves for a hub model that is reachable but not cached."""
    entry = ctx.settings.models.caption
    return ResolvedModel("caption", repo, "main", repo, False, False, "transformers", entry)


@dataclass
class Models:
    resolved: dict[str, ResolvedModel]


@dataclass
class State:
    """What prepare reads and writes of the caption function's state."""

    models: Models
    readiness: ModelReadiness | None = None


async def model_status(client: Any, key: str) -> dict[str, dict[str, Any]]:
    """``/api/status``'s models section: each task's document, by task."""
    response = await client.get("/api/status", headers=auth(key))
    assert response.status == 200, await response.text()
    return {m["task"]: m for m in (await response.json())["models"]}


async def check_against_the_api_document(client: Any, key: str) -> None:
    """The OpenAPI document is still valid, and ``/api/status`` answers as it says."""
    doc = await (await client.get("/api/openapi.json", headers=auth(key))).json()
    OpenAPIV31SpecValidator(doc).validate()
    reply = doc["paths"]["/api/status"]["get"]["responses"]["200"]
    schema = reply["content"]["application/json"]["schema"]
    status = await (await client.get("/api/status", headers=auth(key))).json()
    jsonschema.Draft202012Validator({**schema, "components": doc["components"]}).validate(status)


async def test_a_function_fetches_nothing_while_its_models_download_and_status_shows_it(
    ctx: Context,
    run_function: Any,
    aiohttp_client: Any,
    make_key: Any,
    hub: FakeHub,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "darkroom.models")
    repo = "darkroom-test/tiny-vlm"
    files = tiny_repo()
    hub.repos[repo] = files
    release = asyncio.Event()
    hub.gate = ("model.safetensors", release)
    total = sum(len(data) for data in files.values())
    halfway = total - len(files["model.safetensors"]) // 2
    vlm = hub_model(ctx, repo)
    nsfw = resolve(ctx.settings, "nsfw")  # the packaged open_nsfw weights: cached
    state = State(Models({"caption": vlm, "nsfw": nsfw}))
    handled: list[str] = []

    async def setup(c: Context) -> State:
        return state

    async def handle(event: Event, c: Context, call: Call) -> list[Emit]:
        handled.append(event.id)
        return []

    spec = Spec("readying", listens=("pictures",))
    fn = Function(spec, handle=handle, setup=setup, prepare=prepare)
    event = Event(id=new_id(), type="pictures", source="test", time=now_iso())
    await ctx.js.publish(ctx.names.subject("pictures"), event.encode())
    client = await aiohttp_client(build_app(ctx))
    key = await make_key("read")
    try:
        runner = await run_function(fn)  # returns at once: the download runs meanwhile

        async def halfway_there() -> dict[str, Any] | None:
            workers = (await model_status(client, key))["caption"]["workers"]
            if workers and workers[0]["bytes_done"] == halfway:
                return dict(workers[0])
            return None

        seen = await eventually(halfway_there, timeout=30, what="the download halfway")
        assert seen["state"] == "downloading" and seen["source"] == repo
        assert seen["bytes_total"] == total and 0.45 < seen["progress"] < 0.55
        assert seen["demo"] is False and seen["pid"] == os.getpid() and seen["error"] is None
        assert seen["function"] == "caption" and seen["worker"] == "test"
        status = await model_status(client, key)
        assert status["caption"]["ready"] is False
        assert status["nsfw"]["ready"] is True
        assert [w["state"] for w in status["nsfw"]["workers"]] == ["cached"]
        assert status["tags"] == {
            "task": "tags",
            "configured": ctx.settings.models.tags.source,
            "ready": False,
            "workers": [],
        }
        # The event waits in the stream, not in this process: nothing fetched, none acked.
        info = await ctx.js.consumer_info(ctx.names.stream, ctx.names.durable("readying"))
        assert (info.num_pending, info.num_ack_pending) == (1, 0)
        assert not runner.ready.is_set() and handled == []
        await check_against_the_api_document(client, key)
    finally:
        release.set()
    await asyncio.wait_for(runner.ready.wait(), 30)
    await settled(ctx, "readying")
    assert handled == [event.id]
    done = (await model_status(client, key))["caption"]
    assert done["ready"] is True
    [worker] = done["workers"]
    assert (worker["state"], worker["bytes_done"], worker["bytes_total"]) == ("ready", total, total)
    assert worker["progress"] == 1.0
    # Loading goes to the files on disk: no second download, no network under a lease.
    on_disk = vlm.on_disk()
    assert on_disk.cached and Path(on_disk.location, "model.safetensors").is_file()
    assert "revision" not in on_disk.pretrained_kwargs()
    logged = [r.getMessage() for r in caplog.records]
    assert f"caption: downloading {repo}@main for caption" in logged
    assert any(f"downloading {repo}@main: 50% (" in line for line in logged), logged
    assert any(line.startswith(f"caption: downloaded {repo}@main (1.05 MB)") for line in logged)
    assert state.readiness is not None
    await state.readiness.close()  # what the caption function's teardown does
    assert (await model_status(client, key))["caption"]["workers"] == []


async def test_one_download_per_source_and_a_failure_is_reported_then_raised(
    ctx: Context, hub: FakeHub
) -> None:
    """tags and embed share one model: downloaded once. A repository the hub does not
    have fails with the reason, in the exception and in the entry; the rest still lands."""
    shared = "darkroom-test/tiny-siglip"
    hub.repos[shared] = tiny_repo()
    entry = ctx.settings.models.tags
    models = [
        ResolvedModel("tags", shared, "main", shared, False, False, "transformers", entry),
        ResolvedModel("embed", shared, "main", shared, False, False, "transformers", entry),
        hub_model(ctx, "darkroom-test/missing"),
    ]
    readiness = await ModelReadiness.open(
        ctx.js, ctx.names.models_kv, "caption", "host-a", "worker-caption"
    )
    try:
        with pytest.raises(PullError, match="hub has no model 'darkroom-test/missing'"):
            await readiness.prepare(models)
        entries = {e["task"]: e for e in await read_readiness(ctx.js, ctx.names.models_kv)}
        assert entries["caption"]["state"] == "failed"
        assert "hub has no model 'darkroom-test/missing'" in entries["caption"]["error"]
        assert entries["tags"]["state"] == entries["embed"]["state"] == "ready"
        assert cached_snapshot(shared, "main") is not None
        # Tried again (as the runner does), what landed is not asked for again.
        asked = hub.requests
        await readiness.prepare(models[:2])
        assert hub.requests == asked
        assert [e.state for e in readiness.entries.values()] == ["cached", "cached", "failed"]
    finally:
        await readiness.close()
    assert await read_readiness(ctx.js, ctx.names.models_kv) == []


async def test_entries_live_while_the_worker_does_and_lapse_after_it(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's bucket has the TTL; a live worker rewrites its entries within it."""
    kv = await ctx.js.key_value(ctx.names.models_kv)
    assert (await kv.status()).ttl == READINESS_TTL_S
    assert progress.HEARTBEAT_S * 2 < READINESS_TTL_S
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.05)
    readiness = await ModelReadiness.open(ctx.js, ctx.names.models_kv, "caption", "h", "w")
    try:
        await readiness.prepare([resolve(ctx.settings, "nsfw")])
        [entry] = readiness.entries.values()
        first = (await kv.get(entry.key)).revision
        assert first is not None

        async def rewritten() -> bool:
            revision = (await kv.get(entry.key)).revision
            return revision is not None and revision > first

        await eventually(rewritten, timeout=10, what="the heartbeat rewrites the entry")
    finally:
        await readiness.close()
    assert await read_readiness(ctx.js, ctx.names.models_kv) == []


async def test_a_download_stops_when_preparing_is_cancelled(ctx: Context, hub: FakeHub) -> None:
    """A worker stopping mid-download hangs up instead of fetching the rest in a thread
    nobody waits for (which would also hold up the interpreter's exit)."""
    repo = "darkroom-test/big"
    # More than the socket buffers hold, so the server sees the client hang up.
    hub.repos[repo] = {**tiny_repo(), "model.safetensors": os.urandom(64 << 20)}
    release = asyncio.Event()
    hub.gate = ("model.safetensors", release)
    readiness = await ModelReadiness.open(ctx.js, ctx.names.models_kv, "caption", "h", "w")
    try:
        preparing = asyncio.create_task(readiness.prepare([hub_model(ctx, repo)]))

        async def downloading() -> bool:
            entry = readiness.entries.get("caption")
            return entry is not None and entry.bytes_done > 0

        await eventually(downloading, timeout=30, what="the download under way")
        preparing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await preparing
        release.set()  # the server sends the rest: the download thread hangs up instead
        await asyncio.wait_for(hub.aborted.wait(), 30)
        assert cached_snapshot(repo, "main") is None
    finally:
        await readiness.close()
