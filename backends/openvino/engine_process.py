"""The child process that owns the pipeline: apply commands between steps, step, report each step's output.

Commands (from the server process): ("add", key, prompt ids, settings), ("cancel", key), None = shut down.
Results: "ready" or a load error, then ("step", outputs, engine busy), ("rejected", key, reason), ("failed", why).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

from llm_endpoint.backends.config import ServingConfig
from llm_endpoint.backends.openvino.pipeline import STRUCTURED_OUTPUT_SCHEMA, create_pipeline

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one step produced for one request, as the engine process sends it."""

    key: int
    ids: list[int]
    log_probs: list[float]
    finish_reason: str  # GenerationFinishReason name: NONE, LENGTH, STOP
    status: str  # GenerationStatus name: RUNNING, FINISHED, IGNORED, CANCEL, STOP


def run_engine_process(config: ServingConfig, path: Path, commands: Connection, results: Connection,
                    log_level: int) -> None:
    """Owns the pipeline: apply commands between steps, step while anything is unfinished, report each step."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        pipe = create_pipeline(config, path)
    except Exception as exc:
        log.debug("OpenVINO could not load %s", path, exc_info=True)  # the server reports it in one line
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
            try:
                config = _generation_config(settings)
                handles[key] = pipe.add_request(key, ov.Tensor(np.asarray([prompt_ids], dtype=np.int64)), config)
            except Exception as exc:
                log.warning("OpenVINO refused request %s: %s", key, exc)
                results.send(("rejected", key, str(exc)))
        elif (handle := handles.pop(command[1], None)) is not None:  # ("cancel", key)
            handle.cancel()
        if not commands.poll():
            return True


def _generation_config(settings: dict[str, Any]) -> Any:
    """A request's GenerationConfig from its plain settings (see pipeline.generation_settings)."""
    config = ov_genai.GenerationConfig()
    for name, value in settings.items():
        if name == STRUCTURED_OUTPUT_SCHEMA:
            config.structured_output_config = ov_genai.StructuredOutputConfig(json_schema=value)
        else:
            setattr(config, name, value)
    return config


def _read_handle(key: int, handle: Any) -> StepOutput:
    ids: list[int] = []
    log_probs: list[float] = []
    finish = "NONE"
    while handle.can_read():
        for output in handle.read().values():  # one sequence: no beams, n == 1
            ids += output.generated_ids
            log_probs += output.generated_log_probs
            finish = output.finish_reason.name
    return StepOutput(key, ids, log_probs, finish, handle.get_status().name)
