"""FastAPI application: LMI's routes on one port, with request ids, metrics and LMI-shaped errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from server.serving import Generation, InferenceService, MidStreamError, ModelState, ServiceError

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# LMI's NettyUtils sets these on every response.
_STATIC_HEADERS = {
    "Pragma": "no-cache",
    "Cache-Control": "no-cache; no-store, must-revalidate, private",
    "Expires": "Thu, 01 Jan 1970 00:00:00 UTC",
}


class RequestContextMiddleware:
    """Request id in (SageMaker inference id or x-request-id, else a new one) and out on every response;
    LMI's cache headers; the request counter by route and status."""

    def __init__(self, app: ASGIApp, service: InferenceService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope)
        rid = next(
            (v for v in (incoming.get("x-amzn-sagemaker-inference-id"), incoming.get("x-request-id"))
             if v and _REQUEST_ID.match(v)),
            None,
        ) or str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = rid
                for name, value in _STATIC_HEADERS.items():
                    headers.setdefault(name, value)
                route = scope.get("route")
                path = getattr(route, "path", "unmatched")
                self.service.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, send_with_headers)


def error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than `limit` bytes without buffering them."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ServiceError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes (max_request_size)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServiceError(413, f"request body exceeds the limit of {limit} bytes (max_request_size)")
        chunks.append(chunk)
    return b"".join(chunks)


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
    try:
        async for chunk in generation.chunks():
            yield chunk
    except MidStreamError as exc:
        log.warning("request %s failed mid-stream: %s", generation.parsed.generation.request_id, exc)
        yield generation.formatter.on_error(str(exc))
    finally:
        await generation.aclose()


def create_app(service: InferenceService) -> FastAPI:
    config = service.config

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.ensure_future(service.load_with_timeout())
        yield
        loader.cancel()
        service.backend.shutdown()

    app = FastAPI(title="llm-endpoint", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(RequestContextMiddleware, service=service)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "ResourceNotFoundException" if exc.status_code == 404 else "BadRequestException"
        return JSONResponse({"code": exc.status_code, "type": kind, "message": str(exc.detail)},
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(ServiceError(400, f"invalid request: {exc.errors()[0].get('msg')}"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(ServiceError(500, f"internal server error: {type(exc).__name__}"))

    def status_body() -> dict[str, Any]:
        return {config.model_name: {"status": service.state.value}}

    @app.get("/ping")
    async def ping() -> JSONResponse:
        code = 200 if service.state is ModelState.HEALTHY else 503
        return JSONResponse(status_body(), status_code=code)

    def check_model_name(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise ServiceError(404, f"Model not found: {name}", "ModelNotFoundException")

    async def invoke(request: Request, force_stream: bool = False) -> Response:
        body = await read_body(request, config.max_request_size)
        generation = await service.start(
            body, request.headers.get("content-type"), request.state.request_id, force_stream
        )
        # Content-Type is set as a header, not media_type: Starlette would append "; charset=utf-8" to
        # text/event-stream, and LMI clients compare the header exactly.
        headers = {"content-type": generation.formatter.content_type}
        if generation.stream:
            return StreamingResponse(lmi_stream(generation), headers=headers)
        content = await complete_or_abort(request, generation)
        if content is None:
            return Response(status_code=499)
        return Response(content, headers=headers)

    async def _invoke_with_errors(request: Request) -> Response:
        try:
            return await invoke(request)
        except MidStreamError as exc:  # non-streaming: nothing was sent yet
            return error_response(ServiceError(424, str(exc)))

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        check_model_name(request.query_params.get("model_name") or request.headers.get("model_name"))
        return await _invoke_with_errors(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _invoke_with_errors(request)

    @app.post("/predictions/{model_name}")
    @app.post("/models/{model_name}/invoke")
    async def named_invocations(model_name: str, request: Request) -> Response:
        check_model_name(model_name)
        return await _invoke_with_errors(request)

    @app.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"models": [{"modelName": config.model_name, "modelUrl": config.model_id,
                            "status": service.state.value}]}

    @app.get("/models/{model_name}")
    async def describe_model(model_name: str) -> list[dict[str, Any]]:
        check_model_name(model_name)
        stats = service.backend.stats()
        return [{
            "workflowName": config.model_name,
            "models": [{
                "modelName": config.model_name,
                "modelUrl": config.model_id,
                "batchSize": 1,
                "maxBatchDelayMillis": 0,
                "maxIdleSeconds": 0,
                "queueSize": config.job_queue_size,
                "requestInQueue": stats.waiting,
                "status": service.state.value,
                "loadedAtStartup": True,
                "backend": service.backend.name,
                "maxRollingBatchSize": config.effective_max_rolling_batch_size,
                "workerGroups": [{
                    "device": {"deviceType": "cpu", "deviceId": -1},
                    "minWorkers": 1,
                    "maxWorkers": 1,
                    "workers": [{"id": 1, "startTime": "", "status": "READY"
                                 if service.state is ModelState.HEALTHY else service.state.value}],
                }],
            }],
        }]

    @app.get("/metrics")
    @app.get("/server/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return app
