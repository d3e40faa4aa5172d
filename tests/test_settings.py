"""Settings: TOML, then environment, then flags; errors say which key, what and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from bus.core.settings import ConfigError, load_settings, parse_s3_url
from bus.ops.cli import main


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("DARKROOM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "darkroom.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_embedded_stack_on_loopback() -> None:
    s = load_settings()
    assert s.embedded_nats and s.embedded_s3
    assert (s.gateway.host, s.gateway.port, s.namespace, s.profile) == (
        "127.0.0.1",
        8080,
        "darkroom",
        "auto",
    )


def test_precedence_is_flags_then_environment_then_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, '[gateway]\nport = 9000\nhost = "0.0.0.0"\n[s3]\nbucket = "from-file"\n')
    monkeypatch.setenv("DARKROOM_GATEWAY__PORT", "9100")
    monkeypatch.setenv("DARKROOM_FUNCTIONS__INGEST__CONCURRENCY", "3")
    s = load_settings(path, {"gateway": {"port": 9200, "host": None}})
    assert s.gateway.port == 9200 and s.gateway.host == "0.0.0.0" and s.s3.bucket == "from-file"
    assert s.function("ingest").concurrency == 3 and s.function("caption").concurrency is None
    assert load_settings(path).gateway.port == 9100


def test_darkroom_toml_in_the_working_directory_is_picked_up(tmp_path: Path) -> None:
    write(tmp_path, 'profile = "demo"\n')
    assert load_settings().profile == "demo"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            "[gateway]\nport = 99999\n",
            "gateway.port: Input should be less than or equal to 65535; got 99999",
        ),
        ('[gateway]\nport = "eighty"\n', "gateway.port: Input should be a valid integer"),
        ('profile = "turbo"\n', "profile: Input should be 'auto' or 'demo'; got 'turbo'"),
        (
            '[nats]\nurl = "http://nats:4222"\n',
            "nats.url: expected nats://host:port, got 'http://nats:4222'",
        ),
        ('[s3]\nbucket = "Bad_Bucket"\n', "s3.bucket: String should match pattern"),
        ("[gatway]\nport = 1\n", "gatway: Extra inputs are not permitted"),
        ('namespace = "Has-Caps"\n', "namespace: namespace must be 1-32 characters"),
    ],
)
def test_invalid_values_name_the_key_and_what_was_expected(
    tmp_path: Path, toml: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, toml))
    assert expected in str(err.value)
    assert str(tmp_path / "darkroom.toml") in str(err.value)


def test_bad_environment_values_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DARKROOM_S3__IO_THREADS", "lots")
    with pytest.raises(ConfigError, match=r"s3\.io_threads: Input should be a valid integer"):
        load_settings()


def test_broken_or_missing_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings(write(tmp_path, "[gateway\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_s3_urls_carry_credentials_and_bucket() -> None:
    assert parse_s3_url("https://AK:s%2Fk@minio.example:9000/photos") == {
        "endpoint": "https://minio.example:9000",
        "access_key": "AK",
        "secret_key": "s/k",
        "bucket": "photos",
    }
    with pytest.raises(ConfigError, match="--s3 expects"):
        parse_s3_url("minio:9000")


def test_the_cli_exits_2_with_the_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "[gateway]\nport = -5\n")
    assert main(["functions"]) == 2
    assert "gateway.port: Input should be greater than or equal to 0" in capsys.readouterr().err
    (tmp_path / "darkroom.toml").unlink()
    assert main(["worker", "ingest", "--s3", "ftp://x"]) == 2
    assert "--s3 expects" in capsys.readouterr().err
    assert (
        main(
            [
                "worker",
                "no-such-function",
                "--nats",
                "nats://127.0.0.1:1",
                "--s3",
                "http://a:b@127.0.0.1:1",
            ]
        )
        == 2
    )
    assert "no function named 'no-such-function'" in capsys.readouterr().err
