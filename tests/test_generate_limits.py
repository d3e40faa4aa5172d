"""``GET /api/generate/limits``: the bounds a generation form offers are the ones the
gateway checks requests against."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from bus.core.settings import GenerateModel, GenerateSettings, Settings
from tests.support.http import auth

pytestmark = [pytest.mark.nats, pytest.mark.s3]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    wide = GenerateModel(source="/nowhere/wide", width=512, height=512, side_multiple=64)
    generate = GenerateSettings(max_n=3, max_steps=40, max_side=1024, models={"wide": wide})
    return settings.model_copy(update={"generate": generate})


async def test_the_limits_are_the_settings_and_each_models_side_multiple(
    client: Any, make_key: Callable[..., Awaitable[str]]
) -> None:
    reader = await make_key("read")
    response = await client.get("/api/generate/limits", headers=auth(reader))
    assert response.status == 200
    limits = await response.json()
    assert (limits["max_n"], limits["max_steps"], limits["max_side"]) == (3, 40, 1024)
    assert limits["side_multiple"]["wide"] == 64
    assert limits["side_multiple"]["sd-turbo"] == 8
    assert limits["modes"][0] == "txt2img"
    assert "txt2img" not in limits["image_modes"] and "remix" in limits["image_modes"]
    assert limits["default_strength"]["enhance"] == 0.3

    # a width off the model's multiple is refused with the same number
    generator = await make_key("generate")
    refused = await client.post(
        "/api/generations",
        json={"prompt": "a fox", "model": "wide", "width": 520, "height": 512},
        headers=auth(generator),
    )
    assert refused.status == 422
    assert "multiple of 64" in (await refused.json())["detail"]


async def test_the_limits_need_a_key(client: Any) -> None:
    response = await client.get("/api/generate/limits")
    assert response.status == 401
