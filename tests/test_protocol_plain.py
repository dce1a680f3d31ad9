"""Session.set_plain_sink (broker/session_plain.py): plain pushes and acks handed straight to the I/O layer.

Every frame must have the same outcome with a sink as without one: the same state, the same
error frames, and, for the frames the sink takes, the command the session would have returned.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from broker.commands import Ack, Push
from broker.config import AuthToken, Roles
from broker.frames import ErrorCode
from broker.protocol import Command, Session, SessionLimits


class Sink:
    """Records what the session hands over; refuses while ``accept`` is False."""

    def __init__(self, session: Session) -> None:
        self.taken: list[Command] = []
        self.accept = True
        self.credit: list[str] = []
        session.set_plain_sink(self.push, self.ack)
        session.on_credit = self.credit.append

    def push(self, ref: str | None, queue: str, body_json: bytes) -> bool:
        if self.accept:
            self.taken.append(Push(ref=ref, queue=queue, body_json=body_json))
        return self.accept

    def ack(self, ref: str | None, queue: str, job_id: str, token: str) -> bool:
        if self.accept:
            self.taken.append(Ack(ref=ref, queue=queue, id=job_id, token=token))
        return self.accept


def subscribed(session: Session, **limits: Any) -> Session:
    [cmd] = session.receive('{"op":"subscribe","queue":"q","prefetch":5}')
    session.command_done(cmd)
    for n in range(3):
        assert session.deliver("q", f"j{n}", f"t{n}", 1, b"{}")
    session.data_to_send()
    return session


FRAMES = [
    '{"op":"push","queue":"q","body":{"a":[1,2]}}',
    '{"op":"push","queue":"q","body":null,"ref":"r1"}',
    '{"op":"push","queue":"other","body":1}',
    '{"op":"push","queue":"q","body":1,"priority":3}',
    '{"op":"push","queue":"q","body":1,"extra":3}',
    '{"op":"push","queue":"q","body":1,"ref":"r2","extra":3}',
    '{"op":"push","queue":"q","ref":"r3","extra":3}',
    '{"op":"push","queue":"bad name","body":1}',
    '{"op":"push","queue":"q"}',
    '{"op":"push","queue":7,"body":1}',
    '{"op":"push","queue":"q","body":1,"ref":5}',
    '{"op":"push","queue":"q","body":' + "[" * 300 + "]" * 300 + "}",
    '{"op":"ack","id":"j0","token":"t0"}',
    '{"op":"ack","id":"j1","token":"t1","ref":"a1"}',
    '{"op":"ack","id":"j0","token":"t0"}',  # acked already: unknown_job
    '{"op":"ack","id":"j2","token":"stale"}',
    '{"op":"ack","id":"j2","token":""}',
    '{"op":"ack","id":"j2","token":"t2","result":{"ok":1}}',
    '{"op":"ack","id":"j2","token":"t2","ref":[]}',
    '{"op":"ack","id":5,"token":"t2"}',
    '{"op":"ack","id":"j2","token":"t2","later":1}',
    '{"op":"nope"}',
    "not json",
    "[1]",
    b'{"op":"push","queue":"q","body":1}',
]


@pytest.mark.parametrize("accept", [True, False])
def test_same_outcome_with_and_without_a_sink(accept: bool) -> None:
    plain, general = subscribed(Session()), subscribed(Session())
    sink = Sink(plain)
    sink.accept = accept
    for frame in FRAMES:
        expected = general.receive(frame)
        got = plain.receive(frame)
        plain.flush_credit()
        if accept:
            assert got + sink.taken == expected, frame
        else:
            assert got == expected, frame
        sink.taken.clear()
        assert plain.data_to_send() == general.data_to_send(), frame
        assert plain.subscriptions["q"].in_flight == general.subscriptions["q"].in_flight
        assert plain.credit("q") == general.credit("q")


def test_credit_of_plain_acks_is_told_once_per_queue_at_flush() -> None:
    session = subscribed(Session())
    sink = Sink(session)
    assert session.receive('{"op":"ack","id":"j0","token":"t0"}') == []
    assert session.receive('{"op":"ack","id":"j1","token":"t1"}') == []
    assert sink.credit == []
    session.flush_credit()
    assert sink.credit == ["q"]
    session.flush_credit()
    assert sink.credit == ["q"]


def test_plain_pushes_are_authorized_like_the_others() -> None:
    token = AuthToken(name="t", token="secret", roles=Roles(produce=("jobs",)))
    session = Session(authorize=token.allows)
    sink = Sink(session)
    assert session.receive('{"op":"push","queue":"jobs","body":1}') == []
    assert [c.queue for c in sink.taken if isinstance(c, Push)] == ["jobs"]
    assert session.receive('{"op":"push","queue":"other","body":1}') == []
    [reply] = [orjson.loads(f) for f in session.data_to_send()]
    assert reply["code"] == ErrorCode.FORBIDDEN
    assert len(sink.taken) == 1


def test_nothing_plain_before_auth() -> None:
    session = Session(auth_required=True)
    sink = Sink(session)
    assert session.receive('{"op":"push","queue":"q","body":1}') == []
    [reply] = [orjson.loads(f) for f in session.data_to_send()]
    assert reply["code"] == ErrorCode.FORBIDDEN
    assert sink.taken == []


def test_frames_maybe_over_max_frame_take_the_general_path() -> None:
    session = Session(SessionLimits(max_frame=64))
    sink = Sink(session)
    frame = '{"op":"push","queue":"q","body":"' + "é" * 20 + '"}'  # 58 characters, 78 bytes
    assert session.receive(frame) == []
    [reply] = [orjson.loads(f) for f in session.data_to_send()]
    assert reply["code"] == ErrorCode.TOO_LARGE
    assert sink.taken == []


def test_replies_to_plain_frames() -> None:
    session = Session()
    session.plain_done(None, "id1")
    session.plain_done("r", "id2")
    session.plain_done(None)
    session.plain_done("r2")
    session.plain_failed("r3", ErrorCode.UNAVAILABLE, "redis unavailable: gone")
    assert [orjson.loads(f) for f in session.data_to_send()] == [
        {"op": "pushed", "id": "id1"},
        {"op": "pushed", "id": "id2", "ref": "r"},
        {"op": "ok", "ref": "r2"},
        {"op": "error", "ref": "r3", "error": "redis unavailable: gone", "code": "unavailable"},
    ]


def test_receive_frames_is_receive_of_each_frame() -> None:
    plain, general = subscribed(Session()), subscribed(Session())
    sink = Sink(plain)
    sink.accept = False  # every frame's command comes back, in order
    cmds = list(plain.receive_frames(FRAMES))
    assert cmds == [cmd for frame in FRAMES for cmd in general.receive(frame)]
    assert plain.data_to_send() == general.data_to_send()
    assert sink.credit == ["q", "q", "q"]  # three acks, each told before its command


def test_receive_frames_tells_credit_before_each_command() -> None:
    session = subscribed(Session())
    sink = Sink(session)
    frames = [
        '{"op":"ack","id":"j0","token":"t0"}',
        '{"op":"listen","channel":"c"}',
        '{"op":"ack","id":"j1","token":"t1"}',
    ]
    it = session.receive_frames(frames)
    assert next(it).channel == "c"  # type: ignore[union-attr]
    assert sink.credit == ["q"]
    assert list(it) == []
    assert sink.credit == ["q", "q"]


def test_receive_frames_ignores_frames_after_a_close() -> None:
    session = Session(SessionLimits(max_errors=0))
    sink = Sink(session)
    assert list(session.receive_frames(["nope", '{"op":"push","queue":"q","body":1}'])) == []
    assert session.close_code is not None
    assert sink.taken == []
