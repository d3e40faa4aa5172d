"""Who is calling, and which images it may see.

Every key with the ``read`` scope sees the images there is nothing to decide about and the
approved ones (:data:`bus.state.readmodel.SHOWN`). Pending and rejected images exist for
admin keys only: they are left out of every list, search and count for other keys, and
reading one by id (its document, pixels, or anything about it) answers 404, as for an id
that does not exist, so that neither its caption nor the fact that it waits leaks; the key
it was uploaded with still reads it by id, so an uploader sees that its upload waits. While
the policy holds (or may hold) what generations make, their step previews are an admin
key's only too.
"""

from __future__ import annotations

from aiohttp import web

from bus.gateway.problems import Problem
from bus.gateway.state import CTX
from bus.state.approvals import holds_generations
from bus.state.keys import ApiKey
from bus.state.readmodel import SHOWN

CALLER = web.RequestKey("caller", ApiKey)  # set by the auth middleware (bus.gateway.app)


async def caller(request: web.Request) -> ApiKey:
    """The API key the request was let in with."""
    try:
        return request[CALLER]
    except KeyError:  # a PUBLIC route: no key was asked for
        raise Problem(
            401, "Unauthorized", "send an API key as 'Authorization: Bearer <key>'"
        ) from None


async def sees_held(request: web.Request) -> bool:
    """Whether the caller sees pending and rejected images (an admin key)."""
    return (await caller(request)).allows("admin")


async def shown_only(request: web.Request, asked: str | None) -> bool:
    """Whether a listing must keep to the images every key sees; 403 when the caller asks
    for an ``approval`` (``asked``) it may not see."""
    if await sees_held(request):
        return False
    if asked is not None and asked not in SHOWN:
        raise Problem(
            403,
            "Forbidden",
            f"only an admin key may list {asked} images (this key sees {' and '.join(SHOWN)} ones)",
        )
    return True


async def check_visible(request: web.Request, doc: dict[str, object]) -> None:
    """404, as for an unknown id, unless the caller may see the image of ``doc``: a pending
    or rejected one only an admin key sees, and the key it was uploaded with (an uploader
    learns that its upload waits, or why it was rejected)."""
    if doc.get("approval") in SHOWN or await sees_held(request):
        return
    if doc.get("key") is not None and doc.get("key") == (await caller(request)).id:
        return
    raise Problem(404, "Not Found", f"no image with id {doc.get('id')!r}")


async def sees_previews(request: web.Request) -> bool:
    """Whether the caller may have generations' step previews: any key, unless the policy
    holds (or, screening NSFW scores, may hold) what generations make; then admin keys."""
    policy = request.app[CTX].settings.approval.hold
    return not holds_generations(policy) or await sees_held(request)
