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
from dataclasses import dataclass
from typing import Any

from llm_endpoint.backends.base import Backend, BackendStats
from llm_endpoint.backends.config import ServingConfig
from llm_endpoint.backends.errors import BackendError
from llm_endpoint.backends.types import FinishReason, TokenEvent
from llm_endpoint.server.formatters import make_formatter
from llm_endpoint.server.formatters.base import ResponseFormatter
from llm_endpoint.server.metrics import Metrics
from llm_endpoint.server.request_parser import InvalidRequest, ParsedRequest, RequestParser, decode_body
from llm_endpoint.server.sessions import (
    CLOSE,
    CLOSED_SESSION_HEADER,
    NEW_SESSION,
    NEW_SESSION_HEADER,
    SESSION_HEADER,
    Session,
    SessionError,
    SessionStore,
)

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


def ping_body(model_name: str, state: ModelState) -> dict[str, Any]:
    """LMI's /ping body: the model's status by name."""
    return {model_name: {"status": state.value}}


def not_ready(model_name: str, state: ModelState) -> ServiceError:
    """What a request gets before the model is ready (while it downloads, converts, loads) or once it failed."""
    return ServiceError(503, f"model {model_name} is not ready (status {state.value})")


class MidStreamError(Exception):
    """Generation failed after the first byte was sent."""


@dataclass(frozen=True)
class SessionReply:
    """The answer to a session control request (NEW_SESSION, CLOSE): a short text body and its headers."""

    body: str
    headers: dict[str, str]


# A route's translation of its own request body into the schema RequestParser reads.
PayloadAdapter = Callable[[dict[str, Any]], dict[str, Any]]
# Called once when a generation ends: with its output text and last event if it finished, else with None.
OnEnd = Callable[[tuple[str, TokenEvent] | None], None]


class Generation:
    """A started request: its formatter and its event stream, with the first event already in hand."""

    def __init__(
        self, parsed: ParsedRequest, formatter: ResponseFormatter, events: AsyncGenerator[TokenEvent, None],
        first: TokenEvent, arrived: float, metrics: Metrics, release: Callable[[], None],
        on_end: OnEnd | None = None,
    ) -> None:
        self.parsed = parsed
        self.formatter = formatter
        self._events = events
        self._first = first
        self._arrived = arrived
        self._metrics = metrics
        self._release = release  # gives the batch slot back; idempotent
        self._on_end = on_end
        self._text: list[str] | None = [] if on_end is not None else None  # a session turn's reply, for its history

    def _end(self, last: TokenEvent | None) -> None:
        """Give the slot back, then settle the session turn (once; `last` is the final event, if reached)."""
        self._release()
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            ok = last is not None and last.finish_reason is not FinishReason.ERROR
            on_end(("".join(self._text or ()), last) if ok and last is not None else None)

    @property
    def stream(self) -> bool:
        return self.parsed.output.stream

    async def _all_events(self) -> AsyncIterator[TokenEvent]:
        metrics = self._metrics
        last = time.monotonic()
        metrics.ttft.observe(last - self._arrived)
        event = self._first
        count = 1
        final: TokenEvent | None = None
        text = self._text
        try:
            if text is not None:
                text.append(event.token.text)
            yield event
            while not event.finished:
                event = await self._events.__anext__()
                now = time.monotonic()
                metrics.itl.observe(now - last)
                last = now
                count += 1
                if text is not None:
                    text.append(event.token.text)
                yield event
            final = event
            metrics.draft_tokens.labels("proposed").inc(event.draft_tokens)
            metrics.draft_tokens.labels("accepted").inc(event.accepted_draft_tokens)
        except StopAsyncIteration:
            raise MidStreamError("the engine ended the request without a finish reason") from None
        except BackendError as exc:
            raise MidStreamError(str(exc)) from exc
        finally:
            self._end(final)
            metrics.generated_tokens.inc(count)
            metrics.e2e.observe(time.monotonic() - self._arrived)

    async def frames(self) -> AsyncIterator[str]:
        """Formatted frames (one complete wire event each) as tokens arrive; raises MidStreamError if the
        engine fails part-way."""
        async for event in self._all_events():
            for frame in self.formatter.on_event(event):
                yield frame

    async def body(self) -> bytes:
        async for event in self._all_events():
            self.formatter.on_event(event)
        return self.formatter.body()

    async def aclose(self) -> None:
        try:
            await self._events.aclose()
        finally:
            self._end(None)


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
            config, tokenizer, max_model_len, backend.name, backend.supports_top_tokens,
            backend.prompt_lookup_refusal,
        )
        self.admission = Admission(config.effective_max_rolling_batch_size, config.job_queue_size)
        self.sessions = (SessionStore(config.sessions_expiration, backend.close_session)
                         if config.enable_stateful_sessions else None)
        self.metrics = Metrics(self.stats, lambda: self.sessions.open_sessions if self.sessions else 0)
        self.state = ModelState.PENDING
        self.failure: str | None = None
        self.settled = asyncio.Event()  # set by load_with_timeout once the state is Healthy or FAILED

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
            log.error("model failed to load: %s", self.failure)
            log.debug("model load failure", exc_info=True)  # the traceback only with --log-level debug
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
        self.settled.set()

    async def start(
        self, body: bytes, content_type: str | None, request_id: str, force_stream: bool = False,
        accept: str | None = None, session_id: str | None = None, adapt: PayloadAdapter | None = None,
    ) -> Generation | SessionReply:
        """Parse, admit, and wait for the first token; or answer a session control request. `session_id` is
        the X-Amzn-SageMaker-Session-Id header; `adapt` turns another API's decoded body (TGI's) into the
        schema the parser reads. Every failure here is a ServiceError."""
        arrived = time.monotonic()
        if self.state is not ModelState.HEALTHY:
            raise not_ready(self.config.model_name, self.state)
        try:
            payload = decode_body(body, content_type)
            if adapt is not None:
                payload = adapt(payload)
        except InvalidRequest as exc:
            raise ServiceError(exc.status, str(exc)) from None
        session = await self._session(payload, session_id)
        if isinstance(session, SessionReply):
            return session
        if session is None:
            return await self._generate(payload, len(body), request_id, force_stream, accept, arrived)
        await session.lock.acquire()  # the session's turns run one at a time, in arrival order
        try:
            if self.sessions is not None:
                try:
                    self.sessions.check_open(session)  # closed while this turn waited
                except SessionError as exc:
                    raise ServiceError(400, str(exc)) from None
            return await self._generate(payload, len(body), request_id, force_stream, accept, arrived, session)
        except BaseException:
            session.lock.release()
            raise

    async def _session(self, payload: dict[str, Any], session_id: str | None) -> Session | SessionReply | None:
        """The session a request continues (None: stateless), or the reply to NEW_SESSION / CLOSE."""
        request_type = payload.get("requestType")
        store = self.sessions
        if store is None:
            if session_id is not None or request_type is not None:
                raise ServiceError(400, f"stateful sessions are not enabled on this endpoint ({SESSION_HEADER} "
                                        "and 'requestType' need option.enable_stateful_sessions=true)")
            return None
        try:
            if request_type == NEW_SESSION:
                if session_id not in (None, NEW_SESSION):
                    raise SessionError(f"a NEW_SESSION request carries no session id (got {SESSION_HEADER} {session_id!r})")
                session = store.create()
                value = store.header_value(session)
                return SessionReply(f"Session {session.id} created", {SESSION_HEADER: value, NEW_SESSION_HEADER: value})
            if request_type == CLOSE:
                if not session_id:
                    raise SessionError(f"a CLOSE request needs the {SESSION_HEADER} header of the session to close")
                session = store.get(session_id)
                async with session.lock:  # after the session's turns already waiting
                    closed = store.close(session_id)
                return SessionReply(f"Session {closed} closed", {CLOSED_SESSION_HEADER: closed})
            if request_type is not None:
                raise SessionError(f"'requestType' must be {NEW_SESSION} or {CLOSE} (got {request_type!r})")
            if session_id == NEW_SESSION:
                raise SessionError(f"{SESSION_HEADER}: {NEW_SESSION} needs the body {{\"requestType\": \"{NEW_SESSION}\"}}")
            return store.get(session_id) if session_id is not None else None
        except SessionError as exc:
            raise ServiceError(400, str(exc)) from None

    async def _generate(
        self, payload: dict[str, Any], size: int, request_id: str, force_stream: bool, accept: str | None,
        arrived: float, session: Session | None = None,
    ) -> Generation:
        history = session.history if session is not None else None
        try:
            if size + (history.chars if history is not None else 0) <= _INLINE_PARSE_BYTES:
                parsed = self.parser.parse(payload, request_id, force_stream, accept, history)
            else:
                loop = asyncio.get_running_loop()
                parsed = await loop.run_in_executor(
                    None, self.parser.parse, payload, request_id, force_stream, accept, history)
        except InvalidRequest as exc:
            raise ServiceError(exc.status, str(exc)) from None
        if session is not None:
            parsed = dataclasses.replace(
                parsed, generation=dataclasses.replace(parsed.generation, session_id=session.id))
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
        on_end = self._turn_end(session, parsed) if session is not None else None
        return Generation(parsed, formatter, events, first, arrived, self.metrics, release, on_end)

    def _turn_end(self, session: Session, parsed: ParsedRequest) -> OnEnd:
        """What ends a session turn: a finished turn joins the history; then the session's next turn may run."""

        def end(result: tuple[str, TokenEvent] | None) -> None:
            try:
                if self.sessions is not None:
                    self.sessions.touch(session)
                if result is not None and parsed.turn is not None:
                    reply, last = result
                    session.commit(parsed.turn, reply)
                    self.metrics.session_prompt_tokens.labels("cache").inc(last.cached_tokens)
                    self.metrics.session_prompt_tokens.labels("computed").inc(last.prompt_tokens - last.cached_tokens)
            finally:
                session.lock.release()

        return end
