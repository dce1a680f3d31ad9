"""Notifier: one Redis pub/sub connection per broker process, fanned out to local listeners.

Wake-ups (``presque:wake:<q>``), job events and user broadcast channels all travel over this one
connection (saq's multiplexer model). Listeners are plain callables run on the event loop; they
must not block. When the connection drops, the notifier reconnects with backoff, subscribes
again and calls every listener with ``None`` so that deliverers re-fetch whatever they may have
missed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from broker import keys
from broker.redis import pubsub_client

log = logging.getLogger("presque.notify")

PING_EVERY = 5.0
PING_TIMEOUT = 5.0

Listener = Callable[[bytes | None], None]


class Notifier:
    """Subscribe local listeners to Redis channels over one shared pub/sub connection.

    Args:
        redis: the process's redis.asyncio client. A ``Redis`` lends its connection pool to the
            pub/sub; for a ``RedisCluster`` the pub/sub connects to one of its masters (classic
            pub/sub messages reach every node of a cluster).
    """

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._listeners: dict[str, list[Listener]] = {}
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._pubsub: Any = None
        self._pubsub_client: Any = None  # a Cluster node's client of our own, closed with the pub/sub
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False

    async def start(self) -> None:
        """Start the reader task (call once, from the app's lifespan)."""
        self._task = asyncio.create_task(self._run(), name="presque-notifier")

    async def stop(self) -> None:
        """Stop the reader and close the pub/sub connection."""
        self._closing = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._close_pubsub()

    async def _close_pubsub(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        if self._pubsub_client is not None:
            with contextlib.suppress(Exception):
                await self._pubsub_client.aclose()
            self._pubsub_client = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def on_control(self, listener: Listener) -> None:
        """Add ``listener`` to the broker-wide control channel, which every process always receives.

        Synchronous: the control channel is subscribed on every (re)connection anyway.
        """
        self._listeners.setdefault(keys.CONTROL_CHANNEL, []).append(listener)

    async def subscribe(self, channel: str, listener: Listener, *, timeout: float = 5.0) -> None:
        """Add ``listener`` to ``channel``; returns once Redis has confirmed the subscription.

        Waiting for the confirmation is what makes "subscribe, then fetch, then wait" free of
        lost wake-ups: anything published after the fetch reaches the listener.
        """
        listeners = self._listeners.setdefault(channel, [])
        listeners.append(listener)
        if len(listeners) > 1 and channel not in self._confirmed:
            return
        if channel not in self._confirmed:
            self._confirmed[channel] = asyncio.get_running_loop().create_future()
            if self._pubsub is not None and self.connected:
                with contextlib.suppress(RedisError, OSError):
                    await self._pubsub.subscribe(channel)
        confirmed = self._confirmed.get(channel)
        if confirmed is not None and not confirmed.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(confirmed), timeout)

    async def unsubscribe(self, channel: str, listener: Listener) -> None:
        """Remove ``listener``; the Redis subscription goes when its last listener does."""
        listeners = self._listeners.get(channel)
        if not listeners or listener not in listeners:
            return
        listeners.remove(listener)
        if listeners:
            return
        del self._listeners[channel]
        self._confirmed.pop(channel, None)
        if self._pubsub is not None and self.connected:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.unsubscribe(channel)

    async def _run(self) -> None:
        delay = 0.05
        while not self._closing:
            try:
                await self._connect()
                delay = 0.05
                await self._read()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self.connected:
                    log.warning("pub/sub connection lost: %s; reconnecting", exc)
                self._connected.clear()
                await asyncio.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)

    async def _connect(self) -> None:
        await self._close_pubsub()
        # On a Redis Cluster: a plain connection to one master, picked again on each reconnection.
        client, own = pubsub_client(self.redis)
        self._pubsub_client = client if own else None
        self._pubsub = client.pubsub()
        # A connection-level subscription keeps the connection in pub/sub mode even before any
        # queue is listened to, and gives a first confirmation to know we are live.
        channels = list(dict.fromkeys([*self._listeners, keys.CONTROL_CHANNEL]))
        for channel in self._listeners:
            self._confirmed[channel] = self._confirmed.get(channel) or asyncio.get_running_loop().create_future()
        await self._pubsub.subscribe(*channels)
        self._connected.set()
        # A listener added while that SUBSCRIBE was in flight saw us not connected and left its
        # channel to this method: subscribe it now, or it would wait for the next reconnection.
        late = [channel for channel in self._listeners if channel not in channels]
        if late:
            await self._pubsub.subscribe(*late)
        # Anything may have been published while we were not listening: everyone looks again.
        for listeners in list(self._listeners.values()):
            for listener in list(listeners):
                listener(None)

    async def _read(self) -> None:
        # A frozen Redis (SIGSTOP) sends nothing and closes nothing: ping when idle, and treat
        # an unanswered ping as a lost connection.
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        ping_sent: float | None = None
        while True:
            message = await self._pubsub.get_message(ignore_subscribe_messages=False, timeout=PING_EVERY / 4)
            now = loop.time()
            if message is None:
                if ping_sent is not None and now - ping_sent > PING_TIMEOUT:
                    raise ConnectionError("pub/sub ping unanswered")
                if ping_sent is None and now - last_heard > PING_EVERY:
                    await self._pubsub.ping()
                    ping_sent = now
                continue
            last_heard, ping_sent = now, None
            kind = message["type"]
            channel = message["channel"]
            name = channel.decode() if isinstance(channel, bytes) else channel
            if kind == b"subscribe" or kind == "subscribe":
                future = self._confirmed.get(name)
                if future is not None and not future.done():
                    future.set_result(None)
                continue
            if kind not in (b"message", "message"):
                continue
            for listener in list(self._listeners.get(name, ())):
                try:
                    listener(message["data"])
                except Exception:  # a faulty listener must not stop the others
                    log.exception("listener of %s failed", name)
