"""``darkroom generate``: ask a running gateway for images, and optionally wait for them.

It sends ``POST /api/generations`` to the gateway ``darkroom upload`` would send to (the
same flags, environment and running ``darkroom up``) and prints the job id. With ``--wait``
it follows the job (``GET /api/generations/<id>`` every :data:`POLL_S`), drawing its steps
as a progress bar on a terminal, then prints the ids of the images it made; a job that
fails or is cancelled ends the command with exit code 1 and the reason.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from tqdm import tqdm  # type: ignore[import-untyped]

from bus.ops.upload_client import Target, resolve_target

GENERATIONS_PATH = "/api/generations"
POLL_S = 0.5
CONNECT_TIMEOUT_S = 10.0
ANSWER_TIMEOUT_S = 60.0
# The request's fields, as the options name them.
FIELDS = (
    "prompt",
    "negative_prompt",
    "image",
    "mode",
    "model",
    "n",
    "seed",
    "steps",
    "width",
    "height",
    "guidance",
    "strength",
)


@dataclass(frozen=True, slots=True)
class GenerateOptions:
    """What ``darkroom generate`` was asked; a field left None takes the gateway's default."""

    data_dir: Path
    prompt: str | None = None
    negative_prompt: str | None = None
    image: str | None = None
    mode: str | None = None
    model: str | None = None
    n: int | None = None
    seed: int | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    guidance: float | None = None
    strength: float | None = None
    wait: bool = False
    url: str | None = None
    key: str | None = None
    environ: Mapping[str, str] = field(default_factory=dict)
    quiet: bool = False
    poll_s: float = POLL_S

    def body(self) -> dict[str, Any]:
        """The request's JSON body: only what was given."""
        return {name: value for name in FIELDS if (value := getattr(self, name)) is not None}


def parse_size(text: str) -> tuple[int, int]:
    """``"768x512"`` as (768, 512); ValueError saying what was expected otherwise."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ValueError(f"expected WIDTHxHEIGHT, e.g. 1024x768, got {text!r}")
    return int(width), int(height)


def _say(text: str) -> None:
    print(f"darkroom: {text}", file=sys.stderr, flush=True)


def _problem_text(status: int, body: Any) -> str:
    detail = body.get("detail") or body.get("title") if isinstance(body, dict) else None
    return f"{detail} (HTTP {status})" if isinstance(detail, str) and detail else f"HTTP {status}"


async def _call(
    session: aiohttp.ClientSession, method: str, url: str, target: Target, **kwargs: Any
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {target.key}", "Accept": "application/json"}
    async with session.request(method, url, headers=headers, **kwargs) as response:
        raw = await response.read()
    try:
        return response.status, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return response.status, None


async def run_generate(options: GenerateOptions) -> int:
    """Submit the request, then follow it with ``options.wait``. Returns the exit code: 0
    queued (or done), 1 when the gateway cannot be reached or the job failed or was
    cancelled, 2 when the gateway refused the request as asked."""
    target = await asyncio.to_thread(
        resolve_target, options.url, options.key, options.data_dir, options.environ
    )
    timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S, sock_read=ANSWER_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            status, body = await _call(
                session, "POST", target.url + GENERATIONS_PATH, target, json=options.body()
            )
        except aiohttp.ClientConnectorError as exc:
            _say(f"cannot reach the gateway at {target.url}: {exc.os_error.strerror or exc}")
            return 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            _say(f"the gateway at {target.url} failed: {str(exc) or type(exc).__name__}")
            return 1
        if status in (401, 403):
            hint = (
                "create one with `darkroom keys create --name NAME --scopes generate`"
                if status == 403
                else "pass a valid key with --key or $DARKROOM_API_KEY"
            )
            _say(f"the gateway at {target.url} refused the API key: "
                 f"{_problem_text(status, body)}; {hint}")  # fmt: skip
            return 1
        if status != 202 or not isinstance(body, dict) or not isinstance(body.get("id"), str):
            _say(f"the gateway refused the request: {_problem_text(status, body)}")
            return 2 if 400 <= status < 500 else 1
        job_id = body["id"]
        print(job_id, flush=True)
        if not options.wait:
            return 0
        return await _follow(session, target, job_id, options)


async def _follow(
    session: aiohttp.ClientSession, target: Target, job_id: str, options: GenerateOptions
) -> int:
    """Poll the job until it ends, showing its steps; print its outputs' image ids."""
    url = f"{target.url}{GENERATIONS_PATH}/{job_id}"
    bar = tqdm(
        total=1,
        unit="step",
        file=sys.stderr,
        disable=options.quiet or not sys.stderr.isatty(),
        desc="queued",
    )
    try:
        while True:
            try:
                status, doc = await _call(session, "GET", url, target)
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, doc = 0, str(exc) or type(exc).__name__
            if status == 200 and isinstance(doc, dict):
                state = doc.get("status")
                if state == "done":
                    bar.close()
                    for output in doc.get("outputs") or []:
                        print(output.get("image_id"), flush=True)
                    return 0
                if state in ("failed", "cancelled"):
                    bar.close()
                    _say(f"job {job_id} {state}: {doc.get('error') or 'no reason given'}")
                    return 1
                _show(bar, doc)
            elif status in (401, 403, 404):
                bar.close()
                _say(f"cannot follow job {job_id}: {_problem_text(status, doc)}")
                return 1
            # Anything else (a restart, the database away a moment): ask again.
            await asyncio.sleep(options.poll_s)
    finally:
        bar.close()


def _show(bar: tqdm, doc: dict[str, Any]) -> None:
    progress = doc.get("progress")
    if not isinstance(progress, dict):
        bar.set_description_str(str(doc.get("status")))
        return
    total, step = int(progress.get("total") or 1), int(progress.get("step") or 0)
    if bar.total != total:
        bar.reset(total=total)
    bar.n = min(step, total)
    bar.set_description_str(str(progress.get("message") or "running"))
    bar.refresh()
