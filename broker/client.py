"""``broker.Client``: the asyncio client of a presque broker.

Pushes, ``publish`` and ``listen`` go over one persistent WebSocket (:mod:`broker.link`), many
pushes in flight at once; everything the WebSocket has no verb for goes over keep-alive HTTP/1.1
(:mod:`broker.transport`). Broker errors are raised as the typed exceptions of
:mod:`broker.errors`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson

from broker.errors import BrokerError, NoJob
from broker.link import Link, Subscription
from broker.models import validate_queue
from broker.transport import (
    BrokerUnreachable,
    ConnectionLost,
    Endpoint,
    HTTPTransport,
    PushUnconfirmed,
    Response,
    error_from_http,
    path,
)

__all__ = ["BrokerUnreachable", "Client", "ConnectionLost", "FetchedJob", "PushUnconfirmed"]

DEFAULT_URL = "http://127.0.0.1:5000"
BATCH = 1000  # jobs per batch frame in push_many (the broker's default limits.max_batch)
_END = object()


@dataclass(frozen=True, slots=True)
class FetchedJob:
    """A job taken with :meth:`Client.fetch`.

    Attributes:
        id: the job's id.
        queue: its queue.
        attempt: deliveries so far (1 on the first).
        body: the decoded JSON body.
        token: the lease token (leased fetch), else None (destructive fetch: the job is gone).
    """

    id: str
    queue: str
    attempt: int
    body: Any
    token: str | None = None


class Client:
    """Asynchronous client of a presque broker; use it as ``async with Client(url) as client``.

    Args:
        url: the broker's base URL (``http://host:port``).
        token: bearer token sent on every HTTP request and on the WebSocket handshake.
        timeout: seconds to wait for the broker (connecting, and each HTTP answer) before
            raising :class:`~broker.transport.BrokerUnreachable`.
        max_frame: the broker's ``limits.max_frame``: a push larger than this is refused locally.
    """

    def __init__(
        self, url: str = DEFAULT_URL, *, token: str | None = None, timeout: float = 30.0, max_frame: int = 1_048_576
    ) -> None:
        self.endpoint = Endpoint.parse(url)
        self.url = self.endpoint.base
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http_headers = {**headers, "User-Agent": "presque-client", "Accept": "application/json"}
        self._timeout = timeout
        self._max_frame = max_frame
        self._http: HTTPTransport | None = None
        self._link: Link | None = None
        self._ws_headers = headers

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the WebSocket and the HTTP connections."""
        if self._link is not None:
            await self._link.close()
        if self._http is not None:
            await self._http.close()

    @property
    def link(self) -> Link:
        """The persistent WebSocket (created on first use)."""
        if self._link is None:
            self._link = Link(
                self.endpoint.ws_url, headers=self._ws_headers, timeout=self._timeout, max_frame=self._max_frame
            )
        return self._link

    @property
    def http(self) -> HTTPTransport:
        if self._http is None:
            self._http = HTTPTransport(self.endpoint, headers=self._http_headers, timeout=self._timeout)
        return self._http

    # -- producing (WebSocket) ----------------------------------------------------------------------

    async def push(
        self,
        queue: str,
        body: Any,
        *,
        priority: int | None = None,
        delay: float | None = None,
        run_at: float | None = None,
        uniq: str | None = None,
        ttl: float | None = None,
        max_attempts: int | None = None,
    ) -> str:
        """Push one job and return its id once the broker confirmed it (``pushed``).

        Args:
            queue: the queue's name.
            body: any JSON value.
            priority: 0-9, higher first (default: the queue's, 5).
            delay: seconds before the job becomes ready.
            run_at: Unix time at which it becomes ready (instead of ``delay``).
            uniq: at most one pending, delayed or leased job per key in the queue.
            ttl: drop the job if it is not taken within ``ttl`` seconds of becoming ready.
            max_attempts: failures before it is dead-lettered (default: the queue's, 5).

        Raises:
            JobExists: ``uniq`` is taken; ``existing_id`` names the job holding it.
            PushUnconfirmed: the connection dropped before the confirmation: the job may or may
                not exist. Push again with the same ``uniq`` to be sure of one job.
            BadQueueName, BadRequest, TooLarge, Forbidden, Unavailable: as the broker says.
        """
        validate_queue(queue)
        if run_at is not None:
            if delay is not None:
                raise ValueError("give delay or run_at, not both")
            delay = max(0.0, run_at - time.time())
        frame: dict[str, Any] = {"op": "push", "queue": queue, "body": body}
        for key, value in (
            ("priority", priority),
            ("delay", delay),
            ("uniq", uniq),
            ("ttl", ttl),
            ("max_attempts", max_attempts),
        ):
            if value is not None:
                frame[key] = value
        reply = await self.link.request(frame, push_queue=queue)
        return str(reply["id"])

    async def push_many(self, queue: str, bodies: Iterable[Any], *, batch_size: int = BATCH) -> list[str]:
        """Push many jobs, in order; returns their ids in the same order.

        Bodies go in batch frames of ``batch_size`` (each atomic on the broker), one after the
        other so that the queue keeps their order. If a batch fails, the exception propagates
        with the ids of the batches already pushed as its ``pushed_ids``.
        """
        validate_queue(queue)
        ids: list[str] = []
        chunk: list[Any] = []
        for body in itertools.chain(bodies, [_END]):
            if body is not _END:
                chunk.append(body)
            if chunk and (len(chunk) >= batch_size or body is _END):
                try:
                    reply = await self.link.request({"op": "push", "queue": queue, "jobs": chunk}, push_queue=queue)
                except BrokerError as exc:
                    exc.pushed_ids = ids  # type: ignore[attr-defined]
                    raise
                ids += [str(i) for i in reply["ids"]]
                chunk = []
        return ids

    async def publish(self, channel: str, data: Any) -> None:
        """Broadcast ``data`` to every listener of ``channel`` (at-most-once, nothing stored)."""
        validate_queue(channel)
        await self.link.request({"op": "publish", "channel": channel, "data": data})

    async def listen(self, channel: str) -> AsyncIterator[Any]:
        """Yield every message published on ``channel`` from now on (async generator).

        Messages published while the connection is down are missed (channels are ephemeral);
        the client listens again by itself after reconnecting.
        """
        validate_queue(channel)
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        await self.link.listen(channel, inbox)
        try:
            while True:
                yield await inbox.get()
        finally:
            await self.link.unlisten(channel, inbox)

    async def subscribe(self, sub: Subscription) -> None:
        """Subscribe to a queue with manual ack, now and after every reconnection (used by Worker)."""
        validate_queue(sub.queue)
        await self.link.subscribe(sub)

    # -- consuming over HTTP ------------------------------------------------------------------------

    async def fetch(self, queue: str, lease: float | None = None, *, wait: float | None = None) -> FetchedJob | None:
        """Take one job (``GET /q/{queue}``), or None when the queue has none.

        Without ``lease`` the fetch is destructive (presque's GET: the job is gone once returned).
        With ``lease`` the job is reserved for that many seconds under ``token``: :meth:`ack` it
        when done, :meth:`nack` to fail it, :meth:`touch` to keep it longer.
        ``wait`` (seconds, up to 30) long-polls for a job instead of answering None at once.

        Raises:
            QueueClosed: the queue is paused.
        """
        query = {"lease": lease, "wait": wait}
        extra = wait or 0.0
        response = await self._call(
            "GET", path("q", validate_queue(queue), query=query), timeout_extra=extra, ok=(200, 404)
        )
        if response.status == 404:
            error = error_from_http(response.status, response.body)
            if isinstance(error, NoJob):
                return None
            raise error
        h = response.headers
        return FetchedJob(
            id=h.get("x-presque-job-id", ""),
            queue=queue,
            attempt=int(h.get("x-presque-attempt", "1")),
            body=response.json(),
            token=h.get("x-presque-lease-token"),
        )

    async def ack(self, queue: str, job_id: str, token: str) -> None:
        """Acknowledge a leased job: it is done and leaves the broker.

        Raises:
            UnknownJob: no such job. StaleToken: the lease expired and the job moved on.
        """
        await self._settle(queue, job_id, "ack", {"token": token})

    async def nack(
        self, queue: str, job_id: str, token: str, *, delay: float | None = None, error: str | None = None
    ) -> dict[str, Any]:
        """Fail a leased job: retried after its backoff (or ``delay``) or dead-lettered.

        Returns:
            ``{"id", "status": "retry"|"dead"..., "run_at"}`` as the broker answers.
        """
        return await self._settle(queue, job_id, "nack", {"token": token, "delay": delay, "error": error})

    async def touch(self, queue: str, job_id: str, token: str, *, lease: float | None = None) -> float:
        """Extend a lease to ``lease`` seconds from now (default: as taken); returns the deadline."""
        reply = await self._settle(queue, job_id, "touch", {"token": token, "lease": lease})
        return float(reply["deadline"])

    async def _settle(self, queue: str, job_id: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
        payload = orjson.dumps({k: v for k, v in body.items() if v is not None})
        response = await self._call("POST", path("j", validate_queue(queue), job_id, action), body=payload)
        result: dict[str, Any] = response.json()
        return result

    async def job(self, queue: str, job_id: str) -> dict[str, Any]:
        """One job's state (``GET /j/{queue}/{id}``); raises UnknownJob when it no longer exists."""
        return await self._object("GET", path("j", validate_queue(queue), job_id))

    # -- operating ----------------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """The broker's figures (``GET /stats``): totals, per-queue sizes, counters and rates."""
        return await self._object("GET", "/stats")

    async def queue_info(self, queue: str) -> dict[str, Any]:
        """One queue's sizes and counters (``GET /j/{queue}``)."""
        return await self._object("GET", path("j", validate_queue(queue)))

    async def queues(self) -> list[str]:
        """Every queue's name (``GET /status/``)."""
        names: list[str] = (await self._object("GET", "/status/"))["queues"]
        return names

    async def pause(self, queue: str) -> None:
        """Stop handing out jobs of ``queue`` (pushes are still accepted)."""
        await self._call("POST", path("control", validate_queue(queue)), body=b'{"status":"stop"}')

    async def resume(self, queue: str) -> None:
        """Start handing out jobs of ``queue`` again."""
        await self._call("POST", path("control", validate_queue(queue)), body=b'{"status":"start"}')

    async def purge(self, queue: str) -> None:
        """Delete the ready and delayed jobs of ``queue``."""
        await self._call("DELETE", path("q", validate_queue(queue)))

    async def dead(self, queue: str, *, offset: int = 0, limit: int = 50) -> dict[str, Any]:
        """The dead-letter list: ``{"total", "jobs": [{"id", "body", "attempt", "last_error", "failed_at"}]}``."""
        return await self._object("GET", path("dead", validate_queue(queue), query={"offset": offset, "limit": limit}))

    async def retry_dead(self, queue: str, ids: Sequence[str] | None = None) -> int:
        """Put dead jobs back in the queue (those ``ids``, else all); returns how many."""
        body = orjson.dumps({"ids": list(ids)} if ids is not None else {})
        reply = await self._object("POST", path("dead", validate_queue(queue), "retry"), body=body)
        return int(reply["retried"])

    async def purge_dead(self, queue: str) -> None:
        """Delete every dead job of ``queue``."""
        await self._call("DELETE", path("dead", validate_queue(queue)))

    async def workers(self, queue: str | None = None) -> list[str]:
        """Ids of the registered workers (``GET /w/``), or of those working on ``queue``."""
        if queue is not None:
            reply = await self._object("GET", path("w", "", query={"queue_name": validate_queue(queue)}))
            on_queue: list[str] = reply["workers_list"]
            return on_queue
        ids: list[str] = await self._json("GET", "/w/")
        return ids

    async def register_worker(self, worker_id: str, queue: str, info: dict[str, Any]) -> None:
        """Register (or refresh) a worker on ``queue`` (``POST /w/{queue}``)."""
        headers = {"X-presque-workerid": worker_id}
        await self._call("POST", path("w", validate_queue(queue)), body=orjson.dumps(info), headers=headers)

    async def unregister_worker(self, worker_id: str, queue: str) -> None:
        """Remove a worker from ``queue`` (``DELETE /w/{queue}``)."""
        await self._call("DELETE", path("w", validate_queue(queue)), headers={"X-presque-workerid": worker_id})

    async def health(self) -> dict[str, Any]:
        """``GET /health``: ``{"status": "ok"}``, or raises Unavailable when Redis is down."""
        return await self._object("GET", "/health")

    # -- HTTP plumbing ------------------------------------------------------------------------------

    async def _json(self, method: str, target: str, *, body: bytes | None = None) -> Any:
        return (await self._call(method, target, body=body)).json()

    async def _object(self, method: str, target: str, *, body: bytes | None = None) -> dict[str, Any]:
        data = await self._json(method, target, body=body)
        if not isinstance(data, dict):
            raise BrokerError(f"unexpected answer from the broker to {method} {target}: {data!r:.80}")
        return data

    async def _call(
        self,
        method: str,
        target: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (),
        timeout_extra: float = 0.0,
    ) -> Response:
        timeout = self._timeout + timeout_extra
        response = await self.http.request(method, target, body=body, headers=headers, timeout=timeout)
        if response.status >= 400 and response.status not in ok:
            raise error_from_http(response.status, response.body, response.headers)
        return response
