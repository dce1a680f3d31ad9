"""Redis Sentinel: the broker follows a failover without a restart.

One master, one replica and three sentinels (``tests/cluster.py``); the master is killed with
SIGKILL, the sentinels promote the replica, and the same broker process keeps serving HTTP and
its open WebSocket once the new master is known.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster import MASTER_NAME, SentinelGroup
from tests.servers import make_settings, run_broker, wait_for
from tests.wsclient import ws_connect

pytestmark = [pytest.mark.sentinel, pytest.mark.slow]

FAILOVER_DEADLINE = 30.0  # down-after 1 s + election + promotion take a few seconds; generous for CI


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    with SentinelGroup(tmp_path / "sentinel") as group:
        yield group


def sentinel_settings(group: SentinelGroup) -> Any:
    return make_settings(
        None,
        {
            "redis": {"sentinel_master": MASTER_NAME, "sentinels": group.sentinels, "socket_timeout": 1.0},
            "queues": {"reap_interval": 0.2},
        },
    )


async def until_status(http: httpx.AsyncClient, method: str, path: str, status: int, **kwargs: Any) -> httpx.Response:
    """Repeat the request until it answers ``status`` (503 while Redis fails over)."""
    last: list[httpx.Response] = []

    async def answered() -> httpx.Response | None:
        response = await http.request(method, path, **kwargs)
        last[:] = [response]
        return response if response.status_code == status else None

    try:
        return await wait_for(answered, FAILOVER_DEADLINE, interval=0.1)
    except TimeoutError:
        raise AssertionError(f"{method} {path}: still {last[0].status_code} {last[0].text}") from None


async def test_http_and_websocket_resume_after_the_master_is_killed(sentinel_group: SentinelGroup) -> None:
    group = sentinel_group
    async with (
        run_broker(sentinel_settings(group)) as broker,
        httpx.AsyncClient(base_url=broker.url, timeout=10.0) as http,
        ws_connect(broker.ws_url) as ws,
    ):
        assert (await ws.call("subscribe", queue="live", prefetch=1))["op"] == "subscribed"
        before = (await http.post("/q/live", json={"n": "before"})).json()["id"]
        (job,) = await ws.jobs(1)
        assert job["id"] == before
        assert await ws.call("ack", id=job["id"], token=job["token"]) == {"op": "ok", "ref": "r2"}
        kept = (await http.post("/q/kept", json={"n": "kept"})).json()["id"]
        with group.master.client() as master:
            assert master.wait(1, 5000) == 1  # the replica has every write so far

        group.kill_master()
        started = time.monotonic()
        group.wait_failover(FAILOVER_DEADLINE)

        # HTTP: the job written before the crash is there, on the new master; pushes work again.
        fetched = await until_status(http, "GET", "/q/kept", 200)
        assert fetched.json() == {"n": "kept"}
        assert fetched.headers["x-presque-job-id"] == kept
        after = (await until_status(http, "POST", "/q/live", 201, json={"n": "after"})).json()["id"]
        # WebSocket: the same connection, never closed, gets the new job and acks it.
        (job,) = await ws.jobs(1, timeout=FAILOVER_DEADLINE)
        assert job["id"] == after and job["body"] == {"n": "after"}
        assert await ws.call("ack", id=job["id"], token=job["token"]) == {"op": "ok", "ref": "r3"}
        assert (await http.get("/health")).status_code == 200
        figures = (await http.get("/j/live")).json()
        assert figures["job_processed"] == 2 and figures["ready"] == 0 and figures["leased"] == 0
        assert time.monotonic() - started < FAILOVER_DEADLINE
