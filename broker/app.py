"""The ASGI application: ``create_app(settings)`` with a lifespan that owns Redis and the runtime.

Errors are translated to the wire here and only here: a ``BrokerError`` becomes its status and
JSON payload, an unreachable Redis a 503 with ``Retry-After``, anything unexpected a 500 with a
JSON body (never a traceback).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from broker import http, openapi
from broker.auth import AccessMiddleware, auth_routes, redacted_logs
from broker.config import Settings
from broker.embedded import EmbeddedRedis
from broker.errors import BrokerError, Unavailable
from broker.fastpush import FastPush
from broker.logs import RequestIdMiddleware
from broker.metrics import LatencyExporter, metrics_routes
from broker.models import dumps
from broker.ops import ops_routes
from broker.redis import check_redis, create_redis
from broker.runtime import Runtime
from broker.ws import websocket_routes

log = logging.getLogger("presque.app")

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def error_response(status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(payload), status_code=status, media_type="application/json", headers=headers)


async def on_broker_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BrokerError)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Unavailable) else None
    return error_response(exc.status, exc.payload(), headers)


async def on_redis_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
        log.warning("redis unavailable during %s %s: %s", request.method, request.url.path, exc)
        return error_response(503, {"error": "redis unavailable"}, {"Retry-After": "1"})
    log.error("redis error during %s %s: %s", request.method, request.url.path, exc)
    return error_response(503, {"error": f"redis error: {exc}"}, {"Retry-After": "1"})


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, {"error": message}, dict(exc.headers or {}))


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error during %s %s", request.method, request.url.path)
    return error_response(500, {"error": "internal error"})


class BrokerApp(Starlette):
    """Starlette, with the push routes served first by a lean path (``broker/fastpush.py``) that
    answers them exactly as the middlewares and routes would; every other request goes to those.

    Args:
        fast_push: the lean path; the app binds it to itself.
        kwargs: Starlette's arguments.
    """

    def __init__(self, fast_push: FastPush, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fast_push = fast_push
        fast_push.bind(self, self.serve_routed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.fast_push(scope, receive, send)

    async def serve_routed(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve through the middlewares and the router, as a plain Starlette app would."""
        await super().__call__(scope, receive, send)


def freeze_heap() -> None:
    """Keep what start-up made (modules, classes, the app, the runtime) out of the cyclic GC.

    A full collection walks every tracked object: ~46,000 after start-up, 10-13 ms of a quiet
    core, 25-110 ms measured under load, every few seconds while the broker is busy (objects
    in flight survive young collections and trigger it). Frozen, they are never walked again
    (refcounting still frees them); what is left to walk is what came after. Garbage is
    collected first so that none of it is frozen with them.
    """
    gc.collect()
    gc.freeze()


def create_app(settings: Settings, *, redis_url: str | None = None, web_dir: Path | None = None) -> Starlette:
    """Build the broker's ASGI app.

    Args:
        settings: the broker's settings.
        redis_url: connect here instead of the configured Redis (tests, embedded Redis).
        web_dir: where the dashboard's files are (default: the repository's ``web/``).

    Returns:
        A Starlette app whose lifespan connects to Redis (starting an embedded ``redis-server``
        when none is configured), checks it, and runs the runtime's background tasks.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        with redacted_logs(settings):
            embedded: EmbeddedRedis | None = None
            url = redis_url
            if url is None and settings.redis.embedded:
                embedded = EmbeddedRedis.from_settings(settings.redis)
                embedded.start()
                url = embedded.url
                log.info("embedded redis-server started, data in %s", settings.redis.data_dir)
            client = create_redis(settings.redis, url)
            try:
                await check_redis(client, settings.redis)
                runtime = Runtime(settings, client)
                app.state.runtime = runtime
                await runtime.start()
                exporter = app.state.latency_exporter = LatencyExporter(runtime, settings.queues.reap_interval)
                await exporter.start()
                freeze_heap()
                try:
                    yield
                finally:
                    try:
                        await runtime.stop()
                        await exporter.stop()
                    finally:
                        # Collectable again once stopped (not before: each collection would then
                        # walk it all): several apps may come and go in one process, as in tests.
                        gc.unfreeze()
            finally:
                await client.aclose()
                if embedded is not None:
                    embedded.stop()

    routes: list[BaseRoute] = [
        *http.routes(),
        *ops_routes(),
        *websocket_routes(),
        *auth_routes(),
        *metrics_routes(),
        Route("/openapi.json", openapi.openapi_json, methods=["GET"]),
    ]
    web = web_dir or WEB_DIR
    if web.is_dir():
        index = web / "index.html"

        async def dashboard(request: Request) -> Response:
            return FileResponse(index)

        routes += [
            Route("/", dashboard, methods=["GET"]),
            Mount("/static", StaticFiles(directory=web), name="static"),
        ]
        if (web / "examples").is_dir():
            routes.append(Mount("/examples", StaticFiles(directory=web / "examples", html=True), name="examples"))

    fast_push = FastPush(settings)
    app = BrokerApp(
        fast_push,
        routes=routes,
        middleware=middleware(settings, routes, fast_push),
        lifespan=lifespan,
        exception_handlers={
            BrokerError: on_broker_error,
            RedisError: on_redis_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        },
    )
    app.state.settings = settings
    app.state.dashboard = web.is_dir()
    return app


# Headers a cross-origin page may send and read (CORS); see docs/security.md.
CORS_REQUEST_HEADERS = ("Authorization", "Content-Type", "X-presque-workerid")
CORS_RESPONSE_HEADERS = (
    "Location",
    "Retry-After",
    "X-Presque-Job-Id",
    "X-Presque-Attempt",
    "X-Presque-Lease-Token",
    "X-Request-Id",
)


def middleware(settings: Settings, routes: list[BaseRoute], fast_push: FastPush | None = None) -> list[Middleware]:
    """Request ids (outermost: every log line of a request has it), CORS (so that preflights and
    refusals carry its headers), then access control (built by ``fast_push`` when given, so that
    the requests it serves share the in-flight count).

    Without ``server.cors_origins`` no CORS header is sent: browsers allow same-origin pages only.
    """
    stack = [Middleware(RequestIdMiddleware)]
    if settings.server.cors_origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.server.cors_origins),
                allow_methods=["GET", "POST", "PUT", "DELETE"],
                allow_headers=list(CORS_REQUEST_HEADERS),
                expose_headers=list(CORS_RESPONSE_HEADERS),
                max_age=600,
            )
        )
    access = AccessMiddleware if fast_push is None else fast_push.access_middleware
    stack.append(Middleware(access, settings=settings, routes=routes))
    return stack
