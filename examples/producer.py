"""A runnable producer: pushes jobs for worker.py. ``python producer.py [URL]``."""

from __future__ import annotations

import asyncio
import sys

from broker import Client, SyncClient


def push_one(url: str) -> None:
    """The blocking client: one job."""
    with SyncClient(url) as client:
        job_id = client.push("images", {"path": "cat.jpg", "width": 800}, priority=7)
        print("pushed", job_id)


async def push_many(url: str) -> None:
    """The asyncio client: many pushes in flight on one WebSocket, then a batch."""
    async with Client(url) as client:
        ids = await asyncio.gather(*(client.push("images", {"path": f"{n}.jpg", "width": 640}) for n in range(100)))
        ids += await client.push_many("images", [{"path": f"b{n}.jpg", "width": 320} for n in range(1000)])
        await client.push("images", {"path": "broken.jpg", "width": 0}, max_attempts=2)  # ends dead-lettered
        print(f"pushed {len(ids) + 1} jobs;", (await client.queue_info("images"))["ready"], "ready")


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:5000"
    push_one(url)
    asyncio.run(push_many(url))
