"""SageMaker stateful sessions (`option.enable_stateful_sessions`): ids, idle expiry, one turn at a time,
and each conversation's history.

The server owns a session's history (the LMI text or the chat messages so far, replies included) and
renders every turn as the stateless request carrying that history would be rendered, so a turn's output is
the stateless output by construction. Engines keep only KV: ours reuses the session's cache for the longest
common prefix, vLLM and OpenVINO their prefix caches.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

log = logging.getLogger(__name__)

SESSION_HEADER = "X-Amzn-SageMaker-Session-Id"
NEW_SESSION_HEADER = "X-Amzn-SageMaker-New-Session-Id"
CLOSED_SESSION_HEADER = "X-Amzn-SageMaker-Closed-Session-Id"
NEW_SESSION = "NEW_SESSION"
CLOSE = "CLOSE"
_REMEMBERED_ENDED = 10_000  # ended ids kept to tell "closed"/"expired" apart from "unknown"


class SessionError(Exception):
    """A session header or control request that cannot be served; 400 with LMI's error body."""


@dataclass
class History:
    """What the conversation holds so far: LMI `inputs` text or chat messages, each turn's reply included."""

    kind: Literal["lmi", "chat"] | None = None
    text: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)
    chars: int = 0  # how much text a turn re-renders and re-tokenizes


@dataclass(frozen=True)
class Turn:
    """A request's own input within its session, appended to the history with the reply once it succeeds."""

    kind: Literal["lmi", "chat"]
    text: str = ""
    messages: tuple[dict[str, str], ...] = ()


@dataclass(eq=False)
class Session:
    id: str
    expires: float  # wall-clock seconds
    history: History = field(default_factory=History)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # FIFO: turns run in arrival order
    ended: bool = False

    def commit(self, turn: Turn, reply: str) -> None:
        history = self.history
        history.kind = turn.kind
        if turn.kind == "lmi":
            history.text += turn.text + reply
        else:
            history.messages.extend(turn.messages)
            history.messages.append({"role": "assistant", "content": reply})
        history.chars += len(turn.text) + sum(len(m.get("content") or "") for m in turn.messages) + len(reply)


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _valid_id(raw: str) -> bool:
    try:
        return str(uuid.UUID(raw)) == raw
    except ValueError:
        return False


class SessionStore:
    """Open sessions by id. An id is a random UUID, so nothing of one session is reachable from another."""

    def __init__(self, expiration: int, on_end: Callable[[str], None], clock: Callable[[], float] = time.time) -> None:
        self.expiration = expiration
        self._on_end = on_end  # frees what the engine keeps for the session
        self._clock = clock
        self._open: dict[str, Session] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()  # id -> "closed" | "expired"

    @property
    def open_sessions(self) -> int:
        return len(self._open)

    def create(self) -> Session:
        self.sweep()  # here and periodically (the app's sweeper), not on every turn
        session = Session(str(uuid.uuid4()), self._clock() + self.expiration)
        self._open[session.id] = session
        log.info("session %s created", session.id)
        return session

    def get(self, raw_id: str) -> Session:
        """The open session `raw_id` names; its idle timer restarts."""
        session = self._open.get(raw_id)
        if session is not None and self._idle_past_expiry(session):
            self._end(session, "expired")
            session = None
        if session is None:
            raise SessionError(self._missing(raw_id))
        session.expires = self._clock() + self.expiration
        return session

    def touch(self, session: Session) -> None:
        """Restart the idle timer (a turn just ended)."""
        session.expires = self._clock() + self.expiration

    def check_open(self, session: Session) -> None:
        if session.ended:
            raise SessionError(self._missing(session.id))

    def close(self, raw_id: str) -> str:
        session = self._open.get(raw_id)
        if session is None:
            raise SessionError(self._missing(raw_id))
        self._end(session, "closed")
        return session.id

    def sweep(self) -> None:
        """End every session idle past its expiry (a turn in progress keeps its session alive)."""
        for session in [s for s in self._open.values() if self._idle_past_expiry(s)]:
            self._end(session, "expired")

    def _idle_past_expiry(self, session: Session) -> bool:
        return session.expires < self._clock() and not session.lock.locked()

    def header_value(self, session: Session) -> str:
        return f"{session.id}; Expires={_utc(session.expires)}"

    def _end(self, session: Session, how: str) -> None:
        session.ended = True
        del self._open[session.id]
        self._ended[session.id] = how
        while len(self._ended) > _REMEMBERED_ENDED:
            self._ended.popitem(last=False)
        log.info("session %s %s", session.id, how)
        self._on_end(session.id)

    def _missing(self, raw_id: str) -> str:
        shown = raw_id if len(raw_id) <= 80 else raw_id[:80] + "..."
        if not _valid_id(raw_id):
            return (f"invalid {SESSION_HEADER} {shown!r}: expected a session id from a NEW_SESSION request "
                    f"(a UUID such as 123e4567-e89b-12d3-a456-426614174000) or NEW_SESSION")
        how = self._ended.get(raw_id)
        if how == "expired":
            return (f"session {raw_id} has expired (idle for more than option.sessions_expiration="
                    f"{self.expiration} s): start a new one with {{\"requestType\": \"NEW_SESSION\"}}")
        if how == "closed":
            return f"session {raw_id} is closed: start a new one with {{\"requestType\": \"NEW_SESSION\"}}"
        return f"session {raw_id} is not known to this server: start one with {{\"requestType\": \"NEW_SESSION\"}}"
