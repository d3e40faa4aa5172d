"""Model readiness: which models a worker has on disk, and how its downloads are going.

A model function's ``prepare`` (functions/caption/prepare.py) runs
:meth:`ModelReadiness.prepare` before the function fetches any event: it downloads what is
not cached (one download per source, whatever the number of tasks sharing it), builds the
demo models, and reports each task's model in the KV bucket ``Names.models_kv``, one entry
per worker process and task (a generation model's is ``generate/<name>``, see
:attr:`ResolvedModel.label`; its download takes only the pipeline's files), which
``/api/status`` shows:

- ``cached``: on disk when the worker started; ``downloading``: with ``bytes_done`` of
  ``bytes_total``; ``ready``: downloaded (or built) since; ``failed``: ``error`` says why,
  and the runner tries again with backoff;
- while bytes move, an entry is written at most every :data:`PUBLISH_EVERY_S`, and the log
  gets a line at each tenth of the download;
- the bucket's entries lapse :data:`READINESS_TTL_S` after their last write: a live worker
  rewrites its own every :data:`HEARTBEAT_S`, a dead worker's expire, and
  :meth:`ModelReadiness.close` deletes them at once.

Reporting never stops a download: a bucket that cannot be written (an older gateway that
did not declare it) costs one warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import nats.errors
import nats.js.errors
import orjson
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from bus.core.envelope import now_iso
from bus.infra.kvkeys import stored_keys
from bus.infra.tasks import cancel_and_wait
from bus.models.catalogue import PullError, ResolvedModel, cached_snapshot, download
from bus.models.demo import ensure_demo, is_built

log = logging.getLogger("darkroom.models")
T = TypeVar("T")

State = Literal["cached", "downloading", "ready", "failed"]
READINESS_TTL_S = 30.0
HEARTBEAT_S = 10.0
PUBLISH_EVERY_S = 0.5
DELETE_TIMEOUT_S = 5.0
_SNAPSHOT_BAR = "huggingface_hub.snapshot_download"  # its bar counts the bytes on disk


class DownloadCancelled(Exception):
    """Raised inside huggingface_hub's download threads once nobody waits for them."""


@dataclass(slots=True)
class Readiness:
    """One task's model on one worker: the entry ``/api/status`` shows."""

    task: str  # ResolvedModel.label: caption, tags... or generate/<name>
    function: str
    host: str
    pid: int
    worker: str
    source: str
    revision: str | None
    demo: bool
    state: State
    bytes_done: int = 0
    bytes_total: int | None = None
    error: str | None = None
    updated: str = ""

    @property
    def key(self) -> str:
        return f"{self.host}.{self.pid}.{self.function}.{self.task}"

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))


class ByteCount:
    """A download's progress as huggingface_hub reports it to its ``tqdm_class``, read from
    the event loop while the download runs in threads; :meth:`cancel` makes those threads
    stop at their next chunk."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = 0
        self._bar: Any = None
        self.cancelled = False

    def snapshot(self) -> tuple[int, int | None]:
        """Bytes on disk so far, and the total of the files being fetched (it grows as
        each file starts; None before the first)."""
        with self._lock:
            total = getattr(self._bar, "total", None)
            return self._done, int(total) if total else None

    def cancel(self) -> None:
        self.cancelled = True

    def tqdm_class(self) -> type[Any]:
        """A class for ``snapshot_download(tqdm_class=...)``: its bars draw nothing (a
        worker logs instead) and the byte bar reports here."""
        from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

        count = self

        class Counted(hf_tqdm):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                counts = kwargs.get("name") == _SNAPSHOT_BAR
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
                if counts:
                    with count._lock:
                        count._bar = self

            def update(self, n: float | None = 1) -> bool | None:
                if count.cancelled:
                    raise DownloadCancelled("the download is no longer wanted")
                if self is count._bar:
                    with count._lock:
                        count._done += int(n or 0)
                return super().update(n)  # type: ignore[no-any-return]

        return Counted


class ModelReadiness:
    """One worker process's readiness entries for one function (see the module docstring).

    Open with :meth:`open`; :meth:`prepare` as often as the runner retries; :meth:`close`
    when the function stops.
    """

    def __init__(self, kv: KeyValue | None, function: str, host: str, worker: str) -> None:
        self._kv = kv
        self.function = function
        self.host = host
        self.worker = worker
        self.pid = os.getpid()
        self.entries: dict[str, Readiness] = {}
        self._warned = False
        self._heartbeat: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, js: JetStreamContext, bucket: str, function: str, host: str, worker: str
    ) -> ModelReadiness:
        """Entries in ``bucket`` for ``function`` on ``host`` by ``worker`` (a name for
        people: ``worker-caption``), rewritten every :data:`HEARTBEAT_S` from now on."""
        kv: KeyValue | None
        try:
            kv = await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            log.warning(
                "%s: the KV bucket %s does not exist (a gateway of an older version?): the "
                "models' readiness is not reported in /api/status",
                function,
                bucket,
            )
            kv = None
        readiness = cls(kv, function, host, worker)
        readiness._heartbeat = asyncio.create_task(readiness._beat(), name=f"readiness:{function}")
        return readiness

    async def prepare(self, models: Iterable[ResolvedModel]) -> None:
        """Make every model loadable without the network, reporting as it goes.

        What is on disk is reported ``cached`` (a hub model too, when it has landed in the
        cache since it was resolved); demo models are built; the other hub models are
        downloaded, one source at a time, each once.

        Raises:
            PullError: a download failed (the others were still tried); its entries say
                ``failed`` with the reason.
        """
        pending: dict[tuple[str, str | None], list[ResolvedModel]] = {}
        demos: list[ResolvedModel] = []
        for model in models:
            if model.demo and not await asyncio.to_thread(is_built, Path(model.location)):
                demos.append(model)
            elif model.cached or await asyncio.to_thread(_downloaded, model):
                await self._set(model, "cached")
            else:
                pending.setdefault((model.source, model.revision), []).append(model)
                await self._set(model, "downloading")
        for model in demos:
            await asyncio.to_thread(ensure_demo, model.task, Path(model.location))
            await self._set(model, "ready")
        failures: list[str] = []
        for group in pending.values():
            try:
                await self._download(group)
            except PullError as exc:
                failures.append(str(exc))
                for model in group:
                    await self._set(model, "failed", error=str(exc))
        if failures:
            raise PullError("; ".join(failures))

    async def close(self) -> None:
        """Stop the heartbeat and delete this worker's entries (best effort: the bucket's
        TTL removes what cannot be deleted now)."""
        await cancel_and_wait(self._heartbeat)
        self._heartbeat = None
        if self._kv is not None and self.entries:
            deletes = [self._kv.delete(entry.key) for entry in self.entries.values()]
            with contextlib.suppress(Exception):  # a connection going away: the TTL will do
                await asyncio.wait_for(asyncio.gather(*deletes), DELETE_TIMEOUT_S)
        self.entries.clear()

    async def _download(self, group: list[ResolvedModel]) -> None:
        first = group[0]
        source, revision = first.source, first.revision
        assert revision is not None  # hub models have one
        name = f"{source}@{revision}"
        log.info(
            "%s: downloading %s for %s", self.function, name, ", ".join(m.label for m in group)
        )
        started = time.monotonic()
        count = ByteCount()
        bars = count.tqdm_class()
        fetching = _on_daemon_thread(
            f"download:{source}",
            lambda: download(
                first.setting,
                source,
                revision,
                bars,
                pipeline=first.format == "diffusers",
                variant=first.variant,
            ),
        )
        shown: tuple[int, int | None] = (0, None)
        tenths = 0
        try:
            while True:
                finished, _ = await asyncio.wait({fetching}, timeout=PUBLISH_EVERY_S)
                done, total = count.snapshot()
                if (done, total) != shown and not finished:
                    shown = (done, total)
                    for model in group:
                        await self._set(model, "downloading", done, total)
                    if total and done * 10 // total > tenths:
                        tenths = done * 10 // total
                        log.info(
                            "%s: downloading %s: %d%% (%s of %s)",
                            self.function, name, tenths * 10, _size(done), _size(total),
                        )  # fmt: skip
                if finished:
                    break
            fetching.result()  # raises PullError
        except BaseException:
            count.cancel()  # its threads stop at their next chunk; the cache keeps the rest
            fetching.cancel()  # what the thread ends with is nobody's business now
            raise
        done, total = count.snapshot()
        log.info(
            "%s: downloaded %s (%s) in %.0f s",
            self.function, name, _size(done), time.monotonic() - started,
        )  # fmt: skip
        for model in group:
            await self._set(model, "ready", done, total if total is not None else done)

    async def _set(
        self,
        model: ResolvedModel,
        state: State,
        done: int = 0,
        total: int | None = None,
        error: str | None = None,
    ) -> None:
        entry = Readiness(
            task=model.label,
            function=self.function,
            host=self.host,
            pid=self.pid,
            worker=self.worker,
            source=model.source,
            revision=model.revision,
            demo=model.demo,
            state=state,
            bytes_done=done,
            bytes_total=total,
            error=error,
            updated=now_iso(),
        )
        self.entries[model.label] = entry
        await self._write(entry)

    async def _write(self, entry: Readiness) -> None:
        if self._kv is None:
            return
        try:
            await self._kv.put(entry.key, entry.encode())
        except nats.errors.ConnectionClosedError:
            raise
        except Exception as exc:  # reporting must never stop a download
            if not self._warned:
                self._warned = True
                log.warning(
                    "%s: cannot report the models' readiness: %s: %s",
                    self.function,
                    type(exc).__name__,
                    exc,
                )

    async def _beat(self) -> None:
        """Rewrite every entry each :data:`HEARTBEAT_S`, so they outlive the TTL while this
        worker lives; it ends with the connection."""
        with contextlib.suppress(nats.errors.ConnectionClosedError):
            while True:
                await asyncio.sleep(HEARTBEAT_S)
                for entry in list(self.entries.values()):
                    await self._write(entry)


async def read_readiness(js: JetStreamContext, bucket: str) -> list[dict[str, Any]]:
    """Every live entry of ``bucket`` (none when it does not exist yet), by key."""
    try:
        kv = await js.key_value(bucket)
        keys = await stored_keys(js, kv)
    except nats.js.errors.BucketNotFoundError:
        return []
    found = []
    for key in keys:
        try:
            entry = await kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            continue  # deleted or expired since it was listed
        if entry.value:
            try:
                found.append(orjson.loads(entry.value))
            except orjson.JSONDecodeError:
                log.warning("ignoring an unreadable model readiness entry %s", key)
    return found


def _on_daemon_thread(name: str, work: Callable[[], T]) -> asyncio.Future[T]:
    """``work()`` on a daemon thread of its own: unlike the loop's executor, a download
    nobody waits for any more never keeps the process from exiting (asyncio.run joins the
    executor's threads; a download can take an hour)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():  # not cancelled meanwhile
            outcome()

    def run() -> None:
        try:
            result = work()
        except BaseException as exc:
            answer: Callable[[], None] = functools.partial(future.set_exception, exc)
        else:
            answer = functools.partial(future.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(settle, answer)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _downloaded(model: ResolvedModel) -> bool:
    """In the cache since it was resolved (an earlier try, another worker, a pull)."""
    if model.revision is None:
        return False
    pipeline = model.format == "diffusers"
    return cached_snapshot(model.source, model.revision, pipeline=pipeline) is not None


def _size(n: int) -> str:
    """Bytes for people: ``512 B``, ``3.4 MB``, ``1.03 GB``."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1000
    return f"{value:.3g} TB"
