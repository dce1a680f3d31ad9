"""A runnable worker: ``presque worker worker:Thumbnails`` from this directory.

It takes jobs from the ``images`` queue (see producer.py), eight at a time, and acks each with
its result. A job whose ``work`` raises is retried with backoff, then dead-lettered.
"""

from __future__ import annotations

import asyncio
from typing import Any

from broker import Worker
from broker.worker import Job


class Thumbnails(Worker):
    queues = ("images",)
    concurrency = 8

    async def work(self, job: Job) -> Any:
        width = job.body["width"]
        if width <= 0:
            raise ValueError(f"bad width {width}")  # nacked as "ValueError: bad width 0"
        job.progress({"step": "resizing"})
        await asyncio.sleep(0.01)  # the real work
        return {"thumbnail": f"{job.body['path']}.thumb.png", "width": width // 4}

    async def fail(self, job: Job, error: BaseException) -> None:
        print(f"job {job.id} (attempt {job.attempt}) failed: {error}")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO)
    Thumbnails("http://127.0.0.1:5000").run()
