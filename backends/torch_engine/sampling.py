"""Choose the next token for every row of a batch, each row with its own parameters and RNG.

Order and semantics follow transformers' generate (repetition penalty, then temperature, top-k, top-p),
so greedy output matches it token for token. Reported log-probs come from the raw logits, before any of
that: they are the model's own distribution, which is what LMI users average into a confidence score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_endpoint.backends.types import SamplingParams


@dataclass
class RowSample:
    token_id: int
    log_prob: float
    top: list[tuple[int, float]]  # (token id, raw log-prob), best first


def apply_repetition_penalty(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> None:
    """In place, like transformers' RepetitionPenaltyLogitsProcessor: shrink logits of seen tokens."""
    seen = scores.gather(0, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    scores.scatter_(0, history, seen)


def _warp_and_draw(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k > 0 and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= (1 - params.top_p)
        remove_sorted[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(remove_sorted.scatter(0, order, remove_sorted), float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample_rows(
    logits: torch.Tensor,
    params: list[SamplingParams],
    histories: list[torch.Tensor | None],
    generators: list[torch.Generator | None],
) -> list[RowSample]:
    """`logits` is [rows, vocab] fp32; `histories[i]` holds row i's prompt+output ids when it needs them."""
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    greedy_plain = [i for i, p in enumerate(params) if p.greedy and p.repetition_penalty == 1.0]
    chosen: dict[int, int] = {}
    if greedy_plain:
        picks = logits[greedy_plain].argmax(dim=-1).tolist()
        chosen.update(zip(greedy_plain, picks))
    for i, p in enumerate(params):
        if i in chosen:
            continue
        scores = logits[i].clone()
        history = histories[i]
        if p.repetition_penalty != 1.0 and history is not None and history.numel():
            apply_repetition_penalty(scores, history, p.repetition_penalty)
        chosen[i] = int(scores.argmax().item()) if p.greedy else _warp_and_draw(scores, p, generators[i])

    ids = torch.tensor([chosen[i] for i in range(len(params))], dtype=torch.long)
    chosen_logprobs = raw_logprobs.gather(1, ids.view(-1, 1)).view(-1).tolist()
    max_top = max((p.top_n_tokens for p in params), default=0)
    tops: list[list[tuple[int, float]]] = [[] for _ in params]
    if max_top:
        values, indices = torch.topk(raw_logprobs, max_top, dim=-1)
        for i, p in enumerate(params):
            n = p.top_n_tokens
            if n:
                tops[i] = list(zip(indices[i, :n].tolist(), values[i, :n].tolist()))
    return [RowSample(chosen[i], chosen_logprobs[i], tops[i]) for i in range(len(params))]
