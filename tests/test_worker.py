"""broker.Worker end to end: ``presque worker jobs:<Class>`` subprocesses on a real broker and Redis.

The worker classes are in tests/worker_apps.py, copied into each test's directory as ``jobs.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect

from broker import Client
from broker.errors import UnknownJob
from tests.servers import REPO, BrokerServer, RedisServer, wait_for
from tests.shared_broker import module_broker, qname

FAST_RETRIES = {"queues": {"backoff_base": 0.1, "backoff_max": 0.2}}


class WorkerProcess:
    """``python -m broker worker <spec> --url <url> ...`` in ``cwd`` (default ``directory``, where
    jobs.py is), logging to a file in ``directory``."""

    def __init__(self, directory: Path, url: str, spec: str, *args: str, cwd: Path | None = None) -> None:
        self.log_path = directory / f"worker-{time.monotonic_ns()}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRESQUE_")}
        env["PYTHONPATH"] = str(REPO)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker", "worker", spec, "--url", url, *args],
                cwd=cwd or directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"worker did not exit within {timeout}s:\n{self.log()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerServer]:
    yield from module_broker(request, tmp_path_factory, config=FAST_RETRIES)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    shutil.copy(REPO / "tests" / "worker_apps.py", tmp_path / "jobs.py")
    workers: list[WorkerProcess] = []

    def start(url: str, spec: str, *args: str) -> WorkerProcess:
        worker = WorkerProcess(tmp_path, url, spec, *args)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


async def processed(client: Client, queue: str, count: int, timeout: float = 15.0) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        info = await client.queue_info(queue)
        return info if info["job_processed"] >= count else None

    return await wait_for(done, timeout, interval=0.05, message=f"{count} jobs of {queue} not processed")


def lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


async def watch_events(url: str, queue: str) -> AsyncIterator[dict[str, Any]]:
    async with connect(url.replace("http", "ws") + "/ws", proxy=None) as ws:
        await ws.send(orjson.dumps({"op": "watch", "topic": "events", "queue": queue}).decode())
        async for message in ws:
            yield orjson.loads(message)


async def test_worker_acks_with_its_result_and_registers(
    server: BrokerServer, start_worker: Callable[..., WorkerProcess]
) -> None:
    q = qname()
    events: list[dict[str, Any]] = []
    watching = asyncio.Event()

    async def collect() -> None:
        async for frame in watch_events(server.url, q):
            watching.set() if frame.get("op") == "watching" else events.append(frame)

    collector = asyncio.create_task(collect())
    try:
        await asyncio.wait_for(watching.wait(), 5)
        worker = start_worker(server.url, "jobs:Echo", "--queue", q, "--concurrency", "3")
        async with Client(server.url) as client:
            await client.push_many(q, [{"n": n, "progress": n == 0} for n in range(20)])
            info = await processed(client, q, 20)
            assert (info["ready"], info["leased"], info["job_failed"]) == (0, 0, 0)
            await wait_for(lambda: len([e for e in events if e["event"] == "acked"]) == 20)
            acked = [e for e in events if e["event"] == "acked"]
            assert sorted(e["data"]["n"] for e in acked) == list(range(20))
            assert {e["data"]["pid"] for e in acked} == {worker.proc.pid}
            assert any(e["event"] == "progress" and e["data"] == {"n": 0, "step": "started"} for e in events)

            worker_id = f"Echo@{os.uname().nodename}:{worker.proc.pid}"
            assert await client.workers(q) == [worker_id]
            assert worker_id in await client.workers()
            worker.signal(signal.SIGTERM)
            assert worker.wait() == 0, worker.log()
            assert worker_id not in await client.workers()
    finally:
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector  # closes its WebSocket before the test's event loop goes
    log = worker.log()
    assert "connected to the broker" in log and "20 processed, 0 failed" in log


@pytest.mark.parametrize("spec", ["jobs:Echo", "jobs:Threaded"])
async def test_failed_jobs_are_nacked_then_dead_lettered(
    server: BrokerServer, start_worker: Callable[..., WorkerProcess], tmp_path: Path, spec: str
) -> None:
    q = qname()
    fail_log = tmp_path / "failures"
    worker = start_worker(server.url, spec, "--queue", q)
    async with Client(server.url) as client:
        job_id = await client.push(q, {"fail": "bad input", "fail_log": str(fail_log)}, max_attempts=2)
        ok_id = await client.push(q, {"n": 1, "progress": True})

        async def dead() -> dict[str, Any] | None:
            listing = await client.dead(q)
            return listing if listing["total"] else None

        listing = await wait_for(dead, 15, interval=0.05)
        await processed(client, q, 1)  # the job that did not fail
        (entry,) = listing["jobs"]
        assert (entry["id"], entry["attempt"], entry["last_error"]) == (job_id, 2, "ValueError: bad input")
        info = await client.queue_info(q)
        assert (info["job_failed"], info["retried"], info["job_processed"]) == (2, 1, 1)
        with pytest.raises(UnknownJob):
            await client.job(q, ok_id)
    await wait_for(lambda: len(lines(fail_log)) == 2)
    assert [line[1:] for line in lines(fail_log)] == [["ValueError:", "bad", "input"]] * 2
    worker.signal(signal.SIGINT)
    assert worker.wait() == 0
    assert "failed: ValueError: bad input" in worker.log()


async def test_lease_is_extended_while_work_runs(
    server: BrokerServer, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    q = qname()
    log = tmp_path / "log"
    start_worker(server.url, "jobs:Echo", "--queue", q, "--lease", "1")
    async with Client(server.url) as client:
        await client.push(q, {"n": 1, "sleep": 2.5, "log": str(log)})
        info = await processed(client, q, 1)
    assert (info["retried"], info["job_failed"]) == (0, 0)
    assert [line[:3] for line in lines(log)] == [[q, "1", "1"]]  # delivered once, never redelivered


async def test_sigterm_finishes_running_jobs_and_returns_the_rest_at_once(
    server: BrokerServer, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    urgent, later = qname("urgent"), qname("later")
    mark, log = tmp_path / "started", tmp_path / "log"
    worker = start_worker(server.url, "jobs:Prioritised", "--queue", urgent, "--queue", later, "--grace", "20")
    async with Client(server.url) as client:
        running = await client.push(urgent, {"n": 1, "sleep": 1.5, "mark": str(mark), "log": str(log)})
        await wait_for(mark.exists, 10)
        waiting = await client.push(later, {"n": 2, "log": str(log)})
        # Delivered to the worker (prefetch 1 on "later") but not started: its one slot is busy.
        await wait_for(lambda: _state(client, later, waiting, "leased"), 5)
        worker.signal(signal.SIGTERM)
        await wait_for(lambda: _state(client, later, waiting, "ready"), 1.0, message="waiting job not returned")
        assert (await client.job(urgent, running))["state"] == "leased"  # still running
        assert worker.wait() == 0, worker.log()
        with pytest.raises(UnknownJob):  # finished and acked during the grace period
            await client.job(urgent, running)
        assert (await client.queue_info(urgent))["job_processed"] == 1
        job = await client.job(later, waiting)
        assert (job["state"], job["attempt"]) == ("ready", 1)
        assert (await client.queue_info(later))["job_failed"] == 0
    assert [line[0] for line in lines(log)] == [urgent]


async def _state(client: Client, queue: str, job_id: str, state: str) -> bool:
    return bool((await client.job(queue, job_id))["state"] == state)


@pytest.mark.parametrize("spec", ["jobs:Echo", "jobs:Threaded"])
async def test_grace_period_over_and_second_signal(
    server: BrokerServer, start_worker: Callable[..., WorkerProcess], tmp_path: Path, spec: str
) -> None:
    q = qname()
    async with Client(server.url) as client:
        # Grace over: the job is abandoned, returned to the queue, exit 0.
        mark = tmp_path / "one"
        worker = start_worker(server.url, spec, "--queue", q, "--grace", "0.3")
        job_id = await client.push(q, {"sleep": 60, "mark": str(mark)})
        await wait_for(mark.exists, 10)
        worker.signal(signal.SIGTERM)
        assert worker.wait(10) == 0, worker.log()
        assert "grace period over" in worker.log()
        await wait_for(lambda: _state(client, q, job_id, "ready"), 5)

        # A second signal: exit at once, the job goes back too.
        mark = tmp_path / "two"
        worker = start_worker(server.url, spec, "--queue", q)
        await client.purge(q)
        job_id = await client.push(q, {"sleep": 60, "mark": str(mark)})
        await wait_for(mark.exists, 10)
        worker.signal(signal.SIGTERM)
        await wait_for(lambda: "stopping" in worker.log(), 5)
        started = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert worker.wait(10) == 128 + signal.SIGTERM
        assert time.monotonic() - started < 5
        await wait_for(lambda: _state(client, q, job_id, "ready"), 5)


async def test_priority_between_queues(
    server: BrokerServer, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    first, second = qname("first"), qname("second")
    log = tmp_path / "log"
    async with Client(server.url) as client:
        for n in range(3):
            await client.push(second, {"n": n, "log": str(log)})
            await client.push(first, {"n": n, "log": str(log)})
        start_worker(server.url, "jobs:Prioritised", "--queue", first, "--queue", second)
        await processed(client, second, 3)
    order = [line[0] for line in lines(log)]
    assert sorted(order) == sorted([first] * 3 + [second] * 3)
    # The very first job may come from either queue (both subscriptions start at once); after
    # it, the worker prefers the first queue's jobs whenever it has some.
    assert order[1:] == sorted(order[1:], key=[first, second].index), order


async def test_worker_survives_a_broker_restart(
    redis_url: str, make_broker: Callable[..., BrokerServer], start_worker: Callable[..., WorkerProcess]
) -> None:
    server = make_broker(redis_url)
    q = qname()
    worker = start_worker(server.url, "jobs:Echo", "--queue", q)
    async with Client(server.url) as client:
        await client.push(q, {"n": 1})
        await processed(client, q, 1)
    server.restart()
    async with Client(server.url) as client:
        await client.push_many(q, [{"n": n} for n in range(2, 12)])
        await processed(client, q, 11)
    log = worker.log()
    assert log.count("connection to the broker lost") == 1, log
    assert log.count("connected to the broker") == 2, log
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


async def test_job_running_across_a_broker_crash_is_acked_over_http(
    redis_url: str, make_broker: Callable[..., BrokerServer], start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    server = make_broker(redis_url)
    q = qname()
    mark, log = tmp_path / "started", tmp_path / "log"
    worker = start_worker(server.url, "jobs:Echo", "--queue", q)
    async with Client(server.url) as client:
        job_id = await client.push(q, {"n": 1, "sleep": 1.5, "mark": str(mark), "log": str(log)})
    await wait_for(mark.exists, 10)
    server.kill()  # no lease is returned: the job stays leased to the worker in Redis
    server.start()
    async with Client(server.url) as client:
        info = await processed(client, q, 1)
        assert (info["leased"], info["ready"], info["retried"]) == (0, 0, 0)
        with pytest.raises(UnknownJob):
            await client.job(q, job_id)
    assert len(lines(log)) == 1  # ran once: acked with its token over HTTP after the reconnection
    assert "lost its lease" not in worker.log()


async def test_worker_survives_a_redis_outage(
    make_redis_server: Callable[..., RedisServer],
    make_broker: Callable[..., BrokerServer],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    redis = make_redis_server()
    server = make_broker(redis.url, config={"redis": {"socket_timeout": 1.0}})
    q = qname()
    worker = start_worker(server.url, "jobs:Echo", "--queue", q)
    async with Client(server.url) as client:
        await client.push(q, {"n": 1})
        await processed(client, q, 1)
        redis.stop()
        await wait_for(lambda: "redis unavailable" in worker.log(), 10)
        redis.start()
        await wait_for(lambda: _healthy(client), 10)
        await client.push_many(q, [{"n": n} for n in range(2, 7)])
        await processed(client, q, 6)
    assert worker.proc.poll() is None
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    log = worker.log()
    assert log.count("the broker reports: redis unavailable") == 1, log


async def _healthy(client: Client) -> bool:
    try:
        return (await client.health())["status"] == "ok"
    except Exception:
        return False


async def test_several_processes(
    server: BrokerServer, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    q = qname()
    log = tmp_path / "log"
    worker = start_worker(server.url, "jobs:Echo", "--queue", q, "--processes", "2", "--concurrency", "2")
    async with Client(server.url) as client:

        async def two_registered() -> list[str] | None:
            ids = await client.workers(q)
            return ids if len(ids) == 2 else None

        ids = await wait_for(two_registered, 10)
        pids = {int(i.rsplit(":", 1)[1]) for i in ids}

        async def two_subscribed() -> bool:
            return bool((await client.stats())["queues"].get(q, {}).get("consumers") == 2)

        await wait_for(two_subscribed, 10)
        assert worker.proc.pid not in pids
        await client.push_many(q, [{"n": n, "sleep": 0.05, "log": str(log)} for n in range(40)])
        await processed(client, q, 40)
        assert {int(line[3]) for line in lines(log)} == pids  # both processes took jobs
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.log()
        assert await client.workers(q) == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_the_examples_run(server: BrokerServer, tmp_path: Path) -> None:
    examples = REPO / "examples"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESQUE_")}
    env["PYTHONPATH"] = str(REPO)
    produced = subprocess.run(
        [sys.executable, "producer.py", server.url], cwd=examples, env=env, capture_output=True, timeout=30
    )
    assert produced.returncode == 0, produced.stderr
    assert b"pushed 1101 jobs" in produced.stdout
    worker = WorkerProcess(tmp_path, server.url, "worker:Thumbnails", cwd=examples)
    try:
        async with Client(server.url) as client:
            await processed(client, "images", 1101, timeout=30)

            async def settled() -> bool:
                info = await client.queue_info("images")
                return (info["ready"], info["delayed"], info["leased"], info["dead"]) == (0, 0, 0, 1)

            await wait_for(settled, 10)
            (dead,) = (await client.dead("images"))["jobs"]
            assert dead["last_error"] == "ValueError: bad width 0"
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.log()
    finally:
        worker.stop()
