"""Every subject, stream, consumer, KV bucket and object key darkroom uses, in one place.

Functions speak of *topics* (``"uploaded"``); :class:`Names` turns a topic into a subject
under the deployment's namespace. Tests give each run its own namespace, so streams,
consumers and buckets never collide.

Ephemeral traffic (step progress) lives under a separate root, ``<ns>-live``, because the
durable stream captures everything under ``<ns>.>`` and progress must not be stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Topics of the chain. A topic is the last token(s) of a subject.
UPLOADED = "uploaded"
INGESTED = "ingested"
CAPTIONED = "captioned"
RECAPTION = "recaption"  # a user asks for a new caption (a prompt, another model, by hand)
REQUESTED = "requested"
GENERATED = "generated"
FAILED = "failed"  # failed.<stage>
CANCELLED = "cancelled"  # cancelled.<stage>
APPROVED = "approved"  # an admin's decision (who, when, why): images/<id>/approval.json
REJECTED = "rejected"  # the same, rejecting: its renditions go, its original is kept a while
DELETED = "deleted"  # an image and all its objects are gone (a rejection that expired)
WEBHOOK_DISABLED = "webhook_disabled"  # an endpoint was turned off (410, or days of failures)
S3_EVENTS = "s3"  # default subject for MinIO bucket notifications (Records payloads)

_NAMESPACE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
SAFE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # image and job ids (also in the API document)
_SAFE_ID_RE = re.compile(SAFE_ID_PATTERN)


def check_namespace(namespace: str) -> str:
    """Return ``namespace`` if usable as subject token, stream and bucket prefix."""
    if not _NAMESPACE_RE.match(namespace):
        raise ValueError(
            "namespace must be 1-32 characters of a-z, 0-9 and _, starting with a letter, "
            f"got {namespace!r}"
        )
    return namespace


def is_safe_id(value: str) -> bool:
    return bool(_SAFE_ID_RE.match(value))


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is safe inside a subject token and an object key."""
    if not _SAFE_ID_RE.match(value):
        raise ValueError(f"{what} must be 1-64 characters of A-Z, a-z, 0-9, _ and -, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Names:
    """Names for one deployment namespace (``darkroom`` unless configured)."""

    namespace: str = "darkroom"

    def __post_init__(self) -> None:
        check_namespace(self.namespace)

    # --- subjects ------------------------------------------------------------------------
    def subject(self, topic: str) -> str:
        """The JetStream subject of ``topic``, e.g. ``darkroom.uploaded``."""
        return f"{self.namespace}.{topic}"

    def failed(self, stage: str) -> str:
        return self.subject(f"{FAILED}.{stage}")

    def cancelled(self, stage: str) -> str:
        return self.subject(f"{CANCELLED}.{stage}")

    @property
    def all_events(self) -> str:
        return f"{self.namespace}.>"

    def progress(self, work_id: str) -> str:
        """Plain-NATS subject for ephemeral step progress of one job or image (not stored)."""
        return f"{self.namespace}-live.progress.{work_id}"

    def service(self, name: str) -> str:
        """Plain-NATS request-reply subject of a function's service (not stored)."""
        return f"{self.namespace}-rpc.{name}"

    @property
    def all_services(self) -> str:
        return f"{self.namespace}-rpc.>"

    def service_group(self, function: str) -> str:
        """The queue group a function's workers share its service requests in (dotted, so
        a permission can name all of a namespace's: ``<ns>.*``)."""
        return f"{self.namespace}.{function}"

    @property
    def all_progress(self) -> str:
        return f"{self.namespace}-live.progress.*"

    def dead_letter(self, stage: str) -> str:
        return f"{self.namespace}-dlq.{stage}"

    @property
    def all_dead_letters(self) -> str:
        return f"{self.namespace}-dlq.>"

    # --- streams, consumers, buckets -----------------------------------------------------
    @property
    def stream(self) -> str:
        return self.namespace.upper()

    @property
    def dlq_stream(self) -> str:
        return f"{self.stream}_DLQ"

    @property
    def hooks_stream(self) -> str:
        """The webhook deliveries' work queue (outside ``<ns>.>``: the event stream and its
        live listeners never see a delivery)."""
        return f"{self.stream}_WEBHOOKS"

    def hook_delivery(self, endpoint_id: str) -> str:
        return f"{self.namespace}-hooks.deliver.{endpoint_id}"

    @property
    def all_hook_deliveries(self) -> str:
        return f"{self.namespace}-hooks.>"

    def durable(self, function: str) -> str:
        return f"{self.namespace}_{function}"

    @property
    def keys_kv(self) -> str:
        return f"{self.namespace}_keys"

    @property
    def digests_kv(self) -> str:
        """SHA-256 of an original's bytes → the image id they were first accepted as."""
        return f"{self.namespace}_digests"

    @property
    def cancels_kv(self) -> str:
        """Cancellation flags: a job or image id → why it was cancelled (bus/state/cancels.py)."""
        return f"{self.namespace}_cancels"

    @property
    def sessions_kv(self) -> str:
        """Browser sessions: the SHA-256 of a cookie's secret → the key it stands for (TTL)."""
        return f"{self.namespace}_sessions"

    @property
    def tickets_kv(self) -> str:
        """One-use tickets for the event stream (a browser's EventSource sends no header)."""
        return f"{self.namespace}_tickets"

    @property
    def models_kv(self) -> str:
        """Model readiness: each worker's download progress and state per model (TTL)."""
        return f"{self.namespace}_models"

    @property
    def leases_kv(self) -> str:
        """VRAM lease ledger: one document per device (see bus/gpu/leases.py)."""
        return f"{self.namespace}_leases"

    def max_deliveries_advisory(self, function: str) -> str:
        """Published by JetStream when an event used up its deliveries without an ack."""
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.stream}.{self.durable(function)}"

    @property
    def all_max_deliveries_advisories(self) -> str:
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.stream}.*"

    @property
    def advisory_stream(self) -> str:
        """Keeps those advisories until a worker of the function turns them into dead
        letters (core NATS alone would lose them while no worker is connected)."""
        return f"{self.stream}_ADVISORIES"

    def exhausted_durable(self, function: str) -> str:
        return f"{self.durable(function)}_exhausted"


# --- object keys (the store is the source of truth; keys are deterministic) ---------------
UPLOADS_PREFIX = "uploads/"
INCOMING_PREFIX = "incoming/"
IMAGES_PREFIX = "images/"
REQUESTS_PREFIX = "requests/"
GENERATED_PREFIX = "generated/"


def upload_key(image_id: str, safe_name: str) -> str:
    return f"{UPLOADS_PREFIX}{check_id(image_id, 'image id')}/{safe_name}"


def incoming_key(image_id: str, safe_name: str) -> str:
    """Where a presigned PUT lands: checked, then copied to :func:`upload_key`."""
    return f"{INCOMING_PREFIX}{check_id(image_id, 'image id')}/{safe_name}"


def image_key(image_id: str, name: str) -> str:
    """Key of a derived object, e.g. ``images/<id>/ingest.json``."""
    return f"{IMAGES_PREFIX}{check_id(image_id, 'image id')}/{name}"


def image_id_from_key(key: str, prefix: str) -> str | None:
    """``<prefix><id>/<name>`` gives ``<id>``; anything else gives None."""
    if not key.startswith(prefix):
        return None
    parts = key[len(prefix) :].split("/")
    if len(parts) != 2 or not parts[1] or not _SAFE_ID_RE.match(parts[0]):
        return None
    return parts[0]


def uploaded_event_id(image_id: str) -> str:
    """The ``uploaded`` event of an image has this id whichever way it came in."""
    return f"uploaded-{image_id}"


def request_key(job_id: str) -> str:
    """Where a checked generation request is stored: ``requests/<job>.json``."""
    return f"{REQUESTS_PREFIX}{check_id(job_id, 'job id')}.json"


def request_image_key(job_id: str, extension: str) -> str:
    """An init image sent with a request itself (OpenAI's images/edits), beside it."""
    return f"{REQUESTS_PREFIX}{check_id(job_id, 'job id')}/init.{extension}"


def generated_key(job_id: str, index: int) -> str:
    """Output ``index`` of a generation job: ``generated/<job>/<index>.png``."""
    return f"{GENERATED_PREFIX}{check_id(job_id, 'job id')}/{int(index)}.png"


def generated_image_id(job_id: str, index: int) -> str:
    """The catalogue id of output ``index`` of a job (deterministic: a replay makes the same
    image, not a second one)."""
    return check_id(f"{job_id}-{int(index)}", "image id")


INGEST_DOC = "ingest.json"
CAPTION_DOC = "caption.json"
APPROVAL_DOC = "approval.json"  # the newest approval decision on an image
