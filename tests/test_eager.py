"""start_eagerly: a coroutine runs within the caller's step up to its first wait, then as a task."""

from __future__ import annotations

import asyncio

import pytest

from broker.eager import start_eagerly


async def test_a_coroutine_that_never_waits_is_done_before_the_call_returns() -> None:
    steps: list[str] = []

    async def work() -> None:
        steps.append("ran")

    assert start_eagerly(work()) is None
    assert steps == ["ran"]


async def test_an_exception_before_the_first_wait_is_the_caller_s() -> None:
    async def work() -> None:
        raise ValueError("early")

    with pytest.raises(ValueError, match="early"):
        start_eagerly(work())


async def test_a_coroutine_that_waits_goes_on_in_a_task_from_where_it_waits() -> None:
    steps: list[str] = []
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def work() -> None:
        steps.append("before")
        steps.append(await gate)
        await asyncio.sleep(0)  # a bare yield passes through as well
        steps.append("after")

    task = start_eagerly(work())
    assert task is not None and steps == ["before"]
    gate.set_result("woken")
    await task
    assert steps == ["before", "woken", "after"]


@pytest.mark.parametrize("before_first_step", [True, False])
async def test_cancelling_the_task_ends_the_coroutine_s_wait(before_first_step: bool) -> None:
    seen: list[str] = []
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def work() -> None:
        try:
            await gate
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("cleaned up")

    task = start_eagerly(work())
    assert task is not None
    if not before_first_step:
        await asyncio.sleep(0)  # the task's first step: it waits on the gate now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled", "cleaned up"] and task.cancelled()


async def test_an_exception_after_the_first_wait_is_the_task_s() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def work() -> None:
        await gate
        raise ValueError("late")

    task = start_eagerly(work())
    assert task is not None
    gate.set_exception(KeyError("thrown in"))
    with pytest.raises(KeyError):
        await task
    gate2: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def work2() -> None:
        await gate2
        raise ValueError("late")

    task2 = start_eagerly(work2())
    assert task2 is not None
    gate2.set_result(None)
    with pytest.raises(ValueError, match="late"):
        await task2
