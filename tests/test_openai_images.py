"""The OpenAI-compatible image routes, through the official ``openai`` client, against the
real gateway, bus, store and read model: ``/v1/images/generations`` and ``/v1/images/edits``
submit darkroom jobs and answer once they are done, as OpenAI does.

What generates is the generate function itself, with a tiny random SD pipeline built offline,
on the CPU "device"; notify keeps the job documents the gateway's waiters read.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import nats.js.errors
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from bus import Context, Event, subjects
from bus.core.generation import Job
from bus.core.settings import GenerateModel, GenerateSettings, Settings
from bus.gateway import openai_images
from bus.gateway.app import build_app
from bus.gateway.live import Live
from bus.gateway.problems import Problem
from bus.models.demo import build_tiny_sd
from bus.runtime.registry import load
from bus.runtime.runner import FunctionRunner
from bus.state.cancels import request_cancel
from tests.support.http import auth
from tests.support.images import png
from tests.support.streams import events

pytestmark = [pytest.mark.nats, pytest.mark.s3]

SIZE = 64  # the test catalogue's default size
Gateway = Callable[..., Awaitable[TestClient[Any, Any]]]
Starter = Callable[..., Awaitable[FunctionRunner]]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD pipeline, built once for the module."""
    path = tmp_path_factory.mktemp("pipelines") / "tiny-sd"
    build_tiny_sd(path)
    return path


@pytest.fixture
def settings(settings: Settings, tiny_sd: Path, tmp_path: Path) -> Settings:
    """A catalogue of the tiny pipeline (64 px, 2 steps) and one that cannot be loaded."""
    tiny = GenerateModel(source=str(tiny_sd), width=SIZE, height=SIZE, steps=2, vram_mb=64)
    broken = GenerateModel(source=str(tmp_path / "no-such-pipeline"), width=SIZE, height=SIZE)
    generate = GenerateSettings(
        default_model="tiny-sd", cpu_model="tiny-sd", models={"tiny-sd": tiny, "broken": broken}
    )
    return settings.model_copy(update={"generate": generate})


# --- what generates ------------------------------------------------------------------------


@pytest.fixture
async def notify(run_function: Starter) -> FunctionRunner:
    """Job documents in the read model: what the waiters read."""
    return await run_function(load("notify"))


@pytest.fixture
def start_generator(run_function: Starter) -> Callable[[], Awaitable[FunctionRunner]]:
    """Starts the generate function (on the CPU "device", with the tiny pipeline)."""

    async def start() -> FunctionRunner:
        return await run_function(load("generate"))

    return start


@pytest.fixture
async def generator(
    notify: FunctionRunner, start_generator: Callable[[], Awaitable[FunctionRunner]]
) -> FunctionRunner:
    return await start_generator()


# --- the gateway and the client ------------------------------------------------------------


@pytest.fixture
def gateway(ctx: Context, aiohttp_client: Any) -> Gateway:
    """Factory: the gateway in-process, waiting at most ``wait_s`` for a job."""

    async def make(wait_s: float | None = None) -> TestClient[Any, Any]:
        app = build_app(ctx)
        if wait_s is not None:
            app[openai_images.WAIT] = wait_s
        client: TestClient[Any, Any] = await aiohttp_client(app)
        return client

    return make


@pytest.fixture
async def client(gateway: Gateway) -> TestClient[Any, Any]:
    return await gateway()


@pytest.fixture
async def key(make_key: Callable[..., Awaitable[str]]) -> str:
    return await make_key("generate")


def official(client: TestClient[Any, Any], key: str, retries: int = 0) -> openai.AsyncOpenAI:
    """The official client, pointed at the gateway, retrying nothing unless told."""
    url = str(client.make_url("/v1"))
    return openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=retries)


RETRYING = 2  # the client's default: it asks again after a 409 or a 5xx, unless told not to


@pytest.fixture
async def oai(client: TestClient[Any, Any], key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with official(client, key) as api:
        yield api


def decoded(b64: str | None) -> Image.Image:
    assert b64 is not None
    return Image.open(io.BytesIO(base64.b64decode(b64)))


async def requested(ctx: Context, at_least: int = 0) -> list[Event]:
    """Every job that reached the queue."""
    return await events(ctx, subjects.REQUESTED, at_least=at_least, timeout=30)


# --- answers -------------------------------------------------------------------------------


async def test_base64_and_url_answers_hold_the_png(
    oai: openai.AsyncOpenAI, generator: FunctionRunner, ctx: Context
) -> None:
    inline = await oai.images.generate(prompt="a lighthouse", size="64x64", model="tiny-sd")
    assert inline.output_format == "png" and inline.created <= time.time()
    [image] = inline.data or []
    assert image.url is None
    with decoded(image.b64_json) as png_image:
        assert png_image.format == "PNG" and png_image.size == (64, 64)
    linked = await oai.images.generate(prompt="a lighthouse", size="96x64", response_format="url")
    [image] = linked.data or []
    assert image.b64_json is None and image.url is not None
    assert "X-Amz-Expires=3600" in image.url  # valid for an hour
    async with aiohttp.ClientSession() as http, http.get(image.url) as fetched:
        assert fetched.status == 200
        with Image.open(io.BytesIO(await fetched.read())) as png_image:
            assert png_image.format == "PNG" and png_image.size == (96, 64)
    # Each went through the queue as a darkroom job, from OpenAI's side.
    jobs = [Job.from_doc(e.data, ctx.settings.generate) for e in await requested(ctx, 2)]
    assert {j.source for j in jobs} == {"openai"}
    assert [j.extra for j in jobs] == [{}, {"response_format": "url"}]


async def test_several_images_the_default_size_and_openai_model_names(
    oai: openai.AsyncOpenAI, generator: FunctionRunner, ctx: Context
) -> None:
    two = await oai.images.generate(prompt="two foxes", n=2, model="dall-e-3", size="auto")
    assert len(two.data or []) == 2
    pngs = [base64.b64decode(i.b64_json or "") for i in two.data or []]
    assert pngs[0] != pngs[1], "each image has its own seed"
    for data in pngs:
        with Image.open(io.BytesIO(data)) as png_image:
            assert png_image.size == (SIZE, SIZE)  # the default model's own size
    [event] = await requested(ctx, 1)
    job = Job.from_doc(event.data, ctx.settings.generate)
    assert job.model is None and job.n == 2, "an OpenAI name means the default model"
    assert job.extra == {} and job.mode == "txt2img"


async def test_an_edit_starts_from_the_uploaded_image(
    oai: openai.AsyncOpenAI, generator: FunctionRunner, ctx: Context
) -> None:
    photo = png(96, 64, (10, 200, 30, 255))
    edited = await oai.images.edit(
        image=("photo.png", photo, "image/png"),
        prompt="the same, at night",
        size="64x64",
        response_format="b64_json",
        stream=False,  # a form field "false"
    )
    [image] = edited.data or []
    with decoded(image.b64_json) as png_image:
        assert png_image.size == (64, 64)
    [event] = await requested(ctx, 1)
    job = Job.from_doc(event.data, ctx.settings.generate)
    assert job.mode == "img2img" and job.strength is not None
    assert job.init is not None and job.init.image_id is None
    assert job.init.key == subjects.request_image_key(job.id, "png")
    assert await ctx.store.get_bytes(job.init.key) == photo
    # A list of one image (sent as image[]) is the same.
    again = await oai.images.edit(
        image=[("photo.png", photo, "image/png")], prompt="at dawn", n=2, user="tester"
    )
    assert len(again.data or []) == 2
    second = Job.from_doc((await requested(ctx, 2))[1].data, ctx.settings.generate)
    assert second.n == 2 and second.extra == {"user": "tester"}


# --- refusals ------------------------------------------------------------------------------


async def test_bad_requests_are_refused_before_the_queue(
    oai: openai.AsyncOpenAI, notify: FunctionRunner, ctx: Context
) -> None:
    refusals: list[tuple[dict[str, Any], type[openai.APIStatusError], str | None, str]] = [
        ({"size": "big"}, openai.BadRequestError, "size", "WIDTHxHEIGHT"),
        ({"size": "1001x1000"}, openai.BadRequestError, "size", "multiple of 8, got 1001"),
        ({"size": "8192x8192"}, openai.BadRequestError, "size", "between 64 and 2048"),
        ({"n": 9}, openai.BadRequestError, "n", "n must be between 1 and 4, got 9"),
        ({"n": 0}, openai.BadRequestError, "n", "n must be"),
        ({"model": "stable-diffusion-9"}, openai.NotFoundError, "model", "tiny-sd"),
        ({"prompt": "  "}, openai.BadRequestError, "prompt", "must not be blank"),
        ({"background": "transparent"}, openai.BadRequestError, "background", "opaque"),
        ({"output_format": "webp"}, openai.BadRequestError, "output_format", "png"),
        ({"stream": True}, openai.BadRequestError, "stream", "unstreamed"),
    ]
    for change, error, param, words in refusals:
        asked = {"prompt": "a lighthouse", **change}
        with pytest.raises(error) as refused:
            await oai.images.generate(**asked)
        assert refused.value.param == param, (change, refused.value.message)
        assert words in refused.value.message, (change, refused.value.message)
        assert refused.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as unknown:
        await oai.images.generate(prompt="a lighthouse", model="stable-diffusion-9")
    assert unknown.value.code == "model_not_found"
    assert await requested(ctx) == [], "no refused request reached the queue"


async def test_an_edit_with_a_mask_or_without_an_image_is_refused(
    oai: openai.AsyncOpenAI, notify: FunctionRunner, ctx: Context
) -> None:
    photo = png(64, 64)
    with pytest.raises(openai.BadRequestError) as masked:
        await oai.images.edit(
            image=("p.png", photo, "image/png"), mask=("m.png", photo), prompt="x"
        )
    assert masked.value.param == "mask" and masked.value.code == "unsupported_value"
    assert "inpaint" in masked.value.message
    for body in (b"not an image at all", png(64, 64)[:60]):
        with pytest.raises(openai.BadRequestError) as corrupt:
            await oai.images.edit(image=("p.png", body, "image/png"), prompt="x")
        assert corrupt.value.code == "invalid_image" and corrupt.value.param == "image"
    two = [("a.png", photo, "image/png"), ("b.png", photo, "image/png")]
    with pytest.raises(openai.BadRequestError) as several:
        await oai.images.edit(image=two, prompt="x")
    assert "one image" in several.value.message
    with pytest.raises(openai.BadRequestError) as bad_size:
        await oai.images.edit(image=("p.png", photo, "image/png"), prompt="x", size="1001x64")
    assert bad_size.value.param == "size"
    assert await requested(ctx) == [], "no refused request reached the queue"
    assert await ctx.store.list_keys("requests/") == [], "nor left its image behind"


async def test_other_refusals_are_openai_error_objects(
    client: TestClient[Any, Any], key: str, make_key: Callable[..., Awaitable[str]]
) -> None:
    reader = await make_key("read")
    body = {"prompt": "a lighthouse"}
    for token, status in ((reader, 403), ("drk_aaaaaaaaaaaa_" + "x" * 40, 401)):
        response = await client.post("/v1/images/generations", json=body, headers=auth(token))
        assert response.status == status and "error" in await response.json()
    cases = [
        (b"{", "application/json", 400, "not JSON"),
        (b'{"prompt": "x", "steps": 4}', "application/json", 400, "steps is not a field"),
        (b'{"prompt": "x", "n": "2"}', "application/json", 400, "n must be an integer"),
        (b'{"prompt": "x", "stream": 0}', "application/json", 400, "stream must be true or false"),
        (b"prompt=x", "application/x-www-form-urlencoded", 415, "application/json"),
    ]
    for data, kind, status, words in cases:
        response = await client.post(
            "/v1/images/generations", data=data, headers={**auth(key), "Content-Type": kind}
        )
        assert response.status == status
        error = (await response.json())["error"]
        assert words in error["message"], error
    response = await client.post("/v1/images/edits", json=body, headers=auth(key))
    assert response.status == 415
    assert "multipart/form-data" in (await response.json())["error"]["message"]


# --- jobs that do not end well -------------------------------------------------------------
# Each answer tells the client not to ask again: that would only queue the same job anew.


async def test_a_failed_job_answers_why(
    client: TestClient[Any, Any], key: str, generator: FunctionRunner, ctx: Context
) -> None:
    async with official(client, key, RETRYING) as api:
        with pytest.raises(openai.InternalServerError) as failed:
            await api.images.generate(prompt="a lighthouse", model="broken")
    [event] = await requested(ctx, 1)
    assert failed.value.status_code == 500 and failed.value.code == "generation_failed"
    assert failed.value.response.headers["x-should-retry"] == "false"
    message = failed.value.message
    assert f"generation {event.job_id} failed: " in message and "no-such-pipeline" in message


async def test_a_job_past_the_wait_answers_504_naming_it(
    gateway: Gateway, key: str, notify: FunctionRunner, ctx: Context
) -> None:
    client = await gateway(wait_s=0.5)  # and nothing generates
    async with official(client, key, RETRYING) as api:
        with pytest.raises(openai.InternalServerError) as late:
            await api.images.generate(prompt="a lighthouse")
    assert late.value.status_code == 504 and late.value.code == "timeout"
    [event] = await requested(ctx, 1)
    assert f"/api/generations/{event.job_id}" in late.value.message


async def test_a_cancelled_job_answers_why(
    client: TestClient[Any, Any],
    key: str,
    notify: FunctionRunner,
    start_generator: Callable[[], Awaitable[FunctionRunner]],
    ctx: Context,
) -> None:
    """Cancelled while queued: the generate function skips it, and the answer says so."""
    async with official(client, key, RETRYING) as api:
        answer = asyncio.create_task(api.images.generate(prompt="a lighthouse"))
        [event] = await requested(ctx, 1)
        assert event.job_id is not None
        await request_cancel(ctx.cancels_kv, event.job_id, "changed my mind")
        await start_generator()
        with pytest.raises(openai.ConflictError) as cancelled:
            await answer
    assert cancelled.value.code == "cancelled"
    assert f"generation {event.job_id} was cancelled: changed my mind" in cancelled.value.message
    assert len(await requested(ctx, 1)) == 1


@pytest.fixture
async def cancelling(ctx: Context) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """Factory: the gateway on aiohttp's own test server, which cancels a handler when its
    client hangs up (the conftest's factories serve it as ``darkroom up`` does); its URL."""
    servers: list[TestServer] = []

    async def start() -> str:
        server = TestServer(build_app(ctx))
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


@pytest.mark.parametrize("server", ["darkroom", "aiohttp-test"])
async def test_a_client_that_hangs_up_cancels_its_job(
    server: str,
    cancelling: Callable[[], Awaitable[str]],
    gateway: Gateway,
    key: str,
    notify: FunctionRunner,
    ctx: Context,
) -> None:
    """Whether the server lets the handler run on (the gateway's) or cancels it (aiohttp's
    test server)."""
    if server == "darkroom":
        base = str((await gateway()).make_url("")).rstrip("/")
    else:
        base = await cancelling()
    async with aiohttp.ClientSession() as http:
        asked = http.post(
            f"{base}/v1/images/generations", json={"prompt": "a lighthouse"}, headers=auth(key)
        )
        answer = asyncio.ensure_future(asked)
        [event] = await requested(ctx, 1)
        assert event.job_id is not None
        answer.cancel()  # the client closes its connection
    deadline = time.monotonic() + 10
    while True:
        try:
            flag = await ctx.cancels_kv.get(event.job_id)
            break
        except nats.js.errors.KeyNotFoundError:
            assert time.monotonic() < deadline, "the job was never cancelled"
            await asyncio.sleep(0.05)
    assert flag.value is not None and b"hung up" in flag.value


async def test_an_error_after_the_job_is_queued_is_never_retried_into_a_second_job(
    gateway: Gateway, key: str, ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client retries a plain 503 by default: each retry would queue the job again."""

    async def hiccup(self: Live, job_id: str, timeout: float) -> Any:
        raise Problem(503, "Service Unavailable", "the read model did not answer")

    monkeypatch.setattr(Live, "wait", hiccup)
    client = await gateway()
    async with official(client, key, retries=2) as api:  # the client's default
        with pytest.raises(openai.InternalServerError) as failed:
            await api.images.generate(prompt="a lighthouse")
    assert failed.value.response.headers["x-should-retry"] == "false"
    [job] = await requested(ctx, 1)  # everything stored is read: one job, not three
    assert f"follow it at /api/generations/{job.job_id}" in failed.value.message


async def test_who_asks_is_bounded_before_anything_is_stored(
    gateway: Gateway, key: str, ctx: Context
) -> None:
    client = await gateway(wait_s=0.5)
    body = b'{"prompt": "x", "user": "' + b"u" * 1_000_000 + b'"}'
    got = await client.post(
        "/v1/images/generations",
        data=body,
        headers={**auth(key), "Content-Type": "application/json"},
    )
    assert got.status == 400, await got.text()
    assert (await got.json())["error"]["param"] == "user"
    assert await requested(ctx) == []
