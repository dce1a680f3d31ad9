"""Pushing JSON lines (``presque push QUEUE < jobs.jsonl``): in order, in batches, with progress."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from broker.errors import BrokerError
from broker.models import parse_json
from broker.terminal import Progress

BATCH = 1000
# Batches go one at a time: the broker may run concurrent batch frames in any order, and the
# queue must keep the order of the lines. Single pushes (lines with per-job options) go through
# the broker's per-queue coalescer in the order sent, so many may be in flight.
SINGLE_WINDOW = 1000
READ_AHEAD = 50_000  # lines read but not yet pushed, at most
FILL_WAIT = 0.005  # a file's lines arrive faster than this: wait once so that a batch fills up


@dataclass(frozen=True, slots=True)
class PushResult:
    """How it went: jobs pushed, seconds taken, whether a progress line was shown, the error if any."""

    pushed: int
    seconds: float
    shown: bool
    error: str | None


async def push_lines(client: Any, queue: str, source: Iterable[bytes], options: dict[str, Any]) -> PushResult:
    """Push every non-blank line of ``source`` (each a JSON job body) to ``queue``.

    Lines are read in a thread (``source`` may block, e.g. a terminal), gathered into batches of
    up to 1000 and pushed in order; with per-job ``options`` they are pushed one by one. A line
    that is not JSON stops it: that line's batch and everything after it are not pushed.
    """
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
    room = threading.Semaphore(READ_AHEAD)
    progress = Progress(f"pushing to {queue}")
    read_bytes = [0]
    pushed = 0

    def reader() -> None:
        try:
            for number, line in enumerate(source, 1):
                read_bytes[0] += len(line)
                if line.strip():
                    room.acquire()
                    loop.call_soon_threadsafe(lines.put_nowait, (number, line))
        finally:
            loop.call_soon_threadsafe(lines.put_nowait, None)

    async def next_batch(limit: int) -> tuple[list[tuple[int, bytes]], bool]:
        """Up to ``limit`` lines that are there now (at least one); True at the end of the input."""
        batch: list[tuple[int, bytes]] = []
        item = await lines.get()
        waited = False
        while item is not None:
            batch.append(item)
            room.release()
            if len(batch) >= limit:
                break
            if lines.empty() and not waited:
                await asyncio.sleep(FILL_WAIT)
                waited = True
            if lines.empty():
                break
            item = lines.get_nowait()
        return batch, item is None

    window = asyncio.Semaphore(SINGLE_WINDOW if options else 1)
    tasks: set[asyncio.Task[None]] = set()
    errors: list[str] = []

    async def send(bodies: list[Any]) -> None:
        nonlocal pushed
        try:
            if options:
                await client.push(queue, bodies[0], **options)
            else:
                await client.push_many(queue, bodies)
            pushed += len(bodies)
            progress.update(pushed, read_bytes[0])
        except BrokerError as exc:
            errors.append(exc.message)
        finally:
            window.release()

    threading.Thread(target=reader, name="presque-stdin", daemon=True).start()
    started = time.monotonic()
    done = False
    while not done and not errors:
        batch, done = await next_batch(1 if options else BATCH)
        bodies = []
        for number, line in batch:
            try:
                bodies.append(parse_json(line))
            except BrokerError as exc:
                errors.append(f"line {number}: {exc.message}")
                break
        if errors or not bodies:
            break
        await window.acquire()
        task = asyncio.create_task(send(bodies))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    progress.finish()
    return PushResult(pushed, time.monotonic() - started, progress.enabled, errors[0] if errors else None)
