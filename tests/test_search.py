"""Search over HTTP: GET /api/search asks the embed service over real NATS (answered here by
a responder of the test's own) and ranks the read model's images; GET
/api/images/{id}/similar ranks by image embedding; refusals are problem+json."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from nats.aio.msg import Msg

from bus.core.envelope import new_id
from bus.gateway import search
from bus.gateway.app import build_app
from bus.gateway.problems import RETRY_AFTER_S
from bus.runtime import services
from bus.runtime.context import Context
from bus.state.readmodel import RRF_K, ReadModel
from tests.support.http import auth
from tests.test_readmodel import (
    IMAGE_MODEL,
    TEXT_MODEL,
    apply,
    axis,
    captioned_image,
    life,
    toward,
)

pytestmark = [pytest.mark.nats, pytest.mark.s3]

Answer = Callable[[dict[str, Any]], dict[str, Any] | services.ServiceError | None]


@pytest.fixture
def db(ctx: Context) -> ReadModel:
    assert ctx.db is not None
    return ctx.db


@pytest.fixture
async def gateway(ctx: Context, aiohttp_client: Any) -> TestClient[Any, Any]:
    """The gateway alone: no function runs, so the test's responder is the only one."""
    client: TestClient[Any, Any] = await aiohttp_client(build_app(ctx))
    return client


@pytest.fixture
async def reader(make_key: Callable[..., Awaitable[str]]) -> str:
    return await make_key("read")


@pytest.fixture
async def embed_service(ctx: Context) -> AsyncIterator[Callable[[Answer], Awaitable[list[Any]]]]:
    """Factory: answer the embed service's subject with ``answer(request)`` (a result, a
    ServiceError to refuse, None to stay silent); returns the list the requests land in."""
    subscriptions = []

    async def serve(answer: Answer) -> list[Any]:
        requests: list[Any] = []

        async def respond(msg: Msg) -> None:
            request = services.parse_request(msg)
            requests.append(request)
            result = answer(request)
            if isinstance(result, services.ServiceError):
                await services.reply_error(ctx.nc, msg, result)
            elif result is not None:
                await services.reply(ctx.nc, msg, result)

        subscriptions.append(await ctx.nc.subscribe(ctx.names.service("embed"), cb=respond))
        await ctx.nc.flush()
        return requests

    yield serve
    for sub in subscriptions:
        await sub.unsubscribe()


def vectors(image_demo: bool = False) -> Answer:
    """The embed service's answer: query vectors along the first axis of each model."""

    def answer(request: dict[str, Any]) -> dict[str, Any]:
        count = len(request["texts"])
        return {
            "image": {"model": IMAGE_MODEL, "demo": image_demo, "vectors": [axis(8)] * count},
            "text": {"model": TEXT_MODEL, "demo": False, "vectors": [axis(4)] * count},
        }

    return answer


async def four_images(db: ReadModel) -> dict[str, str]:
    """Ranked a, b, c, d by image similarity alone, c, a, d, b by text, a, c, b, d fused;
    b is tagged dog, the others cat."""
    image_sims = {"a": 0.9, "b": 0.89, "c": 0.0, "d": 0.05}
    text_sims = {"a": 0.2, "b": 0.15, "c": 0.99, "d": 0.19}
    return {
        name: await captioned_image(
            db,
            10 * n + 1,
            image=toward(image_sims[name], 8),
            text=toward(text_sims[name], 4),
            tags=["dog"] if name == "b" else ["cat"],
        )
        for n, name in enumerate("abcd")
    }


async def get(client: TestClient[Any, Any], token: str, url: str) -> tuple[int, Any]:
    response = await client.get(url, headers=auth(token))
    return response.status, await response.json(content_type=None)


async def test_search_asks_the_embed_service_and_fuses_both_signals(
    db: ReadModel, gateway: TestClient[Any, Any], reader: str, embed_service: Any
) -> None:
    made = await four_images(db)
    requests = await embed_service(vectors())
    status, body = await get(gateway, reader, "/api/search?q=a%20sleeping%20cat")
    assert status == 200, body
    assert requests == [{"texts": ["a sleeping cat"]}]
    assert [item["id"] for item in body["items"]] == [made[n] for n in "acbd"]
    assert body["signals"] == [
        {"kind": "image", "model": IMAGE_MODEL, "used": True},
        {"kind": "text", "model": TEXT_MODEL, "used": True},
    ]
    first = body["items"][0]
    assert first["score"] == pytest.approx(1 / (RRF_K + 1) + 1 / (RRF_K + 2))
    assert first["similarity"] == pytest.approx({"image": 0.9, "text": 0.2}, abs=1e-6)
    assert first["status"] == "ready" and first["caption"]["caption"] == "something"
    assert body["next_offset"] is None
    status, body = await get(gateway, reader, "/api/search?q=cat&tag=cat&limit=2")
    assert [item["id"] for item in body["items"]] == [made["a"], made["c"]]
    assert body["next_offset"] == 2
    status, body = await get(gateway, reader, "/api/search?q=cat&tag=cat&limit=2&offset=2")
    assert [item["id"] for item in body["items"]] == [made["d"]]
    assert body["next_offset"] is None


async def test_a_demo_image_model_is_left_out_and_the_captions_rank(
    db: ReadModel, gateway: TestClient[Any, Any], reader: str, embed_service: Any
) -> None:
    made = await four_images(db)
    await embed_service(vectors(image_demo=True))
    status, body = await get(gateway, reader, "/api/search?q=kitten")
    assert status == 200, body
    assert [item["id"] for item in body["items"]] == [made[n] for n in "cadb"]
    image, text = body["signals"]
    assert image["used"] is False and "demo" in image["reason"]
    assert text == {"kind": "text", "model": TEXT_MODEL, "used": True}
    assert body["items"][0]["similarity"] == pytest.approx({"text": 0.99})


async def test_q_must_be_some_words(gateway: TestClient[Any, Any], reader: str) -> None:
    for url, detail in [
        ("/api/search?q=%20%20", "q must not be blank, got '  '"),
        ("/api/search", "q is required"),
        ("/api/search?q=" + "x" * 1001, "q must have at most 1000 characters"),
        ("/api/search?q=cat&nsfw_below=2", "nsfw_below must be 0-1, got '2'"),
        ("/api/search?q=cat&offset=100", "offset must be 0-99, got '100'"),
    ]:
        status, body = await get(gateway, reader, url)
        assert status == 400 and body["detail"].startswith(detail), (url, body)


async def test_no_embed_worker_is_a_503_that_says_when_to_retry(
    gateway: TestClient[Any, Any], reader: str
) -> None:
    response = await gateway.get("/api/search?q=cat", headers=auth(reader))
    assert response.status == 503
    assert response.content_type == "application/problem+json"
    assert response.headers["Retry-After"] == str(RETRY_AFTER_S)
    assert "no worker is serving 'embed'" in (await response.json())["detail"]


async def test_the_embed_services_failures_become_problems(
    gateway: TestClient[Any, Any],
    reader: str,
    embed_service: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers: list[Any] = [
        services.ServiceError("texts must be short", 400, "invalid_request"),
        services.ServiceError("the model crashed", 500),
        {"text": {"model": TEXT_MODEL, "vectors": "not a list"}},
        {},
    ]
    await embed_service(lambda request: answers.pop(0))
    expected = [
        (400, "texts must be short"),
        (502, "the model crashed"),
        (502, "the embed service answered something unexpected"),
        (502, "the embed service answered no vectors"),
    ]
    for status, detail in expected:
        got, body = await get(gateway, reader, "/api/search?q=cat")
        assert (got, body["detail"][: len(detail)]) == (status, detail)
    monkeypatch.setattr(search, "EMBED_TIMEOUT_S", 0.2)
    await embed_service(lambda request: None)  # a worker that never answers
    got, body = await get(gateway, reader, "/api/search?q=cat")
    assert got == 504 and "did not answer within 0.2 s" in body["detail"]


async def test_similar_images_over_http(
    db: ReadModel, gateway: TestClient[Any, Any], reader: str
) -> None:
    made = await four_images(db)
    status, body = await get(gateway, reader, f"/api/images/{made['a']}/similar")
    assert status == 200, body
    assert [item["id"] for item in body["items"]] == [made["b"], made["d"], made["c"]]
    assert body["signals"] == [{"kind": "image", "model": IMAGE_MODEL, "used": True}]
    status, body = await get(gateway, reader, f"/api/images/{made['b']}/similar?tag=dog")
    assert status == 200 and body["items"] == []  # b itself is the one dog
    status, body = await get(gateway, reader, f"/api/images/{made['a']}/similar?tag=dog")
    assert [item["id"] for item in body["items"]] == [made["b"]]
    status, body = await get(gateway, reader, f"/api/images/{made['a']}/similar?limit=1&offset=1")
    assert [item["id"] for item in body["items"]] == [made["d"]] and body["next_offset"] == 2
    status, body = await get(gateway, reader, "/api/images/nope/similar")
    assert status == 404 and body["detail"] == "no image with id 'nope'"
    bare = new_id()
    await apply(db, life(bare)[:2], first_seq=500)
    status, body = await get(gateway, reader, f"/api/images/{bare}/similar")
    assert status == 404
    assert body["detail"] == f"image {bare} has no image embedding yet (status ingested)"


async def test_an_image_model_still_re_embedding_is_left_out_of_search(
    db: ReadModel, gateway: TestClient[Any, Any], reader: str, embed_service: Any
) -> None:
    """Ranked against the few images it has reached, the new model would favour them:
    until it covers as many as the model before it, the captions rank alone."""
    for seq in (1, 11):
        await captioned_image(db, seq, image=axis(8), text=toward(0.5, 4), image_model="old")
    reached = await captioned_image(db, 21, image=toward(-0.5, 8), text=toward(0.1, 4))
    best = await captioned_image(db, 31, image=None, text=toward(0.99, 4), image_model="old")
    await embed_service(vectors())
    status, body = await get(gateway, reader, "/api/search?q=cat")
    assert status == 200, body
    assert body["signals"][0] == {
        "kind": "image",
        "model": IMAGE_MODEL,
        "used": False,
        "reason": "re-embedding: 1 of 2 images so far",
    }
    ranked = [item["id"] for item in body["items"]]
    assert ranked[0] == best and ranked.index(best) < ranked.index(reached)
