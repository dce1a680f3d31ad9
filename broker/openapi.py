"""The OpenAPI 3.1 document served at ``/openapi.json``: every HTTP route, hand-written.

The document is built from the settings the broker runs with, so that the bounds it states
(``limits.max_batch``, ``limits.max_wait``, ``queues.max_lease``) and its security (401/403 only
when ``auth.tokens`` is set) are the ones this broker enforces. ``tests/test_openapi.py`` keeps it
true: its paths and methods must equal the app's routes, and real responses of every operation
must match its schemas; ``tests/test_schemathesis.py`` fuzzes the broker against it.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from broker import __version__
from broker.auth import ROUTE_ROLES
from broker.config import Settings
from broker.models import dumps
from broker.params import MAX_DELAY

Schema = dict[str, Any]
SETTLE_ACTIONS = ("ack", "nack", "touch")


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None, **extra: Any) -> Schema:
    """An object schema with these required (and optional) properties."""
    return {"type": "object", "required": list(required), "properties": {**required, **(optional or {})}, **extra}


STRING: Schema = {"type": "string"}
INT: Schema = {"type": "integer", "minimum": 0}
NUMBER: Schema = {"type": "number"}
ANY_JSON: Schema = {"description": "any JSON value"}
BOOL: Schema = {"type": "boolean"}
NULLABLE_NUMBER: Schema = {"type": ["number", "null"]}
NULLABLE_STRING: Schema = {"type": ["string", "null"]}


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


def ints(names: str) -> dict[str, Schema]:
    """Non-negative integer properties, by space-separated names."""
    return dict.fromkeys(names.split(), INT)


STRINGS = array(STRING)

SCHEMAS: dict[str, Schema] = {
    "Error": obj({"error": STRING}),
    "JobExists": obj({"error": STRING, "id": STRING}),
    "QueueName": {
        "type": "string",
        "pattern": "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$",
        "description": "1-128 characters of A-Z a-z 0-9 _ . : -, starting with a letter or digit",
    },
    "Pushed": obj({"id": STRING, "queue": STRING}),
    "PushedBatch": obj({"ids": STRINGS, "queue": STRING}),
    "QueueInfo": obj(
        {"queue_name": STRING, "paused": BOOL}
        | ints("job_count job_failed job_processed ready delayed leased dead pushed retried expired dead_lettered")
    ),
    "Job": obj(
        {
            "id": STRING,
            "queue": STRING,
            "state": {"enum": ["ready", "delayed", "leased", "dead"]},
            "attempt": INT,
            "priority": {"type": "integer", "minimum": 0, "maximum": 9},
            "created_at": NUMBER,
            "run_at": NUMBER,
            "last_error": NULLABLE_STRING,
            "failures": INT,
            "max_attempts": INT,
            "body": ANY_JSON,
        }
    ),
    "Acked": obj({"id": STRING, "status": {"const": "acked"}}),
    "Nacked": obj({"id": STRING, "status": {"enum": ["ready", "delayed", "dead", "expired"]}, "run_at": NUMBER}),
    "Touched": obj({"id": STRING, "status": {"const": "leased"}, "deadline": NUMBER}),
    "QueueList": obj({"queues": STRINGS, "size": INT}),
    "QueueSize": obj({"queue": STRING, "size": INT}, {"jobs": array(ANY_JSON)}),
    "Control": obj({"queue": STRING, "status": {"enum": [0, 1]}}),
    "ControlUpdated": obj({"queue": STRING, "response": {"const": "updated"}}),
    "DeadList": obj(
        {
            "total": INT,
            "jobs": array(
                obj(
                    {"id": STRING, "attempt": INT, "last_error": NULLABLE_STRING, "failed_at": NUMBER, "body": ANY_JSON}
                )
            ),
        }
    ),
    "DeadRetried": obj({"queue": STRING, "retried": INT}),
    "WorkersOfQueue": obj({"queue_name": STRING, "workers_list": STRINGS, "processed": INT, "failed": INT}),
    "WorkerRegistered": obj({"queue": STRING, "worker": STRING}),
    "QueueStats": obj(
        ints("ready delayed leased dead consumers pushed processed failed retried dead_lettered expired")
        | {"paused": BOOL, "push_rate": NUMBER, "ack_rate": NUMBER}
        | dict.fromkeys(("oldest_age", "latency_p50", "latency_p99"), NULLABLE_NUMBER)
    ),
    "Stats": obj(
        {
            "ts": NUMBER,
            "totals": {"type": "object", "additionalProperties": NUMBER},
            "queues": {"type": "object", "additionalProperties": ref("QueueStats")},
            "processes": {"type": "array", "items": obj({"id": STRING})},
            "workers": {"type": "array", "items": obj({"id": STRING, "queues": STRINGS})},
            "redis": {"type": "object"},
            "size": INT,
            "workers_count": INT,
        }
    ),
    "Series": obj(dict.fromkeys(("pushed", "processed", "ready"), array(NULLABLE_NUMBER))),
    "History": obj(
        {
            "step": {"enum": [1, 60]},
            "start": {"type": "integer"},
            "totals": ref("Series"),
            "queues": {"type": "object", "additionalProperties": ref("Series")},
        }
    ),
    "Health": obj({"status": {"enum": ["ok", "unavailable"]}}, {"error": STRING}),
    "Auth": obj(
        {
            "auth": BOOL,
            "name": NULLABLE_STRING,
            "roles": obj({"produce": STRINGS, "consume": STRINGS, "admin": STRINGS}),
        }
    ),
}


def json_content(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def reply(description: str, schema: Schema | None = None, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """One response: JSON (``schema``), or no content."""
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = json_content(schema)
    if headers:
        out["headers"] = headers
    return out


def error(description: str) -> dict[str, Any]:
    return reply(description, ref("Error"))


def header(description: str, *, required: bool = True, schema: Schema = STRING) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": schema}


RETRY_AFTER = {"Retry-After": header("seconds to wait", schema={"type": "string", "pattern": "^[0-9]+$"})}
NO_CONTENT = reply("done, no content")


def query(name: str, schema: Schema, description: str, *, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


def path_param(name: str, schema: Schema, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


QUEUE = path_param("queue", ref("QueueName"), "the queue")
JOB_ID = path_param("id", {"type": "string", "minLength": 1}, "the job id")
WORKER = {
    "name": "X-presque-workerid",
    "in": "header",
    "required": True,
    "schema": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": "\\S"},
    "description": "the worker's id",
}


def push_params(settings: Settings, *, uniq: bool) -> list[dict[str, Any]]:
    params = [
        QUEUE,
        query("delayed", {"type": "number", "minimum": 0}, "Unix time (seconds) the job becomes ready; not with delay"),
        query("delay", {"type": "number", "minimum": 0, "maximum": MAX_DELAY}, "seconds until ready; not with delayed"),
        query("priority", {"type": "integer", "minimum": 0, "maximum": 9}, "higher first (default 5)"),
        query("ttl", {"type": "number", "minimum": 0, "maximum": MAX_DELAY}, "drop if not taken within (s)"),
        query("max_attempts", {"type": "integer", "minimum": 1, "maximum": 1000}, "failures before dead-letter"),
    ]
    if uniq:
        params.append(query("uniq", {"type": "string", "minLength": 1, "maxLength": 256}, "one live job per key"))
    return params


def json_body(schema: Schema, description: str, *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "description": description, "content": json_content(schema)}


def operations(settings: Settings) -> dict[str, dict[str, dict[str, Any]]]:
    """``{path: {method: operation}}`` without the responses every operation shares."""
    limits, max_lease = settings.limits, settings.queues.max_lease
    batch = {"type": "array", "minItems": 1, "maxItems": limits.max_batch, "items": ANY_JSON}
    job_headers = {
        "X-Presque-Job-Id": header("the job's id"),
        "X-Presque-Attempt": header("deliveries so far, this one included", schema={"type": "string"}),
        "X-Presque-Lease-Token": header("the lease token (leased fetch only)", required=False),
    }
    pushed = {
        "201": reply("pushed", ref("Pushed"), {"Location": header("/j/{queue}/{id}")}),
        "409": reply("a job with this uniq key exists", ref("JobExists")),
    }
    token = {"type": "string", "minLength": 1}
    settle = {
        "ack": (obj({"token": token}, {"result": ANY_JSON}), "Acked", "acknowledge: the job is done"),
        "nack": (
            obj(
                {"token": token},
                {"delay": {"type": ["number", "null"], "minimum": 0, "maximum": MAX_DELAY}, "error": STRING},
            ),
            "Nacked",
            "the attempt failed: retry after backoff (or delay), or dead-letter",
        ),
        "touch": (
            obj({"token": token}, {"lease": {"type": ["number", "null"], "minimum": 1, "maximum": max_lease}}),
            "Touched",
            "extend the lease to lease seconds from now",
        ),
    }
    ops: dict[str, dict[str, dict[str, Any]]] = {
        "/q/{queue}": {
            "post": {
                "summary": "Push one job (the body, stored byte for byte; any Content-Type)",
                "parameters": push_params(settings, uniq=True),
                "requestBody": json_body(ANY_JSON, "the job: any JSON value"),
                "responses": pushed,
            },
            "put": {
                "summary": "Re-queue after a failure (presque): push the body again, counting a failure",
                "parameters": push_params(settings, uniq=True),
                "requestBody": json_body(ANY_JSON, "the job: any JSON value"),
                "responses": pushed,
            },
            "get": {
                "summary": "Take one job: destructively, or leased with ?lease=",
                "parameters": [
                    QUEUE,
                    query("wait", {"type": "number", "minimum": 0, "maximum": limits.max_wait}, "long-poll seconds"),
                    query("lease", {"type": "number", "minimum": 1, "maximum": max_lease}, "lease seconds"),
                ],
                "responses": {
                    "200": reply("the job's body exactly as pushed", ANY_JSON, job_headers),
                    "404": error('"no job", or "queue is closed" when stopped'),
                },
            },
            "delete": {
                "summary": "Purge the ready and delayed jobs",
                "parameters": [QUEUE],
                "responses": {"204": NO_CONTENT},
            },
        },
        "/qb/{queue}": {
            "post": {
                "summary": "Push a batch, atomically",
                "parameters": push_params(settings, uniq=False),
                "requestBody": json_body(
                    {"oneOf": [obj({"jobs": batch}, additionalProperties=False), batch]},
                    '{"jobs": [...]} (presque) or a JSON array of job bodies',
                ),
                "responses": {"201": reply("pushed, ids in the order of the jobs", ref("PushedBatch"))},
            },
            "get": {
                "summary": "Take up to batch_size jobs destructively",
                "parameters": [
                    QUEUE,
                    query("batch_size", {"type": "integer", "minimum": 1, "maximum": limits.max_batch}, "default 1"),
                ],
                "responses": {
                    "200": reply("the jobs' bodies", {"type": "array", "items": ANY_JSON}),
                    "404": error('"no job", or "queue is closed"'),
                },
            },
        },
        "/j/{queue}": {
            "get": {
                "summary": "A queue's sizes and counters (presque's fields and ours)",
                "parameters": [QUEUE],
                "responses": {"200": reply("figures", ref("QueueInfo"))},
            }
        },
        "/j/{queue}/{id}": {
            "get": {
                "summary": "One job's state",
                "parameters": [QUEUE, JOB_ID],
                "responses": {"200": reply("the job", ref("Job")), "404": error("unknown job")},
            }
        },
        "/status/": {"get": {"summary": "Every queue's name", "responses": {"200": reply("queues", ref("QueueList"))}}},
        "/status": {"get": {"summary": "Same as /status/", "responses": {"200": reply("queues", ref("QueueList"))}}},
        "/status/{queue}": {
            "get": {
                "summary": "A queue's ready size, and with with_desc the next bodies",
                "parameters": [
                    QUEUE,
                    query("with_desc", STRING, f"any value but empty, 0 or false adds up to {limits.max_desc} bodies"),
                ],
                "responses": {"200": reply("size", ref("QueueSize"))},
            }
        },
        "/control/{queue}": {
            "get": {
                "summary": "Whether the queue delivers (1) or is stopped (0)",
                "parameters": [QUEUE],
                "responses": {"200": reply("status", ref("Control"))},
            },
            "post": {
                "summary": "Start or stop delivering",
                "parameters": [QUEUE],
                "requestBody": json_body(obj({"status": {"enum": ["start", "stop"]}}), "what to do"),
                "responses": {"200": reply("updated", ref("ControlUpdated"))},
            },
        },
        "/dead/{queue}": {
            "get": {
                "summary": "The dead-letter list, paged",
                "parameters": [
                    QUEUE,
                    query("offset", {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}, "default 0"),
                    query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "default 50"),
                ],
                "responses": {"200": reply("dead jobs", ref("DeadList"))},
            },
            "delete": {
                "summary": "Delete every dead job",
                "parameters": [QUEUE],
                "responses": {"204": NO_CONTENT},
            },
        },
        "/dead/{queue}/retry": {
            "post": {
                "summary": "Retry dead jobs: these ids, or all with an empty body or {}",
                "parameters": [QUEUE],
                "requestBody": json_body(obj({}, {"ids": STRINGS}), "which jobs", required=False),
                "responses": {"200": reply("how many went back", ref("DeadRetried"))},
            }
        },
        "/dead/{queue}/{id}": {
            "delete": {
                "summary": "Delete one dead job",
                "parameters": [QUEUE, JOB_ID],
                "responses": {"204": NO_CONTENT, "404": error("no such dead job")},
            }
        },
        "/w/": {
            "get": {
                "summary": "Worker ids; with queue_name, that queue's workers and figures (presque)",
                "parameters": [query("queue_name", ref("QueueName"), "a queue")],
                "responses": {"200": reply("workers", {"oneOf": [STRINGS, ref("WorkersOfQueue")]})},
            }
        },
        "/w/{queue}": {
            "post": {
                "summary": "Register (or refresh) a worker on a queue",
                "parameters": [QUEUE, WORKER],
                "requestBody": json_body({"type": "object"}, "optional figures", required=False),
                "responses": {"201": reply("registered", ref("WorkerRegistered"))},
            },
            "delete": {
                "summary": "Unregister a worker from a queue",
                "parameters": [QUEUE, WORKER],
                "responses": {"204": NO_CONTENT},
            },
        },
        "/stats": {
            "get": {"summary": "Global and per-queue figures", "responses": {"200": reply("stats", ref("Stats"))}}
        },
        "/stats/history": {
            "get": {
                "summary": "Chart series: per second over 15 minutes, or per minute over 24 hours",
                "parameters": [query("range", {"enum": ["15m", "24h"]}, "default 15m")],
                "responses": {"200": reply("series", ref("History"))},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Every figure of the deployment in Prometheus text format (docs/deploy.md)",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": STRING}},
                    }
                },
            }
        },
        "/health": {
            "get": {
                "summary": "200 when Redis answers, else 503",
                "responses": {
                    "200": reply("healthy", ref("Health")),
                    "503": reply("Redis does not answer", ref("Health"), RETRY_AFTER),
                },
            }
        },
        "/auth": {
            "get": {
                "summary": "Whether auth is on, and the name and roles of the token sent",
                "responses": {"200": reply("the token's grants", ref("Auth"))},
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": reply("OpenAPI 3.1", {"type": "object"})}}
        },
        "/asyncapi.json": {
            "get": {
                "summary": "The AsyncAPI document of the WebSocket protocol",
                "responses": {"200": reply("AsyncAPI", {"type": "object"})},
            }
        },
    }
    for action in SETTLE_ACTIONS:
        body, schema, summary = settle[action]
        ops[f"/j/{{queue}}/{{id}}/{action}"] = {
            "post": {
                "summary": summary.capitalize(),
                "parameters": [QUEUE, JOB_ID],
                "requestBody": json_body(body, "the lease token the job was delivered with"),
                "responses": {
                    "200": reply("done", ref(schema)),
                    "404": error("unknown job"),
                    "409": error("stale token: the lease expired or the job was delivered again"),
                },
            }
        }
    return ops


def route_path(path: str) -> str:
    """The app's route template for a documented path (the settle actions are one route)."""
    head, _, action = path.rpartition("/")
    return f"{head}/{{action}}" if head == "/j/{queue}/{id}" and action in SETTLE_ACTIONS else path


def document(settings: Settings, *, dashboard: bool = True) -> dict[str, Any]:
    """The OpenAPI document of a broker running with ``settings``.

    Args:
        settings: the broker's settings.
        dashboard: whether ``GET /`` serves the dashboard page.
    """
    auth_on = settings.auth.enabled
    paths = operations(settings)
    if dashboard:
        paths["/"] = {
            "get": {
                "summary": "The dashboard page (its files are under /static/)",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": STRING}}}},
            }
        }
    for path, methods in paths.items():
        for method, op in methods.items():
            op["operationId"] = f"{method}:{path}"
            responses = op["responses"]
            if path != "/health":
                responses["503"] = error("Redis unavailable, or too many requests in progress") | {
                    "headers": RETRY_AFTER
                }
            if "{queue}" in path or any(p.get("in") in ("query", "header") for p in op.get("parameters", [])):
                responses.setdefault("400", error("a bad parameter (the message names it)"))
            if "requestBody" in op:
                responses.setdefault("400", error("invalid JSON or a bad field (the message names it)"))
                responses.setdefault("413", error("body over limits.max_body or batch over limits.max_batch"))
            if path == "/qb/{queue}" and method == "get":
                responses.setdefault("413", error("batch_size over limits.max_batch"))
            if auth_on and ROUTE_ROLES.get((route_path(path), method.upper())) is not None:
                op["security"] = [{"bearer": []}]
                responses["401"] = error("no token, or an unknown one")
                responses["403"] = error("the token lacks the role this route needs")
            elif path == "/auth" and auth_on:
                responses["401"] = error("an unknown token")
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "presque",
            "version": __version__,
            "description": (
                "A job queue broker on Redis, compatible with presque's REST API. Errors are "
                '{"error": "<message>"}. GET routes also answer HEAD. WebSockets (/ws, /ws/{queue}) '
                "are described in docs/protocol.md; access control in docs/security.md."
            ),
        },
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }
    if auth_on:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


async def openapi_json(request: Request) -> Response:
    """GET /openapi.json."""
    state = request.app.state
    cached: bytes | None = getattr(state, "openapi", None)
    if cached is None:
        cached = dumps(document(state.settings, dashboard=getattr(state, "dashboard", True)))
        state.openapi = cached
    return Response(cached, media_type="application/json")
