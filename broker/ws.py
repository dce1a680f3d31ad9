"""The WebSocket endpoints ``/ws`` and ``/ws/{queue}``: handshake checks, then a Connection.

Before accepting, the handshake is refused with 403 when a browser's ``Origin`` is not allowed
(cross-site WebSocket hijacking), or when it carries a token that is not valid. Beyond
``limits.max_connections`` a connection is accepted and closed at once with 1013 (try again
later), which a client can tell from a network failure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from broker.asyncapi import asyncapi_json
from broker.auth import find_token, presented_token
from broker.config import Settings
from broker.connection import Connection
from broker.errors import Unauthorized
from broker.frames import CloseCode, SessionLimits
from broker.protocol import Authorize, Session

if TYPE_CHECKING:
    from broker.runtime import Runtime


def session_limits(settings: Settings) -> SessionLimits:
    """The protocol's per-connection limits, from the broker settings."""
    limits, queues = settings.limits, settings.queues
    return SessionLimits(
        max_frame=limits.max_frame,
        max_subscriptions=limits.max_subscriptions,
        max_channels=limits.max_channels,
        max_watches=limits.max_watches,
        max_errors=limits.max_errors,
        max_prefetch=limits.max_prefetch,
        default_lease=queues.default_lease,
        max_lease=queues.max_lease,
        max_batch=limits.max_batch,
        send_buffer=settings.websocket.send_buffer,
    )


def origin_allowed(websocket: WebSocket, allowed: tuple[str, ...]) -> bool:
    """No Origin (not a browser): allowed. Else same-origin, or listed in ``server.allowed_origins``."""
    origin = websocket.headers.get("origin")
    if origin is None:
        return True
    if "*" in allowed or origin in allowed:
        return True
    host = websocket.headers.get("host", "")
    return urlsplit(origin).netloc.lower() == host.lower()


async def websocket_endpoint(websocket: WebSocket) -> None:
    """Serve one WebSocket: ``/ws``, or ``/ws/{queue}`` which subscribes to that queue at once."""
    runtime: Runtime = websocket.app.state.runtime
    settings = runtime.settings
    if not origin_allowed(websocket, settings.server.allowed_origins):
        await websocket.close(code=1008)  # before accept: the handshake is refused with 403
        return
    authorize: Authorize | None = None
    auth_required = False
    if settings.auth.enabled:
        presented = presented_token(websocket)
        if presented is None:
            auth_required = True  # browsers may send an auth frame first
        else:
            token = find_token(settings, presented)
            if token is None:
                await websocket.close(code=1008)
                return
            authorize = token.allows

    def check_token(value: str) -> Authorize:
        token = find_token(settings, value)
        if token is None:
            raise Unauthorized("invalid token")
        return token.allows

    hub = runtime.delivery
    await websocket.accept()
    if hub.shutting_down or len(hub.connections) >= settings.limits.max_connections:
        reason = "shutting down" if hub.shutting_down else "too many connections"
        await websocket.close(code=int(CloseCode.TRY_AGAIN_LATER), reason=reason)
        return
    session = Session(session_limits(settings), authorize=authorize, auth_required=auth_required)
    connection = Connection(
        hub,
        websocket,
        session,
        # With auth off an ``auth`` frame is accepted as is: there is no token to check it against.
        check_token=check_token if settings.auth.enabled else None,
        idle_timeout=settings.websocket.idle_timeout,
    )
    queue = websocket.path_params.get("queue")
    await connection.run(None if queue is None else {"op": "subscribe", "queue": queue})


def websocket_routes() -> list[BaseRoute]:
    """``/ws``, ``/ws/{queue}`` and the AsyncAPI document of their frames, ``/asyncapi.json``."""
    return [
        WebSocketRoute("/ws", websocket_endpoint),
        WebSocketRoute("/ws/{queue}", websocket_endpoint),
        Route("/asyncapi.json", asyncapi_json, methods=["GET"]),
    ]
