"""Delivery over WebSocket in one broker process: pushed not polled, credit, requeue, retries,
slow consumers, push confirmations, the stats and events streams.

Real uvicorn in the test's loop (``run_broker``), real redis-server, the ``websockets`` client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from broker import keys
from broker.models import PushOptions
from tests.invariants import check_queue
from tests.servers import RunningBroker, make_settings, run_broker, wait_for
from tests.wsclient import WsClient, slow_reader, ws_connect

pytestmark = pytest.mark.core

SAFETY_WAKE = 5.0  # broker.feed.SAFETY_WAKE: when an idle feed would look again by itself


def settings_for(redis_url: str, **sections: dict[str, Any]) -> Any:
    data: dict[str, dict[str, Any]] = {"queues": {"reap_interval": 0.1}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return make_settings(redis_url, data)


@pytest.fixture
async def broker(redis_url: str) -> AsyncIterator[RunningBroker]:
    async with run_broker(settings_for(redis_url, queues={"backoff_base": 0.5, "max_attempts": 3})) as running:
        yield running


@pytest.fixture
async def http(broker: RunningBroker) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=broker.url) as client:
        yield client


async def push(http: httpx.AsyncClient, queue: str, body: object, **query: Any) -> str:
    response = await http.post(f"/q/{queue}", json=body, params=query)
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    return job_id


async def push_many(http: httpx.AsyncClient, queue: str, bodies: list[Any]) -> list[str]:
    response = await http.post(f"/qb/{queue}", json=bodies)
    assert response.status_code == 201, response.text
    ids: list[str] = response.json()["ids"]
    return ids


async def test_a_pushed_job_reaches_an_idle_subscriber_without_polling(
    broker: RunningBroker, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An idle feed never looks again by itself: only the push's pub/sub wake-up can bring the job.
    monkeypatch.setattr("broker.feed.SAFETY_WAKE", 600.0)
    async with ws_connect(broker.ws_url) as ws:
        await ws.call("subscribe", queue="q")
        for n in range(3):
            assert await ws.silent("job", 0.05)
            job_id = await push(http, "q", {"n": n})
            (job,) = await ws.jobs(1, timeout=10)
            assert job["id"] == job_id
            await ws.ack(job)


async def test_prefetch_bounds_unacked_jobs(broker: RunningBroker, http: httpx.AsyncClient) -> None:
    await push_many(http, "q", list(range(20)))
    async with ws_connect(broker.ws_url) as ws:
        await ws.call("subscribe", queue="q", prefetch=3)
        jobs = await ws.jobs(3)
        assert await ws.silent("job", 0.3)
        await ws.ack(jobs[0])
        (fourth,) = await ws.jobs(1)
        assert await ws.silent("job", 0.2)
        await ws.send({"op": "nack", "id": jobs[1]["id"], "token": jobs[1]["token"], "delay": 60})
        await ws.ack(jobs[2])
        await ws.jobs(2)
        assert await ws.silent("job", 0.2)
        assert [j["body"] for j in jobs] + [fourth["body"]] == [0, 1, 2, 3]
        info = (await http.get("/j/q")).json()
        assert info["leased"] == 3 and info["delayed"] == 1


async def test_auto_ack_jobs_have_no_token_and_are_gone(
    broker: RunningBroker, http: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    ids = await push_many(http, "q", list(range(25)))
    async with ws_connect(broker.ws_url) as ws:
        await ws.call("subscribe", queue="q", ack="auto", prefetch=2)
        jobs = await ws.jobs(25)  # never acked, and yet more than prefetch arrive
        assert [j["id"] for j in jobs] == ids
        assert all("token" not in j for j in jobs)
    states = await check_queue(redis, "q")
    assert not any(states.values())
    assert (await http.get("/j/q")).json()["job_processed"] == 25


async def test_disconnect_returns_held_jobs_at_once(broker: RunningBroker, http: httpx.AsyncClient) -> None:
    ids = await push_many(http, "q", ["a", "b", "c"])
    async with ws_connect(broker.ws_url) as other:
        async with ws_connect(broker.ws_url) as holder:
            await holder.call("subscribe", queue="q", lease=300)
            assert [j["id"] for j in await holder.jobs(3)] == ids
            await other.call("subscribe", queue="q")
            assert await other.silent("job", 0.2)
        # The lease is 300 s: only the disconnect can have given them back.
        again = await other.jobs(3, timeout=5)
        assert [j["id"] for j in again] == ids
        assert all(j["attempt"] == 2 for j in again)
        for job_id in ids:
            job = (await http.get(f"/j/q/{job_id}")).json()
            assert job["failures"] == 0 and job["last_error"] is None
        assert (await http.get("/j/q")).json()["job_failed"] == 0


async def test_unsubscribe_returns_held_jobs(broker: RunningBroker, http: httpx.AsyncClient) -> None:
    await push_many(http, "q", [1, 2])
    async with ws_connect(broker.ws_url) as ws:
        await ws.call("subscribe", queue="q", lease=300)
        jobs = await ws.jobs(2)
        await ws.call("unsubscribe", queue="q")
        info = (await http.get("/j/q")).json()
        assert info["ready"] == 2 and info["leased"] == 0  # back before the reply
        assert (await ws.call("ack", id=jobs[0]["id"], token=jobs[0]["token"]))["code"] == "unknown_job"
        assert await ws.silent("job", 0.2)


async def test_consumers_of_one_queue_share_it(broker: RunningBroker, http: httpx.AsyncClient) -> None:
    async with ws_connect(broker.ws_url) as a, ws_connect(broker.ws_url) as b:
        await a.call("subscribe", queue="q", prefetch=2)
        await b.call("subscribe", queue="q", prefetch=2)
        ids = await push_many(http, "q", list(range(40)))
        got: dict[str, list[str]] = {"a": [], "b": []}

        async def consume(name: str, ws: WsClient) -> None:
            while sum(len(v) for v in got.values()) < 40:
                try:
                    job = await ws.expect("job", timeout=0.5)
                except TimeoutError:
                    continue
                got[name].append(job["id"])
                await ws.ack(job)

        await asyncio.wait_for(asyncio.gather(consume("a", a), consume("b", b)), 10)
        assert sorted(got["a"] + got["b"]) == sorted(ids)
        assert len(got["a"]) >= 5 and len(got["b"]) >= 5  # round-robin, whatever the load


async def test_delayed_job_arrives_at_its_time(broker: RunningBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("broker.feed.SAFETY_WAKE", 600.0)  # only the feed's timer can bring it
    async with ws_connect(broker.ws_url) as ws:
        await ws.call("subscribe", queue="q")
        pushed_at = time.monotonic()
        await ws.call("push", queue="q", body="later", delay=0.6)
        (job,) = await ws.jobs(1, timeout=10)
        assert job["body"] == "later"
        assert time.monotonic() - pushed_at >= 0.55  # not before its time (clocks may differ by ms)


async def test_nack_backs_off_then_dead_letters(broker: RunningBroker, http: httpx.AsyncClient) -> None:
    async with ws_connect(broker.ws_url) as ws, ws_connect(broker.ws_url) as watcher:
        await watcher.call("watch", topic="events", queue="q")
        await ws.call("subscribe", queue="q")
        job_id = (await ws.call("push", queue="q", body="flaky"))["id"]
        for attempt in (1, 2, 3):
            (job,) = await ws.jobs(1, timeout=SAFETY_WAKE)
            assert job["id"] == job_id and job["attempt"] == attempt
            nacked_at = time.monotonic()
            await ws.send({"op": "nack", "id": job_id, "token": job["token"], "error": f"fail {attempt}"})
            if attempt == 1:
                # backoff_base 0.5 s with +-20% jitter: not before 0.4 s.
                (retry,) = await ws.jobs(1, timeout=SAFETY_WAKE)
                assert time.monotonic() - nacked_at >= 0.39
                ws.stash.insert(0, retry)
        assert await ws.silent("job", 0.3)
        dead = (await http.get("/dead/q")).json()
        assert dead["total"] == 1 and dead["jobs"][0]["id"] == job_id
        assert dead["jobs"][0]["last_error"] == "fail 3"
        event = await watcher.expect(lambda f: f.get("event") == "dead")
        assert event == {
            "op": "event",
            "queue": "q",
            "id": job_id,
            "event": "dead",
            "data": {"error": "fail 3", "outcome": "dead"},
        }


async def test_job_events_stream(broker: RunningBroker, http: httpx.AsyncClient) -> None:
    async with ws_connect(broker.ws_url) as watcher, ws_connect(broker.ws_url) as ws:
        await watcher.call("watch", topic="events", queue="q")
        await watcher.call("watch", topic="events")  # and every queue: still one event each
        await ws.call("subscribe", queue="q", prefetch=2)
        first = await push(http, "q", {"n": 1})
        second = (await ws.call("push", queue="q", body={"n": 2}))["id"]
        await ws.call("push", queue="other", body=None)
        jobs = await ws.jobs(2)
        await ws.call("progress", id=jobs[0]["id"], token=jobs[0]["token"], data={"pct": 50})
        await ws.call("ack", id=jobs[0]["id"], token=jobs[0]["token"], result={"ok": True})
        await ws.call("nack", id=jobs[1]["id"], token=jobs[1]["token"], delay=60, error="later")
        expected = [
            (first, "pushed", None),
            (second, "pushed", None),
            (first, "delivered", {"attempt": 1}),
            (second, "delivered", {"attempt": 1}),
            (first, "progress", {"pct": 50}),
            (first, "acked", {"ok": True}),
            (second, "nacked", {"error": "later", "outcome": "delayed"}),
        ]
        events = [await watcher.expect("event") for _ in range(len(expected) + 1)]
        mine = [(e["id"], e["event"], e["data"]) for e in events if e["queue"] == "q"]
        others = [e for e in events if e["queue"] == "other"]
        assert sorted(mine, key=str) == sorted(expected, key=str)
        assert [e["event"] for e in others] == ["pushed"]
        for job_id in (first, second):  # a job's own events come in lifecycle order
            order = [m[1] for m in mine if m[0] == job_id]
            assert order == [x[1] for x in expected if x[0] == job_id]
        assert await watcher.silent("event", 0.2)
        await watcher.call("unwatch", topic="events", queue="q")
        await watcher.call("unwatch", topic="events")
        await push(http, "q", 3)
        assert await watcher.silent("event", 0.3)


async def test_stats_stream(broker: RunningBroker, http: httpx.AsyncClient) -> None:
    await push_many(http, "q", [1, 2, 3])
    await push(http, "other", 1)
    async with ws_connect(broker.ws_url) as ws:
        await ws.call("subscribe", queue="q", prefetch=1)
        await ws.jobs(1)
        await ws.call("watch", topic="stats")
        first, stats = [await ws.expect("stats", timeout=3) for _ in range(2)]
        assert 0.5 < stats["ts"] - first["ts"] < 3.0  # about once a second
        assert {"ts", "totals", "queues", "processes", "workers"} <= set(stats)
        q = stats["queues"]["q"]
        assert q["ready"] == 2 and q["leased"] == 1 and q["pushed"] == 3 and q["consumers"] == 1
        assert stats["totals"]["ready"] == 3 and stats["totals"]["queues"] == 2
        assert any(p["connections"] >= 1 for p in stats["processes"])
        await ws.call("unwatch", topic="stats")
        await ws.call("watch", topic="stats", queue="q")
        only_q = await ws.expect("stats", timeout=3)
        assert set(only_q["queues"]) == {"q"}
        await ws.call("unwatch", topic="stats", queue="q")
        ws.stash.clear()
        assert await ws.silent("stats", 1.2)


async def test_many_pushes_in_flight_on_one_connection(broker: RunningBroker, redis: aioredis.Redis) -> None:
    async with ws_connect(broker.ws_url) as ws:
        for n in range(300):
            await ws.send({"op": "push", "queue": "q", "body": n, "ref": f"p{n}"})
        await ws.send({"op": "push", "queue": "q", "jobs": [1, 2], "ref": "batch"})
        replies = [await ws.expect("pushed") for _ in range(301)]
        by_ref = {r["ref"]: r for r in replies}
        assert set(by_ref) == {f"p{n}" for n in range(300)} | {"batch"}
        ids = [by_ref[f"p{n}"]["id"] for n in range(300)] + by_ref["batch"]["ids"]
        assert len(set(ids)) == 302
    assert await redis.zcard(keys.queue_keys("q").ready) == 302


# The broker's own protocol writes a batch of frames at once; under another, frame by frame.
@pytest.mark.parametrize("ws", [None, "websockets-sansio"], ids=["batched", "frame-by-frame"])
async def test_a_slow_reader_stops_receiving_and_others_go_on(redis_url: str, ws: str | None) -> None:
    send_buffer = 65536
    async with run_broker(settings_for(redis_url, websocket={"send_buffer": send_buffer}), ws=ws) as broker:
        runtime = broker.app.state.runtime  # type: ignore[attr-defined]
        body = b'"' + b"x" * 20_000 + b'"'
        total = 600  # 12 MB: more than the kernel buffers between broker and client hold
        for _ in range(0, total, 100):
            await runtime.queues.push_many("q", [(body, PushOptions())] * 100)
        async with slow_reader(broker.ws_url, {"op": "subscribe", "queue": "q", "ack": "auto", "prefetch": 20}):
            async with httpx.AsyncClient(base_url=broker.url) as http:
                ready = await _settled(http, "q")
                assert ready > 0  # it stopped taking jobs for the reader that reads nothing
                (conn,) = runtime.delivery.connections
                assert conn.session.send_backlog < send_buffer + 20 * len(body) + 1000  # bounded
                async with ws_connect(broker.ws_url) as fast:
                    await fast.call("subscribe", queue="q", prefetch=20)
                    received = 0
                    while True:
                        try:
                            await fast.ack(await fast.expect("job", timeout=0.5))
                            received += 1
                        except TimeoutError:
                            info = (await http.get("/j/q")).json()
                            if info["ready"] == 0 and info["leased"] == 0:
                                break
                    # The other consumer got what was left (the stuck one may have taken a few
                    # more as the kernel drained a little).
                    assert received >= ready - 20


async def _settled(http: httpx.AsyncClient, queue: str, still: float = 0.5) -> int:
    """The queue's ready count once it has not changed for ``still`` seconds."""
    last, since = -1, time.monotonic()

    async def steady() -> int | None:
        nonlocal last, since
        ready = int((await http.get(f"/j/{queue}")).json()["ready"])
        if ready != last:
            last, since = ready, time.monotonic()
            return None
        return ready if time.monotonic() - since >= still else None

    result: int = await wait_for(steady, 10, interval=0.05)
    return result


async def test_pause_stops_delivery_and_start_resumes(broker: RunningBroker, http: httpx.AsyncClient) -> None:
    async with ws_connect(broker.ws_url) as ws:
        await ws.call("subscribe", queue="q")
        assert (await http.post("/control/q", json={"status": "stop"})).status_code == 200
        await push_many(http, "q", [1, 2, 3])
        assert await ws.silent("job", 1.0)
        assert (await http.post("/control/q", json={"status": "start"})).status_code == 200
        assert len(await ws.jobs(3, timeout=2)) == 3


async def test_job_events_of_the_http_path(broker: RunningBroker, http: httpx.AsyncClient) -> None:
    async with ws_connect(broker.ws_url) as watcher:
        await watcher.call("watch", topic="events", queue="h")
        ids = await push_many(http, "h", [{"n": 1}, {"n": 2}])
        taken = []
        for _ in ids:
            reply = await http.get(f"{broker.url}/q/h", params={"lease": 30})
            taken.append((reply.headers["x-presque-job-id"], reply.headers["x-presque-lease-token"]))
        (first, first_token), (second, second_token) = taken
        assert (await http.post(f"{broker.url}/j/h/{first}/ack", json={"token": first_token})).status_code == 200
        nack = await http.post(
            f"{broker.url}/j/h/{second}/nack", json={"token": second_token, "error": "no", "delay": 60}
        )
        assert nack.status_code == 200
        expected = [
            (ids[0], "pushed", None),
            (ids[1], "pushed", None),
            (first, "delivered", {"attempt": 1}),
            (second, "delivered", {"attempt": 1}),
            (first, "acked", None),
            (second, "nacked", {"error": "no", "outcome": "delayed"}),
        ]
        events = [await watcher.expect("event") for _ in expected]
        assert sorted(((e["id"], e["event"], e["data"]) for e in events), key=str) == sorted(expected, key=str)


async def test_job_events_of_lapsed_leases(broker: RunningBroker, http: httpx.AsyncClient) -> None:
    # The reaper (every 0.1 s here) settles a lapsed lease as a failure: watchers hear it as they
    # would hear a consumer's nack of the job.
    async with ws_connect(broker.ws_url) as watcher:
        await watcher.call("watch", topic="events", queue="lapse")
        retried = await push(http, "lapse", {"n": 1})
        last_try = await push(http, "lapse", {"n": 2}, max_attempts=1)
        for job_id in (retried, last_try):
            reply = await http.get(f"{broker.url}/q/lapse", params={"lease": 1})  # the shortest
            assert reply.status_code == 200 and reply.headers["x-presque-job-id"] == job_id
        expected = [
            (retried, "pushed", None),
            (last_try, "pushed", None),
            (retried, "delivered", {"attempt": 1}),
            (last_try, "delivered", {"attempt": 1}),
            (retried, "nacked", {"error": "lease expired", "outcome": "delayed"}),
            (last_try, "dead", {"error": "lease expired", "outcome": "dead"}),
        ]
        events = [await watcher.expect("event", timeout=10) for _ in expected]
        assert sorted(((e["id"], e["event"], e["data"]) for e in events), key=str) == sorted(expected, key=str)
        assert (await http.get(f"{broker.url}/dead/lapse")).json()["total"] == 1


async def test_commands_in_flight_are_bounded_per_connection(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("broker.connection_commands.MAX_PENDING", 3)
    async with run_broker(settings_for(redis_url)) as broker:
        runtime = broker.app.state.runtime  # type: ignore[attr-defined]
        gate = asyncio.Event()
        flush = runtime.pusher._flush
        in_flight: list[int] = []  # the connection's commands running, as each push starts
        push_soon = runtime.push_soon

        def counted(*args: Any) -> None:
            (conn,) = runtime.delivery.connections
            in_flight.append(conn._pending)
            push_soon(*args)

        async def gated(key: str, items: Any) -> Any:
            await gate.wait()
            return await flush(key, items)

        runtime.push_soon = counted
        runtime.pusher._flush = gated  # no push completes until the gate opens
        async with ws_connect(broker.ws_url) as ws:
            for n in range(1, 6):
                await ws.send({"op": "push", "queue": "b", "body": n, "ref": f"p{n}"})
            (conn,) = runtime.delivery.connections
            await wait_for(lambda: conn._pending == 3)
            assert in_flight == [1, 2, 3]  # the 4th waits for a slot
            gate.set()
            replies = [await ws.expect(lambda f, n=n: f.get("ref") == f"p{n}") for n in range(1, 6)]
        assert all(reply["op"] == "pushed" for reply in replies)
        assert max(in_flight) == 3 and len(in_flight) == 5
