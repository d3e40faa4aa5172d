"""What the caption function sets up once per process: its resolved models and vocabulary.

``setup`` resolves every task's model from the settings (a bounded hub check, no
download) into :class:`CaptionState`; each invocation and service gets it as
``call.state``/``state``. GPU models are :class:`bus.Model` objects loaded under VRAM
leases on use (``ctx.gpu.use``); the NSFW scorer and the caption-text embedder are small
CPU models, each loaded once on first use and run on the CPU pool.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from bus import Context, Model
from bus.core.settings import Settings
from bus.models.catalogue import ModelUnavailableError, ResolvedModel, resolve
from bus.models.demo import ensure_demo
from bus.models.progress import ModelReadiness
from functions.caption.models import (
    CaptionModels,
    NsfwModel,
    default_vocabulary,
    load_nsfw,
    model_for,
)
from functions.caption.textembed import TextEmbedder

T = TypeVar("T")


class Once(Generic[T]):
    """A value built on first use, by one thread, whichever asks first."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._value: T | None = None

    def get(self) -> T:
        with self._lock:
            if self._value is None:
                self._value = self._build()
            return self._value


def read_vocabulary(path: Path) -> tuple[str, ...]:
    lines = (line.strip() for line in path.read_text().splitlines())
    tags = tuple(dict.fromkeys(t for t in lines if t and not t.startswith("#")))
    if not tags:
        raise ValueError(f"the tag vocabulary {path} holds no tags")
    return tags


def _nsfw_loader(resolved: ResolvedModel) -> Callable[[], NsfwModel]:
    def build() -> NsfwModel:
        if resolved.demo:
            ensure_demo(resolved.task, Path(resolved.location))
        return load_nsfw(resolved.on_disk(), "cpu")

    return build


@dataclass
class CaptionState:
    """The caption function's per-process state (see the module docstring)."""

    settings: Settings
    models: CaptionModels  # caption, tags and embed: leased GPU models
    nsfw: Once[NsfwModel]
    text: TextEmbedder  # caption-text embeddings (MiniLM, CPU)
    vocabulary: tuple[str, ...]
    readiness: ModelReadiness | None = None  # prepare's: this worker's models in /api/status
    _alternatives: dict[str, Model] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> CaptionState:
        """Resolve the models (blocking: it may ask the hub, bounded); downloads nothing."""
        options = settings.caption
        models = CaptionModels.from_settings(settings)
        vocabulary = (
            read_vocabulary(options.vocabulary) if options.vocabulary else default_vocabulary()
        )
        return cls(
            settings=settings,
            models=models,
            nsfw=Once(_nsfw_loader(models.resolved["nsfw"])),
            text=TextEmbedder(),
            vocabulary=vocabulary,
        )

    @property
    def gpu_models(self) -> list[Model]:
        """Each distinct leased model once (tags and embed may share one)."""
        return list(self.models.all)

    @property
    def demo(self) -> bool:
        """Any of the results would come from a tiny random demo model."""
        return any(r.demo for r in self.models.resolved.values())

    def identities(self) -> dict[str, Any]:
        """The model of each part of a caption document, for the record."""
        found: dict[str, Any] = {t: r.identity() for t, r in self.models.resolved.items()}
        found["text"] = self.text.identity()
        return found

    def caption_model(self, source: str | None) -> tuple[Model, ResolvedModel]:
        """The captioner to use: the configured one, or (for a re-caption that names one of
        ``caption.alternatives``) another source, resolved like the configured one and
        already on this machine (nothing downloads for a request).

        Blocking (it may ask the hub). Raises ModelUnavailableError with a fix.
        """
        configured = self.models.resolved["caption"]
        if source is None or source == configured.source:
            return self.models.caption, configured
        allowed = self.settings.caption.alternatives
        if source not in allowed:
            raise ModelUnavailableError(
                f"{source!r} is not a caption model of this deployment: use one of "
                f"{', '.join(allowed) or '(none: set caption.alternatives)'}"
            )
        model = self._alternatives.get(source)
        entry = self.settings.models.caption.model_copy(update={"source": source})
        resolved = resolve(
            self.settings.model_copy(
                update={"models": self.settings.models.model_copy(update={"caption": entry})}
            ),
            "caption",
        ).on_disk()
        if model is None:
            model = model_for(resolved, self.settings.caption)
            self._alternatives[source] = model
        return model, resolved


async def setup(ctx: Context) -> CaptionState:
    return await asyncio.to_thread(CaptionState.from_settings, ctx.settings)


def gpu_models(state: CaptionState) -> list[Model]:
    return state.gpu_models
