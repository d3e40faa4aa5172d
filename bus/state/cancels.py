"""Cancellation flags: "stop working on this job (or image)", kept in a NATS KV bucket.

Cancelling writes a flag under the job's id (or an image's id). Every process running
functions mirrors the bucket (a KV watch), so

* an event of a flagged job that is still queued is skipped without running, and
* a handler already running on it is told at once and sees the flag at its next poll
  (``call.cancelled`` / ``call.raise_if_cancelled()``).

Flags expire with the event history (``stream.max_age_days``): no event older than that is
left to skip.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from bus.core.envelope import Event, now_iso
from bus.core.subjects import check_id
from bus.infra.kvmirror import KvMirror

log = logging.getLogger("darkroom.cancels")
MAX_REASON_CHARS = 500


@dataclass(frozen=True, slots=True)
class CancelFlag:
    reason: str
    time: str

    @classmethod
    def decode(cls, data: bytes) -> CancelFlag:
        doc = orjson.loads(data)
        return cls(reason=str(doc.get("reason", "cancelled")), time=str(doc.get("time", "")))


async def request_cancel(kv: KeyValue, target_id: str, reason: str = "cancelled") -> None:
    """Flag ``target_id`` (a job id or an image id) as cancelled."""
    check_id(target_id, "job or image id")
    doc = {"reason": reason[:MAX_REASON_CHARS] or "cancelled", "time": now_iso()}
    await kv.put(target_id, orjson.dumps(doc))


def targets(event: Event) -> tuple[str, ...]:
    """The ids a cancel flag may name to stop ``event``: its job, then its image."""
    return tuple(i for i in (event.job_id, event.image_id) if i)


class CancelFlags:
    """This process's live copy of every flag, and who to tell when one appears."""

    def __init__(self, nc: NATS, kv: KeyValue) -> None:
        self._mirror: KvMirror[CancelFlag] = KvMirror(
            nc, kv, CancelFlag.decode, "cancels", on_change=self._changed
        )
        self._listeners: list[Callable[[str, CancelFlag], None]] = []
        self._started = False

    async def start(self) -> None:
        """Begin mirroring (idempotent: every runner of the process shares one mirror)."""
        if not self._started:
            self._started = True
            await self._mirror.start()

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._mirror.stop()

    def reason(self, event: Event) -> str | None:
        """Why ``event`` is cancelled, or None if it is not."""
        for target in targets(event):
            flag = self._mirror.items.get(target)
            if flag is not None:
                return flag.reason
        return None

    def add_listener(self, listener: Callable[[str, CancelFlag], None]) -> None:
        """``listener(target_id, flag)`` for every flag set from now on (and those seen again
        after a reconnect)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[str, CancelFlag], None]) -> None:
        self._listeners.remove(listener)

    def _changed(self, key: str, flag: CancelFlag | None) -> None:
        if flag is None:
            return
        for listener in list(self._listeners):
            try:
                listener(key, flag)
            except Exception:  # one broken listener must not keep the others uninformed
                log.exception("cancel listener failed on %s", key)
