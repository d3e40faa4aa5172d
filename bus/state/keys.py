"""Scoped API keys, stored hashed in a NATS KV bucket shared by every gateway.

A key looks like ``drk_<id>_<secret>``: the id finds the record, the secret (256 random
bits) is compared by SHA-256 digest. Only the digest is stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue

from bus.core.envelope import now_iso
from bus.infra.kvkeys import stored_keys
from bus.infra.kvmirror import KvMirror

SCOPES = ("read", "upload", "generate", "admin")
_TOKEN_RE = re.compile(r"^drk_([a-z0-9]{12})_([A-Za-z0-9_-]{20,100})$")
KEY_ID_RE = re.compile(r"^[a-z0-9]{12}$")
# How long "no such key" is believed without asking the KV bucket again, and for how many
# ids: enough that a stream of requests with an unknown key costs one lookup, not one each.
UNKNOWN_TTL_S = 5.0
MAX_UNKNOWN = 10_000


class KeyError_(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    scopes: tuple[str, ...]
    created: str
    digest: str

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "scopes": list(self.scopes),
            "created": self.created,
        }

    def encode(self) -> bytes:
        return orjson.dumps({**self.public(), "digest": self.digest})

    @classmethod
    def decode(cls, raw: bytes) -> ApiKey:
        doc = orjson.loads(raw)
        return cls(doc["id"], doc["name"], tuple(doc["scopes"]), doc["created"], doc["digest"])


def parse_scopes(text: str | list[str]) -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else text
    scopes = tuple(dict.fromkeys(s.strip() for s in items if s.strip()))
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise KeyError_(f"scopes must be a non-empty list of {', '.join(SCOPES)}; got {text!r}")
    return scopes


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_token(token: str) -> tuple[str, str] | None:
    match = _TOKEN_RE.match(token)
    return (match.group(1), match.group(2)) if match else None


def mint(name: str, scopes: tuple[str, ...]) -> tuple[str, ApiKey]:
    """A new token and its record (not stored yet)."""
    key_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
    secret = secrets.token_urlsafe(32)
    record = ApiKey(key_id, name, scopes, now_iso(), _digest(secret))
    return f"drk_{key_id}_{secret}", record


def record_for_token(token: str, name: str, scopes: tuple[str, ...]) -> ApiKey:
    """The record matching an existing token (re-registering a kept admin key)."""
    parts = split_token(token)
    if parts is None:
        raise KeyError_("not a darkroom API key (expected drk_<id>_<secret>)")
    return ApiKey(parts[0], name, scopes, now_iso(), _digest(parts[1]))


async def store_key(kv: KeyValue, record: ApiKey) -> None:
    await kv.put(record.id, record.encode())


async def create_key(kv: KeyValue, name: str, scopes: tuple[str, ...]) -> tuple[str, ApiKey]:
    token, record = mint(name, scopes)
    await store_key(kv, record)
    return token, record


async def list_keys(js: JetStreamContext, kv: KeyValue) -> list[ApiKey]:
    """The live keys, oldest first (revoked ones are left out)."""
    records = []
    for key_id in await stored_keys(js, kv):
        with contextlib.suppress(KeyNotFoundError, KeyDeletedError):
            entry = await kv.get(key_id)
            if entry.value:
                records.append(ApiKey.decode(entry.value))
    return sorted(records, key=lambda r: r.created)


async def revoke_key(kv: KeyValue, key_id: str) -> bool:
    """Revoke a key; False if there is no such (live) key. The delete marker stays, so a
    revoked key is never quietly registered again."""
    if await key_state(kv, key_id) != "present":
        return False
    await kv.delete(key_id)
    return True


async def key_state(kv: KeyValue, key_id: str) -> str:
    """``present``, ``revoked`` (a delete marker is kept) or ``absent`` (never stored)."""
    try:
        entry = await kv.get(key_id)
    except KeyNotFoundError as exc:  # nats-py reports a delete marker as not found + op
        return "revoked" if exc.op in ("DEL", "PURGE") else "absent"
    return "present" if entry.value else "revoked"


def verify(record: ApiKey | None, token: str) -> bool:
    parts = split_token(token)
    if record is None or parts is None or parts[0] != record.id:
        return False
    return hmac.compare_digest(record.digest, _digest(parts[1]))


class KeyCache:
    """The gateway's copy of all keys, kept current by a KV watch (revocations apply at once).

    An id neither the copy nor the bucket knows is remembered as unknown for
    UNKNOWN_TTL_S. A key stored later under that id works as soon as the watch brings it,
    at the latest after UNKNOWN_TTL_S; :meth:`forget_unknown` makes it work at once.
    """

    def __init__(self, nc: NATS, kv: KeyValue) -> None:
        self._kv = kv
        self._mirror: KvMirror[ApiKey] = KvMirror(nc, kv, ApiKey.decode, "api-keys")
        self._unknown: dict[str, float] = {}  # key id -> when to ask the bucket again

    async def start(self) -> None:
        await self._mirror.start()

    async def stop(self) -> None:
        await self._mirror.stop()

    async def authenticate(self, token: str) -> ApiKey | None:
        parts = split_token(token)
        if parts is None:
            return None
        key_id = parts[0]
        record = self._mirror.items.get(key_id)
        if record is None and not self._known_unknown(key_id):
            # A key minted a moment ago elsewhere may not have reached the watch yet.
            with contextlib.suppress(KeyNotFoundError):
                entry = await self._kv.get(key_id)
                record = ApiKey.decode(entry.value) if entry.value else None
            if record is None:
                self._remember_unknown(key_id)
        return record if verify(record, token) else None

    def forget_unknown(self, key_id: str) -> None:
        """A key was just stored under ``key_id``: stop believing it is unknown."""
        self._unknown.pop(key_id, None)

    def _known_unknown(self, key_id: str) -> bool:
        until = self._unknown.get(key_id)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._unknown[key_id]
        return False

    def _remember_unknown(self, key_id: str) -> None:
        if len(self._unknown) >= MAX_UNKNOWN:
            del self._unknown[next(iter(self._unknown))]  # the oldest answer goes first
        self._unknown[key_id] = time.monotonic() + UNKNOWN_TTL_S
