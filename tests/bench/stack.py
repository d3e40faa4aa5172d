"""What benchmarks on the embedded servers share: settings that point at them, and a real
``darkroom gateway`` process for those that measure it from outside."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from pydantic import SecretStr

from bus.core.settings import NatsSettings, PostgresSettings, S3Settings, Settings
from bus.ops.embedded import NatsServer, SeaweedFS
from bus.ops.pgserver import PostgresServer


class Gateway:
    """A real ``darkroom gateway`` process: its address, and its resident memory."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bus.ops.cli",
            "gateway",
            "--port",
            "0",
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        while line := (await asyncio.wait_for(self.proc.stderr.readline(), 60)).decode():
            if "gateway listening on " in line:
                self.url = line.split("gateway listening on ", 1)[1].split()[0]
                break
        if not self.url:
            raise RuntimeError("the gateway did not start")
        asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while await self.proc.stderr.readline():
            pass

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


async def start_gateway(
    root: Path, pg: PostgresServer, nats: NatsServer, weed: SeaweedFS, schema: str
) -> tuple[Gateway, str]:
    """A ``darkroom gateway`` process on the servers, namespace ``schema``, and a read key."""
    from bus.state.keys import create_key

    env = {
        **os.environ,
        "DARKROOM_NAMESPACE": schema,
        "DARKROOM_DATA_DIR": str(root / "data"),
        "DARKROOM_NATS__URL": nats.url,
        "DARKROOM_S3__ENDPOINT": weed.url,
        "DARKROOM_S3__ACCESS_KEY": weed.credentials.access_key,
        "DARKROOM_S3__SECRET_KEY": weed.credentials.secret_key,
        "DARKROOM_S3__BUCKET": schema.replace("_", "-"),
        "DARKROOM_POSTGRES__URL": pg.url,
        "DARKROOM_LOG_LEVEL": "info",
    }
    gateway = Gateway(env)
    await gateway.start()
    import nats as nats_py

    nc = await nats_py.connect(nats.url)
    try:
        kv = await nc.jetstream().key_value(f"{schema}_keys")
        key, _ = await create_key(kv, "bench", ("read",))
    finally:
        await nc.close()
    return gateway, key


def server_settings(
    data_dir: Path, pg: PostgresServer, nats: NatsServer, weed: SeaweedFS, bucket: str
) -> Settings:
    """Settings for an in-process darkroom on the servers, with its own bucket."""
    return Settings(
        data_dir=data_dir,
        log_level="warning",
        nats=NatsSettings(url=nats.url),
        s3=S3Settings(
            endpoint=weed.url,
            access_key=weed.credentials.access_key,
            secret_key=SecretStr(weed.credentials.secret_key),
            bucket=bucket,
        ),
        postgres=PostgresSettings(url=SecretStr(pg.url)),
    )
