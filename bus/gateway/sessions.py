"""Signing in from a browser, which cannot put an API key on every request it makes.

- **A cookie session.** ``POST /api/session``, with the key as ``Authorization: Bearer``,
  sets ``darkroom_session``: HttpOnly (no script reads it), SameSite=Strict (no other site's
  page sends it), Secure when the request came over https, holding a random session id.
  The auth middleware then takes the cookie on every route, with the scopes of the key it
  was made from; a request that changes something (POST, PUT, PATCH, DELETE) must also come
  from the same origin (``Sec-Fetch-Site``, else ``Origin``), against cross-site forgery.
  ``DELETE /api/session`` signs out.
- **A ticket**, for ``GET /api/events?ticket=``: ``POST /api/events/ticket`` gives one that
  works once, within :data:`TICKET_TTL_S`. An EventSource cannot send headers, and a
  long-lived key must never sit in a URL (logs, history, Referer): one that does is refused.

Sessions and tickets live server-side, each in a NATS KV bucket whose TTL ends them, under
the SHA-256 of their secret (the bucket holds nothing a browser could present), naming the
key they stand for. Every use reads the session (or ticket) and the key afresh, so signing
out, and revoking the key, end the session at its next use on every gateway. A signed
cookie would have saved a read, but could not be signed out (a copy stays valid) nor be
ended by revoking its key without this same state; and it would need a secret shared by
every gateway. A ticket is redeemed by deleting it conditioned on its revision: of two
gateways redeeming it at once, one wins.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.errors
import orjson
from aiohttp import web
from nats.js.errors import APIError, KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from bus.gateway import events
from bus.gateway.access import caller
from bus.gateway.contract import Timestamp
from bus.gateway.problems import Problem, json_response
from bus.gateway.routes import Reply, Route
from bus.gateway.state import CTX
from bus.runtime.streams import key_value
from bus.state.keys import ApiKey
from bus.state.readmodel import format_time

COOKIE = "darkroom_session"
SESSION_TTL_S = 7 * 86_400  # from sign-in; then sign in again
TICKET_TTL_S = 60
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Routes that take ?ticket= (an EventSource's only way to authenticate without a cookie).
TICKET_ROUTES = frozenset({("GET", events.PATH)})
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{20,100}$")
_WRONG_REVISION = (10071, 10164)  # JetStream: "wrong last sequence" (redeemed meanwhile)


class Refused(Exception):
    """A cookie or ticket that was given is no good (401), or a cookie-authenticated
    change came from another origin (403)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Grant:
    """What a session or a ticket stands for: a key, until a time (Unix seconds)."""

    key_id: str
    expires: float

    def encode(self) -> bytes:
        return orjson.dumps({"key_id": self.key_id, "expires": self.expires})

    @classmethod
    def decode(cls, raw: bytes) -> Grant | None:
        try:
            doc = orjson.loads(raw)
            return cls(str(doc["key_id"]), float(doc["expires"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def bearer(request: web.BaseRequest) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if there is one."""
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return None


def same_origin(request: web.BaseRequest) -> bool:
    """Whether the browser says the request comes from a page of this origin.
    ``Sec-Fetch-Site`` when sent (every current browser), else ``Origin`` against ``Host``;
    neither: no."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("Origin")
    if origin is None or "://" not in origin:
        return False
    return origin.split("://", 1)[1].lower() == request.host.lower()


class Browsers:
    """Sessions and tickets (see the module)."""

    def __init__(
        self,
        keys: KeyValue,
        sessions: KeyValue,
        tickets: KeyValue,
        session_ttl: float = SESSION_TTL_S,
        ticket_ttl: float = TICKET_TTL_S,
    ) -> None:
        self._keys = keys
        self._sessions = sessions
        self._tickets = tickets
        self.session_ttl = session_ttl
        self.ticket_ttl = ticket_ttl

    async def authenticate(self, request: web.Request, route: str) -> ApiKey | None:
        """The key a request without an ``Authorization`` header stands for: its ticket on
        a route that takes one, else its session cookie; None when it brings neither.
        Raises :class:`Refused` for a bad one, or a change from another origin."""
        ticket = request.query.get("ticket")
        if ticket is not None and (request.method, route) in TICKET_ROUTES:
            if ticket.startswith("drk_"):
                raise Refused(
                    401,
                    "an API key never goes in a URL (logs and history keep it): sign in "
                    "(POST /api/session) or take a ticket (POST /api/events/ticket)",
                )
            record = await self.redeem_ticket(ticket)
            if record is None:
                raise Refused(
                    401,
                    "this ticket is unknown, used or expired (each works once, within "
                    f"{self.ticket_ttl:.0f} s): take another, POST /api/events/ticket",
                )
            return record
        session = request.cookies.get(COOKIE)
        if session is None:
            return None
        record = await self.session_key(session)
        if record is None:
            raise Refused(
                401,
                "this session has ended (signed out, expired, or its API key was revoked): "
                "sign in again, POST /api/session",
            )
        if request.method in UNSAFE and not same_origin(request):
            raise Refused(
                403,
                "a change made with a session cookie must come from this site's own pages "
                "(Sec-Fetch-Site: same-origin, or a matching Origin)",
            )
        return record

    async def open_session(self, record: ApiKey) -> tuple[str, float]:
        """A new session for ``record``: its id (the cookie's value) and when it ends."""
        session = secrets.token_urlsafe(32)
        grant = Grant(record.id, time.time() + self.session_ttl)
        await self._sessions.create(_digest(session), grant.encode())
        return session, grant.expires

    async def session_key(self, session: str) -> ApiKey | None:
        """The key a live session stands for; None once it ended or its key is revoked."""
        if not _SECRET_RE.match(session):
            return None
        grant = await _read(self._sessions, _digest(session))
        if grant is None or grant.expires <= time.time():
            return None
        return await self._key(grant.key_id)

    async def session_expires(self, session: str) -> float | None:
        """When a session ends (Unix seconds); None for one that is not live."""
        if not _SECRET_RE.match(session):
            return None
        grant = await _read(self._sessions, _digest(session))
        return grant.expires if grant is not None and grant.expires > time.time() else None

    async def close_session(self, session: str) -> None:
        if _SECRET_RE.match(session):
            await self._sessions.delete(_digest(session))

    async def issue_ticket(self, record: ApiKey) -> str:
        ticket = secrets.token_urlsafe(32)
        grant = Grant(record.id, time.time() + self.ticket_ttl)
        await self._tickets.create(_digest(ticket), grant.encode())
        return ticket

    async def redeem_ticket(self, ticket: str) -> ApiKey | None:
        """The key a ticket stands for, once: the ticket is gone after."""
        if not _SECRET_RE.match(ticket):
            return None
        name = _digest(ticket)
        try:
            entry = await self._tickets.get(name)
        except KeyNotFoundError:
            return None
        try:
            await self._tickets.delete(name, last=entry.revision)
        except APIError as exc:
            if exc.err_code in _WRONG_REVISION:
                return None  # redeemed meanwhile, here or on another gateway
            raise
        grant = Grant.decode(entry.value or b"")
        if grant is None or grant.expires <= time.time():
            return None
        return await self._key(grant.key_id)

    async def _key(self, key_id: str) -> ApiKey | None:
        """The key as stored now (read afresh: a revocation counts at once)."""
        try:
            entry = await self._keys.get(key_id)
        except KeyNotFoundError:
            return None
        return ApiKey.decode(entry.value) if entry.value else None


async def _read(kv: KeyValue, name: str) -> Grant | None:
    try:
        entry = await kv.get(name)
    except KeyNotFoundError:
        return None
    return Grant.decode(entry.value or b"")


BROWSERS = web.AppKey("browsers", Browsers)


async def lifespan(app: web.Application) -> AsyncIterator[None]:
    """The app's :class:`Browsers` (``app[BROWSERS]``), its buckets made on first use."""
    ctx = app[CTX]
    replicas = ctx.settings.stream.replicas
    app[BROWSERS] = Browsers(
        ctx.api_keys,
        await key_value(ctx.js, ctx.names.sessions_kv, replicas, ttl=SESSION_TTL_S),
        await key_value(ctx.js, ctx.names.tickets_kv, replicas, ttl=TICKET_TTL_S),
    )
    yield


# --- routes ---------------------------------------------------------------------------------


class Session(BaseModel):
    key_id: str = Field(description="the API key the session stands for")
    name: str
    scopes: list[str]
    expires: Timestamp | None = Field(
        description="when the session ends; null when asked with an API key, not a cookie"
    )


class Ticket(BaseModel):
    ticket: str = Field(description="for GET /api/events?ticket=, once")
    expires_in: int = Field(description="seconds it stays valid")


def routes() -> list[Route]:
    return [
        Route(
            "POST",
            "/api/session",
            create_session,
            "read",
            "Sign a browser in: sets an HttpOnly, SameSite=Strict session cookie standing for "
            "the API key sent as 'Authorization: Bearer' (its scopes), for 7 days; changes "
            "made with the cookie must come from this origin",
            "sessions",
            responses={
                201: Reply("signed in: the cookie is set (Set-Cookie)", Session),
                403: "the request came with a session cookie instead of an API key",
                503: "the session store did not answer",
            },
        ),
        Route(
            "GET",
            "/api/session",
            get_session,
            "read",
            "Who this browser is signed in as: the key's name and scopes, and when the "
            "session ends (401 when it is not signed in); a page asks this at start",
            "sessions",
            responses={200: Reply("the session", Session)},
        ),
        Route(
            "DELETE",
            "/api/session",
            delete_session,
            "read",
            "Sign out: ends the session the cookie names, on every gateway, and clears it",
            "sessions",
            responses={204: "signed out (nothing to do without a cookie)"},
        ),
        Route(
            "POST",
            "/api/events/ticket",
            create_ticket,
            "read",
            f"A one-use ticket for GET /api/events?ticket=, valid {TICKET_TTL_S} s: for an "
            "EventSource without a session cookie (it cannot send headers, and an API key "
            "never goes in a URL)",
            "events",
            responses={
                201: Reply("the ticket", Ticket),
                503: "the ticket store did not answer",
            },
        ),
    ]


async def create_session(request: web.Request) -> web.Response:
    if bearer(request) is None:
        raise Problem(
            403,
            "Forbidden",
            "a session is made from an API key: send it as 'Authorization: Bearer <key>'",
        )
    browsers = request.app[BROWSERS]
    record = await caller(request)
    try:
        previous = request.cookies.get(COOKIE)
        if previous is not None:  # this browser's last session, replaced
            await browsers.close_session(previous)
        session, expires = await browsers.open_session(record)
    except (TimeoutError, nats.errors.Error) as exc:
        raise Problem(
            503, "Service Unavailable", f"the session store did not answer: {exc}"
        ) from None
    doc = Session(
        key_id=record.id,
        name=record.name,
        scopes=list(record.scopes),
        expires=format_time(datetime.fromtimestamp(expires, UTC)) or "",
    )
    response = json_response(doc, 201)
    response.set_cookie(
        COOKIE,
        session,
        max_age=int(browsers.session_ttl),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=_https(request),
    )
    return response


async def get_session(request: web.Request) -> web.Response:
    record = await caller(request)
    session = request.cookies.get(COOKIE)
    expires = None
    if session is not None and bearer(request) is None:
        expires = await request.app[BROWSERS].session_expires(session)
    ends = datetime.fromtimestamp(expires, UTC) if expires is not None else None
    doc = Session(
        key_id=record.id,
        name=record.name,
        scopes=list(record.scopes),
        expires=format_time(ends) if ends is not None else None,
    )
    return json_response(doc)


async def delete_session(request: web.Request) -> web.Response:
    session = request.cookies.get(COOKIE)
    if session is not None:
        await request.app[BROWSERS].close_session(session)
    response = web.Response(status=204)
    response.del_cookie(COOKIE, path="/", httponly=True, samesite="Strict", secure=_https(request))
    return response


async def create_ticket(request: web.Request) -> web.Response:
    browsers = request.app[BROWSERS]
    try:
        ticket = await browsers.issue_ticket(await caller(request))
    except (TimeoutError, nats.errors.Error) as exc:
        raise Problem(
            503, "Service Unavailable", f"the ticket store did not answer: {exc}"
        ) from None
    doc = Ticket(ticket=ticket, expires_in=int(browsers.ticket_ttl))
    return json_response(doc, 201)


def _https(request: web.BaseRequest) -> bool:
    """Whether the browser reached us over https: directly, or through a proxy that says
    so. Trusting the proxy's header can only make the cookie stricter (Secure)."""
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
