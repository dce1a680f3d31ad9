"""``GET /metrics``: the broker's figures in Prometheus text format (``prometheus-client``).

Every figure comes from Redis, so whichever broker process Prometheus scrapes, it gets the
figures of the whole deployment, aggregated correctly across processes:

- queue sizes, pause flags, consumers and job counters: a stats snapshot
  (:meth:`broker.stats.Stats.snapshot`), read by a custom collector (:class:`SnapshotCollector`)
  rather than kept in per-process counters;
- the delivery latency histogram: each process adds what it measured to per-queue histograms in
  Redis (``presque:{q}:latency``) — :class:`LatencyExporter`, every ``queues.reap_interval`` and
  before each scrape it answers;
- per-process figures (connections, consumers, start and heartbeat times): the process registry.

Scrape one process, not every one: each answer already covers them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker import keys
from broker.models import COUNTERS
from broker.stats import LATENCY_BOUNDS_MS, LatencyHistogram

log = logging.getLogger("presque.metrics")

BUCKETS = len(LATENCY_BOUNDS_MS) + 1  # the last one is open (+Inf)
SUM_FIELD = "sum"
STATES = ("ready", "delayed", "leased", "dead")
COUNTER_HELP = {
    "pushed": "Jobs pushed",
    "processed": "Jobs acknowledged (or taken without a lease)",
    "failed": "Failed attempts: nacks and expired leases",
    "retried": "Failed jobs scheduled again",
    "dead_lettered": "Jobs moved to the dead-letter list",
    "expired": "Jobs dropped because their ttl passed before anyone took them",
}

Latency = dict[str, tuple[list[int], float]]  # queue -> (counts per bucket, sum in seconds)


class LatencyExporter:
    """Adds this process's delivery latencies to the per-queue histograms in Redis.

    The queue feeds record latencies in :class:`~broker.stats.LatencyHistogram` windows that the
    heartbeat replaces from time to time. The exporter keeps every window it has seen until it
    has sent all of it, so nothing recorded is lost or sent twice, whenever windows change.

    Args:
        runtime: the process's runtime (its ``delivery.feeds`` and ``redis``).
        interval: seconds between two exports.
    """

    def __init__(self, runtime: Any, interval: float) -> None:
        self.runtime = runtime
        self.interval = interval
        self._sent: dict[int, tuple[LatencyHistogram, str, list[int], float]] = {}
        self._pending: Latency = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="presque-latency-export")

    async def stop(self) -> None:
        """Stop, after a last export (what was measured before a graceful stop is kept)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError):
            await self.export()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.export()
            except (RedisError, OSError) as exc:
                log.debug("latency export postponed: %s", exc)

    def take(self) -> Latency:
        """What was recorded since the last call, per queue (synchronous: no recording in between)."""
        current = {id(feed.latency): (feed.latency, queue) for queue, feed in self.runtime.delivery.feeds.items()}
        delta: Latency = {}
        for key in set(self._sent) | set(current):
            histogram, queue, counts, total = self._sent.get(key) or (*current[key], [0] * BUCKETS, 0.0)
            diff = [now - before for now, before in zip(histogram.counts, counts, strict=True)]
            if any(diff):
                _add(delta, queue, diff, histogram.sum - total)
            if key in current:
                self._sent[key] = (histogram, queue, list(histogram.counts), histogram.sum)
            else:
                del self._sent[key]  # a replaced window: nothing more will be recorded in it
        return delta

    async def export(self) -> None:
        """Send what was recorded since the last export (kept for the next try if Redis fails)."""
        async with self._lock:
            for queue, (counts, total) in self.take().items():
                _add(self._pending, queue, counts, total)
            if not self._pending:
                return
            pipe = self.runtime.redis.pipeline(transaction=False)
            for queue, (counts, total) in self._pending.items():
                key = keys.queue_keys(queue).latency
                for bucket, count in enumerate(counts):
                    if count:
                        pipe.hincrby(key, str(bucket), count)
                pipe.hincrbyfloat(key, SUM_FIELD, total)
            await pipe.execute()
            self._pending = {}


def _add(into: Latency, queue: str, counts: list[int], total: float) -> None:
    before, before_total = into.get(queue, ([0] * BUCKETS, 0.0))
    into[queue] = ([a + b for a, b in zip(before, counts, strict=True)], before_total + total)


async def read_latency(redis: Any, queues: Iterable[str]) -> Latency:
    """The deployment's latency histograms of ``queues`` (those with none are left out)."""
    names = list(queues)
    if not names:
        return {}
    pipe = redis.pipeline(transaction=False)
    for queue in names:
        pipe.hgetall(keys.queue_keys(queue).latency)
    found: Latency = {}
    for queue, raw in zip(names, await pipe.execute(), strict=True):
        if not raw:
            continue
        fields = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
        counts = [int(fields.get(str(bucket), 0)) for bucket in range(BUCKETS)]
        found[queue] = (counts, float(fields.get(SUM_FIELD, 0)))
    return found


class SnapshotCollector:
    """A Prometheus collector over one stats snapshot (``Stats.snapshot()``) and what goes with it.

    Args:
        snapshot: the stats snapshot (from Redis: the same whichever process builds it).
        latency: the latency histograms from :func:`read_latency`.
        redis_info: ``Stats.redis_info()``.
    """

    def __init__(self, snapshot: dict[str, Any], latency: Latency, redis_info: dict[str, Any]) -> None:
        self.snapshot = snapshot
        self.latency = latency
        self.redis_info = redis_info

    def collect(self) -> Iterator[Metric]:
        queues: dict[str, dict[str, Any]] = self.snapshot["queues"]
        jobs = GaugeMetricFamily("presque_queue_jobs", "Jobs in a queue, by state", labels=["queue", "state"])
        paused = GaugeMetricFamily("presque_queue_paused", "1 while the queue is paused", labels=["queue"])
        consumers = GaugeMetricFamily(
            "presque_queue_consumers", "WebSocket subscriptions to the queue, on every process", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "presque_queue_oldest_ready_age_seconds", "Age of the oldest ready job", labels=["queue"]
        )
        counters = {
            name: CounterMetricFamily(f"presque_jobs_{name}", COUNTER_HELP.get(name, name), labels=["queue"])
            for name in COUNTERS
        }
        for name, queue in sorted(queues.items()):
            for state in STATES:
                jobs.add_metric([name, state], queue[state])
            paused.add_metric([name], 1 if queue["paused"] else 0)
            consumers.add_metric([name], queue["consumers"])
            if queue.get("oldest_age") is not None:
                oldest.add_metric([name], queue["oldest_age"])
            for counter, family in counters.items():
                family.add_metric([name], queue[counter])
        yield from (jobs, paused, consumers, oldest, *counters.values())
        yield self._latency()
        yield from self._processes()
        workers = GaugeMetricFamily("presque_workers", "Workers registered through /w/")
        workers.add_metric([], len(self.snapshot["workers"]))
        yield workers
        yield from self._redis()

    def _latency(self) -> Metric:
        histogram = HistogramMetricFamily(
            "presque_delivery_latency_seconds",
            "Time from a job being ready to its delivery to a WebSocket consumer",
            labels=["queue"],
        )
        bounds = [*(f"{ms / 1000:g}" for ms in LATENCY_BOUNDS_MS), "+Inf"]
        for queue, (counts, total) in sorted(self.latency.items()):
            cumulative, running = [], 0
            for bound, count in zip(bounds, counts, strict=True):
                running += count
                cumulative.append((bound, running))
            histogram.add_metric([queue], cumulative, total)
        return histogram

    def _processes(self) -> Iterator[Metric]:
        processes: list[dict[str, Any]] = self.snapshot["processes"]
        count = GaugeMetricFamily("presque_processes", "Live broker processes (heartbeat registry)")
        count.add_metric([], len(processes))
        total = GaugeMetricFamily("presque_connections", "WebSocket connections, on every process")
        total.add_metric([], sum(int(p.get("connections", 0)) for p in processes))
        labels = ["process", "host", "pid"]
        per = {
            "connections": GaugeMetricFamily("presque_process_connections", "WebSocket connections", labels=labels),
            "consumers": GaugeMetricFamily("presque_process_consumers", "Queue subscriptions", labels=labels),
            "started_at": GaugeMetricFamily(
                "presque_process_start_time_seconds", "When the process started (unix time)", labels=labels
            ),
            "last_seen": GaugeMetricFamily(
                "presque_process_heartbeat_timestamp_seconds", "The process's last heartbeat (unix time)", labels=labels
            ),
        }
        for process in processes:
            values = [str(process["id"]), str(process.get("host", "")), str(process.get("pid", ""))]
            for field, family in per.items():
                if field in process:
                    family.add_metric(values, float(process[field]))
        yield count
        yield total
        yield from per.values()

    def _redis(self) -> Iterator[Metric]:
        figures = {
            "used_memory": ("presque_redis_used_memory_bytes", "Memory used by Redis (the node answering)"),
            "connected_clients": ("presque_redis_connected_clients", "Clients connected to Redis (the node answering)"),
        }
        for field, (name, help_text) in figures.items():
            value = self.redis_info.get(field)
            if value is not None:
                gauge = GaugeMetricFamily(name, help_text)
                gauge.add_metric([], float(value))
                yield gauge


async def metrics(request: Request) -> Response:
    """GET /metrics: every figure of the deployment, in Prometheus text format."""
    runtime = request.app.state.runtime
    exporter: LatencyExporter | None = getattr(request.app.state, "latency_exporter", None)
    if exporter is not None:
        await exporter.export()  # this process's latest measurements count too
    snapshot = await runtime.stats.snapshot()
    latency = await read_latency(runtime.redis, snapshot["queues"])
    redis_info = await runtime.stats.redis_info()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot, latency, redis_info))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def metrics_routes() -> list[Route]:
    return [Route("/metrics", metrics, methods=["GET"])]
