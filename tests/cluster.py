"""Real distributed Redis set-ups for tests: a 3-master Redis Cluster and a Sentinel group.

- :class:`ClusterServers`: three ``redis-server --cluster-enabled yes`` on free ports, joined by
  ``redis-cli --cluster create`` (no replicas), ready when every node reports
  ``cluster_state:ok`` and agrees on who owns every slot.
- :class:`SentinelGroup`: one master, one replica and three sentinels (``redis-server
  --sentinel``) with short failure detection, so that a killed master is replaced in seconds.

Both run the binary of :func:`~tests.servers.redis_binary` (Redis 6.2 in ``make test-core``).
Synchronise with their ``wait_*`` methods, which poll under a deadline.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from broker import keys
from tests.servers import RedisServer, _log_tail, _terminate, free_port, on_cluster, redis_binary, wait_for_sync

SLOTS = 16384
BUS_PORT_OFFSET = 10000
MASTER_NAME = "presque"


def redis_cli() -> str:
    """``redis-cli`` next to the redis-server in use, else from ``PATH``."""
    sibling = Path(redis_binary()).parent / "redis-cli"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    found = shutil.which("redis-cli")
    if found is None:
        raise RuntimeError("redis-cli not found: install Redis (apt-get install redis-tools)")
    return found


def node_client(port: int, **kwargs: Any) -> redis.Redis:
    """A blocking client of one node, without retries (close it after use)."""
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0, retry=Retry(NoBackoff(), 0), **kwargs)


def free_cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too (Redis 6.2 has no ``cluster-port``)."""
    while True:
        port = free_port()
        if port + BUS_PORT_OFFSET > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + BUS_PORT_OFFSET))
            except OSError:
                continue
        return port


def queue_slot(queue: str) -> int:
    """The Cluster slot of every key of ``queue`` (its ``{queue}`` hash tag)."""
    return int(key_slot(keys.queue_keys(queue).ready.encode()))


class ClusterTestClient(redis.asyncio.RedisCluster):
    """A cluster client whose ``PUBSUB NUMSUB`` counts the subscribers of every node.

    A classic subscription lives on the one node a client subscribed on; redis-py asks a single
    node unless told otherwise, and tests want to know whether *anyone* listens.
    """

    async def pubsub_numsub(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("target_nodes", self.ALL_NODES)
        return await super().pubsub_numsub(*args, **kwargs)


def async_client_for(redis_url: str) -> redis.asyncio.Redis | ClusterTestClient:
    """An asyncio client of the suite's Redis at ``redis_url``: a cluster client under
    ``PRESQUE_TEST_TOPOLOGY=cluster`` (a plain one would get MOVED for most keys). Close it after use.
    """
    if on_cluster():
        return ClusterTestClient.from_url(redis_url)
    return redis.asyncio.Redis.from_url(redis_url)


class ClusterServers:
    """A 3-master Redis Cluster on free loopback ports, files under ``directory``.

    Call order: :meth:`start`, then :attr:`nodes` / :meth:`async_client` / :meth:`flush`, then
    :meth:`stop` (or use it as a context manager).
    """

    def __init__(self, directory: str | Path, *, masters: int = 3) -> None:
        self.directory = Path(directory)
        self.servers = [self._node(i) for i in range(masters)]
        self._owners: list[int] | None = None

    def _node(self, i: int) -> RedisServer:
        directory = self.directory / f"node-{i}"
        args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(directory / "nodes.conf"),
            "--cluster-node-timeout", "5000",
        ]  # fmt: skip
        return RedisServer(directory, port=free_cluster_port(), appendonly=False, args=args)

    @property
    def nodes(self) -> list[str]:
        """``host:port`` of every master (``redis.cluster_nodes``)."""
        return [f"127.0.0.1:{s.port}" for s in self.servers]

    @property
    def url(self) -> str:
        """A startup node as a URL (``redis.url`` with ``redis.cluster: true``)."""
        return f"redis://127.0.0.1:{self.servers[0].port}/0"

    def start(self, timeout: float = 30.0) -> ClusterServers:
        for server in self.servers:
            server.start()
        create = subprocess.run(
            [redis_cli(), "--cluster", "create", *self.nodes, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}\n{create.stderr}")
        wait_for_sync(self._ready, timeout, interval=0.05, message=f"cluster not ok:\n{self._diagnose()}")
        return self

    def _ready(self) -> bool:
        views = []
        for server in self.servers:
            with node_client(server.port) as client:
                try:
                    info = client.execute_command("CLUSTER", "INFO")
                    if b"cluster_state:ok" not in info:
                        return False
                    views.append(self._slot_owners(client))
                except redis.RedisError:
                    return False
        return all(view == views[0] for view in views)

    @staticmethod
    def _slot_owners(client: redis.Redis) -> list[int]:
        owners = [0] * SLOTS
        for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
            for slot in range(int(start), int(end) + 1):
                owners[slot] = int(master[1])
        return owners

    def _diagnose(self) -> str:
        return "\n".join(f"node {s.port}:\n{_log_tail(s.log_path, 10)}" for s in self.servers)

    def owner(self, queue: str) -> int:
        """The port of the master that holds ``queue``'s keys."""
        if self._owners is None:
            with node_client(self.servers[0].port) as client:
                self._owners = self._slot_owners(client)
        return self._owners[queue_slot(queue)]

    def queues_on_every_master(self, prefix: str, per_master: int = 1) -> list[str]:
        """Queue names ``prefix-N``, ``per_master`` of them on each master, grouped by master."""
        chosen: dict[int, list[str]] = {s.port: [] for s in self.servers}
        n = 0
        while any(len(names) < per_master for names in chosen.values()):
            name = f"{prefix}-{n}"
            n += 1
            names = chosen[self.owner(name)]
            if len(names) < per_master:
                names.append(name)
        return [name for names in chosen.values() for name in names]

    def flush(self) -> None:
        """FLUSHALL on every master, and forget scripts (a fresh state for the next test)."""
        for server in self.servers:
            with node_client(server.port) as client:
                client.flushall()

    def async_client(self, **kwargs: Any) -> ClusterTestClient:
        """An asyncio cluster client (bytes replies); ``await client.aclose()`` after use."""
        return ClusterTestClient(startup_nodes=[ClusterNode("127.0.0.1", s.port) for s in self.servers], **kwargs)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> ClusterServers:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class SentinelGroup:
    """One master, one replica and three sentinels watching them as ``presque``.

    Sentinels judge the master down after ``down_after_ms`` without an answer and fail over to the
    replica; :meth:`kill_master` + :meth:`wait_failover` show it happen.
    """

    def __init__(self, directory: str | Path, *, down_after_ms: int = 1000, failover_timeout_ms: int = 2000) -> None:
        self.directory = Path(directory)
        self.master = RedisServer(self.directory / "master", appendonly=False)
        self.replica = RedisServer(
            self.directory / "replica",
            appendonly=False,
            args=["--replicaof", "127.0.0.1", str(self.master.port)],
        )
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self._sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def sentinels(self) -> list[str]:
        """``host:port`` of every sentinel (``redis.sentinels``)."""
        return [f"127.0.0.1:{port}" for port in self.sentinel_ports]

    def start(self, timeout: float = 30.0) -> SentinelGroup:
        self.master.start()
        self.replica.start()
        wait_for_sync(self._replica_synced, timeout, interval=0.05, message="replica never synced with the master")
        for i, port in enumerate(self.sentinel_ports):
            directory = self.directory / f"sentinel-{i}"
            directory.mkdir(parents=True, exist_ok=True)
            conf = directory / "sentinel.conf"
            conf.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f'dir "{directory}"\n'
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
                f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            with (directory / "sentinel.log").open("ab") as log:
                self._sentinels.append(
                    subprocess.Popen(
                        [redis_binary(), str(conf), "--sentinel"],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        wait_for_sync(self._sentinels_agree, timeout, interval=0.05, message="sentinels never saw each other")
        return self

    def _replica_synced(self) -> bool:
        with node_client(self.replica.port) as client:
            try:
                return bool(client.info("replication").get("master_link_status") == "up")
            except redis.RedisError:
                return False

    def _sentinels_agree(self) -> bool:
        """Every sentinel knows the master, the replica and the two other sentinels."""
        for proc, port in zip(self._sentinels, self.sentinel_ports, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"sentinel on {port} exited with {proc.returncode}")
            with node_client(port, decode_responses=True) as client:
                try:
                    master = client.execute_command("SENTINEL MASTER", MASTER_NAME)
                    replicas = client.execute_command("SENTINEL REPLICAS", MASTER_NAME)
                except redis.RedisError:
                    return False
            if int(master.get("num-other-sentinels", 0)) < 2 or not replicas:
                return False
        return True

    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers sees it."""
        for port in self.sentinel_ports:
            with node_client(port, decode_responses=True) as client:
                try:
                    addr = client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
                except redis.RedisError:
                    continue
                if addr:
                    return int(addr[1])
        return None

    def kill_master(self) -> None:
        """SIGKILL the current master (a crash)."""
        self.master.kill()

    def wait_failover(self, timeout: float = 30.0) -> None:
        """Wait until the sentinels name the replica as master and it accepts writes."""

        def promoted() -> bool:
            if self.master_port() != self.replica.port:
                return False
            with node_client(self.replica.port) as client:
                try:
                    return bool(client.info("replication").get("role") == "master")
                except redis.RedisError:
                    return False

        wait_for_sync(promoted, timeout, interval=0.05, message="no failover to the replica")

    def stop(self) -> None:
        for proc in self._sentinels:
            _terminate(proc, 5.0)
        self._sentinels.clear()
        self.replica.stop()
        self.master.stop()

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
