"""Who is calling, and which images it may see.

Every key with the ``read`` scope sees the images there is nothing to decide about and the
approved ones (:data:`bus.state.readmodel.SHOWN`). Pending and rejected images are listed,
searched and shown (their pixels) to admin keys only; anyone with the id still reads their
document, which says that they wait (an uploader sees what became of an upload).
"""

from __future__ import annotations

from aiohttp import web

from bus.gateway.problems import Problem
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


async def check_pixels(request: web.Request, doc: dict[str, object]) -> None:
    """403 unless the caller may see the image's pixels: those of a pending or rejected
    image only an admin key sees."""
    approval = doc.get("approval")
    if approval not in SHOWN and not await sees_held(request):
        raise Problem(
            403,
            "Forbidden",
            f"image {doc.get('id')} is {approval}: only an admin key may see it until it is "
            "approved",
        )
