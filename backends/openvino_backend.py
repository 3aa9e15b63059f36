"""OpenVINO GenAI's ContinuousBatchingPipeline, run in its own process.

`step()` holds the GIL for the whole step, so a pipeline stepped inside the server process stalls the event
loop for every step (and every token then waits for the next step to reach its client). The pipeline lives
in a child process instead, which does nothing but step it: it takes new requests and aborts between steps,
steps while anything is unfinished, and after each step sends every request's new token ids, log-probs and
status back in one message. In the server process a reader thread turns those into text (our TextAssembler:
stop sequences are ours, not the engine's) and hands the events to the requests' asyncio queues, one
wake-up per event loop per step, while the child already computes the next step.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import multiprocessing
import os
import random
import shutil
import subprocess
import threading
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
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


@dataclass
class _Output:
    """What one step produced for one request, as the engine process sends it."""

    key: int
    ids: list[int]
    log_probs: list[float]
    finish_reason: str  # GenerationFinishReason name: NONE, LENGTH, STOP
    status: str  # GenerationStatus name: RUNNING, FINISHED, IGNORED, CANCEL, STOP


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
            target=_engine_process, name="openvino-engine", daemon=True,
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
        with self._send_lock:
            self._commands.send(command)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if not self._running:
            raise BackendError("the OpenVINO engine is not running")
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
        )
        self._active[req.key] = req
        # Like vLLM: generation ends with `length` at the context limit.
        max_new_tokens = min(request.params.max_new_tokens, self._max_model_len - prompt_len)
        try:
            self._send(("add", req.key, list(request.prompt_token_ids), generation_settings(request, max_new_tokens)))
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
        try:
            while True:
                message = self._results.recv()
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

    def _collect(self, req: _Request, output: _Output, outbox: dict) -> None:
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

    def _token_events(self, req: _Request, output: _Output) -> list[TokenEvent]:
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
                event.prompt_tokens = len(req.request.prompt_token_ids)
                req.done = True
                self._active.pop(req.key, None)
                break
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


def generation_settings(request: GenerationRequest, max_new_tokens: int) -> dict[str, Any]:
    """GenerationConfig fields for one request (plain values: they cross to the engine process)."""
    params = request.params
    settings: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "ignore_eos": params.ignore_eos,
        "repetition_penalty": params.repetition_penalty,
        # 1 = the chosen token's log-prob, from the raw distribution; GenAI returns no top-n alternatives.
        "logprobs": 1,
        "echo": params.prompt_logprobs,
    }
    if params.do_sample and params.temperature > 0:
        settings.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        if params.top_k > 0:
            settings["top_k"] = params.top_k
        # GenAI's default seed is a constant 0: every unseeded request would draw the same samples.
        settings["rng_seed"] = params.seed if params.seed is not None else random.getrandbits(32)
    return settings


# ---- the engine process ----

def _engine_process(config: ServingConfig, path: Path, commands: Connection, results: Connection,
                    log_level: int) -> None:
    """Owns the pipeline: apply commands between steps, step while anything is unfinished, report each step."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        pipe = create_pipeline(config, path)
    except Exception as exc:
        log.exception("OpenVINO could not load %s", path)
        results.send(f"{type(exc).__name__}: {exc}")
        return
    results.send("ready")
    try:
        _step_loop(pipe, commands, results)
    except (EOFError, BrokenPipeError):
        log.warning("the server process has gone; the OpenVINO engine process exits")


def _step_loop(pipe: Any, commands: Connection, results: Connection) -> None:
    handles: dict[int, Any] = {}
    while True:
        busy = bool(handles) or pipe.has_non_finished_requests()
        if (not busy or commands.poll()) and not _apply_commands(pipe, handles, commands, results):
            return
        if not (handles or pipe.has_non_finished_requests()):
            continue
        try:  # also steps once more after an abort, so the engine frees that request
            pipe.step()
        except Exception as exc:
            for handle in handles.values():
                handle.cancel()
            handles.clear()
            results.send(("failed", f"{type(exc).__name__}: {exc}"))
            continue
        outputs = []
        for key, handle in list(handles.items()):
            output = _read_handle(key, handle)
            if output.ids or output.status != "RUNNING":
                outputs.append(output)
            if output.status != "RUNNING":
                del handles[key]
        results.send(("step", outputs, pipe.has_non_finished_requests()))


def _apply_commands(pipe: Any, handles: dict[int, Any], commands: Connection, results: Connection) -> bool:
    """Everything queued (waiting for the first command when idle); False on shutdown."""
    while True:
        command = commands.recv()
        if command is None:
            return False
        if command[0] == "add":
            _, key, prompt_ids, settings = command
            config = ov_genai.GenerationConfig()
            for name, value in settings.items():
                setattr(config, name, value)
            try:
                handles[key] = pipe.add_request(key, ov.Tensor(np.asarray([prompt_ids], dtype=np.int64)), config)
            except Exception as exc:
                log.warning("OpenVINO refused request %s: %s", key, exc)
                results.send(("rejected", key, str(exc)))
        elif (handle := handles.pop(command[1], None)) is not None:  # ("cancel", key)
            handle.cancel()
        if not commands.poll():
            return True


def _read_handle(key: int, handle: Any) -> _Output:
    ids: list[int] = []
    log_probs: list[float] = []
    finish = "NONE"
    while handle.can_read():
        for output in handle.read().values():  # one sequence: no beams, n == 1
            ids += output.generated_ids
            log_probs += output.generated_log_probs
            finish = output.finish_reason.name
    return _Output(key, ids, log_probs, finish, handle.get_status().name)


def create_pipeline(config: ServingConfig, path: Path) -> Any:
    """The ContinuousBatchingPipeline `config` asks for, on the model at `path` (see `model_path`)."""
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
