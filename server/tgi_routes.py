"""TGI's own routes, `POST /`, `/generate` and `/generate_stream`, served with `option.tgi_compat=true`, so that
TGI clients pointed at the server root (huggingface_hub `InferenceClient(base_url=...)`, which posts to `/`;
clients that post to `/generate` or `/generate_stream`) work unchanged.

They answer as text-generation-inference does: `/` streams when the body says so and otherwise returns a
one-element array; `/generate` returns the object itself and never streams; `/generate_stream` always streams
SSE. TGI's body differs from LMI's only in naming stop sequences `stop` and in `details` defaulting to off.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from llm_endpoint.server.serving import InferenceService, PayloadAdapter
from llm_endpoint.server.transport import respond, start_generation


def tgi_payload(stream: bool | None) -> PayloadAdapter:
    """TGI's request body in LMI's schema; `stream` (when not None) is what the route fixes."""

    def adapt(payload: dict[str, Any]) -> dict[str, Any]:
        params = payload.get("parameters")
        if isinstance(params, dict):
            params = {k: v for k, v in params.items() if k != "stop"}
            if "stop" in payload["parameters"]:
                params.setdefault("stop_sequences", payload["parameters"]["stop"])
            params.setdefault("details", False)
            payload = {**payload, "parameters": params}
        elif params is None:
            payload = {**payload, "parameters": {"details": False}}
        if stream is not None:
            payload = {**payload, "stream": stream}
        return payload

    return adapt


def add_tgi_routes(app: FastAPI, service: InferenceService) -> None:
    """Registers the routes only with `option.tgi_compat=true`: without it the server answers LMI's shapes,
    which TGI clients cannot read."""
    if not service.config.tgi_compat:
        return

    @app.post("/")
    async def compat_generate(request: Request) -> Response:
        return await respond(request, await start_generation(service, request, adapt=tgi_payload(None)))

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        response = await respond(request, await start_generation(service, request, adapt=tgi_payload(False)))
        # LMI's tgi_compat body is TGI's `/` answer, `[{...}]`; TGI's /generate answers the object inside.
        if response.status_code == 200 and response.headers.get("content-type") == "application/json":
            body = json.loads(response.body)
            if isinstance(body, list) and len(body) == 1:
                headers = {k: v for k, v in response.headers.items() if k != "content-length"}
                return Response(json.dumps(body[0], ensure_ascii=False), headers=headers)
        return response

    @app.post("/generate_stream")
    async def generate_stream(request: Request) -> Response:
        generation = await start_generation(
            service, request, force_stream=True, accept="text/event-stream", adapt=tgi_payload(True)
        )
        return await respond(request, generation)
