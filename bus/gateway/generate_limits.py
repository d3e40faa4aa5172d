"""``GET /api/generate/limits``: the bounds a generation request is checked against, so a
form can offer only what the gateway takes (sizes on each model's side multiple, at most
``max_side`` and ``max_pixels``; steps, count and prompt lengths within their limits).

The same numbers :func:`bus.core.generation.check_request` enforces, read from the
gateway's settings: a form built from them and the server cannot disagree.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, Field

from bus.core.generation import DEFAULT_STRENGTH, MAX_SEED, MIN_SIDE, NEEDS_IMAGE
from bus.core.settings import GENERATE_MODES, SCHEDULERS
from bus.gateway.problems import json_response
from bus.gateway.routes import Reply, Route
from bus.gateway.state import CTX


class GenerateLimits(BaseModel):
    """What a generation request may ask for."""

    modes: list[str] = Field(description="txt2img, and the modes that start from an image")
    image_modes: list[str] = Field(description="the modes that need 'image'")
    default_strength: dict[str, float] = Field(description="an image mode's default strength")
    schedulers: list[str]
    min_side: int
    max_side: int
    max_pixels: int = Field(description="width x height at most")
    max_steps: int
    max_n: int
    max_seed: int
    max_prompt_chars: int = Field(description="each of prompt and negative_prompt")
    side_multiple: dict[str, int] = Field(
        description="by catalogue model: width and height must be multiples of it"
    )


async def generate_limits(request: web.Request) -> web.Response:
    generate = request.app[CTX].settings.generate
    return json_response(
        GenerateLimits(
            modes=list(GENERATE_MODES),
            image_modes=[mode for mode in GENERATE_MODES if mode in NEEDS_IMAGE],
            default_strength=DEFAULT_STRENGTH,
            schedulers=list(SCHEDULERS),
            min_side=MIN_SIDE,
            max_side=generate.max_side,
            max_pixels=generate.max_pixels,
            max_steps=generate.max_steps,
            max_n=generate.max_n,
            max_seed=MAX_SEED,
            max_prompt_chars=generate.max_prompt_chars,
            side_multiple={name: m.side_multiple for name, m in generate.catalogue.items()},
        )
    )


def routes() -> list[Route]:
    return [
        Route(
            "GET",
            "/api/generate/limits",
            generate_limits,
            "read",
            "The bounds a generation request is checked against: sizes (with each model's "
            "side multiple), steps, count, seed, prompt length, modes and schedulers",
            "generations",
            responses={200: Reply("the limits", GenerateLimits)},
        )
    ]
