"""vLLM in-process (AsyncLLM): continuous batching, paged KV cache, detokenization and stop strings by vLLM.

vLLM's engine core runs in a child process that it starts with `spawn` on CPU, so nothing here may run at
import time; the engine is built in `load()`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncGenerator, Mapping
from typing import Any, NoReturn

from vllm import SamplingParams as VllmSamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs.engine import tokens_input
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine.async_llm import AsyncLLM

from llm_endpoint.backends.base import Backend, BackendStats
from llm_endpoint.backends.config import ConfigError, ServingConfig, parse_bool
from llm_endpoint.backends.errors import BackendError, BackendUnavailable, RequestRejected
from llm_endpoint.backends.model_files import ModelFiles
from llm_endpoint.backends.text import IncrementalDetokenizer
from llm_endpoint.backends.types import FinishReason, GenerationRequest, SamplingParams, Token, TokenEvent

log = logging.getLogger(__name__)

_DTYPES = {"auto": "auto", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# vLLM on CPU otherwise sizes its KV cache from ~92% of RAM (vLLM's CPU default, measured here); 2 GiB holds ~90k tokens of a
# 135M model and leaves the machine usable. Threads stay at vLLM's `auto` binding (one core kept for the
# front-end and engine-core processes): on 2 cores, binding both to the model (VLLM_CPU_OMP_THREADS_BIND=0-1)
# measured 3-4x slower.
_CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "2"}


class VllmBackend(Backend):
    """Drives `vllm.v1.engine.async_llm.AsyncLLM`; every request is one `AsyncLLM.generate` stream."""

    name = "vllm"

    def __init__(self, config: ServingConfig, files: ModelFiles, tokenizer: Any, max_model_len: int) -> None:
        if files.kind == "openvino":
            raise BackendUnavailable(f"vLLM cannot load OpenVINO IR ({files.path}); use option.rolling_batch=openvino")
        self._config = config
        self._files = files
        self._max_model_len = max_model_len
        self._tokenizer = tokenizer
        self._special_ids = frozenset(tokenizer.all_special_ids)
        self._engine: Any = None
        self._waiting = 0  # requests that have not produced a token yet

    def load(self) -> None:
        self._engine = create_engine(self._config, self._files, self._max_model_len)

    def stats(self) -> BackendStats:
        if self._engine is None:
            return BackendStats()
        # The output processor drops a request as soon as it finishes or is aborted.
        total = self._engine.output_processor.get_num_unfinished_requests()
        waiting = min(self._waiting, total)
        return BackendStats(running=total - waiting, waiting=waiting)

    def prompt_lookup_refusal(self, tokens: int) -> str | None:
        configured = self._config.prompt_lookup_num_tokens
        if tokens == configured:
            return None
        return f"vLLM drafts option.prompt_lookup_num_tokens={configured} tokens for every request, set at start-up"

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        if self._engine is None:
            raise BackendError("the vLLM engine is not loaded")
        stream = self._engine.generate(
            tokens_input(list(request.prompt_token_ids)), sampling_params(request.params), request.request_id
        )
        prefill: list[Token] = []
        # Each token's own piece of the text, whatever vLLM merged into one output (see `_events`).
        pieces = IncrementalDetokenizer(self._tokenizer, request.prompt_token_ids, special_ids=self._special_ids)
        started = finished = False
        cached = 0
        self._waiting += 1
        try:
            while not finished:
                try:
                    out = await stream.__anext__()
                except StopAsyncIteration:
                    raise BackendError("the engine ended the request without a finish reason") from None
                except VLLMClientError as exc:  # e.g. prompt longer than max_model_len: this request only
                    raise RequestRejected(str(exc)) from None
                except Exception as exc:
                    log.exception("vLLM failed request %s", request.request_id)
                    raise BackendError("the engine failed while generating") from exc
                if request.params.prompt_logprobs and out.prompt_logprobs:
                    prefill.extend(self._prefill_tokens(request.prompt_token_ids[len(prefill) :], out.prompt_logprobs))
                completion = out.outputs[0]
                finished = out.finished
                cached = max(cached, getattr(out, "num_cached_tokens", None) or 0)  # prefix-cache hits
                events = self._events(completion, request.params.top_n_tokens, pieces)
                if finished:
                    await anext(stream, None)  # let vLLM's generator end normally (closing it would abort)
                    if not events:
                        raise BackendError(f"the engine ended the request ({completion.finish_reason}) without a token")
                    events[-1].finish_reason = _finish_reason(completion.finish_reason, completion.stop_reason)
                    events[-1].prompt_tokens = len(request.prompt_token_ids)
                    events[-1].cached_tokens = cached
                    if (spec := getattr(completion, "spec_decode_metrics", None)) is not None:
                        events[-1].draft_tokens = spec.num_draft_tokens
                        events[-1].accepted_draft_tokens = sum(j * n for j, n in enumerate(spec.histogram))
                for event in events:
                    if not started:
                        started = True
                        self._waiting -= 1
                        if request.params.prompt_logprobs:
                            event.prefill = prefill
                    yield event
        finally:
            if not started:
                self._waiting -= 1
            if not finished:
                await self._engine.abort(request.request_id)
            await stream.aclose()

    def _events(self, completion: Any, top_n: int, detokenizer: IncrementalDetokenizer) -> list[TokenEvent]:
        """One event per token of this output (several when the consumer fell behind and vLLM merged steps).

        vLLM's text is the truth; it is shared among the tokens by our own detokenizer's pieces, so a token's
        text does not depend on how many steps vLLM merged. vLLM's per-token `decoded_token` cannot serve:
        it keeps special tokens the text skips, and exists only when log-probs were asked for.
        """
        ids = list(completion.token_ids)
        positions = completion.logprobs or [{}] * len(ids)  # None when the request asked for no log-probs
        texts = split_text(completion.text, [detokenizer.add(tid) for tid in ids])
        events = []
        for tid, pos, text in zip(ids, positions, texts):
            chosen = pos.get(tid)
            top = sorted((item for item in pos.items() if item[1].rank <= top_n), key=lambda item: item[1].rank)
            events.append(
                TokenEvent(
                    token=Token(tid, text, chosen.logprob if chosen else None, tid in self._special_ids),
                    top_tokens=[Token(i, _decoded(lp), lp.logprob, i in self._special_ids) for i, lp in top],
                )
            )
        return events

    def _prefill_tokens(self, prompt_ids: tuple[int, ...], positions: list[Any]) -> list[Token]:
        tokens = []
        for tid, pos in zip(prompt_ids, positions):
            chosen = pos.get(tid) if pos else None
            text = _decoded(chosen) if chosen else self._engine.tokenizer.decode([tid])
            tokens.append(Token(tid, text, chosen.logprob if chosen else None, tid in self._special_ids))
        return tokens


def _decoded(logprob: Any) -> str:
    return (logprob.decoded_token or "") if logprob is not None else ""


def split_text(text: str, pieces: list[str]) -> list[str]:
    """Share `text`, released for several tokens at once, among them so the parts concatenate to `text`.

    Each token keeps its own decoded piece (possibly empty: a partial character, a skipped special token)
    while the pieces line up with the text; from the first that does not (text held back for a possible stop
    string) the rest goes to the last token.
    """
    parts: list[str] = []
    pos = 0
    for piece in pieces[:-1]:
        if not text.startswith(piece, pos):
            break
        parts.append(piece)
        pos += len(piece)
    parts.extend([""] * (len(pieces) - 1 - len(parts)))
    parts.append(text[pos:])
    return parts


def _finish_reason(reason: str | None, stop_reason: int | str | None) -> FinishReason:
    """vLLM says `stop` for EOS, stop token ids and stop strings alike; `stop_reason` holds the matched string."""
    if reason == "length":
        return FinishReason.LENGTH
    if reason == "stop":
        return FinishReason.STOP_SEQUENCE if isinstance(stop_reason, str) else FinishReason.EOS_TOKEN
    raise BackendError(f"the engine ended the request: {reason}")


def sampling_params(params: SamplingParams) -> Any:
    """LMI parameters -> vLLM's, as LMI's `translate_vllm_params` does."""
    sampled = params.do_sample and params.temperature > 0
    return VllmSamplingParams(
        temperature=params.temperature if sampled else 0.0,
        top_k=params.top_k if sampled else 0,
        top_p=params.top_p if sampled else 1.0,
        repetition_penalty=params.repetition_penalty,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        seed=params.seed,
        max_tokens=params.max_new_tokens,
        stop=list(params.stop_sequences) or None,
        ignore_eos=params.ignore_eos,
        # The chosen token's log-prob and the top-n, raw (model) values: engine logprobs_mode. Asked only when
        # the response shows them: computing and detokenizing them cost vLLM 3-10% of its throughput here.
        logprobs=max(1, params.top_n_tokens) if params.token_logprobs or params.top_n_tokens else None,
        prompt_logprobs=1 if params.prompt_logprobs else None,
        output_kind=RequestOutputKind.DELTA,
        # vLLM's own structured outputs (its grammar backend masks the logits each step)
        structured_outputs=StructuredOutputsParams(json=params.json_schema) if params.json_schema else None,
    )


def create_engine(config: ServingConfig, files: ModelFiles, max_model_len: int) -> Any:
    """The AsyncLLM `config` asks for (also what scripts/bench_direct.py drives directly)."""
    for name, value in engine_env(config).items():
        os.environ.setdefault(name, value)  # vLLM reads these settings from the environment, nowhere else
    args = engine_args(config, files, max_model_len)
    log.info("starting vLLM engine: %s", args)
    return AsyncLLM.from_engine_args(args)


def engine_env(config: ServingConfig) -> dict[str, str]:
    """Environment defaults vLLM reads at start-up; applied where the user has not set them."""
    if current_platform.is_cpu() and config.gpu_memory_utilization is None:
        return dict(_CPU_ENV_DEFAULTS)
    return {}


def engine_args(config: ServingConfig, files: ModelFiles, max_model_len: int) -> Any:
    """LMI options -> AsyncEngineArgs. Any other `option.X` that names an engine argument is passed on."""
    kwargs: dict[str, Any] = {
        "model": str(files.path),
        "revision": config.revision,
        "trust_remote_code": config.trust_remote_code,
        "dtype": _DTYPES[config.dtype],
        "max_model_len": max_model_len,
        "tensor_parallel_size": _tensor_parallel_size(config.tensor_parallel_degree),
        "pipeline_parallel_size": config.pipeline_parallel_degree,
        "enforce_eager": config.enforce_eager,
        "max_num_seqs": config.effective_max_rolling_batch_size,
        "disable_log_stats": True,
    }
    optional = {
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "max_num_batched_tokens": config.max_rolling_batch_prefill_tokens,
        "quantization": config.quantize,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if config.enable_stateful_sessions:  # a session's turns resend the history: reuse its KV
        kwargs["enable_prefix_caching"] = True
    if config.prompt_lookup_num_tokens:  # vLLM's n-gram speculation is prompt lookup
        kwargs["speculative_config"] = {
            "method": "ngram", "num_speculative_tokens": config.prompt_lookup_num_tokens,
            "prompt_lookup_max": config.prompt_lookup_max_ngram, "prompt_lookup_min": 1,
        }
        kwargs["per_request_spec_decode_metrics"] = "summary"  # drafts and acceptances on the last output
    kwargs.update(parse_engine_options(config.engine_options))
    # LMI's log_prob is the model's own distribution, before temperature/penalties/top-k/top-p.
    kwargs["logprobs_mode"] = "raw_logprobs"
    return AsyncEngineArgs(**kwargs)


def _tensor_parallel_size(degree: int | str) -> int:
    if degree != "max":
        return int(degree)
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


class _RaisingParser(FlexibleArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would print the whole usage and exit
        raise ValueError(message)


def parse_engine_options(options: Mapping[str, str]) -> dict[str, Any]:
    """String `option.X` values -> typed AsyncEngineArgs fields, converted by vLLM's own CLI parser."""
    parser = AsyncEngineArgs.add_cli_args(_RaisingParser())
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    parsed: dict[str, Any] = {}
    for key, value in options.items():
        action = actions.get(key)
        if action is None:
            log.warning("ignoring option.%s: not a vLLM engine argument", key)
            continue
        try:
            if action.nargs == 0:  # a flag: --x / --no-x, or store_true
                parsed[key] = parse_bool(value)
                continue
            values = value.replace(",", " ").split() if action.nargs in ("+", "*") else [value]
            argv = [action.option_strings[0], *values]
            parsed[key] = getattr(parser.parse_args(argv), key)
        except ValueError as exc:
            raise ConfigError(f"invalid option.{key}={value!r}: {exc}") from None
    return parsed

