"""A connection's output: job frames and broadcasts to its session, and the writer task that sends them.

:class:`ConnectionOutput` is the base of :class:`broker.connection.Connection`. The feeds and the
hub call it to hand a job or a broadcast to the session; a writer task, started when the session
has output and ended when it has none, sends what the session queues and reports its backlog, so
that a slow reader stops receiving jobs instead of buffering them. It closes the socket too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, cast

from starlette.websockets import WebSocket

from broker.eager import start_eagerly
from broker.frames import CloseCode, ErrorCode
from broker.models import Delivery
from broker.protocol import Session
from broker.wsproto import EXTENSION, SEND_FRAMES

if TYPE_CHECKING:
    from broker.connection import Connection
    from broker.delivery import DeliveryHub

log = logging.getLogger("presque.connection")

UNAVAILABLE_EVERY = 5.0  # at most one unsolicited "unavailable" error frame per this many seconds


class ConnectionOutput:
    """The output side of a :class:`broker.connection.Connection`, whose constructor sets its state."""

    # Declared for the type checker only: no class attribute, so lookups stay as they were.
    hub: DeliveryHub
    ws: WebSocket
    session: Session
    _writer: asyncio.Task[None] | None
    _ended: bool
    _socket_closed: bool
    _unavailable_told: float

    # -- output -------------------------------------------------------------------------------------

    def deliver(self, job: Delivery) -> bool:
        """Called by the queue feed: queue a job frame; False if the session did not take it.

        The feed calls :meth:`flush` once it has dealt all its jobs.
        """
        return self.session.deliver(job.queue, job.id, job.token, job.attempt, job.body)

    def flush(self) -> None:
        """Send what the session queued now, within the caller's step, unless a writer runs.

        Called after a deal: the job frames leave before whatever else the step does (the HTTP
        answer to the push whose call took them) and a loop turn sooner than a new writer task
        would send them. Nothing the writer does before its first wait calls back into this
        connection, so no second writer can start meanwhile.
        """
        if self._writer is None and not (self._ended or self._socket_closed):
            self._writer = start_eagerly(self._write_loop())

    def relay_message(self, channel: str, data: bytes) -> None:
        if self.session.message(channel, data):
            self._wake_writer()

    def relay_event(self, queue: str, job_id: str, event: str, data: bytes | None) -> None:
        if self.session.event(queue, job_id, event, data):
            self._wake_writer()

    def relay_stats(self, snapshot: bytes, queue: str | None) -> None:
        if self.session.stats(snapshot, queue):
            self._wake_writer()

    def tell_unavailable(self) -> None:
        now = time.monotonic()
        if now - self._unavailable_told >= UNAVAILABLE_EVERY:
            self._unavailable_told = now
            self.session.send_error(ErrorCode.UNAVAILABLE, "redis unavailable: deliveries resume when it is back")
            self._wake_writer()

    def _wake_writer(self) -> None:
        """Have the writer send what the session queued: at the next turn of the loop, once."""
        if self._writer is None and not (self._ended or self._socket_closed):
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        # Runs while there is output, then ends: an idle connection has no writer task.
        limit = self.session.limits.send_buffer
        # Whether the backlog reached the limit since the last time it drained below: the feeds saw
        # no credit then, and must hear when it comes back. The backlog only grows between two
        # writes, so its peak is what it is just before a write is subtracted.
        throttled = False
        # Under presque's own protocol (broker/wsproto.py) a batch of frames is one ASGI message
        # and one socket write; under any other, one ``websocket.send`` per frame.
        batched = EXTENSION in self.ws.scope.get("extensions", {})
        try:
            while frames := self.session.data_to_send():
                backlog = self.session.taken_bytes
                self.session.set_send_backlog(backlog)
                if batched:
                    # The raw ASGI send: Starlette's WebSocket.send refuses message types it does not know.
                    await self.ws._send({"type": SEND_FRAMES, "frames": frames})
                    throttled = throttled or self.session.send_backlog >= limit
                    self.session.set_send_backlog(0)
                else:
                    for frame in frames:
                        await self.ws.send({"type": "websocket.send", "text": frame.decode()})
                        throttled = throttled or self.session.send_backlog >= limit
                        backlog -= len(frame)
                        self.session.set_send_backlog(backlog)
                if throttled and self.session.send_backlog < limit:
                    throttled = False
                    # The hub knows connections by their whole class.
                    self.hub.all_credit_returned(cast("Connection", self))
            if self.session.close_code is not None:
                await self._close_socket()
        except Exception:
            # The socket is gone (or broken): write nothing more; the read loop hears the disconnect.
            self._socket_closed = True
            log.debug("writing to the WebSocket failed", exc_info=True)
        finally:
            self._writer = None

    async def _close_socket(self) -> None:
        if self._socket_closed:
            return
        self._socket_closed = True
        code = int(self.session.close_code or CloseCode.NORMAL)
        with contextlib.suppress(Exception):
            await self.ws.close(code, self.session.close_reason or None)
