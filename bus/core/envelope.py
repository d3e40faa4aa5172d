"""The event envelope: a small JSON document with CloudEvents-style attributes.

An event says "an object landed"; the object itself lives in the store. Its ``id`` is the
JetStream ``Nats-Msg-Id``, so publishing the same event twice stores it once.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

SPEC_VERSION = "1.0"


class EnvelopeError(ValueError):
    """The bytes on a subject are not a darkroom event."""


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """Where an object is, and what it was when the event was written."""

    bucket: str
    key: str
    size: int = 0
    etag: str = ""
    content_type: str = "application/octet-stream"

    def to_dict(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "key": self.key,
            "size": self.size,
            "etag": self.etag,
            "content_type": self.content_type,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> ObjectRef:
        if not isinstance(raw, dict):
            raise EnvelopeError(f"'object' must be a JSON object, got {type(raw).__name__}")
        bucket, key = raw.get("bucket"), raw.get("key")
        if not isinstance(bucket, str) or not bucket or not isinstance(key, str) or not key:
            raise EnvelopeError("'object' needs non-empty string 'bucket' and 'key'")
        size = raw.get("size", 0)
        if not isinstance(size, int) or size < 0:
            raise EnvelopeError(f"'object.size' must be a non-negative integer, got {size!r}")
        return cls(
            bucket=bucket,
            key=key,
            size=size,
            etag=str(raw.get("etag") or ""),
            content_type=str(raw.get("content_type") or "application/octet-stream"),
        )


@dataclass(frozen=True, slots=True)
class Event:
    """One darkroom event (see the module docstring)."""

    id: str
    type: str  # the topic, e.g. "uploaded"
    source: str  # who wrote it, e.g. "darkroom/gateway" or "darkroom/ingest"
    time: str
    subject: str = ""  # CloudEvents subject: what it is about (image id, job id)
    object: ObjectRef | None = None
    image_id: str | None = None
    job_id: str | None = None
    causation_id: str | None = None  # id of the event that caused this one
    data: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        doc: dict[str, Any] = {
            "specversion": SPEC_VERSION,
            "id": self.id,
            "type": self.type,
            "source": self.source,
            "time": self.time,
        }
        if self.subject:
            doc["subject"] = self.subject
        if self.object is not None:
            doc["object"] = self.object.to_dict()
        if self.image_id is not None:
            doc["image_id"] = self.image_id
        if self.job_id is not None:
            doc["job_id"] = self.job_id
        if self.causation_id is not None:
            doc["causation_id"] = self.causation_id
        if self.data:
            doc["data"] = self.data
        return orjson.dumps(doc)


def decode(payload: bytes) -> Event:
    """Parse and validate an event; raise :class:`EnvelopeError` saying what is wrong."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError(f"payload is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise EnvelopeError(f"event must be a JSON object, got {type(doc).__name__}")
    missing = [k for k in ("id", "type", "source", "time") if not isinstance(doc.get(k), str)]
    if missing:
        raise EnvelopeError(f"event lacks string attribute(s): {', '.join(missing)}")
    if not doc["id"] or len(doc["id"]) > 200:
        raise EnvelopeError("event 'id' must be 1-200 characters")
    data = doc.get("data", {})
    if not isinstance(data, dict):
        raise EnvelopeError(f"'data' must be a JSON object, got {type(data).__name__}")
    for key in ("image_id", "job_id", "causation_id", "subject"):
        if key in doc and not isinstance(doc[key], str):
            raise EnvelopeError(f"'{key}' must be a string, got {doc[key]!r}")
    obj = ObjectRef.from_dict(doc["object"]) if doc.get("object") is not None else None
    return Event(
        id=doc["id"],
        type=doc["type"],
        source=doc["source"],
        time=doc["time"],
        subject=doc.get("subject", ""),
        object=obj,
        image_id=doc.get("image_id"),
        job_id=doc.get("job_id"),
        causation_id=doc.get("causation_id"),
        data=data,
    )


class _MillisecondClock:
    """ISO-8601 UTC timestamps, formatted once per millisecond (a hot path under load)."""

    def __init__(self) -> None:
        self._ms = -1
        self._text = ""

    def __call__(self) -> str:
        ms = time.time_ns() // 1_000_000
        if ms != self._ms:
            moment = datetime.fromtimestamp(ms / 1000, UTC)
            self._ms, self._text = ms, moment.isoformat(timespec="milliseconds")[:-6] + "Z"
        return self._text


now_iso = _MillisecondClock()


def derive_id(parent_id: str, stage: str, topic: str, index: int = 0) -> str:
    """Id of the event ``stage`` emits for ``parent_id``: the same on every retry."""
    digest = hashlib.blake2b(
        f"{parent_id}\x1f{stage}\x1f{topic}\x1f{index}".encode(), digest_size=16
    ).hexdigest()
    return f"{stage}-{digest}"


def new_id() -> str:
    """A fresh, time-sortable id (48-bit ms timestamp + 80 random bits, hex)."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"
