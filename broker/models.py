"""Jobs and the values that travel with them: validation, ids, JSON codec, payload types.

No I/O here. The job *metadata* lives in Redis as a compact JSON array (``presque:{q}:meta``),
read and written by the Lua scripts; :class:`Meta` names its slots so Python and Lua agree.
"""

from __future__ import annotations

import enum
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import orjson

from broker.errors import BadJSON, BadQueueName, BadRequest

QUEUE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
MIN_PRIORITY = 0
MAX_PRIORITY = 9


class JobState(enum.StrEnum):
    """Where a job is. Acked, destructively fetched, purged or deleted jobs no longer exist."""

    READY = "ready"
    DELAYED = "delayed"
    LEASED = "leased"
    DEAD = "dead"


class Meta(enum.IntEnum):
    """1-based slots of the metadata array kept per job (Lua indexes from 1)."""

    PRIORITY = 1
    SEQ = 2
    ATTEMPT = 3  # deliveries so far, the first is attempt 1 (a leased job's own is in its lease entry)
    FAILURES = 4  # nacks and lease expiries; compared with MAX_ATTEMPTS
    MAX_ATTEMPTS = 5
    CREATED_AT = 6
    RUN_AT = 7  # when the job became (or becomes) ready
    TTL = 8  # 0 = none; counts from RUN_AT
    UNIQ = 9  # "" = none
    TOKEN = 10  # "": leases are in the ``lease`` hash; only one taken before it existed is here
    LEASE = 11  # seconds of such a lease
    LAST_ERROR = 12
    FAILED_AT = 13  # when it went to the dead-letter list


def validate_queue(name: str) -> str:
    """Return ``name`` if it is a valid queue (or channel) name, else raise BadQueueName."""
    if not QUEUE_NAME_RE.fullmatch(name):
        raise BadQueueName(
            f"invalid queue name {name[:140]!r}: "
            "1-128 characters of A-Z a-z 0-9 _ . : -, starting with a letter or digit"
        )
    return name


# Ids: 11 hex digits of milliseconds (sorts by time until the year 2527), then 10 random hex
# digits. Ids only need to be unique, URL-safe and roughly time-ordered, not secret (lease
# tokens are the secret), so a fast PRNG seeded from the OS is enough.
_id_random = random.Random(os.urandom(16))


def new_job_id() -> str:
    """A new unique, URL-safe, roughly time-ordered job id."""
    return f"{int(time.time() * 1000):011x}{_id_random.getrandbits(40):010x}"


def new_token_prefix() -> str:
    """An unguessable prefix for the lease tokens of one fetch call (the script appends an index)."""
    return os.urandom(9).hex()


def parse_json(data: bytes | str) -> Any:
    """Decode JSON, raising BadJSON with the parser's reason."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadJSON(f"invalid JSON: {exc}") from None


def dumps(value: Any) -> bytes:
    """Compact JSON bytes."""
    return orjson.dumps(value)


def encode_json(value: Any, what: str = "JSON") -> bytes:
    """Compact JSON bytes of a value decoded from a client's input.

    Raises:
        BadJSON: nested more than 254 levels deep, which orjson reads (up to 1024) but cannot
            write: without this, such input would fail later as an internal error.
    """
    try:
        return orjson.dumps(value)
    except TypeError:
        raise BadJSON(f"{what} is nested too deeply (at most 254 levels)") from None


def check_json_body(data: bytes) -> bytes:
    """Validate that ``data`` is JSON and return it unchanged (a push stores bodies byte for byte)."""
    if not data.strip():
        raise BadJSON("empty body: a job body must be JSON")
    parse_json(data)
    return data


@dataclass(frozen=True, slots=True)
class PushOptions:
    """Per-job push options, already validated. ``delay`` is relative seconds from now."""

    priority: int = 5
    delay: float = 0.0
    ttl: float = 0.0
    uniq: str = ""
    max_attempts: int = 5


@dataclass(frozen=True, slots=True)
class Delivery:
    """A job handed to a consumer. ``token`` is None for destructive (auto-ack) fetches."""

    id: str
    queue: str
    body: bytes
    attempt: int
    token: str | None
    latency: float  # seconds from ready to delivery


@dataclass(frozen=True, slots=True)
class JobView:
    """A job's state as ``GET /j/{queue}/{id}`` shows it."""

    id: str
    queue: str
    state: JobState
    attempt: int
    priority: int
    created_at: float
    run_at: float
    last_error: str | None
    body: bytes
    failures: int
    max_attempts: int

    def to_json(self) -> bytes:
        """The HTTP representation, with the body spliced in as raw JSON."""
        head = dumps(
            {
                "id": self.id,
                "queue": self.queue,
                "state": self.state.value,
                "attempt": self.attempt,
                "priority": self.priority,
                "created_at": self.created_at,
                "run_at": self.run_at,
                "last_error": self.last_error,
                "failures": self.failures,
                "max_attempts": self.max_attempts,
            }
        )
        return head[:-1] + b',"body":' + self.body + b"}"


@dataclass(frozen=True, slots=True)
class DeadJob:
    """An entry of the dead-letter list."""

    id: str
    body: bytes
    attempt: int
    last_error: str | None
    failed_at: float


COUNTERS = ("pushed", "processed", "failed", "retried", "dead_lettered", "expired")


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """Sizes and counters of one queue (one atomic snapshot)."""

    queue: str
    ready: int
    delayed: int
    leased: int
    dead: int
    paused: bool
    counters: dict[str, int]
    oldest_run_at: float | None
    now: float

    def presque_json(self) -> dict[str, Any]:
        """``GET /j/{queue}``: presque's fields plus ours."""
        c = self.counters
        return {
            "queue_name": self.queue,
            "job_count": self.ready,
            "job_failed": c["failed"],
            "job_processed": c["processed"],
            "ready": self.ready,
            "delayed": self.delayed,
            "leased": self.leased,
            "dead": self.dead,
            "paused": self.paused,
            **{name: c[name] for name in ("pushed", "retried", "expired", "dead_lettered")},
        }


def parse_priority(value: Any) -> int:
    """A priority 0-9 from a query string or frame value."""
    try:
        priority = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"priority must be an integer 0-9, got {value!r}") from None
    if isinstance(value, float) or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise BadRequest(f"priority must be an integer 0-9, got {value!r}")
    return priority
