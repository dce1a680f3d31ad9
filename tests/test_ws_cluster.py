"""Several ``presque serve`` processes on one Redis: wake-ups, sharing, crash recovery, pause,
limits, broadcast and events reach across processes.

Every broker is a real subprocess (``BrokerServer``) on its own port; clients are ``websockets``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.servers import BrokerServer, make_settings, run_broker, wait_for
from tests.wsclient import WsClient, ws_connect

pytestmark = pytest.mark.core

MakeBroker = Callable[..., BrokerServer]

CONFIG: dict[str, Any] = {
    "queues": {
        "reap_interval": 0.1,
        "backoff_base": 0.1,
        "limits": {"capped": {"max_inflight": 3}, "paced": {"rate": 20}},
    },
}


def two_brokers(make_broker: MakeBroker, redis_url: str) -> tuple[BrokerServer, BrokerServer]:
    return make_broker(redis_url, config=CONFIG), make_broker(redis_url, config=CONFIG)


async def push_batch(url: str, queue: str, bodies: list[Any]) -> list[str]:
    async with httpx.AsyncClient(base_url=url) as http:
        ids: list[str] = []
        for start in range(0, len(bodies), 500):
            response = await http.post(f"/qb/{queue}", json=bodies[start : start + 500])
            assert response.status_code == 201, response.text
            ids += response.json()["ids"]
        return ids


async def queue_info(url: str, queue: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url) as http:
        info: dict[str, Any] = (await http.get(f"/j/{queue}")).json()
        return info


async def test_an_idle_subscriber_on_another_process_is_woken(
    make_broker: MakeBroker, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The subscriber's process never looks again by itself: only the pub/sub wake-up of the push
    # made on the other process can bring the job.
    monkeypatch.setattr("broker.feed.SAFETY_WAKE", 600.0)
    a = make_broker(redis_url, config=CONFIG)
    async with (
        run_broker(make_settings(redis_url, CONFIG)) as b,
        ws_connect(b.ws_url) as ws,
        httpx.AsyncClient(base_url=a.url) as http,
    ):
        await ws.call("subscribe", queue="q")
        for n in range(3):
            assert await ws.silent("job", 0.05)
            job_id = (await http.post("/q/q", json={"n": n})).json()["id"]
            (job,) = await ws.jobs(1, timeout=10)
            assert job["id"] == job_id
            await ws.ack(job)


async def test_two_processes_share_a_queue_and_deliver_each_job_once(make_broker: MakeBroker, redis_url: str) -> None:
    a, b = two_brokers(make_broker, redis_url)
    total = 400
    ledger: list[tuple[str, str, str]] = []  # (job id, consumer, token)

    async def consume(name: str, url: str) -> None:
        async with ws_connect(url) as ws:
            await ws.call("subscribe", queue="q", prefetch=5, lease=30)
            started.append(name)
            if len(started) == 4:
                ready.set()
            while len(ledger) < total:
                try:
                    job = await ws.expect("job", timeout=0.2)
                except TimeoutError:
                    continue
                ledger.append((job["id"], name, job["token"]))
                await ws.ack(job)

    started: list[str] = []
    ready = asyncio.Event()
    consumers = [
        asyncio.create_task(consume(name, url))
        for name, url in (("a1", a.ws_url), ("a2", a.ws_url), ("b1", b.ws_url), ("b2", b.ws_url))
    ]
    await asyncio.wait_for(ready.wait(), 5)
    ids = await push_batch(a.url, "q", list(range(total)))
    await asyncio.wait_for(asyncio.gather(*consumers), 30)
    delivered = [job_id for job_id, _, _ in ledger]
    assert sorted(delivered) == sorted(ids)  # every job, none twice (the 30 s lease never lapsed)
    per_consumer = {name: sum(1 for _, n, _ in ledger if n == name) for name in ("a1", "a2", "b1", "b2")}
    # Both processes take part; how evenly depends on how each is scheduled on a loaded machine.
    assert all(count > 0 for count in per_consumer.values()), per_consumer
    info = await wait_for(lambda: _settled_info(b.url), 5)
    assert info["job_processed"] == total


async def test_kill_9_returns_leased_jobs_through_another_process(make_broker: MakeBroker, redis_url: str) -> None:
    a, b = two_brokers(make_broker, redis_url)
    ids = await push_batch(a.url, "q", ["x", "y", "z"])
    async with ws_connect(a.ws_url) as doomed, ws_connect(b.ws_url) as survivor:
        await doomed.call("subscribe", queue="q", prefetch=3, lease=1)
        assert [j["id"] for j in await doomed.jobs(3)] == ids
        await survivor.call("subscribe", queue="q")
        a.kill()
        with pytest.raises(ConnectionClosed):
            await doomed.expect("job", timeout=5)
        # Nobody returned the leases at the crash: they come back when the 1 s leases expire
        # (reaped by b), which counts as a failed attempt.
        again = await survivor.jobs(3, timeout=10)
        assert sorted(j["id"] for j in again) == sorted(ids)
        assert all(j["attempt"] == 2 for j in again)
        async with httpx.AsyncClient(base_url=b.url) as http:
            for job in again:
                view = (await http.get(f"/j/q/{job['id']}")).json()
                assert view["failures"] == 1 and view["last_error"] == "lease expired"
        for job in again:
            await survivor.ack(job)
        info = await wait_for(lambda: _settled_info(b.url), 5)
        assert info["job_processed"] == 3


async def _settled_info(url: str) -> dict[str, Any] | None:
    info = await queue_info(url, "q")
    return info if info["leased"] == 0 and info["ready"] == 0 and info["delayed"] == 0 else None


async def test_pause_stops_delivery_on_every_process(make_broker: MakeBroker, redis_url: str) -> None:
    a, b = two_brokers(make_broker, redis_url)
    await push_batch(a.url, "q", list(range(300)))
    received: dict[str, list[float]] = {"a": [], "b": []}
    stop = asyncio.Event()

    async def consume(name: str, ws: WsClient) -> None:
        await ws.call("subscribe", queue="q", prefetch=2)
        while not stop.is_set():
            try:
                job = await ws.expect("job", timeout=0.1)
            except TimeoutError:
                continue
            received[name].append(time.monotonic())
            await ws.ack(job)

    async with ws_connect(a.ws_url) as wa, ws_connect(b.ws_url) as wb, httpx.AsyncClient() as http:
        tasks = [asyncio.create_task(consume("a", wa)), asyncio.create_task(consume("b", wb))]
        await wait_for(lambda: len(received["a"]) >= 5 and len(received["b"]) >= 5, 10)
        response = await http.post(f"{a.url}/control/q", json={"status": "stop"})
        paused_at = time.monotonic()
        assert response.status_code == 200
        await asyncio.sleep(1.2)  # the window in which delivery must have stopped, and then some
        # Only jobs fetched before the pause may still arrive: at most each consumer's prefetch.
        late = [t for t in received["a"] + received["b"] if t > paused_at]
        assert len(late) <= 4
        assert len(received["a"]) + len(received["b"]) < 300
        response = await http.post(f"{b.url}/control/q", json={"status": "start"})
        await wait_for(lambda: len(received["a"]) + len(received["b"]) == 300, 15)
        stop.set()
        await asyncio.gather(*tasks)


async def test_max_inflight_holds_across_processes(make_broker: MakeBroker, redis_url: str) -> None:
    a, b = two_brokers(make_broker, redis_url)
    await push_batch(a.url, "capped", list(range(10)))
    async with ws_connect(a.ws_url) as wa, ws_connect(b.ws_url) as wb:
        await wa.call("subscribe", queue="capped", prefetch=10)
        await wb.call("subscribe", queue="capped", prefetch=10)

        def jobs() -> list[dict[str, Any]]:
            return [f for _, f in wa.received + wb.received if f["op"] == "job"]

        async def settled(count: int) -> None:
            deadline = time.monotonic() + 5
            while len(jobs()) < count and time.monotonic() < deadline:
                await wa.silent("job", 0.02)
                await wb.silent("job", 0.02)
            # Jobs that came while a reply was awaited are stashed; counted already, they are not "more".
            for ws in (wa, wb):
                ws.stash = [f for f in ws.stash if f["op"] != "job"]
            # Nothing more comes, on either process (both would have credit for 7 more).
            assert await wa.silent("job", 0.4) and await wb.silent("job", 0.1)
            assert len(jobs()) == count

        await settled(3)
        assert (await queue_info(a.url, "capped"))["leased"] == 3
        first = jobs()[0]
        holder = wa if any(f is first for _, f in wa.received) else wb
        await holder.call("ack", id=first["id"], token=first["token"])
        await settled(4)  # one slot came free: exactly one more job, to either process's consumer
        assert (await queue_info(b.url, "capped"))["leased"] == 3


async def test_rate_limit_holds_across_processes(make_broker: MakeBroker, redis_url: str) -> None:
    a, b = two_brokers(make_broker, redis_url)
    total, rate = 50, 20
    await push_batch(a.url, "paced", list(range(total)))
    async with ws_connect(a.ws_url) as wa, ws_connect(b.ws_url) as wb:
        await wa.call("subscribe", queue="paced", ack="auto", prefetch=50)
        await wb.call("subscribe", queue="paced", ack="auto", prefetch=50)

        async def drain(ws: WsClient) -> None:
            while sum(1 for _, f in wa.received + wb.received if f["op"] == "job") < total:
                with contextlib.suppress(TimeoutError):
                    await ws.expect("job", timeout=0.1)

        await asyncio.wait_for(asyncio.gather(drain(wa), drain(wb)), 15)
    times = sorted(t for t, f in wa.received + wb.received if f["op"] == "job")
    assert {f["op"] for _, f in wa.received} >= {"job"} and {f["op"] for _, f in wb.received} >= {"job"}
    # One token bucket in Redis for both processes (burst 20, 20/s): the 30 jobs after the burst
    # take 1.5 s. Two buckets would have taken a quarter of that.
    burst = max(rate, 1)
    assert times[-1] - times[0] >= (total - burst) / rate * 0.8


async def test_broadcast_reaches_every_listener_on_every_process(make_broker: MakeBroker, redis_url: str) -> None:
    a, b = two_brokers(make_broker, redis_url)
    async with (
        ws_connect(a.ws_url) as la1,
        ws_connect(a.ws_url) as la2,
        ws_connect(b.ws_url) as lb1,
        ws_connect(b.ws_url) as lb2,
        ws_connect(a.ws_url) as pa,
        ws_connect(b.ws_url) as pb,
    ):
        listeners = [la1, la2, lb1, lb2]
        for listener in listeners:
            await listener.call("listen", channel="news")
        await pb.call("listen", channel="other")
        for n in range(20):
            await pa.send({"op": "publish", "channel": "news", "data": {"from": "a", "n": n}})
            await pb.send({"op": "publish", "channel": "news", "data": {"from": "b", "n": n}})
        for listener in listeners:
            messages = [(await listener.expect("message"))["data"] for _ in range(40)]
            for origin in ("a", "b"):  # every message, each publisher's in order
                assert [m["n"] for m in messages if m["from"] == origin] == list(range(20))
        assert await pb.silent("message", 0.2)  # not listening to news


async def test_events_reach_a_watcher_on_another_process(make_broker: MakeBroker, redis_url: str) -> None:
    a, b = two_brokers(make_broker, redis_url)
    async with ws_connect(a.ws_url) as watcher, ws_connect(b.ws_url) as worker:
        await watcher.call("watch", topic="events", queue="q")
        # b hears of the watch over pub/sub at once; the heartbeat would tell it within a second.
        first = (await worker.call("push", queue="q", body=0))["id"]
        event = await watcher.expect("event", timeout=3)
        assert event == {"op": "event", "queue": "q", "id": first, "event": "pushed", "data": None}
        await worker.call("subscribe", queue="q")
        (job,) = await worker.jobs(1)
        await worker.call("progress", id=job["id"], token=job["token"], data={"pct": 10})
        await worker.call("nack", id=job["id"], token=job["token"], error="boom")
        (job,) = await worker.jobs(1)
        await worker.call("ack", id=job["id"], token=job["token"], result=42)
        seen = [(await watcher.expect("event"))["event"] for _ in range(5)]
        assert seen == ["delivered", "progress", "nacked", "delivered", "acked"]
