"""The gallery sorted by the date taken, in the browser: an image uploaded after the timeline
was read comes in live on top ("New"), and the months counted keep their images."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.async_api import Page, expect

from tests.e2e.conftest import SignIn
from tests.e2e.test_gallery import upload
from tests.support.images import jpeg
from tests.support.streams import eventually

pytestmark = [pytest.mark.nats, pytest.mark.s3]


async def test_sorted_by_date_taken_a_new_upload_arrives_in_new_and_shifts_no_month(
    page: Page, app_url: str, sign_in: SignIn, admin: str, ctx: Any
) -> None:
    counted = await upload(app_url, admin, "counted.jpg", jpeg(color=(40, 120, 200)))
    await eventually(lambda: ctx.db.get(counted), timeout=30, what="the first image projected")
    await sign_in(page, admin)
    await page.goto(app_url + "/?sort=taken")
    first = page.locator(f'[data-id="{counted}"]')
    await expect(first).to_have_attribute("data-pos", "1:0")  # its month, after "New"

    later = await upload(app_url, admin, "later.jpg", jpeg(color=(200, 120, 40)))
    await expect(page.locator(f'[data-id="{later}"]')).to_have_attribute("data-pos", "0:0")
    await expect(page.get_by_role("status").filter(has_text="2 images")).to_be_visible()
    await expect(first).to_have_attribute("data-pos", "1:0")
