"""The status dashboard in the browser: every function's row, the GPU and model sections as
the API reports them, dead letters shown live with their reasons, and a retry that takes
one out of the dead-letter queue."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from playwright.async_api import Page, expect

from bus import Context, Function
from bus.core.envelope import Event, new_id, now_iso
from bus.core.settings import Settings
from bus.runtime.registry import enabled_names
from tests.e2e.conftest import SignIn
from tests.support.streams import dead_letters, settled
from tests.test_dead_letters import make_event, picky, publish

pytestmark = [pytest.mark.nats, pytest.mark.s3]


async def api(page: Page, path: str) -> Any:
    """``path`` read as the signed-in page reads it (its session cookie)."""
    answer = await page.request.get(path)
    assert answer.ok, await answer.text()
    return await answer.json()


async def test_the_dashboard_shows_every_function_the_gpus_and_the_models(
    page: Page,
    app_url: str,
    sign_in: SignIn,
    make_key: Callable[..., Awaitable[str]],
    settings: Settings,
) -> None:
    await sign_in(page, await make_key("read"))
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Status").click()
    await expect(page.get_by_role("heading", name="Status", level=1)).to_be_visible()

    functions = page.get_by_role("region", name="Functions")
    table = functions.get_by_role("table", name="Each function's lag, rate and failures")
    deployed = {
        f["function"]: f["deployed"]
        for f in (await api(page, app_url + "/api/status"))["functions"]
    }
    assert sorted(deployed) == sorted(enabled_names(settings))
    assert deployed["ingest"] and deployed["caption"]  # the ones app_url runs
    for name, running in deployed.items():
        row = table.locator(f'tr[data-function="{name}"]')
        await expect(row.get_by_role("rowheader")).to_contain_text(name)
        pending = row.locator('td[data-label="Pending"]')
        if running:
            await expect(pending).to_have_text(re.compile(r"^\d[\d,]*$"))
        else:
            await expect(row.get_by_role("rowheader")).to_contain_text("not deployed")

    devices = (await api(page, app_url + "/api/status/gpus"))["devices"]
    gpus = page.get_by_role("region", name="GPU devices")
    await expect(gpus.get_by_role("alert")).to_have_count(0)
    if devices:
        for device in devices:
            await expect(gpus.locator(f'[data-device="{device["key"]}"]')).to_be_visible()
    else:
        await expect(gpus).to_contain_text("No device in the VRAM ledger")

    catalogue = page.get_by_role("region", name="Model catalogue")
    await expect(catalogue.locator('tr[data-model="tiny-sd"]')).to_contain_text("default")
    tasks = page.get_by_role("region", name="Models on the workers")
    await expect(tasks.locator(f'[data-profile="{settings.profile}"]')).to_be_visible()
    for task in (await api(page, app_url + "/api/status"))["models"]:
        await expect(tasks.locator(f'tr[data-task="{task["task"]}"]')).to_be_visible()
    # A reader is shown no retry.
    await expect(page.get_by_role("button", name="Retry", exact=True)).to_have_count(0)


async def test_a_dead_letter_shows_live_with_its_reason(
    page: Page, app_url: str, sign_in: SignIn, admin: str, ctx: Context
) -> None:
    await sign_in(page, admin)
    await page.goto(app_url + "/status")
    region = page.get_by_role("region", name="Dead letters")
    await expect(region).to_contain_text("No dead letters")
    # Opened and listening: an upload event ingest cannot take fails while we watch.
    image_id = new_id()
    event = Event(
        id=f"uploaded-{image_id}",
        type="uploaded",
        source="test",
        time=now_iso(),
        image_id=image_id,
        data={},
    )
    await publish(ctx, event)

    stage = page.locator('td[data-label="Stage"]', has_text="ingest")
    row = region.locator("tbody tr").filter(has_text=image_id).filter(has=stage)
    await expect(row).to_contain_text("needs 'object' and 'image_id'")
    failures = page.get_by_role("region", name="Recent failures")
    failure = failures.get_by_role("listitem").filter(has_text=image_id)
    await expect(failure.filter(has_text="ingest")).to_contain_text("needs 'object'")
    failed = page.locator('tr[data-function="ingest"] td[data-label="Failed"]')
    await expect(failed).not_to_have_text("0/min")
    await expect(failed).not_to_have_text("—")
    # It has no original to ingest: a re-run is refused, in the server's words.
    await row.get_by_role("button", name=f"Run ingest again for image {image_id}").click()
    refused = re.compile(rf"no image with id '{image_id}'|image {image_id}'s original is gone")
    await expect(region.get_by_role("alert")).to_contain_text(refused)


async def test_retry_sends_a_dead_letter_back_and_removes_it(
    page: Page,
    app_url: str,
    sign_in: SignIn,
    admin: str,
    ctx: Context,
    run_function: Callable[[Function], Awaitable[Any]],
) -> None:
    refusing, seen = {"7"}, list[str]()
    await run_function(picky("picky", "a", refusing, seen))
    event = make_event("a", n=7)
    await publish(ctx, event)
    await settled(ctx, "picky")
    [record] = await dead_letters(ctx, "picky", at_least=1)
    assert record["reason"] == "refusing 7"

    await sign_in(page, admin)
    await page.goto(app_url + "/status")
    region = page.get_by_role("region", name="Dead letters")
    row = region.locator("tbody tr").filter(has_text="refusing 7")
    await expect(row).to_contain_text("picky")
    await expect(row).to_contain_text(f"image {event.image_id}")

    refusing.clear()  # fixed: it takes the event this time
    [listed] = (await api(page, app_url + "/api/dead-letters?stage=picky"))["items"]
    await row.get_by_role("button", name=f"Retry dead letter {listed['dlq_seq']}").click()
    await expect(page.get_by_role("status").filter(has_text="published again")).to_be_visible()
    await expect(row).to_have_count(0)

    await settled(ctx, "picky")
    assert seen == [event.id, event.id]  # the same event, handled again
    assert (await api(page, app_url + "/api/dead-letters?stage=picky"))["items"] == []
    await page.reload()  # read afresh, it stays gone
    await expect(page.get_by_role("region", name="Dead letters")).to_contain_text("No dead letters")
