"""Browser tests: the built app (frontend/build) served by the real gateway, with the ingest,
caption, generate and notify functions behind it on the real servers, driven in Debian's
headless chromium through Playwright (its own browser download is never used).

A failed test leaves a screenshot of its page in ``test-results/screenshots/``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from bus.core.settings import GenerateModel, GenerateSettings, Settings
from bus.gateway.app import build_app
from bus.models.demo import build_tiny_sd
from bus.runtime.registry import load

ROOT = Path(__file__).resolve().parents[2]
# The built app; DARKROOM_FRONTEND_BUILD names another folder (as it does for npm run build).
BUILD = ROOT / "frontend" / os.environ.get("DARKROOM_FRONTEND_BUILD", "build")
SCREENSHOTS = ROOT / "test-results" / "screenshots"
# Chromium's flags for a closed network, as root, without a display (FACTS.md).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SIZE = 64  # the tiny generation model's images

pytestmark = [pytest.mark.nats, pytest.mark.s3]
# A browser test runs the whole stack, and its teardown drains four functions and closes
# live event streams: on 2 busy cores the suite's 120 s per test is too tight for both.
E2E_TIMEOUT_S = 300


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in item.nodeid and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(E2E_TIMEOUT_S))


def chromium_path() -> str:
    found = os.environ.get("DARKROOM_CHROMIUM") or shutil.which("chromium")
    if not found:
        pytest.fail("the browser tests need Debian's chromium: apt-get install chromium")
    return found


@pytest.fixture(scope="session")
def built_app() -> Path:
    if not (BUILD / "index.html").is_file():
        pytest.fail("the browser tests need the built app: make frontend (or make test)")
    return BUILD


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium_path(), args=CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("e2e-pipelines") / "sd"
    build_tiny_sd(path)
    return path


@pytest.fixture
def settings(settings: Settings, tiny_generator: Path) -> Settings:
    """The suite's settings, generating with a tiny offline pipeline."""
    model = GenerateModel(
        source=str(tiny_generator), width=SIZE, height=SIZE, steps=4, guidance=0.0, vram_mb=64
    )
    generate = GenerateSettings(
        default_model="tiny-sd", cpu_model="tiny-sd", models={"tiny-sd": model}
    )
    return settings.model_copy(update={"generate": generate})


@pytest.fixture
async def app_url(ctx: Any, aiohttp_server: Any, run_function: Any, built_app: Path) -> str:
    """The gateway on a real port, serving the built app, with every function behind it."""
    for name in ("ingest", "caption", "generate", "notify"):
        await run_function(load(name))
    server = await aiohttp_server(build_app(ctx, static_dir=built_app))
    return str(server.make_url("")).rstrip("/")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
async def browser_context(
    browser: Browser, app_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[BrowserContext]:
    """A fresh browser profile. It needs the app, so that it closes first: a page's live
    stream then ends with the browser, not with the server's shutdown."""
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(20_000)
    yield context
    if request.node.stash.get(_FAILED, False):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)
        for index, page in enumerate(context.pages):
            await page.screenshot(path=str(SCREENSHOTS / f"{name}-{index}.png"), full_page=True)
    await context.close()


@pytest.fixture
async def page(browser_context: BrowserContext) -> Page:
    return await browser_context.new_page()


SignIn = Callable[[Page, str], Awaitable[None]]


@pytest.fixture
def sign_in(app_url: str) -> SignIn:
    """Open the app and sign in with ``key`` through the sign-in form, as a person does."""

    async def open_signed_in(page: Page, key: str) -> None:
        await page.goto(app_url + "/")
        await page.get_by_label("API key").fill(key)
        await page.get_by_role("button", name="Sign in").click()
        await page.get_by_role("button", name="Sign out").wait_for()

    return open_signed_in
