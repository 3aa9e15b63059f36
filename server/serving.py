"""One inference call, from a parsed request to formatted chunks: admission, the backend's event stream,
metrics, and where an error lands (before the first byte: an HTTP error; after it: an in-band error).

Both `/invocations` and the SageMaker runtime routes drive generation through `Generation`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from llm_endpoint.backends.base import Backend, BackendStats
from llm_endpoint.backends.config import ServingConfig
from llm_endpoint.backends.errors import BackendError
from llm_endpoint.backends.types import TokenEvent
from llm_endpoint.server.formatters import make_formatter
from llm_endpoint.server.formatters.base import ResponseFormatter
from llm_endpoint.server.metrics import Metrics
from llm_endpoint.server.request_parser import InvalidRequest, ParsedRequest, RequestParser, decode_body

log = logging.getLogger(__name__)
# Bodies up to this size are parsed (and tokenized, ~0.2 ms) on the event loop, sparing two thread hand-offs
# per request; larger ones go to a thread so that a huge prompt cannot stall the loop.
_INLINE_PARSE_BYTES = 16 * 1024


class ModelState(str, enum.Enum):
    PENDING = "PENDING"
    HEALTHY = "Healthy"
    FAILED = "FAILED"


class ServiceError(Exception):
    """An error answered before the response starts, with LMI's status and body shape."""

    def __init__(self, status: int, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type

    def body(self) -> dict[str, Any]:
        if self.error_type:  # LMI's Java-side errors: {"code", "type", "message"}
            return {"code": self.status, "type": self.error_type, "message": str(self)}
        return {"error": str(self), "code": self.status}


class MidStreamError(Exception):
    """Generation failed after the first byte was sent."""


class Generation:
    """A started request: its formatter and its event stream, with the first event already in hand."""

    def __init__(
        self, parsed: ParsedRequest, formatter: ResponseFormatter, events: AsyncGenerator[TokenEvent, None],
        first: TokenEvent, arrived: float, metrics: Metrics, release: Callable[[], None],
    ) -> None:
        self.parsed = parsed
        self.formatter = formatter
        self._events = events
        self._first = first
        self._arrived = arrived
        self._metrics = metrics
        self._release = release  # gives the batch slot back; idempotent

    @property
    def stream(self) -> bool:
        return self.parsed.output.stream

    async def _all_events(self) -> AsyncIterator[TokenEvent]:
        metrics = self._metrics
        last = time.monotonic()
        metrics.ttft.observe(last - self._arrived)
        event = self._first
        count = 1
        yield event
        try:
            while not event.finished:
                event = await self._events.__anext__()
                now = time.monotonic()
                metrics.itl.observe(now - last)
                last = now
                count += 1
                yield event
        except StopAsyncIteration:
            raise MidStreamError("the engine ended the request without a finish reason") from None
        except BackendError as exc:
            raise MidStreamError(str(exc)) from exc
        finally:
            self._release()
            metrics.generated_tokens.inc(count)
            metrics.e2e.observe(time.monotonic() - self._arrived)

    async def chunks(self) -> AsyncIterator[str]:
        """Formatted chunks as tokens arrive; raises MidStreamError if the engine fails part-way."""
        async for event in self._all_events():
            chunk = self.formatter.on_event(event)
            if chunk:
                yield chunk

    async def body(self) -> bytes:
        async for event in self._all_events():
            self.formatter.on_event(event)
        return self.formatter.body()

    async def aclose(self) -> None:
        try:
            await self._events.aclose()
        finally:
            self._release()


class Admission:
    """LMI's rolling-batch admission, in front of every engine: at most `max_running` requests generate at
    once; the rest wait in a queue of at most `queue_size` (beyond it: 503, as LMI's job queue)."""

    def __init__(self, max_running: int, queue_size: int) -> None:
        self.max_running = max_running
        self.queue_size = queue_size
        self.waiting = 0
        self.running = 0
        self._slots: asyncio.Semaphore | None = None

    async def acquire(self, model_name: str) -> Callable[[], None]:
        """Wait for a slot; returns the (idempotent) release function. Cancellation leaves the queue."""
        if self.waiting >= self.queue_size:
            raise ServiceError(503, f"Worker queue capacity exceeded for model: {model_name}", "WlmCapacityException")
        if self._slots is None:  # created here, on the serving event loop
            self._slots = asyncio.Semaphore(self.max_running)
        slots = self._slots
        self.waiting += 1
        try:
            await slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.running -= 1
                slots.release()

        return release


class InferenceService:
    """Holds the loaded pieces and turns request bodies into started Generations."""

    def __init__(
        self, config: ServingConfig, tokenizer: Any, backend: Backend, max_model_len: int
    ) -> None:
        self.config = config
        self.backend = backend
        self.parser = RequestParser(
            config, tokenizer, max_model_len, backend.name, backend.supports_top_tokens
        )
        self.admission = Admission(config.effective_max_rolling_batch_size, config.job_queue_size)
        self.metrics = Metrics(self.stats)
        self.state = ModelState.PENDING
        self.failure: str | None = None

    def stats(self) -> BackendStats:
        """Queue depth counts requests waiting for a slot here and inside the engine."""
        engine = self.backend.stats()
        return dataclasses.replace(engine, waiting=self.admission.waiting + engine.waiting)

    def load(self) -> None:
        """Blocking: load weights. Records the outcome for /ping."""
        try:
            self.backend.load()
        except Exception as exc:
            self.state, self.failure = ModelState.FAILED, f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load")
            return
        if self.state is ModelState.FAILED:  # timed out meanwhile: stay failed, as /ping already says
            return
        self.state = ModelState.HEALTHY
        log.info("model %s is ready (backend %s)", self.config.model_name, self.backend.name)

    async def load_with_timeout(self) -> None:
        """Load off the event loop; past option.model_loading_timeout the model is reported FAILED."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                asyncio.shield(loop.run_in_executor(None, self.load)), self.config.model_loading_timeout
            )
        except asyncio.TimeoutError:
            self.state = ModelState.FAILED
            self.failure = f"model did not load within option.model_loading_timeout={self.config.model_loading_timeout} s"
            log.error(self.failure)

    async def start(
        self, body: bytes, content_type: str | None, request_id: str, force_stream: bool = False,
        accept: str | None = None,
    ) -> Generation:
        """Parse, admit, and wait for the first token. Every failure here is a ServiceError."""
        arrived = time.monotonic()
        if self.state is not ModelState.HEALTHY:
            raise ServiceError(503, f"model {self.config.model_name} is not ready (status {self.state.value})")
        try:
            payload = decode_body(body, content_type)
            loop = asyncio.get_running_loop()
            if len(body) <= _INLINE_PARSE_BYTES:
                parsed = self.parser.parse(payload, request_id, force_stream, accept)
            else:
                parsed = await loop.run_in_executor(None, self.parser.parse, payload, request_id, force_stream, accept)
        except InvalidRequest as exc:
            raise ServiceError(exc.status, str(exc)) from None
        release = await self.admission.acquire(self.config.model_name)
        self.metrics.prompt_tokens.inc(len(parsed.generation.prompt_token_ids))
        events = self.backend.generate(parsed.generation)
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            release()
            raise ServiceError(424, "the engine returned no tokens") from None
        except BackendError as exc:
            release()
            raise ServiceError(424, str(exc)) from None
        except BaseException:
            release()
            await events.aclose()
            raise
        formatter = make_formatter(parsed.output, request_id)
        return Generation(parsed, formatter, events, first, arrived, self.metrics, release)
