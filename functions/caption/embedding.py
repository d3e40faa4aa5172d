"""The caption function's ``embed`` service: search queries into the catalogue's vector spaces.

The gateway stays free of torch, so it asks here (``<ns>-rpc.embed``) for a query's two
embeddings: the SigLIP text tower's (comparable to the ``image`` embeddings of the same
embed model) and MiniLM's (comparable to the ``text`` embeddings of captions).
"""

from __future__ import annotations

from typing import Any

from nats.aio.msg import Msg

from bus import Context
from bus.runtime import services
from functions.caption.models import Siglip, embedding_model
from functions.caption.state import CaptionState

MAX_TEXTS = 16
MAX_TEXT_CHARS = 1000


def _texts(request: dict[str, Any]) -> list[str]:
    texts = request.get("texts")
    if (
        not isinstance(texts, list)
        or not 1 <= len(texts) <= MAX_TEXTS
        or not all(isinstance(t, str) and t.strip() and len(t) <= MAX_TEXT_CHARS for t in texts)
    ):
        raise services.ServiceError(
            f"'texts' must be a list of 1-{MAX_TEXTS} texts of 1-{MAX_TEXT_CHARS} characters",
            400,
            "invalid_request",
        )
    return [t.strip() for t in texts]


async def serve_embed(msg: Msg, ctx: Context, state: CaptionState) -> None:
    texts = _texts(services.parse_request(msg))
    text_vectors = await ctx.run_cpu(state.text.embed, texts)
    assert ctx.gpu is not None
    async with ctx.gpu.use(state.models.embed) as loaded:
        siglip: Siglip = loaded
        image_vectors = await ctx.run_gpu(siglip.embed_texts, texts)
    embed = state.models.resolved["embed"]
    await services.reply(
        ctx.nc,
        msg,
        {
            "image": {
                "model": embedding_model(embed),
                "demo": embed.demo,
                "vectors": image_vectors,
            },
            "text": {"model": state.text.name, "demo": False, "vectors": text_vectors},
        },
    )
