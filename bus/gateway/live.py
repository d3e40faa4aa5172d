"""What the gateway knows of generation jobs right now, beyond the read model.

One :class:`Live` per gateway holds two kinds of core-NATS subscription:

- step progress (``<ns>-live.progress.*``, sent by the runner for the generate stage): the
  newest report per job, kept while reports keep coming (dropped after :data:`KEEP_S` of
  silence, or when the job ends). A queued job with progress is ``running`` with its step,
  total and message (:meth:`Live.document`).
  Every report, of any stage, also goes to the listeners (:meth:`Live.listen`): the event
  streams of ``GET /api/events`` forward them, so the gateway subscribes to progress once.
- the job's ends (``generated``, ``failed.generate``, ``cancelled.generate``: a message
  JetStream stores reaches plain subscribers too), which wake whoever waits for the job
  (:meth:`Live.wait`) to read it again at once. A waiter also re-reads the read model on
  its own every :data:`RECHECK_S`, so a message it missed cannot hang it.

Nothing here is stored: another gateway, or this one after a restart, knows the same from
the next progress report on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from aiohttp import web
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.core import subjects
from bus.core.envelope import EnvelopeError, decode
from bus.gateway.images import query_db
from bus.gateway.problems import Problem
from bus.gateway.state import CTX
from bus.infra.store import ObjectMissingError, StoreError
from bus.runtime.context import Context
from bus.state.generations import FINISHED, STAGE, request_document
from bus.state.readmodel import ReadModelError

KEEP_S = 60.0  # a job silent this long is no longer shown as running
RECHECK_S = 2.0  # a waiter reads the read model at least this often
FIRST_RECHECK_S = 0.05  # after a job's end arrives: notify projects it within milliseconds
MAX_JOBS = 4096  # jobs whose progress is kept; beyond, the longest silent goes first
ACTIVE = ("queued", "running")


class Live:
    """Live progress of generation jobs, and waiting for one to end (see the module)."""

    def __init__(self, ctx: Context, keep_s: float = KEEP_S, recheck_s: float = RECHECK_S) -> None:
        self._ctx = ctx
        self._keep_s = keep_s
        self._recheck_s = recheck_s
        self._progress: dict[str, tuple[float, dict[str, Any]]] = {}  # job -> (when, report)
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._subs: list[Subscription] = []
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    async def start(self) -> None:
        names, nc = self._ctx.names, self._ctx.nc
        self._subs.append(await nc.subscribe(names.all_progress, cb=self._on_progress))
        for subject in (
            names.subject(subjects.GENERATED),
            names.failed(STAGE),
            names.cancelled(STAGE),
        ):
            self._subs.append(await nc.subscribe(subject, cb=self._on_end))

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):  # the connection may be closing already
                await sub.unsubscribe()
        self._subs.clear()

    def listen(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Hand ``listener`` every step report, of any stage, as it arrives (a JSON object,
        as :class:`bus.runtime.call.Progress` sends it)."""
        self._listeners.append(listener)

    def unlisten(self, listener: Callable[[dict[str, Any]], None]) -> None:
        self._listeners.remove(listener)

    def progress(self, job_id: str) -> dict[str, Any] | None:
        """The job's newest step report, if one came within :data:`KEEP_S`:
        ``{step, total, message, time}``, plus ``preview`` (a ``data:`` URL) when the
        report had one."""
        held = self._progress.get(job_id)
        if held is None:
            return None
        if time.monotonic() - held[0] > self._keep_s:
            self._progress.pop(job_id, None)
            return None
        return dict(held[1])

    async def document(self, job_id: str, preview: bool = False) -> dict[str, Any] | None:
        """The job as known now: its read-model document (or, before notify has projected
        it, its stored request, queued), with live progress merged in: a queued job with
        progress is ``running``, with ``progress: {step, total, message, time}`` (and
        ``preview``, a ``data:`` URL, when asked for and there is one). None: no such job.
        Raises :class:`bus.gateway.problems.Problem` (503) when the database or the store
        is down."""
        db = self._ctx.db
        if db is None:
            raise Problem(503, "Service Unavailable", "this gateway has no read model configured")
        doc = await query_db(lambda: db.generations.get(job_id))
        if doc is None:
            doc = await self._stored(job_id)
            if doc is None:
                return None
        return self.merge(doc, preview)

    def merge(self, doc: dict[str, Any], preview: bool = False) -> dict[str, Any]:
        """A job document with the live progress merged in (see :meth:`document`)."""
        report = self.progress(doc["id"]) if doc["status"] in ACTIVE else None
        if report is None:
            return doc
        image = report.pop("preview", None)
        if preview and image is not None:
            report["preview"] = image
        return {**doc, "status": "running", "progress": report}

    async def wait(self, job_id: str, timeout: float) -> dict[str, Any] | None:
        """The job's document (:meth:`document`) once it is done, failed or cancelled, or
        as it stands when ``timeout`` seconds have passed (status queued or running then);
        None when no such job is known by then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        woken = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(woken)
        try:
            pause = FIRST_RECHECK_S
            while True:
                doc = await self.document(job_id)
                remaining = deadline - loop.time()
                if (doc is not None and doc["status"] in FINISHED) or remaining <= 0:
                    return doc
                try:
                    async with asyncio.timeout(min(pause, remaining)):
                        await woken.wait()
                    woken.clear()
                    pause = FIRST_RECHECK_S  # its end arrived: read again soon, and again
                except TimeoutError:
                    pause = min(pause * 2, self._recheck_s)
        finally:
            waiting = self._waiters.get(job_id, set())
            waiting.discard(woken)
            if not waiting:
                self._waiters.pop(job_id, None)

    async def _stored(self, job_id: str) -> dict[str, Any] | None:
        """A job the gateway stored that no event has brought to the read model yet."""
        if not subjects.is_safe_id(job_id):
            return None
        try:
            doc = await self._ctx.store.get_json(subjects.request_key(job_id))
        except ObjectMissingError:
            return None
        except StoreError as exc:
            raise Problem(503, "Service Unavailable", f"the store did not answer: {exc}") from None
        try:
            return request_document(doc) if isinstance(doc, dict) else None
        except ReadModelError:
            return None

    async def _on_progress(self, msg: Msg) -> None:
        try:
            report = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(report, dict):
            return
        for listener in self._listeners:
            listener(report)
        if report.get("stage") != STAGE:
            return  # another stage's work on an image (an output being ingested, say)
        job_id = report.get("job_id")
        step, total = report.get("step"), report.get("total")
        if not isinstance(job_id, str) or not isinstance(step, int) or not isinstance(total, int):
            return
        kept: dict[str, Any] = {
            "step": step,
            "total": total,
            "message": str(report.get("message") or ""),
            "time": report.get("time"),
        }
        kind, data = report.get("preview_type"), report.get("preview_b64")
        if isinstance(kind, str) and isinstance(data, str):
            kept["preview"] = f"data:{kind};base64,{data}"
        now = time.monotonic()
        self._progress.pop(job_id, None)  # re-inserted last: the dict runs oldest first
        self._progress[job_id] = (now, kept)
        oldest = next(iter(self._progress))  # the silent and the surplus go first
        while len(self._progress) > MAX_JOBS or now - self._progress[oldest][0] > self._keep_s:
            del self._progress[oldest]
            oldest = next(iter(self._progress))

    async def _on_end(self, msg: Msg) -> None:
        try:
            job_id = decode(msg.data).job_id
        except EnvelopeError:
            return
        if not job_id:
            return
        self._progress.pop(job_id, None)  # more progress (another output to make) re-adds it
        for woken in self._waiters.get(job_id, ()):
            woken.set()


LIVE = web.AppKey("live", Live)


async def lifespan(app: web.Application) -> AsyncIterator[None]:
    """The app's :class:`Live`, subscribed while the app runs (``app[LIVE]``)."""
    live = Live(app[CTX])
    await live.start()
    app[LIVE] = live
    yield
    await live.stop()
