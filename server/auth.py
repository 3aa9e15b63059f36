"""Optional bearer-token check (option.api_key) for endpoints reachable by more than SageMaker's own proxy."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

# SageMaker's health check carries no credential, and a load balancer's must not need one either.
OPEN_PATHS = frozenset({"/ping"})


class BearerAuthMiddleware:
    """`Authorization: Bearer <option.api_key>` on every route but /ping; 401 in LMI's error shape otherwise."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        body = {"code": 401, "type": "UnauthorizedException",
                "message": "missing or wrong credential: expected the header 'Authorization: Bearer <option.api_key>'"}
        await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        given = Headers(scope=scope).get("authorization", "").encode("latin-1")
        return hmac.compare_digest(given, self.expected)
