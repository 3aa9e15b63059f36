"""The OpenAI routes beside chat completions: `GET /v1/models` (what `client.models.list()` reads) and
`POST /v1/completions` (the legacy completions API; the body's `prompt` selects it, as on `/invocations`)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from llm_endpoint.server.serving import InferenceService, ServiceError
from llm_endpoint.server.transport import respond, start_generation


def add_openai_routes(app: FastAPI, service: InferenceService) -> None:
    created = int(time.time())
    name = service.config.model_name

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "llm-endpoint"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise ServiceError(404, f"Model not found: {model_id}", "ModelNotFoundException")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await respond(request, await start_generation(service, request))
