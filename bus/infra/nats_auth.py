"""Who may do what on NATS: darkroom's roles, in NATS's own permission model.

Each kind of process connects with a credential of one role, and the server refuses the
rest:

- ``gateway``: the gateway, ``darkroom up``, the admin commands and the intake functions
  (they announce uploads). Everything.
- ``worker``: the functions. Their consumers, the events they emit, dead letters,
  progress, the lease ledger, their models' readiness (the one KV bucket besides the
  ledger it may write), reading cancel flags, answering requests to their services
  (only to the requester); never the API keys or the digests,
  never an ``uploaded`` or raw S3 notification event, and no stream configuration at all.
- ``status``: read-only monitoring: stream and consumer info, the lease ledger, dead letters.
- ``s3-notify``: an S3 server's bucket notifications, and nothing else.

The permissions are per namespace: bucket and stream names carry it in one token. Replies
go to a per-role inbox prefix (:func:`inbox_prefix`), so no role overhears another's.
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

SERVICE_REPLIES = 4096  # a streamed chat completion: one chunk per token or so
SERVICE_REPLY_WINDOW = "10m"


class Role(StrEnum):
    GATEWAY = "gateway"
    WORKER = "worker"
    STATUS = "status"
    S3_NOTIFY = "s3-notify"


def _kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def inbox_prefix(role: Role) -> str:
    """Where replies to a process of ``role`` go. Each role has its own, so no role can
    subscribe to another's replies (a KV read, a pulled message and its ack subject). An
    S3 server's client keeps the usual one, which no darkroom process uses."""
    if role is Role.S3_NOTIFY:
        return "_INBOX"
    return "_INBOX_" + role.value.replace("-", "_")


def permissions(role: Role, names: Names) -> dict[str, Any] | None:
    """The NATS ``permissions`` block for ``role`` (None: unrestricted).

    Only the gateway role declares streams and buckets: a stream's configuration can
    mirror, source or republish any subject, so whoever may create or update one may read
    or write anything. The other roles get explicit allow lists.
    """
    if role is Role.GATEWAY:
        return None
    ns = names.namespace
    events, advisories = names.stream, names.advisory_stream
    leases, cancels = _kv_stream(names.leases_kv), _kv_stream(names.cancels_kv)
    models = _kv_stream(names.models_kv)
    replies = [f"{inbox_prefix(role)}.>"]
    if role is Role.WORKER:
        hooks = names.hooks_stream
        return {
            "publish": {
                "allow": [
                    f"{ns}.>",  # the events a function emits
                    f"{ns}-dlq.>",
                    f"{ns}-live.>",  # progress
                    names.all_hook_deliveries,  # webhook deliveries, queued by the fan-out
                    f"$KV.{names.leases_kv}.>",
                    f"$KV.{names.models_kv}.>",  # its models' readiness (write only)
                    "$JS.API.INFO",
                    *[
                        f"$JS.API.STREAM.INFO.{s}"
                        for s in (events, advisories, leases, cancels, models, hooks)
                    ],
                    # its durable consumers: declare, inspect, pull, ack
                    *[
                        f"$JS.API.CONSUMER.{op}.{s}{tail}"
                        for s in (events, advisories, hooks)
                        for op in ("CREATE", "INFO")
                        for tail in ("", ".>")
                    ],
                    *[
                        f"$JS.API.CONSUMER.DURABLE.CREATE.{s}.*"
                        for s in (events, advisories, hooks)
                    ],
                    *[f"$JS.API.CONSUMER.MSG.NEXT.{s}.*" for s in (events, advisories, hooks)],
                    *[f"$JS.ACK.{s}.>" for s in (events, advisories, hooks)],
                    # an event by sequence (to dead-letter what exhausted its deliveries)
                    f"$JS.API.STREAM.MSG.GET.{events}",
                    f"$JS.API.DIRECT.GET.{events}",
                    f"$JS.API.DIRECT.GET.{events}.>",
                    # reading and watching the lease ledger and the cancel flags
                    *[
                        f"$JS.API.{op}.{s}{tail}"
                        for s in (leases, cancels)
                        for op in (
                            "CONSUMER.CREATE",
                            "CONSUMER.INFO",
                            "CONSUMER.DELETE",
                            "DIRECT.GET",
                        )
                        for tail in ("", ".>")
                    ],
                    *[f"$JS.API.STREAM.MSG.GET.{s}" for s in (leases, cancels)],
                    "$JS.FC.>",
                ],
                # announcing uploads, and approval decisions (the gateway's, by an admin)
                "deny": [
                    names.subject(t)
                    for t in (
                        subjects.UPLOADED,
                        subjects.S3_EVENTS,
                        subjects.APPROVED,
                        subjects.REJECTED,
                        subjects.DELETED,
                    )
                ],
            },
            # the requests its functions' services answer: in their queue groups only, so
            # no worker reads every request (a plain subscription would get a copy of each)
            "subscribe": {"allow": [*replies, f"{names.all_services} {names.service_group('*')}"]},
            # answering them: only to the reply subject of a request it received, a
            # stream of chunks at most SERVICE_REPLIES long, for SERVICE_REPLY_WINDOW
            "allow_responses": {"max": SERVICE_REPLIES, "expires": SERVICE_REPLY_WINDOW},
        }
    if role is Role.STATUS:
        dlq = names.dlq_stream
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
                        f"$JS.API.{op}.{s}{tail}"
                        for s in (leases, dlq)
                        for op in ("CONSUMER.CREATE", "CONSUMER.INFO", "DIRECT.GET")
                        for tail in ("", ".>")
                    ],
                    *[f"$JS.API.STREAM.MSG.GET.{s}" for s in (leases, dlq)],
                    "$JS.FC.>",
                ],
            },
            "subscribe": {"allow": replies},
        }
    return {  # S3_NOTIFY
        "publish": {"allow": [names.subject(subjects.S3_EVENTS), "$JS.API.INFO"]},
        "subscribe": {"allow": replies},
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
