"""Who may do what on NATS: darkroom's roles, in NATS's own permission model.

Each kind of process connects with a credential of one role, and the server refuses the
rest:

- ``gateway``: the gateway, ``darkroom up``, the admin commands and the intake functions
  (they announce uploads). Everything.
- ``worker``: the functions. Their own events, dead letters, progress, the lease ledger
  and cancel flags; never the API keys or the digests, never an ``uploaded`` or raw S3
  notification event, and no deleting or purging of streams.
- ``status``: read-only monitoring: stream and consumer info, the lease ledger, dead letters.
- ``s3-notify``: an S3 server's bucket notifications, and nothing else.

The permissions are per namespace: bucket and stream names carry it in one token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import nkeys

from bus.core import subjects
from bus.core.subjects import Names


class Role(StrEnum):
    GATEWAY = "gateway"
    WORKER = "worker"
    STATUS = "status"
    S3_NOTIFY = "s3-notify"


def _stream_api(stream: str) -> list[str]:
    """Every JetStream API subject that names ``stream``: ``$JS.API.STREAM.INFO.<s>``,
    ``$JS.API.STREAM.MSG.GET.<s>``, ``$JS.API.DIRECT.GET.<s>.<subject>``,
    ``$JS.API.CONSUMER.CREATE.<s>.<name>.<filter>``, ``$JS.API.CONSUMER.MSG.NEXT.<s>.<c>``..."""
    return [
        f"$JS.API.*.*.{stream}",
        f"$JS.API.*.*.{stream}.>",
        f"$JS.API.*.*.*.{stream}",
        f"$JS.API.*.*.*.{stream}.>",
    ]


def _kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def permissions(role: Role, names: Names) -> dict[str, Any] | None:
    """The NATS ``permissions`` block for ``role`` (None: unrestricted)."""
    ns = names.namespace
    if role is Role.GATEWAY:
        return None
    if role is Role.WORKER:
        secret_buckets = (names.keys_kv, names.digests_kv)
        return {
            "publish": {
                "allow": [
                    f"{ns}.>",
                    f"{ns}-dlq.>",
                    f"{ns}-live.>",
                    "$JS.ACK.>",
                    "$JS.FC.>",
                    "$JS.API.>",
                    f"$KV.{names.leases_kv}.>",
                    f"$KV.{names.cancels_kv}.>",
                ],
                "deny": [
                    names.subject(subjects.UPLOADED),
                    names.subject(subjects.S3_EVENTS),
                    "$JS.API.STREAM.DELETE.>",
                    "$JS.API.STREAM.PURGE.>",
                    "$JS.API.STREAM.MSG.DELETE.>",
                    "$JS.API.STREAM.SNAPSHOT.>",
                    "$JS.API.STREAM.RESTORE.>",
                    *[s for b in secret_buckets for s in _stream_api(_kv_stream(b))],
                ],
            },
            "subscribe": {
                "allow": ["_INBOX.>", f"{ns}.>", f"{ns}-live.>", f"{ns}-dlq.>"],
            },
        }
    if role is Role.STATUS:
        leases = _kv_stream(names.leases_kv)
        return {
            "publish": {
                "allow": [
                    "$JS.API.INFO",
                    "$JS.API.STREAM.NAMES",
                    "$JS.API.STREAM.LIST",
                    "$JS.API.STREAM.INFO.*",
                    "$JS.API.CONSUMER.NAMES.*",
                    "$JS.API.CONSUMER.LIST.*",
                    "$JS.API.CONSUMER.INFO.*.*",
                    # reading the lease ledger and the dead letters (ordered consumers)
                    *[
                        f"$JS.API.{op}.{stream}{tail}"
                        for stream in (leases, names.dlq_stream)
                        for op in ("CONSUMER.CREATE", "CONSUMER.DELETE", "DIRECT.GET")
                        for tail in ("", ".>")
                    ],
                    *[f"$JS.API.CONSUMER.MSG.NEXT.{s}.*" for s in (leases, names.dlq_stream)],
                    "$JS.ACK.>",
                ],
            },
            "subscribe": {"allow": ["_INBOX.>"]},
        }
    return {  # S3_NOTIFY: publish notifications, and read the JetStream acknowledgement
        "publish": {"allow": [names.subject(subjects.S3_EVENTS), "$JS.API.INFO"]},
        "subscribe": {"allow": ["_INBOX.>"]},
    }


def new_user_seed() -> str:
    """A fresh nkey user seed ('SU...')."""
    return str(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode())


def public_key(seed: str) -> str:
    """The public nkey ('U...') of a user seed: what the server is told."""
    return str(nkeys.from_seed(seed.encode()).public_key.decode())


@dataclass(frozen=True)
class RoleUser:
    """One NATS user of a role, identified by its nkey (public; the seed stays with the
    client)."""

    role: Role
    nkey: str


def authorization_block(users: list[RoleUser], names: Names) -> dict[str, Any]:
    """The server configuration's ``authorization`` section for ``users``."""
    entries: list[dict[str, Any]] = []
    for user in users:
        entry: dict[str, Any] = {"nkey": user.nkey}
        allowed = permissions(user.role, names)
        if allowed is not None:
            entry["permissions"] = allowed
        entries.append(entry)
    return {"users": entries}


def render_config(config: dict[str, Any]) -> str:
    """A nats-server configuration file (its format reads JSON)."""
    return json.dumps(config, indent=2) + "\n"
