"""Frame decoding, field validation and server frame encoding (broker/frames.py), without a session."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.commands import (
    Ack,
    AckMode,
    Auth,
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
from broker.frames import (
    ErrorCode,
    FrameError,
    SessionLimits,
    _parse,
    decode,
    error_frame,
    event_frame,
    job_frame,
    message_frame,
    parse,
    read_op,
    read_ref,
    stats_frame,
    valid_name,
)

LIMITS = SessionLimits()


def locate(job_id: str, token: str) -> str:
    if job_id != "j1":
        raise FrameError(ErrorCode.UNKNOWN_JOB, "unknown")
    return "q"


def p(frame: dict[str, Any]) -> Any:
    return parse(read_op(frame), frame, read_ref(frame), LIMITS, locate)


def code_of(frame: dict[str, Any]) -> ErrorCode:
    with pytest.raises(FrameError) as info:
        p(frame)
    return info.value.code


# --- decoding ---------------------------------------------------------------------------------


def test_decode_object() -> None:
    assert decode('{"op": "ack"}') == {"op": "ack"}


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ("{", ErrorCode.BAD_JSON),
        ("", ErrorCode.BAD_JSON),
        ('{"a": NaN}', ErrorCode.BAD_JSON),
        ("[1, 2]", ErrorCode.BAD_FRAME),
        ('"op"', ErrorCode.BAD_FRAME),
        (b'{"op": "ack"}', ErrorCode.BAD_FRAME),
    ],
)
def test_decode_errors(data: str | bytes, code: ErrorCode) -> None:
    with pytest.raises(FrameError) as info:
        decode(data)
    assert info.value.code is code


def test_ref_and_op() -> None:
    assert read_ref({}) is None
    assert read_ref({"ref": "r"}) == "r"
    with pytest.raises(FrameError, match="ref must be a string") as info:
        read_ref({"ref": 5})
    assert info.value.code is ErrorCode.BAD_FIELD
    with pytest.raises(FrameError, match="op is required") as info:
        read_op({"op": 3})
    assert info.value.code is ErrorCode.BAD_FIELD
    with pytest.raises(FrameError, match="unknown op 'fly'") as info:
        read_op({"op": "fly"})
    assert info.value.code is ErrorCode.UNKNOWN_OP


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("q", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("Q9_.:-x", True),
        ("9", True),
        ("", False),
        (".", False),
        ("..", False),
        ("-q", False),
        ("_q", False),
        ("q/x", False),
        ("q x", False),
        ("{q}", False),
        ("é", False),
        (5, False),
        (None, False),
    ],
)
def test_valid_name(name: object, ok: bool) -> None:
    assert valid_name(name) is ok


# --- parsing each op --------------------------------------------------------------------------


def test_subscribe_defaults_and_values() -> None:
    assert p({"op": "subscribe", "queue": "q"}) == Subscribe(queue="q", prefetch=10, ack_mode=AckMode.MANUAL, lease=30)
    cmd = p({"op": "subscribe", "queue": "q", "prefetch": 1000, "ack": "auto", "lease": 1, "ref": "r"})
    assert cmd == Subscribe(ref="r", queue="q", prefetch=1000, ack_mode=AckMode.AUTO, lease=1)
    assert p({"op": "subscribe", "queue": "q", "lease": 0.5}).lease == 0.5
    assert p({"op": "subscribe", "queue": "q", "lease": 3600}).lease == 3600
    # null means "not given": defaults apply
    cmd = p({"op": "subscribe", "queue": "q", "prefetch": None, "lease": None, "ack": None})
    assert cmd == Subscribe(queue="q", prefetch=10, ack_mode=AckMode.MANUAL, lease=30)


@pytest.mark.parametrize(
    ("extra", "code", "match"),
    [
        ({"prefetch": 0}, ErrorCode.BAD_FIELD, "prefetch must be an integer from 1 to 1000"),
        ({"prefetch": 1001}, ErrorCode.BAD_FIELD, "prefetch"),
        ({"prefetch": 2.5}, ErrorCode.BAD_FIELD, "prefetch"),
        ({"prefetch": "5"}, ErrorCode.BAD_FIELD, "prefetch"),
        ({"prefetch": True}, ErrorCode.BAD_FIELD, "prefetch"),
        ({"lease": 0}, ErrorCode.BAD_FIELD, "lease must be a number of seconds above 0, at most 3600"),
        ({"lease": 3600.5}, ErrorCode.BAD_FIELD, "lease"),
        ({"lease": "30"}, ErrorCode.BAD_FIELD, "lease"),
        ({"lease": True}, ErrorCode.BAD_FIELD, "lease"),
        ({"ack": "sometimes"}, ErrorCode.BAD_FIELD, "ack must be"),
        ({"ack": ""}, ErrorCode.BAD_FIELD, "ack must be"),
        ({"ack": 1}, ErrorCode.BAD_FIELD, "ack must be"),
        ({"queue": None}, ErrorCode.BAD_FIELD, "queue is required"),
        ({"queue": "bad name"}, ErrorCode.BAD_QUEUE, "invalid queue name 'bad name'"),
        ({"queue": 7}, ErrorCode.BAD_QUEUE, "invalid queue name '7'"),
    ],
)
def test_subscribe_errors(extra: dict[str, Any], code: ErrorCode, match: str) -> None:
    frame = {"op": "subscribe", "queue": "q", **extra}
    with pytest.raises(FrameError, match=match) as info:
        p(frame)
    assert info.value.code is code


def test_custom_limits_bound_prefetch_and_lease() -> None:
    limits = SessionLimits(max_prefetch=5, default_prefetch=2, default_lease=7, max_lease=60)
    frame = {"op": "subscribe", "queue": "q"}
    cmd = parse("subscribe", frame, None, limits, locate)
    assert isinstance(cmd, Subscribe)
    assert (cmd.prefetch, cmd.lease) == (2, 7)
    with pytest.raises(FrameError, match="from 1 to 5"):
        parse("subscribe", {**frame, "prefetch": 6}, None, limits, locate)
    with pytest.raises(FrameError, match="at most 60"):
        parse("subscribe", {**frame, "lease": 61}, None, limits, locate)


def test_unsubscribe() -> None:
    assert p({"op": "unsubscribe", "queue": "q", "ref": "r"}) == Unsubscribe(ref="r", queue="q")
    assert code_of({"op": "unsubscribe"}) is ErrorCode.BAD_FIELD


def test_ack() -> None:
    assert p({"op": "ack", "id": "j1", "token": "t"}) == Ack(queue="q", id="j1", token="t")
    cmd = p({"op": "ack", "id": "j1", "token": "t", "result": {"b": [1, 2], "a": None}})
    assert cmd.result_json == b'{"b":[1,2],"a":null}'
    assert p({"op": "ack", "id": "j1", "token": "t", "result": None}).result_json == b"null"


@pytest.mark.parametrize("op", ["ack", "nack", "touch"])
@pytest.mark.parametrize(
    ("extra", "code", "match"),
    [
        ({"token": "t"}, ErrorCode.BAD_FIELD, "id is required"),
        ({"id": 5, "token": "t"}, ErrorCode.BAD_FIELD, "id is required and must be a non-empty string"),
        ({"id": "", "token": "t"}, ErrorCode.BAD_FIELD, "id"),
        ({"id": "j1"}, ErrorCode.BAD_FIELD, "token is required"),
        ({"id": "j1", "token": ["t"]}, ErrorCode.BAD_FIELD, "token"),
        ({"id": "nope", "token": "t"}, ErrorCode.UNKNOWN_JOB, "unknown"),
    ],
)
def test_job_op_errors(op: str, extra: dict[str, Any], code: ErrorCode, match: str) -> None:
    with pytest.raises(FrameError, match=match) as info:
        p({"op": op, **extra})
    assert info.value.code is code


def test_nack() -> None:
    assert p({"op": "nack", "id": "j1", "token": "t"}) == Nack(queue="q", id="j1", token="t")
    cmd = p({"op": "nack", "id": "j1", "token": "t", "delay": 2, "error": "boom"})
    assert cmd == Nack(queue="q", id="j1", token="t", delay=2.0, error="boom")
    assert isinstance(cmd.delay, float)
    assert p({"op": "nack", "id": "j1", "token": "t", "delay": 0.5}).delay == 0.5


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"delay": -1}, "delay must be a number of seconds from 0 to 1e\\+09"),
        ({"delay": "1"}, "delay"),
        ({"delay": False}, "delay"),
        ({"delay": 2e9}, "delay"),
        ({"error": 5}, "error must be a string"),
    ],
)
def test_nack_errors(extra: dict[str, Any], match: str) -> None:
    # Field errors win over job lookup: even an unknown job reports the bad field.
    for job_id in ("j1", "unknown"):
        with pytest.raises(FrameError, match=match) as info:
            p({"op": "nack", "id": job_id, "token": "t", **extra})
        assert info.value.code is ErrorCode.BAD_FIELD


def test_touch() -> None:
    assert p({"op": "touch", "id": "j1", "token": "t"}) == Touch(queue="q", id="j1", token="t")
    assert p({"op": "touch", "id": "j1", "token": "t", "lease": 60}).lease == 60
    assert code_of({"op": "touch", "id": "j1", "token": "t", "lease": 0}) is ErrorCode.BAD_FIELD


def test_progress() -> None:
    cmd = p({"op": "progress", "id": "j1", "token": "t", "data": {"pct": 50}})
    assert cmd == Progress(queue="q", id="j1", token="t", data_json=b'{"pct":50}')
    assert p({"op": "progress", "id": "j1", "token": "t", "data": None}).data_json == b"null"
    with pytest.raises(FrameError, match="data is required"):
        p({"op": "progress", "id": "j1", "token": "t"})


def test_push_single() -> None:
    cmd = p({"op": "push", "queue": "q", "body": {"foo": "bar", "n": 1.5}})
    assert cmd == Push(queue="q", body_json=b'{"foo":"bar","n":1.5}')
    cmd = p(
        {
            "op": "push",
            "queue": "q",
            "body": "text",
            "priority": 9,
            "delay": 3,
            "uniq": "u",
            "ttl": 0,
            "max_attempts": 1,
            "ref": "r",
        }
    )
    assert cmd == Push(
        ref="r", queue="q", body_json=b'"text"', priority=9, delay=3.0, uniq="u", ttl=0.0, max_attempts=1
    )
    assert p({"op": "push", "queue": "q", "body": None}).body_json == b"null"


@pytest.mark.parametrize(
    ("extra", "code", "match"),
    [
        ({}, ErrorCode.BAD_FIELD, "push needs body"),
        ({"body": 1, "jobs": [1]}, ErrorCode.BAD_FIELD, "either body or jobs"),
        ({"body": 1, "priority": 10}, ErrorCode.BAD_FIELD, "priority must be an integer from 0 to 9"),
        ({"body": 1, "priority": -1}, ErrorCode.BAD_FIELD, "priority"),
        ({"body": 1, "delay": -0.1}, ErrorCode.BAD_FIELD, "delay"),
        ({"body": 1, "ttl": "x"}, ErrorCode.BAD_FIELD, "ttl"),
        ({"body": 1, "uniq": ""}, ErrorCode.BAD_FIELD, "uniq must be a non-empty string"),
        ({"body": 1, "uniq": 3}, ErrorCode.BAD_FIELD, "uniq must be a string"),
        ({"body": 1, "max_attempts": 0}, ErrorCode.BAD_FIELD, "max_attempts"),
        ({"jobs": []}, ErrorCode.BAD_FIELD, "jobs must be a non-empty array"),
        ({"jobs": {"a": 1}}, ErrorCode.BAD_FIELD, "jobs must be"),
        ({"jobs": [1], "priority": 3}, ErrorCode.BAD_FIELD, "priority cannot be used with jobs"),
        ({"jobs": [1], "uniq": "u"}, ErrorCode.BAD_FIELD, "uniq cannot be used with jobs"),
        ({"jobs": [0] * 1001}, ErrorCode.TOO_LARGE, "jobs has 1001 bodies, over max_batch 1000"),
    ],
)
def test_push_errors(extra: dict[str, Any], code: ErrorCode, match: str) -> None:
    with pytest.raises(FrameError, match=match) as info:
        p({"op": "push", "queue": "q", **extra})
    assert info.value.code is code


def test_push_bad_queue_before_body() -> None:
    assert code_of({"op": "push", "queue": "", "body": 1}) is ErrorCode.BAD_QUEUE


def test_push_batch() -> None:
    cmd = p({"op": "push", "queue": "q", "jobs": [{"a": 1}, [], None, "s"], "ref": "r"})
    assert cmd == PushBatch(ref="r", queue="q", bodies=(b'{"a":1}', b"[]", b"null", b'"s"'))
    assert len(p({"op": "push", "queue": "q", "jobs": [0] * 1000}).bodies) == 1000


def test_publish_listen_unlisten() -> None:
    assert p({"op": "publish", "channel": "c", "data": [1]}) == Publish(channel="c", data_json=b"[1]")
    assert code_of({"op": "publish", "channel": "c"}) is ErrorCode.BAD_FIELD
    assert code_of({"op": "publish", "channel": "c c", "data": 1}) is ErrorCode.BAD_QUEUE
    assert p({"op": "listen", "channel": "c"}) == Listen(channel="c")
    assert p({"op": "unlisten", "channel": "c"}) == Unlisten(channel="c")
    with pytest.raises(FrameError, match="invalid channel name"):
        p({"op": "listen", "channel": "#all"})
    with pytest.raises(FrameError, match="channel is required"):
        p({"op": "unlisten"})


def test_watch_unwatch() -> None:
    assert p({"op": "watch", "topic": "stats"}) == Watch(topic=Topic.STATS)
    assert p({"op": "watch", "topic": "events", "queue": "q"}) == Watch(topic=Topic.EVENTS, queue="q")
    assert p({"op": "watch", "topic": "events", "queue": None}) == Watch(topic=Topic.EVENTS)
    assert p({"op": "unwatch", "topic": "stats", "ref": "r"}) == Unwatch(ref="r", topic=Topic.STATS)
    with pytest.raises(FrameError, match='topic must be "stats" or "events"'):
        p({"op": "watch", "topic": "logs"})
    assert code_of({"op": "watch", "topic": "events", "queue": "a b"}) is ErrorCode.BAD_QUEUE


def test_auth() -> None:
    assert p({"op": "auth", "token": "secret"}) == Auth(token="secret")
    assert code_of({"op": "auth"}) is ErrorCode.BAD_FIELD
    assert code_of({"op": "auth", "token": ""}) is ErrorCode.BAD_FIELD


def test_unknown_fields_are_ignored() -> None:
    assert p({"op": "listen", "channel": "c", "future": {"x": 1}}) == Listen(channel="c")


# --- limits -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"default_prefetch": 0},
        {"max_prefetch": 5},  # below the default prefetch of 10
        {"default_lease": 0},
        {"max_lease": 10},  # below the default lease of 30
        {"max_frame": 0},
        {"send_buffer": 0},
        {"max_subscriptions": 0},
        {"max_errors": -1},
    ],
)
def test_limits_validated(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        SessionLimits(**kwargs)


# --- encoding ---------------------------------------------------------------------------------


def test_job_frame_splices_raw_body() -> None:
    body = b'{"z": 1,   "a": [1.0, 2]}'  # as stored: not compact, key order kept
    frame = job_frame("q", "id1", "tok", 2, body)
    assert body in frame
    assert orjson.loads(frame) == {
        "op": "job",
        "queue": "q",
        "id": "id1",
        "token": "tok",
        "attempt": 2,
        "body": {"z": 1, "a": [1.0, 2]},
    }
    assert frame.endswith(b',"body":' + body + b"}")


def test_job_frame_without_token_for_auto_ack() -> None:
    frame = orjson.loads(job_frame("q", 'we"ird', None, 1, b"null"))
    assert frame == {"op": "job", "queue": "q", "id": 'we"ird', "attempt": 1, "body": None}


def test_message_event_stats_frames() -> None:
    assert orjson.loads(message_frame("c", b'{"x":1}')) == {"op": "message", "channel": "c", "data": {"x": 1}}
    assert orjson.loads(event_frame("q", "j", "acked", None)) == {
        "op": "event",
        "queue": "q",
        "id": "j",
        "event": "acked",
        "data": None,
    }
    assert orjson.loads(event_frame("q", "j", "progress", b"[50]"))["data"] == [50]
    assert orjson.loads(stats_frame(b' {"ready": 3, "queues": {"q": 1}} ')) == {
        "op": "stats",
        "ready": 3,
        "queues": {"q": 1},
    }
    assert stats_frame(b"{ }") == b'{"op":"stats"}'
    with pytest.raises(ValueError):
        stats_frame(b"[1]")


def test_error_frame() -> None:
    assert orjson.loads(error_frame(ErrorCode.BAD_JSON, "nope", None)) == {
        "op": "error",
        "ref": None,
        "error": "nope",
        "code": "bad_json",
    }
    frame = orjson.loads(error_frame("job_exists", "job already exists", "r", {"id": "x", "op": "ignored"}))
    assert frame == {"op": "error", "ref": "r", "error": "job already exists", "code": "job_exists", "id": "x"}


# --- the fast path of push and ack ----------------------------------------------------------------

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=False),
    st.sampled_from(["", "q", "j1", "t", "bad name", "-x", "é", "q" * 129]),
    st.lists(st.integers(0, 2), max_size=2),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 2), max_size=2),
)
_fields = st.sampled_from(["queue", "body", "id", "token", "ref", "jobs", "result", "priority", "uniq", "x"])


def _outcome(op: str, frame: dict[str, Any], general: bool) -> object:
    ref = frame.get("ref") if isinstance(frame.get("ref"), str) else None
    try:
        if general:
            return _parse(op, frame, ref, LIMITS, locate)
        return parse(op, frame, ref, LIMITS, locate)
    except FrameError as exc:
        return (exc.code, exc.message)


@given(st.sampled_from(["push", "ack"]), st.dictionaries(_fields, _values, max_size=5))
@settings(max_examples=400, deadline=None)
def test_fast_and_general_paths_agree(op: str, fields: dict[str, Any]) -> None:
    frame = {"op": op, **fields}
    assert _outcome(op, frame, general=False) == _outcome(op, frame, general=True)


@pytest.mark.parametrize(
    "frame",
    [
        {"op": "push", "queue": "q", "body": {"a": [1, None]}},
        {"op": "push", "queue": "q", "body": None, "ref": "r"},
        {"op": "ack", "id": "j1", "token": "t"},
        {"op": "ack", "id": "j1", "token": "t", "ref": "r"},
    ],
)
def test_fast_path_commands_equal_the_general_ones(frame: dict[str, Any]) -> None:
    assert p(frame) == _parse(frame["op"], frame, frame.get("ref"), LIMITS, locate)


@pytest.mark.parametrize("ref", [None, "r1", 'q"\\\u00e9\u2028'])
@pytest.mark.parametrize("job_id", ["01J0ABCDEF", 'odd"\\\u00e9'])
def test_pushed_frame_is_the_general_encoding(job_id: str, ref: str | None) -> None:
    from broker.frames import encode, pushed_frame

    expected = {"op": "pushed", "id": job_id} | ({} if ref is None else {"ref": ref})
    assert pushed_frame(job_id, ref) == encode(expected)
