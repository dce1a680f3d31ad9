"""The test utilities themselves: real redis-server handling, fixtures and polling helpers."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from tests.servers import RedisServer, free_port, make_settings, redis_binary, wait_for, wait_for_sync

pytestmark = pytest.mark.core


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_redis_binary_honours_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESQUE_TEST_REDIS_BIN", "/opt/redis-6.2/redis-server")
    assert redis_binary() == "/opt/redis-6.2/redis-server"


def test_session_server_runs_the_chosen_binary(redis_server: RedisServer) -> None:
    # `make test` reruns the core tests with PRESQUE_TEST_REDIS_BIN = Redis 6.2: make sure it is that one.
    expected = subprocess.run([redis_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    with redis_server.client() as client:
        version = client.info("server")["redis_version"]
    assert f"v={version} " in expected
    assert redis_server.port != 6379


def test_redis_url_is_flushed_before_each_test_a(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0
        client.set("left-over", 1)


def test_redis_url_is_flushed_before_each_test_b(redis_url: str) -> None:
    test_redis_url_is_flushed_before_each_test_a(redis_url)


async def test_redis_fixture_speaks_bytes(redis: aioredis.Redis) -> None:
    await redis.set("k", "v")
    assert await redis.get("k") == b"v"


def test_redis_server_restart_keeps_data_and_port(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        port = server.port
        with server.client() as client:
            client.set("k", "v")
        server.stop()
        assert not server.running
        server.start()
        assert server.port == port
        with server.client() as client:
            assert client.get("k") == b"v"


def test_redis_server_kill_and_restart(tmp_path: Path) -> None:
    with RedisServer(tmp_path, appendfsync="always") as server:
        with server.client() as client:
            client.set("k", "v")
        server.kill()
        assert not server.running
        server.start()
        with server.client() as client:
            assert client.get("k") == b"v"


def test_redis_server_pause_and_resume(make_redis_server: Callable[..., RedisServer]) -> None:
    server = make_redis_server()
    server.pause()
    try:
        with server.client(socket_timeout=0.2, retry=None) as client, pytest.raises(redis.TimeoutError):
            client.ping()
    finally:
        server.resume()
    with server.client() as client:
        assert client.ping()


def test_redis_server_reports_a_failed_start(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, args=["--no-such-option", "1"])
    with pytest.raises(RuntimeError, match="redis-server exited"):
        server.start()


def test_make_redis_server_gives_private_servers(make_redis_server: Callable[..., RedisServer]) -> None:
    a, b = make_redis_server(), make_redis_server()
    assert a.port != b.port and a.running and b.running


async def test_redis_server_async_client(make_redis_server: Callable[..., RedisServer]) -> None:
    client = make_redis_server().async_client()
    try:
        assert await client.ping()
    finally:
        await client.aclose()


async def test_wait_for_returns_the_value_and_times_out() -> None:
    box: list[int] = []
    asyncio.get_running_loop().call_later(0.02, box.append, 7)
    assert await wait_for(lambda: box and box[0], timeout=2) == 7

    async def never() -> bool:
        return False

    with pytest.raises(TimeoutError, match="nope"):
        await wait_for(never, timeout=0.05, message="nope")


def test_wait_for_sync() -> None:
    assert wait_for_sync(lambda: "yes", timeout=0.1) == "yes"
    with pytest.raises(TimeoutError):
        wait_for_sync(lambda: None, timeout=0.05)


def test_make_settings() -> None:
    s = make_settings("redis://127.0.0.1:1/0", {"limits": {"max_batch": 3}, "redis": {"socket_timeout": 1}})
    assert s.redis.url == "redis://127.0.0.1:1/0" and s.redis.socket_timeout == 1.0
    assert s.limits.max_batch == 3
    assert make_settings(None).redis.embedded
