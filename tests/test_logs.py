"""Structured logs: JSON lines (``server.log_json``) and request/connection ids, end to end."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from broker.config import ServerSettings
from broker.logs import REQUEST_ID, JsonFormatter, RequestIdFilter, TextFormatter, setup_logging
from tests.servers import BrokerServer, RedisServer, wait_for_sync
from tests.wsclient import ws_connect


def json_lines(broker: BrokerServer) -> list[dict[str, Any]]:
    lines = broker.log_path.read_text(errors="replace").splitlines()
    return [orjson.loads(line) for line in lines if line.startswith("{")]


async def test_json_logs_carry_the_request_and_connection_ids(
    make_redis_server: Callable[..., RedisServer], make_broker: Callable[..., BrokerServer]
) -> None:
    redis = make_redis_server()
    broker = make_broker(redis.url, config={"server": {"log_json": True}, "redis": {"socket_timeout": 0.5}})
    async with httpx.AsyncClient(base_url=broker.url, timeout=10.0) as http:
        # The client's id comes back; a malformed one is replaced by a fresh one.
        assert (await http.get("/health", headers={"X-Request-Id": "req-42"})).headers["x-request-id"] == "req-42"
        fresh = (await http.get("/health", headers={"X-Request-Id": "no spaces allowed"})).headers["x-request-id"]
        assert fresh != "no spaces allowed" and len(fresh) == 16
        # A WebSocket connection's id is in its handshake answer and on uvicorn's line about it.
        async with ws_connect(broker.ws_url) as ws:
            connection_id = ws.conn.response.headers["x-request-id"] if ws.conn.response else ""
            assert connection_id.startswith("ws-")
        wait_for_sync(lambda: any(e.get("request_id") == connection_id for e in json_lines(broker)), 5.0)
        # A request's own log line (Redis down: a warning) carries its id.
        redis.stop()
        failed = await http.post("/q/jobs", json={}, headers={"X-Request-Id": "req-503"})
        assert failed.status_code == 503

    def warned() -> dict[str, Any] | None:
        for entry in json_lines(broker):
            if entry.get("request_id") == "req-503" and entry["level"] == "warning":
                return entry
        return None

    entry = wait_for_sync(warned, 5.0, message=f"no warning with the request id:\n{broker.log()}")
    assert entry["logger"] == "presque.app" and "/q/jobs" in entry["message"]
    assert {"ts", "pid", "message"} <= set(entry)
    # uvicorn's own lines are JSON too (its handlers make way for ours).
    assert any(e["logger"].startswith("uvicorn") and "startup complete" in e["message"] for e in json_lines(broker))


def record(message: str, **extra: Any) -> logging.LogRecord:
    made = logging.getLogger("presque.test").makeRecord("presque.test", logging.INFO, __file__, 1, message, (), None)
    for name, value in extra.items():
        setattr(made, name, value)
    RequestIdFilter().filter(made)
    return made


def test_formatters_add_the_id_and_extras() -> None:
    token = REQUEST_ID.set("abc")
    try:
        inside = record("hello world", queue="jobs")
    finally:
        REQUEST_ID.reset(token)
    outside = record("plain")
    entry = orjson.loads(JsonFormatter().format(inside))
    assert entry["message"] == "hello world" and entry["request_id"] == "abc" and entry["queue"] == "jobs"
    assert entry["level"] == "info" and entry["logger"] == "presque.test"
    assert "request_id" not in orjson.loads(JsonFormatter().format(outside))
    assert TextFormatter().format(inside).endswith("presque.test: hello world [abc]")
    assert TextFormatter().format(outside).endswith("presque.test: plain")


def test_exceptions_are_one_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        made = logging.getLogger("presque.test").makeRecord(
            "presque.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    line = JsonFormatter().format(made)
    assert "\n" not in line
    assert "ValueError: boom" in orjson.loads(line)["exc"]


def test_setup_logging_replaces_the_root_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # restored after the test
    monkeypatch.setattr(root, "level", root.level)
    stream = io.StringIO()
    handler = setup_logging(ServerSettings(log_json=True, log_level="warning"), stream=stream)
    assert root.handlers == [handler]
    logging.getLogger("presque.test").info("not shown")
    logging.getLogger("uvicorn.error").warning("shown")
    (line,) = stream.getvalue().splitlines()
    assert orjson.loads(line)["message"] == "shown"
