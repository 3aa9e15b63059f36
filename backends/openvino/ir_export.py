"""HF directory -> OpenVINO IR with optimum-intel, exported once and cached under the cache directory."""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
from pathlib import Path

from filelock import FileLock

from llm_endpoint.backends.config import ConfigError

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("int8", "int4", "fp16", "fp32")  # optimum-cli --weight-format


def ir_cache_dir(source: Path, weight_format: str, cache_dir: Path) -> Path:
    """Where the IR of `source` lives: keyed by its path, its files' mtimes and the weight format."""
    stamp = [str(source.resolve()), weight_format]
    stamp += [f"{p.name}:{p.stat().st_mtime_ns}" for p in sorted(source.iterdir()) if p.is_file()]
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    return cache_dir / "openvino-ir" / f"{source.name}-{weight_format}-{digest}"


def convert_to_ir(source: Path, weight_format: str, cache_dir: Path, optimum_cli: str | None) -> Path:
    """Export an HF directory with optimum-intel, once; later loads reuse the cached IR.

    optimum-intel pins transformers<5.6, so it lives in its own environment (`optimum_cli`: its optimum-cli).
    """
    target = ir_cache_dir(source, weight_format, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "openvino_model.xml").is_file():
            _export(source, weight_format, target, optimum_cli)
    log.info("OpenVINO IR of %s: %s", source, target)
    return target


def _export(source: Path, weight_format: str, target: Path, cli: str | None) -> None:
    if not cli:
        raise ConfigError(
            f"{source} is an HF directory and OpenVINO needs IR: install optimum-intel in its own environment "
            "and set LLM_ENDPOINT_OPTIMUM_CLI to its optimum-cli, or serve a .gguf file or an IR directory"
        )
    work = target.with_name(target.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    command = [cli, "export", "openvino", "--model", str(source), "--task", "text-generation-with-past",
               "--weight-format", weight_format, str(work)]
    log.info("converting %s to OpenVINO IR: %s", source, " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not (work / "openvino_model.xml").is_file():
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError(f"optimum-cli export failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    work.rename(target)
