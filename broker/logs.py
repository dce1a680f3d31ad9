"""Structured logs: one line per record, as text or JSON (``server.log_json``), with request ids.

:class:`RequestIdMiddleware` gives every HTTP request and WebSocket connection an id, kept in a
context variable for as long as the request (or connection) is served, so that every record
logged meanwhile, by any logger, carries it; tasks started meanwhile inherit it too. The id is
the client's ``X-Request-Id`` when it sends a sensible one, else a new one; either way it comes
back in the response's ``X-Request-Id`` header (the WebSocket handshake's too).

Call order: :func:`setup_logging` once per process (``presque serve`` does, in each worker), then
add the middleware to the app (``create_app`` does).
"""

from __future__ import annotations

import logging
import os
import random
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.config import ServerSettings

__all__ = [
    "REQUEST_ID",
    "JsonFormatter",
    "RequestIdMiddleware",
    "TextFormatter",
    "accepted_id",
    "new_id",
    "setup_logging",
]

# A context variable is per task and per request by construction: not shared mutable state.
REQUEST_ID: ContextVar[str | None] = ContextVar("presque_request_id", default=None)

HEADER = b"x-request-id"
_VALID_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
# The attributes every LogRecord has: anything else was passed with ``extra=`` and is logged too.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "request_id"}


# Request ids only need to be unique, not secret: a PRNG seeded from the OS (reseeded in a forked
# child) saves a getrandom() system call per request.
_id_random = random.Random(os.urandom(16))
os.register_at_fork(after_in_child=lambda: _id_random.seed(os.urandom(16)))


def new_id(prefix: str = "") -> str:
    """A short random id (64 bits, hex)."""
    return f"{prefix}{_id_random.getrandbits(64):016x}"


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id`` to the current request's or connection's id (None outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL [pid] logger: message [request id]``, then the traceback if any."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} [{request_id}]" if request_id else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
    ``pid``, ``request_id`` when inside a request, ``exc`` with the traceback, and every ``extra``.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_") and name not in entry:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def setup_logging(server: ServerSettings, *, stream: Any = None) -> logging.Handler:
    """Send every log record of the process (uvicorn's included) to ``stream`` (default stderr).

    Replaces the root logger's handlers with one that writes ``server.log_json`` JSON lines or
    text lines, at ``server.log_level``. uvicorn's own loggers are made to propagate to it (serve
    with uvicorn's ``log_config=None`` so that uvicorn does not install its handlers again).

    Returns:
        The handler installed.
    """
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if server.log_json else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(server.log_level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    return handler


class RequestIdMiddleware:
    """ASGI middleware: an id per HTTP request and WebSocket connection, in logs and headers.

    Args:
        app: the ASGI app to wrap.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = _client_id(scope) or new_id("ws-" if scope["type"] == "websocket" else "")
        header = (HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        token = REQUEST_ID.set(request_id)
        # Not reset when the app raises: the 500 handler, outside this middleware, logs with the id.
        # Each request runs in a task of its own, so the id goes no further.
        await self.app(scope, receive, send_with_id)
        REQUEST_ID.reset(token)


def _client_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == HEADER:
            return accepted_id(value)
    return None


def accepted_id(value: bytes) -> str | None:
    """The client's ``X-Request-Id`` value if it is a sensible id (1-64 of ``A-Za-z0-9._:-``), else None."""
    return value.decode("ascii") if _VALID_ID.fullmatch(value) else None
