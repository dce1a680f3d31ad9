"""The WebSocket session as a sans-I/O state machine: frames in, commands and frames out.

A :class:`Session` owns everything one connection knows — its subscriptions with their credit and
in-flight jobs, its channels and watches, its authentication — and nothing else: no socket, no
Redis, no clock. The I/O layer (``broker/delivery.py``) drives it:

1. every received frame goes to :meth:`Session.receive`, which answers protocol errors itself and
   returns the :data:`Command` objects to execute, in frame order;
2. the I/O layer executes each command against the queue service, in order, and reports the
   outcome with :meth:`Session.command_done` / :meth:`Session.command_failed` (or
   :meth:`Session.command_raised`; :meth:`Session.authenticated` for :class:`Auth`);
3. it feeds jobs and broadcasts in with :meth:`Session.deliver`, :meth:`Session.message`,
   :meth:`Session.stats`, :meth:`Session.event`, asking :meth:`Session.credit` how many jobs each
   subscription may take (:attr:`Session.on_credit` tells when a job it held let go) and reporting
   its socket backlog with :meth:`Session.set_send_backlog`;
4. after each of these calls it sends :meth:`Session.data_to_send` and, once
   :attr:`Session.close_code` is set, closes the socket with that code;
5. when the socket is gone it calls :meth:`Session.close` and returns the jobs it lists.

The two frames of every job, a plain push and a plain ack, may skip the command objects: with
:meth:`Session.set_plain_sink` the session hands them to the I/O layer as it reads them (a run
of frames at a time with :meth:`Session.receive_frames`), and the I/O layer reports their outcome
with :meth:`Session.plain_done` / :meth:`Session.plain_failed`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import orjson

from broker.commands import (
    Ack,
    AckMode,
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
from broker.errors import BrokerError
from broker.frames import (
    NAME_RE,
    CloseCode,
    ErrorCode,
    FrameError,
    Role,
    SessionLimits,
    decode,
    encode,
    error_frame,
    event_frame,
    job_frame,
    message_frame,
    parse,
    plain_ack,
    plain_push,
    pushed_frame,
    read_op,
    read_ref,
    stats_frame,
)

__all__ = ["Authorize", "Command", "Lease", "Session", "SessionLimits", "SessionState", "Subscription"]

Authorize = Callable[[Role, str], bool]
"""``authorize(role, queue_or_channel) -> bool``, e.g. ``broker.config.AuthToken.allows``."""

# The name authorize() is asked about for a watch on every queue (matched only by the glob "*").
ALL = "*"

# The I/O layer's fast lane for the two frames of every job (Session.set_plain_sink): a plain push
# ``(ref, queue, body_json)`` and a plain ack ``(ref, queue, job_id, token)``, already applied to
# the session. True if it took the frame; False to have it returned as a command as usual.
PlainPush = Callable[[str | None, str, bytes], bool]
PlainAck = Callable[[str | None, str, str, str], bool]


class SessionState(Enum):
    OPEN = "open"
    CLOSING = "closing"  # close_code is set: no more input or deliveries, flush and close
    CLOSED = "closed"  # close() was called: nothing is held any more


@dataclass(slots=True)
class Subscription:
    """One subscribed queue. ``in_flight`` maps job id to lease token (manual ack only)."""

    queue: str
    prefetch: int
    ack_mode: AckMode
    lease: float
    active: bool = False  # set when the I/O layer confirms the Subscribe command
    in_flight: dict[str, str] = field(default_factory=dict)


class Session:
    """The protocol state of one WebSocket connection.

    Not thread-safe; every method is synchronous and cheap. Invariants: a manual-ack
    subscription never holds more than ``prefetch`` jobs; every client frame with a ``ref`` gets
    exactly one reply; jobs held by the connection are only ever handed back through
    :meth:`close`, :class:`Unsubscribe` ``release``, or a ``False`` from :meth:`deliver`.

    Args:
        limits: per-connection limits.
        authorize: decides ``(role, name)``; None allows everything.
        auth_required: refuse every op but ``auth`` until :meth:`authenticated` is called.
    """

    def __init__(
        self,
        limits: SessionLimits | None = None,
        *,
        authorize: Authorize | None = None,
        auth_required: bool = False,
    ) -> None:
        self.limits = limits or SessionLimits()
        self._send_buffer = self.limits.send_buffer
        self.state = SessionState.OPEN
        self.close_code: CloseCode | None = None
        self.close_reason = ""
        self.dropped = 0  # ephemeral frames (message/stats/event) dropped under back-pressure
        # Called with the queue whenever a job leaves the in-flight set other than by closing or
        # unsubscribing (ack, nack, a touch refused as stale...), i.e. that queue's credit grew.
        self.on_credit: Callable[[str], None] | None = None
        self._authorize = authorize
        self._authenticated = not auth_required
        self._subs: dict[str, Subscription] = {}
        self._owner: dict[str, str] = {}  # job id -> queue, over every subscription
        self._channels: set[str] = set()
        self._watches: set[tuple[Topic, str | None]] = set()
        self._errors = 0
        self._backlog = 0
        self._out: list[bytes] = []
        self._out_bytes = 0
        self.taken_bytes = 0  # the size of the frames data_to_send returned last
        self._sink_push: PlainPush | None = None
        self._sink_ack: PlainAck | None = None
        self._credit_due: set[str] | None = None  # queues whose credit grew by a plain ack, not yet told
        self._valid_queue = ""  # the queue name a plain push last named, known to be valid

    # --- read-only views ----------------------------------------------------------------------

    @property
    def subscriptions(self) -> Mapping[str, Subscription]:
        return self._subs

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(self._channels)

    @property
    def watches(self) -> frozenset[tuple[Topic, str | None]]:
        return frozenset(self._watches)

    @property
    def is_authenticated(self) -> bool:
        return self._authenticated

    # --- input --------------------------------------------------------------------------------

    def receive(self, data: str | bytes) -> list[Command]:
        """Handle one client frame (``str`` for a text frame, ``bytes`` for a binary one).

        Returns:
            The commands to execute, in order (zero or one today). Protocol errors are answered
            here, and may set :attr:`close_code`. Frames received while closing are ignored.
        """
        if self.state is not SessionState.OPEN:
            return []
        if self._sink_push is not None and type(data) is str and 4 * len(data) <= self.limits.max_frame:
            # A text frame surely within max_frame (a str is at most 4 UTF-8 bytes a character).
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                obj = None  # the general path answers bad_json
            if type(obj) is dict:
                cmds = self._plain(obj)
                return self.receive_object(obj) if cmds is None else cmds
        # A str is at least len(data) UTF-8 bytes and at most 4 per character: encode only if unsure.
        size = len(data)
        if isinstance(data, str) and 4 * size > self.limits.max_frame:
            size = len(data.encode("utf-8", "surrogatepass"))
        if size > self.limits.max_frame:
            self._send(error_frame(ErrorCode.TOO_LARGE, f"frame of {size} bytes over max_frame", None))
            self.start_close(CloseCode.MESSAGE_TOO_BIG, "frame too big")
            return []
        ref = None
        try:
            obj = decode(data)
            ref = read_ref(obj)
            return self._handle(obj, ref)
        except FrameError as exc:
            self._protocol_error(exc, ref)
            return []

    def receive_frames(self, frames: Iterable[str | bytes]) -> Iterator[Command]:
        """:meth:`receive` each frame in turn, yielding the commands to execute.

        Execute each command before asking for the next: the frames after it are not read until
        then. Before each command and at the end, the credit of plain acks is told
        (:meth:`flush_credit`).
        """
        # receive()'s first case inlined: a run of plain pushes and acks costs one call, not one per frame.
        max_chars = self.limits.max_frame // 4
        loads, plain, open_ = orjson.loads, self._plain, SessionState.OPEN
        for data in frames:
            if self.state is not open_:
                break  # receive() would ignore the rest
            cmds: list[Command] | None = None
            if self._sink_push is not None and type(data) is str and len(data) <= max_chars:
                try:
                    obj = loads(data)
                except orjson.JSONDecodeError:
                    obj = None
                if type(obj) is dict:
                    cmds = plain(obj)
                    if cmds is None:
                        cmds = self.receive_object(obj)
            if cmds is None:
                cmds = self.receive(data)
            if cmds:
                self.flush_credit()
                yield from cmds
        self.flush_credit()

    def receive_object(self, obj: Mapping[str, Any]) -> list[Command]:
        """Like :meth:`receive` for a frame that is already a JSON object.

        For frames the I/O layer makes up, e.g. the implicit subscribe of ``/ws/{queue}``.
        """
        if self.state is not SessionState.OPEN:
            return []
        ref = None
        try:
            ref = read_ref(obj)
            return self._handle(obj, ref)
        except FrameError as exc:
            self._protocol_error(exc, ref)
            return []

    def set_plain_sink(self, push: PlainPush, ack: PlainAck) -> None:
        """Take plain pushes and acks (no option, no ``result``) straight to the I/O layer.

        :meth:`receive` then applies such a frame and hands it to ``push`` / ``ack`` rather than
        returning a command (it returns the command as usual when the sink answers False). The
        credit plain acks return reaches :attr:`on_credit` at :meth:`flush_credit`, once per queue:
        the I/O layer must call it after a run of frames, and before it waits for anything.
        """
        self._sink_push, self._sink_ack = push, ack

    def flush_credit(self) -> None:
        """Report to :attr:`on_credit` the queues whose credit plain acks returned since the last call."""
        due = self._credit_due
        if due:
            on_credit = self.on_credit
            if on_credit is not None:
                for queue in due:
                    on_credit(queue)
            due.clear()

    def _plain(self, obj: dict[str, Any]) -> list[Command] | None:
        # The two frames of every job in their plainest form, in one step: what _handle, parse and
        # _apply would do with them, without their dispatch. None for anything else, including
        # every invalid frame, which the general path then answers with its own errors.
        if not self._authenticated:
            return None
        # Members: op, the two checked below, and maybe ref; nothing else (len() costs less than
        # comparing the keys with a set, and says the same once those are there).
        size = len(obj)
        if size != 3 and (size != 4 or "ref" not in obj):
            return None
        op = obj.get("op")
        if op == "push":
            queue, ref = obj.get("queue"), obj.get("ref")
            if type(queue) is not str or "body" not in obj or not (ref is None or type(ref) is str):
                return None
            if queue != self._valid_queue:
                if NAME_RE.fullmatch(queue) is None:
                    return None
                self._valid_queue = queue
            if self._authorize is not None and not self._authorize("produce", queue):
                return None
            try:
                body = orjson.dumps(obj["body"])
            except TypeError:  # nested too deeply to write: the general path says so
                return None
            self._errors = 0
            assert self._sink_push is not None
            return [] if self._sink_push(ref, queue, body) else [plain_push(ref, queue, body)]
        if op == "ack":
            job_id, token, ref = obj.get("id"), obj.get("token"), obj.get("ref")
            if type(job_id) is not str or type(token) is not str or not (job_id and token):
                return None
            if not (ref is None or type(ref) is str):
                return None
            queue = self._owner.get(job_id)
            if queue is None:
                return None
            in_flight = self._subs[queue].in_flight
            if in_flight[job_id] != token:
                return None
            # As _apply's _forget, its credit reported at flush_credit.
            del self._owner[job_id]
            del in_flight[job_id]
            due = self._credit_due
            if due is None:
                self._credit_due = {queue}  # made on the first ack: an idle connection holds no set
            else:
                due.add(queue)
            self._errors = 0
            assert self._sink_ack is not None
            return [] if self._sink_ack(ref, queue, job_id, token) else [plain_ack(ref, queue, job_id, token)]
        return None

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

    def _drop_subscription(self, queue: str) -> list[Lease]:
        sub = self._subs.pop(queue)
        for job_id in sub.in_flight:
            del self._owner[job_id]
        return [Lease(queue, job_id, token) for job_id, token in sub.in_flight.items()]

    def _forget(self, job_id: str) -> None:
        queue = self._owner.pop(job_id)
        del self._subs[queue].in_flight[job_id]
        if self.on_credit is not None:
            self.on_credit(queue)

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

    def plain_done(self, ref: str | None, job_id: str | None = None) -> None:
        """:meth:`command_done` for a frame the plain sink took: a push's new ``job_id``, or an ack."""
        if job_id is not None:
            self._send(pushed_frame(job_id, ref))
        elif ref is not None:
            self._send(encode({"op": "ok", "ref": ref}))

    def plain_failed(self, ref: str | None, code: str, message: str, extra: Mapping[str, Any] | None = None) -> None:
        """:meth:`command_failed` for a frame the plain sink took (nothing to undo for those)."""
        self._send(error_frame(code, message, ref, extra))

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

    # --- credit and deliveries ----------------------------------------------------------------

    def set_send_backlog(self, nbytes: int) -> None:
        """Report how many bytes the socket still has to send (the transport's write buffer)."""
        self._backlog = max(0, nbytes)

    @property
    def send_backlog(self) -> int:
        """Bytes not yet on the wire: the reported socket backlog plus frames not yet taken."""
        return self._backlog + self._out_bytes

    def credit(self, queue: str) -> int:
        """How many more jobs the I/O layer may fetch and :meth:`deliver` on ``queue`` now.

        ``prefetch`` minus the jobs in flight for manual ack, ``prefetch`` for auto ack, and 0
        whenever the send backlog exceeds ``send_buffer`` (a slow reader pauses itself, never the
        queue), the queue is not (yet) subscribed, or the session is closing.
        """
        # Asked before every job dealt: send_backlog and limits.send_buffer inlined.
        sub = self._subs.get(queue)
        if sub is None or not sub.active or self.state is not SessionState.OPEN:
            return 0
        if self._backlog + self._out_bytes >= self._send_buffer:
            return 0
        if sub.ack_mode is AckMode.AUTO:
            return sub.prefetch
        return sub.prefetch - len(sub.in_flight)

    def credits(self) -> dict[str, int]:
        """:meth:`credit` of every confirmed subscription."""
        return {queue: self.credit(queue) for queue, sub in self._subs.items() if sub.active}

    def deliver(self, queue: str, job_id: str, token: str | None, attempt: int, body: bytes) -> bool:
        """Queue a ``job`` frame and, for manual ack, hold the job in flight under ``token``.

        Args:
            body: the job body exactly as stored (valid JSON), sent without re-encoding.

        Returns:
            False if the job was not taken — the queue is no longer subscribed (a fetch raced an
            unsubscribe), the session is closing, or a manual subscription is at its prefetch —
            and the I/O layer must hand it back to the queue. A job already in flight here
            (redelivered after its lease expired) is taken under its new token.

        Raises:
            ValueError: a manual-ack delivery without a token.
        """
        sub = self._subs.get(queue)
        if sub is None or not sub.active or self.state is not SessionState.OPEN:
            return False
        if sub.ack_mode is AckMode.AUTO:
            self._send(job_frame(queue, job_id, None, attempt, body))
            return True
        if token is None:
            raise ValueError("a manual-ack delivery needs a lease token")
        in_flight = sub.in_flight
        if job_id not in in_flight:
            if len(in_flight) >= sub.prefetch:
                return False
            if self._owner.get(job_id, queue) != queue:  # in flight here under another queue
                self._forget(job_id)
            self._owner[job_id] = queue
        in_flight[job_id] = token
        frame = job_frame(queue, job_id, token, attempt, body)
        self._out.append(frame)
        self._out_bytes += len(frame)
        return True

    def _ephemeral(self, frame: Callable[[], bytes]) -> bool:
        # Broadcasts are at-most-once: past the send buffer they are dropped, which keeps a slow
        # reader's memory bounded instead of queueing without limit.
        if self.send_backlog >= self.limits.send_buffer:
            self.dropped += 1
            return False
        self._send(frame())
        return True

    def message(self, channel: str, data_json: bytes) -> bool:
        """Queue a ``message`` frame if listening to ``channel``; False if not sent."""
        if self.state is not SessionState.OPEN or channel not in self._channels:
            return False
        return self._ephemeral(lambda: message_frame(channel, data_json))

    def stats(self, snapshot_json: bytes, queue: str | None = None) -> bool:
        """Queue a ``stats`` frame if watching stats of ``queue`` (None: broker-wide).

        ``snapshot_json`` is a JSON object without an ``op`` member; its members are spliced in.
        """
        if self.state is not SessionState.OPEN or (Topic.STATS, queue) not in self._watches:
            return False
        return self._ephemeral(lambda: stats_frame(snapshot_json))

    def event(self, queue: str, job_id: str, event: str, data_json: bytes | None = None) -> bool:
        """Queue an ``event`` frame if watching events of ``queue`` or of every queue."""
        if self.state is not SessionState.OPEN:
            return False
        if (Topic.EVENTS, queue) not in self._watches and (Topic.EVENTS, None) not in self._watches:
            return False
        return self._ephemeral(lambda: event_frame(queue, job_id, event, data_json))

    def send_error(self, code: str, message: str) -> None:
        """Queue an unsolicited ``error`` frame (``ref`` null), e.g. ``unavailable`` while Redis is down."""
        self._send(error_frame(code, message, None))

    # --- output and closing -------------------------------------------------------------------

    def _send(self, frame: bytes) -> None:
        self._out.append(frame)
        self._out_bytes += len(frame)

    def data_to_send(self) -> list[bytes]:
        """Take the frames queued since the last call, each one UTF-8 JSON text frame, in order."""
        out, self._out = self._out, []
        self.taken_bytes, self._out_bytes = self._out_bytes, 0
        return out

    def start_close(self, code: CloseCode, reason: str = "") -> None:
        """Ask the I/O layer to close with ``code`` once it has sent :meth:`data_to_send`.

        Only the first call counts. Deliveries and input stop at once.
        """
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        if self.state is SessionState.OPEN:
            self.state = SessionState.CLOSING

    def shutdown(self) -> None:
        """Graceful broker shutdown: queue ``{"op":"shutdown"}`` and close with 1001."""
        if self.state is SessionState.OPEN:
            self._send(encode({"op": "shutdown"}))
        self.start_close(CloseCode.GOING_AWAY, "server shutting down")

    def close(self) -> list[Lease]:
        """The connection is gone: forget everything and return the jobs to hand back at once.

        Idempotent; the second call returns an empty list.
        """
        self.state = SessionState.CLOSED
        leases: list[Lease] = []
        for queue in list(self._subs):
            leases += self._drop_subscription(queue)
        self._channels.clear()
        self._watches.clear()
        return leases


def _watch_name(key: tuple[Topic, str | None]) -> str:
    topic, queue = key
    return f"{topic.value} of {queue!r}" if queue is not None else f"{topic.value} of every queue"
