"""Checking a generation request: what is refused before the queue, and how a job is
sized and recorded (pure units: no servers)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from PIL import Image

from bus import Event
from bus.core.envelope import ObjectRef
from bus.core.generation import GenerationError, InitImage, Job, check_request
from bus.core.settings import GenerateModel, GenerateSettings, Settings
from bus.state.generations import JobState
from functions.generate.handler import _sized_for
from functions.generate.state import GenerateState
from functions.ingest.handler import _lineage

AN_IMAGE = InitImage("images/a/display.webp", "a")


def check(values: dict[str, Any], settings: GenerateSettings | None = None, **kw: Any) -> Job:
    return check_request(
        values,
        settings or GenerateSettings(),
        job_id="j1",
        created="2026-01-01T00:00:00Z",
        seed=1,
        **kw,
    )


def problems(values: dict[str, Any], settings: GenerateSettings | None = None, **kw: Any) -> str:
    with pytest.raises(GenerationError) as caught:
        check(values, settings, **kw)
    return str(caught.value)


def test_a_job_that_cannot_run_on_the_default_models_is_refused_before_the_queue() -> None:
    # 2 steps at strength 0.3 are no denoising step at all: refused at the gateway.
    said = problems({"prompt": "x", "mode": "enhance", "steps": 2}, init=AN_IMAGE)
    assert said == "steps x strength must be at least 1 (one denoising step), got 2 x 0.3"
    # Left to the model, the steps become the fewest that make one.
    job = check({"prompt": "x", "mode": "enhance"}, init=AN_IMAGE)
    ran = job.resolved(GenerateSettings(), "sd-turbo")
    assert ran.steps == 4 and ran.strength == 0.3
    assert job.resolved(GenerateSettings(), "animagine-xl").steps == 28
    # What only the model's defaults decide is checked for each model the job may run on:
    # on a CPU host "the default" may be sd-turbo.
    tight = GenerateSettings(max_pixels=600 * 600)
    said = problems({"prompt": "x", "height": 512}, tight)
    assert said == (
        "with model dreamshaper-xl-lightning: width x height must be at most 360,000 pixels, "
        "got 1024x512 = 524,288"
    )
    assert check({"prompt": "x", "height": 512, "model": "sd-turbo"}, tight).model == "sd-turbo"


def test_sides_follow_the_models_multiple() -> None:
    said = problems({"prompt": "x", "model": "z-image-turbo", "width": 1000, "height": 1024})
    assert said == "width must be a multiple of 16 for z-image-turbo, got 1000"
    assert check({"prompt": "x", "model": "animagine-xl", "width": 1000}).width == 1000
    said = problems({"prompt": "x", "width": 1004})
    assert said.startswith("width must be a multiple of 8, got 1004")


@pytest.mark.parametrize("text", ["a fox\x00 in snow", "bell\x07", "esc\x1b[0m"])
def test_control_characters_in_a_prompt_are_refused(text: str) -> None:
    said = problems({"prompt": text})
    assert "prompt must not contain control characters, got U+" in said
    said = problems({"prompt": "fine", "negative_prompt": text})
    assert said.startswith("negative_prompt must not contain control characters")
    assert check({"prompt": "two lines\nand a\ttab"}).prompt == "two lines\nand a\ttab"


def test_a_schedulers_name_in_settings_is_checked_when_they_load() -> None:
    with pytest.raises(ValueError, match="scheduler must be one of"):
        GenerateModel(source="x/y", scheduler="euler-typo")


def test_a_stored_job_may_start_only_from_its_images_own_objects() -> None:
    settings = GenerateSettings()
    job = check({"prompt": "x", "mode": "img2img"}, settings, init=AN_IMAGE)
    doc = job.to_doc()
    assert Job.from_doc(doc, settings) == job
    for key, image_id in [
        ("uploads/b/secret.jpg", "a"),  # another image's original
        ("images/ab/display.webp", "a"),  # an image whose id starts the same
        ("requests/other/init.png", None),  # another job's
    ]:
        bad = {**doc, "init": {"key": key, "image_id": image_id}}
        with pytest.raises(GenerationError, match=r"init\.key must be the image's own object"):
            Job.from_doc(bad, settings)
    own = {**doc, "init": {"key": "requests/j1/init.png", "image_id": None}}
    assert Job.from_doc(own, settings).init == InitImage("requests/j1/init.png")


def test_the_longest_prompts_allowed_fit_in_an_outputs_lineage() -> None:
    settings = GenerateSettings(max_prompt_chars=4000)
    widest = "\U0001f98a" * 4000  # 4 bytes each in UTF-8
    job = check({"prompt": widest, "negative_prompt": widest}, settings)
    lineage = {"job_id": job.id, "prompt": job.prompt, "negative_prompt": job.negative_prompt}
    event = Event(id="e", type="generated", source="t", time="t", data={"lineage": lineage})
    assert _lineage(event) == lineage
    with pytest.raises(ValueError, match="less than or equal to 4000"):
        GenerateSettings(max_prompt_chars=4001)


@pytest.mark.parametrize(
    ("values", "size", "expected"),
    [
        ({"width": 512}, (1000, 500), (512, 256)),  # one side given: the image's aspect
        ({"height": 296}, (1000, 500), (592, 296)),
        ({}, (1000, 750), (1176, 880)),  # none: the aspect at the model's area (1024^2)
        ({"model": "z-image-turbo"}, (1000, 750), (1168, 880)),  # in multiples of 16
        ({"mode": "enhance"}, (600, 400), (1200, 800)),  # enhance: 2x the image
    ],
)
def test_an_image_jobs_size_follows_its_image(
    values: dict[str, Any], size: tuple[int, int], expected: tuple[int, int]
) -> None:
    settings = Settings()
    values = {"prompt": "x", "mode": "img2img", **values}
    job = check(values, settings.generate, init=AN_IMAGE)
    state = GenerateState(settings=settings, default_model=settings.generate.default_model)
    sized = _sized_for(job, Image.new("RGB", size), settings.generate, state)
    assert (sized.width, sized.height) == expected


def test_the_job_document_shows_the_parameters_that_ran() -> None:
    settings = GenerateSettings()
    job = check({"prompt": "x"}, settings)
    ran = job.resolved(settings, "sd-turbo")
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    state = JobState("j1", moment, moment)
    state.requested(job.to_doc(), 1, moment)
    output = Event(
        id="g",
        type="generated",
        source="t",
        time="2026-01-01T00:00:01Z",
        image_id="j1-0",
        job_id="j1",
        object=ObjectRef("b", "generated/j1/0.png"),
        data={"index": 0, "n": 1, "params": ran.to_doc(), "model": {"name": "sd-turbo"}},
    )
    state.apply(output, 2, moment)
    doc = state.document()
    assert doc["request"]["steps"] is None  # the request left it to the model
    assert doc["parameters"]["steps"] == 2 and doc["parameters"]["width"] == 512
    assert "params" not in doc["outputs"][0]
