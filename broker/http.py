"""The REST API: presque's routes (``/q``, ``/qb``, ``/j``, ``/status``, ``/control``, ``/w``)
plus ours (leases, dead letters, stats, health). Handlers parse and validate, call the runtime,
and shape replies; errors are raised as ``BrokerError`` and turned into JSON by ``app.py``.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker import params
from broker.errors import BadRequest, NoJob, NotFound, QueueClosed, TooLarge, UnknownJob
from broker.models import check_json_body, dumps, encode_json, parse_json, validate_queue
from broker.runtime import Runtime

JSON = "application/json"


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(data), status_code=status, media_type=JSON, headers=headers)


def queue_of(request: Request) -> str:
    return validate_queue(request.path_params["queue"])


async def read_body(request: Request) -> bytes:
    """The request body, refusing more than ``limits.max_body`` bytes before reading it all."""
    limit: int = runtime(request).settings.limits.max_body
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body of {declared} bytes is over the limit of {limit} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(request: Request, *, empty_ok: bool = True) -> dict[str, Any]:
    raw = await read_body(request)
    if not raw.strip():
        if empty_ok:
            return {}
        raise BadRequest("a JSON object body is required")
    return params.json_object(parse_json(raw))


def created(queue: str, job_id: str) -> Response:
    return json_response({"id": job_id, "queue": queue}, 201, {"Location": f"/j/{queue}/{job_id}"})


# -- /q: one job --------------------------------------------------------------------------------


async def push_job(request: Request) -> Response:
    """POST /q/{queue} (push) and PUT /q/{queue} (presque's re-queue after failure)."""
    rt = runtime(request)
    queue = queue_of(request)
    opts = params.push_options(request.query_params, rt.settings.queues)
    body = check_json_body(await read_body(request))
    job_id = await rt.push(queue, body, opts, count_failure=request.method == "PUT")
    return created(queue, job_id)


async def fetch_job(request: Request) -> Response:
    """GET /q/{queue}: destructive fetch, or a leased one with ``?lease=``; ``?wait=`` long-polls."""
    rt = runtime(request)
    queue = queue_of(request)
    query = request.query_params
    wait = params.number("wait", query["wait"], maximum=rt.settings.limits.max_wait) if "wait" in query else 0.0
    lease = params.lease_seconds(query["lease"], rt.settings.queues) if "lease" in query else 0.0
    job = await rt.take(queue, lease=lease, wait=wait)
    rt.delivery.emit_events(queue, [(job.id, "delivered", dumps({"attempt": job.attempt}))])
    headers = {"X-Presque-Job-Id": job.id, "X-Presque-Attempt": str(job.attempt)}
    if job.token:
        headers["X-Presque-Lease-Token"] = job.token
    return Response(job.body, media_type=JSON, headers=headers)


async def purge_queue(request: Request) -> Response:
    """DELETE /q/{queue}: remove ready and delayed jobs."""
    await runtime(request).queues.purge(queue_of(request))
    return Response(status_code=204)


# -- /qb: batches -------------------------------------------------------------------------------


async def push_batch(request: Request) -> Response:
    """POST /qb/{queue}: ``{"jobs": [...]}`` (presque) or a bare JSON array; all or nothing."""
    rt = runtime(request)
    queue = queue_of(request)
    opts = params.push_options(request.query_params, rt.settings.queues, allow_uniq=False)
    data = parse_json(await read_body(request))
    if isinstance(data, dict):
        if set(data) != {"jobs"}:
            raise BadRequest('a batch is {"jobs": [...]} or a JSON array of job bodies')
        data = data["jobs"]
    if not isinstance(data, list):
        raise BadRequest('a batch is {"jobs": [...]} or a JSON array of job bodies')
    if not data:
        raise BadRequest("a batch needs at least one job")
    if len(data) > rt.settings.limits.max_batch:
        raise TooLarge(f"batch of {len(data)} jobs is over the limit of {rt.settings.limits.max_batch}")
    ids = await rt.push_batch(queue, [encode_json(body, "a job") for body in data], opts)
    return json_response({"ids": ids, "queue": queue}, 201)


async def fetch_batch(request: Request) -> Response:
    """GET /qb/{queue}?batch_size=N: up to N jobs' bodies, destructively, as one JSON array."""
    rt = runtime(request)
    queue = queue_of(request)
    size = params.integer("batch_size", request.query_params.get("batch_size", 1), minimum=1)
    if size > rt.settings.limits.max_batch:
        raise TooLarge(f"batch_size {size} is over the limit of {rt.settings.limits.max_batch}")
    while True:
        result = await rt.queues.fetch(queue, count=size)
        if result.jobs:
            return Response(b"[" + b",".join(job.body for job in result.jobs) + b"]", media_type=JSON)
        if result.paused:
            raise QueueClosed()
        if result.empty or result.limited:
            raise NoJob()


# -- /j: jobs and queue figures -----------------------------------------------------------------


async def queue_info(request: Request) -> Response:
    """GET /j/{queue}: presque's figures plus sizes and counters."""
    info = await runtime(request).queues.info(queue_of(request))
    return json_response(info.presque_json())


async def job_info(request: Request) -> Response:
    """GET /j/{queue}/{id}."""
    job = await runtime(request).queues.job(queue_of(request), request.path_params["id"])
    return Response(job.to_json(), media_type=JSON)


async def settle_job(request: Request) -> Response:
    """POST /j/{queue}/{id}/ack|nack|touch with ``{"token": ...}``."""
    rt = runtime(request)
    queue = queue_of(request)
    job_id = request.path_params["id"]
    action = request.path_params["action"]
    if action not in ("ack", "nack", "touch"):
        raise NotFound(f"no such action {action!r}: use ack, nack or touch")
    body = await read_json_object(request, empty_ok=False)
    token = params.token(body)
    if action == "ack":
        await rt.queues.ack(queue, job_id, token)
        rt.delivery.emit_events(queue, [(job_id, "acked", None)])
        return json_response({"id": job_id, "status": "acked"})
    if action == "nack":
        delay = (
            params.number("delay", body["delay"], maximum=params.MAX_DELAY) if body.get("delay") is not None else None
        )
        error = body.get("error", "")
        if not isinstance(error, str):
            raise BadRequest("error must be a string")
        outcome = await rt.queues.nack(queue, job_id, token, delay=delay, error=error[:4096])
        event = "dead" if outcome.outcome == "dead" else "nacked"
        rt.delivery.emit_events(queue, [(job_id, event, dumps({"error": error[:4096], "outcome": outcome.outcome}))])
        return json_response({"id": job_id, "status": outcome.outcome, "run_at": outcome.run_at})
    lease = params.lease_seconds(body["lease"], rt.settings.queues) if body.get("lease") is not None else 0.0
    deadline = await rt.queues.touch(queue, job_id, token, lease)
    return json_response({"id": job_id, "status": "leased", "deadline": deadline})


# -- /status and /control (presque) -------------------------------------------------------------


async def status_all(request: Request) -> Response:
    """GET /status/: every queue's name."""
    names = await runtime(request).queues.queues()
    return json_response({"queues": names, "size": len(names)})


async def status_queue(request: Request) -> Response:
    """GET /status/{queue}[?with_desc=1]: the ready size, and optionally the next bodies."""
    rt = runtime(request)
    queue = queue_of(request)
    info = await rt.queues.info(queue)
    head = dumps({"queue": queue, "size": info.ready})
    if request.query_params.get("with_desc") not in (None, "", "0", "false"):
        peeked = await rt.queues.peek(queue, rt.settings.limits.max_desc)
        head = head[:-1] + b',"jobs":[' + b",".join(body for _, body in peeked) + b"]}"
    return Response(head, media_type=JSON)


async def control_get(request: Request) -> Response:
    """GET /control/{queue}: ``status`` 1 when delivering, 0 when stopped."""
    queue = queue_of(request)
    paused = await runtime(request).queues.is_paused(queue)
    return json_response({"queue": queue, "status": 0 if paused else 1})


async def control_set(request: Request) -> Response:
    """POST /control/{queue} ``{"status": "start"|"stop"}``."""
    rt = runtime(request)
    queue = queue_of(request)
    status = (await read_json_object(request, empty_ok=False)).get("status")
    if status == "stop":
        await rt.queues.pause(queue)
    elif status == "start":
        await rt.queues.resume(queue)
    else:
        raise BadRequest('status must be "start" or "stop"')
    return json_response({"queue": queue, "response": "updated"})


# -- /dead: dead letters ------------------------------------------------------------------------


async def dead_list(request: Request) -> Response:
    """GET /dead/{queue}?offset=&limit=."""
    queue = queue_of(request)
    # Bounded so that offset + limit stays an exact integer inside the Lua script.
    offset = params.integer("offset", request.query_params.get("offset", 0), maximum=2**31 - 1)
    limit = params.integer("limit", request.query_params.get("limit", 50), minimum=1, maximum=1000)
    total, jobs = await runtime(request).queues.dead_list(queue, offset, limit)
    entries = [
        dumps({"id": j.id, "attempt": j.attempt, "last_error": j.last_error, "failed_at": j.failed_at})[:-1]
        + b',"body":'
        + j.body
        + b"}"
        for j in jobs
    ]
    return Response(b'{"total":%d,"jobs":[' % total + b",".join(entries) + b"]}", media_type=JSON)


def _ids(body: dict[str, Any]) -> list[str] | None:
    if "ids" not in body:
        return None
    ids = body["ids"]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise BadRequest("ids must be a list of job ids")
    return ids


async def dead_retry(request: Request) -> Response:
    """POST /dead/{queue}/retry: ``{"ids": [...]}`` retries those; ``{}`` or no body retries all."""
    queue = queue_of(request)
    body = await read_json_object(request)
    count = await runtime(request).queues.dead_retry(queue, _ids(body))
    return json_response({"queue": queue, "retried": count})


async def dead_purge(request: Request) -> Response:
    """DELETE /dead/{queue}: delete every dead job."""
    await runtime(request).queues.dead_delete(queue_of(request))
    return Response(status_code=204)


async def dead_delete_one(request: Request) -> Response:
    """DELETE /dead/{queue}/{id}: delete one dead job (404 if it is not in the list)."""
    if not await runtime(request).queues.dead_delete(queue_of(request), [request.path_params["id"]]):
        raise UnknownJob("no such dead job")
    return Response(status_code=204)


def routes() -> list[Route]:
    """The REST routes (the app adds /ws, /stats, /w, /health, static files)."""
    return [
        Route("/q/{queue}", push_job, methods=["POST", "PUT"]),
        Route("/q/{queue}", fetch_job, methods=["GET"]),
        Route("/q/{queue}", purge_queue, methods=["DELETE"]),
        Route("/qb/{queue}", push_batch, methods=["POST"]),
        Route("/qb/{queue}", fetch_batch, methods=["GET"]),
        Route("/j/{queue}", queue_info, methods=["GET"]),
        Route("/j/{queue}/{id}", job_info, methods=["GET"]),
        Route("/j/{queue}/{id}/{action:str}", settle_job, methods=["POST"]),
        Route("/status/", status_all, methods=["GET"]),
        Route("/status", status_all, methods=["GET"]),
        Route("/status/{queue}", status_queue, methods=["GET"]),
        Route("/control/{queue}", control_get, methods=["GET"]),
        Route("/control/{queue}", control_set, methods=["POST"]),
        Route("/dead/{queue}", dead_list, methods=["GET"]),
        Route("/dead/{queue}", dead_purge, methods=["DELETE"]),
        Route("/dead/{queue}/retry", dead_retry, methods=["POST"]),
        Route("/dead/{queue}/{id}", dead_delete_one, methods=["DELETE"]),
    ]
