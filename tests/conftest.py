"""Shared fixtures: a real redis-server per test session, wiped before each test.

- ``redis_server`` (session): the :class:`~tests.servers.RedisServer` itself. Tests that stop,
  kill or pause Redis must use ``make_redis_server`` instead, so that others keep theirs.
- ``redis_url`` (function): its URL, after FLUSHALL (fast isolation between tests).
- ``redis`` (function, async): a ``redis.asyncio.Redis`` on it (bytes replies), closed after.
- ``make_redis_server`` (function): factory ``(**kwargs) -> RedisServer`` of private, started
  servers, stopped after the test.
- ``make_broker`` (function): factory ``(redis_url, **kwargs) -> BrokerServer`` of started broker
  subprocesses, stopped after the test.
- ``redis_cluster`` (session): a real 3-master Redis Cluster (:class:`~tests.cluster.ClusterServers`).

With ``PRESQUE_TEST_TOPOLOGY=cluster`` (``make test-cluster``), ``redis_url`` and ``redis`` point
at that cluster instead, and :func:`~tests.servers.make_settings` and
:class:`~tests.servers.BrokerServer` configure ``redis.cluster: true``: the same tests then run
against the cluster. Tests that need a single server of their own (``redis_server``,
``make_redis_server``) are skipped in that mode.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.cluster import ClusterServers, ClusterTestClient, async_client_for
from tests.servers import BrokerServer, RedisServer, on_cluster

NOT_ON_CLUSTER = "needs a single redis-server of its own: not run with PRESQUE_TEST_TOPOLOGY=cluster"


@pytest.fixture(scope="session")
def _single_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(request: pytest.FixtureRequest) -> RedisServer:
    if on_cluster():
        pytest.skip(NOT_ON_CLUSTER)
    server: RedisServer = request.getfixturevalue("_single_redis_server")
    return server


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterServers]:
    cluster = ClusterServers(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> str:
    if on_cluster():
        cluster: ClusterServers = request.getfixturevalue("redis_cluster")
        cluster.flush()
        return cluster.url
    redis_server: RedisServer = request.getfixturevalue("_single_redis_server")
    if not redis_server.running:  # a test broke the shared server; give the next one a working one
        redis_server.start()
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = async_client_for(redis_url)
    if isinstance(client, ClusterTestClient):
        await client.initialize()
    yield client  # type: ignore[misc]  # the cluster client speaks the same commands
    await client.aclose()


@pytest.fixture
def make_redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    if on_cluster():
        pytest.skip(NOT_ON_CLUSTER)
    servers: list[RedisServer] = []

    def make(**kwargs: Any) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", **kwargs)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[Callable[..., BrokerServer]]:
    brokers: list[BrokerServer] = []

    def make(redis_url: str | None, **kwargs: Any) -> BrokerServer:
        broker = BrokerServer(tmp_path / f"broker-{len(brokers)}", redis_url, **kwargs)
        brokers.append(broker)
        return broker.start()

    yield make
    for broker in brokers:
        broker.stop()
