"""Load a causal LM with transformers for our engine, on the requested device and dtype."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from llm_endpoint.backends.model_files import ModelFiles
from llm_endpoint.backends.torch_engine import attention

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("option.device=cuda but no CUDA device is available")
    return torch.device(device)


def _cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run in hardware (elsewhere oneDNN emulates them, slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPU and on CPUs with native bf16 (on the 2-core AVX-512 BF16 VM our engine decodes
    ~1.4x faster than in fp32, README Performance), else fp32. Output equal to transformers' own token
    for token is a property of fp32: ask for `option.dtype=fp32` for that."""
    if dtype == "auto":
        native_bf16 = device.type == "cuda" or (device.type == "cpu" and _cpu_has_native_bf16())
        return torch.bfloat16 if native_bf16 else torch.float32
    return _DTYPES[dtype]


def load_causal_lm(
    files: ModelFiles, *, dtype: str, device: str, trust_remote_code: bool = False, revision: str | None = None
) -> Any:
    from transformers import AutoModelForCausalLM

    target = resolve_device(device)
    if target.type == "cpu":
        # All cores by default; on a machine shared with busy processes set OMP_NUM_THREADS below the core
        # count: torch's threads wait for each other at every operator, so one descheduled thread stalls all.
        log.info("torch uses %d compute thread(s) (OMP_NUM_THREADS)", torch.get_num_threads())
    torch_dtype = resolve_dtype(dtype, target)
    log.info("loading model weights from %s (%s, %s on %s)", files.path, files.kind, torch_dtype, target)
    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(
        str(files.directory),
        dtype=torch_dtype,
        attn_implementation=attention.NAME,
        trust_remote_code=trust_remote_code,
        revision=revision,
        **files.hf_kwargs(),
    )
    # transformers types its `to` wrapper as unbound (the call is right; its annotation is not).
    model = model.to(target).eval()  # type: ignore[arg-type]
    params = sum(p.numel() for p in model.parameters())
    log.info("model loaded in %.1f s: %s, %.1fM parameters", time.monotonic() - started,
             type(model).__name__, params / 1e6)
    return model
