"""uvicorn, held to the server's HTTP limits: head size, head read time, open connections, and a drain on
SIGTERM that ends the process with status 0 when every admitted request finished.

uvicorn bounds none of the first three itself (httptools accepts any header size, and no timer runs while a
client trickles its request head), so the h11 protocol is extended here, before any request reaches the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
from collections.abc import Generator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from llm_endpoint.backends.config import ServingConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    max_header_size: int
    header_read_timeout: float
    max_connections: int


class _Config(uvicorn.Config):
    """uvicorn's config plus our limits, which uvicorn hands to every protocol instance."""

    def __init__(self, app: Any, limits: HttpLimits, **kwargs: Any) -> None:
        super().__init__(app, http=GuardedH11Protocol, **kwargs)
        self.limits = limits


def _error_bytes(status: int, message: str) -> bytes:
    """A whole response in LMI's error shape, for rejections made before h11 has a request to answer."""
    phrase = HTTPStatus(status).phrase
    body = json.dumps({"code": status, "type": phrase.replace(" ", ""), "message": message}).encode()
    head = (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """h11 with a byte cap and a deadline on each request head, and a cap on open connections. (h11's own
    size cap applies only to a head still incomplete after a read, so a large head arriving at once passed.)"""

    def __init__(self, config: _Config, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = config.limits
        self._head_bytes = 0
        self._head_tail = b""  # the last bytes seen, in case the blank line ending the head spans two reads
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._reject(503, f"too many open connections (max_connections={self.limits.max_connections}): retry later")
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # a request head is arriving: count its bytes, not the body's
            self._arm_head_timer()
            end = (self._head_tail + data).find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end + 4 - len(self._head_tail)
            self._head_tail = data[-3:]
            if self._head_bytes > self.limits.max_header_size:
                self._reject(431, f"request line and headers exceed max_header_size={self.limits.max_header_size} bytes")
                return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete: the app takes it from here
            self._cancel_head_timer()
            self._head_bytes = 0
            self._head_tail = b""

    def send_400_response(self, msg: str) -> None:
        self._reject(400, f"malformed HTTP request: {msg}")

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_read_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_bytes:
            self._reject(408, f"request head not received within header_read_timeout={self.limits.header_read_timeout} s")
        else:  # a connection that never sent a byte is just closed, as an idle keep-alive one is
            self.transport.close()

    def _reject(self, status: int, message: str) -> None:
        self._cancel_head_timer()
        if not self.transport.is_closing():
            log.info("closing connection from %s: %s", self.client, message)
            self.transport.write(_error_bytes(status, message))
            self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that remembers whether its shutdown drain finished, and does not re-raise SIGTERM
    afterwards (uvicorn does, so the process would end with status -15 even after a clean drain)."""

    drained = False

    async def _wait_tasks_to_complete(self) -> None:
        await super()._wait_tasks_to_complete()
        self.drained = True  # not reached when graceful_shutdown_timeout cuts the wait short

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def make_server(app: Any, config: ServingConfig, *, host: str, port: int, log_level: str) -> DrainingServer:
    limits = HttpLimits(config.max_header_size, config.header_read_timeout, config.max_connections)
    return DrainingServer(_Config(
        app, limits, host=host, port=port, log_level=log_level, access_log=False,
        h11_max_incomplete_event_size=config.max_header_size, timeout_keep_alive=config.keep_alive_timeout,
        timeout_graceful_shutdown=config.graceful_shutdown_timeout,
    ))


def run(server: DrainingServer) -> int:
    """Serve until SIGTERM/SIGINT (or `server.should_exit`); 0 when the drain finished, 1 when requests had to
    be cut. uvicorn's SystemExit (it could not bind) passes through."""
    server.run()
    if not server.drained:
        log.error("graceful_shutdown_timeout=%s s ran out: requests still in flight were cut",
                  server.config.timeout_graceful_shutdown)
        return 1
    return 0
