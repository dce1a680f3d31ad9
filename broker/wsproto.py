"""BatchingWebSocketProtocol: uvicorn's sans-I/O WebSocket protocol, plus many frames per write.

A connection that delivers jobs queues several frames between two turns of its writer. Sent one
ASGI ``websocket.send`` at a time, each costs the middleware wrappers, uvicorn's ``send`` (which
re-encodes the text) and one ``transport.write`` — one system call per frame. This subclass
accepts one more ASGI message::

    {"type": "presque.websocket.send_frames", "frames": [b'{"op":"job",...}', ...]}

whose frames (UTF-8 JSON text frames, already encoded) it serialises and writes at once —
framing them itself when no extension (permessage-deflate) was negotiated, since an unmasked
server frame is a 2-10 byte header. It advertises itself in the scope,
``scope["extensions"]["presque.send_frames"]``, so that the app can fall back to
``websocket.send`` under any other protocol implementation.

The input side likewise: a socket read holds many frames, each of which costs the app one ASGI
message and one await. An app that sends ``{"type": "presque.websocket.receive_batched"}`` then
receives, instead of ``websocket.receive``, ::

    {"type": "presque.websocket.receive_frames", "frames": ['{"op":"push",...}', b"...", ...]}

every message (``str`` for a text frame, ``bytes`` for a binary one) read since it last asked,
in order; other messages (``websocket.disconnect``) are unchanged and keep their place. And from
the accept on, the protocol parses whole, masked, unfragmented text and binary frames itself
(websockets' generator parser cost more than the rest of the input path); every other frame
goes to websockets whole, so that its parser always stands at a frame boundary.

It also keeps an idle connection small (the broker holds 10,000 of them): it drops the
handshake's request and response once answered, and replaces the parent's ``asyncio.Queue`` of
received messages and its ``asyncio.Event`` for back-pressure, each of which costs one or more
empty 600-byte deques, with the little of them it uses.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Generic, TypeVar

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask
from websockets.http11 import Request
from websockets.protocol import State

SEND_FRAMES = "presque.websocket.send_frames"  # the ASGI message type, and the scope extension's name
EXTENSION = "presque.send_frames"
RECEIVE_BATCHED = "presque.websocket.receive_batched"  # the app asks for RECEIVE_FRAMES messages
RECEIVE_FRAMES = "presque.websocket.receive_frames"

_LEN16 = struct.Struct("!H").unpack_from
_LEN64 = struct.Struct("!Q").unpack_from
_HEAD7 = [bytes((0x81, n)) for n in range(126)]  # FIN + text opcode, unmasked length < 126
_head = _HEAD7.__getitem__
_HEAD16 = struct.Struct("!BBH").pack
_HEAD64 = struct.Struct("!BBQ").pack

T = TypeVar("T")


class _Waitable:
    # No list of waiters at all while nobody waits, which is nearly always.
    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] | None = None

    async def _next_wake(self) -> None:
        if self._waiters is None:
            self._waiters = []
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        finally:
            self._waiters.remove(future)
            if not self._waiters:
                self._waiters = None

    def _wake(self) -> None:
        for future in self._waiters or ():
            if not future.done():
                future.set_result(None)


class Inbox(_Waitable, Generic[T]):
    """What the protocol uses of ``asyncio.Queue``: ``put_nowait``, ``get`` and ``empty``.

    uvicorn pauses reading while a message waits, so the list stays short.
    """

    __slots__ = ("_items",)

    def __init__(self) -> None:
        super().__init__()
        self._items: list[T] = []

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        self._wake()

    async def get(self) -> T:
        while not self._items:
            await self._next_wake()
        return self._items.pop(0)

    def empty(self) -> bool:
        return not self._items

    def last(self) -> T | None:
        """The item put last and not taken yet, if any."""
        return self._items[-1] if self._items else None


class Flag(_Waitable):
    """What the protocol uses of ``asyncio.Event``: ``set``, ``clear``, ``is_set`` and ``wait``."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        super().__init__()
        self._set = True

    def set(self) -> None:
        self._set = True
        self._wake()

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> bool:
        while not self._set:
            await self._next_wake()
        return True


class BatchingWebSocketProtocol(WebSocketsSansIOProtocol):
    """``uvicorn.Config(ws=BatchingWebSocketProtocol)``: see the module docstring."""

    # Defaults on the class, not in each idle connection's __dict__ until they change.
    receive_batched = False  # the app asked for RECEIVE_FRAMES messages
    _fast = False  # data frames parsed by data_received itself (from the accept on)
    _tail: bytes | bytearray = b""  # the start of a frame the fast path has not received whole
    _need = 0  # how long the tail must grow before it is worth parsing again

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue: Any = Inbox()
        self.writable: Any = Flag()

    # -- input: the data frames of a read parsed here, everything else by websockets -----------

    def _parser_at_frame_start(self) -> bool:
        # websockets parses frames from the end of the request on, even before the app accepts:
        # the fast path may take over only if its parser waits for a frame's first byte, i.e.
        # its innermost generator is StreamReader.at_eof. Otherwise (or under another websockets)
        # it never takes over.
        gen: Any = self.conn.parser
        while getattr(gen, "gi_yieldfrom", None) is not None:
            gen = gen.gi_yieldfrom
        at_start = getattr(gen, "__name__", "") == "at_eof" and not self.conn.reader.buffer
        # Without a size limit, websockets refuses nothing; the fast path bounds what it buffers.
        return at_start and self.conn.max_message_size is not None

    def _plain_ok(self) -> bool:
        # When a whole data frame may skip websockets: no fragmented message in progress, no
        # extension to apply, open on both sides.
        conn = self.conn
        return conn.state is State.OPEN and not (
            self.close_sent or conn.current_size is not None or conn.debug or conn.extensions
        )

    def data_received(self, data: bytes) -> None:
        tail = self._tail
        if not self._fast:
            super().data_received(data)
            return
        buf: bytes | bytearray = data
        if tail:
            # The start of a frame came before: it grows in place (a frame dripping in small
            # reads costs its size once, not once per read), and is parsed when whole.
            assert isinstance(tail, bytearray)
            tail += data
            if len(tail) < self._need:
                return
            buf, self._tail = tail, b""
        conn = self.conn
        size = len(buf)
        limit = conn.max_message_size or 0  # never None here: see _parser_at_frame_start
        pos = 0
        need = 2
        # Whether whole data frames may skip websockets (rechecked after any frame it handles),
        # and the messages decoded for a RECEIVE_FRAMES batch, handed over at the end of the read
        # or before anything else may queue a message.
        plain = self._plain_ok()
        got: list[str | bytes] | None = [] if self.receive_batched else None
        while size - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            length = second & 0x7F
            start = pos + 2
            if length >= 126:  # a 16-bit (126) or 64-bit (127) length follows
                extra = 2 if length == 126 else 8
                if size - pos < 2 + extra:
                    need = 2 + extra
                    break
                (length,) = (_LEN16 if extra == 2 else _LEN64)(buf, start)
                start += extra
            if length > limit:
                # websockets refuses it (1009) from its header: hand it the rest.
                if got:
                    self._hand_frames(got)
                self._fast = False
                super().data_received(bytes(buf[pos:]))
                return
            end = start + (4 if second & 0x80 else 0) + length
            if end > size:
                need = end - pos
                break
            if (first == 0x81 or first == 0x82) and second & 0x80 and plain:
                # A whole masked text (0x81) or binary (0x82) frame, FIN set, no RSV bit: what
                # handle_text / handle_bytes do with websockets' Frame.
                payload = apply_mask(buf[start + 4 : end], buf[start : start + 4])
                if got is not None:
                    if first == 0x82:
                        got.append(payload)
                        pos = end
                        continue
                    try:
                        got.append(payload.decode())
                        pos = end
                        continue
                    except UnicodeDecodeError:
                        pass  # send_receive_event_to_app closes with 1007, after the frames before
                    if got:
                        self._hand_frames(got)
                        got = []
                self.curr_msg_data_type = "text" if first == 0x81 else "bytes"
                self.frames = [payload]
                self.send_receive_event_to_app()
                plain = self._plain_ok()
            else:
                # A control frame, a fragment, an unmasked frame, RSV bits, anything after a
                # close...: websockets' own, and always whole, so that it stays at a frame boundary.
                if got:
                    self._hand_frames(got)
                    got = []
                super().data_received(bytes(buf[pos:end]))
                if conn.parser_exc is not None:
                    self._fast = False  # it failed the connection and discards what follows
                    return
                plain = self._plain_ok()
            pos = end
        if got:
            self._hand_frames(got)
        if pos < size:
            self._tail = bytearray(buf[pos:]) if pos or not isinstance(buf, bytearray) else buf
            self._need = need

    def _hand_frames(self, frames: list[str | bytes]) -> None:
        # What send_receive_event_to_app does for each of these messages (text already decoded), at once.
        last = self.queue.last()
        if last is not None and last["type"] == RECEIVE_FRAMES:
            last["frames"] += frames
            return  # reading is paused already: it was when that message was queued
        self.queue.put_nowait({"type": RECEIVE_FRAMES, "frames": frames})
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def send_receive_event_to_app(self) -> None:
        if not self.receive_batched or self.close_sent:
            super().send_receive_event_to_app()
            return
        data: Any = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.curr_msg_data_type == "text":
            try:
                data = data.decode()
            except UnicodeDecodeError:  # as the parent: close with 1007
                self.logger.exception("Invalid UTF-8 sequence received from client.")
                self.conn.send_close(1007)
                self.handle_parser_exception()
                return
        # Join the RECEIVE_FRAMES message the app has not taken yet, unless something (a
        # disconnect) was queued after it.
        last = self.queue.last()
        if last is not None and last["type"] == RECEIVE_FRAMES:
            last["frames"].append(data)
            return  # reading is paused already: it was when that message was queued
        self.queue.put_nowait({"type": RECEIVE_FRAMES, "frames": [data]})
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The app's task is created but has not run yet: it sees the extension in its scope.
        scope: Any = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][EXTENSION] = {}

    async def send(self, message: ASGISendEvent) -> None:
        msg: Any = message
        if msg["type"] == RECEIVE_BATCHED:
            self.receive_batched = True
            return
        if msg["type"] != SEND_FRAMES:
            await super().send(message)
            if msg["type"] == "websocket.accept" and self.conn.state is State.OPEN:
                self._fast = self._parser_at_frame_start()
            if self.handshake_complete and self.__dict__.get("response") is not None:
                # Answered (accepted or refused): the parent reads them no more.
                self.request = None  # type: ignore[assignment]
                self.response = None  # type: ignore[assignment]
            return
        # Back-pressure as in the parent's send: wait while the transport's buffer is full.
        await self.writable.wait()
        if self.disconnected:
            raise ClientDisconnected()
        if not self.handshake_complete or self.close_sent or self.initial_response is not None:
            raise RuntimeError(f"Unexpected ASGI message {SEND_FRAMES!r} outside an open WebSocket.")
        conn = self.conn
        frames: list[bytes] = msg["frames"]
        if conn.state is State.OPEN and not (conn.extensions or conn.expect_continuation_frame or conn.debug):
            # What conn.send_text does, without a Frame object per frame: FIN + text opcode, the
            # length, no mask (a server's frames are not masked), the payload.
            out = conn.data_to_send()  # anything queued before, e.g. a pong, goes first
            for frame in frames:
                n = len(frame)
                out.append(_head(n) if n < 126 else _HEAD16(0x81, 126, n) if n < 65536 else _HEAD64(0x81, 127, n))
                out.append(frame)
            self.transport.write(b"".join(out))
            return
        try:
            for frame in frames:
                conn.send_text(frame)
        except InvalidState:
            raise ClientDisconnected() from None
        self.transport.write(b"".join(conn.data_to_send()))
