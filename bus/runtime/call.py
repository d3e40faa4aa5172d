"""One invocation's handle, passed to the handler beside the process-wide context.

It says which attempt this is and by when the handler must finish, carries a logger that
names the event, reports step progress on the live subject, and tells the handler when
someone cancelled its job. Progress and cancellation work from any thread, so a diffusers
step callback running on the GPU thread can report and poll directly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import orjson

from bus.core.contract import Cancelled
from bus.core.envelope import Event, now_iso

PROGRESS_INTERVAL_S = 0.25  # at most this often on the wire, per invocation
MAX_PREVIEW_BYTES = 256 * 1024
_PROGRESS_LOCK = threading.Lock()

Send = Callable[[str, bytes], Coroutine[Any, Any, None]]

_PREVIEW_TYPES = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG", "image/png"),
    (b"RIFF", "image/webp"),
)


@dataclass(frozen=True, slots=True)
class ProgressUpdate:
    step: int
    total: int
    message: str = ""
    preview: bytes | None = None

    @property
    def final(self) -> bool:
        return self.step >= self.total


class _EventLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes each line with the stage and the event's ids."""

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            prefix = str(self.extra["prefix"]) if self.extra else ""
            if args:  # the line is %-formatted: a '%' in an event id must stay literal
                prefix = prefix.replace("%", "%%")
            self.logger.log(level, f"{prefix}: {msg}", *args, **kwargs)


class Progress:
    """Throttled progress for one invocation: the newest update wins.

    An update is sent at once when the last one went out at least ``interval`` ago, or when
    it is the final step; otherwise the newest update is sent when the interval is up, so
    a burst of steps costs a few messages and the last state always arrives.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        send: Send,
        subject: str,
        about: dict[str, Any],
        interval: float = PROGRESS_INTERVAL_S,
    ) -> None:
        self._loop = loop
        self._send = send
        self._subject = subject
        self._about = about
        self._interval = interval
        self._pending: ProgressUpdate | None = None
        self._last_sent = -interval
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def report(self, update: ProgressUpdate) -> None:
        """Safe from any thread. After :meth:`close` (the invocation is over, though a
        thread of it may still run) updates are dropped."""
        if self._closed:
            return
        if _on_loop(self._loop):
            self._offer(update)
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody to tell
            self._loop.call_soon_threadsafe(self._offer, update)

    def _offer(self, update: ProgressUpdate) -> None:
        if self._closed:
            return
        self._pending = update
        due = self._last_sent + self._interval - time.monotonic()
        if due <= 0 or update.final:
            self._flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(due, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        update, self._pending = self._pending, None
        if update is None:
            return
        self._last_sent = time.monotonic()
        doc: dict[str, Any] = {
            **self._about,
            "step": update.step,
            "total": update.total,
            "message": update.message,
            "time": now_iso(),
        }
        if update.preview is not None:
            doc["preview_type"] = _preview_type(update.preview)
            doc["preview_b64"] = base64.b64encode(update.preview).decode()
        task = self._loop.create_task(self._send(self._subject, orjson.dumps(doc)))
        self._tasks.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logging.getLogger("darkroom.progress").debug("progress not sent: %s", task.exception())

    def close(self) -> None:
        """Send what is pending now (the invocation is over); drop anything later."""
        if self._pending is not None:
            self._flush()
        self._closed = True


class Call:
    """What one handler invocation knows about itself (see the module docstring).

    Cheap to make (the runner makes one per event): the logger and the progress throttle
    are built on first use.
    """

    __slots__ = (
        "_cancel_reason",
        "_cancelled",
        "_log",
        "_make_progress",
        "_progress",
        "attempt",
        "deadline",
        "event",
        "max_attempts",
        "stage",
        "state",
        "stream_seq",
    )

    def __init__(
        self,
        event: Event,
        stage: str,
        *,
        attempt: int,
        max_attempts: int,
        deadline: float,
        stream_seq: int = 0,
        progress: Callable[[Event], Progress | None] | None = None,
        state: Any = None,
    ) -> None:
        self.event = event
        self.state = state  # what the function's setup returned (its models...)
        self.stage = stage
        self.stream_seq = stream_seq  # the event's place in the stream: newer events, higher
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.deadline = deadline  # time.monotonic() by which the handler must be done
        self._make_progress = progress
        self._progress: Progress | None = None
        self._log: logging.LoggerAdapter | None = None  # type: ignore[type-arg]
        # A plain flag: set once by the runner, read by polls on any thread.
        self._cancelled = False
        self._cancel_reason = ""

    @property
    def log(self) -> logging.LoggerAdapter:  # type: ignore[type-arg]
        """A logger whose lines name the stage and the event's job or image."""
        if self._log is None:
            event = self.event
            ids = " ".join(
                f"{kind} {value}"
                for kind, value in (("job", event.job_id), ("image", event.image_id))
                if value
            )
            self._log = _EventLog(
                logging.getLogger(f"darkroom.{self.stage}"),
                {"prefix": f"{self.stage} [{ids or event.id}]"},
            )
        return self._log

    # --- attempts and time ---------------------------------------------------------------
    @property
    def last_attempt(self) -> bool:
        """No retry follows if this attempt fails."""
        return self.attempt >= self.max_attempts

    def remaining_s(self) -> float:
        """Seconds left before the runner gives up on this invocation."""
        return self.deadline - time.monotonic()

    # --- progress ------------------------------------------------------------------------
    def progress(
        self, step: int, total: int, message: str = "", preview: bytes | None = None
    ) -> None:
        """Report step ``step`` of ``total`` (from any thread; throttled, never blocks).

        ``preview`` is a small JPEG, PNG or WebP of the work so far (at most 256 KiB; a
        bigger one is left out). Progress is ephemeral: it is not stored or replayed.
        """
        step, total, message = int(step), int(total), str(message)  # numpy ints, say
        if total < 1 or not 0 <= step <= total:
            raise ValueError(
                f"progress needs 0 <= step <= total and total >= 1, got {step}/{total}"
            )
        if preview is not None and len(preview) > MAX_PREVIEW_BYTES:
            self.log.warning(
                "progress preview of %d bytes is over %d: sent without it",
                len(preview),
                MAX_PREVIEW_BYTES,
            )
            preview = None
        if self._progress is None:
            if self._make_progress is None:
                return
            with _PROGRESS_LOCK:  # two threads reporting first at once share one throttle
                if self._progress is None:
                    self._progress = self._make_progress(self.event)
                    if self._progress is None:
                        self._make_progress = None
                        self.log.warning(
                            "progress not sent: the event has no job or image id usable in a "
                            "subject"
                        )
                        return
        self._progress.report(ProgressUpdate(step, total, message, preview))

    # --- cancellation --------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        """Someone cancelled this job (or image): stop soon, raising :class:`Cancelled`."""
        return self._cancelled

    @property
    def cancel_reason(self) -> str:
        return self._cancel_reason

    def raise_if_cancelled(self) -> None:
        """Raise :class:`Cancelled` if the work was cancelled (a handler's poll)."""
        if self._cancelled:
            raise Cancelled(self._cancel_reason or "cancelled")

    def cancel(self, reason: str) -> None:
        """Flag this invocation as cancelled (the runner does this, on the event loop)."""
        self._cancel_reason = reason
        self._cancelled = True

    def finish(self) -> None:
        """The invocation is over: send the progress still held back by the throttle."""
        if self._progress is not None:
            self._progress.close()


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _preview_type(data: bytes) -> str:
    for magic, mime in _PREVIEW_TYPES:
        if data.startswith(magic):
            return mime
    return "application/octet-stream"
