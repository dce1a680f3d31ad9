"""Ledger-keeping clients for the fault and soak tests: what was confirmed, delivered and acked.

A push counts only once the broker confirmed it (HTTP 201, WebSocket ``pushed``); an ack only
once the broker answered ``ok`` to it. The checks at the end of a test are then exact:

- every confirmed push was delivered and acked (nothing lost);
- no job was delivered again after its ack was confirmed (nothing acked comes back);
- a job delivered more than once came back with a higher ``attempt`` (a lease expired or its
  consumer went away), never as a silent copy.

Pushes that failed or whose reply never came (the broker died meanwhile) are "unconfirmed": the
job may or may not exist, and delivering it is allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

_refs = itertools.count()
T = TypeVar("T")
C = TypeVar("C", bound="WsClient")


def memory_kib(pid: int) -> tuple[int, int]:
    """(resident set size, its peak so far) of a process in KiB: VmRSS and VmHWM of /proc/<pid>/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


@dataclass
class Ledger:
    """Every job id a test pushed, saw delivered and acked, with the violations found on the way."""

    pushed: set[str] = field(default_factory=set)
    unconfirmed: int = 0  # pushes sent whose outcome is unknown (error, reply lost)
    deliveries: Counter[str] = field(default_factory=Counter)
    attempts: defaultdict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    acked: set[str] = field(default_factory=set)
    redelivered_after_ack: list[str] = field(default_factory=list)

    receivers: defaultdict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def delivered(self, job_id: str, attempt: int, receiver: int = 0) -> None:
        """Record a delivery; ``receiver`` names the client that got it (``id()`` of it)."""
        if job_id in self.acked:
            self.redelivered_after_ack.append(job_id)
        self.deliveries[job_id] += 1
        self.attempts[job_id].append(attempt)
        self.receivers[job_id].append(receiver)

    @property
    def lost(self) -> set[str]:
        """Confirmed pushes not acked (yet)."""
        return self.pushed - self.acked

    @property
    def duplicates(self) -> dict[str, int]:
        """Jobs delivered more than once: id -> deliveries."""
        return {job_id: n for job_id, n in self.deliveries.items() if n > 1}

    def all_acked(self) -> bool:
        return not self.lost

    def check(self) -> None:
        """Assert the ledger's invariants (call once everything should have been acked)."""
        assert not self.redelivered_after_ack, f"acked jobs delivered again: {self.redelivered_after_ack[:10]}"
        lost = self.lost
        assert not lost, f"{len(lost)} confirmed pushes never acked, e.g. {sorted(lost)[:10]}"
        for job_id in self.duplicates:
            seen = self.attempts[job_id]
            assert seen == sorted(seen) and len(set(seen)) == len(seen), (
                f"{job_id} delivered twice under the same attempt number: {seen}"
            )

    def summary(self) -> str:
        dups = self.duplicates
        return (
            f"pushed={len(self.pushed)} unconfirmed={self.unconfirmed} delivered={len(self.deliveries)} "
            f"acked={len(self.acked)} duplicates={len(dups)} (extra deliveries {sum(dups.values()) - len(dups)})"
        )


class Harness:
    """Closes the WebSocket clients and cancels the background tasks a test started, even when it fails."""

    def __init__(self) -> None:
        self.clients: list[WsClient] = []
        self.tasks: list[asyncio.Task[Any]] = []

    async def client(self, client: C) -> C:
        """Connect ``client`` (and subscribe a :class:`Consumer`); close it at the end of the test."""
        self.clients.append(client)
        if isinstance(client, Consumer):
            await client.start()
        else:
            await client.connect()
        return client

    def task(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coro)
        self.tasks.append(task)
        return task

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(client.close() for client in self.clients))


class WsClient:
    """A raw WebSocket client: send frames, get replies by ``ref``, collect everything else."""

    def __init__(self, url: str, *, max_queue: int | None = 64, **connect_args: Any) -> None:
        self.url = url
        self.connect_args = {"open_timeout": 10, "ping_interval": None, "max_queue": max_queue, **connect_args}
        self.ws: ClientConnection | None = None
        self.errors: list[dict[str, Any]] = []  # unsolicited error frames (no ref)
        self.messages: list[Any] = []  # the data of broadcast messages received
        self.closed = asyncio.Event()
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def connect(self) -> WsClient:
        self.ws = await connect(self.url, **self.connect_args)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(ConnectionClosed):
            async for raw in self.ws:
                self.on_frame(orjson.loads(raw))
        self.closed.set()
        for future in self._replies.values():
            if not future.done():
                future.set_exception(ConnectionError("websocket closed"))

    async def pause_reading(self) -> None:
        """Stop reading the socket (a slow reader): the client library stops draining the TCP
        connection once its small queue is full, so the broker's writes back up."""
        assert self._reader is not None
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self._reader = None

    def resume_reading(self) -> None:
        assert self._reader is None
        self._reader = asyncio.create_task(self._read())

    def on_frame(self, frame: dict[str, Any]) -> None:
        ref = frame.get("ref")
        if ref is not None and ref in self._replies:
            future = self._replies.pop(ref)
            if not future.done():
                future.set_result(frame)
        elif frame.get("op") == "error":
            self.errors.append(frame)
        elif frame.get("op") == "message":
            self.messages.append(frame["data"])

    async def send(self, frame: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(orjson.dumps(frame).decode())

    async def request(self, frame: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send ``frame`` with a fresh ``ref`` and wait for the reply carrying it."""
        ref = f"r{next(_refs)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[ref] = future
        try:
            await self.send({**frame, "ref": ref})
            return await asyncio.wait_for(future, timeout)
        finally:
            self._replies.pop(ref, None)

    def abort(self) -> None:
        """Drop the TCP connection without a closing handshake (a crashed client)."""
        assert self.ws is not None
        self.ws.transport.abort()

    async def close(self) -> None:
        if self.ws is not None:
            if self._reader is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.ws.close(), 5)
            # Paused, or the closing handshake did not finish: nobody reads the server's close frame.
            if not self.ws.transport.is_closing():
                self.ws.transport.abort()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)


class Consumer(WsClient):
    """A subscriber that records deliveries in a ledger and acks them (unless told not to).

    Args:
        url: ``ws://.../ws``.
        queue: queue to subscribe to.
        ledger: where deliveries and confirmed acks are recorded.
        prefetch, lease, ack: the subscription (``ack="auto"`` counts a delivery as acked).
        should_ack: which deliveries to ack (frame -> bool); default all. Unacked ones are kept
            in :attr:`held` until :meth:`ack_held`.
        ack_after: ack this many seconds after the delivery (a slow job) instead of at once.
    """

    def __init__(
        self,
        url: str,
        queue: str,
        ledger: Ledger,
        *,
        prefetch: int = 10,
        lease: float = 30.0,
        ack: str = "manual",
        should_ack: Callable[[dict[str, Any]], bool] | None = None,
        ack_after: float = 0.0,
        **connect_args: Any,
    ) -> None:
        super().__init__(url, **connect_args)
        self.ack_after = ack_after
        self.queue = queue
        self.ledger = ledger
        self.subscription = {"op": "subscribe", "queue": queue, "prefetch": prefetch, "ack": ack, "lease": lease}
        self.auto = ack == "auto"
        self.should_ack = should_ack or (lambda frame: True)
        self.held: dict[str, str] = {}  # id -> token, delivered and deliberately not acked
        self.received = 0
        self.stale_acks: list[str] = []  # acks refused as stale_token (its lease had expired)
        self._pending: dict[str, str] = {}  # ack ref -> job id
        self._acked_refs = itertools.count()

    async def start(self) -> Consumer:
        await self.connect()
        reply = await self.request(self.subscription)
        assert reply["op"] == "subscribed", reply
        return self

    def on_frame(self, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op == "job" and frame.get("queue") == self.queue:
            self.received += 1
            self.ledger.delivered(frame["id"], frame["attempt"], id(self))
            if self.auto:
                self.ledger.acked.add(frame["id"])
            elif not self.should_ack(frame):
                self.held[frame["id"]] = frame["token"]
            elif self.ack_after:
                asyncio.get_running_loop().call_later(self.ack_after, self._ack, frame["id"], frame["token"])
            else:
                self._ack(frame["id"], frame["token"])
            return
        ref = frame.get("ref")
        if isinstance(ref, str) and ref in self._pending:
            job_id = self._pending.pop(ref)
            if op == "ok":
                self.ledger.acked.add(job_id)
            elif frame.get("code") == "stale_token":
                self.stale_acks.append(job_id)
            else:
                self.errors.append(frame)
            return
        super().on_frame(frame)

    def _ack(self, job_id: str, token: str) -> None:
        ref = f"a{next(self._acked_refs)}"
        self._pending[ref] = job_id
        frame = {"op": "ack", "queue": self.queue, "id": job_id, "token": token, "ref": ref}
        asyncio.get_running_loop().create_task(self._send_quietly(frame))

    async def _send_quietly(self, frame: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionClosed, RuntimeError):
            await self.send(frame)

    def ack_held(self) -> None:
        """Ack every job held so far (a stale one is answered ``stale_token``)."""
        held, self.held = self.held, {}
        for job_id, token in held.items():
            self._ack(job_id, token)


class WsProducer(WsClient):
    """Pushes bodies over one WebSocket with up to ``window`` pushes awaiting ``pushed``."""

    def __init__(self, url: str, queue: str, ledger: Ledger, *, window: int = 10, **connect_args: Any) -> None:
        super().__init__(url, **connect_args)
        self.queue = queue
        self.ledger = ledger
        self.window = window
        self.failures: list[str] = []

    async def run(self, count: int | None = None, stop: asyncio.Event | None = None, body: Any = None) -> int:
        """Push until ``count`` are sent, ``stop`` is set or a push fails; returns how many were confirmed."""
        confirmed = 0
        sent = itertools.count()
        lock = asyncio.Lock()

        async def lane() -> None:
            nonlocal confirmed
            while not (stop and stop.is_set()) and not self.closed.is_set():
                async with lock:
                    n = next(sent)
                    if count is not None and n >= count:
                        return
                try:
                    reply = await self.request(
                        {"op": "push", "queue": self.queue, "body": body if body is not None else {"n": n}}
                    )
                except (ConnectionError, ConnectionClosed, TimeoutError) as exc:
                    self.ledger.unconfirmed += 1
                    self.failures.append(repr(exc))
                    return
                if reply.get("op") == "pushed":
                    self.ledger.pushed.add(reply["id"])
                    confirmed += 1
                else:
                    self.ledger.unconfirmed += 1  # e.g. unavailable: a timed-out push may still land
                    self.failures.append(reply.get("code", "?"))
                    return

        await asyncio.gather(*(lane() for _ in range(self.window)))
        return confirmed


async def http_produce(
    client: httpx.AsyncClient,
    url: str,
    queue: str,
    ledger: Ledger,
    *,
    count: int | None = None,
    stop: asyncio.Event | None = None,
    body: bytes | None = None,
    failures: list[str] | None = None,
) -> int:
    """POST jobs one by one until ``count`` confirmed, ``stop`` is set or a request fails."""
    confirmed = 0
    n = 0
    while not (stop and stop.is_set()) and (count is None or confirmed < count):
        n += 1
        try:
            response = await client.post(f"{url}/q/{queue}", content=body or orjson.dumps({"h": n}))
        except httpx.HTTPError as exc:
            ledger.unconfirmed += 1
            if failures is not None:
                failures.append(repr(exc))
            return confirmed
        if response.status_code != 201:
            ledger.unconfirmed += 1
            if failures is not None:
                failures.append(f"{response.status_code} {response.text}")
            return confirmed
        ledger.pushed.add(response.json()["id"])
        confirmed += 1
    return confirmed
