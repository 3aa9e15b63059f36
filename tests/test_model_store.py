"""s3:// model locations, downloaded by real boto3 from moto's S3 running as an HTTP server on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from llm_endpoint.server import model_store
from llm_endpoint.server.model_store import ModelLocationError, download_s3, resolve_model_location

BUCKET = "models-bucket"
MODEL = {
    "config.json": b'{"model_type": "llama"}',
    "serving.properties": b"option.dtype=fp32\n",
    "tokenizer/tokenizer.json": '{"vocab": "é世😀"}'.encode(),
    "weights/shard/model-00001.safetensors": os.urandom(300 * 1024),
    "weights/shard/model-00002.safetensors": b"",
}


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Fake credentials, S3 pointed at moto through the environment only (as the container would be)."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")).close()
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    # Keep boto3 away from the host's config files and the instance-metadata address.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    client = boto3.session.Session().client("s3")
    client.create_bucket(Bucket=BUCKET)
    for name, data in MODEL.items():
        client.put_object(Bucket=BUCKET, Key=f"models/tiny/{name}", Body=data)
    client.put_object(Bucket=BUCKET, Key="models/tiny/empty-folder/", Body=b"")  # console-style folder marker
    client.put_object(Bucket=BUCKET, Key="models/tiny-other/config.json", Body=b"not this model")
    return client


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prefix_download_matches_bytes_and_restart_is_idempotent(
    s3, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.model_store")
    local = Path(resolve_model_location(f"s3://{BUCKET}/models/tiny/", tmp_path / "cache"))
    assert local.parent == tmp_path / "cache"
    assert tree(local) == MODEL
    assert any("5 files" in r.getMessage() for r in caplog.records)

    caplog.clear()
    stamps = {p: p.stat().st_mtime_ns for p in local.rglob("*") if p.is_file()}
    # Same location spelled without the trailing slash: same cache directory, nothing downloaded.
    assert Path(resolve_model_location(f"s3://{BUCKET}/models/tiny", tmp_path / "cache")) == local
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert sum(r.getMessage().endswith("already present") for r in caplog.records) == len(MODEL)

    (local / "config.json").write_bytes(b"truncated")  # a size mismatch is fetched again
    download_s3(f"s3://{BUCKET}/models/tiny", local)
    assert tree(local) == MODEL


def test_large_files_report_progress_while_downloading(
    s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(model_store, "PROGRESS_INTERVAL_S", 0.0)
    caplog.set_level(logging.INFO, logger="server.model_store")
    download_s3(f"s3://{BUCKET}/models/tiny/weights/shard/model-00001.safetensors", tmp_path / "m")
    progress = [r.getMessage() for r in caplog.records if "%)" in r.getMessage()]
    assert progress and all("model-00001.safetensors" in line and "of 300.0 KiB" in line for line in progress)


def test_single_object_returns_the_file(s3, tmp_path: Path) -> None:
    s3.put_object(Bucket=BUCKET, Key="gguf/SmolLM2.Q4_1.gguf", Body=b"GGUF fake")
    path = download_s3(f"s3://{BUCKET}/gguf/SmolLM2.Q4_1.gguf", tmp_path / "m")
    assert path == tmp_path / "m" / "SmolLM2.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF fake"


def test_missing_bucket_is_one_clear_line(s3, tmp_path: Path) -> None:
    with pytest.raises(ModelLocationError) as info:
        download_s3("s3://no-such-bucket/model/", tmp_path / "m")
    message = str(info.value)
    assert "s3://no-such-bucket/model/" in message and "bucket does not exist" in message
    assert "\n" not in message


def test_empty_prefix_is_an_error(s3, tmp_path: Path) -> None:
    with pytest.raises(ModelLocationError, match=r"s3://models-bucket/models/nothing-here: no objects"):
        download_s3(f"s3://{BUCKET}/models/nothing-here", tmp_path / "m")


def test_missing_credentials_are_named(s3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ModelLocationError, match=r"s3://models-bucket/models/tiny: no AWS credentials"):
        download_s3(f"s3://{BUCKET}/models/tiny", tmp_path / "m")


def test_keys_cannot_escape_the_download_directory(s3, tmp_path: Path) -> None:
    s3.put_object(Bucket=BUCKET, Key="evil/../../outside.txt", Body=b"x")
    with pytest.raises(ModelLocationError, match="does not map to a file inside"):
        download_s3(f"s3://{BUCKET}/evil", tmp_path / "m")
    assert not (tmp_path / "outside.txt").exists()


@pytest.mark.parametrize("model_id", ["/opt/ml/model", "HuggingFaceTB/SmolLM2-135M-Instruct", "model.gguf"])
def test_non_s3_locations_pass_through(model_id: str, tmp_path: Path) -> None:
    assert resolve_model_location(model_id, tmp_path) == model_id
    assert not any(tmp_path.iterdir())
