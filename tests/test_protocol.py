"""The sans-I/O WebSocket session (broker/protocol.py, session_*.py): plain synchronous tests, no sockets, no Redis.

Each test plays the I/O layer by hand: it feeds frames to ``receive``, completes the commands it
gets back with ``command_done`` / ``command_failed``, delivers jobs, and reads ``data_to_send``.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from broker.commands import (
    Ack,
    AckMode,
    Auth,
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
from broker.config import AuthToken, Roles
from broker.errors import JobExists, Unauthorized, Unavailable
from broker.frames import CloseCode, ErrorCode
from broker.protocol import Command, Session, SessionLimits, SessionState


def recv(session: Session, frame: Any) -> list[Command]:
    return session.receive(orjson.dumps(frame).decode())


def out(session: Session) -> list[dict[str, Any]]:
    return [orjson.loads(frame) for frame in session.data_to_send()]


def one(session: Session, frame: Any) -> Command:
    cmds = recv(session, frame)
    assert len(cmds) == 1, out(session)
    return cmds[0]


def error(session: Session, frame: Any) -> dict[str, Any]:
    """Send a frame the session must refuse on its own; return the single error frame."""
    assert recv(session, frame) == []
    [reply] = out(session)
    assert reply["op"] == "error"
    return reply


def closing(session: Session) -> int | None:
    """The close code asked for (a function, so that type checkers do not pin it across calls)."""
    return session.close_code


def authed(session: Session) -> bool:
    return session.is_authenticated


def subscribe(session: Session, queue: str = "q", **fields: Any) -> Subscribe:
    cmd = one(session, {"op": "subscribe", "queue": queue, **fields})
    assert isinstance(cmd, Subscribe)
    session.command_done(cmd)
    session.data_to_send()
    return cmd


def deliver(session: Session, job_id: str, token: str | None = "t", queue: str = "q", attempt: int = 1) -> bool:
    return session.deliver(queue, job_id, token, attempt, b'{"n":1}')


@pytest.fixture
def s() -> Session:
    return Session()


# --- subscribe / unsubscribe ------------------------------------------------------------------


def test_subscribe_reply_waits_for_confirmation(s: Session) -> None:
    cmd = one(s, {"op": "subscribe", "queue": "q"})
    assert cmd == Subscribe(queue="q", prefetch=10, ack_mode=AckMode.MANUAL, lease=30)
    assert out(s) == []
    assert s.credit("q") == 0  # not confirmed yet: nothing may be fetched
    assert not deliver(s, "j1")
    s.command_done(cmd)
    assert out(s) == [{"op": "subscribed", "queue": "q", "prefetch": 10, "ack": "manual", "lease": 30}]
    assert s.credit("q") == 10
    assert s.credits() == {"q": 10}


def test_subscribe_with_ref(s: Session) -> None:
    cmd = one(s, {"op": "subscribe", "queue": "q", "prefetch": 3, "ack": "auto", "lease": 5, "ref": "a"})
    s.command_done(cmd)
    assert out(s) == [{"op": "subscribed", "queue": "q", "prefetch": 3, "ack": "auto", "lease": 5, "ref": "a"}]


def test_subscribe_failure_forgets_it(s: Session) -> None:
    cmd = one(s, {"op": "subscribe", "queue": "q", "ref": "a"})
    s.command_failed(cmd, ErrorCode.UNAVAILABLE, "redis unavailable")
    assert out(s) == [{"op": "error", "ref": "a", "error": "redis unavailable", "code": "unavailable"}]
    assert "q" not in s.subscriptions
    subscribe(s)  # may try again


def test_late_subscribe_failure_keeps_active_subscription(s: Session) -> None:
    cmd = subscribe(s)
    s.command_failed(cmd, ErrorCode.INTERNAL, "internal error")
    assert s.subscriptions["q"].active


def test_subscribe_twice_and_too_many() -> None:
    s = Session(SessionLimits(max_subscriptions=2))
    subscribe(s, "a")
    assert error(s, {"op": "subscribe", "queue": "a", "ref": "r"}) == {
        "op": "error",
        "ref": "r",
        "error": "already subscribed to 'a'",
        "code": "already_subscribed",
    }
    subscribe(s, "b")
    reply = error(s, {"op": "subscribe", "queue": "c"})
    assert reply["code"] == "too_many"
    assert "max_subscriptions 2" in reply["error"]
    assert set(s.subscriptions) == {"a", "b"}


def test_unsubscribe_releases_in_flight_at_once(s: Session) -> None:
    subscribe(s, "q")
    subscribe(s, "other")
    assert deliver(s, "j1", "t1")
    assert deliver(s, "j2", "t2")
    assert deliver(s, "k1", "u1", queue="other")
    s.data_to_send()
    cmd = one(s, {"op": "unsubscribe", "queue": "q", "ref": "u"})
    assert cmd == Unsubscribe(ref="u", queue="q", release=(Lease("q", "j1", "t1"), Lease("q", "j2", "t2")))
    # Already gone: a fetch that races the unsubscribe is refused and must be handed back.
    assert s.credit("q") == 0
    assert not deliver(s, "j3")
    assert error(s, {"op": "ack", "id": "j1", "token": "t1"})["code"] == "unknown_job"
    s.command_done(cmd)
    assert out(s) == [{"op": "unsubscribed", "queue": "q", "ref": "u"}]
    # The other queue's jobs are untouched.
    assert s.close() == [Lease("other", "k1", "u1")]


def test_unsubscribe_without_ref_always_answers(s: Session) -> None:
    subscribe(s)
    cmd = one(s, {"op": "unsubscribe", "queue": "q"})
    assert cmd == Unsubscribe(queue="q")
    s.command_done(cmd)
    assert out(s) == [{"op": "unsubscribed", "queue": "q"}]


def test_unsubscribe_failure_still_unsubscribed(s: Session) -> None:
    subscribe(s)
    deliver(s, "j1")
    s.data_to_send()
    cmd = one(s, {"op": "unsubscribe", "queue": "q"})
    s.command_failed(cmd, ErrorCode.UNAVAILABLE, "redis unavailable")
    assert out(s)[0]["code"] == "unavailable"
    assert "q" not in s.subscriptions
    assert s.close() == []  # the lease is left to expire in Redis


def test_unsubscribe_not_subscribed(s: Session) -> None:
    assert error(s, {"op": "unsubscribe", "queue": "q"})["code"] == "not_subscribed"


def test_unsubscribe_before_confirmation(s: Session) -> None:
    sub = one(s, {"op": "subscribe", "queue": "q"})
    unsub = one(s, {"op": "unsubscribe", "queue": "q"})
    assert unsub == Unsubscribe(queue="q")
    # The I/O layer completes the subscribe late; the subscription stays gone.
    s.command_done(sub)
    s.command_done(unsub)
    assert [f["op"] for f in out(s)] == ["subscribed", "unsubscribed"]
    assert s.subscriptions == {}
    assert s.credit("q") == 0


# --- deliveries, credit and in-flight tracking ------------------------------------------------


def test_job_frame_splices_body_and_tracks_in_flight(s: Session) -> None:
    subscribe(s, prefetch=2)
    body = b'{"b":  [1, 2.50], "a": "\xc3\xa9"}'  # stored bytes, not re-encoded
    assert s.deliver("q", "j1", "tok1", 3, body)
    [raw] = s.data_to_send()
    assert raw.endswith(b'"body":' + body + b"}")
    assert orjson.loads(raw) == {
        "op": "job",
        "queue": "q",
        "id": "j1",
        "token": "tok1",
        "attempt": 3,
        "body": {"b": [1, 2.5], "a": "é"},
    }
    assert s.subscriptions["q"].in_flight == {"j1": "tok1"}
    assert s.credit("q") == 1


def test_prefetch_bounds_in_flight(s: Session) -> None:
    subscribe(s, prefetch=2)
    assert deliver(s, "j1", "t1")
    assert deliver(s, "j2", "t2")
    assert s.credit("q") == 0
    assert not deliver(s, "j3", "t3")  # over prefetch: handed back, not sent
    assert len(out(s)) == 2
    cmd = one(s, {"op": "ack", "id": "j1", "token": "t1"})
    assert cmd == Ack(queue="q", id="j1", token="t1")
    # Credit returns when the ack arrives, before Redis confirms it.
    assert s.credit("q") == 1
    assert deliver(s, "j3", "t3")
    assert s.credit("q") == 0


def test_manual_delivery_needs_token(s: Session) -> None:
    subscribe(s)
    with pytest.raises(ValueError, match="lease token"):
        deliver(s, "j1", None)


def test_redelivery_of_a_held_job_takes_new_token(s: Session) -> None:
    subscribe(s, prefetch=1)
    assert deliver(s, "j1", "old")
    # Its lease expired and the same job came back to this connection: not a second slot.
    assert deliver(s, "j1", "new", attempt=2)
    assert s.subscriptions["q"].in_flight == {"j1": "new"}
    s.data_to_send()
    reply = error(s, {"op": "ack", "id": "j1", "token": "old", "ref": "x"})
    assert reply["code"] == "stale_token"
    assert reply["ref"] == "x"
    assert s.subscriptions["q"].in_flight == {"j1": "new"}  # a stale ack leaves the job held
    assert one(s, {"op": "ack", "id": "j1", "token": "new"}) == Ack(queue="q", id="j1", token="new")


def test_same_job_moving_between_queues(s: Session) -> None:
    # Ids are unique across queues in practice; if one ever shows up on another queue, the
    # newest delivery owns it, and nothing is left counted twice.
    subscribe(s, "a")
    subscribe(s, "b")
    deliver(s, "j1", "t1", queue="a")
    deliver(s, "j1", "t2", queue="b")
    assert s.subscriptions["a"].in_flight == {}
    assert s.close() == [Lease("b", "j1", "t2")]


def test_auto_ack_has_no_token_and_nothing_in_flight(s: Session) -> None:
    subscribe(s, ack="auto", prefetch=2)
    for n in range(5):
        assert s.deliver("q", f"j{n}", "ignored", 1, b"[]")
    frames = out(s)
    assert len(frames) == 5
    assert frames[0] == {"op": "job", "queue": "q", "id": "j0", "attempt": 1, "body": []}
    assert s.credit("q") == 2  # paced by the send buffer only
    assert s.subscriptions["q"].in_flight == {}
    assert error(s, {"op": "ack", "id": "j0", "token": "x"})["code"] == "unknown_job"
    assert s.close() == []


def test_full_send_buffer_pauses_every_subscription() -> None:
    s = Session(SessionLimits(send_buffer=1000))
    subscribe(s, "m", prefetch=5)
    subscribe(s, "a", ack="auto", prefetch=5)
    s.set_send_backlog(999)
    assert s.credits() == {"m": 5, "a": 5}
    s.set_send_backlog(1000)
    assert s.credits() == {"m": 0, "a": 0}
    # A job fetched before the pause is still taken (it is leased already), within prefetch.
    assert deliver(s, "j1", queue="m")
    s.set_send_backlog(0)
    assert s.credits() == {"m": 4, "a": 5}
    s.set_send_backlog(-5)
    assert s.send_backlog > 0  # the job frame not yet taken counts
    s.data_to_send()
    assert s.send_backlog == 0


def test_unsent_frames_count_towards_the_send_buffer() -> None:
    s = Session(SessionLimits(send_buffer=200))
    subscribe(s, ack="auto", prefetch=100)
    body = b'"' + b"x" * 100 + b'"'
    assert s.deliver("q", "j1", None, 1, body)
    assert s.credit("q") == 100
    assert s.deliver("q", "j2", None, 1, body)
    assert s.credit("q") == 0  # two frames waiting in data_to_send exceed 200 bytes
    s.data_to_send()
    assert s.credit("q") == 100


def test_credit_of_unknown_queue_is_zero(s: Session) -> None:
    assert s.credit("nope") == 0
    assert not deliver(s, "j1", queue="nope")


# --- ack / nack / touch / progress ------------------------------------------------------------


@pytest.fixture
def held(s: Session) -> Session:
    subscribe(s, prefetch=3)
    deliver(s, "j1", "t1")
    s.data_to_send()
    return s


def test_ack_without_ref_is_silent(held: Session) -> None:
    cmd = one(held, {"op": "ack", "id": "j1", "token": "t1", "result": {"ok": True}})
    assert cmd == Ack(queue="q", id="j1", token="t1", result_json=b'{"ok":true}')
    held.command_done(cmd)
    assert out(held) == []
    assert held.subscriptions["q"].in_flight == {}


def test_ack_with_ref_gets_ok(held: Session) -> None:
    cmd = one(held, {"op": "ack", "id": "j1", "token": "t1", "ref": "k"})
    held.command_done(cmd)
    assert out(held) == [{"op": "ok", "ref": "k"}]


def test_failed_ack_is_reported_and_job_not_held(held: Session) -> None:
    cmd = one(held, {"op": "ack", "id": "j1", "token": "t1"})
    held.command_failed(cmd, ErrorCode.STALE_TOKEN, "stale lease token")
    assert out(held) == [{"op": "error", "ref": None, "error": "stale lease token", "code": "stale_token"}]
    # Not released on close: the job is still leased in Redis and returns when the lease expires.
    assert held.close() == []


def test_nack(held: Session) -> None:
    cmd = one(held, {"op": "nack", "id": "j1", "token": "t1", "delay": 5, "error": "boom", "ref": "n"})
    assert cmd == Nack(ref="n", queue="q", id="j1", token="t1", delay=5.0, error="boom")
    assert held.credit("q") == 3
    held.command_done(cmd)
    assert out(held) == [{"op": "ok", "ref": "n"}]
    assert error(held, {"op": "nack", "id": "j1", "token": "t1"})["code"] == "unknown_job"


def test_touch_keeps_job_in_flight(held: Session) -> None:
    cmd = one(held, {"op": "touch", "id": "j1", "token": "t1", "lease": 60})
    assert cmd == Touch(queue="q", id="j1", token="t1", lease=60)
    held.command_done(cmd)
    assert out(held) == []
    assert held.subscriptions["q"].in_flight == {"j1": "t1"}
    cmd = one(held, {"op": "touch", "id": "j1", "token": "t1", "ref": "r"})
    held.command_done(cmd)
    assert out(held) == [{"op": "ok", "ref": "r"}]


@pytest.mark.parametrize("code", [ErrorCode.STALE_TOKEN, ErrorCode.UNKNOWN_JOB])
@pytest.mark.parametrize("op", ["touch", "progress"])
def test_touch_refused_by_redis_drops_the_job(held: Session, op: str, code: ErrorCode) -> None:
    cmd = one(held, {"op": op, "id": "j1", "token": "t1", "data": 1})
    held.command_failed(cmd, code, "lost the lease")
    assert out(held)[0]["code"] == code
    assert held.subscriptions["q"].in_flight == {}
    assert held.credit("q") == 3


def test_touch_refused_after_redelivery_keeps_new_token(held: Session) -> None:
    cmd = one(held, {"op": "touch", "id": "j1", "token": "t1"})
    deliver(held, "j1", "t2", attempt=2)
    held.command_failed(cmd, ErrorCode.STALE_TOKEN, "stale")
    assert held.subscriptions["q"].in_flight == {"j1": "t2"}


def test_touch_failing_for_another_reason_keeps_job(held: Session) -> None:
    cmd = one(held, {"op": "touch", "id": "j1", "token": "t1"})
    held.command_failed(cmd, ErrorCode.UNAVAILABLE, "redis unavailable")
    assert held.subscriptions["q"].in_flight == {"j1": "t1"}


def test_touch_refused_after_unsubscribe(held: Session) -> None:
    cmd = one(held, {"op": "touch", "id": "j1", "token": "t1"})
    one(held, {"op": "unsubscribe", "queue": "q"})
    held.command_failed(cmd, ErrorCode.STALE_TOKEN, "stale")
    assert held.close() == []


def test_progress(held: Session) -> None:
    cmd = one(held, {"op": "progress", "id": "j1", "token": "t1", "data": {"pct": 40}})
    assert cmd == Progress(queue="q", id="j1", token="t1", data_json=b'{"pct":40}')
    held.command_done(cmd)
    assert out(held) == []
    assert held.subscriptions["q"].in_flight == {"j1": "t1"}
    cmd = one(held, {"op": "progress", "id": "j1", "token": "t1", "data": 1, "ref": "p"})
    held.command_done(cmd)
    assert out(held) == [{"op": "ok", "ref": "p"}]


@pytest.mark.parametrize("op", ["ack", "nack", "touch", "progress"])
def test_unknown_job_and_stale_token(held: Session, op: str) -> None:
    reply = error(held, {"op": op, "id": "zz", "token": "t1", "data": 1, "ref": "r"})
    assert reply == {
        "op": "error",
        "ref": "r",
        "error": "job 'zz' is not in flight on this connection",
        "code": "unknown_job",
    }
    assert error(held, {"op": op, "id": "j1", "token": "other", "data": 1})["code"] == "stale_token"
    assert held.subscriptions["q"].in_flight == {"j1": "t1"}


# --- push / publish ---------------------------------------------------------------------------


def test_push_always_answers(s: Session) -> None:
    cmd = one(s, {"op": "push", "queue": "q", "body": {"foo": "bar"}, "priority": 7})
    assert cmd == Push(queue="q", body_json=b'{"foo":"bar"}', priority=7)
    s.command_done(cmd, "id1")
    assert out(s) == [{"op": "pushed", "id": "id1"}]
    cmd = one(s, {"op": "push", "queue": "q", "body": 1, "ref": "p"})
    s.command_done(cmd, "id2")
    assert out(s) == [{"op": "pushed", "id": "id2", "ref": "p"}]


def test_push_batch(s: Session) -> None:
    cmd = one(s, {"op": "push", "queue": "q", "jobs": [1, {"a": 2}], "ref": "b"})
    assert cmd == PushBatch(ref="b", queue="q", bodies=(b"1", b'{"a":2}'))
    s.command_done(cmd, ["i1", "i2"])
    assert out(s) == [{"op": "pushed", "ids": ["i1", "i2"], "ref": "b"}]


def test_push_result_type_checked(s: Session) -> None:
    cmd = one(s, {"op": "push", "queue": "q", "body": 1})
    with pytest.raises(TypeError):
        s.command_done(cmd)
    batch = one(s, {"op": "push", "queue": "q", "jobs": [1]})
    with pytest.raises(TypeError):
        s.command_done(batch, "id")


def test_push_error_carries_broker_error_payload(s: Session) -> None:
    cmd = one(s, {"op": "push", "queue": "q", "body": 1, "uniq": "u", "ref": "p"})
    s.command_raised(cmd, JobExists("old-id"))
    assert out(s) == [{"op": "error", "ref": "p", "error": "job already exists", "code": "job_exists", "id": "old-id"}]
    cmd = one(s, {"op": "push", "queue": "q", "body": 1})
    s.command_raised(cmd, Unavailable())
    assert out(s) == [{"op": "error", "ref": None, "error": "redis unavailable", "code": "unavailable"}]


def test_publish(s: Session) -> None:
    cmd = one(s, {"op": "publish", "channel": "news", "data": {"x": 1}})
    assert cmd == Publish(channel="news", data_json=b'{"x":1}')
    s.command_done(cmd)
    assert out(s) == []
    cmd = one(s, {"op": "publish", "channel": "news", "data": None, "ref": "m"})
    s.command_done(cmd)
    assert out(s) == [{"op": "ok", "ref": "m"}]
    s.command_failed(cmd, ErrorCode.INTERNAL, "internal error")
    assert out(s) == [{"op": "error", "ref": "m", "error": "internal error", "code": "internal"}]


# --- listen / watch ---------------------------------------------------------------------------


def test_listen_and_messages(s: Session) -> None:
    assert not s.message("news", b"1")
    cmd = one(s, {"op": "listen", "channel": "news"})
    assert cmd == Listen(channel="news")
    s.command_done(cmd)
    assert out(s) == [{"op": "listening", "channel": "news"}]
    assert s.channels == {"news"}
    assert s.message("news", b'{"x": [1]}')
    assert not s.message("other", b"1")
    assert out(s) == [{"op": "message", "channel": "news", "data": {"x": [1]}}]
    assert error(s, {"op": "listen", "channel": "news"})["code"] == "already_subscribed"
    cmd = one(s, {"op": "unlisten", "channel": "news", "ref": "u"})
    assert cmd == Unlisten(ref="u", channel="news")
    s.command_done(cmd)
    assert out(s) == [{"op": "unlistened", "channel": "news", "ref": "u"}]
    assert not s.message("news", b"1")
    assert error(s, {"op": "unlisten", "channel": "news"})["code"] == "not_subscribed"


def test_listen_failure_and_limit() -> None:
    s = Session(SessionLimits(max_channels=1))
    cmd = one(s, {"op": "listen", "channel": "a", "ref": "l"})
    s.command_failed(cmd, ErrorCode.UNAVAILABLE, "down")
    assert s.channels == frozenset()
    s.command_done(one(s, {"op": "listen", "channel": "a"}))
    s.data_to_send()
    assert error(s, {"op": "listen", "channel": "b"})["code"] == "too_many"


def test_messages_dropped_when_send_buffer_full() -> None:
    s = Session(SessionLimits(send_buffer=100))
    s.command_done(one(s, {"op": "listen", "channel": "c"}))
    s.data_to_send()
    s.set_send_backlog(100)
    assert not s.message("c", b"1")
    assert s.dropped == 1
    s.set_send_backlog(0)
    assert s.message("c", b"1")


def test_watch_stats(s: Session) -> None:
    assert not s.stats(b"{}")
    cmd = one(s, {"op": "watch", "topic": "stats", "ref": "w"})
    assert cmd == Watch(ref="w", topic=Topic.STATS)
    s.command_done(cmd)
    assert out(s) == [{"op": "watching", "topic": "stats", "ref": "w"}]
    assert s.stats(b'{"size": 2}')
    assert not s.stats(b'{"size": 2}', queue="q")  # only the broker-wide feed is watched
    assert out(s) == [{"op": "stats", "size": 2}]
    assert s.watches == {(Topic.STATS, None)}


def test_watch_events(s: Session) -> None:
    s.command_done(one(s, {"op": "watch", "topic": "events", "queue": "q"}))
    assert out(s) == [{"op": "watching", "topic": "events", "queue": "q"}]
    assert s.event("q", "j1", "pushed")
    assert not s.event("other", "j1", "pushed")
    assert s.event("q", "j1", "progress", b'{"pct":5}')
    assert out(s) == [
        {"op": "event", "queue": "q", "id": "j1", "event": "pushed", "data": None},
        {"op": "event", "queue": "q", "id": "j1", "event": "progress", "data": {"pct": 5}},
    ]
    # Watching every queue's events.
    s.command_done(one(s, {"op": "watch", "topic": "events"}))
    s.data_to_send()
    assert s.event("other", "j2", "acked")
    s.data_to_send()
    assert error(s, {"op": "watch", "topic": "events"})["code"] == "already_subscribed"


def test_unwatch(s: Session) -> None:
    s.command_done(one(s, {"op": "watch", "topic": "events", "queue": "q"}))
    s.data_to_send()
    assert error(s, {"op": "unwatch", "topic": "events"})["error"] == "not watching events of every queue"
    assert error(s, {"op": "unwatch", "topic": "stats", "queue": "q"})["error"] == "not watching stats of 'q'"
    cmd = one(s, {"op": "unwatch", "topic": "events", "queue": "q"})
    assert cmd == Unwatch(topic=Topic.EVENTS, queue="q")
    s.command_done(cmd)
    assert out(s) == [{"op": "unwatched", "topic": "events", "queue": "q"}]
    assert not s.event("q", "j1", "acked")


def test_watch_failure_and_limit() -> None:
    s = Session(SessionLimits(max_watches=1))
    cmd = one(s, {"op": "watch", "topic": "stats"})
    s.command_failed(cmd, ErrorCode.UNAVAILABLE, "down")
    assert s.watches == frozenset()
    s.command_done(one(s, {"op": "watch", "topic": "stats"}))
    s.data_to_send()
    assert error(s, {"op": "watch", "topic": "events"})["code"] == "too_many"


def test_stats_and_events_dropped_when_send_buffer_full() -> None:
    s = Session(SessionLimits(send_buffer=10))
    s.command_done(one(s, {"op": "watch", "topic": "stats"}))
    s.command_done(one(s, {"op": "watch", "topic": "events"}))
    assert not s.stats(b"{}")  # the two unsent replies already fill 10 bytes
    assert not s.event("q", "j", "acked")
    assert s.dropped == 2


# --- ordering ---------------------------------------------------------------------------------


def test_commands_and_replies_in_frame_order(s: Session) -> None:
    frames = [
        {"op": "subscribe", "queue": "q", "ref": "1"},
        {"op": "push", "queue": "q", "body": 1, "ref": "2"},
        {"op": "bogus", "ref": "3"},
        {"op": "listen", "channel": "c", "ref": "4"},
        {"op": "publish", "channel": "c", "data": 0, "ref": "5"},
    ]
    refs = []
    for frame in frames:
        for cmd in recv(s, frame):
            s.command_done(cmd, "id" if isinstance(cmd, Push) else None)
        refs += [f["ref"] for f in out(s)]
    assert refs == ["1", "2", "3", "4", "5"]


# --- protocol errors, limits and closing ------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ("not json", ErrorCode.BAD_JSON),
        ("[]", ErrorCode.BAD_FRAME),
        (b'{"op":"push"}', ErrorCode.BAD_FRAME),
        ('{"op":"explode"}', ErrorCode.UNKNOWN_OP),
        ('{"ref":"r"}', ErrorCode.BAD_FIELD),
        ('{"op":"subscribe","queue":"q","prefetch":0}', ErrorCode.BAD_FIELD),
        ('{"op":"subscribe","queue":"no/slash"}', ErrorCode.BAD_QUEUE),
        ('{"op":"push","queue":"q","jobs":[' + ",".join(["1"] * 1001) + "]}", ErrorCode.TOO_LARGE),
    ],
)
def test_bad_frames_answered_connection_stays_open(s: Session, data: str | bytes, code: ErrorCode) -> None:
    assert s.receive(data) == []
    [reply] = out(s)
    assert reply["op"] == "error"
    assert reply["code"] == code
    assert reply["error"]
    assert closing(s) is None
    assert s.state is SessionState.OPEN


def test_error_echoes_ref_when_readable(s: Session) -> None:
    assert error(s, {"op": "explode", "ref": "r1"})["ref"] == "r1"
    assert error(s, {"op": "explode", "ref": 12}) == {
        "op": "error",
        "ref": None,
        "error": "ref must be a string",
        "code": "bad_field",
    }


def test_binary_frame(s: Session) -> None:
    assert s.receive(b'{"op":"subscribe","queue":"q"}') == []
    assert out(s) == [
        {
            "op": "error",
            "ref": None,
            "error": "binary frames are not supported: send JSON in a text frame",
            "code": "bad_frame",
        }
    ]


def test_oversized_frame_closes_with_1009() -> None:
    s = Session(SessionLimits(max_frame=100))
    ok = '{"op":"push","queue":"q","body":"' + "x" * 60 + '"}'
    assert len(ok) <= 100
    assert len(s.receive(ok)) == 1
    assert s.receive(ok + " " * (101 - len(ok))) == []
    [reply] = out(s)
    assert reply["code"] == "too_large"
    assert closing(s) == 1009
    assert s.close_code is CloseCode.MESSAGE_TOO_BIG
    assert s.state is SessionState.CLOSING
    assert s.receive(ok) == []  # nothing more is read


def test_frame_size_counts_utf8_bytes() -> None:
    s = Session(SessionLimits(max_frame=100))
    frame = '{"op":"push","queue":"q","body":"' + "é" * 40 + '"}'  # 74 characters, 114 bytes
    assert len(frame) < 100
    assert s.receive(frame) == []
    assert closing(s) == 1009
    s = Session(SessionLimits(max_frame=100))
    assert s.receive(b"x" * 101) == []
    assert closing(s) == 1009


def test_consecutive_errors_close_with_1008() -> None:
    s = Session(SessionLimits(max_errors=3))
    for _ in range(3):
        s.receive("junk")
    assert closing(s) is None
    s.receive('{"op":"publish","channel":"c","data":1}')  # a good frame resets the count
    for _ in range(3):
        s.receive("junk")
    assert closing(s) is None
    s.receive("junk")
    assert closing(s) == CloseCode.POLICY_VIOLATION
    assert s.close_reason == "too many protocol errors"
    assert [f["code"] for f in out(s)] == ["bad_json"] * 7
    assert s.receive('{"op":"publish","channel":"c","data":1}') == []


def test_default_abuse_threshold_is_100(s: Session) -> None:
    for _ in range(100):
        s.receive("{")
    assert closing(s) is None
    s.receive("{")
    assert closing(s) == 1008


def test_shutdown(s: Session) -> None:
    subscribe(s)
    deliver(s, "j1", "t1")
    s.data_to_send()
    s.shutdown()
    assert out(s) == [{"op": "shutdown"}]
    assert s.close_code is CloseCode.GOING_AWAY
    assert s.credit("q") == 0
    assert not deliver(s, "j2")
    assert not s.message("c", b"1")
    assert not s.stats(b"{}")
    assert not s.event("q", "j", "acked")
    assert s.receive('{"op":"ack","id":"j1","token":"t1"}') == []
    s.shutdown()  # idempotent, no second frame
    assert out(s) == []
    assert s.close() == [Lease("q", "j1", "t1")]
    assert s.state is SessionState.CLOSED


def test_first_close_code_wins(s: Session) -> None:
    s.start_close(CloseCode.TRY_AGAIN_LATER, "busy")
    s.shutdown()
    assert (s.close_code, s.close_reason) == (CloseCode.TRY_AGAIN_LATER, "busy")
    assert out(s) == []  # closing already: no shutdown frame


def test_close_returns_every_in_flight_job(s: Session) -> None:
    subscribe(s, "a")
    subscribe(s, "b")
    s.command_done(one(s, {"op": "listen", "channel": "c"}))
    deliver(s, "j1", "t1", queue="a")
    deliver(s, "j2", "t2", queue="b")
    deliver(s, "j3", "t3", queue="a")
    one(s, {"op": "ack", "id": "j3", "token": "t3"})  # acked: not handed back
    assert sorted(s.close()) == [Lease("a", "j1", "t1"), Lease("b", "j2", "t2")]
    assert s.state is SessionState.CLOSED
    assert s.close() == []
    assert s.subscriptions == {}
    assert s.channels == frozenset()
    assert s.receive('{"op":"listen","channel":"c"}') == []
    assert not deliver(s, "j4", queue="a")


def test_send_error_unsolicited(s: Session) -> None:
    s.send_error(ErrorCode.UNAVAILABLE, "redis unavailable; retrying")
    assert out(s) == [{"op": "error", "ref": None, "error": "redis unavailable; retrying", "code": "unavailable"}]


def test_receive_object_for_path_subscribe(s: Session) -> None:
    [cmd] = s.receive_object({"op": "subscribe", "queue": "jobs", "prefetch": 4})
    assert cmd == Subscribe(queue="jobs", prefetch=4, ack_mode=AckMode.MANUAL, lease=30)
    assert s.receive_object({"op": "subscribe", "queue": "bad name"}) == []
    assert out(s)[0]["code"] == "bad_queue"
    assert s.receive_object({"op": "subscribe", "queue": "q", "ref": 1}) == []
    assert out(s)[0]["code"] == "bad_field"
    s.start_close(CloseCode.GOING_AWAY)
    assert s.receive_object({"op": "subscribe", "queue": "q"}) == []


# --- authentication and authorization ---------------------------------------------------------


def test_auth_required_gates_every_op() -> None:
    s = Session(auth_required=True)
    assert not authed(s)
    reply = error(s, {"op": "subscribe", "queue": "q", "ref": "s"})
    assert reply == {
        "op": "error",
        "ref": "s",
        "error": "authenticate first: send an auth frame before subscribe",
        "code": "forbidden",
    }
    assert error(s, {"op": "ack", "id": "x", "token": "y"})["code"] == "forbidden"
    cmd = one(s, {"op": "auth", "token": "secret", "ref": "a"})
    assert cmd == Auth(ref="a", token="secret")
    # Still refused until the I/O layer confirms the token.
    assert error(s, {"op": "publish", "channel": "c", "data": 1})["code"] == "forbidden"
    s.authenticated(cmd, None)
    assert out(s) == [{"op": "ok", "ref": "a"}]
    assert authed(s)
    subscribe(s)


def test_auth_refused(s: Session) -> None:
    s = Session(auth_required=True)
    cmd = one(s, {"op": "auth", "token": "wrong"})
    s.command_raised(cmd, Unauthorized("invalid token"))
    assert out(s) == [{"op": "error", "ref": None, "error": "invalid token", "code": "forbidden"}]
    assert error(s, {"op": "listen", "channel": "c"})["code"] == "forbidden"


def test_auth_without_ref_is_silent_and_confirm_only_via_authenticated() -> None:
    s = Session(auth_required=True)
    cmd = one(s, {"op": "auth", "token": "t"})
    with pytest.raises(TypeError):
        s.command_done(cmd)
    assert isinstance(cmd, Auth)
    s.authenticated(cmd, lambda role, name: True)
    assert out(s) == []


def test_authorize_hook_roles() -> None:
    asked: list[tuple[str, str]] = []
    grants = {("consume", "q"), ("produce", "q"), ("produce", "news"), ("consume", "news"), ("admin", "q")}

    def authorize(role: str, name: str) -> bool:
        asked.append((role, name))
        return (role, name) in grants

    s = Session(authorize=authorize)
    allowed: list[dict[str, Any]] = [
        {"op": "subscribe", "queue": "q"},
        {"op": "push", "queue": "q", "body": 1},
        {"op": "push", "queue": "q", "jobs": [1]},
        {"op": "publish", "channel": "news", "data": 1},
        {"op": "listen", "channel": "news"},
        {"op": "watch", "topic": "events", "queue": "q"},
    ]
    for frame in allowed:
        one(s, frame)
    assert asked == [
        ("consume", "q"),
        ("produce", "q"),
        ("produce", "q"),
        ("produce", "news"),
        ("consume", "news"),
        ("admin", "q"),
    ]
    denied: list[dict[str, Any]] = [
        {"op": "subscribe", "queue": "other"},
        {"op": "push", "queue": "other", "body": 1},
        {"op": "publish", "channel": "q2", "data": 1},
        {"op": "listen", "channel": "secret"},
        {"op": "watch", "topic": "stats"},
    ]
    for frame in denied:
        assert error(s, frame)["code"] == "forbidden"
    assert asked[-1] == ("admin", "*")
    assert "watch" not in {k for k, _ in s.watches}
    # Ops on what the connection already holds ask nothing more.
    n = len(asked)
    s.command_done(Subscribe(queue="q", prefetch=10, ack_mode=AckMode.MANUAL, lease=30))
    deliver(s, "j1")
    one(s, {"op": "touch", "id": "j1", "token": "t"})
    one(s, {"op": "unlisten", "channel": "news"})
    one(s, {"op": "unwatch", "topic": "events", "queue": "q"})
    one(s, {"op": "unsubscribe", "queue": "q"})
    one(s, {"op": "auth", "token": "x"})
    assert len(asked) == n


def test_config_tokens_plug_in_as_authorize_hook() -> None:
    token = AuthToken(token="t", name="worker", roles=Roles(consume=("jobs.*",), admin=("*",)))
    s = Session(authorize=token.allows)
    one(s, {"op": "subscribe", "queue": "jobs.email"})
    one(s, {"op": "watch", "topic": "stats"})
    assert error(s, {"op": "push", "queue": "jobs.email", "body": 1})["code"] == "forbidden"


def test_authenticated_replaces_authorize() -> None:
    s = Session(authorize=lambda role, name: False)
    assert error(s, {"op": "subscribe", "queue": "q"})["code"] == "forbidden"
    cmd = one(s, {"op": "auth", "token": "admin-token"})
    assert isinstance(cmd, Auth)
    s.authenticated(cmd, lambda role, name: True)
    subscribe(s)


# --- every error code is reachable ------------------------------------------------------------


def test_every_error_code_is_produced() -> None:
    seen: set[str] = set()

    def collect(session: Session) -> None:
        seen.update(f["code"] for f in out(session) if f["op"] == "error")

    s = Session(SessionLimits(max_subscriptions=1), authorize=lambda role, name: name != "locked")
    for data in ("{", "[]", '{"op":"x"}', '{"op":"subscribe","queue":"q","lease":0}', '{"op":"subscribe","queue":"/"}'):
        s.receive(data)
    recv(s, {"op": "ack", "id": "nope", "token": "t"})
    recv(s, {"op": "push", "queue": "q", "jobs": [0] * 1001})
    recv(s, {"op": "push", "queue": "locked", "body": 0})
    recv(s, {"op": "unsubscribe", "queue": "q"})
    collect(s)
    subscribe(s, "q")
    recv(s, {"op": "subscribe", "queue": "q"})
    recv(s, {"op": "subscribe", "queue": "r"})
    deliver(s, "j1", "t1")
    recv(s, {"op": "ack", "id": "j1", "token": "t0"})
    collect(s)
    for code in (ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL, ErrorCode.JOB_EXISTS):
        s.command_failed(Push(queue="q", body_json=b"1"), code, "failed")
    collect(s)
    assert seen == {code.value for code in ErrorCode}
