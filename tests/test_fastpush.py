"""The lean push path (broker/fastpush.py) answers exactly as the router would.

One broker app is served twice by real uvicorn servers in the test's loop: as the broker serves it
(the lean path in front) and through ``BrokerApp.serve_routed`` alone (middlewares and router, as
before the lean path). Both share one runtime and one Redis, so every request of a matrix of good
and bad ones is sent to both and the answers compared: status, every header in order (but
``date``), body — with job ids and generated request ids replaced by placeholders. The lean path's
``served`` count tells which requests it answered itself and which it handed to the app.

Every test runs twice: the broker served by uvicorn's own httptools protocol (the lean path as an
ASGI app) and by the broker's (``broker.httpproto``, which answers the requests it can below ASGI;
its ``served_below`` count tells which).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn

from broker.app import BrokerApp
from broker.httpproto import LeanHttpProtocol
from tests.servers import RedisServer, free_port, make_settings, run_broker, wait_for

pytestmark = pytest.mark.core

LIMITS = {"max_body": 1024, "max_batch": 5}
JOB_ID = re.compile(rb"\b[0-9a-f]{21}\b")
GENERATED_ID = re.compile(r"[0-9a-f]{16}")
TOKENS: dict[str, Any] = {
    "tokens": [
        {"name": "producer", "token": "producer-5ecret", "roles": {"produce": ["orders.*"]}},
        {"name": "consumer", "token": "consumer-5ecret", "roles": {"consume": ["*"]}},
    ]
}


@dataclass
class Twin:
    app: BrokerApp
    fast: httpx.AsyncClient
    routed: httpx.AsyncClient
    below: bool  # served by broker.httpproto, which serves what it can below ASGI
    server: uvicorn.Server  # the broker's


@pytest.fixture(params=["httptools", "lean"])
def protocol(request: pytest.FixtureRequest) -> Any:
    """uvicorn's HTTP implementation for the broker: its own, or the broker's (``presque serve``)."""
    return LeanHttpProtocol if request.param == "lean" else request.param


@contextlib.asynccontextmanager
async def twin(redis_url: str, protocol: Any, **sections: dict[str, Any]) -> AsyncIterator[Twin]:
    """The broker, and its app served a second time without the lean path."""
    settings = make_settings(redis_url, {"limits": LIMITS, **sections})
    async with run_broker(settings, http=protocol) as running:
        app = running.app
        assert isinstance(app, BrokerApp)
        port = free_port()
        config = uvicorn.Config(
            app.serve_routed, host="127.0.0.1", port=port, log_level="warning", lifespan="off", interface="asgi3"
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        try:
            await wait_for(lambda: server.started or task.done(), 10, message="the routed server did not start")
            async with (
                httpx.AsyncClient(base_url=running.url, timeout=10.0) as fast,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as routed,
            ):
                yield Twin(app, fast, routed, protocol is LeanHttpProtocol, running.server)
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 10)


@dataclass
class Case:
    method: str
    path: str
    content: bytes | Callable[[], AsyncIterator[bytes]] = b'{"n": 1}'
    params: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] | list[tuple[str, str]] = field(default_factory=dict)
    served: bool = False  # answered by the lean path itself

    def __str__(self) -> str:
        return f"{self.method} {self.path} {self.params} {self.headers} {self.content!r:.60}"


def answer(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    headers = []
    for name, value in response.headers.multi_items():
        if name == "date":
            continue
        if name == "location":
            value = JOB_ID.sub(b"<id>", value.encode()).decode()
        if name == "x-request-id" and GENERATED_ID.fullmatch(value):
            value = "<generated>"
        headers.append((name, value))
    return response.status_code, headers, JOB_ID.sub(b"<id>", response.content)


async def send(client: httpx.AsyncClient, case: Case) -> httpx.Response:
    content = case.content if isinstance(case.content, bytes) else case.content()
    return await client.request(case.method, case.path, content=content, params=case.params, headers=case.headers)


async def compare(t: Twin, cases: list[Case]) -> int:
    """Send each case to both servers, compare the answers; returns the jobs pushed to ``fp``."""
    pushed = 0
    fp = t.app.fast_push
    for case in cases:
        before, below = fp.served, fp.served_below
        fast = await send(t.fast, case)
        assert fp.served - before == int(case.served), f"served by the lean path? {case}"
        # Below ASGI: every request it serves but those with a chunked body.
        assert fp.served_below - below == int(case.served and t.below and isinstance(case.content, bytes)), str(case)
        routed = await send(t.routed, case)
        assert answer(fast) == answer(routed), str(case)
        assert fp.served - before == int(case.served)
        if fast.status_code == 201 and case.path.endswith("/fp"):
            pushed += 2 * len(fast.json().get("ids", [None]))
    return pushed


def chunks(*parts: bytes) -> Callable[[], AsyncIterator[bytes]]:
    """A body sent with ``Transfer-Encoding: chunked``, in these parts."""

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    return body


GOOD = [
    Case("POST", "/q/fp", served=True),
    Case("PUT", "/q/fp", served=True),
    Case("POST", "/q/fp", b'  {"spaced" : [1, 2]}  ', served=True),
    Case("POST", "/q/fp", b'"x"', {"priority": 7, "delay": 0, "ttl": 60, "max_attempts": 3}, served=True),
    Case("POST", "/q/fp", b"1", {"delay": 30}, served=True),
    Case("POST", "/q/fp", b"1", {"delayed": 1}, served=True),
    Case("POST", "/q/fp", b"1", {"unknown": "ignored"}, served=True),
    Case("POST", "/q/fp", headers={"X-Request-Id": "client-id.1:2"}, served=True),
    Case("POST", "/q/fp", headers={"X-Request-Id": "not a valid id"}, served=True),
    Case("POST", "/q/fp", headers=[("X-Request-Id", "first"), ("X-Request-Id", "second")], served=True),
    Case("POST", "/q/fp", headers={"Origin": "https://elsewhere.example"}, served=True),  # CORS off
    Case("POST", "/q/fp", chunks(b'{"a"', b": ", b"1}"), served=True),
    Case("POST", "/q/a.b:c-d_e", b"[]", served=True),
    Case("POST", "/q/fp", b"[" * 300 + b"]" * 300, served=True),  # stored as sent: never re-encoded
    Case("POST", "/qb/fp", b'[{"a": 1}, "two", 3]', served=True),
    Case("POST", "/qb/fp", b'{"jobs": [{"a" : 1}]}', {"priority": 9, "delay": 5}, served=True),
    Case("POST", "/qb/fp", chunks(b"[1,", b"2]"), served=True),
]
BAD = [
    Case("POST", "/q/bad!name"),
    Case("POST", "/q/-dash"),
    Case("POST", "/q/" + "x" * 129),
    Case("POST", "/q/"),
    Case("POST", "/q/a/b"),
    Case("POST", "/qb/"),
    Case("PATCH", "/q/fp"),
    Case("PUT", "/qb/fp", b"[1]"),
    Case("DELETE", "/qb/fp"),
    Case("POST", "/q/fp", b""),
    Case("POST", "/q/fp", b"   "),
    Case("POST", "/q/fp", b"{"),
    Case("POST", "/q/fp", b'{"a": 1} trailing'),
    Case("POST", "/q/fp", b"\xff\xfe"),
    Case("POST", "/q/fp", params={"priority": 10}),
    Case("POST", "/q/fp", params={"priority": "high"}),
    Case("POST", "/q/fp", params={"delay": 1, "delayed": 1}),
    Case("POST", "/q/fp", params={"delay": "nan"}),
    Case("POST", "/q/fp", params={"ttl": -5}),
    Case("POST", "/q/fp", params={"max_attempts": 0}),
    Case("POST", "/q/fp", params={"uniq": ""}),
    Case("POST", "/q/fp", b'"' + b"x" * 2000 + b'"'),
    Case("PUT", "/q/fp", b'"' + b"x" * 2000 + b'"'),
    Case("POST", "/q/fp", chunks(*[b" " * 500] * 3, b"1")),
    Case("POST", "/qb/fp", b"[]"),
    Case("POST", "/qb/fp", b"{}"),
    Case("POST", "/qb/fp", b'{"jobs": 1}'),
    Case("POST", "/qb/fp", b'{"jobs": [1], "x": 1}'),
    Case("POST", "/qb/fp", b'{"jobs": {"jobs": [1]}}'),
    Case("POST", "/qb/fp", b'"string"'),
    Case("POST", "/qb/fp", b"[1,"),
    Case("POST", "/qb/fp", b""),
    Case("POST", "/qb/fp", b"[1, 2, 3, 4, 5, 6]"),
    Case("POST", "/qb/fp", b"[" + b"[" * 300 + b"]" * 300 + b"]"),
    Case("POST", "/qb/fp", b"[1]", {"uniq": "k"}),
    Case("POST", "/qb/fp", b"[1]", {"priority": 10}),
    Case("POST", "/qb/fp", b"[" + b'"' + b"x" * 2000 + b'"]'),
]


async def test_good_and_bad_requests_answer_alike(redis_url: str, protocol: Any) -> None:
    async with twin(redis_url, protocol) as t:
        await t.routed.get("/health")  # the app builds its middleware stack: the lean path starts
        pushed = await compare(t, GOOD + BAD)
        assert pushed == 2 * (13 + 3 + 1 + 2)
        assert (await t.fast.get("/j/fp")).json()["pushed"] == pushed
        assert (await t.fast.get("/j/a.b:c-d_e")).json()["pushed"] == 2


async def test_uniq_clash_answers_alike(redis_url: str, protocol: Any) -> None:
    async with twin(redis_url, protocol) as t:
        await t.routed.get("/health")
        first = await t.fast.post("/q/u", content=b"1", params={"uniq": "k"})
        assert first.status_code == 201
        clash = Case("POST", "/q/u", b"2", {"uniq": "k"}, served=True)
        await compare(t, [clash])
        response = await send(t.fast, clash)
        assert response.status_code == 409 and response.json()["id"] == first.json()["id"]
        assert response.headers["x-request-id"]


async def test_pushed_jobs_are_stored_as_sent(redis_url: str, protocol: Any) -> None:
    async with twin(redis_url, protocol) as t:
        await t.routed.get("/health")
        pushed = await t.fast.post("/q/st", content=b'{"a" : 1}', params={"priority": 9})
        assert pushed.status_code == 201
        job_id = pushed.json()["id"]
        assert pushed.headers["location"] == f"/j/st/{job_id}"
        view = (await t.fast.get(f"/j/st/{job_id}")).json()
        assert (view["priority"], view["body"]) == (9, {"a": 1})
        assert (await t.fast.get("/q/st")).content == b'{"a" : 1}'  # byte for byte
        batch = await t.fast.post("/qb/st", content=b'[{"b" : 2}, "c"]')
        assert batch.status_code == 201 and len(batch.json()["ids"]) == 2
        assert (await t.fast.get("/qb/st", params={"batch_size": 5})).content == b'[{"b":2},"c"]'  # re-encoded


async def test_auth_answers_alike(redis_url: str, protocol: Any) -> None:
    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    async with twin(redis_url, protocol, auth=TOKENS) as t:
        await t.routed.get("/health")
        await compare(
            t,
            [
                Case("POST", "/q/orders.eu", served=False),
                Case("POST", "/q/orders.eu", headers={"Authorization": "Basic abc"}),
                Case("POST", "/q/orders.eu", headers=bearer("wrong")),
                Case("POST", "/q/orders.eu", headers=bearer("consumer-5ecret")),
                Case("POST", "/q/other", headers=bearer("producer-5ecret")),
                Case("POST", "/qb/other", b"[1]", headers=bearer("producer-5ecret")),
                Case("POST", "/q/bad!name", headers=bearer("producer-5ecret")),
                Case("POST", "/q/orders.eu", b"{", headers=bearer("producer-5ecret")),
                Case("POST", "/q/orders.eu", headers=bearer("producer-5ecret"), served=True),
                Case("PUT", "/q/orders.eu", headers=bearer("producer-5ecret"), served=True),
                Case("POST", "/qb/orders.eu", b"[1, 2]", headers=bearer("producer-5ecret"), served=True),
            ],
        )


async def test_cors_answers_alike(redis_url: str, protocol: Any) -> None:
    async with twin(redis_url, protocol, server={"cors_origins": ["https://app.example"]}) as t:
        await t.routed.get("/health")
        await compare(
            t,
            [
                Case("POST", "/q/c", served=True),  # same-origin: CORS adds only Vary: Origin
                Case("POST", "/qb/c", b"[1]", served=True),
                Case("POST", "/q/c", headers={"Origin": "https://app.example"}),
                Case("POST", "/q/c", headers={"Origin": "https://evil.example"}),
                Case("POST", "/q/c", b"{"),
            ],
        )
        same_origin = await t.fast.post("/q/c", content=b"1")
        assert same_origin.headers["vary"] == "Origin"
        cross = await t.fast.post("/q/c", content=b"1", headers={"Origin": "https://app.example"})
        assert cross.headers["access-control-allow-origin"] == "https://app.example"


@pytest.mark.parametrize("length", [False, True], ids=["chunked", "content-length"])
async def test_requests_in_progress_count_for_both_paths(redis_url: str, protocol: Any, length: bool) -> None:
    """A push whose body is still arriving holds a request slot, as through AccessMiddleware."""
    async with twin(redis_url, protocol, limits={**LIMITS, "max_connections": 1}) as t:
        await t.routed.get("/health")
        sending = asyncio.Event()
        release = asyncio.Event()

        async def slow() -> AsyncIterator[bytes]:
            yield b"[1"
            sending.set()
            await release.wait()
            yield b"]"

        headers = {"Content-Length": "3"} if length else {}
        below = t.app.fast_push.served_below
        slow_push = asyncio.create_task(t.fast.post("/q/slots", content=slow(), headers=headers))
        await asyncio.wait_for(sending.wait(), 10)
        gate = t.app.fast_push.gate
        assert gate is not None
        await wait_for(lambda: gate.in_flight == 1, 10, message="the slow push holds no slot")
        for refused in (await t.fast.post("/q/slots", content=b"1"), await t.routed.get("/j/slots")):
            assert refused.status_code == 503 and "max_connections" in refused.json()["error"]
        release.set()
        assert (await slow_push).status_code == 201
        assert gate.in_flight == 0
        assert t.app.fast_push.served_below - below == int(length and t.below)
        assert (await t.fast.post("/q/slots", content=b"1")).status_code == 201
        assert (await t.fast.get("/j/slots")).json()["pushed"] == 2


async def test_redis_down_answers_alike(make_redis_server: Callable[..., RedisServer], protocol: Any) -> None:
    server = make_redis_server()
    async with twin(server.url, protocol) as t:
        await t.routed.get("/health")
        server.stop()
        await compare(
            t,
            [Case("POST", "/q/down", served=True), Case("POST", "/qb/down", b"[1]", served=True)],
        )
        response = await t.fast.post("/q/down", content=b"1")
        assert response.status_code == 503 and response.headers["retry-after"] == "1"


async def call(app: Any, scope: dict[str, Any], body: bytes) -> list[dict[str, Any]]:
    """Call an ASGI app directly with one request; returns the messages it sent."""
    received = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return received.pop() if received else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_a_request_under_a_root_path_goes_to_the_app(redis_url: str, protocol: Any) -> None:
    async with twin(redis_url, protocol) as t:
        await t.routed.get("/health")
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/api/q/rooted", "raw_path": b"/api/q/rooted", "root_path": "/api", "query_string": b"",
            "headers": [(b"host", b"x"), (b"x-request-id", b"rooted")], "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }  # fmt: skip
        fast = await call(t.app, dict(scope), b"1")
        routed = await call(t.app.serve_routed, dict(scope), b"2")
        assert t.app.fast_push.served == 0
        assert fast[0]["status"] == routed[0]["status"] == 201
        assert [name for name, _ in fast[0]["headers"]] == [name for name, _ in routed[0]["headers"]]
        assert (await t.fast.get("/j/rooted")).json()["pushed"] == 2
        # Mounted at /q, the path /q/rooted is the app's /rooted: no push route.
        scope.update(path="/q/rooted", raw_path=b"/q/rooted", root_path="/q")
        fast = await call(t.app, dict(scope), b"1")
        routed = await call(t.app.serve_routed, dict(scope), b"2")
        assert t.app.fast_push.served == 0
        assert fast[0]["status"] == routed[0]["status"] == 404
        assert fast[1]["body"] == routed[1]["body"] == b'{"error":"not found"}'


async def test_a_client_gone_mid_body_pushes_nothing(redis_url: str, protocol: Any) -> None:
    async with twin(redis_url, protocol) as t:
        await t.routed.get("/health")
        server = t.fast.base_url
        assert server.host is not None and server.port is not None
        _, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"POST /q/gone HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        gate = t.app.fast_push.gate
        assert gate is not None
        await wait_for(lambda: gate.in_flight == 1, 10, message="the request did not start")
        writer.close()
        await writer.wait_closed()
        await wait_for(lambda: gate.in_flight == 0, 10, message="the request did not end")
        assert t.app.fast_push.served == 0
        assert (await t.fast.get("/j/gone")).json()["pushed"] == 0
