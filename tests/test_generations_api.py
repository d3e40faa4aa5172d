"""Generation jobs over HTTP on the real bus, store and PostgreSQL: checking and queueing a
request, the job documents notify projects (in any order), pages, cancel, live progress,
waiting for a job, the webhook, ``darkroom generate`` and ``darkroom reindex``.

The generate function is not run here: where a test needs a job to progress or end, it
publishes what the function's runner would (progress on the live subject, ``generated``,
``failed.generate``, ``cancelled.generate``).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from bus.core import subjects
from bus.core.envelope import Event, ObjectRef, new_id, now_iso
from bus.core.generation import check_request
from bus.gateway.app import build_app
from bus.gateway.live import LIVE, Live
from bus.ops.reindex import reindex
from bus.runtime.context import Context
from bus.runtime.registry import load
from bus.state.readmodel import ReadModel, format_time
from tests.support import procs
from tests.support.http import auth
from tests.support.streams import events, eventually, settled

pytestmark = [pytest.mark.nats, pytest.mark.s3]

Api = TestClient[Any, Any]
T0 = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture
async def api(ctx: Context, aiohttp_client: Any, run_function: Any) -> Api:
    """The gateway in-process with notify behind it (no generate function)."""
    await run_function(load("notify"))
    client: Api = await aiohttp_client(build_app(ctx))
    return client


@pytest.fixture
async def token(make_key: Callable[..., Awaitable[str]]) -> str:
    return await make_key("generate", "read")


def db(ctx: Context) -> ReadModel:
    assert ctx.db is not None
    return ctx.db


def at(seconds: float) -> str:
    return format_time(T0 + timedelta(seconds=seconds)) or ""


async def publish(ctx: Context, event: Event) -> None:
    subject = ctx.names.subject(event.type)
    await ctx.js.publish(subject, event.encode(), headers={"Nats-Msg-Id": event.id})


def job_doc(ctx: Context, job_id: str, created: str, **values: Any) -> dict[str, Any]:
    values = {"prompt": "a lighthouse at dusk", "n": 2, **values}
    job = check_request(values, ctx.settings.generate, job_id=job_id, created=created, seed=7)
    return job.to_doc()


def requested(job: dict[str, Any], time: str | None = None) -> Event:
    return Event(
        id=f"requested-{job['id']}",
        type=subjects.REQUESTED,
        source="test",
        time=time or job["created"],
        job_id=job["id"],
        data=job,
    )


def generated(job_id: str, index: int, n: int, time: str | None = None) -> Event:
    """An output as the generate function announces it."""
    image_id = subjects.generated_image_id(job_id, index)
    key = subjects.generated_key(job_id, index)
    return Event(
        id=f"generated-{image_id}",
        type=subjects.GENERATED,
        source="test",
        time=time or now_iso(),
        subject=image_id,
        object=ObjectRef("b", key, 100, "e", "image/png"),
        image_id=image_id,
        job_id=job_id,
        data={
            "job_id": job_id,
            "index": index,
            "n": n,
            "name": f"{image_id}.png",
            "source": "generate",
            "lineage": {"job_id": job_id, "seed": 7 + index, "model": "sd-turbo", "parent": None},
            "model": {"name": "sd-turbo", "source": "demo", "revision": "main", "demo": True},
            "timings": {"queue_s": 0.5, "load_s": 1.0, "inference_s": 2.0},
        },
    )


def ended(job_id: str, how: str, reason: str, time: str | None = None, n: int = 0) -> Event:
    """``failed.generate`` or ``cancelled.generate``, as the runner sends them."""
    return Event(
        id=f"{how}-{job_id}-{n}",
        type=f"{how}.generate",
        source="test",
        time=time or now_iso(),
        subject=job_id,
        job_id=job_id,
        data={"stage": "generate", "reason": reason},
    )


async def image_in_catalogue(
    ctx: Context, *, ingested: bool = True, caption: str | None = None
) -> str:
    """An image in the read model: uploaded, and ingested and captioned if asked."""
    image_id = new_id()
    stages: list[tuple[str, dict[str, Any]]] = [(subjects.UPLOADED, {"name": "photo.jpg"})]
    if ingested:
        display = {"key": subjects.image_key(image_id, "display.webp")}
        stages.append((subjects.INGESTED, {"renditions": {"display": display}}))
    if caption is not None:
        stages.append((subjects.CAPTIONED, {"caption": caption, "tags": []}))
    for seq, (topic, data) in enumerate(stages, start=1):
        event = Event(
            id=f"{topic}-{image_id}",
            type=topic,
            source="test",
            time=now_iso(),
            image_id=image_id,
            data=data,
        )
        await db(ctx).project(event, seq)
    return image_id


async def post(api: Api, token: str, body: Any, path: str = "/api/generations") -> Any:
    return await api.post(path, json=body, headers=auth(token))


async def get_job(api: Api, token: str, job_id: str, query: str = "") -> dict[str, Any]:
    response = await api.get(f"/api/generations/{job_id}{query}", headers=auth(token))
    assert response.status == 200, await response.text()
    doc: dict[str, Any] = await response.json()
    return doc


async def job_status(api: Api, token: str, job_id: str, status: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        doc = await get_job(api, token, job_id)
        return doc if doc["status"] == status else None

    found: dict[str, Any] = await eventually(check, what=f"job {job_id} {status}")
    return found


# --- refusing ------------------------------------------------------------------------------


async def test_bad_requests_say_what_is_wrong_and_never_reach_the_queue(
    ctx: Context, api: Api, token: str
) -> None:
    ingested = await image_in_catalogue(ctx)
    uploaded = await image_in_catalogue(ctx, ingested=False)
    corpus: list[tuple[Any, int, list[str]]] = [
        ({}, 422, ["prompt must not be blank"]),
        ({"prompt": "   "}, 422, ["prompt must not be blank"]),
        ({"prompt": "x", "width": 1004}, 422, ["width must be a multiple of 8, got 1004"]),
        (
            {"prompt": "x", "width": 4096, "height": 4096},
            422,
            [
                "width must be between 64 and 2048, got 4096",
                "height must be between 64 and 2048, got 4096",
                "width x height must be at most 4,194,304 pixels, got 4096x4096",
            ],
        ),
        ({"prompt": "x", "steps": 0}, 422, ["steps must be between 1 and 100, got 0"]),
        ({"prompt": "x", "n": 99}, 422, ["n must be between 1 and 4, got 99"]),
        ({"prompt": "x", "seed": -1}, 422, ["seed must be between 0 and"]),
        ({"prompt": "x" * 2001}, 422, ["prompt must be at most 2000 characters, got 2001"]),
        ({"prompt": "x", "model": "nope"}, 422, ["model must be one of", "got 'nope'"]),
        ({"prompt": "x", "scheduler": "warp"}, 422, ["scheduler must be one of", "'warp'"]),
        ({"prompt": "x", "guidance": 31}, 422, ["guidance must be between 0 and 30, got 31"]),
        ({"prompt": "x", "mode": "paint"}, 422, ["mode must be one of", "got 'paint'"]),
        ({"prompt": "x", "mode": "img2img"}, 422, ["mode img2img needs an image"]),
        ({"prompt": "x", "strength": 0.5}, 422, ["strength applies to the image modes"]),
        (
            {"prompt": "x", "mode": "img2img", "image": ingested, "strength": 1.5},
            422,
            ["strength must be in (0, 1], got 1.5"],
        ),
        ({"prompt": "x", "image": ingested}, 422, ["mode txt2img takes no image"]),
        ({"prompt": "x", "colour": "red"}, 422, ["colour is not a field of this request"]),
        (
            {"prompt": "x", "mode": "img2img", "image": "../etc/passwd"},
            422,
            ["image must be an image id", '"../etc/passwd"'],
        ),
        (
            {"prompt": 5, "width": "big", "n": 1.5},
            422,
            [
                "prompt must be text, got int",
                "width must be a number, got 'big'",
                "n must be a whole number, got 1.5",
            ],
        ),
        ([{"prompt": "x"}], 422, ["the body must be a JSON object, got [{"]),
        ({"prompt": "x", "mode": "img2img", "image": "nosuch"}, 404, ["no image with id"]),
        ({"prompt": "x", "mode": "img2img", "image": uploaded}, 409, ["not ingested yet"]),
        ({"mode": "remix", "image": ingested}, 409, ["has no caption yet: give a prompt"]),
    ]
    for body, status, words in corpus:
        response = await post(api, token, body)
        problem = await response.json()
        assert response.status == status, (body, problem)
        assert response.content_type == "application/problem+json"
        for word in words:
            assert word in problem["detail"], (body, problem)
        if status == 422:  # every problem, as a list too
            assert "; ".join(problem["errors"]) == problem["detail"]
            assert all(any(word in e for e in problem["errors"]) for word in words), problem
    malformed = await api.post(
        "/api/generations", data=b"{", headers={**auth(token), "Content-Type": "application/json"}
    )
    assert malformed.status == 400
    form = await api.post("/api/generations", data=b"prompt=x", headers=auth(token))
    assert form.status == 415
    hooked = await post(api, token, {"prompt": "x", "n": 0}, "/api/hooks/generate")
    assert hooked.status == 422 and "n must be between 1" in (await hooked.json())["detail"]

    # The positive signal: a good request, answered after every bad one was, is the only
    # one the stream and the store hold (each request is stored and announced before its
    # answer, so a bad one that got through would be there first).
    good = await post(api, token, {"prompt": "a red fox"})
    assert good.status == 202
    job_id = (await good.json())["id"]
    assert [e.job_id for e in await events(ctx, subjects.REQUESTED)] == [job_id]
    assert await ctx.store.list_keys(subjects.REQUESTS_PREFIX) == [subjects.request_key(job_id)]


async def test_values_of_the_wrong_type_are_refused(api: Api, token: str) -> None:
    cases = (("negative_prompt", 0), ("mode", ""), ("scheduler", False), ("scheduler", ["a"]))
    for field, value in cases:
        response = await post(api, token, {"prompt": "x", field: value})
        assert response.status == 422, (field, value, await response.text())


# --- queueing ------------------------------------------------------------------------------


async def test_a_good_request_is_stored_announced_once_and_reads_back_queued(
    ctx: Context, api: Api, token: str
) -> None:
    response = await post(api, token, {"prompt": " a red fox ", "n": 2, "steps": 3})
    assert response.status == 202
    answer = await response.json()
    job_id = answer["id"]
    assert answer["status"] == "queued"
    assert answer["links"] == {
        "self": f"/api/generations/{job_id}",
        "events": f"/api/events?job={job_id}",
    }
    assert response.headers["Location"] == f"/api/generations/{job_id}"
    job = answer["request"]
    assert job["prompt"] == "a red fox" and job["n"] == 2 and job["steps"] == 3
    assert isinstance(job["seed"], int) and job["source"] == "api"
    assert job["model"] is None and job["width"] is None  # the worker's defaults

    stored = await ctx.store.get_json(subjects.request_key(job_id))
    assert stored == job
    (event,) = await events(ctx, subjects.REQUESTED)
    assert event.id == f"requested-{job_id}" and event.job_id == job_id
    assert event.image_id is None and event.data == job
    assert event.object is not None and event.object.key == subjects.request_key(job_id)

    doc = await get_job(api, token, job_id)  # from the store until notify has projected it
    assert doc["status"] == "queued" and doc["request"] == job and doc["outputs"] == []
    await eventually(lambda: db(ctx).generations.get(job_id), what="notify projected it")
    doc = await get_job(api, token, job_id)
    assert (doc["status"], doc["request"], doc["n"], doc["created"]) == (
        "queued",
        job,
        2,
        job["created"],
    )


async def test_image_modes_start_from_the_display_rendition_and_remix_from_the_caption(
    ctx: Context, api: Api, token: str
) -> None:
    image_id = await image_in_catalogue(ctx, caption="a lighthouse at dusk")
    response = await post(api, token, {"prompt": "in snow", "mode": "img2img", "image": image_id})
    assert response.status == 202, await response.json()
    job = (await response.json())["request"]
    display = subjects.image_key(image_id, "display.webp")
    assert job["init"] == {"key": display, "image_id": image_id}
    assert job["strength"] == 0.6  # the mode's default

    remix = await post(api, token, {"mode": "remix", "image": image_id, "seed": 3})
    assert remix.status == 202, await remix.json()
    job = (await remix.json())["request"]
    assert job["prompt"] == "a lighthouse at dusk" and job["seed"] == 3


async def test_the_webhook_queues_the_same_request(ctx: Context, api: Api, token: str) -> None:
    response = await post(api, token, {"prompt": "a red fox"}, "/api/hooks/generate")
    assert response.status == 202
    job_id = (await response.json())["id"]
    stored = await ctx.store.get_json(subjects.request_key(job_id))
    assert stored["source"] == "hook" and stored["prompt"] == "a red fox"


async def test_submitting_and_cancelling_need_generate_and_reading_needs_read(
    api: Api, make_key: Callable[..., Awaitable[str]]
) -> None:
    reader, maker = await make_key("read"), await make_key("generate")
    denied = await post(api, reader, {"prompt": "x"})
    assert denied.status == 403 and "'generate' scope" in (await denied.json())["detail"]
    assert (await post(api, reader, {"prompt": "x"}, "/api/hooks/generate")).status == 403
    made = await post(api, maker, {"prompt": "x"})
    assert made.status == 202
    job_id = (await made.json())["id"]
    assert (await api.get(f"/api/generations/{job_id}", headers=auth(maker))).status == 403
    assert (await api.get("/api/generations", headers=auth(maker))).status == 403
    assert (await api.delete(f"/api/generations/{job_id}", headers=auth(reader))).status == 403
    assert (await api.get(f"/api/generations/{job_id}", headers=auth(reader))).status == 200


# --- the projection ------------------------------------------------------------------------


async def test_outputs_before_the_request_duplicates_and_old_events_end_the_same(
    ctx: Context,
) -> None:
    jobs = db(ctx).generations
    job_id = new_id()
    job = job_doc(ctx, job_id, at(0))
    assert await db(ctx).project(generated(job_id, 1, 2, at(20)), 12)
    early = await jobs.get(job_id)
    assert early is not None and early["status"] == "running" and early["n"] == 2
    assert await db(ctx).project(requested(job, at(1)), 5)
    assert (await jobs.get(job_id) or {})["status"] == "running"
    assert await db(ctx).project(generated(job_id, 0, 2, at(21)), 13)
    done = await jobs.get(job_id)
    assert done is not None
    assert done["status"] == "done" and done["created"] == at(0)
    assert done["finished_at"] == at(21) and done["updated"] == at(21)
    assert done["model"] == "sd-turbo" and done["request"] == job and done["error"] is None
    assert [(o["index"], o["image_id"], o["seed"]) for o in done["outputs"]] == [
        (0, f"{job_id}-0", 7),
        (1, f"{job_id}-1", 8),
    ]
    assert done["timings"] == {"queue_s": 0.5, "load_s": 1.0, "inference_s": 2.0}
    # The same events again, and older ones, change nothing.
    assert not await db(ctx).project(generated(job_id, 0, 2, at(21)), 13)
    assert not await db(ctx).project(generated(job_id, 0, 2, at(2)), 3)
    assert not await db(ctx).project(requested(job, at(1)), 5)
    assert await jobs.get(job_id) == done
    # An output is also an image of the catalogue, as before.
    image = await db(ctx).get(f"{job_id}-0")
    assert image is not None and image["kind"] == "generated"


async def test_failed_and_cancelled_jobs_keep_the_newest_reason(ctx: Context) -> None:
    jobs = db(ctx).generations
    failed, cancelled = new_id(), new_id()
    await db(ctx).project(requested(job_doc(ctx, failed, at(0))), 1)
    assert await db(ctx).project(ended(failed, "failed", "out of memory", at(5)), 9)
    assert not await db(ctx).project(ended(failed, "failed", "an older failure", at(4), 1), 8)
    doc = await jobs.get(failed)
    assert doc is not None
    assert (doc["status"], doc["error"], doc["finished_at"]) == ("failed", "out of memory", at(5))

    await db(ctx).project(requested(job_doc(ctx, cancelled, at(0))), 2)
    await db(ctx).project(generated(cancelled, 0, 2, at(3)), 3)
    assert await db(ctx).project(ended(cancelled, "cancelled", "cancelled by request", at(4)), 4)
    doc = await jobs.get(cancelled)
    assert doc is not None
    assert (doc["status"], doc["error"]) == ("cancelled", "cancelled by request")
    assert [o["index"] for o in doc["outputs"]] == [0]  # what it made before stays
    # Every output in after all (a cancel that came too late): done, and no error.
    await db(ctx).project(generated(cancelled, 1, 2, at(5)), 5)
    doc = await jobs.get(cancelled)
    assert doc is not None and (doc["status"], doc["error"]) == ("done", None)


async def test_every_order_of_a_jobs_events_ends_in_the_same_document(ctx: Context) -> None:
    def story(job_id: str) -> list[tuple[Event, int]]:
        return [
            (requested(job_doc(ctx, job_id, at(0)), at(1)), 1),
            (generated(job_id, 0, 2, at(2)), 2),
            (ended(job_id, "failed", "the worker died", at(3)), 3),
            (generated(job_id, 1, 2, at(4)), 4),
        ]

    seen = []
    for order in itertools.permutations(range(4)):
        job_id = new_id()
        events_ = story(job_id)
        for i in order:
            await db(ctx).project(*events_[i])
        await db(ctx).project(*events_[order[0]])  # and one again
        doc = await db(ctx).generations.get(job_id)
        assert doc is not None
        text = orjson.dumps(doc).decode().replace(job_id, "JOB")
        seen.append(text)
    assert len(set(seen)) == 1, seen[:2]
    assert orjson.loads(seen[0])["status"] == "done"


# --- reading -------------------------------------------------------------------------------


async def test_the_list_pages_newest_first_and_filters_by_status(
    ctx: Context, api: Api, token: str
) -> None:
    ids = [new_id() for _ in range(5)]
    for n, job_id in enumerate(ids):
        await db(ctx).project(requested(job_doc(ctx, job_id, at(n), n=1)), n + 1)
    await db(ctx).project(generated(ids[1], 0, 1, at(10)), 10)
    await db(ctx).project(ended(ids[3], "cancelled", "no longer wanted", at(11)), 11)

    seen: list[str] = []
    params = {"limit": "2"}
    for _ in range(4):
        response = await api.get("/api/generations", params=params, headers=auth(token))
        assert response.status == 200
        page = await response.json()
        seen += [item["id"] for item in page["items"]]
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert seen == ids[::-1]

    async def listed(query: str) -> list[str]:
        response = await api.get(f"/api/generations?{query}", headers=auth(token))
        assert response.status == 200, await response.text()
        return [item["id"] for item in (await response.json())["items"]]

    assert await listed("status=done") == [ids[1]]
    assert await listed("status=cancelled") == [ids[3]]
    assert await listed("status=queued") == [ids[4], ids[2], ids[0]]
    bad = await api.get("/api/generations?status=lost", headers=auth(token))
    assert bad.status == 400 and "got 'lost'" in (await bad.json())["detail"]
    images_cursor = {"cursor": "created.desc|2026-01-01T00:00:00.000000Z|abc"}
    bad = await api.get("/api/generations", params=images_cursor, headers=auth(token))
    assert bad.status == 400 and "not jobs/desc" in (await bad.json())["detail"]
    missing = await api.get("/api/generations/nosuchjob", headers=auth(token))
    assert missing.status == 404 and "nosuchjob" in (await missing.json())["detail"]


async def test_live_progress_makes_a_queued_job_running_until_it_ends(
    ctx: Context, api: Api, token: str
) -> None:
    job_id = (await (await post(api, token, {"prompt": "a red fox", "n": 1})).json())["id"]
    preview = b"\xff\xd8\xff\xe0 a tiny jpeg"
    report = {  # as the runner's progress throttle sends it (bus/runtime/call.py)
        "stage": "generate",
        "event_id": f"requested-{job_id}",
        "job_id": job_id,
        "image_id": None,
        "step": 2,
        "total": 4,
        "message": "denoising",
        "time": now_iso(),
        "preview_type": "image/jpeg",
        "preview_b64": base64.b64encode(preview).decode(),
    }
    await ctx.nc.publish(ctx.names.progress(job_id), orjson.dumps(report))
    running = await job_status(api, token, job_id, "running")
    assert running["progress"] == {
        "step": 2,
        "total": 4,
        "message": "denoising",
        "time": report["time"],
    }
    with_preview = await get_job(api, token, job_id, "?preview=true")
    data_url = with_preview["progress"]["preview"]
    assert data_url == "data:image/jpeg;base64," + base64.b64encode(preview).decode()

    async def listed() -> list[dict[str, Any]]:  # once notify projected the request
        page = await (await api.get("/api/generations", headers=auth(token))).json()
        items: list[dict[str, Any]] = page["items"]
        return items

    [item] = await eventually(listed, what="the job listed")
    assert item["status"] == "running" and "preview" not in item
    # Another stage's progress on the job (its output being ingested) is not the job's.
    other = {**report, "stage": "ingest", "step": 1, "message": "decoding"}
    await ctx.nc.publish(ctx.names.progress(job_id), orjson.dumps(other))

    await publish(ctx, generated(job_id, 0, 1))
    done = await job_status(api, token, job_id, "done")
    assert "progress" not in done and done["outputs"][0]["image_id"] == f"{job_id}-0"


async def test_wait_returns_when_the_job_ends_or_the_time_is_up(
    ctx: Context, api: Api, token: str
) -> None:
    assert api.app is not None
    live = api.app[LIVE]
    job_id = (await (await post(api, token, {"prompt": "a red fox", "n": 1})).json())["id"]
    queued = await live.wait(job_id, 0.2)
    assert queued is not None and queued["status"] == "queued"
    assert await live.wait("nosuchjob", 0.2) is None

    waiting = asyncio.create_task(live.wait(job_id, 30))
    await publish(ctx, ended(job_id, "failed", "the model is unavailable"))
    doc = await asyncio.wait_for(waiting, 30)
    assert doc is not None and (doc["status"], doc["error"]) == (
        "failed",
        "the model is unavailable",
    )


async def test_a_waiter_that_hears_nothing_still_sees_the_end(
    ctx: Context, api: Api, token: str
) -> None:
    """A Live that is not subscribed (a missed message) finds the end by re-reading."""
    deaf = Live(ctx, recheck_s=0.1)
    job_id = (await (await post(api, token, {"prompt": "a red fox", "n": 1})).json())["id"]
    await eventually(lambda: db(ctx).generations.get(job_id), what="notify projected it")
    waiting = asyncio.create_task(deaf.wait(job_id, 30))
    await db(ctx).project(generated(job_id, 0, 1), 10_000)  # straight in: no message
    doc = await asyncio.wait_for(waiting, 30)
    assert doc is not None and doc["status"] == "done"


# --- cancelling ----------------------------------------------------------------------------


async def test_delete_flags_a_queued_job_and_refuses_a_finished_one(
    ctx: Context, api: Api, token: str
) -> None:
    job_id = (await (await post(api, token, {"prompt": "a red fox", "n": 1})).json())["id"]
    response = await api.delete(f"/api/generations/{job_id}", headers=auth(token))
    assert response.status == 202
    assert (await response.json())["id"] == job_id
    flag = await ctx.cancels_kv.get(job_id)
    assert flag.value is not None and orjson.loads(flag.value)["reason"] == "cancelled by request"
    again = await api.delete(f"/api/generations/{job_id}", headers=auth(token))
    assert again.status == 202  # still queued: asking twice is harmless

    finished = new_id()
    await db(ctx).project(requested(job_doc(ctx, finished, at(0), n=1)), 1)
    await db(ctx).project(generated(finished, 0, 1), 2)
    refused = await api.delete(f"/api/generations/{finished}", headers=auth(token))
    assert refused.status == 409 and "is done already" in (await refused.json())["detail"]
    unknown = await api.delete("/api/generations/nosuchjob", headers=auth(token))
    assert unknown.status == 404


async def test_a_cancelled_job_reads_back_cancelled(ctx: Context, api: Api, token: str) -> None:
    job_id = (await (await post(api, token, {"prompt": "a red fox", "n": 1})).json())["id"]
    await eventually(lambda: db(ctx).generations.get(job_id), what="notify projected it")
    assert (await api.delete(f"/api/generations/{job_id}", headers=auth(token))).status == 202
    cancel = ended(job_id, "cancelled", "cancelled by request")
    await eventually(lambda: ctx.cancels.reason(cancel), what="the flag mirrored here")
    await publish(ctx, cancel)
    await settled(ctx, "notify")
    doc = await get_job(api, token, job_id)
    assert doc["status"] == "cancelled"


# --- reindex -------------------------------------------------------------------------------


async def test_reindex_rebuilds_the_jobs(ctx: Context, api: Api, token: str) -> None:
    done_id = (await (await post(api, token, {"prompt": "a red fox", "n": 1})).json())["id"]
    failed_id = (await (await post(api, token, {"prompt": "a blue fox", "n": 1})).json())["id"]
    await publish(ctx, generated(done_id, 0, 1))
    await publish(ctx, ended(failed_id, "failed", "out of memory"))
    await settled(ctx, "notify")
    before = [await db(ctx).generations.get(i) for i in (done_id, failed_id)]
    assert [d and d["status"] for d in before] == ["done", "failed"]

    await reindex(ctx, progress=False)
    assert [await db(ctx).generations.get(i) for i in (done_id, failed_id)] == before

    # With the stream's events aged out, the stored requests still make queued jobs.
    await ctx.js.purge_stream(ctx.names.stream)
    await reindex(ctx, progress=False)
    rebuilt = await db(ctx).generations.get(failed_id)
    assert rebuilt is not None and rebuilt["status"] == "queued"
    assert rebuilt["request"] == before[1]["request"]  # type: ignore[index]


# --- darkroom generate ---------------------------------------------------------------------


@pytest.fixture
async def gateway(ctx: Context, token: str, aiohttp_server: Any, run_function: Any) -> str:
    """The gateway on a port, with notify behind it; made after the key (its cache)."""
    await run_function(load("notify"))
    server = await aiohttp_server(build_app(ctx))
    return f"http://{server.host}:{server.port}"


async def test_the_cli_submits_and_prints_the_job_id(
    ctx: Context, gateway: str, token: str, subprocess_env: dict[str, str]
) -> None:
    env = {**subprocess_env, "DARKROOM_URL": gateway, "DARKROOM_API_KEY": token}
    proc = await procs.start(["generate", "a red fox", "--size", "512x384", "--seed", "5"], env)
    assert await proc.wait(30) == 0, proc.output
    job_id = proc.lines[-1]
    stored = await ctx.store.get_json(subjects.request_key(job_id))
    assert (stored["prompt"], stored["width"], stored["height"], stored["seed"]) == (
        "a red fox",
        512,
        384,
        5,
    )

    bad = await procs.start(["generate", "a red fox", "--size", "1004x512", "--n", "99"], env)
    assert await bad.wait(30) == 2, bad.output
    assert "width must be a multiple of 8, got 1004" in bad.output
    assert "n must be between 1 and 4, got 99" in bad.output
    odd = await procs.start(["generate", "a red fox", "--size", "big"], env)
    assert await odd.wait(30) == 2 and "expected WIDTHxHEIGHT" in odd.output
    assert await ctx.store.list_keys(subjects.REQUESTS_PREFIX) == [subjects.request_key(job_id)]


async def test_the_cli_waits_for_the_outputs_or_the_reason(
    ctx: Context, gateway: str, token: str, subprocess_env: dict[str, str]
) -> None:
    env = {**subprocess_env, "DARKROOM_URL": gateway, "DARKROOM_API_KEY": token}
    args = ["generate", "a red fox", "--n", "2", "--wait"]
    async with procs.running(args, env) as proc:
        job_id = await eventually(lambda: proc.lines and proc.lines[0], what="the job id")
        for index in (0, 1):
            await publish(ctx, generated(job_id, index, 2))
        assert await proc.wait(30) == 0, proc.output
    assert proc.lines[-2:] == [f"{job_id}-0", f"{job_id}-1"], proc.output

    async with procs.running(["generate", "a blue fox", "--wait"], env) as proc:
        job_id = await eventually(lambda: proc.lines and proc.lines[0], what="the job id")
        await publish(ctx, ended(job_id, "failed", "out of memory"))
        assert await proc.wait(30) == 1, proc.output
    assert f"job {job_id} failed: out of memory" in proc.output
