"""The broker's HTTP protocol (broker/httpproto.py) at the byte level, against the app's own answers.

tests/test_fastpush.py compares answers request by request through an HTTP client; here raw bytes
go to the broker (served by uvicorn's protocol or the broker's) and to its app served through the
router alone, and what comes back is compared byte for byte (but the date, job ids and generated
request ids): pipelined requests, a body in several reads, ``Connection: close``, HTTP/1.0,
``Expect: 100-continue``; and a client that leaves before its answer.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from broker.app import create_app
from broker.fastpush import FastPush
from broker.httpproto import LeanHttpProtocol, lean_path
from broker.keys import queue_keys
from broker.server import uvicorn_config
from tests.servers import RedisServer, make_settings, run_broker, wait_for
from tests.test_fastpush import Twin, protocol, twin

pytestmark = pytest.mark.core
__all__ = ["protocol"]  # the fixture, imported for the tests here

DATE = re.compile(rb"date: [^\r]*\r\n")
JOB_ID = re.compile(rb"\b[0-9a-f]{21}\b")
STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")
GENERATED = re.compile(rb"x-request-id: [0-9a-f]{16}\r\n")


def post(path: str, body: bytes, *headers: str, method: str = "POST", version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: x", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def normal(raw: bytes) -> bytes:
    raw = DATE.sub(b"", raw)
    return GENERATED.sub(b"x-request-id: <generated>\r\n", JOB_ID.sub(b"<id>", raw))


async def exchange(url: httpx.URL, *parts: bytes, until: Callable[[], bool] | None = None) -> bytes:
    """Send ``parts`` on one connection (waiting for ``until()`` after the first), read to EOF."""
    assert url.host is not None and url.port is not None
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        for i, part in enumerate(parts):
            writer.write(part)
            await writer.drain()
            if i == 0 and until is not None:
                await wait_for(until, 10, message="the server did not read the request's start")
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def alike(t: Twin, *parts: bytes, until: Callable[[], bool] | None = None) -> bytes:
    """The broker's bytes for ``parts`` once checked equal to the router's; returns them."""
    fast = await exchange(t.fast.base_url, *parts, until=until)
    routed = await exchange(t.routed.base_url, *parts)
    assert normal(fast) == normal(routed)
    return fast


def served_below(t: Twin) -> Callable[[], int]:
    fp: FastPush = t.app.fast_push
    before = fp.served_below
    return lambda: fp.served_below - before


async def test_pipelined_requests_answer_in_order(redis_url: str, protocol: Any) -> None:
    async with twin(redis_url, protocol) as t:
        await t.routed.get("/health")
        below = served_below(t)
        requests = [
            post("/q/pipe", b'{"n": 1}'),
            post("/q/pipe", b"{"),  # bad: the app's 400
            post("/qb/pipe", b"[1, 2]"),
            post("/q/pipe", b"3", method="PUT"),
            post("/nowhere", b"4"),
            post("/q/pipe", b'"last"', "Connection: close"),
        ]
        raw = await alike(t, b"".join(requests))
        assert [int(status) for status in STATUS.findall(raw)] == [
            201, 400, 201, 201, 404, 201,
        ]  # fmt: skip
        assert raw.endswith(b'"queue":"pipe"}') and b"connection: close\r\n" in raw
        if t.below:
            assert below() >= 1  # the first; the others waited behind it, on uvicorn's path
        assert (await t.fast.get("/j/pipe")).json()["pushed"] == 2 * 5


async def test_a_body_in_several_reads(redis_url: str, protocol: Any) -> None:
    async with twin(redis_url, protocol) as t:
        await t.routed.get("/health")
        gate = t.app.fast_push.gate
        assert gate is not None
        for body in (b'{"parts": [1, 2, 3]}', b'{"parts": '):  # good, then bad once complete
            start = post("/q/split", body, "Connection: close")
            head = start[: -len(body)]
            parts = [head, body[:3], body[3:9], body[9:]]
            below = served_below(t)
            raw = await alike(t, *parts, until=lambda: gate.in_flight == 1)
            assert raw.startswith(b"HTTP/1.1 201 " if body.endswith(b"}") else b"HTTP/1.1 400 ")
            assert below() == int(t.below and body.endswith(b"}"))
        assert (await t.fast.get("/j/split")).json()["pushed"] == 2


async def test_connection_close_and_http_1_0(redis_url: str, protocol: Any) -> None:
    async with twin(redis_url, protocol) as t:
        await t.routed.get("/health")
        below = served_below(t)
        for request in (
            post("/q/close", b"1", "Connection: close"),
            post("/q/close", b"", "Connection: close"),
            post("/qb/close", b"[1]", "Connection: close"),
            post("/q/close", b"1", version="1.0"),
            post("/q/close", b"1", "Connection: keep-alive", version="1.0"),
            post("/q/close", b"{", version="1.0"),
        ):
            raw = await alike(t, request)
            assert raw.count(b"HTTP/1.1 ") == 1 and b"connection: close\r\n" in raw
        assert below() == (4 if t.below else 0)
        assert (await t.fast.get("/j/close")).json()["pushed"] == 2 * 4


async def test_requests_left_to_uvicorn_answer_alike(redis_url: str, protocol: Any) -> None:
    async with twin(redis_url, protocol) as t:
        await t.routed.get("/health")
        below = served_below(t)
        for request, statuses in (
            (post("/q/left", b"1", "Expect: 100-continue", "Connection: close"), [b"100", b"201"]),
            (post("/q/l%65ft", b"1", "Connection: close"), [b"201"]),
            # uvicorn leaves an unknown upgrade's body unread: the app sees none.
            (post("/q/left", b"1", "Connection: Upgrade, close", "Upgrade: other"), [b"400"]),
        ):
            raw = await alike(t, request)
            assert STATUS.findall(raw) == statuses
        assert below() == 0
        assert (await t.fast.get("/j/left")).json()["pushed"] == 2 * 2


async def test_a_client_gone_before_its_answer(make_redis_server: Callable[..., RedisServer], protocol: Any) -> None:
    """The job is pushed, nothing is written, the request slot is given back, the server goes on."""
    redis = make_redis_server()
    async with twin(redis.url, protocol) as t:
        await t.routed.get("/health")
        await t.fast.post("/q/gone", content=b"1")  # the push script is loaded
        fp = t.app.fast_push
        gate = fp.gate
        assert gate is not None
        state = t.server.server_state
        served, answered = fp.served, state.total_requests
        url = t.fast.base_url
        assert url.host is not None and url.port is not None
        with redis.client() as client:
            client.execute_command("CLIENT", "PAUSE", 20000, "WRITE")  # the push waits
            try:
                _, writer = await asyncio.open_connection(url.host, url.port)
                writer.write(post("/q/gone", b"2"))
                await writer.drain()
                await wait_for(lambda: fp.served == served + 1, 10, message="the push did not start")
                assert gate.in_flight == 1
                (connection,) = [c for c in state.connections if c.client == writer.get_extra_info("sockname")]
                writer.close()
                await writer.wait_closed()
                await wait_for(lambda: connection not in state.connections, 10, message="the server kept it")
            finally:
                client.execute_command("CLIENT", "UNPAUSE")
        await wait_for(lambda: gate.in_flight == 0, 10, message="the request slot was not given back")
        assert state.total_requests == answered  # nothing was answered
        assert fp.served_below == (2 if isinstance(connection, LeanHttpProtocol) else 0)
        assert (await t.fast.get("/j/gone")).json()["pushed"] == 2


def test_the_broker_serves_pushes_below_asgi_on_a_plain_stack_only(redis_url: str) -> None:
    settings = make_settings(redis_url, {})
    app = create_app(settings)
    for overrides, lean in (
        ({}, True),
        ({"proxy_headers": False}, True),
        ({"root_path": "/api"}, False),
        ({"limit_concurrency": 100}, False),
    ):
        config = uvicorn_config(app, settings, host="127.0.0.1", port=0, **overrides)
        config.load()
        assert config.http_protocol_class is LeanHttpProtocol
        assert lean_path(config) is (app.fast_push if lean else None), overrides  # type: ignore[attr-defined]


async def test_a_push_in_progress_is_answered_at_shutdown(
    make_redis_server: Callable[..., RedisServer], protocol: Any
) -> None:
    """uvicorn's graceful shutdown lets the push finish, answers it with ``connection: close``."""
    redis = make_redis_server()
    settings = make_settings(redis.url, {})
    async with run_broker(settings, http=protocol) as running:
        async with httpx.AsyncClient(base_url=running.url) as client:
            assert (await client.post("/q/shut", content=b"1")).status_code == 201
        fp = running.app.fast_push  # type: ignore[attr-defined]
        served = fp.served
        url = httpx.URL(running.url)
        assert url.host is not None and url.port is not None
        with redis.client() as pauser:
            pauser.execute_command("CLIENT", "PAUSE", 20000, "WRITE")
            try:
                reader, writer = await asyncio.open_connection(url.host, url.port)
                writer.write(post("/q/shut", b"2"))
                await writer.drain()
                await wait_for(lambda: fp.served == served + 1, 10, message="the push did not start")
                state = running.server.server_state
                (connection,) = [c for c in state.connections if c.client == writer.get_extra_info("sockname")]
                running.server.should_exit = True
                await wait_for(lambda: not connection.cycle.keep_alive, 10, message="no shutdown seen")
            finally:
                pauser.execute_command("CLIENT", "UNPAUSE")
            raw = await asyncio.wait_for(reader.read(), 10)
            writer.close()
        assert STATUS.findall(raw) == [b"201"] and b"connection: close\r\n" in raw
        assert fp.served_below == (2 if protocol is LeanHttpProtocol else 0)
    with redis.client() as check:
        assert check.zcard(queue_keys("shut").ready) == 2  # both pushed
