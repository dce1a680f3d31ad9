"""Scenarios 1-3: pushing over HTTP (one job per request, batches) and over a WebSocket."""

from __future__ import annotations

import orjson

from bench.context import BODY, Bench
from bench.harness import Group
from bench.report import Row, Target

BATCH = 100


def http_single(b: Bench, connections: int) -> Row:
    """POST /q/{queue}, one job per request, closed loop on ``connections`` keep-alive connections."""
    queue = f"http-single-{connections}"
    procs = 1 if connections == 1 else 2
    group = Group()
    for i in range(procs):
        share = connections // procs + (1 if i < connections % procs else 0)
        group.add("http_push", address=b.address, connections=share, path=f"/q/{queue}", body=orjson.dumps(BODY))
    m = b.run(f"http_single_{connections}", group, [queue])
    b.purge(queue)
    figures = b.figures(m, "pushed")
    targets = [Target("jobs_per_s", ">=", 15_000, "≥ 15,000/s")] if connections == 64 else []
    return Row(
        f"http_single_{connections}",
        f"1. HTTP push, {connections} connection{'s' if connections > 1 else ''}",
        figures,
        baseline="lpush",
        targets=targets,
    )


def http_batch(b: Bench) -> Row:
    """POST /qb/{queue} with 100 jobs per request, 8 connections."""
    queue = "http-batch"
    body = orjson.dumps([BODY] * BATCH)
    group = Group()
    for _ in range(2):
        group.add("http_push", address=b.address, connections=4, path=f"/qb/{queue}", body=body)
    m = b.run("http_batch", group, [queue])
    b.purge(queue)
    figures = b.figures(m, "pushed")
    return Row(
        "http_batch",
        f"2. HTTP batch push, {BATCH}/request, 8 conns",
        figures,
        baseline="lpush",
        targets=[Target("jobs_per_s", ">=", 100_000, "≥ 100,000/s")],
        note="latency per request",
    )


def ws_push(b: Bench, window: int = 500) -> Row:
    """``push`` frames on one WebSocket, ``window`` unconfirmed at any time."""
    queue = "ws-push"
    group = Group().add("ws_push", addresses=[b.address], queue=queue, window=window, body=BODY)
    m = b.run("ws_push", group, [queue])
    b.purge(queue)
    figures = b.figures(m, "pushed")
    return Row(
        "ws_push",
        f"3. WS push + confirm, 1 conn, {window} in flight",
        figures,
        baseline="lpush",
        targets=[Target("jobs_per_s", ">=", 50_000, "≥ 50,000/s")],
    )
