"""``broker.SyncClient``: the blocking client, for scripts and threaded code.

It runs a :class:`~broker.Client` on an event loop in a background (daemon) thread and waits for
each call's result, so it has exactly the async client's behaviour: one persistent WebSocket for
pushes, keep-alive HTTP for the rest, the same reconnection and the same exceptions. It is safe
to share between threads: pushes from many threads are in flight on the one socket at once.
"""

from __future__ import annotations

import asyncio
import queue as queue_module
import threading
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

from broker.client import DEFAULT_URL, Client, FetchedJob
from broker.models import validate_queue

T = TypeVar("T")


class SyncClient:
    """Blocking client of a presque broker; use it as ``with SyncClient(url) as client``.

    Takes the same arguments as :class:`~broker.Client` and has the same methods, blocking;
    :meth:`listen` returns a plain iterator.
    """

    def __init__(
        self, url: str = DEFAULT_URL, *, token: str | None = None, timeout: float = 30.0, max_frame: int = 1_048_576
    ) -> None:
        self._client = Client(url, token=token, timeout=timeout, max_frame=max_frame)
        self.url = self._client.url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="presque-client", daemon=True)
        self._thread.start()
        self._closed = False

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        """Close the connections and stop the background thread."""
        if self._closed:
            return
        try:
            self._run(self._client.close())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            if not self._thread.is_alive():
                self._loop.close()

    def push(
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
        """See :meth:`broker.Client.push`."""
        return self._run(
            self._client.push(
                queue,
                body,
                priority=priority,
                delay=delay,
                run_at=run_at,
                uniq=uniq,
                ttl=ttl,
                max_attempts=max_attempts,
            )
        )

    def push_many(self, queue: str, bodies: Iterable[Any], *, batch_size: int = 1000) -> list[str]:
        """See :meth:`broker.Client.push_many`."""
        return self._run(self._client.push_many(queue, list(bodies), batch_size=batch_size))

    def publish(self, channel: str, data: Any) -> None:
        """See :meth:`broker.Client.publish`."""
        self._run(self._client.publish(channel, data))

    def listen(self, channel: str) -> Iterator[Any]:
        """Yield every message published on ``channel`` (blocking); stop by closing the iterator.

        The broker has confirmed ``listening`` when this call returns, so a message published
        after it is not missed (while the connection stays up: channels are at-most-once).
        """
        inbox: queue_module.Queue[Any] = queue_module.Queue()
        self._run(self._client.link.listen(validate_queue(channel), inbox))
        return self._messages(channel, inbox)

    def _messages(self, channel: str, inbox: queue_module.Queue[Any]) -> Iterator[Any]:
        try:
            while not self._closed:
                try:
                    yield inbox.get(timeout=0.5)
                except queue_module.Empty:
                    continue
        finally:
            if not self._closed:
                self._run(self._client.link.unlisten(channel, inbox))

    def fetch(self, queue: str, lease: float | None = None, *, wait: float | None = None) -> FetchedJob | None:
        """See :meth:`broker.Client.fetch`."""
        return self._run(self._client.fetch(queue, lease, wait=wait))

    def ack(self, queue: str, job_id: str, token: str) -> None:
        """See :meth:`broker.Client.ack`."""
        self._run(self._client.ack(queue, job_id, token))

    def nack(
        self, queue: str, job_id: str, token: str, *, delay: float | None = None, error: str | None = None
    ) -> dict[str, Any]:
        """See :meth:`broker.Client.nack`."""
        return self._run(self._client.nack(queue, job_id, token, delay=delay, error=error))

    def touch(self, queue: str, job_id: str, token: str, *, lease: float | None = None) -> float:
        """See :meth:`broker.Client.touch`."""
        return self._run(self._client.touch(queue, job_id, token, lease=lease))

    def job(self, queue: str, job_id: str) -> dict[str, Any]:
        """See :meth:`broker.Client.job`."""
        return self._run(self._client.job(queue, job_id))

    def stats(self) -> dict[str, Any]:
        """See :meth:`broker.Client.stats`."""
        return self._run(self._client.stats())

    def queue_info(self, queue: str) -> dict[str, Any]:
        """See :meth:`broker.Client.queue_info`."""
        return self._run(self._client.queue_info(queue))

    def queues(self) -> list[str]:
        """See :meth:`broker.Client.queues`."""
        return self._run(self._client.queues())

    def pause(self, queue: str) -> None:
        """See :meth:`broker.Client.pause`."""
        self._run(self._client.pause(queue))

    def resume(self, queue: str) -> None:
        """See :meth:`broker.Client.resume`."""
        self._run(self._client.resume(queue))

    def purge(self, queue: str) -> None:
        """See :meth:`broker.Client.purge`."""
        self._run(self._client.purge(queue))

    def dead(self, queue: str, *, offset: int = 0, limit: int = 50) -> dict[str, Any]:
        """See :meth:`broker.Client.dead`."""
        return self._run(self._client.dead(queue, offset=offset, limit=limit))

    def retry_dead(self, queue: str, ids: Sequence[str] | None = None) -> int:
        """See :meth:`broker.Client.retry_dead`."""
        return self._run(self._client.retry_dead(queue, ids))

    def purge_dead(self, queue: str) -> None:
        """See :meth:`broker.Client.purge_dead`."""
        self._run(self._client.purge_dead(queue))

    def workers(self, queue: str | None = None) -> list[str]:
        """See :meth:`broker.Client.workers`."""
        return self._run(self._client.workers(queue))

    def health(self) -> dict[str, Any]:
        """See :meth:`broker.Client.health`."""
        return self._run(self._client.health())
