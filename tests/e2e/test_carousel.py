"""The carousel as a kiosk in the browser: settings from its URL, no header, and an image
approved on the approvals page shows up in it without a reload; space pauses, the arrows
move. The policy holds every generated image, so nothing shows until it is approved. The
controls sit beside the image, never over it."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import FloatRect, Locator, Page, expect

from bus.core.settings import Settings
from tests.e2e.conftest import SignIn
from tests.e2e.test_approvals_page import generate
from tests.e2e.test_approvals_page import settings as held_settings

pytestmark = [pytest.mark.nats, pytest.mark.s3]

settings = held_settings


def overlap(a: FloatRect, b: FloatRect) -> bool:
    return (
        a["x"] < b["x"] + b["width"]
        and b["x"] < a["x"] + a["width"]
        and a["y"] < b["y"] + b["height"]
        and b["y"] < a["y"] + a["height"]
    )


async def assert_beside(page: Page, shown: Locator) -> None:
    """The controls show, and none of them covers any of the image's box (its fit box: the
    picture is drawn inside it)."""
    controls = page.get_by_role("group", name="Slideshow controls")
    await expect(controls).to_be_visible()
    image = await shown.bounding_box()
    assert image is not None and image["width"] > 0 and image["height"] > 0
    bar = await controls.bounding_box()
    assert bar is not None
    assert not overlap(image, bar), f"the controls {bar} cover the image {image}"


async def test_an_approved_image_appears_in_the_kiosk_carousel(
    page: Page, app_url: str, sign_in: SignIn, admin: str, settings: Settings
) -> None:
    await sign_in(page, admin)
    await page.goto(f"{app_url}/carousel?kiosk&interval=1&overlay=caption")
    await expect(page.get_by_role("navigation", name="Main")).to_have_count(0)  # kiosk: bare
    await expect(page.get_by_text("No approved images yet.")).to_be_visible()
    await expect(page.get_by_role("button", name="Full screen")).to_be_visible()

    ids = await generate(app_url, admin, 2)
    approvals = await page.context.new_page()
    await approvals.goto(f"{app_url}/approvals")
    queue = approvals.get_by_role("list", name="Pending images, oldest first")
    items = queue.locator(":scope > li")
    await expect(items).to_have_count(2, timeout=60_000)
    await items.first.get_by_role("checkbox").focus()
    first = await items.first.get_attribute("data-image")
    assert first in ids
    await approvals.keyboard.press("a")
    await expect(items).to_have_count(1)

    # the kiosk shows it, without a reload
    await page.bring_to_front()
    shown = page.locator(f'img.layer[data-image="{first}"]')
    await expect(shown).to_be_attached(timeout=30_000)
    await expect(shown).to_have_class(re.compile(r"\bshown\b"))  # loaded, faded in
    assert await shown.evaluate("img => img.naturalWidth > 0")
    await assert_beside(page, shown)
    await page.set_viewport_size({"width": 390, "height": 700})  # a phone, upright
    await assert_beside(page, shown)
    await page.set_viewport_size({"width": 1280, "height": 800})

    # the second approval joins the show; paused, the arrows move between the two
    await approvals.keyboard.press("a")
    await expect(items).to_have_count(0)
    await expect(page.locator(".count")).to_have_text("1 / 2", timeout=30_000)
    await page.keyboard.press(" ")
    play = page.get_by_role("button", name="Play")
    await expect(play).to_be_visible()
    await expect(play).not_to_have_attribute("aria-pressed", re.compile(".*"))  # the label says it
    await page.keyboard.press("ArrowRight")
    await expect(page.locator(".count")).to_have_text("2 / 2")
    await page.keyboard.press("ArrowLeft")
    await expect(page.locator(".count")).to_have_text("1 / 2")
