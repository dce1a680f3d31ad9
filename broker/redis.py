"""Connections to Redis: the client factory and the start-up check.

- :func:`create_redis` builds the asyncio client every other module uses.
- :func:`check_redis` refuses a Redis that would lose jobs (too old, or evicting keys).

The private ``redis-server`` run when no Redis is configured lives in :mod:`broker.embedded`.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
import redis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.backoff import ExponentialWithJitterBackoff

from broker.config import RedisSettings
from broker.errors import ConfigError, RedisSetupError

__all__ = [
    "MIN_REDIS_VERSION",
    "RedisClient",
    "RedisInfo",
    "SentinelRedis",
    "check_redis",
    "create_redis",
    "hiredis_packing",
    "preflight",
    "publish_many",
    "pubsub_client",
]

logger = logging.getLogger(__name__)

MIN_REDIS_VERSION = (6, 2)
_HEALTH_CHECK_INTERVAL = 10
# Redis connections one broker process may open (Redis's maxclients defaults to 10,000).
POOL_SIZE = 512


_PLAIN_ARGS = frozenset({bytes, str, int, float})


class _HiredisPacking(AbstractConnection):
    """Packs commands with ``hiredis.pack_command`` (C) instead of redis-py's Python packer.

    The bytes are the same (``tests/test_redis_client.py`` checks); a command holding anything but
    plain ``bytes``, ``str``, ``int`` or ``float`` (a ``bool``, a ``memoryview``, a subclass...),
    or a connection whose encoding is not strict UTF-8, goes through redis-py's packer, which
    encodes or refuses it exactly as before. redis-py's synchronous client does the same
    (``HiredisRespSerializer``); its asyncio client packs in Python, 7 µs per job of a batch push.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hiredis_ok = self.encoder.encoding.lower().replace("-", "") == "utf8" and (
            self.encoder.encoding_errors == "strict"
        )

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        if self._hiredis_ok and set(map(type, args)) <= _PLAIN_ARGS:
            return [hiredis.pack_command(args)]
        return super().pack_command(*args)

    def pack_commands(self, commands: Any) -> list[bytes]:
        return [b"".join(chunk for cmd in commands for chunk in self.pack_command(*cmd))]


_packing_classes: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def hiredis_packing(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """``connection_class`` with its commands packed by hiredis (one subclass per class, cached)."""
    if issubclass(connection_class, _HiredisPacking):
        return connection_class
    found = _packing_classes.get(connection_class)
    if found is None:
        found = type(f"Hiredis{connection_class.__name__}", (_HiredisPacking, connection_class), {})
        _packing_classes[connection_class] = found
    return found


RedisClient = redis.asyncio.Redis | RedisCluster
"""What :func:`create_redis` returns: a single-server (or Sentinel-managed) client, or a Cluster client."""


def create_redis(settings: RedisSettings, url_override: str | None = None, *, retries: int = 2) -> RedisClient:
    """Build the asyncio Redis client (bytes in and out, hiredis parser when installed).

    Connection errors are retried ``retries`` times with a short jittered backoff, so a Redis
    restart (or a Sentinel failover) costs a brief pause rather than an error. Timeouts are not
    retried: a frozen Redis fails the call after ``socket_timeout`` instead of hanging (the broker
    answers 503).

    Args:
        settings: the ``redis`` section. ``cluster`` gives a ``RedisCluster`` client (startup
            nodes from ``cluster_nodes``, else ``url``); ``sentinel_master`` a client of the master
            that the ``sentinels`` name, following failovers.
        url_override: connect here instead of ``settings.url`` (e.g. :attr:`broker.embedded.EmbeddedRedis.url`).
        retries: retries of a command that failed on a connection error.

    Raises:
        ConfigError: no URL to connect to.
    """
    options: dict[str, Any] = {
        "password": settings.password,
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.socket_timeout,
        "health_check_interval": _HEALTH_CHECK_INTERVAL,
        "retry": Retry(
            ExponentialWithJitterBackoff(cap=0.5, base=0.05), retries, supported_errors=(redis.ConnectionError,)
        ),
        "decode_responses": False,
        "client_name": "presque",
    }
    if settings.cluster:
        return _create_cluster(settings, url_override, options)
    if settings.sentinel_master is not None:
        return _create_sentinel(settings, options)
    url = url_override or settings.url
    if url is None:
        raise ConfigError("redis.url: no Redis to connect to (start EmbeddedRedis and pass its url)")
    # A blocking pool: past POOL_SIZE calls in flight, the next one waits (up to socket_timeout) for
    # a free connection; redis-py's default pool fails it with "Too many connections" past 100.
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=POOL_SIZE, timeout=settings.socket_timeout, **options
    )
    # from_url chose the class from the scheme (TCP, unix socket, TLS): the same, packing with hiredis.
    pool.connection_class = hiredis_packing(pool.connection_class)
    client: redis.asyncio.Redis = redis.asyncio.Redis.from_pool(pool)
    return client


def _host_port(node: str) -> tuple[str, int]:
    host, _, port = node.rpartition(":")  # config.py has checked the form
    return host.strip("[]"), int(port)


def _create_cluster(settings: RedisSettings, url_override: str | None, options: dict[str, Any]) -> RedisCluster:
    """A Redis Cluster client whose startup nodes are ``cluster_nodes``, else ``url``.

    Every queue's keys carry the ``{queue}`` hash tag, so each Lua script runs on the one master
    owning that slot; MOVED/ASK redirections and topology changes are the client's business.
    """
    # Its commands are packed by redis-py in Python: RedisCluster fixes its nodes' connection class.
    # The cluster client retries by itself (connection errors, MOVED, CLUSTERDOWN) and refreshes
    # its slot map in between: its own retry policy suits it better than a single server's.
    options = {k: v for k, v in options.items() if k != "retry"}
    options["max_connections"] = POOL_SIZE  # per node; beyond it the cluster client fails a call
    if settings.cluster_nodes:
        nodes = [ClusterNode(*_host_port(node)) for node in settings.cluster_nodes]
        return RedisCluster(startup_nodes=nodes, **options)
    url = url_override or settings.url
    if url is None:  # pragma: no cover - config.py refuses cluster without nodes or url
        raise ConfigError("redis.cluster: needs redis.cluster_nodes or redis.url for the startup nodes")
    return RedisCluster.from_url(url, **options)


class SentinelRedis(redis.asyncio.Redis):
    """The client of a Sentinel-managed master; closing it closes its sentinel connections too."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            for client in self.sentinel_manager.sentinels:
                await client.aclose()


def _create_sentinel(settings: RedisSettings, options: dict[str, Any]) -> SentinelRedis:
    """A client of the master named ``sentinel_master``, found through ``sentinels``.

    Each new connection asks the sentinels where the master is, so after a failover the next
    connection (the retry of a failed command, or the notifier's reconnection) reaches the new
    master; a demoted master's ``READONLY`` answer also forces a reconnection.
    """
    assert settings.sentinel_master is not None
    sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]  # unannotated before redis-py 8
        [_host_port(node) for node in settings.sentinels],
        sentinel_kwargs={"socket_timeout": settings.socket_timeout, "socket_connect_timeout": settings.socket_timeout},
    )
    client: SentinelRedis = sentinel.master_for(
        settings.sentinel_master,
        redis_class=SentinelRedis,
        max_connections=POOL_SIZE,
        connection_class=hiredis_packing(SentinelManagedConnection),
        **options,
    )
    client.sentinel_manager = sentinel
    return client


async def publish_many(client: RedisClient, messages: Sequence[tuple[str, bytes]]) -> None:
    """PUBLISH each (channel, data) in order: one pipeline, or one call after another on a Cluster.

    redis-py refuses PUBLISH in a cluster pipeline, and concurrent calls could overtake each other.
    """
    if isinstance(client, RedisCluster):
        for channel, data in messages:
            await client.publish(channel, data)
        return
    pipe = client.pipeline(transaction=False)
    for channel, data in messages:
        pipe.publish(channel, data)
    await pipe.execute()


def pubsub_client(client: RedisClient) -> tuple[redis.asyncio.Redis, bool]:
    """A client whose ``pubsub()`` receives every classic pub/sub message of the deployment.

    On a single server or Sentinel that is ``client`` itself. On a Cluster it is a new plain
    client to one master chosen at random (a message published on any node reaches every node
    over the cluster bus), with the cluster's connection options.

    Returns:
        The client, and whether it is a new one that the caller must close.
    """
    if not isinstance(client, RedisCluster):
        return client, False
    node = random.choice(client.get_primaries() or client.get_nodes())
    pool = redis.asyncio.ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
    return redis.asyncio.Redis.from_pool(pool), True


@dataclass(frozen=True, slots=True)
class RedisInfo:
    """What :func:`check_redis` found out about the server."""

    version: tuple[int, ...]
    maxmemory_policy: str | None  # None when CONFIG is disabled on the server


async def check_redis(client: RedisClient, settings: RedisSettings) -> RedisInfo:
    """Refuse a Redis that would lose jobs or lacks what the Lua scripts need.

    On a Cluster every master is checked; the figures returned are the first master's.

    Raises:
        RedisSetupError: the version is below 6.2, or ``maxmemory-policy`` is not ``noeviction``
            while ``redis.allow_eviction`` is false.
        redis.RedisError: Redis did not answer.
    """
    if isinstance(client, RedisCluster):
        await client.initialize()  # learns the slot map: which nodes are masters
        found = [await _check_server(client, settings, {"target_nodes": node}) for node in client.get_primaries()]
        return found[0]
    return await _check_server(client, settings, {})


async def preflight(settings: RedisSettings) -> RedisInfo:
    """Connect to the configured (not embedded) Redis once, :func:`check_redis` it, disconnect.

    ``presque serve`` calls it before serving, so that a Redis it must refuse or cannot reach
    stops it with one line instead of a failed application start-up and its traceback.

    Raises:
        RedisSetupError: the check failed, or Redis did not answer.
    """
    client = create_redis(settings)
    try:
        return await check_redis(client, settings)
    except (redis.RedisError, OSError) as exc:
        raise RedisSetupError(f"cannot use Redis: {exc}") from exc
    finally:
        await client.aclose()


async def _check_server(client: RedisClient, settings: RedisSettings, target: dict[str, Any]) -> RedisInfo:
    server = await client.info("server", **target)
    raw_version = str(server.get("redis_version", "0"))
    version = _parse_version(raw_version.split("."))
    if version < MIN_REDIS_VERSION:
        raise RedisSetupError(f"Redis {raw_version} is too old: presque needs Redis 6.2 or newer")
    policy: str | None
    try:
        reply = await client.config_get("maxmemory-policy", **target)
    except redis.ResponseError as exc:
        # Managed services often rename or disable CONFIG; we cannot check, so we say so.
        logger.warning("cannot read Redis maxmemory-policy (%s): make sure it is noeviction", exc)
        policy = None
    else:
        values = [_text(v) for v in reply.values()]
        policy = values[0] if values else None
    if policy is not None and policy != "noeviction":
        if not settings.allow_eviction:
            raise RedisSetupError(
                f"Redis maxmemory-policy is {policy}: eviction silently loses jobs. Set it to noeviction "
                "(CONFIG SET maxmemory-policy noeviction) or accept the risk with redis.allow_eviction: true"
            )
        logger.warning("Redis maxmemory-policy is %s (allowed by redis.allow_eviction): jobs may be lost", policy)
    return RedisInfo(version=version, maxmemory_policy=policy)


def _parse_version(parts: Sequence[str]) -> tuple[int, ...]:
    numbers: list[int] = []
    for part in parts[:3]:
        leading = re.match(r"\d+", part)
        if leading is None:
            break
        numbers.append(int(leading.group()))
    return tuple(numbers)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
