"""Worker subclasses that the worker and CLI tests run as real subprocesses.

The tests copy this file into a scratch directory as ``jobs.py`` and run ``presque worker
jobs:<Class>`` there (``module:Class`` is imported from the working directory). What a job does
is driven by its body:

- ``"log": path``: append ``"<queue> <n> <attempt> <pid>"`` to ``path`` when the job starts;
- ``"mark": path``: create ``path`` when the job starts (the test waits for it);
- ``"sleep": s``: take ``s`` seconds; ``"progress": true``: report progress first;
- ``"fail": text``: raise ``ValueError(text)``.

The result is ``{"n": n, "pid": pid}``. ``fail()`` appends ``"<id> <error>"`` to ``body["fail_log"]``.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from broker import Worker
from broker.worker import Job


def _start(job: Job) -> None:
    body = job.body
    if body.get("log"):
        with open(body["log"], "a") as f:
            f.write(f"{job.queue} {body.get('n')} {job.attempt} {os.getpid()}\n")
    if body.get("mark"):
        Path(body["mark"]).touch()
    if body.get("progress"):
        job.progress({"n": body.get("n"), "step": "started"})


def _end(job: Job) -> Any:
    if job.body.get("fail"):
        raise ValueError(job.body["fail"])
    return {"n": job.body.get("n"), "pid": os.getpid()}


def _record_failure(job: Job, error: BaseException) -> None:
    if job.body.get("fail_log"):
        with open(job.body["fail_log"], "a") as f:
            f.write(f"{job.id} {type(error).__name__}: {error}\n")


class Echo(Worker):
    queues = ("echo",)
    concurrency = 4

    async def work(self, job: Job) -> Any:
        _start(job)
        await asyncio.sleep(job.body.get("sleep", 0))
        return _end(job)

    async def fail(self, job: Job, error: BaseException) -> None:
        _record_failure(job, error)


class Threaded(Worker):
    """Plain ``def`` work: runs in the thread pool."""

    queues = ("threaded",)
    concurrency = 2

    def work(self, job: Job) -> Any:
        _start(job)
        time.sleep(job.body.get("sleep", 0))
        return _end(job)

    def fail(self, job: Job, error: BaseException) -> None:  # type: ignore[override]
        _record_failure(job, error)


class Prioritised(Worker):
    """Two queues, the first preferred; one job at a time."""

    queues = ("urgent", "later")
    concurrency = 1
    priority_wait = 0.5

    async def work(self, job: Job) -> Any:
        _start(job)
        await asyncio.sleep(job.body.get("sleep", 0))
        return _end(job)
