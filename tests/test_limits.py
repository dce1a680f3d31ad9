"""Every input limit end to end: what is refused, how, and that nothing accepted is disturbed.

| limit                      | HTTP                 | WebSocket                         |
|----------------------------|----------------------|-----------------------------------|
| ``limits.max_body``        | 413                  | (frames: ``max_frame``)           |
| ``limits.max_batch``       | 413                  | ``error`` ``too_large``           |
| ``limits.max_frame``       |                      | ``error`` ``too_large``, close 1009 |
| ``limits.max_subscriptions`` |                    | ``error`` ``too_many``            |
| ``limits.max_channels``    |                      | ``error`` ``too_many``            |
| ``limits.max_watches``     |                      | ``error`` ``too_many``            |
| ``limits.max_errors``      |                      | close 1008                        |
| ``limits.max_connections`` | 503 + ``Retry-After`` | close 1013                       |
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from broker import keys
from tests.servers import BrokerServer, make_settings, run_broker, wait_for

LIMITS = {"max_body": 1024, "max_batch": 3, "max_frame": 2048, "max_subscriptions": 2, "max_channels": 2}


@contextlib.asynccontextmanager
async def broker(redis_url: str, **limits: Any) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    settings = make_settings(redis_url, {"limits": {**LIMITS, **limits}})
    async with run_broker(settings) as running, httpx.AsyncClient(base_url=running.url, timeout=10.0) as client:
        yield running.ws_url, client


async def request(ws: ClientConnection, frame: dict[str, Any], ref: str = "r") -> dict[str, Any]:
    await ws.send(orjson.dumps({**frame, "ref": ref}).decode())
    while True:
        reply: dict[str, Any] = orjson.loads(await ws.recv())
        if reply.get("ref") == ref:
            return reply


async def until_closed(ws: ClientConnection, timeout: float = 5.0) -> tuple[list[Any], int]:
    """Read until the broker closes the connection: the frames received, and the close code."""
    frames = []
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(timeout):
            while True:
                frames.append(orjson.loads(await ws.recv()))
    assert closed.value.rcvd is not None
    return frames, closed.value.rcvd.code


async def close_code(ws: ClientConnection) -> int:
    return (await until_closed(ws))[1]


async def pushed(client: httpx.AsyncClient, queue: str) -> int:
    count: int = (await client.get(f"/j/{queue}")).json()["pushed"]
    return count


async def test_body_size(redis_url: str) -> None:
    async with broker(redis_url) as (_, client):
        exact = b'"' + b"x" * 1022 + b'"'
        assert (await client.post("/q/bodies", content=exact)).status_code == 201
        over = b'"' + b"x" * 1023 + b'"'
        response = await client.post("/q/bodies", content=over)
        assert response.status_code == 413 and "1024" in response.json()["error"]

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
            yield b'"'
            for _ in range(4):
                yield b"x" * 512
            yield b'"'

        assert (await client.post("/q/bodies", content=chunked())).status_code == 413
        assert (await client.post("/qb/bodies", json=["x" * 1100])).status_code == 413
        assert await pushed(client, "bodies") == 1
        assert (await client.get("/q/bodies")).content == exact


async def test_batch_size(redis_url: str) -> None:
    async with broker(redis_url) as (ws_url, client):
        assert (await client.post("/qb/batches", json=[1, 2, 3, 4])).status_code == 413
        assert (await client.post("/qb/batches", json={"jobs": [1, 2, 3, 4]})).status_code == 413
        assert (await client.post("/qb/batches", json=[1, 2, 3])).status_code == 201
        assert (await client.get("/qb/batches", params={"batch_size": 4})).status_code == 413
        async with connect(ws_url) as ws:
            refused = await request(ws, {"op": "push", "queue": "batches", "jobs": [1, 2, 3, 4]})
            assert refused["code"] == "too_large"
            assert (await request(ws, {"op": "push", "queue": "batches", "jobs": [5]}))["op"] == "pushed"
        assert await pushed(client, "batches") == 4
        assert (await client.get("/qb/batches", params={"batch_size": 3})).json() == [1, 2, 3]


async def test_frame_size_in_the_session(redis_url: str) -> None:
    """Over ``max_frame`` but within what the server library accepts: the session refuses it."""
    async with broker(redis_url) as (ws_url, client):
        async with connect(ws_url) as ws, connect(ws_url) as other:
            assert (await request(other, {"op": "subscribe", "queue": "frames"}))["op"] == "subscribed"
            big = {"op": "push", "queue": "frames", "body": "x" * 2100}
            await ws.send(orjson.dumps(big).decode())
            error = orjson.loads(await ws.recv())
            assert error["op"] == "error" and error["code"] == "too_large"
            assert await close_code(ws) == 1009
            # The other connection is untouched.
            assert (await request(other, {"op": "push", "queue": "frames", "body": 1}, "p"))["op"] == "pushed"
        assert await pushed(client, "frames") == 1


def test_frame_size_at_the_server(redis_url: str, tmp_path: Path) -> None:
    """``presque serve`` also caps frames in the WebSocket library itself: a huge frame is never buffered."""
    with BrokerServer(tmp_path, redis_url, config={"limits": LIMITS}) as server:

        async def run() -> None:
            async with connect(server.ws_url, max_size=None) as ws:
                await ws.send("x" * 100_000)
                assert await until_closed(ws) == ([], 1009)  # refused by the library, before the session
            async with connect(server.ws_url) as ws:  # the broker goes on
                assert (await request(ws, {"op": "push", "queue": "frames", "body": 1}))["op"] == "pushed"

        asyncio.run(run())


async def test_subscriptions_and_channels_per_connection(redis_url: str) -> None:
    async with broker(redis_url) as (ws_url, client):
        async with connect(ws_url) as ws:
            for queue in ("s1", "s2"):
                assert (await request(ws, {"op": "subscribe", "queue": queue}))["op"] == "subscribed"
            refused = await request(ws, {"op": "subscribe", "queue": "s3"})
            assert refused["code"] == "too_many"
            for channel in ("c1", "c2"):
                assert (await request(ws, {"op": "listen", "channel": channel}))["op"] == "listening"
            assert (await request(ws, {"op": "listen", "channel": "c3"}))["code"] == "too_many"
            # The connection stays usable, and a slot freed can be used again.
            assert (await request(ws, {"op": "unsubscribe", "queue": "s1"}))["op"] == "unsubscribed"
            assert (await request(ws, {"op": "subscribe", "queue": "s3"}))["op"] == "subscribed"
            assert (await client.post("/q/s3", content=b'{"n": 1}')).status_code == 201
            job = orjson.loads(await ws.recv())
            assert job["op"] == "job" and job["body"] == {"n": 1}


async def test_watches_per_connection(redis_url: str) -> None:
    async with broker(redis_url, max_watches=1) as (ws_url, _), connect(ws_url) as ws:
        assert (await request(ws, {"op": "watch", "topic": "stats"}))["op"] == "watching"
        refused = await request(ws, {"op": "watch", "topic": "events", "queue": "w"})
        assert refused["op"] == "error" and refused["code"] == "too_many"
        assert (await request(ws, {"op": "unwatch", "topic": "stats"}))["op"] == "unwatched"
        assert (await request(ws, {"op": "watch", "topic": "events", "queue": "w"}))["op"] == "watching"


async def test_consecutive_protocol_errors_per_connection(redis_url: str) -> None:
    async with broker(redis_url, max_errors=2) as (ws_url, _):
        async with connect(ws_url) as ws:  # errors up to the limit, then a valid frame resets the count
            for ref in ("e1", "e2"):
                assert (await request(ws, {"op": "nope"}, ref))["code"] == "unknown_op"
            assert (await request(ws, {"op": "subscribe", "queue": "ok"}))["op"] == "subscribed"
            for ref in ("e3", "e4"):
                assert (await request(ws, {"op": "nope"}, ref))["code"] == "unknown_op"
        async with connect(ws_url) as ws:  # one more than the limit closes the connection
            for ref in ("e1", "e2", "e3"):
                await ws.send(orjson.dumps({"op": "nope", "ref": ref}).decode())
            frames, code = await until_closed(ws)
            assert code == 1008
            assert [frame.get("code") for frame in frames] == ["unknown_op"] * 3


async def test_connections_per_process(redis_url: str) -> None:
    async with broker(redis_url, max_connections=2) as (ws_url, client):
        async with connect(ws_url) as first, connect(ws_url) as second:
            assert (await request(first, {"op": "listen", "channel": "c"}))["op"] == "listening"
            async with connect(ws_url) as third:
                assert await close_code(third) == 1013
            assert (await request(second, {"op": "listen", "channel": "c"}))["op"] == "listening"

        async def accepted() -> bool:  # the two closed: a new connection is welcome again
            async with connect(ws_url) as ws:
                with contextlib.suppress(ConnectionClosed):
                    return (await request(ws, {"op": "listen", "channel": "c"}))["op"] == "listening"
            return False

        assert await wait_for(accepted, message="no connection accepted after the others closed")
        assert (await client.get("/health")).status_code == 200


async def test_http_requests_in_progress_per_process(redis_url: str) -> None:
    settings = make_settings(redis_url, {"limits": {**LIMITS, "max_connections": 2}})
    async with (
        run_broker(settings) as running,
        httpx.AsyncClient(base_url=running.url, timeout=10.0) as client,
        broker(redis_url) as (_, other),  # a second process on the same Redis
    ):
        polls = [asyncio.create_task(client.get("/q/idle", params={"wait": 30})) for _ in range(2)]
        notifier = running.app.state.runtime.notifier  # type: ignore[attr-defined]

        def both_waiting() -> bool:  # both long-polls listen for a push: both hold a request slot
            return len(notifier._listeners.get(keys.wake_channel("idle"), ())) == 2

        await wait_for(both_waiting, message="the two long-polls did not start waiting")
        refused = await client.post("/q/other", content=b"1")
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "max_connections" in refused.json()["error"]
        assert (await client.get("/health")).status_code == 200  # monitoring still gets an answer
        # Jobs pushed through the other process end both long-polls, which frees the slots.
        assert (await other.post("/qb/idle", json=[1, 2])).status_code == 201
        assert sorted([(await poll).json() for poll in polls]) == [1, 2]
        assert (await client.post("/q/other", content=b"1")).status_code == 201
        assert await pushed(client, "other") == 1


async def test_json_nesting_depth(redis_url: str) -> None:
    """The JSON library reads 1024 levels of nesting but writes 254: what must be re-encoded
    (batch jobs, WebSocket payloads, worker figures) is refused beyond, never a 500."""

    def nested(depth: int) -> str:
        return "[" * depth + "]" * depth

    async with broker(redis_url, max_body=65536, max_frame=65536) as (ws_url, client):
        deep, fine = nested(300), nested(250)
        assert (await client.post("/qb/deep", content=f"[{deep}]")).status_code == 400
        assert (await client.post("/qb/deep", content=f"[{fine}]")).status_code == 201
        worker = {"X-presque-workerid": "w"}
        assert (await client.post("/w/deep", content=f'{{"name": {deep}}}', headers=worker)).status_code == 400
        # One job pushed over HTTP is stored as sent, not re-encoded: it is taken back as sent.
        assert (await client.post("/q/deep", content=deep)).status_code == 201
        async with connect(ws_url) as ws:
            for member in ("body", "jobs", "data"):
                frame = f'{{"op": "{"publish" if member == "data" else "push"}", "queue": "deep", "channel": "deep", '
                value = f"[{deep}]" if member == "jobs" else deep
                await ws.send(frame + f'"{member}": {value}, "ref": "r"}}')
                reply = orjson.loads(await ws.recv())
                assert reply["code"] == "bad_json" and member in reply["error"], reply
            assert (await request(ws, {"op": "subscribe", "queue": "deep", "ack": "auto"}))["op"] == "subscribed"
            bodies = [orjson.loads(await ws.recv())["body"] for _ in range(2)]
            assert bodies == [orjson.loads(fine), orjson.loads(deep)]
        assert await pushed(client, "deep") == 2
