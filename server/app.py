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
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_endpoint.server.auth import BearerAuthMiddleware
from llm_endpoint.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from llm_endpoint.server.openai_routes import add_openai_routes
from llm_endpoint.server.sagemaker.routes import add_sagemaker_routes
from llm_endpoint.server.serving import InferenceService, ModelState, ServiceError, ping_body
from llm_endpoint.server.tgi_routes import add_tgi_routes
from llm_endpoint.server.transport import ClientGone, error_response, respond, start_generation

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
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = rid
                for name, value in _STATIC_HEADERS.items():
                    headers.setdefault(name, value)
                route = scope.get("route")
                path = getattr(route, "path", "unmatched")
                self.service.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            # Handled here, inside this middleware, so a 500 also gets its request id, headers and count.
            log.exception("unhandled error in request %s", rid)
            if started:
                raise
            body = ServiceError(500, f"internal server error: {type(exc).__name__}").body()
            await JSONResponse(body, status_code=500)(scope, receive, send_with_headers)


async def _sweep_sessions(service: InferenceService) -> None:
    """End idle sessions on time even when no request arrives to notice, so their engine caches are freed."""
    assert service.sessions is not None
    period = max(1.0, min(60.0, service.sessions.expiration / 4))
    while True:
        await asyncio.sleep(period)
        service.sessions.sweep()


def create_app(service: InferenceService) -> FastAPI:
    config = service.config

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.ensure_future(service.load_with_timeout())
        sweeper = asyncio.ensure_future(_sweep_sessions(service)) if service.sessions else None
        yield
        loader.cancel()
        if sweeper:
            sweeper.cancel()
        service.backend.shutdown()

    app = FastAPI(title="llm-endpoint", lifespan=lifespan, docs_url=None, redoc_url=None)
    if config.api_key is not None:  # added first, so it runs inside the request-id middleware
        app.add_middleware(BearerAuthMiddleware, api_key=config.api_key.get_secret_value())
    app.add_middleware(RequestContextMiddleware, service=service)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody is left to read it

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "ResourceNotFoundException" if exc.status_code == 404 else "BadRequestException"
        return JSONResponse({"code": exc.status_code, "type": kind, "message": str(exc.detail)},
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(ServiceError(400, f"invalid request: {exc.errors()[0].get('msg')}"))

    # LMI shows where the model came from; that is a local path or an S3 URI nobody outside needs to see.
    model_url = config.model_id if config.expose_model_url else ""

    @app.get("/ping")
    async def ping() -> JSONResponse:
        code = 200 if service.state is ModelState.HEALTHY else 503
        return JSONResponse(ping_body(config.model_name, service.state), status_code=code)

    def check_model_name(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise ServiceError(404, f"Model not found: {name}", "ModelNotFoundException")

    async def invoke(request: Request) -> Response:
        return await respond(request, await start_generation(service, request))

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        check_model_name(request.query_params.get("model_name") or request.headers.get("model_name"))
        return await invoke(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await invoke(request)

    @app.post("/predictions/{model_name}")
    @app.post("/models/{model_name}/invoke")
    async def named_invocations(model_name: str, request: Request) -> Response:
        check_model_name(model_name)
        return await invoke(request)

    @app.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"models": [{"modelName": config.model_name, "modelUrl": model_url,
                            "status": service.state.value}]}

    @app.get("/models/{model_name}")
    async def describe_model(model_name: str) -> list[dict[str, Any]]:
        check_model_name(model_name)
        stats = service.stats()
        return [{
            "workflowName": config.model_name,
            "models": [{
                "modelName": config.model_name,
                "modelUrl": model_url,
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

    add_sagemaker_routes(app, service)
    add_openai_routes(app, service)
    add_tgi_routes(app, service)

    @app.get("/metrics")
    @app.get("/server/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return app
