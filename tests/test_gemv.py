"""Our one-row bf16 kernel (`gemv`): against the exact product, its refusals, and inside the compiled
one-row decode step, where it replaces oneDNN for every projection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_endpoint.backends.torch_engine import gemv


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    """Built here (a CI machine has the compiler); only a CPU without the instructions is a reason to skip."""
    reason = gemv.unavailable_reason()
    if reason == gemv.NO_AVX512_BF16:
        pytest.skip(reason)
    assert reason is None, reason


@pytest.mark.parametrize(("outputs", "inputs"), [(1, 1), (7, 37), (13, 100), (4, 31), (33, 576), (3072, 576),
                                                 (576, 1536)])
@pytest.mark.parametrize("biased", [False, True])
def test_one_row_product_is_the_exact_product_rounded_once(outputs: int, inputs: int, biased: bool) -> None:
    """Widths that are not a multiple of 32 (the masked tail) and output counts that are not a multiple of 4
    (rows taken one at a time) included. Each output is the fp32 product plus bias, rounded to bf16 once:
    within half a bf16 step of the exact value, plus what fp32 accumulation in another order can add."""
    generator = torch.Generator().manual_seed(outputs * 1000 + inputs)
    x = torch.randn(1, inputs, generator=generator).to(torch.bfloat16)
    weight = (torch.randn(outputs, inputs, generator=generator) * 0.05).to(torch.bfloat16)
    bias = torch.randn(outputs, generator=generator).to(torch.bfloat16) if biased else None
    got = gemv.bf16_gemv(x, weight, bias)
    assert got.shape == (1, outputs) and got.dtype == torch.bfloat16
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    magnitude = F.linear(x.double().abs(), weight.double().abs(), None if bias is None else bias.double().abs())
    # bf16 keeps 8 significant bits: half a step is at most 2^-8 of the value
    bound = exact.abs() * 2.0**-8 + magnitude * inputs * 2.0**-24 + 1e-30
    assert ((got.double() - exact).abs() <= bound).all()
    # and as close as oneDNN's own bf16 product, which rounds once too
    theirs = F.linear(x, weight, bias)
    assert (got.double() - exact).abs().max() <= (theirs.double() - exact).abs().max() + magnitude.max() * 2.0**-20


def test_one_row_product_of_a_strided_row() -> None:
    """A row viewed out of a wider tensor (our norm's output is one) reads its own elements."""
    wide = torch.randn(1, 128).to(torch.bfloat16)
    weight = torch.randn(8, 64).to(torch.bfloat16)
    assert torch.equal(gemv.bf16_gemv(wide[:, :64], weight), gemv.bf16_gemv(wide[:, :64].contiguous(), weight))


def test_products_it_does_not_compute_are_refused_by_name() -> None:
    weight = torch.randn(8, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="takes one row"):
        gemv.bf16_gemv(torch.randn(2, 64).to(torch.bfloat16), weight)
    with pytest.raises(RuntimeError, match="does not take rows of 32"):
        gemv.bf16_gemv(torch.randn(1, 32).to(torch.bfloat16), weight)
    with pytest.raises(RuntimeError, match="bf16 only"):
        gemv.bf16_gemv(torch.randn(1, 64), weight.float())
    assert not gemv.available(weight.float()) and gemv.available(weight)


def test_compiled_one_row_step_runs_every_projection_through_the_kernel() -> None:
    """The one-row graph calls the kernel for each layer's four projections (q/k/v, output, gate/up, down)
    and matches our eager forward to bf16 precision; the LM head stays with oneDNN (the runner's)."""
    from torch.profiler import ProfilerActivity, profile

    from llm_endpoint.backends.torch_engine.compiled_decode import CompiledDecode
    from llm_endpoint.backends.torch_engine.forward_batch import ForwardBatch, Span
    from llm_endpoint.backends.torch_engine.llama import LlamaForward
    from tests.test_torch_engine import _tiny_cache, _tiny_llama

    model = _tiny_llama()
    cache = _tiny_cache(model, blocks=32)
    eager = LlamaForward(model)
    decode = CompiledDecode(model, eager.rotary, several_rows=False)
    with torch.inference_mode():
        decode.warm_up(cache, list(range(16)), group=2)
        for pool in cache.pools:
            pool.normal_(generator=torch.Generator().manual_seed(1))
        batch = ForwardBatch.build([Span(0, 1, 9, [20, 21, 22])], [[5]], block_size=4, group=2,
                                   dtype=torch.bfloat16, device=torch.device("cpu"))
        assert decode.takes(batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            compiled = decode(batch, cache)
        calls = sum(e.count for e in prof.key_averages() if e.key == "llm_endpoint::bf16_gemv")
        assert calls == 4 * model.config.num_hidden_layers
        expected = eager(batch, cache)
    assert (compiled.float() - expected.float()).abs().max() <= 0.05 * expected.float().abs().max()
