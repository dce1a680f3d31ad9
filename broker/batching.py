"""Coalescer: turns many concurrent single operations into one Redis call per key.

Sixty-four clients each pushing one job are, to Redis, sixty-four round trips; collected while
the previous call is in flight, they become one script call. Per key (a queue) at most one call
is in flight, so the batch grows exactly as fast as Redis is slow — no timer, no added latency
when the broker is idle (the first item is sent at once, on the next loop iteration).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

# The flush function gets a key and the batch, and returns one result per item: a value, or an
# exception that is raised to that item's caller only.
Flush = Callable[[str, Sequence[Item]], Awaitable[Sequence[Result | BaseException]]]


class Coalescer(Generic[Item, Result]):
    """Batch ``submit(key, item)`` calls per key into calls of ``flush(key, items)``.

    Args:
        flush: does the batched work; one result (or exception) per item, in order.
        max_batch: the most items one flush call gets.
    """

    def __init__(self, flush: Flush[Item, Result], max_batch: int = 500) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._pending: dict[str, list[tuple[Item, asyncio.Future[Result]]]] = {}
        self._busy: set[str] = set()
        self._drains: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    async def submit(self, key: str, item: Item) -> Result:
        """Queue ``item`` for the next call of ``flush`` for ``key`` and wait for its result."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append((item, future))
        if key not in self._busy:
            self._start_drain(key)
        return await future

    def _start_drain(self, key: str) -> None:
        self._busy.add(key)
        task = asyncio.get_running_loop().create_task(self._drain(key))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, key: str) -> None:
        try:
            # Yield once so that items submitted in the same loop iteration join the first batch.
            await asyncio.sleep(0)
            while batch := self._take(key):
                await self._run(key, batch)
        finally:
            self._busy.discard(key)
            if self._pending.get(key):  # submitted after the last take, before the discard
                self._start_drain(key)

    def _take(self, key: str) -> list[tuple[Item, asyncio.Future[Result]]]:
        pending = self._pending.get(key)
        if not pending:
            self._pending.pop(key, None)
            return []
        batch, rest = pending[: self._max_batch], pending[self._max_batch :]
        if rest:
            self._pending[key] = rest
        else:
            del self._pending[key]
        return batch

    async def _run(self, key: str, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._flush(key, [item for item, _ in batch])
        except BaseException as exc:  # the whole call failed: every caller hears why
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
