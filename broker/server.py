"""PresqueServer: uvicorn's ``Server`` with presque's graceful WebSocket shutdown.

On SIGTERM or Ctrl-C, uvicorn closes every WebSocket with 1012 before the app's lifespan
shutdown runs, so a consumer would lose its ``shutdown`` frame and its jobs would wait for their
leases to expire. :class:`PresqueServer` first stops accepting connections, then lets the
delivery hub stop delivering, send ``{"op": "shutdown"}``, return every lease and close with
1001; only then does uvicorn's own shutdown run.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import uvicorn

from broker.config import Settings
from broker.httpproto import LeanHttpProtocol
from broker.wsproto import BatchingWebSocketProtocol

log = logging.getLogger("presque.server")

GRACEFUL_TIMEOUT = 10.0  # seconds for the WebSocket shutdown before uvicorn's own shutdown goes on
# A frame up to this many times limits.max_frame reaches the session, which answers ``too_large``
# before closing with 1009; a bigger one is refused (1009) by the WebSocket layer unread.
FRAME_READ_FACTOR = 2


def uvicorn_config(app: Any, settings: Settings, *, host: str, port: int, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration of a broker serving ``app`` with ``settings``.

    Args:
        app: the ASGI app (``create_app(settings)``).
        settings: the broker settings (keepalive, frame limit, log level).
        host: address to listen on.
        port: port to listen on (0: any free port).
        overrides: more ``uvicorn.Config`` arguments, e.g. ``log_level``.
    """
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "loop": "auto",
        # uvicorn's httptools protocol, answering plain pushes without the ASGI machinery.
        "http": LeanHttpProtocol,
        # uvicorn's sans-I/O protocol, plus one write for all the frames a connection has queued.
        "ws": BatchingWebSocketProtocol,
        "lifespan": "on",
        "log_level": settings.server.log_level,
        "access_log": False,
        "ws_max_size": settings.limits.max_frame * FRAME_READ_FACTOR,
        "ws_ping_interval": settings.websocket.ping_interval,
        "ws_ping_timeout": settings.websocket.ping_timeout,
        "timeout_graceful_shutdown": 10,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


async def graceful_shutdown(app: Any, timeout: float = GRACEFUL_TIMEOUT) -> None:
    """Shut the app's WebSockets down gracefully: ``shutdown`` frame, leases returned, close 1001.

    Does nothing when the app's lifespan has not started a runtime. Safe to call more than once.
    """
    runtime = getattr(getattr(app, "state", None), "runtime", None)
    if runtime is None:
        return
    try:
        await asyncio.wait_for(runtime.delivery.shutdown(), timeout)
    except TimeoutError:
        log.warning("graceful WebSocket shutdown did not finish within %.0fs", timeout)
    except Exception:
        log.exception("graceful WebSocket shutdown failed")


class PresqueServer(uvicorn.Server):
    """uvicorn's server, with the WebSocket consumers shut down before the connections are cut.

    Args:
        config: a ``uvicorn.Config`` (see :func:`uvicorn_config`).
        app: the presque app whose runtime to shut down; default ``config.app``.
    """

    def __init__(self, config: uvicorn.Config, app: Any = None) -> None:
        super().__init__(config)
        self.app = config.app if app is None else app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in getattr(self, "servers", []):
            server.close()  # no new connections while the consumers are told to go
        if not self.force_exit:
            await graceful_shutdown(self.app)
        await super().shutdown(sockets)


def run(app: Any, settings: Settings, *, host: str, port: int) -> None:
    """Serve ``app`` until SIGINT/SIGTERM (``presque serve``)."""
    PresqueServer(uvicorn_config(app, settings, host=host, port=port), app).run()
