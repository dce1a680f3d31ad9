"""Redis Cluster: the broker on a real 3-master cluster, with queues on every master.

The whole HTTP and WebSocket suites also run against the cluster (``make test-cluster``:
``PRESQUE_TEST_TOPOLOGY=cluster``); this module adds what only a cluster shows: the key schema
keeps each Lua script on one slot, queues land on every master, wake-ups published on one node
reach subscribers connected to another, and two brokers share the cluster.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import httpx
import pytest
from redis.crc import key_slot

from broker import keys
from broker.config import parse_settings
from tests.cluster import ClusterServers, ClusterTestClient, node_client, queue_slot
from tests.invariants import check_queue
from tests.servers import RunningBroker, make_settings, run_broker, wait_for
from tests.wsclient import WsClient, ws_connect

pytestmark = pytest.mark.cluster

CONFIG: dict[str, dict[str, Any]] = {
    "queues": {"reap_interval": 0.1, "backoff_base": 0.2, "backoff_max": 0.5, "max_attempts": 2},
}


def cluster_settings(cluster: ClusterServers, **sections: dict[str, Any]) -> Any:
    data = {name: {**CONFIG.get(name, {}), **sections.get(name, {})} for name in {*CONFIG, *sections}}
    data["redis"] = {**data.get("redis", {}), "cluster": True, "cluster_nodes": cluster.nodes}
    return parse_settings(data)


@pytest.fixture
def cluster(redis_cluster: ClusterServers) -> ClusterServers:
    redis_cluster.flush()
    return redis_cluster


@pytest.fixture
async def broker(cluster: ClusterServers) -> AsyncIterator[RunningBroker]:
    async with run_broker(cluster_settings(cluster)) as running:
        yield running


@pytest.fixture
async def http(broker: RunningBroker) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=broker.url, timeout=10.0) as client:
        yield client


@pytest.fixture
def queues(cluster: ClusterServers) -> list[str]:
    """One queue on each master."""
    names = cluster.queues_on_every_master("spread")
    assert {cluster.owner(name) for name in names} == {s.port for s in cluster.servers}
    return names


# -- the key schema ----------------------------------------------------------------------------------


def test_a_queues_keys_share_one_slot_and_global_keys_stand_alone() -> None:
    for queue in ("a", "jobs", "images.resize", "x" * 100, "spread-0"):
        qk = keys.queue_keys(queue)
        slots = {key_slot(key.encode()) for key in [*qk.all(), qk.workers, keys.watch_key(queue)]}
        assert slots == {queue_slot(queue)}
    for key in (
        keys.QUEUES,
        keys.WORKERS,
        keys.PROCESSES,
        keys.WATCHED,
        keys.REAPER_LOCK,
        keys.HISTORY_LOCK,
        keys.HISTORY_SECONDS,
        keys.HISTORY_MINUTES,
    ):
        assert "{" not in key, f"{key} must not borrow a queue's slot"


def test_lua_scripts_touch_only_the_keys_they_are_given() -> None:
    # A key a script builds itself could live on another slot (CROSSSLOT on a cluster).
    lua = resources.files("broker.lua")
    count = len(keys.queue_keys("q").all())
    for script in lua.iterdir():
        if not script.name.endswith(".lua"):
            continue
        source = script.read_text()
        indexes = {int(i) for i in re.findall(r"KEYS\[(\d+)\]", source)}
        assert indexes <= set(range(1, count + 1)), script.name
        assert "KEYS[#" not in source and "presque:" not in source, script.name
        for call in re.findall(r"redis\.call\(\s*'(\w+)'\s*,\s*([^,)]+)", source):
            command, first = call
            if command.upper() in ("PUBLISH", "TIME"):
                continue
            assert first.startswith(("K_", "KEYS[")) or not first.startswith(("'", '"')), (script.name, call)


async def test_queues_land_on_every_master(cluster: ClusterServers, http: httpx.AsyncClient, queues: list[str]) -> None:
    for queue in queues:
        assert (await http.post(f"/q/{queue}", json={"q": queue})).status_code == 201
    for queue in queues:
        with node_client(cluster.owner(queue)) as node:
            assert node.execute_command("CLUSTER", "COUNTKEYSINSLOT", queue_slot(queue)) >= 3  # ready, body, meta...
    status = (await http.get("/status/")).json()
    assert sorted(status["queues"]) == sorted(queues)


# -- HTTP ----------------------------------------------------------------------------------------------


async def test_every_http_route_on_every_master(
    cluster: ClusterServers, http: httpx.AsyncClient, queues: list[str]
) -> None:
    redis = cluster.async_client()
    try:
        for queue in queues:
            await exercise_http(http, redis, queue)
            await check_queue(redis, queue)
    finally:
        await redis.aclose()
    stats = (await http.get("/stats")).json()
    assert set(stats["queues"]) == set(queues)
    assert len(stats["processes"]) == 1
    assert stats["redis"]["redis_version"]
    assert (await http.get("/stats/history")).status_code == 200
    assert (await http.get("/health")).json() == {"status": "ok"}


async def listened(redis: ClusterTestClient, channel: str) -> bool:
    ((_, count),) = await redis.pubsub_numsub(channel)
    return bool(count)


async def exercise_http(http: httpx.AsyncClient, redis: ClusterTestClient, q: str) -> None:
    pushed = await http.post(f"/q/{q}", json={"n": 1}, params={"priority": 9})
    assert pushed.status_code == 201
    job_id = pushed.json()["id"]
    assert (await http.get(f"/j/{q}/{job_id}")).json()["state"] == "ready"
    assert (await http.post(f"/qb/{q}", json=[{"n": 2}, {"n": 3}])).status_code == 201
    assert (await http.get(f"/status/{q}", params={"with_desc": 1})).json()["size"] == 3
    # Lease, touch, ack.
    leased = await http.get(f"/q/{q}", params={"lease": 30})
    assert leased.status_code == 200 and leased.headers["x-presque-job-id"] == job_id
    token = leased.headers["x-presque-lease-token"]
    assert (await http.post(f"/j/{q}/{job_id}/touch", json={"token": token, "lease": 60})).status_code == 200
    assert (await http.post(f"/j/{q}/{job_id}/ack", json={"token": token})).json()["status"] == "acked"
    # Batch fetch (destructive).
    assert (await http.get(f"/qb/{q}", params={"batch_size": 2})).json() == [{"n": 2}, {"n": 3}]
    # Nack until dead, then the dead-letter routes.
    doomed = (await http.post(f"/q/{q}", json={"doomed": True})).json()["id"]
    for attempt in (1, 2):
        leased = await wait_for(lambda: lease_if_ready(http, q), 5.0, interval=0.05)
        assert leased.headers["x-presque-attempt"] == str(attempt)
        nacked = await http.post(
            f"/j/{q}/{doomed}/nack", json={"token": leased.headers["x-presque-lease-token"], "error": "no"}
        )
        assert nacked.json()["status"] == ("delayed" if attempt == 1 else "dead")
    dead = (await http.get(f"/dead/{q}")).json()
    assert [job["id"] for job in dead["jobs"]] == [doomed]
    assert (await http.post(f"/dead/{q}/retry", json={"ids": [doomed]})).json()["retried"] == 1
    # Long-poll woken by a push (the wake-up crosses the cluster bus to the notifier's node).
    assert (await http.get(f"/q/{q}")).json() == {"doomed": True}
    waiting = asyncio.create_task(http.get(f"/q/{q}", params={"wait": 10}))
    await wait_for(lambda: listened(redis, keys.wake_channel(q)), 5.0, message="long-poll not subscribed")
    assert (await http.post(f"/q/{q}", json={"late": True})).status_code == 201
    assert (await waiting).json() == {"late": True}
    # Pause, resume, purge.
    assert (await http.post(f"/control/{q}", json={"status": "stop"})).status_code == 200
    assert (await http.get(f"/control/{q}")).json()["status"] == 0
    closed = await http.get(f"/q/{q}")
    assert closed.status_code == 404 and "closed" in closed.json()["error"]
    assert (await http.post(f"/control/{q}", json={"status": "start"})).status_code == 200
    assert (await http.delete(f"/q/{q}")).status_code == 204
    # PUT re-queues and counts a failure; workers register on the queue.
    assert (await http.put(f"/q/{q}", json={"again": True})).status_code == 201
    assert (await http.post(f"/w/{q}", headers={"X-presque-workerid": f"w-{q}"})).status_code == 201
    assert (await http.get("/w/", params={"queue_name": q})).json()["workers_list"] == [f"w-{q}"]
    figures = (await http.get(f"/j/{q}")).json()
    assert figures["job_failed"] == 3 and figures["pushed"] == 6 and figures["dead"] == 0
    assert (await http.delete(f"/dead/{q}")).status_code == 204


async def lease_if_ready(http: httpx.AsyncClient, queue: str) -> httpx.Response | None:
    response = await http.get(f"/q/{queue}", params={"lease": 30})
    return response if response.status_code == 200 else None


# -- WebSocket -----------------------------------------------------------------------------------------


async def test_websocket_flows_on_every_master(
    broker: RunningBroker, http: httpx.AsyncClient, queues: list[str]
) -> None:
    async with ws_connect(broker.ws_url) as ws:
        for queue in queues:
            assert (await ws.call("subscribe", queue=queue, prefetch=2))["op"] == "subscribed"
        # Push: each job reaches the subscriber, whichever master holds its queue.
        for queue in queues:
            job_id = (await http.post(f"/q/{queue}", json={"q": queue})).json()["id"]
            (job,) = await ws.jobs(1, queue=queue)
            assert job["id"] == job_id and job["body"] == {"q": queue}
            assert (await ws.call("ack", id=job["id"], token=job["token"]))["op"] == "ok"
            # Nack: back after the backoff, attempt 2.
            retry_id = (await http.post(f"/q/{queue}", json={"retry": queue})).json()["id"]
            (job,) = await ws.jobs(1, queue=queue)
            assert (await ws.call("nack", id=retry_id, token=job["token"]))["op"] == "ok"
            (again,) = await ws.jobs(1, queue=queue)
            assert again["id"] == retry_id and again["attempt"] == 2
            await ws.ack(again)
        # Pause one queue: its jobs wait; resume: they come.
        paused = queues[0]
        assert (await http.post(f"/control/{paused}", json={"status": "stop"})).status_code == 200
        held_id = (await http.post(f"/q/{paused}", json={"held": True})).json()["id"]
        other_id = (await http.post(f"/q/{queues[1]}", json={"other": True})).json()["id"]
        (other,) = await ws.jobs(1, queue=queues[1])
        assert other["id"] == other_id
        assert await ws.silent(lambda f: f.get("op") == "job" and f["queue"] == paused, 0.3)
        assert (await http.post(f"/control/{paused}", json={"status": "start"})).status_code == 200
        (held,) = await ws.jobs(1, queue=paused)
        assert held["id"] == held_id
        # Push over the WebSocket, to every master.
        for queue in queues:
            reply = await ws.call("push", queue=queue, body={"ws": queue})
            assert reply["op"] == "pushed"
            (job,) = await ws.jobs(1, queue=queue)
            assert job["id"] == reply["id"]
        # Disconnect holding jobs (other, held and the pushed ones): they go back at once.
    await wait_for(lambda: all_ready(http, queues, expected=[2, 2, 1]), 5.0, message="leases not returned")


async def all_ready(http: httpx.AsyncClient, queues: list[str], expected: list[int]) -> bool:
    figures = [(await http.get(f"/j/{q}")).json() for q in queues]
    return [f["ready"] for f in figures] == expected and all(f["leased"] == 0 for f in figures)


# -- many brokers --------------------------------------------------------------------------------------


async def test_two_brokers_share_the_cluster(cluster: ClusterServers, queues: list[str]) -> None:
    settings = cluster_settings(cluster)
    async with (
        run_broker(settings) as a,
        run_broker(settings) as b,
        httpx.AsyncClient(timeout=10.0) as http,
        ws_connect(a.ws_url) as ws,
    ):
        for queue in queues:
            assert (await ws.call("subscribe", queue=queue))["op"] == "subscribed"
        for queue in queues:
            # Pushed through B: A's subscriber is woken over pub/sub, wherever the two notifiers listen.
            job_id = (await http.post(f"{b.url}/q/{queue}", json={"via": "b"})).json()["id"]
            (job,) = await ws.jobs(1, queue=queue)
            assert job["id"] == job_id
            # Acked through A's socket, seen through B's HTTP.
            assert (await ws.call("ack", id=job_id, token=job["token"]))["op"] == "ok"
            assert (await http.get(f"{b.url}/j/{queue}")).json()["job_processed"] == 1

        async def both_listed() -> bool:
            processes = (await http.get(f"{b.url}/stats")).json()["processes"]
            return len(processes) == 2

        await wait_for(both_listed, 5.0, message="/stats does not list both brokers")
        await broadcast_crosses(ws, b)


async def broadcast_crosses(listener: WsClient, other: RunningBroker) -> None:
    assert (await listener.call("listen", channel="news"))["op"] == "listening"
    async with ws_connect(other.ws_url) as sender:
        assert (await sender.call("publish", channel="news", data={"hello": 1}))["op"] == "ok"
    assert (await listener.expect("message"))["data"] == {"hello": 1}


def test_make_settings_follows_the_topology(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESQUE_TEST_TOPOLOGY", "cluster")
    assert make_settings("redis://127.0.0.1:7000/0").redis.cluster
    monkeypatch.setenv("PRESQUE_TEST_TOPOLOGY", "single")
    assert not make_settings("redis://127.0.0.1:7000/0").redis.cluster
