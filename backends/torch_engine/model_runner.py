"""One step on the model: lay out the scheduled chunks, run the forward over the paged cache, and turn
the positions that need it into logits, samples and prompt log-probs. Knows nothing of requests' text."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from llm_endpoint.backends.torch_engine import llama
from llm_endpoint.backends.torch_engine.block_cache import AttentionShape, PagedKVCache
from llm_endpoint.backends.torch_engine.forward_batch import ForwardBatch, Span
from llm_endpoint.backends.torch_engine.linear import PackedLinear
from llm_endpoint.backends.torch_engine.sampling import RowFailure, RowSample, sample_rows
from llm_endpoint.backends.torch_engine.scheduler import Chunk
from llm_endpoint.backends.torch_engine.transformers_forward import TransformersForward

log = logging.getLogger(__name__)


@dataclass
class ChunkResult:
    chunk: Chunk
    sample: RowSample | RowFailure | None = None  # None: the chunk did not reach the sequence's end
    prompt_logprobs: list[float] | None = None  # for prompt tokens chunk.start+1 ..., when asked


class ModelRunner:
    def __init__(self, model: Any, cache: PagedKVCache, *, forward: str = "auto") -> None:
        """`forward`: "native" (our Llama-family forward), "transformers", or "auto" (native when it fits)."""
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
        self._lm_head = PackedLinear(head.weight, head.bias)
        self._dtype = head.weight.dtype
        self._group = AttentionShape.of(config).group
        self._device = next(model.parameters()).device

    @property
    def rotary(self) -> Any:
        """The checkpoint's rotary embedding module (our forward only; what re-rotation reads)."""
        if not isinstance(self._forward, llama.LlamaForward):
            raise ValueError("re-rotating keys needs our Llama-family forward")
        return self._forward.rotary

    def execute(self, chunks: list[Chunk]) -> list[ChunkResult]:
        """Chunks with single tokens must come first (the scheduler's order); results follow the order the
        model saw them in (single tokens by ascending length, for `ForwardBatch`'s decode groups)."""
        decoding = next((i for i, c in enumerate(chunks) if c.count != 1), len(chunks))
        chunks = sorted(chunks[:decoding], key=lambda c: c.seq.cache_len) + chunks[decoding:]
        spans: list[Span] = []
        offset = 0
        for chunk in chunks:
            spans.append(Span(offset, chunk.count, chunk.seq.cache_len, chunk.seq.block_table))
            offset += chunk.count
        tokens = [c.seq.tokens[c.start : c.start + c.count] for c in chunks]
        batch = ForwardBatch.build(spans, tokens, block_size=self.cache.block_size, group=self._group,
                                   dtype=self._dtype, device=self._device)
        hidden = self._forward(batch, self.cache)
        results = [ChunkResult(c) for c in chunks]
        self._prompt_logprobs(results, spans, hidden)
        sampling = [(r, s) for r, s in zip(results, spans) if r.chunk.samples]
        if sampling:
            rows = torch.tensor([s.offset + s.count - 1 for _, s in sampling], device=self._device)
            seqs = [r.chunk.seq for r, _ in sampling]
            params = [s.request.params for s in seqs]
            histories = [s.history() if p.repetition_penalty != 1.0 else None for s, p in zip(seqs, params)]
            samples = sample_rows(self._logits(hidden[rows]), params, histories, [s.generator for s in seqs])
            for (result, _), sample in zip(sampling, samples):
                result.sample = sample
        return results

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
