"""Connection: moves one WebSocket's frames between the socket, its Session and the broker.

The session (``protocol.py``) decides everything; this class only awaits. Frames are read and
handled in order; commands that need Redis and return nothing the next frame depends on (push,
ack, nack, touch, progress, publish) run concurrently, bounded per connection, so that one
connection can keep many pushes in flight (their replies may therefore overtake each other).
The most frequent, a single push and an ack, go to the runtime's coalescers with a callback
rather than in a task of their own (plain ones straight from the session, without a command
object: ``_sink_push`` / ``_sink_ack``); the others each run in a task. A
writer task, started when the session has output and ended when it has none, sends what the
session queues and reports its backlog, so that a slow reader stops receiving jobs instead of
buffering them.

:class:`Connection` holds the connection's state, its lifecycle and its reading; it inherits its
command execution from ``broker/connection_commands.py`` and its output (the writer) from
``broker/connection_output.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket

from broker.connection_commands import AuthCheck, CommandExecution
from broker.frames import CloseCode
from broker.protocol import Session
from broker.wsproto import EXTENSION, RECEIVE_BATCHED, RECEIVE_FRAMES

if TYPE_CHECKING:
    from broker.delivery import DeliveryHub

log = logging.getLogger("presque.connection")

FLUSH_TIMEOUT = 2.0  # closing: how long the last frames (an error, ``shutdown``) may take to go out


class Connection(CommandExecution):
    """One accepted WebSocket.

    Args:
        hub: the process's delivery hub.
        websocket: the accepted Starlette WebSocket.
        session: its protocol state machine.
        check_token: validates an ``auth`` frame's token, returning its authorize function.
        idle_timeout: close a connection that holds nothing and says nothing for this long.
    """

    def __init__(
        self,
        hub: DeliveryHub,
        websocket: WebSocket,
        session: Session,
        *,
        check_token: AuthCheck | None = None,
        idle_timeout: float = 300.0,
    ) -> None:
        self.hub = hub
        self.runtime = hub.runtime
        self.ws = websocket
        self.session = session
        self._check_token = check_token
        self._idle_timeout = idle_timeout
        # No task, event or timer more than needed: the broker holds thousands of idle connections.
        self._writer: asyncio.Task[None] | None = None  # runs while there is output to write
        self._ended = False  # run() is over: no writer starts any more
        self._end_waiter: asyncio.Future[None] | None = None  # shut_down() waiting for the end
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_input = 0.0
        self._pending = 0  # commands running concurrently (tasks and coalesced items)
        self._change_waiter: asyncio.Future[None] | None = None  # resolved when one of them ends
        self._tasks: set[asyncio.Task[None]] = set()
        self._socket_closed = False
        self._unavailable_told = 0.0
        # Plain pushes and acks go from the session to the coalescers without a command object.
        session.set_plain_sink(self._sink_push, self._sink_ack)

    # -- lifecycle ----------------------------------------------------------------------------------

    async def run(self, first: Mapping[str, Any] | None = None) -> None:
        """Serve the connection until it closes; then hand back every job it held.

        Args:
            first: a frame to handle before reading any, e.g. the implicit subscribe of ``/ws/{queue}``.
        """
        self.hub.connected(self)
        try:
            if first is not None:
                for cmd in self.session.receive_object(first):
                    await self._execute(cmd)
                self._wake_writer()
            await self._read_loop()
            if self.session.close_code is not None:
                # Let the writer flush the last frames (an error, ``shutdown``); it then closes.
                self._wake_writer()
                if self._writer is not None:
                    with contextlib.suppress(TimeoutError, Exception):
                        await asyncio.wait_for(asyncio.shield(self._writer), FLUSH_TIMEOUT)
        except Exception:
            log.exception("connection failed")
        finally:
            self.hub.disconnected(self)
            await self._release(self.session.close())
            # Acks, pushes... read before the close still happen (an ack the client sent before
            # closing must not leave its job leased until the lease expires).
            if self._pending:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drained(), FLUSH_TIMEOUT)
            for task in list(self._tasks):
                task.cancel()
            self._ended = True
            writer = self._writer
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await writer
            await self._close_socket()
            if self._end_waiter is not None and not self._end_waiter.done():
                self._end_waiter.set_result(None)

    async def shut_down(self, timeout: float = 5.0) -> None:
        """Graceful broker shutdown: ``shutdown`` frame, every held job returned, then close 1001."""
        self.session.shutdown()
        await self._release(self.session.close())
        self._wake_writer()
        if not self._ended:
            self._end_waiter = self._end_waiter or asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._end_waiter), timeout)

    # -- reading ------------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        # The raw ASGI receive: Starlette's WebSocket.receive only adds state checks on this path.
        receive = self.ws._receive
        self._last_input = loop.time()
        self._idle_timer = loop.call_at(self._last_input + self._idle_timeout, self._idle_check)
        session = self.session
        receive_frames = session.receive_frames
        try:
            if EXTENSION in self.ws.scope.get("extensions", {}):
                # broker/wsproto.py then hands over every frame of a socket read in one message.
                await self.ws._send({"type": RECEIVE_BATCHED})
            while session.close_code is None:
                message = await receive()
                self._last_input = loop.time()
                kind = message["type"]
                if kind == RECEIVE_FRAMES:
                    frames = message["frames"]
                elif kind == "websocket.disconnect":
                    self._socket_closed = True
                    return
                else:
                    data = message.get("text")
                    frames = (message.get("bytes") or b"",) if data is None else (data,)
                # Frames after one that closed the session are ignored by it. Plain pushes and
                # acks yield nothing: the session handed them to _sink_push / _sink_ack.
                for cmd in receive_frames(frames):
                    # Pushes and acks it did not hand over, straight to the coalescer if they may.
                    if not self._push_or_ack_soon(cmd):
                        await self._execute(cmd)
                self._wake_writer()
        finally:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None

    def _idle_check(self) -> None:
        # One timer per connection, rearmed when it fires, rather than a timeout around every
        # receive (asyncio.wait_for makes a task each time). A connection that holds a
        # subscription, a channel or a watch is never idle.
        loop = asyncio.get_running_loop()
        s = self.session
        due = self._last_input + self._idle_timeout
        if s.close_code is not None:
            self._idle_timer = None
        elif s.subscriptions or s.channels or s.watches:
            self._idle_timer = loop.call_at(loop.time() + self._idle_timeout, self._idle_check)
        elif loop.time() < due:
            self._idle_timer = loop.call_at(due, self._idle_check)
        else:
            self._idle_timer = None
            # The writer closes the socket; the read loop then receives the disconnect.
            self.session.start_close(CloseCode.NORMAL, "idle timeout")
            self._wake_writer()
