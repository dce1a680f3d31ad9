"""DeliveryHub: this process's WebSocket side — connections, queue feeds, channels, events, stats.

One hub per broker process (``runtime.delivery``). It starts a :class:`~broker.feed.QueueFeed` per
queue with local subscribers, fans broadcast channels, job events and the stats feed out to the
connections that asked for them, publishes the figures of the process's heartbeat and shuts the
WebSockets down gracefully.

Job events travel over one Redis channel (``presque:events:*``) and are published only while
someone, on any process, watches the queue (or every queue): each process learns who watches
what from the ``presque:watched`` hash (refreshed by the heartbeat) and, at once, from a message
on the control channel when a watch starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError

from broker import keys
from broker.batching import Coalescer
from broker.commands import Lease, Topic
from broker.feed import QueueFeed
from broker.models import dumps
from broker.redis import publish_many
from broker.stats import LatencyHistogram

if TYPE_CHECKING:
    from broker.connection import Connection
    from broker.runtime import Runtime

log = logging.getLogger("presque.delivery")

ALL = "*"  # the name of "every queue" in event watches
EVENTS_CHANNEL = keys.events_channel(ALL)
WATCH_TTL = 10.0  # an advertised event watch lasts this long unless refreshed by the heartbeat
RELEASE_TIMEOUT = 5.0  # shutdown: how long background releases may take

EventItem = tuple[str, str, bytes | None]  # job id, event, data (JSON) or None


class DeliveryHub:
    """The WebSocket side of one broker process.

    Args:
        runtime: the process's runtime (Redis, queue service, notifier, stats).
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.connections: set[Connection] = set()
        self.feeds: dict[str, QueueFeed] = {}
        self.shutting_down = False
        self._channels: dict[str, set[Connection]] = {}
        self._relays: dict[str, Callable[[bytes | None], None]] = {}
        self._publisher: Coalescer[tuple[str, bytes], None] = Coalescer(self._flush_publishes)
        self._event_watchers: dict[str, set[Connection]] = {}  # queue or ALL -> connections
        self._watched: set[str] = set()  # queues (or ALL) someone watches, on any process
        self._announced: dict[str, float] = {}  # watches heard of on the control channel -> when
        self._event_buffer: list[bytes] = []
        self._flushing_events = False
        self._stats_watchers: set[Connection] = set()
        self._stats_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._shutdown: asyncio.Future[None] | None = None
        runtime.notifier.on_control(self._on_control)

    # -- background helpers -------------------------------------------------------------------------

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background, keeping a reference until it is done."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def release_soon(self, queue: str, leases: Iterable[Lease]) -> None:
        """Return jobs to their queue at once (not a failure); errors leave them to lease expiry."""
        items = [(lease.id, lease.token) for lease in leases]
        if items:
            self.spawn(self.release(queue, items))

    async def release(self, queue: str, items: list[tuple[str, str]]) -> None:
        """Return leased jobs to ``queue`` now; on a Redis error their leases will expire instead."""
        try:
            await self.runtime.queues.release(queue, items)
        except (RedisError, OSError) as exc:
            log.warning("could not return %d jobs to %s (their leases will expire): %s", len(items), queue, exc)

    def tell_unavailable(self, connections: Iterable[Connection]) -> None:
        for conn in list(connections):
            conn.tell_unavailable()

    # -- connections and subscriptions ---------------------------------------------------------------

    def connected(self, conn: Connection) -> None:
        self.connections.add(conn)
        # Credit that comes back as the session lets go of a job (ack, nack, a touch refused as
        # stale) goes straight to the queue's feed, which keeps the count of who has credit.
        conn.session.on_credit = lambda queue: self.credit_returned(conn, queue)

    def disconnected(self, conn: Connection) -> None:
        """Forget ``conn`` everywhere (its held jobs are the connection's to release)."""
        self.connections.discard(conn)
        conn.session.on_credit = None
        for queue in list(conn.session.subscriptions):
            self.unsubscribed(conn, queue)
        for channel in list(self._channels):
            self.unlisten(conn, channel)
        for name in list(self._event_watchers):
            self._drop_event_watcher(conn, name)
        self._stats_watchers.discard(conn)

    def subscribed(self, conn: Connection, queue: str) -> None:
        """``conn`` has a confirmed subscription to ``queue``: start or wake its feed."""
        if self.shutting_down:
            return
        feed = self.feeds.get(queue)
        if feed is None or not feed.running:
            feed = self.feeds[queue] = QueueFeed(self, queue)
            feed.add(conn)
            feed.start()
        else:
            feed.add(conn)

    def unsubscribed(self, conn: Connection, queue: str) -> None:
        feed = self.feeds.get(queue)
        if feed is None:
            return
        feed.remove(conn)
        if not feed.connections:
            feed.wake()  # its loop ends on its own
            del self.feeds[queue]

    def credit_returned(self, conn: Connection, queue: str) -> None:
        """``conn`` may have more credit on ``queue`` than its feed last counted."""
        feed = self.feeds.get(queue)
        if feed is not None:
            feed.credit_returned(conn)

    def all_credit_returned(self, conn: Connection) -> None:
        """``conn``'s send buffer drained below the threshold: its subscriptions have credit again."""
        for queue in conn.session.subscriptions:
            self.credit_returned(conn, queue)

    # -- broadcast channels ---------------------------------------------------------------------------

    async def listen(self, conn: Connection, channel: str) -> None:
        members = self._channels.setdefault(channel, set())
        members.add(conn)
        if channel not in self._relays:
            relay = self._relays[channel] = self._relay(channel)
            await self.runtime.notifier.subscribe(keys.message_channel(channel), relay)

    def _relay(self, channel: str) -> Callable[[bytes | None], None]:
        def relay(payload: bytes | None) -> None:
            if payload is None:  # the pub/sub connection came back: nothing to re-send
                return
            for conn in list(self._channels.get(channel, ())):
                conn.relay_message(channel, payload)

        return relay

    def unlisten(self, conn: Connection, channel: str) -> None:
        members = self._channels.get(channel)
        if not members or conn not in members:
            return
        members.discard(conn)
        if not members:
            del self._channels[channel]
            relay = self._relays.pop(channel, None)
            if relay is not None:
                self.spawn(self.runtime.notifier.unsubscribe(keys.message_channel(channel), relay))

    async def publish(self, channel: str, data_json: bytes) -> None:
        """Broadcast on ``channel``. One ordered stream per process: a connection's messages keep their order."""
        await self._publisher.submit("", (keys.message_channel(channel), data_json))

    async def _flush_publishes(self, _key: str, items: Sequence[tuple[str, bytes]]) -> list[None]:
        await publish_many(self.runtime.redis, items)
        return [None] * len(items)

    # -- job events ------------------------------------------------------------------------------------

    async def watch_events(self, conn: Connection, queue: str | None) -> None:
        """Start relaying ``queue``'s events (every queue's if None) to ``conn``, from every process."""
        name = queue or ALL
        first_anywhere = not self._event_watchers
        members = self._event_watchers.setdefault(name, set())
        members.add(conn)
        if first_anywhere:
            await self.runtime.notifier.subscribe(EVENTS_CHANNEL, self._on_events)
        if name not in self._watched:
            self._watched.add(name)  # this process emits at once; the others hear it below
            with contextlib.suppress(RedisError, OSError):
                await self._advertise_watches()
                await self.runtime.redis.publish(keys.CONTROL_CHANNEL, dumps({"watch": name}))

    def unwatch_events(self, conn: Connection, queue: str | None) -> None:
        self._drop_event_watcher(conn, queue or ALL)

    def _drop_event_watcher(self, conn: Connection, name: str) -> None:
        members = self._event_watchers.get(name)
        if not members or conn not in members:
            return
        members.discard(conn)
        if not members:
            del self._event_watchers[name]
        if not self._event_watchers:
            self.spawn(self.runtime.notifier.unsubscribe(EVENTS_CHANNEL, self._on_events))

    def _on_events(self, payload: bytes | None) -> None:
        if payload is None:
            return
        batch = orjson.loads(payload)
        queue = batch["queue"]
        conns = self._event_watchers.get(queue, set()) | self._event_watchers.get(ALL, set())
        for conn in conns:
            for job_id, event, data in batch["events"]:
                conn.relay_event(queue, job_id, event, None if data is None else dumps(data))

    def _on_control(self, payload: bytes | None) -> None:
        if payload is None:  # the pub/sub connection came back: we may have missed announcements
            self.spawn(self._refresh_quietly())
            return
        with contextlib.suppress(ValueError, AttributeError):
            name = orjson.loads(payload).get("watch")
            if isinstance(name, str):
                self._watched.add(name)
                self._announced[name] = time.monotonic()

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.refresh_watched()

    async def _advertise_watches(self) -> None:
        """Tell every process which queues are watched here (so they publish events), for a while."""
        expires = time.time() + WATCH_TTL
        if self._event_watchers:
            await self.runtime.redis.hset(keys.WATCHED, mapping={n: str(expires) for n in self._event_watchers})

    async def refresh_watched(self) -> None:
        """Re-advertise our watches and learn everyone's (called by the heartbeat)."""
        await self._advertise_watches()
        raw = await self.runtime.redis.hgetall(keys.WATCHED)
        now = time.time()
        watched, stale = set(), []
        for name, expires in raw.items():
            if float(expires) > now:
                watched.add(name.decode() if isinstance(name, bytes) else name)
            else:
                stale.append(name)
        if stale:
            await self.runtime.redis.hdel(keys.WATCHED, *stale)
        # A watch announced while this refresh was reading the hash may be missing from what it
        # read: keep what the control channel said for a while.
        recent = time.monotonic() - WATCH_TTL
        self._announced = {n: t for n, t in self._announced.items() if t > recent}
        self._watched = watched | set(self._event_watchers) | set(self._announced)

    def emit_events(self, queue: str, events: list[EventItem]) -> None:
        """Publish job lifecycle events, only while someone (on any process) watches the queue.

        Events of one process reach the channel in the order they were emitted.
        """
        if queue not in self._watched and ALL not in self._watched:
            return
        items = [(job_id, event, None if data is None else orjson.Fragment(data)) for job_id, event, data in events]
        self._event_buffer.append(dumps({"queue": queue, "events": items}))
        if not self._flushing_events:
            self._flushing_events = True
            self.spawn(self._flush_events())

    async def _flush_events(self) -> None:
        # One publisher at a time, in order: separate publish calls could overtake each other.
        try:
            while self._event_buffer:
                batch, self._event_buffer = self._event_buffer, []
                with contextlib.suppress(RedisError, OSError):
                    await publish_many(self.runtime.redis, [(EVENTS_CHANNEL, payload) for payload in batch])
        finally:
            self._flushing_events = False

    # -- stats feed ------------------------------------------------------------------------------------

    def watch_stats(self, conn: Connection) -> None:
        self._stats_watchers.add(conn)
        if self._stats_task is None or self._stats_task.done():
            self._stats_task = asyncio.create_task(self._stats_loop(), name="presque-stats-feed")

    def unwatch_stats(self, conn: Connection) -> None:
        """Stop the feed to ``conn`` once it watches no stats topic any more."""
        if not any(topic is Topic.STATS for topic, _ in conn.session.watches):
            self._stats_watchers.discard(conn)

    async def _stats_loop(self) -> None:
        interval = self.runtime.settings.websocket.stats_interval
        while self._stats_watchers and not self.shutting_down:
            try:
                self._relay_stats(await self.runtime.stats.snapshot())
            except (RedisError, OSError) as exc:
                log.debug("stats snapshot failed: %s", exc)
                self.tell_unavailable(self._stats_watchers)
            except Exception:
                log.exception("stats feed failed")
            await asyncio.sleep(interval)

    def _relay_stats(self, snapshot: dict[str, Any]) -> None:
        full = dumps(snapshot)
        per_queue: dict[str, bytes] = {}
        for conn in list(self._stats_watchers):
            for topic, queue in conn.session.watches:
                if topic is not Topic.STATS:
                    continue
                if queue is None:
                    conn.relay_stats(full, None)
                    continue
                if queue not in per_queue:
                    entry = snapshot["queues"].get(queue)
                    per_queue[queue] = dumps({**snapshot, "queues": {queue: entry} if entry else {}})
                conn.relay_stats(per_queue[queue], queue)

    # -- figures and shutdown --------------------------------------------------------------------------

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
        """Graceful stop: no more deliveries, ``shutdown`` frames, every lease returned, close 1001.

        Idempotent: ``presque serve`` calls it on SIGTERM, the app's lifespan again on exit.
        """
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._shut_down())
        await asyncio.shield(self._shutdown)

    async def _shut_down(self) -> None:
        self.shutting_down = True
        # Feeds first: the fetch in progress finishes and its jobs reach a session (then returned
        # with that session's) or go straight back; no fetch starts after this.
        await asyncio.gather(*(feed.close() for feed in list(self.feeds.values())), return_exceptions=True)
        await asyncio.gather(*(conn.shut_down() for conn in list(self.connections)), return_exceptions=True)
        if self._stats_task is not None:
            self._stats_task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=RELEASE_TIMEOUT)
