"""Coalescer: turns many concurrent single operations into one Redis call per key.

Sixty-four clients each pushing one job are, to Redis, sixty-four round trips; collected while
the previous call is in flight, they become one script call. Per key (a queue) one call is in
flight, so the batch grows exactly as fast as Redis is slow — no timer, no added latency when
the broker is idle (the first item is sent at once, on the next loop iteration).

With one call in flight the broker and Redis take turns: Redis idles while the broker packs the
next batch, the broker while Redis runs it. ``max_in_flight=2`` lets a second call go while the
first runs, but only once ``min_overlap`` items wait: smaller second calls cost more per item
than the overlap saves (docs/performance.md). Calls still reach Redis in submission order if
each flush sends its call before it first waits, over one ordered connection (the script pipe,
``broker/pipe.py``): a runner takes a batch and sends it in one step, so no other runner can
send in between.
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
        max_in_flight: the most flush calls per key at once. Above 1, ``flush`` must send its
            call before it first waits, or calls may reach Redis out of order.
        min_overlap: the items that must wait before a call goes while another is in flight.
    """

    def __init__(
        self, flush: Flush[Item, Result], max_batch: int = 500, max_in_flight: int = 1, min_overlap: int = 1
    ) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._min_overlap = min_overlap
        self._pending: dict[str, list[_Entry[Item, Result]]] = {}
        self._count: dict[str, int] = {}  # per key: items pending
        self._runners: dict[str, int] = {}  # per key: runners alive, each with one call at most
        self._starting: set[str] = set()  # keys with a runner yet to take its first batch
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
        self._count[key] = self._count.get(key, 0) + 1
        self._wake(key)

    async def _enqueue(self, key: str, items: list[Item]) -> list[Result | BaseException]:
        future: asyncio.Future[list[Result | BaseException]] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append((items, future))
        self._count[key] = self._count.get(key, 0) + len(items)
        self._wake(key)
        return await future

    def _wake(self, key: str) -> None:
        """Start a runner for ``key`` unless one is about to take the pending items anyway."""
        runners = self._runners.get(key, 0)
        if key in self._starting or runners >= self._max_in_flight:
            return
        if runners and self._count.get(key, 0) < self._min_overlap:
            return
        self._starting.add(key)
        self._runners[key] = runners + 1
        task = asyncio.get_running_loop().create_task(self._drain(key))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, key: str) -> None:
        try:
            # Yield once so that items submitted in the same loop iteration join the first batch.
            await asyncio.sleep(0)
            self._starting.discard(key)
            # ``_run`` runs the flush up to its first wait before this coroutine can be
            # suspended: taking a batch and sending its call are one step.
            while batch := self._take(key):
                if self._pending.get(key):  # enough left for a second call meanwhile?
                    self._wake(key)
                await self._run(key, batch)
        finally:
            self._starting.discard(key)
            left = self._runners[key] - 1
            if left:
                self._runners[key] = left
            else:
                del self._runners[key]
            if self._pending.get(key):  # submitted after the last take, before this runner ended
                self._wake(key)

    def _take(self, key: str) -> list[_Entry[Item, Result]]:
        pending = self._pending.get(key)
        if not pending:
            self._pending.pop(key, None)
            self._count.pop(key, None)
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
            self._count[key] -= size
        else:
            del self._pending[key]
            self._count.pop(key, None)
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
