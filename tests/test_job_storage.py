"""How the scripts store a job: the meta that push writes without cjson, and the ``lease`` hash
that keeps fetch and ack from rewriting (or even decoding) the meta.

And the upgrade path: a job leased by the previous version (its token, attempt and lease in its
meta, no lease entry) still acks, nacks, touches, releases and expires as before.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from broker import keys
from broker.errors import StaleToken
from broker.models import JobState, Meta, PushOptions
from broker.queue import QueuePolicy, QueueService
from tests.invariants import check_queue
from tests.servers import wait_for

pytestmark = pytest.mark.core

Q = "leases"


@pytest.fixture
def service(redis: aioredis.Redis) -> QueueService:
    return QueueService(redis, QueuePolicy(backoff_base=0.0))


async def redis_now(redis: aioredis.Redis) -> float:
    seconds, micros = await redis.time()
    return float(seconds) + micros / 1e6


async def lease_entry(redis: aioredis.Redis, job_id: str) -> str | None:
    entry = await redis.hget(keys.queue_keys(Q).lease, job_id)
    return entry.decode() if entry else None


async def lease_fields(redis: aioredis.Redis, job_id: str) -> tuple[str, int, float, bool]:
    """(token, attempt, lease seconds, holds a uniq key) of a leased job's lease entry."""
    entry = await lease_entry(redis, job_id)
    assert entry, f"{job_id} has no lease entry"
    token, _deadline, attempt, lease, has_uniq = entry.split(" ")
    return token, int(attempt), float(lease), has_uniq == "1"


async def test_push_writes_the_meta_as_cjson_would(service: QueueService, redis: aioredis.Redis) -> None:
    k = keys.queue_keys(Q)
    options = [
        PushOptions(),
        PushOptions(priority=9, delay=12.5, ttl=3.25, uniq='a/b "c" \\ é', max_attempts=1_000_000),
        PushOptions(priority=0, ttl=1e-3, uniq="x"),
    ]
    ids = [await service.push(Q, b"1", opts) for opts in options]
    recode = "local m = redis.call('HGET', KEYS[1], ARGV[1]); return {m, cjson.encode(cjson.decode(m))}"
    for job_id, opts in zip(ids, options, strict=True):
        raw, canonical = await redis.eval(recode, 1, k.meta, job_id)
        assert raw == canonical
        meta = orjson.loads(raw)
        assert (meta[Meta.PRIORITY - 1], meta[Meta.MAX_ATTEMPTS - 1], meta[Meta.UNIQ - 1]) == (
            opts.priority, opts.max_attempts, opts.uniq,
        )  # fmt: skip
        assert meta[Meta.RUN_AT - 1] == pytest.approx(meta[Meta.CREATED_AT - 1] + opts.delay, abs=1e-3)
        if opts.ttl:
            assert meta[Meta.TTL - 1] == pytest.approx(meta[Meta.RUN_AT - 1] + opts.ttl, abs=1e-3)
    await check_queue(redis, Q)


async def test_fetch_and_ack_leave_the_meta_alone(service: QueueService, redis: aioredis.Redis) -> None:
    k = keys.queue_keys(Q)
    job_id = await service.push(Q, b"1", PushOptions(uniq="u"))
    pushed_meta = await redis.hget(k.meta, job_id)
    first = (await service.fetch(Q, lease=30)).jobs[0]
    assert await redis.hget(k.meta, job_id) == pushed_meta
    assert await lease_fields(redis, job_id) == (first.token, 1, 30.0, True)
    assert (await service.job(Q, job_id)).attempt == 1  # the view reads the lease entry
    await check_queue(redis, Q)
    # A released job's meta takes its attempt back: the next delivery is attempt 2.
    assert await service.release(Q, [(job_id, first.token or "")]) == 1
    assert await lease_entry(redis, job_id) is None
    assert orjson.loads(await redis.hget(k.meta, job_id))[Meta.ATTEMPT - 1] == 1
    second = (await service.fetch(Q, lease=5)).jobs[0]
    assert second.attempt == 2 and await lease_fields(redis, job_id) == (second.token, 2, 5.0, True)
    await check_queue(redis, Q)
    with pytest.raises(StaleToken):
        await service.ack(Q, job_id, first.token or "")
    await service.ack(Q, job_id, second.token or "")
    assert await redis.hlen(k.lease) == 0 and await redis.hlen(k.uniq) == 0
    await check_queue(redis, Q)


async def test_a_token_with_a_space_or_a_prefix_of_the_entry_is_stale(
    service: QueueService, redis: aioredis.Redis
) -> None:
    job_id = await service.push(Q, b"1", PushOptions())
    job = (await service.fetch(Q, lease=30)).jobs[0]
    entry = await lease_entry(redis, job_id)
    assert entry
    for forged in (entry, entry.rsplit(" ", 1)[0], (job.token or "")[:-1], ""):
        with pytest.raises(StaleToken):
            await service.ack(Q, job_id, forged)
    await service.ack(Q, job_id, job.token or "")


async def test_a_touched_lease_outlives_its_first_deadline(service: QueueService, redis: aioredis.Redis) -> None:
    job_id = await service.push(Q, b"1", PushOptions())
    job = (await service.fetch(Q, lease=0.05)).jobs[0]
    first_deadline = await redis.zscore(keys.queue_keys(Q).leased, job_id)
    await service.touch(Q, job_id, job.token or "", 30)
    await check_queue(redis, Q)  # the entry's deadline follows the leased set's
    assert await lease_fields(redis, job_id) == (job.token, 1, 0.05, False)  # touch's default stays

    async def past() -> bool:
        return await redis_now(redis) > (first_deadline or 0.0)

    await wait_for(past)
    await service.ack(Q, job_id, job.token or "")


async def lease_the_old_way(redis: aioredis.Redis, job_id: str, token: str, lease: float) -> None:
    """What the previous version's fetch.lua did: token, attempt and lease written into the meta."""
    k = keys.queue_keys(Q)
    meta = orjson.loads(await redis.hget(k.meta, job_id))
    meta[Meta.ATTEMPT - 1] += 1
    meta[Meta.TOKEN - 1] = token
    meta[Meta.LEASE - 1] = lease
    now = await redis_now(redis)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zrem(k.ready, job_id)
        pipe.zadd(k.leased, {job_id: now + lease})
        pipe.hset(k.meta, job_id, orjson.dumps(meta))
        await pipe.execute()


async def test_leases_taken_before_the_upgrade_still_settle(service: QueueService, redis: aioredis.Redis) -> None:
    k = keys.queue_keys(Q)
    acked, nacked, released, touched, lapsed = ids = [
        await service.push(Q, b"%d" % i, PushOptions(uniq=f"u{i}", max_attempts=3)) for i in range(5)
    ]
    for job_id in ids:
        await lease_the_old_way(redis, job_id, f"old-{job_id}", 0.3 if job_id == lapsed else 30.0)
    await check_queue(redis, Q, legacy=frozenset(ids))
    assert (await service.job(Q, acked)).attempt == 1

    with pytest.raises(StaleToken):
        await service.ack(Q, acked, "old-wrong")
    await service.ack(Q, acked, f"old-{acked}")
    with pytest.raises(StaleToken):
        await service.ack(Q, acked, f"old-{acked}")
    assert (await service.nack(Q, nacked, f"old-{nacked}", delay=0)).outcome == "ready"
    assert await service.release(Q, [(released, f"old-{released}")]) == 1
    before = await redis_now(redis)
    assert await service.touch(Q, touched, f"old-{touched}") >= before + 30.0  # its lease, from its meta
    await check_queue(redis, Q, legacy=frozenset({touched, lapsed}))
    assert b"u0" not in await redis.hkeys(k.uniq)  # the acked job gave its uniq key back

    async def reaped() -> bool:
        return (await service.reap(Q)).lease_expired == 1

    await wait_for(reaped)
    view = await service.job(Q, lapsed)
    assert (view.state, view.attempt, view.failures) == (JobState.READY, 1, 1)
    again = {j.id: j for j in (await service.fetch(Q, count=5, lease=30)).jobs}
    assert {job_id: j.attempt for job_id, j in again.items()} == {nacked: 2, released: 2, lapsed: 2}
    await check_queue(redis, Q, legacy=frozenset({touched}))
    for job in [*again.values()]:
        await service.ack(Q, job.id, job.token or "")
    await service.ack(Q, touched, f"old-{touched}")
    assert await check_queue(redis, Q) == {"ready": set(), "delayed": set(), "leased": set(), "dead": set()}
    assert await redis.hlen(k.uniq) == 0 and await redis.hlen(k.lease) == 0


async def test_reap_of_a_new_lease_counts_its_attempt(service: QueueService, redis: aioredis.Redis) -> None:
    job_id = await service.push(Q, b"1", PushOptions(max_attempts=2))
    for attempt in (1, 2):
        job = (await service.fetch(Q, lease=0.05)).jobs[0]
        assert job.attempt == attempt

        async def reaped() -> Any:
            return (await service.reap(Q)).lease_expired

        await wait_for(reaped)
    view = await service.job(Q, job_id)
    assert (view.state, view.attempt, view.failures) == (JobState.DEAD, 2, 2)
    assert (await service.dead_list(Q))[1][0].attempt == 2
    await check_queue(redis, Q)


async def test_an_entry_left_by_an_old_reaper_settles_nothing(service: QueueService, redis: aioredis.Redis) -> None:
    # While old and new broker processes share Redis, an old reaper ends a lease without knowing
    # the lease hash (its entry stays), and an old fetch may lease the job again in its meta.
    k = keys.queue_keys(Q)
    job_id = await service.push(Q, b"1", PushOptions(uniq="u"))
    first = (await service.fetch(Q, lease=0.05)).jobs[0]
    deadline = await redis.zscore(k.leased, job_id) or 0.0
    await wait_for(lambda: _past(redis, deadline))
    # The old reaper: out of the leased set, back to the ready set (its retry without backoff).
    meta = orjson.loads(await redis.hget(k.meta, job_id))
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zrem(k.leased, job_id)
        pipe.zadd(k.ready, {job_id: (9 - meta[Meta.PRIORITY - 1]) * keys.SEQ_SPAN + meta[Meta.SEQ - 1]})
        await pipe.execute()
    assert await service.release(Q, [(job_id, first.token or "")]) == 0
    assert (await service.job(Q, job_id)).state == JobState.READY
    await lease_the_old_way(redis, job_id, "old-2", 30.0)
    for settle in (service.ack, service.nack, service.touch):
        with pytest.raises(StaleToken):
            await settle(Q, job_id, first.token or "")
    assert await service.release(Q, [(job_id, first.token or "")]) == 0
    view = await service.job(Q, job_id)
    assert (view.state, view.attempt) == (JobState.LEASED, 1)  # the old lease's, from the meta
    await service.ack(Q, job_id, "old-2")
    assert await redis.hlen(k.lease) == 0 and await redis.hlen(k.uniq) == 0
    assert await check_queue(redis, Q) == {"ready": set(), "delayed": set(), "leased": set(), "dead": set()}


async def _past(redis: aioredis.Redis, moment: float) -> bool:
    return await redis_now(redis) > moment
