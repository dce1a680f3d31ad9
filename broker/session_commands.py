"""Command handling of a WebSocket session: what a client frame becomes, and the reply to its outcome.

:class:`CommandHandling` is the general path of :class:`broker.protocol.Session`: it parses a
frame into a :data:`~broker.commands.Command`, checks the client may run it, applies at once the
state change it implies (so that the next frame sees it) and answers protocol errors; then it
queues the reply to the outcome the I/O layer reports (:meth:`~CommandHandling.command_done`,
:meth:`~CommandHandling.command_failed`, :meth:`~CommandHandling.command_raised`,
:meth:`~CommandHandling.authenticated`). Sans-I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from broker.commands import (
    Ack,
    Auth,
    Command,
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
from broker.errors import BrokerError
from broker.frames import (
    CloseCode,
    ErrorCode,
    FrameError,
    Role,
    encode,
    error_frame,
    parse,
    pushed_frame,
    read_op,
)
from broker.session_core import Authorize, SessionCore, Subscription

# The name authorize() is asked about for a watch on every queue (matched only by the glob "*").
ALL = "*"


class CommandHandling(SessionCore):
    """The general path of a :class:`broker.protocol.Session`: commands in, replies out."""

    def _handle(self, obj: Mapping[str, Any], ref: str | None) -> list[Command]:
        op = read_op(obj)
        if not self._authenticated and op != "auth":
            raise FrameError(ErrorCode.FORBIDDEN, f"authenticate first: send an auth frame before {op}")
        cmd = parse(op, obj, ref, self.limits, self._locate)
        self._check_allowed(cmd)
        cmd = self._apply(cmd)
        self._errors = 0
        return [cmd]

    def _locate(self, job_id: str, token: str) -> str:
        queue = self._owner.get(job_id)
        if queue is None:
            raise FrameError(ErrorCode.UNKNOWN_JOB, f"job {job_id[:64]!r} is not in flight on this connection")
        if self._subs[queue].in_flight[job_id] != token:
            raise FrameError(ErrorCode.STALE_TOKEN, f"stale token for job {job_id[:64]!r}: it was delivered again")
        return queue

    def _check_allowed(self, cmd: Command) -> None:
        if self._authorize is None:
            return
        role: Role
        match cmd:
            case Subscribe(queue=name) | Listen(channel=name):
                role = "consume"
            case Push(queue=name) | PushBatch(queue=name) | Publish(channel=name):
                role = "produce"
            case Watch(queue=queue):
                role, name = "admin", ALL if queue is None else queue
            case _:
                # Job ops were allowed by their subscribe; un-ops and auth give nothing away.
                return
        if not self._authorize(role, name):
            raise FrameError(ErrorCode.FORBIDDEN, f"not allowed to {role} on {name!r}")

    def _apply(self, cmd: Command) -> Command:
        """Change the state a command implies at once, so the next frame sees it."""
        match cmd:
            case Subscribe():
                if cmd.queue in self._subs:
                    raise FrameError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {cmd.queue!r}")
                if len(self._subs) >= self.limits.max_subscriptions:
                    raise FrameError(ErrorCode.TOO_MANY, f"more than max_subscriptions {self.limits.max_subscriptions}")
                self._subs[cmd.queue] = Subscription(cmd.queue, cmd.prefetch, cmd.ack_mode, cmd.lease)
            case Unsubscribe():
                if cmd.queue not in self._subs:
                    raise FrameError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {cmd.queue!r}")
                return replace(cmd, release=tuple(self._drop_subscription(cmd.queue)))
            case Ack() | Nack():
                # Credit returns as soon as the client lets go of the job, before Redis confirms:
                # waiting a round trip per ack would cap throughput at prefetch / RTT. A failed
                # ack loses nothing: the job stays leased in Redis and returns when it expires.
                self._forget(cmd.id)
            case Listen():
                if cmd.channel in self._channels:
                    raise FrameError(ErrorCode.ALREADY_SUBSCRIBED, f"already listening to {cmd.channel!r}")
                if len(self._channels) >= self.limits.max_channels:
                    raise FrameError(ErrorCode.TOO_MANY, f"more than max_channels {self.limits.max_channels}")
                self._channels.add(cmd.channel)
            case Unlisten():
                if cmd.channel not in self._channels:
                    raise FrameError(ErrorCode.NOT_SUBSCRIBED, f"not listening to {cmd.channel!r}")
                self._channels.discard(cmd.channel)
            case Watch():
                key = (cmd.topic, cmd.queue)
                if key in self._watches:
                    raise FrameError(ErrorCode.ALREADY_SUBSCRIBED, f"already watching {_watch_name(key)}")
                if len(self._watches) >= self.limits.max_watches:
                    raise FrameError(ErrorCode.TOO_MANY, f"more than max_watches {self.limits.max_watches}")
                self._watches.add(key)
            case Unwatch():
                key = (cmd.topic, cmd.queue)
                if key not in self._watches:
                    raise FrameError(ErrorCode.NOT_SUBSCRIBED, f"not watching {_watch_name(key)}")
                self._watches.discard(key)
            case _:
                pass
        return cmd

    def _protocol_error(self, exc: FrameError, ref: str | None) -> None:
        self._send(error_frame(exc.code, exc.message, ref))
        self._errors += 1
        if self._errors > self.limits.max_errors:
            self.start_close(CloseCode.POLICY_VIOLATION, "too many protocol errors")

    # --- command outcomes ---------------------------------------------------------------------

    def command_done(self, cmd: Command, result: str | list[str] | None = None) -> None:
        """Report that ``cmd`` succeeded and queue its reply.

        Call it for a :class:`Subscribe` before delivering on that queue, so that ``subscribed``
        precedes the first ``job``; likewise for :class:`Listen` / :class:`Watch`.

        Args:
            cmd: a command :meth:`receive` returned (not :class:`Auth`: see :meth:`authenticated`).
            result: the new job id for :class:`Push`, the list of ids for :class:`PushBatch`,
                None otherwise.
        """
        if type(cmd) is Push and type(result) is str:
            # The reply to nearly every push: as the general path below encodes it, from a template.
            self._send(pushed_frame(result, cmd.ref))
            return
        reply: dict[str, Any]
        match cmd:
            case Subscribe():
                sub = self._subs.get(cmd.queue)
                if sub is not None:
                    sub.active = True
                reply = {"op": "subscribed", "queue": cmd.queue, "prefetch": cmd.prefetch}
                reply |= {"ack": cmd.ack_mode.value, "lease": cmd.lease}
            case Unsubscribe():
                reply = {"op": "unsubscribed", "queue": cmd.queue}
            case Listen():
                reply = {"op": "listening", "channel": cmd.channel}
            case Unlisten():
                reply = {"op": "unlistened", "channel": cmd.channel}
            case Watch() | Unwatch():
                reply = {"op": "watching" if isinstance(cmd, Watch) else "unwatched", "topic": cmd.topic.value}
                if cmd.queue is not None:
                    reply["queue"] = cmd.queue
            case Push():
                if not isinstance(result, str):
                    raise TypeError("command_done(Push) needs the new job id as result")
                reply = {"op": "pushed", "id": result}
            case PushBatch():
                if not isinstance(result, list):
                    raise TypeError("command_done(PushBatch) needs the list of job ids as result")
                reply = {"op": "pushed", "ids": result}
            case Auth():
                raise TypeError("confirm Auth with authenticated(cmd, authorize)")
            case _:
                # ack, nack, touch, progress, publish: silent unless the client asked with a ref.
                if cmd.ref is not None:
                    self._send(encode({"op": "ok", "ref": cmd.ref}))
                return
        if cmd.ref is not None:
            reply["ref"] = cmd.ref
        self._send(encode(reply))

    def command_failed(self, cmd: Command, code: str, message: str, extra: Mapping[str, Any] | None = None) -> None:
        """Report that ``cmd`` failed: undo what :meth:`receive` assumed and queue an ``error``.

        A failed :class:`Subscribe`, :class:`Listen` or :class:`Watch` is forgotten; a failed
        :class:`Unsubscribe` still leaves the queue unsubscribed (its released jobs return by
        lease expiry). A failed :class:`Auth` is always reported as ``forbidden``. A
        :class:`Touch` or :class:`Progress` refused as ``stale_token`` or ``unknown_job`` drops
        the job from the in-flight set: it is no longer this connection's.

        Args:
            cmd: a command :meth:`receive` returned.
            code: an :class:`ErrorCode` value (or another snake_case code from ``broker.errors``).
            message: human-readable, names the problem.
            extra: more members for the error frame, e.g. ``{"id": existing_id}`` for ``job_exists``.
        """
        match cmd:
            case Subscribe():
                sub = self._subs.get(cmd.queue)
                if sub is not None and not sub.active:
                    del self._subs[cmd.queue]
            case Listen():
                self._channels.discard(cmd.channel)
            case Watch():
                self._watches.discard((cmd.topic, cmd.queue))
            case Auth():
                # A refused token is forbidden on the wire whatever the I/O layer raised
                # (Unauthorized, ...): clients such as web/presque.js stop retrying on that code.
                code = ErrorCode.FORBIDDEN
            case Touch() | Progress() if code in (ErrorCode.STALE_TOKEN, ErrorCode.UNKNOWN_JOB):
                sub = self._subs.get(cmd.queue)
                if sub is not None and sub.in_flight.get(cmd.id) == cmd.token:
                    self._forget(cmd.id)
            case _:
                pass
        self._send(error_frame(code, message, cmd.ref, extra))

    def command_raised(self, cmd: Command, exc: BrokerError) -> None:
        """:meth:`command_failed` with the code, message and payload of a :class:`BrokerError`."""
        extra = {k: v for k, v in exc.payload().items() if k != "error"}
        self.command_failed(cmd, exc.code, exc.message, extra)

    def authenticated(self, cmd: Auth, authorize: Authorize | None) -> None:
        """Confirm an :class:`Auth` command: the token is valid and grants ``authorize``.

        From now on every op is allowed subject to ``authorize`` (None allows everything). The
        I/O layer must call this (or :meth:`command_failed`, sent as ``forbidden``) before it feeds
        the next frame, since frames after ``auth`` are refused until it does.
        """
        self._authenticated = True
        self._authorize = authorize
        if cmd.ref is not None:
            self._send(encode({"op": "ok", "ref": cmd.ref}))


def _watch_name(key: tuple[Topic, str | None]) -> str:
    topic, queue = key
    return f"{topic.value} of {queue!r}" if queue is not None else f"{topic.value} of every queue"
