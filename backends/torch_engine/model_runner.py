"""One step on the model: lay out the scheduled chunks, run the forward over the paged cache, and turn
the positions that need it into logits, samples and prompt log-probs. Knows nothing of requests' text."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from llm_endpoint.backends.torch_engine import compiled_decode, llama
from llm_endpoint.backends.torch_engine.block_cache import AttentionShape, PagedKVCache
from llm_endpoint.backends.torch_engine.forward_batch import ForwardBatch, Span
from llm_endpoint.backends.torch_engine.linear import PackedLinear
from llm_endpoint.backends.torch_engine.sampling import RowFailure, RowSample, sample_rows, verify_drafts
from llm_endpoint.backends.torch_engine.scheduler import Chunk
from llm_endpoint.backends.torch_engine.transformers_forward import TransformersForward

log = logging.getLogger(__name__)


@dataclass
class ChunkResult:
    chunk: Chunk
    # the token(s) drawn, in order (several when draft tokens were verified); None: the chunk did not reach
    # the sequence's end
    sample: list[RowSample] | RowFailure | None = None
    prompt_logprobs: list[float] | None = None  # for prompt tokens chunk.start+1 ..., when asked


class ModelRunner:
    def __init__(
        self, model: Any, cache: PagedKVCache, *, forward: str = "auto", compile_decode: bool = False,
        compile_several_rows: bool = True, compile_drafts: bool = False,
    ) -> None:
        """`forward`: "native" (our Llama-family forward), "transformers", or "auto" (native when it fits);
        `compile_decode`: a lone decode row's steps through `CompiledDecode` (our forward in bf16/fp16 only),
        with `compile_several_rows` steps of several decode rows, and with `compile_drafts` a lone sequence's
        draft verification too."""
        self.cache = cache
        config = model.config
        reason = llama.unsupported_reason(config)
        if forward == "native" and reason:
            raise ValueError(f"our forward cannot run this model: {reason}")
        if forward != "transformers" and reason is None:
            native = llama.LlamaForward(model)
            self._forward: llama.LlamaForward | TransformersForward = native
            log.info("engine forward: ours (Llama family%s)", ", weights packed for oneDNN" if native.packed else "")
        else:
            self._forward = TransformersForward(model)
            log.info("engine forward: transformers' (%s)", reason or "asked for")
        head = model.get_output_embeddings()
        self.vocab_size = int(head.weight.shape[0])  # the logits' width, which may exceed the tokenizer's
        self._lm_head = PackedLinear(head.weight, head.bias)
        self._dtype = head.weight.dtype
        self._group = AttentionShape.of(config).group
        self._device = next(model.parameters()).device
        self._decode: compiled_decode.CompiledDecode | None = None
        self.eager_steps = 0  # forward steps our eager forward ran (`/metrics`; compiled ones: `compiled_steps`)
        if compile_decode:
            if reason := compiled_decode.unsupported_reason(config, self._dtype, forward):
                raise ValueError(f"option.compile_decode {reason}; set it to auto or false")
            assert isinstance(self._forward, llama.LlamaForward)
            self._decode = compiled_decode.CompiledDecode(model, self._forward.rotary, several_rows=compile_several_rows,
                                                          drafts=compile_drafts)

    def warm_up(self, blocks: list[int]) -> None:
        """Compile what is compiled before the first request, writing into `blocks` (the caller clears them)."""
        if self._decode is not None:
            self._decode.warm_up(self.cache, blocks, self._group)

    @property
    def compiled_steps(self) -> int:
        return self._decode.steps.total() if self._decode is not None else 0

    @property
    def rotary(self) -> Any:
        """The checkpoint's rotary embedding module (our forward only; what re-rotation reads)."""
        if not isinstance(self._forward, llama.LlamaForward):
            raise ValueError("re-rotating keys needs our Llama-family forward")
        return self._forward.rotary

    def execute(self, chunks: list[Chunk]) -> list[ChunkResult]:
        """Results follow the order the model saw the chunks in: by token count (decode rows, then drafts to
        verify and prefill chunks), then ascending length, so `ForwardBatch` groups runs of them."""
        chunks = sorted(chunks, key=lambda c: (c.count, c.seq.cache_len))
        spans: list[Span] = []
        offset = 0
        for chunk in chunks:
            spans.append(Span(offset, chunk.count, chunk.seq.cache_len, chunk.seq.block_table))
            offset += chunk.count
        tokens = [c.seq.tokens[c.start : c.start + c.fed] + list(c.draft) for c in chunks]
        batch = ForwardBatch.build(spans, tokens, block_size=self.cache.block_size, group=self._group,
                                   dtype=self._dtype, device=self._device)
        if self._decode is not None and self._decode.takes(batch):
            hidden = self._decode(batch, self.cache)
        else:
            hidden = self._forward(batch, self.cache)
            self.eager_steps += 1
        results = [ChunkResult(c) for c in chunks]
        self._prompt_logprobs(results, spans, hidden)
        self._draw(results, spans, hidden)
        return results

    def _draw(self, results: list[ChunkResult], spans: list[Span], hidden: torch.Tensor) -> None:
        """Sample the next token of each chunk that reaches its sequence's end, and verify each draft, from
        one pass of the LM head: it reads the whole embedding matrix (tens of MB), so a call per drafting row
        would cost more than the row's attention."""
        sampling = [(r, s) for r, s in zip(results, spans) if r.chunk.samples and not r.chunk.draft]
        allowed = [_allowed_tokens(r) for r, _ in sampling]  # a failed grammar records its row's failure
        kept = [(pair, a) for pair, a in zip(sampling, allowed) if not isinstance(a, RowFailure)]
        sampling, masks = [pair for pair, _ in kept], [a for _, a in kept]  # each mask beside its own row
        drafting = [(r, s) for r, s in zip(results, spans) if r.chunk.draft]
        rows = [s.offset + s.count - 1 for _, s in sampling]
        for result, span in drafting:
            # the prediction after the sequence's last token, then each draft token's
            rows.extend(range(span.offset + result.chunk.fed - 1, span.offset + span.count))
        if not rows:
            return
        logits = self._logits(hidden[torch.tensor(rows, device=self._device)])
        if sampling:
            seqs = [r.chunk.seq for r, _ in sampling]
            params = [s.request.params for s in seqs]
            histories = [s.history() if p.penalizes else None for s, p in zip(seqs, params)]
            samples = sample_rows(logits[: len(sampling)], params, histories, [s.generator for s in seqs], masks)
            for (result, _), sample in zip(sampling, samples):
                result.sample = sample if isinstance(sample, RowFailure) else [sample]
        at = len(sampling)
        for result, _ in drafting:
            chunk, seq = result.chunk, result.chunk.seq
            params = seq.request.params
            history = seq.history() if params.penalizes else None
            result.sample = verify_drafts(logits[at : at + len(chunk.draft) + 1], chunk.draft, params, history,
                                          seq.generator)
            at += len(chunk.draft) + 1

    def _prompt_logprobs(self, results: list[ChunkResult], spans: list[Span], hidden: torch.Tensor) -> None:
        for result, span in zip(results, spans):
            chunk, seq = result.chunk, result.chunk.seq
            if not seq.request.params.prompt_logprobs:
                continue
            recorded = len(seq.prefill_logprobs or ())
            if recorded != (chunk.start + 1 if chunk.start else 0):
                continue  # a recomputation after preemption: already recorded
            targets = seq.tokens[chunk.start + 1 : min(chunk.start + chunk.count + 1, seq.num_prompt)]
            if not targets and chunk.start:
                continue
            logprobs = torch.log_softmax(self._logits(hidden[span.offset : span.offset + len(targets)]), dim=-1)
            index = torch.tensor(targets, dtype=torch.long, device=logprobs.device).view(-1, 1)
            result.prompt_logprobs = logprobs.gather(1, index).view(-1).tolist()

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm_head(hidden).float()


def _allowed_tokens(result: ChunkResult) -> torch.Tensor | RowFailure | None:
    """The tokens a structured-output row may draw next (None: any); a matcher that fails marks its row."""
    constraint = result.chunk.seq.constraint
    if constraint is None:
        return None
    try:
        return constraint.allowed()
    except Exception as exc:  # the row's grammar failed: that request alone
        result.sample = RowFailure(f"structured output failed: {exc}")
        return result.sample
