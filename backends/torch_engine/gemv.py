"""A one-row bf16 linear layer (y = x W^T + b for a single row x), built for the CPU at first use: the
matrix-vector product a lone stream's decode step is made of.

Why our own: at one row the product reads each weight once and does two flops per weight, so it is bound by
memory bandwidth, and oneDNN (even with the weight packed once, `linear.PackedLinear`) streams the demo
model's small matrices (0.7-3.5 MB, 120 calls a step) at ~75-85% of the bandwidth a plain loop gets, with a
fixed cost per call that small matrices feel most (on a 2-core AMD EPYC Zen 5, in one process: all 30
layers' four projections in 9.75 ms with oneDNN against 8.33 ms here, 1.17x). This kernel walks the weight
rows in order, four at a time against the one input row, with AVX-512 BF16 dot products accumulating in fp32,
and rounds each output once (plus the bias, in fp32), as oneDNN does; only the order of the additions
differs. oneDNN stays faster on the one large matrix, the LM head (1.71 against 1.98 ms), and from two rows
on, where its blocked kernels reuse each weight load (a multi-row variant of this loop ran at 0.74-0.83x
oneDNN at 4 to 32 rows), so this serves the compiled step's one-row projections only.

It is built once per machine with torch's C++ extension loader (a C++ compiler and ninja; ~30-60 s, cached
in torch's extension directory, rebuilt when the source changes) and registered as the operator
`llm_endpoint::bf16_gemv`, so `torch.compile` graphs call it like any ATen op. Where it cannot run (no
compiler or ninja, a CPU without AVX-512 BF16, another dtype or device) `available()` says so and callers
keep `F.linear`; the CPU check runs in portable code before any AVX-512 instruction can.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

log = logging.getLogger(__name__)

NO_AVX512_BF16 = "this CPU lacks AVX-512 BF16"

_SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#define KERNEL __attribute__((target("avx512f,avx512bw,avx512bf16")))

namespace {

// ROWS weight rows against the input row: each 32-wide slice of x is loaded once for all of them.
template <int ROWS>
KERNEL void dot_rows(const uint16_t* x, const uint16_t* w, int64_t k, const float* bias, uint16_t* y) {
  __m512 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i);
    for (int r = 0; r < ROWS; ++r)
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + r * k + i), xv);
  }
  if (i < k) {  // the tail of a row whose width is not a multiple of 32: masked loads read zeros past it
    __mmask32 tail = (__mmask32)((1ull << (k - i)) - 1);
    __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + i);
    for (int r = 0; r < ROWS; ++r)
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(tail, w + r * k + i), xv);
  }
  for (int r = 0; r < ROWS; ++r) {
    float sum = _mm512_reduce_add_ps(acc[r]) + (bias ? bias[r] : 0.0f);
    y[r] = c10::BFloat16(sum).x;  // rounded to nearest even, once
  }
}

KERNEL void rows_between(const uint16_t* x, const uint16_t* w, int64_t k, const float* bias, uint16_t* y,
                         int64_t begin, int64_t end) {
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) dot_rows<4>(x, w + n * k, k, bias ? bias + n : nullptr, y + n);
  for (; n < end; ++n) dot_rows<1>(x, w + n * k, k, bias ? bias + n : nullptr, y + n);
}

bool supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(supported(), "bf16_gemv needs a CPU with AVX-512 BF16");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1, "bf16_gemv takes one row, [1, in]; got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "bf16_gemv: weight ", weight.sizes(),
              " does not take rows of ", x.size(1));
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "bf16_gemv is bf16 only");
  const int64_t n = weight.size(0), k = weight.size(1);
  at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor b32;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n, "bf16_gemv: bias of ", bias->numel(), " for ", n, " outputs");
    b32 = bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({1, n}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  // the threads take contiguous runs of weight rows (a multiple of 4), so each streams its own part in order
  at::parallel_for(0, (n + 3) / 4, 16, [&](int64_t begin, int64_t end) {
    rows_between(xp, wp, k, bp, yp, begin * 4, std::min(n, end * 4));
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(llm_endpoint, m) {
  m.def("bf16_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("bf16_gemv_supported() -> bool", supported);  // no tensor to dispatch on: one kernel for all keys
}

TORCH_LIBRARY_IMPL(llm_endpoint, CPU, m) { m.impl("bf16_gemv", bf16_gemv); }
"""


@functools.cache
def unavailable_reason() -> str | None:
    """Why the kernel cannot run here (None: it is built, loaded and the CPU has the instructions); builds it
    on the first call."""
    started = time.monotonic()
    reason: str | None
    try:
        from torch.utils import cpp_extension

        cpp_extension.load_inline(name="llm_endpoint_gemv", cpp_sources=_SOURCE, is_python_module=False,
                                  # -fopenmp: at::parallel_for is inline code, serial without it
                                  extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler or ninja, or a build failure: F.linear serves instead
        last_line = (str(exc).strip().splitlines() or [""])[-1][:200]
        reason = f"could not build it ({type(exc).__name__}: {last_line})"
    else:
        reason = None if torch.ops.llm_endpoint.bf16_gemv_supported() else NO_AVX512_BF16
    if reason:
        log.info("one-row bf16 kernel unavailable (%s); oneDNN serves one-row products", reason)
        return reason
    torch.library.register_fake("llm_endpoint::bf16_gemv")(_fake)
    log.info("one-row bf16 kernel ready (built or loaded in %.1f s)", time.monotonic() - started)
    return None


def available(weight: torch.Tensor) -> bool:
    """Whether `bf16_gemv` serves one-row products with this weight (building the kernel on first use)."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        return False
    return unavailable_reason() is None


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, in] @ weight[out, in]^T (+ bias) -> [1, out], bf16; only where `available(weight)`."""
    return torch.ops.llm_endpoint.bf16_gemv(x, weight, bias)


def _fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))
