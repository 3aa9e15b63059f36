"""Our own continuous-batching engine on PyTorch + transformers (LMI's `rolling_batch=scheduler`).

One engine thread owns the model. Each iteration it admits waiting requests into free slots, runs one
prefill chunk for newcomers (bounded by a token budget, so running streams are never frozen for long), then
one decode step for every running sequence, and hands each request its token events. Requests join and
leave between steps. With `max_running=1` the same loop serves one request at a time (`rolling_batch=disable`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llm_endpoint.backends.base import Backend, BackendStats
from llm_endpoint.backends.errors import BackendError, RequestRejected, prompt_too_long
from llm_endpoint.backends.text import TextAssembler
from llm_endpoint.backends.torch_engine.kv_cache import SlotKVCache
from llm_endpoint.backends.torch_engine.sampling import sample_rows
from llm_endpoint.backends.types import FinishReason, GenerationRequest, Token, TokenEvent

log = logging.getLogger(__name__)

DEFAULT_PREFILL_TOKENS = 256


@dataclass(eq=False)
class _Sequence:
    """Engine-thread state of one request."""

    request: GenerationRequest
    deliver: Callable[[TokenEvent | BaseException], None]
    assembler: TextAssembler
    generator: torch.Generator | None
    slot: int = -1
    computed: int = 0  # tokens whose keys/values are in the cache
    output_ids: list[int] = field(default_factory=list)
    prefill: list[Token] | None = None
    cancelled: bool = False

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.request.prompt_token_ids

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt_ids)

    def history(self) -> torch.Tensor:
        return torch.tensor(list(self.prompt_ids) + self.output_ids, dtype=torch.long)


class TorchEngine:
    """The scheduler loop. Thread-safe entry points: `submit`, `abort`, `stats`, `stop`."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_running: int,
        max_model_len: int,
        prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_running = max_running
        self.max_model_len = max_model_len
        self.prefill_tokens = prefill_tokens
        config = model.config
        self._decoder = model.base_model
        self._lm_head = model.get_output_embeddings()
        self._eos_ids = _eos_token_ids(model, tokenizer)
        self.special_ids = frozenset(tokenizer.all_special_ids)
        param = next(model.parameters())
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache = SlotKVCache(
            num_layers=config.num_hidden_layers,
            num_slots=max_running,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            dtype=param.dtype,
            device=param.device,
            max_len=max_model_len,
        )
        self.device = param.device
        self._inbox: queue.SimpleQueue[tuple[str, _Sequence]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._free_slots = list(range(max_running - 1, -1, -1))
        self._submitted = 0  # submitted but not yet seen by the loop, for stats()
        self._lock = threading.Lock()
        self._stop = False

    # ---- thread-safe API -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask `run()` to fail what is left and return."""
        self._stop = True
        self._wake.set()

    def submit(self, seq: _Sequence) -> None:
        with self._lock:
            self._submitted += 1
        self._inbox.put(("add", seq))
        self._wake.set()

    def abort(self, seq: _Sequence) -> None:
        seq.cancelled = True
        self._inbox.put(("abort", seq))
        self._wake.set()

    def stats(self) -> BackendStats:
        with self._lock:
            pending = self._submitted
        return BackendStats(running=len(self._running), waiting=len(self._waiting) + pending)

    # ---- engine thread ---------------------------------------------------------------------------

    def run(self) -> None:
        """The scheduler loop; runs on the engine thread until `stop()`."""
        torch.set_grad_enabled(False)
        while not self._stop:
            self._drain_inbox()
            self._admit()
            if not self._running:
                self.cache.release_memory()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as exc:  # a failed forward pass fails the sequences in it, not the server
                log.exception("engine step failed")
                for seq in list(self._running):
                    self._fail(seq, BackendError(f"engine step failed: {type(exc).__name__}: {exc}"))
        for seq in list(self._running) + list(self._waiting):
            self._fail(seq, BackendError("server is shutting down"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                op, seq = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                with self._lock:
                    self._submitted -= 1
                if not seq.cancelled:
                    self._waiting.append(seq)
            elif seq in self._running:
                self._release(seq)
            elif seq in self._waiting:
                self._waiting.remove(seq)

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            seq = self._waiting.popleft()
            seq.slot = self._free_slots.pop()
            self._running.append(seq)

    def _release(self, seq: _Sequence) -> None:
        self._running.remove(seq)
        self._free_slots.append(seq.slot)
        seq.slot = -1

    def _fail(self, seq: _Sequence, exc: BaseException) -> None:
        if seq in self._running:
            self._release(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        seq.deliver(exc)

    def _step(self) -> None:
        prefill = self._plan_prefill()
        if prefill:
            self._run_prefill(prefill)
        decoding = sorted((s for s in self._running if not s.prefilling and s.output_ids), key=lambda s: s.slot)
        if decoding:
            self._run_decode(decoding)

    def _plan_prefill(self) -> list[tuple[_Sequence, int]]:
        """Newcomers' next chunks, oldest first, within the token budget."""
        budget = self.prefill_tokens
        plan: list[tuple[_Sequence, int]] = []
        for seq in self._running:
            if budget <= 0:
                break
            if seq.prefilling:
                take = min(len(seq.prompt_ids) - seq.computed, budget)
                plan.append((seq, take))
                budget -= take
        return plan

    def _forward(self, rows: slice | torch.Tensor, input_ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """One forward pass over `rows`; row i's tokens go to positions starts[i]...; returns hidden states."""
        n, q = input_ids.shape
        positions = starts.view(n, 1) + torch.arange(q).view(1, q)
        kv_len = int(positions.max().item()) + 1
        self.cache.bind(rows, positions, kv_len)
        mask = torch.arange(kv_len).view(1, 1, 1, kv_len) <= positions.view(n, 1, q, 1)
        out = self._decoder(
            input_ids=input_ids.to(self.device),
            position_ids=positions.to(self.device),
            attention_mask=mask.to(self.device),
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.last_hidden_state

    def _run_prefill(self, plan: list[tuple[_Sequence, int]]) -> None:
        width = max(take for _, take in plan)
        input_ids = torch.zeros((len(plan), width), dtype=torch.long)
        for i, (seq, take) in enumerate(plan):
            input_ids[i, :take] = torch.tensor(seq.prompt_ids[seq.computed : seq.computed + take])
        starts = torch.tensor([seq.computed for seq, _ in plan])
        rows = torch.tensor([seq.slot for seq, _ in plan])
        hidden = self._forward(rows, input_ids, starts)
        done: list[_Sequence] = []
        last_hidden: list[torch.Tensor] = []
        for i, (seq, take) in enumerate(plan):
            if seq.request.params.prompt_logprobs:
                self._record_prefill_logprobs(seq, hidden[i, :take], take)
            seq.computed += take
            if not seq.prefilling:
                done.append(seq)
                last_hidden.append(hidden[i, take - 1])
        if done:
            self._sample_and_emit(done, self._logits(torch.stack(last_hidden)))

    def _record_prefill_logprobs(self, seq: _Sequence, hidden: torch.Tensor, take: int) -> None:
        """Log-prob of each prompt token given the ones before it (LMI `decoder_input_details`)."""
        if seq.prefill is None:
            first = seq.prompt_ids[0]
            seq.prefill = [Token(first, self._token_text(first), None, self._is_special(first))]
        start = seq.computed
        targets = seq.prompt_ids[start + 1 : start + take + 1]
        if not targets:
            return
        logprobs = torch.log_softmax(self._logits(hidden[: len(targets)]), dim=-1)
        values = logprobs.gather(1, torch.tensor(targets).view(-1, 1)).view(-1).tolist()
        seq.prefill.extend(
            Token(t, self._token_text(t), v, self._is_special(t)) for t, v in zip(targets, values)
        )

    def _run_decode(self, decoding: list[_Sequence]) -> None:
        self._compact(decoding)
        n = len(decoding)
        input_ids = torch.tensor([[s.output_ids[-1]] for s in decoding], dtype=torch.long)
        starts = torch.tensor([s.computed for s in decoding])
        hidden = self._forward(slice(0, n), input_ids, starts)
        for s in decoding:
            s.computed += 1
        self._sample_and_emit(decoding, self._logits(hidden[:, -1]))

    def _compact(self, decoding: list[_Sequence]) -> None:
        """Move decoding rows into slots 0..n-1 (in `decoding` order) so a decode step reads a view, not a
        gathered copy of every row's cache. Rows only move when requests arrive or leave."""
        owner = {s.slot: s for s in self._running}
        for target, seq in enumerate(decoding):
            if seq.slot == target:
                continue
            other = owner.get(target)
            if other is None:
                self.cache.copy_row(seq.slot, target, seq.computed)
                self._free_slots.remove(target)
                self._free_slots.append(seq.slot)
                del owner[seq.slot]
            else:
                self.cache.swap_rows(seq.slot, target, seq.computed, other.computed)
                other.slot = seq.slot
                owner[other.slot] = other
            seq.slot = target
            owner[target] = seq

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm_head(hidden).float()

    def _sample_and_emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        params = [s.request.params for s in seqs]
        histories = [s.history() if s.request.params.repetition_penalty != 1.0 else None for s in seqs]
        samples = sample_rows(logits, params, histories, [s.generator for s in seqs])
        for seq, sample in zip(seqs, samples):
            try:
                self._emit(seq, sample.token_id, sample.log_prob, sample.top)
            except Exception as exc:  # one request's failure stays with that request
                log.exception("request %s failed", seq.request.request_id)
                self._fail(seq, BackendError(f"token processing failed: {type(exc).__name__}: {exc}"))

    def _emit(self, seq: _Sequence, token_id: int, log_prob: float, top: list[tuple[int, float]]) -> None:
        params = seq.request.params
        seq.output_ids.append(token_id)
        text, stopped = seq.assembler.add(token_id)
        finish: FinishReason | None = None
        if stopped:
            finish = FinishReason.STOP_SEQUENCE
        elif token_id in self._eos_ids and not params.ignore_eos:
            finish = FinishReason.EOS_TOKEN
        elif len(seq.output_ids) >= params.max_new_tokens or seq.computed + 1 >= self.max_model_len:
            finish = FinishReason.LENGTH
        if finish is not None and finish is not FinishReason.STOP_SEQUENCE:
            text += seq.assembler.finish()
        event = TokenEvent(
            token=Token(token_id, text, log_prob, self._is_special(token_id)),
            top_tokens=[Token(t, self._token_text(t), lp, self._is_special(t)) for t, lp in top],
            finish_reason=finish,
        )
        if len(seq.output_ids) == 1 and seq.prefill is not None:
            event.prefill = seq.prefill
        if finish is not None:
            event.prompt_tokens = len(seq.prompt_ids)
            self._release(seq)
        seq.deliver(event)

    def _is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
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


class TorchBackend(Backend):
    """Backend adapter: asyncio on the outside, the engine thread on the inside."""

    name = "scheduler"

    def __init__(
        self,
        model_loader: Callable[[], Any],
        tokenizer: Any,
        *,
        max_running: int,
        max_model_len: int,
        prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
    ) -> None:
        self._model_loader = model_loader
        self.tokenizer = tokenizer
        self._max_running = max_running
        self.max_model_len = max_model_len
        self._prefill_tokens = prefill_tokens
        self._engine: TorchEngine | None = None
        self._thread: threading.Thread | None = None

    def load(self) -> None:
        """Load the model, build the engine and run its loop, all on one dedicated thread.

        Every torch operation of the engine happens on that thread: torch work on any other thread (loading,
        allocating the KV cache) leaves behind a second OpenMP thread team, and with one around a decode step
        measured 50 ms instead of 28 ms on 2 cores.
        """
        ready = threading.Event()
        failure: list[BaseException] = []

        def engine_thread() -> None:
            try:
                self._engine = TorchEngine(
                    self._model_loader(),
                    self.tokenizer,
                    max_running=self._max_running,
                    max_model_len=self.max_model_len,
                    prefill_tokens=self._prefill_tokens,
                )
            except BaseException as exc:
                failure.append(exc)
                return
            finally:
                ready.set()
            self._engine.run()

        self._thread = threading.Thread(target=engine_thread, name="torch-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def stats(self) -> BackendStats:
        return self._engine.stats() if self._engine else BackendStats()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        engine = self._engine
        if engine is None:
            raise BackendError("model is not loaded")
        if len(request.prompt_token_ids) >= self.max_model_len:
            raise RequestRejected(prompt_too_long(len(request.prompt_token_ids), self.max_model_len))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()

        def deliver(item: TokenEvent | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        params = request.params
        generator = None
        if params.do_sample:
            generator = torch.Generator().manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        seq = _Sequence(
            request=request,
            deliver=deliver,
            assembler=TextAssembler(self.tokenizer, request.prompt_token_ids, params.stop_sequences,
                                    special_ids=engine.special_ids),
            generator=generator,
        )
        engine.submit(seq)
        finished = False
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                engine.abort(seq)

