"""The generate page in the browser: a request shows its step progress and its result
without a reload, another is cancelled, and a refused request shows the gateway's words by
the field they are about (the tiny generation model runs on the CPU here)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from playwright.async_api import Page, expect

from tests.e2e.conftest import SignIn

pytestmark = [pytest.mark.nats, pytest.mark.s3]

# Records every step the page has shown, so a fast job's progress is seen however quickly
# it passes (the observer sees each DOM change; nothing is sampled).
WATCH_STEPS = """() => {
  window.__steps = [];
  new MutationObserver(() => {
    for (const el of document.querySelectorAll('article[data-job] .step')) {
      const m = /Step (\\d+) of (\\d+)/.exec(el.textContent || '');
      if (m) window.__steps.push([el.closest('article').dataset.job, +m[1], +m[2]]);
    }
  }).observe(document.body, { subtree: true, childList: true, characterData: true });
}"""


async def submit(page: Page) -> str:
    """Press Generate; the id of the job the gateway queued."""
    async with page.expect_response(
        lambda r: r.url.endswith("/api/generations") and r.request.method == "POST"
    ) as answer:
        await page.get_by_role("button", name="Generate", exact=True).click()
    response = await answer.value
    assert response.status == 202, await response.text()
    body: dict[str, Any] = await response.json()
    return str(body["id"])


async def test_a_generation_shows_its_progress_and_result_and_another_is_cancelled(
    page: Page, sign_in: SignIn, make_key: Callable[..., Awaitable[str]]
) -> None:
    await sign_in(page, await make_key("read", "generate"))
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Generate").click()
    model = page.get_by_label("Model")
    await expect(model).to_have_value("tiny-sd")
    await expect(model.locator("option:checked")).to_contain_text("default")
    await page.evaluate(WATCH_STEPS)

    await page.get_by_label("Prompt", exact=True).fill("a red fox in the snow")
    await page.get_by_label("Steps").fill("12")
    await page.get_by_label("Seed").fill("7")
    job = await submit(page)
    card = page.locator(f'article[data-job="{job}"]')
    await expect(card).to_be_visible()
    result = card.locator(f'img[data-image="{job}-0"]')
    await expect(result).to_be_visible(timeout=60_000)  # once ingested: its thumbnail
    await expect(card.locator("[data-status]")).to_have_text("done")
    # one announcement when it ended, none per step
    await expect(page.locator("#job-news")).to_have_text("Job “a red fox in the snow” is done.")
    await expect(page.locator("article[data-job] [role=status]")).to_have_count(0)
    assert await result.evaluate("img => img.complete && img.naturalWidth > 0")
    steps = await page.evaluate("window.__steps")
    assert any(j == job and total >= 1 for j, _, total in steps), steps
    await expect(card).to_contain_text("seed 7")

    # "Use these settings again" fills the form from the job
    await page.get_by_label("Prompt", exact=True).fill("")
    await card.get_by_role("button", name="Use these settings again").click()
    await expect(page.get_by_label("Prompt", exact=True)).to_have_value("a red fox in the snow")
    await expect(page.get_by_label("Seed")).to_have_value("7")

    # a long job, cancelled from its card: it ends cancelled
    await page.get_by_label("Steps").fill("100")
    await page.get_by_label("Count").fill("4")
    long_job = await submit(page)
    long_card = page.locator(f'article[data-job="{long_job}"]')
    await long_card.get_by_role("button", name="Cancel").click()
    await expect(long_card.locator("[data-status]")).to_have_text("cancelled", timeout=60_000)
    await expect(long_card.get_by_role("button", name="Cancel")).to_have_count(0)

    # after a reload the history lists both, each with its status
    await page.reload()
    await expect(page.locator(f'article[data-job="{job}"] [data-status]')).to_have_text("done")
    await expect(page.locator(f'article[data-job="{long_job}"] [data-status]')).to_have_text(
        "cancelled"
    )


async def test_a_refused_request_shows_each_problem_by_its_field(
    page: Page, sign_in: SignIn, make_key: Callable[..., Awaitable[str]]
) -> None:
    await sign_in(page, await make_key("read", "generate"))
    await page.goto(page.url.rstrip("/") + "/generate")
    await page.get_by_label("Prompt", exact=True).fill("a fox")
    await page.get_by_label("Width").fill("100")  # not a multiple of 8
    await page.get_by_label("Count").fill("9")  # over generate.max_n
    async with page.expect_response(lambda r: r.url.endswith("/api/generations")) as answer:
        await page.get_by_role("button", name="Generate", exact=True).click()
    assert (await answer.value).status == 422
    await expect(page.locator("#error-size")).to_contain_text("width must be a multiple of 8")
    await expect(page.locator("#error-n")).to_contain_text("n must be between 1 and 4")
    await expect(page.get_by_label("Count")).to_have_attribute("aria-describedby", "error-n")
    await expect(page.locator("article[data-job]")).to_have_count(0)
