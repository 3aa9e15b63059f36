"""Attention sinks (StreamingLLM) on our engine: the RoPE re-rotation identity, the block eviction's
bookkeeping, dense equality while the cache is not full, and the engine against a straightforward
token-by-token implementation written here (pre-RoPE keys rotated to their cache slot every step, as the
paper's code does) for 2k tokens past the window, with two rows evicting at different times."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from llm_endpoint.backends.torch_engine.block_cache import BlockAllocator, PagedKVCache, slot_mapping
from llm_endpoint.backends.torch_engine.sinks import Rerotation, SinkWindow, evict
from tests.engine_harness import EngineHarness, Stream
from tests.test_reference_equivalence import PROMPTS


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _rotated(rotary: Any, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """keys [n, heads, dim] at `positions` [n] through the checkpoint's own rotary embedding."""
    cos, sin = rotary(keys, positions.view(1, -1))
    return _rope(keys, cos[0].unsqueeze(1), sin[0].unsqueeze(1))


def test_rerotating_by_minus_d_equals_rotating_at_p_minus_d(hf_model: Any) -> None:
    rotary = hf_model.model.rotary_emb
    rerotate = Rerotation(rotary)
    keys = torch.randn(40, 3, hf_model.config.head_dim, generator=torch.Generator().manual_seed(0))
    # Exactly, in fp64 with the checkpoint's frequencies: rope(k, p) re-rotated by -d is rope(k, p - d).
    freq = rotary.inv_freq.to(torch.float64)
    exact = lambda k, p: _rope(k, *(torch.cat((a, a), -1).unsqueeze(1) for a in (  # noqa: E731
        (p.view(-1, 1).double() * freq).cos(), (p.view(-1, 1).double() * freq).sin())))
    positions = torch.arange(3000, 3040)
    for delta in (16, 64, 2999):
        torch.testing.assert_close(rerotate(exact(keys.double(), positions), delta), exact(keys.double(), positions - delta),
                                   atol=1e-9, rtol=0)
    # And against transformers' own RoPE, which computes the angles p * freq in fp32 (an error of about
    # p * 2^-24 radians): equal to that precision.
    for delta in (16, 64, 2999):
        bound = 3040 * 2**-23 * keys.abs().max().item()
        shifted = rerotate(_rotated(rotary, keys, positions), delta)
        torch.testing.assert_close(shifted, _rotated(rotary, keys, positions - delta), atol=bound, rtol=0)


def test_eviction_drops_whole_blocks_keeps_the_sinks_and_reindexes_the_survivors() -> None:
    block, sinks, count, length, dim = 4, 3, 8, 21, 4
    allocator = BlockAllocator(16, block)
    cache = PagedKVCache(num_layers=2, num_blocks=16, block_size=block, num_kv_heads=1, head_dim=dim,
                         dtype=torch.float32, device=torch.device("cpu"))
    rotary = SimpleNamespace(inv_freq=torch.tensor([1.0, 0.05]))
    rerotate = Rerotation(rotary)
    table: list[int] = []
    allocator.grow(table, length)
    base = torch.randn(length, 1, dim, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(length).view(-1, 1, 1).float()
    # keys stored rotated at their position (rotating by -p twice is rotating by p); values hold the token index
    keys = torch.stack([rerotate(base[p], -p) for p in range(length)])
    slots = torch.tensor(slot_mapping(table, 0, length, block))
    for layer in range(2):
        cache.write(layer, slots, torch.stack((keys, positions.expand(length, 1, dim)), dim=1))
    before = allocator.used_blocks

    new_len = evict(cache, allocator, table, sinks=sinks, cache_len=length, count=count, rerotate=rerotate)

    assert new_len == length - count
    assert allocator.used_blocks == before - count // block
    held_keys, held_values = cache.gather(1, torch.tensor([table]))
    held_keys, held_values = held_keys[0, 0, :new_len], held_values[0, 0, :new_len, 0]
    token = [p if p < sinks else p + count for p in range(new_len)]  # which token each cache slot holds
    assert held_values.tolist() == [float(t) for t in token]
    for slot, t in enumerate(token):  # every key sits rotated at its new slot
        torch.testing.assert_close(held_keys[slot], rerotate(base[t, 0], -slot), atol=1e-5, rtol=0)


def test_evicting_more_than_is_held_or_part_of_a_block_is_refused() -> None:
    allocator = BlockAllocator(8, 4)
    cache = PagedKVCache(num_layers=1, num_blocks=8, block_size=4, num_kv_heads=1, head_dim=2,
                         dtype=torch.float32, device=torch.device("cpu"))
    table: list[int] = []
    allocator.grow(table, 12)
    rerotate = Rerotation(SimpleNamespace(inv_freq=torch.tensor([1.0])))
    for count in (6, 12):
        with pytest.raises(ValueError, match="cannot evict"):
            evict(cache, allocator, table, sinks=4, cache_len=12, count=count, rerotate=rerotate)
    assert SinkWindow(4, 2044, 16).evict_tokens == 64
    assert SinkWindow(4, 124, 16).evict_tokens == 48
    with pytest.raises(ValueError, match="attention_window"):
        SinkWindow(4, 16, 16)


# ---- the engine ------------------------------------------------------------------------------------


def _run(harness: EngineHarness, streams: list[Stream]) -> None:
    for stream in streams:
        harness.submit(stream)
    for stream in streams:
        assert stream.done.wait(600), "engine stalled"
        assert stream.error is None, stream.error


def test_sinks_equal_dense_attention_until_the_cache_is_full(model_dir: Path, tokenizer: Any) -> None:
    streams = {}
    for label, sinks in (("dense", None), ("sinks", (4, 508))):
        harness = EngineHarness(model_dir, tokenizer, attention_sinks=sinks)
        try:
            top = {"top_n_tokens": 5}  # the head of each distribution, not only the chosen token
            streams[label] = [Stream(PROMPTS[0], 40, top), Stream(PROMPTS[2], 25, top)]
            _run(harness, streams[label])
        finally:
            harness.stop()
    for dense, sunk in zip(streams["dense"], streams["sinks"]):
        assert sunk.token_ids == dense.token_ids
        for a, b in zip(dense.events, sunk.events):
            assert a.token.log_prob == pytest.approx(b.token.log_prob, abs=1e-4)
            assert [t.id for t in a.top_tokens] == [t.id for t in b.top_tokens]
            assert [t.log_prob for t in a.top_tokens] == pytest.approx([t.log_prob for t in b.top_tokens], abs=1e-4)


class StreamingReference:
    """StreamingLLM one token at a time, as the paper's code does it: keys cached before RoPE, the cache
    cut to the sinks plus the recent tokens when a token arrives at a full cache, and every cached key
    rotated to its slot index at every step (the query at the last slot)."""

    def __init__(self, model: Any, sinks: int, window: int, evict_tokens: int) -> None:
        self.model, self.sinks, self.capacity, self.evict = model, sinks, sinks + window, evict_tokens
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.dim = config.head_dim
        self.keys: list[torch.Tensor] = [torch.empty(0, self.kv_heads, self.dim) for _ in model.model.layers]
        self.values: list[torch.Tensor] = [torch.empty(0, self.kv_heads, self.dim) for _ in model.model.layers]

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Log-probs of the next token after `token`."""
        base = self.model.model
        if self.keys[0].shape[0] == self.capacity:
            keep = lambda t: torch.cat((t[: self.sinks], t[self.sinks + self.evict :]))  # noqa: E731
            self.keys = [keep(k) for k in self.keys]
            self.values = [keep(v) for v in self.values]
        x = base.embed_tokens(torch.tensor([token]))
        length = self.keys[0].shape[0] + 1
        cos, sin = base.rotary_emb(x, torch.arange(length).view(1, -1))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [length, 1, dim]
        group = self.heads // self.kv_heads
        for i, layer in enumerate(base.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(self.heads, self.dim)
            self.keys[i] = torch.cat((self.keys[i], attn.k_proj(h).view(1, self.kv_heads, self.dim)))
            self.values[i] = torch.cat((self.values[i], attn.v_proj(h).view(1, self.kv_heads, self.dim)))
            q = _rope(q, cos[-1], sin[-1])
            k = _rope(self.keys[i], cos, sin).repeat_interleave(group, dim=1)  # [length, heads, dim]
            v = self.values[i].repeat_interleave(group, dim=1)
            weights = torch.softmax(torch.einsum("hd,lhd->hl", q, k) * self.dim**-0.5, dim=-1)
            x = x + attn.o_proj(torch.einsum("hl,lhd->hd", weights, v).reshape(1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return torch.log_softmax(self.model.lm_head(base.norm(x))[0].float(), dim=-1)


def test_sinks_follow_a_straightforward_streaming_llm_for_2k_tokens_past_the_window(
    model_dir: Path, tokenizer: Any, hf_model: Any
) -> None:
    sinks, window = 4, 124
    evict_tokens = SinkWindow(sinks, window, 16).evict_tokens
    long_prompt = " ".join(PROMPTS) * 4  # several windows long: prefilled in pieces with eviction between
    assert len(tokenizer(long_prompt)["input_ids"]) + 2200 > sinks + window + 2000
    params = {"ignore_eos": True, "prompt_logprobs": True}
    # the second row keeps the batch at two rows that evict at different steps for its first few windows
    streams = [Stream(long_prompt, 2200, params), Stream(PROMPTS[1], 400, params)]
    harness = EngineHarness(model_dir, tokenizer, attention_sinks=(sinks, window), max_model_len=256)
    try:
        _run(harness, streams)
        assert harness.engine is not None and harness.engine.allocator.used_blocks == 0
    finally:
        harness.stop()
    for stream in streams:
        prompt = tokenizer(stream.prompt)["input_ids"]
        assert len(prompt) + stream.max_new_tokens >= 3 * (sinks + window)
        generated = stream.token_ids
        prefill = stream.events[0].prefill
        assert prefill is not None and len(prefill) == len(prompt)
        reference = StreamingReference(hf_model, sinks, window, evict_tokens)
        tokens = prompt + generated
        worst = 0.0
        for t in range(len(tokens) - 1):
            logprobs = reference.step(tokens[t])
            target = tokens[t + 1]
            ours = prefill[t + 1].log_prob if t + 1 < len(prompt) else stream.events[t + 1 - len(prompt)].token.log_prob
            assert ours is not None
            worst = max(worst, abs(ours - logprobs[target].item()))
            if t + 1 >= len(prompt):  # greedy: our token is the reference's argmax, or within a hair of it
                best = logprobs.max().item()
                assert logprobs[target].item() >= best - 1e-4, f"token {t + 1 - len(prompt)} differs"
        assert worst < 1e-3, worst
