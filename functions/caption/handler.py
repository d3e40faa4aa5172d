"""caption: describe, tag, score and embed every image, a batch at a time.

Consumes ``ingested`` (a new image) and ``recaption`` (a user asks again: with a prompt or
another caption model, or sets the caption by hand; or, after the embed model changed,
``reembed``: new tags and embeddings, the same words), works on the display rendition and
writes ``images/<id>/caption.json``, then fires ``captioned`` with the document:

- a short and a detailed caption (one ``generate`` call captions the whole batch, both
  prompts per image, capped at ``caption.max_new_tokens`` so one image cannot hold it up);
- tags with their SigLIP scores over the vocabulary, and the image embedding, from one
  vision pass for the batch;
- the NSFW score (open_nsfw on the CPU, alongside the GPU work);
- the caption-text embedding (MiniLM), for search;
- the model of each part, so demo output is marked.

One image that cannot be read fails alone. A replay finds the document it wrote and only
announces it again; a re-caption request redelivered after a later one (the document
records the stream sequence of the request it answers) leaves the newer caption alone.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from bus import (
    Call,
    Context,
    Emit,
    Event,
    Function,
    ObjectMissingError,
    Reject,
    Retry,
    Spec,
    subjects,
)
from bus.core.envelope import ObjectRef
from bus.models.catalogue import ModelUnavailableError
from functions.caption.chat import serve_chat
from functions.caption.embedding import serve_embed
from functions.caption.models import (
    DETAILED_PROMPT,
    SHORT_PROMPT,
    Analysis,
    Captioner,
    Siglip,
    embedding_model,
    rgb,
)
from functions.caption.palette import colour_tags
from functions.caption.prepare import prepare, teardown
from functions.caption.state import CaptionState, gpu_models, setup

SPEC = Spec(
    name="caption",
    listens=(subjects.INGESTED, subjects.RECAPTION),
    emits=(subjects.CAPTIONED,),
    batch=8,
    batch_wait_s=0.05,
    concurrency=2,  # the next batch is fetched and decoded while one runs on the device
    ack_wait=15.0,
    max_deliver=4,
    timeout=900.0,
    needs_gpu=True,
    cancellable=False,  # a cancelled job's outputs are processed like any image
)
MODEL_EDGE_PX = 768  # what the models are shown: they resize further themselves
MAX_PROMPT_CHARS = 500
MAX_MANUAL_CHARS = 2000
MAX_DISPLAY_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class _Job:
    """One event's work: a new image, or a request about one."""

    event: Event
    image_id: str
    mode: str  # "ingest" | "model" | "manual" | "reembed"
    seq: int = 0  # the event's stream sequence: later requests have higher ones
    prompt: str | None = None
    model: str | None = None
    manual: str | None = None
    image: Image.Image | None = None
    analysis: Analysis | None = None
    embedding: list[float] | None = None
    nsfw: float | None = None
    captions: tuple[str, str | None] = ("", None)
    caption_identity: dict[str, Any] | None = None  # the captioner used, when not the default
    colours: list[tuple[str, float]] = field(default_factory=list)  # ("color:red", share)
    previous: dict[str, Any] | None = None  # the stored document (a re-embedding keeps its text)

    @property
    def request(self) -> str | None:
        return None if self.mode == "ingest" else self.event.id


def _job(event: Event) -> _Job:
    image_id = event.image_id
    if not image_id or not subjects.is_safe_id(image_id):
        raise Reject(f"a {event.type} event needs a valid 'image_id'")
    if event.type == subjects.INGESTED:
        return _Job(event, image_id, "ingest")
    data = event.data
    mode = data.get("mode")
    if mode == "manual":
        text = data.get("caption")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_MANUAL_CHARS:
            raise Reject(f"a manual caption must be 1-{MAX_MANUAL_CHARS} characters of text")
        return _Job(event, image_id, "manual", manual=text.strip())
    if mode == "model":
        prompt, model = data.get("prompt"), data.get("model")
        if prompt is not None and (
            not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS
        ):
            raise Reject(f"'prompt' must be 1-{MAX_PROMPT_CHARS} characters of text")
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise Reject("'model' must name a caption model")
        return _Job(event, image_id, "model", prompt=prompt and prompt.strip(), model=model)
    if mode == "reembed":
        return _Job(event, image_id, "reembed")
    raise Reject(f"a recaption request needs mode 'model', 'manual' or 'reembed', got {mode!r}")


async def handle_batch(
    events: list[Event], ctx: Context, calls: list[Call]
) -> list[Sequence[Emit] | BaseException]:
    state: CaptionState = calls[0].state
    results: list[Sequence[Emit] | BaseException | None] = [None] * len(events)
    jobs: dict[int, _Job] = {}
    for i, (event, call) in enumerate(zip(events, calls, strict=True)):
        try:
            jobs[i] = _job(event)
            jobs[i].seq = call.stream_seq
        except Reject as exc:
            results[i] = exc
    overtaken = _collapse(jobs)

    # A replay (or a request overtaken by a later one): announce what is stored.
    done = await asyncio.gather(
        *(_stored(ctx, state, job) for job in jobs.values()), return_exceptions=True
    )
    for (i, _), outcome in zip(list(jobs.items()), done, strict=True):
        if outcome is not None:
            results[i] = outcome
            del jobs[i]

    images = await asyncio.gather(
        *(_display(ctx, job) for job in jobs.values()), return_exceptions=True
    )
    for (i, job), image in zip(list(jobs.items()), images, strict=True):
        if isinstance(image, BaseException):
            results[i] = image
            del jobs[i]
        else:
            job.image, job.colours = image

    if jobs:
        failures = await _run_models(ctx, state, list(jobs.values()))
        for i, job in list(jobs.items()):
            if job.event.id in failures:
                results[i] = failures[job.event.id]
                del jobs[i]
        texts = [_caption_text(job) for job in jobs.values()]
        vectors = await ctx.run_cpu(state.text.embed, texts)
        stored = await asyncio.gather(
            *(
                _store(ctx, state, job, vector)
                for job, vector in zip(jobs.values(), vectors, strict=True)
            ),
            return_exceptions=True,
        )
        for i, outcome in zip(jobs, stored, strict=True):
            results[i] = outcome
    for i, winner in overtaken.items():
        won = results[winner]
        # What the winner stored answers this event too; if the winner failed, this
        # event comes back on its own.
        results[i] = (
            Retry(f"an event about the same image failed in this batch: {won}")
            if isinstance(won, BaseException)
            else won
        )
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def _collapse(jobs: dict[int, _Job]) -> dict[int, int]:
    """Several events about one image in a batch: the latest one (furthest on in the
    stream) runs, and the others announce what it stored. A re-embedding never wins over
    another kind of event (which embeds with the current model anyway), so a manual
    caption or an image's first caption is never lost to it. Returns overtaken -> winner,
    and removes the overtaken from ``jobs``."""
    winner: dict[str, int] = {}
    for i, job in jobs.items():
        j = winner.get(job.image_id)
        if j is None or _ranks_above(job, jobs[j]):
            winner[job.image_id] = i
    overtaken = {i: winner[job.image_id] for i, job in jobs.items() if winner[job.image_id] != i}
    for i in overtaken:
        del jobs[i]
    return overtaken


def _ranks_above(job: _Job, other: _Job) -> bool:
    if (job.mode == "reembed") != (other.mode == "reembed"):
        return other.mode == "reembed"
    return job.seq > other.seq


async def _stored(ctx: Context, state: CaptionState, job: _Job) -> list[Emit] | None:
    """What to announce instead of working, when the stored document already answers
    ``job`` (or a later request replaced it); None when there is work to do."""
    found = await _read_caption(ctx, job.image_id)
    if found is None:
        # Nothing to re-embed yet: the image's first caption will use the current model.
        return [] if job.mode == "reembed" else None
    ref, doc = found
    if job.mode == "reembed":
        current = embedding_model(state.models.resolved["embed"])
        kinds = {e.get("kind"): e.get("model") for e in doc.get("embeddings") or []}
        if kinds.get("image") == current:
            return [Emit(subjects.CAPTIONED, ref, data=doc)]
        job.previous = doc
        return None
    if _answers(doc, job):
        return [Emit(subjects.CAPTIONED, ref, data=doc)]
    return None


def _answers(doc: dict[str, Any], job: _Job) -> bool:
    """A new image's caption is done once any document exists; a request, once the
    document answers it or a later request (one further on in the stream) replaced it:
    delivered late, a request must not overwrite the newer caption."""
    newest = doc.get("request_seq")
    return job.mode == "ingest" or (isinstance(newest, int) and newest >= job.seq)


async def _read_caption(ctx: Context, image_id: str) -> tuple[ObjectRef, dict[str, Any]] | None:
    """The stored caption document, or None; one that does not parse counts as none (it
    is written again)."""
    key = subjects.image_key(image_id, subjects.CAPTION_DOC)
    ref = await ctx.store.stat(key)
    if ref is None:
        return None
    try:
        doc = await ctx.store.get_json(key)
    except (ObjectMissingError, ValueError):
        return None
    return (ref, doc) if isinstance(doc, dict) else None


async def _display(ctx: Context, job: _Job) -> tuple[Image.Image, list[tuple[str, float]]]:
    """The display rendition, named by the ingest document (the event's, or the stored one
    for a request), decoded at the size the models are shown."""
    image_id = job.image_id
    info = job.event.data
    if job.mode != "ingest":
        try:
            info = await ctx.store.get_json(subjects.image_key(image_id, subjects.INGEST_DOC))
        except ObjectMissingError:
            raise Reject(f"image {image_id} is not ingested (yet): nothing to caption") from None
    display = (info.get("renditions") or {}).get("display") if isinstance(info, dict) else None
    key = display.get("key") if isinstance(display, dict) else None
    if not isinstance(key, str):
        raise Reject(f"the ingest document of {image_id} names no display rendition")
    try:
        data = await ctx.store.get_bytes(key, max_bytes=MAX_DISPLAY_BYTES)
    except ObjectMissingError:
        raise Reject(f"the display rendition of {image_id} is missing ({key})") from None
    try:
        return await ctx.run_cpu(_decode, data)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise Reject(f"the display rendition of {image_id} cannot be read: {exc}") from None


def _decode(data: bytes) -> tuple[Image.Image, list[tuple[str, float]]]:
    """The image at the size the models see, and its colour tags (cheap, model-free)."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (MODEL_EDGE_PX, MODEL_EDGE_PX))
        loaded = rgb(image)
        loaded.thumbnail((MODEL_EDGE_PX, MODEL_EDGE_PX))
        loaded.load()
    return loaded, [(f"color:{name}", share) for name, share in colour_tags(loaded)]


async def _run_models(ctx: Context, state: CaptionState, jobs: list[_Job]) -> dict[str, Exception]:
    """Tags, embeddings, NSFW scores and captions for ``jobs``, each model once for all.

    Returns the jobs that failed on their own (a re-caption naming an unusable model).
    """
    images = [job.image for job in jobs if job.image is not None]
    nsfw = asyncio.ensure_future(ctx.run_cpu(lambda: state.nsfw.get().score(images)))
    try:
        analyses = await _analyse(ctx, state, images)
        for job, analysis in zip(jobs, analyses, strict=True):
            job.analysis = analysis
        if state.models.embed is not state.models.tags:
            embeddings = await _embed_images(ctx, state, images)
            for job, embedding in zip(jobs, embeddings, strict=True):
                job.embedding = embedding
        captioned = [job for job in jobs if job.mode in ("ingest", "model")]
        failures = await _caption(ctx, state, captioned)
    finally:
        scores = await nsfw
    for job, score in zip(jobs, scores, strict=True):
        job.nsfw = score
    return failures


async def _analyse(ctx: Context, state: CaptionState, images: list[Image.Image]) -> list[Analysis]:
    options = state.settings.caption
    assert ctx.gpu is not None
    async with ctx.gpu.use(state.models.tags) as siglip:
        model: Siglip = siglip
        return await ctx.run_gpu(
            model.analyse, images, state.vocabulary, options.tag_threshold, options.max_tags
        )


async def _embed_images(
    ctx: Context, state: CaptionState, images: list[Image.Image]
) -> list[list[float]]:
    assert ctx.gpu is not None
    async with ctx.gpu.use(state.models.embed) as siglip:
        model: Siglip = siglip

        def embed() -> list[list[float]]:
            vectors: list[list[float]] = model.embed_images(images).float().cpu().tolist()
            return vectors

        return await ctx.run_gpu(embed)


async def _caption(ctx: Context, state: CaptionState, jobs: list[_Job]) -> dict[str, Exception]:
    """Short and detailed captions: per caption model, one ``generate`` for its jobs."""
    failures: dict[str, Exception] = {}
    by_model: dict[str | None, list[_Job]] = {}
    for job in jobs:
        by_model.setdefault(job.model, []).append(job)
    assert ctx.gpu is not None
    for source, group in by_model.items():
        try:
            model, resolved = await asyncio.to_thread(state.caption_model, source)
        except ModelUnavailableError as exc:
            for job in group:
                failures[job.event.id] = Reject(str(exc))
            continue
        images: list[Image.Image] = []
        prompts: list[str] = []
        for job in group:
            assert job.image is not None
            images += [job.image, job.image]
            prompts += [SHORT_PROMPT, job.prompt or DETAILED_PROMPT]
        try:
            async with ctx.gpu.use(model) as loaded:
                captioner: Captioner = loaded
                texts = await ctx.run_gpu(captioner.caption, images, prompts)
        except Exception as exc:
            if source is None:
                raise  # the configured model failing is everyone's failure: retried
            for job in group:  # another model asked for by these requests fails them alone
                failures[job.event.id] = exc
            continue
        for n, job in enumerate(group):
            job.captions = (texts[2 * n], texts[2 * n + 1])
            job.caption_identity = resolved.identity()
    return failures


def _caption_text(job: _Job) -> str:
    """What the caption-text embedding is made of: everything said about the image."""
    if job.previous is not None:
        short, detailed = str(job.previous.get("caption") or ""), job.previous.get("detailed")
        return f"{short} {detailed}" if detailed else short
    if job.manual is not None:
        return job.manual
    short, detailed = job.captions
    return f"{short} {detailed}" if detailed else short


async def _store(
    ctx: Context, state: CaptionState, job: _Job, text_vector: list[float]
) -> list[Emit]:
    assert job.analysis is not None and job.nsfw is not None
    resolved = state.models.resolved
    models = state.identities()
    if job.caption_identity is not None:
        models["caption"] = job.caption_identity
    if job.mode == "manual":
        models["caption"] = {"task": "caption", "source": "manual", "revision": None, "demo": False}
    short: Any
    detailed: Any
    short, detailed = (job.manual, None) if job.manual is not None else job.captions
    source: Any = "manual" if job.mode == "manual" else "model"
    prompt: Any = job.prompt
    request: Any = job.request
    request_seq: Any = job.seq if job.request else None
    if job.previous is not None:  # re-embedding: the words stay as they were
        old = job.previous
        short, detailed, source, prompt = (
            old.get("caption"),
            old.get("detailed"),
            old.get("source", "model"),
            old.get("prompt"),
        )
        # It answers no user request: later requests must still see the last one's place.
        request, request_seq = old.get("request"), old.get("request_seq")
        if isinstance(old.get("models"), dict) and "caption" in old["models"]:
            models["caption"] = old["models"]["caption"]
    image_vector = job.embedding if job.embedding is not None else job.analysis.embedding
    doc: dict[str, Any] = {
        "image_id": job.image_id,
        "caption": short,
        "detailed": detailed,
        "source": source,
        "prompt": prompt,
        "request": request,
        "request_seq": request_seq,
        "tags": [
            {"tag": tag, "score": round(score, 4)}
            for tag, score in [*job.analysis.tags, *job.colours]
        ],
        "nsfw": round(job.nsfw, 4),
        "embeddings": [
            {"kind": "image", "model": embedding_model(resolved["embed"]), "vector": image_vector},
            {"kind": "text", "model": state.text.name, "vector": text_vector},
        ],
        "models": models,
        "demo": any(bool(m.get("demo")) for m in models.values()),
    }
    # Another batch (here or on another worker) may have stored a newer answer while this
    # one ran: never write over it. (The read model orders by request_seq too.)
    found = await _read_caption(ctx, job.image_id)
    if found is not None and _superseded(found[1], job):
        return [Emit(subjects.CAPTIONED, found[0], data=found[1])]
    key = subjects.image_key(job.image_id, subjects.CAPTION_DOC)
    ref = await ctx.store.put_json(key, doc)
    return [Emit(subjects.CAPTIONED, ref, data=doc)]


def _superseded(stored: dict[str, Any], job: _Job) -> bool:
    """The document stored now is newer than what ``job`` is about to write."""
    if job.mode == "reembed":  # it re-embeds the words it read: they changed meanwhile
        assert job.previous is not None
        return stored.get("request_seq") != job.previous.get("request_seq")
    newest = stored.get("request_seq")
    if job.mode == "ingest":
        return True  # a request answered first: it has everything an ingest would write
    return isinstance(newest, int) and newest > job.seq


FUNCTION = Function(
    SPEC,
    handle_batch=handle_batch,
    setup=setup,
    prepare=prepare,
    teardown=teardown,
    models=gpu_models,
    services={"embed": serve_embed, "chat": serve_chat},
)
