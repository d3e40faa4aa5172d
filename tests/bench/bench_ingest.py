"""Ingest speed: ``derive`` against the naive Pillow recipe per core, and uploads end to end.

Run with ``python -m tests.bench.bench_ingest [--rounds 4] [--per-round 3] [--n 200]
[--inflight 8] [--warmup 4] [--serial 10] [--only core|e2e] [--cache-dir DIR] [--quick]``.

Inputs
------
Three distinct synthetic 12 MP (4000x3000) JPEGs at quality 90 with a small EXIF block
(make, model, date; no orientation), built to compress and decode like photos rather than
flat colour or pure noise: a Mandelbrot set, a rotated gradient and blurred noise, each
320x240, merged as RGB channels, scaled up bicubically, overlaid with a coarse noise texture,
blurred by 1 px and blended 15% with fine grain. They come out at 2.5-3 MB each. Pillow's
noise generator cannot be seeded, so they are generated once and cached under
``$XDG_CACHE_HOME/darkroom-bench`` (``~/.cache/darkroom-bench``; ``--cache-dir`` to move it):
every run after the first measures the same bytes. Bump ``GENERATOR`` when the recipe
changes.

Part 1: per core
----------------
One thread, this process. Each variant turns one JPEG into WebPs that fit in 2048, 1024 and
256 pixels:

* ``naive``, the recipe the product issue measured: for each size, ``Image.open`` ->
  ``ImageOps.exif_transpose`` -> ``thumbnail((px, px))`` -> ``save(WEBP)`` with Pillow's
  defaults (quality 80, method 4). ``exif_transpose`` copies the image, which decodes it at
  full size, so ``thumbnail`` can no longer ask libjpeg for a reduced decode.
* ``naive_once``, a stricter baseline: open and ``exif_transpose`` once, then per size
  ``copy().thumbnail()`` and the same save. Same work minus two of the three decodes.
* ``darkroom``: ``derive(data, Options.from_settings(IngestSettings()))``, which also
  computes the blurhash, the perceptual hash and the EXIF summary.
* ``pyvips`` (only when importable; it is not a dependency): per size
  ``thumbnail_buffer(data, px, height=px)`` then ``webpsave_buffer(Q=80)``. It is imported
  after Pillow's WebP plugin, or Pillow would end up on the system libwebp.

Every variant runs once on each input before timing. Then, for ``--rounds`` rounds, the
variants alternate as ``naive, darkroom, naive_once, darkroom[, pyvips, darkroom]``; each run
times ``--per-round`` images (cycling through the inputs) and yields images/s. Every
baseline run has a darkroom run right after it, and the ratio of such a pair shares the
machine's mood: the median of those pair ratios is reported beside the ratio of best runs
(``speedup`` = darkroom best images/s / naive best images/s). ``cpu_per_wall`` (process CPU
time over wall time, about 1.0) shows that no variant used a second core.

Also reported, from the untimed pass: the output bytes per image of each variant; what
WebP method 0 (darkroom's, faster than Pillow's default 4) costs in bytes on identical pixels
(``method0_bytes_ratio``: the naive renditions encoded both ways; it depends on the content,
and grain-heavy images like these gain little from a slower method); the pixel size of each
rendition (darkroom's display rendition of a
4000x3000 original is 2000x1500, straight from libjpeg's 1/2-scale decode, where the naive
one is 2048x1536: compare bytes with that in mind), the PSNR of darkroom's thumb-256 against
the naive thumb-256, and the PSNR of every rendition of both against a reference of the same
size (full decode, Lanczos resize, no compression).

Part 2: end to end
------------------
A real ``darkroom up`` (``python -m bus.ops.cli up``, the console script's code) in a temporary
data dir and HOME, on free ports (``--port 0``, ``DARKROOM_NATS__EMBEDDED_PORT=0``,
``DARKROOM_S3__EMBEDDED_PORT=0``). The gateway URL comes from its banner, the admin key from
``<data-dir>/admin.key``, the NATS URL and namespace from ``<data-dir>/run.json``. A core
NATS subscription to ``<ns>.ingested`` (and ``<ns>.failed.>``, to stop early) is in place
before the first upload.

The product answers a repeat of identical bytes with the first id and does not process it
again, so every upload gets distinct bytes: a JPEG comment segment (``FF FE``, length, text)
right after SOI, with the same pixels. ``--warmup`` uploads go through first and are waited
for, then ``--serial`` uploads one at a time (each waits for its ``ingested`` event: the
unloaded latency). Then the saturated run: ``--n`` uploads POSTed to ``/api/uploads``
(multipart field ``file``, Bearer admin key) with at most ``--inflight`` in flight. An
upload's latency runs from just before its request is sent to the moment its ``ingested``
event reaches the subscription.

* ``e2e_uploads_per_s``: accepted uploads / (last response - first request);
* ``e2e_ingested_per_s``: n / (last ingested event - first request);
* ``e2e_p50/p95/max_ms``: upload-to-ingested latency in the saturated run. Uploads are
  accepted faster than they are ingested, so this is mostly time spent queueing and grows
  with ``--n``; ``e2e_unloaded_*`` is the latency of one upload on an idle stack.
* ``upload_p50/p95_ms`` (and ``upload_unloaded_p50_ms``): the gateway's accept latency alone
  (spool, hash, check, dedupe claim, store, announce).
* ``e2e_cpu_s_per_image``: CPU seconds each process (darkroom, nats-server, SeaweedFS, this
  client) spent per upload of the saturated run, read from ``/proc``: where the cores went.
* ``e2e_handler_mean_ms``: mean time inside each function's handler in the saturated run
  (from the stack's ``/metrics``), queueing for the CPU executor included.

The stack is stopped with SIGTERM at the end (and on error). The last line printed is one
JSON object with the headline figures and the machine's facts, including the 1-minute load
average before and after the run: on a shared machine, read the figures next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import io
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson
import PIL
from nats.aio.msg import Msg
from PIL import ExifTags, Image, ImageChops, ImageFilter, ImageOps, ImageStat, features

from bus.core.settings import IngestSettings
from functions.ingest.imaging import Options as IngestOptions
from functions.ingest.imaging import derive
from tests.bench.report import load_average, percentile, rounded, run_and_report, shown
from tests.support import procs

SIZES = (2048, 1024, 256)
RENDITIONS = ("display", "thumb-1024", "thumb-256")
WIDTH, HEIGHT = 4000, 3000
JPEG_QUALITY = 90
GENERATOR = "v1"  # part of the cache file names: bump it when the recipe changes
SOI = b"\xff\xd8"
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 60.0

Variant = Callable[[bytes], list[bytes]]


# --- inputs ------------------------------------------------------------------------------------
def synthetic_photo(index: int) -> bytes:
    """One 12 MP JPEG that compresses like a photo (see the module docstring)."""
    small = (320, 240)
    x0 = -2.3 + 0.35 * index
    mandel = Image.effect_mandelbrot(small, (x0, -1.15, x0 + 3.0, 1.1), 40 + 25 * index)
    # Rotate a gradient twice the size and keep its middle: no empty corners.
    wide = Image.linear_gradient("L").resize((small[0] * 2, small[1] * 2))
    wide = wide.rotate(40 + 70 * index, Image.Resampling.BILINEAR)
    left, top = small[0] // 2, small[1] // 2
    gradient = wide.crop((left, top, left + small[0], top + small[1]))
    blobs = Image.effect_noise(small, 70).filter(ImageFilter.GaussianBlur(3))
    channels = [(blobs, mandel, gradient), (mandel, gradient, blobs), (gradient, blobs, mandel)]
    img = Image.merge("RGB", channels[index % 3]).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
    texture = Image.effect_noise((WIDTH // 4, HEIGHT // 4), 30)
    texture = texture.resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
    img = ImageChops.overlay(img, Image.merge("RGB", (texture,) * 3))
    img = img.filter(ImageFilter.GaussianBlur(1))
    grain = Image.effect_noise((WIDTH, HEIGHT), 12)
    img = Image.blend(img, Image.merge("RGB", (grain,) * 3), 0.15)
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Bench"
    exif[ExifTags.Base.Model] = f"Synthetic {index}"
    exif[ExifTags.Base.DateTime] = f"2024:05:0{index % 9 + 1} 12:00:00"
    out = io.BytesIO()
    img.save(out, "JPEG", quality=JPEG_QUALITY, exif=exif)
    return out.getvalue()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "darkroom-bench"


def base_photos(count: int, cache_dir: Path) -> list[bytes]:
    """``count`` distinct synthetic photos, generated on first use and cached."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    photos = []
    for index in range(count):
        path = cache_dir / f"photo-{GENERATOR}-{index}.jpg"
        if not path.exists():
            started = time.perf_counter()
            tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_bytes(synthetic_photo(index))
            tmp.replace(path)
            print(f"  generated {path} in {time.perf_counter() - started:.1f} s", flush=True)
        photos.append(path.read_bytes())
    return photos


def with_comment(jpeg: bytes, text: str) -> bytes:
    """``jpeg`` with a COM segment after SOI: the same pixels, a different SHA-256."""
    if not jpeg.startswith(SOI):
        raise ValueError("not a JPEG")
    body = text.encode()
    return SOI + b"\xff\xfe" + (len(body) + 2).to_bytes(2, "big") + body + jpeg[2:]


# --- the variants ------------------------------------------------------------------------------
def _webp(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "WEBP")  # Pillow's defaults: quality 80, method 4
    return out.getvalue()


def naive(data: bytes) -> list[bytes]:
    """The product issue's recipe: one open, transpose and thumbnail per size."""
    outputs = []
    for px in SIZES:
        with Image.open(io.BytesIO(data)) as opened:
            img = ImageOps.exif_transpose(opened) or opened
            img.thumbnail((px, px))
            outputs.append(_webp(img))
    return outputs


def _thumbnails_of_one_decode(data: bytes) -> Iterator[Image.Image]:
    """Open and transpose once, then ``copy().thumbnail()`` for each size."""
    with Image.open(io.BytesIO(data)) as opened:
        upright = ImageOps.exif_transpose(opened) or opened
        upright.load()
    for px in SIZES:
        img = upright.copy()
        img.thumbnail((px, px))
        yield img


def naive_once(data: bytes) -> list[bytes]:
    """The naive recipe with a single decode: each size from a copy of the upright image."""
    return [_webp(img) for img in _thumbnails_of_one_decode(data)]


def darkroom_variant() -> Variant:
    options = IngestOptions.from_settings(IngestSettings())

    def run(data: bytes) -> list[bytes]:
        return [r.data for r in derive(data, options).renditions]

    return run


def pyvips_variant() -> Variant | None:
    """pyvips' thumbnail + webpsave per size, or None when pyvips is not installed."""
    from PIL import WebPImagePlugin  # noqa: F401  (load Pillow's libwebp before libvips')

    try:
        pyvips = importlib.import_module("pyvips")
    except (ImportError, OSError):
        return None

    def run(data: bytes) -> list[bytes]:
        outputs = []
        for px in SIZES:
            thumb = pyvips.Image.thumbnail_buffer(data, px, height=px)
            outputs.append(bytes(thumb.webpsave_buffer(Q=80)))
        return outputs

    return run


# --- quality -----------------------------------------------------------------------------------
def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB between two same-size images, over R, G and B; NaN when the sizes differ."""
    if a.size != b.size:
        return math.nan
    diff = ImageChops.difference(a.convert("RGB"), b.convert("RGB"))
    mse = statistics.fmean(rms * rms for rms in ImageStat.Stat(diff).rms)
    return math.inf if mse == 0 else 10 * math.log10(255 * 255 / mse)


def method0_bytes_ratio(photos: list[bytes]) -> float:
    """Bytes of WebP method 0 over method 4 for the same pixels (the naive renditions)."""
    totals = {0: 0, 4: 0}
    for data in photos:
        for img in _thumbnails_of_one_decode(data):
            for method in totals:
                out = io.BytesIO()
                img.save(out, "WEBP", quality=80, method=method)
                totals[method] += len(out.getvalue())
    return totals[0] / totals[4]


def _decode(webp: bytes) -> Image.Image:
    with Image.open(io.BytesIO(webp)) as img:
        return img.convert("RGB")


def reference(data: bytes, size: tuple[int, int]) -> Image.Image:
    """The best ``size`` rendition Pillow can make: full decode, Lanczos, no compression."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB").resize(size, Image.Resampling.LANCZOS)


@dataclass
class Outputs:
    """The untimed pass: every variant's renditions of every input."""

    by_variant: dict[str, list[list[bytes]]] = field(default_factory=dict)

    def bytes_per_image(self, variant: str) -> float:
        return statistics.fmean(sum(map(len, out)) for out in self.by_variant[variant])


def quality(photos: list[bytes], outputs: Outputs) -> dict[str, Any]:
    """PSNR of darkroom's and naive's renditions, against each other and a reference."""
    against_naive: list[float] = []
    vs_ref: dict[str, dict[str, list[float]]] = {"naive": {}, "darkroom": {}}
    sizes: dict[str, list[str]] = {}
    for index, data in enumerate(photos):
        references: dict[tuple[int, int], Image.Image] = {}
        decoded = {v: [_decode(w) for w in outputs.by_variant[v][index]] for v in vs_ref}
        against_naive.append(psnr(decoded["darkroom"][-1], decoded["naive"][-1]))
        for variant, images in decoded.items():
            sizes[variant] = [f"{img.width}x{img.height}" for img in images]
            for name, img in zip(RENDITIONS, images, strict=True):
                if img.size not in references:
                    references[img.size] = reference(data, img.size)
                vs_ref[variant].setdefault(name, []).append(psnr(img, references[img.size]))
    return {
        "method0_bytes_ratio": rounded(method0_bytes_ratio(photos)),
        "rendition_px": sizes,
        "thumb256_psnr_db": rounded(statistics.fmean(against_naive), 2),
        "psnr_vs_reference_db": {
            variant: {name: rounded(statistics.fmean(v), 2) for name, v in by_name.items()}
            for variant, by_name in vs_ref.items()
        },
    }


# --- part 1: per core --------------------------------------------------------------------------
@dataclass
class CoreRun:
    variant: str
    images: int
    wall_s: float
    cpu_s: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else math.nan


def time_variant(name: str, fn: Variant, photos: list[bytes], count: int) -> CoreRun:
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(count):
        fn(photos[i % len(photos)])
    return CoreRun(name, count, time.perf_counter() - wall, time.process_time() - cpu)


def measure_core(photos: list[bytes], opts: BenchOptions) -> dict[str, Any]:
    variants: dict[str, Variant] = {
        "naive": naive,
        "darkroom": darkroom_variant(),
        "naive_once": naive_once,
    }
    vips = pyvips_variant()
    if vips is not None:
        variants["pyvips"] = vips
    outputs = Outputs()
    for name, fn in variants.items():  # the warm-up doubles as the quality pass
        outputs.by_variant[name] = [fn(data) for data in photos]
    baselines = [name for name in variants if name != "darkroom"]
    schedule = [step for name in baselines for step in (name, "darkroom")]
    runs: list[CoreRun] = []
    pairs: dict[str, list[float]] = {name: [] for name in baselines}
    for round_no in range(opts.rounds):
        for baseline in baselines:
            base = time_variant(baseline, variants[baseline], photos, opts.per_round)
            dark = time_variant("darkroom", variants["darkroom"], photos, opts.per_round)
            runs += [base, dark]
            pairs[baseline].append(dark.images_per_s / base.images_per_s)
        line = "  ".join(f"{r.variant} {r.images_per_s:.2f}" for r in runs[-len(schedule) :])
        print(f"  round {round_no + 1}: {line} images/s", flush=True)

    def rates(variant: str) -> list[float]:
        return [r.images_per_s for r in runs if r.variant == variant]

    def cpu_per_wall(variant: str) -> float:
        mine = [r for r in runs if r.variant == variant]
        return sum(r.cpu_s for r in mine) / sum(r.wall_s for r in mine)

    best = {name: max(rates(name)) for name in variants}
    result: dict[str, Any] = {
        "images_per_s": rounded(best["darkroom"]),
        "naive_images_per_s": rounded(best["naive"]),
        "speedup": rounded(best["darkroom"] / best["naive"], 2),
        "speedup_median_pair": rounded(statistics.median(pairs["naive"]), 2),
        "naive_once_images_per_s": rounded(best["naive_once"]),
        "speedup_vs_naive_once": rounded(best["darkroom"] / best["naive_once"], 2),
        "speedup_vs_naive_once_median_pair": rounded(statistics.median(pairs["naive_once"]), 2),
        "pyvips_images_per_s": rounded(best["pyvips"]) if vips is not None else None,
        "pyvips_note": "measured" if vips is not None else "pyvips is not installed",
        "median_images_per_s": {name: rounded(statistics.median(rates(name))) for name in variants},
        "rounds_images_per_s": {name: [round(r, 3) for r in rates(name)] for name in variants},
        "cpu_per_wall": {name: rounded(cpu_per_wall(name), 2) for name in variants},
        "bytes_per_image": {name: round(outputs.bytes_per_image(name)) for name in variants},
        "bytes_ratio": rounded(
            outputs.bytes_per_image("darkroom") / outputs.bytes_per_image("naive")
        ),
        **quality(photos, outputs),
    }
    return result


# --- part 2: end to end ------------------------------------------------------------------------
def up_env(home: Path) -> dict[str, str]:
    """The caller's environment minus DARKROOM_*, with free ports and a private HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKROOM_")}
    ports = {"DARKROOM_NATS__EMBEDDED_PORT": "0", "DARKROOM_S3__EMBEDDED_PORT": "0"}
    return {**env, **ports, "HOME": str(home)}


def _proc_stat(pid: int) -> tuple[str, int, float] | None:
    """(command name, parent pid, CPU seconds) of ``pid`` from /proc; None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return name, int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks


def cpu_by_process(root: int) -> dict[str, float]:
    """CPU seconds of ``root`` and its direct children, by command name (Linux only)."""
    found: dict[str, float] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat is not None and (int(entry.name) == root or stat[1] == root):
            name = "darkroom" if int(entry.name) == root else stat[0]
            found[name] = found.get(name, 0.0) + stat[2]
    return found


_HANDLER_METRIC = re.compile(
    r'^darkroom_handler_seconds_(sum|count)\{function="([^"]+)"\} (\S+)$', re.MULTILINE
)


async def handler_totals(http: aiohttp.ClientSession, url: str) -> dict[str, list[float]]:
    """Per function, [seconds spent in the handler, invocations] so far (from /metrics)."""
    async with http.get(f"{url}/metrics") as response:
        text = await response.text()
    totals: dict[str, list[float]] = {}
    for kind, function, value in _HANDLER_METRIC.findall(text):
        totals.setdefault(function, [0.0, 0.0])[kind == "count"] = float(value)
    return totals


class Arrivals:
    """When each image's ``ingested`` event reached the subscription."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        self.changed = asyncio.Event()

    async def on_ingested(self, msg: Msg) -> None:
        now = time.perf_counter()
        image_id = orjson.loads(msg.data).get("image_id")
        if isinstance(image_id, str):
            self.at.setdefault(image_id, now)
            self.changed.set()

    async def on_failed(self, msg: Msg) -> None:
        doc = orjson.loads(msg.data)
        image_id = doc.get("image_id")
        if isinstance(image_id, str):
            self.failed[image_id] = f"{msg.subject}: {str(doc.get('data'))[:300]}"
            self.changed.set()

    async def wait_for(self, ids: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ids <= self.at.keys():
            if failed := ids & self.failed.keys():
                first = next(iter(failed))
                raise RuntimeError(f"{len(failed)} image(s) failed, e.g. {self.failed[first]}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"only {len(ids & self.at.keys())} of {len(ids)} images were ingested "
                    f"within {timeout:.0f} s"
                )
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)


@dataclass
class Upload:
    index: int
    t0: float = math.nan
    t_response: float = math.nan
    image_id: str = ""


class Uploader:
    """POSTs distinct copies of the base photos to a running gateway."""

    def __init__(self, http: aiohttp.ClientSession, url: str, photos: list[bytes]) -> None:
        self.http = http
        self.url = f"{url}/api/uploads"
        self.photos = photos

    async def one(self, index: int, tag: str) -> Upload:
        data = with_comment(self.photos[index % len(self.photos)], f"bench {tag} {index}")
        form = aiohttp.FormData()
        form.add_field("file", data, filename=f"{tag}-{index}.jpg", content_type="image/jpeg")
        upload = Upload(index, t0=time.perf_counter())
        async with self.http.post(self.url, data=form) as response:
            body = await response.read()
        upload.t_response = time.perf_counter()
        if response.status != 201:
            raise RuntimeError(f"upload {index} answered {response.status}: {body[:300]!r}")
        result = orjson.loads(body)["results"][0]
        if result.get("duplicate"):
            raise RuntimeError(f"upload {index} was taken for a duplicate of {result['id']}")
        upload.image_id = result["id"]
        return upload

    async def many(self, n: int, inflight: int, tag: str) -> list[Upload]:
        """``n`` uploads, never more than ``inflight`` at a time."""
        indices: Iterator[int] = iter(range(n))
        done: list[Upload] = []

        async def worker() -> None:
            for index in indices:  # one iterator shared by every worker
                done.append(await self.one(index, tag))

        await asyncio.gather(*(worker() for _ in range(min(inflight, n))))
        return done


async def run_e2e(photos: list[bytes], opts: BenchOptions) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        data_dir = root / "data"
        args = ["up", "--data-dir", str(data_dir), "--port", "0"]
        async with procs.running(args, up_env(root)) as stack:
            line = await stack.wait_for_line("UI and API", timeout=READY_TIMEOUT_S)
            match = re.search(r"(http://[\d.]+:\d+)", line)
            if match is None:
                raise RuntimeError(f"no URL in the banner line {line!r}")
            url = match.group(1)
            key = (data_dir / "admin.key").read_text().strip()
            info = json.loads((data_dir / "run.json").read_text())
            print(f"  darkroom up at {url}, NATS {info['nats_url']}", flush=True)
            result = await _drive(stack.proc.pid, url, key, info, photos, opts)
            stack.signal(signal.SIGTERM)
            code = await stack.wait(STOP_TIMEOUT_S)
        result["e2e_stack_exit_code"] = code
    return result


@dataclass
class Measured:
    """What one end-to-end run saw."""

    arrivals: Arrivals
    serial: list[Upload] = field(default_factory=list)  # one at a time, unloaded
    uploads: list[Upload] = field(default_factory=list)  # the saturated run
    cpu_s: dict[str, float] = field(default_factory=dict)  # per process, saturated run
    handler_ms: dict[str, float] = field(default_factory=dict)  # mean, saturated run

    def latencies_ms(self, uploads: list[Upload]) -> tuple[list[float], list[float]]:
        """(upload to ingested, upload to response) of each of ``uploads``."""
        return (
            [(self.arrivals.at[u.image_id] - u.t0) * 1000 for u in uploads],
            [(u.t_response - u.t0) * 1000 for u in uploads],
        )


async def _drive(
    pid: int, url: str, key: str, info: dict[str, Any], photos: list[bytes], opts: BenchOptions
) -> dict[str, Any]:
    namespace = info.get("namespace", "darkroom")
    nc = await nats.connect(info["nats_url"], name="bench-ingest", max_reconnect_attempts=0)
    seen = Measured(Arrivals())
    try:
        await nc.subscribe(f"{namespace}.ingested", cb=seen.arrivals.on_ingested)
        await nc.subscribe(f"{namespace}.failed.>", cb=seen.arrivals.on_failed)
        await nc.flush()
        timeout = aiohttp.ClientTimeout(total=300)
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
            uploader = Uploader(http, url, photos)
            if opts.warmup:
                warm = await uploader.many(opts.warmup, opts.inflight, "warmup")
                await seen.arrivals.wait_for({u.image_id for u in warm}, 120.0)
            for index in range(opts.serial):
                upload = await uploader.one(index, "serial")
                await seen.arrivals.wait_for({upload.image_id}, 60.0)
                seen.serial.append(upload)
            handlers_before = await handler_totals(http, url)
            cpu_before, client_before = cpu_by_process(pid), time.process_time()
            seen.uploads = await uploader.many(opts.n, opts.inflight, "run")
            await seen.arrivals.wait_for({u.image_id for u in seen.uploads}, 60.0 + 2.0 * opts.n)
            cpu_after, client_after = cpu_by_process(pid), time.process_time()
            handlers_after = await handler_totals(http, url)
    finally:
        await nc.close()
    seen.cpu_s = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    seen.cpu_s["bench-client"] = client_after - client_before
    for function, (seconds, count) in handlers_after.items():
        old_seconds, old_count = handlers_before.get(function, [0.0, 0.0])
        if count > old_count:
            seen.handler_ms[function] = 1000 * (seconds - old_seconds) / (count - old_count)
    return e2e_summary(seen, opts.inflight)


def e2e_summary(seen: Measured, inflight: int) -> dict[str, Any]:
    uploads = seen.uploads
    first = min(u.t0 for u in uploads)
    last_response = max(u.t_response for u in uploads)
    last_ingested = max(seen.arrivals.at[u.image_id] for u in uploads)
    e2e_ms, upload_ms = seen.latencies_ms(uploads)
    serial_e2e_ms, serial_upload_ms = seen.latencies_ms(seen.serial)
    n = len(uploads)
    return {
        "e2e_uploads_per_s": rounded(n / (last_response - first)),
        "e2e_ingested_per_s": rounded(n / (last_ingested - first)),
        "e2e_p50_ms": rounded(percentile(e2e_ms, 50), 1),
        "e2e_p95_ms": rounded(percentile(e2e_ms, 95), 1),
        "e2e_max_ms": rounded(max(e2e_ms), 1),
        "upload_p50_ms": rounded(percentile(upload_ms, 50), 1),
        "upload_p95_ms": rounded(percentile(upload_ms, 95), 1),
        "e2e_unloaded_p50_ms": rounded(percentile(serial_e2e_ms, 50), 1),
        "e2e_unloaded_max_ms": rounded(max(serial_e2e_ms, default=math.nan), 1),
        "upload_unloaded_p50_ms": rounded(percentile(serial_upload_ms, 50), 1),
        "e2e_cpu_s_per_image": {name: rounded(s / n) for name, s in sorted(seen.cpu_s.items())},
        "e2e_handler_mean_ms": {
            name: rounded(ms, 1) for name, ms in sorted(seen.handler_ms.items())
        },
        "e2e_n": n,
        "e2e_inflight": inflight,
        "e2e_unloaded_n": len(seen.serial),
    }


# --- the benchmark -----------------------------------------------------------------------------
@dataclass
class BenchOptions:
    rounds: int
    per_round: int
    images: int
    n: int
    inflight: int
    warmup: int
    serial: int
    parts: tuple[str, ...]
    cache_dir: Path


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "libjpeg": features.version("jpg"),
        "libjpeg_turbo": features.check_feature("libjpeg_turbo"),
        "libwebp": features.version("webp"),
        "platform": platform.platform(),
    }


def print_summary(s: dict[str, Any]) -> None:
    print()
    print(f"Summary ({s['machine']['cpu_count']} CPUs, Pillow {s['machine']['pillow']}):")
    if "images_per_s" in s:
        print(
            f"  per core    darkroom {shown(s['images_per_s'])} images/s, "
            f"naive {shown(s['naive_images_per_s'])} (x{shown(s['speedup'])}, median pair "
            f"x{shown(s['speedup_median_pair'])}), naive_once "
            f"{shown(s['naive_once_images_per_s'])} (x{shown(s['speedup_vs_naive_once'])}), "
            f"pyvips {shown(s['pyvips_images_per_s'])} ({s['pyvips_note']})"
        )
        sizes = s["bytes_per_image"]
        print(
            f"  output      darkroom {sizes['darkroom']:,} B/image, naive {sizes['naive']:,} "
            f"(x{shown(s['bytes_ratio'])}; WebP method 0 over 4 on the same pixels "
            f"x{shown(s['method0_bytes_ratio'])}); thumb-256 PSNR against naive "
            f"{shown(s['thumb256_psnr_db'], ' dB')}"
        )
        px = ", ".join(f"{v} {'/'.join(sizes)}" for v, sizes in s["rendition_px"].items())
        print(f"  renditions  {px}")
        for variant, by_name in s["psnr_vs_reference_db"].items():
            listed = ", ".join(f"{name} {shown(db, ' dB')}" for name, db in by_name.items())
            print(f"  vs ref      {variant:<9} {listed}")
    if "e2e_uploads_per_s" in s:
        print(
            f"  end to end  {s['e2e_n']} uploads of {shown(s['input_mb'], ' MB')}, "
            f"{s['e2e_inflight']} in flight: accepted {shown(s['e2e_uploads_per_s'])}/s, "
            f"ingested {shown(s['e2e_ingested_per_s'])}/s"
        )
        print(
            f"              upload->ingested p50 {shown(s['e2e_p50_ms'], ' ms')}, "
            f"p95 {shown(s['e2e_p95_ms'], ' ms')}, max {shown(s['e2e_max_ms'], ' ms')}; "
            f"accept p50 {shown(s['upload_p50_ms'], ' ms')}, p95 {shown(s['upload_p95_ms'], ' ms')}"
        )
        cpu = ", ".join(f"{k} {shown(v, ' s')}" for k, v in s["e2e_cpu_s_per_image"].items())
        print(
            f"              unloaded ({s['e2e_unloaded_n']} one at a time): upload->ingested "
            f"p50 {shown(s['e2e_unloaded_p50_ms'], ' ms')}, "
            f"max {shown(s['e2e_unloaded_max_ms'], ' ms')}; "
            f"accept p50 {shown(s['upload_unloaded_p50_ms'], ' ms')}"
        )
        print(f"              CPU per image: {cpu}")
        spent = ", ".join(f"{k} {shown(v, ' ms')}" for k, v in s["e2e_handler_mean_ms"].items())
        print(f"              mean time in handler: {spent}")
    print(f"  whole run   {s['elapsed_s']:.1f} s")


def run(opts: BenchOptions) -> dict[str, Any]:
    started, load_before = time.perf_counter(), load_average()
    print(f"inputs: {opts.images} synthetic 12 MP JPEGs, cached in {opts.cache_dir}", flush=True)
    photos = base_photos(opts.images, opts.cache_dir)
    summary: dict[str, Any] = {}
    if "core" in opts.parts:
        print(f"per core: {opts.rounds} round(s) of {opts.per_round} image(s) per run", flush=True)
        summary.update(measure_core(photos, opts))
    if "e2e" in opts.parts:
        print(f"end to end: {opts.n} uploads, {opts.inflight} in flight", flush=True)
        summary.update(asyncio.run(run_e2e(photos, opts)))
    summary.update(
        {
            "rounds": opts.rounds,
            "per_round": opts.per_round,
            "input_mb": rounded(statistics.fmean(len(p) for p in photos) / 1e6, 2),
            "machine": {**machine(), "load_avg_1m": [load_before, load_average()]},
            "elapsed_s": round(time.perf_counter() - started, 1),
        }
    )
    print_summary(summary)
    return summary


def parse_args(argv: list[str] | None = None) -> BenchOptions:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per core")
    parser.add_argument("--per-round", type=int, default=3, help="images per timed run")
    parser.add_argument("--images", type=int, default=3, help="distinct base photos")
    parser.add_argument("--n", type=int, default=200, help="uploads end to end")
    parser.add_argument("--inflight", type=int, default=8, help="uploads in flight at once")
    parser.add_argument("--warmup", type=int, default=4, help="uploads before the measured ones")
    parser.add_argument("--serial", type=int, default=10, help="uploads one at a time, unloaded")
    parser.add_argument("--only", choices=("core", "e2e"), help="run one part")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the photos are kept")
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.per_round, args.n, args.warmup, args.serial = 1, 2, 20, 2, 3
    if min(args.rounds, args.per_round, args.images, args.n, args.inflight) < 1:
        parser.error("counts must be >= 1")
    if min(args.warmup, args.serial) < 0:
        parser.error("--warmup and --serial must be >= 0")
    return BenchOptions(
        rounds=args.rounds,
        per_round=args.per_round,
        images=args.images,
        n=args.n,
        inflight=args.inflight,
        warmup=args.warmup,
        serial=args.serial,
        parts=(args.only,) if args.only else ("core", "e2e"),
        cache_dir=args.cache_dir or default_cache_dir(),
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    return run_and_report(lambda: run(opts))


if __name__ == "__main__":
    sys.exit(main())
