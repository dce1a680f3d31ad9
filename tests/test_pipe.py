"""The script pipe (``broker/pipe.py``) against real Redis: replies matched in order with many
calls in flight, NOSCRIPT, error replies, a lost or frozen server, and Cluster routing.

The queue scripts themselves go through the pipe in ``tests/test_scripts.py``; these tests use
tiny scripts so that what they check is the pipe, not the queue model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    ConnectionError,
    DataError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TimeoutError,
)

from broker.pipe import PipedScript, ScriptPipe
from tests.cluster import ClusterServers, node_client, queue_slot
from tests.servers import RedisServer, wait_for

ECHO = "return ARGV[1]"
INCR = "return redis.call('INCR', KEYS[1])"
ERROR = "return redis.error_reply(ARGV[1])"
KEY = "{t}:n"


def scripts(client: Any, *sources: str) -> tuple[ScriptPipe, list[PipedScript]]:
    pipe = ScriptPipe.open(client)
    assert pipe is not None
    return pipe, [PipedScript(pipe, client.register_script(src), f"s{i}") for i, src in enumerate(sources)]


async def connected_clients(client: Any) -> int:
    return int((await client.info("clients"))["connected_clients"])


@pytest.mark.core
async def test_many_calls_in_flight_each_get_their_own_reply(redis: aioredis.Redis) -> None:
    _, (echo, error) = scripts(redis, ECHO, ERROR)
    await echo(keys=[KEY], args=["warm"])  # the pipe's connection is open
    before = None if isinstance(redis, RedisCluster) else await connected_clients(redis)

    async def one(i: int) -> Any:
        if i % 7 == 3:
            with pytest.raises(ResponseError) as raised:
                await error(keys=[KEY], args=[f"ERR call {i}"])
            return str(raised.value)
        return await echo(keys=[KEY], args=[f"call {i}"])

    replies = await asyncio.gather(*(one(i) for i in range(2000)))
    for i, reply in enumerate(replies):
        assert reply == (f"call {i}" if i % 7 == 3 else f"call {i}".encode())
    if before is not None:  # 2,000 calls at once, and still the one connection
        assert await connected_clients(redis) == before


@pytest.mark.core
async def test_noscript_after_script_flush_loads_the_script_and_calls_again(redis: aioredis.Redis) -> None:
    _, (incr,) = scripts(redis, INCR)
    assert await incr(keys=[KEY]) == 1
    await redis.script_flush()
    single = not isinstance(redis, RedisCluster)
    if single:
        await redis.config_resetstat()
    # Every call in flight gets NOSCRIPT; each runs once after the SCRIPT LOAD pipelined before it.
    assert sorted(await asyncio.gather(*(incr(keys=[KEY]) for _ in range(50)))) == list(range(2, 52))
    assert int(await redis.get(KEY)) == 51
    if single:
        stats = await redis.info("commandstats")
        loads = stats.get("cmdstat_script|load") or stats["cmdstat_script"]  # Redis 6.2: no subcommands
        assert loads["calls"] == 50
        assert stats["cmdstat_evalsha"]["calls"] == 100


@pytest.mark.core
async def test_error_replies_are_redis_py_exceptions(redis: aioredis.Redis) -> None:
    _, (error, echo, incr) = scripts(redis, ERROR, ECHO, INCR)
    with pytest.raises(OutOfMemoryError):
        await error(keys=[KEY], args=["OOM command not allowed"])
    await redis.set("{t}:s", "text")
    with pytest.raises(ResponseError, match="not an integer"):
        await incr(keys=["{t}:s"])
    # NOSCRIPT again after the reload: raised, not retried for ever.
    with pytest.raises(NoScriptError):
        await error(keys=[KEY], args=["NOSCRIPT no such script"])
    # READONLY: redone through redis-py (which meets it too here), and the pipe reconnects.
    with pytest.raises(ReadOnlyError):
        await error(keys=[KEY], args=["READONLY You can't write against a read only replica."])
    with pytest.raises(DataError):
        await echo(keys=[KEY], args=[None])
    assert await echo(keys=[KEY], args=["still fine"]) == b"still fine"


@pytest.mark.core
async def test_replies_as_redis_py_gives_them(redis_url: str, redis: aioredis.Redis) -> None:
    # With client= (a pipeline, say) the call is redis-py's; decode_responses is honoured.
    _, (echo,) = scripts(redis, ECHO)
    assert await echo(keys=[KEY], args=["via redis-py"], client=redis) == b"via redis-py"
    decoding = type(redis).from_url(redis_url, decode_responses=True)
    try:
        _, (echo_text,) = scripts(decoding, ECHO)
        assert await echo_text(keys=[KEY], args=["é"]) == "é"
    finally:
        await decoding.aclose()


async def test_the_pipe_is_left_out_where_it_cannot_help(redis_server: RedisServer) -> None:
    small = aioredis.Redis(host="127.0.0.1", port=redis_server.port, max_connections=2)
    single = aioredis.Redis(host="127.0.0.1", port=redis_server.port, single_connection_client=True)
    try:
        assert ScriptPipe.open(small) is None  # it would hold one of two connections for good
        assert ScriptPipe.open(single) is None
        assert ScriptPipe.open(object()) is None
    finally:
        await small.aclose()
        await single.aclose()


@pytest.fixture
async def server_and_client(
    make_redis_server: Callable[..., RedisServer],
) -> AsyncIterator[tuple[RedisServer, aioredis.Redis]]:
    server = make_redis_server()
    client = server.async_client(socket_timeout=0.5, socket_connect_timeout=0.5)
    yield server, client
    await client.aclose()


async def test_a_lost_connection_fails_the_calls_written_and_the_next_call_reconnects(
    server_and_client: tuple[RedisServer, aioredis.Redis],
) -> None:
    server, client = server_and_client
    pipe, (echo,) = scripts(client, ECHO)
    assert await echo(keys=[KEY], args=["before"]) == b"before"
    server.pause()
    written = [pipe.call(echo, [KEY], [f"lost {i}"]) for i in range(5)]  # written at once, unanswered
    server.kill()
    for future in written:
        with pytest.raises(ConnectionError):
            await future
    # Not connected and nowhere to connect: the call fails, it does not hang.
    with pytest.raises(ConnectionError):
        await echo(keys=[KEY], args=["down"])
    server.start()
    assert await echo(keys=[KEY], args=["after"]) == b"after"

    # Closed by the server (CLIENT KILL): noticed at once, and the next call reconnects.
    assert await client.client_kill_filter(_type="normal", skipme=True) >= 1
    await wait_for(lambda: pipe._servers[""].link is None)
    assert await echo(keys=[KEY], args=["again"]) == b"again"


async def test_a_timeout_drops_the_connection_and_the_call_is_not_sent_again(
    server_and_client: tuple[RedisServer, aioredis.Redis],
) -> None:
    server, client = server_and_client
    _, (echo, incr) = scripts(client, ECHO, INCR)
    assert await incr(keys=["{t}:loaded"]) == 1  # loaded: the call below runs as sent
    server.pause()
    try:
        started = time.monotonic()
        results = await asyncio.gather(incr(keys=[KEY]), echo(keys=[KEY], args=["late"]), return_exceptions=True)
        assert all(isinstance(r, TimeoutError) for r in results), results
        assert time.monotonic() - started < 2.0
    finally:
        server.resume()
    # A new connection: the late replies of the dropped one cannot be taken for this call's.
    assert await echo(keys=[KEY], args=["after"]) == b"after"

    # Redis ran the INCR it had received before freezing (a timeout is not a no), and only once.
    async def counted() -> bool:
        return await client.get(KEY) is not None

    await wait_for(counted)
    assert await client.get(KEY) == b"1"


@pytest.mark.cluster
async def test_cluster_calls_go_to_the_master_owning_the_slot(redis_cluster: ClusterServers) -> None:
    redis_cluster.flush()
    client = redis_cluster.async_client()
    try:
        await client.initialize()
        pipe, (incr,) = scripts(client, INCR)
        queues = redis_cluster.queues_on_every_master("pipe", per_master=2)
        assert await asyncio.gather(*(incr(keys=[f"{{{q}}}:n"]) for q in queues)) == [1] * len(queues)
        for q in queues:
            with node_client(redis_cluster.owner(q)) as node:
                assert node.get(f"{{{q}}}:n") == b"1"
        assert len(pipe._servers) == len(redis_cluster.servers)

        # A client that has not learnt the slot map yet: redis-py makes the call (and learns it).
        fresh = redis_cluster.async_client()
        try:
            _, (fresh_incr,) = scripts(fresh, INCR)
            assert await fresh_incr(keys=[f"{{{queues[0]}}}:n"]) == 2
            assert await fresh_incr(keys=[f"{{{queues[0]}}}:n"]) == 3
        finally:
            await fresh.aclose()

        # A stale slot map (as after a resharding): MOVED, the call redone by redis-py, which
        # corrects the map, and the next call goes straight to the owner.
        q = queues[0]
        slot = queue_slot(q)
        owner = client.nodes_manager.slots_cache[slot][0]
        other = next(n for n in client.get_primaries() if n.name != owner.name)
        client.nodes_manager.slots_cache[slot] = [other]
        assert await incr(keys=[f"{{{q}}}:n"]) == 4
        assert client.nodes_manager.slots_cache[slot][0].name == owner.name
        assert await incr(keys=[f"{{{q}}}:n"]) == 5
        with node_client(redis_cluster.owner(q)) as node:
            assert node.get(f"{{{q}}}:n") == b"5"
    finally:
        await client.aclose()
