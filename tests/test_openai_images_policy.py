"""The OpenAI image routes under an approval policy: they hand pixels back at once, so
images the policy holds reach admin keys only (real bus, store and read model, the
generate function on a tiny pipeline)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from bus import Context
from bus.core.settings import (
    ApprovalSettings,
    GenerateModel,
    GenerateSettings,
    HoldPolicy,
    Settings,
)
from bus.runtime.runner import FunctionRunner
from tests.test_openai_images import (
    SIZE,
    Gateway,
    gateway,
    generator,
    key,
    notify,
    official,
    requested,
    start_generator,
    tiny_sd,
)

pytestmark = [pytest.mark.nats, pytest.mark.s3]
__all__ = ["gateway", "generator", "key", "notify", "start_generator", "tiny_sd"]


@pytest.fixture
def settings(settings: Settings, tiny_sd: Path, request: pytest.FixtureRequest) -> Settings:
    """The tiny pipeline as the default model, and the test's approval policy."""
    tiny = GenerateModel(source=str(tiny_sd), width=SIZE, height=SIZE, steps=2, vram_mb=64)
    generate = GenerateSettings(
        default_model="tiny-sd", cpu_model="tiny-sd", models={"tiny-sd": tiny}
    )
    hold: HoldPolicy = request.param
    return settings.model_copy(
        update={"generate": generate, "approval": ApprovalSettings(hold=hold)}
    )


@pytest.mark.parametrize("settings", [HoldPolicy(generated=True)], indirect=True)
async def test_where_every_generated_image_is_held_only_admin_keys_use_them(
    gateway: Gateway, key: str, admin: str, ctx: Context, generator: FunctionRunner
) -> None:
    client = await gateway()
    async with official(client, key) as api:
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await api.images.generate(prompt="a lighthouse")
    assert refused.value.code == "content_policy_violation"
    assert "POST /api/generations" in refused.value.message
    assert await requested(ctx) == []  # refused before anything was queued
    async with official(client, admin) as api:
        made = await api.images.generate(prompt="a lighthouse")
    assert made.data and made.data[0].b64_json


@pytest.mark.parametrize("settings", [HoldPolicy(nsfw_above=0.7)], indirect=True)
async def test_images_waiting_for_their_nsfw_score_are_not_handed_out(
    gateway: Gateway, key: str, ctx: Context, generator: FunctionRunner
) -> None:
    """No caption function runs here: the outputs never get a score, so they stay held."""
    client = await gateway(wait_s=2.0)
    async with official(client, key) as api:
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await api.images.generate(prompt="a lighthouse")
    assert refused.value.code == "content_policy_violation"
    [job] = await requested(ctx, 1)
    assert f"{job.job_id}-0" in refused.value.message
    assert refused.value.response.headers["x-should-retry"] == "false"
