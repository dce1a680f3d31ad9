"""The lean fronts of scripts (scripts.py, FRONTED) are their general scripts, observably: for the
same queue state and arguments, push_fetch.lua's hand-off (the jobs a fetch would take written
straight as leased) and push_then_fetch.lua, or ack.lua and ack_general.lua, give the same reply,
leave the same keys with the same contents, and publish the same wake-ups.

Each case runs both scripts from one snapshot of the queue (DUMP/RESTORE), with Redis's TIME
fixed (a proxy of ``redis`` in front of the script, so that timestamps, deadlines and latencies
compare exactly) and every command the script calls logged (to tell which path ran, and what was
published). The cases cover the options a job can carry and the states a queue can be in; the
ones meant for a front's own path assert that it ran, so that the comparison is not only the
general path's with itself.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from broker import keys
from broker.models import PushOptions
from broker.queue import QueuePolicy, QueueService, _push_args
from broker.scripts import script_source

pytestmark = pytest.mark.core

Q = "handoff"
K = keys.queue_keys(Q)
LOG = "presque:{handoff}:test-log"  # the queue's slot: one script may touch it on a Cluster

# Shadows the global `redis` for the whole script (the general path gets it as its parameter).
PROXY = """local real = redis
local FIXED = {'%d', '%d'}
local redis = setmetatable({call = function(command, ...)
  if command == 'TIME' then return FIXED end
  local logged = command
  for i = 1, select('#', ...) do logged = logged .. ' ' .. tostring((select(i, ...))) end
  real.call('RPUSH', KEYS[13], logged)
  return real.call(command, ...)
end}, {__index = real})
"""

Setup = Callable[[QueueService], Awaitable[Any]]


@dataclass
class Case:
    jobs: list[PushOptions]
    count: int = 100
    lease: float = 30.0
    max_inflight: int = 0
    rate: float = 0.0
    count_failure: bool = False
    setup: list[str] = field(default_factory=list)  # names of SETUPS
    shift: float = 0.0  # seconds from the setup's time to the scripts' fixed TIME
    calls: int = 1  # 2: the same arguments again (a resend)


async def _ready(service: QueueService) -> None:
    await service.push_many(Q, [(b"r", PushOptions())])


async def _ready_ttl(service: QueueService) -> None:
    await service.push_many(Q, [(b"rt", PushOptions(ttl=60))])


async def _delayed(service: QueueService) -> None:
    await service.push_many(Q, [(b"d", PushOptions(delay=60, priority=9))])


async def _leased(service: QueueService) -> None:
    await service.push_many(Q, [(b"l", PushOptions(uniq="held"))])
    await service.fetch(Q, count=1, lease=30)


async def _uniq(service: QueueService) -> None:
    await service.push_many(Q, [(b"u", PushOptions(uniq="u1", delay=600))])


async def _paused(service: QueueService) -> None:
    await service.pause(Q)


SETUPS: dict[str, Setup] = {
    "ready": _ready,
    "ready_ttl": _ready_ttl,
    "delayed": _delayed,
    "leased": _leased,
    "uniq": _uniq,
    "paused": _paused,
}


async def _state(redis: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in K.all():
        kind = (await redis.type(key)).decode()
        if kind == "zset":
            out[key] = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "hash":
            out[key] = await redis.hgetall(key)
        else:
            assert kind == "none", (key, kind)
    return out


async def _run(redis: Any, name: str, now: float, calls: list[list[Any]]) -> tuple[list[Any], list[str]]:
    seconds, micros = divmod(round(now * 1e6), 1_000_000)
    source = PROXY % (seconds, micros) + script_source(name)
    replies, log = [], []
    for args in calls:
        await redis.delete(LOG)
        replies.append(await redis.eval(source, 13, *K.all(), LOG, *args))
        log += [entry.decode() for entry in await redis.lrange(LOG, 0, -1)]
    await redis.delete(LOG)
    return replies, log


async def agree(redis: Any, front: str, general: str, now: float, calls: list[list[Any]]) -> list[str]:
    """Run ``calls`` through both scripts from the queue's present state; assert they agree.

    Returns the commands the front called (its log)."""
    snapshot = {key: await redis.dump(key) for key in K.all()}
    results = []
    for name in (front, general):
        await redis.delete(*K.all())
        for key, dumped in snapshot.items():
            if dumped is not None:
                await redis.restore(key, 0, dumped)
        replies, log = await _run(redis, name, now, calls)
        results.append((replies, await _state(redis), [e for e in log if e.startswith("PUBLISH")], log))
    (front_replies, front_state, front_wakes, front_log), (replies, state, wakes, _) = results
    assert front_replies == replies
    assert front_state == state
    assert front_wakes == wakes
    return front_log


async def _clock(redis: Any, shift: float) -> float:
    seconds, micros = await redis.time()
    return float(seconds + micros / 1e6 + shift)


# -- push_fetch.lua ------------------------------------------------------------------------------


async def compare(redis: Any, case: Case) -> bool:
    """Run ``case`` through both scripts; assert they agree; returns whether the hand-off ran."""
    await redis.delete(*K.all(), LOG)
    service = QueueService(redis, QueuePolicy())
    for name in case.setup:
        await SETUPS[name](service)
    fetch_args = [case.count, case.lease, "tok-", case.max_inflight, case.rate]
    jobs = [(f"body{i}".encode(), options) for i, options in enumerate(case.jobs)]
    args = fetch_args + _push_args(Q, jobs, case.count_failure, False)
    log = await agree(redis, "push_fetch", "push_then_fetch", await _clock(redis, case.shift), [args] * case.calls)
    # The general path's fetch reads the state hash with HMGET; the hand-off never does.
    return not any(entry.startswith(f"HMGET {K.state}") for entry in log)


HANDED_OFF = [
    Case([PushOptions()]),
    Case([PushOptions()], count=1),
    Case([PushOptions()], lease=0),
    Case([PushOptions()], lease=2.5, count_failure=True),
    Case([PushOptions(priority=9, max_attempts=1, ttl=10, uniq="u2")]),
    Case([PushOptions(uniq='q"\\é')], lease=0),
    Case([PushOptions(ttl=0.5)], setup=["leased", "uniq"]),
    Case([PushOptions()], setup=["delayed"]),  # not due: its run_at is the hint
    Case([PushOptions()], max_inflight=1, lease=0),  # a destructive fetch ignores max_inflight
    Case([PushOptions(), PushOptions(), PushOptions()], count=3),
    Case([PushOptions(uniq="a"), PushOptions(ttl=5), PushOptions(uniq="b", max_attempts=2)], count=5),
    Case([PushOptions(priority=0), PushOptions(priority=0, uniq="x")], lease=0, setup=["uniq"]),
]

GENERAL = [
    Case([PushOptions()], setup=["ready"]),
    Case([PushOptions()], setup=["ready_ttl"], shift=120),
    Case([PushOptions()], setup=["delayed"], shift=120),  # due: promoted, and first (priority 9)
    Case([PushOptions()], setup=["paused"]),
    Case([PushOptions()], rate=10),
    Case([PushOptions()], max_inflight=1, setup=["leased"]),
    Case([PushOptions()], max_inflight=5),
    Case([PushOptions(delay=30)]),
    Case([PushOptions(delay=30)], setup=["delayed"]),
    Case([PushOptions(priority=1), PushOptions(priority=2)]),
    Case([PushOptions(), PushOptions(), PushOptions()], count=2),
    Case([PushOptions(uniq="u1")], setup=["uniq"]),  # taken
    Case([PushOptions(uniq="d"), PushOptions(uniq="d")]),  # twice in the call
    Case([PushOptions(ttl=0.00001)]),  # its meta's rounded expire_at may be past already
    Case([PushOptions()], calls=2),  # the resend finds its job
    Case([PushOptions()], count=0),
]


@pytest.mark.parametrize("case", HANDED_OFF)
async def test_the_hand_off_runs_and_is_the_general_path(redis: Any, case: Case) -> None:
    assert await compare(redis, case)


@pytest.mark.parametrize("case", GENERAL)
async def test_other_cases_take_the_general_path(redis: Any, case: Case) -> None:
    if case.jobs[0].ttl == 0.00001:
        await compare(redis, case)  # either path, depending on the clock's digits
    else:
        assert not await compare(redis, case)


async def test_random_cases_agree(redis: Any) -> None:
    rng = random.Random(6)
    handed_off = 0
    for _ in range(150):
        options = [
            PushOptions(
                priority=rng.choice([5, 5, 5, 9]),
                delay=rng.choice([0.0, 0.0, 0.0, 30.0]),
                ttl=rng.choice([0.0, 0.0, 10.0, 200.0]),
                uniq=rng.choice(["", "", "", "u1", "u2", "u3"]),
                max_attempts=rng.choice([5, 1, 3]),
            )
            for _ in range(rng.choice([1, 1, 1, 2, 3]))
        ]
        if rng.random() < 0.5:
            options = [options[0]] * len(options)  # one options record in the grouped layout
        case = Case(
            options,
            count=rng.choice([1, 2, 5, 100]),
            lease=rng.choice([30.0, 30.0, 0.0, 2.5]),
            max_inflight=rng.choice([0, 0, 0, 3]),
            rate=rng.choice([0, 0, 0, 10]),
            count_failure=rng.random() < 0.2,
            setup=[name for name in SETUPS if rng.random() < 0.15],
            shift=rng.choice([0.0, 0.0, 120.0]),
            calls=rng.choice([1, 1, 1, 2]),
        )
        handed_off += await compare(redis, case)
    assert handed_off >= 20  # the comparison covered the hand-off, not only the general path


# -- ack.lua -------------------------------------------------------------------------------------


@dataclass
class Ack:
    acks: list[tuple[int, str]]  # (job index, "right" | "wrong" | "unknown")
    uniq: frozenset[int] = frozenset()  # indexes of the jobs pushed with a uniq key
    notify: int = 0
    shift: float = 0.0
    acked: frozenset[int] = frozenset()  # indexes of the jobs acked before
    jobs: int = 3


async def compare_ack(redis: Any, case: Ack) -> bool:
    """Run ``case`` through ack.lua and ack_general.lua; assert they agree; returns whether
    ack.lua's own path ran."""
    await redis.delete(*K.all(), LOG)
    service = QueueService(redis, QueuePolicy())
    pushed = [(f"a{i}".encode(), PushOptions(uniq=f"u{i}" if i in case.uniq else "")) for i in range(case.jobs)]
    await service.push_many(Q, pushed)
    taken = {job.body: job for job in (await service.fetch(Q, count=case.jobs, lease=30)).jobs}
    leases = [(taken[body].id, taken[body].token or "") for body, _ in pushed]
    for i in case.acked:
        await service.ack(Q, *leases[i])
    args: list[Any] = [keys.wake_channel(Q), case.notify]
    for i, kind in case.acks:
        job_id, token = leases[i]
        args += [job_id if kind != "unknown" else "nope", token if kind != "wrong" else token + "x"]
    log = await agree(redis, "ack", "ack_general", await _clock(redis, case.shift), [args])
    # The general path reads the lease entries again.
    return sum(entry.startswith(f"HMGET {K.lease}") for entry in log) == 1


ACKED_BY_THE_FRONT = [
    Ack([(0, "right")]),
    Ack([(0, "right")], notify=1),
    Ack([(2, "right"), (0, "right"), (1, "right")], uniq=frozenset({3}), jobs=4),
    Ack([(0, "right")], uniq=frozenset({0})),
    Ack([(0, "right"), (1, "right"), (2, "right")], uniq=frozenset({0, 2}), notify=1),
]

ACKED_BY_THE_GENERAL_PATH = [
    Ack([(0, "right"), (1, "wrong")], uniq=frozenset({0})),
    Ack([(0, "wrong")]),
    Ack([(0, "right"), (1, "wrong")]),
    Ack([(0, "unknown")]),
    Ack([(0, "right"), (0, "right")]),
    Ack([(0, "right")], shift=60),  # the lease has expired
    Ack([(0, "right"), (1, "right")], acked=frozenset({1})),
]


@pytest.mark.parametrize("case", ACKED_BY_THE_FRONT)
async def test_ack_s_own_path_runs_and_is_the_general_path(redis: Any, case: Ack) -> None:
    assert await compare_ack(redis, case)


@pytest.mark.parametrize("case", ACKED_BY_THE_GENERAL_PATH)
async def test_other_acks_take_the_general_path(redis: Any, case: Ack) -> None:
    # Not all of them read a meta (a lease past its deadline is stale by its entry alone): the
    # comparison is what matters here.
    await compare_ack(redis, case)


async def test_random_acks_agree(redis: Any) -> None:
    rng = random.Random(7)
    by_the_front = 0
    for _ in range(60):
        jobs = rng.choice([1, 2, 4])
        kinds = ["right"] * 6 + ["wrong", "unknown"]
        acks = [(rng.randrange(jobs), rng.choice(kinds)) for _ in range(rng.choice([1, 1, 2, 3]))]
        case = Ack(
            acks,
            uniq=frozenset(i for i in range(jobs) if rng.random() < 0.3),
            notify=rng.choice([0, 1]),
            shift=rng.choice([0.0, 0.0, 0.0, 60.0]),
            acked=frozenset(i for i in range(jobs) if rng.random() < 0.1),
            jobs=jobs,
        )
        by_the_front += await compare_ack(redis, case)
    assert by_the_front >= 10
