"""Linear layers with the weight packed once for oneDNN, where that is exact.

`F.linear` on a bf16 CPU weight lets oneDNN reorder the weight into its blocked layout on every call; at
decode batch sizes that reorder costs as much as the product. Packing once at load time halves the
matmul time of a decode step (measured on the demo model: the 49152x576 head 4.3 ms -> 1.2 ms at one row)
and gives bit-identical results, which we check on the real weight before relying on it. fp32 packing is
not bit-identical to `F.linear`, and fp32 is the mode that must equal transformers exactly, so fp32 (and
any device or build without the op) keeps `F.linear`.

oneDNN builds, and caches (up to 1024 entries), one primitive per input row count. A step's row count is
its decode rows plus its prefill chunk, anything from 1 to hundreds, so a long-running server met ever new
counts and its memory crept up by ~375 KiB per count (AMX kernels; 75 of the 90 MiB a 30-turn session grew,
heaptrack). Beyond 16 rows, inputs are padded with zero rows to one of a few sizes (`padded_rows`), which
keeps the results of the real rows bit-identical and costs at most an eighth more rows.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


EXACT_ROWS = 16  # decode batches: weight-bandwidth-bound, each size kept exactly


def padded_rows(rows: int) -> int:
    """The row count oneDNN sees for `rows`: exact up to EXACT_ROWS, then rounded up to a multiple of an
    eighth of rows' power of two (at least EXACT_ROWS): 47 sizes cover 1 to 1024."""
    if rows <= EXACT_ROWS:
        return rows
    step = max(EXACT_ROWS, 1 << (rows.bit_length() - 4))
    return -(-rows // step) * step


def _packing_available(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear:
    """y = x W^T + b for x [rows, in]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.bias = bias
        self.weight: torch.Tensor | None = weight
        self._packed: torch.Tensor | None = None
        if _packing_available(weight):
            self._packed = self._pack_checked(weight)
            if self._packed is not None:
                self.weight = None  # the packed copy replaces it

    def _pack_checked(self, weight: torch.Tensor) -> torch.Tensor | None:
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight)
            probe = torch.randn(3, weight.shape[1], dtype=weight.dtype)
            if torch.equal(self._packed_product(probe, packed), F.linear(probe, weight, self.bias)):
                return packed
            log.info("oneDNN weight packing is not exact here; using F.linear")
        except RuntimeError as exc:
            log.info("oneDNN weight packing unavailable (%s); using F.linear", exc)
        return None

    def _packed_product(self, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    @property
    def packed(self) -> bool:
        return self._packed is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] -> [rows, out]."""
        if self._packed is not None:
            rows = x.shape[0]
            target = padded_rows(rows)
            if target == rows:
                return self._packed_product(x, self._packed)
            padded = torch.cat((x, x.new_zeros(target - rows, x.shape[1])))
            return self._packed_product(padded, self._packed)[:rows]
        assert self.weight is not None
        return F.linear(x, self.weight, self.bias)
