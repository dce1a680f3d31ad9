"""Delivery: pushes jobs to this process's WebSocket consumers the moment they exist.

One :class:`QueueFeed` per queue with local subscribers. It asks every subscribed connection
how much credit it has, takes that many jobs from Redis in one script call (leased for manual
ack, destructively for auto ack), and deals them out round-robin. When the queue is empty it
waits — on the queue's pub/sub wake-up channel, on credit coming back (acks, drained sockets),
or on a timer for the next delayed job — never in a polling loop. Each process takes only what
its own consumers can hold, so several processes share a queue without a coordinator.

:class:`DeliveryHub` is the per-process registry: connections, queue feeds, broadcast channels,
job-event and stats fan-out, and the figures the process publishes in its heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError

from broker import keys
from broker.frames import AckMode, Lease, Topic
from broker.models import PushOptions, dumps
from broker.stats import LatencyHistogram

if TYPE_CHECKING:
    from broker.connection import Connection
    from broker.runtime import Runtime

log = logging.getLogger("presque.delivery")

MAX_FETCH = 200  # jobs per script call: bounds one call's time in Redis and its reply size
SAFETY_WAKE = 5.0  # an idle feed looks again this often even if no wake-up arrived
RETRY_PAUSE = 0.5  # after a Redis error, before trying again
LIMIT_WAIT = 0.25  # max_inflight reached and no wake-up: look again after this
WATCH_TTL = 10.0  # an advertised event watch lasts this long unless refreshed


class QueueFeed:
    """Delivers one queue's jobs to the local connections subscribed to it."""

    def __init__(self, hub: DeliveryHub, queue: str) -> None:
        self.hub = hub
        self.queue = queue
        self.connections: list[Connection] = []
        self.latency = LatencyHistogram()
        self._wake = asyncio.Event()
        self._next_run_at: float | None = None
        self._rotation = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"presque-feed-{self.queue}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def wake(self) -> None:
        """Look at the queue again soon (credit came back, new work, or a reconnect)."""
        self._wake.set()

    def _on_wake(self, payload: bytes | None) -> None:
        # Payload "0": ready work; a number: a delayed job that will be ready at that time.
        if payload and payload != b"0":
            with contextlib.suppress(ValueError):
                run_at = float(payload)
                if self._next_run_at is None or run_at < self._next_run_at:
                    self._next_run_at = run_at
        self._wake.set()

    async def _run(self) -> None:
        channel = keys.wake_channel(self.queue)
        await self.hub.runtime.notifier.subscribe(channel, self._on_wake)
        try:
            while self.connections:
                self._wake.clear()
                try:
                    delivered, wait = await self._deliver_once()
                except (RedisError, OSError) as exc:
                    log.warning("delivery on %s paused: redis unavailable (%s)", self.queue, exc)
                    self.hub.tell_unavailable(self.connections)
                    delivered, wait = False, RETRY_PAUSE
                if delivered:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
        finally:
            await self.hub.runtime.notifier.unsubscribe(channel, self._on_wake)

    async def _deliver_once(self) -> tuple[bool, float]:
        """One fetch for the connections with credit. Returns (delivered anything, how long to wait)."""
        wanted: dict[tuple[bool, float], int] = {}
        for conn in self.connections:
            sub = conn.session.subscriptions.get(self.queue)
            credit = conn.session.credit(self.queue)
            if sub is None or credit <= 0:
                continue
            manual = sub.ack_mode is AckMode.MANUAL
            group = (manual, sub.lease if manual else 0.0)
            wanted[group] = wanted.get(group, 0) + credit
        if not wanted:
            return False, SAFETY_WAKE
        delivered = False
        wait = SAFETY_WAKE
        for (manual, lease), count in wanted.items():
            result = await self.hub.runtime.queues.fetch(self.queue, count=min(count, MAX_FETCH), lease=lease)
            if result.jobs:
                delivered = True
                self._deal(result.jobs, manual)
                continue
            if result.paused:
                continue  # resume publishes a wake-up
            if result.limited:
                wait = min(wait, result.retry_in if result.retry_in is not None else LIMIT_WAIT)
            elif not result.empty:
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

    def _deal(self, jobs: list[Any], manual: bool) -> None:
        """Hand jobs out round-robin to the connections with credit; give back what none took."""
        conns = [c for c in self.connections if self._takes(c, manual)]
        leftovers: list[Lease] = []
        orphans: list[bytes] = []
        events: list[tuple[str, str, bytes | None]] = []
        for job in jobs:
            self.latency.record(job.latency)
            taken = False
            for _ in range(len(conns)):
                conn = conns[self._rotation % len(conns)]
                self._rotation += 1
                if conn.session.credit(self.queue) > 0 and conn.deliver(job):
                    taken = True
                    break
            if taken:
                events.append((job.id, "delivered", dumps({"attempt": job.attempt})))
            elif job.token:
                leftovers.append(Lease(self.queue, job.id, job.token))
            else:
                orphans.append(job.body)
        if leftovers:
            self.hub.release_soon(self.queue, leftovers)
        if orphans:
            # Taken destructively for an auto-ack consumer that went away meanwhile (a rare
            # race): push the bodies back rather than lose them.
            self.hub.spawn(self.hub.runtime.queues.push_many(self.queue, [(b, PushOptions()) for b in orphans]))
        if events:
            self.hub.emit_events(self.queue, events)

    def _takes(self, conn: Connection, manual: bool) -> bool:
        sub = conn.session.subscriptions.get(self.queue)
        return sub is not None and (sub.ack_mode is AckMode.MANUAL) == manual


class DeliveryHub:
    """This process's WebSocket side: connections, queue feeds, channels, events and stats."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.connections: set[Connection] = set()
        self.feeds: dict[str, QueueFeed] = {}
        self._channels: dict[str, set[Connection]] = {}
        self._event_watchers: dict[str, set[Connection]] = {}  # queue or "*" -> connections
        self._stats_watchers: set[Connection] = set()
        self._relays: dict[str, Callable[[bytes | None], None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watched: set[str] = set()  # queues (or "*") someone watches, on any process
        self._stats_task: asyncio.Task[None] | None = None
        self.shutting_down = False

    # -- background helpers -------------------------------------------------------------------------

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background, keeping a reference until it is done."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def release_soon(self, queue: str, leases: Iterable[Lease]) -> None:
        """Return jobs to their queue at once (not a failure); errors leave them to lease expiry."""
        items = [(lease.id, lease.token) for lease in leases]
        if items:
            self.spawn(self._release(queue, items))

    async def _release(self, queue: str, items: list[tuple[str, str]]) -> None:
        try:
            await self.runtime.queues.release(queue, items)
        except (RedisError, OSError) as exc:
            log.warning("could not release %d jobs of %s (lease expiry will return them): %s", len(items), queue, exc)

    def tell_unavailable(self, connections: Iterable[Connection]) -> None:
        for conn in connections:
            conn.tell_unavailable()

    # -- subscriptions ------------------------------------------------------------------------------

    def subscribed(self, conn: Connection, queue: str) -> None:
        """``conn`` now has a confirmed subscription to ``queue``: start or wake its feed."""
        feed = self.feeds.get(queue)
        if feed is None or feed._task is None or feed._task.done():
            feed = self.feeds[queue] = QueueFeed(self, queue)
            feed.connections.append(conn)
            feed.start()
        else:
            feed.connections.append(conn)
            feed.wake()

    def unsubscribed(self, conn: Connection, queue: str) -> None:
        feed = self.feeds.get(queue)
        if feed is None:
            return
        with contextlib.suppress(ValueError):
            feed.connections.remove(conn)
        if not feed.connections:
            feed.wake()  # its loop ends on its own
            del self.feeds[queue]

    def credit_returned(self, queue: str) -> None:
        feed = self.feeds.get(queue)
        if feed is not None:
            feed.wake()

    def all_credit_returned(self, conn: Connection) -> None:
        for queue in conn.session.subscriptions:
            self.credit_returned(queue)

    # -- broadcast channels -------------------------------------------------------------------------

    async def listen(self, conn: Connection, channel: str) -> None:
        members = self._channels.setdefault(channel, set())
        members.add(conn)
        if len(members) == 1:
            await self.runtime.notifier.subscribe(keys.message_channel(channel), self._relay(channel))

    def _relay(self, channel: str) -> Callable[[bytes | None], None]:
        def relay(payload: bytes | None) -> None:
            if payload is None:
                return
            for conn in list(self._channels.get(channel, ())):
                conn.relay_message(channel, payload)

        self._relays[channel] = relay
        return relay

    async def unlisten(self, conn: Connection, channel: str) -> None:
        members = self._channels.get(channel)
        if not members or conn not in members:
            return
        members.discard(conn)
        if not members:
            del self._channels[channel]
            relay = self._relays.pop(channel, None)
            if relay is not None:
                await self.runtime.notifier.unsubscribe(keys.message_channel(channel), relay)

    async def publish(self, channel: str, data_json: bytes) -> None:
        await self.runtime.redis.publish(keys.message_channel(channel), data_json)

    # -- job events ----------------------------------------------------------------------------------

    async def watch_events(self, conn: Connection, queue: str | None) -> None:
        name = queue or "*"
        members = self._event_watchers.setdefault(name, set())
        members.add(conn)
        if len(members) == 1:
            await self.runtime.notifier.subscribe(keys.events_channel(name), self._on_events)
            await self._advertise_watches()

    async def unwatch_events(self, conn: Connection, queue: str | None) -> None:
        name = queue or "*"
        members = self._event_watchers.get(name)
        if not members or conn not in members:
            return
        members.discard(conn)
        if not members:
            del self._event_watchers[name]
            await self.runtime.notifier.unsubscribe(keys.events_channel(name), self._on_events)

    def _on_events(self, payload: bytes | None) -> None:
        if payload is None:
            return
        batch = orjson.loads(payload)
        queue = batch["queue"]
        for conn in list(self._event_watchers.get(queue, ())) + list(self._event_watchers.get("*", ())):
            for job_id, event, data in batch["events"]:
                conn.relay_event(queue, job_id, event, dumps(data) if data is not None else None)

    async def _advertise_watches(self) -> None:
        """Tell every process which queues are watched (so they publish events), for 10 s."""
        expires = time.time() + WATCH_TTL
        names = list(self._event_watchers)
        if names:
            with contextlib.suppress(RedisError, OSError):
                await self.runtime.redis.hset(keys.WATCHED, mapping={n: str(expires) for n in names})

    async def refresh_watched(self) -> None:
        """Re-advertise our watches and learn everyone's (called by the heartbeat)."""
        await self._advertise_watches()
        raw = await self.runtime.redis.hgetall(keys.WATCHED)
        now = time.time()
        watched, stale = set(), []
        for name, expires in raw.items():
            text = name.decode() if isinstance(name, bytes) else name
            if float(expires) > now:
                watched.add(text)
            else:
                stale.append(name)
        if stale:
            await self.runtime.redis.hdel(keys.WATCHED, *stale)
        self._watched = watched

    def emit_events(self, queue: str, events: list[tuple[str, str, bytes | None]]) -> None:
        """Publish job lifecycle events, only while someone (on any process) watches the queue."""
        if queue not in self._watched and "*" not in self._watched:
            return
        items = [(job_id, event, orjson.loads(data) if data is not None else None) for job_id, event, data in events]
        payload = dumps({"queue": queue, "events": items})
        for name in (queue, "*"):
            if name in self._watched:
                self.spawn(self._publish_quietly(keys.events_channel(name), payload))

    async def _publish_quietly(self, channel: str, payload: bytes) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.runtime.redis.publish(channel, payload)

    # -- stats feed ----------------------------------------------------------------------------------

    def watch_stats(self, conn: Connection) -> None:
        self._stats_watchers.add(conn)
        if self._stats_task is None or self._stats_task.done():
            self._stats_task = asyncio.create_task(self._stats_loop(), name="presque-stats-feed")

    def unwatch_stats(self, conn: Connection) -> None:
        self._stats_watchers.discard(conn)

    async def _stats_loop(self) -> None:
        interval = self.runtime.settings.websocket.stats_interval
        while self._stats_watchers:
            try:
                snapshot = dumps(await self.runtime.stats.snapshot())
            except (RedisError, OSError) as exc:
                log.debug("stats snapshot failed: %s", exc)
                self.tell_unavailable(self._stats_watchers)
            else:
                for conn in list(self._stats_watchers):
                    conn.relay_stats(snapshot)
            await asyncio.sleep(interval)

    # -- connections and figures ---------------------------------------------------------------------

    def connected(self, conn: Connection) -> None:
        self.connections.add(conn)

    async def disconnected(self, conn: Connection) -> None:
        """Forget ``conn`` everywhere; its in-flight jobs are released by the connection."""
        self.connections.discard(conn)
        for queue in list(conn.session.subscriptions):
            self.unsubscribed(conn, queue)
        for channel in list(conn.session.channels):
            await self.unlisten(conn, channel)
        for topic, watched in list(conn.session.watches):
            if topic is Topic.EVENTS:
                await self.unwatch_events(conn, watched)
        self.unwatch_stats(conn)

    def figures(self) -> dict[str, Any]:
        """What this process reports in its heartbeat: connections, consumers, latency."""
        consumers = {q: len(f.connections) for q, f in self.feeds.items()}
        return {
            "connections": len(self.connections),
            "consumers": sum(consumers.values()),
            "consumers_by_queue": consumers,
            "latency": {q: f.latency.counts for q, f in self.feeds.items() if sum(f.latency.counts)},
        }

    def rotate_latency(self) -> None:
        """Start a new latency window (the heartbeat reports the last one)."""
        for feed in self.feeds.values():
            feed.latency = LatencyHistogram()

    async def shutdown(self) -> None:
        """Graceful stop: no more deliveries, ``shutdown`` frames, every lease returned, close 1001."""
        self.shutting_down = True
        await asyncio.gather(*(conn.shut_down() for conn in list(self.connections)), return_exceptions=True)
        for feed in list(self.feeds.values()):
            await feed.stop()
        if self._stats_task is not None:
            self._stats_task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
