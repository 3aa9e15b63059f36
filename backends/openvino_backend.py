"""OpenVINO GenAI's ContinuousBatchingPipeline, stepped by one engine thread.

The pipeline is not asyncio-aware and `step()` holds the GIL while it runs, so one thread owns it: it takes
new requests and aborts from a command queue between steps, steps while anything is unfinished, reads each
request's new token ids and log-probs, turns them into text (our TextAssembler: stop sequences are ours,
not the engine's), and hands the events to the requests' asyncio queues, one wake-up per event loop per step.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import queue
import random
import shutil
import subprocess
import threading
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ov_genai
from filelock import FileLock

from backends.base import Backend, BackendStats
from backends.engine_options import coerce_like
from backends.model_files import ModelFiles
from backends.text import TextAssembler
from backends.types import (
    BackendError,
    FinishReason,
    GenerationRequest,
    RequestRejected,
    Token,
    TokenEvent,
)
from server.config import ConfigError, ServingConfig

log = logging.getLogger(__name__)

_DEVICE = "CPU"
_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}  # "auto": the plugin's choice (bf16 on AVX-512 BF16)
_SCHEDULER_KEYS = (
    "cache_size", "num_kv_blocks", "max_num_batched_tokens", "max_num_seqs", "dynamic_split_fuse",
    "enable_prefix_caching", "use_cache_eviction",
)
_WEIGHT_FORMATS = ("int8", "int4", "fp16", "fp32")  # optimum-cli --weight-format
# How long the engine thread waits for an event loop to take a step's tokens before stepping on regardless.
_HANDOFF_TIMEOUT_S = 0.02
_Status = ov_genai.GenerationStatus
_Finish = ov_genai.GenerationFinishReason


@dataclass(eq=False)
class _Request:
    """One generation as the engine thread sees it; only that thread touches it after submission."""

    key: int
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[list[TokenEvent] | BackendError]
    text: TextAssembler
    max_new_tokens: int
    handle: Any = None
    started: bool = False
    done: bool = False
    prefill: list[Token] = field(default_factory=list)


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
        self._pipe: Any = None
        self._thread: threading.Thread | None = None
        self._commands: queue.SimpleQueue[_Request | int | None] = queue.SimpleQueue()
        self._keys = itertools.count()
        self._active: dict[int, _Request] = {}  # engine thread only
        # Single-writer counters, so stats() needs no lock: submitted by the event loop, admitted by the engine.
        self._submitted = 0
        self._admitted = 0
        self._stats = BackendStats()

    def load(self) -> None:
        self._pipe = create_pipeline(self._config, self._files)
        self._thread = threading.Thread(target=self._run, name="openvino-engine", daemon=True)
        self._thread.start()

    def stats(self) -> BackendStats:
        queued = self._submitted - self._admitted
        return BackendStats(running=self._stats.running, waiting=self._stats.waiting + queued)

    def shutdown(self) -> None:
        if self._thread is not None:
            self._commands.put(None)
            self._thread.join()
            self._thread = None
        self._pipe = None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if self._thread is None:
            raise BackendError("the OpenVINO engine is not loaded")
        prompt_len = len(request.prompt_token_ids)
        if prompt_len >= self._max_model_len:
            raise RequestRejected(
                f"the prompt has {prompt_len} tokens; max_model_len is {self._max_model_len} (prompt and "
                "generated tokens together)"
            )
        req = _Request(
            key=next(self._keys),
            request=request,
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
            text=TextAssembler(self._tokenizer, request.prompt_token_ids, request.params.stop_sequences,
                               special_ids=self._special_ids),
            # Like vLLM: generation ends with `length` at the context limit.
            max_new_tokens=min(request.params.max_new_tokens, self._max_model_len - prompt_len),
        )
        self._submitted += 1
        self._commands.put(req)
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
            if not finished:
                self._commands.put(req.key)

    # ---- engine thread ----

    def _run(self) -> None:
        outbox: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Any]]] = defaultdict(list)
        try:
            while self._take_commands(block=not self._busy(), outbox=outbox):
                if self._busy():  # also steps once more after an abort, so the engine frees that request
                    try:
                        self._pipe.step()
                    except Exception:
                        log.exception("OpenVINO step failed; failing its requests")
                        for req in list(self._active.values()):
                            self._fail(req, outbox, BackendError("the engine failed while generating"))
                    else:
                        for req in list(self._active.values()):
                            self._collect(req, outbox)
                self._publish_stats()
                _deliver(outbox)
        except Exception:
            log.exception("the OpenVINO engine thread failed")
        finally:
            for req in list(self._active.values()):
                self._fail(req, outbox, BackendError("the engine stopped"))
            while not self._commands.empty():
                if isinstance(command := self._commands.get_nowait(), _Request):
                    outbox[command.loop].append((command, BackendError("the engine stopped")))
            self._publish_stats()
            _deliver(outbox)

    def _busy(self) -> bool:
        return bool(self._active) or self._pipe.has_non_finished_requests()

    def _take_commands(self, block: bool, outbox: dict) -> bool:
        """Apply queued submissions and aborts; False on shutdown. Blocks only while idle."""
        try:
            command = self._commands.get(block=block)
            while True:
                if command is None:
                    return False
                if isinstance(command, _Request):
                    self._admit(command, outbox)
                elif (req := self._active.get(command)) is not None:
                    req.handle.cancel()
                    del self._active[req.key]
                command = self._commands.get_nowait()
        except queue.Empty:
            return True

    def _admit(self, req: _Request, outbox: dict) -> None:
        self._admitted += 1
        ids = ov.Tensor(np.asarray([req.request.prompt_token_ids], dtype=np.int64))
        try:
            req.handle = self._pipe.add_request(req.key, ids, generation_config(req))
        except Exception as exc:
            log.warning("OpenVINO refused request %s: %s", req.request.request_id, exc)
            outbox[req.loop].append((req, RequestRejected(f"the engine refused the request: {exc}")))
            return
        self._active[req.key] = req

    def _collect(self, req: _Request, outbox: dict) -> None:
        """Turn what the engine produced for `req` this step into events."""
        events: list[TokenEvent] = []
        while not req.done and req.handle.can_read():
            for output in req.handle.read().values():  # one sequence: no beams, n == 1
                events.extend(self._token_events(req, output))
        if events:
            outbox[req.loop].append((req, events))
        if req.done:
            del self._active[req.key]
        elif req.handle.get_status() != _Status.RUNNING:
            # IGNORED: the scheduler dropped it, e.g. no KV cache left for it.
            self._fail(req, outbox, BackendError(f"the engine dropped the request ({req.handle.get_status().name})"))

    def _token_events(self, req: _Request, output: Any) -> list[TokenEvent]:
        ids, log_probs = list(output.generated_ids), list(output.generated_log_probs)
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
                req.handle.stop()
            elif i == len(ids) - 1 and output.finish_reason != _Finish.NONE:
                finish = FinishReason.LENGTH if output.finish_reason == _Finish.LENGTH else FinishReason.EOS_TOKEN
                text += req.text.finish()
            event = TokenEvent(Token(tid, text, lp, tid in self._special_ids), finish_reason=finish)
            if not req.started:
                req.started = True
                if req.request.params.prompt_logprobs:
                    event.prefill = req.prefill
            events.append(event)
            if finish is not None:
                event.prompt_tokens = len(req.request.prompt_token_ids)
                req.done = True
                break
        return events

    def _fail(self, req: _Request, outbox: dict, error: BackendError) -> None:
        req.handle.cancel()
        self._active.pop(req.key, None)
        outbox[req.loop].append((req, error))

    def _publish_stats(self) -> None:
        waiting = sum(1 for req in self._active.values() if not req.started)
        self._stats = BackendStats(running=len(self._active) - waiting, waiting=waiting)


def _deliver(outbox: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Any]]]) -> None:
    """Hand this step's events to their requests (one thread-safe wake-up per event loop), then wait, briefly,
    until each loop has let the woken requests run.

    `step()` holds the GIL: without the wait the next step would start first, every token would reach its
    client a whole step late, and the loop's work would then run beside the engine's compute threads.
    """
    flushed = []
    for loop, items in outbox.items():
        done = threading.Event()
        try:
            loop.call_soon_threadsafe(_put_all, loop, items, done)
        except RuntimeError:  # that loop has closed: nobody is waiting any more
            continue
        flushed.append(done)
    outbox.clear()
    for done in flushed:
        done.wait(_HANDOFF_TIMEOUT_S)


def _put_all(loop: asyncio.AbstractEventLoop, items: list[tuple[_Request, Any]], done: threading.Event) -> None:
    for req, item in items:
        req.events.put_nowait(item)
    loop.call_soon(done.set)  # queued behind the requests just woken, so it runs once they have


def generation_config(req: _Request) -> Any:
    params = req.request.params
    config = ov_genai.GenerationConfig()
    config.max_new_tokens = req.max_new_tokens
    config.ignore_eos = params.ignore_eos
    config.repetition_penalty = params.repetition_penalty
    # 1 = the chosen token's log-prob, from the raw distribution; GenAI returns no top-n alternatives.
    config.logprobs = 1
    config.echo = params.prompt_logprobs
    if params.do_sample and params.temperature > 0:
        config.do_sample = True
        config.temperature = params.temperature
        config.top_p = params.top_p
        if params.top_k > 0:
            config.top_k = params.top_k
        # GenAI's default seed is a constant 0: every unseeded request would draw the same samples.
        config.rng_seed = params.seed if params.seed is not None else random.getrandbits(32)
    return config


def create_pipeline(config: ServingConfig, files: ModelFiles) -> Any:
    """The ContinuousBatchingPipeline `config` asks for (also what scripts/bench_direct.py drives directly)."""
    path = model_path(config, files)
    properties = {}
    if config.dtype in _PRECISION_HINTS:
        properties["INFERENCE_PRECISION_HINT"] = _PRECISION_HINTS[config.dtype]
    scheduler = scheduler_config(config)
    log.info("loading %s on OpenVINO %s, scheduler: %s", path, _DEVICE, scheduler.to_string().strip())
    return ov_genai.ContinuousBatchingPipeline(str(path), scheduler, _DEVICE, properties)


def model_path(config: ServingConfig, files: ModelFiles) -> Path:
    """What OpenVINO loads: the .gguf file or IR directory as given, an HF directory's (cached) IR."""
    quantize = config.quantize
    if files.kind == "hf":
        weight_format = quantize or ("fp32" if config.dtype == "fp32" else "fp16")
        if weight_format not in _WEIGHT_FORMATS:
            raise ConfigError(f"invalid option.quantize={quantize!r} for openvino: expected int8 or int4")
        return convert_to_ir(files.directory, weight_format)
    if quantize:
        log.warning("option.quantize=%s ignored: %s already holds its weights' format", quantize, files.path)
    return files.path


def scheduler_config(config: ServingConfig) -> Any:
    """LMI batch settings plus any SchedulerConfig field given as `option.<field>`."""
    scheduler = ov_genai.SchedulerConfig()
    scheduler.max_num_seqs = config.effective_max_rolling_batch_size
    if config.max_rolling_batch_prefill_tokens:
        scheduler.max_num_batched_tokens = config.max_rolling_batch_prefill_tokens
    for key, value in config.engine_options.items():
        if key not in _SCHEDULER_KEYS:
            log.warning("ignoring option.%s: not an OpenVINO GenAI scheduler setting (%s)", key,
                        ", ".join(_SCHEDULER_KEYS))
            continue
        try:
            setattr(scheduler, key, coerce_like(value, getattr(scheduler, key)))
        except ValueError as exc:
            raise ConfigError(f"invalid option.{key}={value!r}: {exc}") from None
    return scheduler


# ---- HF directory -> OpenVINO IR ----

def ir_cache_dir(source: Path, weight_format: str) -> Path:
    """Where the IR of `source` lives: keyed by its path, its files' mtimes and the weight format."""
    from server.demo_model import cache_root

    stamp = [str(source.resolve()), weight_format]
    stamp += [f"{p.name}:{p.stat().st_mtime_ns}" for p in sorted(source.iterdir()) if p.is_file()]
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    return cache_root() / "openvino-ir" / f"{source.name}-{weight_format}-{digest}"


def convert_to_ir(source: Path, weight_format: str) -> Path:
    """Export an HF directory with optimum-intel, once; later loads reuse the cached IR.

    optimum-intel pins transformers<5.6, so it lives in its own environment: its `optimum-cli` is taken from
    LLM_ENDPOINT_OPTIMUM_CLI, else from PATH.
    """
    target = ir_cache_dir(source, weight_format)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "openvino_model.xml").is_file():
            _export(source, weight_format, target)
    log.info("OpenVINO IR of %s: %s", source, target)
    return target


def _export(source: Path, weight_format: str, target: Path) -> None:
    cli = os.environ.get("LLM_ENDPOINT_OPTIMUM_CLI") or shutil.which("optimum-cli")
    if not cli:
        raise ConfigError(
            f"{source} is an HF directory and OpenVINO needs IR: install optimum-intel in its own environment "
            "and set LLM_ENDPOINT_OPTIMUM_CLI to its optimum-cli, or serve a .gguf file or an IR directory"
        )
    work = target.with_name(target.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    command = [cli, "export", "openvino", "--model", str(source), "--task", "text-generation-with-past",
               "--weight-format", weight_format, str(work)]
    log.info("converting %s to OpenVINO IR: %s", source, " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not (work / "openvino_model.xml").is_file():
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError(f"optimum-cli export failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    work.rename(target)
