"""Every WebSocket frame and its reply, with and without ref, and every error code, end to end.

A real uvicorn serving the app in the test's loop, a real redis-server, the ``websockets`` client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from broker import keys
from tests.servers import RunningBroker, make_settings, run_broker
from tests.wsclient import WsClient, ws_connect

pytestmark = pytest.mark.core


@pytest.fixture
async def broker(redis_url: str) -> AsyncIterator[RunningBroker]:
    settings = make_settings(
        redis_url,
        {
            "limits": {"max_subscriptions": 2, "max_channels": 2, "max_frame": 4096, "max_batch": 5},
            "queues": {"reap_interval": 0.1, "backoff_base": 0.1},
        },
    )
    async with run_broker(settings) as running:
        yield running


@pytest.fixture
async def ws(broker: RunningBroker) -> AsyncIterator[WsClient]:
    async with ws_connect(broker.ws_url) as client:
        yield client


async def http_push(broker: RunningBroker, queue: str, body: object) -> str:
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{broker.url}/q/{queue}", json=body)
        assert response.status_code == 201, response.text
        job_id: str = response.json()["id"]
        return job_id


async def test_subscribe_replies_with_the_settings_in_effect(ws: WsClient) -> None:
    reply = await ws.call("subscribe", queue="emails")
    assert reply == {"op": "subscribed", "queue": "emails", "prefetch": 10, "ack": "manual", "lease": 30, "ref": "r1"}
    await ws.send({"op": "subscribe", "queue": "sms", "prefetch": 3, "ack": "auto", "lease": 5})
    assert await ws.expect("subscribed") == {
        "op": "subscribed",
        "queue": "sms",
        "prefetch": 3,
        "ack": "auto",
        "lease": 5,
    }


async def test_unsubscribe_with_and_without_ref(ws: WsClient) -> None:
    await ws.call("subscribe", queue="a")
    await ws.call("subscribe", queue="b")
    assert await ws.call("unsubscribe", queue="a") == {"op": "unsubscribed", "queue": "a", "ref": "r3"}
    await ws.send({"op": "unsubscribe", "queue": "b"})
    assert await ws.expect("unsubscribed") == {"op": "unsubscribed", "queue": "b"}


async def test_job_ops_answer_only_on_error_unless_asked(ws: WsClient, broker: RunningBroker) -> None:
    await ws.call("subscribe", queue="q", prefetch=5)
    ids = [await http_push(broker, "q", {"n": n}) for n in range(4)]
    jobs = await ws.jobs(4)
    assert [j["id"] for j in jobs] == ids
    assert all(j["attempt"] == 1 and j["queue"] == "q" for j in jobs)
    assert [j["body"] for j in jobs] == [{"n": n} for n in range(4)]
    touch, progress, nack, ack = jobs
    # Without ref: silence. The last frame has a ref, so when its ok arrives every earlier frame
    # was handled, and no other frame (an error) came back in between.
    await ws.send({"op": "touch", "id": touch["id"], "token": touch["token"], "lease": 60})
    await ws.send({"op": "progress", "id": progress["id"], "token": progress["token"], "data": {"pct": 50}})
    await ws.send({"op": "publish", "channel": "news", "data": 1})
    assert await ws.call("touch", id=progress["id"], token=progress["token"]) == {"op": "ok", "ref": "r2"}
    assert ws.stash == []
    # With ref: ok for each.
    assert await ws.call("nack", id=nack["id"], token=nack["token"], delay=30, error="boom") == {
        "op": "ok",
        "ref": "r3",
    }
    assert await ws.call("ack", id=ack["id"], token=ack["token"], result={"done": True}) == {"op": "ok", "ref": "r4"}
    assert await ws.call("publish", channel="news", data={"x": 1}) == {"op": "ok", "ref": "r5"}
    assert await ws.call("progress", id=touch["id"], token=touch["token"], data=None) == {"op": "ok", "ref": "r6"}
    await ws.send({"op": "ack", "id": touch["id"], "token": touch["token"]})
    await ws.send({"op": "nack", "id": progress["id"], "token": progress["token"]})
    assert (await ws.call("publish", channel="news", data=None))["op"] == "ok"
    assert ws.stash == []
    async with httpx.AsyncClient() as http:
        job = (await http.get(f"{broker.url}/j/q/{nack['id']}")).json()
        assert job["state"] == "delayed" and job["last_error"] == "boom"
        assert (await http.get(f"{broker.url}/j/q/{ack['id']}")).status_code == 404


async def test_push_single_and_batch(ws: WsClient, broker: RunningBroker, redis: aioredis.Redis) -> None:
    reply = await ws.call("push", queue="q", body={"a": 1}, priority=9, delay=0, ttl=60, max_attempts=2)
    assert reply["op"] == "pushed" and set(reply) == {"op", "id", "ref"}
    await ws.send({"op": "push", "queue": "q", "body": [1, 2]})
    plain = await ws.expect("pushed")
    assert set(plain) == {"op", "id"}
    batch = await ws.call("push", queue="q", jobs=[{"b": 1}, {"b": 2}, None])
    assert batch["op"] == "pushed" and len(batch["ids"]) == 3 and len(set(batch["ids"])) == 3
    await ws.send({"op": "push", "queue": "q", "jobs": ["x"]})
    assert len((await ws.expect("pushed"))["ids"]) == 1
    assert await redis.zcard(keys.queue_keys("q").ready) == 6
    await ws.call("subscribe", queue="q", prefetch=10)
    bodies = [j["body"] for j in await ws.jobs(6)]
    assert bodies[0] == {"a": 1}  # priority 9 first
    assert bodies[1:] == [[1, 2], {"b": 1}, {"b": 2}, None, "x"]


async def test_listen_publish_unlisten(ws: WsClient, broker: RunningBroker) -> None:
    assert await ws.call("listen", channel="chat") == {"op": "listening", "channel": "chat", "ref": "r1"}
    await ws.send({"op": "listen", "channel": "other"})
    assert await ws.expect("listening") == {"op": "listening", "channel": "other"}
    async with ws_connect(broker.ws_url) as sender:
        await sender.send({"op": "publish", "channel": "chat", "data": {"text": "hi"}})
        assert await ws.expect("message") == {"op": "message", "channel": "chat", "data": {"text": "hi"}}
        assert await ws.call("unlisten", channel="chat") == {"op": "unlistened", "channel": "chat", "ref": "r2"}
        await ws.send({"op": "unlisten", "channel": "other"})
        assert await ws.expect("unlistened") == {"op": "unlistened", "channel": "other"}
        assert (await sender.call("publish", channel="chat", data=2))["op"] == "ok"
        assert await ws.silent("message", 0.3)


async def test_watch_and_unwatch_with_and_without_ref(ws: WsClient) -> None:
    assert await ws.call("watch", topic="stats") == {"op": "watching", "topic": "stats", "ref": "r1"}
    await ws.send({"op": "watch", "topic": "events", "queue": "q"})
    assert await ws.expect("watching") == {"op": "watching", "topic": "events", "queue": "q"}
    assert await ws.call("watch", topic="events") == {"op": "watching", "topic": "events", "ref": "r2"}
    stats = await ws.expect("stats")
    assert {"ts", "totals", "queues", "processes", "workers"} <= set(stats)
    assert await ws.call("unwatch", topic="stats") == {"op": "unwatched", "topic": "stats", "ref": "r3"}
    await ws.send({"op": "unwatch", "topic": "events", "queue": "q"})
    assert await ws.expect("unwatched") == {"op": "unwatched", "topic": "events", "queue": "q"}
    assert (await ws.call("unwatch", topic="events"))["op"] == "unwatched"


async def test_ws_queue_path_subscribes_at_once(broker: RunningBroker) -> None:
    async with ws_connect(f"{broker.ws_url}/jobs") as ws:
        assert await ws.expect() == {"op": "subscribed", "queue": "jobs", "prefetch": 10, "ack": "manual", "lease": 30}
        job_id = await http_push(broker, "jobs", {"x": 1})
        assert (await ws.jobs(1))[0]["id"] == job_id
    async with ws_connect(f"{broker.ws_url}/bad%20name") as ws:
        error = await ws.expect()
        assert error["op"] == "error" and error["code"] == "bad_queue" and error["ref"] is None
        assert (await ws.call("subscribe", queue="fine"))["op"] == "subscribed"  # still open


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "bad_json"),
        ("[1, 2]", "bad_frame"),
        ('{"op": "fly", "ref": "x"}', "unknown_op"),
        ('{"queue": "q", "ref": "x"}', "bad_field"),
        ('{"op": "subscribe", "queue": "q", "prefetch": 0, "ref": "x"}', "bad_field"),
        ('{"op": "subscribe", "queue": "q", "ack": "sometimes", "ref": "x"}', "bad_field"),
        ('{"op": "push", "queue": "q", "ref": "x"}', "bad_field"),
        ('{"op": "push", "queue": "q", "jobs": [1], "priority": 3, "ref": "x"}', "bad_field"),
        ('{"op": "push", "queue": "q", "jobs": [1, 2, 3, 4, 5, 6], "ref": "x"}', "too_large"),
        ('{"op": "push", "queue": "a b", "body": 1, "ref": "x"}', "bad_queue"),
        ('{"op": "subscribe", "queue": "-q", "ref": "x"}', "bad_queue"),
        ('{"op": "listen", "channel": "{x}", "ref": "x"}', "bad_queue"),
        ('{"op": "ack", "id": "nope", "token": "t", "ref": "x"}', "unknown_job"),
        ('{"op": "ack", "id": "nope", "ref": "x"}', "bad_field"),
        ('{"op": "watch", "topic": "weather", "ref": "x"}', "bad_field"),
        ('{"op": "unsubscribe", "queue": "q", "ref": "x"}', "not_subscribed"),
        ('{"op": "unlisten", "channel": "c", "ref": "x"}', "not_subscribed"),
        ('{"op": "unwatch", "topic": "stats", "ref": "x"}', "not_subscribed"),
    ],
)
async def test_bad_frames_get_an_error_and_the_connection_stays_open(ws: WsClient, frame: str, code: str) -> None:
    await ws.send(frame)
    error = await ws.expect("error")
    assert error["code"] == code, error
    assert error["ref"] == ("x" if '"ref"' in frame else None)
    assert isinstance(error["error"], str) and error["error"]
    assert (await ws.call("listen", channel="still-open"))["op"] == "listening"


async def test_binary_frame_is_refused(ws: WsClient) -> None:
    await ws.send(b'{"op": "subscribe", "queue": "q"}')
    assert (await ws.expect("error"))["code"] == "bad_frame"
    assert (await ws.call("subscribe", queue="q"))["op"] == "subscribed"


async def test_already_subscribed_and_too_many(ws: WsClient) -> None:
    await ws.call("subscribe", queue="a")
    assert (await ws.call("subscribe", queue="a"))["code"] == "already_subscribed"
    await ws.call("subscribe", queue="b")
    assert (await ws.call("subscribe", queue="c"))["code"] == "too_many"
    await ws.call("listen", channel="a")
    assert (await ws.call("listen", channel="a"))["code"] == "already_subscribed"
    await ws.call("listen", channel="b")
    assert (await ws.call("listen", channel="c"))["code"] == "too_many"
    await ws.call("watch", topic="stats")
    assert (await ws.call("watch", topic="stats"))["code"] == "already_subscribed"


async def test_stale_token_and_unknown_job(ws: WsClient, broker: RunningBroker) -> None:
    await ws.call("subscribe", queue="q")
    await http_push(broker, "q", 1)
    (job,) = await ws.jobs(1)
    assert (await ws.call("ack", id=job["id"], token=job["token"] + "x"))["code"] == "stale_token"
    assert (await ws.call("ack", id=job["id"], token=job["token"]))["op"] == "ok"
    assert (await ws.call("ack", id=job["id"], token=job["token"]))["code"] == "unknown_job"
    assert (await ws.call("touch", id=job["id"], token=job["token"]))["code"] == "unknown_job"


async def test_stale_token_from_redis_after_the_lease_expired(broker: RunningBroker) -> None:
    async with ws_connect(broker.ws_url) as first, ws_connect(broker.ws_url) as second:
        await first.call("subscribe", queue="q", lease=0.2, prefetch=1)  # full while it holds the job
        await http_push(broker, "q", 1)
        (job,) = await first.jobs(1)
        await second.call("subscribe", queue="q")
        (again,) = await second.jobs(1, timeout=5)  # the lease expired; the reaper gave it back
        assert again["id"] == job["id"] and again["attempt"] == 2
        error = await first.call("ack", id=job["id"], token=job["token"])
        assert error["op"] == "error" and error["code"] == "stale_token"
        assert (await second.call("ack", id=again["id"], token=again["token"]))["op"] == "ok"


async def test_job_exists_carries_the_existing_id(ws: WsClient) -> None:
    first = await ws.call("push", queue="q", body=1, uniq="k")
    error = await ws.call("push", queue="q", body=2, uniq="k")
    assert error["op"] == "error" and error["code"] == "job_exists" and error["id"] == first["id"]
    assert error["ref"] == "r2"


async def test_frame_over_max_frame_is_too_large_then_1009(ws: WsClient) -> None:
    await ws.send(orjson.dumps({"op": "push", "queue": "q", "body": "x" * 5000}).decode())
    error = await ws.expect("error")
    assert error["code"] == "too_large" and error["ref"] is None
    assert await ws.closed() == 1009


async def test_repeated_protocol_errors_close_with_1008(ws: WsClient, broker: RunningBroker) -> None:
    for _ in range(101):
        await ws.send("nonsense")
    assert await ws.closed() == 1008
    errors = [f for f in ws.stash if f["op"] == "error"]
    assert len(errors) == 101 and {e["code"] for e in errors} == {"bad_json"}
    # The abuser's connection is gone; another works.
    async with ws_connect(broker.ws_url) as other:
        assert (await other.call("subscribe", queue="q"))["op"] == "subscribed"


async def test_an_accepted_frame_resets_the_error_count(ws: WsClient) -> None:
    for i in range(3):
        for _ in range(60):
            await ws.send("nonsense")
        assert (await ws.call("publish", channel="c", data=i))["op"] == "ok"
    assert (await ws.call("subscribe", queue="q"))["op"] == "subscribed"


async def test_asyncapi_document(broker: RunningBroker) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{broker.url}/asyncapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc["asyncapi"] == "3.0.0"
    assert doc["servers"]["broker"]["host"] == broker.url.removeprefix("http://")
    messages = doc["components"]["messages"]
    from broker.commands import OPS

    assert OPS <= set(messages)
    server_ops = {"subscribed", "unsubscribed", "listening", "unlistened", "watching", "unwatched", "pushed"}
    assert server_ops | {"ok", "error", "job", "message", "stats", "event", "shutdown"} <= set(messages)
    for name, operation in doc["operations"].items():
        for ref in operation["messages"] + operation.get("reply", {}).get("messages", []):
            assert ref["$ref"].rsplit("/", 1)[1] in doc["channels"]["ws"]["messages"], name
    # Every code the broker can put in an error frame is listed.
    codes = set(messages["error"]["payload"]["properties"]["code"]["enum"])
    assert {"bad_json", "unknown_op", "bad_field", "bad_queue", "unknown_job", "stale_token", "job_exists"} <= codes


async def test_subscribing_registers_the_queue(ws: WsClient, broker: RunningBroker) -> None:
    await ws.call("subscribe", queue="listed")
    async with httpx.AsyncClient() as http:
        assert "listed" in (await http.get(f"{broker.url}/status/")).json()["queues"]


async def test_frames_match_the_asyncapi_schemas(broker: RunningBroker) -> None:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    async with httpx.AsyncClient() as http:
        doc = (await http.get(f"{broker.url}/asyncapi.json")).json()

    def valid(name: str, frame: dict[str, object]) -> bool:
        root = {"components": doc["components"], "$ref": f"#/components/messages/{name}/payload"}
        return bool(jsonschema_rs.validator_for(root).is_valid(frame))

    sent: list[dict[str, object]] = [
        {"op": "subscribe", "queue": "q", "prefetch": 5, "lease": 10, "ref": "a"},
        {"op": "listen", "channel": "c", "ref": "b"},
        {"op": "watch", "topic": "events", "queue": "q"},
        {"op": "watch", "topic": "stats"},
        {"op": "push", "queue": "q", "body": {"x": 1}, "priority": 3, "uniq": "u", "ref": "c"},
        {"op": "push", "queue": "q", "jobs": [1, 2]},
        {"op": "push", "queue": "q", "body": 1, "uniq": "u"},
        {"op": "publish", "channel": "c", "data": [1], "ref": "d"},
        {"op": "nope"},
    ]
    async with ws_connect(broker.ws_url) as ws:
        for frame in sent:
            if frame["op"] in doc["components"]["messages"]:
                assert valid(str(frame["op"]), frame), frame
            await ws.send(frame)
        jobs = await ws.jobs(3)
        await ws.send({"op": "ack", "id": jobs[0]["id"], "token": jobs[0]["token"], "result": 1, "ref": "e"})
        await ws.send({"op": "nack", "id": jobs[1]["id"], "token": jobs[1]["token"], "delay": 1, "error": "x"})
        await ws.send({"op": "progress", "id": jobs[2]["id"], "token": jobs[2]["token"], "data": 5, "ref": "f"})
        await ws.expect(lambda f: f.get("ref") == "f")
        await ws.expect("stats")
        await ws.expect(lambda f: f.get("event") == "progress")
        await ws.expect("message")  # published through Redis: on a Cluster it may come last
        seen = {frame["op"] for _, frame in ws.received}
        assert {
            "subscribed",
            "listening",
            "watching",
            "pushed",
            "ok",
            "error",
            "job",
            "message",
            "stats",
            "event",
        } <= seen
        for _, frame in ws.received:
            assert valid(frame["op"], frame), frame
    # A frame the schemas refuse is one the broker refuses too.
    assert not valid("push", {"op": "push", "queue": "q", "jobs": [1], "delay": 5})
    assert not valid("subscribe", {"op": "subscribe", "queue": "no spaces"})
