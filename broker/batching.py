"""Coalescer: turns many concurrent single operations into one Redis call per key.

Sixty-four clients each pushing one job are, to Redis, sixty-four round trips; collected while
the previous call is in flight, they become one script call. Per key (a queue) at most one call
is in flight, so the batch grows exactly as fast as Redis is slow — no timer, no added latency
when the broker is idle (the first item is sent at once, on the next loop iteration).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger("presque.batching")

Item = TypeVar("Item")
Result = TypeVar("Result")

# The flush function gets a key and the batch, and returns one result per item: a value, or an
# exception that is raised to that item's caller only.
Flush = Callable[[str, Sequence[Item]], Awaitable[Sequence[Result | BaseException]]]
# Called with one item's result, or the exception that failed it (CancelledError included).
Done = Callable[[Result | BaseException], None]
# A caller's items and what receives their results: the future of an awaiting caller, or the
# callback of a single item (no task needs to wait for it).
_Entry = tuple[list[Item], "asyncio.Future[list[Result | BaseException]] | Done[Result]"]


class Coalescer(Generic[Item, Result]):
    """Batch ``submit(key, item)`` and ``submit_group(key, items)`` calls per key into calls of
    ``flush(key, items)``.

    Items reach ``flush`` in the order they were submitted, and a group is never split across two
    calls, so a batch pushed by one client stays atomic and in order even when it shares a call.

    Args:
        flush: does the batched work; one result (or exception) per item, in order.
        max_batch: the most items one flush call gets (a larger group gets a call of its own).
    """

    def __init__(self, flush: Flush[Item, Result], max_batch: int = 500) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._pending: dict[str, list[_Entry[Item, Result]]] = {}
        self._busy: set[str] = set()
        self._drains: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    async def submit(self, key: str, item: Item) -> Result:
        """Queue ``item`` for the next call of ``flush`` for ``key`` and wait for its result."""
        (result,) = await self._enqueue(key, [item])
        if isinstance(result, BaseException):
            raise result
        return result

    async def submit_group(self, key: str, items: Sequence[Item]) -> list[Result | BaseException]:
        """Queue ``items`` to be flushed together, in one call; returns one result per item."""
        return await self._enqueue(key, list(items))

    def submit_soon(self, key: str, item: Item, done: Done[Result]) -> None:
        """Like :meth:`submit` without waiting: ``done(result_or_exception)`` is called later.

        For callers that would otherwise spawn a task per item only to await it. ``done`` must
        not raise (an exception is logged, and does not reach the other items of the batch).
        """
        self._pending.setdefault(key, []).append(([item], done))
        if key not in self._busy:
            self._start_drain(key)

    async def _enqueue(self, key: str, items: list[Item]) -> list[Result | BaseException]:
        future: asyncio.Future[list[Result | BaseException]] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append((items, future))
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

    def _take(self, key: str) -> list[_Entry[Item, Result]]:
        pending = self._pending.get(key)
        if not pending:
            self._pending.pop(key, None)
            return []
        taken, size = 0, 0
        for items, _ in pending:
            if taken and size + len(items) > self._max_batch:
                break
            taken += 1
            size += len(items)
        batch, rest = pending[:taken], pending[taken:]
        if rest:
            self._pending[key] = rest
        else:
            del self._pending[key]
        return batch

    async def _run(self, key: str, batch: list[_Entry[Item, Result]]) -> None:
        try:
            results = list(await self._flush(key, [item for items, _ in batch for item in items]))
        except BaseException as exc:  # the whole call failed: every caller hears why
            for _, waiter in batch:
                if isinstance(waiter, asyncio.Future):
                    if not waiter.done():
                        waiter.set_exception(exc)
                else:
                    _call(waiter, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        offset = 0
        for items, waiter in batch:
            if isinstance(waiter, asyncio.Future):
                part = results[offset : offset + len(items)]
                if not waiter.done():
                    waiter.set_result(part)
            else:
                _call(waiter, results[offset])
            offset += len(items)


def _call(done: Done[Result], result: Result | BaseException) -> None:
    try:
        done(result)
    except Exception:
        log.exception("a coalesced item's callback failed")
