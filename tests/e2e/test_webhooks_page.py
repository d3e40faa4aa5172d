"""The webhooks admin page in the browser: an endpoint added through the form (its secret
shown once, and the one the deliveries are signed with), a delivery in its log with its
status, a replay of it, and editing and deleting an endpoint.

A real receiver on loopback (allow-listed in ``webhooks.allow_networks``) verifies each
delivery's signature with the secret the page showed.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from playwright.async_api import Page, expect

from bus.core.settings import Settings, WebhookSettings
from bus.runtime.context import Context
from bus.runtime.registry import load
from tests.e2e.conftest import SignIn
from tests.support.streams import eventually
from tests.test_webhooks import SCHEDULE, Receiver, publish

pytestmark = [pytest.mark.nats, pytest.mark.s3]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Loopback allowed (the receiver is on 127.0.0.1), retries in seconds."""
    hooks = WebhookSettings(
        schedule_s=SCHEDULE,
        timeout_s=3.0,
        allow_networks=("127.0.0.0/8", "::1/128"),  # type: ignore[arg-type]
    )
    return settings.model_copy(update={"webhooks": hooks})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    await server.stop()


async def logged(page: Page, app_url: str, endpoint_id: str, attempts: int) -> list[Any]:
    """The endpoint's delivery log once it holds ``attempts`` attempts (read over the API)."""
    path = f"{app_url}/api/webhooks/{endpoint_id}/deliveries"

    async def read() -> list[Any] | None:
        items: list[Any] = (await (await page.request.get(path)).json())["items"]
        return items if len(items) >= attempts else None

    found: list[Any] = await eventually(read, timeout=30, what=f"{attempts} logged attempt(s)")
    return found


async def add_endpoint(page: Page, url: str, types: list[str]) -> str:
    """Fill the form; returns the secret the page shows once."""
    await page.get_by_role("button", name="Add endpoint").click()
    form = page.get_by_role("form", name="Add an endpoint")
    await form.get_by_label("URL").fill(url)
    await form.get_by_label("Description").fill("the e2e receiver")
    await form.get_by_label("All events").uncheck()
    for kind in types:
        await form.get_by_label(kind, exact=True).check()
    await form.get_by_role("button", name="Add endpoint").click()
    secret_field = page.get_by_role("textbox", name="Signing secret")
    await expect(secret_field).to_have_value(re.compile(r"^whsec_"))
    return await secret_field.input_value()


async def test_an_endpoint_gets_a_delivery_that_the_page_shows_and_replays(
    page: Page,
    app_url: str,
    sign_in: SignIn,
    admin: str,
    ctx: Context,
    receiver: Receiver,
    run_function: Callable[[Any], Awaitable[Any]],
) -> None:
    await run_function(load("webhooks"))
    await sign_in(page, admin)
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Webhooks").click()
    await expect(page.get_by_role("region", name="Endpoints")).to_contain_text("No endpoint yet")

    url = receiver.url("e2e")
    secret = await add_endpoint(page, url, ["captioned"])
    receiver.secrets["e2e"] = [secret]  # every delivery must verify with what was shown
    await page.get_by_role("button", name="Copy secret").click()
    await expect(page.get_by_role("status").filter(has_text="Cop")).to_be_visible()
    await page.get_by_role("button", name="I have saved it").click()
    await expect(page.get_by_role("textbox", name="Signing secret")).to_have_count(0)

    row = page.get_by_role("region", name="Endpoints").locator("tbody tr").filter(has_text=url)
    await expect(row).to_contain_text("captioned")
    await expect(row).to_contain_text("active")
    [endpoint] = (await (await page.request.get(app_url + "/api/webhooks")).json())["items"]
    await row.get_by_role("button", name=f"Deliveries to {url}").click()
    deliveries = page.get_by_role("region", name=f"Deliveries to {url}")
    await expect(deliveries).to_contain_text("No delivery yet")

    await publish(ctx, "captioned")
    await receiver.wait(lambda: len(receiver.hits["e2e"]) == 1)
    assert receiver.failures == []
    [first] = await logged(page, app_url, endpoint["id"], 1)
    # The live event led the page to read the log again; Refresh is there for the rest.
    attempt = deliveries.locator(f'tr[data-delivery="{first["webhook_id"]}"]')
    if not await attempt.count():
        await deliveries.get_by_role("button", name="Refresh").click()
    await expect(attempt).to_contain_text("captioned")
    await expect(attempt.locator('td[data-label="Status"]')).to_have_text("204")
    await expect(attempt.locator('td[data-label="Attempt"]')).to_have_text("1")
    await expect(attempt.locator('td[data-label="Latency"]')).to_have_text(re.compile(r"\d+ m?s"))
    await expect(attempt.locator('td[data-label="Message"]')).to_have_text("delivered")

    await attempt.get_by_role("button", name=f"Replay message {first['webhook_id']}").click()
    await expect(page.get_by_role("status").filter(has_text="queued again")).to_be_visible()
    await receiver.wait(lambda: len(receiver.hits["e2e"]) == 2)
    assert [h.webhook_id for h in receiver.hits["e2e"]] == [first["webhook_id"]] * 2
    await logged(page, app_url, endpoint["id"], 2)
    await deliveries.get_by_role("button", name="Refresh").click()
    await expect(deliveries.locator(f'tr[data-delivery="{first["webhook_id"]}"]')).to_have_count(2)
    await expect(
        deliveries.locator('td[data-label="Attempt"]', has_text=re.compile(r"^2$"))
    ).to_have_count(1)


async def test_an_endpoint_is_edited_disabled_rotated_and_deleted(
    page: Page, app_url: str, sign_in: SignIn, admin: str, receiver: Receiver
) -> None:
    await sign_in(page, admin)
    await page.goto(app_url + "/webhooks")
    url = receiver.url("edit")
    first = await add_endpoint(page, url, ["captioned", "failed.*"])
    await page.get_by_role("button", name="I have saved it").click()
    endpoints = page.get_by_role("region", name="Endpoints")
    row = endpoints.locator("tbody tr").filter(has_text=url)
    await expect(row).to_contain_text("captioned, failed.*")

    await row.get_by_role("button", name=f"Edit {url}").click()
    form = page.get_by_role("form", name="Edit endpoint")
    await form.get_by_label("More types").fill("failed.caption")
    await form.get_by_label("Active").uncheck()
    await form.get_by_role("button", name="Save changes").click()
    await expect(form).to_have_count(0)
    await expect(row).to_contain_text("captioned, failed.*, failed.caption")
    await expect(row).to_contain_text("disabled")
    [saved] = (await (await page.request.get(app_url + "/api/webhooks")).json())["items"]
    assert saved["active"] is False and saved["event_types"] == [
        "captioned",
        "failed.*",
        "failed.caption",
    ]
    await row.get_by_role("button", name="Enable").click()
    await expect(row).to_contain_text("active")

    await row.get_by_role("button", name="Rotate secret").click()
    await row.get_by_role("button", name="Rotate", exact=True).click()
    secret_field = page.get_by_role("textbox", name="Signing secret")
    await expect(secret_field).to_have_value(re.compile(r"^whsec_"))
    assert await secret_field.input_value() != first
    await expect(row).to_contain_text("old secret signs until")

    await row.get_by_role("button", name="Delete").click()
    await row.get_by_role("button", name="Cancel").click()  # asked first: nothing happened
    await expect(row).to_be_visible()
    await row.get_by_role("button", name="Delete").click()
    await row.get_by_role("button", name="Delete endpoint").click()
    await expect(endpoints).to_contain_text("No endpoint yet")
    assert (await (await page.request.get(app_url + "/api/webhooks")).json())["items"] == []
