"""Access control end to end: tokens and roles over HTTP and WebSocket, CORS, Origin, no token in logs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.datastructures import Headers
from starlette.routing import Mount, Route
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from broker.app import create_app
from broker.auth import ROUTE_ROLES, bearer, find_token, is_loopback, route_template, warn_if_exposed
from broker.config import parse_settings
from broker.errors import ConfigError
from tests.servers import BrokerServer, make_settings, run_broker

SECRETS = {
    "root": "root-5ecret-token",
    "producer": "producer-5ecret",
    "consumer": "consumer-5ecret",
    "admin": "orders-admin-5ecret",
    "nothing": "nothing-5ecret",
}
AUTH: dict[str, Any] = {
    "tokens": [
        {"name": "root", "token": SECRETS["root"], "roles": {"produce": ["*"], "consume": ["*"], "admin": ["*"]}},
        {"name": "producer", "token": SECRETS["producer"], "roles": {"produce": ["orders.*"]}},
        {"name": "consumer", "token": SECRETS["consumer"], "roles": {"consume": ["orders.*"]}},
        {"name": "admin", "token": SECRETS["admin"], "roles": {"admin": ["orders.*"]}},
        {"name": "nothing", "token": SECRETS["nothing"]},
    ]
}


def as_(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[who]}"}


@contextlib.asynccontextmanager
async def broker(redis_url: str, **sections: Any) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    async with (
        run_broker(make_settings(redis_url, {"auth": AUTH, **sections})) as running,
        httpx.AsyncClient(base_url=running.url, timeout=10.0) as client,
    ):
        yield running.url, client


# -- units -------------------------------------------------------------------------------------------


def test_find_token_compares_whole_tokens() -> None:
    settings = make_settings(None, {"auth": AUTH})
    assert find_token(settings, SECRETS["producer"]).name == "producer"  # type: ignore[union-attr]
    for wrong in ("", "producer", SECRETS["producer"][:-1], SECRETS["producer"] + "x", SECRETS["producer"].upper()):
        assert find_token(settings, wrong) is None
    assert find_token(make_settings(None), SECRETS["root"]) is None  # auth off: no token exists


def test_bearer_header_parsing() -> None:
    assert bearer(Headers({"authorization": "Bearer abc"})) == "abc"
    assert bearer(Headers({"authorization": "bearer   abc  "})) == "abc"
    assert bearer(Headers({"authorization": "Basic abc"})) is None
    assert bearer(Headers({"authorization": "Bearer "})) is None
    assert bearer(Headers({})) is None


def test_tokens_from_the_environment_and_out_of_repr() -> None:
    data = {"auth": {"tokens": [{"name": "ci", "token": "env:CI_TOKEN", "roles": {"produce": ["*"]}}]}}
    settings = parse_settings(data, {"CI_TOKEN": "from-env-5ecret"})
    assert settings.auth.tokens[0].token == "from-env-5ecret"
    assert "from-env-5ecret" not in repr(settings)
    with pytest.raises(ConfigError, match="CI_TOKEN"):
        parse_settings(data, {})


def test_every_route_of_the_app_has_a_role_decision() -> None:
    app = create_app(make_settings(None, {"auth": AUTH}))
    served = {
        (route_template(route), method)
        for route in app.routes
        if isinstance(route, Route) and not isinstance(route, Mount)
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert served == set(ROUTE_ROLES)


def test_loopback_detection_and_the_exposure_warning(caplog: pytest.LogCaptureFixture) -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        assert not is_loopback(host), host
    open_settings, auth_settings = make_settings(None), make_settings(None, {"auth": AUTH})
    with caplog.at_level(logging.WARNING, logger="presque.auth"):
        assert not warn_if_exposed("127.0.0.1", open_settings)
        assert not warn_if_exposed("0.0.0.0", auth_settings)
        assert not caplog.records
        assert warn_if_exposed("0.0.0.0", open_settings)
    assert "WITHOUT AUTHENTICATION" in caplog.text and "0.0.0.0" in caplog.text


# -- HTTP --------------------------------------------------------------------------------------------


async def test_open_routes_need_no_token(redis_url: str) -> None:
    async with broker(redis_url) as (_, client):
        for path in ("/health", "/openapi.json", "/", "/static/presque.js", "/auth"):
            assert (await client.get(path)).status_code == 200, path
        assert (await client.get("/auth")).json() == {
            "auth": True,
            "name": None,
            "roles": {"produce": [], "consume": [], "admin": []},
        }
        me = (await client.get("/auth", headers=as_("producer"))).json()
        assert me == {"auth": True, "name": "producer", "roles": {"produce": ["orders.*"], "consume": [], "admin": []}}
        assert (await client.get("/auth", headers={"Authorization": "Bearer nope"})).status_code == 401


async def test_missing_or_invalid_token_is_401_json(redis_url: str) -> None:
    async with broker(redis_url) as (_, client):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {SECRETS['root']}"}):
            for method, path in (("POST", "/q/orders.1"), ("GET", "/stats"), ("HEAD", "/stats"), ("GET", "/w/")):
                response = await client.request(method, path, headers=headers, content=b"{}")
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"].startswith("Bearer")
                if method != "HEAD":
                    assert "error" in response.json()
        # Unknown paths and methods are still 404/405 (the router answers; nothing to protect).
        assert (await client.get("/nope")).status_code == 404
        assert (await client.patch("/q/orders.1")).status_code == 405
        # Nothing was pushed by the refused requests.
        assert (await client.get("/j/orders.1", headers=as_("root"))).json()["pushed"] == 0


async def test_roles_decide_each_route(redis_url: str) -> None:
    async with broker(redis_url) as (_, client):

        async def status(who: str, method: str, path: str, **kwargs: Any) -> int:
            response = await client.request(method, path, headers={**as_(who), **kwargs.pop("headers", {})}, **kwargs)
            if response.status_code == 403:
                assert "lacks" in response.json()["error"]
            return response.status_code

        # produce
        assert await status("producer", "POST", "/q/orders.1", content=b'{"n": 1}') == 201
        assert await status("producer", "PUT", "/q/orders.1", content=b'{"n": 2}') == 201
        assert await status("producer", "POST", "/qb/orders.1", json=[3, 4]) == 201
        assert await status("producer", "POST", "/q/billing", content=b"1") == 403
        assert await status("consumer", "POST", "/q/orders.1", content=b"1") == 403
        assert await status("admin", "POST", "/q/orders.1", content=b"1") == 403
        # consume
        assert await status("producer", "GET", "/q/orders.1") == 403
        assert await status("consumer", "GET", "/q/billing") == 403
        leased = await client.get("/q/orders.1", params={"lease": 30}, headers=as_("consumer"))
        assert leased.status_code == 200
        job_id, token = leased.headers["x-presque-job-id"], leased.headers["x-presque-lease-token"]
        settle = f"/j/orders.1/{job_id}/touch"
        assert await status("producer", "POST", settle, json={"token": token}) == 403
        assert await status("admin", "POST", settle, json={"token": token}) == 403
        assert await status("consumer", "POST", settle, json={"token": token}) == 200
        assert await status("consumer", "GET", "/qb/orders.1", params={"batch_size": 2}) == 200
        worker = {"X-presque-workerid": "w1"}
        assert await status("producer", "POST", "/w/orders.1", headers=worker) == 403
        assert await status("consumer", "POST", "/w/orders.1", headers=worker) == 201
        assert await status("consumer", "DELETE", "/w/orders.1", headers=worker) == 204
        # reading one queue: any role on it; job bodies: consume or admin
        for who in ("producer", "consumer", "admin"):
            assert await status(who, "GET", "/j/orders.1") == 200
            assert await status(who, "GET", "/status/orders.1") == 200
            assert await status(who, "GET", "/control/orders.1") == 200
            assert await status(who, "GET", "/w/", params={"queue_name": "orders.1"}) == 200
        assert await status("nothing", "GET", "/j/orders.1") == 403
        assert await status("producer", "GET", "/j/billing") == 403
        assert await status("producer", "GET", f"/j/orders.1/{job_id}") == 403
        assert await status("producer", "GET", "/status/orders.1", params={"with_desc": 1}) == 403
        assert await status("consumer", "GET", f"/j/orders.1/{job_id}") == 200
        assert await status("admin", "GET", "/status/orders.1", params={"with_desc": 1}) == 200
        # admin on the queue
        for who in ("producer", "consumer"):
            assert await status(who, "POST", "/control/orders.1", json={"status": "stop"}) == 403
            assert await status(who, "DELETE", "/q/orders.1") == 403
            assert await status(who, "GET", "/dead/orders.1") == 403
            assert await status(who, "POST", "/dead/orders.1/retry") == 403
            assert await status(who, "DELETE", "/dead/orders.1") == 403
            assert await status(who, "DELETE", "/dead/orders.1/x") == 403
        assert await status("admin", "POST", "/control/orders.1", json={"status": "stop"}) == 200
        assert await status("admin", "POST", "/control/orders.1", json={"status": "start"}) == 200
        assert await status("admin", "GET", "/dead/orders.1") == 200
        assert await status("admin", "POST", "/dead/orders.1/retry") == 200
        assert await status("admin", "DELETE", "/dead/orders.1") == 204
        assert await status("admin", "DELETE", "/q/orders.1") == 204
        assert await status("admin", "DELETE", "/q/billing") == 403
        # admin of every queue: stats, history, the queue list, the worker list
        for path in ("/stats", "/stats/history", "/status/", "/status", "/w/"):
            assert await status("admin", "GET", path) == 403, path
            assert await status("producer", "GET", path) == 403, path
            assert await status("root", "GET", path) == 200, path


async def test_cors_is_off_by_default_and_follows_cors_origins(redis_url: str) -> None:
    origin = {"Origin": "https://app.example"}
    preflight = {**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    async with broker(redis_url) as (_, client):
        response = await client.get("/health", headers=origin)
        assert "access-control-allow-origin" not in response.headers
        assert (await client.options("/q/orders.1", headers=preflight)).status_code == 405
    async with broker(redis_url, server={"cors_origins": ["https://app.example"]}) as (_, client):
        response = await client.options("/q/orders.1", headers=preflight)
        assert response.status_code == 200  # a preflight carries no token and needs none
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
        pushed = await client.post("/q/orders.1", content=b"1", headers={**origin, **as_("producer")})
        assert pushed.status_code == 201
        assert pushed.headers["access-control-allow-origin"] == "https://app.example"
        taken = await client.get("/q/orders.1", headers={**origin, **as_("consumer")})
        assert "x-presque-job-id" in taken.headers["access-control-expose-headers"].lower()
        refused = await client.get("/stats", headers=origin)
        assert refused.status_code == 401  # the page can read why
        assert refused.headers["access-control-allow-origin"] == "https://app.example"
        other = {**preflight, "Origin": "https://evil.example"}
        assert (await client.options("/q/orders.1", headers=other)).status_code == 400
        response = await client.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in response.headers


# -- WebSocket ---------------------------------------------------------------------------------------


async def recv(ws: Any) -> dict[str, Any]:
    frame: dict[str, Any] = orjson.loads(await ws.recv())
    return frame


async def request(ws: Any, frame: dict[str, Any]) -> dict[str, Any]:
    await ws.send(orjson.dumps({**frame, "ref": "r"}).decode())
    while True:
        reply = await recv(ws)
        if reply.get("ref") == "r":
            return reply


async def test_websocket_token_by_header_query_or_auth_frame(redis_url: str) -> None:
    async with broker(redis_url) as (url, client):
        ws_url = url.replace("http", "ws", 1) + "/ws"
        subscribe = {"op": "subscribe", "queue": "orders.1"}
        async with connect(ws_url, additional_headers=as_("consumer")) as ws:
            assert (await request(ws, subscribe))["op"] == "subscribed"
            assert (await request(ws, {"op": "push", "queue": "orders.1", "body": 1}))["code"] == "forbidden"
        async with connect(f"{ws_url}?token={SECRETS['producer']}") as ws:
            assert (await request(ws, {"op": "push", "queue": "orders.1", "body": 1}))["op"] == "pushed"
            assert (await request(ws, subscribe))["code"] == "forbidden"
            assert (await request(ws, {"op": "watch", "topic": "stats"}))["code"] == "forbidden"
        async with connect(ws_url) as ws:
            assert (await request(ws, subscribe))["code"] == "forbidden"  # auth first
            assert (await request(ws, {"op": "auth", "token": "wrong"}))["code"] == "forbidden"
            assert (await request(ws, subscribe))["code"] == "forbidden"
            assert (await request(ws, {"op": "auth", "token": SECRETS["consumer"]}))["op"] == "ok"
            assert (await request(ws, subscribe))["op"] == "subscribed"
            job = await recv(ws)
            assert job["op"] == "job" and job["body"] == 1
        async with connect(ws_url, additional_headers=as_("root")) as ws:
            assert (await request(ws, {"op": "watch", "topic": "stats"}))["op"] == "watching"
        # A wrong token presented at the handshake is refused there: HTTP 403, no WebSocket.
        for kwargs in ({"additional_headers": {"Authorization": "Bearer wrong"}}, {}):
            target = ws_url + ("?token=wrong" if not kwargs else "")
            with pytest.raises(InvalidStatus) as refused:
                async with connect(target, **kwargs):
                    pass
            assert refused.value.response.status_code == 403
        # /ws/{queue} subscribes at once, with the token's rights.
        async with connect(ws_url + "/billing", additional_headers=as_("consumer")) as ws:
            assert (await recv(ws))["code"] == "forbidden"
        assert (await client.get("/j/orders.1", headers=as_("root"))).json()["pushed"] == 1


async def test_websocket_origin_allow_list(redis_url: str) -> None:
    async with broker(redis_url, server={"allowed_origins": ["https://app.example"]}) as (url, _):
        ws_url = url.replace("http", "ws", 1) + "/ws"
        host = url.removeprefix("http://")
        for origin in ("https://app.example", f"http://{host}"):  # listed, and same-origin
            async with connect(ws_url, origin=origin, additional_headers=as_("root")) as ws:  # type: ignore[arg-type]
                assert (await request(ws, {"op": "listen", "channel": "c"}))["op"] == "listening"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url, origin="https://evil.example", additional_headers=as_("root")):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403


def test_tokens_never_reach_the_log(redis_url: str, tmp_path: Path) -> None:
    """A broker logging at debug level, asked with good and bad tokens every way: no token in its log."""
    import asyncio

    wrong = "wrong-5ecret-never-logged"
    server = BrokerServer(tmp_path, redis_url, config={"auth": AUTH, "server": {"log_level": "debug"}})
    with server:

        async def traffic() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
                for token in (SECRETS["producer"], wrong):
                    await client.post("/q/orders.1", content=b"1", headers={"Authorization": f"Bearer {token}"})
                    await client.get("/stats", headers={"Authorization": f"Bearer {token}"})
            for target in (f"{server.ws_url}?token={SECRETS['consumer']}", f"{server.ws_url}?token={wrong}"):
                with contextlib.suppress(InvalidStatus, ConnectionClosed):
                    async with connect(target) as ws:
                        await request(ws, {"op": "subscribe", "queue": "orders.1"})
            async with connect(server.ws_url, additional_headers=as_("consumer")) as ws:
                await request(ws, {"op": "subscribe", "queue": "orders.1"})
            async with connect(server.ws_url) as ws:
                await request(ws, {"op": "auth", "token": wrong})
                await request(ws, {"op": "auth", "token": SECRETS["root"]})

        asyncio.run(traffic())
    log = server.log_path.read_text()
    assert "token=***" in log and "Bearer ***" in log  # what would have shown the tokens
    for secret in (*SECRETS.values(), wrong):
        assert secret not in log


async def test_websocket_auth_frame_without_auth_configured(redis_url: str) -> None:
    """With auth off there is nothing to check: an ``auth`` frame (a client that always sends its
    token, such as web/presque.js) is accepted and changes nothing."""
    async with run_broker(make_settings(redis_url)) as running:
        async with connect(running.ws_url) as ws:
            assert (await request(ws, {"op": "auth", "token": "anything"}))["op"] == "ok"
            assert (await request(ws, {"op": "subscribe", "queue": "q"}))["op"] == "subscribed"
