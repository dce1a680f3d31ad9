"""Faults survived, for real: killed brokers, restarted and frozen Redis, consumers that misbehave.

Every test runs real ``redis-server`` and ``presque serve`` processes on loopback and keeps a
ledger (``tests/ledger.py``) of what the broker confirmed: every push answered 201 / ``pushed``
must be delivered and acked in the end, and nothing acked may come back. docs/durability.md
cites these tests by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ledger import Consumer, Harness, Ledger, WsClient, WsProducer, http_produce, memory_kib
from tests.servers import REPO, BrokerServer, RedisServer, free_port, wait_for

# Small leases and a fast reaper so that expiry-driven redelivery happens within seconds;
# Redis calls time out after 1 s so that an unreachable Redis is answered promptly.
SOCKET_TIMEOUT = 1.0
FAST = {
    "queues": {"reap_interval": 0.1, "backoff_base": 0.05, "backoff_max": 0.2},
    "redis": {"socket_timeout": SOCKET_TIMEOUT},
}
LEASE = 1.0
CLIENT_TIMEOUT = SOCKET_TIMEOUT + 1.5  # no request may hang longer than this


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    yield h
    await h.aclose()


async def queue_info(url: str, queue: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"{url}/j/{queue}")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data


async def drained(url: str, queue: str) -> bool:
    info = await queue_info(url, queue)
    return info["ready"] == info["delayed"] == info["leased"] == info["dead"] == 0


async def healthy(http: httpx.AsyncClient, url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return (await http.get(f"{url}/health", timeout=3)).status_code == 200
    return False


# -- a broker process dies -------------------------------------------------------------------------


async def test_broker_kill_while_leased_and_pushing(
    make_redis_server: Callable[..., RedisServer], make_broker: Callable[..., BrokerServer], harness: Harness
) -> None:
    """kill -9 of a broker with jobs leased (WS and HTTP) and pushes in flight (HTTP and WS).

    Every confirmed push is acked through the other process; leased jobs come back by lease
    expiry; no acked job is delivered again; the killed broker serves again after a restart.
    """
    redis = make_redis_server()
    a = make_broker(redis.url, config=FAST)
    b = make_broker(redis.url, config=FAST)
    ledger = Ledger()
    queue = "jobs"

    # On A: a consumer that acks about every other job and holds the rest.
    holder = await harness.client(
        Consumer(a.ws_url, queue, ledger, prefetch=20, lease=LEASE, should_ack=lambda f: f["id"][-1] in "02468ACEGIK")
    )
    stop = asyncio.Event()
    http_failures: list[str] = []
    async with httpx.AsyncClient(timeout=5) as http:
        ws_producer = await harness.client(WsProducer(a.ws_url, queue, ledger, window=10))
        producers = [
            harness.task(http_produce(http, a.url, queue, ledger, stop=stop, failures=http_failures)) for _ in range(4)
        ]
        producers.append(harness.task(ws_producer.run(stop=stop)))
        await wait_for(lambda: len(ledger.pushed) >= 300 and len(holder.held) >= 10, timeout=20)
        # And jobs leased over HTTP, never acked.
        http_leases = []
        for _ in range(3):
            response = await http.get(f"{a.url}/q/{queue}", params={"lease": LEASE})
            assert response.status_code == 200, response.text
            http_leases.append(response.headers["X-Presque-Job-Id"])
            ledger.delivered(http_leases[-1], int(response.headers["X-Presque-Attempt"]))
        in_flight = set(holder.held) | set(http_leases)

        a.kill()  # pushes are in flight right now
        await asyncio.wait_for(asyncio.gather(*producers), 10)
        stop.set()
        assert http_failures or ws_producer.failures, "the producers did not notice the kill"

        # Everything confirmed is acked through B; A's leased jobs after their lease expired.
        await harness.client(Consumer(b.ws_url, queue, ledger, prefetch=20, lease=LEASE))
        await wait_for(ledger.all_acked, timeout=30, message=f"not all acked: {ledger.summary()}")
        for job_id in in_flight:
            assert max(ledger.attempts[job_id]) >= 2, f"{job_id} came back without a new attempt"

        # The killed broker serves again after a restart, on the same Redis.
        a.start()
        restarted = await harness.client(WsProducer(a.ws_url, queue, ledger, window=5))
        assert await restarted.run(count=20) == 20
        assert await http_produce(http, a.url, queue, ledger, count=20) == 20
        await wait_for(ledger.all_acked, timeout=10, message=ledger.summary())
        await wait_for(lambda: drained(b.url, queue), timeout=10)

    ledger.check()
    assert holder.closed.is_set()
    print(f"broker kill -9: {ledger.summary()}; leased at the kill: {len(in_flight)}")


async def test_broker_kill_and_restart_embedded(make_broker: Callable[..., BrokerServer], harness: Harness) -> None:
    """The default deployment (embedded Redis): kill -9 of the broker, then restart it.

    The killed broker's redis-server outlives it; the restarted broker stops that one cleanly
    (its AOF flushed) and starts its own on the same data: every confirmed push is delivered,
    the jobs leased at the kill come back by lease expiry.
    """
    broker = make_broker(None, config=FAST)
    ledger = Ledger()
    queue = "jobs"
    holder = await harness.client(
        Consumer(broker.ws_url, queue, ledger, prefetch=10, lease=LEASE, should_ack=lambda f: False)
    )
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=5) as http:
        ws_producer = await harness.client(WsProducer(broker.ws_url, queue, ledger, window=10))
        producers = [harness.task(http_produce(http, broker.url, queue, ledger, stop=stop)) for _ in range(4)]
        producers.append(harness.task(ws_producer.run(stop=stop)))
        await wait_for(lambda: len(ledger.pushed) >= 200 and len(holder.held) >= 10, timeout=20)
        held = set(holder.held)
        broker.kill()
        await asyncio.wait_for(asyncio.gather(*producers), 10)
        stop.set()

        broker.start()
        await harness.client(Consumer(broker.ws_url, queue, ledger, prefetch=50, lease=LEASE))
        await wait_for(ledger.all_acked, timeout=20, message=ledger.summary())
        await wait_for(lambda: drained(broker.url, queue), timeout=10)
    ledger.check()
    assert all(max(ledger.attempts[job_id]) == 2 for job_id in held)
    print(f"embedded broker kill -9 + restart: {ledger.summary()}")


# -- Redis restarts ---------------------------------------------------------------------------------


async def test_redis_restart_keeps_acknowledged_pushes_and_consumers_resume(
    make_redis_server: Callable[..., RedisServer], make_broker: Callable[..., BrokerServer], harness: Harness
) -> None:
    """A clean Redis restart (SHUTDOWN, start on the same port and AOF, appendfsync everysec).

    Confirmed pushes and leases survive it, the broker reconnects by itself, and WebSocket
    consumers connected before the restart go on receiving without reconnecting.
    """
    redis = make_redis_server(appendfsync="everysec")
    broker = make_broker(redis.url, config=FAST)
    work, hold, stash = Ledger(), Ledger(), Ledger()
    worker = await harness.client(Consumer(broker.ws_url, "work", work, prefetch=10, lease=30))
    holder = await harness.client(
        Consumer(broker.ws_url, "hold", hold, prefetch=5, lease=30, should_ack=lambda f: False)
    )
    async with httpx.AsyncClient(timeout=5) as http:
        assert await http_produce(http, broker.url, "work", work, count=20) == 20
        await wait_for(work.all_acked, message=work.summary())
        assert await http_produce(http, broker.url, "hold", hold, count=5) == 5
        await wait_for(lambda: len(holder.held) == 5)
        assert await http_produce(http, broker.url, "stash", stash, count=100) == 100
        ws_producer = await harness.client(WsProducer(broker.ws_url, "stash", stash, window=10))
        assert await ws_producer.run(count=50) == 50

        with redis.client() as client:
            client.shutdown()  # SHUTDOWN: the AOF is written and fsynced, then Redis exits
        await wait_for(lambda: not redis.running, timeout=10)
        response = await http.post(f"{broker.url}/q/work", content=b"{}", timeout=CLIENT_TIMEOUT)
        assert response.status_code == 503 and response.headers["Retry-After"]

        redis.start()
        await wait_for(lambda: healthy(http, broker.url), timeout=15, message="the broker did not reconnect")

        # The same sockets: the worker receives new jobs, the holder's leases are still its own.
        assert await http_produce(http, broker.url, "work", work, count=20) == 20
        assert await ws_producer.run(count=10) == 10
        await wait_for(work.all_acked, timeout=15, message=work.summary())
        holder.ack_held()
        await wait_for(hold.all_acked, timeout=10, message=hold.summary())
        assert not holder.stale_acks

        # Everything pushed to the stash before the restart is still there.
        await harness.client(Consumer(broker.ws_url, "stash", stash, prefetch=100))
        await wait_for(stash.all_acked, timeout=15, message=stash.summary())
        for name in ("work", "hold", "stash"):
            await wait_for(lambda name=name: drained(broker.url, name), timeout=10)
        assert not worker.closed.is_set() and not holder.closed.is_set()
    for ledger in (work, hold, stash):
        ledger.check()
        assert not ledger.duplicates


async def test_redis_kill_with_appendfsync_always_loses_nothing(
    make_redis_server: Callable[..., RedisServer], make_broker: Callable[..., BrokerServer], harness: Harness
) -> None:
    """appendfsync always: a SIGKILL of Redis while pushes are in flight loses no confirmed push."""
    redis = make_redis_server(appendfsync="always")
    broker = make_broker(redis.url, config=FAST)
    ledger = Ledger()
    queue = "jobs"
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=5) as http:
        ws_producer = await harness.client(WsProducer(broker.ws_url, queue, ledger, window=10))
        producers = [harness.task(http_produce(http, broker.url, queue, ledger, stop=stop)) for _ in range(4)]
        producers.append(harness.task(ws_producer.run(stop=stop)))
        await wait_for(lambda: len(ledger.pushed) >= 300, timeout=20)
        redis.kill()  # pushes are in flight right now
        await asyncio.wait_for(asyncio.gather(*producers), 10)
        stop.set()
        confirmed = len(ledger.pushed)

        redis.start()
        await wait_for(lambda: healthy(http, broker.url), timeout=15, message="the broker did not reconnect")
        await harness.client(Consumer(broker.ws_url, queue, ledger, prefetch=50))
        await wait_for(ledger.all_acked, timeout=20, message=ledger.summary())
        await wait_for(lambda: drained(broker.url, queue), timeout=10)
        assert not ws_producer.closed.is_set(), "the producer's WebSocket should survive the Redis crash"
    ledger.check()
    assert confirmed >= 300
    print(f"redis SIGKILL (appendfsync always): {ledger.summary()}")


# -- Redis unreachable ------------------------------------------------------------------------------


REQUESTS = [("POST", "/q/jobs"), ("GET", "/q/jobs"), ("GET", "/q/jobs?wait=5"), ("GET", "/j/jobs")]


@pytest.mark.parametrize("fault", ["stopped", "frozen"])
async def test_redis_unreachable_answers_503_then_recovers(
    fault: str,
    make_redis_server: Callable[..., RedisServer],
    make_broker: Callable[..., BrokerServer],
    harness: Harness,
) -> None:
    """Redis stopped, or frozen with SIGSTOP: prompt 503s with Retry-After, ``unavailable`` error
    frames, /health 503; then everything resumes on the same connections when Redis is back."""
    redis = make_redis_server()
    broker = make_broker(redis.url, config=FAST)
    ledger = Ledger()
    consumer = await harness.client(Consumer(broker.ws_url, "jobs", ledger))
    producer = await harness.client(WsProducer(broker.ws_url, "jobs", ledger))
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as http:
        assert await http_produce(http, broker.url, "jobs", ledger, count=5) == 5
        await wait_for(ledger.all_acked)

        if fault == "stopped":
            redis.stop()
        else:
            redis.pause()
        try:
            for method, path in REQUESTS:
                started = time.monotonic()
                body = b"{}" if method == "POST" else None
                response = await http.request(method, f"{broker.url}{path}", content=body)
                assert response.status_code == 503, (path, response.text)
                assert response.headers["Retry-After"].isdigit()
                assert "error" in response.json()
                assert time.monotonic() - started < CLIENT_TIMEOUT
            response = await http.get(f"{broker.url}/health")
            assert response.status_code == 503 and response.json()["status"] == "unavailable"

            reply = await producer.request({"op": "push", "queue": "jobs", "body": {"during": fault}})
            assert reply["op"] == "error" and reply["code"] == "unavailable", reply
            reply = await producer.request({"op": "publish", "channel": "news", "data": fault})
            assert reply["op"] == "error" and reply["code"] == "unavailable", reply
            # The subscriber is told too (its queue feed failed to fetch), and stays connected.
            await wait_for(lambda: any(e["code"] == "unavailable" for e in consumer.errors), timeout=10)
        finally:
            if fault == "stopped":
                redis.start()
            else:
                redis.resume()

        await wait_for(lambda: healthy(http, broker.url), timeout=15, message="the broker did not recover")
        assert await http_produce(http, broker.url, "jobs", ledger, count=5) == 5
        assert await producer.run(count=5) == 5
        await wait_for(ledger.all_acked, timeout=10, message=ledger.summary())
    assert not consumer.closed.is_set() and not producer.closed.is_set()
    ledger.check()


async def test_a_503_is_not_a_no(
    make_redis_server: Callable[..., RedisServer], make_broker: Callable[..., BrokerServer]
) -> None:
    """A frozen Redis answers nothing and the broker gives up after socket_timeout (503), but the
    command it had sent still runs when Redis thaws: a push answered 503 may be stored, and a
    destructive fetch answered 503 may take a job that nobody receives."""
    redis = make_redis_server()
    broker = make_broker(redis.url, config=FAST)
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as http:
        first = (await http.post(f"{broker.url}/q/jobs", content=b'{"n":1}')).json()["id"]
        # Load the fetch script into Redis and open a few pooled connections, so that the calls
        # below go out at once, whole.
        assert (await http.get(f"{broker.url}/q/other")).status_code == 404
        await asyncio.gather(*(http.get(f"{broker.url}/j/jobs") for _ in range(4)))
        redis.pause()
        try:
            # At once, so that each goes out on a live connection (a timed-out one is closed).
            pushed, taken = await asyncio.gather(
                http.post(f"{broker.url}/q/jobs", content=b'{"n":2}'), http.get(f"{broker.url}/q/jobs")
            )
            assert (pushed.status_code, taken.status_code) == (503, 503)
        finally:
            redis.resume()
        await wait_for(lambda: healthy(http, broker.url), timeout=15)
        info = await queue_info(broker.url, "jobs")
        assert (info["pushed"], info["job_processed"], info["ready"]) == (2, 1, 1)
        assert (await http.get(f"{broker.url}/j/jobs/{first}")).status_code == 404  # gone, received by no one


# -- consumers that misbehave -----------------------------------------------------------------------

CONSUMER_SCRIPT = """
import json, sys
from websockets.sync.client import connect
with connect(sys.argv[1]) as ws:
    ws.send(json.dumps({"op": "subscribe", "queue": sys.argv[2], "prefetch": 5, "lease": 60}))
    for raw in ws:
        frame = json.loads(raw)
        if frame["op"] == "job":
            print(frame["id"], flush=True)  # and never ack
"""


async def test_consumer_process_killed_mid_job(
    redis_url: str, make_broker: Callable[..., BrokerServer], harness: Harness
) -> None:
    """A consumer process killed while it holds jobs: they go to another consumer at once (long
    before their 60 s lease), not counted as a failure."""
    broker = make_broker(redis_url, config=FAST)
    ledger = Ledger()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CONSUMER_SCRIPT, broker.ws_url, "jobs", stdout=subprocess.PIPE, cwd=REPO
    )
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            assert await http_produce(http, broker.url, "jobs", ledger, count=5) == 5
        assert proc.stdout is not None
        held = {(await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip() for _ in range(5)}
        assert held == ledger.pushed
    finally:
        proc.kill()
        await proc.wait()
    started = time.monotonic()
    await harness.client(Consumer(broker.ws_url, "jobs", ledger, prefetch=5))
    await wait_for(ledger.all_acked, timeout=10, message=ledger.summary())
    assert time.monotonic() - started < 30, "the jobs waited for their lease to expire"
    assert all(ledger.attempts[job_id] == [2] for job_id in held)
    info = await queue_info(broker.url, "jobs")
    assert info["job_failed"] == 0 and info["job_processed"] == 5
    ledger.check()


async def test_consumer_socket_dropped_mid_job(
    redis_url: str, make_broker: Callable[..., BrokerServer], harness: Harness
) -> None:
    """A consumer whose TCP connection drops without a close frame: its jobs go to others at once."""
    broker = make_broker(redis_url, config=FAST)
    victim_ledger, ledger = Ledger(), Ledger()
    victim = await harness.client(
        Consumer(broker.ws_url, "jobs", victim_ledger, prefetch=5, lease=60, should_ack=lambda f: False)
    )
    async with httpx.AsyncClient(timeout=5) as http:
        assert await http_produce(http, broker.url, "jobs", ledger, count=5) == 5
    await wait_for(lambda: len(victim.held) == 5)
    victim.abort()
    await harness.client(Consumer(broker.ws_url, "jobs", ledger, prefetch=5))
    await wait_for(ledger.all_acked, timeout=10, message=ledger.summary())
    assert all(ledger.attempts[job_id] == [2] for job_id in ledger.pushed)
    assert (await queue_info(broker.url, "jobs"))["job_failed"] == 0
    ledger.check()


async def test_consumer_that_never_acks_loses_its_jobs_to_others(
    redis_url: str, make_broker: Callable[..., BrokerServer], harness: Harness
) -> None:
    """A consumer that never acks: its leases expire, the jobs are redelivered to another
    consumer, and its late acks are refused (stale_token) instead of completing a job twice."""
    broker = make_broker(redis_url, config=FAST)
    ledger = Ledger()
    idle = await harness.client(
        Consumer(broker.ws_url, "jobs", ledger, prefetch=3, lease=LEASE, should_ack=lambda f: False)
    )
    async with httpx.AsyncClient(timeout=5) as http:
        assert await http_produce(http, broker.url, "jobs", ledger, count=3) == 3
    await wait_for(lambda: len(idle.held) == 3)
    await harness.client(Consumer(broker.ws_url, "jobs", ledger, prefetch=3))
    await wait_for(ledger.all_acked, timeout=10, message=ledger.summary())
    assert all(ledger.attempts[job_id] == [1, 2] for job_id in ledger.pushed)
    idle.ack_held()
    await wait_for(lambda: len(idle.stale_acks) == 3)
    info = await queue_info(broker.url, "jobs")
    assert info["job_processed"] == 3 and info["job_failed"] == 3
    ledger.check()
    assert len(ledger.duplicates) == 3  # each redelivered once, after its lease expired


async def test_slow_reader_does_not_stall_others_and_memory_stays_bounded(
    redis_url: str, make_broker: Callable[..., BrokerServer], harness: Harness
) -> None:
    """Consumers that stop reading their socket (one auto-ack, one manual) while 96 MiB of jobs
    flow: the others get every job, the broker buffers only ~send_buffer per slow socket."""
    broker = make_broker(redis_url, config=FAST)
    assert broker.proc is not None
    ledger, slow_ledger = Ledger(), Ledger()
    queue = "big"
    body = b'{"pad":"' + b"x" * (32 * 1024) + b'"}'
    count = 3000

    fast = [await harness.client(Consumer(broker.ws_url, queue, ledger, prefetch=10)) for _ in range(2)]
    slow_auto = await harness.client(Consumer(broker.ws_url, queue, ledger, prefetch=1000, ack="auto", max_queue=1))
    slow_manual = await harness.client(
        Consumer(broker.ws_url, queue, slow_ledger, prefetch=50, lease=LEASE, max_queue=1)
    )
    await slow_auto.pause_reading()
    await slow_manual.pause_reading()
    async with httpx.AsyncClient(timeout=10) as http:
        assert await http_produce(http, broker.url, queue, ledger, count=20, body=body) == 20
        await wait_for(lambda: fast[0].received and fast[1].received, timeout=10)
        rss_before, _ = memory_kib(broker.proc.pid)
        producer = await harness.client(WsProducer(broker.ws_url, queue, ledger, window=16))
        assert await producer.run(count=count, body={"pad": "x" * 32 * 1024}) == count

        # Everything is taken: by the fast consumers, or sitting in the slow auto-ack socket.
        await wait_for(lambda: drained(broker.url, queue), timeout=40, message=ledger.summary())
        rss_after, peak = memory_kib(broker.proc.pid)
        buffered = len(ledger.pushed - ledger.acked)
        assert len(ledger.acked) > count // 2, "the fast consumers were stalled"
        assert not slow_ledger.deliveries, "the paused reader read something"

        # The slow auto-ack reader finally reads: it gets the jobs that were sent to it, whole.
        slow_auto.resume_reading()
        await wait_for(ledger.all_acked, timeout=20, message=ledger.summary())
    ledger.check()
    assert not ledger.duplicates  # what sat in the stalled sockets went to no one else
    growth = (peak - rss_before) // 1024
    print(
        f"slow readers: {ledger.summary()}; held in the slow socket: {buffered} jobs; "
        f"broker RSS {rss_before // 1024} MiB -> {rss_after // 1024} MiB, peak +{growth} MiB "
        f"for {count * len(body) // 2**20} MiB of jobs"
    )
    assert growth < 48, f"broker peak RSS grew by {growth} MiB"


async def test_broadcast_is_at_most_once(
    redis_url: str, make_broker: Callable[..., BrokerServer], harness: Harness
) -> None:
    """Pub/sub messages reach the listeners connected when they are published, once each; a
    listener that was away misses them for good: nothing is stored."""
    broker = make_broker(redis_url)
    present, away, publisher = [await harness.client(WsClient(broker.ws_url)) for _ in range(3)]
    for listener in (present, away):
        assert (await listener.request({"op": "listen", "channel": "news"}))["op"] == "listening"
    await away.close()
    for n in range(5):
        assert (await publisher.request({"op": "publish", "channel": "news", "data": n}))["op"] == "ok"
    await wait_for(lambda: len(present.messages) == 5)
    back = await harness.client(WsClient(broker.ws_url))
    assert (await back.request({"op": "listen", "channel": "news"}))["op"] == "listening"
    assert (await publisher.request({"op": "publish", "channel": "news", "data": "later"}))["op"] == "ok"
    await wait_for(lambda: back.messages and len(present.messages) == 6)
    assert present.messages == [0, 1, 2, 3, 4, "later"]
    assert back.messages == ["later"] and not away.messages


# -- Redis that would lose jobs ---------------------------------------------------------------------


async def test_full_redis_refuses_pushes_and_keeps_draining(
    make_redis_server: Callable[..., RedisServer], make_broker: Callable[..., BrokerServer], harness: Harness
) -> None:
    """Redis at maxmemory (noeviction): pushes are refused with 503, none half-stored, nothing
    stored is evicted, and consumers go on taking and acking jobs, which makes room again."""
    redis = make_redis_server(args=["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"])
    broker = make_broker(redis.url, config=FAST)
    ledger = Ledger()
    body = b'{"pad":"' + b"x" * 10_000 + b'"}'
    failures: list[str] = []
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as http:
        await http_produce(http, broker.url, "jobs", ledger, count=2000, body=body, failures=failures)
        assert failures and failures[0].startswith("503 "), failures
        assert "maxmemory" in failures[0]
        assert 50 < len(ledger.pushed) < 2000
        info = await queue_info(broker.url, "jobs")
        assert info["pushed"] == info["ready"] == len(ledger.pushed)  # the refused push left nothing behind

        await harness.client(Consumer(broker.ws_url, "jobs", ledger, prefetch=20))
        await wait_for(ledger.all_acked, timeout=20, message=ledger.summary())
        assert await http_produce(http, broker.url, "jobs", ledger, count=10, body=body) == 10
        await wait_for(ledger.all_acked, timeout=10, message=ledger.summary())
    ledger.check()


def serve(redis_url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``presque serve`` against ``redis_url`` until it exits (or 30 s)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESQUE_")}
    env["PYTHONPATH"] = str(REPO)
    env["PRESQUE_REDIS_URL"] = redis_url
    return subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_serve_refuses_a_redis_that_evicts_unless_allowed(
    make_redis_server: Callable[..., RedisServer], make_broker: Callable[..., BrokerServer], tmp_path: Path
) -> None:
    """``presque serve`` exits non-zero with one clear line on a Redis whose maxmemory-policy is
    not noeviction (eviction silently loses jobs); ``redis.allow_eviction: true`` lets it start."""
    redis = make_redis_server(args=["--maxmemory-policy", "allkeys-lru"])
    result = serve(redis.url, tmp_path)
    assert result.returncode != 0, result.stderr
    assert "presque: Redis maxmemory-policy is allkeys-lru" in result.stderr
    assert "redis.allow_eviction: true" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr

    broker = make_broker(redis.url, config={"redis": {"allow_eviction": True}})
    assert "jobs may be lost" in broker.log()
    with httpx.Client(timeout=5) as http:
        assert http.post(f"{broker.url}/q/jobs", content=b"{}").status_code == 201


def test_serve_refuses_an_unreachable_redis_with_one_line(tmp_path: Path) -> None:
    result = serve(f"redis://127.0.0.1:{free_port()}/0", tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith("presque: cannot use Redis:"), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
