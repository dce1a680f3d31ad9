"""``presque serve --workers 2``: two broker processes on one port, one embedded Redis.

The supervisor (``broker/supervisor.py``) is a real subprocess (``BrokerServer``); which worker
accepts a connection is the kernel's choice, so the tests learn it from the process registry.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.servers import REPO, BrokerServer, wait_for
from tests.wsclient import WsClient, ws_connect

pytestmark = pytest.mark.slow

CONFIG = {"queues": {"reap_interval": 0.2, "backoff_base": 0.1, "backoff_max": 0.2}}
START_TIMEOUT = 30.0  # two spawned interpreters importing the broker, on a loaded CI machine


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


async def processes(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = (await http.get("/stats")).json()["processes"]
    return found


async def connections_by_pid(http: httpx.AsyncClient) -> dict[int, int]:
    return {int(p["pid"]): int(p["connections"]) for p in await processes(http)}


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[BrokerServer]:
    broker = BrokerServer(tmp_path / "broker", None, config=CONFIG, args=["--workers", "2"])
    broker.start(START_TIMEOUT)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
async def http(supervised: BrokerServer) -> AsyncIterator[httpx.AsyncClient]:
    # No keep-alive: each request may reach either worker.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=supervised.url, timeout=10.0, limits=limits) as client:
        yield client


async def workers_of(supervised: BrokerServer, http: httpx.AsyncClient) -> set[int]:
    async def both() -> set[int] | None:
        pids = {int(p["pid"]) for p in await processes(http)}
        return pids if len(pids) == 2 else None

    pids = await wait_for(both, START_TIMEOUT, interval=0.1, message="/stats does not list two workers")
    assert supervised.proc is not None
    assert {parent_of(pid) for pid in pids} == {supervised.proc.pid}
    return pids


async def test_two_workers_one_port_one_redis(supervised: BrokerServer, http: httpx.AsyncClient) -> None:
    pids = await workers_of(supervised, http)
    redis_pid = int((supervised.directory / "data" / "redis.pid").read_text())
    assert supervised.proc is not None and parent_of(redis_pid) == supervised.proc.pid  # started once, by the parent
    # Pushes and counters through fresh connections (either worker) all land in the one Redis.
    ids = [(await http.post("/q/shared", json={"n": n})).json()["id"] for n in range(20)]
    assert len(set(ids)) == 20
    assert (await http.get("/j/shared")).json()["ready"] == 20
    taken = [await http.get("/q/shared") for _ in range(20)]
    assert sorted(r.json()["n"] for r in taken) == list(range(20))
    assert (await http.get("/j/shared")).json()["job_processed"] == 20
    # A graceful stop stops the workers, then the embedded Redis.
    assert supervised.stop() == 0
    assert not Path(f"/proc/{redis_pid}").exists() or "Z" in Path(f"/proc/{redis_pid}/stat").read_text().split()[2]
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


async def counted(http: httpx.AsyncClient, total: int) -> dict[int, int] | None:
    """Connections per worker, once the registry counts ``total`` of them."""
    now = await connections_by_pid(http)
    return now if sum(now.values()) == total else None


async def connect_to(supervised: BrokerServer, http: httpx.AsyncClient, pid: int, stack: Any) -> WsClient:
    """A WebSocket served by worker ``pid`` (connections go to either: open until one lands there)."""
    for _ in range(40):
        before = await connections_by_pid(http)
        ws: WsClient = await stack.enter_async_context(ws_connect(supervised.ws_url))
        now = await wait_for(
            functools.partial(counted, http, sum(before.values()) + 1),
            5.0,
            interval=0.05,
            message="the new connection is not counted",
        )
        if now.get(pid, 0) > before.get(pid, 0):
            return ws
    raise AssertionError(f"40 connections and none reached worker {pid}")


async def test_a_killed_workers_leases_come_back_through_the_other(
    supervised: BrokerServer, http: httpx.AsyncClient
) -> None:
    victim, survivor = sorted(await workers_of(supervised, http))
    async with contextlib.AsyncExitStack() as stack:
        doomed = await connect_to(supervised, http, victim, stack)
        keeper = await connect_to(supervised, http, survivor, stack)
        assert (await doomed.call("subscribe", queue="work", prefetch=5, lease=1))["op"] == "subscribed"
        first = (await http.post("/qb/work", json=[{"n": n} for n in range(5)])).json()["ids"]
        held = await doomed.jobs(5)
        assert sorted(j["id"] for j in held) == sorted(first)

        os.kill(victim, signal.SIGKILL)  # a crash: its leases are not returned
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            await doomed.closed(10.0)

        assert (await keeper.call("subscribe", queue="work", prefetch=50))["op"] == "subscribed"
        rest = (await http.post("/qb/work", json=[{"n": n} for n in range(5, 20)])).json()["ids"]
        received: dict[str, int] = {}
        while len(received) < 20:
            (job,) = await keeper.jobs(1, timeout=15.0)  # lease (1 s) + reaper + backoff
            received[job["id"]] = job["attempt"]
            await keeper.ack(job)
        assert set(received) == set(first) | set(rest)
        assert all(received[i] == 2 for i in first) and all(received[i] == 1 for i in rest)

        async def all_processed() -> bool:
            figures = (await http.get("/j/work")).json()
            return bool(figures["job_processed"] == 20 and figures["leased"] == 0)

        await wait_for(all_processed, 5.0, message="acks not all counted")

        # The supervisor started another worker in the killed one's place.
        async def replaced() -> bool:
            pids = {int(p["pid"]) for p in await processes(http) if int(p["pid"]) != victim}
            return len(pids) == 2

        await wait_for(replaced, START_TIMEOUT, interval=0.1, message="no worker replaced the killed one")
        # Pausing through any worker stops delivery by every worker; resuming restarts it.
        assert (await http.post("/control/work", json={"status": "stop"})).status_code == 200
        paused_id = (await http.post("/q/work", json={"paused": True})).json()["id"]
        assert await keeper.silent("job", 0.5)
        assert (await http.post("/control/work", json={"status": "start"})).status_code == 200
        (job,) = await keeper.jobs(1)
        assert job["id"] == paused_id


def test_workers_must_be_positive(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESQUE_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--workers", "0", "--port", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "presque: --workers: must be at least 1" in done.stderr
