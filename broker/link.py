"""The client's persistent WebSocket to the broker: refs, reconnection, resubscription.

One :class:`Link` holds at most one open socket. Every request carries a fresh ``ref`` and waits
for the reply with that ``ref``, so any number of requests are in flight at once. When the socket
drops, every request still waiting fails (:class:`~broker.transport.PushUnconfirmed` for pushes,
:class:`~broker.transport.ConnectionLost` otherwise): nothing is resent behind the caller's back.
While there are subscriptions or listeners (or callers waiting), the link reconnects by itself
with exponential backoff and jitter, then subscribes and listens again before anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from broker.errors import BrokerError, Forbidden, TooLarge, Unauthorized
from broker.transport import BrokerUnreachable, ConnectionLost, PushUnconfirmed, error_from_frame

log = logging.getLogger("presque.client")

BACKOFF_BASE = 0.1
BACKOFF_MAX = 5.0
MAX_INCOMING = 64 * 1024 * 1024


class Inbox(Protocol):
    """Where a listener's messages go: an ``asyncio.Queue``, or a thread-safe ``queue.Queue``."""

    def put_nowait(self, item: Any, /) -> None: ...


# Called with a ``job`` frame and the epoch (connection number) it arrived on.
JobHandler = Callable[[dict[str, Any], int], None]


def backoff(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_MAX) -> float:
    """Exponential backoff with "equal jitter": between half and all of ``base * 2**attempt``."""
    ceiling: float = min(cap, base * 2.0 ** min(attempt, 30))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[dict[str, Any]]
    push_queue: str | None
    uniq: str | None


@dataclass(slots=True)
class Subscription:
    queue: str
    prefetch: int
    lease: float
    handler: JobHandler

    def frame(self) -> dict[str, Any]:
        return {"op": "subscribe", "queue": self.queue, "prefetch": self.prefetch, "ack": "manual", "lease": self.lease}


class Link:
    """The persistent WebSocket.

    Args:
        url: the ``ws://`` / ``wss://`` URL of ``/ws``.
        headers: handshake headers (``Authorization``).
        timeout: how long a request waits for a connection before BrokerUnreachable.
        max_frame: frames larger than this are refused locally (TooLarge) instead of making the
            broker close the socket, which would fail every other request in flight.
    """

    def __init__(
        self, url: str, *, headers: Mapping[str, str] | None = None, timeout: float = 30.0, max_frame: int = 1_048_576
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.max_frame = max_frame
        self.epoch = 0
        self.on_error: Callable[[BrokerError], None] | None = None
        self.on_state: Callable[[bool], None] | None = None
        self._headers = dict(headers or {})
        self._ws: ClientConnection | None = None
        self._ready = False
        self._pending: dict[str, _Pending] = {}
        self._refs = itertools.count(1)
        self._subs: dict[str, Subscription] = {}
        self._listeners: dict[str, set[Inbox]] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._waiters = 0
        self._pulse = asyncio.Event()
        self._last_error: BrokerError | None = None
        self._fatal: BrokerError | None = None
        self._closed = False
        self._down_logged = False
        self._ever_connected = False

    @property
    def connected(self) -> bool:
        return self._ready and self._ws is not None

    # -- requests -----------------------------------------------------------------------------------

    async def request(
        self, frame: dict[str, Any], *, push_queue: str | None = None, epoch: int | None = None
    ) -> dict[str, Any]:
        """Send ``frame`` with a fresh ``ref`` and return the broker's reply frame.

        Args:
            frame: the frame; its ``ref`` is set here.
            push_queue: the frame is a push to this queue (for PushUnconfirmed).
            epoch: send only on that connection (the one a job came on, which alone holds it),
                at once, even while it is still subscribing again; ConnectionLost if it is gone.

        Raises:
            BrokerError: the broker's ``error`` frame, as its typed exception.
            PushUnconfirmed: (``push_queue`` set) the socket dropped before the reply.
            ConnectionLost: the socket dropped before the reply.
            BrokerUnreachable: no connection within the timeout.
        """
        ref = f"{next(self._refs):x}"
        frame["ref"] = ref
        data = orjson.dumps(frame)
        if len(data) > self.max_frame:
            raise TooLarge(f"frame of {len(data)} bytes is over the limit of {self.max_frame} bytes")
        if epoch is None:
            ws = await self._connection()
        elif epoch == self.epoch and self._ws is not None:
            ws = self._ws
        else:
            raise ConnectionLost("the connection that request belongs to is gone")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ref] = _Pending(future, push_queue, frame.get("uniq"))
        try:
            await ws.send(data.decode())
        except ConnectionClosed:
            self._pending.pop(ref, None)
            raise self._lost(push_queue, frame.get("uniq")) from None
        except BaseException:
            self._pending.pop(ref, None)
            raise
        return await future

    async def subscribe(self, sub: Subscription) -> None:
        """Subscribe to ``sub.queue`` now if connected, and again after every reconnection.

        Jobs go to ``sub.handler``. While subscribed, the link keeps reconnecting by itself.

        Raises:
            BrokerError: the broker refused the subscription (it is dropped then).
        """
        self._subs[sub.queue] = sub
        if not self.connected:
            self._start()  # the supervisor subscribes once connected
            return
        try:
            await self.request(sub.frame())
        except (ConnectionLost, BrokerUnreachable):
            pass  # subscribed on reconnection
        except BrokerError as exc:
            if exc.code != "already_subscribed":  # the reconnection got there first
                self._subs.pop(sub.queue, None)
                raise

    async def unsubscribe(self, queue: str) -> None:
        """Unsubscribe (the broker returns this connection's unacked jobs of ``queue`` at once)."""
        if self._subs.pop(queue, None) is not None and self.connected:
            with contextlib.suppress(ConnectionLost):
                await self.request({"op": "unsubscribe", "queue": queue})

    async def listen(self, channel: str, inbox: Inbox) -> None:
        """Send ``channel``'s messages to ``inbox`` from now on (listening again after reconnections)."""
        first = channel not in self._listeners
        self._listeners.setdefault(channel, set()).add(inbox)
        if not first:
            return
        try:
            await self.request({"op": "listen", "channel": channel})
        except ConnectionLost:
            pass  # listened again on reconnection
        except BrokerError as exc:
            if exc.code != "already_subscribed":  # a reconnection listened first
                self._listeners.get(channel, set()).discard(inbox)
                if not self._listeners.get(channel):
                    self._listeners.pop(channel, None)
                raise

    async def unlisten(self, channel: str, inbox: Inbox) -> None:
        inboxes = self._listeners.get(channel)
        if inboxes is None:
            return
        inboxes.discard(inbox)
        if not inboxes:
            del self._listeners[channel]
            if self.connected:
                with contextlib.suppress(BrokerError):
                    await self.request({"op": "unlisten", "channel": channel})

    # -- connection ---------------------------------------------------------------------------------

    async def _connection(self) -> ClientConnection:
        if self._closed:
            raise ConnectionLost("the client is closed")
        if self._ready and self._ws is not None:
            return self._ws
        self._waiters += 1
        try:
            self._start()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.timeout
            while not (self._ready and self._ws is not None):
                if self._fatal is not None:
                    raise self._fatal
                if self._closed:
                    raise ConnectionLost("the client is closed")
                remaining = deadline - loop.time()
                if remaining <= 0:
                    reason = f": {self._last_error.message}" if self._last_error else ""
                    raise BrokerUnreachable(f"cannot reach the broker at {self.url}{reason}")
                pulse = self._pulse
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pulse.wait(), remaining)
            return self._ws
        finally:
            self._waiters -= 1

    def _start(self) -> None:
        if self._supervisor is None or self._supervisor.done():
            self._fatal = None
            self._supervisor = asyncio.create_task(self._supervise(), name="presque-link")

    def _notify(self) -> None:
        self._pulse.set()
        self._pulse = asyncio.Event()

    def _wanted(self) -> bool:
        return bool(self._subs or self._listeners or self._waiters) and not self._closed

    async def _supervise(self) -> None:
        attempt = 0
        while self._wanted():
            try:
                ws = await self._open()
            except BrokerError as exc:
                self._last_error = exc
                if isinstance(exc, Unauthorized | Forbidden):
                    self._fatal = exc
                if not self._down_logged:
                    log.warning("cannot reach the broker at %s: %s (retrying)", self.url, exc.message)
                    self._down_logged = True
                self._notify()
            else:
                if await self._serve(ws):
                    attempt = 0
                if self._closed:
                    return
                if not self._wanted():
                    break
            await asyncio.sleep(backoff(attempt))
            attempt += 1

    async def _open(self) -> ClientConnection:
        try:
            return await connect(
                self.url,
                additional_headers=self._headers,
                open_timeout=min(self.timeout, 10.0),
                compression=None,
                proxy=None,
                max_size=MAX_INCOMING,
                ping_interval=20,
                ping_timeout=20,
                close_timeout=2,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 401:
                raise Unauthorized(f"the broker refused the WebSocket handshake ({status}): check the token") from None
            if status == 403:
                raise Forbidden(f"the broker refused the WebSocket handshake ({status}): token or origin") from None
            raise BrokerUnreachable(f"WebSocket handshake answered HTTP {status}") from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise BrokerUnreachable(text) from None

    async def _serve(self, ws: ClientConnection) -> bool:
        """Run one connection until it closes; True if it got as far as being ready."""
        self._ws = ws
        self.epoch += 1
        reader = asyncio.create_task(self._read(ws, self.epoch), name="presque-link-reader")
        try:
            await self._restore()
        except ConnectionLost:
            if not self._down_logged:
                log.warning("the broker at %s closed the connection while subscribing (retrying)", self.url)
                self._down_logged = True
        else:
            if not reader.done():
                self._ready = True
                if self._down_logged or not self._ever_connected:
                    log.info("connected to the broker at %s", self.url)
                self._down_logged = False
                self._ever_connected = True
                self._notify()
                if self.on_state:
                    self.on_state(True)
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        was_ready = self._ready
        self._ready = False
        self._ws = None
        self._fail_pending()
        if not self._closed and was_ready:
            log.warning("connection to the broker lost (close code %s); reconnecting", ws.close_code)
            self._down_logged = True
            if self.on_state:
                self.on_state(False)
        self._notify()
        return was_ready

    async def _restore(self) -> None:
        """Subscribe and listen again, including to whatever is added meanwhile."""
        subscribed: set[str] = set()
        listening: set[str] = set()
        while True:
            subs = [sub for queue, sub in self._subs.items() if queue not in subscribed]
            channels = [channel for channel in self._listeners if channel not in listening]
            if not subs and not channels:
                return
            for sub in subs:
                subscribed.add(sub.queue)
                try:
                    await self._raw_request(sub.frame())
                except ConnectionLost:
                    raise
                except BrokerError as exc:
                    log.warning("could not subscribe to %s: %s", sub.queue, exc.message)
            for channel in channels:
                listening.add(channel)
                try:
                    await self._raw_request({"op": "listen", "channel": channel})
                except ConnectionLost:
                    raise
                except BrokerError as exc:
                    log.warning("could not listen to %s: %s", channel, exc.message)

    async def _raw_request(self, frame: dict[str, Any]) -> dict[str, Any]:
        ws = self._ws
        if ws is None:
            raise ConnectionLost("not connected")
        ref = f"{next(self._refs):x}"
        frame["ref"] = ref
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ref] = _Pending(future, None, None)
        try:
            await ws.send(orjson.dumps(frame).decode())
        except ConnectionClosed:
            self._pending.pop(ref, None)
            raise ConnectionLost("connection lost") from None
        return await future

    async def _read(self, ws: ClientConnection, epoch: int) -> None:
        try:
            async for message in ws:
                try:
                    frame = orjson.loads(message)
                except orjson.JSONDecodeError:
                    log.warning("ignoring a frame that is not JSON: %.80r", message)
                    continue
                self._dispatch(frame, epoch)
        except ConnectionClosed:
            pass

    def _dispatch(self, frame: dict[str, Any], epoch: int) -> None:
        op = frame.get("op")
        ref = frame.get("ref")
        if ref is not None:
            pending = self._pending.pop(ref, None)
            if pending is not None and not pending.future.done():
                if op == "error":
                    pending.future.set_exception(error_from_frame(frame))
                else:
                    pending.future.set_result(frame)
                return
        if op == "job":
            sub = self._subs.get(frame.get("queue", ""))
            if sub is not None:
                sub.handler(frame, epoch)
        elif op == "message":
            for inbox in self._listeners.get(frame.get("channel", ""), ()):
                inbox.put_nowait(frame.get("data"))
        elif op == "error":
            exc = error_from_frame(frame)
            if self.on_error is not None:
                self.on_error(exc)
            else:
                log.warning("broker error: %s", exc.message)
        elif op == "shutdown":
            log.info("the broker at %s is shutting down", self.url)

    def _lost(self, push_queue: str | None, uniq: str | None) -> ConnectionLost:
        if push_queue is not None:
            return PushUnconfirmed(push_queue, uniq)
        return ConnectionLost("the connection to the broker dropped before it answered")

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for item in pending.values():
            if not item.future.done():
                item.future.set_exception(self._lost(item.push_queue, item.uniq))
                # A caller that already gave up must not leave "exception never retrieved" behind.
                item.future.add_done_callback(_consume)

    async def close(self) -> None:
        """Close the socket; requests still waiting fail with ConnectionLost."""
        self._closed = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor
        self._fail_pending()
        self._notify()


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
