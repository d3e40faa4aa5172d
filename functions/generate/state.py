"""What the generate function keeps per process: its settings, and each catalogue model it
has resolved, as a :class:`bus.Model` to load under a VRAM lease.

Models are resolved when a job first names them (a bounded hub check, no download), not
at start: the catalogue may name many pipelines, and a worker loads only those asked of
it. ``prepare`` downloads the default model before the first event; another model a job
names is downloaded for that job, its progress shown as the job's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field

from bus import Context, Model
from bus.core.settings import Settings
from bus.models.catalogue import ResolvedModel, default_generation_model, resolve_generation
from bus.models.progress import ModelReadiness
from functions.generate.admin import UnloadSubject
from functions.generate.pipelines import model_for

log = logging.getLogger("darkroom.generate")


@dataclass
class GenerateState:
    settings: Settings
    default_model: str  # what a job naming no model runs here (CPU hosts: a fast one)
    readiness: ModelReadiness | None = None
    unload: UnloadSubject | None = None  # this worker's own unload subject (admin.py)
    _models: dict[str, tuple[Model, ResolvedModel]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def model(self, name: str) -> tuple[Model, ResolvedModel]:
        """The leased Model of catalogue model ``name`` and what it resolved to (blocking:
        resolving may ask the hub, bounded). Raises ModelUnavailableError with a fix."""
        with self._lock:
            found = self._models.get(name)
            if found is None:
                resolved = resolve_generation(self.settings, name)
                found = (model_for(name, resolved, self.settings), resolved)
                self._models[name] = found
            return found

    def forget(self, name: str) -> None:
        """Resolve ``name`` again next time (it was downloaded meanwhile)."""
        with self._lock:
            self._models.pop(name, None)


async def setup(ctx: Context) -> GenerateState:
    default = await asyncio.to_thread(default_generation_model, ctx.settings)
    state = GenerateState(settings=ctx.settings, default_model=default)
    state.unload = await UnloadSubject.open(ctx)
    return state


def gpu_models(state: GenerateState) -> list[Model]:
    """What ``high`` mode preloads: the default model."""
    return [state.model(state.default_model)[0]]
