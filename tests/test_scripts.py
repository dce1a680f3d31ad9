"""The Lua scripts (``broker/lua``) through ``QueueService``, against a real redis-server.

Each test drives one path of the queue model and then checks Redis itself: sizes, counters, and
the storage invariant of ``tests/invariants.py`` (no orphan body, meta or uniq entry).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker import keys
from broker import queue as queue_module
from broker.config import QueueLimit
from broker.errors import JobExists, NoJob, StaleToken, UnknownJob
from broker.models import JobState, Meta, PushOptions, new_job_id
from broker.queue import QueuePolicy, QueueService
from tests.invariants import check_queue
from tests.servers import RedisServer, wait_for

pytestmark = pytest.mark.core

Q = "jobs"
MakeService = Callable[..., QueueService]


@pytest.fixture
def make_service(redis: aioredis.Redis) -> MakeService:
    def make(limit: QueueLimit | None = None, **policy: Any) -> QueueService:
        return QueueService(redis, QueuePolicy(**policy), limits=(lambda _q: limit) if limit else None)

    return make


@pytest.fixture
def service(make_service: MakeService) -> QueueService:
    return make_service(backoff_base=0.0)


async def redis_now(redis: aioredis.Redis) -> float:
    seconds, micros = await redis.time()
    return float(seconds) + micros / 1e6


async def until_redis_time(redis: aioredis.Redis, moment: float, timeout: float = 5.0) -> None:
    """Wait until Redis's clock (the one every script uses) is past ``moment``."""

    async def past() -> bool:
        return await redis_now(redis) > moment

    await wait_for(past, timeout)


def opts(**kwargs: Any) -> PushOptions:
    return PushOptions(**kwargs)


async def push(service: QueueService, body: bytes = b'{"n": 1}', **kwargs: Any) -> str:
    return await service.push(Q, body, opts(**kwargs))


async def lease_one(service: QueueService, lease: float = 30.0) -> tuple[str, str, int]:
    result = await service.fetch(Q, lease=lease)
    assert len(result.jobs) == 1, result
    job = result.jobs[0]
    assert job.token is not None
    return job.id, job.token, job.attempt


async def stats(redis: aioredis.Redis, queue: str = Q) -> dict[str, int]:
    raw = await redis.hgetall(keys.queue_keys(queue).stats)
    return {k.decode(): int(v) for k, v in raw.items()}


# -- push ---------------------------------------------------------------------------------------


async def test_push_stores_body_byte_for_byte(service: QueueService, redis: aioredis.Redis) -> None:
    body = b'{"foo":"bar", "foo2":"bar" }'
    job_id = await push(service, body)
    view = await service.job(Q, job_id)
    assert (view.state, view.body, view.priority, view.attempt, view.failures) == (JobState.READY, body, 5, 0, 0)
    assert view.max_attempts == 5 and view.last_error is None
    assert await redis.smembers(keys.QUEUES) == {Q.encode()}
    assert await stats(redis) == {"pushed": 1}
    assert (await check_queue(redis, Q))["ready"] == {job_id}


async def test_push_batch_keeps_order(service: QueueService, redis: aioredis.Redis) -> None:
    results = await service.push_many(Q, [(b"[%d]" % i, opts()) for i in range(5)])
    assert all(isinstance(r, str) for r in results) and len(set(results)) == 5
    fetched = await service.fetch(Q, count=10)
    assert [j.body for j in fetched.jobs] == [b"[%d]" % i for i in range(5)]
    assert [j.id for j in fetched.jobs] == results
    await check_queue(redis, Q)


async def test_push_uniq_conflict_names_the_existing_job(service: QueueService, redis: aioredis.Redis) -> None:
    first = await push(service, uniq="u1")
    with pytest.raises(JobExists) as caught:
        await push(service, b"2", uniq="u1")
    assert caught.value.existing_id == first
    assert caught.value.payload() == {"error": "job already exists", "id": first}
    assert await stats(redis) == {"pushed": 1}
    await check_queue(redis, Q)
    # Another queue has its own uniq keys.
    assert await service.push("other", b"3", opts(uniq="u1"))


async def test_push_uniq_conflict_within_one_batch(service: QueueService, redis: aioredis.Redis) -> None:
    results = await service.push_many(Q, [(b"1", opts(uniq="u")), (b"2", opts(uniq="u")), (b"3", opts())])
    first, dup, third = results
    assert isinstance(first, str) and isinstance(third, str)
    assert isinstance(dup, JobExists) and dup.existing_id == first
    assert (await check_queue(redis, Q))["ready"] == {first, third}
    assert await stats(redis) == {"pushed": 2}


async def test_push_all_or_nothing_pushes_none_on_a_conflict(service: QueueService, redis: aioredis.Redis) -> None:
    holder = await push(service, uniq="taken")
    results = await service.push_many(
        Q, [(b"1", opts(uniq="free")), (b"2", opts(uniq="taken")), (b"3", opts())], all_or_nothing=True
    )
    assert isinstance(results[1], JobExists) and results[1].existing_id == holder
    assert (await check_queue(redis, Q))["ready"] == {holder}
    assert await redis.hkeys(keys.queue_keys(Q).uniq) == [b"taken"]
    # A conflict inside the batch itself counts too.
    results = await service.push_many(Q, [(b"1", opts(uniq="x")), (b"2", opts(uniq="x"))], all_or_nothing=True)
    assert isinstance(results[1], JobExists)
    assert (await check_queue(redis, Q))["ready"] == {holder}
    assert await stats(redis) == {"pushed": 1}
    # Without conflict, all are pushed.
    results = await service.push_many(Q, [(b"1", opts(uniq="x")), (b"2", opts(uniq="y"))], all_or_nothing=True)
    assert all(isinstance(r, str) for r in results)
    assert len((await check_queue(redis, Q))["ready"]) == 3


def push_args_of(queue: str, jobs: list[tuple[Any, ...]]) -> list[Any]:
    """push.lua's flat layout: 7 fields per job."""
    args: list[Any] = [keys.wake_channel(queue), 0, 0]
    for job in jobs:
        args += job
    return args


def push_args(jobs: list[tuple[str, bytes, str]]) -> list[Any]:
    args: list[Any] = [keys.wake_channel(Q), 0, 0]
    for job_id, body, uniq in jobs:
        args += [job_id, body, 5, 0, 0, uniq, 5]
    return args


async def test_push_retried_with_the_same_ids_pushes_once(service: QueueService, redis: aioredis.Redis) -> None:
    # redis-py resends a script call whose reply was lost; the ids minted before the first try
    # make the second one a no-op.
    await service.push(Q, b"0", opts())  # registers the queue, seq 1
    ids = [new_job_id() for _ in range(3)]
    args = push_args([(ids[0], b"a", ""), (ids[1], b"b", "k"), (ids[2], b"c", "")])
    qkeys = keys.queue_keys(Q).all()
    first = await service.scripts.push(keys=qkeys, args=args)
    again = await service.scripts.push(keys=qkeys, args=args)
    assert [x.decode() for x in first] == ids
    assert [x.decode() for x in again] == ids
    assert await stats(redis) == {"pushed": 4}
    assert len((await check_queue(redis, Q))["ready"]) == 4


async def test_push_retry_is_idempotent_when_some_jobs_conflicted(service: QueueService, redis: aioredis.Redis) -> None:
    # Coalesced single pushes share a call: its first job may be a uniq conflict while the
    # others are accepted. A retry of that call must not push the others a second time.
    holder = await push(service, b"0", uniq="taken")
    accepted = new_job_id()
    rejected = new_job_id()
    args = push_args([(rejected, b"a", "taken"), (accepted, b"b", "")])
    qkeys = keys.queue_keys(Q).all()
    first = await service.scripts.push(keys=qkeys, args=args)
    assert [x.decode() for x in first] == [f"!{holder}", accepted]
    order_before = await redis.zrange(keys.queue_keys(Q).ready, 0, -1, withscores=True)
    again = await service.scripts.push(keys=qkeys, args=args)
    assert [x.decode() for x in again] == [f"!{holder}", accepted]
    assert await stats(redis) == {"pushed": 2}
    assert await redis.zrange(keys.queue_keys(Q).ready, 0, -1, withscores=True) == order_before
    await check_queue(redis, Q)


def grouped_push_args(queue: str, jobs: list[tuple[Any, ...]]) -> list[Any]:
    """push.lua's grouped layout of ``jobs`` (id, body, priority, delay, ttl, uniq, max_attempts)."""
    args: list[Any] = [keys.wake_channel(queue), 0, 0]
    last = None
    for job_id, body, *options in jobs:
        if options != last:
            args += ["", *options]
            last = options
        args += [job_id, body]
    return args


def mixed_jobs(count: int) -> list[tuple[Any, ...]]:
    """Runs of jobs sharing their options, and odd ones between them."""
    jobs: list[tuple[Any, ...]] = []
    for i in range(count):
        options: tuple[Any, ...] = (5, 0.0, 0.0, "", 5)
        if i % 40 >= 30:
            options = (
                i % 10,
                [0, 0.0, 1.5, 30][i % 4],
                [0.0, 10, 2.25][i % 3],
                f"u{i}" if i % 7 == 0 else "",
                1 + i % 3,
            )
        jobs.append((new_job_id(), b"[%d]" % i, *options))
    return jobs


async def test_push_layouts_write_the_same_jobs(service: QueueService, redis: aioredis.Redis) -> None:
    # The grouped layout (what QueueService sends) and the flat one write the same jobs. Each
    # meta is what cjson would write; seqs run on across hundreds (push.lua takes the last two
    # digits of consecutive integers from a table) and so do ready scores.
    jobs = mixed_jobs(260)
    for queue, args in (("flat", push_args_of("flat", jobs)), ("grouped", grouped_push_args("grouped", jobs))):
        await redis.hset(keys.queue_keys(queue).stats, "pushed", 95)
        ids = [x.decode() for x in await service.scripts.push(keys=keys.queue_keys(queue).all(), args=args)]
        assert ids == [job[0] for job in jobs]
        await check_queue(redis, queue)
    flat, grouped = keys.queue_keys("flat"), keys.queue_keys("grouped")
    assert await redis.hgetall(flat.body) == await redis.hgetall(grouped.body)
    assert await redis.hgetall(flat.uniq) == await redis.hgetall(grouped.uniq)
    for name in ("ready", "delayed", "expiry"):
        assert [m for m, _ in await redis.zrange(getattr(flat, name), 0, -1, withscores=True)] == [
            m for m, _ in await redis.zrange(getattr(grouped, name), 0, -1, withscores=True)
        ]
    assert await redis.zrange(flat.ready, 0, -1, withscores=True) == await redis.zrange(
        grouped.ready, 0, -1, withscores=True
    )
    ready = dict(await redis.zrange(grouped.ready, 0, -1, withscores=True))
    flat_metas, grouped_metas = await redis.hgetall(flat.meta), await redis.hgetall(grouped.meta)
    roundtrip = "local out = {} for i, m in ipairs(ARGV) do out[i] = cjson.encode(cjson.decode(m)) end return out"
    for seq, (job_id, _body, priority, delay, ttl, uniq, max_attempts) in enumerate(jobs, start=96):
        raw = grouped_metas[job_id.encode()]
        assert await redis.eval(roundtrip, 0, raw) == [raw]
        meta = orjson.loads(raw)
        assert meta[Meta.PRIORITY - 1 : Meta.MAX_ATTEMPTS] == [priority, seq, 0, 0, max_attempts]
        assert meta[Meta.UNIQ - 1 :] == [uniq, "", 0, "", 0]
        assert (meta[Meta.TTL - 1] > 0) == (ttl > 0)
        flat_meta = orjson.loads(flat_metas[job_id.encode()])
        assert flat_meta[: Meta.CREATED_AT - 1] == meta[: Meta.CREATED_AT - 1]
        assert flat_meta[Meta.UNIQ - 1 :] == meta[Meta.UNIQ - 1 :]
        if delay == 0:
            assert ready[job_id.encode()] == (9 - priority) * 2**48 + seq


async def test_push_retry_in_the_grouped_layout_pushes_once(service: QueueService, redis: aioredis.Redis) -> None:
    holder = await push(service, b"0", uniq="taken")
    jobs = [(new_job_id(), b"a", 5, 0, 0, "taken", 5), *[(new_job_id(), b"b", 5, 0, 0, "", 5) for _ in range(3)]]
    args = grouped_push_args(Q, jobs)
    qkeys = keys.queue_keys(Q).all()
    first = await service.scripts.push(keys=qkeys, args=args)
    again = await service.scripts.push(keys=qkeys, args=args)
    assert [x.decode() for x in first] == [x.decode() for x in again] == [f"!{holder}"] + [j[0] for j in jobs[1:]]
    assert await stats(redis) == {"pushed": 4}
    await check_queue(redis, Q)


async def test_push_resent_after_some_of_its_jobs_were_consumed(service: QueueService, redis: aioredis.Redis) -> None:
    # A resend is told job by job: a job still there is not pushed again; one consumed in
    # between (destructively: nothing is left of it) is, as at-least-once allows.
    jobs = [(new_job_id(), b"%d" % i, 5, 0, 0, "", 5) for i in range(3)]
    args = grouped_push_args(Q, jobs)
    qkeys = keys.queue_keys(Q).all()
    await service.scripts.push(keys=qkeys, args=args)
    taken = await service.fetch(Q, count=2)
    assert [job.id for job in taken.jobs] == [jobs[0][0], jobs[1][0]]
    again = await service.scripts.push(keys=qkeys, args=args)
    assert [x.decode() for x in again] == [job[0] for job in jobs]
    assert (await stats(redis))["pushed"] == 5
    assert (await check_queue(redis, Q))["ready"] == {job[0] for job in jobs}


async def test_push_delayed(service: QueueService, redis: aioredis.Redis) -> None:
    before = await redis_now(redis)
    job_id = await push(service, delay=30)
    view = await service.job(Q, job_id)
    assert view.state == JobState.DELAYED
    assert before + 30 <= view.run_at <= await redis_now(redis) + 30
    result = await service.fetch(Q)
    assert result.empty and result.jobs == []
    assert result.next_run_at == pytest.approx(view.run_at, abs=1e-3)
    assert (await check_queue(redis, Q))["delayed"] == {job_id}


async def test_ttl_counts_from_when_the_job_becomes_ready(service: QueueService, redis: aioredis.Redis) -> None:
    job_id = await push(service, delay=60, ttl=5)
    view = await service.job(Q, job_id)
    assert await redis.zscore(keys.queue_keys(Q).expiry, job_id) == pytest.approx(view.run_at + 5, abs=1e-3)


async def test_push_counted_as_failure(service: QueueService, redis: aioredis.Redis) -> None:
    await service.push(Q, b"1", opts(), count_failure=True)
    assert await stats(redis) == {"pushed": 1, "failed": 1}


# -- fetch --------------------------------------------------------------------------------------


async def test_fetch_priority_order_and_fifo_within_priority(service: QueueService, redis: aioredis.Redis) -> None:
    order = [(1, "a"), (9, "b"), (5, "c"), (9, "d"), (0, "e"), (5, "f"), (9, "g")]
    for priority, name in order:
        await push(service, f'"{name}"'.encode(), priority=priority)
    fetched = await service.fetch(Q, count=len(order))
    assert [j.body for j in fetched.jobs] == [b'"b"', b'"d"', b'"g"', b'"c"', b'"f"', b'"a"', b'"e"']
    await check_queue(redis, Q)


async def test_destructive_fetch_removes_the_job(service: QueueService, redis: aioredis.Redis) -> None:
    job_id = await push(service, b'{"x": 1}', uniq="once")
    job = await service.fetch_one(Q)
    assert (job.id, job.body, job.attempt, job.token) == (job_id, b'{"x": 1}', 1, None)
    assert job.latency >= 0
    with pytest.raises(UnknownJob):
        await service.job(Q, job_id)
    assert await stats(redis) == {"pushed": 1, "processed": 1}
    assert await check_queue(redis, Q) == {"ready": set(), "delayed": set(), "leased": set(), "dead": set()}
    assert await redis.hlen(keys.queue_keys(Q).uniq) == 0
    with pytest.raises(NoJob):
        await service.fetch_one(Q)


async def test_leased_fetch_reserves_the_job(service: QueueService, redis: aioredis.Redis) -> None:
    job_id = await push(service)
    before = await redis_now(redis)
    got, token, attempt = await lease_one(service, lease=20)
    assert (got, attempt) == (job_id, 1)
    deadline = await redis.zscore(keys.queue_keys(Q).leased, job_id)
    assert before + 20 <= deadline <= await redis_now(redis) + 20
    assert (await service.job(Q, job_id)).state == JobState.LEASED
    assert (await service.fetch(Q)).empty
    assert await stats(redis) == {"pushed": 1}
    assert (await check_queue(redis, Q))["leased"] == {job_id}
    # Tokens of one call differ, and differ between calls.
    await push(service)
    await push(service)
    both = await service.fetch(Q, count=2, lease=5)
    assert len({j.token for j in both.jobs} | {token}) == 3


async def test_fetch_says_whether_ready_jobs_are_left(service: QueueService, redis: aioredis.Redis) -> None:
    for _ in range(3):
        await push(service)
    partial = await service.fetch(Q, count=2, lease=5)
    assert len(partial.jobs) == 2 and partial.more and partial.next_run_at is None and not partial.empty
    last = await service.fetch(Q, count=2, lease=5)
    assert len(last.jobs) == 1 and not last.more and last.next_run_at is None and not last.empty
    await push(service)
    exact = await service.fetch(Q, count=1)  # destructive: same answer
    assert len(exact.jobs) == 1 and not exact.more
    assert (await service.fetch(Q)).empty


async def test_fetch_drops_and_counts_ttl_expired_jobs(service: QueueService, redis: aioredis.Redis) -> None:
    stale = await push(service, b'"stale"', ttl=0.05, uniq="s")
    fresh = await push(service, b'"fresh"', ttl=60)
    plain = await push(service, b'"plain"')
    expire_at = (await redis.zscore(keys.queue_keys(Q).expiry, stale)) or 0.0
    await until_redis_time(redis, expire_at)
    result = await service.fetch(Q, count=3, lease=10)
    assert [j.id for j in result.jobs] == [fresh, plain]
    assert await stats(redis) == {"pushed": 3, "expired": 1}
    assert await redis.hlen(keys.queue_keys(Q).uniq) == 0
    states = await check_queue(redis, Q)
    assert states["leased"] == {fresh, plain} and states["ready"] == set()


async def test_fetch_of_only_expired_jobs_is_not_empty_but_nothing(
    service: QueueService, redis: aioredis.Redis
) -> None:
    job_id = await push(service, ttl=0.05)
    expire_at = (await redis.zscore(keys.queue_keys(Q).expiry, job_id)) or 0.0
    await until_redis_time(redis, expire_at)
    result = await service.fetch(Q)
    assert result.jobs == [] and not result.empty  # "look again": the next fetch says empty
    assert (await service.fetch(Q)).empty
    await push(service, ttl=0.05)
    await until_redis_time(redis, await redis_now(redis) + 0.06)
    with pytest.raises(NoJob):
        await service.fetch_one(Q)
    assert (await stats(redis))["expired"] == 2
    await check_queue(redis, Q)


async def test_paused_queue_accepts_pushes_but_hands_out_nothing(service: QueueService, redis: aioredis.Redis) -> None:
    await service.pause(Q)
    assert await service.is_paused(Q)
    job_id = await push(service)
    assert (await service.fetch(Q)).paused
    assert (await service.fetch(Q, lease=5)).paused
    assert (await service.info(Q)).paused
    await service.resume(Q)
    assert not await service.is_paused(Q)
    assert (await service.fetch_one(Q)).id == job_id


async def test_max_inflight_caps_leased_jobs(make_service: MakeService, redis: aioredis.Redis) -> None:
    service = make_service(QueueLimit(max_inflight=2))
    for i in range(5):
        await push(service, b"%d" % i)
    first = await service.fetch(Q, count=5, lease=30)
    assert len(first.jobs) == 2
    blocked = await service.fetch(Q, lease=30)
    assert blocked.limited and blocked.jobs == [] and blocked.retry_in is None
    await service.ack(Q, first.jobs[0].id, first.jobs[0].token or "")
    assert len((await service.fetch(Q, count=5, lease=30)).jobs) == 1
    # Destructive fetches hold nothing in flight: not capped.
    assert len((await service.fetch(Q, count=5)).jobs) == 2
    await check_queue(redis, Q)


async def test_rate_limit_with_retry_hint(make_service: MakeService, redis: aioredis.Redis) -> None:
    service = make_service(QueueLimit(rate=1.0))
    for i in range(5):
        await push(service, b"%d" % i)
    burst = await service.fetch(Q, count=5)
    assert len(burst.jobs) == 1  # burst = max(rate, 1)
    limited = await service.fetch(Q)
    assert limited.limited and limited.jobs == []
    assert limited.retry_in is not None and 0 < limited.retry_in <= 1.0
    await until_redis_time(redis, await redis_now(redis) + limited.retry_in)
    assert len((await service.fetch(Q, count=5)).jobs) == 1
    await check_queue(redis, Q)


async def test_fetch_promotes_due_delayed_jobs_with_their_priority(
    service: QueueService, redis: aioredis.Redis
) -> None:
    low = await push(service, b'"low"', priority=1)
    delayed = await push(service, b'"delayed"', priority=9, delay=0.3)
    run_at = (await service.job(Q, delayed)).run_at
    first = await service.fetch(Q, lease=5)
    assert [j.id for j in first.jobs] == [low]  # not before its time
    # No ready job left: the fetch says so, and when the delayed one is due (no second fetch needed).
    assert not first.more and first.next_run_at == pytest.approx(run_at, abs=0.002)
    await until_redis_time(redis, run_at)
    await push(service, b'"later"', priority=1)
    second = await service.fetch(Q, count=2, lease=5)
    assert [j.body for j in second.jobs] == [b'"delayed"', b'"later"']
    await check_queue(redis, Q)


# -- ack ----------------------------------------------------------------------------------------


async def test_ack_removes_the_job_and_leaves_a_tombstone(service: QueueService, redis: aioredis.Redis) -> None:
    job_id = await push(service, uniq="k")
    _, token, _ = await lease_one(service)
    await service.ack(Q, job_id, token)
    assert await stats(redis) == {"pushed": 1, "processed": 1}
    assert await redis.zscore(keys.queue_keys(Q).done, job_id) is not None
    with pytest.raises(UnknownJob):
        await service.job(Q, job_id)
    assert await check_queue(redis, Q) == {"ready": set(), "delayed": set(), "leased": set(), "dead": set()}
    assert await redis.hlen(keys.queue_keys(Q).uniq) == 0
    # Acked twice: the tombstone makes it a stale token, not an unknown job.
    with pytest.raises(StaleToken):
        await service.ack(Q, job_id, token)


async def test_ack_of_an_unknown_job(service: QueueService) -> None:
    with pytest.raises(UnknownJob):
        await service.ack(Q, "nope", "token")
    # A destructively fetched job left no tombstone: it is simply gone.
    job_id = await push(service)
    await service.fetch_one(Q)
    with pytest.raises(UnknownJob):
        await service.ack(Q, job_id, "token")


async def test_ack_with_a_wrong_or_expired_token_is_stale(service: QueueService, redis: aioredis.Redis) -> None:
    job_id = await push(service)
    _, token, _ = await lease_one(service, lease=0.05)
    with pytest.raises(StaleToken):
        await service.ack(Q, job_id, token + "x")
    deadline = await redis.zscore(keys.queue_keys(Q).leased, job_id) or 0.0
    await until_redis_time(redis, deadline)
    with pytest.raises(StaleToken):  # expired, even before the reaper saw it
        await service.ack(Q, job_id, token)
    assert (await service.job(Q, job_id)).state == JobState.LEASED
    await check_queue(redis, Q)


async def test_ack_after_the_job_was_re_leased_is_stale(service: QueueService, redis: aioredis.Redis) -> None:
    job_id = await push(service)
    _, old_token, _ = await lease_one(service, lease=0.05)
    deadline = await redis.zscore(keys.queue_keys(Q).leased, job_id) or 0.0
    await until_redis_time(redis, deadline)
    assert (await service.reap(Q)).lease_expired == 1
    _, new_token, attempt = await lease_one(service)
    assert attempt == 2 and new_token != old_token
    with pytest.raises(StaleToken):
        await service.ack(Q, job_id, old_token)
    await service.ack(Q, job_id, new_token)
    assert (await stats(redis))["processed"] == 1
    await check_queue(redis, Q)


async def test_ack_many_reports_per_item(service: QueueService, redis: aioredis.Redis) -> None:
    await push(service)
    await push(service)
    jobs = (await service.fetch(Q, count=2, lease=30)).jobs
    a, b = jobs
    results = await service.ack_many(Q, [(a.id, a.token or ""), ("ghost", "t"), (b.id, "bad"), (a.id, a.token or "")])
    assert results[0] is None
    assert isinstance(results[1], UnknownJob)
    assert isinstance(results[2], StaleToken)
    assert isinstance(results[3], StaleToken)  # the same job twice in one call is acked once
    assert (await stats(redis))["processed"] == 1
    assert (await check_queue(redis, Q))["leased"] == {b.id}


# -- nack ---------------------------------------------------------------------------------------


async def test_nack_backs_off_exponentially_with_jitter(make_service: MakeService, redis: aioredis.Redis) -> None:
    service = make_service(backoff_base=10.0, backoff_max=25.0)
    offsets: dict[int, list[float]] = {1: [], 2: [], 3: []}
    for _ in range(4):
        job_id = await push(service, max_attempts=10)
        for failure in (1, 2, 3):
            got, token, _ = await lease_one(service)
            assert got == job_id
            before = await redis_now(redis)
            outcome = await service.nack(Q, job_id, token, error=f"boom {failure}")
            after = await redis_now(redis)
            assert outcome.outcome == "delayed"
            expected = min(10.0 * 2 ** (failure - 1), 25.0)
            assert before + 0.8 * expected - 1e-3 <= outcome.run_at <= after + 1.2 * expected + 1e-3
            offsets[failure].append(outcome.run_at - before)
            view = await service.job(Q, job_id)
            assert (view.state, view.failures, view.last_error) == (JobState.DELAYED, failure, f"boom {failure}")
            assert view.run_at == pytest.approx(outcome.run_at, abs=1e-3)
            # Make it due now to take the next step (the delay itself was checked above).
            await redis.zadd(keys.queue_keys(Q).delayed, {job_id: before})
        await service.ack(Q, *(await lease_one(service))[:2])
    assert len({round(x, 3) for x in offsets[1]}) > 1, "no jitter"
    assert (await stats(redis))["failed"] == 12 and (await stats(redis))["retried"] == 12
    await check_queue(redis, Q)


async def test_nack_explicit_delay_replaces_backoff(make_service: MakeService, redis: aioredis.Redis) -> None:
    service = make_service(backoff_base=100.0)
    job_id = await push(service)
    _, token, _ = await lease_one(service)
    outcome = await service.nack(Q, job_id, token, delay=0)
    assert outcome.outcome == "ready"
    _, token, attempt = await lease_one(service)
    assert attempt == 2
    before = await redis_now(redis)
    outcome = await service.nack(Q, job_id, token, delay=7.5)
    assert outcome.outcome == "delayed"
    assert before + 7.5 <= outcome.run_at <= await redis_now(redis) + 7.5
    view = await service.job(Q, job_id)
    assert (view.failures, view.attempt) == (2, 2)
    await check_queue(redis, Q)


async def test_nack_dead_letters_after_max_attempts_and_frees_uniq(
    service: QueueService, redis: aioredis.Redis
) -> None:
    job_id = await push(service, b'{"doomed": true}', max_attempts=2, uniq="u")
    _, token, _ = await lease_one(service)
    assert (await service.nack(Q, job_id, token, error="first")).outcome == "ready"
    _, token, _ = await lease_one(service)
    before = await redis_now(redis)
    assert (await service.nack(Q, job_id, token, error="second")).outcome == "dead"
    view = await service.job(Q, job_id)
    assert (view.state, view.failures, view.attempt, view.last_error) == (JobState.DEAD, 2, 2, "second")
    assert await stats(redis) == {"pushed": 1, "failed": 2, "retried": 1, "dead_lettered": 1}
    total, dead = await service.dead_list(Q)
    assert total == 1 and dead[0].id == job_id and dead[0].body == b'{"doomed": true}'
    assert dead[0].failed_at >= before and dead[0].last_error == "second" and dead[0].attempt == 2
    assert (await check_queue(redis, Q))["dead"] == {job_id}
    assert await redis.hlen(keys.queue_keys(Q).uniq) == 0
    assert await push(service, uniq="u") != job_id  # the key is free again


async def test_nack_unknown_and_stale(service: QueueService, redis: aioredis.Redis) -> None:
    with pytest.raises(UnknownJob):
        await service.nack(Q, "ghost", "t")
    job_id = await push(service)
    _, token, _ = await lease_one(service)
    with pytest.raises(StaleToken):
        await service.nack(Q, job_id, "wrong")
    await service.ack(Q, job_id, token)
    with pytest.raises(StaleToken):
        await service.nack(Q, job_id, token)
    assert "failed" not in await stats(redis)


async def test_nack_past_the_ttl_expires_instead_of_retrying(make_service: MakeService, redis: aioredis.Redis) -> None:
    service = make_service(backoff_base=100.0)
    job_id = await push(service, ttl=50, uniq="t")
    _, token, _ = await lease_one(service)
    assert (await service.nack(Q, job_id, token)).outcome == "expired"
    assert (await stats(redis))["expired"] == 1
    assert await check_queue(redis, Q) == {"ready": set(), "delayed": set(), "leased": set(), "dead": set()}
    assert await redis.hlen(keys.queue_keys(Q).uniq) == 0


# -- touch and release --------------------------------------------------------------------------


async def test_touch_extends_the_lease(service: QueueService, redis: aioredis.Redis) -> None:
    job_id = await push(service)
    _, token, _ = await lease_one(service, lease=5)
    before = await redis_now(redis)
    deadline = await service.touch(Q, job_id, token, 100)
    assert before + 100 <= deadline <= await redis_now(redis) + 100
    assert await redis.zscore(keys.queue_keys(Q).leased, job_id) == pytest.approx(deadline, abs=1e-3)
    before = await redis_now(redis)
    deadline = await service.touch(Q, job_id, token)  # default: the lease it was taken with
    assert before + 5 <= deadline <= await redis_now(redis) + 5
    await service.ack(Q, job_id, token)
    await check_queue(redis, Q)


async def test_touch_refuses_stale_and_unknown(service: QueueService, redis: aioredis.Redis) -> None:
    with pytest.raises(UnknownJob):
        await service.touch(Q, "ghost", "t", 10)
    job_id = await push(service)
    _, token, _ = await lease_one(service, lease=0.05)
    with pytest.raises(StaleToken):
        await service.touch(Q, job_id, "wrong", 10)
    deadline = await redis.zscore(keys.queue_keys(Q).leased, job_id) or 0.0
    await until_redis_time(redis, deadline)
    with pytest.raises(StaleToken):  # too late: the lease has lapsed
        await service.touch(Q, job_id, token, 10)
    assert await redis.zscore(keys.queue_keys(Q).leased, job_id) == deadline
    await check_queue(redis, Q)


async def test_release_returns_jobs_to_their_place_without_a_failure(
    service: QueueService, redis: aioredis.Redis
) -> None:
    ids = [await push(service, b'"%d"' % i) for i in range(3)]
    first = (await service.fetch(Q, count=2, lease=30)).jobs
    assert [j.id for j in first] == ids[:2]
    assert await service.release(Q, [(first[1].id, first[1].token or ""), ("ghost", "t")]) == 1
    assert await service.release(Q, [(first[0].id, "wrong")]) == 0
    assert await service.release(Q, [(first[0].id, first[0].token or "")]) == 1
    assert await service.release(Q, []) == 0
    assert "failed" not in await stats(redis)
    again = (await service.fetch(Q, count=3, lease=30)).jobs
    assert [j.id for j in again] == ids
    assert [j.attempt for j in again] == [2, 2, 1]
    view = await service.job(Q, ids[0])
    assert view.failures == 0
    await check_queue(redis, Q)


async def test_release_drops_a_job_past_its_ttl(service: QueueService, redis: aioredis.Redis) -> None:
    job_id = await push(service, ttl=0.3)
    _, token, _ = await lease_one(service)
    expire_at = (await service.job(Q, job_id)).run_at + 0.3
    await until_redis_time(redis, expire_at)
    assert await service.release(Q, [(job_id, token)]) == 1
    assert (await stats(redis))["expired"] == 1
    assert await check_queue(redis, Q) == {"ready": set(), "delayed": set(), "leased": set(), "dead": set()}


async def test_release_of_a_ttl_job_in_time_keeps_its_expiry(service: QueueService, redis: aioredis.Redis) -> None:
    job_id = await push(service, ttl=60)
    _, token, _ = await lease_one(service)
    assert await redis.zscore(keys.queue_keys(Q).expiry, job_id) is None
    assert await service.release(Q, [(job_id, token)]) == 1
    assert await redis.zscore(keys.queue_keys(Q).expiry, job_id) is not None
    await check_queue(redis, Q)


# -- reap ---------------------------------------------------------------------------------------


async def test_reap_returns_lapsed_leases_as_failures(make_service: MakeService, redis: aioredis.Redis) -> None:
    service = make_service(backoff_base=0.0)
    retried = await push(service, b'"retried"', max_attempts=3)
    doomed = await push(service, b'"doomed"', max_attempts=1)
    leased = (await service.fetch(Q, count=2, lease=0.05)).jobs
    assert {j.id for j in leased} == {retried, doomed}
    deadline = max(float(s) for _, s in await redis.zrange(keys.queue_keys(Q).leased, 0, -1, withscores=True))
    await until_redis_time(redis, deadline)
    result = await service.reap(Q)
    assert (result.lease_expired, result.dead_lettered, result.more) == (2, 1, False)
    view = await service.job(Q, retried)
    assert (view.state, view.failures, view.last_error) == (JobState.READY, 1, "lease expired")
    assert (await service.job(Q, doomed)).state == JobState.DEAD
    assert await stats(redis) == {"pushed": 2, "failed": 2, "retried": 1, "dead_lettered": 1}
    await check_queue(redis, Q)


async def test_reap_lapsed_lease_backs_off(make_service: MakeService, redis: aioredis.Redis) -> None:
    service = make_service(backoff_base=50.0)
    job_id = await push(service)
    await lease_one(service, lease=0.05)
    deadline = await redis.zscore(keys.queue_keys(Q).leased, job_id) or 0.0
    await until_redis_time(redis, deadline)
    before = await redis_now(redis)
    await service.reap(Q)
    view = await service.job(Q, job_id)
    assert view.state == JobState.DELAYED
    assert before + 40 - 1e-3 <= view.run_at <= await redis_now(redis) + 60
    await check_queue(redis, Q)


async def test_reap_promotes_due_delayed_jobs_and_wakes(service: QueueService, redis: aioredis.Redis) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.wake_channel(Q))
    try:
        job_id = await push(service, delay=0.3)
        run_at = (await service.job(Q, job_id)).run_at
        assert (await service.reap(Q)).promoted == 0
        await until_redis_time(redis, run_at)
        assert (await service.reap(Q)).promoted == 1
        assert (await service.job(Q, job_id)).state == JobState.READY
        payloads = []

        async def woken() -> bool:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message:
                payloads.append(message["data"])
            return b"0" in payloads

        await wait_for(woken)
        assert payloads[0] != b"0"  # the push announced its run_at first
    finally:
        await pubsub.aclose()
    await check_queue(redis, Q)


async def test_reap_drops_ttl_expired_waiting_jobs(service: QueueService, redis: aioredis.Redis) -> None:
    ready = await push(service, ttl=0.2, uniq="r")
    delayed = await push(service, delay=0.1, ttl=0.1)
    assert (await service.job(Q, delayed)).state == JobState.DELAYED
    keep = await push(service, ttl=100)
    leased_id = await push(service, ttl=0.5, priority=9)
    _, token, _ = await lease_one(service)
    expire_at = max(float(s) for _, s in (await redis.zrange(keys.queue_keys(Q).expiry, 0, -1, withscores=True))[:2])
    await until_redis_time(redis, expire_at)
    assert (await service.reap(Q)).expired == 2
    assert (await check_queue(redis, Q)) == {"ready": {keep}, "delayed": set(), "leased": {leased_id}, "dead": set()}
    for gone in (ready, delayed):
        with pytest.raises(UnknownJob):
            await service.job(Q, gone)
    assert await redis.hlen(keys.queue_keys(Q).uniq) == 0
    assert (await stats(redis))["expired"] == 2
    await service.ack(Q, leased_id, token)  # taken in time: it is not expired


async def test_reap_trims_tombstones(make_service: MakeService, redis: aioredis.Redis) -> None:
    service = make_service(tombstone_ttl=0.0)
    job_id = await push(service)
    _, token, _ = await lease_one(service)
    await service.ack(Q, job_id, token)
    with pytest.raises(StaleToken):
        await service.ack(Q, job_id, token)
    await until_redis_time(redis, await redis_now(redis))
    await service.reap(Q)
    assert await redis.zcard(keys.queue_keys(Q).done) == 0
    with pytest.raises(UnknownJob):
        await service.ack(Q, job_id, token)


async def test_reap_reports_more_when_its_limit_is_hit(make_service: MakeService, redis: aioredis.Redis) -> None:
    service = make_service(backoff_base=0.0, reap_limit=2)
    for _ in range(3):
        await push(service)
    await service.fetch(Q, count=3, lease=0.05)
    await until_redis_time(redis, await redis_now(redis) + 0.06)
    first = await service.reap(Q)
    assert (first.lease_expired, first.more) == (2, True)
    second = await service.reap(Q)
    assert (second.lease_expired, second.more) == (1, False)
    assert len((await check_queue(redis, Q))["ready"]) == 3


# -- purge --------------------------------------------------------------------------------------


async def test_purge_removes_waiting_jobs_in_chunks(
    service: QueueService, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_module, "CHUNK", 2)
    leased = await push(service, priority=9)
    dead = await push(service, priority=9, max_attempts=1)
    await lease_one(service)
    _, token, _ = await lease_one(service)
    await service.nack(Q, dead, token)
    for i in range(5):
        await push(service, b"%d" % i, uniq=f"u{i}", ttl=100)
    await push(service, delay=100, uniq="d")
    await push(service, delay=100)
    assert await service.purge(Q) == 7
    assert await check_queue(redis, Q) == {"ready": set(), "delayed": set(), "leased": {leased}, "dead": {dead}}
    assert await redis.hlen(keys.queue_keys(Q).uniq) == 0
    assert await redis.zcard(keys.queue_keys(Q).expiry) == 0
    assert await push(service, uniq="u0")
    assert await service.purge("never-used") == 0


# -- dead letters -------------------------------------------------------------------------------


async def make_dead(service: QueueService, count: int, **kwargs: Any) -> list[str]:
    ids = []
    for i in range(count):
        job_id = await push(service, b'{"dead": %d}' % i, max_attempts=1, priority=9, **kwargs)
        _, token, _ = await lease_one(service)
        assert (await service.nack(Q, job_id, token, error=f"e{i}")).outcome == "dead"
        ids.append(job_id)
    return ids


async def test_dead_list_pages_oldest_first(service: QueueService, redis: aioredis.Redis) -> None:
    ids = await make_dead(service, 5)
    total, page = await service.dead_list(Q, offset=1, limit=2)
    assert total == 5 and [j.id for j in page] == ids[1:3]
    assert [j.body for j in page] == [b'{"dead": 1}', b'{"dead": 2}']
    assert [j.last_error for j in page] == ["e1", "e2"]
    total, page = await service.dead_list(Q, offset=10, limit=2)
    assert (total, page) == (5, [])
    assert await service.dead_list("empty") == (0, [])


async def test_dead_retry_by_id_resets_failures(service: QueueService, redis: aioredis.Redis) -> None:
    ids = await make_dead(service, 3)
    assert await service.dead_retry(Q, [ids[1], "ghost", ids[1]]) == 1
    view = await service.job(Q, ids[1])
    assert (view.id, view.state, view.failures, view.attempt) == (ids[1], JobState.READY, 0, 1)
    assert await service.dead_retry(Q, []) == 0
    assert await service.dead_retry(Q, [ids[1]]) == 0  # no longer dead
    assert (await stats(redis))["retried"] == 1
    states = await check_queue(redis, Q)
    assert states["ready"] == {ids[1]} and states["dead"] == {ids[0], ids[2]}
    # It starts over: max_attempts failures again before it is dead.
    _, token, attempt = await lease_one(service)
    assert attempt == 2
    assert (await service.nack(Q, ids[1], token)).outcome == "dead"


async def test_dead_retry_all_in_chunks(
    service: QueueService, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_module, "CHUNK", 2)
    # A ttl long enough for each job to be leased in time on a busy machine, then waited out.
    ids = await make_dead(service, 5, ttl=0.5)
    assert await service.dead_retry(Q) == 5
    states = await check_queue(redis, Q)
    assert states["ready"] == set(ids) and states["dead"] == set()
    # ttl no longer applies to a job retried by hand.
    await until_redis_time(redis, max([(await service.job(Q, job_id)).created_at for job_id in ids]) + 0.5)
    fetched = await service.fetch(Q, count=5)
    assert [j.id for j in fetched.jobs] == ids


async def test_dead_retry_retakes_uniq_only_if_free(service: QueueService, redis: aioredis.Redis) -> None:
    dead_free = await make_dead_with_uniq(service, "free")
    dead_taken = await make_dead_with_uniq(service, "taken")
    holder = await push(service, uniq="taken")
    assert await service.dead_retry(Q) == 2
    assert await redis.hgetall(keys.queue_keys(Q).uniq) == {b"free": dead_free.encode(), b"taken": holder.encode()}
    await check_queue(redis, Q)
    with pytest.raises(JobExists) as caught:
        await push(service, uniq="free")
    assert caught.value.existing_id == dead_free
    assert (await service.job(Q, dead_taken)).state == JobState.READY


async def make_dead_with_uniq(service: QueueService, uniq: str) -> str:
    job_id = await push(service, uniq=uniq, max_attempts=1, priority=9)
    _, token, _ = await lease_one(service)
    assert (await service.nack(Q, job_id, token)).outcome == "dead"
    return job_id


async def test_dead_delete(service: QueueService, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue_module, "CHUNK", 2)
    ids = await make_dead(service, 5)
    live = await push(service)
    assert await service.dead_delete(Q, [ids[0], "ghost", live]) == 1
    assert await service.dead_delete(Q, []) == 0
    with pytest.raises(UnknownJob):
        await service.job(Q, ids[0])
    assert await service.dead_delete(Q) == 4
    assert await check_queue(redis, Q) == {"ready": {live}, "delayed": set(), "leased": set(), "dead": set()}


# -- info and job views -------------------------------------------------------------------------


async def test_info_counters_sizes_and_oldest_age(service: QueueService, redis: aioredis.Redis) -> None:
    empty = await service.info(Q)
    assert (empty.ready, empty.delayed, empty.leased, empty.dead, empty.paused) == (0, 0, 0, 0, False)
    assert empty.counters == dict.fromkeys(("pushed", "processed", "failed", "retried", "dead_lettered", "expired"), 0)
    assert empty.oldest_run_at is None
    await make_dead(service, 1)
    oldest = await push(service, priority=1)
    await push(service, priority=9)
    await push(service, delay=100)
    await push(service, priority=9)
    await lease_one(service)
    await service.fetch(Q, count=1)  # destructive: processed
    info = await service.info(Q)
    assert (info.ready, info.delayed, info.leased, info.dead) == (1, 1, 1, 1)
    assert info.counters == {
        "pushed": 5, "processed": 1, "failed": 1, "retried": 0, "dead_lettered": 1, "expired": 0,
    }  # fmt: skip
    assert info.oldest_run_at == pytest.approx((await service.job(Q, oldest)).run_at, abs=1e-3)
    assert info.now >= info.oldest_run_at
    presque = info.presque_json()
    assert presque["queue_name"] == Q and presque["job_count"] == 1 and presque["job_processed"] == 1
    many = await service.info_many([Q, "other"])
    assert [i.queue for i in many] == [Q, "other"] and many[0].ready == 1 and many[1].ready == 0
    assert await service.info_many([]) == []


async def test_info_many_gives_its_connection_back_when_redis_freezes(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    server = make_redis_server()
    pool = aioredis.BlockingConnectionPool(
        host="127.0.0.1", port=server.port, max_connections=1, timeout=2.0, socket_timeout=1.0
    )
    client = aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
    try:
        service = QueueService(client)
        await service.push(Q, b"1", opts())  # the pool's one connection is now open
        server.pause()
        try:
            with pytest.raises((RedisTimeoutError, RedisConnectionError)):
                await service.info_many([Q, "other"])
        finally:
            server.resume()
        # The pool's only connection came back: the next call gets it.
        assert (await service.info_many([Q]))[0].ready == 1
    finally:
        await client.aclose()
        await pool.aclose()  # a pool handed to a client is not closed with it


async def test_job_view_follows_every_state(service: QueueService, redis: aioredis.Redis) -> None:
    job_id = await push(service, b'{"v": 1}', priority=7, max_attempts=2)
    view = await service.job(Q, job_id)
    assert (view.state, view.priority, view.max_attempts) == (JobState.READY, 7, 2)
    assert view.created_at == pytest.approx(view.run_at, abs=1e-3)
    _, token, _ = await lease_one(service)
    assert (await service.job(Q, job_id)).state == JobState.LEASED
    await service.nack(Q, job_id, token, delay=100, error="later")
    view = await service.job(Q, job_id)
    assert (view.state, view.attempt, view.last_error) == (JobState.DELAYED, 1, "later")
    await redis.zadd(keys.queue_keys(Q).delayed, {job_id: 0})
    _, token, _ = await lease_one(service)
    await service.nack(Q, job_id, token)
    assert (await service.job(Q, job_id)).state == JobState.DEAD
    await service.dead_delete(Q, [job_id])
    with pytest.raises(UnknownJob):
        await service.job(Q, job_id)
    purged = await push(service)
    await service.purge(Q)
    with pytest.raises(UnknownJob):
        await service.job(Q, purged)
    with pytest.raises(UnknownJob):
        await service.job(Q, "never")


async def test_peek_shows_the_next_bodies_without_taking(service: QueueService, redis: aioredis.Redis) -> None:
    await push(service, b'"low"', priority=1)
    await push(service, b'"high"', priority=9)
    assert [body for _, body in await service.peek(Q, 10)] == [b'"high"', b'"low"']
    assert len(await service.peek(Q, 1)) == 1
    assert (await service.info(Q)).ready == 2
    assert await service.peek("none", 5) == []


async def test_queues_lists_every_queue_pushed_to(service: QueueService) -> None:
    await service.push("b", b"1", opts())
    await service.push("a", b"1", opts())
    await service.pause("c")
    assert await service.queues() == ["a", "b", "c"]
