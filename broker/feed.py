"""QueueFeed: pushes one queue's jobs to this process's WebSocket consumers the moment they exist.

A feed knows, per group of subscriptions one fetch can serve, which connections have credit and
how much in all (a :class:`~broker.ring.CreditRing`, kept up to date as credit is spent and comes
back), takes that many jobs from Redis in one script call (leased for manual ack, destructively for
auto ack), and deals them out round-robin: a wake-up costs time in proportion to the jobs it
moves, not to the connections subscribed. When the queue is empty it waits — on the queue's
pub/sub wake-up channel, on credit coming back (acks, drained sockets), or on a timer for the next
delayed job — never in a polling loop. Each process takes only what its own consumers can hold, so
several processes share a queue without a coordinator, and Redis's atomic fetch script guarantees
no job goes to two of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from broker import keys
from broker.commands import AckMode, Lease
from broker.models import Delivery, PushOptions, dumps
from broker.ring import CreditRing
from broker.stats import LatencyHistogram

if TYPE_CHECKING:
    from broker.connection import Connection
    from broker.delivery import DeliveryHub
    from broker.queue import FetchResult

log = logging.getLogger("presque.feed")

MAX_FETCH = 200  # jobs per script call: bounds one call's time in Redis and its reply size
SAFETY_WAKE = 5.0  # an idle feed looks again this often even if no wake-up arrived
RETRY_PAUSE = 0.5  # after a Redis error, before trying again
LIMIT_WAIT = 0.25  # max_inflight reached and no wake-up: look again after this
CLOSE_TIMEOUT = 5.0  # close(): how long the fetch in progress may take before the feed is cancelled
# Every subscriber's credit is looked at again, a few at each pass, over this long: in case a change
# went unreported (every one that raises credit is reported today: this bounds what a missed
# report would cost, without a pause to walk 10,000 connections at once).
RESYNC_EVERY = 10.0
SWEEP_MAX = 1000  # subscribers looked at in one pass: after a quiet spell the sweep catches up slowly
FRAME_OVERHEAD = 160  # bytes of a job frame besides its body (op, queue, id, token, attempt)

Group = tuple[bool, float]  # (manual ack, lease seconds): subscriptions one fetch can serve


@dataclass(frozen=True, slots=True)
class Claim:
    """Leave to a push the fetch for ``group``: take up to ``count`` jobs in the push's own call."""

    group: Group
    count: int

    @property
    def lease(self) -> float:
        return self.group[1]


class QueueFeed:
    """Delivers one queue's jobs to the local connections subscribed to it.

    Args:
        hub: the process's delivery hub (runtime, event emission, background tasks).
        queue: the queue's name.
    """

    def __init__(self, hub: DeliveryHub, queue: str) -> None:
        self.hub = hub
        self.queue = queue
        self.connections: dict[Connection, Group] = {}  # every subscriber, in subscription order
        self._groups: dict[Group, CreditRing[Connection]] = {}
        # Subscribers whose credit may have grown since their last look: looked at before the next
        # fetch, once each however many acks they sent meanwhile.
        self._reported: set[Connection] = set()
        self._sweep: list[Connection] = []  # the subscribers of the resync under way, by position
        self._swept = 0
        self._due = 0.0  # looks owed, with the fraction carried over
        self._swept_at = time.monotonic()
        self.latency = LatencyHistogram()
        self._wake = asyncio.Event()
        # The last look found the queue empty (or paused) and no wake-up came since: credit coming
        # back cannot make a fetch succeed, as whatever refills the queue publishes a wake-up.
        self._drained = False
        self._closing = False
        self._next_run_at: float | None = None
        self._turn = 0  # which group fetches first
        self._frame_size = FRAME_OVERHEAD  # running estimate of a job frame's size, in bytes
        self._task: asyncio.Task[None] | None = None
        self._listening = False  # subscribed to the wake-up channel: what a fetch misses wakes us
        self._fetching = False  # a fetch of ours is under way: its credit is spoken for
        # A push's call is taking jobs for us (claim): our fetches wait for it to be settled.
        self._claimed: asyncio.Future[None] | None = None

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

    def add(self, conn: Connection) -> None:
        """``conn``'s subscription to the queue is confirmed: deal to it from now on."""
        group = self._group(conn)
        if group is None or conn in self.connections:
            return
        self.connections[conn] = group
        ring = self._groups.get(group)
        if ring is None:
            ring = self._groups[group] = CreditRing(self._room)
        ring.add(conn)
        self.wake()

    def remove(self, conn: Connection) -> None:
        """``conn`` unsubscribed or went away (the jobs it held are its connection's to release)."""
        group = self.connections.pop(conn, None)
        if group is None:
            return
        self._reported.discard(conn)
        ring = self._groups[group]
        ring.remove(conn)
        if not ring.members:
            del self._groups[group]

    def credit_returned(self, conn: Connection) -> None:
        """``conn`` acked, nacked or drained its socket: count its credit again before the next
        fetch, and look at the queue again unless it is known empty."""
        if conn in self.connections:
            self._reported.add(conn)
            if not self._drained:
                self._wake.set()

    def claim(self) -> Claim | None:
        """Let a push of this process take jobs for a group of our subscribers with credit.

        When our subscribers wait for work (no fetch of ours under way), a push to the queue can
        take jobs from its head in the same script call (``QueueService.push_fetch``): the
        wake-up it would publish and the fetch that would follow are saved, two of three round
        trips to Redis. None when a fetch is under way or nobody has credit; otherwise the caller
        must :meth:`settle` the claim, whatever happens to its call.
        """
        # Only while drained (our last look found nothing ready): that is when a job would wait
        # for the wake-up round trip. Under load the feed's own fetches run alongside pushes, and
        # a claim, which holds them back until its push returns, cost 18 % more broker CPU per
        # job end to end (docs/performance.md).
        if self._claimed is not None or self._fetching or self._closing or not self._listening or not self._drained:
            return None
        self._look_at_reported()
        for group, ring in self._wanted():
            self._claimed = asyncio.get_running_loop().create_future()
            return Claim(group, min(ring.total, MAX_FETCH))
        return None

    def settle(self, claim: Claim, result: FetchResult | None) -> None:
        """The push of ``claim`` is done: deal what it took as if our own fetch had, or (None:
        the call failed) look at the queue again."""
        claimed, self._claimed = self._claimed, None
        if claimed is not None and not claimed.done():
            claimed.set_result(None)
        if result is None:
            self.wake()
            return
        if result.jobs:
            # As from our fetch: jobs nobody can take now (their subscriber gone) are released.
            self._deal(result.jobs, claim.group)
        if result.next_run_at is not None and (self._next_run_at is None or result.next_run_at < self._next_run_at):
            self._next_run_at = result.next_run_at
            self.wake()  # the loop's wait must end by then
        elif result.paused or ((result.jobs or result.empty) and not result.more):
            # Nothing ready left (or paused: resume publishes a wake-up), as after our fetch.
            self._drained = not self._wake.is_set()
        else:
            # Ready jobs left, a limit reached, or expired jobs popped: our loop's fetch knows
            # what to make of each.
            self.wake()

    def credit(self) -> dict[Group, int]:
        """The credit of each group of subscribers, as the next fetch will count it."""
        self._look_at_reported()
        return {group: ring.total for group, ring in self._groups.items()}

    def _look_at_reported(self) -> None:
        reported, self._reported = self._reported, set()
        for conn in reported:
            self._groups[self.connections[conn]].look(conn)

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
        self._listening = True
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
                # asyncio.timeout, not wait_for: wait_for (3.11) wraps the wait in a task of its
                # own, one more turn of the loop between a wake-up and the fetch.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
        finally:
            self._listening = False
            await self.hub.runtime.notifier.unsubscribe(channel, self._on_wake)

    def _wanted(self) -> list[tuple[Group, CreditRing[Connection]]]:
        """The groups with credit, in turn: each fetch takes the queue's head, so the group fetched
        first must not always be the same (say, the one of the oldest connection), or that group's
        consumers alone would get the retried jobs."""
        rings = [(group, ring) for group, ring in self._groups.items() if ring.total > 0]
        if len(rings) > 1:
            start = self._turn % len(rings)
            self._turn += 1
            rings = rings[start:] + rings[:start]
        return rings

    def _resync(self) -> None:
        """Look again at the share of the subscribers the time since the last pass makes due."""
        now = time.monotonic()
        if self._swept >= len(self._sweep):
            self._sweep, self._swept = list(self.connections), 0
        self._due = min(self._due + len(self._sweep) * (now - self._swept_at) / RESYNC_EVERY, len(self._sweep))
        self._swept_at = now
        due = min(int(self._due), SWEEP_MAX)
        self._due -= due
        for conn in self._sweep[self._swept : self._swept + due]:
            group = self.connections.get(conn)
            if group is not None:
                self._groups[group].look(conn)
        self._swept += due
        if self._swept >= len(self._sweep):
            self._sweep = []  # a departed connection is held by the sweep for one resync at most

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
        while self._claimed is not None:
            # A push is taking jobs for our subscribers: count their credit once it is dealt.
            await asyncio.shield(self._claimed)
            if self._closing or not self.connections:
                return False, 0.0  # the loop ends
        self._fetching = True
        try:
            return await self._fetch_all()
        finally:
            self._fetching = False

    async def _fetch_all(self) -> tuple[bool, float]:
        self._look_at_reported()
        self._resync()
        rings = self._wanted()
        if not rings:
            return False, SAFETY_WAKE
        delivered = False
        wait = SAFETY_WAKE
        for group, ring in rings:
            if ring.total <= 0:  # spent, or its subscribers gone, during an earlier group's fetch
                continue
            result = await self.hub.runtime.queues.fetch(self.queue, count=min(ring.total, MAX_FETCH), lease=group[1])
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
        ring = self._groups.get(group)
        leftovers: list[Lease] = []
        orphans: list[bytes] = []
        events: list[tuple[str, str, bytes | None]] = []
        dealt: set[Connection] = set()
        for job in jobs:
            self.latency.record(job.latency)
            self._frame_size += (len(job.body) + FRAME_OVERHEAD - self._frame_size) // 8
            taken = ring is not None and self._give(ring, job, dealt)
            if not taken and not job.token and ring is not None:
                # Taken destructively: better a little over a subscriber's send buffer (the frame
                # estimate was off) than pushing the job again under a new id.
                taken = self._give_any(ring, job, dealt)
            if taken:
                events.append((job.id, "delivered", dumps({"attempt": job.attempt})))
            elif job.token:
                leftovers.append(Lease(self.queue, job.id, job.token))
            else:
                orphans.append(job.body)
        if ring is not None:
            for conn in dealt:  # what they have left, once each
                ring.look(conn)
        for conn in dealt:
            # Sent now, ahead of the rest of this step: the reply to the push that took them, say.
            conn.flush()
        if leftovers:
            self.hub.release_soon(self.queue, leftovers)
        if orphans:
            # Taken destructively for auto-ack consumers that all went away meanwhile (a rare
            # race): push the bodies back rather than lose them.
            self.hub.spawn(self.hub.runtime.queues.push_many(self.queue, [(b, PushOptions()) for b in orphans]))
        if events:
            self.hub.emit_events(self.queue, events)

    @staticmethod
    def _give_any(ring: CreditRing[Connection], job: Delivery, dealt: set[Connection]) -> bool:
        """Deliver ``job`` to the first member that takes it, credit or not; False if none did."""
        for conn in ring.members:
            if conn.deliver(job):
                dealt.add(conn)
                return True
        return False

    def _give(self, ring: CreditRing[Connection], job: Delivery, dealt: set[Connection]) -> bool:
        """Deliver ``job`` to the next connection in turn that takes it; False if none did.

        The ring counts what the connections dealt to have left only after the deal (``dealt``):
        meanwhile one that ran out of credit is dropped when its turn comes back.
        """
        # Each failed turn drops a connection from the ring: the loop ends.
        while (conn := ring.take()) is not None:
            if conn.session.credit(self.queue) > 0 and conn.deliver(job):
                dealt.add(conn)
                return True
            ring.drop(conn)
        return False
