"""Outgoing webhooks over HTTP (admin scope): the endpoints, their delivery log, and replays.

A destination is vetted as the ingest fetcher vets a URL (:mod:`bus.intake.fetch`): http or
https, and every address its host resolves to public, or inside ``webhooks.allow_networks``.
It is vetted again on every connection the delivery makes (bus/intake/webhooks.py), since
DNS may answer differently later.

A secret is generated when none is given (``whsec_`` and base64, per Standard Webhooks), and
shown once: in the answer that created or rotated it. A rotation keeps the old secret
signing too for ``webhooks.secret_grace_s``, so receivers can switch over without a gap.

A replay queues a message again with its own webhook-id (receivers that saw it will know
it); its attempts count on from the message's earlier ones in the log, and it gets the whole
retry schedule again. A message still being retried (pending) is not replayed: that would
make two live copies of it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, Field
from yarl import URL

from bus.core.envelope import new_id
from bus.gateway.contract import Timestamp
from bus.gateway.images import query_db
from bus.gateway.problems import Problem, json_response
from bus.gateway.rejections import available
from bus.gateway.routes import Reply, Route
from bus.gateway.state import CTX
from bus.intake.fetch import MAX_URL_CHARS, FetchError, resolve_vetted
from bus.runtime.context import Context
from bus.state.webhooks import (
    ENDPOINT_ID_PATTERN,
    MAX_TYPES,
    MESSAGE_ID_PATTERN,
    HookNames,
    WebhookError,
    Webhooks,
    declare_stream,
    delivery,
    enqueue,
    new_secret,
)

MAX_DESCRIPTION = 500
MAX_REPLAY = 1000
MAX_PAGE = 200
_ENDPOINT_ID = re.compile(ENDPOINT_ID_PATTERN)
_MESSAGE_ID = re.compile(MESSAGE_ID_PATTERN)
EventType = Annotated[str, Field(min_length=1, max_length=100)]
Url = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_URL_CHARS,
        description="an http or https URL whose host resolves to public addresses",
    ),
]
Secret = Annotated[
    str, Field(description="whsec_ and 24-64 bytes of base64", min_length=38, max_length=100)
]
TYPES_DOC = (
    "darkroom event types to send (captioned, failed.caption, failed.* ...); null: all. "
    "Deliveries carry them as io.darkroom.<type>"
)


class NewWebhook(BaseModel):
    url: Url
    secret: Secret | None = Field(None, description="generated when not given")
    event_types: list[EventType] | None = Field(None, max_length=MAX_TYPES, description=TYPES_DOC)
    description: str = Field("", max_length=MAX_DESCRIPTION)


class WebhookChange(BaseModel):
    """What to change; fields left out stay as they are."""

    url: Url | None = None
    event_types: list[EventType] | None = Field(None, max_length=MAX_TYPES, description=TYPES_DOC)
    description: str | None = Field(None, max_length=MAX_DESCRIPTION)
    active: bool | None = Field(None, description="true re-enables a disabled endpoint")
    rotate_secret: bool = Field(
        False,
        description="a new secret, generated (or the one given as secret); the old one signs "
        "too for webhooks.secret_grace_s",
    )
    secret: Secret | None = Field(None, description="rotate to this secret")


class WebhookInfo(BaseModel):
    id: str
    url: str
    event_types: list[str] | None
    description: str
    active: bool
    disabled_reason: str | None = Field(description="why it was turned off (410, failures)")
    created: Timestamp
    updated: Timestamp
    failing_since: Timestamp | None = Field(description="every attempt failed since then")
    old_secrets_until: list[Timestamp] = Field(description="rotated secrets still signing until")


class WebhookWithSecret(WebhookInfo):
    secret: str = Field(description="the signing secret: shown this once, never again")


class WebhookList(BaseModel):
    items: list[WebhookInfo]


class DeliveriesQuery(BaseModel):
    before: int | None = Field(None, ge=1, description="the previous page's next_before")
    limit: int = Field(50, ge=1, le=MAX_PAGE)
    delivery_id: str | None = Field(
        None, pattern=_MESSAGE_ID.pattern, description="only this message's attempts"
    )


class DeliveryAttempt(BaseModel):
    id: int
    webhook_id: str = Field(description="the message (the webhook-id header): a delivery_id")
    event_id: str
    event_type: str
    attempt: int = Field(description="1 for the first try; replays count on")
    status_code: int | None = Field(description="null: no answer (refused, timed out)")
    latency_ms: float | None
    error: str | None = Field(description="null: delivered")
    delivered: bool
    message_state: str = Field(description="the message now: pending, delivered or failed")
    at: Timestamp


class DeliveryPage(BaseModel):
    items: list[DeliveryAttempt]
    next_before: int | None = Field(description="for the next (older) page; null: no more")


class ReplayQuery(BaseModel):
    since: datetime = Field(description="failed messages created at or after this time")
    limit: int = Field(100, ge=1, le=MAX_REPLAY)


class Replayed(BaseModel):
    endpoint_id: str
    webhook_ids: list[str] = Field(description="the messages queued again (same webhook-ids)")
    more: bool = Field(description="there were more than limit: replay again for the rest")


# --- helpers ------------------------------------------------------------------------------
def _store(request: web.Request) -> Webhooks:
    db = request.app[CTX].db
    if db is None:
        raise Problem(503, "Service Unavailable", "this gateway has no read model configured")
    return Webhooks(db.pool)


def _endpoint_id(request: web.Request) -> str:
    given = request.match_info["endpoint_id"]
    if not _ENDPOINT_ID.match(given):
        raise Problem(404, "Not Found", f"no webhook {given[:80]!r}: ids look like wh_<16 hex>")
    return given


def _unacceptable(detail: str) -> Problem:
    return Problem(422, "Unacceptable webhook URL", detail)


async def vet_url(ctx: Context, url: str) -> str:
    """``url`` if darkroom may post to it; else a 422 that says why."""
    try:
        target = URL(url)
    except (ValueError, TypeError) as exc:
        raise _unacceptable(f"{url[:200]!r} is not a URL: {exc}") from None
    if target.scheme not in ("http", "https"):
        raise _unacceptable(f"a webhook URL is http or https, not {target.scheme or '?'}:")
    host = target.raw_host
    if not host or not target.absolute:
        raise _unacceptable(f"{url[:200]!r} has no host")
    if target.raw_user is not None or target.raw_password is not None:
        raise _unacceptable("a webhook URL holds no credentials: the signature proves the sender")
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        await resolve_vetted(host, port, ctx.settings.webhooks.allow_networks)
    except FetchError as exc:
        why = exc.detail.partition(": private")[0]
        raise _unacceptable(
            f"{why}: private, loopback and link-local destinations are refused unless "
            "webhooks.allow_networks holds them"
        ) from None
    return url


def _info(fields: dict[str, Any], secret: str | None = None) -> web.Response:
    if secret is None:
        return json_response(WebhookInfo.model_validate(fields))
    return json_response(WebhookWithSecret.model_validate({**fields, "secret": secret}))


async def _queue(ctx: Context) -> HookNames:
    return await available(declare_stream(ctx.js, ctx.settings), "NATS")


def _check(error: WebhookError) -> Problem:
    return Problem(422, "Unprocessable Content", str(error))


# --- handlers -----------------------------------------------------------------------------
async def create_webhook(request: web.Request, body: NewWebhook) -> web.Response:
    ctx = request.app[CTX]
    store = _store(request)
    url = await vet_url(ctx, body.url)
    await _queue(ctx)  # deliveries have somewhere to wait from now on
    try:
        endpoint = await query_db(
            lambda: store.create(
                url, body.secret or new_secret(), body.event_types, body.description
            )
        )
    except WebhookError as exc:
        raise _check(exc) from None
    response = _info(endpoint.public(), endpoint.secret)
    response.set_status(201)
    return response


async def list_webhooks(request: web.Request) -> web.Response:
    store = _store(request)
    endpoints = await query_db(store.all)
    return json_response(WebhookList.model_validate({"items": [e.public() for e in endpoints]}))


async def get_webhook(request: web.Request) -> web.Response:
    endpoint_id = _endpoint_id(request)
    store = _store(request)
    endpoint = await query_db(lambda: store.get(endpoint_id))
    if endpoint is None:
        raise Problem(404, "Not Found", f"no webhook {endpoint_id}")
    return _info(endpoint.public())


async def change_webhook(request: web.Request, body: WebhookChange) -> web.Response:
    ctx = request.app[CTX]
    endpoint_id = _endpoint_id(request)
    store = _store(request)
    url = await vet_url(ctx, body.url) if body.url is not None else None
    secret = body.secret or (new_secret() if body.rotate_secret else None)
    try:
        endpoint = await query_db(
            lambda: store.update(
                endpoint_id,
                url=url,
                event_types=body.event_types,
                set_types="event_types" in body.model_fields_set,
                description=body.description,
                active=body.active,
                new_secret=secret,
                grace_s=ctx.settings.webhooks.secret_grace_s,
            )
        )
    except WebhookError as exc:
        raise _check(exc) from None
    if endpoint is None:
        raise Problem(404, "Not Found", f"no webhook {endpoint_id}")
    return _info(endpoint.public(), secret)


async def delete_webhook(request: web.Request) -> web.Response:
    endpoint_id = _endpoint_id(request)
    store = _store(request)
    if not await query_db(lambda: store.delete(endpoint_id)):
        raise Problem(404, "Not Found", f"no webhook {endpoint_id}")
    return web.Response(status=204)


async def list_deliveries(request: web.Request, query: DeliveriesQuery) -> web.Response:
    endpoint_id = _endpoint_id(request)
    store = _store(request)
    if await query_db(lambda: store.get(endpoint_id)) is None:
        raise Problem(404, "Not Found", f"no webhook {endpoint_id}")
    items = await query_db(
        lambda: store.attempts(endpoint_id, query.before, query.limit, query.delivery_id)
    )
    next_before = items[-1]["id"] if len(items) == query.limit else None
    return json_response(DeliveryPage.model_validate({"items": items, "next_before": next_before}))


async def _replay(ctx: Context, store: Webhooks, endpoint_id: str, rows: list[Any]) -> list[str]:
    """Queue ``rows`` again, one at a time: each is marked pending just before it is queued
    (the delivery, which may come at once, says what became of it), and back as it was if
    it could not be. A row another replay took meanwhile is skipped. If NATS fails partway,
    what was queued stays queued and the rest stays as it was, ready for another replay."""
    hooks = await _queue(ctx)
    wids = []
    for row in rows:
        wid, was = str(row["webhook_id"]), str(row["state"])
        if not await query_db(partial(store.set_state, wid, was, "pending")):
            continue
        item = delivery(endpoint_id, wid, row["event_id"], row["event_type"], row["body"].encode())
        item["attempts_before"] = row["attempts"]
        # A Nats-Msg-Id of its own: the message's would be dropped as a duplicate.
        msg_id = f"{wid}-replay-{new_id()}"
        try:
            await available(enqueue(ctx.js, hooks, item, msg_id), "NATS")
        except Exception:
            await query_db(partial(store.set_state, wid, "pending", was))
            raise
        wids.append(wid)
    return wids


def _still_pending(endpoint_id: str, wid: str) -> Problem:
    return Problem(
        409,
        "Conflict",
        f"webhook {endpoint_id}'s delivery {wid} is still being retried (pending): it is "
        "sent again on its schedule; replay it once it is delivered or given up",
    )


async def replay_delivery(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    endpoint_id = _endpoint_id(request)
    given = request.match_info["delivery_id"]
    store = _store(request)
    row = None
    if _MESSAGE_ID.match(given):
        row = await query_db(lambda: store.message(endpoint_id, given))
    if row is None:
        raise Problem(404, "Not Found", f"webhook {endpoint_id} has no delivery {given[:80]!r}")
    if row["state"] == "pending":
        raise _still_pending(endpoint_id, given)
    wids = await _replay(ctx, store, endpoint_id, [row])
    if not wids:  # it became pending meanwhile: another replay queued it
        raise _still_pending(endpoint_id, given)
    return json_response(Replayed(endpoint_id=endpoint_id, webhook_ids=wids, more=False), 202)


async def replay_failed(request: web.Request, query: ReplayQuery) -> web.Response:
    ctx = request.app[CTX]
    endpoint_id = _endpoint_id(request)
    store = _store(request)
    if await query_db(lambda: store.get(endpoint_id)) is None:
        raise Problem(404, "Not Found", f"no webhook {endpoint_id}")
    since = query.since if query.since.tzinfo else query.since.replace(tzinfo=UTC)
    rows = await query_db(lambda: store.failed_since(endpoint_id, since, query.limit + 1))
    wids = await _replay(ctx, store, endpoint_id, rows[: query.limit])
    answer = Replayed(endpoint_id=endpoint_id, webhook_ids=wids, more=len(rows) > query.limit)
    return json_response(answer, 202)


# --- routes -------------------------------------------------------------------------------
def routes() -> list[Route]:
    down = "the database or NATS did not answer in time"
    bad_url = "the URL is not http(s), or its host is a private, loopback or link-local address"
    return [
        Route(
            "POST",
            "/api/webhooks",
            create_webhook,
            "admin",
            "Add a webhook endpoint: signed CloudEvents of the chosen event types go to its URL",
            "webhooks",
            responses={
                201: Reply("added; its secret is shown this once", WebhookWithSecret),
                400: "the body is not a valid webhook",
                422: bad_url + "; or the secret or an event type is malformed",
                503: down,
            },
        ),
        Route(
            "GET",
            "/api/webhooks",
            list_webhooks,
            "admin",
            "Every webhook endpoint (never their secrets)",
            "webhooks",
            responses={200: Reply("the endpoints, oldest first", WebhookList), 503: down},
        ),
        Route(
            "GET",
            "/api/webhooks/{endpoint_id}",
            get_webhook,
            "admin",
            "One webhook endpoint",
            "webhooks",
            responses={200: Reply("the endpoint", WebhookInfo), 404: "no such webhook", 503: down},
        ),
        Route(
            "PATCH",
            "/api/webhooks/{endpoint_id}",
            change_webhook,
            "admin",
            "Change an endpoint's URL, event types, description or state, or rotate its secret",
            "webhooks",
            responses={
                200: Reply("changed; a rotated secret is shown this once", WebhookWithSecret),
                400: "the body is not a valid change",
                404: "no such webhook",
                422: bad_url + "; or the secret or an event type is malformed",
                503: down,
            },
        ),
        Route(
            "DELETE",
            "/api/webhooks/{endpoint_id}",
            delete_webhook,
            "admin",
            "Remove an endpoint, its queued deliveries and its log",
            "webhooks",
            responses={204: "removed", 404: "no such webhook", 503: down},
        ),
        Route(
            "GET",
            "/api/webhooks/{endpoint_id}/deliveries",
            list_deliveries,
            "admin",
            "Every attempt at delivering to an endpoint, newest first: status, latency, error",
            "webhooks",
            responses={
                200: Reply("a page of attempts", DeliveryPage),
                400: "a query parameter is invalid",
                404: "no such webhook",
                503: down,
            },
        ),
        Route(
            "POST",
            "/api/webhooks/{endpoint_id}/deliveries/{delivery_id}/replay",
            replay_delivery,
            "admin",
            "Send one message again, with the same webhook-id",
            "webhooks",
            responses={
                202: Reply("queued again", Replayed),
                404: "no such webhook or delivery",
                409: "the message is still being retried (pending)",
                503: down,
            },
        ),
        Route(
            "POST",
            "/api/webhooks/{endpoint_id}/replay",
            replay_failed,
            "admin",
            "Send again every message given up on since a time, oldest first, up to limit",
            "webhooks",
            responses={
                202: Reply("queued again", Replayed),
                400: "a query parameter is invalid",
                404: "no such webhook",
                503: down,
            },
        ),
    ]
