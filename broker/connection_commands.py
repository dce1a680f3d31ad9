"""A connection's command execution: each command the session returns, run against the broker.

:class:`CommandExecution` sits between :class:`broker.connection.Connection` (lifecycle, reading)
and :class:`~broker.connection_output.ConnectionOutput` (the writer). Commands that need Redis
and return nothing the next frame depends on (push, ack, nack, touch, progress, publish) run
concurrently, bounded per connection (:data:`MAX_PENDING`; their replies may therefore overtake
each other). The most frequent, a single push and an ack, go to the runtime's coalescers with a
callback rather than in a task of their own (plain ones straight from the session, without a
command object: ``_sink_push`` / ``_sink_ack``); the others each run in a task. State changes
the next frame depends on (subscribe, listen, watch...) are done before it is read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from redis.exceptions import RedisError

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
from broker.connection_output import ConnectionOutput
from broker.errors import BrokerError
from broker.frames import ErrorCode
from broker.models import PushOptions, dumps
from broker.protocol import Authorize

if TYPE_CHECKING:
    from broker.connection import Connection
    from broker.runtime import Runtime

log = logging.getLogger("presque.connection")

MAX_PENDING = 1000  # commands of one connection running at once; beyond, reading pauses

AuthCheck = Callable[[str], Authorize | None]  # validates an ``auth`` token, raising Unauthorized


class CommandExecution(ConnectionOutput):
    """The command execution of a :class:`broker.connection.Connection`, whose constructor sets its state."""

    # Declared for the type checker only: no class attribute, so lookups stay as they were.
    runtime: Runtime
    _check_token: AuthCheck | None
    _pending: int
    _change_waiter: asyncio.Future[None] | None
    _tasks: set[asyncio.Task[None]]

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
        conn = cast("Connection", self)  # the hub knows connections by their whole class
        match cmd:
            case Subscribe():
                await self.runtime.queues.remember(cmd.queue)
                self.session.command_done(cmd)
                self.hub.subscribed(conn, cmd.queue)
            case Unsubscribe():
                self.hub.unsubscribed(conn, cmd.queue)
                await self._release(list(cmd.release))
                self.session.command_done(cmd)
            case Listen():
                await self.hub.listen(conn, cmd.channel)
                self.session.command_done(cmd)
            case Unlisten():
                self.hub.unlisten(conn, cmd.channel)
                self.session.command_done(cmd)
            case Watch() if cmd.topic is Topic.STATS:
                self.session.command_done(cmd)
                self.hub.watch_stats(conn)
            case Watch():
                await self.hub.watch_events(conn, cmd.queue)
                self.session.command_done(cmd)
            case Unwatch() if cmd.topic is Topic.STATS:
                self.hub.unwatch_stats(conn)
                self.session.command_done(cmd)
            case Unwatch():
                self.hub.unwatch_events(conn, cmd.queue)
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

    async def _release(self, leases: list[Lease]) -> None:
        by_queue: dict[str, list[tuple[str, str]]] = {}
        for lease in leases:
            by_queue.setdefault(lease.queue, []).append((lease.id, lease.token))
        for queue, items in by_queue.items():
            await self.hub.release(queue, items)


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
