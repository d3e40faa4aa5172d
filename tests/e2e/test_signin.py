"""Signing in and out in the browser: the key becomes a session cookie, never stored."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from playwright.async_api import Page, expect

from tests.e2e.conftest import SignIn

pytestmark = [pytest.mark.nats, pytest.mark.s3]


async def test_a_key_signs_in_to_a_cookie_and_the_scope_decides_the_pages(
    page: Page, app_url: str, sign_in: SignIn, make_key: Callable[..., Awaitable[str]]
) -> None:
    await page.goto(app_url + "/")
    key_field = page.get_by_label("API key")
    await key_field.fill("drk_nope_nope")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_contain_text("key")  # the server's own words

    reader = await make_key("read")
    await sign_in(page, reader)
    cookies = await page.context.cookies()
    assert [c["name"] for c in cookies] == ["darkroom_session"]
    assert cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict"
    stored = await page.evaluate("JSON.stringify({...localStorage, ...sessionStorage})")
    assert reader not in stored
    nav = page.get_by_role("navigation", name="Main")
    await expect(nav.get_by_role("link", name="Gallery")).to_be_visible()
    await expect(nav.get_by_role("link", name="Approvals")).to_have_count(0)  # admin only
    await expect(nav.get_by_role("link", name="Upload")).to_have_count(0)

    await page.reload()  # the cookie, not the page's memory, keeps it signed in
    await expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_label("API key")).to_be_visible()
    assert await page.context.cookies() == []


async def test_an_admin_sees_every_page(page: Page, sign_in: SignIn, admin: str) -> None:
    await sign_in(page, admin)
    nav = page.get_by_role("navigation", name="Main")
    for name in ("Gallery", "Upload", "Generate", "Approvals", "Carousel", "Webhooks", "Status"):
        await expect(nav.get_by_role("link", name=name)).to_be_visible()
