"""Search: images ranked by words (``GET /api/search``), and images like an image
(``GET /api/images/{image_id}/similar``), both over the read model's pgvector indexes.

For a search the gateway asks the caption function's ``embed`` service for the words'
vectors: a SigLIP text-tower vector, compared with the image embeddings of the same model,
and a MiniLM vector, compared with the captions' embeddings. A demo SigLIP has random
weights, so its vector is left out and the captions alone rank. The vectors are of the
models the service runs now: while a new embed model re-embeds the catalogue in the
background, the image signal reaches only the images it has re-embedded so far (the
captions' signal still reaches all); similar-images keeps to the old model until the new
one covers every image (:meth:`bus.state.readmodel.ReadModel.similar`).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, Field, ValidationError

from bus.gateway.access import shown_only
from bus.gateway.contract import NOT_BLANK, OneOf
from bus.gateway.images import ImageDoc, catalogue, image_doc, query_db
from bus.gateway.problems import Problem, json_response
from bus.gateway.routes import Reply, Route
from bus.gateway.state import CTX
from bus.runtime import services
from bus.runtime.context import Context
from bus.state.readmodel import (
    APPROVALS,
    MAX_SEARCH_RESULTS,
    RRF_K,
    SEARCH_CANDIDATES,
    STATUSES,
    QueryVector,
    ReadModel,
    ReadModelError,
    SearchFilters,
    SearchResult,
)

SERVICE = "embed"
EMBED_TIMEOUT_S = 10.0  # a query is one short text; a busy worker answers between batches
MAX_Q = 1000  # characters: what the embed service takes per text
MAX_PAGE = MAX_SEARCH_RESULTS
DEMO_REASON = "a demo model (random weights): its similarities mean nothing"
# Statuses of the embed service's refusals that mean the same here; any other is a 502.
PASSED_ON = (400, 503, 504)
FUSION = (
    "Each signal (image: the query's SigLIP text embedding against the images' SigLIP "
    "embeddings; text: its MiniLM embedding against the captions') takes its "
    f"{SEARCH_CANDIDATES} nearest images that pass the filters from an HNSW index; every "
    "candidate's exact cosine similarity to each signal is then computed, and the signals "
    f"are fused by Reciprocal Rank Fusion: score = sum over signals of 1/({RRF_K} + rank), "
    "rank 1 being the most similar. RRF needs no calibration of the two models' very "
    "different similarity scales. With one signal the order is its similarity's. Pages are "
    f"offsets into at most {MAX_SEARCH_RESULTS} results."
)


class SimilarQuery(BaseModel):
    tag: str | None = Field(None, description="only images with this tag")
    status: Annotated[str, OneOf(*STATUSES)] | None = None
    approval: Annotated[str, OneOf(*APPROVALS)] | None = Field(
        None,
        description="only images of this approval; pending and rejected ones are found by "
        "admin keys only (the default for other keys: none and approved)",
    )
    nsfw_below: float | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="only images whose NSFW score is below this (unscored images are left out)",
    )
    limit: int = Field(20, ge=1, le=MAX_PAGE)
    offset: int = Field(
        0,
        ge=0,
        le=MAX_SEARCH_RESULTS - 1,
        description=f"next_offset from the previous page (at most {MAX_SEARCH_RESULTS} "
        "results in all)",
    )


class SearchQuery(SimilarQuery):
    q: str = Field(
        min_length=1, max_length=MAX_Q, pattern=NOT_BLANK, description="words to look for"
    )


class Signal(BaseModel):
    kind: Annotated[str, OneOf("image", "text")] = Field(
        description="image: the words against the images (SigLIP); text: the words against "
        "the captions (MiniLM)"
    )
    model: str = Field(description="the embedding model")
    used: bool
    reason: str | None = Field(None, description="why it was left out")


class SearchHit(ImageDoc):
    score: float = Field(description="the fused score (Reciprocal Rank Fusion): higher first")
    similarity: dict[str, float | None] = Field(
        description="cosine similarity to the query, per signal used (image, text); null "
        "where the image has no embedding of that model"
    )


class SearchResults(BaseModel):
    items: list[SearchHit]
    next_offset: int | None = Field(description="the next page's offset; null on the last page")
    signals: list[Signal] = Field(description="what ranked the results, with which models")


class ModelCoverage(BaseModel):
    kind: str = Field(description="image or text")
    model: str
    dim: int = Field(description="dimensions of its vectors")
    images: int = Field(description="captioned images it has embedded")
    complete: bool = Field(description="it has embedded every captioned image")


class EmbeddingCoverage(BaseModel):
    """For /api/status: how far each embedding model has got (a re-embedding's progress)."""

    captioned: int = Field(description="images with a caption")
    models: list[ModelCoverage]


class _Vectors(BaseModel):
    model: str = Field(min_length=1)
    demo: bool = False
    vectors: list[list[float]] = Field(min_length=1)


class _EmbedAnswer(BaseModel):
    """What the embed service answers (see the caption function)."""

    image: _Vectors | None = None
    text: _Vectors | None = None


def routes() -> list[Route]:
    return [
        Route(
            "GET",
            "/api/search",
            search,
            "read",
            "Images ranked by how well they match some words: what they show, and what "
            "their captions say",
            "search",
            responses={
                200: Reply(FUSION, SearchResults),
                400: "the embed service refused q",
                502: "the embed service failed, or answered something unexpected",
                503: "no worker serves embed right now (none running, or still loading "
                "its models), or the database is down",
                504: "the embed service did not answer in time",
            },
        ),
        Route(
            "GET",
            "/api/images/{image_id}/similar",
            similar_images,
            "read",
            "Images that look like this one (nearest image embeddings), itself left out",
            "search",
            responses={
                200: Reply(
                    "best first; score as in /api/search (one signal: the image embedding "
                    "of the model that covers the most images)",
                    SearchResults,
                ),
                404: "no such image, or it has no image embedding yet",
                503: "the database is down",
            },
        ),
    ]


async def search(request: web.Request, query: SearchQuery) -> web.Response:
    ctx = request.app[CTX]
    db = catalogue(request)
    filters = _filters(query, await shown_only(request, query.approval))
    signals, vectors = _signals(await _embed(ctx, query.q))
    signals, vectors = await _complete_only(db, signals, vectors)

    async def ranked() -> SearchResult:
        try:
            return await db.search(vectors, filters, query.limit, query.offset)
        except ReadModelError as exc:  # the service's vectors do not fit the stored ones
            raise Problem(502, "Bad Gateway", str(exc)) from None

    result = await query_db(ranked)
    return json_response(
        {"items": result.items, "next_offset": result.next_offset, "signals": signals}
    )


async def similar_images(request: web.Request, query: SimilarQuery) -> web.Response:
    doc = await image_doc(request)  # a held image is not found for a key that may not see it
    image_id = doc["id"]
    db = catalogue(request)
    filters = _filters(query, await shown_only(request, query.approval))
    result = await query_db(lambda: db.similar(image_id, filters, query.limit, query.offset))
    if result is None:
        raise Problem(
            404,
            "Not Found",
            f"image {image_id} has no image embedding yet (status {doc['status']})",
        )
    signals = [{"kind": kind, "model": model, "used": True} for kind, model in result.signals]
    return json_response(
        {"items": result.items, "next_offset": result.next_offset, "signals": signals}
    )


def _filters(query: SimilarQuery, shown: bool) -> SearchFilters:
    return SearchFilters(
        tag=query.tag or None,
        status=query.status,
        approval=query.approval,
        nsfw_below=query.nsfw_below,
        shown_only=shown,
    )


async def _embed(ctx: Context, text: str) -> _EmbedAnswer:
    """The embed service's vectors for ``text``; its refusal as a problem."""
    try:
        raw = await services.request(
            ctx.nc, ctx.names.service(SERVICE), {"texts": [text]}, EMBED_TIMEOUT_S, SERVICE
        )
    except services.ServiceError as exc:
        status = exc.status if exc.status in PASSED_ON else 502
        raise Problem(status, HTTPStatus(status).phrase, exc.message) from None
    try:
        return _EmbedAnswer.model_validate(raw)
    except ValidationError as exc:
        raise Problem(
            502,
            "Bad Gateway",
            f"the {SERVICE} service answered something unexpected: "
            f"{exc.error_count()} errors, first at {exc.errors()[0]['loc']}",
        ) from None


async def _complete_only(
    db: ReadModel, signals: list[dict[str, object]], vectors: list[QueryVector]
) -> tuple[list[dict[str, object]], list[QueryVector]]:
    """Leave out a signal whose model is still re-embedding: ranked against the images it
    has reached so far, it would favour them over the others. Its vectors serve once it
    covers as many images as the model before it (the caption text still ranks them all)."""
    kept: list[QueryVector] = []
    for vector in vectors:
        behind = await db.catching_up(vector.kind, vector.model)
        if behind is None or len(vectors) == 1:
            kept.append(vector)
            continue
        for signal in signals:
            if signal["kind"] == vector.kind:
                signal["used"] = False
                signal["reason"] = f"re-embedding: {behind[0]} of {behind[1]} images so far"
    return signals, kept


async def query_embedding_model(ctx: Context) -> str:
    """The image embedding model the caption workers embed with now (asked of them)."""
    answer = await _embed(ctx, "a photo")
    if answer.image is None:
        raise Problem(502, "Bad Gateway", f"the {SERVICE} service named no image model")
    return answer.image.model


def _signals(answer: _EmbedAnswer) -> tuple[list[dict[str, object]], list[QueryVector]]:
    """What to rank by: the answer's real models (a demo one only if there is no other)."""
    given = {kind: part for kind, part in (("image", answer.image), ("text", answer.text)) if part}
    if not given:
        raise Problem(502, "Bad Gateway", f"the {SERVICE} service answered no vectors")
    used = [kind for kind, part in given.items() if not part.demo] or list(given)
    signals: list[dict[str, object]] = []
    for kind, part in given.items():
        signal: dict[str, object] = {"kind": kind, "model": part.model, "used": kind in used}
        if kind not in used:
            signal["reason"] = DEMO_REASON
        signals.append(signal)
    vectors = [QueryVector(kind, given[kind].model, given[kind].vectors[0]) for kind in used]
    return signals, vectors
