"""The raw-Redis baseline of the same run: what redis-py alone moves through this Redis.

- ``lpush``: one client pushing with an LPUSH pipeline of 100 commands per round trip.
- ``brpop``: one client taking jobs with one BRPOP per job from a pre-filled list.
- ``latency``: LPUSH at a fixed rate, one BRPOP consumer: the push-to-pop latency of a bare list.

And the framework's ceiling (no Redis): ``bench/noop_app.py`` served like the broker, under the
same HTTP load as scenario 1 at 64 connections, and sending frames on one WebSocket.

Each runs in a child process with the blocking redis-py client (hiredis parser), exactly as a
bare Python worker would.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis

from bench.harness import Group, Measurement, measure
from bench.procs import NoopProc
from bench.wire import Window, now

LIST = "bench:baseline"
PIPELINE = 100
BODY = b'{"n":1}'


def _ready(pipe: Any) -> tuple[float, float, float]:
    pipe.send(("ready", None))
    _, t_go, t_measure, t_end = pipe.recv()
    time.sleep(max(0.0, t_go - now()))
    return t_go, t_measure, t_end


def lpush(pipe: Any, p: dict[str, Any]) -> dict[str, Any]:
    r = redis.Redis.from_url(p["url"])
    r.ping()
    _, t_measure, t_end = _ready(pipe)
    window = Window(t_measure, t_end)
    while True:
        sent = now()
        batch = r.pipeline(transaction=False)
        for _ in range(PIPELINE):
            batch.lpush(LIST, BODY)
        batch.execute()
        done = now()
        for _ in range(PIPELINE):
            window.record(sent, done)
        if done >= t_end:
            break
    return {"count": window.count, "latencies": []}


def brpop(pipe: Any, p: dict[str, Any]) -> dict[str, Any]:
    """One BRPOP per job; with ``stamped``, items are send times and latencies are recorded."""
    r = redis.Redis.from_url(p["url"])
    r.ping()
    stamped = p.get("stamped", False)
    _, t_measure, t_end = _ready(pipe)
    window = Window(t_measure, t_end)
    while now() < t_end:
        sent = now()
        got = r.brpop([LIST], timeout=1)
        if got is not None:
            window.record(float(got[1]) if stamped else sent, now())
    return {"count": window.count, "latencies": window.latencies if stamped else []}


def lpush_paced(pipe: Any, p: dict[str, Any]) -> dict[str, Any]:
    r = redis.Redis.from_url(p["url"])
    r.ping()
    t_go, _, t_end = _ready(pipe)
    interval = 1.0 / p["rate"]
    sent = 0
    while True:
        t = now()
        if t >= t_end:
            break
        due = int((t - t_go) / interval) + 1 - sent
        for _ in range(due):
            r.lpush(LIST, b"%.9f" % now())
        sent += due
        time.sleep(max(0.0, t_go + sent * interval - now()))
    return {"sent": sent}


SYNC_WORKLOADS = {"lpush": lpush, "brpop": brpop, "lpush_paced": lpush_paced}


def run_baseline(
    client: redis.Redis, url: str, broker_pids: list[int], warmup: float, duration: float
) -> dict[str, Any]:
    """Measure the three baseline figures; returns {name: Measurement}."""
    out: dict[str, Measurement] = {}
    client.delete(LIST)
    out["lpush"] = measure(Group().add("lpush", url=url), client, broker_pids, dict, warmup=warmup, duration=duration)
    client.delete(LIST)
    # Enough for the consumer never to find the list empty (BRPOP would then wait, not count).
    fill = int(40_000 * (warmup + duration + 1))
    batch = client.pipeline(transaction=False)
    for _ in range(fill // 1000):
        batch.lpush(LIST, *([BODY] * 1000))
    batch.execute()
    out["brpop"] = measure(Group().add("brpop", url=url), client, broker_pids, dict, warmup=warmup, duration=duration)
    client.delete(LIST)
    group = Group().add("brpop", url=url, stamped=True).add("lpush_paced", url=url, rate=1000)
    out["latency"] = measure(group, client, broker_pids, dict, warmup=warmup, duration=duration)
    client.delete(LIST)
    return out


def run_framework(workdir: Path, client: redis.Redis, warmup: float, duration: float) -> dict[str, Measurement]:
    """The no-op Starlette app: POST at 64 connections (closed loop), WebSocket frames out."""
    noop = NoopProc(workdir).start()
    address = list(noop.address)
    try:
        group = Group()
        for _ in range(2):
            group.add("http_push", address=address, connections=32, path="/q/noop", body=BODY)
        http = measure(group, client, [noop.pid], dict, warmup=warmup, duration=duration)
        group = Group().add("ws_count", address=address)
        ws = measure(group, client, [noop.pid], dict, warmup=warmup, duration=duration)
    finally:
        noop.stop()
    return {"http": http, "ws": ws}
