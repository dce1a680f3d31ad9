"""The delivery hub and its queue feeds (broker/delivery.py, broker/feed.py) and the coalescer
(broker/batching.py), observed from inside one in-process broker on a real Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker import keys
from broker.batching import Coalescer
from broker.models import PushOptions
from tests.servers import RunningBroker, make_settings, run_broker, wait_for
from tests.wsclient import ws_connect

pytestmark = pytest.mark.core


@pytest.fixture
async def broker(redis_url: str) -> AsyncIterator[RunningBroker]:
    async with run_broker(make_settings(redis_url, {"queues": {"reap_interval": 0.1}})) as running:
        yield running


def runtime_of(broker: RunningBroker) -> Any:
    return broker.app.state.runtime  # type: ignore[attr-defined]


async def test_acks_on_an_emptied_queue_cost_no_fetch(broker: RunningBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = runtime_of(broker)
    fetches = 0
    real_fetch = runtime.queues.fetch

    async def counting_fetch(*args: Any, **kwargs: Any) -> Any:
        nonlocal fetches
        fetches += 1
        return await real_fetch(*args, **kwargs)

    monkeypatch.setattr(runtime.queues, "fetch", counting_fetch)
    async with ws_connect(broker.ws_url) as ws:
        await ws.call("subscribe", queue="q", prefetch=500)
        await runtime.queues.push_many("q", [(b"1", PushOptions())] * 200)
        jobs = await ws.jobs(200)
        await wait_for(lambda: runtime.delivery.feeds["q"]._drained, 5)
        before = fetches
        for job in jobs:
            await ws.ack(job)
        assert (await ws.call("publish", channel="c", data=0))["op"] == "ok"  # every ack was read
        # Credit came back 200 times, but the queue is known empty: no look at Redis for it.
        assert fetches - before == 0
        # A push still wakes the feed.
        await runtime.queues.push_many("q", [(b"2", PushOptions())])
        assert (await ws.jobs(1))[0]["body"] == 2


async def test_jobs_go_to_subscribers_of_the_lease_they_were_fetched_with(
    broker: RunningBroker, redis: aioredis.Redis
) -> None:
    async with ws_connect(broker.ws_url) as short, ws_connect(broker.ws_url) as long:
        await short.call("subscribe", queue="q", prefetch=2, lease=100)
        await long.call("subscribe", queue="q", prefetch=2, lease=1000)
        await runtime_of(broker).queues.push_many("q", [(b"0", PushOptions())] * 4)
        now = time.time()
        for client, lease in ((short, 100), (long, 1000)):
            for job in await client.jobs(2):
                deadline = await redis.zscore(keys.queue_keys("q").leased, job["id"])
                assert deadline is not None and abs(deadline - now - lease) < 5


async def test_shutdown_is_idempotent_and_refuses_new_subscriptions(broker: RunningBroker) -> None:
    hub = runtime_of(broker).delivery
    async with ws_connect(broker.ws_url) as ws:
        await ws.call("subscribe", queue="q")
        await asyncio.gather(hub.shutdown(), hub.shutdown())
        assert await ws.closed() == 1001
        assert [f["op"] for f in ws.stash] == ["shutdown"]
    assert hub.feeds == {} or not any(feed.running for feed in hub.feeds.values())
    async with ws_connect(broker.ws_url) as late:
        assert await late.closed() == 1013


async def test_figures_count_connections_and_consumers(broker: RunningBroker) -> None:
    hub = runtime_of(broker).delivery
    async with ws_connect(broker.ws_url) as a, ws_connect(broker.ws_url) as b:
        await a.call("subscribe", queue="q")
        await b.call("subscribe", queue="q")
        await b.call("subscribe", queue="r")
        figures = hub.figures()
        assert figures["connections"] == 2 and figures["consumers"] == 3
        assert figures["consumers_by_queue"] == {"q": 2, "r": 1}
    await wait_for(lambda: hub.figures()["connections"] == 0, 5)
    assert hub.feeds == {}


async def test_coalescer_batches_concurrent_items_in_order() -> None:
    calls: list[list[int]] = []

    async def flush(key: str, items: Sequence[int]) -> list[int | BaseException]:
        calls.append(list(items))
        await asyncio.sleep(0.01)
        return [ValueError(i) if i == 3 else i * 10 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(flush, max_batch=4)
    results = await asyncio.gather(*(coalescer.submit("k", i) for i in range(10)), return_exceptions=True)
    assert [r if not isinstance(r, ValueError) else "error" for r in results] == [
        0, 10, 20, "error", 40, 50, 60, 70, 80, 90
    ]  # fmt: skip
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # one call in flight per key, in order


async def test_coalescer_failure_reaches_every_caller_of_the_batch() -> None:
    async def flush(key: str, items: Sequence[int]) -> list[int | BaseException]:
        raise ConnectionError("redis down")

    coalescer: Coalescer[int, int] = Coalescer(flush)
    results = await asyncio.gather(*(coalescer.submit("k", i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_coalescer_callbacks_share_batches_with_awaiting_callers() -> None:
    calls: list[list[int]] = []

    async def flush(key: str, items: Sequence[int]) -> list[int | BaseException]:
        calls.append(list(items))
        await asyncio.sleep(0)
        return [ValueError(i) if i == 2 else i * 10 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(flush, max_batch=3)
    results: dict[int, object] = {}

    def done_for(i: int) -> Callable[[int | BaseException], None]:
        def done(result: int | BaseException) -> None:
            results[i] = result
            if i == 3:
                raise RuntimeError("a failing callback is logged, the others still hear")

        return done

    coalescer.submit_soon("k", 0, done_for(0))
    awaited = asyncio.create_task(coalescer.submit("k", 1))
    await asyncio.sleep(0)  # the task submits its item
    for i in (2, 3, 4):
        coalescer.submit_soon("k", i, done_for(i))
    assert await awaited == 10
    await wait_for(lambda: len(results) == 4)
    assert results[0] == 0 and results[3] == 30 and results[4] == 40
    assert isinstance(results[2], ValueError)
    assert calls == [[0, 1, 2], [3, 4]]


async def test_coalescer_callbacks_hear_a_failed_call() -> None:
    async def flush(key: str, items: Sequence[int]) -> list[int | BaseException]:
        raise ConnectionError("redis down")

    coalescer: Coalescer[int, int] = Coalescer(flush)
    results: list[int | BaseException] = []
    for i in range(3):
        coalescer.submit_soon("k", i, results.append)
    await wait_for(lambda: len(results) == 3)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_coalescer_keeps_groups_whole_and_in_order_among_single_items() -> None:
    calls: list[list[int]] = []

    async def flush(key: str, items: Sequence[int]) -> list[int | BaseException]:
        calls.append(list(items))
        await asyncio.sleep(0)
        return [-i if i == 7 else i * 10 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(flush, max_batch=5)
    single = asyncio.create_task(coalescer.submit("q", 1))
    group = asyncio.create_task(coalescer.submit_group("q", [2, 3, 4]))
    big = asyncio.create_task(coalescer.submit_group("q", [5, 6, 7, 8, 9, 10]))
    last = asyncio.create_task(coalescer.submit("q", 11))
    assert await single == 10
    assert await group == [20, 30, 40]
    assert await big == [50, 60, -7, 80, 90, 100]
    assert await last == 110
    # Order kept across calls; no group split; a group larger than max_batch gets a call alone.
    assert [i for call in calls for i in call] == list(range(1, 12))
    assert calls == [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [11]]


async def test_coalescer_overlaps_a_second_call_only_for_enough_items() -> None:
    calls: list[list[int]] = []
    running = 0
    most = 0
    gates: list[asyncio.Event] = []

    async def flush(key: str, items: Sequence[int]) -> list[int | BaseException]:
        nonlocal running, most
        calls.append(list(items))  # the first step: where a real flush sends its call
        running += 1
        most = max(most, running)
        gate = asyncio.Event()
        gates.append(gate)
        await gate.wait()
        running -= 1
        return [i * 10 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(flush, max_batch=5, max_in_flight=2, min_overlap=3)
    first = [asyncio.create_task(coalescer.submit("k", i)) for i in range(2)]
    await wait_for(lambda: len(calls) == 1)
    few = [asyncio.create_task(coalescer.submit("k", i)) for i in range(2, 4)]
    await asyncio.sleep(0.05)  # nothing may happen: 2 waiting items are below min_overlap
    assert calls == [[0, 1]]
    more = [asyncio.create_task(coalescer.submit("k", i)) for i in range(4, 9)]
    await wait_for(lambda: len(calls) == 2)
    assert calls[1] == [2, 3, 4, 5, 6]  # a second call while the first runs, in order
    await asyncio.sleep(0.05)
    assert len(calls) == 2  # never a third at once
    for gate in gates:
        gate.set()
    await wait_for(lambda: len(calls) == 3)
    gates[2].set()
    assert await asyncio.gather(*first, *few, *more) == [i * 10 for i in range(9)]
    assert calls == [[0, 1], [2, 3, 4, 5, 6], [7, 8]] and most == 2


async def test_pushes_keep_their_order_with_two_calls_in_flight(broker: RunningBroker) -> None:
    # Thousands of single pushes submitted at once to a queue new to this process: the first
    # waits for the queue registry's SADD, the next ones go out while earlier calls run, and
    # Redis still gets them in submission order.
    runtime = runtime_of(broker)
    assert runtime.pusher._max_in_flight == 2  # the script pipe is in use
    flush, in_flight, most = runtime.pusher._flush, [0], [0]

    async def counted(key: str, items: Any) -> Any:
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        try:
            return await flush(key, items)  # runs up to its call's write before it can wait
        finally:
            in_flight[0] -= 1

    runtime.pusher._flush = counted
    results: list[str | BaseException] = []
    count = 3000
    for n in range(count):
        runtime.push_soon("ordered", b"%d" % n, runtime.push_defaults, results.append)
    await wait_for(lambda: len(results) == count, 10)
    ids = [result for result in results if isinstance(result, str)]
    assert len(ids) == count
    taken = await runtime.queues.fetch("ordered", count=count)
    assert [job.body for job in taken.jobs] == [b"%d" % n for n in range(count)]
    assert [job.id for job in taken.jobs] == ids
    assert most[0] == 2
