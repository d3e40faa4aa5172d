"""The image viewer in the browser: the keyboard (←/→ through the gallery's list in its
order, Esc back to it, i for the information, + to zoom), editing a caption (kept, marked
as manual, read back through the API) and deleting with a confirm."""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Page, Route, expect

from bus.runtime.context import Context
from tests.e2e.conftest import SignIn
from tests.support.http import auth, form
from tests.support.images import jpeg
from tests.support.streams import eventually

pytestmark = [pytest.mark.nats, pytest.mark.s3]


async def upload_ready(
    app_url: str, ctx: Context, key: str, *colours: tuple[int, int, int]
) -> list[str]:
    """Upload one image per colour, one after the other (so their order is known), and wait
    until each is captioned; their ids, oldest first."""
    assert ctx.db is not None
    db = ctx.db
    ids = []
    async with aiohttp.ClientSession() as http:
        for index, colour in enumerate(colours):
            body = form((f"photo-{index}.jpg", jpeg(color=colour)))
            async with http.post(f"{app_url}/api/uploads", data=body, headers=auth(key)) as answer:
                assert answer.status == 201, await answer.text()
                ids.append((await answer.json())["results"][0]["id"])

    async def ready() -> bool:
        docs = [await db.get(i) for i in ids]
        return all(d is not None and d["status"] == "ready" for d in docs)

    await eventually(ready, timeout=60, what="the uploads captioned")
    return ids


async def api_get(app_url: str, key: str, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(app_url + path, headers=auth(key)) as r:
        return r.status, await r.json()


async def key_taken(page: Page, key: str) -> bool:
    """Whether the viewer takes ``key`` (it runs an action for it, so its default is
    prevented): a positive answer, at once, where pressing it could only show nothing."""
    return bool(
        await page.evaluate(
            """key => {
                const event = new KeyboardEvent('keydown', {key, bubbles: true, cancelable: true});
                window.dispatchEvent(event);
                return event.defaultPrevented;
            }""",
            key,
        )
    )


async def neighbours_known(page: Page) -> None:
    """Wait until the viewer has shown its image and the neighbours are known."""
    await expect(page.locator(".stage img")).to_be_visible()
    bar = page.get_by_role("navigation", name="Image")
    await expect(bar).not_to_have_attribute("aria-busy", "true")


async def test_the_keyboard_walks_the_gallerys_list_and_closes_to_it(
    page: Page, app_url: str, sign_in: SignIn, admin: str, ctx: Context
) -> None:
    first, second, third = await upload_ready(
        app_url, ctx, admin, (200, 0, 0), (0, 200, 0), (0, 0, 200)
    )
    await sign_in(page, admin)
    await page.goto(f"{app_url}/images/{second}")
    display = page.locator(".stage img")
    await expect(display).to_have_js_property("complete", True)
    assert await display.evaluate("img => img.naturalWidth") > 0
    info = page.get_by_role("complementary", name="Image information")
    await expect(info).to_be_visible()

    bar = page.get_by_role("navigation", name="Image")

    async def press(key: str, then: str) -> None:
        """Press ``key`` once the neighbours are known (the link the key follows shows)."""
        await expect(bar.get_by_role("link", name=re.compile(then))).to_be_visible()
        await page.keyboard.press(key)

    # Newest first, as the gallery lists them: → goes to the older image.
    await press("ArrowRight", "Next")
    await expect(page).to_have_url(re.compile(f"/images/{first}$"))
    await expect(info.get_by_role("heading", name="photo-0.jpg")).to_be_visible()
    # the last: Next is not offered, and → is left alone; Previous keeps its place
    await neighbours_known(page)
    await expect(bar.get_by_role("link", name=re.compile("Next"))).to_have_count(0)
    await expect(bar.get_by_text("Next")).to_be_hidden()
    assert not await key_taken(page, "ArrowRight")
    at_the_end = await bar.get_by_role("link", name=re.compile("Previous")).bounding_box()
    await press("ArrowLeft", "Previous")
    await expect(page).to_have_url(re.compile(f"/images/{second}$"))
    await expect(bar.get_by_role("link", name=re.compile("Next"))).to_be_visible()
    assert await bar.get_by_role("link", name=re.compile("Previous")).bounding_box() == at_the_end
    await press("ArrowLeft", "Previous")
    await expect(page).to_have_url(re.compile(f"/images/{third}$"))
    # the first: Previous is not offered, and ← is left alone
    await expect(info.get_by_role("heading", name="photo-2.jpg")).to_be_visible()
    await neighbours_known(page)
    await expect(bar.get_by_text("Previous")).to_be_hidden()
    assert not await key_taken(page, "ArrowLeft")
    await expect(bar.get_by_role("link", name=re.compile("Next"))).to_be_visible()

    # The gallery's query comes along: oldest first, → goes to the newer image.
    await page.goto(f"{app_url}/images/{first}?order=asc")
    await expect(info.get_by_role("heading", name="photo-0.jpg")).to_be_visible()
    await press("ArrowRight", "Next")
    await expect(page).to_have_url(re.compile(f"/images/{second}\\?order=asc$"))

    await page.keyboard.press("i")
    await expect(info).to_be_hidden()
    await page.keyboard.press("i")
    await expect(info).to_be_visible()
    await page.keyboard.press("+")
    await expect(page.get_by_role("group", name="Zoom").locator("output")).to_have_text("150%")
    await page.keyboard.press("0")
    await expect(page.get_by_role("group", name="Zoom").locator("output")).to_have_text("100%")

    await page.keyboard.press("Escape")
    await expect(page).to_have_url(re.compile(r"/\?order=asc$"))

    # a failed read of the neighbours says why (←/→ would do nothing, silently)
    async def refuse(route: Route) -> None:
        problem = {"title": "Service Unavailable", "status": 503, "detail": "the catalogue is busy"}
        await route.fulfill(
            status=503, content_type="application/problem+json", body=json.dumps(problem)
        )

    await page.route("**/neighbours*", refuse)
    await page.goto(f"{app_url}/images/{second}")
    await expect(bar.get_by_role("alert")).to_contain_text("the catalogue is busy")


async def test_a_list_of_one_image_offers_neither_previous_nor_next(
    page: Page, app_url: str, sign_in: SignIn, admin: str, ctx: Context
) -> None:
    (only,) = await upload_ready(app_url, ctx, admin, (40, 160, 40))
    await sign_in(page, admin)
    await page.goto(f"{app_url}/images/{only}")
    await neighbours_known(page)
    bar = page.get_by_role("navigation", name="Image")
    await expect(bar.get_by_role("link", name="← Gallery")).to_be_visible()
    for label, key in (("Previous", "ArrowLeft"), ("Next", "ArrowRight")):
        await expect(bar.get_by_text(label)).to_be_hidden()
        assert not await key_taken(page, key), key
    await expect(page).to_have_url(re.compile(f"/images/{only}$"))


async def test_a_caption_edited_in_the_viewer_is_kept_and_marked_manual(
    page: Page, app_url: str, sign_in: SignIn, admin: str, ctx: Context
) -> None:
    (image_id,) = await upload_ready(app_url, ctx, admin, (120, 120, 30))
    await sign_in(page, admin)
    await page.goto(f"{app_url}/images/{image_id}")
    shown = page.get_by_test_id("caption-text")
    await expect(shown).to_have_text(re.compile(r"\S"))

    await page.keyboard.press("e")
    field = page.get_by_role("textbox", name="Caption", exact=True)
    await expect(field).to_be_focused()
    await field.fill("Golden field at dusk, written by hand")
    await page.get_by_role("button", name="Save caption").click()
    await expect(shown).to_have_text("Golden field at dusk, written by hand", timeout=30_000)
    await expect(page.get_by_text("written by hand", exact=True)).to_be_visible()

    async def kept() -> dict[str, Any] | None:
        status, doc = await api_get(app_url, admin, f"/api/images/{image_id}")
        caption = doc.get("caption") or {}
        return doc if status == 200 and caption.get("source") == "manual" else None

    doc = await eventually(kept, timeout=30, what="the manual caption in the catalogue")
    assert doc["caption"]["caption"] == "Golden field at dusk, written by hand"


async def test_delete_asks_first_then_removes_the_image(
    page: Page, app_url: str, sign_in: SignIn, admin: str, ctx: Context
) -> None:
    older, newer = await upload_ready(app_url, ctx, admin, (90, 10, 90), (10, 90, 90))
    await sign_in(page, admin)
    await page.goto(f"{app_url}/images/{newer}")
    await expect(page.locator(".stage img")).to_be_visible()

    dialog = page.get_by_role("dialog", name="Delete this image?")
    await page.keyboard.press("Delete")
    await expect(dialog).to_be_visible()
    await dialog.get_by_role("button", name="Cancel").click()
    await expect(dialog).to_be_hidden()
    assert (await api_get(app_url, admin, f"/api/images/{newer}"))[0] == 200

    await page.keyboard.press("Delete")
    await dialog.get_by_role("button", name="Delete for good").click()
    await expect(page).to_have_url(re.compile(f"/images/{older}$"))  # on to the next one

    async def gone() -> bool:
        return (await api_get(app_url, admin, f"/api/images/{newer}"))[0] == 404

    await eventually(gone, timeout=30, what="the image gone from the catalogue")
    assert await ctx.store.list_keys(f"images/{newer}/") == []
