"""Choose the next token for every row of a batch, each row with its own parameters and RNG.

Order and semantics follow transformers' generate (repetition penalty, then temperature, top-k, top-p),
so greedy output matches it token for token; OpenAI's frequency and presence penalties come right after the
repetition penalty, as vLLM applies them. Reported log-probs come from the raw logits, before any of
that: they are the model's own distribution, which is what LMI users average into a confidence score.

A row that cannot be sampled (non-finite logits from the model, or probabilities its parameters made
non-finite) yields a `RowFailure` for that row alone; every other row is drawn exactly as without it.
A structured-output row draws only among the tokens its grammar allows (`allowed`); its log-probs are
still the raw model's.
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


@dataclass
class RowFailure:
    reason: str


@dataclass(frozen=True)
class Seen:
    """The tokens a sequence holds so far (prompt, then output), for the penalties that depend on them."""

    ids: torch.Tensor
    prompt_len: int

    def extended(self, accepted: tuple[int, ...]) -> Seen:
        return Seen(torch.cat((self.ids, torch.tensor(accepted, dtype=torch.long))), self.prompt_len)


def apply_output_penalties(scores: torch.Tensor, output: torch.Tensor, frequency: float, presence: float) -> None:
    """In place, OpenAI's definition: logit[j] -= frequency * count[j] + presence * (count[j] > 0), counting
    output tokens only."""
    counts = torch.bincount(output, minlength=scores.numel())[: scores.numel()].to(scores.dtype)
    scores -= frequency * counts + presence * (counts > 0).to(scores.dtype)


def apply_repetition_penalty(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> None:
    """In place, like transformers' RepetitionPenaltyLogitsProcessor: shrink logits of seen tokens."""
    seen = scores.gather(0, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    scores.scatter_(0, history, seen)


def _warped_probs(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled row draws from: temperature, then top-k, then top-p."""
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
    if not bool(torch.isfinite(probs).all()):
        raise FloatingPointError("the sampling parameters made the token probabilities non-finite")
    return probs


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample_rows(
    logits: torch.Tensor,
    params: list[SamplingParams],
    histories: list[Seen | None],
    generators: list[torch.Generator | None],
    allowed: list[torch.Tensor | None] | None = None,
) -> list[RowSample | RowFailure]:
    """`logits` is [rows, vocab] fp32; `histories[i]` holds row i's tokens when its penalties need them;
    `allowed[i]` ([vocab] bool), when given, the only tokens row i may draw."""
    finite = torch.isfinite(logits.sum(dim=-1)).tolist()  # a NaN or inf anywhere makes the row's sum one
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    scores = _masked(logits, allowed)
    greedy_plain = [i for i, p in enumerate(params) if p.greedy and not p.penalizes and finite[i]]
    chosen: dict[int, int] = {}
    failed: dict[int, RowFailure] = {}
    if greedy_plain:
        picks = scores[greedy_plain].argmax(dim=-1).tolist()
        chosen.update(zip(greedy_plain, picks))
    for i, p in enumerate(params):
        if i in chosen:
            continue
        if not finite[i]:
            failed[i] = RowFailure("the model produced non-finite logits for this request")
            continue
        try:
            chosen[i] = _choose(scores[i].clone(), p, histories[i], generators[i])
        except (FloatingPointError, RuntimeError) as exc:  # torch reports bad probabilities as RuntimeError
            failed[i] = RowFailure(str(exc))

    ids = torch.tensor([chosen.get(i, 0) for i in range(len(params))], dtype=torch.long)
    chosen_logprobs = raw_logprobs.gather(1, ids.view(-1, 1)).view(-1).tolist()
    max_top = max((p.top_n_tokens for i, p in enumerate(params) if i in chosen), default=0)
    tops: list[list[tuple[int, float]]] = [[] for _ in params]
    if max_top:
        values, indices = torch.topk(raw_logprobs, max_top, dim=-1)
        for i, p in enumerate(params):
            n = p.top_n_tokens
            if n and i in chosen:
                tops[i] = list(zip(indices[i, :n].tolist(), values[i, :n].tolist()))
    return [failed[i] if i in failed else RowSample(chosen[i], chosen_logprobs[i], tops[i]) for i in range(len(params))]


def _masked(logits: torch.Tensor, allowed: list[torch.Tensor | None] | None) -> torch.Tensor:
    """`logits` with the tokens a row may not draw at -inf; the same tensor when no row is constrained."""
    if not allowed or all(a is None for a in allowed):
        return logits
    scores = logits.clone()
    for i, row_allowed in enumerate(allowed):
        if row_allowed is not None:
            scores[i, : row_allowed.numel()].masked_fill_(~row_allowed, float("-inf"))
    return scores


def _penalized(scores: torch.Tensor, params: SamplingParams, history: Seen | None) -> torch.Tensor:
    if history is None:
        return scores
    if params.repetition_penalty != 1.0 and history.ids.numel():
        apply_repetition_penalty(scores, history.ids, params.repetition_penalty)
    output = history.ids[history.prompt_len :]
    if (params.frequency_penalty or params.presence_penalty) and output.numel():
        apply_output_penalties(scores, output, params.frequency_penalty, params.presence_penalty)
    return scores


def _choose(
    scores: torch.Tensor, params: SamplingParams, history: Seen | None, generator: torch.Generator | None
) -> int:
    scores = _penalized(scores, params, history)
    return int(scores.argmax().item()) if params.greedy else _draw(_warped_probs(scores, params), generator)


def verify_drafts(
    logits: torch.Tensor, draft: tuple[int, ...], params: SamplingParams, history: Seen | None,
    generator: torch.Generator | None,
) -> list[RowSample] | RowFailure:
    """The tokens one verification pass yields: `logits` [len(draft)+1, vocab] fp32 are the model's
    predictions after the sequence's last token and after each draft token; `history` the sequence's ids.

    Greedy keeps the longest prefix of the draft that the model's own choices reproduce, plus the model's
    token where they part (or after the last draft). Sampling keeps the output distribution exactly
    (speculative sampling with a deterministic draft): draft token d is accepted with probability p(d) under
    the row's warped distribution p; on rejection the token is drawn from p without d, renormalized, and
    the pass ends. The penalties see each accepted token before the next position, as they would one step
    at a time. Log-probs are the raw model's at each position."""
    if not bool(torch.isfinite(logits.sum(dim=-1)).all()):
        return RowFailure("the model produced non-finite logits for this request")
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    out: list[RowSample] = []
    plain_greedy = params.greedy and not params.penalizes
    best = logits.argmax(dim=-1).tolist() if plain_greedy else []  # every position's choice at once
    try:
        for i in range(len(draft) + 1):
            seen = history.extended(draft[:i]) if history is not None and i else history
            proposed = draft[i] if i < len(draft) else None
            if plain_greedy:
                choice = best[i]
            elif params.greedy:
                choice = int(_penalized(logits[i].clone(), params, seen).argmax().item())
            else:
                probs = _warped_probs(_penalized(logits[i].clone(), params, seen), params)
                if proposed is not None and float(torch.rand(1, generator=generator)) < float(probs[proposed]):
                    choice = proposed
                else:
                    if proposed is not None:
                        probs[proposed] = 0.0
                        probs = probs / probs.sum()
                    choice = _draw(probs, generator)
            top: list[tuple[int, float]] = []
            if params.top_n_tokens:
                values, indices = torch.topk(raw_logprobs[i], params.top_n_tokens)
                top = list(zip(indices.tolist(), values.tolist()))
            out.append(RowSample(choice, float(raw_logprobs[i, choice]), top))
            if choice != proposed:
                break
    except (FloatingPointError, RuntimeError) as exc:
        return RowFailure(str(exc))
    return out
