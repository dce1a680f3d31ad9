"""Helpers for the browser tests (``tests/test_browser.py``) and the dashboard screenshot.

- :func:`launch_chromium`: Debian's ``/usr/bin/chromium`` driven by Playwright (never a
  downloaded browser); :func:`require_chromium` fails in CI and skips elsewhere when it is missing.
- :class:`BrokerHttp`: the few HTTP calls the tests make on a broker (push, figures, dead letters).
- :class:`Load`: producers and WebSocket consumers on several queues, for a dashboard under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson

if TYPE_CHECKING:
    from playwright.async_api import Browser, Playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> None:
    """Fail (in CI: ``$CI`` set) or skip (a developer's machine) when chromium or Playwright is missing.

    CI installs ``chromium`` (``.ci/run``), so a missing browser there is a broken set-up, not a
    reason to pass quietly.
    """
    import pytest

    problem = None
    if not Path(CHROMIUM).is_file() or not os.access(CHROMIUM, os.X_OK):
        problem = f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)"
    else:
        try:
            import playwright.async_api  # noqa: F401
        except ImportError:
            problem = "the playwright package is missing: make install (it is in the dev extra)"
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"browser tests cannot run: {problem}", pytrace=False)
    pytest.skip(f"browser tests skipped: {problem}")


async def launch_chromium(playwright: Playwright, **kwargs: Any) -> Browser:
    """Headless Debian chromium (Playwright never downloads one here)."""
    return await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, **kwargs)


class BrokerHttp:
    """HTTP shortcuts on one broker, for arranging and checking what a page shows."""

    def __init__(self, url: str, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.AsyncClient(base_url=url, headers=headers, timeout=10.0)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def __aenter__(self) -> BrokerHttp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _ok(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise AssertionError(
                f"{response.request.method} {response.request.url}: {response.status_code} {response.text}"
            )
        return response.json() if response.content else None

    async def push(self, queue: str, body: Any, **params: Any) -> str:
        """``POST /q/{queue}``: the new job's id."""
        data = await self._ok(await self.client.post(f"/q/{queue}", content=orjson.dumps(body), params=params))
        return str(data["id"])

    async def push_many(self, queue: str, bodies: Sequence[Any], **params: Any) -> list[str]:
        """``POST /qb/{queue}``: the ids, in order."""
        data = await self._ok(await self.client.post(f"/qb/{queue}", content=orjson.dumps(list(bodies)), params=params))
        return [str(i) for i in data["ids"]]

    async def info(self, queue: str) -> dict[str, Any]:
        """``GET /j/{queue}``: sizes and counters."""
        data: dict[str, Any] = await self._ok(await self.client.get(f"/j/{queue}"))
        return data

    async def dead(self, queue: str) -> dict[str, Any]:
        """``GET /dead/{queue}``: ``{"total", "jobs"}``."""
        data: dict[str, Any] = await self._ok(await self.client.get(f"/dead/{queue}", params={"limit": 1000}))
        return data

    async def paused(self, queue: str) -> bool:
        data = await self._ok(await self.client.get(f"/control/{queue}"))
        return bool(data["status"] == 0)

    async def history(self, range_: str = "15m") -> dict[str, Any]:
        data: dict[str, Any] = await self._ok(await self.client.get("/stats/history", params={"range": range_}))
        return data

    async def make_dead(self, queue: str, count: int, error: str = "boom") -> list[str]:
        """Push ``count`` jobs that may run once, lease each over HTTP and nack it: dead letters."""
        ids = []
        for n in range(count):
            ids.append(await self.push(queue, {"n": n, "doomed": True}, max_attempts=1))
        for _ in range(count):
            response = await self.client.get(f"/q/{queue}", params={"lease": 30})
            await self._ok(response)
            job_id = response.headers["x-presque-job-id"]
            token = response.headers["x-presque-lease-token"]
            outcome = await self._ok(
                await self.client.post(f"/j/{queue}/{job_id}/nack", json={"token": token, "error": error})
            )
            assert outcome["status"] == "dead", outcome
        return ids


# -- load ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueLoad:
    """What :class:`Load` does to one queue.

    Args:
        name: the queue.
        push_rate: jobs pushed per second (over HTTP, in small batches).
        consumers: WebSocket consumers.
        prefetch: each consumer's prefetch.
        work: seconds each job takes (random between the two bounds).
        fail: fraction of deliveries that are nacked.
        max_attempts: of each pushed job (low makes dead letters).
        delay: seconds of delay for a fraction ``delayed`` of the pushes.
        delayed: fraction of pushes that are delayed.
        paused: pause the queue after the first pushes (its backlog grows).
    """

    name: str
    push_rate: float
    consumers: int = 1
    prefetch: int = 10
    work: tuple[float, float] = (0.01, 0.05)
    fail: float = 0.0
    max_attempts: int = 5
    delay: float = 0.0
    delayed: float = 0.0
    paused: bool = False


DEMO_LOAD = (
    QueueLoad("emails", push_rate=60, consumers=3, prefetch=10, work=(0.02, 0.2), fail=0.02),
    QueueLoad("images.resize", push_rate=24, consumers=2, prefetch=2, work=(0.08, 0.12)),
    QueueLoad("webhooks", push_rate=15, consumers=2, prefetch=5, work=(0.01, 0.1), fail=0.25, max_attempts=2),
    QueueLoad("reports", push_rate=3, consumers=1, prefetch=1, work=(0.3, 1.2), delay=90, delayed=0.5),
    QueueLoad("billing", push_rate=2, consumers=1, paused=True),
)


class Load:
    """Producers (HTTP) and consumers (WebSocket, manual ack) on several queues until :meth:`stop`.

    ``async with Load(url, DEMO_LOAD): ...`` runs it for the block. Each consumer also registers
    in the worker registry (``POST /w/{queue}``, refreshed with its figures) so the dashboard
    lists it. ``consumer_urls`` spreads the consumers over several broker processes.
    """

    def __init__(
        self, url: str, queues: Sequence[QueueLoad] = DEMO_LOAD, *, consumer_urls: Sequence[str] = (), seed: int = 7
    ) -> None:
        self.url = url.rstrip("/")
        self.consumer_urls = [u.rstrip("/") for u in consumer_urls] or [self.url]
        self.queues = list(queues)
        self.random = random.Random(seed)
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.http = httpx.AsyncClient(base_url=self.url, timeout=10.0)

    async def __aenter__(self) -> Load:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        n = 0
        for spec in self.queues:
            self.tasks.append(asyncio.create_task(self._produce(spec)))
            for index in range(spec.consumers):
                url = self.consumer_urls[n % len(self.consumer_urls)]
                n += 1
                self.tasks.append(asyncio.create_task(_Consumer(self, spec, index, url).run()))

    async def stop(self) -> None:
        self.stopping.set()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.http.aclose()

    async def _produce(self, spec: QueueLoad) -> None:
        tick = 0.2
        owed = 0.0
        n = 0
        began = asyncio.get_running_loop().time()
        phase = self.random.uniform(0, 2 * math.pi)
        if spec.paused:
            await self.http.post(f"/control/{spec.name}", json={"status": "stop"})
        while not self.stopping.is_set():
            # A slow wave on top of the base rate makes the charts worth looking at.
            elapsed = asyncio.get_running_loop().time() - began
            wave = 1.0 + 0.5 * math.sin(phase + elapsed / 20)
            owed += spec.push_rate * wave * tick * self.random.uniform(0.6, 1.4)
            count, owed = int(owed), owed - int(owed)
            if count:
                bodies = [{"n": n + i, "kind": spec.name} for i in range(count)]
                n += count
                delayed = [b for b in bodies if self.random.random() < spec.delayed]
                now = [b for b in bodies if b not in delayed]
                params = {"max_attempts": spec.max_attempts}
                with contextlib.suppress(httpx.HTTPError):
                    if now:
                        await self.http.post(f"/qb/{spec.name}", content=orjson.dumps(now), params=params)
                    if delayed:
                        delay = self.random.uniform(spec.delay / 3, spec.delay)
                        await self.http.post(
                            f"/qb/{spec.name}", content=orjson.dumps(delayed), params={**params, "delay": delay}
                        )
            await asyncio.sleep(tick)


class _Consumer:
    """One WebSocket consumer of :class:`Load`, registered as a worker."""

    HEARTBEAT = 10.0

    def __init__(self, load: Load, spec: QueueLoad, index: int, url: str) -> None:
        self.load = load
        self.spec = spec
        self.url = url
        self.id = f"{spec.name}-{index + 1}"
        self.processed = 0
        self.failed = 0
        self.current: str | None = None

    async def run(self) -> None:
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            await self._consume()
        finally:
            heartbeat.cancel()

    async def _heartbeat(self) -> None:
        while True:
            info = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "processed": self.processed,
                "failed": self.failed,
                "current": self.current,
                "concurrency": self.spec.prefetch,
            }
            with contextlib.suppress(httpx.HTTPError):
                await self.load.http.post(f"/w/{self.spec.name}", headers={"X-presque-workerid": self.id}, json=info)
            await asyncio.sleep(self.HEARTBEAT)

    async def _consume(self) -> None:
        from websockets.asyncio.client import connect

        ws_url = self.url.replace("http://", "ws://", 1) + "/ws"
        while not self.load.stopping.is_set():
            try:
                async with connect(ws_url) as ws:
                    sub = {"op": "subscribe", "queue": self.spec.name, "prefetch": self.spec.prefetch}
                    await ws.send(orjson.dumps(sub).decode())
                    running: set[asyncio.Task[None]] = set()
                    async for raw in ws:
                        frame = orjson.loads(raw)
                        if frame.get("op") == "job":
                            task = asyncio.create_task(self._work(ws, frame))
                            running.add(task)
                            task.add_done_callback(running.discard)
            except Exception:  # a broker restart, a refused frame: connect again
                await asyncio.sleep(0.5)

    async def _work(self, ws: Any, frame: dict[str, Any]) -> None:
        self.current = frame["id"]
        rand = self.load.random
        await asyncio.sleep(rand.uniform(*self.spec.work))
        if rand.random() < self.spec.fail:
            reply = {
                "op": "nack",
                "id": frame["id"],
                "token": frame["token"],
                "error": "TimeoutError: upstream timed out",
            }
            self.failed += 1
        else:
            reply = {"op": "ack", "id": frame["id"], "token": frame["token"]}
            self.processed += 1
        with contextlib.suppress(Exception):
            await ws.send(orjson.dumps(reply).decode())
