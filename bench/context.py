"""What every scenario shares: the Redis and broker processes, timings, and figure helpers."""

from __future__ import annotations

import http.client
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis

from bench.harness import Group, Measurement, measure, queue_counters
from bench.procs import BrokerProc, RedisProc
from bench.profiler import Profiler
from bench.report import latency_ms, progress

BODY = {"n": 1}  # a small job, like the peers' no-op benchmarks


@dataclass
class Bench:
    workdir: Path
    redis: RedisProc
    tcp: bool
    warmup: float
    duration: float
    quick: bool
    src: Path
    brokers: list[BrokerProc] = field(default_factory=list)
    baseline: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # per-scenario extras for --json
    profiler: Profiler | None = None

    _client: redis.Redis | None = None

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = self.redis.client()
        return self._client

    @property
    def redis_url(self) -> str:
        return self.redis.url(self.tcp)

    @property
    def address(self) -> list[Any]:
        return list(self.brokers[0].address)

    def start_broker(self) -> BrokerProc:
        p = self.profiler
        command = p.broker_command() if p else None
        broker = BrokerProc(self.workdir, self.redis_url, self.src, p.broker_env() if p else None, command).start()
        self.brokers.append(broker)
        return broker

    def stop_brokers(self) -> None:
        for broker in self.brokers:
            broker.stop()
        self.brokers.clear()

    def run(
        self,
        key: str,
        group: Group,
        queues: Sequence[str],
        *,
        duration: float | None = None,
        on_ready: Callable[[list[Any]], None] | None = None,
    ) -> Measurement:
        """Measure ``group`` against the current brokers; profile it if asked for ``key``."""
        progress(f"  {key} ...")
        seconds = duration or self.duration
        during = None
        if self.profiler is not None:
            profile, pid = self.profiler, self.brokers[0].pid

            def during() -> None:
                profile(key, pid, seconds)

        m = measure(
            group,
            self.client,
            [b.pid for b in self.brokers],
            queue_counters(self.client, queues),
            warmup=self.warmup,
            duration=seconds,
            during=during,
            on_ready=on_ready,
        )
        self.details[key] = {
            "rates": m.rates,
            "commands": m.commands,
            "command_usec": m.command_usec,
            "broker_cpu": m.broker_cpu,
            "redis_cpu": m.redis_cpu,
            "client_cpu": m.client_cpu,
            "machine_busy": m.machine_busy,
            "client": [{k: v for k, v in r.items() if k != "latencies"} for r in m.results if isinstance(r, dict)],
        }
        return m

    def figures(self, m: Measurement, rate: str, *, latency: bool = True) -> dict[str, Any]:
        """The usual figures of a throughput window, ``rate`` naming the counter that counts jobs."""
        jobs = m.rates.get(rate, 0.0) * m.duration
        out: dict[str, Any] = {"jobs_per_s": m.rates.get(rate, 0.0)}
        if latency:
            out.update(latency_ms(m.latencies()))
        out["broker_cpu"] = m.broker_cpu
        out["redis_cpu"] = m.redis_cpu
        out["client_cpu"] = m.client_cpu
        out["machine_busy"] = m.machine_busy
        out["other_cpu"] = other_cpu(m)
        if jobs > 0:
            # CPU time per job: unlike rates, barely moved by other work sharing the machine.
            out["broker_us_per_job"] = sum(m.broker_cpu) * m.duration / jobs * 1e6
        out.update(redis_cost(m, jobs))
        out["client_errors"] = m.client_sum("errors")
        return out

    # -- queue set-up through the broker's own API --------------------------------------------------

    def prefill(self, queue: str, count: int, batch: int = 1000, connections: int = 4) -> None:
        """Push ``count`` jobs with ``POST /qb/`` (1,000 per request, on a few connections at once)."""
        body = orjson.dumps([BODY] * batch)
        address = self.brokers[0].address

        def fill(requests: int) -> None:
            conn = http.client.HTTPConnection(*address, timeout=60)
            for _ in range(requests):
                conn.request("POST", f"/qb/{queue}", body, {"Content-Type": "application/json"})
                reply = conn.getresponse()
                reply.read()
                if reply.status != 201:
                    raise RuntimeError(f"prefill of {queue} failed: {reply.status}")
            conn.close()

        requests = count // batch
        with ThreadPoolExecutor(connections) as pool:
            shares = [requests // connections + (i < requests % connections) for i in range(connections)]
            list(pool.map(fill, shares))

    def ready(self, queue: str) -> int:
        """Jobs waiting in ``queue`` (its ready set)."""
        return int(self.client.zcard(f"presque:{{{queue}}}:ready"))

    def purge(self, queue: str) -> None:
        conn = http.client.HTTPConnection(*self.brokers[0].address, timeout=60)
        conn.request("DELETE", f"/q/{queue}")
        conn.getresponse().read()
        conn.close()


def other_cpu(m: Measurement) -> float:
    """Cores busy with anything but the broker, Redis and the load generators (e.g. other jobs)."""
    busy = m.machine_busy * (os.cpu_count() or 1)
    return max(0.0, busy - sum(m.broker_cpu) - m.redis_cpu - m.client_cpu)


def redis_cost(m: Measurement, jobs: float) -> dict[str, Any]:
    """Redis commands (scripts' inner commands included) and Redis CPU per job in the window."""
    if jobs <= 0:
        return {}
    calls = sum(m.commands.values())
    scripts = sum(m.commands.get(name, 0) for name in ("evalsha", "eval", "fcall"))
    return {
        "redis_cmds_per_job": calls / jobs,
        "redis_scripts_per_job": scripts / jobs,
        "redis_us_per_job": m.redis_cpu_seconds / jobs * 1e6,
    }
