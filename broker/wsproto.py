"""BatchingWebSocketProtocol: uvicorn's sans-I/O WebSocket protocol, plus many frames per write.

A connection that delivers jobs queues several frames between two turns of its writer. Sent one
ASGI ``websocket.send`` at a time, each costs the middleware wrappers, uvicorn's ``send`` (which
re-encodes the text) and one ``transport.write`` — one system call per frame. This subclass
accepts one more ASGI message::

    {"type": "presque.websocket.send_frames", "frames": [b'{"op":"job",...}', ...]}

whose frames (UTF-8 JSON text frames, already encoded) it serialises and writes at once —
framing them itself when no extension (permessage-deflate) was negotiated, since an unmasked
server frame is a 2-10 byte header. It advertises itself in the scope,
``scope["extensions"]["presque.send_frames"]``, so that the app can fall back to
``websocket.send`` under any other protocol implementation.

The input side likewise: a socket read holds many frames, each of which costs the app one ASGI
message and one await. An app that sends ``{"type": "presque.websocket.receive_batched"}`` then
receives, instead of ``websocket.receive``, ::

    {"type": "presque.websocket.receive_frames", "frames": ['{"op":"push",...}', b"...", ...]}

every message (``str`` for a text frame, ``bytes`` for a binary one) read since it last asked,
in order; other messages (``websocket.disconnect``) are unchanged and keep their place.

It also keeps an idle connection small (the broker holds 10,000 of them): it drops the
handshake's request and response once answered, and replaces the parent's ``asyncio.Queue`` of
received messages and its ``asyncio.Event`` for back-pressure, each of which costs one or more
empty 600-byte deques, with the little of them it uses.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Generic, TypeVar

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.http11 import Request
from websockets.protocol import State

SEND_FRAMES = "presque.websocket.send_frames"  # the ASGI message type, and the scope extension's name
EXTENSION = "presque.send_frames"
RECEIVE_BATCHED = "presque.websocket.receive_batched"  # the app asks for RECEIVE_FRAMES messages
RECEIVE_FRAMES = "presque.websocket.receive_frames"

_HEAD7 = [bytes((0x81, n)) for n in range(126)]  # FIN + text opcode, unmasked length < 126
_head = _HEAD7.__getitem__
_HEAD16 = struct.Struct("!BBH").pack
_HEAD64 = struct.Struct("!BBQ").pack

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

    def last(self) -> T | None:
        """The item put last and not taken yet, if any."""
        return self._items[-1] if self._items else None


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
        self.receive_batched = False

    def send_receive_event_to_app(self) -> None:
        if not self.receive_batched or self.close_sent:
            super().send_receive_event_to_app()
            return
        data: Any = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.curr_msg_data_type == "text":
            try:
                data = data.decode()
            except UnicodeDecodeError:  # pragma: no cover - websockets validates UTF-8 first
                self.logger.exception("Invalid UTF-8 sequence received from client.")
                self.conn.send_close(1007)
                self.handle_parser_exception()
                return
        # Join the RECEIVE_FRAMES message the app has not taken yet, unless something (a
        # disconnect) was queued after it.
        last = self.queue.last()
        if last is not None and last["type"] == RECEIVE_FRAMES:
            last["frames"].append(data)
            return  # reading is paused already: it was when that message was queued
        self.queue.put_nowait({"type": RECEIVE_FRAMES, "frames": [data]})
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The app's task is created but has not run yet: it sees the extension in its scope.
        scope: Any = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][EXTENSION] = {}

    async def send(self, message: ASGISendEvent) -> None:
        msg: Any = message
        if msg["type"] == RECEIVE_BATCHED:
            self.receive_batched = True
            return
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
        frames: list[bytes] = msg["frames"]
        if conn.state is State.OPEN and not (conn.extensions or conn.expect_continuation_frame or conn.debug):
            # What conn.send_text does, without a Frame object per frame: FIN + text opcode, the
            # length, no mask (a server's frames are not masked), the payload.
            out = conn.data_to_send()  # anything queued before, e.g. a pong, goes first
            for frame in frames:
                n = len(frame)
                out.append(_head(n) if n < 126 else _HEAD16(0x81, 126, n) if n < 65536 else _HEAD64(0x81, 127, n))
                out.append(frame)
            self.transport.write(b"".join(out))
            return
        try:
            for frame in frames:
                conn.send_text(frame)
        except InvalidState:
            raise ClientDisconnected() from None
        self.transport.write(b"".join(conn.data_to_send()))
