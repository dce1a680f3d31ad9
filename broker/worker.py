"""``broker.Worker``: subclass it, implement ``work``, and it runs.

A worker holds one WebSocket to the broker (:class:`~broker.Client`), subscribes to its queues
with manual ack and ``prefetch = concurrency``, runs ``work(job)`` for each job (an ``async def``
on the event loop, a plain ``def`` in a thread pool), acks with the return value as the result,
or nacks with ``"ExceptionType: message"`` and lets the broker's backoff and dead-letter rules
decide. Processes, signals and the command line live in :mod:`broker.worker_runner`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from broker.client import DEFAULT_URL, Client
from broker.errors import BrokerError, Unavailable
from broker.job import Job, JobChannel
from broker.link import Subscription

__all__ = ["Job", "Worker"]

log = logging.getLogger("presque.worker")

HEARTBEAT = 10.0  # seconds between registrations (the broker forgets a worker after 60 s)


class Worker:
    """Base class of presque workers.

    Subclass it and set ``queues`` (in priority order: when jobs of several queues are waiting,
    the earliest queue's run first) and ``concurrency``; implement ``work(job)``, optionally
    ``fail(job, error)``, ``setup()`` and ``teardown()`` (each ``async def`` or plain ``def``).
    Run it with ``presque worker module:Class`` or :meth:`run`.

    Args:
        url: the broker (default ``http://127.0.0.1:5000``).
        token: bearer token, when the broker requires one.
        queues: overrides the class's ``queues``.
        concurrency: overrides the class's ``concurrency``.
        grace: seconds running jobs get to finish after SIGTERM/SIGINT (default 30).
        lease: seconds of each job's lease; renewed automatically while ``work`` runs.
    """

    queues: ClassVar[Sequence[str]] = ()
    concurrency: int = 1
    lease: float = 30.0
    grace: float = 30.0
    priority_wait: float = 0.05
    name: str | None = None

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        queues: Sequence[str] | None = None,
        concurrency: int | None = None,
        grace: float | None = None,
        lease: float | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.queue_names: list[str] = list(queues if queues else type(self).queues)
        if not self.queue_names:
            raise ValueError(f"{type(self).__name__} has no queues: set `queues` or pass --queue")
        self.concurrency = int(concurrency or type(self).concurrency)
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.grace = float(type(self).grace if grace is None else grace)
        self.lease = float(lease or type(self).lease)
        self.name = type(self).name or type(self).__name__
        self.id = ""  # name@host:pid, set when it starts (a forked child has its own pid)
        self.processed = 0
        self.failed = 0
        self.client: Client | None = None
        self.channel: JobChannel | None = None
        self._async_work = inspect.iscoroutinefunction(self.work)
        self._buffer: list[deque[Job]] = [deque() for _ in self.queue_names]
        self._held: list[list[Any]] = []  # [queue index, timer] of slots kept for a queue
        self._running: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._settling: set[asyncio.Task[None]] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._draining = False
        self._redis_down = False
        self._registered: bool | None = None

    # -- to override --------------------------------------------------------------------------------

    async def work(self, job: Job) -> Any:
        """Process one job; return a JSON-able result (sent with the ack) or raise to fail it."""
        raise NotImplementedError("implement work(job) in your Worker subclass")

    async def fail(self, job: Job, error: BaseException) -> None:
        """Called after ``work`` raised and the job was nacked. Default: nothing."""

    async def setup(self) -> None:
        """Called once before the first job (open connections, load models...)."""

    async def teardown(self) -> None:
        """Called once after the last job."""

    # -- running ------------------------------------------------------------------------------------

    def run(self, *, processes: int = 1) -> int:
        """Run until SIGTERM/SIGINT (blocking); see :func:`broker.worker_runner.run`. Returns 0."""
        from broker.worker_runner import run

        return run(lambda: self, processes=processes)

    def stop(self) -> None:
        """Stop taking jobs and let the running ones finish within ``grace`` (thread-safe)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def serve(self) -> None:
        """Work until :meth:`stop` is called, then drain: the async core of :meth:`run`."""
        self._loop = asyncio.get_running_loop()
        self.id = f"{self.name}@{socket.gethostname()}:{os.getpid()}"
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()
        if not self._async_work:
            self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"presque-{self.name}")
        await self._call(self.setup)  # if it raises, nothing is connected yet
        self.client = client = Client(self.url, token=self.token, timeout=10.0)
        self.channel = JobChannel(client, self.lease, self._redis_ok)
        client.link.on_error = self._on_broker_error
        heartbeat = asyncio.create_task(self._heartbeat(), name="presque-heartbeat")
        keeper = asyncio.create_task(self._keep_leases(), name="presque-leases")
        try:
            for queue in self.queue_names:
                await client.subscribe(Subscription(queue, self.concurrency, self.lease, self._on_job))
            log.info(
                "worker %s on %s, concurrency %d, broker %s",
                self.id,
                ", ".join(self.queue_names),
                self.concurrency,
                client.url,
            )
            await self._stop.wait()
            await self._drain()
        finally:
            heartbeat.cancel()
            keeper.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(heartbeat, keeper, *self._tasks, return_exceptions=True)
            await self._unregister()
            await client.close()  # the broker returns whatever this connection still holds
            await self._call(self.teardown)
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
            log.info("worker %s stopped: %d processed, %d failed", self.id, self.processed, self.failed)

    # -- jobs ---------------------------------------------------------------------------------------

    def _on_job(self, frame: dict[str, Any], epoch: int) -> None:
        job = Job(frame, epoch, self._progress)
        try:
            index = self.queue_names.index(job.queue)
        except ValueError:
            return
        self._buffer[index].append(job)
        # A slot held for a higher queue is given to this job if it is from such a queue.
        for held in [h for h in self._held if h[0] >= index][:1]:
            self._release_slot(held)
        self._schedule()

    def _schedule(self) -> None:
        while not self._draining and len(self._running) + len(self._held) < self.concurrency:
            index = next((i for i, b in enumerate(self._buffer) if b), None)
            if index is None:
                return
            job = self._buffer[index].popleft()
            self._running[job.id] = job
            task = asyncio.create_task(self._run(job), name=f"presque-job-{job.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, job: Job) -> None:
        try:
            if self._async_work:
                result = await self.work(job)
            else:
                assert self._loop is not None
                result = await self._loop.run_in_executor(self._executor, self.work, job)
        except Exception as exc:
            self.failed += 1
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.warning("job %s/%s (attempt %d) failed: %s", job.queue, job.id, job.attempt, text)
            log.debug("job %s failed", job.id, exc_info=True)
            self._finish(job, "nack", {"error": text[:4096]})
            try:
                await self._call(self.fail, job, exc)
            except Exception:
                log.exception("fail() raised for job %s", job.id)
        else:
            self.processed += 1
            self._finish(job, "ack", {"result": result})

    def _finish(self, job: Job, op: str, extra: dict[str, Any]) -> None:
        self._running.pop(job.id, None)
        assert self.channel is not None
        task = asyncio.create_task(self.channel.settle(job, op, extra))
        self._settling.add(task)
        task.add_done_callback(self._settled)
        self._hold_slot(job)
        self._schedule()

    def _hold_slot(self, job: Job) -> None:
        """Priority between queues: keep the freed slot for the finished job's queue a moment.

        Its ack gives the broker credit to send that queue's next job; a job of a later queue
        that is waiting (or arrives meanwhile) would otherwise take the slot first, and the
        queues would alternate. The slot is held until a job of the same or an earlier queue
        arrives, or for ``priority_wait`` seconds.
        """
        index = self.queue_names.index(job.queue)
        waiting_earlier = any(self._buffer[i] for i in range(index + 1))
        last = index == len(self.queue_names) - 1
        if self._draining or last or waiting_earlier or self.priority_wait <= 0:
            return
        assert self._loop is not None
        held: list[Any] = [index]
        held.append(self._loop.call_later(self.priority_wait, self._release_slot, held))
        self._held.append(held)

    def _release_slot(self, held: list[Any]) -> None:
        if held in self._held:
            self._held.remove(held)
            held[1].cancel()
            self._schedule()

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        if self._changed is not None:
            self._changed.set()

    def _progress(self, job: Job, data: Any) -> None:
        assert self._loop is not None
        frame = {"op": "progress", "id": job.id, "token": job.token, "data": data}

        def send() -> None:
            if self.client is not None and job._epoch == self.client.link.epoch:
                job._touched = time.monotonic()
                assert self.channel is not None
                task = asyncio.ensure_future(self.channel.progress(job, frame, self._is_running))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            send()
        else:
            self._loop.call_soon_threadsafe(send)

    def _is_running(self, job: Job) -> bool:
        return job.id in self._running

    async def _keep_leases(self) -> None:
        """Touch every held job (running or waiting) once a third of its lease has passed."""
        every = self.lease / 3
        while True:
            await asyncio.sleep(max(0.05, min(1.0, every / 4)))
            now = time.monotonic()
            for job in [*self._running.values(), *(j for b in self._buffer for j in b)]:
                if not job._lost and now - job._touched >= every:
                    job._touched = now
                    assert self.channel is not None
                    task = asyncio.create_task(self.channel.touch(job))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    # -- stopping -----------------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Stop taking jobs, give the running ones ``grace`` seconds, hand back the rest.

        While draining, acks go over HTTP so that the broker sends no new job; a queue is
        unsubscribed (its waiting jobs go back at once) as soon as none of its jobs is running.
        """
        assert self.client is not None and self._changed is not None
        self._draining = True
        if self.channel is not None:
            self.channel.draining = True
        log.info("stopping: %d running, waiting up to %gs for them", len(self._running), self.grace)
        deadline = time.monotonic() + self.grace
        subscribed = set(self.queue_names)
        while True:
            busy = {job.queue for job in self._running.values()}
            if self._settling:
                busy = set(self.queue_names)  # an ack in flight must land before its queue's release
            for queue in sorted(subscribed - busy):
                subscribed.discard(queue)
                self._buffer[self.queue_names.index(queue)].clear()
                with contextlib.suppress(BrokerError):
                    await self.client.link.unsubscribe(queue)
            if not self._running and not self._settling:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning(
                    "grace period over: abandoning %d running jobs (they go back to the queue)", len(self._running)
                )
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    # -- registration and broker state --------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What the worker registry shows: host, pid, figures and the jobs running now."""
        current = [f"{job.queue}/{job.id}" for job in self._running.values()]
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "processed": self.processed,
            "failed": self.failed,
            "current": current or None,
            "concurrency": self.concurrency,
            "name": self.name,
        }

    async def _heartbeat(self) -> None:
        assert self.client is not None
        while True:
            try:
                for queue in self.queue_names:
                    await self.client.register_worker(self.id, queue, self.info())
            except BrokerError as exc:
                if self._registered is not False:
                    log.warning("could not register with the broker: %s", exc.message)
                self._registered = False
            else:
                if self._registered is False:
                    log.info("registered with the broker again")
                self._registered = True
                self._redis_ok()
            await asyncio.sleep(HEARTBEAT)

    async def _unregister(self) -> None:
        assert self.client is not None
        for queue in self.queue_names:
            try:
                await asyncio.wait_for(self.client.unregister_worker(self.id, queue), 2.0)
            except (BrokerError, TimeoutError):
                return

    def _on_broker_error(self, exc: BrokerError) -> None:
        if isinstance(exc, Unavailable):
            if not self._redis_down:
                log.warning("the broker reports: %s", exc.message)
            self._redis_down = True
        else:
            log.warning("broker error: %s", exc.message)

    def _redis_ok(self) -> None:
        if self._redis_down:
            self._redis_down = False
            log.info("the broker's Redis is back")

    async def _call(self, fn: Any, *args: Any) -> Any:
        """Call a hook that may be ``async def`` or a plain ``def`` (run in a thread, not one of
        the pool's: after the grace period they may all still be busy)."""
        if inspect.iscoroutinefunction(fn):
            return await fn(*args)
        return await asyncio.to_thread(fn, *args)
