"""WebSocket fuzzing: bad frames get ``error`` frames or a clean close, and hurt no one else.

Hypothesis generates (derandomized, a fixed number) sequences of frames: malformed JSON, JSON
that is not an object, ops with members of every wrong type, binary frames, frames around and
over ``max_frame``, deeply nested JSON, and well-formed ops in random order, including acks,
nacks and touches of jobs this connection holds (out of order, twice, with a wrong or another
job's token). Each sequence is played on a fresh connection to a real broker while a producer
and a consumer on another queue keep a ledger. Afterwards:

- every frame the broker sent was a JSON object with a known ``op``; errors carried a known
  code, never ``internal`` or ``unavailable``;
- every connection ended with a close the broker chose on purpose (1000, 1008, 1009);
- the broker logged no error, still answers, and every job of the ledger was delivered and acked;
- the fuzzed queues satisfy the storage invariant.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from broker.commands import OPS
from broker.frames import ErrorCode
from tests.invariants import check_queue
from tests.ledger import Consumer, Harness, Ledger, WsProducer
from tests.servers import make_settings, run_broker, wait_for

SEQUENCES = 200
MAX_FRAME = 8192
LEDGER_QUEUE = "ledger-7f3a9c"  # a name the fuzzer does not produce
FUZZ_QUEUES = ("fuzz", "fuzz.b", "fuzz-c")
CONFIG = {
    "limits": {
        "max_frame": MAX_FRAME,
        "max_subscriptions": 2,
        "max_channels": 2,
        "max_batch": 5,
        "max_prefetch": 20,
    },
    "queues": {"max_lease": 30, "reap_interval": 0.2},
}
SERVER_OPS = {
    "job",
    "message",
    "stats",
    "event",
    "ok",
    "error",
    "subscribed",
    "unsubscribed",
    "listening",
    "unlistened",
    "watching",
    "unwatched",
    "pushed",
}
ERROR_CODES = {code.value for code in ErrorCode} - {ErrorCode.INTERNAL.value, ErrorCode.UNAVAILABLE.value}
CLEAN_CLOSES = {1000, 1008, 1009}
SENTINEL = "fuzz-sentinel-ref"

# -- what to send ------------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
names = st.sampled_from(FUZZ_QUEUES) | st.text(max_size=12) | json_values


def member(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A member value: mostly plausible, sometimes any JSON value at all."""
    return st.one_of(good, good, json_values)


MEMBERS: dict[str, st.SearchStrategy[Any]] = {
    "queue": member(names),
    "channel": member(names),
    "id": member(st.text(max_size=24)),
    "token": member(st.text(max_size=24)),
    "prefetch": member(st.integers(-2, 25)),
    "ack": member(st.sampled_from(["manual", "auto", "none"])),
    "lease": member(st.floats(-1, 40)),
    "body": json_values,
    "jobs": member(st.lists(json_values, max_size=7)),
    "delay": member(st.floats(-1, 2)),
    "error": member(st.text(max_size=10)),
    "priority": member(st.integers(-1, 10)),
    "uniq": member(st.text(max_size=4)),
    "ttl": member(st.floats(-1, 5)),
    "max_attempts": member(st.integers(-1, 3)),
    "topic": member(st.sampled_from(["stats", "events", "logs"])),
    "data": json_values,
    "result": json_values,
    "ref": member(st.text(max_size=5)),
}
any_op = st.fixed_dictionaries(
    {"op": st.sampled_from(sorted(OPS)) | st.sampled_from(["nop", "Subscribe", ""]) | json_values}, optional=MEMBERS
)
queue = st.sampled_from(FUZZ_QUEUES)
good_op = st.one_of(
    st.builds(
        lambda q, p, a: {"op": "subscribe", "queue": q, "prefetch": p, "ack": a, "lease": 30},
        queue,
        st.integers(1, 5),
        st.sampled_from(["manual", "auto"]),
    ),
    st.builds(lambda q, b: {"op": "push", "queue": q, "body": b}, queue, json_values),
    st.builds(lambda q, n: {"op": "push", "queue": q, "jobs": list(range(n))}, queue, st.integers(1, 7)),
    st.builds(lambda q: {"op": "unsubscribe", "queue": q}, queue),
    st.builds(lambda c, d: {"op": "listen", "channel": c, "data": d}, queue, json_values),
    st.builds(lambda c, d: {"op": "publish", "channel": c, "data": d}, queue, json_values),
    st.just({"op": "watch", "topic": "events"}),
)


def text(frame: Any) -> str:
    return json.dumps(frame)  # stdlib: big integers too, which orjson would refuse to encode


Action = tuple[str, Any]
actions: st.SearchStrategy[Action] = st.one_of(
    st.tuples(st.just("text"), st.text(max_size=40)),  # mostly not JSON at all
    st.tuples(st.just("text"), any_op.map(text).flatmap(lambda s: st.sampled_from([s, s[:-1], s[1:], s + "}"]))),
    st.tuples(st.just("text"), json_values.map(text)),  # JSON, seldom an object
    st.tuples(st.just("text"), any_op.map(text)),
    st.tuples(st.just("text"), good_op.map(text)),
    st.tuples(st.just("text"), good_op.map(text)),
    st.tuples(st.just("bytes"), st.binary(max_size=40) | good_op.map(lambda f: text(f).encode())),
    st.tuples(st.just("size"), st.integers(MAX_FRAME - 64, MAX_FRAME + 64)),  # around max_frame
    st.tuples(st.just("deep"), st.integers(100, 3000)),  # nesting, over the parser's limit too
    st.tuples(st.just("await"), st.just(0.05)),  # let a job arrive, if one comes, before the next settle
    st.tuples(
        st.just("settle"),  # on a job this connection was sent: (op, which job, which token)
        st.tuples(
            st.sampled_from(["ack", "nack", "touch", "progress"]),
            st.integers(0, 9),
            st.sampled_from(["own", "own", "other", "wrong"]),
        ),
    ),
)
# Half the sequences start by holding jobs, so that their settles meet real leases.
PREAMBLE: list[Action] = [
    ("text", text({"op": "subscribe", "queue": "fuzz", "prefetch": 5, "ack": "manual"})),
    ("text", text({"op": "push", "queue": "fuzz", "jobs": [1, 2, 3]})),
    ("await", 5.0),  # three jobs are sure to come
]
sequences = st.tuples(st.booleans(), st.lists(actions, min_size=1, max_size=20)).map(
    lambda t: (PREAMBLE if t[0] else []) + t[1]
)


def generate(count: int) -> list[list[Action]]:
    """``count`` sequences, the same on every run (derandomized, nothing stored)."""
    found: list[list[Action]] = []

    @given(sequences)
    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def collect(sequence: list[Action]) -> None:
        found.append(sequence)

    collect()
    return found


# -- playing it ------------------------------------------------------------------------------------


def materialize(action: Action, jobs: list[dict[str, Any]]) -> str | bytes:
    kind, arg = action
    if kind in ("text", "bytes"):
        return arg  # type: ignore[no-any-return]
    if kind == "size":
        frame = text({"op": "push", "queue": "fuzz", "body": ""})
        return frame.replace('""', '"' + "x" * max(0, arg - len(frame)) + '"')
    if kind == "deep":
        return text({"op": "push", "queue": "fuzz", "body": None}).replace("null", "[" * arg + "]" * arg)
    op, index, which = arg
    if not jobs:
        return text({"op": op, "id": f"nojob{index}", "token": "t", "data": None})
    job = jobs[index % len(jobs)]
    token = job.get("token") or "auto"
    if which == "other":
        token = jobs[(index + 1) % len(jobs)].get("token") or "auto"
    elif which == "wrong":
        token += "x"
    return text({"op": op, "id": job["id"], "token": token, "data": index, "delay": 0})


class Outcome:
    """What the fuzzer saw, over every connection."""

    def __init__(self) -> None:
        self.ops: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()
        self.closes: Counter[int | None] = Counter()
        self.problems: list[str] = []

    def frame(self, raw: str | bytes, sent: list[str | bytes]) -> dict[str, Any] | None:
        try:
            frame = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.problems.append(f"not JSON: {raw[:200]!r}")
            return None
        if not isinstance(frame, dict) or frame.get("op") not in SERVER_OPS:
            self.problems.append(f"unknown frame {str(frame)[:200]} after {sent[-3:]!r}")
            return None
        self.ops[frame["op"]] += 1
        if frame["op"] == "error":
            self.codes[frame.get("code")] += 1
            if frame.get("code") not in ERROR_CODES or not isinstance(frame.get("error"), str):
                self.problems.append(f"error frame {frame} after {[s[:120] for s in sent[-3:]]!r}")
        return frame


async def play(url: str, sequence: list[Action], outcome: Outcome) -> None:
    jobs: list[dict[str, Any]] = []
    sent: list[str | bytes] = []
    done = asyncio.Event()
    arrived = asyncio.Event()

    async def read(ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                frame = outcome.frame(raw, sent)
                if frame is None:
                    continue
                if frame["op"] == "job":
                    jobs.append(frame)
                    arrived.set()
                if frame.get("ref") == SENTINEL:
                    done.set()
        except ConnectionClosed:
            pass
        finally:
            done.set()

    target = url + ("/fuzz" if len(sequence) % 5 == 0 else "")  # sometimes /ws/{queue}
    async with connect(target, max_size=None, open_timeout=10, close_timeout=5, ping_interval=None) as ws:
        reader = asyncio.create_task(read(ws))
        with contextlib.suppress(ConnectionClosed):
            for action in sequence:
                if action[0] == "await":
                    arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(arrived.wait(), action[1])
                    continue
                frame = materialize(action, jobs)
                sent.append(frame)
                await ws.send(frame)
            # Frames are handled in order: the answer to this one means all before were read.
            await ws.send(text({"op": "unlisten", "channel": "never-listened", "ref": SENTINEL}))
        await asyncio.wait_for(done.wait(), 10)
        await ws.close()
        await asyncio.wait_for(reader, 10)
    code = ws.close_code
    outcome.closes[code] += 1
    if code not in CLEAN_CLOSES:
        outcome.problems.append(f"closed with {code} ({ws.close_reason!r}) after {[s[:120] for s in sent[-3:]]!r}")


async def paced(producer: WsProducer, stop: asyncio.Event) -> int:
    """Push a job about every 5 ms until ``stop``: steady traffic that leaves the CPU to the fuzzer."""
    confirmed = 0
    while not stop.is_set():
        reply = await producer.request({"op": "push", "queue": LEDGER_QUEUE, "body": {"n": confirmed}})
        assert reply["op"] == "pushed", reply
        producer.ledger.pushed.add(reply["id"])
        confirmed += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.005)  # pacing, not synchronisation
    return confirmed


@pytest.mark.slow
@pytest.mark.timeout(120)  # typically ~20 s; generous for a loaded CI machine
async def test_fuzzed_frames_get_errors_or_clean_closes_and_hurt_no_one(
    redis_url: str, redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    plays = generate(SEQUENCES)
    assert len(plays) == SEQUENCES
    caplog.set_level(logging.WARNING)
    ledger = Ledger()
    harness = Harness()
    async with run_broker(make_settings(redis_url, CONFIG)) as broker:
        try:
            consumer = await harness.client(Consumer(broker.ws_url, LEDGER_QUEUE, ledger, prefetch=5))
            producer = await harness.client(WsProducer(broker.ws_url, LEDGER_QUEUE, ledger))
            stop = asyncio.Event()
            producing = harness.task(paced(producer, stop))
            outcome = Outcome()
            for sequence in plays:
                await play(broker.ws_url, sequence, outcome)
            stop.set()
            produced = await producing
            await wait_for(ledger.all_acked, timeout=20, message=f"ledger incomplete: {ledger.summary()}")
            ledger.check()
            assert produced > 0 and not consumer.errors and not producer.failures
            # Still healthy: the fuzzed connections are gone, a newcomer is served.
            hub = broker.app.state.runtime.delivery  # type: ignore[attr-defined]
            await wait_for(lambda: len(hub.connections) == 2, message="fuzzed connections linger")
            async with connect(broker.ws_url + "/fuzz") as ws:
                assert orjson.loads(await ws.recv())["op"] == "subscribed"
        finally:
            await harness.aclose()
    for name in FUZZ_QUEUES:
        await check_queue(redis, name)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[:5]
    assert not outcome.problems, "\n".join(outcome.problems[:10])
    # The fuzzer did reach the interesting places.
    assert outcome.ops["job"] and outcome.ops["pushed"] and outcome.ops["subscribed"], outcome.ops
    assert {"bad_json", "bad_frame", "unknown_op", "bad_field", "too_large"} <= set(outcome.codes), outcome.codes
    assert outcome.closes[1009] and outcome.closes[1000], outcome.closes
