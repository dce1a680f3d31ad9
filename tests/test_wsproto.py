"""broker/wsproto.py: many text frames in one ASGI message and one write, under real uvicorn."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from websockets.asyncio.client import connect

from broker.wsproto import (
    EXTENSION,
    RECEIVE_BATCHED,
    RECEIVE_FRAMES,
    SEND_FRAMES,
    BatchingWebSocketProtocol,
    Flag,
    Inbox,
)
from tests.servers import free_port, wait_for

Scope = dict[str, Any]


async def serve(app: Any, ws: Any, **options: Any) -> AsyncIterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws=ws, **options))
    task = asyncio.create_task(server.serve())
    try:
        await wait_for(lambda: server.started, 10)
        yield f"ws://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def frames_app(batches: list[list[bytes]], seen: list[Scope], errors: list[BaseException]) -> Any:
    """An app that sends each batch as one message, then closes, then tries one batch more."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        seen.append(scope)
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        for frames in batches:
            await send({"type": SEND_FRAMES, "frames": frames})
        await send({"type": "websocket.close", "code": 1000})
        try:
            await send({"type": SEND_FRAMES, "frames": [b"late"]})
        except Exception as exc:
            errors.append(exc)

    return app


async def test_a_batch_arrives_as_its_frames_in_order() -> None:
    batches = [[b'{"n":1}', b'{"n":2}', "\u00e9t\u00e9".encode()], [b'{"n":3}'], []]
    seen: list[Scope] = []
    errors: list[BaseException] = []
    async for url in serve(frames_app(batches, seen, errors), BatchingWebSocketProtocol):
        async with connect(url) as client:
            received = [await asyncio.wait_for(client.recv(), 5) for _ in range(4)]
        assert received == ['{"n":1}', '{"n":2}', "\u00e9t\u00e9", '{"n":3}']  # text frames, in order
        assert EXTENSION in seen[0]["extensions"]
        await wait_for(lambda: errors, 5)
        assert isinstance(errors[0], RuntimeError)  # after close, like websocket.send


async def test_other_protocols_do_not_advertise_it() -> None:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(scope)
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "hi"})
        await send({"type": "websocket.close", "code": 1000})

    async for url in serve(app, "websockets-sansio"):
        async with connect(url) as client:
            assert await asyncio.wait_for(client.recv(), 5) == "hi"
    assert EXTENSION not in seen[0].get("extensions", {})


@pytest.mark.parametrize("count", [1, 500])
async def test_one_write_per_batch(count: int) -> None:
    writes: list[int] = []

    class Counting(BatchingWebSocketProtocol):
        def connection_made(self, transport: Any) -> None:
            write = transport.write

            def counted(data: Any) -> None:
                writes.append(len(data))
                write(data)

            transport.write = counted
            super().connection_made(transport)

    frames = [b'{"op":"job","n":%d}' % i for i in range(count)]
    async for url in serve(frames_app([frames], [], []), Counting, ws_per_message_deflate=False):
        async with connect(url) as client:
            received = [await asyncio.wait_for(client.recv(), 5) for _ in range(count)]
    assert received == [f.decode() for f in frames]
    # Handshake response, the batch, the close frame.
    assert len(writes) == 3
    assert writes[1] == sum(len(f) + (2 if len(f) < 126 else 4) for f in frames)


@pytest.mark.parametrize("deflate", [False, True])
async def test_frames_of_every_length_class(deflate: bool) -> None:
    # Without an extension the protocol writes the frame headers itself: 7-bit, 16-bit and 64-bit
    # lengths at their edges; with permessage-deflate websockets frames them.
    frames = [b'"' + b"x" * (n - 2) + b'"' for n in (2, 125, 126, 127, 65535, 65536, 70000)]
    async for url in serve(frames_app([frames], [], []), BatchingWebSocketProtocol, ws_per_message_deflate=deflate):
        async with connect(url, max_size=None, compression="deflate" if deflate else None) as client:
            received = [await asyncio.wait_for(client.recv(), 5) for _ in frames]
    assert received == [f.decode() for f in frames]


async def test_frames_of_one_read_arrive_in_one_message() -> None:
    messages: list[dict[str, Any]] = []
    sent = asyncio.Event()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": RECEIVE_BATCHED})
        await sent.wait()  # the client's frames wait in the socket meanwhile
        while not messages or messages[-1]["type"] != "websocket.disconnect":
            messages.append(await receive())

    texts = [f'{{"n":{i}}}' for i in range(200)]
    async for url in serve(app, BatchingWebSocketProtocol):
        async with connect(url) as client:
            for i, text in enumerate(texts):
                await client.send(text if i != 7 else text.encode())
            sent.set()
        await wait_for(lambda: messages and messages[-1]["type"] == "websocket.disconnect", 5)
    *batches, last = messages
    assert all(m["type"] == RECEIVE_FRAMES for m in batches)
    received = [frame for m in batches for frame in m["frames"]]
    assert received == [t if i != 7 else t.encode() for i, t in enumerate(texts)]  # binary stays bytes
    assert len(batches) <= 3  # one message per socket read, not per frame
    assert last["code"] == 1000


async def test_inbox_hands_items_in_order_to_waiting_getters() -> None:
    inbox: Inbox[int] = Inbox()
    assert inbox.empty()
    first = asyncio.create_task(inbox.get())
    cancelled = asyncio.create_task(inbox.get())
    second = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    cancelled.cancel()  # a getter that gives up does not take an item, nor stop the others
    inbox.put_nowait(1)
    inbox.put_nowait(2)
    assert sorted([await first, await second]) == [1, 2]
    assert cancelled.cancelled() and inbox.empty()
    inbox.put_nowait(3)
    assert not inbox.empty() and await inbox.get() == 3


async def test_flag_blocks_waiters_while_cleared() -> None:
    flag = Flag()
    assert flag.is_set() and await flag.wait()
    flag.clear()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(2)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    flag.set()
    assert await asyncio.gather(*waiters) == [True, True]


async def test_the_handshake_is_not_kept_after_accept() -> None:
    protocols: list[BatchingWebSocketProtocol] = []

    class Kept(BatchingWebSocketProtocol):
        def connection_made(self, transport: Any) -> None:
            protocols.append(self)
            super().connection_made(transport)

    async for url in serve(frames_app([[b"x"]], [], []), Kept):
        async with connect(url) as client:
            assert await asyncio.wait_for(client.recv(), 5) == "x"
            (protocol,) = protocols
            assert protocol.request is None and protocol.response is None


# -- the input fast path: data frames parsed by the protocol, everything else by websockets -----


def echo_app(closes: list[int]) -> Any:
    """Echoes every text frame (binary: its length), receiving them batched."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": RECEIVE_BATCHED})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                closes.append(message["code"])
                return
            frames = message["frames"] if message["type"] == RECEIVE_FRAMES else [message.get("text")]
            out = [f.encode() if isinstance(f, str) else b"%d" % len(f) for f in frames]
            try:
                await send({"type": SEND_FRAMES, "frames": out})
            except RuntimeError:
                pass  # closed by the protocol meanwhile: the disconnect follows

    return app


def client_frame(payload: bytes, first: int = 0x81, masked: bool = True) -> bytes:
    n = len(payload)
    mask = b"\x01\x02\x03\x04" if masked else b""
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = bytes((first, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, bit | 127)) + n.to_bytes(8, "big")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if masked else payload
    return head + mask + body


async def raw_open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("ws://").rstrip("/").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return reader, writer


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await asyncio.wait_for(reader.readexactly(2), 5)
    n = second & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return first & 0x0F, await reader.readexactly(n)


async def test_frames_split_anywhere_and_interleaved_with_control_frames() -> None:
    closes: list[int] = []
    texts = [b'{"n":%d}' % i for i in range(50)] + [b'"' + b"y" * 300 + b'"', b'"' + b"z" * 70000 + b'"']
    stream = b"".join(client_frame(t) for t in texts[:10])
    stream += client_frame(b"ping!", first=0x89)  # a ping between data frames
    stream += client_frame(b'{"part":', first=0x01) + client_frame(b"1}", first=0x80)  # a fragmented message
    stream += b"".join(client_frame(t) for t in texts[10:]) + client_frame(b"\x00\x01\x02", first=0x82)
    async for url in serve(echo_app(closes), BatchingWebSocketProtocol, ws_max_size=2**20):
        reader, writer = await raw_open(url)
        for i in range(0, len(stream), 7):  # every frame split across reads, some headers too
            writer.write(stream[i : i + 7])
            await writer.drain()
        got = [await read_frame(reader) for _ in range(len(texts) + 3)]
        writer.write(client_frame(b"\x03\xe8", first=0x88))  # close 1000
        assert await read_frame(reader) == (0x8, b"\x03\xe8")
        writer.close()
        await wait_for(lambda: closes, 5)
    assert [frame for frame in got if frame[0] != 0x1] == [(0xA, b"ping!")]  # the pong
    echoed = [payload for opcode, payload in got if opcode == 0x1]
    assert echoed == [*texts[:10], b'{"part":1}', *texts[10:], b"3"]  # the binary frame's length last
    assert closes == [1000]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (client_frame(b"\xff\xfe"), 1007),  # invalid UTF-8
        (client_frame(b"{}", masked=False), 1002),  # a client's frames must be masked
        (client_frame(b"{}", first=0xC1), 1002),  # RSV1 without an extension
        (client_frame(b"x" * 2000), 1009),  # over ws_max_size
    ],
)
async def test_bad_frames_close_as_websockets_does(frame: bytes, code: int) -> None:
    closes: list[int] = []
    async for url in serve(echo_app(closes), BatchingWebSocketProtocol, ws_max_size=1000):
        reader, writer = await raw_open(url)
        writer.write(client_frame(b'{"ok":1}') + frame + client_frame(b'{"after":1}'))
        got = [await read_frame(reader)]
        while got[-1][0] != 0x8:
            got.append(await read_frame(reader))
        *echoed, (_, payload) = got
        assert int.from_bytes(payload[:2], "big") == code
        assert set(echoed) <= {(0x1, b'{"ok":1}')}  # nothing after the bad frame
        writer.close()
        await wait_for(lambda: closes, 5)
    assert closes[0] == code
