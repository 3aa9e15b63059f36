"""From a sampled token to the request's TokenEvent: text increments, stop sequences, finish reasons,
prompt log-probs. Runs on the engine thread after the forward; knows nothing of tensors or the cache."""

from __future__ import annotations

from typing import Any

from llm_endpoint.backends.torch_engine.sampling import RowSample
from llm_endpoint.backends.torch_engine.sequence import Sequence
from llm_endpoint.backends.types import FinishReason, Token, TokenEvent


class OutputStep:
    def __init__(self, tokenizer: Any, eos_ids: frozenset[int], max_model_len: int | None) -> None:
        """`max_model_len` None: no length limit (attention sinks)."""
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.special_ids = frozenset(tokenizer.all_special_ids)
        self.max_model_len = max_model_len

    def record_prompt_logprobs(self, seq: Sequence, start: int, values: list[float]) -> None:
        """Log-probs of prompt tokens start+1 .. start+len(values) given the ones before them."""
        if seq.prefill_logprobs is None:
            first = seq.tokens[0]
            seq.prefill_logprobs = [self._token(first, None)]
        targets = seq.tokens[start + 1 : start + 1 + len(values)]
        seq.prefill_logprobs.extend(self._token(t, v) for t, v in zip(targets, values))

    def event(self, seq: Sequence, sample: RowSample) -> TokenEvent:
        """Append the sampled token to `seq` and describe it; the event is final when the request is done."""
        params = seq.request.params
        token_id = sample.token_id
        seq.tokens.append(token_id)
        if seq.constraint is not None:
            seq.constraint.accept(token_id)  # raises for a token the grammar refuses: this request fails
        text, stopped = seq.assembler.add(token_id)
        finish: FinishReason | None = None
        if stopped:
            finish = FinishReason.STOP_SEQUENCE
        elif token_id in self.eos_ids and not params.ignore_eos:
            finish = FinishReason.EOS_TOKEN
        elif seq.constraint is not None and seq.constraint.complete:  # only the end of text may follow
            finish = FinishReason.EOS_TOKEN
        elif seq.num_output >= params.max_new_tokens or (
                self.max_model_len is not None and len(seq.tokens) >= self.max_model_len):
            finish = FinishReason.LENGTH
        if finish is not None and finish is not FinishReason.STOP_SEQUENCE:
            text += seq.assembler.finish()
        event = TokenEvent(
            token=Token(token_id, text, sample.log_prob, token_id in self.special_ids),
            top_tokens=[self._token(t, lp) for t, lp in sample.top],
            finish_reason=finish,
        )
        if seq.num_output == 1 and seq.prefill_logprobs is not None:
            event.prefill = seq.prefill_logprobs
        if finish is not None:
            event.prompt_tokens = seq.num_prompt
            event.cached_tokens = seq.cached_prompt
            event.draft_tokens, event.accepted_draft_tokens = seq.drafted, seq.accepted
        return event

    def _token(self, token_id: int, log_prob: float | None) -> Token:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return Token(token_id, text, log_prob, token_id in self.special_ids)


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
