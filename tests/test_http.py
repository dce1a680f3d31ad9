"""The REST API end to end: a real uvicorn serving the app, a real redis-server, httpx.

Every route of issue 2 with its status codes, fields and headers, every error path, and the
queue model's behaviours as a client sees them (long-poll, leases, backoff, dead letters,
delays, priorities, uniq, ttl, pause) — plus Redis going away and coming back.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from broker import keys
from tests.invariants import check_queue
from tests.servers import RedisServer, make_settings, run_broker, wait_for

pytestmark = pytest.mark.core

BASE_CONFIG: dict[str, dict[str, Any]] = {
    "queues": {"reap_interval": 0.1, "backoff_base": 0.5, "backoff_max": 2.0},
    "limits": {"max_body": 4096, "max_batch": 10, "max_desc": 3},
    "redis": {"socket_timeout": 1.0},
}
LEASE_HEADERS = ("x-presque-job-id", "x-presque-attempt", "x-presque-lease-token")


@contextlib.asynccontextmanager
async def serve(redis_url: str, **sections: dict[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    """A broker on ``redis_url`` (test settings, ``sections`` merged in) and a client for it."""
    config = {name: {**BASE_CONFIG.get(name, {}), **sections.get(name, {})} for name in {*BASE_CONFIG, *sections}}
    async with (
        run_broker(make_settings(redis_url, config)) as broker,
        httpx.AsyncClient(base_url=broker.url, timeout=15.0) as client,
    ):
        yield client


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(redis_url) as c:
        yield c


async def redis_now(redis: aioredis.Redis) -> float:
    seconds, micros = await redis.time()
    return float(seconds) + micros / 1e6


async def push(client: httpx.AsyncClient, queue: str, body: bytes = b'{"n": 1}', **params: Any) -> str:
    response = await client.post(f"/q/{queue}", content=body, params=params)
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    return job_id


async def lease(client: httpx.AsyncClient, queue: str, seconds: float = 30, **params: Any) -> httpx.Response:
    response = await client.get(f"/q/{queue}", params={"lease": seconds, **params})
    assert response.status_code == 200, response.text
    return response


def token_of(response: httpx.Response) -> str:
    return response.headers["x-presque-lease-token"]


async def figures(client: httpx.AsyncClient, queue: str) -> dict[str, Any]:
    response = await client.get(f"/j/{queue}")
    assert response.status_code == 200
    data: dict[str, Any] = response.json()
    return data


def assert_error(response: httpx.Response, status: int, contains: str = "") -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert isinstance(error, str) and contains in error, error


# -- the seed's two curl commands ---------------------------------------------------------------


async def test_the_blog_posts_two_curl_commands(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    body = b'{"foo":"bar", "foo2":"bar" }'
    # curl -X POST "http://localhost:5000/q/foo" -d '{"foo":"bar", "foo2":"bar" }'
    pushed = await client.post(
        "/q/foo", content=body, headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "*/*"}
    )
    assert pushed.status_code == 201
    job_id = pushed.json()["id"]
    assert pushed.json() == {"id": job_id, "queue": "foo"}
    assert pushed.headers["location"] == f"/j/foo/{job_id}"
    assert (await client.get(f"/j/foo/{job_id}")).json()["body"] == {"foo": "bar", "foo2": "bar"}
    # curl "http://localhost:5000/q/foo"
    fetched = await client.get("/q/foo")
    assert fetched.status_code == 200
    assert fetched.content == body
    assert fetched.headers["content-type"] == "application/json"
    assert fetched.headers["x-presque-job-id"] == job_id
    assert fetched.headers["x-presque-attempt"] == "1"
    assert "x-presque-lease-token" not in fetched.headers
    again = await client.get("/q/foo")
    assert_error(again, 404)
    assert again.json() == {"error": "no job"}
    assert_error(await client.get(f"/j/foo/{job_id}"), 404)  # fetched destructively: gone
    assert (await figures(client, "foo"))["job_processed"] == 1
    await check_queue(redis, "foo")


async def curl(*args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-S", "--fail-with-body", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    return out


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
async def test_the_blog_posts_curl_commands_with_curl_itself(client: httpx.AsyncClient) -> None:
    url = str(client.base_url).rstrip("/")
    pushed = orjson.loads(await curl("-X", "POST", f"{url}/q/foo", "-d", '{"foo":"bar", "foo2":"bar" }'))
    assert pushed["queue"] == "foo"
    assert await curl(f"{url}/q/foo") == b'{"foo":"bar", "foo2":"bar" }'


# -- /q ------------------------------------------------------------------------------------------


async def test_push_answers_201_with_location(client: httpx.AsyncClient) -> None:
    response = await client.post("/q/work", json={"a": [1, 2]})
    assert response.status_code == 201
    job_id = response.json()["id"]
    assert response.headers["location"] == f"/j/work/{job_id}"
    view = await client.get(response.headers["location"])
    assert view.status_code == 200
    assert view.json()["body"] == {"a": [1, 2]}
    assert view.json()["state"] == "ready"


async def test_put_requeues_and_counts_a_failure(client: httpx.AsyncClient) -> None:
    response = await client.put("/q/work", content=b"[1]")
    assert response.status_code == 201
    job_id = response.json()["id"]
    assert response.json() == {"id": job_id, "queue": "work"}
    assert response.headers["location"] == f"/j/work/{job_id}"
    data = await figures(client, "work")
    assert (data["job_failed"], data["job_count"], data["pushed"]) == (1, 1, 1)
    assert (await client.get("/q/work")).content == b"[1]"


async def test_any_valid_json_is_a_body(client: httpx.AsyncClient) -> None:
    bodies = [b"42", b'"text"', b"null", b"[]", b'  {"deep": {"x": [true, 1.5e3]}}\n', '"héllo"'.encode()]
    for body in bodies:
        await push(client, "any", body)
    for body in bodies:
        assert (await client.get("/q/any")).content == body


async def test_delete_purges_ready_and_delayed_only(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    await push(client, "p", uniq="k")
    await push(client, "p", delay=100)
    await push(client, "p", priority=9)
    leased = await lease(client, "p")
    purged = await push(client, "p")
    response = await client.delete("/q/p")
    assert response.status_code == 204 and response.content == b""
    assert_error(await client.get(f"/j/p/{purged}"), 404)
    data = await figures(client, "p")
    assert (data["ready"], data["delayed"], data["leased"]) == (0, 0, 1)
    assert await check_queue(redis, "p") == {
        "ready": set(), "delayed": set(), "leased": {leased.headers["x-presque-job-id"]}, "dead": set()
    }  # fmt: skip
    await push(client, "p", uniq="k")  # uniq freed
    assert (await client.delete("/q/never-seen")).status_code == 204


async def test_leased_fetch_adds_the_token_header(client: httpx.AsyncClient) -> None:
    job_id = await push(client, "l")
    response = await lease(client, "l", 10)
    assert {h: bool(response.headers.get(h)) for h in LEASE_HEADERS} == dict.fromkeys(LEASE_HEADERS, True)
    assert response.headers["x-presque-job-id"] == job_id
    view = (await client.get(f"/j/l/{job_id}")).json()
    assert (view["state"], view["attempt"]) == ("leased", 1)


# -- long-poll -----------------------------------------------------------------------------------


async def waiting_on(redis: aioredis.Redis, queue: str) -> bool:
    """True once some broker listens for the queue's wake-ups (a long-poll is parked)."""
    counts = await redis.pubsub_numsub(keys.wake_channel(queue))
    return bool(counts and counts[0][1] > 0)


async def test_long_poll_returns_as_soon_as_a_job_is_pushed(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    started = time.monotonic()
    poll = asyncio.create_task(client.get("/q/lp", params={"wait": 20}))
    await wait_for(lambda: waiting_on(redis, "lp"), message="the long-poll never parked")
    assert not poll.done()
    job_id = await push(client, "lp", b'{"late": true}')
    response = await asyncio.wait_for(poll, 15)
    assert response.status_code == 200
    assert response.content == b'{"late": true}'
    assert response.headers["x-presque-job-id"] == job_id
    assert time.monotonic() - started < 10  # well before the 20 s wait runs out


async def test_long_poll_with_lease(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    poll = asyncio.create_task(client.get("/q/lpl", params={"wait": 20, "lease": 5}))
    await wait_for(lambda: waiting_on(redis, "lpl"))
    await push(client, "lpl")
    response = await asyncio.wait_for(poll, 15)
    assert response.status_code == 200 and token_of(response)


async def test_long_poll_times_out_with_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/q/idle", params={"wait": 0.2})
    assert_error(response, 404)
    assert response.json() == {"error": "no job"}


async def test_long_poll_on_a_closed_queue(client: httpx.AsyncClient) -> None:
    await client.post("/control/shut", json={"status": "stop"})
    started = time.monotonic()
    response = await client.get("/q/shut", params={"wait": 20})
    assert response.json() == {"error": "queue is closed"} and response.status_code == 404
    assert time.monotonic() - started < 10


# -- leases, acks, stale tokens ------------------------------------------------------------------


async def test_ack_nack_touch(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    job_id = await push(client, "s", max_attempts=3)
    token = token_of(await lease(client, "s", 5))
    touched = await client.post(f"/j/s/{job_id}/touch", json={"token": token, "lease": 60})
    assert touched.status_code == 200
    now = await redis_now(redis)
    assert touched.json()["id"] == job_id and now + 50 < touched.json()["deadline"] <= now + 60
    touched = await client.post(f"/j/s/{job_id}/touch", json={"token": token})  # the lease it was taken with
    now = await redis_now(redis)
    assert touched.status_code == 200 and now < touched.json()["deadline"] <= now + 5
    assert touched.json()["status"] == "leased"
    nacked = await client.post(f"/j/s/{job_id}/nack", json={"token": token, "delay": 0, "error": "flaky"})
    assert nacked.status_code == 200
    assert nacked.json()["status"] == "ready" and nacked.json()["id"] == job_id
    view = (await client.get(f"/j/s/{job_id}")).json()
    assert (view["state"], view["last_error"], view["attempt"]) == ("ready", "flaky", 1)
    again = await lease(client, "s", 5)
    assert again.headers["x-presque-attempt"] == "2"
    acked = await client.post(f"/j/s/{job_id}/ack", json={"token": token_of(again)})
    assert acked.status_code == 200 and acked.json()["id"] == job_id
    assert_error(await client.get(f"/j/s/{job_id}"), 404)
    data = await figures(client, "s")
    assert (data["job_processed"], data["job_failed"], data["retried"]) == (1, 1, 1)
    await check_queue(redis, "s")


async def test_settling_errors(client: httpx.AsyncClient) -> None:
    job_id = await push(client, "e")
    token = token_of(await lease(client, "e"))
    assert_error(await client.post("/j/e/ghost/ack", json={"token": "t"}), 404)
    assert_error(await client.post("/j/e/ghost/nack", json={"token": "t"}), 404)
    assert_error(await client.post("/j/e/ghost/touch", json={"token": "t"}), 404)
    for action in ("ack", "nack", "touch"):
        assert_error(await client.post(f"/j/e/{job_id}/{action}", json={"token": "wrong"}), 409, "stale")
        assert_error(await client.post(f"/j/e/{job_id}/{action}", json={}), 400, "token")
        assert_error(await client.post(f"/j/e/{job_id}/{action}", content=b""), 400)
        assert_error(await client.post(f"/j/e/{job_id}/{action}", content=b"{nope"), 400, "JSON")
        assert_error(await client.post(f"/j/e/{job_id}/{action}", json=[token]), 400)
    assert_error(await client.post(f"/j/e/{job_id}/explode", json={"token": token}), 404)
    assert_error(await client.post(f"/j/e/{job_id}/nack", json={"token": token, "delay": -1}), 400, "delay")
    assert_error(await client.post(f"/j/e/{job_id}/nack", json={"token": token, "delay": "x"}), 400, "delay")
    assert_error(await client.post(f"/j/e/{job_id}/nack", json={"token": token, "error": 5}), 400, "error")
    assert_error(await client.post(f"/j/e/{job_id}/touch", json={"token": token, "lease": 0}), 400, "lease")
    assert_error(await client.post(f"/j/e/{job_id}/touch", json={"token": token, "lease": 1e9}), 400, "lease")
    # None of that changed the job.
    assert (await client.post(f"/j/e/{job_id}/ack", json={"token": token})).status_code == 200
    assert_error(await client.post(f"/j/e/{job_id}/ack", json={"token": token}), 409)  # double ack


async def test_lease_expiry_redelivers_and_refuses_the_stale_token(
    client: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    job_id = await push(client, "exp", b'{"slow": 1}')
    first = await lease(client, "exp", 1)
    old_token = token_of(first)
    # The reaper (every 0.1 s here) returns the job after its lease; it backs off ~0.5 s.
    again = await client.get("/q/exp", params={"lease": 30, "wait": 15})
    assert again.status_code == 200, again.text
    assert again.headers["x-presque-job-id"] == job_id
    assert again.headers["x-presque-attempt"] == "2"
    assert token_of(again) != old_token
    assert again.content == b'{"slow": 1}'
    view = (await client.get(f"/j/exp/{job_id}")).json()
    assert view["last_error"] == "lease expired"
    for action in ("ack", "nack", "touch"):
        assert_error(await client.post(f"/j/exp/{job_id}/{action}", json={"token": old_token}), 409)
    assert (await client.post(f"/j/exp/{job_id}/ack", json={"token": token_of(again)})).status_code == 200
    data = await figures(client, "exp")
    assert (data["job_failed"], data["retried"], data["job_processed"]) == (1, 1, 1)
    await check_queue(redis, "exp")


async def test_backoff_after_a_nack(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    job_id = await push(client, "bo")
    before = await redis_now(redis)
    nacked = await client.post(f"/j/bo/{job_id}/nack", json={"token": token_of(await lease(client, "bo"))})
    after = await redis_now(redis)
    assert nacked.json()["status"] == "delayed"
    run_at = nacked.json()["run_at"]
    assert before + 0.8 * 0.5 - 1e-3 <= run_at <= after + 1.2 * 0.5 + 1e-3  # backoff_base 0.5, ±20%
    redelivered = await assert_not_before(client, redis, "bo", run_at, job_id)
    assert redelivered.headers["x-presque-attempt"] == "2"
    # Second failure: twice as long.
    before = await redis_now(redis)
    nacked = await client.post(f"/j/bo/{job_id}/nack", json={"token": token_of(redelivered)})
    assert before + 0.8 * 1.0 - 1e-3 <= nacked.json()["run_at"] <= await redis_now(redis) + 1.2 * 1.0 + 1e-3


async def assert_not_before(
    client: httpx.AsyncClient, redis: aioredis.Redis, queue: str, run_at: float, job_id: str, lease: float = 30
) -> httpx.Response:
    """Take the job as soon as it is handed out, and check that this was not before ``run_at``."""
    while True:
        response = await client.get(f"/q/{queue}", params={"wait": 10, "lease": lease})
        answered = await redis_now(redis)
        if response.status_code == 200:
            assert response.headers["x-presque-job-id"] == job_id
            assert answered >= run_at, f"delivered {run_at - answered:.3f}s early"
            return response
        assert_error(response, 404)
        assert answered < run_at + 5, "not delivered in time"


async def test_dead_letters_and_retry_through_dead(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    ids = []
    for i in range(3):
        job_id = await push(client, "dl", b'{"i": %d}' % i, max_attempts=2, priority=9 - i)
        ids.append(job_id)
        for n in (1, 2):
            token = token_of(await lease(client, "dl"))
            response = await client.post(f"/j/dl/{job_id}/nack", json={"token": token, "delay": 0, "error": f"e{n}"})
            assert response.json()["status"] == ("ready" if n == 1 else "dead")
    assert (await client.get(f"/j/dl/{ids[0]}")).json()["state"] == "dead"
    data = await figures(client, "dl")
    assert (data["dead"], data["dead_lettered"], data["job_failed"], data["ready"]) == (3, 3, 6, 0)

    listed = await client.get("/dead/dl")
    assert listed.status_code == 200
    page = listed.json()
    assert page["total"] == 3 and [j["id"] for j in page["jobs"]] == ids
    first = page["jobs"][0]
    assert set(first) == {"id", "body", "attempt", "last_error", "failed_at"}
    assert (first["body"], first["attempt"], first["last_error"]) == ({"i": 0}, 2, "e2")
    paged = (await client.get("/dead/dl", params={"offset": 1, "limit": 1})).json()
    assert paged["total"] == 3 and [j["id"] for j in paged["jobs"]] == [ids[1]]

    retried = await client.post("/dead/dl/retry", json={"ids": [ids[0]]})
    assert retried.status_code == 200 and retried.json()["retried"] == 1
    view = (await client.get(f"/j/dl/{ids[0]}")).json()
    assert (view["id"], view["state"], view["failures"]) == (ids[0], "ready", 0)
    again = await lease(client, "dl")
    assert again.headers["x-presque-job-id"] == ids[0] and again.headers["x-presque-attempt"] == "3"
    # 0 failures: it gets its max_attempts (2) again before it is dead.
    response = await client.post(f"/j/dl/{ids[0]}/nack", json={"token": token_of(again), "delay": 0})
    assert response.json()["status"] == "ready"

    assert (await client.post("/dead/dl/retry")).json()["retried"] == 2  # no body: all
    assert (await client.get("/dead/dl")).json() == {"total": 0, "jobs": []}
    await check_queue(redis, "dl")


async def test_dead_retry_all_with_empty_object_and_delete(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    ids = []
    for _ in range(3):
        job_id = await push(client, "dd", max_attempts=1)
        ids.append(job_id)
        await client.post(f"/j/dd/{job_id}/nack", json={"token": token_of(await lease(client, "dd"))})
    assert (await client.delete(f"/dead/dd/{ids[0]}")).status_code == 204
    assert_error(await client.delete(f"/dead/dd/{ids[0]}"), 404)
    assert_error(await client.get(f"/j/dd/{ids[0]}"), 404)
    assert (await client.post("/dead/dd/retry", json={})).json()["retried"] == 2
    for job_id in ids[1:]:
        await client.post(f"/j/dd/{job_id}/nack", json={"token": token_of(await lease(client, "dd"))})
    assert (await client.delete("/dead/dd")).status_code == 204
    assert (await client.get("/dead/dd")).json() == {"total": 0, "jobs": []}
    assert await check_queue(redis, "dd") == {"ready": set(), "delayed": set(), "leased": set(), "dead": set()}
    assert_error(await client.post("/dead/dd/retry", json={"ids": "x"}), 400, "ids")
    assert_error(await client.post("/dead/dd/retry", json={"ids": [1]}), 400, "ids")
    assert_error(await client.get("/dead/dd", params={"limit": 0}), 400, "limit")
    assert_error(await client.get("/dead/dd", params={"offset": -1}), 400, "offset")


# -- delays, priorities, uniq, ttl ---------------------------------------------------------------


async def test_delay_and_delayed(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    far = await push(client, "dly", b'"far"', delay=60)
    view = (await client.get(f"/j/dly/{far}")).json()
    assert view["state"] == "delayed"
    assert_error(await client.get("/q/dly"), 404)

    now = await redis_now(redis)
    soon = await push(client, "dly", b'"soon"', delay=0.4)
    run_at = (await client.get(f"/j/dly/{soon}")).json()["run_at"]
    assert now + 0.4 <= run_at
    await assert_not_before(client, redis, "dly", run_at, soon)

    epoch = time.time() + 0.4
    at = await push(client, "dly", b'"at"', delayed=f"{epoch:.3f}")
    view = (await client.get(f"/j/dly/{at}")).json()
    assert view["run_at"] == pytest.approx(epoch, abs=0.5)
    await assert_not_before(client, redis, "dly", view["run_at"], at)

    past = await push(client, "dly", b'"past"', delayed=int(time.time()) - 3600)
    assert (await client.get(f"/j/dly/{past}")).json()["state"] == "ready"
    fetched = await client.get("/q/dly")
    assert fetched.content == b'"past"'
    assert (await figures(client, "dly"))["delayed"] == 1  # only "far" is left
    await check_queue(redis, "dly")


async def test_delayed_job_keeps_its_priority(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    delayed = await push(client, "dp", b'"delayed-high"', delay=0.2, priority=9)
    await push(client, "dp", b'"low"', priority=1)
    run_at = (await client.get(f"/j/dp/{delayed}")).json()["run_at"]

    async def due() -> bool:
        return await redis_now(redis) > run_at

    await wait_for(due)
    await push(client, "dp", b'"mid"', priority=5)
    bodies = (await client.get("/qb/dp", params={"batch_size": 5})).json()
    assert bodies == ["delayed-high", "mid", "low"]


async def test_priority_order(client: httpx.AsyncClient) -> None:
    for name, priority in [("a", 1), ("b", 9), ("c", 5), ("d", 9), ("e", 0), ("f", None)]:
        params = {} if priority is None else {"priority": priority}
        await push(client, "prio", f'"{name}"'.encode(), **params)
    got = [(await client.get("/q/prio")).json() for _ in range(6)]
    assert got == ["b", "d", "c", "f", "a", "e"]  # default priority 5, FIFO within a priority
    view_id = await push(client, "prio", priority=7)
    assert (await client.get(f"/j/prio/{view_id}")).json()["priority"] == 7


async def test_uniq(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    first = await push(client, "u", uniq="report-42")
    conflict = await client.post("/q/u", content=b"{}", params={"uniq": "report-42"})
    assert conflict.status_code == 409
    assert conflict.json() == {"error": "job already exists", "id": first}
    put_conflict = await client.put("/q/u", content=b"{}", params={"uniq": "report-42"})
    assert put_conflict.status_code == 409 and put_conflict.json()["id"] == first
    # Delayed and leased jobs hold their key too.
    delayed = await push(client, "u", uniq="later", delay=60)
    assert (await client.post("/q/u", content=b"{}", params={"uniq": "later"})).json()["id"] == delayed
    leased = await lease(client, "u")
    assert leased.headers["x-presque-job-id"] == first
    assert (await client.post("/q/u", content=b"{}", params={"uniq": "report-42"})).status_code == 409
    await client.post(f"/j/u/{first}/ack", json={"token": token_of(leased)})
    assert await push(client, "u", uniq="report-42") != first
    assert (await figures(client, "u"))["pushed"] == 3
    assert_error(await client.post("/q/u", content=b"{}", params={"uniq": "x" * 257}), 400, "uniq")
    await check_queue(redis, "u")


async def test_concurrent_pushes_with_one_uniq_key(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    responses = await asyncio.gather(
        *(client.post("/q/cu", content=b'{"n": %d}' % i, params={"uniq": "same"}) for i in range(20))
    )
    created = [r for r in responses if r.status_code == 201]
    assert len(created) == 1
    winner = created[0].json()["id"]
    assert all(r.json() == {"error": "job already exists", "id": winner} for r in responses if r is not created[0])
    assert (await figures(client, "cu"))["pushed"] == 1
    await check_queue(redis, "cu")


async def test_ttl_drops_jobs_not_taken_in_time(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    stale = await push(client, "ttl", b'"stale"', ttl=0.2, uniq="s")
    fresh = await push(client, "ttl", b'"fresh"', ttl=300)
    expire_at = (await client.get(f"/j/ttl/{stale}")).json()["run_at"] + 0.2

    async def expired() -> bool:
        return await redis_now(redis) > expire_at

    await wait_for(expired)
    got = await client.get("/q/ttl")
    assert got.headers["x-presque-job-id"] == fresh
    assert_error(await client.get("/q/ttl"), 404)
    assert_error(await client.get(f"/j/ttl/{stale}"), 404)
    data = await figures(client, "ttl")
    assert (data["expired"], data["job_processed"]) == (1, 1)
    await push(client, "ttl", uniq="s")
    # Dropped by the reaper too, without anyone fetching.
    reaped = await push(client, "ttl2", ttl=0.1)
    await wait_for(lambda: _expired(client, "ttl2"), message="the reaper never dropped the ttl job")
    assert_error(await client.get(f"/j/ttl2/{reaped}"), 404)
    await check_queue(redis, "ttl2")


async def _expired(client: httpx.AsyncClient, queue: str) -> bool:
    return bool((await figures(client, queue))["expired"] == 1)


# -- /qb -----------------------------------------------------------------------------------------


async def test_batch_push_and_fetch(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    presque_form = await client.post("/qb/b", json={"jobs": [{"a": 1}, {"b": [1, 2]}]})
    assert presque_form.status_code == 201
    ids = presque_form.json()["ids"]
    assert len(ids) == 2 and len(set(ids)) == 2
    bare = await client.post("/qb/b", content=b'[ {"c" : 3} , "four" ]', params={"priority": 9})
    assert bare.status_code == 201 and len(bare.json()["ids"]) == 2
    fetched = await client.get("/qb/b", params={"batch_size": 3})
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "application/json"
    assert fetched.content == b'[{"c":3},"four",{"a":1}]'  # compact JSON; priority 9 first
    rest = await client.get("/qb/b", params={"batch_size": 10})
    assert rest.json() == [{"b": [1, 2]}]
    assert_error(await client.get("/qb/b", params={"batch_size": 10}), 404, "no job")
    assert_error(await client.get("/qb/b"), 404, "no job")
    data = await figures(client, "b")
    assert (data["pushed"], data["job_processed"]) == (4, 4)
    await check_queue(redis, "b")


async def test_batch_errors(client: httpx.AsyncClient) -> None:
    assert_error(await client.post("/qb/be", json={"jobs": list(range(11))}), 413, "batch")
    assert_error(await client.post("/qb/be", json=list(range(11))), 413, "batch")
    assert_error(await client.get("/qb/be", params={"batch_size": 11}), 413, "batch_size")
    assert_error(await client.get("/qb/be", params={"batch_size": 0}), 400, "batch_size")
    assert_error(await client.get("/qb/be", params={"batch_size": "x"}), 400, "batch_size")
    assert_error(await client.post("/qb/be", json=[]), 400)
    assert_error(await client.post("/qb/be", json={"jobs": 1}), 400)
    assert_error(await client.post("/qb/be", json={"jobs": [], "x": 1}), 400)
    assert_error(await client.post("/qb/be", json="string"), 400)
    assert_error(await client.post("/qb/be", content=b"[1,"), 400, "JSON")
    assert_error(await client.post("/qb/be", json=[1], params={"uniq": "k"}), 400, "uniq")
    assert_error(await client.post("/qb/be", json=[1], params={"priority": 10}), 400, "priority")
    assert (await client.post("/qb/be", json=list(range(10)))).status_code == 201
    assert (await figures(client, "be"))["pushed"] == 10
    await client.post("/control/be", json={"status": "stop"})
    assert (await client.get("/qb/be")).json() == {"error": "queue is closed"}


# -- /j, /status, /control -----------------------------------------------------------------------


async def test_queue_figures_fields(client: httpx.AsyncClient) -> None:
    data = await figures(client, "fresh")
    assert data == {
        "queue_name": "fresh", "job_count": 0, "job_failed": 0, "job_processed": 0,
        "ready": 0, "delayed": 0, "leased": 0, "dead": 0, "paused": False,
        "pushed": 0, "retried": 0, "expired": 0, "dead_lettered": 0,
    }  # fmt: skip
    await push(client, "fresh")
    await push(client, "fresh", delay=60)
    await push(client, "fresh")
    await lease(client, "fresh")
    data = await figures(client, "fresh")
    assert (data["job_count"], data["ready"], data["delayed"], data["leased"], data["pushed"]) == (1, 1, 1, 1, 3)


async def test_job_view_fields(client: httpx.AsyncClient) -> None:
    job_id = await push(client, "jv", b'{"x": "y"}', priority=3)
    response = await client.get(f"/j/jv/{job_id}")
    assert response.status_code == 200
    view = response.json()
    assert {"id", "queue", "state", "attempt", "priority", "created_at", "run_at", "last_error", "body"} <= set(view)
    assert (view["id"], view["queue"], view["state"]) == (job_id, "jv", "ready")
    assert (view["attempt"], view["priority"]) == (0, 3)
    assert view["last_error"] is None and view["body"] == {"x": "y"}
    assert view["created_at"] == pytest.approx(view["run_at"], abs=1e-3)
    assert b'"body":{"x": "y"}' in response.content  # the body exactly as pushed
    assert_error(await client.get("/j/jv/unknown-id"), 404)
    assert_error(await client.get(f"/j/other/{job_id}"), 404)


async def test_status(client: httpx.AsyncClient) -> None:
    assert (await client.get("/status/")).json() == {"queues": [], "size": 0}
    for i in range(5):
        await push(client, "st", b'{"i": %d}' % i)
    await push(client, "other")
    assert (await client.get("/status/")).json() == {"queues": ["other", "st"], "size": 2}
    assert (await client.get("/status")).json() == {"queues": ["other", "st"], "size": 2}
    assert (await client.get("/status/st")).json() == {"queue": "st", "size": 5}
    described = await client.get("/status/st", params={"with_desc": 1})
    assert described.json() == {"queue": "st", "size": 5, "jobs": [{"i": 0}, {"i": 1}, {"i": 2}]}  # max_desc 3
    assert (await client.get("/status/none")).json() == {"queue": "none", "size": 0}
    assert (await client.get("/status/none", params={"with_desc": 1})).json() == {
        "queue": "none", "size": 0, "jobs": []
    }  # fmt: skip
    assert (await figures(client, "st"))["ready"] == 5  # nothing taken


async def test_control_pause_and_resume(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    assert (await client.get("/control/c")).json() == {"queue": "c", "status": 1}
    stopped = await client.post("/control/c", json={"status": "stop"})
    assert stopped.status_code == 200 and stopped.json() == {"queue": "c", "response": "updated"}
    assert (await client.get("/control/c")).json() == {"queue": "c", "status": 0}
    job_id = await push(client, "c")  # still accepted
    closed = await client.get("/q/c")
    assert closed.status_code == 404 and closed.json() == {"error": "queue is closed"}
    assert (await client.get("/q/c", params={"lease": 5})).json() == {"error": "queue is closed"}
    assert (await figures(client, "c"))["paused"] is True
    started = await client.post("/control/c", json={"status": "start"})
    assert started.json() == {"queue": "c", "response": "updated"}
    assert (await client.get("/control/c")).json() == {"queue": "c", "status": 1}
    assert (await client.get("/q/c")).headers["x-presque-job-id"] == job_id
    assert_error(await client.post("/control/c", json={"status": "pause"}), 400, "status")
    assert_error(await client.post("/control/c", json={}), 400, "status")
    assert_error(await client.post("/control/c", content=b""), 400)
    assert_error(await client.post("/control/c", content=b"stop"), 400, "JSON")
    assert "c" in (await client.get("/status/")).json()["queues"]


# -- /w/, /stats, /health ------------------------------------------------------------------------


async def test_worker_registry(client: httpx.AsyncClient) -> None:
    assert (await client.get("/w/")).json() == []
    registered = await client.post("/w/wq", headers={"X-presque-workerid": "worker-1"})
    assert registered.status_code == 201
    await client.post("/w/wq2", headers={"X-presque-workerid": "worker-1"}, json={"processed": 3})
    await client.post("/w/wq", headers={"X-presque-workerid": "worker-2"})
    assert (await client.get("/w/")).json() == ["worker-1", "worker-2"]
    await push(client, "wq")
    await client.get("/q/wq")
    on_queue = (await client.get("/w/", params={"queue_name": "wq"})).json()
    assert on_queue == {"queue_name": "wq", "workers_list": ["worker-1", "worker-2"], "processed": 1, "failed": 0}
    stats = (await client.get("/stats")).json()
    assert stats["workers_count"] == 2
    assert_error(await client.post("/w/wq"), 400, "X-presque-workerid")
    assert_error(await client.delete("/w/wq"), 400, "X-presque-workerid")
    assert_error(await client.get("/w/", params={"queue_name": "bad name"}), 400, "queue")
    gone = await client.delete("/w/wq", headers={"X-presque-workerid": "worker-2"})
    assert gone.status_code == 204
    assert (await client.get("/w/")).json() == ["worker-1"]
    assert (await client.get("/w/", params={"queue_name": "wq"})).json()["workers_list"] == ["worker-1"]


async def test_stats_shape(client: httpx.AsyncClient) -> None:
    await push(client, "s1")
    await push(client, "s2")
    await client.get("/q/s2")
    response = await client.get("/stats")
    assert response.status_code == 200
    stats = response.json()
    assert {"redis", "size", "queues", "totals", "workers", "processes"} <= set(stats)
    assert stats["size"] == 2 and set(stats["queues"]) == {"s1", "s2"}
    assert isinstance(stats["redis"]["redis_version"], str)
    q = stats["queues"]["s1"]
    for name in ("ready", "delayed", "leased", "dead", "pushed", "processed", "failed", "retried", "expired"):
        assert isinstance(q[name], int), name
    assert q["ready"] == 1 and stats["queues"]["s2"]["processed"] == 1
    assert stats["totals"]["pushed"] == 2 and stats["totals"]["processed"] == 1
    assert q["oldest_age"] is not None and q["oldest_age"] >= 0


async def test_health(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


# -- bad input -----------------------------------------------------------------------------------


BAD_QUEUE_PATHS = ["%2E", "%2E%2E", "q" * 129, "-dash", "_under", "a%20b", "a%7Bb%7D", "caf%C3%A9", "a%2Fb"]


async def test_bad_queue_names(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    for name in BAD_QUEUE_PATHS:
        for method, path in [
            ("POST", f"/q/{name}"), ("PUT", f"/q/{name}"), ("GET", f"/q/{name}"), ("DELETE", f"/q/{name}"),
            ("POST", f"/qb/{name}"), ("GET", f"/qb/{name}"), ("GET", f"/j/{name}"), ("GET", f"/j/{name}/x"),
            ("GET", f"/status/{name}"), ("GET", f"/control/{name}"), ("POST", f"/control/{name}"),
            ("GET", f"/dead/{name}"), ("DELETE", f"/dead/{name}"), ("POST", f"/dead/{name}/retry"),
        ]:  # fmt: skip
            response = await client.request(method, path, content=b'{"status": "stop"}')
            if name == "a%2Fb" and response.status_code in (404, 405):
                continue  # a slash splits the path: no such route, which is just as refused
            assert_error(response, 400, "queue name")
    ok = "Q" * 128
    assert (await client.post(f"/q/{ok}", content=b"1")).status_code == 201
    for name in ("a.b", "a:b", "a-b_c", "9lives", "x.", "a..b"):
        assert (await client.post(f"/q/{name}", content=b"1")).status_code == 201, name
    assert await redis.dbsize() > 0
    names = (await client.get("/status/")).json()["queues"]
    assert sorted(names) == sorted([ok, "a.b", "a:b", "a-b_c", "9lives", "x.", "a..b"])


async def test_invalid_bodies(client: httpx.AsyncClient) -> None:
    for body in (b"", b"   ", b"{", b"{'single': 1}", b"foo=bar", b'{"a": 1} trailing', b"\xff\xfe"):
        assert_error(await client.post("/q/ib", content=body), 400)
        assert_error(await client.put("/q/ib", content=body), 400)
        assert_error(await client.post("/qb/ib", content=body), 400)
    assert (await figures(client, "ib"))["pushed"] == 0


async def test_out_of_range_parameters(client: httpx.AsyncClient) -> None:
    for params, word in [
        ({"priority": 10}, "priority"), ({"priority": -1}, "priority"), ({"priority": "high"}, "priority"),
        ({"priority": "1.5"}, "priority"), ({"delay": -1}, "delay"), ({"delay": "soon"}, "delay"),
        ({"delay": "nan"}, "delay"), ({"delay": 1e12}, "delay"), ({"delayed": "tomorrow"}, "delayed"),
        ({"delayed": time.time() + 1e9}, "delayed"), ({"delay": 1, "delayed": 1}, "delay"),
        ({"ttl": -5}, "ttl"), ({"ttl": "inf"}, "ttl"), ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": "1.5"}, "max_attempts"), ({"max_attempts": 100000}, "max_attempts"),
        ({"uniq": ""}, "uniq"),
    ]:  # fmt: skip
        assert_error(await client.post("/q/oor", content=b"{}", params=params), 400, word)
    for params, word in [
        ({"wait": 31}, "wait"), ({"wait": -1}, "wait"), ({"wait": "x"}, "wait"), ({"lease": 0}, "lease"),
        ({"lease": 3601}, "lease"), ({"lease": "long"}, "lease"),
    ]:  # fmt: skip
        assert_error(await client.get("/q/oor", params=params), 400, word)
    assert (await figures(client, "oor"))["pushed"] == 0


async def test_body_over_max_body(client: httpx.AsyncClient) -> None:
    big = b'"' + b"x" * 5000 + b'"'
    assert_error(await client.post("/q/big", content=big), 413)
    assert_error(await client.put("/q/big", content=big), 413)
    assert_error(await client.post("/qb/big", content=b"[" + big + b"]"), 413)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for _ in range(10):
            yield b" " * 1000
        yield b"1"

    assert_error(await client.post("/q/big", content=chunked()), 413)
    fits = b'"' + b"x" * 4000 + b'"'
    assert (await client.post("/q/big", content=fits)).status_code == 201
    assert (await figures(client, "big"))["pushed"] == 1
    assert (await client.get("/q/big")).content == fits


async def test_unknown_routes_and_methods_answer_json(client: httpx.AsyncClient) -> None:
    for path in ("/nope", "/q", "/q/", "/j/a/b/c/d", "/dead/q/x/y"):
        assert_error(await client.get(path), 404)
    for method, path in [("PATCH", "/q/x"), ("DELETE", "/j/x"), ("PUT", "/stats"), ("POST", "/health"),
                         ("GET", "/j/x/y/ack"), ("PUT", "/dead/x"), ("GET", "/dead/x/retry")]:  # fmt: skip
        response = await client.request(method, path)
        assert_error(response, 405)
        assert response.json() == {"error": "method not allowed"}
        assert "allow" in response.headers


# -- Redis going away ----------------------------------------------------------------------------


async def test_redis_down_gives_503_and_the_broker_recovers(make_redis_server: Callable[..., RedisServer]) -> None:
    server = make_redis_server(appendfsync="always")
    async with serve(server.url) as client:
        kept = await push(client, "r", b'{"kept": true}')
        server.stop()
        health = await client.get("/health")
        assert health.status_code == 503 and health.headers["retry-after"]
        assert health.json()["status"] == "unavailable"
        for response in (
            await client.post("/q/r", content=b"{}"),
            await client.get("/q/r"),
            await client.get("/q/r", params={"wait": 1}),
            await client.get("/j/r"),
            await client.get("/stats"),
            await client.post("/control/r", json={"status": "stop"}),
        ):
            assert_error(response, 503)
            assert int(response.headers["retry-after"]) >= 1
        server.start()

        async def healthy() -> bool:
            return (await client.get("/health")).status_code == 200

        await wait_for(healthy, 15, interval=0.05, message="the broker did not recover")
        fetched = await client.get("/q/r")
        assert fetched.status_code == 200 and fetched.headers["x-presque-job-id"] == kept
        assert (await client.post("/q/r", content=b"[2]")).status_code == 201
        assert (await client.get("/q/r")).content == b"[2]"
        # The long-poll's pub/sub came back too.
        poll = asyncio.create_task(client.get("/q/r", params={"wait": 20}))
        redis = server.async_client()
        try:
            await wait_for(lambda: waiting_on(redis, "r"), 15)
        finally:
            await redis.aclose()
        await push(client, "r", b'"woken"')
        assert (await asyncio.wait_for(poll, 15)).content == b'"woken"'


async def test_frozen_redis_gives_503(make_redis_server: Callable[..., RedisServer]) -> None:
    server = make_redis_server()
    async with serve(server.url) as client:
        await push(client, "fz")
        server.pause()
        try:
            health = await client.get("/health")
            assert health.status_code == 503 and health.headers["retry-after"]
            assert_error(await client.post("/q/fz", content=b"{}"), 503)
        finally:
            server.resume()

        async def healthy() -> bool:
            return (await client.get("/health")).status_code == 200

        await wait_for(healthy, 15, interval=0.05)
        assert (await figures(client, "fz"))["ready"] >= 1
