"""Load generators, each run in a child process (see ``harness.py`` for the start protocol).

Every workload connects first, reports ``ready``, waits for ``go`` with three monotonic
instants — start the load, start measuring, stop — and returns counts and the latencies it saw
inside the measured window. Throughput itself is read from Redis counters by the parent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import orjson

from bench.wire import ClosedLoopHttp, HttpConn, Window, WsConn, http_connect, http_request, now, ws_connect, ws_frame

Params = dict[str, Any]
PUSHED = b'{"op":"pushed"'


class Control:
    """The child's side of the pipe to the parent."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    async def ready(self, info: Any = None) -> tuple[float, float, float]:
        """Tell the parent we are connected; wait for (go, measure_from, end)."""
        self.pipe.send(("ready", info))
        msg = await asyncio.get_running_loop().run_in_executor(None, self.pipe.recv)
        _, t_go, t_measure, t_end = msg
        await asyncio.sleep(max(0.0, t_go - now()))
        return t_go, t_measure, t_end


async def _sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - now()))


def _result(window: Window, **extra: Any) -> dict[str, Any]:
    return {
        "count": window.count,
        "total": window.total,
        "errors": window.errors,
        "latencies": window.latencies,
        **extra,
    }


# -- HTTP push -----------------------------------------------------------------------------------


async def http_push(ctl: Control, p: Params) -> dict[str, Any]:
    """Closed loop: ``connections`` keep-alive connections, each one request in flight."""
    address = tuple(p["address"])
    conns = [await http_connect(address) for _ in range(p["connections"])]  # type: ignore[arg-type]
    request = http_request("POST", p["path"], p["body"])
    _, t_measure, t_end = await ctl.ready()
    window = Window(t_measure, t_end)
    run = ClosedLoopHttp(conns, lambda: request, window, ok=201)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(run.done, t_end - now() + 10)
    for c in conns:
        assert c.transport is not None
        c.transport.close()
    return _result(window)


async def http_paced(ctl: Control, p: Params) -> dict[str, Any]:
    """Open loop: ``rate`` pushes per second, body ``{"t": send time}``, over a pool of connections."""
    address = tuple(p["address"])
    conns = [await http_connect(address) for _ in range(p["connections"])]  # type: ignore[arg-type]
    head = f"POST {p['path']} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n".encode()
    idle: list[HttpConn] = []
    window_stats = {"sent": 0, "late": 0, "errors": 0}
    backlog = [0]

    def send(conn: HttpConn) -> None:
        body = b'{"t":%.9f}' % now()
        conn.send(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        window_stats["sent"] += 1

    def reply_handler(conn: HttpConn) -> Any:
        def on_reply(status: int, body: bytes) -> None:
            if status != 201:
                window_stats["errors"] += 1
            if backlog[0]:
                backlog[0] -= 1
                send(conn)
            else:
                idle.append(conn)

        return on_reply

    for c in conns:
        c.on_reply = reply_handler(c)
        idle.append(c)
    t_go, _, t_end = await ctl.ready()
    await _pace(p["rate"], t_go, t_end, idle, send, backlog, window_stats)
    await asyncio.sleep(0.2)
    for c in conns:
        assert c.transport is not None
        c.transport.close()
    return window_stats


async def _pace(
    rate: float, t_go: float, t_end: float, idle: list[Any], send: Any, backlog: list[int], stats: dict[str, int]
) -> None:
    """Send ``rate`` messages per second from ``t_go`` to ``t_end`` on free senders (or queue them)."""
    interval = 1.0 / rate
    sent = 0
    while True:
        t = now()
        if t >= t_end:
            return
        due = int((t - t_go) / interval) + 1 - sent
        for _ in range(due):
            if idle:
                send(idle.pop())
            else:
                backlog[0] += 1
                stats["late"] += 1
        sent += due
        await asyncio.sleep(max(0.0, t_go + sent * interval - now()))


# -- WebSocket push ------------------------------------------------------------------------------


async def ws_push(ctl: Control, p: Params) -> dict[str, Any]:
    """``window`` confirmed pushes in flight on each WebSocket, one per entry of ``addresses``.

    With ``acked`` (a shared counter the consumers of the same run add to) and ``backlog``, a
    closed loop: no new push while more than ``backlog`` of this process's confirmed pushes are not
    acked yet, so the run measures a rate the broker sustains (pushed = acked), not how far
    producers can outrun consumers on a CPU they share with them.
    """
    frame = ws_frame(orjson.dumps({"op": "push", "queue": p["queue"], "body": p.get("body", {"n": 1})}))
    conns = [await ws_connect(tuple(a)) for a in p["addresses"]]  # type: ignore[arg-type]
    _, t_measure, t_end = await ctl.ready()
    window = Window(t_measure, t_end)
    done = asyncio.get_running_loop().create_future()
    live = [len(conns)]
    acked, backlog = p.get("acked"), p.get("backlog", 0)
    confirmed = [0]
    owed: dict[WsConn, int] = {}  # pushes held back per connection, by the closed loop
    in_flight: dict[WsConn, deque[float]] = {}  # send times of the pushes not confirmed yet

    def held() -> bool:
        return acked is not None and confirmed[0] - acked.value > backlog

    def send(conn: WsConn, sent: deque[float], k: int, t: float) -> None:
        sent.extend([t] * k)
        conn.send_raw(frame * k)

    def drive(conn: WsConn) -> None:
        sent = in_flight[conn] = deque()
        finished = [False]

        def on_frames(frames: list[bytes]) -> None:
            t = now()
            k = 0
            for f in frames:
                if f.startswith(PUSHED):
                    k += 1
                    window.record(sent.popleft(), t)
                elif f.startswith(b'{"op":"error"'):
                    window.errors += 1
                    sent.popleft()
            confirmed[0] += k
            if t < t_end:
                if held():
                    owed[conn] = owed.get(conn, 0) + k
                else:
                    send(conn, sent, k, t)
            elif not sent and not finished[0]:
                finished[0] = True
                live[0] -= 1
                if not live[0] and not done.done():
                    done.set_result(None)

        conn.on_frames = on_frames
        send(conn, sent, p["window"], now())

    for conn in conns:
        drive(conn)
    while acked is not None and now() < t_end:
        await asyncio.sleep(0.002)  # uvloop counts whole milliseconds: less would spin
        if owed and not held():
            t = now()
            for conn, k in owed.items():
                send(conn, in_flight[conn], k, t)
            owed.clear()
    # Pushes still held at the end were never sent: the wait below is for the replies of the rest.
    for conn in owed:
        if not in_flight[conn]:
            conn.on_frames([])
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done, t_end - now() + 10)
    for conn in conns:
        conn.close()
    return _result(window)


async def ws_paced(ctl: Control, p: Params) -> dict[str, Any]:
    """Open loop: ``rate`` pushes per second on one WebSocket, body ``{"t": send time}``."""
    conn = await ws_connect(tuple(p["address"]))  # type: ignore[arg-type]
    head = b'{"op":"push","queue":"' + p["queue"].encode() + b'","body":{"t":'
    stats = {"sent": 0, "late": 0, "errors": 0, "replies": 0}

    def on_frames(frames: list[bytes]) -> None:
        for f in frames:
            if f.startswith(PUSHED):
                stats["replies"] += 1
            else:
                stats["errors"] += 1

    conn.on_frames = on_frames

    # One WebSocket carries any number of pushes in flight: it is always free to send.
    def send(sender: object) -> None:
        conn.send(head + b"%.9f}}" % now())
        stats["sent"] += 1
        idle.append(sender)

    idle: list[object] = [conn]
    t_go, _, t_end = await ctl.ready()
    await _pace(p["rate"], t_go, t_end, idle, send, [0], stats)
    await asyncio.sleep(0.2)
    conn.close()
    return stats


# -- WebSocket consumers -------------------------------------------------------------------------


def _consumer(conn: WsConn, window: Window, acked: Any = None) -> None:
    """Ack every job as it arrives; record push-to-delivery latency of bodies ``{"t": ...}``;
    count the acks in the shared ``acked`` counter when there is one (see ``ws_push``)."""
    loads = orjson.loads

    def on_frames(frames: list[bytes]) -> None:
        t = now()
        acks = []
        for f in frames:
            msg = loads(f)
            op = msg["op"]
            if op == "job":
                body = msg["body"]
                if type(body) is dict and "t" in body:
                    window.record(body["t"], t)
                else:
                    window.record(t, t)
                acks.append(
                    ws_frame(b'{"op":"ack","id":"%s","token":"%s"}' % (msg["id"].encode(), msg["token"].encode()))
                )
            elif op == "error":
                window.errors += 1
        if acks:
            conn.send_raw(b"".join(acks))
            if acked is not None:
                with acked.get_lock():
                    acked.value += len(acks)

    conn.on_frames = on_frames


async def _subscribe(conn: WsConn, queue: str, prefetch: int) -> None:
    got = asyncio.get_running_loop().create_future()

    def on_frames(frames: list[bytes]) -> None:
        for f in frames:
            if f.startswith(b'{"op":"subscribed"') and not got.done():
                got.set_result(None)
            elif f.startswith(b'{"op":"error"') and not got.done():
                got.set_exception(RuntimeError(f.decode()))

    conn.on_frames = on_frames
    conn.send(orjson.dumps({"op": "subscribe", "queue": queue, "prefetch": prefetch, "ack": "manual"}))
    await asyncio.wait_for(got, 30)


async def ws_consume(ctl: Control, p: Params) -> dict[str, Any]:
    """``consumers`` WebSockets subscribed with manual ack and ``prefetch``; every job is acked."""
    address = tuple(p["address"])
    conns = [await ws_connect(address) for _ in range(p.get("consumers", 1))]  # type: ignore[arg-type]
    # Subscribe only at "go": a consumer subscribed early would drain a pre-filled queue before
    # the measurement starts.
    _, t_measure, t_end = await ctl.ready()
    window = Window(t_measure, t_end)
    for conn in conns:
        await _subscribe(conn, p["queue"], p["prefetch"])
        _consumer(conn, window, p.get("acked"))
    await _sleep_until(t_end)
    for conn in conns:
        conn.close()
    return _result(window)


async def ws_idle(ctl: Control, p: Params) -> dict[str, Any]:
    """Hold ``n`` subscribed WebSockets; record latency of the jobs that reach any of them."""
    address = tuple(p["address"])
    queue, prefetch = p["queue"], p.get("prefetch", 1)
    conns: list[WsConn] = []
    window = Window(0.0, 0.0)
    gate = asyncio.Semaphore(64)  # handshakes in flight at once
    failures: list[str] = []

    async def open_one() -> None:
        async with gate:
            try:
                conn = await ws_connect(address, "/ws", timeout=60)  # type: ignore[arg-type]
                await _subscribe(conn, queue, prefetch)
            except (OSError, TimeoutError, RuntimeError) as exc:
                failures.append(repr(exc))
                return
            _consumer(conn, window)
            conns.append(conn)

    await asyncio.gather(*(open_one() for _ in range(p["n"])))
    _, t_measure, t_end = await ctl.ready({"connected": len(conns), "failures": failures[:3]})
    window.start, window.end = t_measure, t_end
    await _sleep_until(t_end)
    await asyncio.sleep(0.3)
    closed = sum(1 for c in conns if c.lost.done())
    for conn in conns:
        conn.close()
    await asyncio.sleep(0.5)
    return _result(window, connected=len(conns), closed_early=closed)


async def ws_count(ctl: Control, p: Params) -> dict[str, Any]:
    """Count the text frames a server sends on one WebSocket (the no-op app's ``/ws``)."""
    conn = await ws_connect(tuple(p["address"]))  # type: ignore[arg-type]
    _, t_measure, t_end = await ctl.ready()
    window = Window(t_measure, t_end)

    def on_frames(frames: list[bytes]) -> None:
        t = now()
        for _ in frames:
            window.record(t, t)

    conn.on_frames = on_frames
    await _sleep_until(t_end)
    conn.close()
    return _result(window)


WORKLOADS = {
    "ws_count": ws_count,
    "http_push": http_push,
    "http_paced": http_paced,
    "ws_push": ws_push,
    "ws_paced": ws_paced,
    "ws_consume": ws_consume,
    "ws_idle": ws_idle,
}
