"""Stats: the snapshot behind ``GET /stats`` and the dashboard's live feed, and its history.

A snapshot is built from Redis alone (queue sizes and counters, the process registry, the
worker registry), so every broker process shows the same numbers. Rates are counter deltas
between two snapshots of this process. History is rolled up in Redis by whichever process holds
a short lock: one point per second for 15 minutes and one per minute for 24 hours, bounded.
"""

from __future__ import annotations

import bisect
import time
from typing import Any

import orjson

from broker import keys
from broker.models import COUNTERS, QueueInfo, dumps
from broker.queue import QueueService
from broker.workers import WorkerRegistry

SECOND_POINTS = 900  # 15 minutes
MINUTE_POINTS = 1440  # 24 hours
PROCESS_STALE_AFTER = 30.0

# Delivery latency histogram bounds in milliseconds (log-spaced); the last bucket is open.
LATENCY_BOUNDS_MS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000)


class LatencyHistogram:
    """Counts of delivery latencies per bucket; mergeable across processes by adding counts."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        self.sum = 0.0  # seconds, for /metrics

    def record(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BOUNDS_MS, seconds * 1000)] += 1
        self.sum += seconds

    @staticmethod
    def quantile(counts: list[int], q: float) -> float | None:
        """The upper bound (ms) of the bucket holding quantile ``q``, or None without data."""
        total = sum(counts)
        if not total:
            return None
        rank = q * total
        seen = 0
        for i, count in enumerate(counts):
            seen += count
            if seen >= rank:
                return float(LATENCY_BOUNDS_MS[min(i, len(LATENCY_BOUNDS_MS) - 1)])
        return float(LATENCY_BOUNDS_MS[-1])


class Stats:
    """Builds snapshots and records history.

    Args:
        redis: the redis.asyncio client.
        queues: the queue service.
        workers: the worker registry.
    """

    def __init__(self, redis: Any, queues: QueueService, workers: WorkerRegistry) -> None:
        self.redis = redis
        self.queues = queues
        self.workers = workers
        self._previous: tuple[float, dict[str, dict[str, int]]] | None = None

    async def snapshot(self) -> dict[str, Any]:
        """``{"ts", "totals", "queues", "processes", "workers"}`` — the dashboard's stats frame."""
        names = await self.queues.queues()
        infos = await self.queues.info_many(names)
        processes = await self._processes()
        workers = await self.workers.all()
        now = time.time()
        consumers: dict[str, int] = {}
        latency: dict[str, list[int]] = {}
        for proc in processes:
            for queue, count in proc.pop("consumers_by_queue", {}).items():
                consumers[queue] = consumers.get(queue, 0) + count
            for queue, counts in proc.pop("latency", {}).items():
                merged = latency.setdefault(queue, [0] * len(counts))
                for i, c in enumerate(counts):
                    merged[i] += c
        counters_now = {info.queue: info.counters for info in infos}
        previous = self._previous
        self._previous = (now, counters_now)
        queues = {info.queue: self._queue_entry(info, previous, now, consumers, latency) for info in infos}
        totals: dict[str, Any] = {
            name: sum(q[name] for q in queues.values())
            for name in ("ready", "delayed", "leased", "dead", *COUNTERS, "push_rate", "ack_rate", "consumers")
        }
        totals["queues"] = len(queues)
        return {"ts": now, "totals": totals, "queues": queues, "processes": processes, "workers": workers}

    @staticmethod
    def _queue_entry(
        info: QueueInfo,
        previous: tuple[float, dict[str, dict[str, int]]] | None,
        now: float,
        consumers: dict[str, int],
        latency: dict[str, list[int]],
    ) -> dict[str, Any]:
        push_rate = ack_rate = 0.0
        if previous and info.queue in previous[1] and now > previous[0]:
            before = previous[1][info.queue]
            elapsed = now - previous[0]
            push_rate = max(0, info.counters["pushed"] - before["pushed"]) / elapsed
            ack_rate = max(0, info.counters["processed"] - before["processed"]) / elapsed
        counts = latency.get(info.queue, [])
        return {
            "ready": info.ready,
            "delayed": info.delayed,
            "leased": info.leased,
            "dead": info.dead,
            "paused": info.paused,
            "consumers": consumers.get(info.queue, 0),
            **info.counters,
            "push_rate": round(push_rate, 2),
            "ack_rate": round(ack_rate, 2),
            "oldest_age": round(info.now - info.oldest_run_at, 3) if info.oldest_run_at else None,
            "latency_p50": LatencyHistogram.quantile(counts, 0.5),
            "latency_p99": LatencyHistogram.quantile(counts, 0.99),
        }

    async def _processes(self) -> list[dict[str, Any]]:
        now = time.time()
        live, stale = [], []
        for process_id, raw in (await self.redis.hgetall(keys.PROCESSES)).items():
            entry = orjson.loads(raw)
            if now - entry.get("last_seen", 0) > PROCESS_STALE_AFTER:
                stale.append(process_id)
            else:
                live.append(entry)
        if stale:
            await self.redis.hdel(keys.PROCESSES, *stale)
        return sorted(live, key=lambda e: str(e["id"]))

    async def redis_info(self) -> dict[str, Any]:
        """A few figures of the Redis server, for ``GET /stats``."""
        info = await self.redis.info()
        wanted = ("redis_version", "used_memory", "used_memory_human", "connected_clients", "uptime_in_seconds")
        return {name: info.get(name) for name in wanted}

    # -- history ----------------------------------------------------------------------------------

    async def record_history(self, snapshot: dict[str, Any]) -> None:
        """Append one per-second point (and a per-minute one when the minute turns)."""
        point = dumps(
            {
                "t": int(snapshot["ts"]),
                "q": {name: [q["pushed"], q["processed"], q["ready"]] for name, q in snapshot["queues"].items()},
            }
        )
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(keys.HISTORY_SECONDS, point)
        pipe.ltrim(keys.HISTORY_SECONDS, 0, SECOND_POINTS - 1)
        pipe.lindex(keys.HISTORY_MINUTES, 0)
        _, _, last_minute = await pipe.execute()
        if last_minute is None or orjson.loads(last_minute)["t"] // 60 != int(snapshot["ts"]) // 60:
            pipe = self.redis.pipeline(transaction=False)
            pipe.lpush(keys.HISTORY_MINUTES, point)
            pipe.ltrim(keys.HISTORY_MINUTES, 0, MINUTE_POINTS - 1)
            await pipe.execute()

    async def history(self, minutes: bool) -> dict[str, Any]:
        """Series for the dashboard's charts: per-step counts of pushed/processed and ready depth.

        Returns ``{"step", "start", "totals": {"pushed", "processed", "ready"}, "queues": {...}}``
        with arrays aligned on ``start + i * step``; ``None`` where no point was recorded.
        """
        step = 60 if minutes else 1
        key = keys.HISTORY_MINUTES if minutes else keys.HISTORY_SECONDS
        size = MINUTE_POINTS if minutes else SECOND_POINTS
        points = [orjson.loads(raw) for raw in reversed(await self.redis.lrange(key, 0, size - 1))]
        end = int(time.time()) // step * step
        start = end - (size - 1) * step
        slots: dict[int, dict[str, list[int]]] = {}
        for point in points:
            slots[(point["t"] // step * step - start) // step] = point["q"]
        names = sorted({name for point in points for name in point["q"]})

        def series(name: str | None) -> dict[str, list[float | None]]:
            pushed: list[float | None] = [None] * size
            processed: list[float | None] = [None] * size
            ready: list[float | None] = [None] * size
            prev: list[int] | None = None
            prev_index = -2
            for index in range(size):
                q = slots.get(index)
                if q is None:
                    continue
                row = q.get(name) if name else [sum(v[i] for v in q.values()) for i in range(3)]
                if row is None:
                    continue
                ready[index] = row[2]
                if prev is not None and index > prev_index:
                    span = index - prev_index
                    pushed[index] = max(0, row[0] - prev[0]) / span
                    processed[index] = max(0, row[1] - prev[1]) / span
                prev, prev_index = row, index
            return {"pushed": pushed, "processed": processed, "ready": ready}

        return {"step": step, "start": start, "totals": series(None), "queues": {n: series(n) for n in names}}
