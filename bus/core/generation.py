"""A generation job: what a request asks for, checked once, stored, and run as asked.

The gateway checks a request (:func:`check_request`) before anything is queued: every
refusal says what was expected and what came ("width must be a multiple of 8, got 1000").
The checked request is a :class:`Job`, stored as ``requests/<job>.json``; that object's
``requested`` event fires the generate function, which reads the job back with
:meth:`Job.from_doc` (the same checks again: a stored document is input too).

Jobs that agree on :attr:`Job.batch_key` run as one pipeline call; each output has its own
seed (``seed + i``), so the same job gives the same pixels whatever it was batched with.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from bus.core.settings import GENERATE_MODES, SCHEDULERS, GenerateMode, GenerateSettings
from bus.core.subjects import check_id, is_safe_id

MAX_SEED = 2**53 - 1  # exact in JSON and JavaScript
MIN_SIDE = 64
SIDE_MULTIPLE = 8  # latents are 1/8 of the image (some models want more: side_multiple)
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # all but tab and newline
NEEDS_IMAGE: frozenset[str] = frozenset({"img2img", "remix", "sketch", "enhance"})
DEFAULT_STRENGTH: dict[str, float] = {
    "img2img": 0.6,
    "remix": 0.6,  # a variation: the composition stays, the details move
    "sketch": 0.85,  # a drawing is only a hint of layout and colour
    "enhance": 0.3,  # after upscaling: refine the detail, keep the picture
}


class GenerationError(ValueError):
    """A request (or a stored job) that cannot run; the message is meant for the user."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class InitImage:
    """The picture an image-to-image job starts from: an object in the store, and the
    catalogue image it is (None for an image sent with the request itself)."""

    key: str
    image_id: str | None = None


@dataclass(frozen=True, slots=True)
class Job:
    """A checked generation request, complete: every default is filled in."""

    id: str
    created: str  # ISO 8601
    prompt: str
    negative_prompt: str
    model: str | None  # a catalogue name; None: the running worker's default
    width: int | None  # None (here and below): the model's default
    height: int | None
    steps: int | None
    guidance: float | None
    seed: int
    n: int
    mode: GenerateMode
    scheduler: str | None = None  # None: the pipeline's own
    strength: float | None = None  # image modes only
    init: InitImage | None = None
    source: str = "api"  # api | openai | cli | hook: where it came from, for the record
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the OpenAI response format

    @property
    def seeds(self) -> list[int]:
        """One seed per output: ``seed``, ``seed + 1``... (wrapping within MAX_SEED)."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.n)]

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one pipeline call."""
        return (
            self.model,
            self.width,
            self.height,
            self.steps,
            self.guidance,
            self.mode,
            self.scheduler,
            self.strength,
            # With guidance on, SDXL encodes an empty negative prompt differently from none:
            # jobs with and without one must not share a call.
            bool(self.negative_prompt) and bool(self.guidance and self.guidance > 1),
        )

    def resolved(self, settings: GenerateSettings, model: str | None = None) -> Job:
        """This job with every default filled in from ``model`` (a catalogue name: the
        job's own, else the one given, else the default model). Raises
        :class:`GenerationError` when the combination cannot run."""
        problems: list[str] = []
        values = {**self.to_doc(), "model": self.model or model or settings.default_model}
        checked = _check(values, settings, problems, has_init=self.init is not None, fill=True)
        if problems:
            raise GenerationError(problems)
        return replace(self, **checked)

    @property
    def parent(self) -> str | None:
        return self.init.image_id if self.init is not None else None

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        if self.init is None:
            doc.pop("init")
        return doc

    @classmethod
    def from_doc(cls, doc: Any, settings: GenerateSettings) -> Job:
        """A stored job, checked again (raises :class:`GenerationError`)."""
        if not isinstance(doc, dict):
            raise GenerationError([f"a job document must be an object, got {type(doc).__name__}"])
        problems: list[str] = []
        job_id = doc.get("id")
        if not isinstance(job_id, str) or not is_safe_id(job_id):
            problems.append(f"id must be a job id, got {job_id!r}")
        init_doc = doc.get("init")
        init: InitImage | None = None
        if init_doc is not None:
            key, image_id = (
                (init_doc.get("key"), init_doc.get("image_id"))
                if isinstance(init_doc, dict)
                else (None, None)
            )
            if (
                not isinstance(key, str)
                or not key
                or (
                    image_id is not None
                    and (not isinstance(image_id, str) or not is_safe_id(image_id))
                )
            ):
                problems.append("init must be {key, image_id}")
            elif not _init_key_allowed(key, image_id, job_id):
                problems.append(
                    f"init.key must be the image's own object or the job's, got {key[:120]!r}"
                )
            else:
                init = InitImage(key, image_id)
        values = {
            k: doc.get(k)
            for k in (
                "prompt",
                "negative_prompt",
                "model",
                "width",
                "height",
                "steps",
                "guidance",
                "seed",
                "n",
                "mode",
                "scheduler",
                "strength",
            )
        }
        checked = _check(values, settings, problems, has_init=init is not None)
        if problems:
            raise GenerationError(problems)
        extra = doc.get("extra") or {}
        return cls(
            id=str(job_id),
            created=str(doc.get("created", "")),
            init=init,
            source=str(doc.get("source", "api")),
            extra=extra if isinstance(extra, dict) else {},
            **checked,
        )


def check_request(
    values: dict[str, Any],
    settings: GenerateSettings,
    *,
    job_id: str,
    created: str,
    seed: int,
    init: InitImage | None = None,
    source: str = "api",
    extra: dict[str, Any] | None = None,
) -> Job:
    """Check a request's fields (absent or None: the model's default) into a :class:`Job`.

    ``seed`` is used when the request gives none (the caller draws it, so the job records
    the seed that made its pixels). Raises :class:`GenerationError` listing every problem.
    """
    check_id(job_id, "job id")
    problems: list[str] = []
    values = dict(values)
    if values.get("seed") is None:
        values["seed"] = seed
    checked = _check(values, settings, problems, has_init=init is not None)
    if problems:
        raise GenerationError(problems)
    job = Job(id=job_id, created=created, init=init, source=source, extra=extra or {}, **checked)
    # What depends on the model's defaults (steps x strength, size bounds), for each model
    # the job may run on: a job that cannot run never reaches the queue.
    for name in [job.model] if job.model else default_candidates(settings):
        try:
            job.resolved(settings, name)
        except GenerationError as exc:
            problems += [f"with model {name}: {p}" for p in exc.problems if p not in problems]
    if problems:
        raise GenerationError(problems)
    return job


def default_candidates(settings: GenerateSettings) -> list[str]:
    """The catalogue models "the default" can mean on some worker: ``default_model``, and
    on a host without CUDA ``cpu_model`` when ``default_model`` was left unset."""
    names = [settings.default_model]
    if "default_model" not in settings.model_fields_set and settings.cpu_model not in names:
        names.append(settings.cpu_model)
    return names


def _init_key_allowed(key: str, image_id: str | None, job_id: Any) -> bool:
    """An init image is the catalogue image's own object or one stored with the job; a
    job document naming any other key (e.g. another image's original) is refused."""
    if image_id is not None:
        return key.startswith(f"images/{image_id}/")
    return isinstance(job_id, str) and is_safe_id(job_id) and key.startswith(f"requests/{job_id}/")


def _check(
    values: dict[str, Any],
    settings: GenerateSettings,
    problems: list[str],
    *,
    has_init: bool,
    fill: bool = False,
) -> dict[str, Any]:
    """Every field checked; what is wrong is added to ``problems``.

    Without ``fill`` a field left out stays None (and so does ``model``): the worker that
    runs the job fills them from the model it picks (:meth:`Job.resolved`), so a CPU-only
    worker can answer "the default" with a model sized for it. With ``fill`` every field
    gets the model's default.
    """
    catalogue = settings.catalogue
    mode = values.get("mode")
    if mode is None:
        mode = "txt2img"
    if not isinstance(mode, str) or mode not in GENERATE_MODES:
        problems.append(f"mode must be one of {', '.join(GENERATE_MODES)}, got {mode!r}")
        mode = "txt2img"
    model_name = values.get("model")
    if fill and model_name is None:
        model_name = settings.default_model
    entry = None
    if model_name is not None:
        entry = catalogue.get(model_name) if isinstance(model_name, str) else None
        if entry is None:
            problems.append(
                f"model must be one of {', '.join(sorted(catalogue))}, got {model_name!r}"
            )
            model_name = None

    def number(name: str, default: Any, kind: type) -> Any:
        value = values.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{name} must be a number, got {value!r}")
            return default
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                problems.append(f"{name} must be a whole number, got {value!r}")
                return default
            return int(value)
        if not math.isfinite(value):
            problems.append(f"{name} must be a finite number, got {value!r}")
            return default
        return float(value)

    def default(name: str) -> Any:
        return getattr(entry, name) if entry is not None and fill else None

    prompt = values.get("prompt")
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        problems.append(f"prompt must be text, got {type(prompt).__name__}")
    elif not prompt.strip():
        problems.append("prompt must not be blank")
    if not isinstance(prompt, str):
        prompt = ""
    negative = values.get("negative_prompt")
    if negative is None:
        negative = ""
    if not isinstance(negative, str):
        problems.append(f"negative_prompt must be text, got {type(negative).__name__}")
        negative = ""
    for name, text in (("prompt", prompt), ("negative_prompt", negative)):
        bad = CONTROL.search(text)
        if bad is not None:
            problems.append(
                f"{name} must not contain control characters, got U+{ord(bad.group()):04X} at "
                f"{bad.start()}"
            )
        if len(text) > settings.max_prompt_chars:
            problems.append(
                f"{name} must be at most {settings.max_prompt_chars} characters, got {len(text)}"
            )
    width = number("width", default("width"), int)
    height = number("height", default("height"), int)
    multiple = entry.side_multiple if entry is not None else SIDE_MULTIPLE
    for name, side in (("width", width), ("height", height)):
        if side is None:
            continue
        if side % multiple:
            model = f" for {model_name}" if multiple != SIDE_MULTIPLE else ""
            problems.append(f"{name} must be a multiple of {multiple}{model}, got {side}")
        if not MIN_SIDE <= side <= settings.max_side:
            problems.append(
                f"{name} must be between {MIN_SIDE} and {settings.max_side}, got {side}"
            )
    if width is not None and height is not None and width * height > settings.max_pixels:
        problems.append(
            f"width x height must be at most {settings.max_pixels:,} pixels, got "
            f"{width}x{height} = {width * height:,}"
        )
    steps = number("steps", default("steps"), int)
    if steps is not None and not 1 <= steps <= settings.max_steps:
        problems.append(f"steps must be between 1 and {settings.max_steps}, got {steps}")
    guidance = number("guidance", default("guidance"), float)
    if guidance is not None and not 0 <= guidance <= 30:
        problems.append(f"guidance must be between 0 and 30, got {guidance}")
    seed = number("seed", 0, int)
    if not 0 <= seed <= MAX_SEED:
        problems.append(f"seed must be between 0 and {MAX_SEED}, got {seed}")
    n = number("n", 1, int)
    if not 1 <= n <= settings.max_n:
        problems.append(f"n must be between 1 and {settings.max_n}, got {n}")
    scheduler = values.get("scheduler")
    if scheduler is None:
        scheduler = default("scheduler")
    if scheduler is not None and (not isinstance(scheduler, str) or scheduler not in SCHEDULERS):
        problems.append(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
        scheduler = None
    strength = number("strength", DEFAULT_STRENGTH.get(mode), float)
    if (
        fill
        and values.get("steps") is None
        and mode in NEEDS_IMAGE
        and strength is not None
        and 0 < strength <= 1
        and steps is not None
    ):
        # A few-step model's default steps times a low strength can make no denoising
        # step at all: take the fewest steps that make one.
        steps = min(max(steps, math.ceil(1 / strength - 1e-9)), settings.max_steps)
    if mode in NEEDS_IMAGE:
        if not has_init:
            problems.append(f"mode {mode} needs an image")
        if strength is not None and not 0 < strength <= 1:
            problems.append(f"strength must be in (0, 1], got {strength}")
        elif strength is not None and steps is not None and steps * strength < 1:
            problems.append(
                f"steps x strength must be at least 1 (one denoising step), got {steps} x "
                f"{strength}"
            )
    else:
        if values.get("strength") is not None:
            problems.append(f"strength applies to the image modes, not {mode}")
        if has_init:
            problems.append(f"mode {mode} takes no image: use img2img, remix, sketch or enhance")
        strength = None
    return {
        "prompt": prompt.strip(),
        "negative_prompt": negative.strip(),
        "model": model_name,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "n": n,
        "mode": mode,
        "scheduler": scheduler,
        "strength": strength,
    }
