"""The SageMaker runtime API (`InvokeEndpoint`, `InvokeEndpointWithResponseStream`) as boto3 sends it.

A boto3 client pointed at this server with `endpoint_url` behaves as against a real endpoint: the body
is the model payload, errors carry `x-amzn-ErrorType` so boto3 raises the modeled exception, and the
stream route answers AWS event-stream frames (the `application/vnd.amazon.eventstream` framing that botocore decodes).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from llm_endpoint.server.sagemaker.eventstream import model_stream_error, payload_part
from llm_endpoint.server.serving import Generation, InferenceService, MidStreamError, ServiceError, SessionReply
from llm_endpoint.server.transport import GenerationStream, respond, start_generation

log = logging.getLogger(__name__)

EVENTSTREAM = "application/vnd.amazon.eventstream"
_ENDPOINT_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")
_MAX_CUSTOM_ATTRIBUTES = 1024


class SageMakerError(Exception):
    """An error in SageMaker's shape: `x-amzn-ErrorType` names the modeled exception boto3 raises."""

    def __init__(self, status: int, error_type: str, body: dict) -> None:
        super().__init__(body.get("Message") or body.get("message"))
        self.status, self.error_type, self.body = status, error_type, body

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers={"x-amzn-ErrorType": self.error_type})


def validation_error(message: str) -> SageMakerError:
    return SageMakerError(400, "ValidationError", {"message": message})


def from_model_error(exc: ServiceError, endpoint: str) -> SageMakerError:
    """SageMaker wraps a container's error status as 424 ModelError, keeping the original status and body
    (not retried by boto3, unlike 5xx); a model still loading is ModelNotReadyException (429)."""
    if exc.status == 413 or (exc.status == 400 and exc.error_type is None):  # too large; bad session
        return validation_error(str(exc))
    if exc.status == 503 and exc.error_type is None and "not ready" in str(exc):
        return SageMakerError(429, "ModelNotReadyException", {"Message": str(exc)})
    original = json.dumps(exc.body(), separators=(",", ":"))
    kind = "client" if exc.status < 500 else "server"
    message = (f'Received {kind} error ({exc.status}) from primary with message "{original}". '
               f"See the llm-endpoint server log for endpoint {endpoint}.")
    return SageMakerError(424, "ModelError", {
        "ErrorCode": "CLIENT_ERROR_FROM_MODEL" if exc.status < 500 else "SERVER_ERROR_FROM_MODEL",
        "Message": message,
        "OriginalStatusCode": exc.status,
        "OriginalMessage": original,
        "LogStreamArn": f"arn:aws:logs:local:000000000000:log-group:/aws/sagemaker/Endpoints/{endpoint}",
    })


def _check_request(endpoint: str, request: Request) -> dict[str, str]:
    """SageMaker's front-end checks, and the response headers every invocation carries."""
    if len(endpoint) > 63 or not _ENDPOINT_NAME.match(endpoint):
        raise validation_error(
            f"1 validation error detected: Value '{endpoint}' at 'endpointName' failed to satisfy constraint: "
            "Member must satisfy regular expression pattern: ^[a-zA-Z0-9](-*[a-zA-Z0-9])* and length <= 63"
        )
    attributes = request.headers.get("x-amzn-sagemaker-custom-attributes")
    if attributes is not None and (len(attributes) > _MAX_CUSTOM_ATTRIBUTES or not attributes.isascii()):
        raise validation_error(
            f"CustomAttributes must be at most {_MAX_CUSTOM_ATTRIBUTES} ASCII characters"
        )
    variant = request.headers.get("x-amzn-sagemaker-target-variant") or "AllTraffic"
    return {"x-Amzn-Invoked-Production-Variant": variant, "x-amzn-RequestId": request.state.request_id}


async def _event_frames(generation: Generation) -> AsyncIterator[bytes]:
    """One PayloadPart per formatter frame, so each part holds exactly one complete JSON line or SSE event
    (LiteLLM and other readers decode each part on its own); a failure after the first byte becomes a
    ModelStreamError frame and the body then ends cleanly, so boto3 raises EventStreamError instead of a
    broken read. Closing the generation is GenerationStream's job."""
    try:
        async for frame in generation.frames():
            yield payload_part(frame.encode("utf-8"))
    except MidStreamError as exc:
        log.warning("request %s failed mid-stream: %s", generation.parsed.generation.request_id, exc)
        yield model_stream_error(str(exc))


def add_sagemaker_routes(app: FastAPI, service: InferenceService) -> None:
    @app.post("/endpoints/{endpoint}/invocations")
    async def invoke_endpoint(endpoint: str, request: Request) -> Response:
        try:
            headers = _check_request(endpoint, request)
            generation = await start_generation(service, request, accept=request.headers.get("accept"))
            return await respond(request, generation, headers)
        except ServiceError as exc:
            return from_model_error(exc, endpoint).response()
        except SageMakerError as exc:
            return exc.response()

    @app.post("/endpoints/{endpoint}/invocations-response-stream")
    async def invoke_endpoint_with_response_stream(endpoint: str, request: Request) -> Response:
        try:
            headers = _check_request(endpoint, request)
            generation = await start_generation(
                service, request, force_stream=True, accept=request.headers.get("x-amzn-sagemaker-accept")
            )
        except ServiceError as exc:
            return from_model_error(exc, endpoint).response()
        except SageMakerError as exc:
            return exc.response()
        if isinstance(generation, SessionReply):  # botocore reads NewSessionId/ClosedSessionId on InvokeEndpoint only
            return validation_error(
                "session requests (requestType NEW_SESSION or CLOSE) go to InvokeEndpoint, not "
                f"InvokeEndpointWithResponseStream; the request was answered: {generation.body}"
            ).response()
        headers["X-Amzn-SageMaker-Content-Type"] = generation.formatter.content_type
        return GenerationStream(_event_frames(generation), generation, media_type=EVENTSTREAM, headers=headers)
