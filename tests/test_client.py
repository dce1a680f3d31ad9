"""broker.Client and broker.SyncClient end to end: a real broker subprocess on a real Redis."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from broker import BrokerError, Client, SyncClient
from broker.errors import (
    BadJSON,
    BadQueueName,
    BadRequest,
    Conflict,
    Forbidden,
    JobExists,
    NoJob,
    NotFound,
    QueueClosed,
    StaleToken,
    TooLarge,
    Unavailable,
    UnknownJob,
)
from broker.transport import (
    BrokerUnreachable,
    ConnectionLost,
    Endpoint,
    PushUnconfirmed,
    error_from_frame,
    error_from_http,
)
from tests.servers import BrokerServer, free_port, wait_for
from tests.shared_broker import module_broker, qname


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerServer]:
    yield from module_broker(request, tmp_path_factory)


async def test_push_fetch_ack_nack_touch(server: BrokerServer) -> None:
    q = qname()
    async with Client(server.url) as client:
        first = await client.push(q, {"n": 1})
        urgent = await client.push(q, {"n": 2}, priority=9)
        info = await client.queue_info(q)
        assert (info["ready"], info["pushed"]) == (2, 2)

        job = await client.fetch(q, lease=30)
        assert job is not None and (job.id, job.body, job.attempt) == (urgent, {"n": 2}, 1)
        assert job.token
        assert (await client.job(q, urgent))["state"] == "leased"
        deadline = await client.touch(q, job.id, job.token, lease=60)
        assert deadline > time.time() + 50
        await client.ack(q, job.id, job.token)
        with pytest.raises(UnknownJob):
            await client.job(q, urgent)

        job = await client.fetch(q, lease=30)
        assert job is not None and job.id == first
        reply = await client.nack(q, job.id, job.token, delay=60, error="not now")
        assert reply["status"] != "dead"
        state = await client.job(q, first)
        assert (state["state"], state["last_error"]) == ("delayed", "not now")

        info = await client.queue_info(q)
        assert (info["ready"], info["delayed"], info["job_processed"], info["job_failed"]) == (0, 1, 1, 1)
        assert await client.fetch(q) is None  # nothing ready: None, not an exception


async def test_destructive_fetch_and_push_options(server: BrokerServer) -> None:
    q = qname()
    async with Client(server.url) as client:
        later = await client.push(q, "later", delay=60)
        at = await client.push(q, "at", run_at=time.time() + 60)
        await client.push(q, [1, 2, 3], ttl=60, max_attempts=2)
        job = await client.fetch(q)
        assert job is not None and job.body == [1, 2, 3] and job.token is None
        assert await client.fetch(q) is None  # destructive: gone; the others are delayed
        assert {(await client.job(q, i))["state"] for i in (later, at)} == {"delayed"}
        assert (await client.job(q, at))["run_at"] == pytest.approx(time.time() + 60, abs=5)
        with pytest.raises(ValueError):
            await client.push(q, 1, delay=1, run_at=time.time())


async def test_push_many_and_many_pushes_in_flight(server: BrokerServer) -> None:
    q = qname()
    async with Client(server.url) as client:
        ids = await client.push_many(q, [{"i": i} for i in range(2500)], batch_size=1000)
        assert len(set(ids)) == 2500
        singles = await asyncio.gather(*(client.push(q, {"j": j}) for j in range(300)))
        assert len(set(singles)) == 300
        assert (await client.queue_info(q))["ready"] == 2800
        # One WebSocket carried them all.
        assert client.link.epoch == 1
        first = await client.fetch(q)
        assert first is not None and (first.id, first.body) == (ids[0], {"i": 0})


async def test_uniq_conflict_carries_the_existing_id(server: BrokerServer) -> None:
    q = qname()
    async with Client(server.url) as client:
        job_id = await client.push(q, {"a": 1}, uniq="only-one")
        with pytest.raises(JobExists) as caught:
            await client.push(q, {"a": 2}, uniq="only-one")
        assert caught.value.existing_id == job_id
        assert caught.value.message == "job already exists"


async def test_errors_are_typed(server: BrokerServer) -> None:
    q = qname()
    async with Client(server.url) as client:
        with pytest.raises(BadQueueName):
            await client.push("bad name", 1)
        with pytest.raises(BadQueueName):
            await client.queue_info("../etc")
        with pytest.raises(BadRequest, match="priority"):
            await client.push(q, 1, priority=12)
        with pytest.raises(BadRequest, match="lease"):
            await client.fetch(q, lease=-1)
        with pytest.raises(TooLarge):
            await client.push(q, "x" * 2_000_000)
        await client.push(q, 1)  # the socket survived all of that
        job = await client.fetch(q, lease=30)
        assert job is not None and job.token
        with pytest.raises(StaleToken):
            await client.ack(q, job.id, "not-the-token")
        with pytest.raises(UnknownJob):
            await client.ack(q, "no-such-id", "token")
        await client.pause(q)
        with pytest.raises(QueueClosed):
            await client.fetch(q)
        await client.resume(q)
        assert await client.retry_dead(q, ids=["x", "y"]) == 0  # unknown ids: nothing retried
        assert client.link.epoch == 1


def test_error_mapping_of_wire_errors() -> None:
    assert isinstance(error_from_http(404, b'{"error": "no job"}'), NoJob)
    assert isinstance(error_from_http(404, b'{"error": "queue is closed"}'), QueueClosed)
    assert isinstance(error_from_http(404, b'{"error": "not found"}'), NotFound)
    assert isinstance(error_from_http(400, b'{"error": "invalid JSON: x"}'), BadJSON)
    exists = error_from_http(409, b'{"error": "job already exists", "id": "abc"}')
    assert isinstance(exists, JobExists) and exists.existing_id == "abc"
    busy = error_from_http(503, b'{"error": "redis unavailable"}', {"retry-after": "3"})
    assert isinstance(busy, Unavailable) and busy.retry_after == 3
    odd = error_from_http(418, b"not json")
    assert type(odd) is BrokerError and odd.status == 418 and odd.message == "HTTP 418"
    assert isinstance(error_from_http(401, b'{"error": "token required"}'), BrokerError)
    frame = error_from_frame({"op": "error", "code": "already_subscribed", "error": "twice"})
    assert isinstance(frame, Conflict) and frame.code == "already_subscribed"
    assert isinstance(error_from_frame({"code": "forbidden", "error": "no"}), Forbidden)
    assert type(error_from_frame({"code": "something_new", "error": "?"})) is BrokerError
    with pytest.raises(ValueError):
        Endpoint.parse("ftp://host")
    assert Endpoint.parse("https://h/base/").ws_url == "wss://h:443/base/ws"


async def test_operating_calls(server: BrokerServer) -> None:
    q = qname()
    async with Client(server.url) as client:
        assert (await client.health())["status"] == "ok"
        await client.push_many(q, [1, 2, 3])
        assert q in await client.queues()
        stats = await client.stats()
        assert stats["queues"][q]["ready"] == 3
        await client.pause(q)
        assert (await client.queue_info(q))["paused"] is True
        await client.resume(q)
        assert (await client.queue_info(q))["paused"] is False
        await client.purge(q)
        assert (await client.queue_info(q))["ready"] == 0

        # Two jobs die (max_attempts=1, nacked), one is retried, the other purged.
        dead_ids = []
        for n in range(2):
            await client.push(q, {"dead": n}, max_attempts=1)
            job = await client.fetch(q, lease=30)
            assert job is not None
            assert (await client.nack(q, job.id, job.token, error=f"E{n}"))["status"] == "dead"
            dead_ids.append(job.id)
        dead = await client.dead(q)
        assert dead["total"] == 2
        assert {(j["id"], j["last_error"]) for j in dead["jobs"]} == {(dead_ids[0], "E0"), (dead_ids[1], "E1")}
        assert await client.retry_dead(q, [dead_ids[0]]) == 1
        assert (await client.job(q, dead_ids[0]))["state"] == "ready"
        await client.purge_dead(q)
        assert (await client.dead(q))["total"] == 0
        assert await client.retry_dead(q) == 0

        await client.register_worker("w-test", q, {"host": "h", "pid": 1, "processed": 0})
        assert "w-test" in await client.workers()
        assert await client.workers(q) == ["w-test"]
        await client.unregister_worker("w-test", q)
        assert "w-test" not in await client.workers()


async def test_publish_and_listen(server: BrokerServer) -> None:
    channel = qname("chan")
    async with Client(server.url) as client, Client(server.url) as other:
        messages = client.listen(channel)
        first = asyncio.ensure_future(anext(messages))
        await wait_for(lambda: channel in client.link._listeners and client.link.connected)
        # listen() has sent its frame; publish until the broker confirmed and relays.
        while not first.done():
            await other.publish(channel, {"hello": 1})
            await asyncio.wait([first], timeout=0.05)
        assert first.result() == {"hello": 1}
        await other.publish(channel, [2])
        assert await asyncio.wait_for(_next_not(messages, {"hello": 1}), 5) == [2]
        await messages.aclose()
        assert channel not in client.link._listeners


async def _next_not(messages: Any, skip: Any) -> Any:
    async for message in messages:
        if message != skip:
            return message
    return None


async def test_unreachable_broker_fails_fast() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with Client(url, timeout=1.0) as client:
        started = time.monotonic()
        with pytest.raises(BrokerUnreachable, match="cannot reach"):
            await client.push("q", 1)
        with pytest.raises(BrokerUnreachable):
            await client.stats()
        assert time.monotonic() - started < 4


async def test_reconnects_after_a_broker_restart(redis_url: str, make_broker: Callable[..., BrokerServer]) -> None:
    server = make_broker(redis_url)
    q = qname()
    async with Client(server.url, timeout=20) as client:
        await client.push(q, 1)
        epoch = client.link.epoch
        server.restart()
        # The next push waits for the new connection: the first may still see the old socket close.
        for _ in range(3):
            try:
                await client.push(q, 2)
                break
            except (PushUnconfirmed, ConnectionLost):
                continue
        assert client.link.epoch > epoch
        assert (await client.queue_info(q))["ready"] == 2


async def test_unconfirmed_push_raises_and_is_not_resent(
    redis_url: str, make_broker: Callable[..., BrokerServer]
) -> None:
    server = make_broker(redis_url)
    q = qname()
    async with Client(server.url, timeout=20) as client:
        await client.push(q, "before")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)  # the broker reads nothing and answers nothing
        try:
            pending = asyncio.ensure_future(client.push(q, "in flight", uniq="once"))
            await wait_for(lambda: client.link._pending)
        finally:
            server.kill()  # the socket drops with the push unanswered
        with pytest.raises(PushUnconfirmed) as caught:
            await asyncio.wait_for(pending, 10)
        assert (caught.value.queue, caught.value.uniq) == (q, "once")
        server.start()
        await client.push(q, "after")
        # Whatever happened to the frame in flight, it was not sent a second time by the client:
        # retrying with its uniq key either pushes it now or names the job that landed.
        try:
            await client.push(q, "in flight", uniq="once")
        except JobExists:
            pass
        assert (await client.queue_info(q))["ready"] == 3


async def test_token_is_sent(redis_url: str, make_broker: Callable[..., BrokerServer]) -> None:
    config = {
        "auth": {
            "tokens": [
                {"name": "all", "token": "s3cret", "roles": {"produce": ["*"], "consume": ["*"], "admin": ["*"]}}
            ]
        }
    }
    server = make_broker(redis_url, config=config)
    q = qname()
    async with Client(server.url, token="s3cret") as client:
        await client.push(q, 1)
        assert (await client.queue_info(q))["ready"] == 1
    async with Client(server.url, token="wrong", timeout=3) as client:
        with pytest.raises(Forbidden, match="refused the WebSocket handshake"):
            await client.push(q, 2)


def test_sync_client(server: BrokerServer) -> None:
    q = qname()
    channel = qname("chan")
    with SyncClient(server.url) as client, SyncClient(server.url) as other:
        job_id = client.push(q, {"sync": True}, priority=7)
        assert client.push_many(q, [1, 2]) and client.queue_info(q)["ready"] == 3
        job = client.fetch(q, 10)
        assert job is not None and job.id == job_id and job.token
        assert client.touch(q, job.id, job.token) > time.time()
        client.ack(q, job.id, job.token)
        job = client.fetch(q, lease=10)
        assert job is not None and job.token
        assert client.nack(q, job.id, job.token, delay=30)["status"] != "dead"
        assert client.job(q, job.id)["state"] == "delayed"
        assert client.fetch(q) is not None and client.fetch(q) is None
        client.pause(q)
        client.resume(q)
        client.purge(q)
        assert client.dead(q)["total"] == 0 and client.retry_dead(q) == 0
        client.purge_dead(q)
        assert q in client.queues() and client.stats()["queues"][q]["delayed"] == 0
        assert client.health()["status"] == "ok" and isinstance(client.workers(), list)
        with pytest.raises(JobExists):
            client.push(q, 1, uniq="u")
            client.push(q, 1, uniq="u")
        messages = client.listen(channel)  # returns once the broker listens
        other.publish(channel, {"n": 1})
        assert next(messages) == {"n": 1}
        messages.close()
    with pytest.raises(RuntimeError):
        client.stats()
