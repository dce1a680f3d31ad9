"""The worker registry: presque's ``/w/`` routes, and what the dashboard lists as workers.

A worker registers per queue (``POST /w/{queue}`` with header ``X-presque-workerid``) and may
repeat the call as a heartbeat carrying its figures. Entries not refreshed within ``STALE_AFTER``
seconds are no longer listed, and are pruned.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from broker import keys
from broker.models import dumps

STALE_AFTER = 60.0
INFO_FIELDS = ("host", "pid", "processed", "failed", "current", "concurrency", "name")


class WorkerRegistry:
    """Workers registered on queues, kept in Redis (``presque:workers`` and ``{q}:workers``)."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    async def register(self, worker_id: str, queue: str, info: dict[str, Any]) -> None:
        """Register (or refresh) ``worker_id`` on ``queue`` with optional figures in ``info``."""
        raw = await self.redis.hget(keys.WORKERS, worker_id)
        now = time.time()
        entry: dict[str, Any] = orjson.loads(raw) if raw else {"id": worker_id, "queues": [], "registered_at": now}
        if queue not in entry["queues"]:
            entry["queues"].append(queue)
        for name in INFO_FIELDS:
            if name in info:
                entry[name] = info[name]
        entry["last_seen"] = now
        await self.redis.hset(keys.WORKERS, worker_id, dumps(entry))
        await self.redis.sadd(keys.queue_keys(queue).workers, worker_id)

    async def unregister(self, worker_id: str, queue: str) -> None:
        """Remove ``worker_id`` from ``queue`` (and from the registry when it has no queue left)."""
        await self.redis.srem(keys.queue_keys(queue).workers, worker_id)
        raw = await self.redis.hget(keys.WORKERS, worker_id)
        if not raw:
            return
        entry = orjson.loads(raw)
        entry["queues"] = [q for q in entry["queues"] if q != queue]
        if entry["queues"]:
            await self.redis.hset(keys.WORKERS, worker_id, dumps(entry))
        else:
            await self.redis.hdel(keys.WORKERS, worker_id)

    async def all(self) -> list[dict[str, Any]]:
        """Every live worker's entry, sorted by id; stale entries are pruned on the way."""
        entries = await self.redis.hgetall(keys.WORKERS)
        now = time.time()
        live, stale = [], []
        for worker_id, raw in entries.items():
            entry = orjson.loads(raw)
            if now - entry.get("last_seen", 0) > STALE_AFTER:
                stale.append(worker_id)
            else:
                live.append(entry)
        if stale:
            await self.redis.hdel(keys.WORKERS, *stale)
        return sorted(live, key=lambda e: str(e["id"]))

    async def on_queue(self, queue: str) -> list[str]:
        """Ids of the live workers registered on ``queue``."""
        members = {
            m.decode() if isinstance(m, bytes) else m for m in await self.redis.smembers(keys.queue_keys(queue).workers)
        }
        live = {e["id"] for e in await self.all()}
        gone = members - live
        if gone:
            await self.redis.srem(keys.queue_keys(queue).workers, *gone)
        return sorted(members & live)
