"""`darkroom up` as a user runs it: embedded servers, the chain, restart, crashes, errors."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from bus.ops.embedded import Child, SeaweedFS
from bus.ops.stack import DRAIN_TIMEOUT_S
from bus.runtime.context import START_TIMEOUT_S
from tests.conftest import MAX_TEST_BUCKETS, gateway_seed
from tests.support import procs
from tests.support.disk import Usage, low_disk_warning
from tests.support.images import jpeg
from tests.support.streams import eventually

pytestmark = [pytest.mark.slow]


def up_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKROOM_")}
    # Free ports, never the defaults: a darkroom the developer runs must not collide.
    ports = {"DARKROOM_NATS__EMBEDDED_PORT": "0", "DARKROOM_S3__EMBEDDED_PORT": "0"}
    return {**env, **ports, "HOME": str(tmp_path)}


async def start_up(data_dir: Path, env: dict[str, str]) -> tuple[procs.Proc, str]:
    proc = await procs.start(["up", "--data-dir", str(data_dir), "--port", "0"], env)
    line = await proc.wait_for_line("UI and API", timeout=60)
    match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
    assert match, line
    return proc, match.group(1)


async def upload_and_wait(url: str, key: str, data: bytes, name: str) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        form = aiohttp.FormData()
        form.add_field("file", data, filename=name, content_type="image/jpeg")
        async with http.post(f"{url}/api/uploads", data=form) as response:
            assert response.status == 201, await response.text()
            image_id = (await response.json())["results"][0]["id"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            async with http.get(f"{url}/api/images/{image_id}") as response:
                if response.status == 200:
                    doc = await response.json()
                    if doc["status"] in ("ready", "failed"):
                        return doc
            await asyncio.sleep(0.1)
    raise AssertionError("the upload never became ready")


async def test_up_runs_the_chain_and_a_restart_keeps_everything(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = up_env(tmp_path)
    original = jpeg(400, 300)
    first, url = await start_up(data_dir, env)
    try:
        assert "admin key    drk_" in first.output
        key = (data_dir / "admin.key").read_text().strip()
        assert key in first.output
        assert (data_dir / "admin.key").stat().st_mode & 0o777 == 0o600
        doc = await upload_and_wait(url, key, original, "holiday.jpg")
        assert doc["status"] == "ready" and "color:blue" in doc["tags"]
    finally:
        first.signal(signal.SIGTERM)
        assert await first.wait(timeout=60) == 0
    assert not (data_dir / "run.json").exists()
    assert procs.pids_of(str(data_dir)) == [], "children outlived darkroom up"

    second, url = await start_up(data_dir, env)
    try:
        assert f"admin key    in {data_dir / 'admin.key'}" in second.output
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.get(f"{url}/api/images/{doc['id']}") as response:
                assert response.status == 200
                again = await response.json()
            async with http.get(f"{url}/api/images/{doc['id']}/original") as response:
                assert await response.read() == original
        assert again["status"] == "ready" and again["name"] == "holiday.jpg"
    finally:
        second.signal(signal.SIGTERM)
        assert await second.wait(timeout=60) == 0


async def test_a_killed_nats_server_is_restarted_and_work_continues(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    proc, url = await start_up(data_dir, up_env(tmp_path))
    try:
        key = (data_dir / "admin.key").read_text().strip()
        [nats_pid] = [p for p in procs.pids_of(str(data_dir / "nats")) if p != proc.proc.pid]
        os.kill(nats_pid, signal.SIGKILL)
        await proc.wait_for_line("nats-server restarted", timeout=30)
        assert "nats-server exited unexpectedly" in proc.output
        doc = await upload_and_wait(url, key, jpeg(), "after-crash.jpg")
        assert doc["status"] == "ready"
    finally:
        proc.signal(signal.SIGTERM)
        assert await proc.wait(timeout=60) == 0


async def test_a_second_up_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = up_env(tmp_path)
    proc, _ = await start_up(data_dir, env)
    try:
        second = await procs.start(["up", "--data-dir", str(data_dir), "--port", "0"], env)
        assert await second.wait(timeout=30) == 2
        assert "already running on" in second.output
    finally:
        proc.signal(signal.SIGTERM)
        assert await proc.wait(timeout=60) == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["--nats", "nats://127.0.0.1:1", "--s3", "http://k:s@127.0.0.1:1"],
            "cannot reach NATS at nats://127.0.0.1:1",
        ),
    ],
)
async def test_unreachable_servers_fail_fast_naming_the_url(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    proc = await procs.start(["worker", "ingest", *args], up_env(tmp_path))
    # Its first refused attempt is logged at once; from then on it tries for its start
    # timeout and gives up, instead of retrying for ever as a connected client does.
    await proc.wait_for_line("connection problem", timeout=30)
    trying = time.monotonic()
    code = await proc.wait(timeout=30)
    gave_up = time.monotonic() - trying
    assert code == 1
    assert needle in proc.output and f"within {START_TIMEOUT_S:.0f} s" in proc.output
    assert "Traceback" not in proc.output
    # One start timeout, and the same again for closing down on a loaded machine: not two.
    assert gave_up < 2 * START_TIMEOUT_S, f"gave up {gave_up:.1f} s after the first attempt"


@pytest.mark.nats
async def test_unreachable_s3_fails_fast_naming_the_url(
    tmp_path: Path, nats_server: object
) -> None:
    url = nats_server.url  # type: ignore[attr-defined]
    env = {**up_env(tmp_path), "DARKROOM_NATS__NKEY_SEED": gateway_seed(nats_server)}  # type: ignore[arg-type]
    proc = await procs.start(
        ["worker", "ingest", "--nats", url, "--s3", "http://k:s@127.0.0.1:1"], env
    )
    assert await proc.wait(timeout=30) == 1
    assert "cannot reach S3 at http://127.0.0.1:1" in proc.output
    assert "Traceback" not in proc.output


async def test_worker_without_endpoints_explains_what_to_pass(tmp_path: Path) -> None:
    proc = await procs.start(
        ["worker", "ingest", "--data-dir", str(tmp_path / "none")], up_env(tmp_path)
    )
    assert await proc.wait(timeout=30) == 2
    assert "pass --nats/--s3" in proc.output


@pytest.mark.nats
@pytest.mark.s3
async def test_gateway_serves_the_api_without_functions_or_new_keys(
    ctx: object, subprocess_env: dict[str, str]
) -> None:
    from bus.runtime.context import Context
    from bus.state.keys import create_key, list_keys

    assert isinstance(ctx, Context)
    token, _ = await create_key(ctx.api_keys, "ops", ("read",))
    proc = await procs.start(["gateway", "--port", "0", "--log-level", "info"], subprocess_env)
    try:
        line = await proc.wait_for_line("gateway listening on", timeout=30)
        match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        assert match, line
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{match.group(1)}/readyz") as response:
                assert response.status == 200
            async with http.get(
                f"{match.group(1)}/api/status", headers={"Authorization": f"Bearer {token}"}
            ) as response:
                assert response.status == 200
                assert {
                    f["function"] for f in (await response.json())["functions"] if f["deployed"]
                } == set()
        assert [k.name for k in await list_keys(ctx.js, ctx.api_keys)] == ["ops"]
    finally:
        proc.signal(signal.SIGTERM)
        assert await proc.wait(timeout=30) == 0


async def test_a_server_that_keeps_dying_stops_darkroom_with_exit_code_3(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    proc, _ = await start_up(data_dir, up_env(tmp_path))
    for attempt in range(1, 5):
        pids = [p for p in procs.pids_of(str(data_dir / "nats")) if p != proc.proc.pid]
        assert pids, f"no nats-server to kill for crash {attempt}"
        os.kill(pids[0], signal.SIGKILL)
        killed = time.monotonic()
        if attempt <= 3:
            await proc.wait_for_line(f"nats-server restarted ({attempt}/3)", timeout=30)
    # A live server gets DRAIN_TIMEOUT_S to take the acks of work in flight; one that died
    # for good cannot take them, so darkroom must stop well before that drain would end.
    assert await proc.wait(timeout=DRAIN_TIMEOUT_S + 30) == 3
    stopped = time.monotonic() - killed
    assert "nats-server died 4 times within 60 s" in proc.output
    assert stopped < DRAIN_TIMEOUT_S, f"stopped {stopped:.0f} s after the last crash"
    assert procs.pids_of(str(data_dir)) == []


async def test_a_child_ready_before_anyone_waits_is_still_seen_ready(tmp_path: Path) -> None:
    """The readiness line may be read before the check starts waiting for it (on a loaded
    machine this made a restarted nats-server look dead for READY_TIMEOUT_S)."""

    class Quick(Child):
        name = "quick"

        def command(self) -> tuple[list[str], dict[str, str]]:
            return ["/bin/sh", "-c", "echo 'listening on port 4321'; exec sleep 30"], {}

        async def wait_ready(self) -> None:
            # The line is read before anyone waits for it.
            await eventually(lambda: any("listening" in line for line in self.tail))
            match = await self.wait_for_line(r"listening on port (\d+)")
            assert match.group(1) == "4321"

    child = Quick(tmp_path / "quick.log")
    try:
        await child.start()  # had the line been missed: ChildError after READY_TIMEOUT_S
    finally:
        await child.stop()


async def test_the_test_store_has_room_for_a_bucket_per_test(s3_server: SeaweedFS) -> None:
    """The suite's store must not size itself by the disk's free space (see ``s3_server``)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(s3_server.master_url + "/dir/status") as response,
    ):
        status = await response.json(content_type=None)
    assert status["Topology"]["Max"] == MAX_TEST_BUCKETS


def test_a_disk_too_full_for_a_run_is_named_up_front(tmp_path: Path) -> None:
    gb = 10**9
    roomy = Usage(total=252 * gb, used=200 * gb, free=52 * gb)
    assert low_disk_warning(tmp_path, roomy) is None
    # 1% of 252 GB is the store's floor; 3 GB free leaves under half a GB above it.
    tight = Usage(total=252 * gb, used=249 * gb, free=3 * gb)
    said = low_disk_warning(tmp_path, tight)
    assert said is not None
    assert "3.0 GB free" in said and "below 2.5 GB" in said
