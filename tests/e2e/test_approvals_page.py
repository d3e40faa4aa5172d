"""The approvals page in the browser: held images arrive in the queue live, leave it live
when decided elsewhere, and are decided with the keyboard (a approves, r rejects with a
reason) and in bulk. The policy holds every generated image, so a generation fills the
queue (the tiny model runs on the CPU)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from playwright.async_api import Page, expect

from bus.core.settings import HoldPolicy, Settings
from tests.e2e.conftest import SignIn
from tests.support.http import auth
from tests.support.streams import eventually

pytestmark = [pytest.mark.nats, pytest.mark.s3]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The e2e settings, with every generated image held for a decision."""
    approval = settings.approval.model_copy(update={"hold": HoldPolicy(generated=True)})
    return settings.model_copy(update={"approval": approval})


async def generate(app_url: str, key: str, n: int) -> list[str]:
    """Ask for ``n`` images through the API (jobs of at most 4); their image ids."""
    ids: list[str] = []
    async with aiohttp.ClientSession() as http:
        for size in [4] * (n // 4) + ([n % 4] if n % 4 else []):
            body = {"prompt": "a lighthouse at dusk", "n": size, "seed": 3}
            async with http.post(f"{app_url}/api/generations", json=body, headers=auth(key)) as r:
                assert r.status == 202, await r.text()
                job = (await r.json())["id"]
            ids += [f"{job}-{i}" for i in range(size)]
    return ids


async def image(app_url: str, key: str, image_id: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{app_url}/api/images/{image_id}", headers=auth(key)) as r,
    ):
        assert r.status == 200, await r.text()
        doc: dict[str, Any] = await r.json()
        return doc


async def decided(app_url: str, key: str, image_id: str, decision: str) -> dict[str, Any]:
    """The image once its document shows ``decision``."""

    async def check() -> dict[str, Any] | None:
        doc = await image(app_url, key, image_id)
        return doc if doc["approval"] == decision else None

    found: dict[str, Any] = await eventually(check, 20, f"{image_id} {decision}")
    return found


async def test_the_queue_fills_live_and_is_decided_by_keyboard_and_in_bulk(
    page: Page, app_url: str, sign_in: SignIn, admin: str
) -> None:
    await sign_in(page, admin)
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Approvals").click()
    await expect(page.get_by_text("Nothing waits for a decision.")).to_be_visible()

    ids = await generate(app_url, admin, 5)
    # a plain list (no listbox: its items hold controls); each item's checkbox selects it
    queue = page.get_by_role("list", name="Pending images, oldest first")
    items = queue.locator(":scope > li")
    await expect(items).to_have_count(5, timeout=60_000)  # arrived without a reload
    await expect(items.first).to_contain_text("generated")  # the hold reason

    # decided elsewhere (here: the API): it leaves the queue live
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{app_url}/api/images/{ids[3]}/approve", json={}, headers=auth(admin)) as r,
    ):
        assert r.status == 200
    await expect(page.locator(f'li[data-image="{ids[3]}"]')).to_have_count(0)
    await expect(items).to_have_count(4)

    # the keyboard: j/k move, a approves the focused image
    await items.first.get_by_role("checkbox").focus()
    await page.keyboard.press("j")
    await expect(items.nth(1).get_by_role("checkbox")).to_be_focused()
    await page.keyboard.press("k")
    first = await items.first.get_attribute("data-image")
    await expect(items.first.get_by_role("checkbox")).to_be_focused()
    await page.keyboard.press("a")
    await expect(page.locator(f'li[data-image="{first}"]')).to_have_count(0)
    assert first is not None
    await decided(app_url, admin, first, "approved")

    # r asks for a reason; Enter rejects with it
    await expect(items.first.get_by_role("checkbox")).to_be_focused()  # the next took the place
    second = await items.first.get_attribute("data-image")
    assert second is not None
    await page.keyboard.press("r")
    reason = page.get_by_label("Reason for rejecting")
    await expect(reason).to_be_focused()
    # another image decided elsewhere meanwhile: the typing keeps its place
    other = await items.nth(1).get_attribute("data-image")
    assert other is not None and other != second
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{app_url}/api/images/{other}/approve", json={}, headers=auth(admin)) as r,
    ):
        assert r.status == 200
    await expect(page.locator(f'li[data-image="{other}"]')).to_have_count(0)
    await expect(reason).to_be_focused()
    await reason.fill("out of focus")
    await reason.press("Enter")
    await expect(page.locator(f'li[data-image="{second}"]')).to_have_count(0)
    doc = await decided(app_url, admin, second, "rejected")
    assert doc["decision"]["reason"] == "out of focus"

    # bulk: select all, give the reason, approve
    await expect(items).to_have_count(1)
    last = await items.first.get_attribute("data-image")
    assert last is not None
    await page.get_by_label("Select all").check()
    await page.get_by_label("Reason for the selected images").fill("batch ok")
    await page.get_by_role("button", name="Approve selected").click()
    await expect(page.get_by_text("Nothing waits for a decision.")).to_be_visible()
    await expect(page.get_by_text("1 approved.")).to_be_visible()
    doc = await decided(app_url, admin, last, "approved")
    assert doc["decision"]["reason"] == "batch ok"
