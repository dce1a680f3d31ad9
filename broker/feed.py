"""QueueFeed: pushes one queue's jobs to this process's WebSocket consumers the moment they exist.

A feed asks every subscribed connection how much credit it has, takes that many jobs from Redis
in one script call (leased for manual ack, destructively for auto ack), and deals them out
round-robin. When the queue is empty it waits — on the queue's pub/sub wake-up channel, on credit
coming back (acks, drained sockets), or on a timer for the next delayed job — never in a polling
loop. Each process takes only what its own consumers can hold, so several processes share a queue
without a coordinator, and Redis's atomic fetch script guarantees no job goes to two of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from broker import keys
from broker.frames import AckMode, Lease
from broker.models import Delivery, PushOptions, dumps
from broker.stats import LatencyHistogram

if TYPE_CHECKING:
    from broker.connection import Connection
    from broker.delivery import DeliveryHub

log = logging.getLogger("presque.feed")

MAX_FETCH = 200  # jobs per script call: bounds one call's time in Redis and its reply size
SAFETY_WAKE = 5.0  # an idle feed looks again this often even if no wake-up arrived
RETRY_PAUSE = 0.5  # after a Redis error, before trying again
LIMIT_WAIT = 0.25  # max_inflight reached and no wake-up: look again after this
CLOSE_TIMEOUT = 5.0  # close(): how long the fetch in progress may take before the feed is cancelled
FRAME_OVERHEAD = 160  # bytes of a job frame besides its body (op, queue, id, token, attempt)

Group = tuple[bool, float]  # (manual ack, lease seconds): subscriptions one fetch can serve


class QueueFeed:
    """Delivers one queue's jobs to the local connections subscribed to it.

    Args:
        hub: the process's delivery hub (runtime, event emission, background tasks).
        queue: the queue's name.
    """

    def __init__(self, hub: DeliveryHub, queue: str) -> None:
        self.hub = hub
        self.queue = queue
        self.connections: list[Connection] = []
        self.latency = LatencyHistogram()
        self._wake = asyncio.Event()
        # The last look found the queue empty (or paused) and no wake-up came since: credit coming
        # back cannot make a fetch succeed, as whatever refills the queue publishes a wake-up.
        self._drained = False
        self._closing = False
        self._next_run_at: float | None = None
        self._rotation = 0
        self._frame_size = FRAME_OVERHEAD  # running estimate of a job frame's size, in bytes
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"presque-feed-{self.queue}")

    async def close(self) -> None:
        """Stop after the fetch in progress; jobs it took for closing connections are released."""
        self._closing = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), CLOSE_TIMEOUT)
        except TimeoutError:
            self._task.cancel()
        except Exception:  # the loop logged it
            pass

    def wake(self) -> None:
        """Look at the queue again soon: new work, a new subscriber, a reconnect."""
        self._drained = False
        self._wake.set()

    def credit_returned(self) -> None:
        """A consumer acked, nacked or drained its socket: look again unless the queue is known empty."""
        if not self._drained:
            self._wake.set()

    def _on_wake(self, payload: bytes | None) -> None:
        # Payload "0": ready work; a number: a delayed job that will be ready at that time.
        if payload and payload != b"0":
            with contextlib.suppress(ValueError):
                run_at = float(payload)
                if self._next_run_at is None or run_at < self._next_run_at:
                    self._next_run_at = run_at
        self.wake()

    async def _run(self) -> None:
        channel = keys.wake_channel(self.queue)
        # Subscribed (and confirmed) before the first fetch: a push after that fetch wakes us.
        await self.hub.runtime.notifier.subscribe(channel, self._on_wake)
        try:
            while self.connections and not self._closing:
                self._wake.clear()
                try:
                    delivered, wait = await self._deliver_once()
                except (RedisError, OSError) as exc:
                    log.warning("delivery on %s paused: redis unavailable (%s)", self.queue, exc)
                    self.hub.tell_unavailable(self.connections)
                    delivered, wait = False, RETRY_PAUSE
                except Exception:
                    log.exception("delivery on %s failed", self.queue)
                    delivered, wait = False, RETRY_PAUSE
                if delivered:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
        finally:
            await self.hub.runtime.notifier.unsubscribe(channel, self._on_wake)

    def _wanted(self) -> dict[Group, int]:
        """Credit per group, the groups in the order of the round-robin: each fetch takes the
        queue's head, so the group fetched first must not always be the same (say, the one of
        the oldest connection), or that group's consumers alone would get the retried jobs."""
        wanted: dict[Group, int] = {}
        start = self._rotation % len(self.connections) if self.connections else 0
        for conn in self.connections[start:] + self.connections[:start]:
            group = self._group(conn)
            credit = self._room(conn)
            if group is not None and credit > 0:
                wanted[group] = wanted.get(group, 0) + credit
        return wanted

    def _room(self, conn: Connection) -> int:
        """The connection's credit, capped by how many job frames its send buffer still holds.

        Without the cap, a consumer whose socket drains slowly would, each time one frame left its
        buffer, have a whole prefetch fetched for it and all but one job handed back: manual jobs
        released (their attempt counted for nothing), auto-ack ones pushed again.
        """
        session = conn.session
        credit = session.credit(self.queue)
        if credit <= 0:
            return 0
        fits = (session.limits.send_buffer - session.send_backlog) // max(self._frame_size, 1)
        return max(1, min(credit, fits))

    def _group(self, conn: Connection) -> Group | None:
        sub = conn.session.subscriptions.get(self.queue)
        if sub is None:
            return None
        manual = sub.ack_mode is AckMode.MANUAL
        return manual, sub.lease if manual else 0.0

    async def _deliver_once(self) -> tuple[bool, float]:
        """One fetch per group with credit. Returns (delivered anything, how long to wait)."""
        wanted = self._wanted()
        if not wanted:
            return False, SAFETY_WAKE
        delivered = False
        wait = SAFETY_WAKE
        for group, count in wanted.items():
            result = await self.hub.runtime.queues.fetch(self.queue, count=min(count, MAX_FETCH), lease=group[1])
            if result.jobs:
                self._deal(result.jobs, group)
                if result.more:
                    delivered = True
                    continue
                # No ready job left: wait for a wake-up rather than fetch again only to hear it.
                self._drained = not self._wake.is_set()
            elif result.paused or result.empty:
                self._drained = not self._wake.is_set()  # a wake-up during the fetch: look again
            if result.paused:
                continue  # resume publishes a wake-up
            if result.limited:
                wait = min(wait, result.retry_in if result.retry_in is not None else LIMIT_WAIT)
            elif not result.empty and not result.jobs:
                delivered = True  # every job popped had expired: look again at once
            if result.next_run_at is not None:
                self._next_run_at = min(self._next_run_at or result.next_run_at, result.next_run_at)
        if self._next_run_at is not None:
            until = self._next_run_at - time.time()
            if until <= 0:
                self._next_run_at = None
                return True, 0.0
            wait = min(wait, until + 0.001)
        return delivered, wait

    def _deal(self, jobs: list[Delivery], group: Group) -> None:
        """Hand jobs out round-robin to the group's connections with credit; give back what none took."""
        self._drained = False
        conns = [c for c in self.connections if self._group(c) == group]
        leftovers: list[Lease] = []
        orphans: list[bytes] = []
        events: list[tuple[str, str, bytes | None]] = []
        for job in jobs:
            self.latency.record(job.latency)
            self._frame_size += (len(job.body) + FRAME_OVERHEAD - self._frame_size) // 8
            taken = False
            for _ in range(len(conns)):
                conn = conns[self._rotation % len(conns)]
                self._rotation += 1
                if conn.session.credit(self.queue) > 0 and conn.deliver(job):
                    taken = True
                    break
            if not taken and not job.token:
                # Taken destructively: better a little over a subscriber's send buffer (the frame
                # estimate was off) than pushing the job again under a new id.
                taken = any(conn.deliver(job) for conn in conns)
            if taken:
                events.append((job.id, "delivered", dumps({"attempt": job.attempt})))
            elif job.token:
                leftovers.append(Lease(self.queue, job.id, job.token))
            else:
                orphans.append(job.body)
        if leftovers:
            self.hub.release_soon(self.queue, leftovers)
        if orphans:
            # Taken destructively for auto-ack consumers that all went away meanwhile (a rare
            # race): push the bodies back rather than lose them.
            self.hub.spawn(self.hub.runtime.queues.push_many(self.queue, [(b, PushOptions()) for b in orphans]))
        if events:
            self.hub.emit_events(self.queue, events)
