"""What `llm-endpoint serve` answers from the moment its port is bound, before the model is ready.

LMI loads the model before it binds and exits when loading fails (`ServerStartupException`). We bind first, so
that a download or conversion of any length (the demo model, s3://, HF -> OpenVINO IR) shows as /ping 503
PENDING rather than a refused connection, and keep LMI's exit on failure: an endpoint whose model cannot load
fails at once with the reason, not after SageMaker's health-check timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from llm_endpoint.backends.config import ConfigError
from llm_endpoint.server.serving import InferenceService, ModelState, not_ready, ping_body
from llm_endpoint.server.transport import error_response

log = logging.getLogger(__name__)


class StartingApp:
    """ASGI app that builds the real one in the background (`build`: fetch the model, tokenizer, engine)
    and delegates to it once built; its own lifespan then starts the engine load. Until then /ping and
    every other request get the 503s the real app gives while loading.

    A failure anywhere before the model is Healthy is kept in `error` and ends the server through `stop`."""

    def __init__(self, model_name: str, build: Callable[[], tuple[FastAPI, InferenceService]]) -> None:
        self.model_name = model_name
        self._build = build
        self._app: FastAPI | None = None
        self.error: str | None = None
        self.stop: Callable[[], None] = lambda: None  # set by whoever runs the server

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif self._app is not None:
            await self._app(scope, receive, send)
        elif scope["type"] == "http":
            if scope["path"] == "/ping":
                response = JSONResponse(ping_body(self.model_name, ModelState.PENDING), status_code=503)
            else:
                response = error_response(not_ready(self.model_name, ModelState.PENDING))
            await response(scope, receive, send)

    async def _lifespan(self, receive: Callable, send: Callable) -> None:
        await receive()  # lifespan.startup
        async with contextlib.AsyncExitStack() as stack:  # exits the real app's lifespan: the engine shuts down
            starting = asyncio.ensure_future(self._start(stack))
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        await send({"type": "lifespan.shutdown.complete"})

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        try:
            app, service = await asyncio.get_running_loop().run_in_executor(None, self._build)
            await stack.enter_async_context(app.router.lifespan_context(app))
            self._app = app
            await service.settled.wait()
            if service.state is ModelState.FAILED:
                self.error = f"model {self.model_name} failed to load: {service.failure}"
        except Exception as exc:  # the CLI prints it as one line; the traceback only with --log-level debug
            log.debug("start-up failed", exc_info=True)
            self.error = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
        if self.error is not None:
            self.stop()
