"""OpenVinoBackend: requests go to the engine process; a reader thread turns its step reports into events."""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import threading
from collections import defaultdict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from llm_endpoint.backends.base import Backend, BackendStats
from llm_endpoint.backends.config import ServingConfig
from llm_endpoint.backends.errors import BackendError, RequestRejected, prompt_too_long
from llm_endpoint.backends.model_files import ModelFiles
from llm_endpoint.backends.openvino.engine_process import StepOutput, run_engine_process
from llm_endpoint.backends.openvino.pipeline import generation_settings, model_path, scheduler_config
from llm_endpoint.backends.text import TextAssembler
from llm_endpoint.backends.types import FinishReason, GenerationRequest, Token, TokenEvent

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    """One generation as the server process sees it; after submission only the reader thread touches
    `text`, `started`, `done` and `prefill`."""

    key: int
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[list[TokenEvent] | BackendError]
    text: TextAssembler
    started: bool = False
    done: bool = False
    prefill: list[Token] = field(default_factory=list)
    # Prompt lookup: a step that returns n tokens verified n - 1 drafts. GenAI does not say how many it
    # proposed, so only the accepted ones are counted.
    accepted_drafts: int = 0


class OpenVinoBackend(Backend):
    """Serves a .gguf file, an OpenVINO IR directory, or an HF directory (converted to IR once, cached)."""

    name = "openvino"
    supports_top_tokens = False  # GenAI reports only the chosen token's log-prob

    def __init__(self, config: ServingConfig, files: ModelFiles, tokenizer: Any, max_model_len: int) -> None:
        self._config = config
        self._files = files
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._special_ids = frozenset(tokenizer.all_special_ids)
        self._process: multiprocessing.process.BaseProcess | None = None
        self._commands: Connection | None = None  # to the engine process; senders hold _send_lock
        self._results: Connection | None = None  # from it; only the reader thread receives
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._keys = itertools.count()
        self._active: dict[int, _Request] = {}
        self.engine_has_requests = False  # whether the pipeline itself still held requests after its last step
        self._running = False  # the engine process is up and its results are being read

    def load(self) -> None:
        path = model_path(self._config, self._files)
        scheduler_config(self._config)  # a bad option is a start-up error here, not in the child
        context = multiprocessing.get_context("spawn")
        commands, self._commands = context.Pipe(duplex=False)
        self._results, results = context.Pipe(duplex=False)
        self._process = context.Process(
            target=run_engine_process, name="openvino-engine", daemon=True,
            args=(self._config, path, commands, results, logging.getLogger().getEffectiveLevel()),
        )
        self._process.start()
        commands.close()
        results.close()
        try:
            ready = self._results.recv()
        except EOFError:
            raise BackendError(f"the OpenVINO engine process exited ({self._process.exitcode}) while loading") from None
        if ready != "ready":
            raise BackendError(f"OpenVINO could not load {path}: {ready}")
        self._running = True
        self._reader = threading.Thread(target=self._read, name="openvino-reader", daemon=True)
        self._reader.start()

    def prompt_lookup_refusal(self, tokens: int) -> str | None:
        if not self._config.prompt_lookup_num_tokens:
            return None if tokens == 0 else (
                "GenAI builds its pipeline for prompt lookup at start-up: set option.prompt_lookup_num_tokens")
        return None if tokens else "with option.prompt_lookup_num_tokens set, GenAI drafts for every request"

    def stats(self) -> BackendStats:
        waiting = sum(1 for req in list(self._active.values()) if not req.started)
        return BackendStats(running=len(self._active) - waiting, waiting=waiting)

    def shutdown(self) -> None:
        if self._process is None:
            return
        try:
            self._send(None)
        except OSError:
            pass
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        if self._reader is not None:
            self._reader.join(timeout=10)
        self._process = None

    def _send(self, command: Any) -> None:
        if self._commands is None:
            raise OSError("the OpenVINO engine process was not started")
        with self._send_lock:
            self._commands.send(command)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        if not self._running:
            raise BackendError("the OpenVINO engine is not running")
        prompt_len = len(request.prompt_token_ids)
        if prompt_len >= self._max_model_len:
            raise RequestRejected(prompt_too_long(prompt_len, self._max_model_len))
        req = _Request(
            key=next(self._keys),
            request=request,
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
            text=TextAssembler(self._tokenizer, request.prompt_token_ids, request.params.stop_sequences,
                               special_ids=self._special_ids),
        )
        self._active[req.key] = req
        # Like vLLM: generation ends with `length` at the context limit.
        max_new_tokens = min(request.params.max_new_tokens, self._max_model_len - prompt_len)
        try:
            settings = generation_settings(request, max_new_tokens, self._config.prompt_lookup_max_ngram)
            self._send(("add", req.key, list(request.prompt_token_ids), settings))
        except OSError:  # the engine process has just died; the reader is failing what was open
            self._active.pop(req.key, None)
            raise BackendError("the OpenVINO engine is not running") from None
        finished = False
        try:
            while not finished:
                batch = await req.events.get()
                if isinstance(batch, BackendError):
                    finished = True
                    raise batch
                for event in batch:
                    finished = event.finished
                    yield event
        finally:
            if self._active.pop(req.key, None) is not None and not finished:
                self._abort(req.key)

    def _abort(self, key: int) -> None:
        try:
            self._send(("cancel", key))
        except OSError:  # the engine process is gone; the reader fails everything
            pass

    # ---- reader thread ----

    def _read(self) -> None:
        outbox: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Any]]] = defaultdict(list)
        results = self._results
        assert results is not None, "the reader starts after load() opened the pipe"
        try:
            while True:
                message = results.recv()
                kind = message[0]
                if kind == "step":
                    _, outputs, self.engine_has_requests = message
                    for output in outputs:
                        if (req := self._active.get(output.key)) is not None:
                            self._collect(req, output, outbox)
                elif kind == "rejected":
                    _, key, reason = message
                    if (req := self._active.pop(key, None)) is not None:
                        outbox[req.loop].append((req, RequestRejected(f"the engine refused the request: {reason}")))
                elif kind == "failed":
                    log.error("OpenVINO step failed: %s", message[1])
                    self._fail_all(outbox, "the engine failed while generating")
                _deliver(outbox)
        except (EOFError, OSError):
            pass  # the engine process has exited (shutdown, or a crash)
        except Exception:
            log.exception("the OpenVINO reader thread failed")
        self._running = False
        self._fail_all(outbox, "the engine stopped")
        _deliver(outbox)

    def _fail_all(self, outbox: dict, reason: str) -> None:
        for key in list(self._active):
            if (req := self._active.pop(key, None)) is not None:
                outbox[req.loop].append((req, BackendError(reason)))

    def _collect(self, req: _Request, output: StepOutput, outbox: dict) -> None:
        """Turn what the engine produced for `req` this step into events."""
        events = self._token_events(req, output) if output.ids else []
        if events:
            outbox[req.loop].append((req, events))
        if req.done:
            return
        if output.status != "RUNNING":
            # IGNORED: the scheduler dropped it, e.g. no KV cache left for it.
            self._active.pop(req.key, None)
            outbox[req.loop].append((req, BackendError(f"the engine dropped the request ({output.status})")))

    def _token_events(self, req: _Request, output: StepOutput) -> list[TokenEvent]:
        ids, log_probs = output.ids, output.log_probs
        if req.request.params.prompt_logprobs and not req.started:
            # echo=True puts the prompt first; its first position has no log-prob.
            n = len(req.request.prompt_token_ids) - len(req.prefill)
            for tid, lp in zip(ids[:n], log_probs[:n]):
                text = self._tokenizer.decode([tid])
                req.prefill.append(Token(tid, text, lp if req.prefill else None, tid in self._special_ids))
            ids, log_probs = ids[n:], log_probs[n:]
        events = []
        for i, (tid, lp) in enumerate(zip(ids, log_probs)):
            text, matched = req.text.add(tid)
            finish = None
            if matched:
                finish = FinishReason.STOP_SEQUENCE
                self._abort(req.key)
            elif i == len(ids) - 1 and output.finish_reason != "NONE":
                finish = FinishReason.LENGTH if output.finish_reason == "LENGTH" else FinishReason.EOS_TOKEN
                text += req.text.finish()
            event = TokenEvent(Token(tid, text, lp, tid in self._special_ids), finish_reason=finish)
            if not req.started:
                req.started = True
                if req.request.params.prompt_logprobs:
                    event.prefill = req.prefill
            events.append(event)
            if finish is not None:
                break
        if req.request.params.prompt_lookup_num_tokens:
            req.accepted_drafts += max(0, len(events) - 1)
        if events and events[-1].finished:
            events[-1].prompt_tokens = len(req.request.prompt_token_ids)
            events[-1].accepted_draft_tokens = req.accepted_drafts
            req.done = True
            self._active.pop(req.key, None)
        return events


def _deliver(outbox: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Any]]]) -> None:
    """Hand this step's events to their requests: one thread-safe wake-up per event loop."""
    for loop, items in outbox.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # that loop has closed: nobody is waiting any more
            pass
    outbox.clear()


def _put_all(items: list[tuple[_Request, Any]]) -> None:
    for req, item in items:
        req.events.put_nowait(item)
