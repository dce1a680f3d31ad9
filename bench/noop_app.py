"""The framework's own ceiling: a Starlette app that does nothing, served like the broker.

``POST /q/{queue}`` reads the body and answers 201 with a small JSON body (what a push answers,
without Redis). ``/ws`` sends a small text frame as fast as the client reads, forever (what
delivery would cost if fetching jobs were free). Served by uvicorn with the broker's options:
uvloop, httptools, the ``websockets-sansio`` WebSocket implementation, no access log.

    python bench/noop_app.py PORT
"""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

REPLY = b'{"id":"018c2f0a1b2c3d4e5f6a7","queue":"noop"}'
FRAME = (
    '{"op":"job","queue":"noop","id":"018c2f0a1b2c3d4e5f6a7","token":"9f2c3e0d1a2b3c4d5e6f-1",'
    '"attempt":1,"body":{"n":1}}'
)


async def push(request: Request) -> Response:
    await request.body()
    return Response(REPLY, status_code=201, media_type="application/json")


async def frames(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(FRAME)
    except (WebSocketDisconnect, OSError, RuntimeError):
        return


app = Starlette(routes=[Route("/q/{queue}", push, methods=["POST"]), WebSocketRoute("/ws", frames)])

if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        loop="auto",
        http="auto",
        ws="websockets-sansio",
        log_level="warning",
        access_log=False,
    )
