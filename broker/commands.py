"""The commands of the WebSocket protocol: one frozen dataclass per client op, as parsed from a frame.

:func:`broker.frames.parse` builds them; :class:`broker.protocol.Session` acts on them. No I/O,
no validation (the parser validates): these are the vocabulary both sides share, and
``docs/protocol.md`` documents every field.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple


class AckMode(StrEnum):
    MANUAL = "manual"
    AUTO = "auto"


class Topic(StrEnum):
    STATS = "stats"
    EVENTS = "events"


class Lease(NamedTuple):
    """A job held unacked by a connection: what the I/O layer hands back to the queue."""

    queue: str
    id: str
    token: str


# Commands: one frozen dataclass per client op, in the order the frames arrived. ``ref`` is the
# client's correlation string, echoed in the reply; job payloads are compact JSON bytes.


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe:
    ref: str | None = None
    queue: str
    prefetch: int
    ack_mode: AckMode
    lease: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe:
    """``release``: the jobs this connection held on the queue, to return to it at once."""

    ref: str | None = None
    queue: str
    release: tuple[Lease, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    ref: str | None = None
    queue: str
    id: str
    token: str
    result_json: bytes | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Nack:
    ref: str | None = None
    queue: str
    id: str
    token: str
    delay: float | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Touch:
    """``lease``: new lease length in seconds; None keeps the one the job was delivered with."""

    ref: str | None = None
    queue: str
    id: str
    token: str
    lease: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    ref: str | None = None
    queue: str
    id: str
    token: str
    data_json: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Push:
    """Optional fields are None when the frame leaves them out: the queue service's defaults apply."""

    ref: str | None = None
    queue: str
    body_json: bytes
    priority: int | None = None
    delay: float | None = None
    uniq: str | None = None
    ttl: float | None = None
    max_attempts: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PushBatch:
    ref: str | None = None
    queue: str
    bodies: tuple[bytes, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish:
    ref: str | None = None
    channel: str
    data_json: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Listen:
    ref: str | None = None
    channel: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Unlisten:
    ref: str | None = None
    channel: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Watch:
    """``queue`` None: the broker-wide feed of that topic."""

    ref: str | None = None
    topic: Topic
    queue: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Unwatch:
    ref: str | None = None
    topic: Topic
    queue: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth:
    ref: str | None = None
    token: str


Command = (
    Subscribe
    | Unsubscribe
    | Ack
    | Nack
    | Touch
    | Progress
    | Push
    | PushBatch
    | Publish
    | Listen
    | Unlisten
    | Watch
    | Unwatch
    | Auth
)
JobCommand = Ack | Nack | Touch | Progress

OPS = frozenset("subscribe unsubscribe ack nack touch progress push publish listen unlisten watch unwatch auth".split())
