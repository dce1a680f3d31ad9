"""The state of a WebSocket session and its way out: subscriptions, credit, deliveries, output.

:class:`SessionCore` is the base of :class:`broker.protocol.Session` (see there for the call
order): everything one connection knows — its subscriptions with their credit and in-flight jobs,
its channels and watches, its authentication — and what goes out of it: the jobs and broadcasts
the I/O layer feeds in, the frames it takes, the close. The other parts of the session work on
this state: its input (``broker/protocol.py``), its plain fast lane (``broker/session_plain.py``)
and its command handling (``broker/session_commands.py``). Sans-I/O like them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from broker.commands import AckMode, Lease, Topic
from broker.frames import (
    CloseCode,
    Role,
    SessionLimits,
    encode,
    error_frame,
    event_frame,
    job_frame,
    message_frame,
    stats_frame,
)

if TYPE_CHECKING:
    from broker.session_plain import PlainAck, PlainPush

Authorize = Callable[[Role, str], bool]
"""``authorize(role, queue_or_channel) -> bool``, e.g. ``broker.config.AuthToken.allows``."""


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


class SessionCore:
    """The state every part of a :class:`broker.protocol.Session` works on, and its output side.

    Its constructor is the session's: see :class:`broker.protocol.Session` for its arguments.
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

    # --- in-flight jobs -----------------------------------------------------------------------

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
