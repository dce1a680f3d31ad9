"""start_eagerly: run a coroutine now, up to its first real wait, and only then make it a task.

``asyncio.create_task`` runs nothing before the loop's next turn: whatever else the current step
does (answering the HTTP push whose call just returned, say) happens first, and the task then
waits behind every callback already scheduled. A coroutine that usually finishes without ever
waiting — a connection's writer with a few frames and a writable socket — can instead run to its
end within the caller's step. Python 3.12's eager task factory does this for every task; this
helper does it for the one coroutine that asks (Python 3.11 has no such factory).
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from typing import Any

__all__ = ["start_eagerly"]


def start_eagerly(coro: Coroutine[Any, Any, None], name: str | None = None) -> asyncio.Task[None] | None:
    """Run ``coro`` until it first suspends; return a task that goes on from there.

    Returns None when ``coro`` finished without suspending (its exception, if any, is raised
    here, as the caller's own). Otherwise the returned task resumes ``coro`` exactly where it
    waits: cancelling the task, even before it first ran, raises CancelledError at that wait,
    and the task's outcome is the coroutine's.
    """
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    resume = _resume(coro, waiting)
    resume.send(None)  # to its first yield: what the task's first step throws then reaches coro
    return asyncio.get_running_loop().create_task(resume, name=name)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], waiting: Any) -> Generator[Any, Any, None]:
    # Hands what ``coro`` waits on (a future, or None for a bare yield) up to the task, as
    # ``await`` would, and what the task sends or throws back down to ``coro``.
    throw: BaseException | None = None
    try:
        yield  # start_eagerly leaves it here; the task's first step goes on
    except GeneratorExit:
        coro.close()
        raise
    except BaseException as exc:  # cancelled before the task's first step
        throw = exc
    while True:
        try:
            waiting = coro.throw(throw) if throw is not None else waiting
        except StopIteration:
            return
        throw = None
        try:
            value = yield waiting
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # CancelledError included: it reaches coro's own wait
            throw = exc
            continue
        try:
            waiting = coro.send(value)
        except StopIteration:
            return
