"""Pure units: the envelope, names, filenames, sniffing, the read-model fold, version checks."""

from __future__ import annotations

import contextlib
import itertools
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus.core import subjects
from bus.core.contract import Spec
from bus.core.envelope import EnvelopeError, Event, ObjectRef, decode, derive_id, now_iso
from bus.images.media import safe_name, sniff
from bus.infra.nats_conn import NatsUnavailableError, check_jetstream
from bus.runtime.streams import duplicate_window
from tests.support.images import jpeg, png


def test_events_round_trip() -> None:
    event = Event(
        id="e1",
        type="uploaded",
        source="darkroom/gateway",
        time=now_iso(),
        subject="img",
        object=ObjectRef("b", "uploads/img/a.jpg", 10, "etag", "image/jpeg"),
        image_id="img",
        data={"name": "a.jpg"},
    )
    assert decode(event.encode()) == event


@given(st.binary(max_size=200))
def test_decode_never_crashes_on_garbage(payload: bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        decode(payload)


def test_derived_ids_are_stable_and_distinct() -> None:
    assert derive_id("a", "ingest", "ingested") == derive_id("a", "ingest", "ingested")
    ids = {
        derive_id(p, s, t, i)
        for p, s, t, i in itertools.product("ab", ("ingest", "caption"), ("x", "y"), (0, 1))
    }
    assert len(ids) == 16


def test_names_keep_namespaces_apart() -> None:
    names = subjects.Names("t1")
    assert names.subject("uploaded") == "t1.uploaded" and names.stream == "T1"
    assert names.durable("ingest") == "t1_ingest" and names.dlq_stream == "T1_DLQ"
    assert not names.progress("job").startswith(names.all_events[:-1])
    assert not names.dead_letter("ingest").startswith(names.all_events[:-1])
    with pytest.raises(ValueError, match="namespace must be"):
        subjects.Names("Bad.Name")
    assert subjects.image_id_from_key("uploads/abc/x.jpg", subjects.UPLOADS_PREFIX) == "abc"
    assert subjects.image_id_from_key("images/abc/thumb.webp", subjects.UPLOADS_PREFIX) is None
    assert subjects.image_id_from_key("uploads/../x.jpg/y", subjects.UPLOADS_PREFIX) is None
    assert subjects.image_id_from_key("incoming/abc/x.jpg", subjects.INCOMING_PREFIX) == "abc"


@pytest.mark.parametrize(
    ("given_name", "expected"),
    [
        ("holiday.JPG", "holiday.jpg"),
        ("../../etc/passwd", "passwd.jpg"),
        ("C:\\Users\\me\\café photo.jpeg", "cafe_photo.jpg"),
        ("\x00\x1b[31mred", "31mred.jpg"),
        ("", "image.jpg"),
        ("a" * 500 + ".jpg", "a" * 116 + ".jpg"),
    ],
)
def test_file_names_are_made_safe(given_name: str, expected: str) -> None:
    assert safe_name(given_name, "jpg") == expected


def test_types_are_sniffed_from_bytes() -> None:
    assert sniff(jpeg()[:32]).name == "JPEG"  # type: ignore[union-attr]
    assert sniff(png()[:32]).name == "PNG"  # type: ignore[union-attr]
    assert sniff(b"GIF89a" + b"\0" * 10).name == "GIF"  # type: ignore[union-attr]
    assert sniff(b"RIFF\0\0\0\0WEBPVP8 ").name == "WebP"  # type: ignore[union-attr]
    assert sniff(b"<html>not an image</html>") is None


def test_duplicate_window_covers_the_longest_redelivery_gap() -> None:
    slow = Spec("slow", listens=("a",), ack_wait=600, max_deliver=5)
    assert duplicate_window([slow]) >= 600 * 5
    assert duplicate_window([]) == 120


class FakeJetStream:
    def __init__(self, level: int | None) -> None:
        self._nc = SimpleNamespace(connected_server_version="2.10.22")
        self.level = level

    async def account_info(self) -> Any:
        return SimpleNamespace(api=SimpleNamespace(level=self.level))


async def test_old_servers_are_refused_naming_the_version() -> None:
    with pytest.raises(
        NatsUnavailableError, match=r"API level 0 \(server 2.10.22\).*nats-server 2.12"
    ):
        await check_jetstream(FakeJetStream(None), ["nats://old:4222"])  # type: ignore[arg-type]
    with pytest.raises(NatsUnavailableError, match=r"API level 1 .*prioritized consumers"):
        await check_jetstream(FakeJetStream(1), ["nats://2.11:4222"])  # type: ignore[arg-type]
    await check_jetstream(FakeJetStream(2), ["nats://new:4222"])  # type: ignore[arg-type]


async def test_notify_ignores_its_own_failures() -> None:
    from functions.notify.handler import handle

    own = Event(id="f", type="failed.notify", source="t", time=now_iso(), image_id="img", data={})
    assert await handle(own, None, None) == []  # type: ignore[arg-type]  # touches nothing


def test_records_with_odd_shapes_are_skipped_not_crashed() -> None:
    from bus.intake.s3events import created_uploads

    def created(bucket: Any, obj: Any) -> dict[str, Any]:
        return {"eventName": "s3:ObjectCreated:Put", "s3": {"bucket": bucket, "object": obj}}

    odd = [
        "text",
        created("b", {"key": "incoming/x/a.jpg"}),
        created({"name": "b"}, "nope"),
        created({"name": "b"}, {"key": "incoming/x/..%2F..%2Fevil.jpg"}),  # not an upload key
        created({"name": "b"}, {"key": "uploads/y/a.jpg"}),  # only the intake writes there
        created({"name": "other"}, {"key": "incoming/z/a.jpg"}),  # another bucket
        created({"name": "b"}, {"key": "incoming/ok/ev%1Bil%0Aname.JPG"}),
        created({"name": "b"}, {"key": "incoming/ok/ev%1Bil%0Aname.JPG"}),  # twice: once
    ]
    assert created_uploads(odd, "b") == ["ok"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pa/ss@db:5432/x", "postgresql://u:***@db:5432/x"),
        (
            "postgresql://u:p@s#s?@db/x?password=zz&sslmode=require",
            "postgresql://u:***@db/x?password=***&sslmode=require",
        ),
        ("postgresql://u:pw@[::1]:5432/x", "postgresql://u:***@[::1]:5432/x"),
        ("postgresql://u@db/x", "postgresql://u@db/x"),
        ("nats://n1:4222", "nats://n1:4222"),
    ],
)
def test_passwords_in_urls_are_hidden_whatever_their_characters(url: str, shown: str) -> None:
    from bus.core.redact import redact_text, redact_url

    assert redact_url(url) == shown
    assert redact_text(f"could not reach {url} in time") == f"could not reach {shown} in time"


def test_a_bad_database_url_is_reported_without_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bus.core.settings import ConfigError, load_settings

    monkeypatch.setenv("DARKROOM_POSTGRES__URL", "mysql://u:topsecret@db/x")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "postgres.url: expected postgresql://" in str(err.value)
    assert "topsecret" not in str(err.value)


def test_a_lost_password_file_beside_an_existing_cluster_is_explained(tmp_path: Any) -> None:
    from bus.ops.embedded import ChildError
    from bus.ops.pgserver import PostgresServer

    (tmp_path / "postgres").mkdir()
    (tmp_path / "postgres" / "PG_VERSION").write_text("18\n")
    with pytest.raises(ChildError, match=r"postgres\.json is missing but the cluster"):
        PostgresServer(tmp_path, port=0)
