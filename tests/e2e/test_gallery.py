"""The gallery in the browser: a virtualised grid over 100,000 images, live arrivals,
search and similar images, and filters kept in the URL."""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Page, expect

from tests.e2e.conftest import SignIn
from tests.support.gallery_seed import seed_images
from tests.support.http import auth, form
from tests.support.images import jpeg
from tests.support.streams import eventually

pytestmark = [pytest.mark.nats, pytest.mark.s3]
ROWS = 100_000
TILES = "[role=option]"

# Scrolls the window to the bottom a screenful per frame, counting the tiles in the DOM
# after each frame; resolves with the most seen.
SCROLL_AND_COUNT = """async (step) => {
    let most = document.querySelectorAll('[role=option]').length;
    const frame = () => new Promise((resolve) => requestAnimationFrame(resolve));
    while (window.scrollY + innerHeight < document.documentElement.scrollHeight - 1) {
        window.scrollBy(0, step);
        await frame();
        await frame();
        most = Math.max(most, document.querySelectorAll('[role=option]').length);
    }
    return most;
}"""


async def upload(app_url: str, key: str, name: str, body: bytes) -> str:
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            app_url + "/api/uploads", data=form((name, body)), headers=auth(key)
        )
        assert response.status == 201, await response.text()
        image_id: str = (await response.json())["results"][0]["id"]
        return image_id


async def until_ready(ctx: Any, image_id: str) -> None:
    async def ready() -> bool:
        doc = await ctx.db.get(image_id)
        return doc is not None and doc["status"] == "ready"

    await eventually(ready, timeout=60, what=f"{image_id} captioned")


@pytest.mark.timeout(300)  # seeding and scrolling 100,000 rows on two busy cores
async def test_a_hundred_thousand_images_scroll_to_the_end_with_the_dom_bounded(
    page: Page, app_url: str, sign_in: SignIn, ctx: Any, make_key: Callable[..., Awaitable[str]]
) -> None:
    ids = await seed_images(ctx.db.pool, ctx.settings.db_schema, ROWS)
    await sign_in(page, await make_key("read"))
    await expect(page.get_by_role("status").filter(has_text="100,000 images")).to_be_visible()
    first = page.locator(f'[data-id="{ids[-1]}"]')  # newest first
    await expect(first).to_be_visible()
    # The whole height is laid out from the months' counts, before their pages load.
    height = await page.evaluate("document.documentElement.scrollHeight")
    tile = (await first.bounding_box()) or {"width": 0.0}
    viewport = page.viewport_size or {"width": 0, "height": 0}
    columns = math.floor((viewport["width"] + 4) / (tile["width"] + 4))
    assert height > ROWS / columns * tile["width"]

    most = await page.evaluate(SCROLL_AND_COUNT, viewport["height"] * 5)
    # What is in view plus half a screen each side, a few partial rows and month edges.
    rows = math.ceil(2 * viewport["height"] / (tile["width"] + 4)) + 4
    assert 0 < most <= rows * columns, f"{most} tiles in the DOM (bound {rows * columns})"
    last = page.locator(f'[data-id="{ids[0]}"]')  # the oldest, at the very end
    await expect(last).to_be_visible()
    await expect(last).to_have_attribute("aria-posinset", str(ROWS))
    assert await page.locator(TILES).count() <= rows * columns


async def test_a_new_upload_appears_live_with_its_thumbnail(
    page: Page, app_url: str, sign_in: SignIn, admin: str
) -> None:
    await sign_in(page, admin)
    await expect(page.get_by_text("No images yet.")).to_be_visible()
    image_id = await upload(app_url, admin, "live.jpg", jpeg(color=(200, 40, 40)))
    # The hidden zip frame's own first load is no answer: nothing has failed yet.
    await expect(page.get_by_text("The zip could not be made")).to_have_count(0)
    tile = page.locator(f'[data-id="{image_id}"]')
    await expect(tile).to_be_visible()
    thumbnail = tile.locator("img")
    await expect(thumbnail).to_have_attribute("src", f"/api/images/{image_id}/thumbnail?px=256")
    await expect(thumbnail).to_have_class(re.compile(r"\bloaded\b"))  # shown, not a placeholder
    # The caption arrives the same way: the demo model's output is marked.
    await expect(tile.get_by_text("demo model")).to_be_visible(timeout=60_000)
    await expect(tile).to_have_attribute("aria-label", re.compile("demo model"))

    # A zip is a form post the browser saves as it streams (the session cookie, same origin).
    await tile.click(modifiers=["Control"])
    async with page.expect_download() as started:
        await page.get_by_role("button", name="Download zip").click()
    download = await started.value
    assert download.suggested_filename == "darkroom-1-images.zip"
    assert download.url == f"{app_url}/api/images/zip"  # from the gateway, not a blob: in memory
    with zipfile.ZipFile(await download.path()) as archive:
        assert archive.namelist() == ["live.jpg"]
    # An error comes back as words on the page, not as a page of its own.
    async with aiohttp.ClientSession() as http:
        gone = await http.delete(f"{app_url}/api/images/{image_id}", headers=auth(admin))
        assert gone.status < 300, await gone.text()
    await expect(tile).to_have_count(0)  # the live event took it away; it is still selected
    await page.get_by_role("button", name="Download zip").click()
    await expect(page.get_by_role("alert")).to_contain_text(
        f"The zip could not be made: no image with id '{image_id}'"
    )
    await expect(page).to_have_url(f"{app_url}/")


async def test_search_and_similar_images(
    page: Page, app_url: str, sign_in: SignIn, ctx: Any, admin: str
) -> None:
    sunset = await upload(app_url, admin, "sunset by the sea.jpg", jpeg(color=(220, 60, 20)))
    field = await upload(app_url, admin, "green field.jpg", jpeg(color=(30, 180, 40)))
    for image_id in (sunset, field):
        await until_ready(ctx, image_id)
    await sign_in(page, admin)
    await expect(page.locator(TILES)).to_have_count(2)

    await page.get_by_label("Search words").fill("sunset")
    await page.get_by_role("button", name="Search", exact=True).click()
    await expect(page).to_have_url(f"{app_url}/?q=sunset")
    await expect(page.locator(TILES)).to_have_count(1)
    await expect(page.locator(f'[data-id="{sunset}"]')).to_be_visible()

    # Similar images from a selected one: everything else, itself left out.
    await page.locator(f'[data-id="{sunset}"]').click(modifiers=["Control"])
    await page.get_by_role("button", name="Find similar").click()
    await expect(page).to_have_url(f"{app_url}/?similar={sunset}")
    await expect(page.get_by_text("Images like")).to_be_visible()
    await expect(page.locator(TILES)).to_have_count(1)
    await expect(page.locator(f'[data-id="{field}"]')).to_be_visible()
    await page.get_by_role("button", name="Back to all images").click()
    await expect(page.locator(TILES)).to_have_count(2)


async def test_filters_live_in_the_url_and_the_keyboard_moves_between_tiles(
    page: Page, app_url: str, sign_in: SignIn, ctx: Any, admin: str
) -> None:
    ids = await seed_images(ctx.db.pool, ctx.settings.db_schema, 30)
    await sign_in(page, admin)
    await expect(page.locator(TILES).first).to_be_visible()

    status = page.get_by_label("Status")
    await status.select_option("failed")
    await expect(page).to_have_url(f"{app_url}/?status=failed")
    await expect(page.get_by_text("No images match these filters.")).to_be_visible()
    await page.reload()
    await expect(status).to_have_value("failed")
    await expect(page.get_by_text("No images match these filters.")).to_be_visible()
    await page.go_back()  # the unfiltered list again
    await expect(page).to_have_url(f"{app_url}/")
    await expect(status).to_have_value("")
    await expect(page.locator(TILES)).to_have_count(30)

    await page.goto(f"{app_url}/?from=2026-01-01&to=2026-01-01&order=asc")
    await expect(page.get_by_label("Sort")).to_have_value("created.asc")
    await expect(page.locator(TILES).first).to_have_attribute("data-id", ids[0])

    # Keyboard: focus the first tile, move right and down, select with space, open with Enter.
    first = page.locator(TILES).first
    await first.focus()
    await page.keyboard.press("ArrowRight")
    await expect(page.locator(f'[data-id="{ids[1]}"]')).to_be_focused()
    await page.keyboard.press(" ")
    await expect(page.locator(f'[data-id="{ids[1]}"]')).to_have_attribute("aria-selected", "true")
    await page.keyboard.press("Shift+ArrowRight")
    await expect(page.get_by_text("2 selected")).to_be_visible()
    await page.keyboard.press("Escape")
    await expect(page.get_by_text("2 selected")).to_have_count(0)
    await page.keyboard.press("Enter")
    await expect(page).to_have_url(
        f"{app_url}/images/{ids[2]}?from=2026-01-01&to=2026-01-01&order=asc"
    )


async def test_the_keyboard_reaches_the_tile_in_view_after_the_focused_one_scrolls_away(
    page: Page, app_url: str, sign_in: SignIn, ctx: Any, admin: str
) -> None:
    ids = await seed_images(ctx.db.pool, ctx.settings.db_schema, 2000)
    await sign_in(page, admin)
    first = page.locator(f'[data-id="{ids[-1]}"]')
    await first.focus()
    await expect(first).to_be_focused()

    # Scrolled by the mouse, far past the focused tile: its element now shows another image.
    await page.evaluate("window.scrollTo(0, document.documentElement.scrollHeight / 2)")
    await expect(first).to_have_count(0)
    stop = page.locator(f'{TILES}[tabindex="0"]')
    await expect(stop).to_have_count(1)  # Tab still reaches the grid...
    await expect(stop).to_be_in_viewport()  # ...where the user is
    await expect(stop).to_have_attribute("data-id", re.compile("."))
    shown = await stop.get_attribute("data-id")
    await stop.press("Enter")  # Enter opens the image the tile shows
    await expect(page).to_have_url(f"{app_url}/images/{shown}")
