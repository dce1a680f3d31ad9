"""Runs load generators in child processes and measures one window of a scenario.

Start protocol: each child connects, reports ``ready``; the parent sends ``go`` with three
monotonic instants (start the load, start measuring, stop); each child sends back its result.
While the children run, the parent samples what only it can see at the window's edges: Redis
counters and command statistics, Redis CPU, and every broker process's CPU.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.procs import cpu_seconds, raise_nofile
from bench.wire import now

CTX = multiprocessing.get_context("fork")


def _child(pipe: Any, kind: str, params: dict[str, Any]) -> None:
    raise_nofile()
    from bench.baseline import SYNC_WORKLOADS
    from bench.workers import WORKLOADS, Control

    try:
        if kind in SYNC_WORKLOADS:
            result = SYNC_WORKLOADS[kind](pipe, params)
        else:
            import uvloop

            async def main() -> Any:
                return await WORKLOADS[kind](Control(pipe), params)

            result = uvloop.run(main())
        pipe.send(("result", result))
    except BaseException as exc:
        with contextlib.suppress(Exception):
            pipe.send(("error", f"{kind}: {exc!r}\n{traceback.format_exc()}"))
        raise


class Group:
    """A set of load-generator processes started, released and collected together."""

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.pipes: list[Any] = []
        self.kinds: list[str] = []

    def add(self, kind: str, **params: Any) -> Group:
        parent, child = CTX.Pipe()
        proc = CTX.Process(target=_child, args=(child, kind, params), daemon=True)
        self.procs.append(proc)
        self.pipes.append(parent)
        self.kinds.append(kind)
        return self

    def _recv(self, pipe: Any, timeout: float) -> Any:
        if not pipe.poll(timeout):
            raise TimeoutError("a load generator did not answer in time")
        tag, value = pipe.recv()
        if tag == "error":
            raise RuntimeError(value)
        return value

    def start(self, timeout: float = 120.0) -> list[Any]:
        """Start every child; return their ``ready`` infos once all are connected."""
        for proc in self.procs:
            proc.start()
        deadline = time.monotonic() + timeout
        return [self._recv(pipe, max(0.1, deadline - time.monotonic())) for pipe in self.pipes]

    def go(self, t_go: float, t_measure: float, t_end: float) -> None:
        for pipe in self.pipes:
            pipe.send(("go", t_go, t_measure, t_end))

    def results(self, timeout: float = 60.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        return [self._recv(pipe, max(0.1, deadline - time.monotonic())) for pipe in self.pipes]

    def close(self) -> None:
        for proc in self.procs:
            proc.join(2)
            if proc.is_alive():
                proc.terminate()
                proc.join(2)


@dataclass
class Sample:
    """What the parent reads at one edge of the window."""

    at: float
    counters: dict[str, int]
    redis_cpu: float
    broker_cpu: list[float]
    client_cpu: float
    machine: tuple[float, float]


@dataclass
class Measurement:
    """One scenario's window: rates from Redis, CPU shares, Redis cost, client results."""

    duration: float
    rates: dict[str, float]  # counter -> per second
    broker_cpu: list[float]  # per broker process, fraction of one core
    redis_cpu: float  # fraction of one core
    redis_cpu_seconds: float
    client_cpu: float  # every load generator together, in cores
    machine_busy: float  # fraction of all the machine's cores that were busy
    commands: dict[str, int]  # command -> calls in the window (scripts' inner commands included)
    command_usec: dict[str, int]  # command -> microseconds of Redis time in the window
    results: list[Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def latencies(self) -> list[float]:
        out: list[float] = []
        for r in self.results:
            if isinstance(r, dict):
                out.extend(r.get("latencies", ()))
        return out

    def client_sum(self, key: str) -> int:
        return sum(int(r.get(key, 0)) for r in self.results if isinstance(r, dict))


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def commandstats(client: redis.Redis) -> tuple[dict[str, int], dict[str, int]]:
    """(calls, microseconds) per command since the last CONFIG RESETSTAT."""
    stats = client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    usec = {name.removeprefix("cmdstat_"): int(v["usec"]) for name, v in stats.items()}
    return calls, usec


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - now()))


def measure(
    group: Group,
    client: redis.Redis,
    broker_pids: Sequence[int],
    counters: Callable[[], dict[str, int]],
    *,
    warmup: float,
    duration: float,
    during: Callable[[], None] | None = None,
    on_ready: Callable[[list[Any]], None] | None = None,
) -> Measurement:
    """Release ``group``, measure ``[go + warmup, go + warmup + duration]``, collect the results.

    ``counters`` reads the monotonic counters whose rates are wanted (e.g. a queue's ``pushed``
    and ``processed``); ``on_ready`` gets the children's ``ready`` infos once all are connected,
    before the load starts; ``during`` runs right after the window opens (e.g. start a profiler).
    """
    extra: dict[str, Any] = {}
    try:
        infos = group.start()
        extra["ready"] = infos
        if on_ready is not None:
            on_ready(infos)
        t_go = now() + 0.05
        t_measure = t_go + warmup
        t_end = t_measure + duration
        group.go(t_go, t_measure, t_end)
        _sleep_until(t_measure)
        client.config_resetstat()
        first = _sample(client, counters, broker_pids, group)
        if during is not None:
            during()
        _sleep_until(t_end)
        last = _sample(client, counters, broker_pids, group)
        commands, usec = commandstats(client)
        results = group.results(timeout=duration + 60)
    finally:
        group.close()
    span = last.at - first.at
    return Measurement(
        duration=span,
        rates={k: (last.counters[k] - first.counters.get(k, 0)) / span for k in last.counters},
        broker_cpu=[(b - a) / span for a, b in zip(first.broker_cpu, last.broker_cpu, strict=True)],
        redis_cpu=(last.redis_cpu - first.redis_cpu) / span,
        redis_cpu_seconds=last.redis_cpu - first.redis_cpu,
        client_cpu=(last.client_cpu - first.client_cpu) / span,
        machine_busy=(last.machine[0] - first.machine[0]) / max(1.0, last.machine[1] - first.machine[1]),
        commands=commands,
        command_usec=usec,
        results=results,
        extra=extra,
    )


def _sample(client: redis.Redis, counters: Callable[[], dict[str, int]], pids: Sequence[int], group: Group) -> Sample:
    clients = 0.0
    for proc in group.procs:
        with contextlib.suppress(OSError):
            clients += cpu_seconds(proc.pid)
    return Sample(now(), counters(), redis_cpu(client), [cpu_seconds(p) for p in pids], clients, machine_busy())


def queue_counters(client: redis.Redis, queues: Sequence[str]) -> Callable[[], dict[str, int]]:
    """Sum of ``pushed`` and ``processed`` over ``queues`` (the broker's own counters)."""

    def read() -> dict[str, int]:
        pipe = client.pipeline(transaction=False)
        for q in queues:
            pipe.hmget(f"presque:{{{q}}}:stats", "pushed", "processed")
        out = {"pushed": 0, "processed": 0}
        for pushed, processed in pipe.execute():
            out["pushed"] += int(pushed or 0)
            out["processed"] += int(processed or 0)
        return out

    return read
