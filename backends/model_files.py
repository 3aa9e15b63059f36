"""Find what a model location holds (HF directory, GGUF file, OpenVINO IR) and load its tokenizer.

Every backend and the server's request parser share the tokenizer loaded here, so prompts are tokenized
once, the same way, whatever engine runs them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)


class ModelFilesError(Exception):
    """The model location is missing or holds nothing loadable."""


@dataclass(frozen=True)
class ModelFiles:
    kind: Literal["hf", "gguf", "openvino"]
    directory: Path
    gguf_file: str | None = None  # file name inside `directory`, for kind == "gguf"

    @property
    def path(self) -> Path:
        return self.directory / self.gguf_file if self.gguf_file else self.directory

    def hf_kwargs(self) -> dict[str, Any]:
        """Arguments transformers' from_pretrained needs besides the directory."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _check_readable(path: Path) -> None:
    """Say which files this uid cannot read; transformers would report a readable-by-root file as missing."""
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        raise ModelFilesError(f"model directory {path} is not readable by uid {os.getuid()}")
    entries = sorted(path.iterdir()) if path.is_dir() else [path]
    unreadable = [p for p in entries if p.is_file() and not os.access(p, os.R_OK)]
    if unreadable:
        modes = ", ".join(f"{p.name} (mode {p.stat().st_mode & 0o777:04o}, owner uid {p.stat().st_uid})" for p in unreadable)
        raise ModelFilesError(
            f"{path}: not readable by uid {os.getuid()}: {modes}; make the model files world-readable (chmod -R a+rX)"
        )


def locate_model(location: str) -> ModelFiles:
    """Classify a local model location; raise ModelFilesError saying what was expected."""
    path = Path(location).expanduser()
    if path.exists():
        _check_readable(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelFiles("gguf", path.parent, path.name)
        raise ModelFilesError(f"model file {path} is not a .gguf file; expected a .gguf file or a model directory")
    if not path.is_dir():
        raise ModelFilesError(
            f"model location {location!r} does not exist; expected a local HF model directory, a .gguf file, "
            "an OpenVINO IR directory or an s3:// URI"
        )
    # IR first: optimum's exports also carry config.json.
    if (path / "openvino_model.xml").is_file():
        return ModelFiles("openvino", path)
    if (path / "config.json").is_file():
        return ModelFiles("hf", path)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelFiles("gguf", path, ggufs[0])
    if len(ggufs) > 1:
        raise ModelFilesError(f"{path} holds several .gguf files ({', '.join(ggufs)}); set option.model_id to one of them")
    raise ModelFilesError(
        f"{path} holds no model: expected config.json (HF format), a .gguf file or openvino_model.xml"
    )


def load_tokenizer(files: ModelFiles, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The HF tokenizer for the model (also for GGUF: transformers converts the embedded vocabulary)."""
    from transformers import AutoTokenizer

    log.info("loading tokenizer from %s", files.path)
    tokenizer = AutoTokenizer.from_pretrained(
        str(files.directory), trust_remote_code=trust_remote_code, revision=revision, **files.hf_kwargs()
    )
    return tokenizer


def model_max_length(files: ModelFiles, trust_remote_code: bool = False) -> int | None:
    """The model's own context length from its config, if it states one."""
    if files.kind == "openvino":
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        str(files.directory), trust_remote_code=trust_remote_code, **files.hf_kwargs()
    )
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
