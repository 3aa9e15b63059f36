"""Our engine's loop on its own thread with the real model, fed sequences as TorchBackend feeds them, for the
engine tests that need no HTTP."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_endpoint.backends.text import TextAssembler
from llm_endpoint.backends.torch_engine import attention
from llm_endpoint.backends.torch_engine.engine import TorchEngine
from llm_endpoint.backends.torch_engine.grammar import Constraint
from llm_endpoint.backends.torch_engine.prompt_lookup import DEFAULT_MAX_NGRAM, NgramProposer
from llm_endpoint.backends.torch_engine.sequence import Sequence
from llm_endpoint.backends.types import GenerationRequest, SamplingParams, TokenEvent


@dataclass
class Stream:
    prompt: str | list[int]  # text, or token ids as they are
    max_new_tokens: int
    params: dict[str, Any] = field(default_factory=dict)
    session_id: str | None = None
    events: list[TokenEvent] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def token_ids(self) -> list[int]:
        return [e.token.id for e in self.events]


class EngineHarness:
    """The engine loop on its own thread, with the model loaded there (as TorchBackend does)."""

    def __init__(self, model_dir: Path, tokenizer: Any, *, dtype: torch.dtype = torch.float32, **engine: Any) -> None:
        from transformers import AutoModelForCausalLM

        self.tokenizer = tokenizer
        self.engine: TorchEngine | None = None
        ready = threading.Event()
        failure: list[BaseException] = []

        def loop() -> None:
            try:
                model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype,
                                                             attn_implementation=attention.NAME).eval()
                self.engine = TorchEngine(model, tokenizer, **{"max_running": 8, "max_model_len": 2048, **engine})
            except BaseException as exc:  # raised in the test, not lost in this thread
                failure.append(exc)
                return
            finally:
                ready.set()
            self.engine.run()

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        assert ready.wait(600)  # compile_decode compiles its graphs first: ~1 min each
        if failure:
            raise failure[0]

    def submit(self, stream: Stream, *, on_event: Any = None, constraint: Constraint | None = None) -> None:
        assert self.engine is not None
        prompt = stream.prompt
        ids = tuple(self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt)
        params = SamplingParams(max_new_tokens=stream.max_new_tokens, **stream.params)
        request = GenerationRequest(f"r{id(stream)}", ids, params, session_id=stream.session_id)

        def deliver(item: TokenEvent | BaseException) -> None:
            if isinstance(item, BaseException):
                stream.error = item
                stream.done.set()
                return
            if on_event is not None:
                on_event(stream, item)
            stream.events.append(item)
            if item.finished:
                stream.done.set()

        generator = torch.Generator().manual_seed(params.seed or 0) if params.do_sample else None
        assembler = TextAssembler(self.tokenizer, ids, params.stop_sequences, special_ids=self.engine.special_ids)
        proposer = NgramProposer(DEFAULT_MAX_NGRAM) if params.prompt_lookup_num_tokens else None
        self.engine.submit(Sequence(request=request, deliver=deliver, assembler=assembler, generator=generator,
                                    proposer=proposer, constraint=constraint))

    def stop(self) -> None:
        assert self.engine is not None
        self.engine.stop()
        self.thread.join(30)
