"""``darkroom upload``: send image files to a running gateway, and optionally keep watching a
directory for new ones.

Files are streamed from disk (aiohttp reads file objects in a worker thread), several small
files per request or one big file alone, a few requests in flight. The gateway sniffs every
file's content, so extensions only decide which files a directory contributes.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import deque
from collections.abc import Awaitable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

import aiohttp
import orjson
from tqdm import tqdm  # type: ignore[import-untyped]
from yarl import URL

IMAGE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "png", "gif", "webp", "tif", "tiff", "heic", "heif", "avif"}
)
URL_ENV = "DARKROOM_URL"
KEY_ENV = "DARKROOM_API_KEY"
UPLOADS_PATH = "/api/uploads"
BATCH_FILES = 16
BATCH_BYTES = 64 * 1024 * 1024
DEFAULT_JOBS = 4
DEFAULT_INTERVAL_S = 1.0
CONNECT_TIMEOUT_S = 10.0
# Counted from when the body is sent: the gateway checks and stores a batch before answering.
ANSWER_TIMEOUT_S = 600.0


class UploadUsageError(Exception):
    """Bad arguments or nothing to send to (exit 2); the message says what to do."""


class UploadFailedError(Exception):
    """The gateway cannot take uploads at all: unreachable, or the key is refused (exit 1)."""


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A file to send: ``path`` as the user will recognise it, ``real`` to tell files apart."""

    path: Path
    real: str
    size: int
    mtime_ns: int

    @property
    def identity(self) -> tuple[str, int, int]:
        """Same identity, same bytes (as far as we can tell without reading them)."""
        return (self.real, self.size, self.mtime_ns)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one file: an image id, or the reason it was not accepted."""

    file: LocalFile
    image_id: str | None = None
    duplicate: bool = False
    error: str | None = None

    def line(self) -> str:
        if self.error is not None:
            return f"{self.file.path}: rejected: {self.error}"
        if self.duplicate:
            return f"{self.file.path}: duplicate of {self.image_id}"
        return f"{self.file.path}: {self.image_id}"


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    key: str

    @property
    def uploads_url(self) -> str:
        return self.url + UPLOADS_PATH


@dataclass(frozen=True, slots=True)
class UploadOptions:
    paths: tuple[Path, ...]
    data_dir: Path
    watch: Path | None = None
    url: str | None = None
    key: str | None = None
    environ: Mapping[str, str] = field(default_factory=dict)
    interval: float = DEFAULT_INTERVAL_S
    jobs: int = DEFAULT_JOBS
    quiet: bool = False


# --- finding files (blocking: run these in a thread) -------------------------------------------


def is_image_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def stat_file(path: Path) -> LocalFile:
    st = path.stat()
    return LocalFile(path, os.path.realpath(path), st.st_size, st.st_mtime_ns)


def walk_images(root: Path) -> Iterator[LocalFile]:
    """Image files under ``root``, recursively and in name order; hidden entries are skipped
    (``._photo.jpg`` and editors' temporaries are not images)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or not is_image_name(name):
                continue
            path = Path(dirpath) / name
            try:
                if path.is_file():
                    yield stat_file(path)
            except OSError:  # gone between listing and stat
                continue


def collect(paths: Iterable[Path]) -> list[LocalFile]:
    """The files to send for the command line's PATHs, each once. Files named explicitly are
    sent whatever their name; directories contribute their image files."""
    found: dict[str, LocalFile] = {}
    for path in paths:
        if path.is_dir():
            files = list(walk_images(path))
        elif path.is_file():
            files = [stat_file(path)]
        elif path.exists():
            raise UploadUsageError(f"{path} is not a file or a directory")
        else:
            raise UploadUsageError(f"{path} does not exist")
        for f in files:
            found.setdefault(f.real, f)
    return list(found.values())


def scan(directory: Path) -> dict[str, LocalFile]:
    """Image files under a watched directory right now, by real path."""
    return {f.real: f for f in walk_images(directory)}


def plan_batches(
    files: Iterable[LocalFile], max_files: int = BATCH_FILES, max_bytes: int = BATCH_BYTES
) -> list[list[LocalFile]]:
    """Group small files into requests of at most ``max_files`` and ``max_bytes``; a file of
    ``max_bytes`` or more travels alone."""
    batches: list[list[LocalFile]] = []
    current: list[LocalFile] = []
    current_bytes = 0
    for f in files:
        if f.size >= max_bytes:
            batches.append([f])
            continue
        if current and (len(current) >= max_files or current_bytes + f.size > max_bytes):
            batches.append(current)
            current, current_bytes = [], 0
        current.append(f)
        current_bytes += f.size
    if current:
        batches.append(current)
    return batches


def resolve_target(
    url: str | None, key: str | None, data_dir: Path, environ: Mapping[str, str]
) -> Target:
    """Where to send and with which key: flags, then the environment, then this machine's
    running ``darkroom up`` (its run.json and admin.key)."""
    from bus.ops.local import ADMIN_KEY_FILE, read_run_info

    url = url or environ.get(URL_ENV)
    if not url:
        url = (read_run_info(data_dir) or {}).get("gateway_url")
    if not url:
        raise UploadUsageError(
            f"no gateway to upload to: pass --url or set {URL_ENV}, or start "
            f"`darkroom up --data-dir {data_dir}` on this machine"
        )
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UploadUsageError(f"--url expects http(s)://host:port, got {url!r}")
    key = key or environ.get(KEY_ENV)
    if not key:
        key_file = data_dir / ADMIN_KEY_FILE
        try:
            key = key_file.read_text().strip()
        except FileNotFoundError:
            raise UploadUsageError(
                f"no API key: pass --key or set {KEY_ENV} (a key with the 'upload' scope), "
                f"or run `darkroom up` here, which writes {key_file}"
            ) from None
        except OSError as exc:
            raise UploadUsageError(f"cannot read the API key in {key_file}: {exc}") from None
    return Target(url.rstrip("/"), key)


def _open_all(batch: list[LocalFile]) -> list[IO[bytes] | OSError]:
    opened: list[IO[bytes] | OSError] = []
    for f in batch:
        try:
            opened.append(f.path.open("rb"))
        except OSError as exc:
            opened.append(exc)
    return opened


def _close_all(handles: Iterable[IO[bytes] | OSError]) -> None:
    for handle in handles:
        if not isinstance(handle, OSError):
            handle.close()


# --- reading the gateway's answers -------------------------------------------------------------


def _problem_text(status: int, body: Any) -> str:
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("title")
        if isinstance(detail, str) and detail:
            return f"{detail} (HTTP {status})"
    return f"the gateway answered HTTP {status}"


def _outcome(file: LocalFile, result: Any) -> Outcome:
    if not isinstance(result, dict):
        return Outcome(file, error="the gateway sent no result for this file")
    image_id = result.get("id")
    if result.get("status") in (200, 201) and isinstance(image_id, str):
        return Outcome(file, image_id, duplicate=bool(result.get("duplicate")))
    error = result.get("error")
    return Outcome(file, error=str(error) if error else f"HTTP {result.get('status')}")


def outcomes_from(batch: list[LocalFile], status: int, body: Any) -> list[Outcome]:
    """Each file's outcome from an answer to ``POST /api/uploads`` (results come in the order
    the files were sent)."""
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list):
        reason = _problem_text(status, body)
        return [Outcome(f, error=reason) for f in batch]
    padded = results + [None] * (len(batch) - len(results))
    return [_outcome(f, r) for f, r in zip(batch, padded, strict=False)]


def refused_key(url: str, status: int, body: Any) -> UploadFailedError:
    """The error for a 401 (key missing, unknown or revoked) or 403 (no 'upload' scope)."""
    detail = _problem_text(status, body)
    if status == 403:
        hint = "create one with `darkroom keys create --name NAME --scopes upload`"
    else:
        hint = f"pass a valid key with --key or {KEY_ENV}"
    return UploadFailedError(f"the gateway at {url} refused the API key: {detail}; {hint}")


async def _read_json(response: aiohttp.ClientResponse) -> Any:
    raw = await response.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


# --- progress and output -----------------------------------------------------------------------


class Progress:
    """A byte progress bar with the file count (stderr, only on a terminal) and one line per
    file on stdout."""

    def __init__(self, enabled: bool) -> None:
        self.bar = tqdm(
            total=0,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not enabled,
            delay=0.2,  # not drawn before there is something to show
        )
        self.files = self.done = 0
        self.accepted = self.duplicates = self.rejected = 0

    def add(self, files: list[LocalFile]) -> None:
        self.files += len(files)
        self.bar.total += sum(f.size for f in files)
        self._refresh()

    def advance(self, nbytes: int) -> None:
        if nbytes > 0:
            self.bar.update(nbytes)

    def report(self, outcome: Outcome) -> None:
        self.done += 1
        if outcome.error is not None:
            self.rejected += 1
        elif outcome.duplicate:
            self.duplicates += 1
        else:
            self.accepted += 1
        tqdm.write(outcome.line(), file=sys.stdout)
        sys.stdout.flush()
        self._refresh()

    def _refresh(self) -> None:
        if not self.bar.disable:
            self.bar.set_postfix_str(f"{self.done}/{self.files} files")

    def summary(self) -> str:
        return (
            f"{self.accepted} uploaded, {self.duplicates} duplicate"
            f"{'' if self.duplicates == 1 else 's'}, {self.rejected} rejected"
        )

    def close(self) -> None:
        self.bar.close()


class _Meter:
    """Bytes of one request's files sent so far, fed from aiohttp's chunk-sent trace."""

    def __init__(self, progress: Progress, expected: int) -> None:
        self.progress, self.expected, self.counted = progress, expected, 0

    def sent(self, nbytes: int) -> None:
        # Multipart headers and boundaries are sent too: never count past the files' bytes.
        step = min(nbytes, self.expected - self.counted)
        self.counted += step
        self.progress.advance(step)

    def finish(self) -> None:
        """Account for bytes never sent (a failed request), so the bar still adds up."""
        self.sent(self.expected - self.counted)


async def _on_chunk_sent(
    session: aiohttp.ClientSession,
    trace: SimpleNamespace,
    params: aiohttp.TraceRequestChunkSentParams,
) -> None:
    meter = trace.trace_request_ctx
    if isinstance(meter, _Meter):
        meter.sent(len(params.chunk))


# --- sending -----------------------------------------------------------------------------------


async def _all_or_none(coros: Iterable[Awaitable[None]]) -> None:
    """Run ``coros`` together; the first to fail cancels the rest and its error propagates."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Uploader:
    """Sends files in batches, ``jobs`` requests at a time; remembers what it sent."""

    def __init__(
        self, session: aiohttp.ClientSession, target: Target, progress: Progress, jobs: int
    ) -> None:
        self.session, self.target, self.progress, self.jobs = session, target, progress, jobs
        self.sent: set[tuple[str, int, int]] = set()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.target.key}", "Accept": "application/json"}

    def _unreachable(self, exc: aiohttp.ClientConnectorError) -> UploadFailedError:
        err = exc.os_error
        why = os.strerror(err.errno) if err.errno and err.errno > 0 else (err.strerror or str(err))
        return UploadFailedError(f"cannot reach the gateway at {self.target.url}: {why}")

    async def check(self) -> None:
        """Fail early if the gateway is unreachable or refuses the key: an empty, non-multipart
        POST passes the key check and is then refused for its content type (415)."""
        try:
            async with self.session.post(
                self.target.uploads_url, data=b"", headers=self._headers()
            ) as response:
                body = await _read_json(response)
        except aiohttp.ClientConnectorError as exc:
            raise self._unreachable(exc) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            why = str(exc) or type(exc).__name__
            raise UploadFailedError(f"the gateway at {self.target.url} failed: {why}") from None
        if response.status in (401, 403):
            raise refused_key(self.target.url, response.status, body)
        if response.status in (404, 405):
            raise UploadFailedError(
                f"{self.target.url} does not look like a darkroom gateway "
                f"(POST {UPLOADS_PATH} answered HTTP {response.status})"
            )

    async def upload(self, files: list[LocalFile]) -> None:
        """Send ``files``, reporting each one's outcome as its request completes."""
        files = [f for f in files if f.identity not in self.sent]
        self.sent.update(f.identity for f in files)
        if not files:
            return
        self.progress.add(files)
        queue = deque(plan_batches(files))

        async def work() -> None:
            while queue:
                for outcome in await self._send(queue.popleft()):
                    self.progress.report(outcome)

        await _all_or_none(work() for _ in range(min(self.jobs, len(queue))))

    async def _send(self, batch: list[LocalFile]) -> list[Outcome]:
        meter = _Meter(self.progress, sum(f.size for f in batch))
        handles = await asyncio.to_thread(_open_all, batch)
        try:
            unreadable = [
                Outcome(f, error=f"cannot read it: {h.strerror or h}")
                for f, h in zip(batch, handles, strict=True)
                if isinstance(h, OSError)
            ]
            readable = [
                (f, h) for f, h in zip(batch, handles, strict=True) if not isinstance(h, OSError)
            ]
            if not readable:
                return unreadable
            return unreadable + await self._post(readable, meter)
        finally:
            await asyncio.to_thread(_close_all, handles)
            meter.finish()

    async def _post(self, parts: list[tuple[LocalFile, IO[bytes]]], meter: _Meter) -> list[Outcome]:
        files = [f for f, _ in parts]
        form = aiohttp.FormData()
        for f, handle in parts:
            form.add_field(
                "file", handle, filename=f.path.name, content_type="application/octet-stream"
            )
        try:
            async with self.session.post(
                self.target.uploads_url,
                data=form,
                headers=self._headers(),
                trace_request_ctx=meter,
            ) as response:
                body = await _read_json(response)
        except aiohttp.ClientConnectorError as exc:
            raise self._unreachable(exc) from None
        except aiohttp.ClientError as exc:
            return [Outcome(f, error=f"the request failed: {exc}") for f in files]
        except TimeoutError:
            return [Outcome(f, error="the gateway did not answer in time") for f in files]
        if response.status in (401, 403):
            raise refused_key(self.target.url, response.status, body)
        return outcomes_from(files, response.status, body)


# --- watching ----------------------------------------------------------------------------------


async def _stopped(stop: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), timeout)
    except TimeoutError:
        return False
    return True


async def watch(directory: Path, uploader: Uploader, interval: float, stop: asyncio.Event) -> None:
    """Upload image files that appear or change under ``directory`` once they have stopped
    growing (same size and mtime on two polls in a row), until ``stop`` is set. Files
    already there when watching starts are left alone."""
    previous = await asyncio.to_thread(scan, directory)
    uploader.sent.update(f.identity for f in previous.values())
    print(f"watching {directory} for new images (Ctrl-C to stop)", file=sys.stderr, flush=True)
    while not await _stopped(stop, interval):
        current = await asyncio.to_thread(scan, directory)
        settled = [
            f
            for real, f in current.items()
            if f.size > 0
            and f.identity not in uploader.sent
            and real in previous
            and previous[real].identity == f.identity
        ]
        previous = current
        await uploader.upload(settled)


# --- the command -------------------------------------------------------------------------------


def _check_watch_dir(directory: Path | None) -> None:
    if directory is not None and not directory.is_dir():
        raise UploadUsageError(f"--watch expects a directory, and {directory} is not one")


async def run_upload(options: UploadOptions) -> int:
    """Upload ``options.paths``, then watch ``options.watch`` if given. Returns the exit code:
    0 when every file was accepted (duplicates included), 1 when any was rejected."""
    if not options.paths and options.watch is None:
        raise UploadUsageError("nothing to upload: name files or directories, or --watch DIR")
    await asyncio.to_thread(_check_watch_dir, options.watch)
    files = await asyncio.to_thread(collect, options.paths)
    target = await asyncio.to_thread(
        resolve_target, options.url, options.key, options.data_dir, options.environ
    )
    if options.paths and not files:
        shown = ", ".join(str(p) for p in options.paths)
        print(f"darkroom: no image files in {shown}", file=sys.stderr)
    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(_on_chunk_sent)
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=ANSWER_TIMEOUT_S
    )
    progress = Progress(enabled=not options.quiet and sys.stdout.isatty())
    try:
        async with aiohttp.ClientSession(timeout=timeout, trace_configs=[trace]) as session:
            uploader = Uploader(session, target, progress, options.jobs)
            await uploader.check()
            await uploader.upload(files)
            if options.watch is not None:
                await _watch_until_signalled(options.watch, uploader, options.interval)
    finally:
        progress.close()
    if progress.files:
        print(f"darkroom: {progress.summary()}", file=sys.stderr)
    return 1 if progress.rejected else 0


async def _watch_until_signalled(directory: Path, uploader: Uploader, interval: float) -> None:
    """First SIGINT/SIGTERM: finish the uploads in flight and stop; a second exits at once."""
    from bus.ops.signals import Stopper

    stopper = Stopper()
    stopper.install()
    await watch(directory, uploader, interval, stopper.event)
