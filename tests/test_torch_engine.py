"""Our engine without HTTP: the paged cache, the sampler, the scheduler under block pressure, and the
engine's output against transformers with rows joining and leaving."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_endpoint.backends.errors import BackendError
from llm_endpoint.backends.torch_engine.block_cache import BlockAllocator, OutOfBlocks, PagedKVCache, slot_mapping
from llm_endpoint.backends.torch_engine.engine import kv_cache_blocks
from llm_endpoint.backends.torch_engine.forward_batch import ForwardBatch, Span
from llm_endpoint.backends.torch_engine.linear import EXACT_ROWS, PackedLinear, padded_rows
from llm_endpoint.backends.torch_engine.llama import RmsNorm
from llm_endpoint.backends.torch_engine.sampling import (
    RowFailure,
    RowSample,
    Seen,
    apply_output_penalties,
    sample_rows,
    verify_drafts,
)
from llm_endpoint.backends.torch_engine.scheduler import Scheduler
from llm_endpoint.backends.torch_engine.sequence import Sequence, Status
from llm_endpoint.backends.types import GenerationRequest, SamplingParams, TokenEvent
from tests.engine_harness import EngineHarness, Stream
from tests.test_reference_equivalence import PROMPTS

# ---- packed linear layers --------------------------------------------------------------------------


def test_row_counts_reaching_onednn_are_few_and_padding_is_small() -> None:
    sizes = [padded_rows(rows) for rows in range(1, 1025)]
    assert sizes[:EXACT_ROWS] == list(range(1, EXACT_ROWS + 1))
    assert sizes == sorted(sizes)
    assert all(rows <= size <= max(rows + EXACT_ROWS - 1, rows * 9 // 8) for rows, size in enumerate(sizes, 1))
    assert len(set(sizes)) <= 48  # oneDNN caches a primitive per size: this bounds what it builds


def test_packed_linear_on_padded_rows_is_bit_identical_to_f_linear() -> None:
    """bf16, where the weight is packed for oneDNN: every row count, padded or not, gives exactly F.linear's
    rows, and oneDNN only ever sees the padded sizes."""
    torch.manual_seed(0)
    weight = (torch.randn(96, 64) * 0.05).to(torch.bfloat16)
    bias = torch.randn(96).to(torch.bfloat16)
    linear = PackedLinear(weight, bias)
    if not linear.packed:
        pytest.skip("oneDNN weight packing is not available or not exact on this CPU")
    seen: list[int] = []
    product = linear._packed_product
    linear._packed_product = lambda x, packed: (seen.append(x.shape[0]), product(x, packed))[1]  # type: ignore[method-assign]
    counts = (1, 7, 16, 17, 31, 33, 100, 129, 300)
    for rows in counts:
        x = torch.randn(rows, 64).to(torch.bfloat16)
        assert torch.equal(linear(x), torch.nn.functional.linear(x, weight, bias)), rows
    assert seen == [padded_rows(rows) for rows in counts]


# ---- block allocator and paged cache -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_matches_torchs_own_in_every_dtype(dtype: torch.dtype) -> None:
    """fp32 must stay torch's (= transformers') RMSNorm bit for bit; half precision goes through a layer norm
    over [x, -x], which must agree to the last bit but one, at every scale (eps matters for tiny rows)."""
    generator = torch.Generator().manual_seed(0)
    weight = (torch.rand(96, generator=generator) + 0.5).to(dtype)
    scales = torch.tensor([1e-4, 1e-2, 1.0, 30.0]).repeat_interleave(5).view(-1, 1)
    x = (torch.randn(20, 96, generator=generator) * scales).to(dtype)
    ours = RmsNorm(weight, eps=1e-5)(x)
    reference = torch.nn.functional.rms_norm(x, (96,), weight, eps=1e-5)
    if dtype == torch.float32:
        assert torch.equal(ours, reference)
    else:
        exact = torch.nn.functional.rms_norm(x.double(), (96,), weight.double(), eps=1e-5)
        ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((ours.double() - exact).abs() <= ulp).all()
        assert ((ours.double() - exact).abs() <= (reference.double() - exact).abs() + ulp / 2).all()


def test_allocator_grows_all_or_nothing_and_reuses_freed_blocks() -> None:
    allocator = BlockAllocator(num_blocks=4, block_size=4)
    a: list[int] = []
    allocator.grow(a, 9)  # 3 blocks
    assert len(a) == 3 and allocator.free_blocks == 1
    b: list[int] = []
    with pytest.raises(OutOfBlocks):
        allocator.grow(b, 8)  # needs 2, 1 free
    assert b == [] and allocator.free_blocks == 1
    allocator.grow(a, 12)  # still 3 blocks: no new one
    assert len(a) == 3
    last = a[-1]
    allocator.truncate(a, 5)  # rolling back drafts: positions 5.. go, block 2 with them
    assert len(a) == 2 and allocator.free_blocks == 2
    allocator.grow(b, 4)
    assert b == [last]  # last freed, first reused
    allocator.free(a)
    allocator.free(b)
    assert allocator.free_blocks == 4 and allocator.used_blocks == 0


def test_allocator_drop_closes_the_gap_and_reports_granted_blocks() -> None:
    allocator = BlockAllocator(num_blocks=6, block_size=2)
    table: list[int] = []
    allocator.grow(table, 12)
    assert sorted(allocator.take_granted()) == sorted(table)
    assert allocator.take_granted() == []
    first, middle, rest = table[0], table[1:3], table[3:]
    allocator.drop(table, 1, 2)
    assert table == [first, *rest] and allocator.free_blocks == 2
    refill: list[int] = []
    allocator.grow(refill, 4)
    assert sorted(refill) == sorted(middle)
    assert sorted(allocator.take_granted()) == sorted(middle)


def test_paged_cache_reads_back_what_was_written_through_a_scattered_table() -> None:
    block_size, kv_heads, dim = 4, 2, 8
    cache = PagedKVCache(num_layers=2, num_blocks=8, block_size=block_size, num_kv_heads=kv_heads, head_dim=dim,
                         dtype=torch.float32, device=torch.device("cpu"))
    cache.clear(list(range(8)))
    table = [5, 2, 7]  # not in order, not contiguous
    length = 10
    keys = torch.randn(length, kv_heads, dim)
    values = torch.randn(length, kv_heads, dim)
    slots = torch.tensor(slot_mapping(table, 0, length, block_size))
    cache.write(1, slots, torch.stack((keys, values), dim=1))
    got_k, got_v = cache.gather(1, torch.tensor([table]))
    assert got_k.shape == (1, kv_heads, 12, dim)
    assert torch.equal(got_k[0, :, :length], keys.transpose(0, 1))
    assert torch.equal(got_v[0, :, :length], values.transpose(0, 1))
    other_k, _ = cache.gather(0, torch.tensor([table]))
    assert not other_k.any()  # layer 0 untouched
    cache.write(1, slots[4:6], torch.stack((keys[:2] + 1, values[:2]), dim=1))  # overwrite positions 4, 5 only
    got_k, _ = cache.gather(1, torch.tensor([table]))
    assert torch.equal(got_k[0, :, 4:6], (keys[:2] + 1).transpose(0, 1))
    assert torch.equal(got_k[0, :, :4], keys[:4].transpose(0, 1))
    cache.clear([2])
    got_k, _ = cache.gather(1, torch.tensor([table]))
    assert not got_k[0, :, 4:8].any() and torch.equal(got_k[0, :, :4], keys[:4].transpose(0, 1))


def test_a_lone_row_of_consecutive_blocks_is_read_in_place_and_equals_the_gathered_copy() -> None:
    """One stream at a time usually holds consecutive blocks; attention then reads them without a copy.
    Only a lone span whose blocks up to its length are consecutive qualifies."""
    block_size, kv_heads, dim = 4, 2, 8
    cache = PagedKVCache(num_layers=1, num_blocks=8, block_size=block_size, num_kv_heads=kv_heads, head_dim=dim,
                         dtype=torch.float32, device=torch.device("cpu"))
    cache.clear(list(range(8)))
    table, length = [3, 4, 5], 10
    slots = torch.tensor(slot_mapping(table, 0, length, block_size))
    cache.write(0, slots, torch.randn(length, 2, kv_heads, dim))
    copied = cache.gather(0, torch.tensor([table]))
    in_place = cache.gather(0, torch.tensor([table]), run_start=3)
    assert torch.equal(in_place[0], copied[0]) and torch.equal(in_place[1], copied[1])
    assert in_place[0].untyped_storage().data_ptr() == cache.pools[0].untyped_storage().data_ptr()

    def run_start(*spans: Span) -> int | None:
        batch = ForwardBatch.build(list(spans), [[1] * s.count for s in spans], block_size=block_size, group=1,
                                   dtype=torch.float32, device=torch.device("cpu"))
        return batch.groups[0].run_start

    assert run_start(Span(0, 1, length - 1, table)) == 3
    assert run_start(Span(0, 3, 2, [6, 7])) == 6  # drafts to verify, too
    assert run_start(Span(0, 1, length - 1, [3, 5, 4])) is None
    assert run_start(Span(0, 1, 3, [2]), Span(1, 1, 3, [3])) is None  # two rows: gathered into one batch
    assert run_start(Span(0, 1, 3, [3, 4, 9])) == 3  # blocks past the length are not read


def test_kv_cache_sizing_follows_the_space_option_and_refuses_too_little() -> None:
    @dataclass
    class Config:
        num_attention_heads: int = 9
        num_key_value_heads: int = 3
        hidden_size: int = 576
        num_hidden_layers: int = 30

    per_block = 16 * 2 * 30 * 3 * 64 * 2  # block_size * (k, v) * layers * kv_heads * head_dim * bf16
    blocks = kv_cache_blocks(Config(), dtype=torch.bfloat16, max_running=32, max_model_len=2048,
                             space_bytes=1000 * per_block)
    assert blocks == 1000
    with pytest.raises(ValueError, match="kv_cache_space"):
        kv_cache_blocks(Config(), dtype=torch.bfloat16, max_running=32, max_model_len=2048, space_bytes=per_block)
    unbounded = kv_cache_blocks(Config(), dtype=torch.bfloat16, max_running=4, max_model_len=2048, space_bytes=None)
    assert unbounded == 4 * (2048 // 16 + 1)  # every slot at full length fits in a quarter of RAM here


def test_a_long_decode_row_does_not_pad_the_short_ones() -> None:
    """Decode rows attend in groups of similar length: the short rows' gathered keys stay short."""
    lengths = [5, 20, 33, 40, 8000]  # ascending, as the model runner orders them
    spans = [Span(i, 1, n - 1, list(range(-(-n // 16)))) for i, n in enumerate(lengths)]
    batch = ForwardBatch.build(spans, [[1]] * len(spans), block_size=16, group=3, dtype=torch.float32,
                               device=torch.device("cpu"))
    groups = [(g.start, g.stop, g.tables.shape[1]) for g in batch.groups]
    assert groups == [(0, 4, 3), (4, 5, 500)]
    first = batch.groups[0]
    assert (first.mask[:, 0, 0] == 0).sum(dim=-1).tolist() == lengths[:4]  # each row sees its own length


def test_spans_of_equal_token_count_attend_together_each_query_seeing_up_to_itself() -> None:
    """Drafts to verify (here 3 tokens a span) batch like decode rows, with a causal mask per span and per
    query head of a key/value group; a different count or a long prefill chunk starts its own group."""
    spans, offset = [], 0
    for count, start in [(1, 9), (3, 4), (3, 30), (2, 7), (100, 0)]:
        spans.append(Span(offset, count, start, list(range(-(-(start + count) // 16)))))
        offset += count
    batch = ForwardBatch.build(spans, [[1] * s.count for s in spans], block_size=16, group=3,
                               dtype=torch.float32, device=torch.device("cpu"))
    assert [(g.start, g.stop, g.count) for g in batch.groups] == [(0, 1, 1), (1, 7, 3), (7, 9, 2), (9, 109, 100)]
    drafts = batch.groups[1]
    assert drafts.mask.shape == (2, 1, 9, 48)
    seen = (drafts.mask[:, 0] == 0).sum(dim=-1)  # [spans, group*count]: head h of query i is row h*3+i
    assert seen.tolist() == [[5, 6, 7] * 3, [31, 32, 33] * 3]


# ---- sampler -------------------------------------------------------------------------------------

VOCAB = 50


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _draw(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int | None]) -> list[RowSample | RowFailure]:
    generators = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
    histories = [Seen(torch.tensor([1, 2, 3]), 1) if p.penalizes else None for p in params]
    return sample_rows(logits, params, histories, generators)


GREEDY = SamplingParams()
SAMPLED = SamplingParams(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
PENALIZED = SamplingParams(repetition_penalty=1.3)


def test_greedy_rows_take_the_argmax_with_raw_log_probs() -> None:
    logits = _logits(3)
    samples = _draw(logits, [GREEDY, GREEDY, SamplingParams(top_n_tokens=3)], [None] * 3)
    raw = torch.log_softmax(logits, dim=-1)
    for row, sample in enumerate(samples):
        assert isinstance(sample, RowSample)
        assert sample.token_id == int(logits[row].argmax())
        assert sample.log_prob == pytest.approx(float(raw[row].max()))
    top = samples[2].top  # type: ignore[union-attr]
    assert [t for t, _ in top] == raw[2].topk(3).indices.tolist()


def test_seeded_sampling_repeats_and_seeds_differ() -> None:
    logits = (_logits(1) / 6).expand(64, VOCAB).contiguous()  # flat enough that seeds pick different tokens
    first = _draw(logits, [SAMPLED] * 64, list(range(64)))
    again = _draw(logits, [SAMPLED] * 64, list(range(64)))
    assert [s.token_id for s in first] == [s.token_id for s in again]  # type: ignore[union-attr]
    assert len({s.token_id for s in first}) > 1  # type: ignore[union-attr]


def test_output_penalties_follow_openais_definition() -> None:
    """logit[j] -= frequency * count[j] + presence * (count[j] > 0), over output tokens only."""
    scores = torch.zeros(6)
    apply_output_penalties(scores, torch.tensor([1, 1, 3, 1]), frequency=0.5, presence=0.25)
    assert scores.tolist() == [0.0, -1.75, 0.0, -0.75, 0.0, 0.0]
    scores = torch.ones(4)
    apply_output_penalties(scores, torch.tensor([2]), frequency=-1.0, presence=-0.5)  # negative ones encourage
    assert scores.tolist() == [1.0, 1.0, 2.5, 1.0]


def test_frequency_and_presence_penalties_count_output_tokens_not_the_prompt() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 2], logits[0, 9] = 1.0, 0.5  # token 2 leads by 0.5
    params = SamplingParams(frequency_penalty=0.4, presence_penalty=0.2)  # 0.6 once seen in the output
    in_prompt = sample_rows(logits, [params], [Seen(torch.tensor([2, 2, 7]), 3)], [None])[0]
    in_output = sample_rows(logits, [params], [Seen(torch.tensor([7, 2]), 1)], [None])[0]
    assert isinstance(in_prompt, RowSample) and in_prompt.token_id == 2
    assert isinstance(in_output, RowSample) and in_output.token_id == 9
    # the reported log-prob is still the model's own
    assert in_output.log_prob == pytest.approx(float(torch.log_softmax(logits[0], -1)[9]))


def test_draft_verification_penalizes_accepted_drafts_as_output() -> None:
    """A draft token accepted at one position counts as output at the next, as it would one step at a time."""
    logits = torch.zeros(2, VOCAB)
    logits[:, 4], logits[:, 5] = 1.0, 0.8  # the model prefers 4 at both positions
    params = SamplingParams(presence_penalty=0.5)
    out = verify_drafts(logits, (4,), params, Seen(torch.tensor([1]), 1), None)
    assert isinstance(out, list) and [s.token_id for s in out] == [4, 5]  # 4 accepted, then penalized


@pytest.mark.parametrize("poison", [
    pytest.param(("logits", float("nan")), id="nan-logits"),
    pytest.param(("logits", float("inf")), id="inf-logits"),
    pytest.param(("params", SamplingParams(do_sample=True, temperature=1e-45)), id="tiny-temperature"),
    pytest.param(("params", SamplingParams(do_sample=True, repetition_penalty=1e-40)), id="tiny-penalty"),
])
def test_a_poisoned_row_fails_alone_and_its_neighbours_are_unchanged(poison: tuple[str, Any]) -> None:
    healthy = [GREEDY, SAMPLED, PENALIZED]
    seeds: list[int | None] = [None, 11, None]
    logits = _logits(len(healthy))
    solo = [_draw(logits[i : i + 1], [p], [s])[0] for i, (p, s) in enumerate(zip(healthy, seeds))]

    kind, value = poison
    bad_logits = _logits(1, seed=5)
    bad_params = SamplingParams(do_sample=True)
    if kind == "logits":
        bad_logits[0, 7] = value
    else:
        bad_params = value
    mixed_logits = torch.cat([logits[:1], bad_logits, logits[1:]])
    mixed = _draw(mixed_logits, [healthy[0], bad_params, *healthy[1:]], [seeds[0], 3, *seeds[1:]])

    assert isinstance(mixed[1], RowFailure) and mixed[1].reason
    assert [mixed[0], mixed[2], mixed[3]] == solo


# ---- scheduler -----------------------------------------------------------------------------------


def _sequence(request_id: str, prompt: list[int], max_new_tokens: int = 8, **params: Any) -> Sequence:
    request = GenerationRequest(request_id, tuple(prompt), SamplingParams(max_new_tokens=max_new_tokens, **params))
    return Sequence(request=request, deliver=lambda event: None, assembler=None, generator=None)  # type: ignore[arg-type]


def _step(scheduler: Scheduler) -> list[tuple[str, int, int]]:
    """Schedule, and pretend the model ran: every chunk is computed and each sampling chunk adds token 0."""
    chunks = scheduler.schedule()
    for chunk in chunks:
        chunk.seq.computed += chunk.count
        chunk.seq.cache_len += chunk.count
        if chunk.samples:
            chunk.seq.tokens.append(0)
            if chunk.seq.num_output >= chunk.seq.request.params.max_new_tokens:
                scheduler.remove(chunk.seq)
    return [(c.seq.request.request_id, c.start, c.count) for c in chunks]


def test_scheduler_admits_by_free_blocks_and_queues_the_rest() -> None:
    allocator = BlockAllocator(num_blocks=6, block_size=4)
    scheduler = Scheduler(allocator, max_running=8, prefill_tokens=64)
    long = _sequence("long", list(range(16)))  # 4 blocks
    short = _sequence("short", list(range(4)))  # 1 block, but only 2 free and one is the reserve for "long"
    later = _sequence("later", list(range(3)))
    for seq in (long, short, later):
        scheduler.add(seq)
    assert _step(scheduler) == [("long", 0, 16), ("short", 0, 4)]
    assert later.status is Status.WAITING  # no block left beyond the two running sequences' reserve
    assert allocator.used_blocks == 5


def test_scheduler_splits_prefill_within_the_token_budget_and_keeps_decoding() -> None:
    allocator = BlockAllocator(num_blocks=32, block_size=4)
    scheduler = Scheduler(allocator, max_running=8, prefill_tokens=8)
    first = _sequence("first", [1, 2, 3])
    scheduler.add(first)
    assert _step(scheduler) == [("first", 0, 3)]
    scheduler.add(_sequence("big", list(range(20))))
    assert _step(scheduler) == [("first", 3, 1), ("big", 0, 8)]
    assert _step(scheduler) == [("first", 4, 1), ("big", 8, 8)]
    assert _step(scheduler) == [("first", 5, 1), ("big", 16, 4)]
    assert _step(scheduler) == [("first", 6, 1), ("big", 20, 1)]


def test_scheduler_preempts_the_youngest_under_block_pressure_and_loses_nothing() -> None:
    allocator = BlockAllocator(num_blocks=5, block_size=2)
    scheduler = Scheduler(allocator, max_running=4, prefill_tokens=64)
    old = _sequence("old", [1, 2, 3], max_new_tokens=6)
    young = _sequence("young", [4, 5, 6], max_new_tokens=6)
    scheduler.add(old)
    scheduler.add(young)
    finished: dict[str, int] = {}
    for _ in range(60):
        _step(scheduler)
        for seq in (old, young):
            if seq.status is Status.FINISHED:
                finished[seq.request.request_id] = seq.num_output
        if len(finished) == 2:
            break
        assert allocator.used_blocks <= allocator.num_blocks
    assert finished == {"old": 6, "young": 6}
    assert scheduler.preemptions >= 1
    assert allocator.used_blocks == 0


# ---- the engine on the real model ----------------------------------------------------------------


def _reference(hf_model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = hf_model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("forward", ["native", "transformers"])
def test_engine_greedy_equals_transformers_with_rows_joining_and_leaving(
    model_dir: Path, tokenizer: Any, hf_model: Any, forward: str
) -> None:
    # small prefill chunks and blocks so prompts span several chunks and blocks, and rows of different
    # lengths decode together while others are still prefilling
    harness = EngineHarness(model_dir, tokenizer, forward=forward, prefill_tokens=16, block_size=4)
    try:
        first_wave = [Stream(PROMPTS[0], 20), Stream(PROMPTS[3], 12), Stream(PROMPTS[1], 30)]
        second_wave = [Stream(PROMPTS[2], 16), Stream(PROMPTS[4], 24)]
        pending = list(second_wave)

        def join_after_five(stream: Stream, event: TokenEvent) -> None:
            if len(stream.events) == 4 and pending:  # the fifth token: the others join mid-stream
                harness.submit(pending.pop(0))

        for stream in first_wave:
            harness.submit(stream, on_event=join_after_five)
        for stream in first_wave + second_wave:
            assert stream.done.wait(300), stream.prompt
        assert harness.engine is not None and harness.engine.allocator.used_blocks == 0
    finally:
        harness.stop()
    for stream in first_wave + second_wave:
        assert stream.error is None, stream.error
        assert stream.token_ids == _reference(hf_model, tokenizer, stream.prompt, stream.max_new_tokens), stream.prompt


def _prompt_logprobs(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Each prompt token's log-prob given the tokens before it."""
    return torch.log_softmax(logits[:-1].float(), dim=-1).gather(1, torch.tensor(ids[1:]).view(-1, 1)).view(-1)


def test_our_bf16_forward_tracks_fp32_at_least_as_closely_as_transformers_bf16(
    model_dir: Path, tokenizer: Any, hf_model: Any
) -> None:
    """bf16, the default on CPUs with native bf16, is not bit-equal to anything (our norm rounds once where
    transformers rounds twice), so it is held to accuracy: the prompt's log-probs against the fp32 model,
    no further off than transformers' own bf16 forward. A wrong rotation, cache layout or head grouping
    puts it off by whole nats."""
    from transformers import AutoModelForCausalLM

    from llm_endpoint.backends.torch_engine import attention
    from llm_endpoint.backends.torch_engine.block_cache import AttentionShape
    from llm_endpoint.backends.torch_engine.llama import LlamaForward

    ids = tokenizer(PROMPTS[0] + " " + PROMPTS[1])["input_ids"]
    with torch.inference_mode():
        exact = _prompt_logprobs(hf_model(torch.tensor([ids])).logits[0], ids)
        theirs_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()
        theirs = _prompt_logprobs(theirs_model(torch.tensor([ids])).logits[0], ids)
        ours_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16,
                                                          attn_implementation=attention.NAME).eval()
        shape = AttentionShape.of(ours_model.config)
        cache = PagedKVCache(num_layers=shape.layers, num_blocks=8, block_size=16, num_kv_heads=shape.kv_heads,
                             head_dim=shape.head_dim, dtype=torch.bfloat16, device=torch.device("cpu"))
        cache.clear(list(range(8)))
        table = [6, 1, 4, 0, 7, 2][: -(-len(ids) // 16)]
        batch = ForwardBatch.build([Span(0, len(ids), 0, table)], [ids], block_size=16, group=shape.group,
                                   dtype=torch.bfloat16, device=torch.device("cpu"))
        hidden = LlamaForward(ours_model)(batch, cache)
        ours = _prompt_logprobs(ours_model.lm_head(hidden), ids)
    ours_error, their_error = (ours - exact).abs().mean().item(), (theirs - exact).abs().mean().item()
    assert ours_error <= 1.25 * their_error + 1e-3, (ours_error, their_error)


def test_compiled_decode_tracks_fp32_at_least_as_closely_as_transformers_bf16_with_rows_joining_and_leaving(
    model_dir: Path, tokenizer: Any, hf_model: Any
) -> None:
    """`option.compile_decode`: inductor's fused bf16 step is held to the bar our eager bf16 forward is held
    to. Each stream's reported log-probs (its decode steps compiled, for one row and for several, rows joining
    mid-stream, and a lone stream's draft verification) against the fp32 model's on the same tokens, no
    further off than transformers' bf16 forward."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from tests.test_disconnect import wait_until
    from tests.test_prompt_lookup import GROUNDED

    # compile_decode=True: every graph (auto's default compiles the one-row graph only, a subset of these)
    harness = EngineHarness(model_dir, tokenizer, dtype=torch.bfloat16, compile_decode=True, compile_drafts=True,
                            prefill_tokens=16)
    graphs = counters["stats"]["unique_graphs"]  # those compiled at start-up
    try:
        first_wave = [Stream(PROMPTS[0], 24), Stream(PROMPTS[3], 12)]
        second_wave = [Stream(PROMPTS[1], 20), Stream(PROMPTS[2], 16)]
        pending = list(second_wave)

        def join_after_five(stream: Stream, event: TokenEvent) -> None:
            if len(stream.events) >= 4 and pending:  # one joins per step from the fifth token on
                harness.submit(pending.pop(0))

        solo = Stream(PROMPTS[4], 20)  # alone: the one-row graph
        drafting = Stream(GROUNDED, 24, {"prompt_lookup_num_tokens": 4, "ignore_eos": True})  # alone: the span graph
        for stream in (solo, drafting):
            harness.submit(stream)
            assert stream.done.wait(300)
        for stream in first_wave:
            harness.submit(stream, on_event=join_after_five)
        for stream in first_wave + second_wave:
            assert stream.done.wait(300), stream.prompt
        assert harness.engine is not None
        decode, runner = harness.engine.runner._decode, harness.engine.runner
        assert decode is not None and decode.steps["rows"] > 20 and decode.steps["span"] > 2
        assert drafting.events[-1].accepted_draft_tokens > 8
        assert counters["stats"]["unique_graphs"] == graphs, "a request waited for a compile"
        # each step counted, compiled or eager (prefill chunks, the first block), as /metrics reports
        assert runner.eager_steps > 0
        engine = harness.engine
        published = wait_until(lambda: engine.stats().compiled_steps == decode.steps.total(), 10)
        assert published is not None and engine.stats().eager_steps == runner.eager_steps
    finally:
        harness.stop()
    theirs_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()
    ours_errors, their_errors = [], []
    for stream in [solo, drafting, *first_wave, *second_wave]:
        assert stream.error is None, stream.error
        ids = tokenizer(stream.prompt)["input_ids"] + stream.token_ids
        generated = len(stream.token_ids)
        with torch.inference_mode():
            exact = _prompt_logprobs(hf_model(torch.tensor([ids])).logits[0], ids)[-generated:]
            theirs = _prompt_logprobs(theirs_model(torch.tensor([ids])).logits[0], ids)[-generated:]
        ours = torch.tensor([e.token.log_prob for e in stream.events])
        ours_errors.extend((ours - exact).abs().tolist())
        their_errors.extend((theirs - exact).abs().tolist())
    # over all tokens: per stream, a single near-tie moves the mean either way (our eager bf16 engine, too,
    # is further off than transformers' on one of these prompts and closer on the others)
    ours_error, their_error = sum(ours_errors) / len(ours_errors), sum(their_errors) / len(their_errors)
    assert ours_error <= 1.25 * their_error + 1e-3, (ours_error, their_error)


def _tiny_llama(**config: Any) -> Any:
    """A random two-layer bf16 Llama: what the compiled step's structural tests need, in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, **config)).to(torch.bfloat16).eval()


def _tiny_cache(model: Any, blocks: int = 16) -> PagedKVCache:
    from llm_endpoint.backends.torch_engine.block_cache import AttentionShape

    shape = AttentionShape.of(model.config)
    return PagedKVCache(num_layers=shape.layers, num_blocks=blocks, block_size=4, num_kv_heads=shape.kv_heads,
                        head_dim=shape.head_dim, dtype=torch.bfloat16, device=torch.device("cpu"))


def test_compiled_decode_without_a_cpp_compiler_is_refused_at_start_up() -> None:
    """Inductor would fail deep inside the first compile; the option says what is missing instead."""
    import torch._inductor.config as inductor_config

    from llm_endpoint.backends.torch_engine.model_runner import ModelRunner

    model = _tiny_llama()
    with inductor_config.patch({"cpp.cxx": (None, "no-such-c++-compiler")}), pytest.raises(
        ValueError, match="compile_decode needs a C\\+\\+ compiler.*no-such-c\\+\\+-compiler"
    ):
        ModelRunner(model, _tiny_cache(model), compile_decode=True)


def test_compile_decode_auto_compiles_only_where_it_serves_and_was_measured(
    hf_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default (`option.compile_decode=auto`): a bf16 Llama on the CPU with a C++ compiler is compiled, at
    any number of slots; fp32, a missing compiler, another device, attention sinks, or weights whose packed
    copy would take more than an eighth of RAM stay eager, each with its reason for the start-up log."""
    import torch._inductor.config as inductor_config

    from llm_endpoint.backends.torch_engine import engine

    def reason(model: Any, sinks: bool = False, forward: str = "auto") -> str:
        return str(engine.compile_by_default_reason(model, forward=forward, attention_sinks=sinks))

    tiny = _tiny_llama()
    assert engine.compile_by_default_reason(tiny, forward="auto", attention_sinks=False) is None
    assert "bf16 or fp16" in reason(hf_model)
    assert "transformers' was asked for" in reason(tiny, forward="transformers")
    assert "attention sinks" in reason(tiny, sinks=True)
    assert "not on meta" in reason(_tiny_llama().to("meta"))
    with inductor_config.patch({"cpp.cxx": (None, "no-such-c++-compiler")}):
        assert "C++ compiler" in reason(tiny)
    weights = sum(p.numel() * p.element_size() for p in tiny.parameters())
    monkeypatch.setattr(engine, "_physical_memory", lambda: weights * 8)
    assert engine.compile_by_default_reason(tiny, forward="auto", attention_sinks=False) is None
    monkeypatch.setattr(engine, "_physical_memory", lambda: weights * 8 - 8)
    assert "at most 12.5% of RAM" in reason(tiny)


def test_compile_decode_auto_compiles_a_lone_rows_steps_only(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` compiles only where compiling was measured to pay: a lone decode row (and, with prompt lookup,
    a lone row's drafts); steps of several rows stay eager. `true` compiles those too."""
    from llm_endpoint.backends.torch_engine import engine
    from llm_endpoint.backends.torch_engine.block_cache import AttentionShape
    from llm_endpoint.backends.torch_engine.compiled_decode import CompiledDecode

    model = _tiny_llama()
    group = AttentionShape.of(model.config).group

    def step(rows: int, count: int = 1) -> ForwardBatch:
        spans = [Span(r * count, count, 8, [2 * r, 2 * r + 1, 2 * r + 2]) for r in range(rows)]
        return ForwardBatch.build(spans, [[1] * count] * rows, block_size=4, group=group, dtype=torch.bfloat16,
                                  device=torch.device("cpu"))

    lone = CompiledDecode(model, model.model.rotary_emb, several_rows=False, drafts=True)
    every = CompiledDecode(model, model.model.rotary_emb, drafts=True)
    assert lone.takes(step(1)) and every.takes(step(1))
    assert not lone.takes(step(3)) and every.takes(step(3))
    assert lone.takes(step(1, count=4)) and every.takes(step(1, count=4))

    class Built(Exception):
        """Stops the engine right after choosing what to compile, before any compile."""

    def model_runner(*args: Any, **kwargs: Any) -> None:
        raise Built(kwargs)

    monkeypatch.setattr(engine, "ModelRunner", model_runner)
    for compile_decode, expected in ((None, (True, False)), (True, (True, True)), (False, (False, True))):
        with pytest.raises(Built) as built:
            engine.TorchEngine(model, tokenizer, max_running=32, max_model_len=64, compile_decode=compile_decode)
        chosen = built.value.args[0]
        assert (chosen["compile_decode"], chosen["compile_several_rows"]) == expected, compile_decode


def test_compiled_decode_keeps_every_projection_bias() -> None:
    """Llama checkpoints may carry biases on every projection (`attention_bias`, `mlp_bias`), Qwen2 on q/k/v:
    the compiled step must add each one where our eager forward does (a tiny random model, biases set)."""
    from llm_endpoint.backends.torch_engine.block_cache import AttentionShape
    from llm_endpoint.backends.torch_engine.compiled_decode import CompiledDecode
    from llm_endpoint.backends.torch_engine.llama import LlamaForward

    model = _tiny_llama(attention_bias=True, mlp_bias=True)
    config = model.config
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_()
    shape = AttentionShape.of(config)
    cache = _tiny_cache(model)
    cache.clear(list(range(16)))
    eager, compiled = LlamaForward(model), CompiledDecode(model, model.model.rotary_emb)
    table, ids = [3, 4, 5], list(range(1, 10))
    with torch.inference_mode():
        eager(ForwardBatch.build([Span(0, 9, 0, table)], [ids], block_size=4, group=shape.group,
                                 dtype=torch.bfloat16, device=torch.device("cpu")), cache)
        step = ForwardBatch.build([Span(0, 1, 9, table)], [[11]], block_size=4, group=shape.group,
                                  dtype=torch.bfloat16, device=torch.device("cpu"))
        assert compiled.takes(step)
        expected, got = eager(step, cache).float(), compiled(step, cache).float()
    assert torch.allclose(got, expected, atol=0.05, rtol=0.02), (got - expected).abs().max()


def test_compiled_decode_is_refused_in_fp32(hf_model: Any) -> None:
    """fp32 is the mode that equals transformers bit for bit, which a compiled step would not."""
    from llm_endpoint.backends.torch_engine.block_cache import AttentionShape
    from llm_endpoint.backends.torch_engine.model_runner import ModelRunner

    shape = AttentionShape.of(hf_model.config)
    cache = PagedKVCache(num_layers=shape.layers, num_blocks=4, block_size=16, num_kv_heads=shape.kv_heads,
                         head_dim=shape.head_dim, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="compile_decode.*bf16 or fp16"):
        ModelRunner(hf_model, cache, compile_decode=True)


def test_engine_fails_only_the_poisoned_request(model_dir: Path, tokenizer: Any) -> None:
    """Whatever slips past validation fails its own request: a sampler poison and a consumer that raises."""
    healthy = [Stream(PROMPTS[1], 16, {"ignore_eos": True}),
               Stream(PROMPTS[2], 16, {"do_sample": True, "seed": 4, "temperature": 0.7, "ignore_eos": True})]

    def run(with_poison: bool) -> list[list[int]]:
        streams = [Stream(s.prompt, s.max_new_tokens, s.params) for s in healthy]
        harness = EngineHarness(model_dir, tokenizer)
        try:
            poisons: list[Stream] = []
            if with_poison:
                poisons = [Stream(PROMPTS[0], 16, {"do_sample": True, "temperature": 1e-45}),
                           Stream(PROMPTS[4], 16, {"repetition_penalty": 1e-40, "do_sample": True}),
                           Stream(PROMPTS[3], 16, {"ignore_eos": True})]

                def explode(stream: Stream, event: TokenEvent) -> None:
                    if stream is poisons[2] and len(stream.events) == 2:
                        raise RuntimeError("consumer broke")

                for poison in poisons:
                    harness.submit(poison, on_event=explode)
            for stream in streams:
                harness.submit(stream)
            for stream in streams + poisons:
                assert stream.done.wait(300)
            for poison in poisons:
                assert isinstance(poison.error, BackendError), poison.params
            if with_poison:
                assert len(poisons[2].events) == 2  # what it had before its consumer broke
        finally:
            harness.stop()
        for stream in streams:
            assert stream.error is None and len(stream.events) == 16
        return [s.token_ids for s in streams]

    assert run(with_poison=True) == run(with_poison=False)


def test_engine_under_block_pressure_queues_and_finishes_every_request(model_dir: Path, tokenizer: Any) -> None:
    """A pool of two full-length sequences, eight requests at once: seven fit their prompts, one waits,
    and the seven cannot all grow to ~4 blocks in a 14-block pool, so some are preempted. None is lost,
    and each one's output is what it is alone."""
    max_model_len = 96
    block_bytes = 16 * 2 * 30 * 3 * 64 * 4  # fp32 demo model
    space = (2 * (max_model_len // 16 + 1)) * block_bytes
    streams = [Stream(PROMPTS[i % len(PROMPTS)] + f" ({i})", 40) for i in range(8)]
    harness = EngineHarness(model_dir, tokenizer, max_model_len=max_model_len, kv_cache_space=space)
    try:
        for stream in streams:
            harness.submit(stream)
        for stream in streams:
            assert stream.done.wait(300)
        engine = harness.engine
        assert engine is not None and engine.allocator.num_blocks == 2 * (max_model_len // 16 + 1)
        pressure = engine.scheduler.preemptions
        solo: list[list[int]] = []
        for stream in streams:
            alone = Stream(stream.prompt, stream.max_new_tokens)
            harness.submit(alone)
            assert alone.done.wait(300)
            solo.append(alone.token_ids)
    finally:
        harness.stop()
    assert [s.error for s in streams] == [None] * 8
    assert [s.token_ids for s in streams] == solo
    assert pressure > 0


# ---- over HTTP -----------------------------------------------------------------------------------


def _by_label(url: str, metric: str, label: str, values: tuple[str, ...]) -> dict[str, float]:
    """One metric's samples from /metrics, by the value of its one label."""
    import requests

    found = {}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        for value in values:
            if line.startswith(f'{metric}{{{label}="{value}"}} '):
                found[value] = float(line.split()[1])
    assert set(found) == set(values), f"{metric} is not in /metrics"
    return found


def _kv_blocks(url: str) -> dict[str, float]:
    return _by_label(url, "llm_kv_cache_blocks", "state", ("used", "free"))


def test_metrics_report_kv_blocks_held_by_a_running_request(servers: Any) -> None:
    import requests

    from tests.test_disconnect import wait_until

    url = servers.get("scheduler").url
    assert wait_until(lambda: _kv_blocks(url)["used"] == 0, 30) is not None
    total = _kv_blocks(url)["free"]
    body = {"inputs": PROMPTS[3], "stream": True, "parameters": {"max_new_tokens": 200, "ignore_eos_token": True}}
    with requests.post(url + "/invocations", json=body, stream=True, timeout=300) as res:
        lines = res.iter_lines()
        for _ in range(40):
            next(lines)
        during = _kv_blocks(url)
        for _ in lines:
            pass
    assert during["used"] >= 80 // 16 and during["used"] + during["free"] == total  # 40+ prompt, 40 output tokens
    assert wait_until(lambda: _kv_blocks(url) == {"used": 0, "free": total}, 30) is not None


def _engine_steps(url: str) -> dict[str, float]:
    return _by_label(url, "llm_engine_steps_total", "forward", ("compiled", "eager"))


def test_metrics_count_the_engines_steps_by_how_they_ran(servers: Any) -> None:
    """Without option.compile_decode every step is eager: at least one per token of a lone request."""
    import requests

    url = servers.get("scheduler").url
    before = _engine_steps(url)
    body = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 12, "ignore_eos_token": True}}
    requests.post(url + "/invocations", json=body, timeout=300).raise_for_status()
    after = _engine_steps(url)
    assert after["compiled"] == before["compiled"] == 0
    assert after["eager"] - before["eager"] >= 12
