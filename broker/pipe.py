"""ScriptPipe: the hot Lua scripts over one raw, pipelined connection per Redis server.

redis-py spends 60-170 µs of Python on every script call (packing each argument, taking and
returning a pooled connection, its retry and observability wrappers: docs/performance.md). A
pipe packs ``EVALSHA`` with ``hiredis.pack_command``, writes it at once on a connection that
every call of the process shares, and hands each reply to its call in order — Redis answers a
connection's commands in the order it received them — so many calls are in flight at once on
one socket, for ~13 µs of client CPU each.

**The connection is redis-py's.** The pipe takes one connection object from the client's pool
(from the owning node's on a Redis Cluster: one per master, chosen by the slot of the script's
first key, since every key of a queue carries its ``{queue}`` hash tag), lets redis-py connect
it — TCP, unix socket or TLS, AUTH, SELECT, CLIENT SETNAME, the Sentinel's master discovery and
the pool's connect retries, exactly as for any other command — then takes its transport over
(``transport.set_protocol``). Closing the client closes the pipe's connection with the pool's.

**Failures**, each answered as the calls' guarantees require:

- Connection lost: the calls written on it fail with ``redis.ConnectionError``. They are not
  sent again: a written call may have run, and the push script is not idempotent. Calls not
  written yet wait for the next connection, made when needed.
- No reply within ``socket_timeout`` of the last progress: the calls waiting fail with
  ``redis.TimeoutError`` and the connection is dropped (a late reply would go to the wrong call).
  As with redis-py, a timed-out call may still run when Redis thaws.
- ``NOSCRIPT`` (Redis restarted, ``SCRIPT FLUSH``): ``SCRIPT LOAD`` and the same call again,
  pipelined behind the calls already in flight.
- ``MOVED``, ``ASK``, ``TRYAGAIN``, ``CLUSTERDOWN``, ``MASTERDOWN``, ``READONLY``: the script did
  not run; the call is redone through redis-py, which follows redirections and failovers and
  updates its slot map (the next calls are routed by it). ``READONLY`` (a Sentinel master
  demoted) also retires the connection once its replies are in: the next one asks the
  sentinels where the master is now. On a Cluster, a failed connect also hands its calls to
  redis-py, whose cluster client knows how to refresh the topology.
- Every other error reply is raised as redis-py raises it (``ResponseError``, ``NoScriptError``,
  ``OutOfMemoryError``, ...): the parser is redis-py's ``parse_error``.

Left to redis-py whole (:meth:`ScriptPipe.open` returns None): a client holding one connection
(``single_connection_client``), a pool of fewer than :data:`MIN_POOL` connections (the pipe
would hold one of them for good), and any client that is neither ``redis.asyncio.Redis`` nor
``RedisCluster``. A transport that cannot change its protocol switches the pipe off for good.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.asyncio
from redis._parsers import BaseParser
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    DataError,
    InvalidResponse,
    MasterDownError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)

__all__ = ["MIN_POOL", "PipedScript", "ScriptPipe"]

log = logging.getLogger(__name__)

MIN_POOL = 8
"""Pools smaller than this keep all their connections for redis-py."""

# Replies saying the script did not run and that someone else owns the keys now.
_REDIRECTS = (MovedError, AskError, TryAgainError, ClusterDownError, MasterDownError, ReadOnlyError)
_NOT_ENOUGH_DATA = object()


class PipedScript:
    """A Lua script called through a :class:`ScriptPipe`; redis-py's ``Script`` for everything else.

    Call it as redis-py's: ``await script(keys=[...], args=[...])``; with ``client=`` (a
    pipeline) the call goes to redis-py's script object.
    """

    __slots__ = ("fallback", "load", "name", "pipe", "sha")

    def __init__(self, pipe: ScriptPipe, fallback: Any, name: str) -> None:
        self.pipe = pipe
        self.fallback = fallback
        self.name = name
        self.sha: bytes = fallback.sha.encode()
        script = fallback.script
        command: tuple[Any, ...] = (b"SCRIPT", b"LOAD", script.encode() if isinstance(script, str) else script)
        self.load: bytes = hiredis.pack_command(command)  # sent again after each NOSCRIPT

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None) -> Any:
        if client is not None or not self.pipe.enabled:
            return await self.fallback(keys=keys, args=args, client=client)
        return await self.pipe.call(self, keys, args)


class _Call:
    """One script call: what to send (again, after NOSCRIPT), and where its reply goes."""

    __slots__ = ("args", "future", "keys", "packed", "reloaded", "script")

    def __init__(self, script: PipedScript, keys: Sequence[Any], args: Sequence[Any], future: Any) -> None:
        self.script = script
        self.keys = keys
        self.args = args
        self.future: asyncio.Future[Any] = future
        self.reloaded = False
        try:
            self.packed: bytes = hiredis.pack_command((b"EVALSHA", script.sha, len(keys), *keys, *args))
        except TypeError as exc:
            raise DataError(f"{script.name}: an argument is not bytes, str, int or float ({exc})") from exc


class ScriptPipe:
    """The hot scripts' connections to one Redis deployment (one per server the scripts reach).

    Create with :meth:`open`; calls are made through :class:`PipedScript`. Calls may be made
    from many tasks at once; each waits only for its own reply.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.enabled = True
        self._cluster = isinstance(client, RedisCluster)
        self._servers: dict[str, _Server] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def open(cls, client: Any) -> ScriptPipe | None:
        """A pipe for ``client``, or None when its scripts must stay with redis-py (see the module doc)."""
        if isinstance(client, RedisCluster):
            return cls(client)
        if not isinstance(client, redis.asyncio.Redis) or client.single_connection_client:
            return None
        pool = client.connection_pool
        if not isinstance(pool, ConnectionPool) or pool.max_connections < MIN_POOL:
            return None
        return cls(client)

    def call(self, script: PipedScript, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Send one EVALSHA; the future gets its reply (or error)."""
        call = _Call(script, keys, args, asyncio.get_running_loop().create_future())
        server = self._server_for(keys)
        if server is None:
            self.redo(call)
        else:
            server.send(call)
        return call.future

    def redo(self, call: _Call) -> None:
        """Have redis-py make ``call`` (the pipe could not): its result goes to the call's future."""
        task = asyncio.create_task(self._redo(call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _redo(self, call: _Call) -> None:
        if call.future.done():  # pragma: no cover - its caller gave up in the same loop iteration
            return
        try:
            result = await call.script.fallback(keys=call.keys, args=call.args)
        except asyncio.CancelledError:  # pragma: no cover - the loop shutting down mid-call
            call.future.cancel()
            raise
        except Exception as exc:
            if not call.future.done():
                call.future.set_exception(exc)
        else:
            if not call.future.done():
                call.future.set_result(result)

    def disable(self, why: str) -> None:  # pragma: no cover - asyncio's and uvloop's transports all can
        if self.enabled:
            log.warning("script calls go through redis-py from now on: %s", why)
        self.enabled = False

    def _server_for(self, keys: Sequence[Any]) -> _Server | None:
        if not self._cluster:
            server = self._servers.get("")
            if server is None:
                server = self._servers[""] = _Server(self, lambda: self.client.connection_pool.get_connection())
            return server
        try:
            key = keys[0]
            node = self.client.nodes_manager.get_node_from_slot(key_slot(key.encode() if isinstance(key, str) else key))
        # No key, or no slot map yet: redis-py will learn it (redis-py ≥ 8 raises
        # SlotNotCoveredError, older versions KeyError, for a slot it does not know).
        except (IndexError, KeyError, RedisError, SlotNotCoveredError):
            return None
        server = self._servers.get(node.name)
        if server is None or server.node is not node:
            server = self._servers[node.name] = _Server(self, node.acquire_connection, node)
        return server


class _Server:
    """The pipe's connection to one server: made on demand, remade after a loss.

    Calls not yet written wait in ``backlog`` while the connection is being made; ``draining``
    (after a READONLY reply) keeps new calls there until the current connection's replies are in.
    """

    def __init__(self, pipe: ScriptPipe, acquire: Any, node: Any = None) -> None:
        self.pipe = pipe
        self.node = node
        self._acquire = acquire
        self.redis_conn: AbstractConnection | None = None
        self.link: _Link | None = None
        self.backlog: list[_Call] = []
        self.draining = False
        self._connecting: asyncio.Task[None] | None = None

    def send(self, call: _Call) -> None:
        link = self.link
        if link is not None and not self.draining:
            link.write(call)
            return
        self.backlog.append(call)
        if not self.draining and self._connecting is None:
            self._connecting = asyncio.create_task(self._connect())

    def lost(self, link: _Link) -> None:
        if self.link is link:
            self.link = None
            if self.draining:
                self.draining = False
                if self.backlog and self._connecting is None:
                    self._connecting = asyncio.create_task(self._connect())

    def retire(self, link: _Link) -> None:
        """Send nothing more on ``link``; close it once its replies are in (``_Link.data_received``)."""
        if self.link is link:
            self.draining = True

    async def _connect(self) -> None:
        try:
            link = await self._open()
        except (RedisError, OSError) as exc:
            backlog, self.backlog = self.backlog, []
            for call in backlog:
                if self.node is not None:  # pragma: no cover - a master down: redis-py's cluster client
                    self.pipe.redo(call)  # refreshes the topology and retries, as for its own calls
                elif not call.future.done():
                    call.future.set_exception(exc if isinstance(exc, RedisError) else ConnectionError(str(exc)))
            return
        except BaseException:  # pragma: no cover - the loop shutting down while connecting
            backlog, self.backlog = self.backlog, []
            for call in backlog:
                call.future.cancel()
            raise
        finally:
            self._connecting = None
        if link is None:  # pragma: no cover - the pipe could not take the connection over: redis-py's turn
            backlog, self.backlog = self.backlog, []
            for call in backlog:
                self.pipe.redo(call)
            return
        self.link = link
        backlog, self.backlog = self.backlog, []
        for call in backlog:
            if not call.future.done():
                link.write(call)

    async def _open(self) -> _Link | None:
        conn = self.redis_conn
        if conn is None:
            acquired = self._acquire()
            conn = self.redis_conn = await acquired if asyncio.iscoroutine(acquired) else acquired
        else:
            await conn.disconnect(nowait=True)  # a no-op unless the last connection is still open
        await conn.connect()
        writer = getattr(conn, "_writer", None)
        transport = getattr(writer, "transport", None)
        if transport is None or not hasattr(transport, "set_protocol"):  # pragma: no cover - see disable()
            self.pipe.disable(f"cannot take over a {type(transport).__name__} transport")
            return None
        return _Link(self, conn, transport)


class _Link(asyncio.Protocol):
    """One connection's protocol: writes calls, matches replies to them in order, watches the time."""

    def __init__(self, server: _Server, conn: AbstractConnection, transport: Any) -> None:
        self.server = server
        self.transport = transport
        self.pending: deque[_Call | None] = deque()  # None: the reply of a SCRIPT LOAD
        self.timeout: float | None = getattr(conn, "socket_timeout", None)
        kwargs: dict[str, Any] = {}
        encoder = getattr(conn, "encoder", None)
        if encoder is not None and encoder.decode_responses:
            kwargs = {"encoding": encoder.encoding, "errors": encoder.encoding_errors}
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse,
            replyError=BaseParser.parse_error,
            notEnoughData=_NOT_ENOUGH_DATA,
            **kwargs,
        )
        self.loop = asyncio.get_running_loop()
        self._since = 0.0  # when the oldest pending call was written, or the last reply arrived
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        # redis-py's stream protocol still needs to hear that the connection is gone: its
        # disconnect() waits for that.
        self._original = transport.get_protocol()
        transport.set_protocol(self)

    def write(self, call: _Call) -> None:
        try:
            self.transport.write(call.packed)
        except RuntimeError:  # pragma: no cover - uvloop, the transport closed under us: not written
            self._gone(ConnectionError("Connection closed by server."))
            self.server.send(call)
            return
        if not self.pending:
            self._since = self.loop.time()
            if self._timer is None and self.timeout:
                self._timer = self.loop.call_at(self._since + self.timeout, self._check_time)
        self.pending.append(call)

    def data_received(self, data: bytes) -> None:
        reader, pending = self.reader, self.pending
        reader.feed(data)
        self._since = self.loop.time()
        while True:
            try:
                reply = reader.gets()
            except InvalidResponse as exc:  # pragma: no cover - not RESP: not Redis
                self.drop(exc)
                return
            if reply is _NOT_ENOUGH_DATA:
                break
            if not pending:  # pragma: no cover - a reply nobody asked for: the stream cannot be trusted
                self.drop(InvalidResponse("unexpected reply from Redis"))
                return
            call = pending.popleft()
            if call is None:
                continue  # SCRIPT LOAD's "sha": a failure shows in the EVALSHA behind it
            if isinstance(reply, RedisError):
                self._failed(call, reply)
            elif not call.future.done():
                call.future.set_result(reply)
        if not pending and self.server.draining:
            self.transport.close()

    def _failed(self, call: _Call, error: RedisError) -> None:
        if isinstance(error, NoScriptError) and not call.reloaded:
            call.reloaded = True
            self.pending.append(None)
            self.transport.write(call.script.load)
            self.write(call)
        elif isinstance(error, _REDIRECTS):
            if isinstance(error, ReadOnlyError):
                self.server.retire(self)
            self.server.pipe.redo(call)
        elif not call.future.done():
            call.future.set_exception(error)

    def _check_time(self) -> None:
        self._timer = None
        if not self.pending or self._closed or not self.timeout:  # pragma: no cover - timing-dependent
            return
        deadline = self._since + self.timeout
        if self.loop.time() >= deadline:
            self.drop(TimeoutError(f"Timeout reading from Redis: no reply in {self.timeout}s"))
        else:
            self._timer = self.loop.call_at(deadline, self._check_time)

    def drop(self, error: RedisError) -> None:
        """Close the connection and fail every call waiting for a reply on it with ``error``."""
        self.transport.abort()
        self._gone(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone(ConnectionError("Connection closed by server." if exc is None else f"Connection lost: {exc}"))
        self._original.connection_lost(exc)

    def eof_received(self) -> bool | None:
        # Write nothing more on it; the transport closes and connection_lost follows.
        self._gone(ConnectionError("Connection closed by server."))
        return None

    def _gone(self, error: RedisError) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.server.lost(self)
        pending, self.pending = self.pending, deque()
        for call in pending:
            if call is not None and not call.future.done():
                call.future.set_exception(error)
