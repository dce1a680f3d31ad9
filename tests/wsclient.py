"""A small WebSocket test client on ``websockets``: JSON frames, refs, and waiting with deadlines.

Frames that arrive while a test waits for another one are kept (``stash``) and returned by later
waits, so a test can ask for "the reply to s1" without losing the jobs that came before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

Frame = dict[str, Any]
Match = str | Callable[[Frame], bool]


def _matcher(match: Match) -> Callable[[Frame], bool]:
    if isinstance(match, str):
        return lambda frame: frame.get("op") == match
    return match


class WsClient:
    """One connection. Use :func:`ws_connect` to open it."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.stash: list[Frame] = []
        self.received: list[tuple[float, Frame]] = []  # every frame, with its monotonic arrival time
        self._refs = itertools.count(1)

    async def send(self, frame: Frame | str | bytes) -> None:
        if isinstance(frame, dict):
            frame = orjson.dumps(frame).decode()
        await self.conn.send(frame)

    async def _read(self, timeout: float) -> Frame:
        raw = await asyncio.wait_for(self.conn.recv(), timeout)
        frame: Frame = orjson.loads(raw)
        self.received.append((time.monotonic(), frame))
        return frame

    async def expect(self, match: Match = lambda f: True, timeout: float = 5.0) -> Frame:
        """The first frame (stashed or new) that matches; the others are stashed.

        Raises:
            TimeoutError: none within ``timeout`` (the message lists what did arrive).
        """
        test = _matcher(match)
        for i, frame in enumerate(self.stash):
            if test(frame):
                return self.stash.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                frame = await self._read(remaining)
            except TimeoutError:
                raise TimeoutError(f"no matching frame within {timeout}s; stashed: {self.stash[-5:]}") from None
            if test(frame):
                return frame
            self.stash.append(frame)

    async def silent(self, match: Match, within: float) -> bool:
        """True if no frame matching ``match`` arrives (or is stashed) within ``within`` seconds."""
        try:
            await self.expect(match, within)
        except TimeoutError:
            return True
        return False

    async def call(self, op: str, timeout: float = 5.0, **fields: Any) -> Frame:
        """Send ``op`` with a fresh ref and return the reply carrying that ref."""
        ref = f"r{next(self._refs)}"
        await self.send({"op": op, "ref": ref, **fields})
        return await self.expect(lambda f: f.get("ref") == ref, timeout)

    async def jobs(self, count: int, timeout: float = 5.0, queue: str | None = None) -> list[Frame]:
        """The next ``count`` job frames (of ``queue`` if given)."""
        return [
            await self.expect(lambda f: f.get("op") == "job" and queue in (None, f["queue"]), timeout)
            for _ in range(count)
        ]

    async def ack(self, job: Frame, **fields: Any) -> None:
        await self.send({"op": "ack", "id": job["id"], "token": job["token"], **fields})

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Read (and stash) frames until the server closes; return the close code."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(ConnectionClosed):
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"connection still open after {timeout}s")
                self.stash.append(await self._read(remaining))
        return self.conn.close_code


@contextlib.asynccontextmanager
async def ws_connect(url: str, **kwargs: Any) -> AsyncIterator[WsClient]:
    """Open a :class:`WsClient` (``websockets.connect`` arguments pass through)."""
    kwargs.setdefault("open_timeout", 5)
    kwargs.setdefault("close_timeout", 2)
    async with connect(url, **kwargs) as conn:
        yield WsClient(conn)


@contextlib.asynccontextmanager
async def slow_reader(ws_url: str, first: Frame) -> AsyncIterator[SlowReader]:
    """A WebSocket client that sends ``first`` after the handshake and reads nothing until asked.

    Its receive buffer is tiny and its reader stops at 16 KiB, so what the broker sends piles up
    in the kernel's buffers and then in the broker, as with a client on a slow network.
    """
    host, port = ws_url.removeprefix("ws://").split("/", 1)[0].split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=16384)
    protocol = ClientProtocol(parse_uri(ws_url), max_size=None)
    protocol.send_request(protocol.connect())
    writer.write(b"".join(protocol.data_to_send()))
    while not any(isinstance(e, Response) for e in protocol.events_received()):
        protocol.receive_data(await asyncio.wait_for(reader.read(4096), 5))
    protocol.send_text(orjson.dumps(first))
    writer.write(b"".join(protocol.data_to_send()))
    try:
        yield SlowReader(reader, protocol)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class SlowReader:
    """The client :func:`slow_reader` yields."""

    def __init__(self, reader: asyncio.StreamReader, protocol: ClientProtocol) -> None:
        self.reader = reader
        self.protocol = protocol
        self.frames: list[Frame] = []

    async def read_until(self, done: Callable[[list[Frame]], bool], timeout: float = 10.0) -> None:
        """Read and parse frames until ``done(self.frames)``."""
        async with asyncio.timeout(timeout):
            while not done(self.frames):
                self.protocol.receive_data(await self.reader.read(1 << 20))
                for event in self.protocol.events_received():
                    if isinstance(event, WsFrame) and event.opcode is Opcode.TEXT:
                        self.frames.append(orjson.loads(event.data))
