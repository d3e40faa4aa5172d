"""`darkroom upload` as a real process against a gateway on the real bus and store: batches,
directories, rejections, duplicates, refused keys, finding a running `up`, and --watch."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bus.core.settings import Settings
from bus.gateway.app import build_app
from bus.ops.local import InstanceLock, remove_run_info, write_private, write_run_info
from bus.runtime.context import Context
from tests.support import procs
from tests.support.images import jpeg, png

pytestmark = [pytest.mark.nats, pytest.mark.s3]

MakeKey = Callable[..., Awaitable[str]]


@pytest.fixture
async def key(make_key: MakeKey) -> str:
    return await make_key("upload")


@pytest.fixture
async def gateway(ctx: Context, key: str, aiohttp_server: Any) -> str:
    """The gateway's URL; created after the key so that its key cache starts with it."""
    server = await aiohttp_server(build_app(ctx))
    return f"http://{server.host}:{server.port}"


async def run_upload(env: dict[str, str], *args: str | Path) -> procs.Proc:
    proc = await procs.start(["upload", *map(str, args)], env)
    await proc.wait(30)
    return proc


def ids_by_name(proc: procs.Proc) -> dict[str, str]:
    """``{file name: image id}`` from the lines of accepted files (``path: id``)."""
    found = {}
    for line in proc.lines:
        path, sep, rest = line.partition(": ")
        if sep and rest and " " not in rest and not path.startswith("darkroom"):
            found[Path(path).name] = rest
    return found


async def stored_ids(ctx: Context) -> set[str]:
    return {k.split("/")[1] for k in await ctx.store.list_keys("uploads/")}


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


async def test_files_and_a_directory_are_uploaded(
    ctx: Context, gateway: str, key: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    a = write(tmp_path / "a.jpg", jpeg(color=(200, 0, 0)))
    b = write(tmp_path / "b.png", png(color=(0, 200, 0, 255)))
    album = tmp_path / "album"
    write(album / "c.jpg", jpeg(color=(0, 0, 200)))
    write(album / "nested" / "d.JPEG", jpeg(color=(90, 90, 0)))
    write(album / "notes.txt", b"not an image, and not named like one")
    write(album / ".hidden.jpg", b"AppleDouble junk")
    proc = await run_upload(subprocess_env, a, b, album, "--url", gateway, "--key", key)

    assert proc.proc.returncode == 0, proc.output
    ids = ids_by_name(proc)
    assert set(ids) == {"a.jpg", "b.png", "c.jpg", "d.JPEG"}, proc.output
    assert "notes.txt" not in proc.output and ".hidden" not in proc.output
    assert "4 uploaded, 0 duplicates, 0 rejected" in proc.output
    assert await stored_ids(ctx) == set(ids.values())


async def test_a_rejected_file_fails_the_run_and_the_rest_still_land(
    ctx: Context, gateway: str, key: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    good = write(tmp_path / "good.jpg", jpeg())
    fake = write(tmp_path / "fake.jpg", b"just some text in a file named like a photo\n")
    env = {**subprocess_env, "DARKROOM_URL": gateway, "DARKROOM_API_KEY": key}
    proc = await run_upload(env, good, fake)

    assert proc.proc.returncode == 1, proc.output
    assert f"{fake}: rejected: not a supported image" in proc.output
    ids = ids_by_name(proc)
    assert list(ids) == ["good.jpg"]
    assert await stored_ids(ctx) == {ids["good.jpg"]}
    assert "1 uploaded, 0 duplicates, 1 rejected" in proc.output


async def test_a_duplicate_is_accepted_and_names_the_first_id(
    ctx: Context,
    settings: Settings,
    gateway: str,
    key: str,
    subprocess_env: dict[str, str],
    tmp_path: Path,
) -> None:
    # No --url or --key: found through the data dir of a running `darkroom up`.
    lock = InstanceLock(settings.data_dir)
    assert lock.acquire()
    try:
        write_run_info(settings.data_dir, {"gateway_url": gateway})
        write_private(settings.data_dir / "admin.key", key + "\n")
        photo = jpeg(color=(10, 120, 30))
        first = await run_upload(subprocess_env, write(tmp_path / "first.jpg", photo))
        again = await run_upload(subprocess_env, write(tmp_path / "again" / "copy.jpg", photo))
    finally:
        remove_run_info(settings.data_dir)
        lock.release()

    assert first.proc.returncode == 0, first.output
    image_id = ids_by_name(first)["first.jpg"]
    assert again.proc.returncode == 0, again.output
    assert f"copy.jpg: duplicate of {image_id}" in again.output
    assert "0 uploaded, 1 duplicate, 0 rejected" in again.output
    assert await stored_ids(ctx) == {image_id}


async def test_a_refused_key_says_why(
    ctx: Context,
    make_key: MakeKey,
    gateway: str,
    subprocess_env: dict[str, str],
    tmp_path: Path,
) -> None:
    photo = write(tmp_path / "p.jpg", jpeg())
    bogus = "drk_aaaaaaaaaaaa_" + "x" * 40
    unknown = await run_upload(subprocess_env, photo, "--url", gateway, "--key", bogus)
    assert unknown.proc.returncode == 1
    assert f"the gateway at {gateway} refused the API key" in unknown.output
    assert "unknown or revoked" in unknown.output and "--key" in unknown.output

    reader = await make_key("read")
    for _ in range(50):  # the gateway's key cache follows the bucket
        no_scope = await run_upload(subprocess_env, photo, "--url", gateway, "--key", reader)
        if "unknown or revoked" not in no_scope.output:
            break
        await asyncio.sleep(0.1)
    assert no_scope.proc.returncode == 1
    assert "lacks the 'upload' scope" in no_scope.output
    assert await stored_ids(ctx) == set()


async def test_bad_usage_and_an_unreachable_gateway(
    settings: Settings, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    nothing = await run_upload(subprocess_env)
    assert nothing.proc.returncode == 2 and "nothing to upload" in nothing.output
    missing = await run_upload(subprocess_env, tmp_path / "nope.jpg", "--url", "http://x:1")
    assert missing.proc.returncode == 2 and "nope.jpg does not exist" in missing.output
    no_gateway = await run_upload(subprocess_env, write(tmp_path / "p.jpg", jpeg()))
    assert no_gateway.proc.returncode == 2 and "no gateway to upload to" in no_gateway.output

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    down = await run_upload(subprocess_env, tmp_path / "p.jpg", "--url", url, "--key", "k")
    assert down.proc.returncode == 1
    assert f"cannot reach the gateway at {url}" in down.output


@pytest.fixture
async def watcher(
    gateway: str, key: str, subprocess_env: dict[str, str], tmp_path: Path
) -> AsyncIterator[tuple[procs.Proc, Path]]:
    """``upload first.jpg --watch inbox`` running; the inbox already holds old.jpg."""
    inbox = tmp_path / "inbox"
    write(inbox / "old.jpg", jpeg(color=(1, 2, 3)))
    first = write(tmp_path / "first.jpg", jpeg(color=(250, 250, 0)))
    args = ["upload", str(first), "--watch", str(inbox), "--url", gateway, "--key", key]
    async with procs.running(args, subprocess_env) as proc:
        await proc.wait_for_line("watching")
        yield proc, inbox


async def test_watch_uploads_a_new_file_once_it_stops_growing(
    ctx: Context, watcher: tuple[procs.Proc, Path]
) -> None:
    proc, inbox = watcher
    assert "first.jpg: " in proc.output
    photo = jpeg(800, 600, (30, 160, 220))
    target = inbox / "later" / "new.jpg"
    target.parent.mkdir()
    # A slow copy: 8 pieces, 0.25 s apart. Polls (every 1 s) see it part-written, but never
    # the same size twice in a row until it is complete; a partial JPEG would be rejected.
    pieces = 8
    step = -(-len(photo) // pieces)
    for start in range(0, len(photo), step):
        with target.open("ab") as fh:
            fh.write(photo[start : start + step])
        await asyncio.sleep(0.25)
    line = await proc.wait_for_line("new.jpg: ", timeout=10)

    proc.signal(signal.SIGINT)
    assert await proc.wait(10) == 0, proc.output
    assert "rejected" not in line and "old.jpg" not in proc.output
    new_id = line.rsplit(" ", 1)[1]
    keys = {k.split("/")[1]: k for k in await ctx.store.list_keys("uploads/")}
    assert len(keys) == 2 and new_id in keys
    assert await ctx.store.get_bytes(keys[new_id]) == photo
    assert sum("new.jpg" in entry for entry in proc.lines) == 1
