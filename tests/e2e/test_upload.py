"""The upload page in the browser: several files at once, a bad one refused in the server's
own words, the good ones showing their thumbnail and caption live, and a duplicate linked
to the earlier image."""

from __future__ import annotations

import asyncio
import functools
import re
from typing import Any

import pytest
from playwright.async_api import Dialog, FilePayload, Locator, Page, Route, expect

from bus.runtime.context import Context
from tests.e2e.conftest import SignIn
from tests.support.images import jpeg, png
from tests.support.streams import eventually

pytestmark = [pytest.mark.nats, pytest.mark.s3]

REFUSED = "not a supported image (content sniffed from its bytes)"  # bus/images/check.py


def payload(name: str, mime: str, body: bytes) -> FilePayload:
    return {"name": name, "mimeType": mime, "buffer": body}


def row(page: Page, name: str) -> Locator:
    return page.get_by_role("list", name="Uploads").get_by_role("listitem", name=name)


async def shows_thumbnail(item: Locator) -> None:
    thumb = item.locator("img.thumb")
    await expect(thumb).to_be_visible(timeout=30_000)
    await expect(thumb).to_have_js_property("complete", True)
    assert await thumb.evaluate("img => img.naturalWidth") > 0


async def captioned(ctx: Context, image_id: str) -> dict[str, Any] | None:
    """The catalogue's document for ``image_id`` once it has a caption."""
    assert ctx.db is not None
    doc = await ctx.db.get(image_id)
    return doc if doc is not None and "caption" in doc else None


async def test_uploads_show_errors_thumbnails_and_captions_live(
    page: Page, app_url: str, sign_in: SignIn, make_key: Any, ctx: Context
) -> None:
    uploader = await make_key("upload", "read")
    await sign_in(page, uploader)
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Upload").click()
    await expect(page.get_by_role("heading", name="Upload")).to_be_visible()
    await page.evaluate("window.__sameDocument = true")  # gone if the page were reloaded

    barn, sea = jpeg(color=(170, 40, 30)), png(color=(20, 90, 200, 255))
    files = [
        payload("barn.jpg", "image/jpeg", barn),
        payload("notes.txt", "text/plain", b"these are words, not pixels\n" * 20),
        payload("sea.png", "image/png", sea),
    ]
    await page.get_by_label("Choose files").set_input_files(files)

    bad = row(page, "notes.txt")
    await expect(bad).to_contain_text("Failed")
    await expect(bad.locator(".error")).to_contain_text(REFUSED)
    assert ctx.db is not None
    for name in ("barn.jpg", "sea.png"):
        item = row(page, name)
        await shows_thumbnail(item)
        caption = item.locator(".caption")
        await expect(caption).to_have_text(re.compile(r"\S"), timeout=30_000)
        await expect(item).to_contain_text("Ready")
        href = await item.get_by_role("link", name="open").get_attribute("href")
        assert href is not None
        # The page shows the captioned event as it is published; the catalogue has it once
        # notify has projected it, which may be a moment later.
        image_id = href.rsplit("/", 1)[-1]
        doc = await eventually(
            functools.partial(captioned, ctx, image_id),
            timeout=30,
            what=f"{name}'s caption in the catalogue",
        )
        assert doc["name"] == name
        assert doc["caption"]["caption"] in (await caption.inner_text())
    total = page.get_by_role("region", name="All files")
    await expect(total).to_contain_text("2 of 3 sent")
    await expect(total).to_contain_text("1 failed")

    # The same bytes again: shown as already uploaded, linked to the earlier image.
    await page.get_by_label("Choose files").set_input_files(
        [payload("barn-again.jpg", "image/jpeg", barn)]
    )
    again = row(page, "barn-again.jpg")
    await expect(again).to_contain_text("Already uploaded")
    first = await row(page, "barn.jpg").get_by_role("link", name="open").get_attribute("href")
    await expect(again.get_by_role("link", name="see the earlier upload")).to_have_attribute(
        "href", first or ""
    )
    await shows_thumbnail(again)
    assert await page.evaluate("window.__sameDocument") is True


DROP_OUTSIDE = """() => {
    const data = new DataTransfer();
    data.items.add(new File(['x'], 'stray.jpg', { type: 'image/jpeg' }));
    const drop = new DragEvent('drop', { dataTransfer: data, bubbles: true, cancelable: true });
    document.querySelector('h1').dispatchEvent(drop);
    return drop.defaultPrevented;
}"""


async def test_leaving_mid_upload_asks_first_and_stray_drops_are_not_opened(
    page: Page, sign_in: SignIn, make_key: Any
) -> None:
    await sign_in(page, await make_key("upload", "read"))
    held: list[Route] = []

    async def hold(route: Route) -> None:
        held.append(route)  # never answered: the upload stays in flight

    await page.route("**/api/uploads", hold)
    main = page.get_by_role("navigation", name="Main")
    await main.get_by_role("link", name="Upload").click()
    await expect(page.get_by_role("heading", name="Upload")).to_be_visible()
    # a file dropped beside the zone: the browser must not open it in place of the app
    assert await page.evaluate(DROP_OUTSIDE) is True

    # a big folder: the rows are listed a hundred at a time, all of them counted
    body = jpeg(color=(1, 2, 3))
    await page.get_by_label("Choose files").set_input_files(
        [payload(f"slow-{i}.jpg", "image/jpeg", body) for i in range(101)]
    )
    cancel = row(page, "slow-0.jpg").get_by_role("button", name="Cancel slow-0.jpg")
    await expect(cancel).to_be_visible()
    await expect(page.get_by_role("list", name="Uploads").locator(":scope > li")).to_have_count(100)
    await expect(page.get_by_role("region", name="All files")).to_contain_text("0 of 101 sent")
    await page.get_by_role("button", name="Show 1 more").click()
    await expect(row(page, "slow-100.jpg")).to_be_visible()
    asked: asyncio.Queue[str] = asyncio.Queue()

    async def answer(dialog: Dialog, leave: bool) -> None:
        await (dialog.accept() if leave else dialog.dismiss())
        await asked.put(dialog.message)

    page.once("dialog", lambda dialog: answer(dialog, leave=False))
    await main.get_by_role("link", name="Gallery").click()
    assert "still being sent" in await asyncio.wait_for(asked.get(), 30)
    await expect(cancel).to_be_visible()  # stayed, still sending
    page.once("dialog", lambda dialog: answer(dialog, leave=True))
    await main.get_by_role("link", name="Gallery").click()
    assert "still being sent" in await asyncio.wait_for(asked.get(), 30)
    await expect(page.get_by_role("heading", name="Upload")).to_have_count(0)
    await page.unroute_all(behavior="ignoreErrors")
