"""Operator routes: presque's worker registry (``/w/``), stats, history and health."""

from __future__ import annotations

import asyncio

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker.errors import BadRequest
from broker.http import json_response, queue_of, read_json_object, runtime
from broker.models import encode_json, validate_queue

WORKER_HEADER = "x-presque-workerid"
HEALTH_TIMEOUT = 2.0


def worker_id(request: Request) -> str:
    value = request.headers.get(WORKER_HEADER, "").strip()
    if not value or len(value) > 256:
        raise BadRequest("header X-presque-workerid is required (1-256 characters)")
    return value


async def workers_list(request: Request) -> Response:
    """GET /w/: worker ids; ``?queue_name=q``: that queue's workers and figures (presque)."""
    rt = runtime(request)
    queue = request.query_params.get("queue_name")
    if queue is None:
        return json_response([w["id"] for w in await rt.workers.all()])
    validate_queue(queue)
    info = await rt.queues.info(queue)
    return json_response(
        {
            "queue_name": queue,
            "workers_list": await rt.workers.on_queue(queue),
            "processed": info.counters["processed"],
            "failed": info.counters["failed"],
        }
    )


async def worker_register(request: Request) -> Response:
    """POST /w/{queue}: register (or refresh) a worker; an optional JSON body carries figures."""
    rt = runtime(request)
    queue = queue_of(request)
    wid = worker_id(request)
    info = await read_json_object(request)
    encode_json(info, "the body")  # it is stored re-encoded: refuse what cannot be
    await rt.workers.register(wid, queue, info)
    return json_response({"queue": queue, "worker": wid}, 201)


async def worker_unregister(request: Request) -> Response:
    """DELETE /w/{queue}: unregister a worker from a queue."""
    await runtime(request).workers.unregister(worker_id(request), queue_of(request))
    return Response(status_code=204)


async def stats(request: Request) -> Response:
    """GET /stats: presque's ``{"redis", "size", "queues"}`` plus totals, processes, workers."""
    rt = runtime(request)
    snapshot = await rt.stats.snapshot()
    snapshot["redis"] = await rt.stats.redis_info()
    snapshot["size"] = len(snapshot["queues"])
    snapshot["workers_count"] = len(snapshot["workers"])
    return json_response(snapshot)


async def stats_history(request: Request) -> Response:
    """GET /stats/history?range=15m|24h: the dashboard's chart series."""
    span = request.query_params.get("range", "15m")
    if span not in ("15m", "24h"):
        raise BadRequest('range must be "15m" or "24h"')
    return json_response(await runtime(request).stats.history(minutes=span == "24h"))


async def health(request: Request) -> Response:
    """GET /health: 200 when Redis answers a PING promptly, else 503."""
    try:
        await asyncio.wait_for(runtime(request).redis.ping(), HEALTH_TIMEOUT)
    except (RedisError, OSError, TimeoutError) as exc:
        return json_response(
            {"status": "unavailable", "error": f"redis: {exc or 'timeout'}"}, 503, {"Retry-After": "1"}
        )
    return json_response({"status": "ok"})


def ops_routes() -> list[Route]:
    return [
        Route("/w/", workers_list, methods=["GET"]),
        Route("/w/{queue}", worker_register, methods=["POST"]),
        Route("/w/{queue}", worker_unregister, methods=["DELETE"]),
        Route("/stats", stats, methods=["GET"]),
        Route("/stats/history", stats_history, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
