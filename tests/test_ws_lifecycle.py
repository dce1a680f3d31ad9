"""A WebSocket's life around its frames: the handshake's Origin check, the connection limit,
keepalive pings, the idle timeout and the broker's graceful shutdown.

The broker runs as ``presque serve`` would: ``broker.server.PresqueServer`` in the test's loop, or
the real ``presque serve`` subprocess for SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.exceptions import InvalidStatus

from broker import keys
from broker.app import create_app
from broker.server import PresqueServer, uvicorn_config
from tests.servers import BrokerServer, RunningBroker, free_port, make_settings, wait_for
from tests.wsclient import ws_connect

pytestmark = pytest.mark.core


@contextlib.asynccontextmanager
async def presque_server(redis_url: str, config: dict[str, Any] | None = None) -> AsyncIterator[RunningBroker]:
    """The app served by ``PresqueServer`` (keepalive and frame limits as ``presque serve`` sets them)."""
    settings = make_settings(redis_url, config)
    port = free_port()
    app = create_app(settings)
    server = PresqueServer(uvicorn_config(app, settings, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    await wait_for(lambda: server.started or task.done(), 10)
    if task.done():
        task.result()
    try:
        yield RunningBroker(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws", app, server)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def test_origin_allow_list(redis_url: str) -> None:
    async with presque_server(redis_url, {"server": {"allowed_origins": ["https://app.example"]}}) as broker:
        host = broker.url.removeprefix("http://")
        for origin in ("https://evil.example", "http://127.0.0.1:1", "null"):
            with pytest.raises(InvalidStatus) as refused:
                async with ws_connect(broker.ws_url, origin=origin):
                    pass
            assert refused.value.response.status_code == 403
        for origin in (None, f"http://{host}", "https://app.example"):
            async with ws_connect(broker.ws_url, origin=origin) as ws:
                assert (await ws.call("subscribe", queue="q"))["op"] == "subscribed"


async def test_connections_over_the_limit_are_closed_with_1013(redis_url: str) -> None:
    async with presque_server(redis_url, {"limits": {"max_connections": 2}}) as broker:
        async with ws_connect(broker.ws_url) as one, ws_connect(broker.ws_url) as two:
            await one.call("listen", channel="c")
            await two.call("listen", channel="c")
            async with ws_connect(broker.ws_url) as three:
                assert await three.closed() == 1013
        async with ws_connect(broker.ws_url) as again:  # room again once they left
            assert (await again.call("listen", channel="c"))["op"] == "listening"


async def test_idle_connections_close_and_busy_ones_stay(redis_url: str) -> None:
    config = {"websocket": {"idle_timeout": 1.0, "ping_interval": 0.1, "ping_timeout": 3.0}}
    async with presque_server(redis_url, config) as broker:
        async with ws_connect(broker.ws_url) as idle, ws_connect(broker.ws_url) as consumer:
            await consumer.call("subscribe", queue="q")
            assert await idle.closed(timeout=5) == 1000
            assert idle.conn.close_reason == "idle timeout"
            # Past the idle timeout and many keepalive pings (answered by the client library), the
            # consumer that holds a subscription is still served.
            assert (await consumer.call("push", queue="q", body=1))["op"] == "pushed"
            (job,) = await consumer.jobs(1)
            assert (await consumer.call("ack", id=job["id"], token=job["token"]))["op"] == "ok"
            assert consumer.conn.close_code is None


async def test_a_frame_far_over_max_frame_is_refused_by_the_websocket_layer(redis_url: str) -> None:
    async with presque_server(redis_url, {"limits": {"max_frame": 1000}}) as broker:
        async with ws_connect(broker.ws_url) as ws:
            await ws.send('{"op": "push", "queue": "q", "body": "' + "x" * 5000 + '"}')
            assert await ws.closed() == 1009


async def test_stopping_the_server_shuts_consumers_down_gracefully(redis_url: str, redis: aioredis.Redis) -> None:
    async with presque_server(redis_url) as broker:
        runtime = broker.app.state.runtime  # type: ignore[attr-defined]
        async with ws_connect(broker.ws_url) as ws:
            await ws.call("subscribe", queue="q", lease=300)
            await ws.call("push", queue="q", jobs=[1, 2])
            await ws.jobs(2)
            broker.server.should_exit = True
            assert await ws.closed(timeout=10) == 1001
            assert any(f["op"] == "shutdown" for f in ws.stash)
            assert runtime.delivery.shutting_down
    q = keys.queue_keys("q")
    assert await redis.zcard(q.ready) == 2 and await redis.zcard(q.leased) == 0


async def test_sigterm_sends_shutdown_returns_leases_and_closes_1001(
    make_broker: Callable[..., BrokerServer], redis_url: str, redis: aioredis.Redis
) -> None:
    broker = make_broker(redis_url)
    async with ws_connect(broker.ws_url) as ws, ws_connect(broker.ws_url) as listener:
        await ws.call("subscribe", queue="q", prefetch=5, lease=300)
        await ws.call("push", queue="q", jobs=["a", "b", "c"])
        held = await ws.jobs(3)
        await listener.call("listen", channel="c")
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGTERM)
        for client in (ws, listener):
            assert await client.closed(timeout=10) == 1001
            assert [f["op"] for f in client.stash][-1] == "shutdown"
        # Back in the queue at once, not after the 300 s lease; not counted as failures.
        q = keys.queue_keys("q")
        assert await redis.zcard(q.leased) == 0
        assert sorted(i.decode() for i in await redis.zrange(q.ready, 0, -1)) == sorted(j["id"] for j in held)
        assert int(await redis.hget(q.stats, "failed") or 0) == 0
    # uvicorn re-raises the signal it handled once it is done: "terminated by SIGTERM", cleanly.
    assert await asyncio.to_thread(broker.proc.wait, 15) in (0, -signal.SIGTERM)
    assert "Traceback" not in broker.log(200)
