"""Our own continuous-batching engine on PyTorch (LMI's `rolling_batch=scheduler`): the engine thread's
loop, and the asyncio-facing backend.

Each iteration the loop takes commands from other threads, lets the scheduler pick the step's chunks
(every decoding sequence's next token plus prefill chunks within a token budget, so running streams are
never frozen for long), runs them through the model runner in one forward, and hands each request its
token events through the output step. Requests join and leave between steps. With `max_running=1` the
same loop serves one request at a time (`rolling_batch=disable`).

Failures stay with the request they belong to: a row the sampler cannot draw, or any exception while
turning a row's token into its event, fails that request alone; a forward pass that raises is retried
one sequence at a time (rewriting a chunk's cache slots is harmless), so only the culprit fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import queue
import random
import threading
from collections.abc import AsyncGenerator, Callable
from typing import Any

import torch

from llm_endpoint.backends.base import Backend, BackendStats
from llm_endpoint.backends.errors import BackendError, RequestRejected, prompt_too_long
from llm_endpoint.backends.text import TextAssembler
from llm_endpoint.backends.torch_engine import compiled_decode, llama
from llm_endpoint.backends.torch_engine.block_cache import (
    DEFAULT_BLOCK_SIZE,
    AttentionShape,
    BlockAllocator,
    PagedKVCache,
    blocks_for,
)
from llm_endpoint.backends.torch_engine.grammar import Constraint, GrammarError, Grammars
from llm_endpoint.backends.torch_engine.model_runner import ChunkResult, ModelRunner
from llm_endpoint.backends.torch_engine.output import OutputStep, eos_token_ids
from llm_endpoint.backends.torch_engine.prompt_lookup import DEFAULT_MAX_NGRAM as DEFAULT_PROMPT_LOOKUP_MAX_NGRAM
from llm_endpoint.backends.torch_engine.prompt_lookup import NgramProposer
from llm_endpoint.backends.torch_engine.sampling import RowFailure, RowSample
from llm_endpoint.backends.torch_engine.scheduler import Chunk, Scheduler
from llm_endpoint.backends.torch_engine.sequence import Abort, Add, CloseSession, Command, Sequence, Status
from llm_endpoint.backends.torch_engine.session_cache import SessionCache
from llm_endpoint.backends.torch_engine.sinks import (
    Rerotation,
    SinkWindow,
    check_fits,
    evict,
    rope_unsupported_reason,
)
from llm_endpoint.backends.types import GenerationRequest, TokenEvent

log = logging.getLogger(__name__)

DEFAULT_PREFILL_TOKENS = 256
DEFAULT_KV_CACHE_FRACTION = 0.25  # of physical memory, when option.kv_cache_space is not set
DEFAULT_SESSION_FRACTION = 0.125  # of physical memory idle sessions may keep, when sessions_max_memory is not set
# compile_decode=auto compiles only where its second, packed copy of the weights is at most this share of RAM
COMPILE_WEIGHTS_FRACTION = 0.125


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_cache_blocks(
    config: Any, *, dtype: torch.dtype, max_running: int, max_model_len: int, space_bytes: int | None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> int:
    """Pool size: `space_bytes` if given, else enough for every slot at full length but at most a quarter
    of RAM; never less than one full-length sequence (so every admitted request can finish alone).
    `max_model_len` is the most cache entries one sequence holds (a sink cache's capacity)."""
    per_block = AttentionShape.of(config).block_bytes(block_size, dtype)
    one_sequence = blocks_for(max_model_len, block_size) + 1
    if space_bytes is not None:
        blocks = space_bytes // per_block
        if blocks < one_sequence:
            raise ValueError(
                f"option.kv_cache_space={space_bytes / 2**30:.2f} GiB holds {blocks} KV blocks; one "
                f"{max_model_len}-token sequence needs {one_sequence} ({one_sequence * per_block / 2**30:.2f} GiB): "
                "raise it or lower option.max_model_len"
            )
        return int(blocks)
    worst = max_running * one_sequence
    budget = int(_physical_memory() * DEFAULT_KV_CACHE_FRACTION) // per_block
    return max(one_sequence, min(worst, budget))


def compile_by_default_reason(model: Any, *, forward: str, attention_sinks: bool) -> str | None:
    """Why `option.compile_decode=auto` leaves decode steps eager (None: it compiles a lone row's steps, the
    only ones where compiling was measured to pay; README, Performance). Beyond what the compiled step can
    serve at all: it was measured on CPUs only, not with attention sinks; and its extra copy of the weights
    must be small beside RAM."""
    param = next(model.parameters())
    if reason := compiled_decode.unsupported_reason(model.config, param.dtype, forward):
        return reason
    if param.device.type != "cpu":
        return f"compiles by default on CPUs only (measured there), not on {param.device.type}"
    if attention_sinks:
        return "compiles by default without attention sinks only (not measured with them)"
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if weights > _physical_memory() * COMPILE_WEIGHTS_FRACTION:
        return (f"compiles by default only where its packed copy of the weights ({weights / 2**30:.1f} GiB) "
                f"is at most {COMPILE_WEIGHTS_FRACTION:.1%} of RAM")
    return None


class TorchEngine:
    """The engine loop. Thread-safe entry points: `submit`, `abort`, `stats`, `stop`."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_running: int,
        max_model_len: int,
        prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
        kv_cache_space: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        forward: str = "auto",
        attention_sinks: tuple[int, int] | None = None,
        session_space: int | None = None,
        compile_decode: bool | None = False,
        compile_drafts: bool = False,
    ) -> None:
        """`attention_sinks`: (sinks, window) for StreamingLLM, None for dense attention; `session_space`:
        bytes of KV idle sessions may keep (None: DEFAULT_SESSION_FRACTION of RAM); `compile_decode`: decode
        steps through torch.compile, compiled here (see `compiled_decode`; None: unless
        `compile_by_default_reason` gives one, and then a lone row's steps only), and with `compile_drafts`
        (prompt lookup on by default) a lone sequence's draft verification too."""
        config = model.config
        param = next(model.parameters())
        shape = AttentionShape.of(config)
        if attention_sinks:
            check_fits(*attention_sinks, max_model_len)
        self.sinks = SinkWindow(*attention_sinks, block_size) if attention_sinks else None
        per_sequence = self.sinks.capacity if self.sinks else max_model_len
        num_blocks = kv_cache_blocks(config, dtype=param.dtype, max_running=max_running,
                                     max_model_len=per_sequence, space_bytes=kv_cache_space, block_size=block_size)
        self.allocator = BlockAllocator(num_blocks, block_size)
        cache = PagedKVCache(
            num_layers=shape.layers, num_blocks=num_blocks, block_size=block_size, num_kv_heads=shape.kv_heads,
            head_dim=shape.head_dim, dtype=param.dtype, device=param.device,
        )
        self._block_bytes = shape.block_bytes(block_size, param.dtype)
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB reserved, touched as used)", num_blocks, block_size,
                 num_blocks * self._block_bytes / 2**30)
        if self.sinks and (reason := llama.unsupported_reason(config) or rope_unsupported_reason(config)):
            raise ValueError(f"option.attention_sinks cannot serve this model ({reason}); it needs our "
                             "Llama-family forward (Llama, Mistral, Qwen2, SmolLM) with a fixed RoPE")
        several_rows = True  # what an explicit compile_decode=true compiles; auto leaves several rows eager
        if compile_decode is None:
            reason = compile_by_default_reason(model, forward=forward, attention_sinks=self.sinks is not None)
            compile_decode, several_rows = reason is None, False
            log.info("decode steps: %s (option.compile_decode=auto)",
                     f"eager: it {reason}" if reason else "a lone row's compiled, several rows' eager")
        self.runner = ModelRunner(model, cache, forward="native" if self.sinks else forward,
                                  compile_decode=compile_decode, compile_several_rows=several_rows,
                                  compile_drafts=compile_drafts)
        if compile_decode:
            warm_up_blocks = list(range(min(64, num_blocks)))
            with torch.inference_mode():  # the mode every step runs in, so the compiled graphs' guards hold
                self.runner.warm_up(warm_up_blocks)
                cache.clear(warm_up_blocks)
        self.output = OutputStep(tokenizer, eos_token_ids(model, tokenizer), None if self.sinks else max_model_len)
        self.special_ids = self.output.special_ids
        session_bytes = session_space if session_space is not None else int(_physical_memory() * DEFAULT_SESSION_FRACTION)
        self.sessions = SessionCache(self.allocator, max_blocks=session_bytes // self._block_bytes,
                                     sinks=self.sinks.sinks if self.sinks else 0)
        self._rerotate = Rerotation(self.runner.rotary) if self.sinks else None
        self.scheduler = Scheduler(
            self.allocator, max_running=max_running, prefill_tokens=prefill_tokens, sessions=self.sessions,
            cache_limit=self.sinks.capacity if self.sinks else None, evict=self._evict if self.sinks else None,
        )
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._submitted = 0  # submitted but not yet seen by the loop, for stats()
        self._lock = threading.Lock()
        self._stop = False
        self._stats = BackendStats(kv_blocks_total=num_blocks)

    # ---- thread-safe API -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask `run()` to fail what is left and return."""
        self._stop = True
        self._wake.set()

    def submit(self, seq: Sequence) -> None:
        with self._lock:
            self._submitted += 1
        self._inbox.put(Add(seq))
        self._wake.set()

    def abort(self, seq: Sequence) -> None:
        seq.cancelled = True
        self._inbox.put(Abort(seq))
        self._wake.set()

    def close_session(self, session_id: str) -> None:
        self._inbox.put(CloseSession(session_id))
        self._wake.set()

    def stats(self) -> BackendStats:
        with self._lock:
            pending = self._submitted
            stats = self._stats
        return dataclasses.replace(stats, waiting=stats.waiting + pending)

    # ---- engine thread ---------------------------------------------------------------------------

    def run(self) -> None:
        """The loop; runs on the engine thread until `stop()`."""
        torch.set_grad_enabled(False)
        while not self._stop:
            self._drain_inbox()
            chunks = self.scheduler.schedule()
            self._publish_stats()
            if not chunks:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            with torch.inference_mode():
                granted = self.allocator.take_granted()
                if granted:
                    self.runner.cache.clear(granted)
                results = self._execute(chunks)
            for result in results:
                self._finish_chunk(result)
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._fail(seq, BackendError("server is shutting down"))

    def _publish_stats(self) -> None:
        s = self.scheduler
        with self._lock:
            self._stats = BackendStats(running=len(s.running), waiting=len(s.waiting),
                                       kv_blocks_used=self.allocator.used_blocks,
                                       kv_blocks_total=self.allocator.num_blocks,
                                       session_kv_bytes=self.sessions.held_blocks * self._block_bytes,
                                       compiled_steps=self.runner.compiled_steps,
                                       eager_steps=self.runner.eager_steps)

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, CloseSession):
                self.sessions.close(command.session_id)
            elif isinstance(command, Add):
                with self._lock:
                    self._submitted -= 1
                if not command.seq.cancelled:
                    self.scheduler.add(command.seq)
            elif command.seq.status is not Status.FINISHED:
                self.scheduler.remove(command.seq, keep=True)

    def _execute(self, chunks: list[Chunk]) -> list[ChunkResult]:
        try:
            return self.runner.execute(chunks)
        except Exception as exc:
            if len(chunks) == 1:
                log.exception("engine step failed for request %s", chunks[0].seq.request.request_id)
                self._fail(chunks[0].seq, BackendError(f"engine step failed: {type(exc).__name__}: {exc}"))
                return []
            log.warning("engine step over %d sequences failed (%s); retrying each alone", len(chunks), exc)
        results: list[ChunkResult] = []
        for chunk in chunks:
            results.extend(self._execute([chunk]))
        return results

    def _finish_chunk(self, result: ChunkResult) -> None:
        chunk, seq = result.chunk, result.chunk.seq
        if seq.status is not Status.RUNNING:
            return
        try:
            seq.computed += chunk.fed
            seq.cache_len += chunk.fed
            if result.prompt_logprobs is not None:
                self.output.record_prompt_logprobs(seq, chunk.start, result.prompt_logprobs)
            if result.sample is None:
                return
            if isinstance(result.sample, RowFailure):
                log.warning("request %s failed: %s", seq.request.request_id, result.sample.reason)
                self._fail(seq, BackendError(f"sampling failed: {result.sample.reason}"))
                return
            self._emit(seq, chunk, result.sample)
        except Exception as exc:  # one request's failure stays with that request
            log.exception("request %s failed", seq.request.request_id)
            self._fail(seq, BackendError(f"token processing failed: {type(exc).__name__}: {exc}"))

    def _emit(self, seq: Sequence, chunk: Chunk, samples: list[RowSample]) -> None:
        """One event per drawn token, in order, until the request finishes. Of a verified draft, the tokens
        accepted before the last one drawn were fed with it: their cache entries stand; the rest are cut."""
        seq.drafted += len(chunk.draft)
        if chunk.draft:
            seq.draft_odds.record(len(samples) - 1, len(chunk.draft))
        elif seq.proposer is not None:
            seq.draft_odds.record_shadow(samples[0].token_id)
        for i, sample in enumerate(samples):
            if i:  # an accepted draft token: its key/value were written by this step
                seq.computed += 1
                seq.cache_len += 1
                seq.accepted += 1
            event = self.output.event(seq, sample)
            if event.finished:
                self.scheduler.remove(seq, keep=True)
            seq.deliver(event)
            if event.finished:
                return
        if chunk.draft:
            self.allocator.truncate(seq.block_table, seq.cache_len)

    def _evict(self, seq: Sequence) -> None:
        """Make room in `seq`'s full sink cache (the scheduler's hook)."""
        assert self.sinks is not None and self._rerotate is not None
        seq.cache_len = evict(self.runner.cache, self.allocator, seq.block_table, sinks=self.sinks.sinks,
                              cache_len=seq.cache_len, count=self.sinks.evict_tokens, rerotate=self._rerotate)

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        if seq.status is not Status.FINISHED:
            self.scheduler.remove(seq)
        try:
            seq.deliver(exc)
        except Exception:  # the request's consumer is gone (e.g. its event loop closed)
            log.exception("could not report the failure of request %s", seq.request.request_id)


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
        kv_cache_space: int | None = None,
        attention_sinks: tuple[int, int] | None = None,
        session_space: int | None = None,
        prompt_lookup_max_ngram: int = DEFAULT_PROMPT_LOOKUP_MAX_NGRAM,
        compile_decode: bool | None = False,
        compile_drafts: bool = False,
    ) -> None:
        self._model_loader = model_loader
        self.prompt_lookup_max_ngram = prompt_lookup_max_ngram
        self.tokenizer = tokenizer
        # With attention sinks a prompt of any length fits: it is prefilled through the sink cache.
        self.max_prompt_len = None if attention_sinks else max_model_len
        self._engine_args: dict[str, Any] = dict(
            max_running=max_running, max_model_len=max_model_len, prefill_tokens=prefill_tokens,
            kv_cache_space=kv_cache_space, attention_sinks=attention_sinks, session_space=session_space,
            compile_decode=compile_decode, compile_drafts=compile_drafts,
        )
        self._engine: TorchEngine | None = None
        self._grammars: Grammars | None = None
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
                self._engine = TorchEngine(self._model_loader(), self.tokenizer, **self._engine_args)
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
        assert self._engine is not None
        self._grammars = Grammars(self.tokenizer, self._engine.runner.vocab_size, self._engine.output.eos_ids)

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def stats(self) -> BackendStats:
        return self._engine.stats() if self._engine else BackendStats()

    def close_session(self, session_id: str) -> None:
        if self._engine is not None:
            self._engine.close_session(session_id)

    def prompt_lookup_refusal(self, tokens: int) -> str | None:
        return None  # any draft length, per request

    async def _constraint(self, schema: str) -> Constraint:
        """The request's grammar matcher, compiled off the event loop (a large schema takes a while)."""
        assert self._grammars is not None
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self._grammars.constraint, schema)
        except GrammarError as exc:
            raise RequestRejected(f"the JSON schema cannot be used for structured output: {exc}") from None

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        engine = self._engine
        if engine is None:
            raise BackendError("model is not loaded")
        prompt_len = len(request.prompt_token_ids)
        if self.max_prompt_len is not None and prompt_len >= self.max_prompt_len:
            raise RequestRejected(prompt_too_long(prompt_len, self.max_prompt_len))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()

        def deliver(item: TokenEvent | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        params = request.params
        constraint = await self._constraint(params.json_schema) if params.json_schema else None
        generator = None
        if params.do_sample:
            generator = torch.Generator().manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        seq = Sequence(
            request=request,
            deliver=deliver,
            assembler=TextAssembler(self.tokenizer, request.prompt_token_ids, params.stop_sequences,
                                    special_ids=engine.special_ids),
            generator=generator,
            proposer=NgramProposer(self.prompt_lookup_max_ngram)
            if params.prompt_lookup_num_tokens and constraint is None else None,
            constraint=constraint,
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
