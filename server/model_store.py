"""Where the model lives: s3:// model locations are copied to local disk before any engine loads them.

LMI accepts `option.model_id` / `HF_MODEL_ID` as a local path, a hub id or an `s3://` prefix. Engines
only read local files (hub ids they resolve themselves), so an S3 location is downloaded once at start-up.
boto3 finds credentials, region and endpoint the usual way, including `AWS_ENDPOINT_URL` and
`AWS_ENDPOINT_URL_S3` (botocore >= 1.31), which is how tests point it at a local S3.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Any

log = logging.getLogger("server.model_store")

# Seconds between progress lines while one large file downloads (multi-GB shards take minutes).
PROGRESS_INTERVAL_S = 15.0


class ModelLocationError(Exception):
    """The model location cannot be used; the message is one line naming the location and what went wrong."""


def _split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ModelLocationError(f"cannot download model from {uri}: no bucket in the URI")
    return bucket, prefix.rstrip("/")


def _list_objects(client: Any, bucket: str, prefix: str) -> list[tuple[str, int]]:
    """(key, size) of the object named `prefix` itself or everything under `prefix/`; folder markers skipped."""
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            under = not prefix or key == prefix or key.startswith(prefix + "/")
            if under and not key.endswith("/"):
                found.append((key, obj["Size"]))
    return found


def _local_name(key: str, prefix: str) -> PurePosixPath:
    """Path of `key` relative to the download directory; refuses keys that would escape it."""
    relative = PurePosixPath(key).name if key == prefix else key[len(prefix) :].lstrip("/")
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(f"object key {key!r} does not map to a file inside the download directory")
    return path


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class _Progress:
    """download_file callback, called from s3transfer's worker threads with byte counts."""

    def __init__(self, name: str, size: int) -> None:
        self._name, self._size, self._done = name, size, 0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, amount: int) -> None:
        with self._lock:
            self._done += amount
            now = time.monotonic()
            if now - self._last < PROGRESS_INTERVAL_S or self._done >= self._size:
                return
            self._last = now
            percent = 100 * self._done / self._size
            log.info("    %s: %s of %s (%.0f%%)", self._name, _size(self._done), _size(self._size), percent)


def _describe(exc: Exception) -> str:
    """One line a person can act on, for the boto3 failures start-up actually meets."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or an IAM role)"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "?"), error.get("Message", "")
        if code == "NoSuchBucket":
            return f"bucket does not exist ({message or code})"
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"access denied ({code}: {message}); check the credentials and the bucket policy"
        return f"{code}: {message}"
    return f"{type(exc).__name__}: {exc}"


def _fetch_all(client: Any, bucket: str, files: list[tuple[str, int, Path]], uri: str) -> None:
    """Download (key, size, target) triples, keeping targets that already have the right size.

    Keeping them makes a restarted container skip the download; the temporary name plus rename means an
    interrupted download never leaves a file that looks complete.
    """
    count, total = len(files), sum(size for _, size, _ in files)
    log.info("downloading %s: %d files, %s", uri, count, _size(total))
    started, fetched, kept = time.monotonic(), 0, 0
    for index, (key, size, target) in enumerate(files, 1):
        if target.is_file() and target.stat().st_size == size:
            kept += 1
            log.info("[%d/%d] %s (%s) already present", index, count, target, _size(size))
            continue
        log.info("[%d/%d] %s (%s)", index, count, target, _size(size))
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        client.download_file(bucket, key, str(partial), Callback=_Progress(target.name, size))
        partial.replace(target)
        fetched += size
    elapsed = time.monotonic() - started
    log.info("downloaded %s: %s in %.1fs; %d of %d files kept from before", uri, _size(fetched), elapsed, kept, count)


def download_s3(uri: str, dest: Path) -> Path:
    """Copy the object or prefix `uri` into `dest`; returns the local path to load (a file for one object)."""
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError as exc:
        missing = "boto3 is missing; install llm-endpoint[s3]"
        raise ModelLocationError(f"cannot download model from {uri}: {missing}") from exc

    bucket, prefix = _split_s3_uri(uri)
    try:
        client = boto3.session.Session().client("s3")  # a fresh session reads the environment as it is now
        objects = _list_objects(client, bucket, prefix)
        if not objects:
            raise ModelLocationError(f"cannot download model from {uri}: no objects under this location")
        files = [(key, size, dest / _local_name(key, prefix)) for key, size in objects]
        _fetch_all(client, bucket, files, uri)
    except (BotoCoreError, ClientError, OSError, ValueError) as exc:
        raise ModelLocationError(f"cannot download model from {uri}: {_describe(exc)}") from exc
    single_object = [key for key, _, _ in files] == [prefix]
    return files[0][2] if single_object else dest


def _cache_name(uri: str) -> str:
    """Readable and collision-free: `s3://b/a/b` and `s3://b/a_b` must not share a directory."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.removeprefix("s3://").strip("/"))[:100]
    return f"{readable}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}"


def resolve_model_location(model_id: str, cache_dir: Path) -> str:
    """A path engines can load: s3:// locations are downloaded under `cache_dir`; anything else is returned as is."""
    if not model_id.startswith("s3://"):
        return model_id
    return str(download_s3(model_id, cache_dir / _cache_name(model_id.rstrip("/"))))
