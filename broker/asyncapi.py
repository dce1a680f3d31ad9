"""The AsyncAPI 3.0 document of the WebSocket protocol, served at ``GET /asyncapi.json``.

Every frame of ``docs/protocol.md`` is one message here, with a JSON Schema payload; operations
pair each client frame with its replies. The schemas state what the broker accepts and sends;
the tests validate real frames against them.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from broker.frames import MAX_ATTEMPTS, MAX_PRIORITY, MAX_SECONDS, NAME_RE, ErrorCode
from broker.models import dumps

JSONSchema = dict[str, Any]

EVENTS = ("pushed", "delivered", "acked", "nacked", "dead", "progress")


def _ref(name: str) -> JSONSchema:
    return {"$ref": f"#/components/schemas/{name}"}


SCHEMAS: dict[str, JSONSchema] = {
    "name": {
        "type": "string",
        "pattern": f"^{NAME_RE.pattern}$",
        "description": "A queue or channel name: 1-128 characters of A-Z a-z 0-9 _ . : -, the first a letter or digit.",
    },
    "ref": {"type": "string", "description": "The client's correlation string, echoed in the one reply."},
    "jobId": {"type": "string", "minLength": 1},
    "token": {"type": "string", "minLength": 1, "description": "The lease token of one delivery of a job."},
    "seconds": {"type": "number", "minimum": 0, "maximum": MAX_SECONDS},
    "lease": {"type": "number", "exclusiveMinimum": 0, "description": "Seconds, at most limits max_lease."},
    "any": {"description": "Any JSON value."},
}


def _frame(op: str, required: dict[str, JSONSchema], optional: dict[str, JSONSchema] | None = None) -> JSONSchema:
    props = {"op": {"const": op}, **required, **(optional or {})}
    return {"type": "object", "required": ["op", *required], "properties": props}


def _client(op: str, required: dict[str, JSONSchema], optional: dict[str, JSONSchema] | None = None) -> JSONSchema:
    return _frame(op, required, {**(optional or {}), "ref": _ref("ref")})


def _reply(op: str, required: dict[str, JSONSchema], optional: dict[str, JSONSchema] | None = None) -> JSONSchema:
    return _frame(op, required, {**(optional or {}), "ref": _ref("ref")})


_JOB_OP = {"id": _ref("jobId"), "token": _ref("token")}
_WATCH = ({"topic": {"enum": ["stats", "events"]}}, {"queue": _ref("name")})

# name -> (summary, payload schema)
CLIENT_MESSAGES: dict[str, tuple[str, JSONSchema]] = {
    "subscribe": (
        "Receive the queue's jobs; prefetch is the credit (most jobs held unacked).",
        _client(
            "subscribe",
            {"queue": _ref("name")},
            {
                "prefetch": {"type": "integer", "minimum": 1, "default": 10},
                "ack": {"enum": ["manual", "auto"], "default": "manual"},
                "lease": _ref("lease"),
            },
        ),
    ),
    "unsubscribe": (
        "Stop receiving; held jobs go back to the queue at once.",
        _client("unsubscribe", {"queue": _ref("name")}),
    ),
    "ack": ("The job is done.", _client("ack", _JOB_OP, {"result": _ref("any")})),
    "nack": (
        "The attempt failed: retry after backoff (or delay), or dead-letter.",
        _client("nack", _JOB_OP, {"delay": _ref("seconds"), "error": {"type": "string"}}),
    ),
    "touch": ("Extend the job's lease.", _client("touch", _JOB_OP, {"lease": _ref("lease")})),
    "progress": (
        "Report progress (an event to watchers); extends the lease.",
        _client("progress", {**_JOB_OP, "data": _ref("any")}),
    ),
    "push": (
        "Push one job (body) or a batch (jobs, no per-job options).",
        {
            "oneOf": [
                _client(
                    "push",
                    {"queue": _ref("name"), "body": _ref("any")},
                    {
                        "priority": {"type": "integer", "minimum": 0, "maximum": MAX_PRIORITY},
                        "delay": _ref("seconds"),
                        "uniq": {"type": "string", "minLength": 1},
                        "ttl": _ref("seconds"),
                        "max_attempts": {"type": "integer", "minimum": 1, "maximum": MAX_ATTEMPTS},
                    },
                ),
                {
                    **_client("push", {"queue": _ref("name"), "jobs": {"type": "array", "minItems": 1}}),
                    "not": {
                        "anyOf": [
                            {"required": [k]} for k in ("body", "priority", "delay", "uniq", "ttl", "max_attempts")
                        ]
                    },
                },
            ]
        },
    ),
    "publish": (
        "Broadcast data to every listener of the channel (at-most-once).",
        _client("publish", {"channel": _ref("name"), "data": _ref("any")}),
    ),
    "listen": ("Receive the channel's messages.", _client("listen", {"channel": _ref("name")})),
    "unlisten": ("Stop receiving the channel's messages.", _client("unlisten", {"channel": _ref("name")})),
    "watch": ("Receive the stats feed or job events (of one queue, or every queue).", _client("watch", *_WATCH)),
    "unwatch": ("Stop a watch.", _client("unwatch", *_WATCH)),
    "auth": (
        "Authenticate the connection with a bearer token.",
        _client("auth", {"token": {"type": "string", "minLength": 1}}),
    ),
}

SERVER_MESSAGES: dict[str, tuple[str, JSONSchema]] = {
    "subscribed": (
        "Reply to subscribe: the settings in effect.",
        _reply(
            "subscribed",
            {
                "queue": _ref("name"),
                "prefetch": {"type": "integer", "minimum": 1},
                "ack": {"enum": ["manual", "auto"]},
                "lease": {"type": "number"},
            },
        ),
    ),
    "unsubscribed": ("Reply to unsubscribe.", _reply("unsubscribed", {"queue": _ref("name")})),
    "listening": ("Reply to listen.", _reply("listening", {"channel": _ref("name")})),
    "unlistened": ("Reply to unlisten.", _reply("unlistened", {"channel": _ref("name")})),
    "watching": ("Reply to watch.", _reply("watching", *_WATCH)),
    "unwatched": ("Reply to unwatch.", _reply("unwatched", *_WATCH)),
    "pushed": (
        "Reply to push: the new job's id, or the batch's ids in order.",
        {
            "oneOf": [
                _reply("pushed", {"id": _ref("jobId")}),
                _reply("pushed", {"ids": {"type": "array", "items": _ref("jobId")}}),
            ]
        },
    ),
    "ok": (
        "Reply to ack, nack, touch, progress, publish and auth frames that carried a ref.",
        _reply("ok", {"ref": _ref("ref")}),
    ),
    "error": (
        "A frame failed (ref: its ref, or null), or an unsolicited error (unavailable).",
        _frame(
            "error",
            {
                "ref": {"type": ["string", "null"]},
                "error": {"type": "string"},
                "code": {"enum": [code.value for code in ErrorCode]},
            },
            {"id": {"$ref": "#/components/schemas/jobId", "description": "job_exists: the existing job"}},
        ),
    ),
    "job": (
        "A job of a subscribed queue. No token for auto-ack subscriptions.",
        _frame(
            "job",
            {
                "queue": _ref("name"),
                "id": _ref("jobId"),
                "attempt": {"type": "integer", "minimum": 1},
                "body": _ref("any"),
            },
            {"token": _ref("token")},
        ),
    ),
    "message": (
        "A message published on a listened channel.",
        _frame("message", {"channel": _ref("name"), "data": _ref("any")}),
    ),
    "stats": (
        "A stats snapshot, about once a second (the members of GET /stats' snapshot).",
        _frame(
            "stats",
            {
                "ts": {"type": "number"},
                "totals": {"type": "object"},
                "queues": {"type": "object", "additionalProperties": {"type": "object"}},
                "processes": {"type": "array"},
                "workers": {"type": "array"},
            },
        ),
    ),
    "event": (
        "A job lifecycle event of a watched queue.",
        _frame(
            "event",
            {"queue": _ref("name"), "id": _ref("jobId"), "event": {"enum": list(EVENTS)}, "data": _ref("any")},
        ),
    ),
    "shutdown": (
        "The broker is stopping: held jobs are back in their queues; the socket closes with 1001.",
        _frame("shutdown", {}),
    ),
}

REPLIES = {
    "subscribe": ["subscribed", "error"],
    "unsubscribe": ["unsubscribed", "error"],
    "ack": ["ok", "error"],
    "nack": ["ok", "error"],
    "touch": ["ok", "error"],
    "progress": ["ok", "error"],
    "push": ["pushed", "error"],
    "publish": ["ok", "error"],
    "listen": ["listening", "error"],
    "unlisten": ["unlistened", "error"],
    "watch": ["watching", "error"],
    "unwatch": ["unwatched", "error"],
    "auth": ["ok", "error"],
}

DESCRIPTION = """\
One JSON object per text frame, each with an "op". A client frame may carry "ref"; every frame \
with a ref gets exactly one reply with that ref. Without a ref, ack, nack, touch, progress, \
publish and auth are answered only on error. Close codes: 1000 idle timeout, 1001 graceful \
shutdown, 1008 too many protocol errors, 1009 frame over max_frame, 1013 connection limit. \
See docs/protocol.md for credit, leases and delivery semantics."""


def _message(name: str, summary: str, payload: JSONSchema) -> dict[str, Any]:
    return {"name": name, "title": name, "summary": summary, "contentType": "application/json", "payload": payload}


def document(host: str = "localhost:5000", version: str = "0.1.0") -> dict[str, Any]:
    """The AsyncAPI 3.0 document, with ``host`` as the server address."""
    messages = {
        **{f"{n}": _message(n, s, p) for n, (s, p) in CLIENT_MESSAGES.items()},
        **{f"{n}": _message(n, s, p) for n, (s, p) in SERVER_MESSAGES.items()},
    }
    channel_messages = {n: {"$ref": f"#/components/messages/{n}"} for n in messages}

    def msgs(channel: str, names: list[str]) -> list[dict[str, str]]:
        return [{"$ref": f"#/channels/{channel}/messages/{n}"} for n in names]

    operations: dict[str, Any] = {}
    for name in CLIENT_MESSAGES:
        operations[name] = {
            "action": "receive",
            "channel": {"$ref": "#/channels/ws"},
            "summary": CLIENT_MESSAGES[name][0],
            "messages": msgs("ws", [name]),
            "reply": {"channel": {"$ref": "#/channels/ws"}, "messages": msgs("ws", REPLIES[name])},
        }
    for name in ("job", "message", "stats", "event", "shutdown"):
        operations[f"send_{name}"] = {
            "action": "send",
            "channel": {"$ref": "#/channels/ws"},
            "summary": SERVER_MESSAGES[name][0],
            "messages": msgs("ws", [name]),
        }
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "presque WebSocket protocol", "version": version, "description": DESCRIPTION},
        "defaultContentType": "application/json",
        "servers": {"broker": {"host": host, "protocol": "ws", "description": "a presque broker process"}},
        "channels": {
            "ws": {"address": "/ws", "title": "one connection: every frame", "messages": channel_messages},
            "wsQueue": {
                "address": "/ws/{queue}",
                "title": "the same, subscribed to {queue} with the defaults at once",
                "parameters": {"queue": {"description": "queue name"}},
                "messages": channel_messages,
            },
        },
        "operations": operations,
        "components": {"schemas": SCHEMAS, "messages": messages},
    }


async def asyncapi_json(request: Request) -> Response:
    """GET /asyncapi.json."""
    from broker import __version__

    host = request.headers.get("host", "localhost:5000")
    return Response(dumps(document(host, __version__)), media_type="application/json")
