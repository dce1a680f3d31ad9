"""The WebSocket wire format: codes, limits, frame parsing into commands, and server frame encoding.

No state and no I/O: :class:`broker.protocol.Session` calls :func:`decode` and :func:`parse` on
every client frame and the ``*_frame`` encoders for everything it sends. ``docs/protocol.md``
documents every frame and code defined here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from enum import IntEnum, StrEnum
from typing import Any, Literal

import orjson

from broker.commands import (
    OPS,
    Ack,
    AckMode,
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

# Same rule as HTTP queue names (issue 2); channels follow it too.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
MAX_PRIORITY = 9
MAX_ATTEMPTS = 1_000_000
# Delays and ttls beyond ~31 years are surely mistakes, and unbounded floats would overflow the
# Redis scores that hold run times.
MAX_SECONDS = 1e9


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` frame. Every member is documented in docs/protocol.md."""

    BAD_JSON = "bad_json"
    BAD_FRAME = "bad_frame"
    UNKNOWN_OP = "unknown_op"
    BAD_FIELD = "bad_field"
    BAD_QUEUE = "bad_queue"
    UNKNOWN_JOB = "unknown_job"
    STALE_TOKEN = "stale_token"
    TOO_LARGE = "too_large"
    TOO_MANY = "too_many"
    FORBIDDEN = "forbidden"
    NOT_SUBSCRIBED = "not_subscribed"
    ALREADY_SUBSCRIBED = "already_subscribed"
    JOB_EXISTS = "job_exists"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class CloseCode(IntEnum):
    """WebSocket close codes the broker uses (RFC 6455 section 7.4)."""

    NORMAL = 1000  # idle timeout
    GOING_AWAY = 1001  # graceful shutdown
    POLICY_VIOLATION = 1008  # abuse: too many consecutive protocol errors
    MESSAGE_TOO_BIG = 1009  # a frame over max_frame
    TRY_AGAIN_LATER = 1013  # connection limit reached


# What an authorization hook is asked about, for one queue or channel name (the same literal
# type as broker.config.Role, so that ``AuthToken.allows`` plugs straight in).
Role = Literal["produce", "consume", "admin"]


class JobEvent(StrEnum):
    """Kinds of job lifecycle events sent to ``events`` watchers."""

    PUSHED = "pushed"
    DELIVERED = "delivered"
    ACKED = "acked"
    NACKED = "nacked"
    DEAD = "dead"
    PROGRESS = "progress"


class FrameError(Exception):
    """A client frame the session refuses; becomes an ``error`` frame, never leaves the session."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Per-connection limits; the I/O layer maps the broker settings onto this.

    Attributes:
        max_frame: largest client frame in bytes; beyond it the connection closes with 1009.
        max_subscriptions: queues one connection may subscribe to.
        max_channels: channels one connection may listen to.
        max_watches: stats/events feeds one connection may watch.
        max_prefetch: largest ``prefetch`` a subscribe may ask for.
        default_prefetch: ``prefetch`` when the subscribe frame has none.
        default_lease: ``lease`` (seconds) when the subscribe frame has none.
        max_lease: largest ``lease`` a subscribe or touch may ask for.
        max_batch: most jobs in one ``push`` with ``jobs``.
        send_buffer: outbound bytes beyond which deliveries pause and ephemeral frames are dropped.
        max_errors: consecutive protocol errors tolerated; one more closes with 1008.
    """

    max_frame: int = 1_048_576
    max_subscriptions: int = 100
    max_channels: int = 100
    max_watches: int = 100
    max_prefetch: int = 1000
    default_prefetch: int = 10
    default_lease: float = 30.0
    max_lease: float = 3600.0
    max_batch: int = 1000
    send_buffer: int = 262_144
    max_errors: int = 100

    def __post_init__(self) -> None:
        if not 1 <= self.default_prefetch <= self.max_prefetch:
            raise ValueError("default_prefetch must be between 1 and max_prefetch")
        if not 0 < self.default_lease <= self.max_lease:
            raise ValueError("default_lease must be above 0 and at most max_lease")
        for name in ("max_frame", "max_subscriptions", "max_channels", "max_watches", "max_batch", "send_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_errors < 0:
            raise ValueError("max_errors must be at least 0")


# Finds which queue holds job ``id`` on this connection, or raises FrameError
# (unknown_job / stale_token): ack-like frames carry no queue.
Locate = Callable[[str, str], str]


# --- decoding client frames ---------------------------------------------------------------------


def decode(data: str | bytes) -> dict[str, Any]:
    """Decode one text frame into its JSON object.

    Raises:
        FrameError: ``bad_frame`` for a binary frame or a non-object, ``bad_json`` for bad JSON.
    """
    if not isinstance(data, str):
        raise FrameError(ErrorCode.BAD_FRAME, "binary frames are not supported: send JSON in a text frame")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise FrameError(ErrorCode.BAD_JSON, f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError(ErrorCode.BAD_FRAME, "a frame must be a JSON object")
    return obj


def read_ref(obj: Mapping[str, Any]) -> str | None:
    ref = obj.get("ref")
    if ref is None or isinstance(ref, str):
        return ref
    raise FrameError(ErrorCode.BAD_FIELD, "ref must be a string")


def read_op(obj: Mapping[str, Any]) -> str:
    op = obj.get("op")
    if not isinstance(op, str):
        raise FrameError(ErrorCode.BAD_FIELD, "op is required and must be a string")
    if op not in OPS:
        raise FrameError(ErrorCode.UNKNOWN_OP, f"unknown op {op[:64]!r}")
    return op


def parse(op: str, obj: Mapping[str, Any], ref: str | None, limits: SessionLimits, locate: Locate) -> Command:
    """Validate the fields of a frame whose ``op`` :func:`read_op` accepted and build its command.

    Unknown fields are ignored, so that newer clients can talk to older brokers.

    Raises:
        FrameError: the first field that is missing, mistyped or out of range.
    """
    # The two frames of every job, ``push`` of one body and ``ack``, in their plainest form: the
    # same command as the general path at a fraction of the checks. Anything else, including
    # every invalid frame, takes the general path, so errors are its errors.
    if op == "push":
        if obj.keys() <= _PLAIN_PUSH and "body" in obj:
            queue = obj.get("queue")
            if type(queue) is str and NAME_RE.fullmatch(queue) is not None:
                return plain_push(ref, queue, _encode(obj["body"], "body"))
    elif op == "ack" and obj.keys() <= _PLAIN_ACK:
        job_id, token = obj.get("id"), obj.get("token")
        if type(job_id) is str and job_id and type(token) is str and token:
            return plain_ack(ref, locate(job_id, token), job_id, token)
    return _parse(op, obj, ref, limits, locate)


_PLAIN_PUSH = frozenset(("op", "ref", "queue", "body"))
_PLAIN_ACK = frozenset(("op", "ref", "id", "token"))

# A frozen dataclass's __init__ sets each field through ``object.__setattr__``: 3-4 µs for a
# Push's eight. The slots' own descriptors set them for a third of that; the result is the same
# object (tests/test_frames.py compares them with the constructor's, so a new field fails there).
_new = object.__new__
_push_slots = tuple(Push.__dict__[f.name].__set__ for f in fields(Push))
_ack_slots = tuple(Ack.__dict__[f.name].__set__ for f in fields(Ack))


def plain_push(ref: str | None, queue: str, body_json: bytes) -> Push:
    cmd: Push = _new(Push)
    s_ref, s_queue, s_body, s_priority, s_delay, s_uniq, s_ttl, s_attempts = _push_slots
    s_ref(cmd, ref)
    s_queue(cmd, queue)
    s_body(cmd, body_json)
    s_priority(cmd, None)
    s_delay(cmd, None)
    s_uniq(cmd, None)
    s_ttl(cmd, None)
    s_attempts(cmd, None)
    return cmd


def plain_ack(ref: str | None, queue: str, job_id: str, token: str) -> Ack:
    cmd: Ack = _new(Ack)
    s_ref, s_queue, s_id, s_token, s_result = _ack_slots
    s_ref(cmd, ref)
    s_queue(cmd, queue)
    s_id(cmd, job_id)
    s_token(cmd, token)
    s_result(cmd, None)
    return cmd


def valid_name(name: object) -> bool:
    """Whether ``name`` is a valid queue or channel name."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def _name(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if value is None:
        raise FrameError(ErrorCode.BAD_FIELD, f"{key} is required")
    if not valid_name(value):
        raise FrameError(
            ErrorCode.BAD_QUEUE,
            f"invalid {key} name {str(value)[:140]!r}: 1-128 characters of A-Z a-z 0-9 _ . : -, "
            "starting with a letter or digit",
        )
    return str(value)


def _str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise FrameError(ErrorCode.BAD_FIELD, f"{key} is required and must be a non-empty string")
    return value


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise FrameError(ErrorCode.BAD_FIELD, f"{key} must be a string")


def _int(obj: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    # bool is an int subclass; "prefetch": true is a client bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FrameError(ErrorCode.BAD_FIELD, f"{key} must be an integer from {low} to {high}")
    return value


def _lease(obj: Mapping[str, Any], limits: SessionLimits) -> float | None:
    value = obj.get("lease")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= limits.max_lease:
        raise FrameError(
            ErrorCode.BAD_FIELD, f"lease must be a number of seconds above 0, at most {limits.max_lease:g}"
        )
    return value


def _seconds(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_SECONDS:
        raise FrameError(ErrorCode.BAD_FIELD, f"{key} must be a number of seconds from 0 to {MAX_SECONDS:.0e}")
    return float(value)


def _json(obj: Mapping[str, Any], key: str) -> bytes:
    # Presence, not truthiness: null is a valid body or payload.
    if key not in obj:
        raise FrameError(ErrorCode.BAD_FIELD, f"{key} is required")
    return _encode(obj[key], key)


def _encode(value: Any, key: str) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson reads up to 1024 levels of nesting but writes only 254
        raise FrameError(ErrorCode.BAD_JSON, f"{key} is nested too deeply (at most 254 levels)") from None


def _job(obj: Mapping[str, Any], locate: Locate) -> tuple[str, str, str]:
    job_id = _str(obj, "id")
    token = _str(obj, "token")
    return locate(job_id, token), job_id, token


_SINGLE_ONLY = ("priority", "delay", "uniq", "ttl", "max_attempts")


def _parse(op: str, obj: Mapping[str, Any], ref: str | None, limits: SessionLimits, locate: Locate) -> Command:
    match op:
        case "subscribe":
            prefetch = _int(obj, "prefetch", 1, limits.max_prefetch)
            lease = _lease(obj, limits)
            ack = obj.get("ack")
            ack = AckMode.MANUAL.value if ack is None else ack
            if ack not in (AckMode.MANUAL.value, AckMode.AUTO.value):
                raise FrameError(ErrorCode.BAD_FIELD, 'ack must be "manual" or "auto"')
            return Subscribe(
                ref=ref,
                queue=_name(obj, "queue"),
                prefetch=limits.default_prefetch if prefetch is None else prefetch,
                ack_mode=AckMode(ack),
                lease=limits.default_lease if lease is None else lease,
            )
        case "unsubscribe":
            return Unsubscribe(ref=ref, queue=_name(obj, "queue"))
        # Job ops validate their own fields before locating the job, so that a malformed frame
        # is a bad_field, not an unknown_job.
        case "ack":
            result = _encode(obj["result"], "result") if "result" in obj else None
            queue, job_id, token = _job(obj, locate)
            return Ack(ref=ref, queue=queue, id=job_id, token=token, result_json=result)
        case "nack":
            delay, error = _seconds(obj, "delay"), _opt_str(obj, "error")
            queue, job_id, token = _job(obj, locate)
            return Nack(ref=ref, queue=queue, id=job_id, token=token, delay=delay, error=error)
        case "touch":
            lease = _lease(obj, limits)
            queue, job_id, token = _job(obj, locate)
            return Touch(ref=ref, queue=queue, id=job_id, token=token, lease=lease)
        case "progress":
            data = _json(obj, "data")
            queue, job_id, token = _job(obj, locate)
            return Progress(ref=ref, queue=queue, id=job_id, token=token, data_json=data)
        case "push":
            return _push(obj, ref, limits)
        case "publish":
            return Publish(ref=ref, channel=_name(obj, "channel"), data_json=_json(obj, "data"))
        case "listen":
            return Listen(ref=ref, channel=_name(obj, "channel"))
        case "unlisten":
            return Unlisten(ref=ref, channel=_name(obj, "channel"))
        case "watch" | "unwatch":
            topic = obj.get("topic")
            if topic not in (Topic.STATS.value, Topic.EVENTS.value):
                raise FrameError(ErrorCode.BAD_FIELD, 'topic must be "stats" or "events"')
            queue_name = None if obj.get("queue") is None else _name(obj, "queue")
            kind = Watch if op == "watch" else Unwatch
            return kind(ref=ref, topic=Topic(topic), queue=queue_name)
        case _:
            return Auth(ref=ref, token=_str(obj, "token"))


def _push(obj: Mapping[str, Any], ref: str | None, limits: SessionLimits) -> Push | PushBatch:
    queue = _name(obj, "queue")
    if "jobs" in obj:
        if "body" in obj:
            raise FrameError(ErrorCode.BAD_FIELD, "push takes either body or jobs, not both")
        # A batch has no per-job options, like POST /qb/{queue}: refuse them rather than drop them.
        for key in _SINGLE_ONLY:
            if key in obj:
                raise FrameError(ErrorCode.BAD_FIELD, f"{key} cannot be used with jobs")
        jobs = obj["jobs"]
        if not isinstance(jobs, list) or not jobs:
            raise FrameError(ErrorCode.BAD_FIELD, "jobs must be a non-empty array of job bodies")
        if len(jobs) > limits.max_batch:
            raise FrameError(ErrorCode.TOO_LARGE, f"jobs has {len(jobs)} bodies, over max_batch {limits.max_batch}")
        return PushBatch(ref=ref, queue=queue, bodies=tuple(_encode(body, "jobs") for body in jobs))
    if "body" not in obj:
        raise FrameError(ErrorCode.BAD_FIELD, "push needs body (one job) or jobs (a batch)")
    uniq = _opt_str(obj, "uniq")
    if uniq == "":
        raise FrameError(ErrorCode.BAD_FIELD, "uniq must be a non-empty string")
    return Push(
        ref=ref,
        queue=queue,
        body_json=_encode(obj["body"], "body"),
        priority=_int(obj, "priority", 0, MAX_PRIORITY),
        delay=_seconds(obj, "delay"),
        uniq=uniq,
        ttl=_seconds(obj, "ttl"),
        max_attempts=_int(obj, "max_attempts", 1, MAX_ATTEMPTS),
    )


# --- encoding server frames ---------------------------------------------------------------------


def encode(frame: Mapping[str, Any]) -> bytes:
    """A server frame as compact UTF-8 JSON."""
    return orjson.dumps(frame)


def error_frame(code: str, message: str, ref: str | None, extra: Mapping[str, Any] | None = None) -> bytes:
    frame: dict[str, Any] = {"op": "error", "ref": ref, "error": message, "code": code}
    if extra:
        frame.update((k, v) for k, v in extra.items() if k not in frame)
    return orjson.dumps(frame)


def job_frame(queue: str, job_id: str, token: str | None, attempt: int, body: bytes) -> bytes:
    """A ``job`` frame; ``body`` (valid JSON, as stored) is spliced in without being re-encoded."""
    # One %-format: a third faster than joining the frame's nine parts.
    if token is None:
        return b'{"op":"job","queue":%s,"id":%s,"attempt":%d,"body":%s}' % (
            orjson.dumps(queue),
            orjson.dumps(job_id),
            attempt,
            body,
        )
    return b'{"op":"job","queue":%s,"id":%s,"token":%s,"attempt":%d,"body":%s}' % (
        orjson.dumps(queue),
        orjson.dumps(job_id),
        orjson.dumps(token),
        attempt,
        body,
    )


def pushed_frame(job_id: str, ref: str | None) -> bytes:
    """``encode({"op": "pushed", "id": job_id} | ({"ref": ref} if ref is not None else {}))``, faster."""
    if ref is None:
        return b'{"op":"pushed","id":' + orjson.dumps(job_id) + b"}"
    return b"".join((b'{"op":"pushed","id":', orjson.dumps(job_id), b',"ref":', orjson.dumps(ref), b"}"))


def message_frame(channel: str, data_json: bytes) -> bytes:
    return b"".join((b'{"op":"message","channel":', orjson.dumps(channel), b',"data":', data_json, b"}"))


def event_frame(queue: str, job_id: str, event: str, data_json: bytes | None) -> bytes:
    head = orjson.dumps({"op": "event", "queue": queue, "id": job_id, "event": event})
    return b"".join((head[:-1], b',"data":', b"null" if data_json is None else data_json, b"}"))


def stats_frame(snapshot_json: bytes) -> bytes:
    """``{"op":"stats", ...snapshot}``: the snapshot object's members follow ``op`` unchanged."""
    inner = snapshot_json.strip()
    if not (inner.startswith(b"{") and inner.endswith(b"}")):
        raise ValueError("a stats snapshot must be a JSON object")
    inner = inner[1:-1].strip()
    return b'{"op":"stats"' + (b"," + inner if inner else b"") + b"}"
