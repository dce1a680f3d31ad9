"""``GET /metrics``: Prometheus text, figures from Redis, the same whichever process answers."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from broker import keys
from broker.metrics import BUCKETS, LatencyExporter
from broker.stats import LatencyHistogram
from tests.servers import make_settings, run_broker, wait_for
from tests.wsclient import ws_connect

pytestmark = pytest.mark.core

CONFIG = {"queues": {"reap_interval": 0.1, "backoff_base": 0.1, "backoff_max": 0.2, "max_attempts": 1}}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: httpx.AsyncClient, url: str = "") -> Samples:
    response = await http.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape_when(http: httpx.AsyncClient, ready: Callable[[Samples], bool], url: str = "") -> Samples:
    """Scrape until ``ready`` holds (per-process figures arrive with each process's heartbeat)."""

    async def attempt() -> Samples | None:
        samples = await scrape(http, url)
        return samples if ready(samples) else None

    return await wait_for(attempt, 5.0, interval=0.05, message="metrics never showed the expected figures")


async def test_queue_figures_counters_and_latency(redis_url: str) -> None:
    async with (
        run_broker(make_settings(redis_url, CONFIG)) as broker,
        httpx.AsyncClient(base_url=broker.url, timeout=10.0) as http,
        ws_connect(broker.ws_url) as ws,
    ):
        await http.post("/qb/jobs", json=[{"n": n} for n in range(5)])
        await http.post("/q/later", json={}, params={"delay": 60})
        assert (await ws.call("subscribe", queue="jobs", prefetch=3))["op"] == "subscribed"
        delivered = await ws.jobs(3)
        await ws.call("ack", id=delivered[0]["id"], token=delivered[0]["token"])
        await ws.call("nack", id=delivered[1]["id"], token=delivered[1]["token"])  # max_attempts 1: dead
        await ws.jobs(2)  # the credit of the two settled jobs brings the last two
        await http.post("/control/later", json={"status": "stop"})
        samples = await scrape_when(http, lambda s: value(s, "presque_queue_consumers", queue="jobs") == 1)

    assert value(samples, "presque_queue_jobs", queue="jobs", state="ready") == 0  # 2 more went to the consumer
    assert value(samples, "presque_queue_jobs", queue="jobs", state="leased") == 3
    assert value(samples, "presque_queue_jobs", queue="jobs", state="dead") == 1
    assert value(samples, "presque_queue_jobs", queue="later", state="delayed") == 1
    assert value(samples, "presque_queue_paused", queue="later") == 1
    assert value(samples, "presque_queue_paused", queue="jobs") == 0
    assert value(samples, "presque_queue_consumers", queue="jobs") == 1
    assert value(samples, "presque_jobs_pushed_total", queue="jobs") == 5
    assert value(samples, "presque_jobs_processed_total", queue="jobs") == 1
    assert value(samples, "presque_jobs_failed_total", queue="jobs") == 1
    assert value(samples, "presque_jobs_dead_lettered_total", queue="jobs") == 1
    # Every job delivered over the WebSocket was timed; the histogram is cumulative.
    assert value(samples, "presque_delivery_latency_seconds_count", queue="jobs") == 5
    assert value(samples, "presque_delivery_latency_seconds_bucket", queue="jobs", le="+Inf") == 5
    assert (value(samples, "presque_delivery_latency_seconds_sum", queue="jobs") or 0) >= 0
    assert value(samples, "presque_delivery_latency_seconds_count", queue="later") is None
    assert value(samples, "presque_processes") == 1
    assert value(samples, "presque_connections") == 1
    assert value(samples, "presque_redis_used_memory_bytes")


async def test_two_processes_answer_the_same_aggregate(redis_url: str, redis: aioredis.Redis) -> None:
    settings = make_settings(redis_url, CONFIG)
    async with (
        run_broker(settings) as a,
        run_broker(settings) as b,
        httpx.AsyncClient(timeout=10.0) as http,
        ws_connect(a.ws_url) as on_a,
        ws_connect(b.ws_url) as on_b,
    ):
        for ws in (on_a, on_b):
            assert (await ws.call("subscribe", queue="shared", prefetch=10))["op"] == "subscribed"
        await http.post(f"{a.url}/qb/shared", json=list(range(6)))
        await http.post(f"{b.url}/qb/shared", json=list(range(6)))

        def everything_delivered(samples: Samples) -> bool:
            delivered = value(samples, "presque_delivery_latency_seconds_count", queue="shared")
            heartbeats = value(samples, "presque_queue_consumers", queue="shared") == 2
            return delivered == 12 and heartbeats

        # A's deliveries reach Redis by A's own export (every reap_interval), and its connection
        # count by its heartbeat: B's answer shows them.
        from_b = await scrape_when(http, everything_delivered, b.url)
        from_a = await scrape(http, a.url)

    for samples in (from_a, from_b):
        assert value(samples, "presque_jobs_pushed_total", queue="shared") == 12
        assert value(samples, "presque_queue_jobs", queue="shared", state="leased") == 12
        assert value(samples, "presque_connections") == 2
        assert value(samples, "presque_delivery_latency_seconds_count", queue="shared") == 12
    per_process = [v for (name, _), v in from_b.items() if name == "presque_process_connections"]
    assert sorted(per_process) == [1.0, 1.0]
    assert await redis.hlen(keys.PROCESSES) == 0  # a process that stops leaves the registry at once


def latency_exporter(feeds: dict[str, Any]) -> LatencyExporter:
    runtime = SimpleNamespace(delivery=SimpleNamespace(feeds=feeds))
    return LatencyExporter(runtime, interval=1.0)


def test_latency_export_loses_nothing_when_windows_are_replaced() -> None:
    first = SimpleNamespace(latency=LatencyHistogram())
    exporter = latency_exporter({"q": first})
    first.latency.record(0.001)
    first.latency.record(0.001)
    counts, total = exporter.take()["q"]
    assert sum(counts) == 2 and total == pytest.approx(0.002)
    assert exporter.take() == {}  # nothing new
    first.latency.record(0.5)  # recorded in the old window just before the heartbeat replaces it
    old = first.latency
    first.latency = LatencyHistogram()
    first.latency.record(2.0)
    counts, total = exporter.take()["q"]
    assert sum(counts) == 2 and total == pytest.approx(2.5)
    old.record(9.0)  # nobody records in a replaced window, and it is forgotten
    assert exporter.take() == {}
    assert len(counts) == BUCKETS


def test_latency_export_covers_a_feed_that_went_away() -> None:
    feeds: dict[str, Any] = {"a": SimpleNamespace(latency=LatencyHistogram())}
    exporter = latency_exporter(feeds)
    assert exporter.take() == {}
    feeds["a"].latency.record(0.01)
    del feeds["a"]  # its last subscriber left between two exports
    counts, _ = exporter.take()["a"]
    assert sum(counts) == 1
