"""The keys a NATS KV bucket holds, read from its stream's per-subject counts.

nats-py's ``KeyValue.keys()`` starts a watcher and reads until an end marker, which it puts
first when the server's count of pending messages says zero before the client has counted
the ones already on their way: under load it answers "no keys" for a bucket that has some.
The stream's own subject list (STREAM.INFO with a subjects filter) has no such race.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

log = logging.getLogger("darkroom.kv")

MAX_LISTED = 100_000
"""The subjects one STREAM.INFO answer lists at most (nats-server's page size)."""


async def stored_keys(js: JetStreamContext, kv: KeyValue) -> list[str]:
    """Every key of ``kv`` with a message, sorted: a deleted or purged key whose marker is
    kept is among them (its ``get`` raises ``KeyDeletedError``)."""
    status = await kv.status()
    prefix = f"$KV.{status.bucket}."
    info = await js.stream_info(status.stream_info.config.name or "", subjects_filter=prefix + ">")
    subjects = info.state.subjects or {}
    if len(subjects) >= MAX_LISTED:
        log.warning("bucket %s lists its first %d keys only", status.bucket, len(subjects))
    return sorted(s[len(prefix) :] for s in subjects if s.startswith(prefix))
