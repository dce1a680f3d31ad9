"""BatchingWebSocketProtocol: uvicorn's sans-I/O WebSocket protocol, plus many frames per write.

A connection that delivers jobs queues several frames between two turns of its writer. Sent one
ASGI ``websocket.send`` at a time, each costs the middleware wrappers, uvicorn's ``send`` (which
re-encodes the text) and one ``transport.write`` — one system call per frame. This subclass
accepts one more ASGI message::

    {"type": "presque.websocket.send_frames", "frames": [b'{"op":"job",...}', ...]}

whose frames (UTF-8 JSON text frames, already encoded) it serialises and writes at once. It
advertises itself in the scope, ``scope["extensions"]["presque.send_frames"]``, so that the app
can fall back to ``websocket.send`` under any other protocol implementation.
"""

from __future__ import annotations

from typing import Any

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.http11 import Request

SEND_FRAMES = "presque.websocket.send_frames"  # the ASGI message type, and the scope extension's name
EXTENSION = "presque.send_frames"


class BatchingWebSocketProtocol(WebSocketsSansIOProtocol):
    """``uvicorn.Config(ws=BatchingWebSocketProtocol)``: see the module docstring."""

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
