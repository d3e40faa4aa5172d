"""The browser app in real headless Chromium: bundle size, the gallery's first paint over
100,000 images, DOM tiles and frame times during a fast scroll, and an upload's way to its
tile. Not asserted: the goals are in the issue (<= 150 KB gzipped initial, first paint
< 1 s, p95 frame <= 32 ms, thumbnail <= 1.5 s after the 201).

Run with ``python -m tests.bench.bench_frontend [--rows 100000] [--uploads 3]`` after
``make frontend`` (it builds nothing; DARKROOM_FRONTEND_BUILD names another build folder).
The last line printed is JSON.

Method
------
``darkroom up --profile demo`` (embedded NATS, SeaweedFS and PostgreSQL, every function,
the gateway serving the built app) in a temporary directory, driven by Playwright in
Debian's chromium (the e2e tests' flags), signed in with the admin key ``up`` minted.

* **Baseline**: the gallery's first paint while the catalogue is empty (element timing on
  the "No images yet" line), and the first contentful paint.
* **bundle_kb_gz**: every script and style the gallery's first load fetched (resource
  timing), summed as their precompressed ``.gz`` files in the build folder.
* **Seed** ``--rows`` images straight into the read model (:mod:`tests.support.gallery_seed`),
  then **gallery_first_paint_ms**: a fresh load's first tile painted with its BlurHash
  (element timing, ``elementtiming="tile"``), from the navigation's start.
* **Scroll**: a script scrolls the window from top to bottom in at most ``--frames``
  animation frames (a fast fling: several screens a frame), counting the tiles in the DOM
  after each frame and timing the frames (rAF deltas): **dom_tiles_max**,
  **scroll_p95_frame_ms**.
* **upload_to_tile_ms**: back at the top, ``--uploads`` JPEGs uploaded one at a time on the
  idle stack; from each 201 to its tile's thumbnail loaded (polled each frame); the median.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from playwright.async_api import Page, ViewportSize, async_playwright

from bus.ops.local import ADMIN_KEY_FILE, read_run_info
from bus.ops.pgserver import embedded_postgres_url
from tests.bench.report import percentile, rounded, run_and_report
from tests.e2e.conftest import BUILD, CHROMIUM_ARGS, chromium_path
from tests.support import procs
from tests.support.gallery_seed import seed_images
from tests.support.http import auth, form
from tests.support.images import jpeg

VIEWPORT: ViewportSize = {"width": 1280, "height": 800}  # as the e2e tests'

# Element timing of the first element named ``name`` (or FCP for "fcp"), ms from navigation.
PAINT = """(name) => new Promise((resolve) => {
    const type = name === 'fcp' ? 'paint' : 'element';
    const pick = (entries) => entries.find((e) =>
        name === 'fcp' ? e.name === 'first-contentful-paint' : e.identifier === name);
    const found = pick(performance.getEntriesByType(type));
    if (found) return resolve(found.renderTime || found.startTime);
    new PerformanceObserver((list, observer) => {
        const entry = pick(list.getEntries());
        if (entry) { observer.disconnect(); resolve(entry.renderTime || entry.startTime); }
    }).observe({ type, buffered: true });
})"""

SCROLL = """async (frames) => {
    const total = () => document.documentElement.scrollHeight - innerHeight;
    const step = Math.max(innerHeight, total() / frames);
    const deltas = [];
    let most = document.querySelectorAll('[role=option]').length;
    let last = await new Promise((r) => requestAnimationFrame(r));
    while (window.scrollY < total() - 1) {
        window.scrollBy(0, step);
        const now = await new Promise((r) => requestAnimationFrame(r));
        deltas.push(now - last);
        last = now;
        most = Math.max(most, document.querySelectorAll('[role=option]').length);
    }
    return { deltas, most, height: document.documentElement.scrollHeight };
}"""

# How long the gallery's requests took (resource timing), ms: the timeline's, the first page's.
REQUESTS = """() => {
    const took = (part) => performance.getEntriesByType('resource')
        .filter((e) => e.name.includes(part)).map((e) => e.responseEnd - e.startTime);
    const first = (part) => took(part)[0] ?? null;
    return { timeline: first('/api/images/timeline'), page: first('/api/images?') };
}"""

ASSETS = """() => performance.getEntriesByType('resource')
    .map((e) => new URL(e.name).pathname)
    .filter((p) => p.endsWith('.js') || p.endsWith('.css'))"""


async def sign_in(page: Page, url: str, key: str) -> None:
    await page.goto(url + "/")
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_role("button", name="Sign out").wait_for()


async def first_paint(page: Page, url: str, element: str) -> tuple[float, float]:
    """A fresh load of the gallery: (the element's paint, first contentful paint), ms."""
    await page.goto(url + "/")
    painted = await page.evaluate(PAINT, element)
    return float(painted), float(await page.evaluate(PAINT, "fcp"))


def bundle_kb(paths: list[str]) -> float:
    """The gzipped size of the scripts and styles the page fetched, from the build folder."""
    total = 0
    for path in set(paths):
        file = BUILD / path.lstrip("/")
        gz = file.with_name(file.name + ".gz")
        # The boot script is written after the adapter compressed the rest: gzip it here.
        total += gz.stat().st_size if gz.is_file() else len(gzip.compress(file.read_bytes(), 9))
    return total / 1024


async def upload_to_tile(page: Page, url: str, key: str, n: int) -> float:
    """ms from an upload's 201 to its tile's thumbnail shown in the open gallery."""
    async with aiohttp.ClientSession() as http:
        body = jpeg(640, 480, color=(40 * n % 255, 120, 200))
        response = await http.post(
            url + "/api/uploads", data=form((f"bench-{n}.jpg", body)), headers=auth(key)
        )
        if response.status != 201:
            raise RuntimeError(f"upload answered {response.status}: {await response.text()}")
        answered = time.perf_counter()
        image_id = (await response.json())["results"][0]["id"]
    await page.wait_for_function(
        '(id) => document.querySelector(`[data-id="${id}"] img.loaded`)',
        arg=image_id,
        polling="raf",
        timeout=60_000,
    )
    return (time.perf_counter() - answered) * 1000


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    if not (BUILD / "index.html").is_file():
        raise RuntimeError(f"no built app in {BUILD}: run `make frontend` first")
    root = Path(tempfile.mkdtemp(prefix="bench-frontend-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKROOM_")}
    env |= {
        "HOME": str(root),
        "DARKROOM_NATS__EMBEDDED_PORT": "0",
        "DARKROOM_S3__EMBEDDED_PORT": "0",
        "DARKROOM_POSTGRES__EMBEDDED_PORT": "0",
        "DARKROOM_GATEWAY__STATIC_DIR": str(BUILD),
    }
    data_dir = root / "data"
    try:
        async with procs.running(
            ["up", "--data-dir", str(data_dir), "--port", "0", "--profile", "demo"], env
        ) as up:
            line = await up.wait_for_line("UI and API", timeout=120)
            match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
            if not match:
                raise RuntimeError(f"no gateway address in {line!r}")
            url = match.group(1)
            key = (data_dir / ADMIN_KEY_FILE).read_text().strip()
            info = read_run_info(data_dir) or {}
            return await measure(url, key, info, data_dir, opts)
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def measure(
    url: str, key: str, info: dict[str, Any], data_dir: Path, opts: argparse.Namespace
) -> dict[str, Any]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium_path(), args=CHROMIUM_ARGS
        )
        try:
            page = await (await browser.new_context(viewport=VIEWPORT)).new_page()
            await sign_in(page, url, key)
            empty_paint, empty_fcp = await first_paint(page, url, "gallery-empty")
            assets = await page.evaluate(ASSETS)
            print(f"empty gallery: painted at {empty_paint:.0f} ms", file=sys.stderr)

            pool = await asyncpg.create_pool(
                embedded_postgres_url(data_dir, int(info["postgres_port"])), min_size=1, max_size=2
            )
            try:
                seeded = time.perf_counter()
                await seed_images(pool, str(info["namespace"]), opts.rows)
                seed_s = time.perf_counter() - seeded
            finally:
                await pool.close()
            print(f"seeded {opts.rows:,} rows in {seed_s:.1f} s", file=sys.stderr)

            paints, requests = [], []
            for _ in range(opts.loads):
                paints.append(await first_paint(page, url, "tile"))
                requests.append(await page.evaluate(REQUESTS))
            paint = statistics.median(p[0] for p in paints)
            fcp = statistics.median(p[1] for p in paints)
            print(f"gallery: first tile at {paint:.0f} ms", file=sys.stderr)
            scrolled = await page.evaluate(SCROLL, opts.frames)
            deltas = scrolled["deltas"]
            print(
                f"scrolled {scrolled['height']:,} px in {len(deltas)} frames, "
                f"at most {scrolled['most']} tiles",
                file=sys.stderr,
            )

            await page.evaluate("window.scrollTo(0, 0)")
            await page.locator("[role=option]").first.wait_for()
            uploads = []
            for n in range(opts.uploads):
                uploads.append(await upload_to_tile(page, url, key, n))
                print(f"upload {n}: tile after {uploads[-1]:.0f} ms", file=sys.stderr)
        finally:
            await browser.close()
    return {
        "rows": opts.rows,
        "bundle_kb_gz": rounded(bundle_kb(assets), 1),
        "empty_gallery_first_paint_ms": rounded(empty_paint, 0),
        "empty_gallery_fcp_ms": rounded(empty_fcp, 0),
        "gallery_first_paint_ms": rounded(paint, 0),
        "gallery_fcp_ms": rounded(fcp, 0),
        "seed_s": rounded(seed_s, 1),
        "timeline_request_ms": rounded(statistics.median(r["timeline"] for r in requests), 0),
        "first_page_request_ms": rounded(statistics.median(r["page"] for r in requests), 0),
        "scroll_height_px": scrolled["height"],
        "scroll_frames": len(deltas),
        "dom_tiles_max": scrolled["most"],
        "scroll_p50_frame_ms": rounded(percentile(deltas, 50), 1),
        "scroll_p95_frame_ms": rounded(percentile(deltas, 95), 1),
        "scroll_max_frame_ms": rounded(max(deltas), 1),
        "upload_to_tile_ms": rounded(statistics.median(uploads), 0),
        "upload_to_tile_each_ms": [rounded(u, 0) for u in uploads],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=100_000, help="images seeded")
    parser.add_argument("--frames", type=int, default=600, help="frames the scroll takes at most")
    parser.add_argument("--loads", type=int, default=3, help="fresh loads timed (the median)")
    parser.add_argument("--uploads", type=int, default=3, help="uploads timed (the median)")
    opts = parser.parse_args(argv)
    return run_and_report(lambda: asyncio.run(run(opts)))


if __name__ == "__main__":
    sys.exit(main())
