"""Minimal, fast HTTP/1.1 and WebSocket clients for load generation (asyncio protocols).

The load generators share two cores with the broker and Redis, so every microsecond they spend
is one the broker does not get. These clients do the least work that is still correct for the
broker's replies: keep-alive HTTP with ``content-length`` bodies only, WebSocket text frames
that are never fragmented. Client frames are masked with the all-zero key (a valid key: RFC 6455
asks for an unpredictable one to protect proxies, which a loopback benchmark has none of), so
masking costs nothing.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Callable

now = time.monotonic  # CLOCK_MONOTONIC: one clock for every process on the machine


class Window:
    """Counts and latencies recorded between ``start`` and ``end`` (monotonic seconds)."""

    __slots__ = ("count", "end", "errors", "latencies", "start", "total")

    def __init__(self, start: float, end: float) -> None:
        self.start = start
        self.end = end
        self.count = 0  # completions inside the window
        self.total = 0  # completions overall
        self.errors = 0
        self.latencies: list[float] = []

    def record(self, sent: float, done: float) -> None:
        self.total += 1
        if self.start <= done < self.end:
            self.count += 1
            self.latencies.append(done - sent)


# -- HTTP ---------------------------------------------------------------------------------------


def http_request(method: str, path: str, body: bytes = b"", host: str = "127.0.0.1") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if body or method in ("POST", "PUT"):
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


class HttpConn(asyncio.Protocol):
    """One keep-alive connection; ``send`` one request at a time, ``on_reply(status, body)`` per reply."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.on_reply: Callable[[int, bytes], None] = lambda status, body: None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            i = buf.find(b"content-length: ", 0, end)
            if i < 0:
                head = bytes(buf[:end]).lower()
                i = head.find(b"content-length: ")
            length = 0 if i < 0 else int(buf[i + 16 : buf.index(b"\r\n", i)])
            total = end + 4 + length
            if len(buf) < total:
                return
            status = int(buf[9:12])
            body = bytes(buf[end + 4 : total])
            del buf[:total]
            self.on_reply(status, body)


async def http_connect(address: tuple[str, int]) -> HttpConn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(HttpConn, *address)
    return conn


class ClosedLoopHttp:
    """Each connection sends its next request the moment the previous reply arrives."""

    def __init__(self, conns: list[HttpConn], request: Callable[[], bytes], window: Window, ok: int) -> None:
        self.window = window
        self.request = request
        self.ok = ok
        self.pending = len(conns)
        self.done = asyncio.get_running_loop().create_future()
        for conn in conns:
            self._drive(conn)

    def _drive(self, conn: HttpConn) -> None:
        window, request, ok = self.window, self.request, self.ok
        sent = [0.0]

        def on_reply(status: int, body: bytes) -> None:
            t = now()
            if status != ok:
                window.errors += 1
            window.record(sent[0], t)
            if t >= window.end:
                self.pending -= 1
                if not self.pending and not self.done.done():
                    self.done.set_result(None)
                return
            sent[0] = now()
            conn.send(request())

        conn.on_reply = on_reply
        sent[0] = now()
        conn.send(request())


# -- WebSocket ----------------------------------------------------------------------------------

ZERO_MASK = b"\x00\x00\x00\x00"


def ws_frame(payload: bytes) -> bytes:
    """A masked client text frame (all-zero mask: the payload goes out as is)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, 0x80 | n)) + ZERO_MASK + payload
    if n < 65536:
        return bytes((0x81, 0xFE)) + n.to_bytes(2, "big") + ZERO_MASK + payload
    return bytes((0x81, 0xFF)) + n.to_bytes(8, "big") + ZERO_MASK + payload


class WsConn(asyncio.Protocol):
    """A WebSocket client connection. After ``opened``, ``on_frames(list_of_text_payloads)``
    is called once per read with every complete text frame in it; pings are answered."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.is_open = False
        loop = asyncio.get_running_loop()
        self.opened = loop.create_future()
        self.lost = loop.create_future()
        self.closed_code: int | None = None
        self.on_frames: Callable[[list[bytes]], None] = lambda frames: None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(  # type: ignore[union-attr]
            (
                f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during handshake: {exc}"))
        if not self.lost.done():
            self.lost.set_result(exc)

    def send(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(ws_frame(payload))

    def send_raw(self, frames: bytes) -> None:
        """Write already-framed bytes (one or many ``ws_frame`` results joined)."""
        assert self.transport is not None
        self.transport.write(frames)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"\x88\x82" + ZERO_MASK + b"\x03\xe8")
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.is_open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if buf[9:12] != b"101":
                err = ConnectionError(f"handshake refused: {bytes(buf[:end])[:200]!r}")
                if not self.opened.done():
                    self.opened.set_exception(err)
                assert self.transport is not None
                self.transport.close()
                return
            del buf[: end + 4]
            self.is_open = True
            self.opened.set_result(None)
        frames: list[bytes] = []
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            end = pos + head + length
            if end > n:
                break
            opcode = b0 & 0x0F
            if opcode == 1:
                frames.append(bytes(buf[pos + head : end]))
            elif opcode == 9:  # ping -> pong with the same payload
                payload = bytes(buf[pos + head : end])
                assert self.transport is not None
                self.transport.write(bytes((0x8A, 0x80 | len(payload))) + ZERO_MASK + payload)
            elif opcode == 8:
                self.closed_code = int.from_bytes(buf[pos + head : pos + head + 2], "big") if length >= 2 else 1005
                assert self.transport is not None
                self.transport.close()
            pos = end
        if pos:
            del buf[:pos]
        if frames:
            self.on_frames(frames)


async def ws_connect(address: tuple[str, int], path: str = "/ws", timeout: float = 30.0) -> WsConn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: WsConn(path), *address)
    await asyncio.wait_for(conn.opened, timeout)
    return conn
