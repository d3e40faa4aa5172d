"""The image read model: one JSON document per image in a NATS KV bucket.

Documents are a projection of events (notify applies them); :func:`apply_event` gives the
same document whatever order the events arrive in, and :func:`project` writes it with
compare-and-set so concurrent projectors never lose an update.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from bus.core import subjects
from bus.core.envelope import Event
from bus.infra.kv import compare_and_set
from bus.infra.kvmirror import KvMirror

log = logging.getLogger("darkroom.readmodel")

# Stages of an image's life, in order; the status is the furthest one reached.
STAGES = (subjects.UPLOADED, subjects.GENERATED, subjects.INGESTED, subjects.CAPTIONED)
STATUS_BY_STAGE = {
    subjects.UPLOADED: "uploaded",
    subjects.GENERATED: "uploaded",  # a generated image starts its life like an upload
    subjects.INGESTED: "ingested",
    subjects.CAPTIONED: "ready",
}
STATUSES = ("uploaded", "ingested", "ready", "failed")


# What a stage produces: a failure of that stage is healed once its output appears.
STAGE_OUTPUT = {"ingest": subjects.INGESTED, "caption": subjects.CAPTIONED}


def derive_status(doc: dict[str, Any]) -> str:
    stages = doc.get("stages", {})
    failure = doc.get("failure")
    if failure and STAGE_OUTPUT.get(failure.get("stage", "")) not in stages:
        return "failed"
    reached = [s for s in STAGES if s in stages]
    return STATUS_BY_STAGE[reached[-1]] if reached else "uploaded"


def apply_event(doc: dict[str, Any] | None, event: Event) -> dict[str, Any]:
    """Fold one event into an image document (pure, order-independent)."""
    image_id = event.image_id or ""
    doc = dict(doc) if doc else {"id": image_id, "stages": {}, "tags": []}
    doc["stages"] = dict(doc.get("stages", {}))
    topic = event.type
    if topic in (subjects.UPLOADED, subjects.GENERATED):
        doc["stages"][topic] = event.time
        doc["created"] = event.time
        doc["name"] = event.data.get("name", "")
        if event.object is not None:
            doc["original"] = event.object.to_dict()
        for key in ("sha256", "source", "original_name", "hook", "gps_removed", "lineage"):
            if key in event.data:
                doc[key] = event.data[key]
    elif topic == subjects.INGESTED:
        doc["stages"][topic] = event.time
        doc["ingest"] = event.data
    elif topic == subjects.CAPTIONED:
        doc["stages"][topic] = event.time
        doc["caption"] = event.data
        doc["tags"] = list(event.data.get("tags", []))
    elif topic.startswith(subjects.FAILED + "."):
        doc["failure"] = {
            "stage": event.data.get("stage", topic.split(".", 1)[1]),
            "reason": event.data.get("reason", ""),
            "kind": event.data.get("kind", ""),
            "time": event.time,
        }
    else:
        return doc
    doc["updated"] = max(doc.get("updated", ""), event.time)
    doc["status"] = derive_status(doc)
    return doc


async def project(kv: KeyValue, event: Event) -> dict[str, Any] | None:
    """Apply ``event`` to its image's document with compare-and-set; None if no image."""
    if not event.image_id:
        return None
    written: list[dict[str, Any]] = []

    def change(data: bytes | None) -> bytes | None:
        current = orjson.loads(data) if data else None
        doc = apply_event(current, event)
        written[:] = [doc]
        return None if doc == current else orjson.dumps(doc)

    await compare_and_set(kv, event.image_id, change)
    return written[0]


class ImageIndex:
    """The gateway's in-memory, searchable copy of every image document, fed by a KV watch."""

    def __init__(self, nc: NATS, kv: KeyValue) -> None:
        self._mirror: KvMirror[dict[str, Any]] = KvMirror(nc, kv, orjson.loads, "images")

    @property
    def docs(self) -> dict[str, dict[str, Any]]:
        return self._mirror.items

    async def start(self) -> None:
        await self._mirror.start()

    async def stop(self) -> None:
        await self._mirror.stop()

    def query(
        self,
        status: str | None = None,
        tag: str | None = None,
        text: str | None = None,
        before: str | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Newest first; ``before`` is the ``created|id`` cursor of the last item seen."""
        needle = text.lower() if text else None
        items = sorted(self.docs.values(), key=_cursor, reverse=True)
        out = []
        for doc in items:
            if before is not None and _cursor(doc) >= before:
                continue
            if status and doc.get("status") != status:
                continue
            if tag and tag not in doc.get("tags", []):
                continue
            if needle and not _matches(doc, needle):
                continue
            out.append(doc)
            if len(out) >= limit:
                break
        return out


def cursor_of(doc: dict[str, Any]) -> str:
    return _cursor(doc)


def _cursor(doc: dict[str, Any]) -> str:
    return f"{doc.get('created', '')}|{doc.get('id', '')}"


def _matches(doc: dict[str, Any], needle: str) -> bool:
    caption = (doc.get("caption") or {}).get("caption") or ""
    haystack = " ".join([doc.get("name", ""), caption, *doc.get("tags", [])]).lower()
    return needle in haystack
