"""QueueFeed (broker/feed.py) with many subscribers: who gets each job, and the credit it counts,
checked against a walk of every subscriber, on an in-process broker with real WebSockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker import keys
from broker.models import PushOptions
from tests.servers import RunningBroker, make_settings, run_broker, wait_for
from tests.wsclient import WsClient, slow_reader, ws_connect

pytestmark = pytest.mark.core


@pytest.fixture
async def broker(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunningBroker]:
    # Only the reports of credit coming back may put a subscriber back in turn, not the periodic
    # look at every subscriber that would hide a missing one.
    monkeypatch.setattr("broker.feed.RESYNC_EVERY", 600.0)
    async with run_broker(make_settings(redis_url, {"queues": {"reap_interval": 0.1}})) as running:
        yield running


def hub_of(broker: RunningBroker) -> Any:
    return broker.app.state.runtime.delivery  # type: ignore[attr-defined]


def check_credit(feed: Any) -> None:
    """What the feed counts, per group, equals what a walk of every subscriber finds.

    Exactly, but for a connection whose credit is more frames than its send buffer holds: the feed
    counts what fitted when it last looked, and the buffer may have drained a little since.
    """
    counted = feed.credit()  # credit reported since the last fetch counted, as that fetch would
    members = set()
    for group, ring in feed._groups.items():
        assert ring.members, "a group without subscribers is kept"
        credits = ring.credits()
        for conn in ring.members:
            room, credit = feed._room(conn), conn.session.credit(feed.queue)
            if room == 0:
                assert conn not in credits
            elif conn.session.limits.send_buffer // feed._frame_size >= credit:  # never capped
                assert credits.get(conn) == room
            else:
                assert 1 <= credits.get(conn, 0) <= credit
        assert ring.total == sum(credits.values()) == counted[group]
        assert all(feed._group(conn) == group for conn in ring.members)
        members |= set(ring.members)
    assert members == set(feed.connections)


def counts(feed: Any, conn: Any) -> bool:
    """Whether the feed's next fetch counts ``conn``'s credit."""
    feed.credit()
    return any(conn in ring.credits() for ring in feed._groups.values())


def total_credit(feed: Any) -> int:
    return sum(feed.credit().values())


async def push(broker: RunningBroker, queue: str, bodies: list[bytes]) -> None:
    await broker.app.state.runtime.queues.push_many(queue, [(b, PushOptions()) for b in bodies])  # type: ignore[attr-defined]


async def jobs_within(client: WsClient, within: float) -> list[dict[str, Any]]:
    """Every job frame that arrives within ``within`` seconds."""
    jobs = []
    with contextlib.suppress(TimeoutError):
        while True:
            jobs.append(await client.expect("job", within))
    return jobs


async def no_more_jobs(clients: list[WsClient], within: float = 0.3) -> bool:
    return all(await asyncio.gather(*(c.silent("job", within) for c in clients)))


async def test_many_subscribers_are_dealt_round_robin_within_their_credit(
    broker: RunningBroker, redis: aioredis.Redis
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(ws_connect(broker.ws_url)) for _ in range(40)]
        for client in clients:
            await client.call("subscribe", queue="q", prefetch=3)
        feed = hub_of(broker).feeds["q"]
        check_credit(feed)
        assert total_credit(feed) == 120
        # One fetch of 80 jobs for 120 credit: two each, round-robin.
        await push(broker, "q", [b"%d" % i for i in range(80)])
        held = [await client.jobs(2) for client in clients]
        assert await no_more_jobs(clients)
        assert len({job["id"] for jobs in held for job in jobs}) == 80
        check_credit(feed)
        assert total_credit(feed) == 40
        # More jobs than credit: each takes exactly its one left, the rest stays in Redis.
        await push(broker, "q", [b"%d" % i for i in range(80, 200)])
        for client, jobs in zip(clients, held, strict=True):
            jobs += await client.jobs(1)
        assert await no_more_jobs(clients)
        assert await redis.zcard(keys.queue_keys("q").ready) == 200 - 120
        check_credit(feed)
        (ring,) = feed._groups.values()
        assert total_credit(feed) == 0 and ring.take() is None
        # An ack gives one job back to that subscriber alone.
        await clients[7].ack(held[7][0])
        assert (await clients[7].jobs(1))[0]["id"] not in {job["id"] for jobs in held for job in jobs}
        assert await no_more_jobs(clients)
        check_credit(feed)


async def test_credit_is_respected_per_subscriber_and_turns_are_fair(broker: RunningBroker) -> None:
    prefetches = [1, 2, 5, 1, 3, 8, 2, 1]
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(ws_connect(broker.ws_url)) for _ in prefetches]
        for client, prefetch in zip(clients, prefetches, strict=True):
            await client.call("subscribe", queue="q", prefetch=prefetch)
        feed = hub_of(broker).feeds["q"]
        # Fewer jobs than subscribers: no subscriber gets two before every one with credit got one.
        await push(broker, "q", [b"0"] * 6)
        firsts = await asyncio.gather(*(jobs_within(c, 0.5) for c in clients))
        assert sorted(len(jobs) for jobs in firsts) == [0, 0, 1, 1, 1, 1, 1, 1]
        check_credit(feed)
        await push(broker, "q", [b"1"] * 100)
        counts = [
            len(first) + len(await client.jobs(prefetch - len(first)))
            for client, prefetch, first in zip(clients, prefetches, firsts, strict=True)
        ]
        assert counts == prefetches
        assert await no_more_jobs(clients)
        check_credit(feed)
        assert total_credit(feed) == 0


async def test_credit_count_follows_subscribe_ack_nack_unsubscribe_and_disconnect(broker: RunningBroker) -> None:
    hub = hub_of(broker)
    async with ws_connect(broker.ws_url) as a, ws_connect(broker.ws_url) as b:
        await a.call("subscribe", queue="q", prefetch=2)
        await b.call("subscribe", queue="q", prefetch=3, lease=60)  # another group: another lease
        feed = hub.feeds["q"]
        check_credit(feed)
        assert total_credit(feed) == 5
        await push(broker, "q", [b"%d" % i for i in range(10)])
        a_jobs, b_jobs = await a.jobs(2), await b.jobs(3)
        check_credit(feed)
        assert total_credit(feed) == 0
        await a.ack(a_jobs[0])
        a_jobs.append((await a.jobs(1))[0])
        check_credit(feed)
        await b.send({"op": "nack", "id": b_jobs[0]["id"], "token": b_jobs[0]["token"], "delay": 60})
        b_jobs.append((await b.jobs(1))[0])
        check_credit(feed)
        async with ws_connect(broker.ws_url) as c:
            await c.call("subscribe", queue="q", prefetch=1)
            await c.jobs(1)
            check_credit(feed)
            assert len(feed.connections) == 3
            await b.call("unsubscribe", queue="q")  # its three jobs go back to the queue: a and c are full
            check_credit(feed)
            assert len(feed._groups) == 1 and len(feed.connections) == 2
            await a.ack(a_jobs[1])
            await a.jobs(1)
            check_credit(feed)
        await wait_for(lambda: len(feed.connections) == 1, 5)  # c disconnected
        check_credit(feed)
        await a.call("subscribe", queue="r", prefetch=4)
        check_credit(hub.feeds["r"])
        assert total_credit(hub.feeds["r"]) == 4
    await wait_for(lambda: not hub.feeds, 5)


async def test_a_touch_refused_as_stale_gives_the_credit_back(broker: RunningBroker) -> None:
    async with ws_connect(broker.ws_url) as short, ws_connect(broker.ws_url) as long:
        await short.call("subscribe", queue="q", prefetch=1, lease=0.3)
        await push(broker, "q", [b"1"])
        (job,) = await short.jobs(1)
        await long.call("subscribe", queue="q", prefetch=1, lease=60)
        # The short lease expires: the job goes to the other subscriber under a new token.
        (again,) = await long.jobs(1, timeout=5)
        assert again["id"] == job["id"] and again["token"] != job["token"]
        feed = hub_of(broker).feeds["q"]
        assert total_credit(feed) == 0  # short still counts the job as its own
        reply = await short.call("touch", id=job["id"], token=job["token"])
        assert reply["op"] == "error"
        check_credit(feed)
        assert total_credit(feed) == 1
        await push(broker, "q", [b"2"])
        assert (await short.jobs(1))[0]["body"] == 2


async def test_credit_that_came_back_unreported_is_found_by_the_sweep(
    broker: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("broker.feed.RESYNC_EVERY", 0.5)
    monkeypatch.setattr("broker.feed.SAFETY_WAKE", 0.1)
    hub = hub_of(broker)
    async with ws_connect(broker.ws_url) as ws:
        await ws.call("subscribe", queue="q", prefetch=1)
        await push(broker, "q", [b"1", b"2"])
        (job,) = await ws.jobs(1)
        (conn,) = hub.connections
        conn.session.on_credit = None  # as if a change of credit had no report
        await ws.ack(job)
        assert (await ws.jobs(1, timeout=5))[0]["body"] == 2
        check_credit(hub.feeds["q"])


async def test_a_throttled_subscriber_is_skipped_and_comes_back_when_its_socket_drains(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("broker.feed.RESYNC_EVERY", 600.0)
    send_buffer = 65536
    settings = make_settings(redis_url, {"websocket": {"send_buffer": send_buffer}})
    async with run_broker(settings) as broker:
        hub = hub_of(broker)
        body = b'"' + b"x" * 20_000 + b'"'
        total = 600  # 12 MB: more than the kernel buffers between broker and client hold
        for _ in range(0, total, 100):
            await push(broker, "q", [body] * 100)
        subscribe = {"op": "subscribe", "queue": "q", "ack": "auto", "prefetch": 20}
        async with slow_reader(broker.ws_url, subscribe) as slow:
            (conn,) = hub.connections
            feed = await wait_for(lambda: hub.feeds.get("q"), 5)
            await wait_for(lambda: conn.session.send_backlog >= send_buffer, 10, message="never throttled")
            check_credit(feed)
            assert not counts(feed, conn)
            async with ws_connect(broker.ws_url) as fast:
                await fast.call("subscribe", queue="q", ack="auto", prefetch=20)
                check_credit(feed)
                received = len(await jobs_within(fast, 1.0))
                assert received > 0
            ready = await broker.app.state.runtime.redis.zcard(keys.queue_keys("q").ready)  # type: ignore[attr-defined]
            assert ready == 0, "the fast consumer stalled"
            assert not counts(feed, conn)
            # Only the slow one is left, its socket full. Once it reads, its credit comes back.
            late = asyncio.create_task(
                slow.read_until(lambda frames: sum(f.get("body") == "late" for f in frames) == 3, 30)
            )
            try:
                await wait_for(lambda: counts(feed, conn), 20, message="no credit back")
                check_credit(feed)
                await push(broker, "q", [b'"late"'] * 3)
                await late
            finally:
                late.cancel()
            assert len(slow.frames) > 3


async def _empty(redis: Any, key: str) -> bool:
    return int(await redis.zcard(key)) == 0
