"""Connection: moves one WebSocket's frames between the socket, its Session and the broker.

The session (``protocol.py``) decides everything; this class only awaits. Frames are read and
handled in order; commands that need Redis and return nothing the next frame depends on (push,
ack, nack, touch, progress, publish) run concurrently, bounded per connection, so that one
connection can keep many pushes in flight (their replies may therefore overtake each other). A
single writer task sends what the session queues, and reports its backlog so that a slow reader
stops receiving jobs instead of buffering them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from starlette.websockets import WebSocket

from broker.errors import BrokerError
from broker.frames import (
    Ack,
    Auth,
    CloseCode,
    Command,
    ErrorCode,
    Lease,
    Listen,
    Nack,
    Progress,
    Publish,
    Push,
    PushBatch,
    Subscribe,
    Topic,
    Touch,
    Unlisten,
    Unsubscribe,
    Unwatch,
    Watch,
)
from broker.models import Delivery, PushOptions, dumps
from broker.protocol import Authorize, Session

if TYPE_CHECKING:
    from broker.delivery import DeliveryHub

log = logging.getLogger("presque.connection")

MAX_PENDING = 1000  # commands of one connection running at once; beyond, reading pauses
UNAVAILABLE_EVERY = 5.0  # at most one unsolicited "unavailable" error frame per this many seconds
FLUSH_TIMEOUT = 2.0  # closing: how long the last frames (an error, ``shutdown``) may take to go out

AuthCheck = Callable[[str], Authorize | None]  # validates an ``auth`` token, raising Unauthorized


class Connection:
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
        self._output = asyncio.Event()
        self._pending = asyncio.Semaphore(MAX_PENDING)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        self._socket_closed = False
        self._unavailable_told = 0.0

    # -- lifecycle ----------------------------------------------------------------------------------

    async def run(self, first: Mapping[str, Any] | None = None) -> None:
        """Serve the connection until it closes; then hand back every job it held.

        Args:
            first: a frame to handle before reading any, e.g. the implicit subscribe of ``/ws/{queue}``.
        """
        self.hub.connected(self)
        writer = asyncio.create_task(self._write_loop(), name="presque-ws-writer")
        try:
            if first is not None:
                for cmd in self.session.receive_object(first):
                    await self._execute(cmd)
                self._output.set()
            await self._read_loop()
            if self.session.close_code is not None:
                # Let the writer flush the last frames (an error, ``shutdown``); it then closes.
                self._output.set()
                with contextlib.suppress(TimeoutError, Exception):
                    await asyncio.wait_for(asyncio.shield(writer), FLUSH_TIMEOUT)
        except Exception:
            log.exception("connection failed")
        finally:
            self.hub.disconnected(self)
            await self._release(self.session.close())
            # Acks, pushes... read before the close still happen (an ack the client sent before
            # closing must not leave its job leased until the lease expires).
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=FLUSH_TIMEOUT)
            for task in list(self._tasks):
                task.cancel()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            await self._close_socket()
            self._closed.set()

    async def shut_down(self, timeout: float = 5.0) -> None:
        """Graceful broker shutdown: ``shutdown`` frame, every held job returned, then close 1001."""
        self.session.shutdown()
        await self._release(self.session.close())
        self._output.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), timeout)

    async def _release(self, leases: list[Lease]) -> None:
        by_queue: dict[str, list[tuple[str, str]]] = {}
        for lease in leases:
            by_queue.setdefault(lease.queue, []).append((lease.id, lease.token))
        for queue, items in by_queue.items():
            await self.hub.release(queue, items)

    async def _close_socket(self) -> None:
        if self._socket_closed:
            return
        self._socket_closed = True
        code = int(self.session.close_code or CloseCode.NORMAL)
        with contextlib.suppress(Exception):
            await self.ws.close(code, self.session.close_reason or None)

    # -- reading ------------------------------------------------------------------------------------

    def _idle_limit(self) -> float | None:
        s = self.session
        holds_something = s.subscriptions or s.channels or s.watches
        return None if holds_something else self._idle_timeout

    async def _read_loop(self) -> None:
        while self.session.close_code is None:
            try:
                message = await asyncio.wait_for(self.ws.receive(), self._idle_limit())
            except TimeoutError:
                self.session.start_close(CloseCode.NORMAL, "idle timeout")
                return
            if message["type"] == "websocket.disconnect":
                self._socket_closed = True
                return
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            for cmd in self.session.receive(data):
                await self._execute(cmd)
            self._output.set()

    # -- executing commands ------------------------------------------------------------------------

    async def _execute(self, cmd: Command) -> None:
        match cmd:
            case Ack() | Nack():  # the credit it returned went to the feed already (Session.on_credit)
                await self._spawn(cmd, lambda: self._settle(cmd))
            case Push() | PushBatch() | Touch() | Progress() | Publish():
                await self._spawn(cmd, lambda: self._run_command(cmd))
            case Auth():
                self._authenticate(cmd)
            case _:
                # State changes the next frame depends on: done before it is read.
                await self._guarded(cmd, lambda: self._change(cmd))

    async def _change(self, cmd: Command) -> None:
        match cmd:
            case Subscribe():
                await self.runtime.queues.remember(cmd.queue)
                self.session.command_done(cmd)
                self.hub.subscribed(self, cmd.queue)
            case Unsubscribe():
                self.hub.unsubscribed(self, cmd.queue)
                await self._release(list(cmd.release))
                self.session.command_done(cmd)
            case Listen():
                await self.hub.listen(self, cmd.channel)
                self.session.command_done(cmd)
            case Unlisten():
                self.hub.unlisten(self, cmd.channel)
                self.session.command_done(cmd)
            case Watch() if cmd.topic is Topic.STATS:
                self.session.command_done(cmd)
                self.hub.watch_stats(self)
            case Watch():
                await self.hub.watch_events(self, cmd.queue)
                self.session.command_done(cmd)
            case Unwatch() if cmd.topic is Topic.STATS:
                self.hub.unwatch_stats(self)
                self.session.command_done(cmd)
            case Unwatch():
                self.hub.unwatch_events(self, cmd.queue)
                self.session.command_done(cmd)
            case _:  # pragma: no cover - every op is matched here or in _execute
                raise AssertionError(f"unhandled command {cmd!r}")

    def _authenticate(self, cmd: Auth) -> None:
        try:
            authorize = self._check_token(cmd.token) if self._check_token else None
        except BrokerError as exc:
            self.session.command_raised(cmd, exc)
            return
        self.session.authenticated(cmd, authorize)

    async def _spawn(self, cmd: Command, work: Callable[[], Awaitable[None]]) -> None:
        await self._pending.acquire()
        task = asyncio.create_task(self._guarded(cmd, work, self._pending.release))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(
        self, cmd: Command, work: Callable[[], Awaitable[None]], done: Callable[[], None] | None = None
    ) -> None:
        # ``work`` makes its coroutine only once running: a task cancelled before it starts leaves none behind.
        try:
            await work()
        except BrokerError as exc:
            self.session.command_raised(cmd, exc)
        except (RedisError, OSError) as exc:
            self.session.command_failed(cmd, ErrorCode.UNAVAILABLE, f"redis unavailable: {exc}")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("command %s failed", type(cmd).__name__)
            self.session.command_failed(cmd, ErrorCode.INTERNAL, "internal error")
        finally:
            if done is not None:
                done()
            self._output.set()

    async def _settle(self, cmd: Ack | Nack) -> None:
        queue = cmd.queue
        if isinstance(cmd, Ack):
            await self.runtime.ack(queue, cmd.id, cmd.token)
            self.session.command_done(cmd)
            self.hub.emit_events(queue, [(cmd.id, "acked", cmd.result_json)])
            return
        outcome = await self.runtime.queues.nack(queue, cmd.id, cmd.token, delay=cmd.delay, error=cmd.error or "")
        self.session.command_done(cmd)
        event = "dead" if outcome.outcome == "dead" else "nacked"
        self.hub.emit_events(queue, [(cmd.id, event, dumps({"error": cmd.error, "outcome": outcome.outcome}))])

    async def _run_command(self, cmd: Command) -> None:
        match cmd:
            case Push():
                settings = self.runtime.settings.queues
                opts = PushOptions(
                    priority=settings.default_priority if cmd.priority is None else cmd.priority,
                    delay=cmd.delay or 0.0,
                    ttl=cmd.ttl or 0.0,
                    uniq=cmd.uniq or "",
                    max_attempts=settings.max_attempts if cmd.max_attempts is None else cmd.max_attempts,
                )
                job_id = await self.runtime.push(cmd.queue, cmd.body_json, opts)
                self.session.command_done(cmd, job_id)
            case PushBatch():
                defaults = PushOptions(
                    priority=self.runtime.settings.queues.default_priority,
                    max_attempts=self.runtime.settings.queues.max_attempts,
                )
                ids = await self.runtime.push_batch(cmd.queue, cmd.bodies, defaults)
                self.session.command_done(cmd, ids)
            case Touch():
                await self.runtime.queues.touch(cmd.queue, cmd.id, cmd.token, cmd.lease or 0.0)
                self.session.command_done(cmd)
            case Progress():
                # Progress is a sign of life: it extends the lease like a touch.
                await self.runtime.queues.touch(cmd.queue, cmd.id, cmd.token, 0.0)
                self.session.command_done(cmd)
                self.hub.emit_events(cmd.queue, [(cmd.id, "progress", cmd.data_json)])
            case Publish():
                await self.hub.publish(cmd.channel, cmd.data_json)
                self.session.command_done(cmd)
            case _:  # pragma: no cover - every op is matched above or in _execute
                raise AssertionError(f"unhandled command {cmd!r}")

    # -- output -------------------------------------------------------------------------------------

    def deliver(self, job: Delivery) -> bool:
        """Called by the queue feed: queue a job frame; False if the session did not take it."""
        taken = self.session.deliver(job.queue, job.id, job.token, job.attempt, job.body)
        if taken:
            self._output.set()
        return taken

    def relay_message(self, channel: str, data: bytes) -> None:
        if self.session.message(channel, data):
            self._output.set()

    def relay_event(self, queue: str, job_id: str, event: str, data: bytes | None) -> None:
        if self.session.event(queue, job_id, event, data):
            self._output.set()

    def relay_stats(self, snapshot: bytes, queue: str | None) -> None:
        if self.session.stats(snapshot, queue):
            self._output.set()

    def tell_unavailable(self) -> None:
        now = time.monotonic()
        if now - self._unavailable_told >= UNAVAILABLE_EVERY:
            self._unavailable_told = now
            self.session.send_error(ErrorCode.UNAVAILABLE, "redis unavailable: deliveries resume when it is back")
            self._output.set()

    async def _write_loop(self) -> None:
        limit = self.session.limits.send_buffer
        # Whether the backlog reached the limit since the last time it drained below: the feeds saw
        # no credit then, and must hear when it comes back. The backlog only grows between two
        # writes, so its peak is what it is just before a write is subtracted.
        throttled = False
        while True:
            await self._output.wait()
            self._output.clear()
            frames = self.session.data_to_send()
            backlog = sum(len(f) for f in frames)
            self.session.set_send_backlog(backlog)
            for frame in frames:
                await self.ws.send({"type": "websocket.send", "text": frame.decode()})
                throttled = throttled or self.session.send_backlog >= limit
                backlog -= len(frame)
                self.session.set_send_backlog(backlog)
            if throttled and self.session.send_backlog < limit:
                throttled = False
                self.hub.all_credit_returned(self)
            if self.session.close_code is not None and not self.session.send_backlog:
                await self._close_socket()
                return
            # Drop the last batch before waiting: an idle connection would otherwise keep its last
            # frame alive, and orjson's output holds a 4 KB block whatever its length.
            frames, frame = [], b""
