"""BatchingWebSocketProtocol: uvicorn's sans-I/O WebSocket protocol, plus many frames per write.

A connection that delivers jobs queues several frames between two turns of its writer. Sent one
ASGI ``websocket.send`` at a time, each costs the middleware wrappers, uvicorn's ``send`` (which
re-encodes the text) and one ``transport.write`` — one system call per frame. This subclass
accepts one more ASGI message::

    {"type": "presque.websocket.send_frames", "frames": [b'{"op":"job",...}', ...]}

whose frames (UTF-8 JSON text frames, already encoded) it serialises and writes at once. It
advertises itself in the scope, ``scope["extensions"]["presque.send_frames"]``, so that the app
can fall back to ``websocket.send`` under any other protocol implementation.

It also keeps an idle connection small (the broker holds 10,000 of them): it drops the
handshake's request and response once answered, and replaces the parent's ``asyncio.Queue`` of
received messages and its ``asyncio.Event`` for back-pressure, each of which costs one or more
empty 600-byte deques, with the little of them it uses.
"""

from __future__ import annotations

import asyncio
from typing import Any, Generic, TypeVar

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.http11 import Request

SEND_FRAMES = "presque.websocket.send_frames"  # the ASGI message type, and the scope extension's name
EXTENSION = "presque.send_frames"

T = TypeVar("T")


class _Waitable:
    # No list of waiters at all while nobody waits, which is nearly always.
    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] | None = None

    async def _next_wake(self) -> None:
        if self._waiters is None:
            self._waiters = []
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        finally:
            self._waiters.remove(future)
            if not self._waiters:
                self._waiters = None

    def _wake(self) -> None:
        for future in self._waiters or ():
            if not future.done():
                future.set_result(None)


class Inbox(_Waitable, Generic[T]):
    """What the protocol uses of ``asyncio.Queue``: ``put_nowait``, ``get`` and ``empty``.

    uvicorn pauses reading while a message waits, so the list stays short.
    """

    __slots__ = ("_items",)

    def __init__(self) -> None:
        super().__init__()
        self._items: list[T] = []

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        self._wake()

    async def get(self) -> T:
        while not self._items:
            await self._next_wake()
        return self._items.pop(0)

    def empty(self) -> bool:
        return not self._items


class Flag(_Waitable):
    """What the protocol uses of ``asyncio.Event``: ``set``, ``clear``, ``is_set`` and ``wait``."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        super().__init__()
        self._set = True

    def set(self) -> None:
        self._set = True
        self._wake()

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> bool:
        while not self._set:
            await self._next_wake()
        return True


class BatchingWebSocketProtocol(WebSocketsSansIOProtocol):
    """``uvicorn.Config(ws=BatchingWebSocketProtocol)``: see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue: Any = Inbox()
        self.writable: Any = Flag()

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The app's task is created but has not run yet: it sees the extension in its scope.
        scope: Any = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][EXTENSION] = {}

    async def send(self, message: ASGISendEvent) -> None:
        msg: Any = message
        if msg["type"] != SEND_FRAMES:
            await super().send(message)
            if self.handshake_complete and self.__dict__.get("response") is not None:
                # Answered (accepted or refused): the parent reads them no more.
                self.request = None  # type: ignore[assignment]
                self.response = None  # type: ignore[assignment]
            return
        # Back-pressure as in the parent's send: wait while the transport's buffer is full.
        await self.writable.wait()
        if self.disconnected:
            raise ClientDisconnected()
        if not self.handshake_complete or self.close_sent or self.initial_response is not None:
            raise RuntimeError(f"Unexpected ASGI message {SEND_FRAMES!r} outside an open WebSocket.")
        conn = self.conn
        try:
            for frame in msg["frames"]:
                conn.send_text(frame)
        except InvalidState:
            raise ClientDisconnected() from None
        self.transport.write(b"".join(conn.data_to_send()))
