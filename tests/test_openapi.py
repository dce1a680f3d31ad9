"""The OpenAPI document is true: it lists exactly the app's routes, and real answers match it.

Every request of these tests goes through a :class:`Conformance` checker: the answer's status
must be documented for its operation, its body must match the documented schema and its
required headers must be there. At the end, every documented (operation, status) pair must
have been seen at least once, so the document cannot promise an answer the broker never gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs  # comes with schemathesis (a dev dependency)
import pytest
from starlette.routing import Mount, Route

from broker.app import create_app
from broker.auth import route_template
from broker.openapi import SETTLE_ACTIONS, document
from tests.servers import make_settings, run_broker, wait_for

AUTH = {
    "tokens": [
        {"token": "all-secret", "name": "all", "roles": {"produce": ["*"], "consume": ["*"], "admin": ["*"]}},
        {"token": "none-secret", "name": "none", "roles": {}},
    ]
}
LIMITS = {"max_body": 4096, "max_batch": 5, "max_wait": 1.0}


class Conformance:
    """Checks answers against an OpenAPI document and records which (operation, status) were seen."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.seen: set[tuple[str, str, str]] = set()
        # Literal paths before templated ones, so that /dead/{queue}/retry wins over /dead/{queue}/{id}.
        self.paths = sorted(doc["paths"], key=lambda p: (p.count("{"), p))
        self.patterns = {p: re.compile("^" + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(p)) + "$") for p in self.paths}

    def operation(self, method: str, path: str) -> tuple[str, dict[str, Any]]:
        for template in self.paths:
            if self.patterns[template].match(path) and method in self.doc["paths"][template]:
                return template, self.doc["paths"][template][method]
        raise AssertionError(f"{method.upper()} {path} is not documented")

    def validate(self, schema: dict[str, Any], instance: Any, where: str) -> None:
        validator = jsonschema_rs.validator_for({**schema, "components": self.doc["components"]})
        errors = [str(e) for e in validator.iter_errors(instance)]
        assert not errors, f"{where}: {errors[0]}"

    def check(self, response: httpx.Response) -> None:
        method, path = response.request.method.lower(), response.request.url.path
        template, op = self.operation(method, path)
        status = str(response.status_code)
        where = f"{method.upper()} {path} -> {status}"
        assert status in op["responses"], f"{where}: status not documented ({response.text[:200]})"
        self.seen.add((template, method, status))
        documented = op["responses"][status]
        for name, spec in documented.get("headers", {}).items():
            value = response.headers.get(name)
            if spec["required"]:
                assert value is not None, f"{where}: header {name} missing"
            if value is not None:
                self.validate(spec["schema"], value, f"{where} header {name}")
        content = documented.get("content")
        if content is None:
            assert not response.content, f"{where}: documented without content, got {response.content[:100]!r}"
            return
        media_type = response.headers.get("content-type", "").split(";")[0]
        assert media_type in content, f"{where}: content-type {media_type} not documented"
        if media_type == "application/json":
            self.validate(content[media_type]["schema"], response.json(), where)

    def missing(self, *, ignore_status: tuple[str, ...] = ()) -> list[str]:
        return sorted(
            f"{method.upper()} {path} {status}"
            for path, methods in self.doc["paths"].items()
            for method, op in methods.items()
            for status in op["responses"]
            if (path, method, status) not in self.seen and status not in ignore_status
        )


@contextlib.asynccontextmanager
async def checked_broker(
    redis_url: str, checker: Conformance | None = None, **sections: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Conformance]]:
    """A broker with ``sections`` and a client whose every answer is checked against its document."""
    settings = make_settings(redis_url, {"limits": LIMITS, **sections})
    async with run_broker(settings) as broker:
        async with httpx.AsyncClient(base_url=broker.url, timeout=10.0) as plain:
            doc = (await plain.get("/openapi.json")).json()
        assert doc == document(settings)
        conformance = checker or Conformance(doc)

        async def hook(response: httpx.Response) -> None:
            await response.aread()
            conformance.check(response)

        async with httpx.AsyncClient(base_url=broker.url, timeout=10.0, event_hooks={"response": [hook]}) as client:
            yield client, conformance


def documented_operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, methods in doc["paths"].items() for method in methods}


def served_operations(settings: Any, web_dir: Path | None = None) -> set[tuple[str, str]]:
    app = create_app(settings, web_dir=web_dir)
    served = set()
    for route in app.routes:
        if isinstance(route, Route) and not isinstance(route, Mount):
            path = route_template(route)
            paths = [path.replace("{action}", a) for a in SETTLE_ACTIONS] if "{action}" in path else [path]
            served |= {(p, m) for p in paths for m in route.methods or () if m != "HEAD"}
    return served


@pytest.mark.parametrize("auth", [False, True])
def test_document_lists_exactly_the_routes_of_the_app(auth: bool, tmp_path: Path) -> None:
    settings = make_settings("redis://127.0.0.1:1/0", {"auth": AUTH} if auth else {})
    assert documented_operations(document(settings)) == served_operations(settings)
    # Without the dashboard's files there is no GET /, and the document says so.
    no_web = tmp_path / "no-web"
    assert documented_operations(document(settings, dashboard=False)) == served_operations(settings, no_web)


def test_document_is_well_formed() -> None:
    doc = document(make_settings("redis://127.0.0.1:1/0", {"auth": AUTH, "limits": LIMITS}))
    assert doc["openapi"] == "3.1.0"
    ids = [op["operationId"] for methods in doc["paths"].values() for op in methods.values()]
    assert len(ids) == len(set(ids))
    text = repr(doc)
    for name in re.findall(r"#/components/schemas/(\w+)", text):
        assert name in doc["components"]["schemas"], name
    for path, methods in doc["paths"].items():
        names = set(re.findall(r"\{(\w+)\}", path))
        for op in methods.values():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == names, (path, declared)
            assert op["responses"], path
            assert any(s.startswith("2") for s in op["responses"]), path
    # Bounds follow the settings the broker runs with.
    fetch = {p["name"]: p for p in doc["paths"]["/q/{queue}"]["get"]["parameters"]}
    assert fetch["wait"]["schema"]["maximum"] == LIMITS["max_wait"]
    batch = {p["name"]: p for p in doc["paths"]["/qb/{queue}"]["get"]["parameters"]}
    assert batch["batch_size"]["schema"]["maximum"] == LIMITS["max_batch"]
    assert doc["paths"]["/q/{queue}"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/health"]["get"]


async def exercise_everything(client: httpx.AsyncClient) -> None:
    """At least one request for every documented answer that does not need auth or a dead Redis."""
    big = b'"' + b"x" * 5000 + b'"'
    q = "docs"
    # /q push, uniq conflict, bad input, too large
    assert (await client.post(f"/q/{q}", content=b'{"a": 1}', params={"priority": 7})).status_code == 201
    assert (await client.put(f"/q/{q}", content=b"[1, 2]")).status_code == 201
    assert (await client.post(f"/q/{q}", content=b"1", params={"uniq": "k"})).status_code == 201
    assert (await client.post(f"/q/{q}", content=b"2", params={"uniq": "k"})).status_code == 409
    assert (await client.put(f"/q/{q}", content=b"3", params={"uniq": "k"})).status_code == 409
    for method in ("POST", "PUT"):
        assert (await client.request(method, f"/q/{q}", content=b"{nope")).status_code == 400
        assert (await client.request(method, f"/q/{q}", content=big)).status_code == 413
    # /q take: destructive, leased, empty, closed, bad parameters
    assert (await client.get(f"/q/{q}")).status_code == 200
    leased = await client.get(f"/q/{q}", params={"lease": 30})
    assert leased.status_code == 200 and leased.headers["x-presque-lease-token"]
    assert (await client.get(f"/q/{q}", params={"wait": 99})).status_code == 400
    assert (await client.get("/q/empty", params={"wait": 0.05})).status_code == 404
    # /j: figures, one job, settle
    assert (await client.get(f"/j/{q}")).status_code == 200
    job_id, token = leased.headers["x-presque-job-id"], leased.headers["x-presque-lease-token"]
    assert (await client.get(f"/j/{q}/{job_id}")).status_code == 200
    assert (await client.get(f"/j/{q}/nosuchjob")).status_code == 404
    assert (await client.post(f"/j/{q}/{job_id}/touch", json={"token": token, "lease": 60})).status_code == 200
    assert (await client.post(f"/j/{q}/{job_id}/ack", json={"token": token, "result": 1})).status_code == 200
    for action in SETTLE_ACTIONS:
        url = f"/j/{q}/{job_id}/{action}"
        assert (await client.post(url, json={"token": token})).status_code == 409
        assert (await client.post(f"/j/{q}/nosuchjob/{action}", json={"token": "t"})).status_code == 404
        assert (await client.post(url, json={})).status_code == 400
        assert (await client.post(url, content=big)).status_code == 413
        assert (await client.post(f"/j/bad!/{job_id}/{action}", json={"token": "t"})).status_code == 400
    leased = await client.get(f"/q/{q}", params={"lease": 30})
    token = leased.headers["x-presque-lease-token"]
    nacked = await client.post(f"/j/{q}/{leased.headers['x-presque-job-id']}/nack", json={"token": token, "delay": 0})
    assert nacked.status_code == 200
    # /qb
    assert (await client.post(f"/qb/{q}", json={"jobs": [1, {"b": 2}]})).status_code == 201
    assert (await client.post(f"/qb/{q}", json=[3])).status_code == 201
    assert (await client.post(f"/qb/{q}", json=[1] * 6)).status_code == 413
    assert (await client.post(f"/qb/{q}", content=big)).status_code == 413
    assert (await client.post(f"/qb/{q}", json={"nope": []})).status_code == 400
    assert (await client.get(f"/qb/{q}", params={"batch_size": 2})).status_code == 200
    assert (await client.get(f"/qb/{q}", params={"batch_size": 6})).status_code == 413
    assert (await client.get(f"/qb/{q}", params={"batch_size": 0})).status_code == 400
    # /status, /control
    assert (await client.get("/status/")).status_code == 200
    assert (await client.get("/status")).status_code == 200
    assert (await client.get(f"/status/{q}", params={"with_desc": 1})).status_code == 200
    assert (await client.get(f"/control/{q}")).status_code == 200
    assert (await client.post(f"/control/{q}", json={"status": "stop"})).status_code == 200
    assert (await client.get(f"/q/{q}")).status_code == 404
    assert (await client.get(f"/qb/{q}")).status_code == 404
    assert (await client.post(f"/control/{q}", json={"status": "start"})).status_code == 200
    assert (await client.post(f"/control/{q}", json={"status": "pause"})).status_code == 400
    assert (await client.post(f"/control/{q}", content=big)).status_code == 413
    # /dead: make one dead job, list, retry, delete
    assert (await client.post("/q/graves", content=b'"x"', params={"max_attempts": 1})).status_code == 201
    leased = await client.get("/q/graves", params={"lease": 30})
    dead_id, token = leased.headers["x-presque-job-id"], leased.headers["x-presque-lease-token"]
    assert (await client.post(f"/j/graves/{dead_id}/nack", json={"token": token, "error": "boom"})).json()[
        "status"
    ] == "dead"
    assert (await client.get(f"/j/graves/{dead_id}")).json()["state"] == "dead"
    listed = await client.get("/dead/graves", params={"limit": 10})
    assert listed.json()["jobs"][0]["id"] == dead_id
    assert (await client.get("/dead/graves", params={"limit": 0})).status_code == 400
    assert (await client.post("/dead/graves/retry", json={"ids": [dead_id]})).json()["retried"] == 1
    assert (await client.post("/dead/graves/retry", json={"ids": "all"})).status_code == 400
    assert (await client.post("/dead/graves/retry", content=big)).status_code == 413
    assert (await client.post("/dead/graves/retry")).status_code == 200
    assert (await client.delete(f"/dead/graves/{dead_id}")).status_code == 404
    leased = await client.get("/q/graves", params={"lease": 30})
    token = leased.headers["x-presque-lease-token"]
    assert (await client.post(f"/j/graves/{dead_id}/nack", json={"token": token})).json()["status"] == "dead"
    assert (await client.delete(f"/dead/graves/{dead_id}")).status_code == 204
    assert (await client.delete("/dead/graves")).status_code == 204
    # purge
    assert (await client.delete(f"/q/{q}")).status_code == 204
    # /w
    headers = {"X-presque-workerid": "w1"}
    assert (await client.post(f"/w/{q}", headers=headers, json={"processed": 3})).status_code == 201
    assert (await client.post(f"/w/{q}", headers=headers, content=big)).status_code == 413
    assert (await client.post(f"/w/{q}")).status_code == 400
    assert (await client.get("/w/")).json() == ["w1"]
    assert (await client.get("/w/", params={"queue_name": q})).json()["workers_list"] == ["w1"]
    assert (await client.get("/w/", params={"queue_name": "bad name"})).status_code == 400
    assert (await client.delete(f"/w/{q}", headers=headers)).status_code == 204
    assert (await client.delete(f"/w/{q}")).status_code == 400
    # bad queue names on every route that takes one
    for method, path in [
        ("POST", "/q/{}"),
        ("PUT", "/q/{}"),
        ("GET", "/q/{}"),
        ("DELETE", "/q/{}"),
        ("POST", "/qb/{}"),
        ("GET", "/qb/{}"),
        ("GET", "/j/{}"),
        ("GET", "/j/{}/x"),
        ("GET", "/status/{}"),
        ("GET", "/control/{}"),
        ("POST", "/control/{}"),
        ("GET", "/dead/{}"),
        ("DELETE", "/dead/{}"),
        ("POST", "/dead/{}/retry"),
        ("DELETE", "/dead/{}/x"),
        ("POST", "/w/{}"),
        ("DELETE", "/w/{}"),
    ]:
        response = await client.request(method, path.format("-bad"), content=b"{}", headers=headers)
        assert response.status_code == 400, (method, path, response.text)
    # ops
    assert (await client.get("/stats")).status_code == 200
    assert (await client.get("/stats/history", params={"range": "24h"})).status_code == 200
    assert (await client.get("/stats/history", params={"range": "1y"})).status_code == 400
    assert (await client.get("/metrics")).status_code == 200
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/openapi.json")).status_code == 200
    assert (await client.get("/asyncapi.json")).status_code == 200
    assert (await client.get("/")).status_code == 200


async def test_every_documented_answer_is_given_and_conforms(redis_url: str, make_redis_server: Any) -> None:
    async with checked_broker(redis_url) as (client, conformance):
        await exercise_everything(client)
        assert (await client.get("/auth")).json()["auth"] is False
    # The same document with auth on adds 401 and 403 on every protected operation.
    async with checked_broker(redis_url, auth=AUTH) as (client, auth_conformance):
        auth_conformance.seen |= conformance.seen
        conformance = auth_conformance
        doc = conformance.doc
        for path, methods in doc["paths"].items():
            url = path.replace("{queue}", "q").replace("{id}", "x")
            for method, op in methods.items():
                if "401" not in op["responses"]:
                    continue
                if path != "/auth":
                    none = {"Authorization": "Bearer none-secret", "X-presque-workerid": "w"}
                    assert (await client.request(method, url, headers=none, json={})).status_code == 403
                response = await client.request(method, url, headers={"Authorization": "Bearer wrong"}, json={})
                assert response.status_code == 401
        assert (await client.get("/auth", headers={"Authorization": "Bearer all-secret"})).json()["name"] == "all"
    # Redis gone: every operation that needs it answers 503 with Retry-After, as documented.
    private = make_redis_server()
    async with checked_broker(private.url, checker=conformance, redis={"socket_timeout": 1.0}) as (client, _):
        private.stop()
        for path, methods in doc["paths"].items():
            url = path.replace("{queue}", "q").replace("{id}", "x")
            for method in methods:
                body: Any = [1] if path == "/qb/{queue}" else {"token": "t", "status": "stop"}
                response = await client.request(method, url, headers={"X-presque-workerid": "w"}, json=body)
                assert response.status_code in (200, 503), (method, url, response.status_code)
    # At the concurrency limit, even the routes that never touch Redis answer 503.
    async with checked_broker(redis_url, checker=conformance, limits={**LIMITS, "max_connections": 1}) as (client, _):
        long_poll = asyncio.create_task(client.get("/q/idle", params={"wait": 1.0}))

        async def refused() -> bool:
            return (await client.get("/openapi.json")).status_code == 503

        await wait_for(refused, message="the long-poll never took the only request slot")
        for path in ("/", "/asyncapi.json", "/auth"):
            assert (await client.get(path)).status_code == 503
        assert (await client.get("/health")).status_code == 200
        assert (await long_poll).status_code == 404
    missing = conformance.missing()
    assert not missing, f"documented but never answered: {missing}"
