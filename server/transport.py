"""HTTP plumbing shared by the LMI and SageMaker routes: bounded body reads, disconnect-aware completion,
and LMI-shaped error bodies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from llm_endpoint.server.serving import (
    Generation,
    InferenceService,
    MidStreamError,
    PayloadAdapter,
    ServiceError,
    SessionReply,
)
from llm_endpoint.server.sessions import SESSION_HEADER

log = logging.getLogger(__name__)


class GenerationStream(StreamingResponse):
    """A streaming response that always closes its generation, even when the client leaves before the
    body is iterated (then the body generator never starts and its own cleanup would never run)."""

    def __init__(self, content: AsyncIterator[Any], generation: Generation, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.generation.aclose()


class ClientGone(Exception):
    """The client disconnected before there was anything to send."""


def error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refusing more than `limit` bytes without buffering them, or a body that takes more than
    `timeout` seconds to arrive (a client trickling bytes would otherwise hold its connection for ever)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ServiceError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes (max_request_size)")

    async def receive_all() -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServiceError(413, f"request body exceeds the limit of {limit} bytes (max_request_size)")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(receive_all(), timeout)
    except asyncio.TimeoutError:
        raise ServiceError(408, f"request body not received within body_read_timeout={timeout:g} s") from None


async def wait_for_disconnect(request: Request) -> None:
    """Returns once the client has gone (only valid after the body was read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def complete_or_abort(request: Request, generation: Generation) -> bytes | None:
    """Run a non-streaming generation to the end, aborting it if the client disconnects first."""
    work = asyncio.ensure_future(generation.body())
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work in done:
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work
    await generation.aclose()
    log.info("client disconnected; aborted request %s", generation.parsed.generation.request_id)
    return None


async def lmi_stream(generation: Generation) -> AsyncIterator[str]:
    """LMI frames; closing the generation is GenerationStream's job."""
    try:
        async for frame in generation.frames():
            yield frame
    except MidStreamError as exc:
        log.warning("request %s failed mid-stream: %s", generation.parsed.generation.request_id, exc)
        for frame in generation.formatter.on_error(str(exc)):
            yield frame


async def start_generation(
    service: InferenceService, request: Request, force_stream: bool = False, accept: str | None = None,
    adapt: PayloadAdapter | None = None,
) -> Generation | SessionReply:
    """Parse and wait for the first token (or answer a session control request); a client that leaves
    while still queued is dropped from the queue rather than keeping its place (raises ClientGone)."""
    body = await read_body(request, service.config.max_request_size, service.config.body_read_timeout)
    starting = asyncio.ensure_future(service.start(
        body, request.headers.get("content-type"), request.state.request_id, force_stream, accept,
        request.headers.get(SESSION_HEADER), adapt,
    ))
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({starting, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if starting in done:
        return starting.result()
    starting.cancel()  # aborts the queued request in the engine
    with contextlib.suppress(asyncio.CancelledError, ServiceError):
        await starting
    log.info("client disconnected before its first token; dropped request %s", request.state.request_id)
    raise ClientGone()


async def respond(
    request: Request, generation: Generation | SessionReply, headers: dict[str, str] | None = None
) -> Response:
    """The LMI response: chunked when streaming, else the whole body once generation is done.

    Content-Type is set as a header, not media_type: Starlette would append "; charset=utf-8" to
    text/event-stream, and LMI clients compare the header exactly."""
    if isinstance(generation, SessionReply):
        return Response(generation.body, media_type="text/plain", headers={**(headers or {}), **generation.headers})
    headers = {**(headers or {}), "content-type": generation.formatter.content_type}
    if generation.stream:
        return GenerationStream(lmi_stream(generation), generation, headers=headers)
    try:
        content = await complete_or_abort(request, generation)
    except MidStreamError as exc:  # nothing was sent yet: a proper error status
        raise ServiceError(424, str(exc)) from None
    if content is None:
        return Response(status_code=499)
    return Response(content, headers=headers)
