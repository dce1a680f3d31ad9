"""A push that takes jobs for this broker's waiting subscribers in its own call (push_fetch.lua,
``QueueFeed.claim``/``settle``): what it takes is exactly what a fetch would, its leases are a
fetch's, and the wake-up is published only when ready jobs are left for others.

Whether a wake-up went out is told without waiting for one that may never come: after the step
under test, the test publishes a marker on the same channel, from the queue's server; the first
message heard is either the wake-up or the marker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from broker import keys
from broker.config import QueueLimit
from broker.errors import JobExists
from broker.models import PushOptions
from broker.queue import QueuePolicy, QueueService
from broker.redis import pubsub_client
from tests.invariants import check_queue
from tests.servers import RunningBroker, make_settings, run_broker, wait_for
from tests.wsclient import ws_connect

pytestmark = pytest.mark.core

Q = "pf"
MARKER = b"marker"
MakeService = Callable[..., QueueService]


@pytest.fixture
def make_service(redis: aioredis.Redis) -> MakeService:
    def make(limit: QueueLimit | None = None) -> QueueService:
        return QueueService(redis, QueuePolicy(), limits=(lambda _q: limit) if limit else None)

    return make


@pytest.fixture
def service(make_service: MakeService) -> QueueService:
    return make_service()


class WakeWatch:
    """The wake-up channel of a queue, heard by the test."""

    def __init__(self, redis: Any, queue: str) -> None:
        self.redis = redis
        self.channel = keys.wake_channel(queue)
        self.key = keys.queue_keys(queue).ready
        self.client, self.own = pubsub_client(redis)
        self.pubsub = self.client.pubsub()

    async def __aenter__(self) -> WakeWatch:
        await self.pubsub.subscribe(self.channel)
        while (await self.pubsub.get_message(timeout=5.0)) is None:  # the subscription's confirmation
            pass
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.aclose()
        if self.own:
            await self.client.aclose()

    async def next(self) -> bytes:
        """The next message published since the last call, after a marker published now."""
        # Published by the queue's own server (on a Cluster, messages of two nodes may reach ours
        # in either order): behind any wake-up the scripts published before.
        await self.redis.eval("redis.call('PUBLISH', ARGV[1], ARGV[2])", 1, self.key, self.channel, MARKER)
        while True:
            message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
            assert message is not None, "not even the marker came"
            data: bytes = message["data"]
            if data != MARKER:
                # Read up to the marker, so that the next call starts after it.
                while (await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0) or {}).get(
                    "data"
                ) != MARKER:
                    pass
            return data


def jobs(*bodies: bytes, **options: Any) -> list[tuple[bytes, PushOptions]]:
    return [(body, PushOptions(**options)) for body in bodies]


# -- the script ----------------------------------------------------------------------------------


async def test_the_pushed_job_comes_back_leased_and_can_be_acked(service: QueueService, redis: Any) -> None:
    async with WakeWatch(redis, Q) as wakes:
        (job_id,), fetched = await service.push_fetch(Q, jobs(b'{"a":1}'), count=10, lease=30)
        (job,) = fetched.jobs
        assert (job.id, job.body, job.attempt) == (job_id, b'{"a":1}', 1)
        assert job.token and not fetched.more and fetched.next_run_at is None
        # Leased as by a fetch: in the leased set and the lease hash, with one deadline.
        k = keys.queue_keys(Q)
        deadline = await redis.zscore(k.leased, job_id)
        entry = (await redis.hget(k.lease, job_id)).decode().split(" ")
        assert entry[0] == job.token and float(entry[1]) == pytest.approx(deadline) and entry[2] == "1"
        states = await check_queue(redis, Q)
        assert states["leased"] == {job_id} and not states["ready"]
        # Nothing was left ready: no wake-up for anyone.
        assert await wakes.next() == MARKER
    await service.ack(Q, job_id, job.token)
    assert not any((await check_queue(redis, Q)).values())


async def test_jobs_beyond_the_count_stay_ready_and_wake_the_others(service: QueueService, redis: Any) -> None:
    async with WakeWatch(redis, Q) as wakes:
        ids, fetched = await service.push_fetch(Q, jobs(b"1", b"2", b"3"), count=1, lease=30)
        assert [job.id for job in fetched.jobs] == ids[:1] and fetched.more
        assert await wakes.next() == b"0"
        # The ready set was not empty: a push publishes nothing, and neither does push_fetch.
        more, fetched = await service.push_fetch(Q, jobs(b"4"), count=1, lease=30)
        assert [job.id for job in fetched.jobs] == ids[1:2] and fetched.more
        assert await wakes.next() == MARKER
    assert (await check_queue(redis, Q))["ready"] == {ids[2], *more}


async def test_it_takes_what_a_fetch_would_priority_then_fifo(service: QueueService, redis: Any) -> None:
    older = await service.push_many(Q, jobs(b"old1", b"old2"))
    (urgent,), fetched = await service.push_fetch(Q, jobs(b"urgent", priority=9), count=2, lease=0)
    assert [job.id for job in fetched.jobs] == [urgent, older[0]]
    assert all(job.token is None for job in fetched.jobs)  # lease 0: taken destructively
    assert (await check_queue(redis, Q))["ready"] == {older[1]}


async def test_a_paused_queue_keeps_the_job_ready_and_wakes(service: QueueService, redis: Any) -> None:
    await service.pause(Q)
    async with WakeWatch(redis, Q) as wakes:
        (job_id,), fetched = await service.push_fetch(Q, jobs(b"x"), count=5, lease=30)
        assert fetched.paused and not fetched.jobs
        assert await wakes.next() == b"0"  # as push.lua alone: resume publishes again anyway
    assert (await check_queue(redis, Q))["ready"] == {job_id}


async def test_rate_limit_and_max_inflight_are_a_fetch_s(make_service: MakeService, redis: Any) -> None:
    rated = make_service(QueueLimit(rate=1))
    ids, fetched = await rated.push_fetch(Q, jobs(b"1", b"2"), count=5, lease=30)
    assert [job.id for job in fetched.jobs] == ids[:1]  # the bucket holds one token
    (third,), fetched = await rated.push_fetch(Q, jobs(b"3"), count=5, lease=30)
    assert fetched.limited and fetched.retry_in is not None and not fetched.jobs
    assert (await check_queue(redis, Q))["ready"] == {ids[1], third}
    capped = make_service(QueueLimit(max_inflight=2))
    (fourth,), fetched = await capped.push_fetch(Q, jobs(b"4"), count=5, lease=30)
    assert [job.id for job in fetched.jobs] == ids[1:2]  # one leased already: room for one
    assert (await check_queue(redis, Q))["ready"] == {third, fourth}


async def test_a_delayed_job_is_not_taken_and_its_wake_up_goes_out(service: QueueService, redis: Any) -> None:
    async with WakeWatch(redis, Q) as wakes:
        (job_id,), fetched = await service.push_fetch(Q, jobs(b"later", delay=60), count=5, lease=30)
        assert fetched.empty and not fetched.jobs and fetched.next_run_at is not None
        run_at = float(await wakes.next())  # the delayed job's wake-up, published as by push.lua
        assert run_at == pytest.approx(fetched.next_run_at, abs=1e-3)
    assert (await check_queue(redis, Q))["delayed"] == {job_id}


async def test_a_uniq_conflict_is_reported_and_the_fetch_still_runs(service: QueueService, redis: Any) -> None:
    (held,) = await service.push_many(Q, jobs(b"a", uniq="u"))
    (result,), fetched = await service.push_fetch(Q, jobs(b"b", uniq="u"), count=5, lease=30)
    assert isinstance(result, JobExists) and result.existing_id == held
    assert [job.id for job in fetched.jobs] == [held]


# -- the broker ----------------------------------------------------------------------------------


@pytest.fixture
async def broker(redis_url: str) -> AsyncIterator[RunningBroker]:
    async with run_broker(make_settings(redis_url, {"queues": {"reap_interval": 0.1}})) as running:
        yield running


def runtime_of(broker: RunningBroker) -> Any:
    return broker.app.state.runtime  # type: ignore[attr-defined]


async def test_a_push_reaches_a_waiting_subscriber_without_a_wake_up(broker: RunningBroker, redis: Any) -> None:
    runtime = runtime_of(broker)
    async with ws_connect(broker.ws_url) as client, WakeWatch(redis, Q) as wakes:
        await client.call("subscribe", queue=Q, prefetch=5)
        feed = runtime.delivery.feeds[Q]
        await wait_for(lambda: feed._listening and not feed._fetching and feed._drained, 5)
        job_id = await runtime.push(Q, b'{"n":1}', PushOptions())
        (job,) = await client.jobs(1)
        assert job["id"] == job_id and job["attempt"] == 1 and job["token"]
        assert await wakes.next() == MARKER  # the push took it: nobody was woken
        await client.ack(job)

        async def acked() -> bool:
            return not await redis.hlen(keys.queue_keys(Q).meta)

        await wait_for(acked, 5)
        assert not any((await check_queue(redis, Q)).values())


async def test_without_credit_the_job_stays_ready_and_wakes_the_others(broker: RunningBroker, redis: Any) -> None:
    runtime = runtime_of(broker)
    async with ws_connect(broker.ws_url) as client, WakeWatch(redis, Q) as wakes:
        await client.call("subscribe", queue=Q, prefetch=1)
        await runtime.push(Q, b"1", PushOptions())
        (first,) = await client.jobs(1)
        feed = runtime.delivery.feeds[Q]
        assert feed.claim() is None  # no credit left
        await wakes.next()  # the first push's wake-up, if it found the feed still at its first fetch
        second = await runtime.push(Q, b"2", PushOptions())
        assert await wakes.next() == b"0"
        assert (await check_queue(redis, Q))["ready"] == {second}
        await client.ack(first)
        assert (await client.jobs(1))[0]["id"] == second


async def test_only_a_drained_feed_lets_a_push_take_jobs(broker: RunningBroker, redis: Any) -> None:
    # While the feed has ready jobs to look at, its own fetches serve the subscribers: a claim
    # would hold them back until the push returns (docs/performance.md).
    runtime = runtime_of(broker)
    async with ws_connect(broker.ws_url) as client:
        await client.call("subscribe", queue=Q, prefetch=5)
        feed = runtime.delivery.feeds[Q]
        await wait_for(lambda: feed._listening and not feed._fetching and feed._drained, 5)
        feed._drained = False  # as after a wake-up, before the fetch it causes has looked
        assert feed.claim() is None
        feed._drained = True
        claim = feed.claim()
        assert claim is not None
        feed.settle(claim, None)


async def test_jobs_taken_for_a_subscriber_gone_before_the_deal_go_back(broker: RunningBroker, redis: Any) -> None:
    runtime = runtime_of(broker)
    async with ws_connect(broker.ws_url) as client:
        await client.call("subscribe", queue=Q, prefetch=5)
        feed = runtime.delivery.feeds[Q]
        await wait_for(lambda: feed._listening and not feed._fetching and feed._drained, 5)
        claim = feed.claim()
        assert claim is not None and claim.count == 5
        (job_id,), fetched = await runtime.queues.push_fetch(Q, jobs(b'"x"'), count=claim.count, lease=claim.lease)
        assert [job.id for job in fetched.jobs] == [job_id]
    await wait_for(lambda: Q not in runtime.delivery.feeds, 5)  # the subscriber left
    feed.settle(claim, fetched)

    async def back() -> bool:
        return (await check_queue(redis, Q))["ready"] == {job_id}

    await wait_for(back, 5)
    async with ws_connect(broker.ws_url) as client:
        await client.call("subscribe", queue=Q, prefetch=5)
        (job,) = await client.jobs(1)
        # As for a fetch's job its subscriber left: the delivery counted, no failure did.
        assert job["id"] == job_id and job["attempt"] == 2
        assert (await runtime.queues.job(Q, job_id)).failures == 0


async def test_a_fetch_waits_for_the_claim_in_flight(broker: RunningBroker, redis: Any) -> None:
    runtime = runtime_of(broker)
    async with ws_connect(broker.ws_url) as client:
        await client.call("subscribe", queue=Q, prefetch=2)
        feed = runtime.delivery.feeds[Q]
        await wait_for(lambda: feed._listening and not feed._fetching and feed._drained, 5)
        claim = feed.claim()
        assert claim is not None and feed.claim() is None  # one claim at a time
        ids, fetched = await runtime.queues.push_fetch(Q, jobs(b"1", b"2", b"3"), count=claim.count, lease=claim.lease)
        feed.wake()  # as the wake-up of the job left ready would
        feed.settle(claim, fetched)
        got = await client.jobs(2)
        assert [job["id"] for job in got] == ids[:2]
        await client.ack(got[0])
        assert (await client.jobs(1))[0]["id"] == ids[2]


async def test_a_failed_push_call_has_the_feed_look_again(broker: RunningBroker, redis: Any) -> None:
    runtime = runtime_of(broker)
    # A ready job the feed was not told of (paused when the feed first looked, resumed silently):
    # as after a push_fetch call whose reply was lost, whose wake-up was held back.
    await runtime.queues.pause(Q)
    (job_id,) = await runtime.queues.push_many(Q, jobs(b"1"))
    async with ws_connect(broker.ws_url) as client:
        await client.call("subscribe", queue=Q, prefetch=2)
        feed = runtime.delivery.feeds[Q]
        await wait_for(lambda: feed._drained and not feed._fetching, 5)  # its first fetch: paused
        await redis.hdel(keys.queue_keys(Q).state, "paused")
        claim = feed.claim()
        assert claim is not None
        feed.settle(claim, None)
        # Well before the feed's safety look (SAFETY_WAKE, 5 s).
        assert (await client.jobs(1, timeout=2.0))[0]["id"] == job_id


async def test_the_job_goes_to_its_subscriber_before_the_http_push_is_answered(
    broker: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deal writes the job frame in the step that reads the push call's reply, ahead of the
    # HTTP answer written in the same step: the latency a consumer sees is not the answer's too.
    from broker.httpproto import LeanHttpProtocol
    from broker.wsproto import SEND_FRAMES, BatchingWebSocketProtocol

    written: list[str] = []
    send, reply = BatchingWebSocketProtocol.send, LeanHttpProtocol._reply

    async def recording_send(self: Any, message: Any) -> None:
        if message["type"] == SEND_FRAMES and any(f.startswith(b'{"op":"job"') for f in message["frames"]):
            written.append("job")
        await send(self, message)

    def recording_reply(self: Any, lean: Any, answer: Any) -> None:
        written.append(f"answer {answer[0]}")
        reply(self, lean, answer)

    monkeypatch.setattr(BatchingWebSocketProtocol, "send", recording_send)
    monkeypatch.setattr(LeanHttpProtocol, "_reply", recording_reply)
    runtime = runtime_of(broker)
    async with ws_connect(broker.ws_url) as client, httpx.AsyncClient(base_url=broker.url) as http:
        await client.call("subscribe", queue=Q, prefetch=5)
        feed = runtime.delivery.feeds[Q]
        await wait_for(lambda: feed._listening and not feed._fetching and feed._drained, 5)
        response = await http.post(f"/q/{Q}", content=b'{"n":1}')
        assert response.status_code == 201
        (job,) = await client.jobs(1)
        assert job["id"] == response.json()["id"]
        assert written == ["job", "answer 201"]
        await client.ack(job)
