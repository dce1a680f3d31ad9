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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from starlette.websockets import WebSocket

from broker.commands import (
    Ack,
    Auth,
    Command,
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
from broker.eager import start_eagerly
from broker.errors import BrokerError
from broker.frames import CloseCode, ErrorCode
from broker.models import Delivery, PushOptions, dumps
from broker.protocol import Authorize, Session
from broker.wsproto import EXTENSION, RECEIVE_BATCHED, RECEIVE_FRAMES, SEND_FRAMES

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

    # -- executing commands ------------------------------------------------------------------------

    def _push_or_ack_soon(self, cmd: Command) -> bool:
        """_execute's first case when it need not wait for room; False if not done here."""
        if self._tasks or self._pending >= MAX_PENDING or type(cmd) not in (Push, Ack):
            return False
        self._pending += 1
        self._hand_over(cmd)  # type: ignore[arg-type]  # a Push or an Ack: checked just above
        return True

    def _sink_push(self, ref: str | None, queue: str, body_json: bytes) -> bool:
        """A plain push from the session: _push_or_ack_soon and _hand_over, without a Push."""
        if self._tasks or self._pending >= MAX_PENDING:
            return False
        self._pending += 1
        runtime = self.runtime
        done = self._plain_pushed if ref is None else partial(self._plain_pushed, ref=ref)
        runtime.push_soon(queue, body_json, runtime.push_defaults, done)
        return True

    def _sink_ack(self, ref: str | None, queue: str, job_id: str, token: str) -> bool:
        """A plain ack from the session (its job already let go): as _sink_push, without an Ack."""
        if self._tasks or self._pending >= MAX_PENDING:
            return False
        self._pending += 1
        self.runtime.ack_soon(queue, job_id, token, partial(self._plain_acked, ref, queue, job_id))
        return True

    def _plain_pushed(self, result: str | BaseException, ref: str | None = None) -> None:
        try:
            if isinstance(result, BaseException):
                self._plain_failed(ref, result)
            else:
                self.session.plain_done(ref, result)
        except Exception as exc:
            self._plain_failed(ref, exc)
        self._finished()

    def _plain_acked(self, ref: str | None, queue: str, job_id: str, result: BaseException | None) -> None:
        try:
            if result is not None:
                self._plain_failed(ref, result)
            else:
                self.session.plain_done(ref)
                self.hub.emit_events(queue, [(job_id, "acked", None)])
        except Exception as exc:
            self._plain_failed(ref, exc)
        # Without a reply to send (no ref, no error) there is nothing for the writer to do.
        self._finished(wake=ref is not None or result is not None)

    def _plain_failed(self, ref: str | None, exc: BaseException) -> None:
        error = _error(exc, "plain push or ack")
        if error is not None:
            self.session.plain_failed(ref, *error)

    def _hand_over(self, cmd: Push | Ack) -> None:
        """A push or an ack, its room among the pending commands taken, to its coalescer."""
        if isinstance(cmd, Push):
            self.runtime.push_soon(cmd.queue, cmd.body_json, self._push_options(cmd), partial(self._pushed, cmd))
        else:
            self.runtime.ack_soon(cmd.queue, cmd.id, cmd.token, partial(self._acked, cmd))

    async def _execute(self, cmd: Command) -> None:
        match cmd:
            # With no task of this connection in flight, straight to the coalescer. Otherwise in a
            # task too, as they were: a task starts its Redis call a few loop turns after it is
            # made, and a progress or touch must not find its job already acked by a later frame.
            # An ack's or nack's credit reached the feed when the session read it (Session.on_credit).
            case Push() | Ack() if not self._tasks:
                await self._reserve()
                self._hand_over(cmd)
            case Ack():
                await self._spawn(cmd, lambda: self._ack(cmd))
            case Nack():
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

    # -- commands running concurrently: at most MAX_PENDING, beyond which reading pauses ---------

    async def _reserve(self) -> None:
        while self._pending >= MAX_PENDING:
            await self._next_change()
        self._pending += 1

    def _finished(self, wake: bool = True) -> None:
        self._pending -= 1
        waiter = self._change_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if wake:
            self._wake_writer()

    async def _next_change(self) -> None:
        self._change_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._change_waiter
        finally:
            self._change_waiter = None

    async def _drained(self) -> None:
        while self._pending:
            await self._next_change()

    async def _spawn(self, cmd: Command, work: Callable[[], Awaitable[None]]) -> None:
        await self._reserve()
        task = asyncio.create_task(self._guarded(cmd, work, self._finished))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(
        self, cmd: Command, work: Callable[[], Awaitable[None]], done: Callable[[], None] | None = None
    ) -> None:
        # ``work`` makes its coroutine only once running: a task cancelled before it starts leaves none behind.
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(cmd, exc)
        finally:
            if done is not None:
                done()
            self._wake_writer()

    def _failed(self, cmd: Command, exc: BaseException) -> None:
        """Answer a command that raised ``exc`` with its error frame (none if it was cancelled)."""
        error = _error(exc, type(cmd).__name__)
        if error is not None:
            self.session.command_failed(cmd, *error)

    def _push_options(self, cmd: Push) -> PushOptions:
        if cmd.priority is None and cmd.max_attempts is None and not (cmd.delay or cmd.ttl or cmd.uniq):
            return self.runtime.push_defaults
        settings = self.runtime.settings.queues
        return PushOptions(
            priority=settings.default_priority if cmd.priority is None else cmd.priority,
            delay=cmd.delay or 0.0,
            ttl=cmd.ttl or 0.0,
            uniq=cmd.uniq or "",
            max_attempts=settings.max_attempts if cmd.max_attempts is None else cmd.max_attempts,
        )

    def _pushed(self, cmd: Push, result: str | BaseException) -> None:
        try:
            if isinstance(result, BaseException):
                self._failed(cmd, result)
            else:
                self.session.command_done(cmd, result)
        except Exception as exc:
            self._failed(cmd, exc)
        self._finished()

    def _acked(self, cmd: Ack, result: BaseException | None) -> None:
        try:
            if isinstance(result, BaseException):
                self._failed(cmd, result)
            else:
                self._ack_done(cmd)
        except Exception as exc:
            self._failed(cmd, exc)
        self._finished()

    async def _ack(self, cmd: Ack) -> None:
        await self.runtime.ack(cmd.queue, cmd.id, cmd.token)
        self._ack_done(cmd)

    def _ack_done(self, cmd: Ack) -> None:
        self.session.command_done(cmd)
        self.hub.emit_events(cmd.queue, [(cmd.id, "acked", cmd.result_json)])

    async def _settle(self, cmd: Nack) -> None:
        queue = cmd.queue
        outcome = await self.runtime.queues.nack(queue, cmd.id, cmd.token, delay=cmd.delay, error=cmd.error or "")
        self.session.command_done(cmd)
        event = "dead" if outcome.outcome == "dead" else "nacked"
        self.hub.emit_events(queue, [(cmd.id, event, dumps({"error": cmd.error, "outcome": outcome.outcome}))])

    async def _run_command(self, cmd: Command) -> None:
        match cmd:
            case Push():
                job_id = await self.runtime.push(cmd.queue, cmd.body_json, self._push_options(cmd))
                self.session.command_done(cmd, job_id)
            case PushBatch():
                ids = await self.runtime.push_batch(cmd.queue, cmd.bodies, self.runtime.push_defaults)
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
        """Called by the queue feed: queue a job frame; False if the session did not take it.

        The feed calls :meth:`flush` once it has dealt all its jobs.
        """
        return self.session.deliver(job.queue, job.id, job.token, job.attempt, job.body)

    def flush(self) -> None:
        """Send what the session queued now, within the caller's step, unless a writer runs.

        Called after a deal: the job frames leave before whatever else the step does (the HTTP
        answer to the push whose call took them) and a loop turn sooner than a new writer task
        would send them. Nothing the writer does before its first wait calls back into this
        connection, so no second writer can start meanwhile.
        """
        if self._writer is None and not (self._ended or self._socket_closed):
            self._writer = start_eagerly(self._write_loop())

    def relay_message(self, channel: str, data: bytes) -> None:
        if self.session.message(channel, data):
            self._wake_writer()

    def relay_event(self, queue: str, job_id: str, event: str, data: bytes | None) -> None:
        if self.session.event(queue, job_id, event, data):
            self._wake_writer()

    def relay_stats(self, snapshot: bytes, queue: str | None) -> None:
        if self.session.stats(snapshot, queue):
            self._wake_writer()

    def tell_unavailable(self) -> None:
        now = time.monotonic()
        if now - self._unavailable_told >= UNAVAILABLE_EVERY:
            self._unavailable_told = now
            self.session.send_error(ErrorCode.UNAVAILABLE, "redis unavailable: deliveries resume when it is back")
            self._wake_writer()

    def _wake_writer(self) -> None:
        """Have the writer send what the session queued: at the next turn of the loop, once."""
        if self._writer is None and not (self._ended or self._socket_closed):
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        # Runs while there is output, then ends: an idle connection has no writer task.
        limit = self.session.limits.send_buffer
        # Whether the backlog reached the limit since the last time it drained below: the feeds saw
        # no credit then, and must hear when it comes back. The backlog only grows between two
        # writes, so its peak is what it is just before a write is subtracted.
        throttled = False
        # Under presque's own protocol (broker/wsproto.py) a batch of frames is one ASGI message
        # and one socket write; under any other, one ``websocket.send`` per frame.
        batched = EXTENSION in self.ws.scope.get("extensions", {})
        try:
            while frames := self.session.data_to_send():
                backlog = self.session.taken_bytes
                self.session.set_send_backlog(backlog)
                if batched:
                    # The raw ASGI send: Starlette's WebSocket.send refuses message types it does not know.
                    await self.ws._send({"type": SEND_FRAMES, "frames": frames})
                    throttled = throttled or self.session.send_backlog >= limit
                    self.session.set_send_backlog(0)
                else:
                    for frame in frames:
                        await self.ws.send({"type": "websocket.send", "text": frame.decode()})
                        throttled = throttled or self.session.send_backlog >= limit
                        backlog -= len(frame)
                        self.session.set_send_backlog(backlog)
                if throttled and self.session.send_backlog < limit:
                    throttled = False
                    self.hub.all_credit_returned(self)
            if self.session.close_code is not None:
                await self._close_socket()
        except Exception:
            # The socket is gone (or broken): write nothing more; the read loop hears the disconnect.
            self._socket_closed = True
            log.debug("writing to the WebSocket failed", exc_info=True)
        finally:
            self._writer = None


def _error(exc: BaseException, what: str) -> tuple[str, str, dict[str, Any] | None] | None:
    """The error frame's code, message and extra members for a command that raised ``exc``.

    None if it was cancelled: no reply then.
    """
    if isinstance(exc, BrokerError):
        return exc.code, exc.message, {k: v for k, v in exc.payload().items() if k != "error"}
    if isinstance(exc, RedisError | OSError):
        return ErrorCode.UNAVAILABLE, f"redis unavailable: {exc}", None
    if isinstance(exc, asyncio.CancelledError):
        return None
    log.error("command %s failed", what, exc_info=exc)
    return ErrorCode.INTERNAL, "internal error", None
