"""The OpenAI-compatible vision endpoint, through the official ``openai`` client, against the
real gateway and a real caption worker: the caption function's ``chat`` service
(functions/caption/chat.py) running the demo profile's tiny random VLM under a VRAM lease,
on the CPU "device", in a worker context of its own on the real bus.

The demo model's words are random, but greedy decoding is deterministic: the same request
gets the same answer, streamed or not, whichever way its image came in.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.msg import Msg
from PIL import Image

from bus import Call, Context, Emit, Event, Function, Reject, Spec, subjects
from bus.core.envelope import ObjectRef, now_iso
from bus.core.settings import FetchSettings, IngestSettings, Settings
from bus.gateway.app import build_app
from bus.gateway.openai_api import CHAT_SERVICE, CHAT_TIMEOUTS, ChatTimeouts, _shrunk
from bus.images.check import Limits
from bus.runtime import services
from bus.runtime.context import open_context
from bus.runtime.runner import FunctionRunner
from functions.caption import state as caption_state
from functions.caption.chat import DEMO_MODEL_ID, MAX_TOKENS, serve_chat
from tests.support.http import auth
from tests.support.images import jpeg, png

pytestmark = [pytest.mark.nats, pytest.mark.s3]

LOOPBACK = ("127.0.0.0/8", "::1/128")  # localhost may resolve to either
PHOTO = png(48, 40, (200, 120, 30, 255))
OTHER = png(40, 48, (20, 40, 220, 255))
Gateway = Callable[..., Awaitable[TestClient[Any, Any]]]


async def _no_events(event: Event, ctx: Context, call: Call) -> list[Emit]:
    raise Reject("this test function only serves chat")


# The caption function's chat service as the caption worker runs it: its state, its Spec's
# GPU lease, its service; no events.
CHAT_WORKER = Function(
    Spec(name="chatwork", listens=("chatnever",), needs_gpu=True),
    handle=_no_events,
    setup=caption_state.setup,
    services={CHAT_SERVICE: serve_chat},
)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for the module, so the demo models are built once."""
    return tmp_path_factory.mktemp("chat-data")


@pytest.fixture
def settings(settings: Settings, models_dir: Path) -> Settings:
    """Demo models; a 1 MiB image limit; URL fetching on, for localhost only."""
    fetch = FetchSettings(enabled=True, allow_hosts=("localhost",), allow_networks=LOOPBACK)
    ingest = IngestSettings(max_upload_mb=1, fetch=fetch)
    return settings.model_copy(update={"profile": "demo", "data_dir": models_dir, "ingest": ingest})


@pytest.fixture
async def worker(ctx: Context, settings: Settings) -> AsyncIterator[FunctionRunner]:
    """A caption worker serving chat, with its own connection and VRAM leases."""
    async with open_context(settings, [CHAT_WORKER.spec], "chat-worker") as worker_ctx:
        runner = FunctionRunner(CHAT_WORKER, worker_ctx)
        await runner.start()
        await runner.ready.wait()
        # Ready means subscribed; the server knows once it has read the subscription.
        await worker_ctx.nc.flush()
        yield runner
        await runner.drain(timeout=5)


@pytest.fixture
def gateway(ctx: Context, aiohttp_client: Any) -> Gateway:
    """Factory: the gateway in-process, with other settings (``ingest``) and timeouts."""

    async def make(timeouts: ChatTimeouts | None = None, **changes: Any) -> TestClient[Any, Any]:
        settings = ctx.settings.model_copy(update=changes)
        app = build_app(dataclasses.replace(ctx, settings=settings))
        if timeouts is not None:
            app[CHAT_TIMEOUTS] = timeouts
        client: TestClient[Any, Any] = await aiohttp_client(app)
        return client

    return make


@pytest.fixture
async def reader(make_key: Callable[..., Awaitable[str]]) -> str:
    return await make_key("read")


@pytest.fixture
async def client(gateway: Gateway) -> TestClient[Any, Any]:
    return await gateway()


@pytest.fixture
async def oai(client: TestClient[Any, Any], reader: str) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official client, pointed at the gateway, retrying nothing."""
    async with openai.AsyncOpenAI(
        base_url=str(client.make_url("/v1")), api_key=reader, max_retries=0
    ) as api:
        yield api


def data_url(image: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(image).decode()}"


def ask(url: str, text: str = "What is in this picture?") -> list[dict[str, Any]]:
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": content}]


GREEDY: dict[str, Any] = {"model": DEMO_MODEL_ID, "temperature": 0, "max_tokens": 12}


# --- answers ------------------------------------------------------------------------------


async def test_the_models_list_names_the_demo_caption_model(
    oai: openai.AsyncOpenAI, worker: FunctionRunner
) -> None:
    models = [m async for m in oai.models.list()]
    assert [(m.id, m.owned_by, m.object) for m in models] == [
        (DEMO_MODEL_ID, "darkroom-demo", "model")
    ]


async def test_a_completion_answers_with_its_usage(
    oai: openai.AsyncOpenAI, worker: FunctionRunner
) -> None:
    answer = await oai.chat.completions.create(messages=ask(data_url(PHOTO)), **GREEDY)
    assert answer.object == "chat.completion" and answer.model == DEMO_MODEL_ID
    assert answer.id.startswith("chatcmpl-")
    [choice] = answer.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    usage = answer.usage
    assert usage is not None and 1 <= usage.completion_tokens <= GREEDY["max_tokens"]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # The random demo model rarely says its end token: it runs to the cap, and says so.
    full = usage.completion_tokens == GREEDY["max_tokens"]
    assert choice.finish_reason == ("length" if full else "stop")
    # A second image is in the prompt: it costs prompt tokens (the model sees it).
    both = ask(data_url(PHOTO))
    both[0]["content"].append({"type": "image_url", "image_url": {"url": data_url(OTHER)}})
    two = await oai.chat.completions.create(messages=both, **GREEDY)
    assert two.usage is not None and two.usage.prompt_tokens > usage.prompt_tokens


async def test_a_multi_turn_conversation_with_a_system_prompt(
    oai: openai.AsyncOpenAI, worker: FunctionRunner
) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "Answer in one word."},
        *ask(data_url(PHOTO)),
        {"role": "assistant", "content": "a sunset"},
        {"role": "user", "content": [{"type": "text", "text": "and the sky?"}]},
    ]
    answer = await oai.chat.completions.create(messages=messages, **GREEDY)
    alone = await oai.chat.completions.create(messages=ask(data_url(PHOTO)), **GREEDY)
    assert answer.usage is not None and alone.usage is not None
    assert answer.usage.prompt_tokens > alone.usage.prompt_tokens  # the turns are in the prompt


async def test_a_stream_is_the_same_answer_in_chunks(
    oai: openai.AsyncOpenAI,
    worker: FunctionRunner,
    client: TestClient[Any, Any],
    reader: str,
) -> None:
    messages: Any = ask(data_url(PHOTO))
    whole = await oai.chat.completions.create(messages=messages, **GREEDY)
    stream = await oai.chat.completions.create(
        messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" and c.model == DEMO_MODEL_ID for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    *pieces, last_choice, usage_chunk = chunks
    assert len(pieces) > 2, "the text came in pieces"
    text = "".join(c.choices[0].delta.content or "" for c in pieces)
    assert text == whole.choices[0].message.content
    assert last_choice.choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    # On the wire: server-sent events, ending with [DONE].
    body = {**GREEDY, "messages": messages, "stream": True}
    response = await client.post("/v1/chat/completions", json=body, headers=auth(reader))
    assert response.status == 200 and response.content_type == "text/event-stream"
    events = (await response.text()).split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])


async def test_the_worker_answers_without_streaming_too(
    ctx: Context, worker: FunctionRunner
) -> None:
    """The chat service's own protocol, as another caller than the gateway would use it."""
    payload = {
        "op": "complete",
        "model": DEMO_MODEL_ID,
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}
        ],
        "images": [base64.b64encode(jpeg(40, 30)).decode()],
        "max_tokens": 5,
        "temperature": 0,
        "stream": False,
    }
    subject = ctx.names.service(CHAT_SERVICE)
    answer = await services.request(ctx.nc, subject, payload, 60)
    assert answer["completion_tokens"] == 5 and answer["prompt_tokens"] > 0
    assert isinstance(answer["text"], str) and answer["finish_reason"] in ("stop", "length")
    streamed = [
        c async for c in services.stream(ctx.nc, subject, {**payload, "stream": True}, 60, 60)
    ]
    assert "".join(c.get("text", "") for c in streamed) == answer["text"]
    with pytest.raises(services.ServiceError) as refused:
        await services.request(ctx.nc, subject, {**payload, "model": "gpt-4o"}, 60)
    assert refused.value.status == 404 and refused.value.code == "model_not_found"


async def test_a_seed_makes_sampling_repeatable(
    oai: openai.AsyncOpenAI, worker: FunctionRunner
) -> None:
    sampled = {"model": DEMO_MODEL_ID, "max_tokens": 12, "temperature": 1.5, "seed": 7}
    first = await oai.chat.completions.create(messages=ask(data_url(PHOTO)), **sampled)
    again = await oai.chat.completions.create(messages=ask(data_url(PHOTO)), **sampled)
    assert first.choices[0].message.content == again.choices[0].message.content


# --- images -------------------------------------------------------------------------------


@pytest.fixture
async def upstream(aiohttp_server: Any) -> TestServer:
    """A web server on 127.0.0.1 with the photo, for the gateway to fetch."""

    async def photo(request: web.Request) -> web.Response:
        return web.Response(body=PHOTO, content_type="image/png")

    app = web.Application()
    app.router.add_get("/photo.png", photo)
    server: TestServer = await aiohttp_server(app)
    return server


async def test_an_image_by_data_url_by_http_url_and_by_darkroom_id_is_the_same_image(
    oai: openai.AsyncOpenAI,
    worker: FunctionRunner,
    upstream: TestServer,
    ctx: Context,
    gateway: Gateway,
    reader: str,
) -> None:
    by_data = await oai.chat.completions.create(messages=ask(data_url(PHOTO)), **GREEDY)
    url = f"http://localhost:{upstream.port}/photo.png"
    by_url = await oai.chat.completions.create(messages=ask(url), **GREEDY)
    # An ingested image's display rendition (lossless WebP of the same pixels).
    display = io.BytesIO()
    Image.open(io.BytesIO(PHOTO)).convert("RGB").save(display, "WEBP", lossless=True)
    image_id = "chatphoto1"
    key = subjects.image_key(image_id, "display.webp")
    await ctx.store.put_bytes(key, display.getvalue(), "image/webp")
    assert ctx.db is not None
    # In the catalogue only by a later stage's event: how it came in is not known yet, so
    # it waits (pending) and only an admin key may show it to the model.
    ingested = Event(
        id=f"ingested-{image_id}", type=subjects.INGESTED, source="t", time=now_iso(),
        image_id=image_id, data={"renditions": {"display": {"key": key}}},
    )  # fmt: skip
    await ctx.db.project(ingested, 2)
    with pytest.raises(openai.PermissionDeniedError) as held:
        await oai.chat.completions.create(messages=ask(f"darkroom://images/{image_id}"), **GREEDY)
    assert held.value.code == "image_not_allowed"
    uploaded = Event(
        id=f"uploaded-{image_id}", type=subjects.UPLOADED, source="t", time=now_iso(),
        image_id=image_id, object=ObjectRef(ctx.store.bucket, f"uploads/{image_id}/p.png"),
        data={"name": "p.png"},
    )  # fmt: skip
    await ctx.db.project(uploaded, 1)
    by_id = await oai.chat.completions.create(
        messages=ask(f"darkroom://images/{image_id}"), **GREEDY
    )
    answers = {a.choices[0].message.content for a in (by_data, by_url, by_id)}
    assert len(answers) == 1, answers
    with pytest.raises(openai.NotFoundError) as missing:
        await oai.chat.completions.create(messages=ask("darkroom://images/nosuchimage"), **GREEDY)
    assert missing.value.code == "image_not_found"
    assert missing.value.param == "messages[0].content[1].image_url.url"
    # The fetcher's rules hold: fetching off, or an address not allowed, is refused.
    off = await gateway(ingest=IngestSettings(max_upload_mb=1))
    async with openai.AsyncOpenAI(
        base_url=str(off.make_url("/v1")), api_key=reader, max_retries=0
    ) as api:
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await api.chat.completions.create(messages=ask(url), **GREEDY)
        assert refused.value.code == "image_fetch_disabled"
    local = f"http://127.0.0.1:{upstream.port}/photo.png"  # not on allow_hosts
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await oai.chat.completions.create(messages=ask(local), **GREEDY)
    assert "not an allowed host" in refused.value.message


def test_images_are_shrunk_upright_to_fit_their_share() -> None:
    """A large photo reaches the model at most 1024 px a side, turned upright, within the
    bytes its share of the request allows."""
    img = Image.effect_noise((3000, 2000), 60).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to show
    out = io.BytesIO()
    img.save(out, "JPEG", quality=95, exif=exif)
    limits = Limits(20 * 1024 * 1024, 150_000_000, 1000)
    for budget, edge in ((10**7, 1024), (60 * 1024, None)):
        shrunk = Image.open(io.BytesIO(_shrunk(out.getvalue(), limits, 1024, budget)))
        width, height = shrunk.size
        assert height > width, "upright: the portrait it is shown as"
        assert height == edge if edge else height < 1024
        assert len(_shrunk(out.getvalue(), limits, 1024, budget)) <= budget


# --- errors -------------------------------------------------------------------------------


async def test_bad_requests_get_openai_error_objects(
    oai: openai.AsyncOpenAI, worker: FunctionRunner, client: TestClient[Any, Any], reader: str
) -> None:
    text_only = [{"role": "user", "content": "Describe it."}]
    with pytest.raises(openai.BadRequestError) as no_image:
        await oai.chat.completions.create(messages=text_only, **GREEDY)
    assert no_image.value.code == "image_required" and no_image.value.param == "messages"
    assert no_image.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as several:
        await oai.chat.completions.create(messages=ask(data_url(PHOTO)), n=2, **GREEDY)
    assert several.value.code == "unsupported_value" and several.value.param == "n"
    with pytest.raises(openai.NotFoundError) as unknown:
        await oai.chat.completions.create(
            messages=ask(data_url(PHOTO)),
            model="gpt-4o",
            max_tokens=4,
        )
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"
    assert DEMO_MODEL_ID in unknown.value.message
    with pytest.raises(openai.BadRequestError) as long:
        await oai.chat.completions.create(
            messages=ask(data_url(PHOTO)),
            model=DEMO_MODEL_ID,
            max_tokens=MAX_TOKENS + 1,
        )
    assert long.value.param == "max_tokens" and f"at most {MAX_TOKENS}" in long.value.message
    # The demo model's context is 256 tokens: the worker refuses, before any event is sent.
    with pytest.raises(openai.BadRequestError) as context:
        await oai.chat.completions.create(
            messages=ask(data_url(PHOTO)),
            model=DEMO_MODEL_ID,
            max_tokens=MAX_TOKENS,
            stream=True,
        )
    assert context.value.code == "context_length_exceeded"
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (1024 * 1024)  # over this deployment's 1 MiB
    with pytest.raises(openai.APIStatusError) as oversized:
        await oai.chat.completions.create(messages=ask(data_url(big)), **GREEDY)
    assert oversized.value.status_code == 413 and oversized.value.code == "image_too_large"
    for url in (data_url(b"not an image at all"), data_url(jpeg()[:300], "image/jpeg")):
        with pytest.raises(openai.BadRequestError) as corrupt:
            await oai.chat.completions.create(messages=ask(url), **GREEDY)
        assert corrupt.value.code == "invalid_image", corrupt.value.message
    with pytest.raises(openai.BadRequestError) as odd:
        await oai.chat.completions.create(messages=ask("ftp://example.com/a.png"), **GREEDY)
    assert odd.value.code == "invalid_image_url"
    # What the client would not send: the gateway's own checks, in the same shape.
    refusals = [
        (b"{", 400, "the body is not JSON"),
        (orjson.dumps({**GREEDY, "messages": ask("x"), "tools": []}), 400, "tools is not"),
        (orjson.dumps({**GREEDY, "messages": [{"role": "bot", "content": "hi"}]}), 400, "bot"),
        (orjson.dumps({**GREEDY, "messages": ask("x"), "temperature": "hot"}), 400, "temperature"),
    ]
    for body, status, words in refusals:
        response = await client.post(
            "/v1/chat/completions",
            data=body,
            headers={**auth(reader), "Content-Type": "application/json"},
        )
        assert response.status == status and response.content_type == "application/json"
        error = (await response.json())["error"]
        assert words in error["message"] and error["type"] == "invalid_request_error", error
    bad_part = {**GREEDY, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}
    response = await client.post("/v1/chat/completions", json=bad_part, headers=auth(reader))
    assert (await response.json())["error"]["param"] == "messages[0].content[0].type"


async def test_auth_and_routing_errors_are_openai_shaped_under_v1(
    client: TestClient[Any, Any], reader: str
) -> None:
    async with openai.AsyncOpenAI(
        base_url=str(client.make_url("/v1")), api_key="drk_aaaaaaaaaaaa_" + "x" * 40, max_retries=0
    ) as stranger:
        with pytest.raises(openai.AuthenticationError) as unknown_key:
            await stranger.models.list()
    assert unknown_key.value.code == "invalid_api_key"
    response = await client.get("/v1/models")
    assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await response.json())["error"]["code"] is None
    wrong_method = await client.get("/v1/chat/completions", headers=auth(reader))
    assert wrong_method.status == 405 and wrong_method.headers["Allow"] == "POST"
    assert "error" in await wrong_method.json()
    for path in ("/v1", "/v1/", "/v1/embeddings"):  # not the frontend's index.html
        response = await client.get(path, headers=auth(reader))
        assert response.status == 404 and response.content_type == "application/json", path
        assert (await response.json())["error"]["type"] == "invalid_request_error"
    not_json = await client.post("/v1/chat/completions", data=b"x", headers=auth(reader))
    assert (
        not_json.status == 415 and "application/json" in (await not_json.json())["error"]["message"]
    )
    # Elsewhere errors stay problem+json.
    elsewhere = await client.get("/api/nothing", headers=auth(reader))
    assert elsewhere.content_type == "application/problem+json"


async def test_no_worker_is_a_503_with_retry_after(
    oai: openai.AsyncOpenAI, client: TestClient[Any, Any], reader: str
) -> None:
    with pytest.raises(openai.InternalServerError) as unserved:
        await oai.chat.completions.create(messages=ask(data_url(PHOTO)), **GREEDY)
    assert unserved.value.status_code == 503 and unserved.value.code == "no_responder"
    assert int(unserved.value.response.headers["Retry-After"]) > 0
    with pytest.raises(openai.InternalServerError) as listed:
        await oai.models.list()
    assert listed.value.status_code == 503


async def test_a_worker_that_stops_answering_is_a_504(
    ctx: Context, gateway: Gateway, reader: str
) -> None:
    """A worker that says which model it serves, then never answers the completion."""

    async def hung(msg: Msg) -> None:
        if orjson.loads(msg.data).get("op") == "models":
            served = {"models": [{"id": DEMO_MODEL_ID, "owned_by": "x", "demo": True}]}
            await services.reply(ctx.nc, msg, {**served, "max_tokens": MAX_TOKENS})

    sub = await ctx.nc.subscribe(ctx.names.service(CHAT_SERVICE), cb=hung)
    try:
        client = await gateway(ChatTimeouts(first_s=0.5))
        async with openai.AsyncOpenAI(
            base_url=str(client.make_url("/v1")), api_key=reader, max_retries=0
        ) as api:
            with pytest.raises(openai.InternalServerError) as late:
                await api.chat.completions.create(messages=ask(data_url(PHOTO)), **GREEDY)
        assert late.value.status_code == 504 and late.value.code == "timeout"
    finally:
        await sub.unsubscribe()
