"""Runtime: the live parts of one broker process, shared by HTTP routes and WebSocket sessions.

Created by the app's lifespan (``app.create_app``), stored on ``app.state.runtime``. It owns the
Redis client, the queue service, the pub/sub notifier, the push coalescer and the background
housekeeping; nothing here is a module-level global.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import RedisError

from broker import keys
from broker.batching import Coalescer
from broker.config import Settings
from broker.delivery import DeliveryHub, EventItem
from broker.errors import JobExists, NoJob, QueueClosed
from broker.models import Delivery, PushOptions, dumps, new_job_id
from broker.notify import Notifier
from broker.queue import QueuePolicy, QueueService
from broker.stats import Stats
from broker.workers import WorkerRegistry

log = logging.getLogger("presque.runtime")

LATENCY_WINDOW_BEATS = 30  # the latency figures cover about the last 30 heartbeats
OVERLAP_ITEMS = 100  # a second push call in flight only for this many waiting jobs (performance.md)

PushItem = tuple[bytes, PushOptions, bool]  # body, options, count as failure


class Runtime:
    """One broker process's connection to Redis and its background tasks.

    Args:
        settings: the broker's settings.
        redis: a connected redis.asyncio client (the app creates it from the settings).
    """

    def __init__(self, settings: Settings, redis: Any) -> None:
        self.settings = settings
        self.redis = redis
        q = settings.queues
        self.queues = QueueService(
            redis,
            QueuePolicy(backoff_base=q.backoff_base, backoff_max=q.backoff_max, tombstone_ttl=q.tombstone_ttl),
            limits=q.limit_for,
        )
        self.notifier = Notifier(redis)
        self.workers = WorkerRegistry(redis)
        self.stats = Stats(redis, self.queues, self.workers)
        # The options of a push that sets none, shared by every such push.
        self.push_defaults = PushOptions(priority=q.default_priority, max_attempts=q.max_attempts)
        # A second push call per queue while one runs, for big batches only, and only over the
        # script pipe, which keeps calls in the order they were sent (batching.py).
        self.pusher: Coalescer[PushItem, str] = Coalescer(
            self._flush_pushes,
            max_batch=settings.limits.max_batch,
            max_in_flight=2 if self.queues.pipelined else 1,
            min_overlap=OVERLAP_ITEMS,
        )
        self.acker: Coalescer[tuple[str, str], None] = Coalescer(
            self.queues.ack_many, max_batch=settings.limits.max_batch
        )
        self.delivery = DeliveryHub(self)
        self.process_id = f"{socket.gethostname()}:{os.getpid()}:{new_job_id()[-6:]}"
        self.started_at = time.time()
        self._tasks: list[asyncio.Task[None]] = []
        self.stopping = asyncio.Event()
        self._beats = 0

    async def start(self) -> None:
        """Start the notifier and the housekeeping loop."""
        await self.notifier.start()
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="presque-housekeeping"))

    async def stop(self) -> None:
        """Return every WebSocket's jobs, stop background work."""
        await self.delivery.shutdown()
        self.stopping.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.notifier.stop()
        # Leave the process registry at once (a killed process drops out when its heartbeat is stale).
        with contextlib.suppress(RedisError, OSError):
            await self.redis.hdel(keys.PROCESSES, self.process_id)

    # -- pushing (coalesced) ----------------------------------------------------------------------

    async def push(self, queue: str, body: bytes, opts: PushOptions, *, count_failure: bool = False) -> str:
        """Push one job; concurrent pushes to a queue share one Redis call. Raises JobExists."""
        job_id: str = await self.pusher.submit(f"{int(count_failure)}{queue}", (body, opts, count_failure))
        return job_id

    def push_soon(
        self,
        queue: str,
        body: bytes,
        opts: PushOptions,
        done: Callable[[str | BaseException], None],
        *,
        count_failure: bool = False,
    ) -> None:
        """:meth:`push` without a task to await it: ``done(job_id or exception)`` is called later."""
        self.pusher.submit_soon(f"{int(count_failure)}{queue}", (body, opts, count_failure), done)

    async def push_batch(self, queue: str, bodies: Sequence[bytes], opts: PushOptions) -> list[str]:
        """Push a batch atomically and in order with the queue's other pushes; returns the ids."""
        results = await self.pusher.submit_group(f"0{queue}", [(body, opts, False) for body in bodies])
        ids: list[str] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            ids.append(result)
        return ids

    async def _flush_pushes(self, key: str, items: Sequence[PushItem]) -> list[str | BaseException]:
        queue, count_failure = key[1:], key[0] == "1"
        jobs = [(body, opts) for body, opts, _ in items]
        feed = self.delivery.feeds.get(queue)
        claim = feed.claim() if feed is not None else None
        if feed is None or claim is None:
            results: list[str | BaseException] = list(
                await self.queues.push_many(queue, jobs, count_failure=count_failure)
            )
            self._emit_pushed(queue, results)
            return results
        # This process's subscribers wait for work: the same call takes it for them.
        try:
            pushed, fetched = await self.queues.push_fetch(
                queue, jobs, count=claim.count, lease=claim.lease, count_failure=count_failure
            )
        except BaseException:
            feed.settle(claim, None)
            raise
        results = list(pushed)
        self._emit_pushed(queue, results)
        feed.settle(claim, fetched)
        return results

    def _emit_pushed(self, queue: str, results: list[str | BaseException]) -> None:
        # Emitted here, in the step that reads the reply, and not by each caller once its future
        # has woken it: a fetch whose reply came in the same read (the script pipe carries many
        # calls at once) could otherwise deal the job, and emit "delivered", first.
        pushed: list[EventItem] = [(job_id, "pushed", None) for job_id in results if isinstance(job_id, str)]
        if pushed:
            self.delivery.emit_events(queue, pushed)

    async def ack(self, queue: str, job_id: str, token: str) -> None:
        """Acknowledge one job; concurrent acks on a queue share one Redis call."""
        await self.acker.submit(queue, (job_id, token))

    def ack_soon(self, queue: str, job_id: str, token: str, done: Callable[[BaseException | None], None]) -> None:
        """:meth:`ack` without a task to await it: ``done(None or exception)`` is called later."""
        self.acker.submit_soon(queue, (job_id, token), done)

    # -- taking, with long-poll --------------------------------------------------------------------

    async def take(self, queue: str, *, lease: float, wait: float) -> Delivery:
        """Take one job, waiting up to ``wait`` seconds for one to arrive (HTTP ``GET /q/``).

        Raises:
            NoJob: nothing arrived in time.
            QueueClosed: the queue is paused.
        """
        result = await self.queues.fetch(queue, count=1, lease=lease)
        if result.jobs:
            return result.jobs[0]
        if result.paused:
            raise QueueClosed()
        if wait <= 0:
            if result.empty or result.limited:
                raise NoJob()
            return await self.queues.fetch_one(queue, lease=lease)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        woken = asyncio.Event()

        def wake(_payload: bytes | None) -> None:
            woken.set()

        channel = keys.wake_channel(queue)
        # Subscribe before looking again: a push after that look is then sure to wake us.
        await self.notifier.subscribe(channel, wake)
        try:
            while True:
                woken.clear()
                result = await self.queues.fetch(queue, count=1, lease=lease)
                if result.jobs:
                    return result.jobs[0]
                if result.paused:
                    raise QueueClosed()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise NoJob()
                if not result.empty and not result.limited:
                    continue  # the popped jobs had expired; look again at once
                timeout = remaining
                if result.retry_in is not None:
                    timeout = min(timeout, result.retry_in)
                if result.next_run_at is not None:
                    timeout = min(timeout, max(0.0, result.next_run_at - time.time()) + 0.001)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), timeout)
        finally:
            await self.notifier.unsubscribe(channel, wake)

    # -- housekeeping ------------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        """Every ``reap_interval``: one process (holding a short lock) reaps every queue.

        Any live process may take the lock, so a dead process's leases come back through the
        others. Each queue is one script call, sent in one pipeline.
        """
        interval = self.settings.queues.reap_interval
        while not self.stopping.is_set():
            try:
                await self.heartbeat()
                if await self.redis.set(keys.REAPER_LOCK, self.process_id, nx=True, px=int(interval * 900)):
                    await self.reap_all()
                    await self.stats.record_history(await self.stats.snapshot())
            except (RedisError, OSError) as exc:
                log.debug("housekeeping skipped: %s", exc)
            except Exception:
                log.exception("housekeeping failed")
            # Wake on the interval's boundaries: every process competes for the lock at the same
            # moment, so the history points are taken one per interval, not two in one and none in the next.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval - time.time() % interval)

    async def reap_all(self) -> None:
        """Reap every known queue once (leases, delayed, ttl, tombstones)."""
        for queue in await self.queues.queues():
            while True:
                result = await self.queues.reap(queue)
                if result.lapsed:
                    self.delivery.emit_events(queue, lapsed_events(result.lapsed))
                if not result.more:
                    break

    async def heartbeat(self) -> None:
        """Record this process in the process registry (the dashboard's list of brokers)."""
        info = {
            "id": self.process_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "last_seen": time.time(),
            **self.delivery.figures(),
        }
        await self.redis.hset(keys.PROCESSES, self.process_id, dumps(info))
        await self.delivery.refresh_watched()
        self._beats += 1
        if self._beats % LATENCY_WINDOW_BEATS == 0:
            self.delivery.rotate_latency()


def lapsed_events(lapsed: Sequence[tuple[str, str]]) -> list[EventItem]:
    """The events of jobs whose lease lapsed: what a consumer's nack of each would have emitted."""
    return [
        (job_id, "dead" if outcome == "dead" else "nacked", dumps({"error": "lease expired", "outcome": outcome}))
        for job_id, outcome in lapsed
    ]


__all__ = ["JobExists", "Runtime"]
